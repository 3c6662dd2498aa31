"""Single-cell crops: one WBC cut from a smear with a thin margin, as cell-image collections ship them.

    python benchmarks/single_cell_crops.py [--model PATH] [--margins 0.05 0.1 0.2 0.3 0.5] [--threads 1]
    python benchmarks/single_cell_crops.py --types [--classifier PATH] [...]   # typing, end to end

Many public WBC collections (and analysers' exports) are crops of one cell with a little smear around
it: the WBC fills most of the image and few red cells are left to judge the magnification by. This cuts
each held-out BCCD WBC (odd images, boxes) with a margin of ``m`` times its box side on every side
(clipped at the image's edge), optionally resized so the WBC is ``--sizes`` px across, and runs
``segment()`` with ``diameter=None`` (as a user does) and with the diameter from the box. Scored:
detection of the WBCs whose box lies at least half inside the crop (box IoU >= 0.5; F1, TP/FP/FN), and
the estimated diameter over the box's (median and 10th-90th percentile).
Tecom validation crops (already single cells, 120 px) are cut tighter the same way around their expert
mask and scored by matched Dice.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import robustness as R  # noqa: E402
import wbc_data  # noqa: E402

from napari_wbc.core.metrics import label_boxes, match_boxes, match_instances, summarise  # noqa: E402


def crop_around(shape, box, margin):
    """(y0, x0, y1, x1) of the crop around ``box`` with ``margin`` x its larger side on each side."""
    y0, x0, y1, x1 = box
    m = margin * max(y1 - y0, x1 - x0)
    return (max(0, int(round(y0 - m))), max(0, int(round(x0 - m))),
            min(shape[0], int(round(y1 + m))), min(shape[1], int(round(x1 + m))))


def resized(rgb, factor):
    if factor == 1:
        return rgb
    from skimage.transform import resize

    out = resize(rgb, (max(1, round(rgb.shape[0] * factor)), max(1, round(rgb.shape[1] * factor))),
                 order=1, anti_aliasing=factor < 1, preserve_range=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def bccd_crops(margin):
    """(crop RGB, WBC boxes in it, diameter of the cut WBC) for every held-out BCCD WBC box."""
    for _path, rgb, boxes in wbc_data.bccd_with_boxes("val"):
        for box in boxes:
            cy0, cx0, cy1, cx1 = crop_around(rgb.shape, box, margin)
            inside = []
            for b in boxes:  # WBCs at least half inside the crop are to be found
                iy0, ix0, iy1, ix1 = max(b[0], cy0), max(b[1], cx0), min(b[2], cy1), min(b[3], cx1)
                if iy1 > iy0 and ix1 > ix0 and (iy1 - iy0) * (ix1 - ix0) >= 0.5 * (b[2] - b[0]) * (b[3] - b[1]):
                    inside.append((iy0 - cy0, ix0 - cx0, iy1 - cy0, ix1 - cx0))
            yield rgb[cy0:cy1, cx0:cx1], inside, ((box[2] - box[0]) + (box[3] - box[1])) / 2


def tecom_crops(margin):
    """(crop RGB, crop labels, cell diameter) for Tecom validation crops cut around their expert mask."""
    from scipy import ndimage as ndi

    for img, mask, split in wbc_data.tecom():
        if split != "val":
            continue
        rgb, lab = wbc_data.load_image_mask(img, mask)
        if not lab.any():
            continue
        big = np.bincount(lab.ravel())[1:].argmax() + 1
        sl = ndi.find_objects((lab == big).astype(np.int32))[0]
        box = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
        y0, x0, y1, x1 = crop_around(rgb.shape, box, margin)
        yield rgb[y0:y1, x0:x1], lab[y0:y1, x0:x1], ((box[2] - box[0]) + (box[3] - box[1])) / 2


def segment_estimated(img, model):
    """segment() with the diameter estimated, and that first estimate (one run, not estimated again)."""
    from napari_wbc.core.segment import iter_segment

    first = None
    for item in iter_segment(img, model=model, device="cpu"):
        if item[0] == "diameter" and first is None:
            first = float(item[1])
        elif item[0] == "labels":
            return item[1], first


def run(margin, size, model):
    from napari_wbc import segment

    out = {}
    res_auto, res_known, ratios = [], [], []
    for crop, boxes, d in bccd_crops(margin):
        f = 1.0 if size is None else size / d
        img = resized(crop, f)
        bx = [tuple(v * f for v in b) for b in boxes]
        labels, est = segment_estimated(img, model)
        ratios.append(est / (d * f))
        res_auto.append(match_boxes(bx, label_boxes(labels)))
        res_known.append(match_boxes(bx, label_boxes(segment(img, model=model, device="cpu", diameter=d * f))))
    out["BCCD"] = (summarise(res_auto), summarise(res_known), np.percentile(ratios, [10, 50, 90]))
    res_auto, res_known, ratios = [], [], []
    for crop, lab, d in tecom_crops(margin):
        f = 1.0 if size is None else size / d
        img = resized(crop, f)
        lab = R._scale_labels(lab, img.shape[:2])
        labels, est = segment_estimated(img, model)
        ratios.append(est / (d * f))
        res_auto.append(match_instances(lab, labels))
        res_known.append(match_instances(lab, segment(img, model=model, device="cpu", diameter=d * f)))
    out["Tecom"] = (summarise(res_auto), summarise(res_known), np.percentile(ratios, [10, 50, 90]))
    return out


def run_types(margin, model, classifier):
    """End-to-end typing on single-cell crops of the typed validation cells (robustness.typing_items: 60
    Tecom crops, 130 held-out BCCD cells): segment(), the cell matching the true one (mask or box IoU >=
    0.5), classify(); a cell without a match counts as wrong. Balanced accuracy over the four common
    classes, and the number missed."""
    from napari_wbc import classify, segment

    common = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
    truth, pred = [], []
    for _source, rgb, mask, box, cls in R.typing_items():
        if mask is not None:
            from scipy import ndimage as ndi

            sl = ndi.find_objects(mask.astype(np.int32))[0]
            box = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
        y0, x0, y1, x1 = crop_around(rgb.shape, box, margin)
        img = rgb[y0:y1, x0:x1]
        labels = segment(img, model=model, device="cpu")
        if mask is not None:
            best = R.matching_cell(labels, mask=mask[y0:y1, x0:x1])
        else:
            best = R.matching_cell(labels, box=(box[0] - y0, box[1] - x0, box[2] - y0, box[3] - x0))
        p = "missed"
        if best is not None:
            p = str(classify(img, labels, model=classifier, device="cpu", ids=[best])["cell_type"].iloc[0])
        truth.append(cls), pred.append(p)
    truth, pred = np.array(truth), np.array(pred)
    rs = [float((pred[truth == c] == c).mean()) for c in common if (truth == c).any()]
    return float(np.mean(rs)), int(np.isin(truth, common).sum()), int((pred == "missed").sum())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="segmenter .safetensors (default: shipped)")
    ap.add_argument("--margins", type=float, nargs="*", default=[0.05, 0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--sizes", nargs="*", default=["native", "60"],
                    help="WBC diameter in px after resizing the crop ('native': as cut)")
    ap.add_argument("--types", action="store_true",
                    help="end-to-end typing (segment + classify) of the typed validation cells, cut as crops")
    ap.add_argument("--classifier", default=None, help="classifier .safetensors for --types (default: shipped)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the table here")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.types:
        lines = [f"Command: `{wbc_data.command_line(__file__, argv)}`  ", "",
                 "| margin | balanced accuracy (cells, missed) |", "|---|---|"]
        print("\n".join(lines), flush=True)
        for m in a.margins:
            acc, n, missed = run_types(m, a.model, a.classifier)
            lines.append(f"| {m:.2f} | {acc:.3f} ({n}, {missed}) |")
            print(lines[-1], flush=True)
        if a.out:
            Path(a.out).write_text("\n".join(lines) + "\n")
        return
    lines = [f"Command: `{wbc_data.command_line(__file__, argv)}`  ",
             f"torch {torch.__version__}, {a.threads} CPU thread(s), {time.strftime('%Y-%m-%d')}", "",
             "| set | margin | WBC size | F1 auto (TP/FP/FN) | F1 diameter known (TP/FP/FN) | Dice auto / known "
             "| estimate / true diameter, median (10-90 %) |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for size in a.sizes:
        px = None if size == "native" else float(size)
        for m in a.margins:
            t0 = time.time()
            for key, (ra, rk, q) in run(m, px, a.model).items():
                dice = f"{ra['matched_dice']:.3f} / {rk['matched_dice']:.3f}" if key == "Tecom" else "-"
                lines.append(f"| {key} | {m:.2f} | {size} | {ra['f1']:.3f} ({ra['tp']}/{ra['fp']}/{ra['fn']}) | "
                             f"{rk['f1']:.3f} ({rk['tp']}/{rk['fp']}/{rk['fn']}) | {dice} | "
                             f"{q[1]:.2f} ({q[0]:.2f}-{q[2]:.2f}) |")
                print(lines[-1], flush=True)
            print(f"  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
