"""Batch processing of smear images: per-image outputs, a run summary and an HTML report.

Qt-free and napari-free; :mod:`napari_wbc.cli` is a thin layer over it.

Per image ``<name>`` (the file's stem, disambiguated when two inputs share one)
the output folder gets, each file written atomically (temp file + rename):

- ``<name>_labels.tif``: the instance labels, lossless (zlib) uint16 or uint32;
- ``<name>_cells.csv``: one row per cell, label, cell type, confidence, class
  probabilities, area, centroid and bounding box;
- ``<name>.done``: a small JSON marker written *last*, holding the image's
  summary row and the source file's size and mtime.

An image counts as done only when its marker exists, both outputs exist and
the marker names the same, unchanged source file; a run killed half way
therefore leaves at most outputs under a pending marker (which still holds the
record of the outputs as napari-wbc wrote them), and the next run redoes them,
unless they were corrected by hand since.

:func:`process_one` is the unit of work: a top-level, picklable function, so
it can run in a process pool or on a dask.distributed cluster
(``client.map(process_one, paths, out_dir=..., settings=...)``).
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .classify import CLASSES, OTHER, PROB_COLUMNS, percentages
from .io import (
    IMAGE_SUFFIXES,
    MASK_SUFFIXES,
    atomic_write,
    folder_lock,
    free_path,
    is_labels_tiff,
    remove_stale_temporaries,
)

CELL_COLUMNS = [
    "label", "cell_type", "confidence", *PROB_COLUMNS,
    "area", "centroid-0", "centroid-1", "bbox-0", "bbox-1", "bbox-2", "bbox-3",
]
# outline colours in the report (RGB); cells without a type are drawn in yellow
CLASS_COLOURS = {
    "neutrophil": (230, 25, 75),
    "lymphocyte": (0, 130, 200),
    "monocyte": (60, 180, 75),
    "eosinophil": (245, 130, 48),
    "basophil": (145, 30, 180),
    OTHER: (176, 176, 176),  # as the Classify dock draws it (#b0b0b0)
}
UNTYPED_COLOUR = (255, 225, 25)
THUMBNAIL_SIZE = 400
LABELS_SUFFIX = "_labels.tif"
CELLS_SUFFIX = "_cells.csv"
DONE_SUFFIX = ".done"
STATUS_OK, STATUS_SKIPPED, STATUS_FAILED = "ok", "skipped", "failed"


class OutputConflict(RuntimeError):
    """Existing outputs that a run must not replace without ``overwrite``."""


@dataclass(frozen=True)
class Settings:
    """How to process each image (picklable; paths should be absolute for remote workers).

    model : segmenter ``.safetensors`` path, or None for the shipped one.
    classifier : classifier ``.safetensors`` path, or None: the classifier fine-tuned with ``model``
        when its card names one (as the Segment widget does), else the shipped one.
    classify : False to count cells without typing them.
    device : None/"auto" or a torch device string, resolved where the image is processed.
    diameter : expected WBC diameter in pixels; None estimates it per image.
    overwrite : redo images whose outputs already exist, replacing them. Without it, outputs that are
        another image's, have no marker, or were changed by hand make that image fail (kept as they are).
    torch_threads : if set, ``torch.set_num_threads`` in the process doing the work.
    thumbnail : put a base64 PNG preview in the returned row (for the report).
    """

    model: str | None = None
    classifier: str | None = None
    classify: bool = True
    device: str | None = None
    diameter: float | None = None
    overwrite: bool = False
    torch_threads: int | None = None
    thumbnail: bool = True


# ------------------------------------------------------------------ inputs
def is_mask_name(path) -> bool:
    """``x-mask.jpg`` / ``x_mask.png``: a mask, not an image to segment."""
    return any(Path(path).stem.lower().endswith(s) for s in MASK_SUFFIXES)


def _is_output_file(path: Path) -> bool:
    return path.name.endswith(LABELS_SUFFIX)


def _is_our_output(path: Path) -> bool:
    """A ``x_labels.tif`` an earlier run wrote (its ``x.done`` marker beside it), wherever it lies:
    not a smear to segment, even in a folder that is not this run's ``--out``."""
    return _is_output_file(path) and path.with_name(path.name[: -len(LABELS_SUFFIX)] + DONE_SUFFIX).is_file()


