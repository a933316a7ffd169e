"""The ``leantrain`` command: list | run | report | plot | compress | attack | bench.

Exit codes: 0 done; 2 a problem the user can fix (one ``error:`` line on stderr); 130 interrupted by Ctrl-C (one
``interrupted:`` line saying what was kept and how to continue); 1 a bug (one line pointing to a file with the full
traceback, never a traceback on the terminal). Progress goes to stderr, results to stdout. Heavy imports happen
inside the commands, so ``--help``, ``list`` and argument errors answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from leantrain.errors import Interrupted, LeantrainError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Resource-efficient training recipes.",
)


@app.command("list")
def list_cmd() -> None:
    """List shipped recipes, datasets and models."""
    from leantrain.config import list_recipes
    from leantrain.data import list_datasets
    from leantrain.models import list_models

    for title, entries in (("recipes", list_recipes()), ("datasets", list_datasets()), ("models", list_models())):
        typer.echo(f"{title}:")
        width = max(map(len, entries), default=0)
        for name, text in entries.items():
            typer.echo(f"  {name:<{width}}  {text}")


@app.command(context_settings={"allow_extra_args": False})
def run(
    recipe: Annotated[
        str | None,
        typer.Argument(help="recipe name (see `leantrain list`) or path to a YAML file", show_default=False),
    ] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. optim.lr=0.01")] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="print the resolved config and exit")] = False,
) -> None:
    """Train a recipe and write runs/<name>-<time>/ (config.yaml, metrics.jsonl, summary.json, checkpoints).

    `leantrain run resume=RUN_DIR` continues a run with its own recipe and overrides (it may add train.epochs,
    train.max_steps, federated.rounds or marl.max_steps to train longer)."""
    import yaml

    from leantrain.config import resolve, to_dict
    from leantrain.runs.folder import resume_config

    overrides = list(overrides or [])
    if recipe is not None and "=" in recipe and not Path(recipe).is_file():  # `leantrain run resume=DIR ...`
        recipe, overrides = None, [recipe, *overrides]
    resume = [o.partition("=")[2] for o in overrides if o.partition("=")[0].strip() == "resume"]
    if resume:
        rest = [o for o in overrides if o.partition("=")[0].strip() != "resume"]
        cfg = resume_config(resume[-1], rest, recipe=recipe)
    elif recipe is None:
        raise LeantrainError("give a recipe (see `leantrain list`) or resume=RUN_DIR to continue a run")
    else:
        cfg = resolve(recipe, overrides)
    if print_config:
        typer.echo(yaml.safe_dump(to_dict(cfg, used_only=True), sort_keys=False), nl=False)
        return
    from leantrain.runs.launch import run as run_recipe
    from leantrain.runs.report import print_report

    result = run_recipe(cfg)
    typer.echo(f"run folder: {result.run_dir}")
    print_report([result.run_dir])


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="run folders")],
    baseline: Annotated[
        str | None, typer.Option(help="compare every run's test metric with this run (recipe or folder name)")
    ] = None,
    tolerance: Annotated[
        float | None, typer.Option(help="with --baseline: say for each run whether it is within this gap")
    ] = None,
) -> None:
    """Print a table of the final metrics of one or more runs (unfinished runs: their progress so far)."""
    from leantrain.runs.report import print_report

    if tolerance is not None and baseline is None:
        raise LeantrainError("--tolerance needs --baseline (the run to compare with)")
    print_report(run_dirs, baseline, tolerance)


@app.command()
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="run folders")],
    metric: Annotated[
        str, typer.Option(help="metric in metrics.jsonl, bare or with its split: loss, accuracy, return, train_loss")
    ] = "loss",
    split: Annotated[
        str | None, typer.Option(help="records: train, val, test (default: val; MARL test; federated every round)")
    ] = None,
    out: Annotated[Path, typer.Option(help="PNG file to write")] = Path("plot.png"),
) -> None:
    """Plot a metric against steps, rounds (federated) or t_env (MARL) for one or more runs (PNG)."""
    from leantrain.runs.report import plot_runs

    typer.echo(f"wrote {plot_runs(run_dirs, metric, out, split=split)}")


@app.command()
def compress(
    remove: Annotated[int, typer.Option(help="decoder blocks to remove (the first and last are protected)")],
    out: Annotated[Path, typer.Option(help="new folder for the compressed model, tokenizer and compress.json")],
    model: Annotated[str, typer.Option(help="pretrained decoder LM")] = "smollm2-135m",
    select: Annotated[
        str,
        typer.Option(
            help="block selection: auto (default: the best of lorp, shortgpt and streamline, with recovery, on "
            "held-out calibration text), lorp, shortgpt, streamline, last_n"
        ),
    ] = "auto",
    recover: Annotated[str, typer.Option(help="recovery: ghosted, symmetric, diag, none")] = "ghosted",
    calib_dataset: Annotated[
        str | None, typer.Option(help="calibration text: a registered corpus (default wikipedia; its train slice)")
    ] = None,
    calib_file: Annotated[
        Path | None, typer.Option(help="calibration text from a file: plain text, or JSON Lines (.jsonl)")
    ] = None,
    eval_dataset: Annotated[
        str | None, typer.Option(help="second, different text for perplexity (default lee-news; its test slice)")
    ] = None,
    eval_file: Annotated[Path | None, typer.Option(help="second text for perplexity from a file")] = None,
    text_field: Annotated[str, typer.Option(help="the JSON Lines field that holds the text")] = "text",
    block: Annotated[int, typer.Option(help="tokens per calibration / evaluation window")] = 256,
    calib_windows: Annotated[int, typer.Option(help="calibration windows")] = 64,
    eval_windows: Annotated[
        int, typer.Option(help="held-out windows per evaluation text (the news test slice holds 29 of 256 tokens)")
    ] = 16,
    num_clusters: Annotated[int | None, typer.Option(help="LoRP clusters K (default: from the RLS)")] = None,
    ridge: Annotated[float, typer.Option(help="Ghosted ridge epsilon (absolute)")] = 1e-6,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
) -> None:
    """Remove decoder blocks from a pretrained LLM (LoRP / ShortGPT / LLM-Streamline / last-n) and recover them
    (Ghosted Layers).

    Perplexity is reported on held-out text of the calibration source and on a second, different text: recovery is
    fitted to its calibration domain, so calibrate on text like the one the model will see."""
    from leantrain.prune.compress_args import DEFAULT_CALIB, check_compress_args, default_eval_source, text_source

    # Bad arguments answer at once, before torch and the model load (seconds).
    check_compress_args(model, remove, select, recover, out, block, calib_windows, eval_windows, num_clusters,
                        ridge)  # fmt: skip
    calib = text_source("calib", calib_dataset, calib_file, text_field, default=DEFAULT_CALIB)
    evaluation = (text_source("eval", eval_dataset, eval_file, text_field) if eval_dataset or eval_file
                  else default_eval_source(calib))  # fmt: skip
    import time

    import torch
    from rich.console import Console
    from rich.table import Table

    from leantrain.prune.compress import run_compress

    if threads:
        torch.set_num_threads(threads)
    from leantrain.train.interrupt import recorded_sigint

    console = Console(stderr=True)
    started = time.perf_counter()

    try:
        with recorded_sigint() as interrupted, console.status("compressing", spinner="dots"):

            def stage(text: str) -> None:
                if interrupted.is_set():  # a Ctrl-C that Python dropped (it landed in a __del__) stops us here
                    raise KeyboardInterrupt
                console.print(f"[dim]{time.perf_counter() - started:7.1f}s[/dim] {text}")

            s = run_compress(model, remove, select, recover, out, calib, evaluation, block, calib_windows,
                             eval_windows, num_clusters, ridge, stage=stage)  # fmt: skip
    except KeyboardInterrupt:
        raise Interrupted(f"nothing was written to {out} (it is written whole, at the end)") from None
    chosen = f"auto: {s['selected']}" if select == "auto" else select
    table = Table(title=f"{model}: removed {s['removed']} ({chosen} + {recover})")
    for col in ("", "before", "after", "after / before"):
        table.add_column(col, justify="right")
    rows = [("layers", "layers_before", "layers_after", "{:d}"),
            ("parameters", "params_before", "params_after", "{:,}"),
            (f"perplexity, held-out {s['calibration_text']}", "perplexity_before", "perplexity_after", "{:.3f}"),
            (f"perplexity, {s['evaluation_text']}", "perplexity_cross_before", "perplexity_cross_after", "{:.3f}"),
            ("tokens/s (generate)", "tokens_per_s_before", "tokens_per_s_after", "{:.1f}")]  # fmt: skip
    for label, a, b, fmt in rows:
        table.add_row(label, fmt.format(s[a]), fmt.format(s[b]), f"{s[b] / s[a]:.3f}")
    Console().print(table)
    selection = s["selection"]
    extra = f"RLS {selection['rls']:.3f}, K {selection['num_clusters']}; " if "rls" in selection else ""
    if "auto" in selection:
        extra += (
            "auto, validation perplexity: "
            + ", ".join(
                f"{name} {c['validation_perplexity']:.2f}" for name, c in selection["auto"]["candidates"].items()
            )
            + "; "
        )
    typer.echo(f"{extra}fit {s['fit_seconds']:.2f} s; wrote {s['out']}")


@app.command()
def attack(
    run_dir: Annotated[Path, typer.Argument(help="a finished MARL run folder (qmix, vdn, s2q, wall, ibal, fox)")],
    episodes: Annotated[int, typer.Option(help="greedy episodes per condition")] = 200,
    budget: Annotated[int, typer.Option(help="attacked steps per episode")] = 8,
    followups: Annotated[int | None, typer.Option(help="follow-up agents (default: 2, fewer for small teams)")] = None,
    fit_episodes: Annotated[int, typer.Option(help="episodes collected to fit the attack's planner")] = 200,
    fit_updates: Annotated[int, typer.Option(help="planner updates")] = 300,
    seed: Annotated[int, typer.Option(help="seed of the planner and the episodes")] = 0,
) -> None:
    """Return of a trained MARL policy under every registered attack (leantrain.marl.robustness.ATTACKS: Wolfpack,
    random-step, random, IBAL's interaction-breaking attack, one agent missing), with the same budget."""
    import time

    import torch
    from rich.console import Console
    from rich.table import Table

    from leantrain.marl.robustness import evaluate_attacks

    torch.set_num_threads(1)
    changes = {"test_budget": budget} | ({"followups": followups} if followups is not None else {})
    console, started = Console(stderr=True), time.perf_counter()

    def stage(text: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:7.1f}s[/dim] {text}")

    try:
        result = evaluate_attacks(run_dir, episodes, fit_episodes, fit_updates, seed, stage=stage, **changes)
    except KeyboardInterrupt:
        raise Interrupted(f"nothing was written ({run_dir} is unchanged)") from None
    table = Table(title=f"{run_dir.name}: mean greedy return over {episodes} episodes, budget {budget}")
    for col in ("condition", "return", "drop vs clean"):
        table.add_column(col, justify="right")
    for name, value in result.items():
        table.add_row(name, f"{value:.4f}", f"{result['clean'] - value:+.4f}" if name != "clean" else "-")
    Console().print(table)


BENCH_AREAS = {
    "finetune": "leantrain.bench.finetune",
    "optim": "leantrain.bench.optim",
    "federated": "leantrain.bench.federated",
    "lowrank": "leantrain.bench.lowrank",
    "prune": "leantrain.bench.prune",
    "compress": "leantrain.bench.compress",
    "marl": "leantrain.bench.marl",
    "hetero": "leantrain.bench.hetero",
}


@app.command()
def bench(
    area: Annotated[str, typer.Argument(help=f"benchmark area: {', '.join(BENCH_AREAS)}")],
    quick: Annotated[bool, typer.Option("--quick", help="a reduced run (minutes) for spot checks")] = False,
    out: Annotated[Path, typer.Option(help="folder for <area>.json")] = Path("bench-results"),
    seeds: Annotated[int | None, typer.Option(help="seeds for accuracy rows (default 3, quick 1)")] = None,
    part: Annotated[
        list[str] | None,
        typer.Option(
            help="only these parts (finetune: scoring, accuracy, cost, profile; optim: steptime, accuracy, async, "
            "mlbfgs; federated: accuracy, accuracy-iid, partial, embracing, cross-device, workers, memory; "
            "lowrank: accuracy, deflate-svd; prune: mlp, resnet; hetero: accuracy, ablation, timing; marl: matrix, "
            "throughput, lbf, attack[:task], exploration[:fox|fim], robustness, zsc[:task])"
        ),
    ] = None,
) -> None:
    """Compare an area's methods with their anchors in one run; write <out>/<area>.json and print a table."""
    import importlib
    import time

    if area not in BENCH_AREAS:
        raise LeantrainError(f"unknown benchmark area {area!r}; choose from: {', '.join(BENCH_AREAS)}")
    module = importlib.import_module(BENCH_AREAS[area])
    started = time.time()
    try:
        module.run_bench(quick, out, seeds=seeds, **({"parts": tuple(part)} if part else {}))
    except (KeyboardInterrupt, Interrupted):  # Ctrl-C, possibly inside one of the benchmark's own runs
        raise Interrupted(_bench_kept(out, area, started)) from None


def _bench_kept(out: Path, area: str, started: float) -> str:
    """What an interrupted benchmark left: its JSON holds every row finished before Ctrl-C."""
    import json

    written = [p for p in out.glob(f"{area}*.json") if p.stat().st_mtime >= started]
    if not written:
        return "no row had finished; nothing was written"
    rows = sum(len(json.loads(p.read_text()).get("rows", [])) for p in written)
    return f"kept {rows} finished row{'s' if rows != 1 else ''} in {', '.join(str(p) for p in sorted(written))}"


def main() -> None:
    """Console entry point: exit 0, 2 (a problem the user can fix), 130 (interrupted) or 1 (a bug: see the report)."""
    sys.exit(_main())


def _main() -> int:
    import click

    from leantrain.crash_report import REPORT_ATTR, one_line, write_crash_report

    try:
        code = app(standalone_mode=False)
        return code if isinstance(code, int) else 0
    except Interrupted as err:
        _ignore_further_ctrl_c()
        print(f"interrupted: {err}", file=sys.stderr)
        return err.exit_code
    except LeantrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        _ignore_further_ctrl_c()
        print("interrupted: nothing was written", file=sys.stderr)
        return Interrupted.exit_code
    except click.ClickException as err:  # usage errors: unknown option, missing argument, bad type
        print(f"error: {err.format_message()}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug: one line here, the whole traceback in a file
        report = getattr(err, REPORT_ATTR, None) or write_crash_report(err)
        print(f"error: unexpected {one_line(err)} (full traceback in {report})", file=sys.stderr)
        return 1


def _ignore_further_ctrl_c() -> None:
    """The work has stopped and what it kept is on disk: another Ctrl-C must not kill the exit with a traceback."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    main()
