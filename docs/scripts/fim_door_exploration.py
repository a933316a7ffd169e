"""FIM against QMIX on the door world, and FIM with its bonus off (beta = 0): the table of docs/fim.md "Measured".

Usage: ``.venv/bin/python docs/scripts/fim_door_exploration.py [seeds]`` (default 3). The first two arms are the
FIM pair of ``leantrain bench marl --part exploration`` (:func:`leantrain.bench.marl_methods.exploration_rows`, the
recipes as shipped, 200k steps); the third changes one thing, ``beta: 0.0``, to isolate the bonus. Writes
bench-results/marl_fim_exploration.json and prints one line per arm.
"""

import json
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from leantrain.bench import marl_methods
from leantrain.bench.marl_jobs import _mean_std, _run, options_override

BONUS_OFF = options_override("fim-door", beta=0.0)


def bonus_off(seed: int) -> float:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        return _run("fim-door", [BONUS_OFF], seed, tmp)["summary"]["final"]["test_return"]


def main(seeds: int) -> None:
    rows = marl_methods.exploration_rows(seeds, quick=False, methods=("fim",))
    with ProcessPoolExecutor(2) as pool:
        finals = list(pool.map(bonus_off, range(seeds)))
    mean, std = _mean_std(finals)
    rows.append({"method": "fim-beta0", "metric": round(mean, 4), "metric_std": round(std, 4),
                 "extra": {"finals": finals, "solved": sum(f >= marl_methods.SOLVED for f in finals)}})  # fmt: skip
    out = Path("bench-results/marl_fim_exploration.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "targets": marl_methods.exploration_targets(rows)}, indent=1))
    for r in rows:
        print(r["method"], r["metric"], r["metric_std"], r["extra"]["finals"], f"solved {r['extra']['solved']}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
