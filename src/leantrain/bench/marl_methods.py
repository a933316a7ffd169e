"""The ``exploration`` and ``robustness`` parts of ``leantrain bench marl``: FoX, FIM and IBAL against their bases.

- ``exploration``: each method against QMIX with identical settings (the recipe pairs differ only in ``marl.algo``
  and the method's options, tested), seeds 0..2, on the sparse task where its effect can appear:
  FoX on sparse simple_spread (``fox-sparse-spread`` / ``qmix-sparse-spread``: reward 1 only once every landmark is
  covered within 0.3), FIM on the door world (``fim-door`` / ``qmix-door``: two plates open a door to the only
  reward). Reported: final greedy return (= success rate) mean ± std, seeds solved (final return >= 0.5), the first
  test at which the return exceeds 0, environment steps per second, and the test curves.
- ``robustness``: LBF 8x8 with 4 players (the attack part's ``lbf-4p`` task): a clean QMIX policy, then from it the
  same number of steps of vanilla, WALL-style and IBAL training; each attacked by the whole suite
  (:data:`leantrain.marl.robustness.ATTACKS`: Wolfpack, random-step, random, IBAL's interaction-breaking attack, one
  agent missing), the same greedy episodes per condition.

Targets (reported, never tuned for): FoX and FIM reach higher return or solve more seeds than QMIX at equal
environment steps; IBAL keeps more return under attack than vanilla and WALL-style training, with <= 10% clean loss.
"""

from __future__ import annotations

import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor

from leantrain.bench.report import discard, log

# method -> (its recipe, the QMIX anchor with identical settings)
EXPLORATION = {"fox": ("fox-sparse-spread", "qmix-sparse-spread"), "fim": ("fim-door", "qmix-door")}
EXPLORATION_QUICK = ["marl.max_steps=1500", "marl.eval_every=500", "marl.test_episodes=4", "marl.batch_episodes=4",
                     "marl.epsilon_anneal_steps=1000"]  # fmt: skip
SOLVED = 0.5
ROBUST_TASK = "lbf-4p"
ROBUST_POLICIES = ("vanilla", "wall", "ibal")


def _exploration_job(method: str, arm: str, seed: int, quick: bool) -> dict:
    from leantrain.bench.marl_jobs import _run

    recipe = EXPLORATION[method][0 if arm == method else 1]
    with tempfile.TemporaryDirectory() as tmp:
        res = _run(recipe, EXPLORATION_QUICK if quick else [], seed, tmp)
    s = res["summary"]
    return {
        "method": method,
        "arm": arm,
        "seed": seed,
        "final": s["final"]["test_return"],
        "curve": [(r["t_env"], r["return_mean"]) for r in res["tests"]],
        "steps_per_s": s["env_steps_per_s"],
    }


def exploration_rows(seeds: int, quick: bool, add=discard, methods: tuple[str, ...] = tuple(EXPLORATION)) -> list:
    """Rows of each method in ``methods`` (keys of :data:`EXPLORATION`) and of its QMIX anchor."""
    from leantrain.bench.marl_jobs import _in_worker, _mean_std, _workers

    jobs = [(m, arm, s) for m in methods for arm in (m, "qmix") for s in range(seeds)]
    with ProcessPoolExecutor(_workers(len(jobs))) as pool:
        futures = [pool.submit(_in_worker, (f"marl exploration: {arm} ({m} task) seed {s}", i, len(jobs)),
                               _exploration_job, m, arm, s, quick)
                   for i, (m, arm, s) in enumerate(jobs, 1)]  # fmt: skip
        results = [f.result() for f in futures]
    rows = []
    for method in methods:
        recipe, anchor = EXPLORATION[method]
        for arm in (method, "qmix"):
            runs = [r for r in results if r["method"] == method and r["arm"] == arm]
            finals = [r["final"] for r in runs]
            mean, std = _mean_std(finals)
            first = [next((t for t, ret in r["curve"] if ret > 0), None) for r in runs]
            speed = round(statistics.median(r["steps_per_s"] for r in runs), 1)
            row = {"method": method if arm == method else f"{method}-baseline-qmix", "anchor": arm == "qmix",
                   "model": "rnn-agent", "task": recipe if arm == method else anchor, "metric_name": "test return",
                   "metric": round(mean, 4), "metric_std": round(std, 4), "seeds": len(runs),
                   "extra": {"part": "exploration", "finals": finals, "solved": sum(f >= SOLVED for f in finals),
                             "first_nonzero_t_env": first, "curves": [r["curve"] for r in runs],
                             "env_steps_per_s": speed}}  # fmt: skip
            rows.append(row)
            add(row)
    return rows


