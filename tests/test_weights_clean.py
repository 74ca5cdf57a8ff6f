"""finetune's clean_state_dict strips the wrapper prefixes as timm's does, without importing timm."""

from __future__ import annotations

import subprocess
import sys

import pytest

from finetune.models.weights import clean_state_dict

KEYS = ["fc.weight", "module.fc.weight", "_orig_mod.fc.weight", "_orig_mod.module.fc.weight",
        "module._orig_mod.fc.weight", "module.module.fc.weight", "_orig_mod._orig_mod.module.x", "a.module.b",
        "modulex.y", "_orig_modx.y", "module.", ""]


def test_clean_state_dict_equals_timms():
    from timm.models import clean_state_dict as timm_clean

    sd = {k: i for i, k in enumerate(KEYS)}
    assert clean_state_dict(sd) == timm_clean(sd)
    assert list(clean_state_dict(sd)) == list(timm_clean(sd))  # the same order, the same collisions


@pytest.mark.subprocess
def test_clean_state_dict_imports_no_timm():
    code = ("import sys; from finetune.models.weights import clean_state_dict; clean_state_dict({'module.a': 1}); "
            "print('timm' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
