"""``python -m ditlab.report <sweep dir or run dirs> [options]``: a sweep as a table.

Reads every run under the given dirs (a dir holding ``metrics.json``; a sweep dir holds one per
job) and groups them by their config without the seed (``ditlab.runtime.sweeps.config_overrides``: the
job's overrides less ``seed``, ``run_name``, ``ckpt_path``, ``paths.*``, ``hydra.*``), each config named
by the overrides that not every run shares (the sweep's axes). Writes beside them (``--out``):

- ``report.md`` and ``report.csv``: one row per config: for each metric the mean and standard
  deviation across its seeds, their number, the runs' own (within-run) se and, in the CSV, every
  run's value with its interval;
- ``report.png``: each metric's curve over the steps (the runs' CSV logs, ``csv/run/metrics.csv``):
  the mean across seeds with a band of +- one standard deviation;

and prints the table and the difference between configs (the second minus the first, or each against
the first, or ``--compare A B``) with its interval (``ditlab.metrics.across_seeds``).

Metrics come from each run's ``metrics.json`` (its final values: ``val/fid_clf``, ``val/fid_clf_se``,
``train/loss``, ...) and from any ``results.json`` of ``ditlab.evaluate`` inside the run dir (named
``eval/<metric>``: ``eval/fid``). By default the table shows every metric that comes with an se,
and ``val/loss_fixed``, ``val/loss_ema`` and ``train/loss``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ditlab.metrics.across_seeds import Difference, Spread, difference, spread
from ditlab.metrics.uncertainty import derived_name
from ditlab.runtime.errors import fail
from ditlab.runtime.files import atomic_path, write_text
from ditlab.runtime.sweeps import DEFAULTS_GROUP, config_overrides

PROG = "ditlab.report"
SUMMARY, RESULTS = "metrics.json", "results.json"
CURVES = Path("csv") / "run" / "metrics.csv"  # the CSV logger's file (conf/logger/csv.yaml)
HPARAMS = Path("csv") / "run" / "hparams.yaml"
OUTPUTS = ("report.md", "report.csv", "report.png")
ALWAYS = ("val/loss_fixed", "val/loss_ema", "train/loss")  # shown when present, se or not


@dataclass
class Run:
    path: Path
    config: tuple[str, ...]  # the overrides that make its config, without the seed
    seed: str
    metrics: dict[str, float]
    curves: list[dict[str, str]] = field(default_factory=list)  # the rows of its CSV log
    label: str = ""  # its config's row label (``label_configs``)


# --- reading the runs --------------------------------------------------------------------------------


def find_runs(paths: list[str]) -> list[Run]:
    """Every run under ``paths`` (a run dir, or any dir holding run dirs), each read once, by path."""
    found: dict[Path, None] = {}
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise FileNotFoundError(f"{given} is not a directory; expected a run dir or a sweep dir")
        summaries = sorted(path.rglob(SUMMARY))
        if not summaries:
            raise ValueError(f"{given} holds no run ({SUMMARY}); expected a run dir or a sweep dir")
        found.update({s.parent.resolve(): None for s in summaries})
    return [read_run(path) for path in found]


def read_run(path: Path) -> Run:
    try:
        summary = json.loads((path / SUMMARY).read_text())
        metrics = {k: float(v) for k, v in summary["metrics"].items() if v is not None}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path / SUMMARY} is not a ditlab metrics.json ({err!r}); expected its 'metrics'") from err
    overrides = list(summary.get("overrides", []))
    metrics.update(evaluated_metrics(path))
    return Run(path, tuple(config_overrides(overrides)), run_seed(path, overrides), metrics, read_curves(path / CURVES))


def evaluated_metrics(run_dir: Path) -> dict[str, float]:
    """``eval/<metric>`` of every ``ditlab.evaluate`` results.json in the run dir (the latest evaluation
    of a metric wins)."""
    entries = []
    for path in sorted(run_dir.rglob(RESULTS)):
        try:
            entries += json.loads(path.read_text())["evaluations"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a ditlab results.json ({err!r}); expected its 'evaluations'") from err
    out = {}
    for entry in sorted(entries, key=lambda e: e.get("evaluated_at", "")):
        out.update({f"eval/{k}": float(v) for k, v in entry["metrics"].items() if v is not None})
    return out


def run_seed(run_dir: Path, overrides: list[str]) -> str:
    """The run's seed: from its overrides, else its logged config, else '?'."""
    for item in overrides:
        if item.split("=", 1)[0].lstrip("+~") == "seed":
            return item.split("=", 1)[1]
    if (run_dir / HPARAMS).is_file():
        seed = (yaml.safe_load((run_dir / HPARAMS).read_text()) or {}).get("seed")
        if seed is not None:
            return str(seed)
    return "?"


