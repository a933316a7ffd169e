"""SBC: state-blocked coordination, the whole pipeline (population -> ego -> zero-shot cross-play) as one run.

Kang, Lee, Jo, Han, "Shaping Zero-Shot Coordination via State Blocking" (SBC, arXiv 2605.11688; no official code,
only the abstract and summaries could be read: spec ``shared/specs/marl.md`` §6). SBC makes a population of
partners that settle on *different* conventions by training each in a virtual environment where a set of states is
blocked (:mod:`leantrain.marl.sbc_blocking`), then trains an ego as a best response to the population in the real
environment (:mod:`leantrain.marl.partners`) and evaluates it with partners it never met.

``leantrain run sbc-multi-destination`` (the ``sbc`` run kind: ``sbc.population`` set) runs, each step a normal MARL
run folder inside this run's folder (safetensors policies, metrics, checkpoints):

1. **Population** (``partners/partner-<i>-*``): ``sbc.population`` blocking sets over the environment's units
   (:func:`~leantrain.marl.sbc_blocking.sample_blocking_sets`, seed ``seed``; the first empty when
   ``include_empty``), one self-play MAPPO partner each, trained ``partner_steps`` on ``blocked:<marl.env>``
   (penalty c = ``block_penalty``, or hard blocking) with seed 10000 + 100 seed + i; ``partner_stages`` policies
   of each are kept, evenly spaced over its training and the end included (FCP-style skill levels; FCP also keeps
   the untrained start, ``partner_start: true``), every one a partner.
2. **Held-out partners** (``held_out/held-out-<j>-*``): ``held_out_seeds`` self-play MAPPO runs on the real
   environment, seeds ``held_out_seed`` + j, the same settings and budget as a partner; plus ``sbc.held_out``
   (run folders, policy files, ``scripted:greedy_cook``).
3. **Ego** (``ego/ego-*``): ``marl.algo: mappo-br`` on the real environment for ``marl.max_steps``, seed ``seed``,
   the population's policies drawn uniformly per episode, the partner's agent ``partner_agent`` (random: both
   positions), MAPPO options ``marl.method_options`` updated with ``sbc.ego_options``.
4. **Cross-play** (``crossplay.json``): episodes of the ego, and of the self-play baseline (the empty-set partner's
   final policy: MAPPO self-play with the partners' budget), with every held-out partner, the partner playing each
   agent in turn, on the real environment with ``sbc.eval_env_args``; both sides greedy, or both sampling
   (``crossplay_actions: sample``: on Overcooked greedy MAPPO cooks get stuck).

Nothing finished is lost: a stopped or failed pipeline keeps every completed run; ``leantrain run resume=<folder>``
reuses them, resumes the one in progress from its own checkpoint and goes on. ``units_per_set: 0`` gives the
FCP-style population baseline (partners that differ only in seeds), the same pipeline without blocking.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from leantrain.errors import ConfigError, Interrupted


def _job_config(cfg, name: str, folder: Path, seed: int, **marl):
    """A MARL run config for one step of the pipeline: this config's ``marl`` section with ``marl`` changed."""
    from leantrain.config import from_dict, to_dict

    raw = to_dict(cfg)
    raw.update(name=name, seed=seed, output_dir=str(folder), resume=None, sbc={})
    raw["marl"] = {**raw["marl"], "checkpoint_every": None, **marl}
    return from_dict(raw)


def _status(run_dir: Path) -> str | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()).get("status") if path.is_file() else None


def run_job(job_cfg) -> Path:
    """The completed run folder of one step: an earlier session's if one completed, else the earlier one resumed from
    its checkpoint, else a new run (in ``job_cfg.output_dir``, named ``job_cfg.name``)."""
    from leantrain.runs.folder import resume_config
    from leantrain.runs.launch import run
    from leantrain.train.checkpoint import list_checkpoints

    folder = Path(job_cfg.output_dir)
    earlier = sorted(folder.glob(f"{job_cfg.name}-*")) if folder.is_dir() else []
    done = [d for d in earlier if _status(d) == "completed"]
    if done:
        return done[-1]
    started = [d for d in earlier if list_checkpoints(d / "checkpoints")]
    cfg = resume_config(started[-1], [f"progress={job_cfg.progress}"]) if started else job_cfg
    return run(cfg).run_dir


def stage_policies(run_dir: Path, start: bool) -> list[str]:
    """A partner's kept policies: its snapshots (policies/, oldest first; the untrained one at t_env 0 only with
    ``start``), then its final policy."""
    snapshots = sorted((run_dir / "policies").glob("t_env-*.safetensors"))
    return [str(p) for p in snapshots if start or p.name != f"t_env-{0:09d}.safetensors"] + [str(run_dir)]


