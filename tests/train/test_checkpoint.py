import torch
from torch import nn

from leantrain.train.checkpoint import list_checkpoints, load_checkpoint, pack_state, save_checkpoint, unpack_state


def test_pack_state_round_trips_nested_optimizer_state():
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors: dict = {}
    packed = pack_state(opt.state_dict(), tensors)
    restored = unpack_state(packed, tensors)
    original = opt.state_dict()
    assert set(restored["state"]) == {0, 1}  # int keys survive JSON
    for idx in (0, 1):
        for key, value in original["state"][idx].items():
            assert torch.equal(restored["state"][idx][key], value)
    assert restored["param_groups"] == original["param_groups"]


class _Tied(nn.Module):
    """Two layers sharing one weight, like an LM's embedding and head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)
        self.mix = nn.Linear(3, 3, bias=False)
        self.mix.weight = self.inp.weight

    def forward(self, x):
        return self.out(self.mix(self.inp(x)))


def _tied() -> nn.Module:
    return _Tied()


def test_save_load_restores_model_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = _tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path, model, opt, {"step": 7, "epoch": 0})
    expected_next = torch.rand(3)

    other = _tied()
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    meta = load_checkpoint(path, other, other_opt)
    assert meta["step"] == 7
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(
        opt.state_dict()["state"][0]["momentum_buffer"], other_opt.state_dict()["state"][0]["momentum_buffer"]
    )
    assert torch.equal(torch.rand(3), expected_next)  # the RNG continues where the checkpoint was taken


def test_keeps_only_recent_and_ignores_incomplete(tmp_path):
    model = nn.Linear(2, 2)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, None, {"step": step}, keep=2)
    (tmp_path / ".tmp-step-00000009").mkdir()  # an interrupted write
    (tmp_path / "step-00000010").mkdir()  # no state.json: incomplete
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]


def test_a_torn_metrics_line_does_not_block_resume(tmp_path):
    from leantrain.train.metric_loggers import JsonlLogger, read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"split": "train", "step": 5}\n{"split": "train", "step": 10}\n{"split": "tr')  # killed mid-write
    JsonlLogger(path, drop_after=5).close()
    assert read_jsonl(path) == [{"split": "train", "step": 5}]
