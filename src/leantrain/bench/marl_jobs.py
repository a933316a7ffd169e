"""What the parts of ``leantrain bench marl`` share: one recipe run, the worker pool helpers, and the attack job (a
clean policy, its continuations, every attack of the suite against each), used by :mod:`leantrain.bench.marl` and
:mod:`leantrain.bench.marl_methods`."""

from __future__ import annotations

import json
import os
import statistics
import tempfile

from leantrain.bench.report import progress


def _run(recipe: str, overrides: list[str], seed: int, tmp: str) -> dict:
    from leantrain.config import resolve
    from leantrain.runs.launch import run

    cfg = resolve(recipe, [*overrides, f"seed={seed}", "progress=none", f"output_dir={tmp}"])
    result = run(cfg)
    tests = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"summary": result.summary, "tests": [r for r in tests if r["split"] == "test"]}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _workers(jobs: int) -> int:
    return max(1, min(jobs, 2, os.cpu_count() or 1))


def _in_worker(unit: tuple[str, int, int], fn, *args):
    """``fn(*args)`` with 1 torch thread, as the numbered progress ``unit`` (what, index, total)."""
    import torch

    torch.set_num_threads(1)
    with progress(*unit):
        return fn(*args)


def options_override(recipe: str, **change) -> str:
    """The override ``marl.method_options={...}`` of ``recipe``'s method options with ``change`` applied."""
    from leantrain.config import load_recipe

    options = {**load_recipe(recipe)["marl"]["method_options"], **change}
    return "marl.method_options={" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in options.items()) + "}"


# tasks where a few forced steps can cost: recipes of the clean policy and of WALL, budgets, episodes per condition
ATTACK_TASKS = {
    "lbf-4p": {"qmix": "qmix-lbf-4p", "wall": "wall-lbf-4p", "ibal": "ibal-lbf-4p", "pretrain": 200_000,
               "finetune": 20_000, "episodes": 64},
    "predator-prey": {"qmix": "qmix-predator-prey", "wall": "wall-predator-prey", "pretrain": 150_000,
                      "finetune": 20_000, "episodes": 64},
}  # fmt: skip
ATTACK_QUICK = ["marl.max_steps=300", "marl.eval_every=200", "marl.test_episodes=2", "marl.batch_episodes=4"]


# the continuations of the clean policy each attack job trains (the same steps from the same start), by name
CONTINUATIONS = {
    "vanilla": lambda spec: (spec["qmix"], ["marl.epsilon_start=0.05"]),
    "wall": lambda spec: (spec["wall"], [options_override(spec["wall"], clean_steps=0)]),
    "ibal": lambda spec: (spec["ibal"], []),
}


def continue_and_attack(task: str, seed: int, pretrained: str, continuations: dict, quick: bool, tmp: str) -> tuple:
    """From the clean policy of run folder ``pretrained``, each continuation ({name: (recipe, overrides)}) for the
    task's fine-tuning steps, then each attacked by every condition of the attack suite (the same Wolfpack settings,
    evaluation seed and episodes for all): ({name: run}, {name: {condition: mean return}})."""
    from leantrain.config import load_recipe
    from leantrain.marl.learners import wolfpack_config
    from leantrain.marl.robustness import evaluate_attacks

    spec = ATTACK_TASKS[task]
    quick_args = ATTACK_QUICK if quick else []
    start = [f"marl.pretrained_policy={pretrained}", f"marl.max_steps={spec['finetune']}", *quick_args]
    runs = {name: _run(recipe, [*start, *extra], seed, tmp) for name, (recipe, extra) in continuations.items()}
    options = dict(load_recipe(spec["wall"])["marl"]["method_options"])
    options.pop("clean_steps", None)
    attack = wolfpack_config(options)  # the same attack against every policy
    fit = {"fit_episodes": 8, "fit_updates": 2} if quick else {}
    episodes = 3 if quick else spec["episodes"]
    evals = {name: evaluate_attacks(run["summary"]["run_dir"], episodes=episodes, seed=seed, config=attack, **fit)
             for name, run in runs.items()}  # fmt: skip
    return runs, evals


def _attack_job(task: str, seed: int, quick: bool, policies: tuple[str, ...] = ("vanilla", "wall")) -> dict:
    """Clean QMIX, then from it continuations of the same length (vanilla, WALL, IBAL...), then each attacked by
    every condition of the attack suite."""
    spec = ATTACK_TASKS[task]
    with tempfile.TemporaryDirectory() as tmp:
        qmix = _run(spec["qmix"], [f"marl.max_steps={spec['pretrain']}", *(ATTACK_QUICK if quick else [])], seed, tmp)
        continuations = {policy: CONTINUATIONS[policy](spec) for policy in policies}
        runs, evals = continue_and_attack(task, seed, qmix["summary"]["run_dir"], continuations, quick, tmp)
    curve = [(r["t_env"], r["return_mean"]) for r in qmix["tests"]]
    return {"task": task, "seed": seed, "qmix": qmix["summary"], "qmix_curve": curve, "evals": evals,
            **{name: run["summary"] for name, run in runs.items()}}  # fmt: skip
