"""``ditlab <command> [overrides ...]``: one entry point for the ``python -m ditlab.<command>`` mains.

The command's module runs as ``__main__`` (``runpy``), exactly as ``python -m ditlab.<command>``
would run it: the same Hydra overrides, and Lightning's DDP launcher re-launches the ranks as
``python -m ditlab.<command> ...``.
"""

from __future__ import annotations

import runpy
import sys

COMMANDS = {
    "prepare": ("ditlab.prepare", "images -> VAE latent shards + FID reference statistics"),
    "train": ("ditlab.train", "train a DiT (Hydra overrides; -m for sweeps)"),
    "sample": ("ditlab.sample", "samples from a checkpoint or diffusers folder (.npz / PNGs / grid)"),
    "evaluate": ("ditlab.evaluate", "FID & co. of samples, or run=<dir>: a run's FID curve"),
    "bench": ("ditlab.bench", "benchmarks (data, sampling, train step)"),
    "export": ("ditlab.export", "a complete diffusers folder from a checkpoint"),
    "report": ("ditlab.report", "a sweep as a table: mean and spread over seeds, differences with intervals"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: ditlab <command> [overrides ...]   (ditlab <command> --help: its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] not in COMMANDS:
        print(f"ditlab: error: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module = COMMANDS[argv[0]][0]
    sys.argv = [module, *argv[1:]]  # runpy puts the module's file in argv[0]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