def seed_order(seed: str) -> tuple:
    """Seeds in numeric order (2 before 10), anything else after them."""
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def read_curves(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --- the table -----------------------------------------------------------------------------------------


def default_metrics(runs: list[Run]) -> list[str]:
    """The metrics that come with an se (FID-type numbers), then ``ALWAYS``'s, as present."""
    names = {name for run in runs for name in run.metrics}
    with_se = sorted(n for n in names if not derived_name(n) and f"{n}_se" in names)
    return with_se + [n for n in ALWAYS if n in names]


def label_configs(runs: list[Run]) -> list[str]:
    """Each run's ``label``: the overrides of its config that not every run shares (the sweep's axes),
    or the whole config when all runs share one. Returns the overrides all runs share."""
    configs = {run.config for run in runs}
    common = set.intersection(*(set(c) for c in configs)) if len(configs) > 1 else set()
    for run in runs:
        run.label = " ".join(item for item in run.config if item not in common) or DEFAULTS_GROUP
    return sorted(common)


def summarise(runs: list[Run], metrics: list[str]) -> dict[str, dict[str, Spread | None]]:
    """{config label: {metric: its Spread over the config's runs (None: no run has it)}}, labels sorted."""
    by_config: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.label, seed_order(r.seed))):
        by_config.setdefault(run.label, []).append(run)
    return {
        config: {
            m: spread(
                [r.metrics.get(m) for r in group],
                [r.metrics.get(f"{m}_se") for r in group],
                [r.metrics.get(f"{m}_ci_low") for r in group],
                [r.metrics.get(f"{m}_ci_high") for r in group],
            )
            for m in metrics
        }
        for config, group in by_config.items()
    }


