"""Depth pruning on tiny random Llama models: boundary states, similarity, removal, LoRP and its baselines."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from leantrain.errors import ConfigError  # noqa: E402
from leantrain.prune.depth import boundary_states, layer_similarity, remove_layers  # noqa: E402
from leantrain.prune.lorp import (  # noqa: E402
    allocate,
    clusters_for_rls,
    lorp_from_similarity,
    representation_locality_score,
    select_layers_last_n,
    select_layers_lorp,
    select_layers_shortgpt,
    select_layers_streamline,
)


def tiny_llama(layers=8, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def batches(n=4, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (2, length), generator=g)} for _ in range(n)]


def test_removing_zero_layers_changes_nothing():
    model, ref = tiny_llama(), tiny_llama()
    x = torch.randint(0, 64, (2, 12))
    remove_layers(model, [])
    assert model.config.num_hidden_layers == 8
    torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=0)


def test_a_pruned_model_generates_with_its_cache_and_round_trips(tmp_path):
    model = tiny_llama()
    remove_layers(model, [2, 3, 5])
    assert model.config.num_hidden_layers == 5 and len(model.model.layers) == 5
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3, 4]
    x = torch.randint(0, 64, (1, 6))
    cached = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (1, 14) and torch.equal(cached, uncached)
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is transformers.LlamaForCausalLM and again.config.num_hidden_layers == 5
    torch.testing.assert_close(again(x).logits, model(x).logits)


def test_remove_layers_refuses_bad_indices():
    with pytest.raises(ConfigError, match="protected"):
        remove_layers(tiny_llama(), [0, 3])
    with pytest.raises(ConfigError, match="protected"):
        remove_layers(tiny_llama(), [7])
    with pytest.raises(ConfigError, match="out of range"):
        remove_layers(tiny_llama(), [8])
    with pytest.raises(ConfigError, match="all 8"):
        remove_layers(tiny_llama(), range(8), protect=())
    assert remove_layers(tiny_llama(), [0], protect=()).config.num_hidden_layers == 7


def test_boundary_states_and_similarity():
    model = tiny_llama()
    states = boundary_states(model, batches())
    assert len(states.states) == 9 and states.tokens == 4 * 2 * 16
    x = batches()[0]["input_ids"]
    out = model(x, output_hidden_states=True)
    torch.testing.assert_close(states.states[0][:32], out.hidden_states[0].reshape(-1, 16))
    torch.testing.assert_close(states.states[3][:32], out.hidden_states[3].reshape(-1, 16))
    s = layer_similarity(states)
    # streamed batch by batch (one batch of activations held) vs from the held states: the same sums in another order
    torch.testing.assert_close(s, layer_similarity(model, batches()), rtol=0, atol=1e-12)
    assert s.shape == (8, 8)
    torch.testing.assert_close(s, s.T, rtol=0, atol=0)
    assert torch.equal(s.diagonal(), torch.ones(8, dtype=torch.float64))
    assert (s.abs() <= 1 + 1e-9).all()


def test_padding_tokens_are_left_out():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    states = boundary_states(model, [{"input_ids": ids, "attention_mask": mask}])
    assert states.tokens == 16


def test_rls_and_cluster_count():
    s = torch.full((6, 6), 0.5).fill_diagonal_(1.0)
    assert representation_locality_score(s) == pytest.approx(1.0)
    assert [clusters_for_rls(r) for r in (1.2, 1.0, 0.8, 0.7, 0.69)] == [2, 2, 3, 3, 4]


def test_allocation_on_a_hand_made_similarity():
    # two phases: layers 0-4 very alike (0.9), 5-9 less (0.6), 0.1 across; protected 0 and 9
    s = torch.full((10, 10), 0.1, dtype=torch.float64)
    s[:5, :5], s[5:, 5:] = 0.9, 0.6
    for j in (1, 2, 3):
        s[4, j] = s[j, 4] = 0.95  # layer 4 is the most redundant member of phase 0; 1, 2, 3 tie next
    s.fill_diagonal_(1.0)
    labels = [0] * 5 + [1] * 5
    # stage 1: the top candidate of each cluster in depth order (ties: lower index)
    assert allocate(labels, s, 1, (0, -1)) == [4]
    assert allocate(labels, s, 2, (0, -1)) == [4, 5]
    # stage 2: phase 0's remaining members are more alike (0.9 > 0.6), so it gives the next ones
    assert allocate(labels, s, 4, (0, -1)) == [1, 2, 4, 5]
    sel = lorp_from_similarity(s, 3)
    assert sel.num_clusters == 2 and sel.labels == labels  # spectral clustering finds the two phases
    assert sel.rls == pytest.approx(representation_locality_score(s))


@pytest.mark.parametrize("seed", range(5))
def test_selectors_never_pick_protected_layers_and_hit_the_budget(seed):
    model = tiny_llama(seed=seed)
    states = boundary_states(model, batches(seed=seed))
    for k in range(0, 7):
        for chosen in (select_layers_lorp(model, states, k).indices, select_layers_streamline(model, states, k)[0],
                       select_layers_last_n(model, k)):  # fmt: skip
            assert len(chosen) == k == len(set(chosen)) and not {0, 7} & set(chosen)
        if k <= 5:  # ShortGPT's official candidates: blocks 1 .. N-3
            chosen = select_layers_shortgpt(model, states, k)
            assert len(chosen) == k == len(set(chosen)) and not {0, 6, 7} & set(chosen)
    with pytest.raises(ConfigError, match="cannot remove 6 of 8"):
        select_layers_shortgpt(model, states, 6)
    assert select_layers_last_n(model, 3) == [4, 5, 6]
    with pytest.raises(ConfigError, match="cannot remove 7 of 8"):
        select_layers_lorp(model, states, 7)
    assert select_layers_lorp(model, states, 2, protect=(0,)).indices  # protection is configurable


def test_shortgpt_removes_the_least_influential_blocks():
    model = tiny_llama()
    with torch.no_grad():  # make blocks 3 and 5 (almost) the identity: zero attention and MLP outputs
        for i in (3, 5):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    assert select_layers_shortgpt(model, batches(), 2) == [3, 5]


def test_shortgpt_never_takes_the_second_to_last_block_unless_asked():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[6].self_attn.o_proj.weight.zero_()
        model.model.layers[6].mlp.down_proj.weight.zero_()
    states = boundary_states(model, batches())
    assert 6 not in select_layers_shortgpt(model, states, 1)
    assert select_layers_shortgpt(model, states, 1, protect=(0, -1)) == [6]


def test_streamline_removes_the_most_redundant_contiguous_run():
    model = tiny_llama()
    with torch.no_grad():  # blocks 4 and 5 the identity: the window [4, 6) maps its input to itself
        for i in (4, 5):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    blocks, cosine = select_layers_streamline(model, boundary_states(model, batches()), 2)
    assert blocks == [4, 5] and cosine == pytest.approx(1.0, abs=1e-6)
    assert select_layers_streamline(model, boundary_states(model, batches()), 3)[0] in ([3, 4, 5], [4, 5, 6])