def snapshot_every(sbc) -> int | None:
    """The partners' ``marl.snapshot_every``: ``partner_stages`` policies evenly spaced, the end included."""
    intervals = sbc.partner_stages - 1 if sbc.partner_start else sbc.partner_stages
    return sbc.partner_steps // intervals if sbc.partner_stages > 1 else None


def _check(cfg) -> None:
    s, m = cfg.sbc, cfg.marl
    if m.algo != "mappo":
        raise ConfigError(f"sbc runs train MAPPO partners and a MAPPO ego: marl.algo must be mappo, not {m.algo!r}")
    if s.partner_agent != "random" and not s.partner_agent.isdigit():
        raise ConfigError(f"sbc.partner_agent={s.partner_agent!r} must be random or an agent index")
    if s.partner_stages > 1 and s.partner_steps < s.partner_stages:
        raise ConfigError(f"sbc.partner_steps={s.partner_steps} is too few for {s.partner_stages} partner stages")
    if not s.held_out_seeds and not s.held_out:
        raise ConfigError("sbc: no held-out partner to evaluate with; set sbc.held_out_seeds > 0 or sbc.held_out")


def blocking_sets(cfg) -> list[frozenset]:
    """The population's blocking sets (drawn with the run's seed from the environment's units of ``block_kinds``)."""
    from leantrain.marl.envs import make_env
    from leantrain.marl.sbc_blocking import blockable_units, sample_blocking_sets

    s, m = cfg.sbc, cfg.marl
    env = make_env(m.env, **m.env_args)
    units = [u for u in blockable_units(env) if not s.block_kinds or u[0] in s.block_kinds]
    env.close()
    if not units and s.units_per_set:
        raise ConfigError(f"sbc.block_kinds={s.block_kinds} leaves no unit of {m.env} to block")
    return sample_blocking_sets(units, s.population, s.units_per_set, seed=cfg.seed, include_empty=s.include_empty)


def plan(cfg, run_dir: Path, sets: list[frozenset]) -> dict:
    """The MARL run of every training step, by name: a partner per blocking set of ``sets``, the held-out partners
    (the ego's comes later)."""
    s, m = cfg.sbc, cfg.marl
    stages = {"snapshot_every": snapshot_every(s)}
    jobs = {}
    for i, units in enumerate(sets):
        env_args = {**m.env_args, "blocked_units": [list(u) for u in sorted(units, key=str)],
                    "block_mode": s.block_mode, "block_penalty": s.block_penalty}  # fmt: skip
        name, seed = f"partner-{i:02d}", 10_000 + 100 * cfg.seed + i
        jobs[name] = _job_config(cfg, name, run_dir / "partners", seed, env=f"blocked:{m.env}", env_args=env_args,
                                 max_steps=s.partner_steps, **stages)  # fmt: skip
    for j in range(s.held_out_seeds):
        jobs[f"held-out-{j:02d}"] = _job_config(cfg, f"held-out-{j:02d}", run_dir / "held_out", s.held_out_seed + j,
                                                max_steps=s.partner_steps)  # fmt: skip
    return jobs


def ego_config(cfg, run_dir: Path, partners: list[str]):
    s, m = cfg.sbc, cfg.marl
    agent = s.partner_agent if s.partner_agent == "random" else int(s.partner_agent)
    options = {**m.method_options, **s.ego_options, "partners": partners, "partner_agent": agent}
    return _job_config(cfg, "ego", run_dir / "ego", cfg.seed, algo="mappo-br", method_options=options)


