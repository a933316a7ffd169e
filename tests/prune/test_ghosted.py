"""Ghosted Layers on tiny random Llama models: exactness on linear blocks, baselines, save/load, errors."""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from test_depth import batches, tiny_llama  # noqa: E402

from leantrain.errors import ConfigError  # noqa: E402
from leantrain.prune.depth import boundary_states  # noqa: E402
from leantrain.prune.ghosted import contiguous_gaps, fit_ghosted_layers, fit_operator  # noqa: E402


class LinearBlock(nn.Module):
    """A decoder-block stand-in computing h -> h @ A."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states @ self.a


def test_contiguous_gaps():
    assert contiguous_gaps([7, 2, 3]) == [(2, 3), (7, 7)]
    assert contiguous_gaps([]) == []


@pytest.mark.parametrize("removed", [[3], [2, 3, 4], [2, 5]])
def test_the_operator_is_exact_when_the_removed_blocks_are_linear(removed):
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    for i in removed:
        model.model.layers[i] = LinearBlock(torch.eye(16) + 0.3 * torch.randn(16, 16, generator=g))
    x = torch.randint(0, 64, (2, 12))
    reference = model(x).logits.detach()
    ghosted, report = fit_ghosted_layers(model, removed, batches(8), ridge=1e-10)
    assert ghosted.config.num_hidden_layers == 8 - len(removed)
    assert all(e < 1e-6 for e in report.relative_error)
    assert all(e > 0.1 for e in report.relative_error_none)
    torch.testing.assert_close(ghosted(x).logits, reference, atol=1e-4, rtol=1e-4)


def test_baselines_rank_by_construction_on_the_calibration_data():
    model = tiny_llama()
    states = boundary_states(model, batches(8))
    errors = {}
    for method in ("diag", "symmetric", "ghosted"):
        _, report = fit_ghosted_layers(tiny_llama(), [3, 4], states, method=method)
        errors[method] = report.relative_error[0]
        none = report.relative_error_none[0]
    # ghosted is the least-squares optimum over all operators, symmetric over symmetric ones (diagonals included)
    assert errors["ghosted"] <= errors["symmetric"] + 1e-9 <= errors["diag"] + 2e-9
    assert errors["ghosted"] < none
    w = fit_operator(states.states[3], states.states[5], "symmetric")
    torch.testing.assert_close(w, w.T)
    # the symmetric solution is stationary: perturbing it along any symmetric direction cannot lower the error
    x, y = states.states[3].double(), states.states[5].double()
    e = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    e = (e + e.T) / 2
    base = (x @ w - y).pow(2).sum()
    assert all((x @ (w + t * e) - y).pow(2).sum() >= base for t in (1e-3, -1e-3))
    d = fit_operator(states.states[3], states.states[5], "diag")
    assert torch.equal(d, torch.diag(d.diagonal()))
    _, report = fit_ghosted_layers(tiny_llama(), [3, 4], states, method="ghosted")
    assert 0 < report.antisymmetric_fraction[0] < 1


def test_operator_placement_and_generation():
    model = tiny_llama()
    ghosted, report = fit_ghosted_layers(model, [2, 3, 5], batches(8))
    assert report.gaps == [(2, 3), (5, 5)] and report.placement == {"2": "pre", "3": "pre"}
    assert hasattr(ghosted.model.layers[2], "ghost_pre") and not hasattr(ghosted.model.layers[1], "ghost_pre")
    x = torch.randint(0, 64, (1, 6))
    cached = ghosted.generate(x, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, ghosted.generate(x, max_new_tokens=6, do_sample=False, use_cache=False))


def test_a_gap_at_the_end_acts_on_the_last_surviving_output():
    ghosted, report = fit_ghosted_layers(tiny_llama(), [6, 7], batches(8), protect=(0,))
    assert report.placement == {"5": "post"} and hasattr(ghosted.model.layers[5], "ghost_post")


def test_the_recovered_model_saves_and_reloads(tmp_path):
    ghosted, _ = fit_ghosted_layers(tiny_llama(), [2, 5], batches(8))
    ghosted.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again).__name__ == "GhostedLlamaForCausalLM" and again.config.ghost_placement == {
        "2": "pre",
        "4": "pre",
    }
    x = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(again(x).logits, ghosted(x).logits, rtol=0, atol=0)


def test_method_none_only_removes():
    model, report = fit_ghosted_layers(tiny_llama(), [2, 5], batches(8), method="none")
    assert type(model) is transformers.LlamaForCausalLM and report.placement == {}


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="hold 16 tokens"):
        fit_ghosted_layers(tiny_llama(), [3], [{"input_ids": torch.randint(0, 64, (1, 16))}])
    with pytest.raises(ConfigError, match="protected"):
        fit_ghosted_layers(tiny_llama(), [0, 3], batches(8))
    with pytest.raises(ConfigError, match="out of range"):
        fit_ghosted_layers(tiny_llama(), [9], batches(8))
    with pytest.raises(ConfigError, match="method"):
        fit_ghosted_layers(tiny_llama(), [3], batches(8), method="lstsq")


@pytest.mark.parametrize("method", ["ghosted", "symmetric", "diag"])
def test_the_streamed_fit_equals_the_fit_on_held_states(method):
    """Batches streamed one at a time (only the gaps' boundaries captured, C x C moments summed) give the operator
    the held (N + 1) x T x C states give: the same least-squares problem, summed in another order."""
    held, _ = fit_ghosted_layers(tiny_llama(), [2, 3, 6], boundary_states(tiny_llama(), batches(8)), method=method)
    streamed, report = fit_ghosted_layers(tiny_llama(), [2, 3, 6], batches(8), method=method)
    x = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(streamed(x).logits, held(x).logits, rtol=1e-5, atol=1e-5)
    assert report.tokens == 8 * 2 * 16 and len(report.relative_error) == 2
    assert all(0 <= e < n for e, n in zip(report.relative_error, report.relative_error_none, strict=True))


def test_gap_moments_capture_only_the_boundaries_the_gaps_need():
    from leantrain.prune.depth import boundary_batches
    from leantrain.prune.ghosted import GapMoments, gap_moments

    model = tiny_llama()
    chunks = list(boundary_batches(model, batches(3), wanted={2, 4}))
    assert len(chunks) == 3 and all(set(c) == {2, 4} for c in chunks)  # one batch at a time, two boundaries
    moments = gap_moments(model, batches(3), [(2, 3)])
    states = boundary_states(model, batches(3))
    exact = GapMoments.of(states.states[2], states.states[4])
    torch.testing.assert_close(moments[(2, 3)].gram, exact.gram, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moments[(2, 3)].cross, exact.cross, rtol=1e-12, atol=1e-12)
    w = torch.eye(16, dtype=torch.float64) * 0.5
    direct = (states.states[2].double() @ w - states.states[4].double()).norm().item()
    assert moments[(2, 3)].residual(w) == pytest.approx(direct, rel=1e-9)
