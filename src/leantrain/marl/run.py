"""``leantrain run <marl-recipe>``: multi-agent training with a run folder like any other run.

The recipe's ``marl:`` section picks the environment, the learner and the budget (environment steps). Every
``n_envs`` episodes collected, the learner takes one update on a batch of ``batch_episodes`` sampled from the
replay (once it holds that many); an on-policy learner (``learner.on_policy``: MAPPO) instead updates once on all
the episodes collected since its last update (at least ``batch_episodes``), kept in an
:class:`~leantrain.marl.episodes.EpisodeRollout` in place of the replay, and logs no epsilon. Every ``eval_every``
steps it runs ``test_episodes`` greedy episodes. The run folder holds ``config.yaml``, ``metrics.jsonl``
(``train`` records: t_env, episodes, return, epsilon, loss; ``test`` records: greedy return, and for WALL the
return under the attack), ``summary.json`` and ``model.safetensors`` (the learner's networks, rewritten at every
test) and ``checkpoints/`` (the full state after the latest test, every ``checkpoint_every`` environment steps if
set, and where Ctrl-C stopped the run, which finishes the batch of episodes in flight first): ``leantrain run
resume=<run folder>`` continues exactly, see :mod:`leantrain.marl.checkpoint`; ``marl.pretrained_policy=<run
folder>`` instead starts a new run from its policy, a warm start). With ``marl.snapshot_every`` set, the policy is
also kept every that many environment steps from the start, as ``policies/t_env-<t_env>.safetensors`` (the
partner stages of FCP and SBC populations).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from leantrain.errors import ConfigError, Interrupted


def build(cfg):
    """(training envs, test envs, controller, learner, runner) of a run config's ``marl`` section.

    The controller returned is the learner's (``learner.mac``): a learner may bring its own (MAPPO's policy)."""
    from leantrain.marl.controller import MultiAgentController
    from leantrain.marl.envs import make_env
    from leantrain.marl.learner import LearnerConfig
    from leantrain.marl.learners import build_learner
    from leantrain.marl.matrix_games import EpisodeClock
    from leantrain.marl.runner import EpisodeRunner

    m = cfg.marl
    torch.manual_seed(cfg.seed)
    clock = EpisodeClock()
    envs = [make_env(m.env, m.switch_episode, clock, **m.env_args) for _ in range(m.n_envs)]
    mac = MultiAgentController(envs[0].info, hidden=m.agent_hidden, agent=m.agent)
    lc = LearnerConfig(mixer=m.mixer, gamma=m.gamma, td_lambda=m.td_lambda, lr=m.lr, optimizer=m.optimizer,
                       grad_clip=m.grad_norm_clip, target_update_episodes=m.target_update_episodes)  # fmt: skip
    runner = EpisodeRunner(envs, mac, seed=cfg.seed)
    learner = build_learner(cfg, mac, lc, runner)
    if m.pretrained_policy:
        learner.load_policy(policy_file(m.pretrained_policy))
    test_envs = [make_env(m.env, m.switch_episode, clock, counts=False, **m.env_args) for _ in range(m.n_envs)]
    return envs, test_envs, learner.mac, learner, runner


def policy_file(path: str | Path) -> Path:
    """A run folder's (or a direct) ``model.safetensors``."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"marl.pretrained_policy: no model.safetensors at {path}")
    return file


