"""How every command reports bad input: one line ``ditlab.<command>: error: ...``, exit status 2,
and no run dir left behind.

``hydra_command`` replaces ``@hydra.main`` for the commands: Hydra composes the config (and
creates the run dir) before our code runs, and prints ~20 lines for an unknown option; this turns a
composition error into one line too, and removes a run dir that this invocation created for nothing.
So does an error of a sweeper or a launcher (Optuna, submitit): one line naming the exception and
its message. The task goes to a launcher's jobs by reference (``HydraTask``).
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException, InstantiationException
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

CONF_DIR = str(Path(__file__).parents[1] / "conf")
BAD_INPUT_EXIT = 2
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)
# Options that moved (old key -> new key): a command line or config that still sets the old one
# gets one line naming the new one.
MOVED_OPTIONS = {
    "trainer.gradient_clip_val": "module.gradient_clip_val",  # the training step clips (manual optimization)
    "trainer.accumulate_grad_batches": "module.accumulate_grad_batches",  # and accumulates
}


def moved_option(key: str, value) -> str:
    """The one line for an option set under its old key."""
    return f"{key}={value}: the option moved; expected {MOVED_OPTIONS[key]}={value}"


TIME_GUARD_EXIT = 6


class TimeGuardExceeded(RuntimeError):
    """A stage sized in steps reached its time guard first. Stopping it there would hand on a result
    that depends on the machine's speed (a VAE or classifier cut short), so the guard is an error."""


def check_time_guard(option: str, seconds: float | None, start: float, step: int, max_steps: int) -> None:
    """Raise ``TimeGuardExceeded`` when ``seconds`` (None: no guard) have passed since ``start``
    before ``max_steps`` steps were done."""
    if seconds is not None and step < max_steps and time.time() - start >= seconds:
        raise TimeGuardExceeded(
            f"{option}={seconds:g} reached at step {step} of {max_steps}; a stage cut short would make the "
            f"result depend on this machine's speed: expected {option}=null (no guard) or a larger value"
        )


def fail(prog: str, message: str, code: int = BAD_INPUT_EXIT, remove_run_dir: bool = True):
    """Print ``<prog>: error: <first line of message>`` and exit with ``code``."""
    if remove_run_dir:
        remove_fresh_run_dir()
    print(f"{prog}: error: {first_line(message)}", file=sys.stderr)
    sys.exit(code)


def first_line(message) -> str:
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(message).__name__


def config_error_message(err) -> str:
    """OmegaConf's errors (a ``???`` left unset, a bad interpolation) as one line naming the key."""
    key = getattr(err, "full_key", None)
    if isinstance(err, MissingMandatoryValue) and key:
        return f"{key}=??? is not set; expected {key}=<value> on the command line"
    return f"{key}: {first_line(err)}" if key else first_line(err)


class ConfigError(ValueError):
    """Bad input (a config, an override, a file it names), reported as one line with ``exit_code``:
    2, or the exit status its cause has (e.g. an object store that stopped answering)."""

    def __init__(self, message: str, exit_code: int = BAD_INPUT_EXIT):
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def config_errors(errors: tuple = INPUT_ERRORS, causes: tuple | None = None) -> Iterator[None]:
    """Inside, bad input raises ``ConfigError`` (one line): OmegaConf's errors (a ``???`` left unset,
    a bad interpolation: the key named), ``errors``, and an object the config could not build
    (Hydra's InstantiationException) when its cause is one of ``causes`` (default: ``errors``), judged
    by that cause. Anything else goes on as it is."""
    causes = errors if causes is None else causes
    try:
        yield
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        raise ConfigError(config_error_message(err)) from err
    except InstantiationException as err:
        cause = err.__cause__ or err
        if not isinstance(cause, causes):
            raise
        raise ConfigError(first_line(cause), exit_code(cause)) from err
    except errors as err:
        raise ConfigError(first_line(err), exit_code(err)) from err


def exit_on_error(prog: str, fn: Callable, *args, errors=INPUT_ERRORS):
    """Run a command; bad input (``config_errors``) becomes one line on stderr and its exit status
    (2 unless the cause has its own), without a traceback."""
    try:
        with config_errors(errors):
            return fn(*args)
    except ConfigError as err:
        fail(prog, str(err), code=err.exit_code)


def exit_code(err: BaseException) -> int:
    """An error's own exit status where it has one (e.g. an object store that stopped answering), else 2."""
    return getattr(err, "exit_code", BAD_INPUT_EXIT)


def remove_fresh_run_dir() -> None:
    """Remove the run dir Hydra made for this invocation when it holds nothing but Hydra's own files."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    if not out.is_dir() or out.resolve() == Path.cwd().resolve():
        return
    own = {".hydra", f"{hydra_cfg.job.name}.log"}
    if all(entry.name in own for entry in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)
        for parent in list(out.parents)[:2]:  # outputs/<command>/ made for it too, when now empty
            if parent.resolve() == Path.cwd().resolve() or any(parent.iterdir()):
                break
            parent.rmdir()


def _unparsable(overrides: list[str]) -> str | None:
    """The first command-line override Hydra's grammar rejects (its message does not name it)."""
    parser = OverridesParser.create()
    for override in overrides:
        if override.startswith("-"):
            continue  # -m, --cfg, ...
        try:
            parser.parse_override(override)
        except Exception:  # noqa: BLE001 - any parse failure names this override
            return override
    return None