def _walk_files(root: Path) -> list[Path]:
    """Every file under ``root``, in path order, following linked sub-folders (``Path.rglob`` skips
    them on Python < 3.13) but entering each real folder once (a link to a parent is no loop)."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        out += [Path(dirpath) / f for f in filenames]
    return sorted(out)


def collect_images(paths: Iterable, *, recursive: bool = False, exclude: Sequence = ()) -> tuple[list[Path], list[str]]:
    """Expand files and folders into the image files to process.

    Folders contribute their files with an image suffix (:data:`IMAGE_SUFFIXES`),
    in name order, descending into sub-folders only when ``recursive``. Mask files
    (``*-mask.*``, ``*_mask.*``), files under a ``masks/`` sub-folder, hidden files
    and our own ``*_labels.tif`` outputs are left out, as is anything under a folder
    of ``exclude`` (the output folder), and labels TIFFs (:func:`~.io.is_labels_tiff`:
    napari-wbc's outputs without their marker, labels saved from napari). Files named
    explicitly are kept whatever their suffix (an unsupported one then fails with a
    clear reason), except masks and labels TIFFs.

    Returns ``(files, notes)``: the files (each once, input order) and messages
    about what was left out. A missing path is returned as a file, so that it is
    reported as failed.
    """
    excl = [Path(e).resolve() for e in exclude]
    files: list[Path] = []
    notes: list[str] = []
    seen: set = set()

    def add(p: Path):
        key = p.resolve() if p.exists() else p.absolute()
        if key not in seen:
            seen.add(key)
            files.append(p)

    def excluded(p: Path) -> bool:
        rp = p.resolve()
        return any(rp == e or e in rp.parents for e in excl)

    n_masks = 0
    labels: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = _walk_files(p) if recursive else sorted(p.iterdir())
            for f in found:
                if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                rel = f.relative_to(p)
                if any(part.startswith(".") for part in rel.parts):
                    continue
                if "masks" in (part.lower() for part in rel.parts[:-1]) or is_mask_name(f):
                    n_masks += 1
                    continue
                if _is_output_file(f) and (excluded(f.parent) or _is_our_output(f)):
                    continue
                if recursive and excluded(f.parent) and not excluded(p):
                    continue
                if is_labels_tiff(f):
                    labels.append(f)
                    continue
                add(f)
        elif is_mask_name(p):
            n_masks += 1
        elif is_labels_tiff(p):
            labels.append(p)
        else:
            add(p)  # a missing or unreadable file is reported as failed by process_one
    if n_masks:
        notes.append(f"left out {n_masks} mask file(s) (*-mask.*, *_mask.*, masks/)")
    if labels:
        shown = ", ".join(repr(str(f)) for f in labels[:5])
        if len(labels) > 5:
            shown += f" and {len(labels) - 5} more"
        notes.append(f"left out {len(labels)} labels image(s), not smears (napari-wbc's outputs, labels saved "
                     f"from napari): {shown}")
    return files, notes


def output_names(files: Sequence[Path], out_dir=None) -> list[str]:
    """A distinct output name per input: its stem, or ``<folder>_<stem>`` for shared stems.

    Still-colliding names (same stem, same folder name) get ``-2``, ``-3``... in
    input order. An input that has outputs in ``out_dir`` from an earlier run (a
    marker there names it) keeps their name, and the others keep clear of it: adding
    ``a.tif`` beside ``a.png`` renames the newcomer only, never outputs already made
    (corrected by hand, perhaps). Otherwise the names depend only on the list of
    inputs, so re-running the same command finds the same outputs.
    """
    earlier = _earlier_names(out_dir) if out_dir is not None else {}
    kept = [earlier.pop(_source_key(f), None) for f in files]  # (popped: an input listed twice keeps it once)
    stems = [Path(f).stem for f in files]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s.lower()] = counts.get(s.lower(), 0) + 1
    names = []
    for f, s in zip(files, stems):
        if counts[s.lower()] > 1:
            parent = Path(f).absolute().parent.name or "root"
            s = f"{parent}_{s}"
        names.append(s)
    seen = {n.lower() for n in kept if n is not None}  # earlier outputs' names come first
    taken = {n.lower() for n in names} | seen  # case-insensitive file systems
    out = []
    for n, old in zip(names, kept):
        if old is not None:
            out.append(old)
            continue
        k, i = n.lower(), 1
        if k in seen:  # -2, -3... but never a name another input has (p_a-2.png beside two p_a)
            i = 2
            while f"{k}-{i}" in taken or f"{k}-{i}" in seen:
                i += 1
        seen.add(k if i == 1 else f"{k}-{i}")
        out.append(n if i == 1 else f"{n}-{i}")
    return out


def _source_key(path) -> str:
    try:
        return str(Path(path).resolve())  # as the marker's stamp names it
    except (OSError, RuntimeError):  # a link loop
        return str(Path(path).absolute())


def _earlier_names(out_dir) -> dict[str, str]:
    """Source file (resolved path) -> output name, from the markers of earlier runs in ``out_dir``
    (of two markers naming one source, the one written last)."""
    found: dict[str, tuple[int, str]] = {}
    try:
        markers = sorted(Path(out_dir).glob(f"*{DONE_SUFFIX}"))
    except OSError:
        return {}
    for done in markers:
        name = done.name[: -len(DONE_SUFFIX)]
        marker = _read_marker(output_paths(done.parent, name))
        source = ((marker or {}).get("stamp") or {}).get("source")
        try:
            when = done.stat().st_mtime_ns
        except OSError:
            continue
        if isinstance(source, str) and (source not in found or when > found[source][0]):
            found[source] = (when, name)
    return {source: name for source, (_, name) in found.items()}


def output_paths(out_dir, name: str) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {
        "labels": out_dir / f"{name}{LABELS_SUFFIX}",
        "cells": out_dir / f"{name}{CELLS_SUFFIX}",
        "done": out_dir / f"{name}{DONE_SUFFIX}",
    }


def _source_stamp(path: Path) -> dict:
    st = path.stat()
    return {"source": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_marker(outs: dict) -> dict | None:
    try:
        marker = json.loads(outs["done"].read_text())
        return marker if isinstance(marker, dict) else None
    except (OSError, ValueError):
        return None


def _is_done(path, outs: dict, marker: dict | None, classify: bool) -> bool:
    """Whether ``marker`` (:func:`_read_marker`) vouches for complete, current outputs ``outs`` of
    ``path`` (typed, when ``classify``)."""
    if marker is None or marker.get("pending") or not isinstance(marker.get("row"), dict):
        return False
    if not (outs["labels"].is_file() and outs["cells"].is_file()):
        return False
    try:
        path = Path(path)
        if not path.is_file() or marker.get("stamp") != _source_stamp(path):
            return False
    except OSError:
        return False
    return not (classify and not marker["row"].get("classified"))  # counted untyped earlier: type them now


def hand_edited(outs: dict, marker: dict) -> list[str]:
    """Which of the outputs (``"labels"``, ``"cells"``) changed after napari-wbc wrote them."""
    written = marker.get("outputs") or {}
    return [k for k in ("labels", "cells") if k in written and outs[k].exists() and written[k] != _file_stamp(outs[k])]


def recount_from_outputs(outs: dict, row: dict, edited: Sequence[str]) -> dict:
    """``row`` with its counts taken from the outputs as they are now (corrected by hand): the
    cells of the labels file (when it was edited) with their types from the cells table.

    Raises ValueError naming the file when an edited output cannot be read."""
    import pandas as pd

    try:
        table = pd.read_csv(outs["cells"])
        if "label" not in table:
            raise ValueError("no 'label' column")
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(outs['cells'])!r} (changed after napari-wbc wrote it) cannot be read: {e}") from None
    types = table["cell_type"] if "cell_type" in table else pd.Series([None] * len(table))
    by_label = {int(lid): t for lid, t in zip(table["label"], types)}
    if "labels" in edited:
        import tifffile

        try:
            ids = np.unique(tifffile.imread(str(outs["labels"])))
        except Exception as e:  # noqa: BLE001 - any reader failure is reported with the file
            raise ValueError(f"{str(outs['labels'])!r} (changed after napari-wbc wrote it) cannot be read: {e}") from None
        cell_types = [by_label.get(int(i)) for i in ids if i > 0]
    else:
        cell_types = list(by_label.values())
    row = dict(row, n_wbc=len(cell_types), edited=list(edited))
    if row.get("classified"):
        row["count"], row["percent"] = differential(cell_types)
    return row


def check_replaceable(path, outs: dict, marker: dict | None) -> None:
    """Raise OutputConflict unless the existing outputs ``outs`` (with their ``marker``,
    :func:`_read_marker`) may be replaced without ``overwrite``: they must have been written by
    napari-wbc for this same source file and not changed since (a labels file corrected by hand, or
    another image's outputs, are kept)."""
    existing = [outs[k] for k in ("labels", "cells") if outs[k].exists()]
    if not existing:
        return
    out_dir = outs["done"].parent
    if marker is None:
        raise OutputConflict(
            f"{str(existing[0])!r} exists but no napari-wbc marker ({outs['done'].name}) says which image it "
            f"belongs to; not overwritten: pass --overwrite (Settings.overwrite) or choose another output folder")
    source = (marker.get("stamp") or {}).get("source")
    if source != str(Path(path).resolve()):
        raise OutputConflict(
            f"the outputs {', '.join(repr(e.name) for e in existing)} in {str(out_dir)!r} were written for another "
            f"image ({source!r}); not overwritten: pass --overwrite (Settings.overwrite) or choose another output folder")
    edited = hand_edited(outs, marker)
    if edited:
        raise OutputConflict(
            f"{str(outs[edited[0]])!r} changed after napari-wbc wrote it (corrected by hand?); not overwritten: "
            f"pass --overwrite (Settings.overwrite) or move it away")


# ------------------------------------------------------------------ one image
def _set_threads(n):
    if n:
        import torch

        if torch.get_num_threads() != int(n):
            torch.set_num_threads(int(n))


def _write_labels(path: Path, labels: np.ndarray, source: dict | None = None) -> None:
    """``source``: what made the labels (``model``, ``classifier``...), recorded in the TIFF's description
    as napari-wbc's writer does (:func:`~napari_wbc.core.io.saved_source` reads it back)."""
    import tifffile

    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    arr = labels.astype(dtype)
    description = json.dumps({"napari_wbc": source}) if source else None
    atomic_write(path, lambda tmp: tifffile.imwrite(tmp, arr, compression="zlib", photometric="minisblack",
                                                    description=description, metadata=None if description else {}))


def cells_table(labels: np.ndarray, types=None):
    """Join the per-cell measurements with a :func:`napari_wbc.classify` table (or none)."""
    import pandas as pd

    from .segment import cell_table

    meas = cell_table(labels)
    if types is None or len(types) == 0:
        types = pd.DataFrame({"label": pd.Series(dtype=np.int64)})
    types = types.copy()
    types["label"] = types["label"].astype(np.int64)
    meas["label"] = meas["label"].astype(np.int64)
    df = meas.merge(types, on="label", how="left")
    for c in CELL_COLUMNS:
        if c not in df.columns:
            df[c] = pd.Series([None] * len(df), dtype=object if c == "cell_type" else float)
    extra = [c for c in df.columns if c not in CELL_COLUMNS]
    return df[CELL_COLUMNS + extra]


def differential(cell_types) -> tuple[dict, dict]:
    """Counts and percentages (of the typed cells) for each class of :data:`CLASSES`, then ``other``
    (cells a user typed so by hand: counted, with no percentage, and left out of the others')."""
    vals = [t for t in cell_types if isinstance(t, str) and t]
    counts = {c: vals.count(c) for c in CLASSES}
    for t in vals:  # a classifier with other classes: keep them too
        if t != OTHER:
            counts.setdefault(t, vals.count(t))
    counts[OTHER] = vals.count(OTHER)
    return counts, percentages(counts)


def _display_rgb(image: np.ndarray) -> np.ndarray:
    """An 8-bit RGB view of any supported image (percentile-stretched unless uint8)."""
    from .io import to_rgb

    rgb = to_rgb(np.asarray(image))
    if rgb.dtype == np.uint8:
        return rgb
    x = rgb.astype(np.float32)
    lo, hi = np.percentile(x, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((x - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)


def thumbnail_png(image: np.ndarray, labels: np.ndarray, cell_types: dict | None = None,
                  size: int = THUMBNAIL_SIZE) -> bytes:
    """A PNG (bytes) of the image downscaled to ``size`` px on its long side, cells outlined.

    ``cell_types`` maps label -> class name; outlines take :data:`CLASS_COLOURS`.
    """
    from PIL import Image
    from skimage.segmentation import find_boundaries
    from skimage.transform import resize

    rgb = _display_rgb(image)
    labels = np.asarray(labels)
    h, w = labels.shape
    s = min(1.0, size / max(h, w))
    th, tw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    if (th, tw) != (h, w):
        small = np.asarray(Image.fromarray(rgb).resize((tw, th), Image.Resampling.LANCZOS))
        lab = resize(labels, (th, tw), order=0, preserve_range=True, anti_aliasing=False).astype(labels.dtype)
    else:
        small, lab = rgb.copy(), labels
    if lab.max(initial=0) > 0:
        lut = np.tile(np.array(UNTYPED_COLOUR, np.uint8), (int(lab.max()) + 1, 1))
        for lid, t in (cell_types or {}).items():
            if 0 < int(lid) < len(lut) and t in CLASS_COLOURS:
                lut[int(lid)] = CLASS_COLOURS[t]
        edge = find_boundaries(lab, mode="inner")
        if max(th, tw) >= 200:  # 2 px lines stay visible after browser scaling
            edge |= find_boundaries(lab, mode="outer") & (lab == 0)
        small = small.copy()
        small[edge] = lut[lab[edge]] if (lab[edge] > 0).all() else lut[_nearest_label(lab, edge)]
    buf = io.BytesIO()
    # a 256-colour palette keeps the report small (~100 KB per image instead of ~300 KB)
    pal = Image.fromarray(small).quantize(256, method=Image.Quantize.MEDIANCUT)
    pal.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _nearest_label(lab: np.ndarray, edge: np.ndarray) -> np.ndarray:
    """For edge pixels, the label there or (on background) of the nearest cell."""
    from scipy import ndimage as ndi

    _, (iy, ix) = ndi.distance_transform_edt(lab == 0, return_indices=True)
    return lab[iy[edge], ix[edge]]


def _thumb_b64(image, labels, types_by_label) -> str:
    return base64.b64encode(thumbnail_png(image, labels, types_by_label)).decode("ascii")


def _row_base(path: Path, name: str) -> dict:
    return {"image": name, "path": str(path), "status": STATUS_FAILED, "n_wbc": None, "error": ""}


def process_one(path, out_dir, settings: Settings | None = None, name: str | None = None) -> dict:
    """Segment (and type) the WBCs of one image file and write its outputs to ``out_dir``.

    Never raises for a bad image: the returned summary row then has
    ``status="failed"`` and ``error`` naming the file and the reason. The row
    holds ``image`` (output name), ``path``, ``status`` ("ok", "skipped" when
    complete outputs of the same source already exist, or "failed"), ``n_wbc``,
    ``seconds`` and ``error``; an "ok" or "skipped" row also ``count``/``percent``
    dicts per class (empty when not typed), ``classified``, ``diameter``, ``device``,
    and ``thumbnail`` (a base64 PNG) when ``settings.thumbnail``; a "skipped" row
    counted from outputs corrected by hand also ``edited`` (which of them).
    """
    from .io import ImageReadError, read_image

    settings = settings or Settings()
    path = Path(path)
    out_dir = Path(out_dir)
    name = name or path.stem
    row = _row_base(path, name)
    t0 = time.perf_counter()
    try:
        outs = output_paths(out_dir, name)
        marker = None if settings.overwrite else _read_marker(outs)  # read once: done? replaceable?
        if _is_done(path, outs, marker, settings.classify):
            stored = dict(marker["row"])
            edited = hand_edited(outs, marker)
            if edited:  # corrected by hand since: the counts are what the outputs say now
                stored = recount_from_outputs(outs, stored, edited)
            stored.update({"image": name, "path": str(path), "status": STATUS_SKIPPED, "error": ""})
            if settings.thumbnail:
                stored["thumbnail"] = _thumbnail_from_outputs(path, outs)
            return stored
        if not path.exists():
            raise ImageReadError(f"{str(path)!r}: no such file or folder")
        if path.is_dir():
            raise ImageReadError(f"{str(path)!r} is a folder, not an image file")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ImageReadError(
                f"{str(path)!r}: unsupported file type {path.suffix or '(none)'!r}; "
                f"expected one of {', '.join(IMAGE_SUFFIXES)}"
            )
        if path.is_file() and path.stat().st_size == 0:
            raise ImageReadError(f"{str(path)!r} is empty (0 bytes)")
        if is_labels_tiff(path):  # callers of run_batch/process_one that did not go through collect_images
            raise ImageReadError(f"{str(path)!r} is a labels image (napari-wbc's output or labels saved from "
                                 "napari), not a smear; expected a smear image")
        if not settings.overwrite:  # before the work: another image's or hand-corrected outputs are kept
            check_replaceable(path, outs, marker)
        stamp = _source_stamp(path) if path.is_file() else None
        image = read_image(path)
        _set_threads(settings.torch_threads)
        from .device import resolve_device
        from .segment import iter_segment

        dev = resolve_device(settings.device)
        labels = diameter = None
        for item in iter_segment(image, model=settings.model, device=dev, diameter=settings.diameter):
            if item[0] == "diameter":
                diameter = float(item[1])
            elif item[0] == "labels":
                labels = item[1]
        types = None
        from .models import SHIPPED

        # (opened in napari with the image, the labels pair with it: the reader names it after its file)
        source = {"image_layer": path.stem, "model": str(settings.model or SHIPPED["segmenter"])}
        if diameter is not None:
            source["diameter"] = round(diameter, 2)
        if settings.classify and labels.max(initial=0) > 0:
            from .classify import classify
            from .finetune import default_classifier

            classifier = settings.classifier or default_classifier(settings.model)
            types = classify(image, labels, model=classifier, device=dev)
            source["classifier"] = str(classifier)  # (types corrected by hand fine-tune it: napari-wbc train)
        table = cells_table(labels, types)
        counts, pct = differential(table["cell_type"]) if settings.classify else ({}, {})
        out_dir.mkdir(parents=True, exist_ok=True)
        with folder_lock(out_dir):  # another napari-wbc process writing here waits (it checks again too)
            earlier = _read_marker(outs)
            if not settings.overwrite:  # again, just before writing: minutes went by (another run's
                check_replaceable(path, outs, earlier)  # outputs, a correction saved meanwhile)
            # outputs change below: a pending marker (this source, no counts vouched for) replaces the old
            # one. It keeps the record of the outputs as napari-wbc wrote them, brought up to date as each
            # is replaced: when a write fails (disk full), the outputs left are still told from corrections
            # made to them afterwards, which the next run keeps
            record = dict((earlier or {}).get("outputs") or {})

            def write_pending():
                pending = {"stamp": stamp, "pending": True, "outputs": record}
                atomic_write(outs["done"], lambda tmp: Path(tmp).write_text(json.dumps(pending, indent=1)))

            write_pending()
            _write_labels(outs["labels"], labels, source)
            record["labels"] = _file_stamp(outs["labels"])
            write_pending()
            atomic_write(outs["cells"], lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"))
            row.update({
                "status": STATUS_OK,
                "n_wbc": int(len(table)),
                "count": counts,
                "percent": pct,
                "classified": bool(settings.classify),
                "diameter": round(diameter, 2) if diameter is not None else None,
                "device": str(dev),
                "seconds": round(time.perf_counter() - t0, 2),
            })
            # the marker vouches for these very files: written before another run may write its own
            marker = {"stamp": stamp, "row": row, "written": datetime.datetime.now().isoformat(timespec="seconds"),
                      "outputs": {k: _file_stamp(outs[k]) for k in ("labels", "cells")}}
            atomic_write(outs["done"], lambda tmp: Path(tmp).write_text(json.dumps(marker, indent=1)))
        if settings.thumbnail:
            row["thumbnail"] = _thumb_b64(image, labels, _types_by_label(table))
        return row
    except Exception as e:  # noqa: BLE001 - one bad image must not stop the run
        msg = str(e)
        if str(path) not in msg:
            msg = f"{str(path)!r}: {type(e).__name__}: {msg}"
        row.update({"status": STATUS_FAILED, "error": msg, "seconds": round(time.perf_counter() - t0, 2)})
        return row


def _types_by_label(table) -> dict:
    return {int(lid): t for lid, t in zip(table["label"], table["cell_type"]) if isinstance(t, str)}


def _thumbnail_from_outputs(path: Path, outs: dict) -> str | None:
    """Rebuild the preview of an image done by an earlier run (None if that fails)."""
    try:
        import pandas as pd
        import tifffile

        from .io import read_image

        labels = tifffile.imread(str(outs["labels"]))
        table = pd.read_csv(outs["cells"])
        return _thumb_b64(read_image(path), labels, _types_by_label(table))
    except Exception:  # noqa: BLE001 - a preview is optional
        return None


# ------------------------------------------------------------------ the run
def prepare_run(files: Sequence, out_dir) -> tuple[list[Path], Path, list[str]]:
    """``(files, out_dir, names)`` of a run: absolute paths, each image's output name (the names an
    earlier run in ``out_dir`` gave them kept); ``out_dir`` made, what a killed earlier run left half
    written there cleared (hidden temporaries, never mistaken for outputs)."""
    files = [Path(f).expanduser().absolute() for f in files]
    out_dir = Path(out_dir).absolute()
    names = output_names(files, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir, [p.name for n in names for p in output_paths(out_dir, n).values()]
                             + ["summary.csv", "report.html"])
    return files, out_dir, names


def iter_batch(files: Sequence, out_dir, settings: Settings, *, stop: Callable[[], bool] | None = None):
    """:func:`run_batch` in this process, one image after another: yields ``(index, row)`` as each image
    is done (its outputs written). With ``stop``, ends before the next image once ``stop()`` is true:
    the images done keep their outputs, an image is never left half written."""
    files, out_dir, names = prepare_run(files, out_dir)
    for i, (f, nm) in enumerate(zip(files, names)):
        if stop is not None and stop():
            return
        yield i, process_one(f, out_dir, settings, nm)


def run_info(settings: Settings, out_dir, command: str, parallelism: str | None = None) -> dict:
    """A run's settings as its report lists them (the command line tool's and the Segment widget's)."""
    from .. import __version__
    from .models import SHIPPED

    info = {
        "napari-wbc version": __version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command,
        "segmenter": settings.model or f"shipped ({SHIPPED['segmenter'].name})",
        "classifier": ((settings.classifier or f"shipped ({SHIPPED['classifier'].name})") if settings.classify
                       else "none (cells not typed)"),
        "device": settings.device,
        "WBC diameter": f"{settings.diameter:g} px" if settings.diameter else "estimated per image",
    }
    if parallelism is not None:
        info["parallelism"] = parallelism
    info["output folder"] = str(out_dir)
    return info


def finish_run(rows: Sequence[dict], run_info: dict, out_dir) -> list[Path]:
    """Write a run's ``summary.csv`` and ``report.html`` into ``out_dir``; an earlier run's that list
    images this one does not cover are kept aside first (:func:`keep_earlier_summary`: their new paths
    are returned)."""
    out_dir = Path(out_dir)
    kept = keep_earlier_summary(out_dir, rows)
    write_summary(rows, out_dir / "summary.csv")
    write_report(rows, run_info, out_dir / "report.html")
    return kept


def tally(rows: Sequence[dict]) -> tuple[dict, int]:
    """``({status: images}, WBCs)`` of a run's rows: how many images were processed, skipped (done
    before) and failed, and the WBCs found in those that did not fail."""
    n = {s: sum(r["status"] == s for r in rows) for s in (STATUS_OK, STATUS_SKIPPED, STATUS_FAILED)}
    return n, sum(int(r.get("n_wbc") or 0) for r in rows if r["status"] != STATUS_FAILED)


def pooled_counts(rows: Sequence[dict]) -> dict:
    """The cell types counted over every image of a run that did not fail (``{type: count}``, in the
    order first met; empty when the cells were not typed)."""
    total: dict = {}
    for r in rows:
        if r["status"] != STATUS_FAILED:
            for c, k in (r.get("count") or {}).items():
                total[c] = total.get(c, 0) + int(k)
    return total


def run_batch(
    files: Sequence,
    out_dir,
    settings: Settings,
    *,
    workers: int = 1,
    scheduler: str | None = None,
    on_result: Callable[[dict], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> list[dict]:
    """Process ``files`` into ``out_dir``; return the summary rows in input order.

    ``workers`` > 1 runs that many spawned processes (torch threads divided
    among them), fewer when that many would not fit in the free memory with the largest image
    (``on_note(message)`` says so; default: a warning); ``scheduler`` sends the work to a
    dask.distributed scheduler at that address (``out_dir`` and the files must be reachable from its workers).
    ``on_result(row)`` is called as each image finishes (in completion order).
    """
    files, out_dir, names = prepare_run(files, out_dir)
    rows: list[dict | None] = [None] * len(files)

    def done(i, row):
        rows[i] = row
        if on_result is not None:
            on_result(row)

    if scheduler:
        from distributed import Client, as_completed

        with Client(scheduler) as client:
            futures = client.map(
                process_one, [str(f) for f in files], [str(out_dir)] * len(files), [settings] * len(files),
                names, pure=False,
            )
            index = {f.key: i for i, f in enumerate(futures)}
            for fut in as_completed(futures):
                i = index[fut.key]
                try:
                    row = fut.result()
                except Exception as e:  # noqa: BLE001 - e.g. a worker lost
                    row = _row_base(files[i], names[i])
                    row["error"] = f"{str(files[i])!r}: the dask task failed: {type(e).__name__}: {e}"
                done(i, row)
    elif workers > 1 and len(files) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        n, note = workers_for_memory(files, min(workers, len(files)))
        if note is not None:  # out of memory, the system may kill any process: the user's napari too
            if on_note is not None:
                on_note(note)
            else:
                import warnings

                warnings.warn(note, UserWarning, stacklevel=2)
        if settings.torch_threads is None:
            settings = dataclasses.replace(settings, torch_threads=max(1, cpu_count() // n))
        from concurrent.futures.process import BrokenProcessPool

        def pool_run(indices, n_proc) -> list[int]:
            """Process ``indices`` in ``n_proc`` processes; returns those lost to a dead process."""
            lost = []
            with ProcessPoolExecutor(max_workers=n_proc, mp_context=mp.get_context("spawn")) as pool:
                futs = {pool.submit(process_one, files[i], out_dir, settings, names[i]): i for i in indices}
                try:
                    for fut in as_completed(futs):
                        i = futs[fut]
                        try:
                            row = fut.result()
                        except BrokenProcessPool:  # a process died (killed, e.g. for memory): every image
                            lost.append(i)  # in the pool fails with it, the others' images too
                            continue
                        except Exception as e:  # noqa: BLE001 - e.g. the image could not be sent
                            row = _row_base(files[i], names[i])
                            row["error"] = f"{str(files[i])!r}: the worker process failed: {type(e).__name__}: {e}"
                        done(i, row)
                except BaseException:
                    for f in futs:
                        f.cancel()
                    raise
            return lost

        # the images a dead process took down are done again, each alone in a fresh process: only an
        # image whose own process dies fails
        for i in sorted(pool_run(range(len(files)), n)):
            if pool_run([i], 1):
                row = _row_base(files[i], names[i])
                row["error"] = (f"{str(files[i])!r}: the process working on it died, also when it ran alone "
                                "(killed - out of memory? each worker holds its own image: try fewer --workers)")
                done(i, row)
    else:
        for i, (f, nm) in enumerate(zip(files, names)):
            done(i, process_one(f, out_dir, settings, nm))
    return rows


# one worker process's peak memory: torch and the models, and per pixel of its image (a 90 Mpx JPEG through
# process_one: 2.08 GiB peak RSS on one thread, 2026-11-24; about 19 B/px above the process's own)
WORKER_BASE_BYTES = int(0.9 * 2**30)  # (0.81-0.94 GiB peak RSS on a 0.1 Mpx image)
WORKER_BYTES_PER_PIXEL = 20


def available_memory() -> int | None:
    """Bytes this process can still take: the system's MemAvailable, and the container's (cgroup) limit
    less its use when there is one; None where neither can be read (not Linux)."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    cgroup = Path("/sys/fs/cgroup")
    for limit_file, usage_file, stat_file, inactive in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),  # cgroup v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
    ):
        try:
            limit = (cgroup / limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 2**60:  # no limit set
                continue
            used = int((cgroup / usage_file).read_text())
            for line in (cgroup / stat_file).read_text().splitlines():  # page cache it can drop is free
                key, _, value = line.partition(" ")
                if key == inactive:
                    used -= int(value)
            found.append(int(limit) - max(used, 0))
            break
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def workers_for_memory(files: Sequence, workers: int, available: int | None = None) -> tuple[int, str | None]:
    """At most ``workers`` processes that fit in memory together, each with the largest of ``files``
    (``available``: bytes, default :func:`available_memory`); with a note when fewer than asked."""
    from .io import image_size

    available = available_memory() if available is None else available
    if available is None or workers <= 1:
        return workers, None
    sizes = [image_size(f) for f in files]
    biggest = max((h * w for h, w in (s for s in sizes if s is not None)), default=0)
    if biggest == 0:  # no size could be read: the images' own errors will say why
        return workers, None
    need = WORKER_BASE_BYTES + WORKER_BYTES_PER_PIXEL * biggest
    fit = max(1, int(available // need))
    if fit >= workers:
        return workers, None
    return fit, (f"{fit} worker process{'es' if fit > 1 else ''} instead of {workers}: the largest image "
                 f"({biggest / 1e6:,.0f} Mpx) needs about {need / 2**30:.1f} GiB in each, "
                 f"{available / 2**30:.1f} GiB is free")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def edited_note(row: dict) -> str:
    """'' or what a skipped image's counts were taken from (outputs corrected by hand)."""
    edited = row.get("edited") or []
    if not edited:
        return ""
    suffix = {"labels": LABELS_SUFFIX, "cells": CELLS_SUFFIX}
    files = " and ".join(f"{row['image']}{suffix[k]}" for k in edited)
    return f"counted from {files} as corrected by hand"


def summary_frame(rows: Sequence[dict]):
    """One row per image: image, path, status, n_wbc, n_<type> and pct_<type> (``n_other`` alone: cells
    typed ``other`` by hand are not in the percentages), diameter, seconds, error, note (what a skipped
    image's counts come from when its outputs were corrected by hand)."""
    import pandas as pd

    classes = list(CLASSES)
    for r in rows:
        for c in (r.get("count") or {}):
            if c not in classes:
                classes.append(c)
    recs = []
    for r in rows:
        rec = {"image": r["image"], "path": r["path"], "status": r["status"], "n_wbc": r.get("n_wbc")}
        counts, pct = r.get("count") or {}, r.get("percent") or {}
        for c in classes:
            rec[f"n_{c}"] = counts.get(c) if counts else None
        for c in classes:
            if c != OTHER:  # (not a share of the typed WBCs)
                rec[f"pct_{c}"] = pct.get(c) if pct else None
        rec["diameter"] = r.get("diameter")
        rec["seconds"] = r.get("seconds")
        rec["error"] = r.get("error") or ""
        rec["note"] = edited_note(r)
        recs.append(rec)
    df = pd.DataFrame(recs)
    for c in df.columns:
        if c.startswith("n_"):
            df[c] = df[c].astype("Int64")
    return df


def keep_earlier_summary(out_dir, rows: Sequence[dict]) -> list[Path]:
    """Move ``summary.csv`` / ``report.html`` of an earlier run aside when they list images that
    ``rows`` (this run) do not cover, so that writing this run's summary loses none of them.

    They keep their own modification time in the name (``summary_YYYYmmdd-HHMMSS.csv``); returns the
    new paths. A re-run over the same images (or more) simply replaces them.
    """
    import pandas as pd

    out_dir = Path(out_dir)
    prev = out_dir / "summary.csv"
    if not prev.is_file():
        prev = out_dir / "report.html"  # alone (its summary deleted, or not ours): kept aside too
        if not prev.is_file():
            return []
    try:
        earlier = {str(p) for p in pd.read_csv(prev)["path"].dropna()} if prev.suffix == ".csv" else None
    except Exception:  # noqa: BLE001 - unreadable or not ours: keep it all the same
        earlier = None
    if earlier is not None and earlier <= {str(r["path"]) for r in rows}:
        return []
    stamp = datetime.datetime.fromtimestamp(prev.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
    moved = []
    for f in (out_dir / "summary.csv", out_dir / "report.html"):
        if not f.is_file():
            continue
        dest = free_path(f.with_name(f"{f.stem}_{stamp}{f.suffix}"))
        f.rename(dest)
        moved.append(dest)
    return moved


def write_summary(rows: Sequence[dict], path) -> Path:
    df = summary_frame(rows)
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


# ------------------------------------------------------------------ report
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.4em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left}
.img{display:flex;gap:1.5em;align-items:flex-start;border-top:1px solid #ddd;padding:1em 0}
.failed{color:#b00} .sw{display:inline-block;width:.9em;height:.9em;vertical-align:middle;margin-right:.3em}
code{font-size:90%}
"""


def _esc(x) -> str:
    return html.escape("" if x is None else str(x))


def _diff_table(counts: dict, pct: dict) -> str:
    if not counts:
        return "<p>cells were not typed</p>"
    rows = "".join(
        f"<tr><td class=l><span class=sw style='background:rgb{CLASS_COLOURS.get(c, UNTYPED_COLOUR)}'></span>"
        f"{_esc(c)}</td><td>{counts[c]}</td><td>{'' if pct.get(c) is None else f'{pct[c]:.1f}'}</td></tr>"
        for c in counts
    )
    return f"<table><tr><th class=l>type</th><th>count</th><th>%</th></tr>{rows}</table>"


def _other_note(counts: dict) -> str:
    k = int(counts.get(OTHER) or 0)
    return f" ({k} typed {OTHER} by hand, left out of the percentages)" if k else ""


def render_report(rows: Sequence[dict], run_info: dict) -> str:
    """The HTML report of a run: settings, overall and per-image differential counts, previews."""
    ok = [r for r in rows if r["status"] != STATUS_FAILED]
    failed = [r for r in rows if r["status"] == STATUS_FAILED]
    total = pooled_counts(rows)
    classified = any(r.get("count") for r in ok)
    total_pct = percentages(total)
    info_rows = "".join(f"<tr><th class=l>{_esc(k)}</th><td class=l>{_esc(v)}</td></tr>" for k, v in run_info.items())
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>napari-wbc report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>napari-wbc: white blood cell report</h1>",
        f"<h2>Run</h2><table>{info_rows}</table>",
        f"<p>{len(rows)} image(s): {len(ok)} done, {len(failed)} failed; "
        f"{sum(int(r.get('n_wbc') or 0) for r in ok)} WBC(s) found{_other_note(total)}.</p>",
        "<h2>All images</h2>",
        _diff_table(total, total_pct) if classified else "<p>cells were not typed</p>",
        "<h2>Per image</h2>",
    ]
    for r in rows:
        name = _esc(r["image"])
        if r["status"] == STATUS_FAILED:
            parts.append(
                f"<div class='img' id='{name}'><div><h3>{name}</h3><p><code>{_esc(r['path'])}</code></p>"
                f"<p class=failed>failed: {_esc(r.get('error'))}</p></div></div>"
            )
            continue
        thumb = r.get("thumbnail")
        img = (f"<img alt='{name}' src='data:image/png;base64,{thumb}'>" if thumb else "<p>(no preview)</p>")
        meta = f"{r.get('n_wbc')} WBC(s){_other_note(r.get('count') or {})}"
        if r.get("diameter") is not None:
            meta += f"; WBC diameter {r['diameter']:.0f} px"
        if r["status"] == STATUS_SKIPPED:
            meta += "; outputs from an earlier run"
        if edited_note(r):
            meta += f"; {edited_note(r)}"
        table = _diff_table(r.get("count") or {}, r.get("percent") or {})
        parts.append(
            f"<div class='img' id='{name}'>{img}<div><h3>{name}</h3><p><code>{_esc(r['path'])}</code></p>"
            f"<p>{_esc(meta)}</p>{table}</div></div>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(rows: Sequence[dict], run_info: dict, path) -> Path:
    text = render_report(rows, run_info)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
