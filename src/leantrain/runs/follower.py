"""``torchrun ... -m leantrain run RECIPE [overrides]`` on a rank other than 0 (see ``leantrain.__main__``).

Rank 0 runs ``leantrain run`` as usual and alone writes the run folder; every other rank resolves the same config
and hands it to its run kind's follower (:attr:`leantrain.runs.kinds.RunKind.follower`: federated recipes follow the
simulator, hetero recipes train their worker), which joins the group and works until rank 0 stops. Kinds without a
follower run in one process only and are refused here with the reason.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from leantrain.errors import ConfigError, Interrupted, LeantrainError


def follower_main(argv: list[str]) -> int:
    """Resolve the config of ``argv`` (``run RECIPE [overrides]``), join the group, follow rank 0. Returns the exit
    code (errors: one line on stderr, naming the rank)."""
    from leantrain.config import resolve
    from leantrain.runs.folder import resume_config
    from leantrain.runs.kinds import RUN_KINDS, kind_of
    from leantrain.train.checkpoint import latest_intact_checkpoint

    rank = os.environ.get("RANK", "?")
    try:
        if not argv or argv[0] != "run":
            raise ConfigError("under torchrun only `leantrain run RECIPE ...` can be started")
        recipe, overrides = (argv[1] if len(argv) > 1 else None), list(argv[2:])
        if recipe is not None and "=" in recipe and not Path(recipe).is_file():
            recipe, overrides = None, [recipe, *overrides]
        resume = [o.partition("=")[2] for o in overrides if o.partition("=")[0].strip() == "resume"]
        if resume:
            rest = [o for o in overrides if o.partition("=")[0].strip() != "resume"]
            cfg = resume_config(resume[-1], rest, recipe=recipe)
            resume_from = latest_intact_checkpoint(Path(resume[-1]) / "checkpoints", what=f"resume={resume[-1]}")
        elif recipe is None:
            raise ConfigError("give a recipe or resume=RUN_DIR")
        else:
            cfg, resume_from = resolve(recipe, overrides), None
        kind = kind_of(cfg)
        follower = kind.load_follower()
        if follower is None:
            several = ", ".join(k.name for k in RUN_KINDS.values() if k.follower is not None)
            raise ConfigError(f"{kind.name} recipes run in one process; only {several} recipes run on several "
                              "torchrun processes")  # fmt: skip
        follower(cfg, resume_from)
    except LeantrainError as err:
        print(f"error: [rank {rank}] {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return Interrupted.exit_code
    except Exception as err:  # noqa: BLE001 - one line; the full traceback goes to a crash report
        from leantrain.crash_report import one_line, write_crash_report

        report = write_crash_report(err)
        print(f"error: [rank {rank}] unexpected {one_line(err)} (full traceback in {report})", file=sys.stderr)
        return 1
    return 0
