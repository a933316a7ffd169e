"""Reading run folders back: the final-metrics table (``leantrain report``) and curves (``leantrain plot``).

Three kinds of run write three kinds of ``metrics.jsonl`` (see :mod:`leantrain.runs.supervised`,
:mod:`leantrain.federated.run`, :mod:`leantrain.marl.run`): supervised records carry a ``split`` (train, val) and a
``step``; federated records are one line per ``round`` with no split (``test_*`` keys only on evaluated rounds); MARL
records carry a ``split`` (train, test, resume) and ``t_env``. The kind of a folder comes from its ``config.yaml``
(the same test that dispatches the run: ``federated.algorithm`` set, ``marl.env`` set, else supervised).

``summary.json`` is written when a run ends (completed, interrupted, diverged, stopped, failed). A run killed by
SIGKILL, or still running, has none: the report shows it as ``incomplete`` with the progress and the last
evaluation its ``metrics.jsonl`` holds, under the same column names as the final metrics of finished runs, so one
table compares both. A resumed run keeps its previous ``summary.json`` until it ends again; records past that
summary's progress mark it ``incomplete`` too. Folders with nothing to show are skipped with a note on stderr.

Plot legends name the recipe plus the config keys that differ between plotted runs of that same recipe (runs of
different recipes are already told apart by the name).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from leantrain.config import flatten
from leantrain.errors import LeantrainError
from leantrain.runs.folder import PRESENTATION_KEYS
from leantrain.runs.kinds import RUN_KINDS, kind_of
from leantrain.train.metric_loggers import read_jsonl

# Record keys that place a record (x axes, bookkeeping) rather than measure the model.
POSITION_KEYS = {"split", "step", "epoch", "round", "t_env", "episodes"}
BOOKKEEPING_KEYS = {"elapsed_s", "wall_s", "lr", "samples_per_s"}
# MARL test records name the greedy return ``return_mean``; summary.json calls the same number ``test_return``.
MARL_FINAL_NAMES = {"return_mean": "test_return", "attacked_return_mean": "attacked_test_return"}


@dataclass
class RunFolder:
    """What one run folder holds: its resolved config, its summary (None until the run ends) and its records."""

    path: Path
    config: dict
    summary: dict | None
    records: list[dict]

    @property
    def kind(self) -> str:
        """supervised, federated or marl: as summary.json says, else by the config keys that dispatch the run."""
        if (self.summary or {}).get("kind") in RUN_KINDS:
            return self.summary["kind"]
        return kind_of(self.config).name

    @property
    def name(self) -> str:
        """The recipe name (``name`` in config.yaml), else the folder name."""
        return str(self.config.get("name") or self.path.name)

    def last_position(self) -> int | None:
        """How far the records go: last step, rounds done (1-based) or last t_env."""
        key = RUN_KINDS[self.kind].x_key
        last = next((r[key] for r in reversed(self.records) if isinstance(r.get(key), int | float)), None)
        return last + 1 if last is not None and key == "round" else last


def load_summary(run_dir: Path) -> dict:
    """The ``summary.json`` of a finished run; LeantrainError when the run has not ended (or is no run folder)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise LeantrainError(f"{run_dir} is not a finished run folder (no summary.json)")
    return json.loads(path.read_text())


