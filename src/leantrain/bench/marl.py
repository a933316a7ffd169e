"""``leantrain bench marl`` (part ``matrix``, the first part built): QMIX, VDN and S2Q on the matrix games.

Each method runs its recipe (``qmix-climbing``, the same with ``marl.mixer=vdn``, ``s2q-climbing``) for 20k
one-step episodes over ``--seeds`` seeds (default 5), 1 thread:

- climbing: the fraction of seeds whose final greedy joint action is the optimum (return 11);
- shifting (``matrix:shifting``: the optimum moves (0, 0) -> (2, 2) after 10k episodes; greedy tests every
  500 episodes): whether and how many episodes after the switch the greedy joint action reaches the new optimum.

Runner throughput (environment steps per second) is reported from the same runs. Targets from the issue are
evaluated and printed, never tuned for. The LBF, attack and WALL parts are not built yet.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from leantrain.bench.report import log, markdown_table, print_targets, write_results
from leantrain.errors import ConfigError

METHODS = {"qmix": ("qmix-climbing", []), "vdn": ("qmix-climbing", ["marl.mixer=vdn"]), "s2q": ("s2q-climbing", [])}
SHIFT = ["marl.env=matrix:shifting", "marl.switch_episode=10000", "marl.test_every=500"]
QUICK = ["marl.t_max=2000", "marl.epsilon_anneal_steps=1000", "marl.test_every=1000"]
PARTS = ("matrix",)


def _run(recipe: str, overrides: list[str], seed: int, tmp: str) -> dict:
    from leantrain.config import resolve
    from leantrain.train.run import run

    cfg = resolve(recipe, [*overrides, f"seed={seed}", "progress=none", f"output_dir={tmp}"])
    result = run(cfg)
    tests = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"summary": result.summary, "tests": [r for r in tests if r["split"] == "test"]}


def _recovery(tests: list[dict], switch: int) -> int | None:
    """Episodes after the switch until a greedy test returns the new optimum (11) and stays there, else None."""
    after = [r for r in tests if r["episodes"] > switch]
    for i, r in enumerate(after):
        if all(x["return_mean"] == 11.0 for x in after[i:]):
            return r["episodes"] - switch
    return None


def matrix_rows(seeds: int, quick: bool) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        results: dict[tuple[str, str], list[dict]] = {}
        for seed in range(seeds):
            for method, (recipe, overrides) in METHODS.items():
                for game, extra in (("climbing", []), ("shifting", SHIFT)):
                    res = _run(recipe, [*overrides, *extra, *(QUICK if quick else [])], seed, tmp)
                    results.setdefault((method, game), []).append(res)
                    final = res["summary"]["final"]["test_return"]
                    log(f"  {method:<5} {game:<9} seed {seed}: final greedy return {final:g}, "
                        f"{res['summary']['env_steps_per_s']:.0f} env steps/s")  # fmt: skip
        for (method, game), runs in results.items():
            finals = [r["summary"]["final"]["test_return"] for r in runs]
            speed = statistics.median(r["summary"]["env_steps_per_s"] for r in runs)
            rate = sum(f == 11.0 for f in finals) / len(finals)
            extra = {"final_returns": finals, "optimum_rate": rate, "env_steps_per_s_median": speed}
            if game == "shifting":
                switch = 10_000
                rec = [_recovery(r["tests"], switch) for r in runs]
                extra.update(recovery_episodes=rec, recovered=sum(x is not None for x in rec))
            rows.append({"method": f"{method}-{game}", "anchor": method == "qmix", "model": "rnn-agent",
                         "task": f"matrix:{game}", "metric_name": "optimum rate", "metric": extra["optimum_rate"],
                         "seeds": len(runs), "extra": extra})  # fmt: skip
    return rows


def targets(rows: list[dict]) -> dict[str, bool]:
    r = {row["method"]: row for row in rows}
    out = {}
    if "s2q-climbing" in r and "qmix-climbing" in r:
        n = r["s2q-climbing"]["seeds"]
        out["s2q_climbing_optimum>=4/5"] = r["s2q-climbing"]["metric"] * n >= 0.8 * n - 1e-9
        out["qmix_climbing_optimum<=1/5"] = r["qmix-climbing"]["metric"] <= 0.2 + 1e-9
    return out


def run_bench(quick: bool, out_dir: Path, seeds: int | None = None, parts: tuple[str, ...] = PARTS):
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ConfigError(f"bench marl: unknown part(s) {unknown}; choose from {list(PARTS)} (more parts to come)")
    started = time.perf_counter()
    log("matrix games: QMIX, VDN, S2Q on climbing and shifting climbing, 20k episodes each, 1 thread")
    rows = matrix_rows(seeds or (1 if quick else 5), quick)
    met = targets(rows)
    path = write_results("marl", rows, out_dir, threads=1, quick=quick,
                         extra={"targets": met, "wall_time_s": round(time.perf_counter() - started, 1)})  # fmt: skip
    for row in rows:
        ex = row["extra"]
        row.update(finals=ex["final_returns"], steps_per_s=ex["env_steps_per_s_median"],
                   recovered=ex.get("recovered"), recovery=ex.get("recovery_episodes"))  # fmt: skip
    cols = ["method", "seeds", "metric", "finals", "recovered", "recovery", "steps_per_s"]
    print("Matrix games (final greedy return per seed; optimum = 11)\n" + markdown_table(rows, cols))
    print_targets(met, path)
