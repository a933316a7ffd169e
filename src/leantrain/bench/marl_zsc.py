"""The ``zsc`` part of ``leantrain bench marl``: zero-shot coordination, SBC against self-play MAPPO and FCP.

Per task of :data:`ZSC_TASKS` (``--part zsc:<task>`` runs one): the multi-destination task and Overcooked
cramped_room and asymmetric_advantages (both from the cramped-room recipes, the layout changed).

1. **Held-out partners**, shared by every seed and arm of a task: the task's self-play recipe (``mappo-sp-<task>``,
   the partners' settings and budget) with seeds 1000, 1001, ...; on Overcooked also the scripted GreedyCook.
2. Per seed s (0..2): the **SBC pipeline** (``sbc-<task>``, ``seed=s``, those held-out partners:
   :mod:`leantrain.marl.sbc`) gives the SBC ego's cross-play return and the **self-play baseline**'s (the
   pipeline's empty-set partner: MAPPO self-play with the partners' budget and settings); the same pipeline with
   ``sbc.units_per_set=0`` (partners that differ only in their seeds, nothing blocked) is the **FCP-style
   population** baseline (FCP: Strouse et al. 2021, arXiv 2110.08176; here its stages exclude the untrained start,
   as SBC's).
3. Rows ``sbc-<task>``, ``mappo-<task>`` (self-play) and ``mappo-fcp-<task>``: the mean over seeds of each seed's
   mean cross-play return over the held-out partners (each partner playing either agent, equal episodes; greedy on
   the multi-destination task, sampling on Overcooked: the recipes' ``sbc.crossplay_actions``),
   the standard deviation over seeds; ``extra``: per seed and partner, the gap SBC − self-play per seed (mean ± std),
   the environment steps of each arm. A bar plot (``marl_zsc.png`` beside the JSON).

Targets (reported, never tuned for): SBC's cross-play return above self-play's, and not below FCP's.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from leantrain.bench.report import discard, log

CRAMPED = {"sbc": "sbc-cramped-room", "sp": "mappo-sp-cramped-room"}
# task -> recipes, overrides for both, held-out self-play seeds
ZSC_TASKS = {
    "multi-destination": {"sbc": "sbc-multi-destination", "sp": "mappo-sp-multi-destination", "overrides": [],
                          "held_out": 4},
    "cramped-room": {**CRAMPED, "overrides": [], "held_out": 2},
    "asymmetric-advantages": {**CRAMPED, "overrides": ["marl.env=overcooked:asymmetric_advantages"], "held_out": 2},
}  # fmt: skip
ARMS = {"sbc": [], "fcp": ["sbc.units_per_set=0"]}  # pipeline arms; the self-play baseline comes with sbc's
QUICK = {
    "multi-destination": ["sbc.partner_steps=2000", "marl.max_steps=2000", "marl.eval_every=1000",
                          "marl.test_episodes=4", "sbc.crossplay_episodes=4"],
    "overcooked": ["sbc.partner_steps=800", "marl.max_steps=800", "marl.eval_every=800", "marl.test_episodes=2",
                   "marl.env_args={episode_limit: 100, shaped_reward: 1.0}", "marl.n_envs=4", "marl.batch_episodes=4",
                   "sbc.crossplay_episodes=2"],
}  # fmt: skip


def _quick(task: str) -> list[str]:
    return QUICK["multi-destination" if task == "multi-destination" else "overcooked"]


def _overrides(task: str, quick: bool) -> list[str]:
    return [*ZSC_TASKS[task]["overrides"], *(_quick(task) if quick else [])]


def _held_out_job(task: str, seed: int, quick: bool, folder: str) -> str:
    """One held-out self-play partner: the task's self-play recipe at the partners' budget; its run folder."""
    from leantrain.config import resolve
    from leantrain.runs.launch import run

    spec, overrides = ZSC_TASKS[task], _overrides(task, quick)
    budget = resolve(spec["sbc"], overrides).sbc.partner_steps
    marl = [o for o in overrides if not o.startswith(("sbc.", "marl.max_steps="))]
    cfg = resolve(spec["sp"], [*marl, f"marl.max_steps={budget}", f"seed={seed}", "progress=none",
                               f"output_dir={folder}"])  # fmt: skip
    return str(run(cfg).run_dir)


def _pipeline_job(task: str, arm: str, seed: int, quick: bool, held_out: list[str], folder: str) -> dict:
    """One SBC (or FCP-style) pipeline with the shared held-out partners; its cross-play results and budgets."""
    from leantrain.config import resolve
    from leantrain.runs.launch import run

    held = "[" + ", ".join(held_out) + "]"
    cfg = resolve(ZSC_TASKS[task]["sbc"], [*_overrides(task, quick), *ARMS[arm], "sbc.held_out_seeds=0",
                                          f"sbc.held_out={held}", f"seed={seed}", "progress=none",
                                          f"output_dir={folder}"])  # fmt: skip
    result = run(cfg)
    crossplay = json.loads((result.run_dir / "crossplay.json").read_text())
    s = cfg.sbc
    return {"task": task, "arm": arm, "seed": seed, "crossplay": crossplay, "summary": result.summary,
            "steps": {"partner": s.partner_steps, "partners": s.population, "ego": cfg.marl.max_steps}}  # fmt: skip


def _per_seed(results: list[dict], policy: str) -> list[float]:
    """Each seed's mean cross-play return over the held-out partners."""
    return [statistics.fmean(r["mean"] for r in res["crossplay"][policy].values()) for res in results]


