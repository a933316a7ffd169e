"""``leantrain run <marl-recipe>``: value-decomposition training with a run folder like any other run.

The recipe's ``marl:`` section picks the environment, the learner and the budget (environment steps). Every
``n_envs`` episodes collected, the learner takes one update on a batch of ``batch_episodes`` sampled from the
replay (once it holds that many). Every ``test_every`` steps it runs ``test_episodes`` greedy episodes. The run
folder holds ``config.yaml``, ``metrics.jsonl`` (``train`` records: t_env, episodes, return, epsilon, loss;
``test`` records: greedy return, and for WALL the return under the attack), ``summary.json`` and
``model.safetensors`` (the learner's networks, rewritten at every test) and ``checkpoints/`` (the full state after
the latest test: ``resume=<run folder>`` continues exactly, see :mod:`leantrain.marl.checkpoint`;
``marl.pretrained_policy=<run folder>`` instead starts a new run from its policy, a warm start).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from leantrain.errors import ConfigError, LeantrainError


def build(cfg):
    """(training envs, test envs, controller, learner, runner) of a run config's ``marl`` section."""
    from leantrain.marl.controller import MultiAgentController
    from leantrain.marl.envs import make_env
    from leantrain.marl.learner import LearnerConfig, QLearner
    from leantrain.marl.matrix_games import EpisodeClock
    from leantrain.marl.runner import EpisodeRunner

    m = cfg.marl
    torch.manual_seed(cfg.seed)
    clock = EpisodeClock()
    envs = [make_env(m.env, m.switch_episode, clock) for _ in range(m.n_envs)]
    mac = MultiAgentController(envs[0].info, hidden=m.agent_hidden)
    lc = LearnerConfig(mixer=m.mixer, gamma=m.gamma, td_lambda=m.td_lambda, lr=m.learning_rate, optimizer=m.optimizer,
                       grad_clip=m.grad_norm_clip, target_update_episodes=m.target_update_episodes)  # fmt: skip
    runner = EpisodeRunner(envs, mac, seed=cfg.seed)
    if m.algo == "s2q":
        from leantrain.marl.s2q import S2QConfig, S2QLearner

        try:
            options = S2QConfig(**m.method_options)
        except TypeError as err:
            raise ConfigError(f"marl.method_options for s2q: {err}") from None
        learner = S2QLearner(mac, lc, options)
        runner.action_hook = learner.behaviour_hook(runner, seed=cfg.seed)
    elif m.algo == "wall":
        from leantrain.marl.wall import WALLLearner
        from leantrain.marl.wolfpack import WolfpackAttack

        options = dict(m.method_options)
        clean_steps = options.pop("clean_steps", 0)
        learner = WALLLearner(mac, lc, wolfpack_config(options), seed=cfg.seed, clean_steps=int(clean_steps))
        WolfpackAttack(runner, mac, learner.mixer, learner.planner, learner.attack, lr=lc.lr, seed=cfg.seed)
    else:
        learner = QLearner(mac, lc)
    if m.pretrained_policy:
        learner.load_policy(policy_file(m.pretrained_policy))
    test_envs = [make_env(m.env, m.switch_episode, clock, counts=False) for _ in range(m.n_envs)]
    return envs, test_envs, mac, learner, runner