def run_marl(cfg, run_dir: Path, resume_from: Path | None = None) -> dict:
    from leantrain.marl import checkpoint
    from leantrain.marl.controller import EpsilonSchedule
    from leantrain.marl.envs import make_env
    from leantrain.marl.episodes import EpisodeRollout, ReplayBuffer
    from leantrain.train.checkpoint import load_state_checkpoint, save_state_checkpoint
    from leantrain.train.interrupt import deferred_sigint
    from leantrain.train.metric_loggers import open_metric_loggers
    from leantrain.train.progress import make_progress, start_text

    m = cfg.marl
    started = time.perf_counter()
    envs, test_envs, mac, learner, runner = build(cfg)
    test_runner = type(runner)(test_envs, mac, seed=cfg.seed + 10_007)
    if learner.on_policy:  # every collected episode once: at most batch_episodes - 1 + n_envs are held
        buffer = EpisodeRollout(m.batch_episodes + m.n_envs, seed=cfg.seed)
    else:
        buffer = ReplayBuffer(m.buffer_episodes, seed=cfg.seed)
    epsilon = EpsilonSchedule(m.epsilon_start, m.epsilon_finish, m.epsilon_anneal_steps)
    t_env, episodes, next_test, status, elapsed = 0, 0, 0, "completed", 0.0
    next_checkpoint, next_snapshot = m.checkpoint_every or 0, 0
    train_returns: list[float] = []
    last_stats: dict = {}
    resumed = _resumed_t_env(resume_from)
    logger = open_metric_loggers(run_dir, cfg.log_formats, x_key="t_env", resume_after=resumed)
    start = start_text(run_dir, f"{m.max_steps} environment steps ({m.env}, {m.algo})", resumed)
    progress = make_progress(cfg.progress, m.max_steps, completed=resumed or 0, unit="env step", start=start)

    def make_runner(offset: int):
        """A runner on fresh test environments, seeded ``cfg.seed + offset`` (a learner's extra test conditions)."""
        runner_envs = [make_env(m.env, m.switch_episode, None, counts=False, **m.env_args) for _ in range(m.n_envs)]
        test_envs.extend(runner_envs)
        return type(runner)(runner_envs, mac, seed=cfg.seed + offset)

    extra_runners = learner.evaluation_runners(make_runner)

    def test() -> dict:
        value = test_runner.test_return(m.test_episodes)
        record = {"split": "test", "t_env": t_env, "episodes": episodes, "return_mean": value}
        for name, extra in extra_runners.items():
            record[f"{name}_return_mean"] = extra.test_return(m.test_episodes)
        record.update(learner.test_stats(test_runner))
        logger.log(record)
        progress.message(f"test @ t_env {t_env}: " + "  ".join(f"{k} {record[k]:.4g}" for k in record
                                                                  if k.endswith("return_mean")))  # fmt: skip
        return record

    runners = {"train": runner, "test": test_runner} | extra_runners
    clock = getattr(envs[0], "clock", None)
    last_test: dict | None = None
    if resume_from is not None:
        _, state = load_state_checkpoint(resume_from)
        loop = checkpoint.restore(state, learner, buffer, runners, clock)
        t_env, episodes, next_test, elapsed = loop["t_env"], loop["episodes"], loop["next_test"], loop["elapsed"]
        train_returns, last_stats = loop["train_returns"], loop["last_stats"]
        next_checkpoint, last_test = loop.get("next_checkpoint", next_checkpoint), loop.get("last_test")
        next_snapshot = loop.get("next_snapshot", next_snapshot)
        logger.log({"split": "resume", "t_env": t_env, "episodes": episodes, "from": resume_from.name})

    def save_checkpoint() -> Path:
        loop = {"t_env": t_env, "episodes": episodes, "next_test": next_test, "train_returns": train_returns,
                "last_stats": last_stats, "next_checkpoint": next_checkpoint, "last_test": last_test,
                "next_snapshot": next_snapshot, "elapsed": elapsed + time.perf_counter() - started}  # fmt: skip
        state = checkpoint.capture(loop, learner, buffer, runners, clock)
        return save_state_checkpoint(run_dir / "checkpoints", t_env, state, keep=1)

    def save_policy(path: Path = run_dir / "model.safetensors") -> None:
        """The learner's networks to ``path`` (model.safetensors or a snapshot; written aside, then renamed: never
        a torn file)."""
        tensors = {f"{k}.{n}": v.contiguous() for k, sd in learner.state_dict().items() for n, v in sd.items()}
        path.parent.mkdir(exist_ok=True)
        save_file(tensors, str(path.with_name(path.name + ".tmp")))
        path.with_name(path.name + ".tmp").replace(path)

    kept = None
    with deferred_sigint() as interrupted:
        while t_env < m.max_steps:
            if t_env >= next_test:
                last_test = test()
                next_test += m.eval_every
                if t_env and m.checkpoint_every is None:
                    save_policy()  # the latest policy and the state to resume from survive a crash
                    save_checkpoint()
            if m.snapshot_every is not None and t_env >= next_snapshot:  # FCP-style stages of the policy
                save_policy(run_dir / "policies" / f"t_env-{t_env:09d}.safetensors")
                next_snapshot = (t_env // m.snapshot_every + 1) * m.snapshot_every
            if m.checkpoint_every is not None and t_env >= next_checkpoint:
                next_checkpoint += m.checkpoint_every
                if t_env:
                    save_policy()
                    save_checkpoint()
            batch, stats = runner.run(learner.collection_epsilon(t_env, epsilon(t_env)))
            buffer.insert(batch)
            t_env += stats.steps
            episodes += len(stats.returns)
            train_returns += stats.returns
            if buffer.can_sample(m.batch_episodes):
                last_stats = learner.train(buffer.sample(m.batch_episodes), episodes)
            if episodes % m.log_every_episodes < len(stats.returns) and train_returns:
                record = {
                    "split": "train",
                    "t_env": t_env,
                    "episodes": episodes,
                    "return_mean": statistics.fmean(train_returns),
                    **({} if learner.on_policy else {"epsilon": epsilon(t_env)}),
                    **last_stats,
                }
                logger.log(record)
                progress.update(t_env, {k: record[k] for k in ("return_mean", "epsilon", "loss") if k in record})
                train_returns = []
            else:
                progress.advance(t_env)
            if interrupted.is_set():  # Ctrl-C: keep everything up to this batch, resume continues exactly here
                status = "interrupted"
                save_policy()
                kept = save_checkpoint()
                break
    if status == "completed":
        progress.message(f"final test: {m.test_episodes} greedy episodes")
        last_test = test()
        save_policy()
    progress.close()
    logger.close()
    final = last_test or {}
    summary = {
        "name": cfg.name, "run_dir": str(run_dir), "kind": "marl", "task": "marl", "metric_name": "return",
        "status": status, "env": m.env, "algo": m.algo, "mixer": None if learner.on_policy else m.mixer,
        "t_env": t_env, "episodes": episodes, "updates": learner.updates,
        "final": {"test_return": final.get("return_mean")}
        | {f"{name}_test_return": final.get(f"{name}_return_mean") for name in extra_runners},
        "wall_time_s": round(elapsed + time.perf_counter() - started, 3),
        "env_steps_per_s": t_env / max(elapsed + time.perf_counter() - started, 1e-9),
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    for env in envs + test_envs:
        env.close()
    if status == "interrupted":
        raise Interrupted(f"stopped at t_env {t_env} of {m.max_steps}; kept checkpoint {kept} and the policy")
    return summary


def _resumed_t_env(path: Path | None) -> int | None:
    """The t_env a checkpoint was written at (its folder's step), or None."""
    return None if path is None else int(json.loads((path / "state.json").read_text())["step"])
