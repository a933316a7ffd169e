"""``leantrain bench marl``: value decomposition, S2Q and WALL on matrix games, LBF and predator-prey.

Parts (``--part``; all by default), 1 torch thread per process, jobs spread over ``min(2, cores)`` processes:

- ``matrix``: QMIX, VDN and S2Q arms on the climbing game (recipes ``qmix-climbing``, the same with
  ``marl.mixer=vdn``, ``s2q-climbing`` at w_c 0.1, and S2Q at the official w_c 0.9, with w_c 0.1 on the sub-values
  only, and on Q1 only), every arm with Adam 1e-3 and TD(lambda) 0.6, 20k one-step episodes, ``--seeds`` seeds
  (default 5): the fraction of seeds whose final greedy joint action is the optimum (11), and for S2Q when Q1 and
  when another sub-value first held (0, 0). Shifting (``matrix:shifting``, QMIX and S2Q; the optimum moves
  (0, 0) -> (2, 2) after 10k episodes, greedy tests every 500 episodes): episodes after the switch until the greedy
  joint action holds the new optimum.
- ``throughput``: runner environment steps per second (collection only, epsilon 1) and learner updates per second
  (batch of 32 LBF episodes), for QMIX, VDN, S2Q and WALL; then collection against a PyMARL-style per-step loop on
  the same network (:mod:`leantrain.bench.marl_reference`) with 1 and 8 environments, and the fused training
  unroll against one cell call per slot; medians of interleaved repeats.
- ``lbf``: ``Foraging-8x8-2p-2f-coop-v3``, seeds 0..2: S2Q against QMIX with S2Q's optimizer and targets, 300k
  steps each.
- ``exploration``, ``robustness``: FoX, FIM and IBAL against their bases (:mod:`leantrain.bench.marl_methods`).
- ``zsc``: zero-shot coordination, SBC against self-play MAPPO and an FCP-style population, cross-play with
  held-out partners (:mod:`leantrain.bench.marl_zsc`; ``zsc:<task>`` runs one task).
- ``attack``: per task of :data:`ATTACK_TASKS` (predator-prey: mpe2 simple_tag with 4 predators; LBF 8x8 with 4
  players, 3 foods and 25-step episodes), seeds 0..2: a clean QMIX policy, then from it the same number of steps of
  clean training (vanilla) or of WALL training; both final policies are attacked by a Wolfpack planner fitted
  against them (:mod:`leantrain.marl.robustness`) with the paper's timing rule and with ``damage_scale="std"``, and
  by the random-step and random attacks (test budget 8), the same greedy episodes per condition.

Targets from the issue are evaluated and printed, never tuned for.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from leantrain.bench.marl_jobs import (
    ATTACK_TASKS,
    _attack_job,
    _in_worker,
    _mean_std,
    _run,
    _workers,
    options_override,
)
from leantrain.bench.report import BenchResults, Progress, discard, log, markdown_table, print_targets
from leantrain.errors import ConfigError


def _s2q_options(**change) -> str:
    options = {"k": 2, "temperature": 0.1, "w_c": 0.1, **change}
    return "marl.method_options={" + ", ".join(f"{k}: {v}" for k, v in options.items()) + "}"


# every arm has the same optimizer and targets (Adam 1e-3, TD(lambda) 0.6: the qmix-climbing and s2q-climbing recipes)
METHODS = {
    "qmix": ("qmix-climbing", []),
    "vdn": ("qmix-climbing", ["marl.mixer=vdn"]),
    "s2q": ("s2q-climbing", []),  # w_c 0.1 on Q1 and the sub-values (the recipe)
    "s2q-wc0.9": ("s2q-climbing", [_s2q_options(w_c=0.9)]),  # the official SMAC/GRF value
    "s2q-sub-wc0.1": ("s2q-climbing", [_s2q_options(w_c=0.1, w_c_first=0.9)]),  # only the sub-values weighted
    "s2q-q1-wc0.1": ("s2q-climbing", [_s2q_options(w_c=0.9, w_c_first=0.1)]),  # only Q1 weighted (WQMIX's idea)
}
SHIFTING_METHODS = ("qmix", "s2q")
SHIFT = ["marl.env=matrix:shifting", "marl.switch_episode=10000", "marl.eval_every=500"]
CLIMB = ["marl.eval_every=1000"]  # a greedy test (and the sub-values' greedy joint actions) every 1000 episodes
QUICK = ["marl.max_steps=2000", "marl.epsilon_anneal_steps=1000", "marl.eval_every=1000"]
PARTS = ("matrix", "throughput", "lbf", "attack", "exploration", "robustness", "zsc")
LBF_STEPS = 300_000
LBF_QUICK = ["marl.max_steps=1500", "marl.eval_every=1000", "marl.test_episodes=2", "marl.batch_episodes=4"]


def _recovery(tests: list[dict], switch: int) -> int | None:
    """Episodes after the switch until a greedy test returns the new optimum (11) and stays there, else None."""
    after = [r for r in tests if r["episodes"] > switch]
    for i, r in enumerate(after):
        if all(x["return_mean"] == 11.0 for x in after[i:]):
            return r["episodes"] - switch
    return None


def _first_optimum(tests: list[dict]) -> dict:
    """Of the trained tests (episodes > 0): the first after which Q1's greedy joint action stays (0, 0) to the end,
    and the first where another sub-value's is (0, 0)."""
    trained = [r for r in tests if r["episodes"] > 0 and r.get("sub_value_greedy")]
    out = {"q1": None, "sub": None}
    for i, r in enumerate(trained):
        if out["q1"] is None and all(x["sub_value_greedy"][0] == [0, 0] for x in trained[i:]):
            out["q1"] = r["episodes"]
        if out["sub"] is None and any(j == [0, 0] for j in r["sub_value_greedy"][1:]):
            out["sub"] = r["episodes"]
    return out


