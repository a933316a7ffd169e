import torch
from torch import nn

from leantrain.lowrank import DynamicRankSchedule, LowRankAdapter, training_macs


def test_linear_stack_counts_forward_input_and_weight_gradients():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    cost = training_macs(model, torch.zeros(4, 6))
    assert cost.forward == 6 * 5 + 5 * 3
    assert cost.input_grad == 5 * 3  # the first layer's input is data: no gradient
    assert cost.weight_grad == 6 * 5 + 5 * 3
    assert cost.flops == 2 * (cost.forward + cost.input_grad + cost.weight_grad)


def test_conv_phases_cost_what_the_spec_computes():
    # a 3x3 conv C -> C with r = C/2: low-rank 9Cr + rC = 5C^2 MACs per pixel, dense 9C^2, adapter 14C^2 forward
    c, hw = 8, 5

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    x = torch.zeros(2, c, hw, hw)
    per_pixel = {}
    for phase in ("full", "lowrank", "adapter"):
        m = model()
        DynamicRankSchedule([(0, phase)], rank_ratio=0.5, layers=["2"]).apply(m, 0)
        cost = training_macs(m, x)
        first = 9 * c * c * hw * hw  # layer "0": dense, input is data
        per_pixel[phase] = ((cost.forward - first) // (hw * hw), cost.weight_grad - first, cost.input_grad)
    assert per_pixel["full"][0] == 9 * c * c
    assert per_pixel["lowrank"][0] == 5 * c * c
    assert per_pixel["adapter"][0] == 14 * c * c
    # the adapter's frozen dense kernel needs no weight gradient, only the adapter's factors do
    assert per_pixel["adapter"][1] == 5 * c * c * hw * hw
    assert isinstance(m[2], LowRankAdapter)