def composition_error(text: str, overrides: list[str] = ()) -> str:
    """Hydra's multi-line composition report -> one line naming the bad value and what was expected."""
    unknown = re.search(r"Could not override '([^']+)'", text)
    if unknown and unknown.group(1) in MOVED_OPTIONS:
        key = unknown.group(1)
        given = next((o for o in overrides if o.partition("=")[0] == key), f"{key}=<value>")
        return moved_option(key, given.partition("=")[2])
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = [o.strip() for o in re.findall(r"^\t(\S+)$", text, flags=re.M) if o.strip() != "base"]
        expected = f"one of {', '.join(options)}" if options else f"an option of config group {group}"
        return f"{group}={option}: Could not find '{group}/{option}'; expected {expected}"
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and "HYDRA_FULL_ERROR" not in line and not line.startswith("Traceback")
    ]
    if not lines:
        return "the command line could not be parsed"
    bad = _unparsable(list(overrides)) if overrides else None
    if bad is not None:
        return f"{bad}: {lines[0]}; expected key=value in Hydra's override grammar"
    key_error = next((line for line in lines if line.startswith("Key '")), None)
    return f"{lines[0]} ({key_error})" if key_error and key_error != lines[0] else lines[0]


def hydra_command(prog: str, config_name: str):
    """Decorator: ``@hydra_command("ditlab.train", "train")`` instead of ``@hydra.main``."""

    def decorate(task: Callable) -> Callable[[], None]:
        hydra_task = HydraTask(task, prog)
        hydra_main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(hydra_task)

        @functools.wraps(task)
        def entry() -> None:
            check_flags(prog)
            full_error = os.environ.get("HYDRA_FULL_ERROR")
            os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises what stopped it (not ~20 lines): one line below
            try:
                hydra_main()
            except Exception as err:  # noqa: BLE001 - composition, a sweeper or a launcher (not the task)
                if full_error == "1":
                    raise
                if err is hydra_task.raised:  # the task's own error: its traceback and exit 1, as Hydra does
                    traceback.print_exception(err)
                    sys.exit(1)
                fail(prog, hydra_error(err, sys.argv[1:]), remove_run_dir=False)
            finally:
                _restore_env("HYDRA_FULL_ERROR", full_error)

        entry.hydra_task = hydra_task  # what a pickled HydraTask finds again (HydraTask.__reduce__)
        return entry

    return decorate


class HydraTask:
    """The function Hydra calls with the composed config (``task``), pickled by reference: submitit
    sends it to every SLURM job as ``<module>.<name>.hydra_task``, imported there. By value,
    cloudpickle would take the command's function from ``__main__`` (``python -m ditlab.train``)
    with everything it refers to, the terminal's stderr held during composition among it (a file
    open for writing: "Cannot pickle files that are not opened for reading")."""

    def __init__(self, task: Callable, prog: str):
        functools.update_wrapper(self, task)  # Hydra names the job and finds the config by __wrapped__
        self.task, self.prog = task, prog
        self.raised: BaseException | None = None  # what the task itself raised (a bug: its traceback stays)

    def __call__(self, cfg):
        try:
            return self.task(cfg)
        except TimeGuardExceeded as err:  # any command's stage (prepare's VAE or classifier, ...)
            fail(self.prog, str(err), code=TIME_GUARD_EXIT, remove_run_dir=False)
        except Exception as err:
            self.raised = err
            raise

    def __reduce__(self):
        return _imported_task, (_module_name(self.task), self.task.__name__)


def check_flags(prog: str) -> None:
    """Hydra's own flags (``-m``, ``--cfg job``, ...) as Hydra parses them: a bad one is one line (argparse
    would print its usage first)."""
    parser = get_args_parser()
    parser.error = lambda message: fail(prog, f"{message}; expected Hydra's flags (--help) and key=value overrides")
    parser.parse_args(sys.argv[1:])


def _module_name(fn: Callable) -> str:
    """The module ``fn`` is imported from: ``python -m ditlab.train`` runs ditlab.train as ``__main__``."""
    if fn.__module__ != "__main__":
        return fn.__module__
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None:
        raise pickle.PicklingError(f"{fn.__name__} runs from a script file; expected python -m <module>")
    return spec.name


def _imported_task(module: str, name: str) -> HydraTask:
    return getattr(importlib.import_module(module), name).hydra_task


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def hydra_error(err: Exception, overrides: list[str] = ()) -> str:
    """What stopped Hydra, as one line: a composition error as Hydra words it (``composition_error``);
    a sweeper's or a launcher's exception by its name and message, with the line a failed job
    printed for itself (``ditlab.<command>: error: ...``) when its message carries one."""
    if isinstance(err, CompactHydraException):
        text = str(err)
        if isinstance(err.__cause__, OmegaConfBaseException):
            text += "\n" + str(err.__cause__)
        return composition_error(text, overrides)
    line = f"{type(err).__name__}: {first_line(err)}"
    own = re.findall(r"^\s*(ditlab\.\w+: .+)$", str(err), flags=re.M)
    return f"{line} ({own[-1].strip()})" if own else line