def _matrix_job(method: str, game: str, seed: int, quick: bool) -> dict:
    recipe, overrides = METHODS[method]
    extra = SHIFT if game == "shifting" else CLIMB
    with tempfile.TemporaryDirectory() as tmp:
        res = _run(recipe, [*overrides, *extra, *(QUICK if quick else [])], seed, tmp)
    res.update(method=method, game=game, seed=seed)
    if method.startswith("s2q"):
        res["first_optimum"] = _first_optimum(res["tests"])
        res["sub_value_greedy"] = res["tests"][-1].get("sub_value_greedy")
    return res


def matrix_rows(seeds: int, quick: bool, add=discard) -> list[dict]:
    """One row per (method, game) over ``seeds`` seeds; the runs are spread over two worker processes."""
    jobs = [(m, "climbing") for m in METHODS] + [(m, "shifting") for m in SHIFTING_METHODS]
    units = [(m, g, s) for m, g in jobs for s in range(seeds)]
    rows, results = [], {}
    with ProcessPoolExecutor(_workers(len(units))) as pool:
        futures = {pool.submit(_in_worker, (f"marl matrix: {m} {g} seed {s}", i, len(units)), _matrix_job, m, g, s,
                               quick): (m, g) for i, (m, g, s) in enumerate(units, 1)}  # fmt: skip
        for future, key in futures.items():
            res = future.result()
            results.setdefault(key, []).append(res)
            final = res["summary"]["final"]["test_return"]
            log(f"  {res['method']:<14} {res['game']:<9} seed {res['seed']}: final greedy return {final:g}")
            if len(results[key]) == seeds:
                rows.append(_matrix_row(*key, results[key]))
                add(rows[-1])
    return rows


def _matrix_row(method: str, game: str, runs: list[dict]) -> dict:
    finals = [r["summary"]["final"]["test_return"] for r in runs]
    speed = statistics.median(r["summary"]["env_steps_per_s"] for r in runs)
    rate = sum(f == 11.0 for f in finals) / len(finals)
    extra = {"final_returns": finals, "optimum_rate": rate, "env_steps_per_s_median": speed,
             "overrides": METHODS[method][1]}  # fmt: skip
    if method.startswith("s2q"):  # which joint actions the sub-values represent, and who found the optimum first
        extra["sub_value_greedy"] = [r["sub_value_greedy"] for r in runs]
        extra["first_optimum"] = [r["first_optimum"] for r in runs]
    if game == "shifting":
        switch = 10_000
        rec = [_recovery(r["tests"], switch) for r in runs]
        extra.update(recovery_episodes=rec, recovered=sum(x is not None for x in rec))
    return {"method": f"{method}-{game}", "anchor": method == "qmix", "model": "rnn-agent",
            "task": f"matrix:{game}", "metric_name": "optimum rate", "metric": extra["optimum_rate"],
            "seeds": len(runs), "extra": extra}  # fmt: skip


