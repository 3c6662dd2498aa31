"""npe2 sample data: one BCCD smear shipped in the package (MIT, see data/LICENSE_BCCD.txt).

Qt-free: the CLI and tests use :func:`sample_path` without napari.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SAMPLE_NAME = "BloodImage_00000"


def sample_path() -> Path:
    """Path of the shipped BCCD smear (640x480 RGB JPEG)."""
    return Path(str(files("napari_wbc") / "data" / f"{SAMPLE_NAME}.jpg"))


def make_sample_data() -> list[tuple]:
    """The BCCD smear as one RGB image layer named ``BloodImage_00000``."""
    from .core.io import read_image, to_rgb

    path = sample_path()
    rgb = to_rgb(read_image(path))
    return [(rgb, {"name": SAMPLE_NAME, "rgb": True, "metadata": {"path": str(path)}}, "image")]
