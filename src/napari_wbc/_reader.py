"""npe2 reader: smear images, with their masks and Pascal VOC boxes when they sit beside them.

Opening ``x.jpg`` gives:

- an image layer ``x`` (RGB when the file is colour; greyscale, 16-bit and float
  images keep their values and get contrast limits that span the data);
- a labels layer ``x mask`` when a mask belongs to it (``x-mask.jpg`` beside it,
  or ``../masks/x.png``), split into connected components;
- a shapes layer ``x WBC boxes`` when a Pascal VOC ``x.xml`` sits beside it or in
  ``../annotations/``, with one rectangle per WBC box.

Opening a mask file itself (``x-mask.jpg``, or a file under ``masks/``) gives a
labels layer, and so does a labels TIFF saved by our writer (``x.tif`` with
``x_cells.csv`` beside it), with the CSV as the layer's features.

A file that cannot be decoded raises ``ImageReadError`` naming the file; napari
shows that as a notification.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .core.io import (
    MASK_SUFFIXES,
    ImageReadError,
    find_mask,
    find_voc,
    saved_cells_table,
    saved_source,
    is_image_path,
    labels_for_layer,
    looks_like_labels,
    named_as_labels,
    read_image,
    read_mask,
    read_voc_boxes,
    to_rgb,
)

BOX_EDGE_COLOR = "yellow"
BOX_EDGE_WIDTH = 3


def napari_get_reader(path):
    """Return a reader function when every path is an image file we read, else None."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    if not paths:
        return None
    for p in paths:
        if not isinstance(p, (str, os.PathLike)):
            return None
        if not is_image_path(p) or Path(p).is_dir():
            return None
    return read_smear


def read_smear(path) -> list[tuple]:
    """Layer data tuples for one path or a list of paths (see the module docstring)."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    layers: list[tuple] = []
    for p in paths:
        layers.extend(_read_one(Path(p)))
    return layers


def is_mask_path(path) -> bool:
    """A file that holds a mask: ``x-mask.*`` / ``x_mask.*``, or anything under a ``masks/`` folder."""
    path = Path(path)
    return any(path.stem.lower().endswith(s) for s in MASK_SUFFIXES) or path.parent.name.lower() == "masks"


def _read_one(path: Path) -> list[tuple]:
    meta = {"path": str(path)}
    cells_csv = saved_cells_table(path)  # x.tif + x_cells.csv; the CLI's x_labels.tif + x_cells.csv
    arr = None
    if named_as_labels(path):
        arr = read_image(path)
        if arr.ndim == 2 and arr.dtype.kind in "ui":
            return [_saved_labels_layer(path, cells_csv, arr)]
        # not a label image (colour, or not integer): a smear that only shares the table's name
    elif is_mask_path(path):
        name = path.stem if any(path.stem.lower().endswith(s) for s in MASK_SUFFIXES) else f"{path.stem} mask"
        return [(labels_for_layer(read_mask(path)), {"name": name, "metadata": meta}, "labels")]

    if arr is None:
        arr = read_image(path)
    if path.suffix.lower() in (".tif", ".tiff") and looks_like_labels(arr):  # e.g. saved with napari's own
        # writer (no cells table): a labels layer, which Classify and Train can use, not an image
        return [(labels_for_layer(arr), {"name": path.stem, "metadata": meta}, "labels")]
    layers = [_image_layer(path, arr)]
    shape2d = layers[0][0].shape[:2]

    mask_path = find_mask(path)
    if mask_path is not None:
        mask_layer = _side_layer(path, mask_path, lambda: _mask_layer(path, mask_path, shape2d))
        if mask_layer is not None:
            layers.append(mask_layer)

    voc_path = find_voc(path)
    if voc_path is not None:
        box_layer = _side_layer(path, voc_path, lambda: _box_layer(path, voc_path))
        if box_layer is not None:
            layers.append(box_layer)
    return layers


def _saved_labels_layer(path: Path, cells_csv: Path, labels: np.ndarray) -> tuple:
    """A 2-D integer labels TIFF (read as ``labels``) + ``<stem>_cells.csv`` as written by ``write_labels``:
    ids kept as stored."""
    import pandas as pd

    kwargs = {"name": path.stem, "metadata": {"path": str(path)}}
    source = saved_source(path)
    if source:  # the image it was saved from (napari-wbc's writer): paired with it again by name
        kwargs["metadata"]["napari_wbc"] = source
    try:
        if cells_csv.is_file():
            features = pd.read_csv(cells_csv)
            if "index" not in features.columns and "label" in features.columns:
                features.insert(0, "index", features["label"])  # napari's label-id column
            kwargs["features"] = features
    except (OSError, ValueError) as e:  # pandas' parser errors are ValueErrors
        warnings.warn(f"Opened {path.name!r} without its table {cells_csv.name!r}: {e}", stacklevel=3)
    lab = labels_for_layer(labels)  # uint16 when the ids fit: napari edits those fastest
    if lab.dtype != np.uint16:
        lab = lab.astype(np.int32 if labels.max(initial=0) < 2**31 else np.int64)
    return (lab, kwargs, "labels")


def _image_layer(path: Path, arr: np.ndarray) -> tuple:
    kwargs: dict = {"name": path.stem, "metadata": {"path": str(path)}}
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = to_rgb(arr)  # drops alpha
        kwargs["rgb"] = True
    else:
        kwargs["rgb"] = False
        kwargs["colormap"] = "gray"
    if arr.dtype != np.uint8:
        kwargs["contrast_limits"] = _data_range(arr)
    return (arr, kwargs, "image")


def _data_range(arr: np.ndarray) -> list[float]:
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
    if finite.size == 0:
        return [0.0, 1.0]
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + 1.0
    return [lo, hi]


def _side_layer(image_path: Path, side_path: Path, make):
    """Build the layer for a file found beside the image; on failure warn and open the image anyway."""
    try:
        return make()
    except (ImageReadError, ValueError) as e:
        warnings.warn(f"Opened {image_path.name!r} without {side_path.name!r}: {e}", stacklevel=3)
        return None


def _mask_layer(image_path: Path, mask_path: Path, shape2d) -> tuple:
    labels = labels_for_layer(read_mask(mask_path))
    if labels.shape[:2] != tuple(shape2d):
        raise ValueError(f"mask is {labels.shape[:2]} but the image is {tuple(shape2d)}")
    meta = {"path": str(mask_path)}
    return (labels, {"name": f"{image_path.stem} mask", "metadata": meta}, "labels")


def _box_layer(image_path: Path, voc_path: Path):
    boxes = read_voc_boxes(voc_path, names=("WBC",))
    if not boxes:
        return None
    rects = [
        np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], dtype=float) for _, y0, x0, y1, x1 in boxes
    ]
    kwargs = {
        "name": f"{image_path.stem} WBC boxes",
        "shape_type": "rectangle",
        "edge_color": BOX_EDGE_COLOR,
        "edge_width": BOX_EDGE_WIDTH,
        "face_color": "transparent",
        "features": {"label": [name for name, *_ in boxes]},
        "metadata": {"path": str(voc_path)},
    }
    return (rects, kwargs, "shapes")