def targets(rows: list[dict]) -> dict[str, bool]:
    r = {row["method"]: row for row in rows}
    out = {}
    if "s2q-climbing" in r and "qmix-climbing" in r:
        n = r["s2q-climbing"]["seeds"]
        out["s2q_climbing_optimum>=4/5"] = r["s2q-climbing"]["metric"] * n >= 0.8 * n - 1e-9
        out["qmix_climbing_optimum<=1/5"] = r["qmix-climbing"]["metric"] <= 0.2 + 1e-9
    return out


# S2Q's optimizer and targets, given to QMIX too: every S2Q-vs-QMIX comparison is like for like
S2Q_SETTINGS = ["marl.optimizer=adam", "marl.lr=0.001", "marl.td_lambda=0.6"]


def _lbf_job(method: str, seed: int, quick: bool) -> dict:
    recipe, extra = {"qmix": ("qmix-lbf-8x8", S2Q_SETTINGS), "s2q": ("s2q-lbf-8x8", [])}[method]
    with tempfile.TemporaryDirectory() as tmp:
        res = _run(recipe, [*extra, f"marl.max_steps={LBF_STEPS}", *(LBF_QUICK if quick else [])], seed, tmp)
    return {"method": method, "seed": seed, "summary": res["summary"]}


def lbf_rows(seeds: int, quick: bool) -> list[dict]:
    """S2Q against QMIX with the same optimizer and targets on LBF 8x8-2p-2f-coop (the dense-reward sanity check)."""
    jobs = [(m, s) for m in ("qmix", "s2q") for s in range(seeds)]
    with ProcessPoolExecutor(_workers(len(jobs))) as pool:
        futures = [pool.submit(_in_worker, (f"marl lbf: {m} seed {s}", i, len(jobs)), _lbf_job, m, s, quick)
                   for i, (m, s) in enumerate(jobs, 1)]  # fmt: skip
        results = [f.result() for f in futures]
    rows = []
    for method in ("qmix", "s2q"):
        finals = [r["summary"]["final"]["test_return"] for r in results if r["method"] == method]
        mean, std = _mean_std(finals)
        rows.append({"method": f"{method}-lbf", "anchor": method == "qmix", "model": "rnn-agent",
                     "task": "lbf:Foraging-8x8-2p-2f-coop-v3", "metric_name": "clean return", "metric": mean,
                     "metric_std": std, "seeds": len(finals),
                     "extra": {"finals": finals, "steps": LBF_STEPS, "settings": S2Q_SETTINGS}})  # fmt: skip
    return rows


def attack_rows(seeds: int, quick: bool, tasks: tuple[str, ...] = tuple(ATTACK_TASKS)) -> list[dict]:
    """Per task: the clean policy's return and, for vanilla and WALL continuations, the return under each attack."""
    jobs = [(task, s) for task in tasks for s in range(seeds)]
    with ProcessPoolExecutor(_workers(len(jobs))) as pool:
        futures = [pool.submit(_in_worker, (f"marl attack: {task} seed {s}", i, len(jobs)), _attack_job, task, s,
                               quick) for i, (task, s) in enumerate(jobs, 1)]  # fmt: skip
        results = []
        for future in futures:
            results.append(future.result())
            r = results[-1]
            clean = r["qmix"]["final"]["test_return"]
            log(f"  attack job done: {r['task']} seed {r['seed']}: clean QMIX {clean:.3g}, "
                f"vanilla {r['evals']['vanilla']}, wall {r['evals']['wall']}")  # fmt: skip
    rows = []
    for task in tasks:
        runs = [r for r in results if r["task"] == task]
        finals = [r["qmix"]["final"]["test_return"] for r in runs]
        mean, std = _mean_std(finals)
        rows.append({"method": f"qmix-{task}", "anchor": True, "model": "rnn-agent", "task": task,
                     "metric_name": "clean return", "metric": mean, "metric_std": std, "seeds": len(runs),
                     "extra": {"finals": finals, "steps": ATTACK_TASKS[task]["pretrain"],
                               "curves": [r["qmix_curve"] for r in runs]}})  # fmt: skip
        for policy in ("vanilla", "wall"):
            conditions = {c: [r["evals"][policy][c] for r in runs] for c in runs[0]["evals"][policy]}
            stats = {c: _mean_std(v) for c, v in conditions.items()}
            rows.append({"method": f"{policy}-{task}-attacked", "anchor": policy == "vanilla", "model": "rnn-agent",
                         "task": task, "metric_name": "return under wolfpack", "metric": stats["wolfpack"][0],
                         "metric_std": stats["wolfpack"][1], "seeds": len(runs),
                         "extra": {"per_seed": conditions, "mean_std": stats,
                                   "finetune_steps": ATTACK_TASKS[task]["finetune"],
                                   "episodes": ATTACK_TASKS[task]["episodes"]}})  # fmt: skip
    return rows