def read_run(run_dir: Path) -> RunFolder | str:
    """The folder's contents, or the reason (one phrase) it has nothing to read."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return "not a run folder (no config.yaml)"
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError:
        return "unreadable config.yaml"
    summary = None
    if (run_dir / "summary.json").is_file():
        try:
            summary = load_summary(run_dir)
        except json.JSONDecodeError:
            summary = None  # torn by a kill mid-write: the records still tell how far the run got
    metrics = run_dir / "metrics.jsonl"
    records = read_jsonl(metrics) if metrics.is_file() else []
    if summary is None and not records:
        return "no data yet (no summary.json, no metrics.jsonl)"
    return RunFolder(run_dir, config if isinstance(config, dict) else {}, summary, records)


def _note(text: str) -> None:
    print(text, file=sys.stderr)


def _open_runs(run_dirs: list[Path], verb: str) -> list[RunFolder]:
    """The readable folders; a note on stderr for each skipped one, LeantrainError when none is left."""
    runs, skipped = [], []
    for run_dir in run_dirs:
        run = read_run(run_dir)
        if isinstance(run, str):
            skipped.append(f"{run_dir}: {run}")
        else:
            runs.append(run)
    if not runs:
        raise LeantrainError(f"nothing to {verb}: {'; '.join(skipped)}")
    for line in skipped:
        _note(f"skipped {line}")
    return runs


# ---------------------------------------------------------------- report


def report_rows(run_dirs: list[Path]) -> list[dict]:
    """One flat row per readable run: name, kind, status, progress, times, params and every final metric.

    A run without a (current) summary.json is ``incomplete``: its progress and last evaluation come from its
    metrics.jsonl. Unreadable folders are skipped with a note on stderr.
    """
    rows = []
    for run in _open_runs(run_dirs, "report"):
        stale = _summary_is_stale(run)
        if run.summary is None or stale:
            why = "records go past its summary.json" if stale else "no summary.json"
            _note(f"{run.path}: incomplete ({why}: killed or still running); progress from metrics.jsonl")
            rows.append(_progress_row(run))
        else:
            rows.append(_summary_row(run))
    return rows


def _summary_is_stale(run: RunFolder) -> bool:
    done = (run.summary or {}).get(RUN_KINDS[run.kind].summary_progress)
    last = run.last_position()
    return isinstance(done, int | float) and last is not None and last > done


def _summary_row(run: RunFolder) -> dict:
    s, kind = run.summary, RUN_KINDS[run.kind]
    progress = s.get(kind.summary_progress)
    row = {"run": run.path.name, "kind": run.kind, "status": s.get("status")}
    row[kind.progress] = progress if progress is not None else run.last_position()
    if s.get("error"):
        row["error"] = s["error"]
    for key in ("trainable_params", "trainable_pct", "step_time_s_median", "peak_rss_mb", "train_time_s",
                "wall_time_s"):  # fmt: skip
        if key in s or key in ("trainable_params", "train_time_s", "wall_time_s"):
            row[key] = s.get(key)
    # An interrupted or diverged run has no final metrics: its last logged evaluation stands in.
    row.update(s.get("final") or last_eval(run))
    return row


def _progress_row(run: RunFolder) -> dict:
    row = {"run": run.path.name, "kind": run.kind, "status": "incomplete"}
    row[RUN_KINDS[run.kind].progress] = run.last_position()
    row.update(last_eval(run))
    return row


def last_eval(run: RunFolder) -> dict:
    """The last logged evaluation, named like the final metrics of summary.json (val_loss, test_accuracy, ...)."""
    if run.kind in ("federated", "hetero"):  # records name their split: test_accuracy, val_loss, ...
        prefixes = ("test_", "val_")
        last = next((r for r in reversed(run.records) if any(k.startswith(prefixes) for k in r)), {})
        return {k: v for k, v in last.items() if k.startswith(prefixes) and _is_number(v)}
    split = RUN_KINDS[run.kind].split
    last = next((r for r in reversed(run.records) if r.get("split") == split), {})
    names = MARL_FINAL_NAMES if run.kind == "marl" else {}
    skip = POSITION_KEYS | BOOKKEEPING_KEYS
    return {names.get(k, f"{split}_{k}"): v for k, v in last.items() if k not in skip and _is_number(v)}


def print_report(run_dirs: list[Path], baseline: str | None = None, tolerance: float | None = None) -> None:
    """Print the rows as a rich table on stdout (notes on skipped and incomplete runs go to stderr).

    With ``baseline`` (a run's recipe name or folder name) every run's main test metric is compared with the
    baseline's: a column of the differences, and one verdict line per run when ``tolerance`` is given."""
    from rich.console import Console
    from rich.table import Table

    rows = report_rows(run_dirs)
    verdicts = compare_to_baseline(rows, run_dirs, baseline, tolerance) if baseline else []
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    table = Table(*columns)
    for line in cells:
        table.add_row(*line)
    # Wide enough that no cell wraps, whatever the terminal (a table is read whole or piped to a file).
    width = sum(max(len(c), *(len(line[i]) for line in cells)) + 3 for i, c in enumerate(columns)) + 1
    Console(width=width).print(table)
    for line in verdicts:
        print(line)


# Metrics where smaller is better; every other test metric (accuracy, return) is better when larger.
LOWER_IS_BETTER = ("loss", "perplexity")


def compare_to_baseline(rows: list[dict], run_dirs: list[Path], baseline: str, tolerance: float | None) -> list[str]:
    """Add ``vs <baseline>`` (this run's test metric minus the baseline's) to each row; verdict lines if
    ``tolerance`` is given: within it, or how far behind (a run that fell short is said so, never hidden)."""
    names = {Path(d).name: _recipe_name(Path(d)) for d in run_dirs}
    base = [r for r in rows if baseline in (r["run"], names.get(r["run"]))]
    if not base:
        raise LeantrainError(f"--baseline {baseline!r} is none of the reported runs ({', '.join(names.values())})")
    metric = next((k for k in base[0] if k.startswith("test_") and not k.endswith("_loss")), None)
    if metric is None or not _is_number(base[0][metric]):
        raise LeantrainError(f"--baseline {baseline!r} has no final test metric to compare with")
    sign = -1 if metric.removeprefix("test_") in LOWER_IS_BETTER else 1
    column, lines = f"vs {baseline}", []
    for row in rows:
        value = row.get(metric)
        if not _is_number(value) or row is base[0]:
            continue
        gap = sign * (value - base[0][metric])
        row[column] = value - base[0][metric]
        if tolerance is not None:
            verdict = "within" if gap >= -tolerance else "NOT within"
            lines.append(f"{names.get(row['run'], row['run'])}: {metric} {value:.4f} vs {base[0][metric]:.4f} "
                         f"({gap:+.4f}): {verdict} {tolerance:g} of {baseline}")  # fmt: skip
    return lines


def _recipe_name(run_dir: Path) -> str | None:
    path = run_dir / "config.yaml"
    try:
        return (yaml.safe_load(path.read_text()) or {}).get("name") if path.is_file() else None
    except yaml.YAMLError:
        return None


def _cell(value, limit: int = 60) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    text = " ".join(str(value).split())  # an error message may span lines; a cell may not
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---------------------------------------------------------------- plot


def plot_runs(run_dirs: list[Path], metric: str, out: Path, split: str | None = None, x: str | None = None) -> Path:
    """Draw ``metric`` against each run's own x axis (step, round or t_env) into a PNG file; returns ``out``.

    See :func:`plot_curves` for how runs, records and the metric are chosen.
    """
    return _draw(plot_curves(run_dirs, metric, split, x), Path(out))


@dataclass
class Curve:
    xs: list
    ys: list
    ylabel: str
    label: str = ""


@dataclass
class Plot:
    x: str  # the x axis shared by every curve
    curves: list[Curve]


def plot_curves(run_dirs: list[Path], metric: str, split: str | None = None, x: str | None = None) -> Plot:
    """The curves :func:`plot_runs` draws, labelled for the legend.

    ``split`` None picks val records for supervised runs, test records for MARL and every round for federated runs.
    ``metric`` may be bare (``accuracy`` finds federated ``test_accuracy``, ``return`` finds MARL ``return_mean``)
    or carry its split (``train_loss``). ``x`` overrides the x axis for every run. Runs lacking the metric are
    skipped with a note on stderr; runs of kinds with different x axes are refused.
    """
    runs = []
    for run in _open_runs(run_dirs, "plot"):
        if run.records:
            runs.append(run)
        else:
            _note(f"skipped {run.path}: no metrics.jsonl")
    if not runs:
        raise LeantrainError("nothing to plot: no metrics.jsonl in the given runs")
    axes = {run.kind: x or RUN_KINDS[run.kind].x_key for run in runs}
    if len(set(axes.values())) > 1:
        kinds = ", ".join(f"{kind} (x: {axis})" for kind, axis in axes.items())
        raise LeantrainError(f"cannot plot {kinds} runs on one x axis; plot each kind separately")
    drawn, curves, lacking = [], [], []
    for run in runs:
        curve = run_curve(run, metric, split, x)
        if curve is None:
            lacking.append(f"skipped {run.path}: no {metric!r} in its {_split_name(run, split)} records")
        else:
            drawn.append(run)
            curves.append(curve)
    if not curves:  # one line that says what to ask for instead of a note per run
        raise LeantrainError(
            f"no run has {metric!r} in the chosen records; available metrics: {available_metrics(runs)}"
        )
    for line in lacking:
        _note(line)
    for curve, label in zip(curves, legend_labels(drawn), strict=True):
        curve.label = label
    return Plot(next(iter(axes.values())), curves)


def run_curve(run: RunFolder, metric: str, split: str | None = None, x: str | None = None) -> Curve | None:
    """The points of ``metric`` in one run's records (see :func:`plot_curves`), or None when it has none."""
    kind = RUN_KINDS[run.kind]
    x = x or kind.x_key
    if run.kind == "federated":
        rows, candidates = run.records, [metric, f"{split or 'test'}_{metric}"]
    else:
        if split is None:
            prefix = next((s for s in kind.splits if metric.startswith(f"{s}_")), None)
            split, metric = (prefix, metric[len(prefix) + 1 :]) if prefix else (kind.split, metric)
        rows, candidates = [r for r in run.records if r.get("split") == split], [metric, f"{metric}_mean"]
    for key in candidates:
        points = [(r[x], r[key]) for r in rows if _is_number(r.get(key)) and _is_number(r.get(x))]
        if points:
            xs, ys = zip(*points, strict=True)
            return Curve(list(xs), list(ys), key if run.kind == "federated" else f"{split} {key}")
    return None


def _split_name(run: RunFolder, split: str | None) -> str:
    return "round" if run.kind == "federated" else split or RUN_KINDS[run.kind].split


def available_metrics(runs: list[RunFolder]) -> str:
    """``"val: accuracy, loss; train: ..."``: the numeric record keys per split (``rounds`` for federated)."""
    by_split: dict[str, set[str]] = {}
    for run in runs:
        for record in run.records:
            split = "rounds" if run.kind == "federated" else str(record.get("split"))
            keys = {k for k, v in record.items() if k not in POSITION_KEYS and _is_number(v)}
            by_split.setdefault(split, set()).update(keys)
    parts = [f"{split}: {', '.join(sorted(keys))}" for split, keys in by_split.items() if keys]
    return "; ".join(parts) or "none"


def legend_labels(runs: list[RunFolder]) -> list[str]:
    """Recipe name plus ``key=value`` for each config key that differs between the runs of that recipe.

    A label shared by two runs (same config) falls back to the folder name.
    """
    flat = [flatten_config(run.config) for run in runs]
    labels = []
    for run, config in zip(runs, flat, strict=True):
        peers = [f for other, f in zip(runs, flat, strict=True) if other.name == run.name]
        keys = sorted(k for k in set().union(*peers) if k != "name" and len({_value(p.get(k)) for p in peers}) > 1)
        labels.append(" ".join([run.name, *(f"{k}={_value(config.get(k))}" for k in keys)]))
    counts = Counter(labels)
    return [run.path.name if counts[label] > 1 else label for run, label in zip(runs, labels, strict=True)]


def flatten_config(config: dict) -> dict:
    """Nested config sections as dotted keys (``optim.lr``), without the keys that do not change a run."""
    return {k: v for k, v in flatten(config).items() if k not in PRESENTATION_KEYS}


def _value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _draw(plot: Plot, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for curve in plot.curves:
        ax.plot(curve.xs, curve.ys, marker="o", markersize=3, label=curve.label)
    ax.set_xlabel(plot.x)
    ax.set_ylabel(plot.curves[0].ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
