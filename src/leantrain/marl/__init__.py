"""Cooperative multi-agent RL: a compact PyMARL-style value-decomposition core (environments, episode replay,
shared GRU agents, VDN and QMIX, TD(lambda), double-Q, a lockstep episode runner with method hooks)."""

from leantrain.marl.controller import EpsilonSchedule, MultiAgentController, epsilon_greedy, greedy
from leantrain.marl.env import EnvInfo, MultiAgentEnv, Observation, Step
from leantrain.marl.envs import make_env
from leantrain.marl.episodes import EpisodeBatch, EpisodeRecorder, ReplayBuffer
from leantrain.marl.learner import LearnerConfig, QLearner
from leantrain.marl.matrix_games import MatrixGame, make_matrix_game
from leantrain.marl.networks import QMixer, RNNAgent, VDNMixer
from leantrain.marl.runner import EpisodeRunner
from leantrain.marl.targets import td_lambda_targets

__all__ = [
    "EnvInfo", "EpisodeBatch", "EpisodeRecorder", "EpisodeRunner", "EpsilonSchedule", "LearnerConfig",
    "MatrixGame", "MultiAgentController", "MultiAgentEnv", "Observation", "QLearner", "QMixer", "RNNAgent",
    "ReplayBuffer", "Step", "VDNMixer", "epsilon_greedy", "greedy", "make_env", "make_matrix_game",
    "td_lambda_targets",
]  # fmt: skip