def attack_targets(rows: list[dict]) -> dict[str, bool]:
    """The paper's claims per task: Wolfpack lowers the vanilla policy's return more than both random attacks; WALL
    keeps more return under Wolfpack than vanilla with at most 10 % clean loss."""
    r = {row["method"]: row for row in rows}
    out = {}
    for task in {row["task"] for row in rows}:
        if f"vanilla-{task}-attacked" not in r:
            continue
        v, w = r[f"vanilla-{task}-attacked"]["extra"]["mean_std"], r[f"wall-{task}-attacked"]["extra"]["mean_std"]
        out[f"{task}:wolfpack_drop>random_step_drop"] = v["wolfpack"][0] < v["random_step"][0]
        out[f"{task}:wolfpack_drop>random_drop"] = v["wolfpack"][0] < v["random"][0]
        out[f"{task}:wall_attacked>vanilla_attacked"] = w["wolfpack"][0] > v["wolfpack"][0]
        out[f"{task}:wall_clean_loss<=10%"] = w["clean"][0] >= 0.9 * v["clean"][0]
    return out


def throughput_rows(quick: bool, add=discard) -> list[dict]:
    """Collection speed (env steps/s, epsilon 1, no learning) and learner speed (updates/s on a fixed batch).

    One row per learner, passed to ``add`` when measured.
    """
    import torch

    from leantrain.config import resolve

    torch.set_num_threads(1)
    wall = options_override("wall-lbf-8x8", clean_steps=0)
    arms = {"qmix": ("qmix-lbf-8x8", []), "vdn": ("qmix-lbf-8x8", ["marl.mixer=vdn"]),
            "s2q": ("s2q-lbf-8x8", []), "wall": ("wall-lbf-8x8", [wall])}  # fmt: skip
    episodes, repeats = (4, 2) if quick else (40, 5)
    units = Progress("marl throughput", len(arms))
    rows = []
    for name, (recipe, overrides) in arms.items():
        with units.unit(name):
            rows.append(_throughput_row(name, resolve(recipe, [*overrides, "progress=none"]), episodes, repeats))
            log(f"  {name}: {rows[-1]['metric']:.0f} env steps/s, {rows[-1]['extra']['updates_per_s']:.2f} updates/s")
        add(rows[-1])
    return rows


COLLECTORS = ("pymarl-style loop, 1 env", "runner, 1 env", "runner, 8 envs", "environment alone")


def _env_alone_episode(env, seed: int) -> int:
    """The ceiling: one episode of the environment adapter with the first available action, no agent at all."""
    o, t = env.reset(seed=seed), 0
    while True:
        step = env.step(o.avail.argmax(-1))
        o, t = step.observation, t + 1
        if step.terminated or step.truncated or t >= env.info.episode_limit:
            return t


