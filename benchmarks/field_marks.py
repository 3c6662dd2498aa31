"""What lies around or over the smear: black frames, round fields of view, burned-in marks.

    python benchmarks/field_marks.py [--model PATH] [--only NAME ...] [--threads 1] [--out FILE]
    python benchmarks/field_marks.py --types [...]      # end-to-end typing instead (size-kept conditions)

Microscope cameras and scanners put things in the image that are not smear: the black outside a round
field of view (a camera on the eyepiece or a small sensor), the slide's edge, a black or white frame
when a tile is padded to size, and burned-in scale bars and sample labels; and the light is not always
even (a brightness gradient across the field, vignetting). Each is applied to the same
held-out images as ``robustness.py`` (SigTuple and Tecom validation: matched-cell Dice and F1; held-out
odd BCCD images: WBC detection F1 at box IoU >= 0.5), with ``diameter=None`` as a user runs it. Masks
and boxes move with the smear where a frame is added around it; cells under a mark stay in the truth
(a round field cuts the corners' cells off: the 'none' row is not the ceiling there).
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

from napari_wbc.core.metrics import label_boxes, match_boxes, match_instances, summarise  # noqa: E402


# ------------------------------------------------------------------ conditions
# Each takes an HxWx3 uint8 image and returns (image, (dy, dx)): where the original lies in the new one.
def frame(share, value):
    def apply(rgb):
        h, w = rgb.shape[:2]
        p = int(round(share * max(h, w)))
        out = np.full((h + 2 * p, w + 2 * p, 3), value, np.uint8)
        out[p:p + h, p:p + w] = rgb
        return out, (p, p)
    return apply


def beside(share, value):  # the slide's edge (or a scanner tile past it) on one side
    def apply(rgb):
        h, w = rgb.shape[:2]
        out = np.full((h, w + int(round(share * w)), 3), value, np.uint8)
        out[:, :w] = rgb
        return out, (0, 0)
    return apply


def round_field(radius_share, soft=0.0):  # black outside a circle of radius_share x half the longer side
    def apply(rgb):
        h, w = rgb.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w]
        r = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) / (radius_share * max(h, w) / 2)
        m = np.clip((1 - r) / soft, 0, 1) if soft else (r <= 1).astype(np.float32)
        return R._u8(rgb * m[..., None]), (0, 0)
    return apply


def marks(colour, bar=True, label=True):  # a scale bar with its text, a sample label box with its text
    def apply(rgb):
        from PIL import Image, ImageDraw

        im = Image.fromarray(rgb.copy())
        draw = ImageDraw.Draw(im)
        h, w = rgb.shape[:2]
        ink, size = (colour,) * 3, max(10, int(0.05 * h))
        if bar:
            x1, y1 = w - int(0.04 * w), h - int(0.04 * h)
            draw.rectangle([x1 - int(0.25 * w), y1 - max(3, int(0.02 * h)), x1, y1], fill=ink)
            draw.text((x1 - int(0.25 * w), y1 - max(3, int(0.02 * h)) - size - 2), "10 um", fill=ink, font_size=size)
        if label:
            draw.rectangle([0, 0, int(0.3 * w), int(0.08 * h)], fill=ink)
            draw.text((4, 2), "ID 2026-0142 x100", fill=(255 - colour,) * 3, font_size=size)
        return np.asarray(im), (0, 0)
    return apply


def gradient(to):  # the light falls linearly from the left edge to ``to`` of it at the right
    def apply(rgb):
        ramp = np.linspace(1.0, to, rgb.shape[1], dtype=np.float32)
        return R._u8(rgb * ramp[None, :, None]), (0, 0)
    return apply


def vignetting(to):  # the light falls with the squared distance from the centre to ``to`` in the corners
    def apply(rgb):
        h, w = rgb.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r2 = ((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (((h - 1) / 2) ** 2 + ((w - 1) / 2) ** 2)
        return R._u8(rgb * (1 - (1 - to) * r2)[..., None]), (0, 0)
    return apply


CONDITIONS = {
    "none": lambda rgb: (rgb, (0, 0)),
    "black frame (a quarter of the longer side around)": frame(0.25, 0),
    "black beside the smear (slide edge, half its width)": beside(0.5, 0),
    "round field of view, black outside (radius: half the longer side)": round_field(1.0),
    "round field of view, narrower (0.8)": round_field(0.8),
    "round field of view, soft edge": round_field(0.95, 0.15),
    "black scale bar and its text": marks(0, label=False),
    "black sample label box with text": marks(0, bar=False),
    "white scale bar and label box": marks(255),
    "white frame (a quarter of the longer side around)": frame(0.25, 255),
    "uneven light: a gradient to 70 % across": gradient(0.7),
    "uneven light: a gradient to 50 % across": gradient(0.5),
    "uneven light: vignetting to 60 % in the corners": vignetting(0.6),
    "uneven light: vignetting to 45 % in the corners": vignetting(0.45),
}
SIZE_KEPT = [n for n in CONDITIONS if "frame" not in n and "beside" not in n]  # for --types


def _moved_labels(lab, shape, offset):
    out = np.zeros(shape, lab.dtype)
    out[offset[0]:offset[0] + lab.shape[0], offset[1]:offset[1] + lab.shape[1]] = lab
    return out


def evaluate(cond, model, sets, bccd_items):
    from napari_wbc import segment

    out = {}
    for key in ("SigTuple", "Tecom"):
        res = []
        for _name, rgb, lab in sets[key]:
            img, off = cond(rgb)
            res.append(match_instances(_moved_labels(lab, img.shape[:2], off), segment(img, model=model, device="cpu")))
        out[key] = summarise(res)
    res = []
    for rgb, boxes in bccd_items:
        img, (dy, dx) = cond(rgb)
        moved = [(b[0] + dy, b[1] + dx, b[2] + dy, b[3] + dx) for b in boxes]
        res.append(match_boxes(moved, label_boxes(segment(img, model=model, device="cpu"))))
    out["BCCD"] = summarise(res)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="segmenter .safetensors (default: shipped)")
    ap.add_argument("--classifier", default=None, help="classifier .safetensors for --types (default: shipped)")
    ap.add_argument("--only", nargs="*", help="condition names to run (default: all)")
    ap.add_argument("--types", action="store_true", help="end-to-end typing (segment + classify), as robustness.py")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the table here")
    a = ap.parse_args(argv)
    import torch

    from napari_wbc.core.io import read_image, to_rgb

    torch.set_num_threads(a.threads)
    names = a.only or (SIZE_KEPT if a.types else list(CONDITIONS))
    head = (f"Command: `{wbc_data.command_line(__file__, argv)}`  \n"
            f"torch {torch.__version__}, {a.threads} CPU thread(s), {time.strftime('%Y-%m-%d')}; diameter=None throughout\n\n")
    if a.types:
        items = R.typing_items()
        head += "| condition | balanced accuracy, all (cells, missed) | Tecom | BCCD |\n|---|---|---|---|"

        def line_for(n):
            cond = CONDITIONS[n]
            typed = R.evaluate_types(lambda rgb, d, rng: (cond(rgb)[0], 1.0), a.model, a.classifier, items)
            return R.types_line(n, typed, review=False)
    else:
        sets = B.val_sets()
        bccd_items = [(to_rgb(read_image(img)), wbc_data.wbc_boxes(xml)) for img, xml, sp in wbc_data.bccd() if sp == "val"]
        head += "| condition | SigTuple val Dice / F1 | Tecom val Dice / F1 | BCCD odd F1 (TP/FP/FN) |\n|---|---|---|---|"

        def line_for(n):
            return R.segmentation_line(n, evaluate(CONDITIONS[n], a.model, sets, bccd_items))
    R.run_rows(names, line_for, head, a.out)


if __name__ == "__main__":
    main()
