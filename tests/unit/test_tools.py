"""tools/ (what `make install` runs)."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_install_hands_pips_index_settings_to_uv():
    """tools/install.py (make install): pip's indexes, wheel folders, constraints and CA bundle reach uv,
    with pip's precedence (PIP_* over [install] over [global]) whatever the order of the lines."""
    spec = importlib.util.spec_from_file_location("install", REPO / "tools" / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    # as `pip config list` prints it: sorted, values in repr (a multi-line pip.conf value keeps its newlines)
    text = (
        ":env:.find-links='/opt/wheels'\n"
        ":env:.timeout='60'\n"
        "download.index-url='https://ignored.example/simple'\n"
        "global.cert='/etc/ssl/certs/ca.crt'\n"
        "global.extra-index-url='\\nfile:///opt/a/simple\\nfile:///opt/b/simple'\n"
        "global.find-links='/opt/old'\n"
        "global.index-url='https://global.example/simple'\n"
        "install.index-url='https://install.example/simple'\n"
        "install.no-index='true'\n"
    )
    settings = install.parse_pip_config(text)
    assert settings == {
        "find-links": ["/opt/wheels"],  # the environment variable wins, as in pip
        "cert": ["/etc/ssl/certs/ca.crt"],
        "extra-index-url": ["file:///opt/a/simple", "file:///opt/b/simple"],
        "index-url": ["https://install.example/simple"],  # [install] over [global]; [download] ignored
        "no-index": ["true"],
    }
    settings.pop("cert")
    assert install.uv_options(settings) == [
        "--find-links", "/opt/wheels",
        "--extra-index-url", "file:///opt/a/simple",
        "--extra-index-url", "file:///opt/b/simple",
        "--index-url", "https://install.example/simple",
        "--no-index",
    ]  # fmt: skip