def collection_rows(quick: bool, add=discard) -> list[dict]:
    """Environment steps per second of episode collection (LBF 8x8 2p, epsilon 0.5, the same agent network): a
    PyMARL-style per-step loop against our runner with 1 and 8 environments, interleaved, median of repeats (and the
    environment adapter alone, no agent: the ceiling of any collector); and the
    learner's unroll (forward + backward over a batch of 32 episodes) fused against one cell call per slot."""
    import torch

    from leantrain.bench.marl_reference import pymarl_style_episode, step_by_step_unroll
    from leantrain.marl.controller import MultiAgentController
    from leantrain.marl.envs import make_env
    from leantrain.marl.runner import EpisodeRunner

    torch.set_num_threads(1)
    env_id = "lbf:Foraging-8x8-2p-2f-coop-v3"
    envs = [make_env(env_id) for _ in range(8)]
    torch.manual_seed(0)
    mac = MultiAgentController(envs[0].info)
    runners = {COLLECTORS[1]: EpisodeRunner(envs[:1], mac, seed=0), COLLECTORS[2]: EpisodeRunner(envs, mac, seed=0)}
    steps_target, repeats = (200, 2) if quick else (3000, 5)
    speeds: dict[str, list[float]] = {name: [] for name in COLLECTORS}
    for r in range(repeats):
        for name in COLLECTORS:
            start, steps, episode = time.perf_counter(), 0, 0
            while steps < steps_target:
                if name == COLLECTORS[0]:
                    steps += pymarl_style_episode(envs[0], mac, 0.5, seed=r * 100_000 + episode)
                elif name == COLLECTORS[3]:
                    steps += _env_alone_episode(envs[0], seed=r * 100_000 + episode)
                else:
                    steps += runners[name].run(0.5)[1].steps
                episode += 1
            speeds[name].append(steps / (time.perf_counter() - start))
    base = statistics.median(speeds[COLLECTORS[0]])
    rows = []
    for name in COLLECTORS:
        value = statistics.median(speeds[name])
        rows.append({"method": name, "anchor": name == COLLECTORS[0], "model": "rnn-agent", "task": env_id,
                     "metric_name": "env steps/s", "metric": value, "seeds": 1,
                     "extra": {"speedup": value / base, "steps_per_s": speeds[name]}})  # fmt: skip
        add(rows[-1])
    batch, _ = runners[COLLECTORS[2]].run(1.0)
    while batch.size < 32:
        more, _ = runners[COLLECTORS[2]].run(1.0)
        batch.data = {k: torch.cat([batch.data[k], more.data[k]]) for k in batch.data}
    batch = batch.trimmed()
    times: dict[str, list[float]] = {"fused": [], "per-slot": []}
    unrolls = {"fused": mac.unroll, "per-slot": lambda o, a: step_by_step_unroll(mac, o, a)}
    for _ in range(3 if quick else 20):
        for name, unroll in unrolls.items():
            start = time.perf_counter()
            unroll(batch["obs"], batch["actions"]).square().mean().backward()
            times[name].append(time.perf_counter() - start)
    fused, loop = statistics.median(times["fused"]), statistics.median(times["per-slot"])
    rows.append({"method": "learner unroll (fused GRU)", "anchor": False, "model": "rnn-agent", "task": env_id,
                 "metric_name": "ms forward+backward", "metric": fused * 1e3, "seeds": 1,
                 "extra": {"per_slot_ms": loop * 1e3, "speedup": loop / fused, "batch_episodes": batch.size,
                           "slots": batch["obs"].shape[1]}})  # fmt: skip
    add(rows[-1])
    for env in envs:
        env.close()
    return rows


def _throughput_row(name: str, cfg, episodes: int, repeats: int) -> dict:
    from leantrain.marl.episodes import ReplayBuffer
    from leantrain.marl.run import build

    envs, test_envs, mac, learner, runner = build(cfg)
    buffer, speeds = ReplayBuffer(episodes * 8), []
    for _ in range(repeats):
        start, steps = time.perf_counter(), 0
        for _ in range(episodes):
            batch, stats = runner.run(1.0)
            buffer.insert(batch)
            steps += stats.steps
        speeds.append(steps / (time.perf_counter() - start))
    batch, times = buffer.sample(min(32, len(buffer))), []
    for _ in range(repeats):
        start = time.perf_counter()
        learner.train(batch, 1)
        times.append(time.perf_counter() - start)
    for env in envs + test_envs:
        env.close()
    return {"method": name, "anchor": name == "qmix", "model": "rnn-agent", "task": cfg.marl.env,
            "metric_name": "env steps/s", "metric": statistics.median(speeds), "seeds": 1,
            "step_time_s_median": statistics.median(times),
            "extra": {"updates_per_s": 1 / statistics.median(times), "collect_steps_per_s": speeds,
                      "update_s": times, "batch_episodes": batch.size}}  # fmt: skip


