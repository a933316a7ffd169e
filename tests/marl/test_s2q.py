"""S2Q: K = 0 is QMIX; the full learner trains, suppresses and selects (mechanics, not results)."""

import numpy as np
import torch

from leantrain.marl import EpisodeRunner, MultiAgentController, ReplayBuffer, make_matrix_game
from leantrain.marl.learner import LearnerConfig, QLearner
from leantrain.marl.s2q import S2QConfig, S2QLearner


def _batch(seed=0):
    envs = [make_matrix_game("climbing") for _ in range(8)]
    torch.manual_seed(seed)
    mac = MultiAgentController(envs[0].info)
    batch, _ = EpisodeRunner(envs, mac, seed=seed).run(epsilon=1.0)
    return envs[0].info, batch


def test_s2q_with_k0_is_qmix():
    info, batch = _batch()
    config = LearnerConfig(td_lambda=0.6, optimizer="adam", lr=1e-3)
    torch.manual_seed(1)
    qmix = QLearner(MultiAgentController(info), config)
    torch.manual_seed(1)
    s2q = S2QLearner(MultiAgentController(info), config, S2QConfig(k=0))
    for _ in range(3):
        a, b = qmix.train(batch, 8), s2q.train(batch, 8)
        assert a["loss"] == b["loss"]
    for p, q in zip(qmix.mac.parameters(), s2q.mac.parameters(), strict=True):
        assert torch.equal(p, q)


def test_s2q_trains_every_part_and_its_behaviour_hook_acts_validly():
    info, batch = _batch()
    torch.manual_seed(0)
    mac = MultiAgentController(info)
    learner = S2QLearner(mac, LearnerConfig(td_lambda=0.6, optimizer="adam", lr=1e-3), S2QConfig(k=2))
    modules = {"sub2": learner.subs[1], "central": learner.central_agent, "selector": learner.selector}
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in modules.items()}
    stats = learner.train(batch, 8)
    assert {"loss_central", "loss_sub1", "loss_sub2", "loss_sub3", "loss_latent"} <= set(stats)
    for name, module in modules.items():
        assert any(not torch.equal(p, q) for p, q in zip(module.parameters(), before[name], strict=True)), name
    envs = [make_matrix_game("climbing") for _ in range(16)]
    runner = EpisodeRunner(envs, mac, seed=0)
    runner.action_hook = learner.behaviour_hook(runner, seed=0)
    batch, stats = runner.run(epsilon=0.0)
    assert len(stats.returns) == 16 and set(np.unique(batch["actions"].numpy())) <= {0, 1, 2}
    sd = learner.state_dict()
    assert {"sub2_mac", "sub3_mac", "central_agent", "central_mixer", "selector"} <= set(sd)
    buffer = ReplayBuffer(32)
    buffer.insert(batch)
    assert len(buffer) == 16
