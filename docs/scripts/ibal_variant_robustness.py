"""IBAL without its consistency term under the whole attack suite, from the robustness part's clean policies.

Usage: ``.venv/bin/python docs/scripts/ibal_variant_robustness.py SEED=PRETRAINED_RUN [SEED=PRETRAINED_RUN ...]``.
Each PRETRAINED_RUN is the clean ``qmix-lbf-4p`` policy (200k steps) that ``leantrain bench marl --part robustness``
trained for that seed. As the part does for its continuations (:func:`leantrain.bench.marl_jobs._attack_job`), the
policy is continued for 20k steps with the same seed, here with ``ibal-lbf-4p`` and ``consistency: 0.0`` (one
change), and attacked by every condition of the suite with the same Wolfpack settings, evaluation seed and 64
episodes per condition, so its numbers sit beside the part's rows for the same seeds. Writes
bench-results/ibal_diag/variant-robustness.json and prints one line per seed.
"""

import json
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

OPTIONS = ("marl.method_options={clean_steps: 0, attacked_episodes: 0.5, collect_epsilon: 0.0, consistency: 0.0, "
           "budget: 12, test_budget: 8, attack_prob: 0.5, mask_observations: true, action_agents: 1, "
           "action_rule: worst, group_rule: greedy}")  # fmt: skip


def job(seed: int, pretrained: str) -> dict:
    import torch

    from leantrain.bench.marl_jobs import ATTACK_TASKS, _run
    from leantrain.config import load_recipe
    from leantrain.marl.learners import wolfpack_config
    from leantrain.marl.robustness import evaluate_attacks

    torch.set_num_threads(1)
    spec = ATTACK_TASKS["lbf-4p"]
    options = dict(load_recipe(spec["wall"])["marl"]["method_options"])
    options.pop("clean_steps", None)
    with tempfile.TemporaryDirectory() as tmp:
        start = [f"marl.pretrained_policy={pretrained}", f"marl.max_steps={spec['finetune']}", OPTIONS]
        run = _run(spec["ibal"], start, seed, tmp)
        evals = evaluate_attacks(run["summary"]["run_dir"], episodes=spec["episodes"], seed=seed,
                                 config=wolfpack_config(options))  # fmt: skip
    return {"seed": seed, "pretrained": pretrained, "evals": evals}


def main(pairs: list[str]) -> None:
    seeds, runs = zip(*[(int(p.split("=", 1)[0]), p.split("=", 1)[1]) for p in pairs], strict=True)
    with ProcessPoolExecutor(2) as pool:
        results = list(pool.map(job, seeds, runs))
    out = Path("bench-results/ibal_diag/variant-robustness.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    for r in results:
        print(r["seed"], {k: round(v, 4) for k, v in r["evals"].items()})


if __name__ == "__main__":
    main(sys.argv[1:])
