"""The cost part of `bench finetune`: equal trainable counts, exact saved-activation bytes, and the quick path end to
end (run_bench with its fresh worker processes) on a tiny Llama standing in for SmolLM2-135M."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from leantrain.bench import finetune, finetune_cost  # noqa: E402
from leantrain.bench.finetune_cost import COST_SETTINGS, MAIN_SETTING, measure  # noqa: E402

HIDDEN, MLP, LAYERS, SEQ = 64, 128, 2, 16


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A Llama with SmolLM2's module names (grouped-query attention: k/v narrower than q), saved as an HF folder."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_lora_and_paca_train_the_same_count_on_smollm2():
    main, qv = COST_SETTINGS[MAIN_SETTING], COST_SETTINGS["qv"]
    assert main.smollm2_trainable("lora") == main.smollm2_trainable("paca") == 8_242_560
    assert qv.smollm2_trainable("lora") == qv.smollm2_trainable("paca") == 460_800
    assert len(main.targets) == 7 and (main.batch, main.seq_len) == (1, 512)


def test_worker_counts_parameters_and_saved_bytes(tiny_llama):
    setting = COST_SETTINGS[MAIN_SETTING]
    d, kv = HIDDEN, HIDDEN // 2  # k/v: 2 of 4 heads
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, MLP), (d, MLP), (MLP, d)]  # q k v o gate up down
    out = {m: measure(setting, m, steps=1, warmup=1, model_name=tiny_llama, seq_len=SEQ) for m in ("lora", "paca")}
    assert out["lora"]["trainable_params"] == LAYERS * sum(setting.lora_r * (i + o) for i, o in shapes)
    assert out["paca"]["trainable_params"] == LAYERS * sum(setting.paca_r * o for _, o in shapes)
    # PaCA keeps only x[..., S] per adapted layer: tokens x r fp32 values, nothing else
    assert out["paca"]["saved_in_adapted_layers_mb"] * 2**20 == 7 * LAYERS * SEQ * setting.paca_r * 4
    assert out["paca"]["saved_activation_mb"] < out["lora"]["saved_activation_mb"]
    assert all(len(r["step_times_s"]) == 1 and r["peak_rss_mb"] > 0 for r in out.values())


def test_quick_path_end_to_end(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(finetune_cost, "COST_MODEL", tiny_llama)
    path = finetune.run_bench(True, tmp_path, parts=("cost", "profile"))
    doc = json.loads(path.read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert set(rows) == {"lora", "paca", "full"} and doc["complete"]
    assert all(r["extra"]["seq_len"] == finetune_cost.QUICK_PLAN.seq_len for r in rows.values())
    assert all(r["extra"]["steps_timed"] == finetune_cost.QUICK_PLAN.steps for r in rows.values())
    assert set(doc["targets"]) >= {"paca_step_time<=0.85*lora", "paca_peak_mem<=0.9*lora"}
    printed = capsys.readouterr().out
    assert "PaCA / LoRA" in printed and "Profile, all-linear paca (one step), by self CPU memory" in printed
    top = rows["paca"]["extra"]["profile"]["by_time"]
    assert 0 < len(top) <= finetune.PROFILE_ROWS and top[0]["self_cpu_ms"] >= top[-1]["self_cpu_ms"]