def zsc_rows(seeds: int, quick: bool, add=discard, tasks: tuple[str, ...] = tuple(ZSC_TASKS)) -> list[dict]:
    from leantrain.bench.marl_jobs import _in_worker, _mean_std, _workers

    rows = []
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(_workers(2 * len(tasks) * seeds)) as pool:
        held_jobs = [(t, 1000 + j) for t in tasks for j in range(ZSC_TASKS[t]["held_out"])]
        futures = [pool.submit(_in_worker, (f"marl zsc: held-out {t} seed {s}", i, len(held_jobs)), _held_out_job,
                               t, s, quick, tmp) for i, (t, s) in enumerate(held_jobs, 1)]  # fmt: skip
        held: dict[str, list[str]] = {t: [] for t in tasks}
        for (task, _), future in zip(held_jobs, futures, strict=True):
            held[task].append(future.result())
        for task in tasks:
            held[task] += ["scripted:greedy_cook"] if ZSC_TASKS[task]["sbc"] == CRAMPED["sbc"] else []
        jobs = [(t, arm, s) for t in tasks for arm in ARMS for s in range(seeds)]
        futures = [pool.submit(_in_worker, (f"marl zsc: {arm} {t} seed {s}", i, len(jobs)), _pipeline_job, t, arm, s,
                               quick, held[t], tmp) for i, (t, arm, s) in enumerate(jobs, 1)]  # fmt: skip
        results = [f.result() for f in futures]
    for res in results:
        means = {p: statistics.fmean(r["mean"] for r in per.values()) for p, per in res["crossplay"].items()}
        log(f"  zsc {res['task']} {res['arm']} seed {res['seed']}: cross-play " + str(means))
    for task in tasks:
        for name, arm, policy in (("sbc", "sbc", "sbc"), ("mappo", "sbc", "sp"), ("mappo-fcp", "fcp", "sbc")):
            runs = sorted((r for r in results if r["task"] == task and r["arm"] == arm), key=lambda r: r["seed"])
            per_seed = _per_seed(runs, policy)
            mean, std = _mean_std(per_seed)
            extra = {"part": "zsc", "per_seed": per_seed, "held_out": [Path(h).name for h in held[task]],
                     "per_partner": [{Path(k).name: v["mean"] for k, v in r["crossplay"][policy].items()}
                                     for r in runs], "steps": runs[0]["steps"],
                     "self_play_budget": policy == "sp"}  # fmt: skip
            if name == "sbc":
                gaps = [a - b for a, b in zip(per_seed, _per_seed(runs, "sp"), strict=True)]
                extra["gap_vs_mappo"] = _mean_std(gaps)
            row = {"method": f"{name}-{task}", "anchor": name == "mappo", "model": "rnn-agent",
                   "task": ZSC_TASKS[task]["sbc"], "metric_name": "cross-play return (held-out partners)",
                   "metric": round(mean, 4), "metric_std": round(std, 4), "seeds": len(runs),
                   "extra": extra}  # fmt: skip
            rows.append(row)
            add(row)
    return rows


def zsc_targets(rows: list[dict]) -> dict[str, bool]:
    by = {r["method"]: r for r in rows if r["extra"].get("part") == "zsc"}
    out = {}
    for task in ZSC_TASKS:
        if f"sbc-{task}" in by:
            sbc = by[f"sbc-{task}"]["metric"]
            out[f"{task}:sbc_crossplay>mappo_crossplay"] = sbc > by[f"mappo-{task}"]["metric"]
            out[f"{task}:sbc_crossplay>=fcp_crossplay"] = sbc >= by[f"mappo-fcp-{task}"]["metric"]
    return out


def plot_zsc(rows: list[dict], path) -> object | None:
    """Bars of the cross-play return per task and arm (mean over seeds, ± std), every seed a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leantrain.bench.report import save_figure

    rows = [r for r in rows if r["extra"].get("part") == "zsc"]
    tasks = [t for t in ZSC_TASKS if any(r["method"] == f"sbc-{t}" for r in rows)]
    if not tasks:
        return None
    by = {r["method"]: r for r in rows}
    arms = (("sbc", "SBC", "C1"), ("mappo", "self-play MAPPO", "C0"), ("mappo-fcp", "FCP-style population", "C2"))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, (name, label, color) in enumerate(arms):
            r = by[f"{name}-{task}"]
            ax.bar(i, r["metric"], yerr=r["metric_std"], color=color, alpha=0.7, capsize=4, label=label)
            ax.scatter([i] * len(r["extra"]["per_seed"]), r["extra"]["per_seed"], color="k", s=10, zorder=3)
        ax.set_xticks(range(len(arms)), [a[1] for a in arms], fontsize=8)
        seeds = by[f"sbc-{task}"]["seeds"]
        ax.set_title(f"{task} ({seeds} seed{'s' if seeds != 1 else ''})", fontsize=9)
        ax.set_ylabel("cross-play return")
        ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)
