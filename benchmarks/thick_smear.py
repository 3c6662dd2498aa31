"""A thick, crowded smear: the held-out images under a second (and third) layer of their own red cells.

    python benchmarks/thick_smear.py [--model PATH] [--threads 1] [--out FILE]

Away from the monolayer (towards the head of a smear, or in a smear spread too thick) red cells lie on
top of each other. We have no such images, so each held-out image is given more layers of its own red
cells: the image, shifted by a random offset and mirrored, with its WBCs (the truth, dilated) replaced by
the background's colour, is laid over it as light passes through both (Beer-Lambert: the transmissions
multiply). The WBCs stay where they were, alone, and the red cells about double (triple) in number, now
overlapping. Each condition is scored like ``robustness.py`` on the held-out images with red cells
(SigTuple validation patches + the validation smear: matched-cell Dice and F1; BCCD odd images: WBC
detection F1 at box IoU >= 0.5), with the diameter estimated (as a user runs it) and known, and the
red-cell scale estimate's error: segment()'s first estimate over the true WBC diameter (median and
90th percentile over images; the true one from the masks or boxes). Tecom's crops are left out: one
cell fills them, with hardly any red cells to layer.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import robustness as R  # noqa: E402
import segmentation as B  # noqa: E402
import wbc_data  # noqa: E402
from single_cell_crops import segment_estimated  # noqa: E402

from napari_wbc.core.metrics import label_boxes, match_boxes, match_instances, summarise  # noqa: E402


def layered(rgb: np.ndarray, wbcs: np.ndarray, layers: int, rng) -> np.ndarray:
    """``rgb`` under ``layers`` more layers of its own red cells (``wbcs``: where its WBCs are)."""
    from scipy import ndimage as ndi

    bg = np.percentile(rgb.reshape(-1, 3), 95, axis=0).astype(np.float32)  # the background's colour
    keep = ndi.binary_dilation(wbcs, iterations=5)
    out = rgb.astype(np.float32)
    h, w = rgb.shape[:2]
    for k in range(layers):
        dy, dx = int(rng.integers(h // 4, h // 2 + 1)), int(rng.integers(w // 4, w // 2 + 1))
        flip = (slice(None), slice(None, None, -1)) if k % 2 == 0 else (slice(None, None, -1), slice(None))
        layer = np.roll(rgb[flip], (dy, dx), axis=(0, 1)).astype(np.float32)
        layer[np.roll(keep[flip], (dy, dx), axis=(0, 1))] = bg
        out *= np.clip(layer / np.maximum(bg, 1.0), 0.0, 1.0)
    return R._u8(out)


def box_mask(shape, boxes) -> np.ndarray:
    m = np.zeros(shape, bool)
    for y0, x0, y1, x1 in boxes:
        m[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
    return m


def evaluate(layers: int, model, sig, bccd, seed: int = 0) -> dict:
    from napari_wbc import segment

    rng = np.random.default_rng(seed)
    out = {}
    res_auto, res_known, ratio = [], [], []
    for _name, rgb, lab in sig:
        img = layered(rgb, lab > 0, layers, rng) if layers else rgb
        d = B.known_diameter(lab)
        auto, estimate = segment_estimated(img, model)
        ratio.append(estimate / d)
        res_auto.append(match_instances(lab, auto))
        res_known.append(match_instances(lab, segment(img, model=model, device="cpu", diameter=d)))
    out["SigTuple"] = (summarise(res_auto), summarise(res_known), np.array(ratio))
    res_auto, res_known, ratio = [], [], []
    for rgb, boxes in bccd:
        img = layered(rgb, box_mask(rgb.shape[:2], boxes), layers, rng) if layers else rgb
        d = wbc_data.box_diameter(boxes)
        auto, estimate = segment_estimated(img, model)
        ratio.append(estimate / d)
        res_auto.append(match_boxes(boxes, label_boxes(auto)))
        res_known.append(match_boxes(boxes, label_boxes(segment(img, model=model, device="cpu", diameter=d))))
    out["BCCD"] = (summarise(res_auto), summarise(res_known), np.array(ratio))
    return out


def line(name: str, r: dict) -> str:
    (sa, sk, sr), (ba, bk, br) = r["SigTuple"], r["BCCD"]
    return (f"| {name} | {sa['matched_dice']:.3f} / {sa['f1']:.3f} | {sk['matched_dice']:.3f} / {sk['f1']:.3f} "
            f"| {np.median(sr):.2f} / {np.percentile(sr, 90):.2f} "
            f"| {ba['f1']:.3f} ({ba['tp']}/{ba['fp']}/{ba['fn']}) | {bk['f1']:.3f} ({bk['tp']}/{bk['fp']}/{bk['fn']}) "
            f"| {np.median(br):.2f} / {np.percentile(br, 90):.2f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="segmenter .safetensors (default: shipped)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the table here")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    sig = B.val_sets()["SigTuple"]
    bccd = [(rgb, boxes) for _path, rgb, boxes in wbc_data.bccd_with_boxes("val") if boxes]
    head = (f"Command: `{wbc_data.command_line(__file__, argv)}`  \n"
            f"torch {torch.__version__}, {a.threads} CPU thread(s), {time.strftime('%Y-%m-%d')}\n\n"
            "| red cells | SigTuple val Dice / F1, diameter auto | known | estimate / true WBC diameter, median / 90th pct "
            "| BCCD odd F1 (TP/FP/FN), auto | known | estimate / true, median / 90th pct |\n|---|---|---|---|---|---|---|")
    names = {0: "as imaged", 1: "a second layer", 2: "a second and a third layer"}
    R.run_rows(list(names), lambda n: line(names[n], evaluate(n, a.model, sig, bccd)), head, a.out)


if __name__ == "__main__":
    main()
