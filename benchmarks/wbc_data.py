"""Loading ../shared/data with the project's fixed train/validation split.

The split is by file name, never random, so every script sees the same one:
- SigTuple 128x128 patches ``train-N``: validation when N % 5 == 0;
- SigTuple large smears: ``017532875DDF`` is validation, the other four train;
- Tecom crops ``NNN.png``: validation when NNN % 5 == 0;
- BCCD (weak labels from WBC boxes): even image numbers may be used for
  training (background outside WBC boxes), odd numbers are held out.
The data folder is ``$NAPARI_WBC_DATA`` or ``../shared/data`` beside the repo.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np

from napari_wbc.core.io import read_image, read_mask, read_voc_boxes, to_rgb

DATA = Path(os.environ.get("NAPARI_WBC_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SIGTUPLE_VAL_SMEAR = "017532875DDF"


def sigtuple_patches():
    for f in sorted((DATA / "sigtuple/train").glob("train-*.jpg")):
        if f.stem.endswith("-mask"):
            continue
        n = int(re.findall(r"\d+", f.stem)[0])
        yield f, f.with_name(f.stem + "-mask.jpg"), ("val" if n % 5 == 0 else "train")


def sigtuple_smears():
    for f in sorted((DATA / "sigtuple/train").glob("*.jpg")):
        if f.stem.startswith("train-") or f.stem.endswith("-mask"):
            continue
        yield f, f.with_name(f.stem + "-mask.jpg"), ("val" if f.stem == SIGTUPLE_VAL_SMEAR else "train")


def tecom():
    for f in sorted((DATA / "tecom/images").glob("*.png")):
        yield f, DATA / "tecom/masks" / f.name, ("val" if int(f.stem) % 5 == 0 else "train")


def tecom_types() -> dict[str, str]:
    """Tecom's expert type of each crop, by file name (``classes.csv``)."""
    import csv

    with open(DATA / "tecom/classes.csv", newline="") as f:
        return {r["image"]: r["class"] for r in csv.DictReader(f)}


def bccd():
    for f in sorted((DATA / "bccd/images").glob("*.jpg")):
        n = int(re.findall(r"\d+", f.stem)[0])
        yield f, DATA / "bccd/annotations" / (f.stem + ".xml"), ("train" if n % 2 == 0 else "val")


def load_image_mask(img, mask):
    """RGB uint8 image and int32 instance labels (Tecom: nucleus+cytoplasm = the cell)."""
    rgb = to_rgb(read_image(img))
    if "tecom" in str(mask):
        from scipy import ndimage as ndi

        lab = ndi.label(read_image(mask) > 0)[0].astype(np.int32)
    else:
        lab = read_mask(mask)
    return rgb, lab


def wbc_boxes(xml):
    return [b[1:] for b in read_voc_boxes(xml, names=("WBC",))]


def box_diameter(boxes) -> float:
    """WBC diameter (px) of an image from its boxes: the median of each box's mean side."""
    return float(np.median([((y1 - y0) + (x1 - x0)) / 2 for y0, x0, y1, x1 in boxes]))


def bccd_with_boxes(split):
    """(image path, RGB image, WBC boxes) of the BCCD images of ``split`` ("train" or "val")."""
    for img, xml, sp in bccd():
        if sp == split:
            yield img, to_rgb(read_image(img)), wbc_boxes(xml)


def clear_windows(shape, boxes, win: int = 240, margin: float = 0.15):
    """(y, x) of the ``win`` px windows at an image's four corners and top / bottom middle that stay
    clear of every box, each box grown by ``margin`` of its larger side (red cells and platelets only)."""
    h, w = shape[:2]
    occ = np.zeros((h, w), bool)
    for y0, x0, y1, x1 in boxes:
        m = int(margin * max(y1 - y0, x1 - x0))
        occ[max(0, int(y0) - m) : int(y1) + m, max(0, int(x0) - m) : int(x1) + m] = True
    return [(y, x) for y in (0, h - win) for x in (0, (w - win) // 2, w - win) if not occ[y : y + win, x : x + win].any()]


def command_line(script, argv=None) -> str:
    """``python benchmarks/<script> <the arguments as given>`` for a table's header: every option that
    made the figures (a classifier, margins, an output), not a hand-picked few."""
    import shlex

    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{Path(script).name}", *(shlex.quote(str(x)) for x in args)])


def finish_table(lines, out=None) -> str:
    """A benchmark's markdown lines joined, written to ``out`` (when given) and printed."""
    text = "\n".join(lines) + "\n"
    if out:
        Path(out).write_text(text)
    print(text)
    return text
