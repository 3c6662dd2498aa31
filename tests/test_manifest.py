"""The npe2 manifest is valid and every python_name it names imports."""
from __future__ import annotations

import importlib
import importlib.util
from importlib.resources import files

import pytest
from npe2 import PluginManifest

MANIFEST = PluginManifest.from_file(str(files("napari_wbc") / "napari.yaml"))


def test_manifest_from_distribution():
    manifest = PluginManifest.from_distribution("napari-wbc")  # validates the schema
    assert manifest.name == "napari-wbc"
    contrib = manifest.contributions
    assert contrib.readers and contrib.writers and contrib.sample_data
    assert [s.key for s in contrib.sample_data] == ["bccd_smear"]


@pytest.mark.parametrize("command", MANIFEST.contributions.commands, ids=lambda c: c.id)
def test_python_name_imports(command):
    module_name, _, attr = command.python_name.partition(":")
    if importlib.util.find_spec(module_name) is None:
        # Widgets land in their own issues; once the module file exists this test is strict.
        pytest.skip(f"{module_name} is not written yet")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attr)), f"{command.python_name} is not callable"


def test_every_contribution_points_at_a_command():
    ids = {c.id for c in MANIFEST.contributions.commands}
    contrib = MANIFEST.contributions
    for item in [*contrib.readers, *contrib.writers, *contrib.sample_data, *contrib.widgets]:
        assert item.command in ids
