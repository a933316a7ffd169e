"""``leantrain run``: open the run folder, hand the config to its kind's runner, and leave an honest record.

Whatever happens, the run folder ends with a ``summary.json`` whose ``status`` says how the run ended: the
runner's own (completed, stopped, diverged, interrupted), ``interrupted`` after a second Ctrl-C that stopped it
mid-step, or ``failed`` (with the one-line ``error``; an unexpected exception also leaves ``error.log`` with the
full traceback). An interruption re-raises as :class:`leantrain.errors.Interrupted` whose message says what was
kept and is followed by the exact command that continues the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from leantrain.config import RunConfig
from leantrain.crash_report import one_line, write_crash_report
from leantrain.errors import ConfigError, Interrupted, LeantrainError
from leantrain.runs.folder import check_resumable, create_run_dir, resume_command
from leantrain.runs.kinds import kind_of


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


def run(cfg: RunConfig) -> RunResult:
    """Train and evaluate ``cfg`` (any kind); write the run folder; return its path and summary."""
    import torch

    from leantrain.train.checkpoint import latest_intact_checkpoint

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    kind = kind_of(cfg)
    runner = kind.load_runner()
    if cfg.resume is not None and not kind.resumable:
        raise ConfigError(f"{kind.name} runs keep no checkpoints and cannot be resumed; rerun the recipe instead")
    if cfg.resume is None:
        run_dir, resume_from = create_run_dir(cfg), None
    else:
        run_dir = Path(cfg.resume)
        check_resumable(cfg)
        resume_from = latest_intact_checkpoint(run_dir / "checkpoints", what=f"resume={run_dir}")
        (run_dir / "summary.json").unlink(missing_ok=True)  # the ending of the earlier session is history now
    try:
        summary = runner(cfg, run_dir, resume_from)
    except Interrupted as err:  # the runner stopped cleanly and wrote its summary
        if not kind.resumable:
            raise
        raise Interrupted(f"{err}; continue with: {resume_command(run_dir)}") from None
    except KeyboardInterrupt:  # a second Ctrl-C: stopped mid-step, the newest checkpoint on disk is what is kept
        _record_end(run_dir, cfg, "interrupted", None)
        if not kind.resumable:
            raise Interrupted(f"stopped mid-round; the records so far are in {run_dir}") from None
        raise Interrupted(f"{_kept(run_dir)}; continue with: {resume_command(run_dir)}") from None
    except LeantrainError as err:
        _record_end(run_dir, cfg, "failed", str(err))
        raise
    except Exception as err:
        write_crash_report(err, run_dir)
        _record_end(run_dir, cfg, "failed", one_line(err))
        raise
    return RunResult(run_dir, summary)


def _kept(run_dir: Path) -> str:
    from leantrain.train.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir / "checkpoints")
    return (
        f"kept checkpoint {found[-1]}" if found else f"no checkpoint had been written yet ({run_dir} keeps the logs)"
    )


def _record_end(run_dir: Path, cfg: RunConfig, status: str, error: str | None) -> None:
    """Mark the summary with how the run ended, unless the runner already recorded an ending of its own."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    if summary.get("status") is None:
        summary.update(name=cfg.name, run_dir=str(run_dir), kind=kind_of(cfg).name, status=status)
        if error:
            summary["error"] = error
        path.write_text(json.dumps(summary, indent=1))
