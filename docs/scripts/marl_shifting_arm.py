"""One matrix-game arm of ``leantrain bench marl --part matrix`` on a game the bench does not run it on.

    .venv/bin/python docs/scripts/marl_shifting_arm.py s2q-wc0.9 shifting 5

runs the bench's own job (:func:`leantrain.bench.marl._matrix_job`) for seeds 0..N-1 and prints the row's extras
(finals, recovery episodes); docs/marl.md's "S2Q (w_c 0.9)" shifting row came from this command.
"""

import json
import sys

import torch

from leantrain.bench.marl import _matrix_job, _matrix_row

if __name__ == "__main__":
    torch.set_num_threads(1)
    method, game, seeds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    row = _matrix_row(method, game, [_matrix_job(method, game, s, False) for s in range(seeds)])
    print(json.dumps(row["extra"], default=str, indent=1))
