"""Re-evaluate kept vanilla / WALL policies of ``leantrain bench marl --part attack`` under every attack condition.

The bench trains in temporary folders; to re-run its evaluation (e.g. after a fix to an attack condition) keep the
run folders while it runs (copy every ``<tmp>/{qmix,wall}-<task>-*`` folder that has a ``summary.json``), then:

    .venv/bin/python docs/scripts/marl_reevaluate_attacks.py KEPT_DIR lbf-4p [EPISODES]

It pairs the vanilla (a QMIX run started from a pretrained policy) and WALL runs of each seed and calls
:func:`leantrain.marl.robustness.evaluate_attacks` with the bench's seed, episodes and the ``wall-<task>`` recipe's
attack, so every condition the bench measured is reproduced exactly (docs/marl.md used it for ``wolfpack_std``).
"""

import json
import sys
from pathlib import Path

import torch

from leantrain.config import load_recipe, resolve
from leantrain.marl.learners import wolfpack_config
from leantrain.marl.robustness import evaluate_attacks


def main(kept: Path, task: str, episodes: int = 64) -> dict:
    torch.set_num_threads(1)
    runs: dict[int, dict[str, Path]] = {}
    for folder in sorted(kept.glob(f"*-{task}-*")):
        cfg = resolve(str(folder / "config.yaml"), ["progress=none"])
        kind = "wall" if cfg.marl.algo == "wall" else "vanilla" if cfg.marl.pretrained_policy else None
        if kind:
            runs.setdefault(cfg.seed, {})[kind] = folder
    options = dict(load_recipe(f"wall-{task}")["marl"]["method_options"])
    options.pop("clean_steps", None)
    attack = wolfpack_config(options)
    out = {}
    for seed, kinds in sorted(runs.items()):
        if len(kinds) == 2:
            out[seed] = {k: evaluate_attacks(d, episodes=episodes, seed=seed, config=attack) for k, d in kinds.items()}
            print(seed, json.dumps(out[seed]), flush=True)
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], *(int(a) for a in sys.argv[3:4]))
