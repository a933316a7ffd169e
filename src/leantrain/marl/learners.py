"""MARL learners by name, for recipes: ``marl.algo`` picks a builder registered here.

A builder gets the run config, the agents' controller, the shared learner settings and the training runner, and
returns the learner (installing the runner hooks its method needs: S2Q's behaviour policy, WALL's and IBAL's
attacks, MAPPO's own policy and softmax sampling, the frozen partners of a MAPPO best response).
Register another with :func:`register_learner`; the config accepts every registered name.
"""

from __future__ import annotations

from collections.abc import Callable

from leantrain.errors import ConfigError
from leantrain.registry import Registry

LearnerBuilder = Callable[..., object]  # (cfg, mac, learner_config, runner) -> learner
LEARNERS: Registry[LearnerBuilder] = Registry("MARL learner")
register_learner = LEARNERS.register


@register_learner("qmix")
@register_learner("vdn")
def _value_decomposition(cfg, mac, lc, runner):
    """Plain value decomposition; the mixer (``marl.mixer``) is what makes it QMIX or VDN."""
    from leantrain.marl.learner import QLearner

    return QLearner(mac, lc)


@register_learner("s2q")
def _s2q(cfg, mac, lc, runner):
    from leantrain.marl.s2q import S2QConfig, S2QLearner

    learner = S2QLearner(mac, lc, method_options(S2QConfig, cfg))
    runner.action_hook = learner.behaviour_hook(runner, seed=cfg.seed)
    return learner


@register_learner("wall")
def _wall(cfg, mac, lc, runner):
    from leantrain.marl.wall import WALLLearner

    options = dict(cfg.marl.method_options)
    clean_steps = options.pop("clean_steps", 0)
    learner = WALLLearner(mac, lc, wolfpack_config(options), seed=cfg.seed, clean_steps=int(clean_steps))
    learner.attach(runner)
    return learner


@register_learner("ibal")
def _ibal(cfg, mac, lc, runner):
    from leantrain.marl.ibal import IBALConfig, IBALLearner

    learner = IBALLearner(mac, lc, IBALConfig.from_options(dict(cfg.marl.method_options)), seed=cfg.seed)
    learner.attach(runner)
    return learner


def method_options(config_cls, cfg, options: dict | None = None):
    """``marl.method_options`` (or ``options``, what is left of them) as the method's config dataclass; an unknown or
    bad option is a ConfigError."""
    try:
        return config_cls(**(cfg.marl.method_options if options is None else options))
    except TypeError as err:
        raise ConfigError(f"marl.method_options for {cfg.marl.algo}: {err}") from None


@register_learner("fox")
def _fox(cfg, mac, lc, runner):
    """FoX on QMIX: formation counts on the training runner, FoX's agent network, rewards and VAE."""
    from leantrain.marl.fox import FoxConfig, FoxLearner

    learner = FoxLearner(mac, lc, method_options(FoxConfig, cfg), seed=cfg.seed)
    learner.attach(runner)
    return learner


@register_learner("fim")
def _fim(cfg, mac, lc, runner):
    """FIM on QMIX: the replay's states mirrored from the training runner, a forward model and the influence bonus."""
    from leantrain.marl.fim import FimConfig, FimLearner

    learner = FimLearner(mac, lc, method_options(FimConfig, cfg), replay_episodes=cfg.marl.buffer_episodes)
    learner.attach(runner)
    return learner


@register_learner("mappo")
def _mappo(cfg, mac, lc, runner):
    """MAPPO: its own policy controller (``marl.agent``, ``marl.agent_hidden`` and the ``shared`` / ``last_action``
    method options), installed on the training runner with softmax sampling; a centralised critic."""
    from leantrain.marl.mappo import MappoConfig, MappoLearner

    return _build_mappo(MappoLearner, cfg, mac, lc, runner, method_options(MappoConfig, cfg))


@register_learner("mappo-br")
def _mappo_best_response(cfg, mac, lc, runner):
    """MAPPO best response to frozen partners (SBC's and FCP's ego, :mod:`leantrain.marl.partners`): the method
    options ``partners``, ``partner_agent`` and ``partner_actions``, the rest MAPPO's."""
    from leantrain.marl.mappo import MappoConfig
    from leantrain.marl.partners import BestResponseConfig, MappoBestResponse

    options = dict(cfg.marl.method_options)
    partners = BestResponseConfig.pop_from(options)
    mappo = method_options(MappoConfig, cfg, options)
    return _build_mappo(MappoBestResponse, cfg, mac, lc, runner, mappo, partners=partners)


def _build_mappo(learner_cls, cfg, mac, lc, runner, options, **extra):
    from leantrain.marl.mappo import mappo_actor

    m = cfg.marl
    if options.num_mini_batch > m.batch_episodes:
        raise ConfigError(f"marl.method_options for {m.algo}: num_mini_batch={options.num_mini_batch} needs "
                          f"marl.batch_episodes >= it (got {m.batch_episodes}): a minibatch holds whole "
                          "episodes")  # fmt: skip
    learner = learner_cls(mappo_actor(mac.info, m, options), lc, options, seed=cfg.seed, **extra)
    learner.attach(runner)
    return learner


def wolfpack_config(options: dict):
    """The Wolfpack attack's config from ``marl.method_options`` (WALL) or ``leantrain attack``'s options."""
    from leantrain.marl.wolfpack import WolfpackConfig

    try:
        return WolfpackConfig(**options)
    except TypeError as err:
        raise ConfigError(f"marl.method_options for wall: {err}") from None


def build_learner(cfg, mac, lc, runner):
    """The learner ``cfg.marl.algo`` names."""
    return LEARNERS.pick(cfg.marl.algo)(cfg, mac, lc, runner)
