"""Cooperative multi-agent RL: a compact PyMARL-style value-decomposition core (environments, episode replay,
shared GRU agents, VDN and QMIX, TD(lambda), double-Q, a lockstep episode runner with method hooks) and MAPPO, an
on-policy actor-critic on the same environments, runner and episode storage."""

from leantrain.marl.controller import EpsilonSchedule, MultiAgentController, epsilon_greedy, greedy, sample_policy
from leantrain.marl.env import EnvInfo, MultiAgentEnv, Observation, Step
from leantrain.marl.envs import make_env
from leantrain.marl.episodes import EpisodeBatch, EpisodeRecorder, EpisodeRollout, ReplayBuffer
from leantrain.marl.learner import Learner, LearnerConfig, QLearner
from leantrain.marl.mappo import MappoConfig, MappoLearner
from leantrain.marl.matrix_games import MatrixGame, make_matrix_game
from leantrain.marl.networks import QMixer, RNNAgent, VDNMixer
from leantrain.marl.runner import EpisodeRunner
from leantrain.marl.targets import gae_advantages, td_lambda_targets

__all__ = [
    "EnvInfo", "EpisodeBatch", "EpisodeRecorder", "EpisodeRollout", "EpisodeRunner", "EpsilonSchedule", "Learner",
    "LearnerConfig", "MappoConfig", "MappoLearner", "MatrixGame", "MultiAgentController", "MultiAgentEnv",
    "Observation", "QLearner", "QMixer", "RNNAgent", "ReplayBuffer", "Step", "VDNMixer", "epsilon_greedy",
    "gae_advantages", "greedy", "make_env", "make_matrix_game", "sample_policy", "td_lambda_targets",
]  # fmt: skip
