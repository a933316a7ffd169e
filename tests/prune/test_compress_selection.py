"""`select="auto"` keeps the selection whose recovered model does best on held-out calibration text; text sources
split into disjoint fit / validation / held-out streams."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_depth import batches, tiny_llama  # noqa: E402

from leantrain.errors import ConfigError  # noqa: E402
from leantrain.prune.compress import AUTO_CANDIDATES, compress_model, perplexity, source_streams  # noqa: E402
from leantrain.prune.compress_args import TextSource  # noqa: E402


def test_auto_keeps_the_candidate_with_the_lowest_validation_perplexity():
    model = tiny_llama()
    with torch.no_grad():  # blocks 2 and 3 near-identities: a contiguous run the selectors can disagree about
        for i in (2, 3):
            model.model.layers[i].mlp.down_proj.weight.mul_(0.01)
    validation = batches(2, seed=9)
    result = compress_model(model, batches(8), 2, select="auto", recover="ghosted", validation=validation)
    scores = result.selection["auto"]["candidates"]
    assert set(scores) == set(AUTO_CANDIDATES) and result.selection["auto"]["chosen"] == result.select
    best = min(scores.values(), key=lambda c: c["validation_perplexity"])
    assert result.removed == best["removed"] and result.select in AUTO_CANDIDATES
    # the kept model is the one that scored: its validation perplexity is the best candidate's
    assert perplexity(result.model, validation) == pytest.approx(best["validation_perplexity"], rel=1e-6)


def test_auto_needs_validation_text():
    with pytest.raises(ConfigError, match="needs validation batches"):
        compress_model(tiny_llama(), batches(8), 2, select="auto")


class CharTokenizer:
    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) % 64 for c in text] for text in texts]}


def test_a_file_splits_into_disjoint_fit_validation_and_held_out_streams(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("".join(chr(65 + i % 26) for i in range(1000)))
    fit, validation, held_out = source_streams(TextSource(file=path), CharTokenizer(), 100)
    assert (len(fit), len(validation), len(held_out)) == (800, 100, 100)
    with pytest.raises(ConfigError, match="has 1,000 tokens; its last 600 are held out"):
        source_streams(TextSource(file=path), CharTokenizer(), 600)


def test_an_unsupported_family_is_refused_before_anything_changes():
    cfg = transformers.GemmaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=4)  # fmt: skip
    model = transformers.GemmaForCausalLM(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="not model_type 'gemma'; use recover='none'"):
        compress_model(model, batches(8), 2, select="shortgpt", recover="ghosted")
    assert len(model.model.layers) == 6 and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    pruned = compress_model(model, batches(8), 2, select="shortgpt", recover="none").model
    assert len(pruned.model.layers) == 4 and pruned(torch.randint(0, 64, (1, 8))).logits.shape == (1, 8, 64)


def test_compress_model_streams_calibration_and_matches_held_states():
    from leantrain.prune.depth import boundary_states

    for select in ("shortgpt", "streamline", "lorp"):
        streamed = compress_model(tiny_llama(), batches(8), 3, select=select)
        held = compress_model(tiny_llama(), boundary_states(tiny_llama(), batches(8)), 3, select=select)
        assert streamed.removed == held.removed
        x = torch.randint(0, 64, (2, 9))
        torch.testing.assert_close(streamed.model(x).logits, held.model(x).logits, rtol=1e-5, atol=1e-5)
