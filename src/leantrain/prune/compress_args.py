"""The arguments of ``leantrain compress`` (:func:`leantrain.prune.compress.run_compress`), checked before torch loads.

Importing torch and loading the model take seconds; a typo should be answered at once. Everything that is known
without them is checked here: the names (model, selection, recovery, text sources), the
ranges (blocks to remove, for the
decoder depths listed in :data:`CAUSAL_LMS`; windows; clusters; ridge) and the output folder. What needs the loaded
model or the tokenized corpus (a calibration slice too short for the windows) stays in ``run_compress``. This module
imports the dataset registry (numpy) but not torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from leantrain.data import list_datasets
from leantrain.errors import ConfigError

# leantrain.prune.compress.SELECTIONS, then "auto" (a test keeps them equal)
SELECTORS = ("lorp", "shortgpt", "streamline", "last_n", "auto")
RECOVERIES = ("none", "diag", "symmetric", "ghosted")  # leantrain.prune.ghosted.METHODS (a test keeps them equal)
PROTECTED = (0, -1)  # the first and last blocks: leantrain.prune.lorp.PROTECT (a test keeps them equal)
# The pretrained decoder LMs shipped offline here -> their number of decoder blocks.
CAUSAL_LMS = {"smollm2-135m": 30}
# Calibration text by default: general English (encyclopedic prose), not Shakespeare; the cross-domain evaluation
# is a second, different English source (news), or Wikipedia when the calibration is that news corpus.
DEFAULT_CALIB = "wikipedia"
DEFAULT_EVAL = "lee-news"


@dataclass(frozen=True)
class TextSource:
    """Where text comes from: a registered language-modelling dataset, or a user's file (plain text or JSON Lines
    with the string field ``field``)."""

    dataset: str | None = None
    file: Path | None = None
    field: str = "text"

    @property
    def name(self) -> str:
        return str(self.file) if self.file is not None else str(self.dataset)


def text_source(role: str, dataset: str | None, file: str | os.PathLike | None, field: str = "text",
                default: str | None = None) -> TextSource:  # fmt: skip
    """The ``--<role>-dataset`` / ``--<role>-file`` pair as a checked :class:`TextSource` (``default`` dataset when
    neither is given). Reads nothing but the file's existence."""
    if dataset is not None and file is not None:
        raise ConfigError(f"--{role}-dataset and --{role}-file exclude each other; pass one")
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"--{role}-file {path} does not exist (or is not a file)")
        if not isinstance(field, str) or not field:
            raise ConfigError(f"--text-field {field!r} is invalid; name the JSON Lines field that holds the text")
        return TextSource(file=path, field=field)
    name = dataset if dataset is not None else default
    corpora = list_datasets(kind="lm")
    if name not in corpora:
        raise ConfigError(
            f"--{role}-dataset {name!r} is not a language-modelling dataset; use one of {', '.join(corpora)}, "
            f"or --{role}-file PATH"
        )
    return TextSource(dataset=name)


def default_eval_source(calib: TextSource) -> TextSource:
    """The cross-domain evaluation text when none is given: a source other than the calibration's."""
    return TextSource(dataset=DEFAULT_CALIB if calib.dataset == DEFAULT_EVAL else DEFAULT_EVAL)


def check_compress_args(
    model: str,
    remove: int,
    select: str = "auto",
    recover: str = "ghosted",
    out: str | os.PathLike | None = None,
    block: int = 256,
    calib_windows: int = 64,
    eval_windows: int = 16,
    num_clusters: int | None = None,
    ridge: float = 1e-6,
) -> None:
    """A one-line ConfigError naming the first bad option (as ``--option``), its value and what is accepted.

    Takes ``run_compress``'s arguments in its order (the text sources are checked by :func:`text_source`); loads
    nothing and creates nothing.
    """
    if model not in CAUSAL_LMS:
        raise ConfigError(f"--model {model!r} is not a pretrained decoder LM here; use one of {', '.join(CAUSAL_LMS)}")
    check_choice("select", select, SELECTORS)
    check_choice("recover", recover, RECOVERIES)
    layers = CAUSAL_LMS[model]
    free = layers - len({p % layers for p in PROTECTED})
    if not _is_int(remove) or not 1 <= remove <= free:
        raise ConfigError(
            f"--remove {remove!r} is invalid: cannot remove {remove!r} of {layers} layers of {model} "
            f"(the first and last are protected); choose 1..{free}"
        )
    for name, value in (("block", block), ("calib-windows", calib_windows), ("eval-windows", eval_windows)):
        if not _is_int(value) or value < 1:
            raise ConfigError(f"--{name} {value!r} is invalid; it must be >= 1")
    if num_clusters is not None and (not _is_int(num_clusters) or not 1 <= num_clusters < layers):
        raise ConfigError(f"--num-clusters {num_clusters!r} is invalid; it must be an integer in [1, {layers - 1}]")
    if isinstance(ridge, bool) or not isinstance(ridge, int | float) or not math.isfinite(ridge) or ridge < 0:
        raise ConfigError(f"--ridge {ridge!r} is invalid; it must be a finite number >= 0")
    if out is not None:
        check_output_folder(Path(out))


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    """A ConfigError naming ``--option``, ``value`` and the valid ``choices`` unless ``value`` is one of them."""
    if value not in choices:
        raise ConfigError(f"--{option} {value!r} is invalid; use one of {', '.join(choices)}")


def check_output_folder(out: Path) -> None:
    """``out`` must be an empty folder, or a path whose folders can be created (nothing is created here)."""
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out} is a file; choose a new or an empty folder")
        if any(out.iterdir()):
            raise ConfigError(f"--out {out} exists and is not empty; choose a new folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {out} is not writable; choose a folder you can write to")
        return
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out} cannot be created: {parent} is a file; choose another folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} cannot be created: {parent} is not writable; choose another folder")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
