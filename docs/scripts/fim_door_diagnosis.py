"""What the greedy policies of FIM and QMIX do on the door world: the experiment behind docs/fim.md "Why".

Usage: ``.venv/bin/python docs/scripts/fim_door_diagnosis.py ARM [ARM...] [--seeds N]``, or ``--plot PNG`` to draw
the kept ``fim`` and ``qmix`` runs' test curves; arms are named in
:data:`ARMS` (each is a recipe plus overrides that differ in one thing). Each (arm, seed) trains the recipe for its
200k steps, keeps the run under bench-results/fim_diagnosis/, then plays 64 greedy episodes of the saved policy and
records, per episode: the return (= reached the goal), whether the door opened, the length, and the steps on which
both plates were held. The mean training bonus over the last logged windows comes from the run's metrics.
Writes bench-results/fim_diagnosis/ARM.json and prints one line per seed.
"""

import argparse
import json
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

OUT = Path("bench-results/fim_diagnosis")


def _fim(**change) -> list[str]:
    """fim-door's method options with ``change``."""
    from leantrain.bench.marl_jobs import options_override

    return [options_override("fim-door", **change)]


ARMS = {
    "qmix": ("qmix-door", []),
    "fim": ("fim-door", []),
    # one change each against "fim"
    "fim-beta0.01": ("fim-door", _fim(beta=0.01)),
    "fim-centered": ("fim-door", _fim(center=True)),
    "fim-beta0": ("fim-door", _fim(beta=0.0)),
    "fim-door-focus": ("fim-door", _fim(focus_dims=[4])),
    "fim-no-trace": ("fim-door", _fim(trace_decay=0.0)),
    "fim-terminal-tail": ("fim-door", _fim(terminal_tail=True)),
    "fim-entropy": ("fim-door", _fim(criterion="entropy")),
    # two changes: the entropy criterion (whose focus stays on the door here) and the terminal tail
    "fim-entropy-tail": ("fim-door", _fim(criterion="entropy", terminal_tail=True)),
}


def plates_held(state):
    """Whether both plates are held in door-world states (..., 5) of the default 7 x 5 grid: (...) bool."""
    import torch

    pos = torch.round(state[..., :4] * torch.tensor([6.0, 4.0, 6.0, 4.0]))  # both agents' (x, y) in cells
    return (pos[..., 0] == 0) & (pos[..., 2] == 0) & ((pos[..., 1] - pos[..., 3]).abs() == 4)


def behaviour(run_dir: Path, episodes: int = 64) -> dict:

    from leantrain.marl.door_world import DoorWorld
    from leantrain.marl.robustness import load_run
    from leantrain.marl.runner import EpisodeRunner

    _, envs, mac, _ = load_run(run_dir)
    runner = EpisodeRunner(envs, mac, seed=12345)
    rows = []
    while len(rows) < episodes:
        batch, stats = runner.run(0.0, test=True)
        state, filled = batch["state"], batch["filled"]  # (E, T+1, 5), (E, T)
        for e in range(state.shape[0]):
            n = int(filled[e].sum())
            s = state[e, : n + 1]
            rows.append({"ret": stats.returns[e], "door": float(s[:, DoorWorld.door_dim].max()), "len": n,
                         "plates_held": int(plates_held(s).sum())})  # fmt: skip
    for env in envs:
        env.close()
    rows = rows[:episodes]
    out = {k: statistics.fmean(r[k] for r in rows) for k in ("ret", "door", "len", "plates_held")}
    out["door_not_goal"] = statistics.fmean(float(r["door"] > 0 and r["ret"] == 0) for r in rows)
    return out


