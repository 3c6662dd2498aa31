"""The typical colour of a stained smear at each grey level, for greyscale cameras.

    python benchmarks/grey_colours.py [--card src/napari_wbc/models/wbc_unet.json] [--write]

A greyscale camera loses what the networks learned most from: a nucleus is purple and a red cell pink
on every stain they were trained on. Given only a grey level, the best guess of a pixel's colour is the
mean colour of pixels at that grey level in stained smears. This script measures it on the segmenter's
*training* images only (SigTuple training patches and smears, Tecom training crops, BCCD even images;
benchmarks/wbc_data.py's fixed split), in the units the networks see: each image's grey levels
(luminance 0.299 R + 0.587 G + 0.114 B) and colours are both stretched between their own 0.5th and
99.5th percentiles (core/segment.channel_ranges), the grey in BINS bins over 0..1; the table is the mean
over the three sources of each source's mean colour per bin (every source counts the same). With
``--write`` it goes into the segmenter card as ``grey_colours`` (the weights are not touched); segment()
then colours a greyscale image by it before the network sees it (core/segment.grey_to_colour).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wbc_data  # noqa: E402

BINS = 64
LUMINANCE = np.array([0.299, 0.587, 0.114], np.float32)


def source_table(files) -> tuple[np.ndarray, np.ndarray]:
    """(sum of normalised colours per grey bin, pixel count per bin) over ``files``."""
    from napari_wbc.core.io import read_image, to_rgb
    from napari_wbc.core.segment import channel_ranges, normalise

    acc, n = np.zeros((BINS, 3)), np.zeros(BINS)
    for f in files:
        rgb = to_rgb(read_image(f))
        grey = rgb.astype(np.float32) @ LUMINANCE
        lo, hi = np.percentile(grey, [0.5, 99.5])
        q = np.clip((grey - lo) / max(hi - lo, 1e-6), 0, 1)
        b = np.minimum((q * BINS).astype(np.intp), BINS - 1).ravel()
        c = normalise(rgb, channel_ranges(rgb)).reshape(-1, 3).astype(np.float64)
        for ch in range(3):
            acc[:, ch] += np.bincount(b, weights=c[:, ch], minlength=BINS)
        n += np.bincount(b, minlength=BINS)
    return acc, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--card", default=str(Path(__file__).resolve().parents[1] / "src/napari_wbc/models/wbc_unet.json"))
    ap.add_argument("--write", action="store_true", help="write the table into the card")
    a = ap.parse_args(argv)
    sources = {
        "sigtuple": [f for f, _, sp in wbc_data.sigtuple_patches() if sp == "train"]
        + [f for f, _, sp in wbc_data.sigtuple_smears() if sp == "train"],
        "tecom": [f for f, _, sp in wbc_data.tecom() if sp == "train"],
        "bccd": [f for f, _, sp in wbc_data.bccd() if sp == "train"],
    }
    means = []
    for name, files in sources.items():
        acc, n = source_table(files)
        ok = n > 0
        mean = np.full((BINS, 3), np.nan)
        mean[ok] = acc[ok] / n[ok, None]
        means.append(mean)
        print(f"{name}: {len(files)} images, {int(n.sum())} pixels", file=sys.stderr)
    table = np.nanmean(np.stack(means), axis=0)
    for ch in range(3):  # a bin no source reached: from its neighbours
        ok = np.isfinite(table[:, ch])
        table[:, ch] = np.interp(np.arange(BINS), np.flatnonzero(ok), table[ok, ch])
    rows = [[round(float(v), 4) for v in row] for row in table]
    entry = {"bins": BINS, "colours": rows,
             "what": "mean normalised RGB of training pixels per normalised grey level (luminance), "
                     "per-source means averaged; for greyscale cameras (core/segment.grey_to_colour)",
             "command": "python benchmarks/grey_colours.py --write",
             "sources": {k: len(v) for k, v in sources.items()}}
    if a.write:
        card_path = Path(a.card)
        card = json.loads(card_path.read_text())
        card["grey_colours"] = entry
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        print(f"wrote grey_colours into {card_path}", file=sys.stderr)
    else:
        print(json.dumps(entry))


if __name__ == "__main__":
    main()