def lbf_targets(rows: list[dict]) -> dict[str, bool]:
    r = {row["method"]: row for row in rows}
    if "s2q-lbf" not in r:
        return {}
    return {"s2q_lbf_clean>=qmix-0.05": r["s2q-lbf"]["metric"] >= r["qmix-lbf"]["metric"] - 0.05}


def _pm(mean: float, std: float) -> str:
    """A table cell: mean ± std over seeds."""
    return f"{mean:.3f} ± {std:.3f}"


def run_bench(quick: bool, out_dir: Path, seeds: int | None = None, parts: tuple[str, ...] = PARTS) -> Path:
    from leantrain.bench.marl_methods import EXPLORATION
    from leantrain.bench.marl_zsc import ZSC_TASKS

    # "attack:<task>" runs the attack part on one task of ATTACK_TASKS, "exploration:<method>" one method's pair
    choices = {"attack": tuple(ATTACK_TASKS), "exploration": tuple(EXPLORATION), "zsc": tuple(ZSC_TASKS)}
    picked = {name: tuple(p.partition(":")[2] for p in parts if p.startswith(f"{name}:")) for name in choices}
    parts = (*[p for p in parts if ":" not in p], *[name for name, sub in picked.items() if sub])
    unknown = sorted(set(parts) - set(PARTS))
    unknown += [f"{name}:{s}" for name, sub in picked.items() for s in sorted(set(sub) - set(choices[name]))]
    if unknown:
        options = [f"{name}:{s}" for name, subs in choices.items() for s in subs]
        raise ConfigError(f"bench marl: unknown part(s) {unknown}; choose from {list(PARTS)} or {options}")
    tasks = picked["attack"]
    started = time.perf_counter()
    results = BenchResults("marl", out_dir, threads=1, quick=quick)
    tables, met = [], {}
    if "throughput" in parts:
        log("throughput: runner env steps/s (epsilon 1, no learning) and learner updates/s, LBF 8x8 2p coop, 1 thread")
        part = throughput_rows(quick, add=results.add)
        for row in part:
            row.update(updates_per_s=row["extra"]["updates_per_s"])
        tables.append("Throughput (LBF 8x8, 2 players, cooperative foods, 1 thread)\n"
                      + markdown_table(part, ["method", "metric", "updates_per_s", "step_time_s_median"]))  # fmt: skip
        log("collection: PyMARL-style per-step loop vs our runner (1 and 8 envs); learner unroll fused vs per slot")
        part = collection_rows(quick, add=results.add)
        for row in part:
            row.update(speedup=row["extra"]["speedup"], per_slot_ms=row["extra"].get("per_slot_ms"))
        eight = next(row for row in part if row["method"] == COLLECTORS[2])
        met["runner_8env>=3x_pymarl_loop"] = eight["extra"]["speedup"] >= 3.0
        cols = ["method", "metric_name", "metric", "speedup", "per_slot_ms"]
        title = "Collection and unroll speed (same network, LBF 8x8 2p, 1 thread)"
        tables.append(title + "\n" + markdown_table(part, cols))
    if "matrix" in parts:
        log("matrix games: QMIX, VDN and S2Q arms (same Adam 1e-3, TD(lambda) 0.6), 20k episodes each, 1 thread")
        part = matrix_rows(seeds or (1 if quick else 5), quick, add=results.add)
        met.update(targets(part))
        for row in part:
            ex = row["extra"]
            firsts = ex.get("first_optimum") or []
            row.update(finals=ex["final_returns"], steps_per_s=ex["env_steps_per_s_median"],
                       recovered=ex.get("recovered"), recovery=ex.get("recovery_episodes"),
                       first_q1=[f["q1"] for f in firsts] or None,
                       first_sub=[f["sub"] for f in firsts] or None)  # fmt: skip
        cols = ["method", "seeds", "metric", "finals", "first_q1", "first_sub", "recovered", "recovery", "steps_per_s"]
        title = (
            "Matrix games (final greedy return per seed; optimum = 11; first_q1 / first_sub: episodes at the "
            "first test where Q1 / another sub-value is greedy on (0, 0))"
        )
        tables.append(title + "\n" + markdown_table(part, cols))
    if "lbf" in parts:
        log(f"lbf: QMIX and S2Q {LBF_STEPS} steps, both with Adam 1e-3 and TD(lambda) 0.6")
        part = lbf_rows(seeds or (1 if quick else 3), quick)
        results.add_rows(part)
        met.update(lbf_targets(part))
        for row in part:
            row.update(clean=_pm(row["metric"], row["metric_std"]), finals=row["extra"]["finals"])
        title = (
            "LBF 8x8, 2 players, cooperative foods (mean greedy return ± std over seeds, same optimizer and targets)"
        )
        tables.append(title + "\n" + markdown_table(part, ["method", "seeds", "clean", "finals"]))
    if "attack" in parts:
        tasks = tasks or tuple(ATTACK_TASKS)
        log(f"attack: {', '.join(tasks)}: clean QMIX, then vanilla / WALL continuations, then 5 conditions")
        part = attack_rows(seeds or (1 if quick else 3), quick, tasks)
        results.add_rows(part)
        met.update(attack_targets(part))
        for row in part:
            ms = row["extra"].get("mean_std", {})
            row.update({c: _pm(m, s) for c, (m, s) in ms.items()})
            if not ms:
                row["clean"] = _pm(row["metric"], row["metric_std"])
        cols = ["method", "seeds", "clean", "wolfpack", "wolfpack_std", "random_step", "random"]
        tables.append("Attacks (mean greedy return ± std over seeds, test budget 8)\n" + markdown_table(part, cols))
    if "exploration" in parts:
        from leantrain.bench.marl_methods import exploration_rows, exploration_targets, plot_exploration

        methods = picked["exploration"] or tuple(EXPLORATION)
        log(f"exploration: {', '.join(f'{m} ({EXPLORATION[m][0]})' for m in methods)} against QMIX, same settings")
        part = exploration_rows(seeds or (1 if quick else 3), quick, add=results.add, methods=methods)
        met.update(exploration_targets(part))
        for row in part:
            row.update(ret=_pm(row["metric"], row["metric_std"]), solved=row["extra"]["solved"],
                       finals=row["extra"]["finals"], steps_per_s=row["extra"]["env_steps_per_s"])  # fmt: skip
        figure = plot_exploration(part, Path(out_dir) / "marl_exploration.png")
        if figure:
            log(f"exploration curves: {figure}")
        cols = ["method", "task", "seeds", "ret", "solved", "finals", "steps_per_s"]
        tables.append("Exploration (final greedy return = success rate, mean ± std)\n" + markdown_table(part, cols))
    if "robustness" in parts:
        from leantrain.bench.marl_methods import robustness_rows, robustness_targets

        log("robustness: LBF 4p, clean QMIX then vanilla / WALL / IBAL continuations, every attack of the suite")
        part = robustness_rows(seeds or (1 if quick else 3), quick, add=results.add)
        met.update(robustness_targets(part))
        conditions = list(part[0]["extra"]["mean_std"])
        for row in part:
            row.update({c: _pm(m, s) for c, (m, s) in row["extra"]["mean_std"].items()})
        tables.append("Robustness (mean greedy return ± std over seeds, test budget 8)\n"
                      + markdown_table(part, ["method", "seeds", *conditions]))  # fmt: skip
    if "zsc" in parts:
        from leantrain.bench.marl_zsc import plot_zsc, zsc_rows, zsc_targets

        zsc_tasks = picked["zsc"] or tuple(ZSC_TASKS)
        log(f"zsc: {', '.join(zsc_tasks)}: held-out self-play partners, then SBC and FCP-style pipelines per seed")
        part = zsc_rows(seeds or (1 if quick else 3), quick, add=results.add, tasks=zsc_tasks)
        met.update(zsc_targets(part))
        for row in part:
            row.update(crossplay=_pm(row["metric"], row["metric_std"]), per_seed=row["extra"]["per_seed"])
        figure = plot_zsc(part, Path(out_dir) / "marl_zsc.png")
        log(f"zsc plot: {figure}")
        title = "Zero-shot coordination (cross-play return with held-out partners, mean ± std over seeds)"
        tables.append(title + "\n" + markdown_table(part, ["method", "seeds", "crossplay", "per_seed"]))
    path = results.finish({"targets": met, "wall_time_s": round(time.perf_counter() - started, 1)})
    print("\n\n".join(tables))
    print_targets(met, path)
    return path