def exploration_targets(rows: list[dict]) -> dict[str, bool]:
    by = {r["method"]: r for r in rows if r["extra"].get("part") == "exploration"}
    out = {}
    for method in EXPLORATION:
        if method in by and f"{method}-baseline-qmix" in by:
            m, q = by[method], by[f"{method}-baseline-qmix"]
            out[f"{method}_beats_qmix_on_sparse_task"] = (m["metric"] > q["metric"]
                                                          or m["extra"]["solved"] > q["extra"]["solved"])  # fmt: skip
    return out


def robustness_rows(seeds: int, quick: bool, add=discard) -> list[dict]:
    from leantrain.bench.marl_jobs import ATTACK_TASKS, _attack_job, _in_worker, _mean_std, _workers

    jobs = list(range(seeds))
    with ProcessPoolExecutor(_workers(len(jobs))) as pool:
        futures = [pool.submit(_in_worker, (f"marl robustness: {ROBUST_TASK} seed {s}", i, len(jobs)), _attack_job,
                               ROBUST_TASK, s, quick, ROBUST_POLICIES) for i, s in enumerate(jobs, 1)]  # fmt: skip
        results = []
        for future in futures:
            results.append(future.result())
            log(f"  robustness seed {results[-1]['seed']}: {results[-1]['evals']}")
    rows = []
    for policy in ROBUST_POLICIES:
        conditions = {c: [r["evals"][policy][c] for r in results] for c in results[0]["evals"][policy]}
        stats = {c: tuple(round(v, 4) for v in _mean_std(vals)) for c, vals in conditions.items()}
        attacked = [c for c in stats if c != "clean"]
        worst = min(attacked, key=lambda c: stats[c][0])
        row = {"method": "ibal" if policy == "ibal" else f"ibal-baseline-{policy}", "anchor": policy == "vanilla",
               "model": "rnn-agent", "task": ROBUST_TASK, "metric_name": "mean return over the attacks",
               "metric": round(statistics.fmean(stats[c][0] for c in attacked), 4), "seeds": len(results),
               "extra": {"part": "robustness", "per_seed": conditions, "mean_std": stats, "worst_attack": worst,
                         "finetune_steps": ATTACK_TASKS[ROBUST_TASK]["finetune"],
                         "pretrain_steps": ATTACK_TASKS[ROBUST_TASK]["pretrain"],
                         "episodes": ATTACK_TASKS[ROBUST_TASK]["episodes"]}}  # fmt: skip
        rows.append(row)
        add(row)
    return rows


def robustness_targets(rows: list[dict]) -> dict[str, bool]:
    by = {r["method"]: r for r in rows if r["extra"].get("part") == "robustness"}
    if not {"ibal", "ibal-baseline-vanilla", "ibal-baseline-wall"} <= set(by):
        return {}
    ibal, vanilla, wall = by["ibal"], by["ibal-baseline-vanilla"], by["ibal-baseline-wall"]
    clean = {k: v["extra"]["mean_std"]["clean"][0] for k, v in by.items()}
    return {
        "ibal_attacked>vanilla_attacked": ibal["metric"] > vanilla["metric"],
        "ibal_attacked>wall_attacked": ibal["metric"] > wall["metric"],
        "ibal_clean_loss<=10%": clean["ibal"] >= 0.9 * clean["ibal-baseline-vanilla"],
    }


def plot_exploration(rows: list[dict], path) -> object | None:
    """Test-return curves of each exploration method and its QMIX anchor: every seed thin, the mean over seeds
    (each seed's curve interpolated onto a common grid of environment steps) thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from leantrain.bench.report import save_figure

    rows = [r for r in rows if r["extra"].get("part") == "exploration"]
    methods = [m for m in EXPLORATION if any(r["method"] == m for r in rows)]
    if not methods:
        return None
    fig, axes = plt.subplots(1, len(methods), figsize=(5.2 * len(methods), 3.6), squeeze=False)
    by = {r["method"]: r for r in rows}
    for ax, method in zip(axes[0], methods, strict=True):
        for name, color in ((method, "C1"), (f"{method}-baseline-qmix", "C0")):
            if name not in by:
                continue
            r = by[name]
            curves = [np.asarray(c, dtype=float) for c in r["extra"]["curves"]]
            grid = np.linspace(0, min(c[-1, 0] for c in curves), 50)
            for c in curves:
                ax.plot(c[:, 0], c[:, 1], color=color, alpha=0.25, lw=0.8)
            mean = np.mean([np.interp(grid, c[:, 0], c[:, 1]) for c in curves], axis=0)
            label = f"{'QMIX' if r['anchor'] else method} ({r['task']}, {len(curves)} seeds)"
            ax.plot(grid, mean, color=color, lw=2, label=label)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("greedy test return (= success rate)")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)
