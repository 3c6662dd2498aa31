"""Robustness: the shipped segmenter on validation images altered the way other labs' smears differ.

    python benchmarks/robustness.py [--model PATH] [--only NAME ...] [--threads 1] [--out FILE]

We cannot test on other labs' smears, but we can alter our own held-out images the ways scanners and
labs differ, and see what breaks: magnification (rescaled 0.4x-2x, labels and boxes with it), focus
(Gaussian blur, in a share of the WBC diameter so it means the same at every magnification), JPEG
compression, sensor noise, exposure (gamma), white balance (a colour cast) and staining strength
(haematoxylin or eosin optical density scaled, skimage ``rgb2hed``), a greyscale camera, and two
chains of these standing for whole other labs.

Each condition is applied to SigTuple validation (patches + the validation smear) and Tecom validation
(matched-cell Dice and detection F1, ``diameter=None`` as a user runs it) and to the held-out odd BCCD
images (WBC detection F1 at box IoU >= 0.5). The images were never trained on; no condition is used in
training as such (training uses milder colour, stain and scale jitter).

``--types`` scores end-to-end cell typing instead: each validation cell with a class (Tecom crops;
BCCD odd images with one WBC box of one class) is segmented and classified in the altered image, and
the class of the cell matching the true one counts (a missed cell counts as wrong); balanced accuracy
over the four common classes. It also asks whether the classifier's confidence points at its own
errors (what a technologist reviewing only low-confidence cells would catch): the AUROC of confidence
for right against wrong calls, and the share of wrong calls and of all calls under 0.6.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import segmentation as B  # noqa: E402
import wbc_data  # noqa: E402

from napari_wbc.core.metrics import label_boxes, match_boxes, match_instances, summarise  # noqa: E402


# ------------------------------------------------------------------ conditions
# Each takes (rgb uint8, wbc_diameter_px, rng) and returns (rgb uint8, geometric scale factor).
def _u8(x):
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def rescale(f):
    def apply(rgb, d, rng):
        from PIL import Image

        h, w = rgb.shape[:2]
        size = (max(8, round(w * f)), max(8, round(h * f)))
        return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR if f > 1 else Image.BOX)), f
    return apply


def blur(share):
    def apply(rgb, d, rng):
        from scipy import ndimage as ndi

        s = share * d
        return _u8(ndi.gaussian_filter(rgb.astype(np.float32), (s, s, 0))), 1.0
    return apply


def jpeg(q):
    def apply(rgb, d, rng):
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=q)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), 1.0
    return apply


def noise(sigma):
    def apply(rgb, d, rng):
        return _u8(rgb.astype(np.float32) + rng.normal(0, sigma, rgb.shape)), 1.0
    return apply


def gamma(g):
    def apply(rgb, d, rng):
        return _u8(255 * (rgb / 255.0) ** g), 1.0
    return apply


def cast(gains):
    def apply(rgb, d, rng):
        return _u8(rgb.astype(np.float32) * np.asarray(gains, np.float32)), 1.0
    return apply


def stain(h=1.0, e=1.0):
    def apply(rgb, d, rng):
        from skimage.color import hed2rgb, rgb2hed

        od = rgb2hed(rgb)
        od[..., 0] *= h
        od[..., 1] *= e
        return _u8(255 * np.clip(hed2rgb(od), 0, 1)), 1.0
    return apply


def chain(*conds):
    def apply(rgb, d, rng):
        f = 1.0
        for c in conds:
            rgb, g = c(rgb, d * f, rng)
            f *= g
        return rgb, f
    return apply


def grey():
    def apply(rgb, d, rng):
        g = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return _u8(np.repeat(g[..., None], 3, -1)), 1.0
    return apply


CONDITIONS = {
    "none": lambda rgb, d, rng: (rgb, 1.0),
    "scale 0.3x": rescale(0.3),
    "scale 0.4x": rescale(0.4),
    "scale 0.6x": rescale(0.6),
    "scale 1.5x": rescale(1.5),
    "scale 2x": rescale(2.0),
    "scale 3x": rescale(3.0),
    "blur sigma 2% of WBC": blur(0.02),
    "blur sigma 5% of WBC": blur(0.05),
    "JPEG quality 30": jpeg(30),
    "noise sigma 12/255": noise(12.0),
    "gamma 0.6 (over-exposed)": gamma(0.6),
    "gamma 1.6 (under-exposed)": gamma(1.6),
    "cast warm (1.0, 0.9, 0.7)": cast((1.0, 0.9, 0.7)),
    "cast cool (0.8, 0.9, 1.0)": cast((0.8, 0.9, 1.0)),
    "haematoxylin x0.6 (pale nuclei)": stain(h=0.6),
    "haematoxylin x1.5": stain(h=1.5),
    "eosin x0.5": stain(e=0.5),
    "eosin x2": stain(e=2.0),
    "greyscale camera": grey(),
    "another lab: 1.5x, blur 2%, eosin x1.5, warm cast, JPEG 50": chain(
        rescale(1.5), blur(0.02), stain(e=1.5), cast((1.0, 0.92, 0.8)), jpeg(50)),
    "another lab: 0.6x, haematoxylin x0.7, cool cast, gamma 1.3, noise": chain(
        rescale(0.6), stain(h=0.7), cast((0.85, 0.92, 1.0)), gamma(1.3), noise(6.0)),
}


def _scale_labels(lab, shape):
    from skimage.transform import resize

    if lab.shape == tuple(shape):
        return lab
    return resize(lab, shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.int32)


def evaluate(cond, model, sets, bccd_items, seed=0):
    from napari_wbc import segment

    rng = np.random.default_rng(seed)
    out = {}
    for key in ("SigTuple", "Tecom"):
        res = []
        for _name, rgb, lab in sets[key]:
            img, f = cond(rgb, B.known_diameter(lab), rng)
            res.append(match_instances(_scale_labels(lab, img.shape[:2]), segment(img, model=model, device="cpu")))
        out[key] = summarise(res)
    res = []
    for rgb, boxes in bccd_items:
        d = wbc_data.box_diameter(boxes) if boxes else 200.0
        img, f = cond(rgb, d, rng)
        res.append(match_boxes([tuple(v * f for v in b) for b in boxes], label_boxes(segment(img, model=model, device="cpu"))))
    out["BCCD"] = summarise(res)
    return out


def typing_items():
    """Validation cells with a class: Tecom crops (expert mask) and BCCD odd images with one WBC box of one class."""
    import csv

    from napari_wbc.core.io import read_image, to_rgb

    tcls = wbc_data.tecom_types()
    items = []
    for img, mask, sp in wbc_data.tecom():
        if sp == "val":
            rgb, lab = wbc_data.load_image_mask(img, mask)
            items.append(("tecom", rgb, lab > 0, None, tcls[img.name]))
    with open(wbc_data.DATA / "bccd/classes.csv") as f:
        bcls = {r["image"]: r["classes"] for r in csv.DictReader(f)}
    for img, xml, sp in wbc_data.bccd():
        boxes, cl = wbc_data.wbc_boxes(xml), bcls.get(img.name, "")
        if sp == "val" and len(boxes) == 1 and cl and ";" not in cl:
            items.append(("bccd", to_rgb(read_image(img)), None, boxes[0], cl))
    return items


REVIEW_BELOW = 0.6  # confidence under which a call is counted as "flagged for review" (set before any run)


def matching_cell(labels, mask=None, box=None, threshold=0.5):
    """The label id of ``labels`` that best matches the true cell (its boolean ``mask``, else its
    ``box``) at IoU >= ``threshold``, or None."""
    from napari_wbc.core.metrics import box_iou, label_boxes

    best, best_iou = None, threshold
    if labels.max() == 0:
        return None
    if mask is not None:
        for i in np.unique(labels[mask]):
            if i:
                c = labels == i
                iou = (c & mask).sum() / (c | mask).sum()
                if iou >= best_iou:
                    best, best_iou = int(i), iou
        return best
    for i, b in enumerate(label_boxes(labels), start=1):
        iou = box_iou(box, b)
        if iou >= best_iou:
            best, best_iou = i, iou
    return best


def evaluate_types(cond, seg_model, cls_model, items, seed=0):
    """End to end (segment, then classify) cell typing: the class of the cell matching the true one.

    A true cell with no matching cell (mask IoU or box IoU >= 0.5) counts as wrong ("missed").
    Returns balanced accuracy over the four common classes, per source and together.
    """
    from napari_wbc import classify, segment

    common = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
    rng = np.random.default_rng(seed)
    truth, pred, src, conf = [], [], [], []
    for source, rgb, mask, box, cls in items:
        d = B.known_diameter(mask.astype(np.int32)) if mask is not None else (box[2] - box[0] + box[3] - box[1]) / 2
        img, f = cond(rgb, d, rng)
        labels = segment(img, model=seg_model, device="cpu")
        if mask is not None:
            best = matching_cell(labels, mask=_scale_labels(mask.astype(np.int32), img.shape[:2]) > 0)
        else:
            best = matching_cell(labels, box=tuple(v * f for v in box))
        p, cf = "missed", np.nan
        if best is not None:
            t = classify(img, labels, model=cls_model, device="cpu", ids=[best])
            p, cf = str(t["cell_type"].iloc[0]), float(t["confidence"].iloc[0])
        truth.append(cls), pred.append(p), src.append(source), conf.append(cf)
    truth, pred, src, conf = np.array(truth), np.array(pred), np.array(src), np.array(conf)

    def bal(sel):
        rs = [float((pred[sel & (truth == c)] == c).mean()) for c in common if (sel & (truth == c)).any()]
        return float(np.mean(rs)), int(sel[np.isin(truth, common)].sum()), int((pred[sel] == "missed").sum())

    every = np.ones(len(truth), bool)
    out = {"all": bal(every), "tecom": bal(src == "tecom"), "bccd": bal(src == "bccd")}
    out["review"] = review_stats(truth, pred, conf, common)
    return out


def review_stats(truth, pred, conf, common, threshold=REVIEW_BELOW):
    """Does the classifier's confidence point at its errors? (cells found, of the common classes)

    Returns (AUROC of confidence for right vs wrong calls, share of wrong calls with confidence below
    ``threshold``, share of all calls below it): what a technologist reviewing only the low-confidence
    cells would catch, and how many cells they would look at.
    """
    found = np.isin(truth, common) & (pred != "missed")
    right, c = (pred == truth)[found], conf[found]
    if right.all() or not right.any():
        auroc = float("nan")
    else:  # Mann-Whitney: chance that a right call is more confident than a wrong one (ties half)
        a, b = c[right][:, None], c[~right][None, :]
        auroc = float((a > b).mean() + 0.5 * (a == b).mean())
    low = c < threshold
    caught = float(low[~right].mean()) if (~right).any() else float("nan")
    return auroc, caught, float(low.mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="segmenter .safetensors (default: shipped)")
    ap.add_argument("--only", nargs="*", help="condition names to run (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the table here")
    ap.add_argument("--types", action="store_true",
                    help="score end-to-end cell typing (segment + classify) instead of segmentation")
    ap.add_argument("--classifier", default=None, help="classifier .safetensors for --types (default: shipped)")
    a = ap.parse_args(argv)
    import torch

    from napari_wbc.core.io import read_image, to_rgb

    torch.set_num_threads(a.threads)
    names = a.only or list(CONDITIONS)
    cmd = (f"Command: `{wbc_data.command_line(__file__, argv)}`  \n"
           f"torch {torch.__version__}, {a.threads} CPU thread(s), {time.strftime('%Y-%m-%d')}; diameter=None throughout\n\n")
    if a.types:
        items = typing_items()
        head = cmd + ("| condition | balanced accuracy, all (cells, missed) | Tecom | BCCD "
                      f"| confidence AUROC right vs wrong | wrong calls below {REVIEW_BELOW} | calls below {REVIEW_BELOW} |"
                      "\n|---|---|---|---|---|---|---|")
    else:
        sets = B.val_sets()
        bccd_items = [(to_rgb(read_image(img)), wbc_data.wbc_boxes(xml)) for img, xml, sp in wbc_data.bccd() if sp == "val"]
        head = cmd + "| condition | SigTuple val Dice / F1 | Tecom val Dice / F1 | BCCD odd F1 (TP/FP/FN) |\n|---|---|---|---|"
    if a.types:
        run_rows(names, lambda n: types_line(n, evaluate_types(CONDITIONS[n], a.model, a.classifier, items)), head, a.out)
    else:
        run_rows(names, lambda n: segmentation_line(n, evaluate(CONDITIONS[n], a.model, sets, bccd_items)), head, a.out)


def types_line(name, r, review=True) -> str:
    line = f"| {name} | " + " | ".join(f"{r[k][0]:.3f} ({r[k][1]}, {r[k][2]})" for k in ("all", "tecom", "bccd"))
    return line + (" | {:.2f} | {:.0%} | {:.0%} |".format(*r["review"]) if review else " |")


def segmentation_line(name, r) -> str:
    s, t, b = r["SigTuple"], r["Tecom"], r["BCCD"]
    return (f"| {name} | {s['matched_dice']:.3f} / {s['f1']:.3f} | {t['matched_dice']:.3f} / {t['f1']:.3f} "
            f"| {b['f1']:.3f} ({b['tp']}/{b['fp']}/{b['fn']}) |")


def run_rows(names, line_for, head: str, out=None) -> list[str]:
    """Print ``head`` and a table row per condition name as it is measured; write them to ``out``."""
    lines = [head]
    print(head, flush=True)
    for n in names:
        t0 = time.time()
        lines.append(line_for(n))
        print(lines[-1], f"<!-- {time.time() - t0:.0f} s -->", flush=True)
    if out:
        Path(out).write_text("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
