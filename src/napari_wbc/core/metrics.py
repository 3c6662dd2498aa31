"""Instance matching and scores: matched-cell Dice, detection F1, box matching."""
from __future__ import annotations

import numpy as np


def match_instances(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """One-to-one matching of instances by IoU (greedy, best first).

    Returns dict with ``dice`` (list, per matched pair), ``tp``, ``fp``, ``fn``.
    """
    gt = np.asarray(gt).astype(np.int64)
    pred = np.asarray(pred).astype(np.int64)
    g_ids = np.unique(gt[gt > 0])
    p_ids = np.unique(pred[pred > 0])
    if len(g_ids) == 0 or len(p_ids) == 0:
        return {"dice": [], "iou": [], "tp": 0, "fp": len(p_ids), "fn": len(g_ids)}
    both = (gt > 0) & (pred > 0)
    pairs, inter = np.unique(np.stack([gt[both], pred[both]]), axis=1, return_counts=True)
    g_area = dict(zip(*np.unique(gt[gt > 0], return_counts=True)))
    p_area = dict(zip(*np.unique(pred[pred > 0], return_counts=True)))
    cands = []
    for (g, p), n in zip(pairs.T, inter):
        iou = n / (g_area[g] + p_area[p] - n)
        if iou >= iou_threshold:
            cands.append((iou, g, p, 2 * n / (g_area[g] + p_area[p])))
    cands.sort(reverse=True)
    used_g, used_p, dice, ious = set(), set(), [], []
    for iou, g, p, d in cands:
        if g in used_g or p in used_p:
            continue
        used_g.add(g)
        used_p.add(p)
        dice.append(float(d))
        ious.append(float(iou))
    tp = len(dice)
    return {"dice": dice, "iou": ious, "tp": tp, "fp": len(p_ids) - tp, "fn": len(g_ids) - tp}


def summarise(results: list[dict]) -> dict:
    """Pool per-image match results: mean matched Dice, precision, recall, F1."""
    dice = [d for r in results for d in r["dice"]]
    tp = sum(r["tp"] for r in results)
    fp = sum(r["fp"] for r in results)
    fn = sum(r["fn"] for r in results)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {
        "matched_dice": float(np.mean(dice)) if dice else 0.0,
        "precision": prec,
        "recall": rec,
        "f1": f1,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_images": len(results),
    }


def box_iou(a, b) -> float:
    """IoU of boxes (ymin, xmin, ymax, xmax)."""
    y0, x0 = max(a[0], b[0]), max(a[1], b[1])
    y1, x1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, y1 - y0) * max(0.0, x1 - x0)
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / ua if ua > 0 else 0.0


def match_boxes(gt_boxes, pred_boxes, iou_threshold: float = 0.5) -> dict:
    """Greedy one-to-one box matching; returns tp/fp/fn and matched IoUs."""
    cands = []
    for i, g in enumerate(gt_boxes):
        for j, p in enumerate(pred_boxes):
            iou = box_iou(g, p)
            if iou >= iou_threshold:
                cands.append((iou, i, j))
    cands.sort(reverse=True)
    ug, up, ious = set(), set(), []
    for iou, i, j in cands:
        if i in ug or j in up:
            continue
        ug.add(i)
        up.add(j)
        ious.append(iou)
    tp = len(ious)
    return {"dice": [], "iou": ious, "tp": tp, "fp": len(pred_boxes) - tp, "fn": len(gt_boxes) - tp}


def label_boxes(labels: np.ndarray) -> list[tuple[int, int, int, int]]:
    from scipy import ndimage as ndi

    return [
        (s[0].start, s[1].start, s[0].stop, s[1].stop) for s in ndi.find_objects(np.asarray(labels)) if s is not None
    ]
