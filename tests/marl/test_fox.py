"""FoX: formation keys, visit counts, the rewards in the TD target, the VAE, the recipe (mechanics, not results)."""

import copy
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from leantrain.errors import ConfigError
from leantrain.marl import EpisodeRunner, MultiAgentController, make_env
from leantrain.marl.env import EnvInfo, MultiAgentEnv, Observation, Step
from leantrain.marl.fox import FoxAgent, FoxConfig, FoxLearner
from leantrain.marl.fox_formation import formation_key, formation_projection, visit_bonus
from leantrain.marl.learner import LearnerConfig
from leantrain.marl.targets import td_lambda_targets

needs_mpe = pytest.mark.skipif(find_spec("mpe2") is None, reason="needs the marl extras (mpe2)")


class Walkers(MultiAgentEnv):
    """Agents on a line (observation: own position, a constant); move -1, 0, +1; reward 1 once all meet."""

    def __init__(self, n: int = 3, limit: int = 6):
        self.info = EnvInfo(n, 3, 2, 2 * n, limit)

    def _observation(self) -> Observation:
        obs = np.stack([self.pos, np.ones_like(self.pos)], -1).astype(np.float32)
        return Observation(obs, obs.reshape(-1).copy(), np.ones((self.info.n_agents, 3), bool))

    def reset(self, seed=None):
        self.pos, self.t = np.random.default_rng(seed).integers(-3, 4, self.info.n_agents).astype(float), 0
        return self._observation()

    def step(self, actions):
        self.pos += np.asarray(actions) - 1
        self.t += 1
        met = bool(np.ptp(self.pos) == 0)
        return Step(self._observation(), float(met), met, self.t >= self.info.episode_limit and not met, {})


def _learner(fox: FoxConfig, n_envs: int = 8, seed: int = 0):
    envs = [Walkers() for _ in range(n_envs)]
    torch.manual_seed(seed)
    mac = MultiAgentController(envs[0].info, hidden=16)
    learner = FoxLearner(mac, LearnerConfig(td_lambda=0.0), fox, seed=seed)
    runner = EpisodeRunner(envs, mac, seed=seed)
    learner.attach(runner)
    return learner, runner


def test_the_formation_key_is_invariant_to_the_order_of_the_other_agents():
    rng = np.random.default_rng(0)
    projection = formation_projection(5, kind="gaussian", seed=1)
    for decimals in (0, 1, 3):
        obs = np.round(rng.normal(size=(5, 5)), 1)
        obs[3] = obs[1] + np.array([0.0, 0, 0, 0, 1e-3])  # near-ties at the rounded distance
        features, far, near = formation_key(obs, projection, decimals)
        assert features.shape == (20,) and (far != np.arange(5)).all() and (near != np.arange(5)).all()
        for _ in range(10):
            order = rng.permutation(5)  # every agent's part of the key moves with it, whatever the others' order
            moved, _, _ = formation_key(obs[order], projection, decimals)
            np.testing.assert_array_equal(moved.reshape(5, 4), features.reshape(5, 4)[order])
    # and the key does change with the formation
    assert not np.array_equal(formation_key(obs * 2, projection, 1)[0], formation_key(obs, projection, 1)[0])


