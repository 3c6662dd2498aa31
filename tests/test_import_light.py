"""Importing the package (and opening images) never loads torch, napari or Qt."""
from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "napari", "qtpy", "PySide6", "PySide2", "PyQt5", "PyQt6", "vispy")
CHECK = """
import sys, importlib
importlib.import_module({module!r})
print(" ".join(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


@pytest.mark.parametrize(
    "module",
    ["napari_wbc", "napari_wbc.core.io", "napari_wbc._reader", "napari_wbc._writer", "napari_wbc._sample_data"],
)
def test_import_is_light(module):
    out = subprocess.run(
        [sys.executable, "-c", CHECK.format(module=module, heavy=HEAVY)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == "", f"importing {module} loaded {out}"


def test_public_api_is_lazy():
    code = "import napari_wbc, sys; print(sorted(set(dir(napari_wbc)) & {'segment', 'classify', 'finetune'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "segment" in out
