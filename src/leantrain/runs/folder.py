"""Run folders: where a run is created, and how ``resume=DIR`` turns a folder back into its config.

A new run gets ``<output_dir>/<name>-<YYYYmmdd-HHMMSS>/`` holding the resolved ``config.yaml``; a name that could
leave ``output_dir`` (a path separator, ``..``) is refused by the config. ``leantrain run resume=DIR`` alone
continues a run: the recipe and every override come from ``DIR/config.yaml``; beside it only keys that extend the
run (the kind's budget keys: ``train.epochs``, ``train.max_steps``, ``federated.rounds``, ``marl.max_steps``) or
change how it is shown (``progress``, ``threads``, ``log_formats``, ``output_dir``, which a resumed run does not
use) may be given. The run continues from its newest intact checkpoint (see
:func:`leantrain.train.checkpoint.latest_intact_checkpoint`).
"""

from __future__ import annotations

import shlex
from datetime import datetime
from pathlib import Path

import yaml

from leantrain import config as config_mod
from leantrain.config import RunConfig
from leantrain.errors import ConfigError
from leantrain.runs.kinds import kind_of

# Keys that never change what a run computes (how it is shown, where it is written, how fast it goes).
PRESENTATION_KEYS = ("resume", "progress", "threads", "log_formats", "output_dir", "federated.engine",
                     "federated.workers")  # fmt: skip


def create_run_dir(cfg: RunConfig) -> Path:
    """A new, empty run folder under ``cfg.output_dir`` (created if needed) with the resolved config in it."""
    parent = Path(cfg.output_dir)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output_dir={cfg.output_dir!r} cannot be created ({err.strerror or err})") from None
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, suffix = parent / f"{cfg.name}-{stamp}", 1
    while run_dir.exists():
        suffix += 1
        run_dir = parent / f"{cfg.name}-{stamp}-{suffix}"
    if run_dir.resolve().parent != parent.resolve():  # the config refuses such names; never write elsewhere
        raise ConfigError(f"name={cfg.name!r} would put the run folder outside output_dir={cfg.output_dir!r}")
    try:
        run_dir.mkdir()
    except OSError as err:
        raise ConfigError(f"cannot create the run folder {run_dir} ({err.strerror or err})") from None
    config_mod.save(cfg, run_dir / "config.yaml")
    return run_dir


def saved_config(run_dir: Path) -> RunConfig:
    """The config a run folder was started with."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"resume={run_dir} is not a run folder (no config.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"resume={run_dir}: config.yaml is not readable YAML ({type(err).__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"resume={run_dir}: config.yaml is not a mapping")
    return config_mod.from_dict(raw)


def resumable_keys(cfg: RunConfig) -> tuple[str, ...]:
    return (*PRESENTATION_KEYS, *kind_of(cfg).budget_keys)


def resume_config(
    run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), recipe: str | None = None
) -> RunConfig:
    """The config that continues ``run_dir``: its saved config, plus ``overrides`` that may change on a resume.

    With ``recipe`` (the older spelling ``leantrain run RECIPE resume=DIR ...``) the recipe with the overrides must
    resolve to the saved config up to those keys."""
    if recipe is not None:  # checked against the saved config by the launcher (check_resumable), as any API call
        return config_mod.resolve(recipe, [*overrides, f"resume={run_dir}"])
    saved = saved_config(Path(run_dir))
    allowed = resumable_keys(saved)
    cfg = saved
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.max_steps=2000)")
        path = config_mod.override_path(cfg, key.strip())
        if path not in allowed:
            raise ConfigError(
                f"{path} cannot change when resuming {run_dir}; a resumed run may change only {', '.join(allowed)} "
                "(start a new run to change anything else)"
            )
        cfg = config_mod.apply_override(cfg, key.strip(), config_mod.parse_text(value))
    return config_mod.apply_override(cfg, "resume", str(run_dir))


def check_resumable(cfg: RunConfig) -> None:
    """Refuse to continue ``cfg.resume`` with a config that differs from the saved one beyond the keys a resumed run
    may change (what the run computes must stay what it was)."""
    saved = saved_config(Path(cfg.resume))
    allowed = resumable_keys(saved)
    before, after = (
        config_mod.flatten(config_mod.to_dict(saved, True)),
        config_mod.flatten(config_mod.to_dict(cfg, True)),
    )
    changed = sorted({k for k in before.keys() | after.keys() if before.get(k) != after.get(k)} - set(allowed))
    if changed:
        raise ConfigError(
            f"resume={cfg.resume}: the config differs from the saved run in {', '.join(changed)}; only "
            f"{', '.join(allowed)} may change (or give just `leantrain run resume={cfg.resume}`)"
        )


def resume_command(run_dir: Path) -> str:
    """The exact command that continues ``run_dir`` (what an interrupted run prints)."""
    return f"leantrain run {shlex.quote(f'resume={run_dir}')}"