def number(value: float | None, digits: int = 4) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def markdown_table(summary, seeds: dict[str, list[str]], metrics: list[str]) -> str:
    header = ["#", "config", "seeds"]
    for m in metrics:
        header += [f"{m} (mean ± sd)", f"{m} within-run se"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, (config, row) in enumerate(summary.items(), start=1):
        cells = [str(i), config.replace("|", "\\|"), ", ".join(seeds[config])]
        for m in metrics:
            s = row[m]
            if s is None:
                cells += ["", ""]
                continue
            cell = f"{number(s.mean)} ± {number(s.sd, 2)}" if s.n > 1 else number(s.mean)
            cells += [cell + ("" if s.n == len(seeds[config]) else f" (n={s.n})"), number(s.within_se, 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(summary, seeds: dict[str, list[str]], metrics: list[str]) -> str:
    columns = ["index", "config", "n", "seeds"]
    for m in metrics:
        columns += [f"{m}_{part}" for part in ("mean", "sd", "n", "within_se", "runs")]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for i, (config, row) in enumerate(summary.items(), start=1):
        line = {"index": i, "config": config, "n": len(seeds[config]), "seeds": " ".join(seeds[config])}
        for m in metrics:
            s = row[m]
            if s is None:
                continue
            runs = "; ".join(
                number(v, 6) + ("" if lo is None else f" [{number(lo, 6)}, {number(hi, 6)}]") for v, lo, hi in s.runs
            )
            line |= {f"{m}_mean": s.mean, f"{m}_sd": "" if s.n < 2 else s.sd, f"{m}_n": s.n}
            line |= {f"{m}_within_se": "" if s.within_se is None else s.within_se, f"{m}_runs": runs}
        writer.writerow(line)
    return out.getvalue()


# --- differences -------------------------------------------------------------------------------------


def pick(spec: str, configs: list[str]) -> int:
    """A config by its row number (1-based, as the table numbers them) or its exact label."""
    if spec.isdigit() and 1 <= int(spec) <= len(configs):
        return int(spec) - 1
    if spec in configs:
        return configs.index(spec)
    rows = "; ".join(f"{i} = {c}" for i, c in enumerate(configs, start=1))
    raise ValueError(f"--compare {spec!r} names no config; expected a row number or a label ({rows})")


def pairs(configs: list[str], compare: list[str] | None) -> list[tuple[int, int]]:
    """--compare A B; else each config against the first."""
    if compare:
        return [(pick(compare[0], configs), pick(compare[1], configs))]
    return [(0, j) for j in range(1, len(configs))]


def difference_line(metric: str, rows: tuple[int, int], configs, found: Difference | None, level: float) -> str:
    a, b = rows
    head = f"{metric}: [{b + 1}] {configs[b]} - [{a + 1}] {configs[a]}"
    if found is None:
        return f"{head}: no interval (one run each, without an se)"
    verdict = "resolved" if found.resolved else "not resolved"
    return (
        f"{head} = {number(found.estimate)} ({level:.0%} interval {number(found.low)} to {number(found.high)}; "
        f"{found.method}): {verdict}"
    )


# --- the curves --------------------------------------------------------------------------------------


def plot_curves(runs: list[Run], summary, metrics: list[str], path: Path) -> bool:
    """One panel per metric logged over the steps: each config's mean across seeds, +- one sd. False
    when no run logged any of ``metrics`` at two steps or more (no plot written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(summary)
    series = {m: curve_points(runs, m) for m in metrics}
    series = {m: s for m, s in series.items() if any(len(points) > 1 for points in s.values())}
    if not series:
        return False
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.4), squeeze=False)
    for ax, (metric, per_config) in zip(axes[0], series.items()):
        for config, points in sorted(per_config.items(), key=lambda item: configs.index(item[0])):
            steps = sorted(points)
            means = [sum(points[s]) / len(points[s]) for s in steps]
            sds = [sample_sd(points[s]) for s in steps]
            label = f"[{configs.index(config) + 1}] {config}"
            line = ax.plot(steps, means, marker="o", markersize=3, label=label[:48])[0]
            lows, highs = [m - d for m, d in zip(means, sds)], [m + d for m, d in zip(means, sds)]
            ax.fill_between(steps, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return True


def curve_points(runs: list[Run], metric: str) -> dict[str, dict[int, list[float]]]:
    """{config: {step: the values of its runs at that step}} from the runs' CSV logs."""
    out: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        for row in run.curves:
            value, step = row.get(metric), row.get("step")
            if value in (None, "") or step in (None, "") or not math.isfinite(float(value)):
                continue
            out.setdefault(run.label, {}).setdefault(int(float(step)), []).append(float(value))
    return out


def sample_sd(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# --- the command -------------------------------------------------------------------------------------


def default_out(paths: list[str]) -> Path:
    """The one dir given, or the dir that holds all of them."""
    return Path(paths[0]) if len(paths) == 1 else Path(os.path.commonpath([str(Path(p).resolve()) for p in paths]))


def report(args: argparse.Namespace) -> dict:
    if not 0 < args.level < 1:
        raise ValueError(f"--level {args.level}; expected a confidence level in (0, 1)")
    runs = find_runs(args.dirs)
    common = label_configs(runs)
    metrics = args.metrics or default_metrics(runs)
    present = {name for run in runs for name in run.metrics}
    missing = [m for m in metrics if m not in present]
    if missing or not metrics:
        raise ValueError(f"--metrics {missing or metrics}: in no run; expected some of {sorted(present)}")
    summary = summarise(runs, metrics)
    configs = list(summary)
    seeds = {c: [r.seed for r in sorted(runs, key=lambda r: seed_order(r.seed)) if r.label == c] for c in configs}
    compared = pairs(configs, args.compare)
    out = Path(args.out) if args.out else default_out(args.dirs)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summary, seeds, metrics)
    if common:
        table = f"All runs: {' '.join(common)}\n\n{table}"
    write_text(out / OUTPUTS[0], table)
    write_text(out / OUTPUTS[1], csv_text(summary, seeds, metrics))
    plotted = plot_curves(runs, summary, metrics, out / OUTPUTS[2])
    print(f"{len(runs)} runs, {len(configs)} configs\n")
    print(table)
    differences = {}
    for rows in compared:
        for m in metrics:
            a, b = summary[configs[rows[0]]][m], summary[configs[rows[1]]][m]
            found = None if a is None or b is None else difference(a, b, args.level)
            differences[(rows, m)] = found
            print(difference_line(m, rows, configs, found, args.level))
    written = [out / name for name in OUTPUTS[: 3 if plotted else 2]]
    print("\n(written to " + ", ".join(str(p) for p in written) + ")")
    return {"summary": summary, "differences": differences, "written": written}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ditlab.report", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="a sweep dir (multirun/<date>) or run dirs")
    p.add_argument("--metrics", type=lambda v: [m for m in v.split(",") if m], default=None, help="m1,m2,...")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="B - A: row numbers or config labels")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the differences' intervals")
    p.add_argument("--out", default=None, help="where report.md/.csv/.png go (default: the dir given)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return report(args)
    except (ValueError, FileNotFoundError) as err:
        fail(PROG, str(err), remove_run_dir=False)


if __name__ == "__main__":
    main()
