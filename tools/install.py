"""Install the project (editable, with the dev extras) into the running interpreter's environment.

uv when it can be had: torch 2.14.1 with its CUDA libraries and triton is 5.3 GB installed, which
pip unpacked in ~3 minutes of a 20-minute `make train` and uv in ~20 s. uv does not read pip's
configuration, so the indexes, wheel folders, constraints and CA bundle pip is configured with
(pip.conf and PIP_* variables, as `pip config list` shows them) are handed to it. Any failure of
uv falls back to plain pip, so the result never depends on uv being reachable.

    python tools/install.py [requirement ...]     (default: -e '.[dev]')
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

PIP = [sys.executable, "-m", "pip"]
# pip setting -> uv option (each setting may hold several values, separated by whitespace)
SETTINGS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
    "no-index": "--no-index",  # a switch: given when pip's value is true
    "cert": None,  # a CA bundle: handed to uv as SSL_CERT_FILE
}
# The config sections that apply to `pip install`, weakest first (pip's precedence: the install
# command's section over [global], PIP_* variables over both). `pip config list` sorts its lines,
# so the order of the lines says nothing.
SECTIONS = ("global", "install", ":env:")
TRUE = ("1", "true", "yes", "on")


def pip_settings() -> dict[str, list[str]]:
    return parse_pip_config(subprocess.run([*PIP, "config", "list"], capture_output=True, text=True).stdout)


def parse_pip_config(text: str) -> dict[str, list[str]]:
    """{setting: values} of the settings uv needs, from `pip config list` output (lines like
    global.find-links='/opt/wheels', values in Python repr), with pip's precedence."""
    found: dict[str, tuple[int, list[str]]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if not sep or name not in SETTINGS or section not in SECTIONS:
            continue
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            value = value.strip()
        rank = SECTIONS.index(section)
        if name not in found or rank >= found[name][0]:
            found[name] = (rank, str(value).split())
    return {name: values for name, (_, values) in found.items()}


def uv_options(settings: dict[str, list[str]]) -> list[str]:
    options = []
    for name, values in settings.items():
        if name == "no-index":
            options += [SETTINGS[name]] if values and values[0].lower() in TRUE else []
        elif SETTINGS[name]:
            options += [part for value in values for part in (SETTINGS[name], value)]
    return options


def uv_install(requirements: list[str]) -> bool:
    if subprocess.run([*PIP, "install", "-q", "uv"]).returncode != 0:
        return False
    settings = pip_settings()
    env = dict(os.environ)
    for cert in settings.pop("cert", [])[:1]:
        env["SSL_CERT_FILE"] = cert
    args = uv_options(settings)
    # pip's rule for a package in several indexes: the best version anywhere (uv's default: the first index)
    cmd = [
        sys.executable,
        "-m",
        "uv",
        "pip",
        "install",
        "-q",
        "--python",
        sys.executable,
        "--index-strategy",
        "unsafe-best-match",
        # .pyc files now (pip writes them, uv does not by default): where PYTHONDONTWRITEBYTECODE is
        # set, as on the project's VMs, every process would otherwise compile torch and Lightning
        # again on import (measured: experiments/benchmarks/README.md, "make test's time")
        "--compile-bytecode",
        *args,
        *requirements,
    ]
    return subprocess.run(cmd, env=env).returncode == 0


def main() -> int:
    requirements = sys.argv[1:] or ["-e", ".[dev]"]
    if uv_install(requirements):
        return 0
    print("install: uv was not available or failed; installing with pip", file=sys.stderr)
    return subprocess.run([*PIP, "install", "-q", *requirements]).returncode


if __name__ == "__main__":
    sys.exit(main())
