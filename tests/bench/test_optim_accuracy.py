"""bench optim --part accuracy: equal wall-clock budgets and the row assembly (runs replaced by a stub)."""

from leantrain.bench import optim


def test_equal_time_steps_charge_lwsam_warmup_at_sgd_cost():
    ratios = {"sgd": 1.0, "sam": 2.0, "lwsam": 1.2}
    # 30 warm-up steps at 1.0 + 252 steps at 1.2 = 332.4 SGD steps
    assert optim.equal_time_steps(282, 30, ratios, "sgd") == 332
    assert optim.equal_time_steps(282, 30, ratios, "sam") == 166


def test_accuracy_rows_add_equal_time_arms_from_step_time_ratios(monkeypatch):
    calls = []

    def fake_run(recipe, overrides):
        calls.append((recipe, overrides))
        steps = next((int(o.split("=")[1]) for o in overrides if o.startswith("train.max_steps=")), 282)
        seed = int(next(o for o in overrides if o.startswith("seed=")).split("=")[1])
        return {"final": {"test_accuracy": 0.8 + seed / 100}, "steps": steps, "wall_time_s": 1.0,
                "trainable_params": 10, "grad_norm": 0.5}  # fmt: skip

    monkeypatch.setattr(optim, "_accuracy_run", fake_run)
    rows = optim.accuracy_rows(2, False, log=lambda m: None, methods=("sgd", "sam", "lwsam"), workers=0,
                               ratios={"sgd": 1.0, "sam": 2.0, "lwsam": 1.2})  # fmt: skip
    by = {r["method"]: r for r in rows}
    assert set(by) == {"sgd", "sam", "lwsam", "sam-equal-time", "sgd-equal-time"}
    assert by["sam-equal-time"]["extra"]["steps"] == 166 and by["sgd-equal-time"]["extra"]["steps"] == 332
    assert by["lwsam"]["metric"] == 0.805 and by["lwsam"]["seeds"] == 2
    assert all("threads=1" in o for _, o in calls)
    met = optim.targets([], rows)
    assert met["lwsam_acc>=sam-0.5pt"] and met["lwsam_acc>=sgd"]


def test_without_step_times_no_equal_time_arms(monkeypatch):
    monkeypatch.setattr(
        optim,
        "_accuracy_run",
        lambda recipe, overrides: {
            "final": {"test_accuracy": 0.8},
            "steps": 10,
            "wall_time_s": 1.0,
            "trainable_params": 1,
            "grad_norm": 0.1,
        },
    )
    rows = optim.accuracy_rows(1, True, log=lambda m: None, methods=("lwsam",), workers=0, ratios=None)
    assert [r["method"] for r in rows] == ["lwsam"]