def wolfpack_config(options: dict):
    from leantrain.marl.wolfpack import WolfpackConfig

    try:
        return WolfpackConfig(**options)
    except TypeError as err:
        raise ConfigError(f"marl.method_options for wall: {err}") from None


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
    from leantrain.marl.episodes import ReplayBuffer
    from leantrain.train.checkpoint import load_state_checkpoint, save_state_checkpoint

    m = cfg.marl
    started = time.perf_counter()
    envs, test_envs, mac, learner, runner = build(cfg)
    test_runner = type(runner)(test_envs, mac, seed=cfg.seed + 10_007)
    buffer = ReplayBuffer(m.buffer_episodes, seed=cfg.seed)
    epsilon = EpsilonSchedule(m.epsilon_start, m.epsilon_finish, m.epsilon_anneal_steps)
    t_env, episodes, next_test, status, elapsed = 0, 0, 0, "completed", 0.0
    log_path = run_dir / "metrics.jsonl"
    train_returns: list[float] = []
    last_stats: dict = {}

    def emit(record: dict) -> None:
        with log_path.open("a") as out:
            out.write(json.dumps(record) + "\n")
        if cfg.progress != "none":
            shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
            print(shown, flush=True)

    attack = runner.action_hook if m.algo == "wall" else None
    attacked_runner = None
    if attack is not None:  # WALL runs also test under the Wolfpack attack (test budget)
        from leantrain.marl.envs import make_env
        from leantrain.marl.wolfpack import WolfpackAttack

        attack_envs = [make_env(m.env, m.switch_episode, None, counts=False) for _ in range(m.n_envs)]
        test_envs += attack_envs
        attacked_runner = type(runner)(attack_envs, mac, seed=cfg.seed + 20_011)
        WolfpackAttack(attacked_runner, mac, learner.mixer, learner.planner, learner.attack, lr=m.learning_rate,
                       seed=cfg.seed + 1)  # fmt: skip

    def test() -> dict:
        value = test_runner.test_return(m.test_episodes)
        record = {"split": "test", "t_env": t_env, "episodes": episodes, "return_mean": value}
        if attacked_runner is not None:
            record["attacked_return_mean"] = attacked_runner.test_return(m.test_episodes)
        emit(record)
        return record

    runners = {"train": runner, "test": test_runner} | ({"attacked": attacked_runner} if attacked_runner else {})
    clock = getattr(envs[0], "clock", None)
    if resume_from is not None:
        _, state = load_state_checkpoint(resume_from)
        loop = checkpoint.restore(state, learner, buffer, runners, clock)
        t_env, episodes, next_test, elapsed = loop["t_env"], loop["episodes"], loop["next_test"], loop["elapsed"]
        train_returns, last_stats = loop["train_returns"], loop["last_stats"]
        lines = log_path.read_text().splitlines(keepends=True)[: loop["log_lines"]]
        log_path.write_text("".join(lines))  # records written after the checkpoint are replayed
        emit({"split": "resume", "t_env": t_env, "episodes": episodes, "from": resume_from.name})

    def save_checkpoint() -> None:
        loop = {"t_env": t_env, "episodes": episodes, "next_test": next_test, "train_returns": train_returns,
                "last_stats": last_stats, "log_lines": len(log_path.read_text().splitlines()),
                "elapsed": elapsed + time.perf_counter() - started}  # fmt: skip
        state = checkpoint.capture(loop, learner, buffer, runners, clock)
        save_state_checkpoint(run_dir / "checkpoints", t_env, state, keep=1)

    def save_policy() -> None:
        """The learner's networks to model.safetensors (written aside, then renamed: never a torn file)."""
        tensors = {f"{k}.{n}": v.contiguous() for k, sd in learner.state_dict().items() for n, v in sd.items()}
        save_file(tensors, str(run_dir / "model.safetensors.tmp"))
        (run_dir / "model.safetensors.tmp").replace(run_dir / "model.safetensors")

    try:
        while t_env < m.t_max:
            if t_env >= next_test:
                test()
                next_test += m.test_every
                if t_env:
                    save_policy()  # the latest policy and the state to resume from survive a crash
                    save_checkpoint()
            if attack is not None:  # WALL: clean pre-training, then greedy collection under the attack (official)
                attack.enabled = t_env >= learner.clean_steps
            batch, stats = runner.run(0.0 if attack is not None and attack.enabled else epsilon(t_env))
            buffer.insert(batch)
            t_env += stats.steps
            episodes += len(stats.returns)
            train_returns += stats.returns
            if buffer.can_sample(m.batch_episodes):
                last_stats = learner.train(buffer.sample(m.batch_episodes), episodes)
            if episodes % m.log_every_episodes < len(stats.returns) and train_returns:
                mean = statistics.fmean(train_returns)
                emit({"split": "train", "t_env": t_env, "episodes": episodes, "return_mean": mean,
                      "epsilon": epsilon(t_env), **last_stats})  # fmt: skip
                train_returns = []
    except KeyboardInterrupt:
        status = "interrupted"
    final = test()
    save_policy()
    summary = {
        "name": cfg.name, "run_dir": str(run_dir), "task": "marl", "metric_name": "return", "status": status,
        "env": m.env, "algo": m.algo, "mixer": m.mixer, "t_env": t_env, "episodes": episodes,
        "updates": learner.updates,
        "final": {"test_return": final["return_mean"]}
        | ({"attacked_test_return": final["attacked_return_mean"]} if attacked_runner is not None else {}),
        "wall_time_s": round(elapsed + time.perf_counter() - started, 3),
        "env_steps_per_s": t_env / max(elapsed + time.perf_counter() - started, 1e-9),
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    for env in envs + test_envs:
        env.close()
    if status == "interrupted":
        saved = sorted((run_dir / "checkpoints").glob("step-*"))
        hint = f"; continue with resume={run_dir} (from {saved[-1].name})" if saved else ""
        raise LeantrainError(f"interrupted at t_env {t_env}; the run folder {run_dir} has what was logged{hint}")
    return summary
