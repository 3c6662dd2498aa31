"""npe2 writer: a labels layer -> lossless TIFF + its per-cell table as ``<stem>_cells.csv``
(``x_cells.csv`` for the batch tool's ``x_labels.tif``: see :func:`~napari_wbc.core.io.cells_table_path`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .core.io import SAVED_META_KEYS, atomic_write, batch_labels_beside, cells_table_path, folder_lock

TIFF_SUFFIXES = (".tif", ".tiff")
LOCK_TIMEOUT_S = 10.0  # napari's UI waits at most this long for a batch run writing in the same folder


def labels_dtype(data: np.ndarray) -> np.dtype:
    """uint16 when every id fits, else uint32. Negative ids are refused."""
    if data.size and data.min() < 0:
        raise ValueError("labels hold negative ids; a labels TIFF needs ids >= 0")
    top = int(data.max()) if data.size else 0
    if top < 2**16:
        return np.dtype(np.uint16)
    if top < 2**32:
        return np.dtype(np.uint32)
    raise ValueError(f"label id {top} does not fit in 32 bits")


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Write labels to ``path`` (.tif) and ``meta['features']`` to ``<stem>_cells.csv`` beside it
    (``x_cells.csv`` for ``x_labels.tif``, the table the batch tool reads with it).

    Both files are written atomically. A per-cell table (one with a ``label`` column) is first
    brought up to date with the labels (geometry measured again, erased cells dropped, painted
    cells added untyped; types and corrections kept per label). An empty feature table still gives
    a CSV, with one ``index`` row per label id present. Returns the written paths.
    """
    import pandas as pd
    import tifffile

    tif_path = Path(path)
    if tif_path.suffix.lower() not in TIFF_SUFFIXES:
        tif_path = tif_path.with_name(tif_path.name + ".tif")
    if (meta or {}).get("multiscale") or (isinstance(data, (list, tuple)) and len(data) and np.ndim(data[0]) >= 2):
        data = data[0]  # a multiscale layer: its full-resolution level (np.asarray would give the last)
    labels = np.asarray(data)
    if labels.dtype.kind not in "uib":
        raise ValueError(f"cannot write {tif_path.name!r}: labels must be integers, got {labels.dtype}")
    labels = labels.astype(labels_dtype(labels), copy=False)

    features = (meta or {}).get("features")
    table = pd.DataFrame(features) if features is not None else pd.DataFrame()
    if "label" in table.columns:
        from .core.segment import remeasure

        # a per-cell table (ours) follows the labels as saved: edits made without the Classify widget
        # open would otherwise leave rows of erased cells, stale areas, and no row for painted cells
        table, _, _ = remeasure(table, labels)
    elif table.empty and len(table.columns) == 0:
        ids = np.unique(labels)
        table = pd.DataFrame({"index": ids[ids != 0]})

    # the image the labels belong to (napari-wbc's layer metadata), so that opening the file again
    # pairs it with that image, not with any image of the same size
    source = ((meta or {}).get("metadata") or {}).get("napari_wbc") or {}
    keep = {k: source[k] for k in SAVED_META_KEYS if source.get(k) is not None}
    description = json.dumps({"napari_wbc": keep}) if keep else None
    csv_path = cells_table_path(tif_path)
    tif_path.parent.mkdir(parents=True, exist_ok=True)
    # the batch tool's lock on the folder: a correction saved while a run writes this image's outputs
    # waits for it (and replaces them), or is written first (and the run, checking again, keeps it)
    with folder_lock(tif_path.parent, timeout=LOCK_TIMEOUT_S):
        owner = batch_labels_beside(tif_path)
        if owner is not None and not tif_path.stem.endswith("_labels"):  # x.tif beside the batch's x_labels.tif:
            raise ValueError(  # x_cells.csv is that file's table (the batch counts it); nothing written
                f"cannot save {tif_path.name!r} here: its cells table {csv_path.name!r} belongs to {owner.name!r} "
                f"beside it (the batch tool's outputs); save as {owner.name!r} to correct those, or under another name")
        atomic_write(tif_path, lambda tmp: tifffile.imwrite(tmp, labels, compression="zlib", description=description,
                                                            metadata=None if description else {}))
        atomic_write(csv_path, lambda tmp: table.to_csv(tmp, index=False))
    return [str(tif_path), str(csv_path)]
