"""Diagnostic: how exact can any outline be against the SigTuple masks?

    python benchmarks/sigtuple_masks.py [--model PATH]

1. Where the mask edges lie: for each SigTuple source, the share of mask edge transitions
   (rows and columns) at each position modulo 8. The patch masks change only at multiples of 4 px:
   they were drawn on a 4 px grid (a 32 x 32 mask for a 128 x 128 patch), so their outlines are
   staircases whatever the cell's true edge.
2. What such a grid costs a perfect outline: every Tecom and SigTuple validation mask (Tecom masks
   are smooth, full resolution) is redrawn on a 4 px grid at a random offset (majority per block)
   and scored against itself with the matched-cell Dice. This is the ceiling for an outline that is
   exactly right but not drawn on the grid.
3. The segmenter's matched Dice on SigTuple validation, split into patches (grid masks) and smears.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wbc_data  # noqa: E402


def on_grid(masks) -> str:
    counts = Counter()
    for m in masks:
        counts.update(np.nonzero(m[:, 1:] != m[:, :-1])[1] % 8 + 1)  # +1: the column right of the change
        counts.update(np.nonzero(m[1:] != m[:-1])[0] % 8 + 1)
    total = sum(counts.values())
    return ", ".join(f"{k % 8}: {counts[k] / total:.2f}" for k in sorted(counts))


def blockify(m: np.ndarray, k: int, oy: int, ox: int) -> np.ndarray:
    """``m`` redrawn on a k-px grid offset by (oy, ox): each block takes its majority."""
    h, w = m.shape
    p = np.pad(m, ((oy, k), (ox, k)))
    H, W = (p.shape[0] // k) * k, (p.shape[1] // k) * k
    b = p[:H, :W].reshape(H // k, k, W // k, k).mean((1, 3)) >= 0.5
    return np.repeat(np.repeat(b, k, 0), k, 1)[oy : oy + h, ox : ox + w]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="segmenter to score (default: shipped)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch

    import napari_wbc
    from napari_wbc.core.metrics import match_instances
    from napari_wbc.core.train import cell_diameter

    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    print("| source | images | edge positions mod 8 (share) |\n|---|---|---|")
    sets = {}
    for name, src in (("SigTuple patches", wbc_data.sigtuple_patches), ("SigTuple smears", wbc_data.sigtuple_smears),
                      ("Tecom", wbc_data.tecom)):
        items = [(img.name, sp, *wbc_data.load_image_mask(img, mask)) for img, mask, sp in src()]
        sets[name] = [it for it in items if it[1] == "val"]
        print(f"| {name} | {len(items)} | {on_grid([lab > 0 for *_, lab in items])} |")

    print("\n| validation set | cells | median WBC diameter (px) | Dice of the 4 px-grid redraw (ceiling) | segmenter matched Dice |")
    print("|---|---|---|---|---|")
    for name, items in sets.items():
        ceil, dice, diam = [], [], []
        for _, _, rgb, lab in items:
            diam.append(cell_diameter(lab))
            for i in np.unique(lab[lab > 0]):
                m = lab == i
                q = blockify(m, 4, *rng.integers(0, 4, 2))
                ceil.append(2 * (q & m).sum() / (q.sum() + m.sum()))
            dice += match_instances(lab, napari_wbc.segment(rgb, model=a.model, device="cpu"))["dice"]
        print(f"| {name} | {len(ceil)} | {np.median(diam):.0f} | {np.mean(ceil):.3f} | {np.mean(dice):.3f} |")


if __name__ == "__main__":
    main()