def evaluate(cfg, ego_dir: Path, baseline_dir: Path | None, held_out: list[str], stage) -> dict:
    """Cross-play of the ego (and the self-play baseline) with every held-out partner: {policy: {partner: result}}."""
    from leantrain.marl.envs import make_env
    from leantrain.marl.partners import crossplay, load_partner, load_policy

    s, m = cfg.sbc, cfg.marl
    env_args = {**m.env_args, **s.eval_env_args}
    envs = [make_env(m.env, **env_args) for _ in range(max(1, min(m.n_envs, s.crossplay_episodes // 2)))]
    policies = {"sbc": load_policy(ego_dir)} | ({"sp": load_policy(baseline_dir)} if baseline_dir else {})
    out: dict = {name: {} for name in policies}
    for spec in held_out:
        partner = load_partner(spec)
        for name, mac in policies.items():
            out[name][spec] = crossplay(mac, partner, envs, s.crossplay_episodes, seed=cfg.seed,
                                        sample=s.crossplay_actions == "sample")  # fmt: skip
            stage(name, spec, out[name][spec])
    for env in envs:
        env.close()
    return out


def _spread(results: dict) -> tuple[float, float]:
    """Mean over held-out partners of the mean return, and the standard deviation over partners."""
    means = [r["mean"] for r in results.values()]
    return statistics.fmean(means), statistics.pstdev(means)


def run_sbc(cfg, run_dir: Path, resume_from: Path | None = None) -> dict:
    """The ``sbc`` run kind's runner: population, held-out partners, ego, cross-play (module docstring)."""
    from leantrain.train.checkpoint import load_state_checkpoint, save_state_checkpoint
    from leantrain.train.metric_loggers import open_metric_loggers
    from leantrain.train.progress import make_progress, start_text

    _check(cfg)
    s, started = cfg.sbc, time.perf_counter()
    sets = blocking_sets(cfg)
    jobs = plan(cfg, run_dir, sets)
    resumed = None if resume_from is None else load_state_checkpoint(resume_from)[0]
    logger = open_metric_loggers(run_dir, cfg.log_formats, x_key="stage", resume_after=resumed)
    total = len(jobs) + 2  # the ego and the cross-play
    text = start_text(run_dir, f"SBC on {cfg.marl.env}: {s.population} partners, {s.held_out_seeds} held-out, ego, "
                      "cross-play", resumed)  # fmt: skip
    progress = make_progress("none" if cfg.progress == "none" else "plain", total, unit="stage", start=text)
    dirs: dict[str, str] = {}
    summary = {"name": cfg.name, "run_dir": str(run_dir), "kind": "sbc", "task": "marl",
               "metric_name": "cross-play return", "env": cfg.marl.env,
               "algo": "sbc" if s.units_per_set else "fcp", "stages_done": 0}  # fmt: skip

    def finish_stage(stage: int, name: str, record: dict) -> None:
        summary["stages_done"] = stage
        if resumed is None or stage > resumed:
            logger.log({"split": "job", "stage": stage, "job": name, **record})
        save_state_checkpoint(run_dir / "checkpoints", stage, {"runs": dict(dirs)}, keep=1)
        progress.update(stage, {"done": name})

    if resumed is None:
        save_state_checkpoint(run_dir / "checkpoints", 0, {"runs": {}}, keep=1)
    try:
        for stage, (name, job) in enumerate(jobs.items(), 1):
            progress.message(f"sbc stage {stage}/{total}: {name} ({job.marl.env}, {job.marl.max_steps} steps)")
            dirs[name] = str(run_job(job))
            finish_stage(stage, name, _job_record(Path(dirs[name])))
        partners = [p for name in jobs if name.startswith("partner")
                    for p in stage_policies(Path(dirs[name]), s.partner_start)]  # fmt: skip
        progress.message(f"sbc stage {total - 1}/{total}: ego against {len(partners)} partner policies")
        dirs["ego"] = str(run_job(ego_config(cfg, run_dir, partners)))
        finish_stage(total - 1, "ego", _job_record(Path(dirs["ego"])))
        held_out = [dirs[name] for name in jobs if name.startswith("held-out")] + list(s.held_out)

        def stage(policy: str, partner: str, result: dict) -> None:
            progress.message(f"  cross-play {policy} with {partner}: {result['mean']:.4g}")
            logger.log({"split": "crossplay", "stage": total, "policy": policy, "partner": partner,
                        "return_mean": result["mean"], "return_std": result["std"],
                        "by_partner_agent": result["by_partner_agent"]})  # fmt: skip

        baseline = Path(dirs["partner-00"]) if s.include_empty and s.units_per_set else None
        results = evaluate(cfg, Path(dirs["ego"]), baseline, held_out, stage)
    except (Interrupted, KeyboardInterrupt):
        summary.update(status="interrupted", runs=dirs)
        _write(run_dir, summary, started)
        progress.close()
        logger.close()
        done = summary["stages_done"]
        raise Interrupted(f"stopped after {done} of {total} stages; finished runs are kept") from None
    (run_dir / "crossplay.json").write_text(json.dumps(results, indent=1))
    final = {}
    for policy, per_partner in results.items():
        mean, std = _spread(per_partner)
        prefix = "" if policy == "sbc" else f"{policy}_"
        final |= {f"{prefix}crossplay_return": mean, f"{prefix}crossplay_return_std": std}
    summary.update(status="completed", stages_done=total, final=final, runs=dirs,
                   blocking_sets=[[list(u) for u in sorted(b, key=str)] for b in sets])  # fmt: skip
    finish_stage(total, "crossplay", final)
    _write(run_dir, summary, started)
    progress.close()
    logger.close()
    return summary


def _job_record(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return {"run_dir": str(run_dir), **{k: v for k, v in (s.get("final") or {}).items() if v is not None},
            "t_env": s.get("t_env"), "wall_time_s": s.get("wall_time_s")}  # fmt: skip


def _write(run_dir: Path, summary: dict, started: float) -> None:
    summary["wall_time_s"] = round(time.perf_counter() - started, 3)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
