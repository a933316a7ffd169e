"""Where IBAL's clean return goes: continuations of one clean QMIX policy on LBF 4p, changing one thing each.

Usage: ``.venv/bin/python docs/scripts/ibal_clean_loss_diagnosis.py PRETRAINED_RUN ARM [ARM...] [--steps N]``.
PRETRAINED_RUN is a finished ``qmix-lbf-4p`` run folder (the robustness part's clean policy, 200k steps); every arm
continues it for ``--steps`` environment steps (default 10k) with the recipe named in :data:`ARMS` plus overrides,
and reports the greedy clean test return (32 episodes) at each test and, for IBAL arms, the return under IBAL's
test attack. Writes bench-results/ibal_diag/ARM-<pretrained folder name>.json and prints one line per arm.
"""

import argparse
import json
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

OUT = Path("bench-results/ibal_diag")


def _ibal(**change) -> list[str]:
    from leantrain.bench.marl_jobs import options_override

    return [options_override("ibal-lbf-4p", **change)]


ARMS = {
    "vanilla": ("qmix-lbf-4p", ["marl.epsilon_start=0.05"]),  # the robustness part's vanilla continuation
    "vanilla-greedy": ("qmix-lbf-4p", ["marl.epsilon_start=0.0", "marl.epsilon_finish=0.0"]),
    "ibal": ("ibal-lbf-4p", []),
    # one change each against "ibal"
    "ibal-no-attack": ("ibal-lbf-4p", _ibal(attacked_episodes=0.0)),
    "ibal-no-consistency": ("ibal-lbf-4p", _ibal(consistency=0.0)),
    "ibal-no-masking": ("ibal-lbf-4p", _ibal(mask_observations=False)),
    "ibal-no-action": ("ibal-lbf-4p", _ibal(action_agents=0)),
}


def job(arm: str, pretrained: str, steps: int) -> dict:
    import torch

    from leantrain.bench.marl_jobs import _run

    torch.set_num_threads(1)
    recipe, overrides = ARMS[arm]
    start = [f"marl.pretrained_policy={pretrained}", f"marl.max_steps={steps}", f"marl.eval_every={steps // 2}"]
    with tempfile.TemporaryDirectory() as tmp:
        res = _run(recipe, [*start, *overrides], 0, tmp)
    tests = [(r["t_env"], round(r["return_mean"], 4), round(r.get("ibal_return_mean", float("nan")), 4))
             for r in res["tests"]]  # fmt: skip
    return {"arm": arm, "pretrained": pretrained, "steps": steps, "tests_t_clean_ibal": tests}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pretrained")
    parser.add_argument("arms", nargs="+", choices=list(ARMS))
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    n = len(args.arms)
    with ProcessPoolExecutor(args.workers) as pool:
        for r in pool.map(job, args.arms, [args.pretrained] * n, [args.steps] * n):
            (OUT / f"{r['arm']}-{Path(r['pretrained']).name}.json").write_text(json.dumps(r, indent=1))
            print(r["arm"], r["tests_t_clean_ibal"], flush=True)


if __name__ == "__main__":
    main()
