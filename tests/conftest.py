"""Shared test fixtures.

Real data is looked up in ``$NAPARI_WBC_DATA`` (default: ``../shared/data`` next to
the repository); tests that need it skip when it is absent, so a fresh clone
still runs the rest.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# tiny networks gain nothing from threads, and oversubscribed OpenMP threads are slow
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("NAPARI_WBC_DATA", REPO_ROOT.parent / "shared" / "data"))

requires_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"no test data at {DATA_DIR} (set NAPARI_WBC_DATA)")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder; skips the test when it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"no test data at {DATA_DIR} (set NAPARI_WBC_DATA)")
    return DATA_DIR


@pytest.fixture(scope="session")
def data_file(data_dir):
    """``data_file("sigtuple/train/train-1.jpg")`` -> its path; skips when the file is absent."""

    def get(relpath: str) -> Path:
        path = data_dir / relpath
        if not path.is_file():
            pytest.skip(f"test data file {path} is absent")
        return path

    return get


@pytest.fixture(scope="session")
def sample_path() -> Path:
    """The BCCD smear shipped in the package."""
    from napari_wbc._sample_data import sample_path

    return sample_path()


@functools.cache
def _qt_has_opengl() -> bool:
    """Whether Qt can create an OpenGL context here (``offscreen`` without an X display cannot)."""
    from qtpy.QtGui import QOpenGLContext

    return QOpenGLContext().create()


class _HeadlessGL:
    """Answers napari's OpenGL capability probes where there is no OpenGL at all."""

    GL_EXTENSIONS = 0x1F03
    GL_MAX_TEXTURE_SIZE = 0x0D33

    @classmethod
    def glGetParameter(cls, pname):
        return "" if pname == cls.GL_EXTENSIONS else 2048


@pytest.fixture
def make_napari_viewer(make_napari_viewer, qapp, monkeypatch):
    """napari's ``make_napari_viewer``, usable on a headless machine without OpenGL.

    There napari's texture probes cannot query a driver and adding an image layer
    fails, so the probes get fixed answers (nothing is drawn headless anyway).
    With a display (or xvfb) nothing is patched and the real OpenGL path runs.
    """
    if not _qt_has_opengl():
        import contextlib

        import napari._vispy.utils.gl as napari_gl

        def clear_caches():
            napari_gl.get_gl_extensions.cache_clear()
            napari_gl.get_max_texture_sizes.cache_clear()

        monkeypatch.setattr(napari_gl, "gl", _HeadlessGL)
        monkeypatch.setattr(napari_gl, "_opengl_context", contextlib.nullcontext)
        clear_caches()
        yield make_napari_viewer
        clear_caches()
    else:
        yield make_napari_viewer


# ---------------------------------------------------------------- widget tests (tests/test_widget_*.py)
@pytest.fixture(scope="session")
def tiny_segmenter(tmp_path_factory) -> Path:
    """A tiny random segmenter (target diameter 16 px) written to a temporary folder."""
    from napari_wbc.core.testing import make_tiny_segmenter

    return make_tiny_segmenter(tmp_path_factory.mktemp("tiny_models") / "tiny_seg.safetensors", target_diameter=16)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    """A tiny random classifier written to a temporary folder."""
    from napari_wbc.core.testing import make_tiny_classifier

    return make_tiny_classifier(tmp_path_factory.mktemp("tiny_models") / "tiny_cls.safetensors")


@pytest.fixture
def user_models(tmp_path, monkeypatch) -> Path:
    """The user's model folder, redirected to an empty temporary folder."""
    import napari_wbc.core.finetune as ft

    folder = tmp_path / "user_models"
    monkeypatch.setattr(ft, "user_models_dir", lambda: folder)
    return folder


@pytest.fixture
def disc_smear():
    """``(image, labels)``: a 64x64 RGB smear-like image with 4 dark discs (r=7) and their int32 labels."""
    import numpy as np

    yy, xx = np.mgrid[:64, :64]
    labels = np.zeros((64, 64), np.int32)
    for i, (cy, cx) in enumerate([(14, 14), (14, 48), (48, 16), (46, 46)], start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 49] = i
    rng = np.random.default_rng(0)
    image = np.empty((64, 64, 3), np.uint8)
    image[:] = (235, 200, 215)
    image[labels > 0] = (110, 60, 150)
    image = np.clip(image.astype(int) + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    return image, labels