def test_the_visit_bonus_decreases_strictly_with_visits_and_is_shifted_below_zero():
    visits = torch.arange(1.0, 11.0)[None]
    bonus = visit_bonus(visits, torch.ones_like(visits))[0]
    assert (bonus[1:] < bonus[:-1]).all() and bonus.max() == 0
    torch.testing.assert_close(bonus, visits[0].rsqrt() - 1.0)
    padded = visit_bonus(torch.tensor([[4.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    assert padded[0, 0] == 0  # the maximum is taken over real steps only


def test_formations_are_counted_in_training_episodes_only():
    learner, runner = _learner(FoxConfig())
    batch, stats = runner.run(epsilon=1.0)
    counts = learner.counter.counts
    assert sum(counts.values()) == stats.steps  # one count per environment step taken
    visits = batch["step_fox_visit"][..., 0]
    assert (visits[batch["filled"] > 0] >= 1).all() and (visits[batch["filled"] == 0] == 0).all()
    before = dict(counts)
    test_batch, _ = runner.run(epsilon=0.0, test=True)
    assert counts == before and (test_batch["step_fox_visit"] == 0).all()
    # the recorded count is the count right after the visit: revisits of a formation count up
    again, _ = runner.run(epsilon=1.0)
    assert sum(counts.values()) == sum(before.values()) + int(again["filled"].sum())


def test_the_visit_bonus_and_the_formation_reward_reach_the_td_target():
    learner, runner = _learner(FoxConfig(beta1=0.0, beta2=0.0))
    batch, _ = runner.run(epsilon=1.0)
    batch = batch.trimmed()
    filled = batch["filled"]

    def targets(beta1: float, beta2: float) -> torch.Tensor:
        other = copy.deepcopy(learner)
        other.fox = FoxConfig(beta1=beta1, beta2=beta2)
        torch.manual_seed(5)  # the same encoder samples in the Q heads of every copy
        return other.td_loss(batch)[1]["targets"]

    base = targets(0.0, 0.0)
    visit = targets(0.5, 0.0) - base  # one-step targets: the difference is the bonus itself
    expected = 0.5 * visit_bonus(batch["step_fox_visit"][..., 0], filled) * filled
    torch.testing.assert_close(visit, expected)
    assert (visit[filled > 0] < 0).any()
    form = targets(0.0, 1.0) - base
    n = learner.mac.info.n_agents
    real = form[filled > 0]
    assert (real <= 1e-6).all() and (real >= -n - 1e-6).all() and real.abs().max() > 0 and real.std() > 0
    assert (form[filled == 0] == 0).all()
    # the learner's TD(lambda) path reads the same rewards
    lam = copy.deepcopy(learner)
    lam.config = LearnerConfig(td_lambda=0.6)
    lam.fox = FoxConfig(beta1=0.5, beta2=0.0)
    torch.manual_seed(5)
    y = lam.td_loss(batch)[1]["targets"]
    torch.manual_seed(5)
    lam.fox = FoxConfig(beta1=0.0, beta2=0.0)
    y0 = lam.td_loss(batch)[1]["targets"]
    zero = torch.zeros(batch["reward"].shape[0], batch["reward"].shape[1] + 1)
    torch.testing.assert_close(y - y0, td_lambda_targets(expected, batch["terminated"], filled, zero, 0.99, 0.6))


@pytest.mark.parametrize("gradient", ["paper", "code"])
def test_the_vae_training_lowers_its_loss_on_a_fixed_batch(gradient):
    learner, runner = _learner(FoxConfig(encoder_gradient=gradient))
    batch, _ = runner.run(epsilon=1.0)
    batch = batch.trimmed()
    hidden = learner.histories(batch)
    args = (batch["step_fox_formation"], batch["step_fox_far"], batch["step_fox_near"], batch["filled"])
    torch.manual_seed(0)
    losses = [learner.vae.fit(hidden, *args, np.random.default_rng(k), updates=25) for k in range(3)]
    assert losses[-1] < 0.5 * losses[0]


def test_the_learner_updates_every_part_and_penalises_the_local_heads():
    learner, runner = _learner(FoxConfig())
    agent = learner.mac.agent
    assert isinstance(agent, FoxAgent) and isinstance(learner.target_mac.agent, FoxAgent)
    assert not {id(p) for p in agent.encoder.parameters()} & {id(p) for p in learner.params}
    parts = {"local": agent.local, "formation_head": agent.formation_head, "encoder": agent.encoder,
             "decoder": learner.vae.decoder, "history": learner.vae.history_decoder}  # fmt: skip
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in parts.items()}
    for _ in range(2):
        batch, _ = runner.run(epsilon=1.0)
        stats = learner.train(batch, 8)
    for name, module in parts.items():
        assert any(not torch.equal(p, q) for p, q in zip(module.parameters(), before[name], strict=True)), name
    assert {"loss_td", "loss_local_l1", "visit_reward", "formation_reward", "vae_loss", "formations"} <= set(stats)
    assert stats["loss"] == pytest.approx(stats["loss_td"] + 0.1 * stats["loss_local_l1"], rel=1e-5)
    state = learner.training_state()
    restored, _ = _learner(FoxConfig(), seed=3)
    restored.load_training_state(state)
    assert restored.counter.counts == learner.counter.counts and restored.vae.normalizer_max > 0


def test_fox_config_is_validated():
    with pytest.raises(ConfigError, match="beta1"):
        FoxConfig(beta1=-1)
    with pytest.raises(ConfigError, match="projection"):
        FoxConfig(projection="sparse")
    with pytest.raises(ConfigError, match="encoder_gradient"):
        FoxConfig(encoder_gradient="both")


@needs_mpe
def test_the_sparse_spread_rewards_only_full_coverage():
    env = make_env("mpe:simple_spread", n_agents=2, sparse_radius=0.3)
    returns = []
    rng = np.random.default_rng(0)
    for seed in range(40):
        env.reset(seed=seed)
        total = 0.0
        for _ in range(25):
            step = env.step(rng.integers(5, size=2))
            total += step.reward
            assert step.reward == float(step.terminated) == float(env.covered())
            if step.terminated or step.truncated:
                break
        returns.append(total)
    assert set(returns) <= {0.0, 1.0} and 0 < sum(returns) < 40
    with pytest.raises(ConfigError, match="sparse_radius"):
        make_env("mpe:simple_spread", sparse_radius=0.0)


@needs_mpe
@pytest.mark.parametrize("recipe", ["fox-sparse-spread", "qmix-sparse-spread"])
def test_the_recipes_run_end_to_end(recipe, tmp_path):
    from leantrain.config import resolve
    from leantrain.marl.learners import LEARNERS
    from leantrain.runs.launch import run

    assert "fox" in LEARNERS
    small = ["marl.max_steps=300", "marl.eval_every=300", "marl.test_episodes=2", "marl.batch_episodes=4",
             "marl.n_envs=2", "progress=none", f"output_dir={tmp_path}"]  # fmt: skip
    if recipe.startswith("fox"):
        small.append("marl.method_options={reward_samples: 4, vae_updates: 5}")
    cfg = resolve(recipe, small)
    result = run(cfg)
    assert result.summary["t_env"] >= 300 and result.summary["updates"] > 0
    assert result.summary["algo"] == ("fox" if recipe.startswith("fox") else "qmix")
    fox, qmix = resolve("fox-sparse-spread", []).marl, resolve("qmix-sparse-spread", []).marl
    differ = {k for k in vars(fox) if getattr(fox, k) != getattr(qmix, k)}
    assert differ == {"algo", "method_options"}  # the anchor differs in the learner only