def door_bonus(run_dir: Path, episodes: int = 64, trace_decay: float | None = None) -> dict:
    """The saved forward model's door bonus (raw, focus = the door, traces as in training) by situation, over the
    greedy episodes of the saved policy: the mean over steps whose state has both plates held (the door is then
    already open: it opens on the step into such a state) and over the other steps; ``trace_decay=0`` gives the
    step's own influence."""
    import torch
    from safetensors.torch import load_file

    from leantrain.marl.door_world import DoorWorld
    from leantrain.marl.robustness import load_run
    from leantrain.marl.runner import EpisodeRunner

    _, envs, mac, learner = load_run(run_dir)
    tensors = load_file(str(run_dir / "model.safetensors"))
    learner.model.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("fim_model.")})
    learner.focus = torch.tensor([DoorWorld.door_dim])
    if trace_decay is not None:  # 0: the step's own influence, no trace
        learner.fim.trace_decay = trace_decay
    runner = EpisodeRunner(envs, mac, seed=12345)
    sums = {"held_open": [0.0, 0], "elsewhere": [0.0, 0]}
    done = 0
    while done < episodes:
        batch, _ = runner.run(0.0, test=True)
        batch = batch.trimmed()
        raw, filled, state = learner.raw_bonus(batch), batch["filled"], batch["state"][:, :-1]
        held = plates_held(state)
        for name, where in (("held_open", held), ("elsewhere", ~held)):
            mask = where & (filled > 0)
            sums[name][0] += float(raw[mask].sum())
            sums[name][1] += int(mask.sum())
        done += batch["filled"].shape[0]
    for env in envs:
        env.close()
    return {f"bonus_{k}": (v / n if n else None) for k, (v, n) in sums.items()} | {
        f"steps_{k}": n for k, (_, n) in sums.items()
    }


def job(arm: str, seed: int) -> dict:
    import torch

    from leantrain.bench.marl_jobs import _run

    torch.set_num_threads(1)
    recipe, overrides = ARMS[arm]
    res = _run(recipe, overrides, seed, str(OUT / arm))
    run_dir = Path(res["summary"]["run_dir"])
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    bonus = [r["fim_bonus"] for r in train if "fim_bonus" in r]
    focus = [r["focus"] for r in train if r["split"] == "test" and r.get("focus")]
    return {"arm": arm, "seed": seed, "final": res["summary"]["final"]["test_return"], "run_dir": str(run_dir),
            "bonus_last": statistics.fmean(bonus[-5:]) if bonus else None, "focus": focus,
            "door_focus_share": statistics.fmean(4 in f for f in focus) if focus else None,
            **behaviour(run_dir), **(door_bonus(run_dir) if recipe == "fim-door" else {}),
            **({f"{k}_no_trace": v for k, v in door_bonus(run_dir, trace_decay=0.0).items() if k.startswith("bonus")}
               if recipe == "fim-door" else {})}  # fmt: skip


def plot_kept(path: Path) -> None:
    """The test curves of the kept ``fim`` and ``qmix`` runs (the recipes as shipped, the bench pair's seeds) drawn
    by the bench's own plot, as rows of ``leantrain bench marl --part exploration:fim``."""
    from leantrain.bench.marl_methods import plot_exploration

    rows = []
    for arm, method in (("fim", "fim"), ("qmix", "fim-baseline-qmix")):
        curves, speeds = [], []
        for run in sorted((OUT / arm).iterdir()):
            tests = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            curves.append([(r["t_env"], r["return_mean"]) for r in tests if r["split"] == "test"])
            speeds.append(json.loads((run / "summary.json").read_text())["env_steps_per_s"])
        rows.append({"method": method, "anchor": arm == "qmix", "task": ARMS[arm][0],
                     "extra": {"part": "exploration", "curves": curves, "env_steps_per_s": speeds}})  # fmt: skip
        print(arm, "env steps/s per seed", [round(v, 1) for v in speeds])
    print(plot_exploration(rows, path))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("arms", nargs="*", help=f"any of {', '.join(ARMS)}")
    parser.add_argument("--plot", type=Path, help="only draw the kept fim and qmix runs' curves to this PNG")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if args.plot:
        return plot_kept(args.plot)
    if not args.arms or set(args.arms) - set(ARMS):
        parser.error(f"name one or more arms of {', '.join(ARMS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    jobs = [(a, s) for a in args.arms for s in range(args.seeds)]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(job, *zip(*jobs, strict=True)))
    for arm in args.arms:
        rows = [r for r in results if r["arm"] == arm]
        (OUT / f"{arm}.json").write_text(json.dumps(rows, indent=1))
        for r in rows:
            print(arm, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                        if k not in ("run_dir", "focus")})  # fmt: skip


if __name__ == "__main__":
    main()
