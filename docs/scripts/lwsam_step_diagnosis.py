"""LW-SAM step-time diagnosis (docs/lwsam.md): pinned layer selections timed interleaved with SGD and SAM, 1 thread.

Run from the repository root: .venv/bin/python docs/scripts/lwsam_step_diagnosis.py [repeats]
"""

import json
import statistics
import sys

import torch

from leantrain.bench.optim_step import cycle, one_step, setup

torch.set_num_threads(1)
PINS = {
    "lwsam-head": ["head"],
    "lwsam-lastblock": ["blocks.8.conv1", "blocks.8.conv2", "head"],
    "lwsam-stage3-measured": ["head", "blocks.6.conv2", "blocks.7.conv1"],
    "lwsam-stage3-measured-masked": ["head", "blocks.6.conv2", "blocks.7.conv1"],
    "lwsam-blocks6conv1": ["blocks.6.conv1", "blocks.8.conv2", "head"],
}
arms = {
    "sgd": setup("sgd", ["threads=1"]),
    "sam": setup("sam", ["threads=1"]),
    "lwsam-warmup-step (one pass + recording hooks)": setup("lwsam", ["threads=1", "optim.select_after=100000"]),
}
for name, layers in PINS.items():
    extra = ["optim.second_pass=masked"] if name.endswith("masked") else []
    arms[name] = setup("lwsam", ["threads=1", "optim.select_after=0", *extra])
    opt = arms[name][1]
    opt.reselect_every = 10**9
    opt.selection = tuple(opt.layer_names.index(l) for l in layers)
    opt.step_count = 1  # past the first selection
batches = {k: cycle(v[2]) for k, v in arms.items()}
times = {k: [] for k in arms}
reps, steps = int(sys.argv[1]) if len(sys.argv) > 1 else 3, 10
for _rep in range(reps):
    for k, (model, opt, _, task) in arms.items():
        model.train()
        for i in range(steps + 2):
            t = one_step(model, opt, task, next(batches[k]))
            if i >= 2:
                times[k].append(t)
sgd = statistics.median(times["sgd"])
out = {}
for k, (_model, opt, _, _task) in arms.items():
    med = statistics.median(times[k])
    rep_ = getattr(opt, "last_replayed", None)
    out[k] = {
        "median_s": med,
        "ratio": med / sgd,
        "replayed": rep_,
        "sel": [opt.layer_names[i] for i in getattr(opt, "selection", ())],
    }
    print(f"{k:<48} {med:.3f} s  {med / sgd:.3f}x  replayed={rep_}  {out[k]['sel']}")
json.dump(out, open("lwsam_step_diagnosis.json", "w"), indent=1)
