"""The equal wall-clock arms of `leantrain bench optim` alone (docs/lwsam.md): SAM and SGD trained for LW-SAM's
wall-clock, step counts from the step-time ratios of a `leantrain bench optim --part steptime` JSON, with the bench's
own job runner and settings (12k subset, 1 thread, 2 runs at a time).

Run from the repository root: .venv/bin/python docs/scripts/lwsam_equal_time.py bench-results/<optim json>
"""

import json
import statistics
import sys
import tempfile

from leantrain.bench.optim import EQUAL_TIME, STANDARD, _run_jobs, equal_time_steps


def main():
    rows = json.load(open(sys.argv[1]))["rows"]
    ratios = {r["method"]: r["extra"]["ratio_to_sgd"] for r in rows if "ratio_to_sgd" in r.get("extra", {})}
    steps, warmup = 282, 30
    arms = {name: equal_time_steps(steps, warmup, ratios, anchor) for name, anchor in EQUAL_TIME.items()}
    print("ratios", ratios, "arms", arms, flush=True)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = [*STANDARD, "threads=1", "progress=none"]
        jobs = {
            (m, s): (EQUAL_TIME[m], [*base, f"seed={s}", f"output_dir={tmp}", f"train.max_steps={n}"])
            for m, n in arms.items()
            for s in range(3)
        }

        def finish(name, summaries):
            accs = [x["final"]["test_accuracy"] for x in summaries]
            out[name] = {"steps": arms[name], "acc": accs, "summaries": summaries}
            print(name, accs, flush=True)

        _run_jobs(jobs, 2, lambda m: print(m, flush=True), finish)
    json.dump(out, open("lwsam_equal_time.json", "w"), indent=1, default=str)
    for k, v in out.items():
        a = [x for x in v["acc"] if x is not None]
        print(k, v["steps"], round(statistics.mean(a), 4), round(statistics.stdev(a), 4) if len(a) > 1 else None)


if __name__ == "__main__":
    main()
