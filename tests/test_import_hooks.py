"""`import leantrain` makes GEM and PaCA PEFT methods and ghosted models HF models, importing neither library."""

import subprocess
import sys

import pytest

pytest.importorskip("peft")


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_import_leantrain_does_not_import_peft_or_transformers():
    code = "import sys, leantrain, leantrain.cli; print('peft' in sys.modules, 'transformers' in sys.modules)"
    assert _python(code) == "False False"


def test_tuners_registered_when_peft_is_imported_after_leantrain():
    code = (
        "import leantrain, peft\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as M\n"
        "print(M['GEM'].__name__, M['PACA'].__name__, peft.__spec__ is not None)"
    )
    assert _python(code) == "GemConfig PacaConfig True"


def test_tuners_registered_when_peft_was_imported_first():
    code = "import peft, leantrain\nfrom peft.utils.peft_types import PeftType\nprint(PeftType.GEM, PeftType.PACA)"
    assert _python(code) == "PeftType.GEM PeftType.PACA"
