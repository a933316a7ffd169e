"""IBAL without its consistency term under the whole attack suite, from the robustness part's clean policies.

Usage: ``.venv/bin/python docs/scripts/ibal_variant_robustness.py SEED=PRETRAINED_RUN [SEED=PRETRAINED_RUN ...]``.
Each PRETRAINED_RUN is the clean ``qmix-lbf-4p`` policy (200k steps) that ``leantrain bench marl --part robustness``
trained for that seed. With the part's own code for its continuations
(:func:`leantrain.bench.marl_jobs.continue_and_attack`), the policy is continued for 20k steps with the same seed,
here with ``ibal-lbf-4p`` and ``consistency: 0.0`` (one change), and attacked by every condition of the suite with
the same Wolfpack settings, evaluation seed and 64 episodes per condition, so its numbers sit beside the part's rows
for the same seeds. Writes
bench-results/ibal_diag/variant-robustness.json and prints one line per seed.
"""

import json
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def job(seed: int, pretrained: str) -> dict:
    import torch

    from leantrain.bench.marl_jobs import ATTACK_TASKS, continue_and_attack, options_override

    torch.set_num_threads(1)
    recipe = ATTACK_TASKS["lbf-4p"]["ibal"]
    variant = {"ibal-no-consistency": (recipe, [options_override(recipe, consistency=0.0)])}
    with tempfile.TemporaryDirectory() as tmp:
        _, evals = continue_and_attack("lbf-4p", seed, pretrained, variant, quick=False, tmp=tmp)
    return {"seed": seed, "pretrained": pretrained, "evals": evals["ibal-no-consistency"]}


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
