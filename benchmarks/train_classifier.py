"""Train the shipped WBC classifier from scratch (fixed seeds, fixed split).

    python benchmarks/train_classifier.py --out src/napari_wbc/models/wbc_classifier.safetensors --overwrite

(defaults: the shipped segmenter for masks, SmallCNN width 32, input 96 px, 3000 steps of 32,
colour strength 0.5, EMA 0.995, seed 0, one CPU thread: about 55 min). Several runs (e.g. seeds)
can be joined into one model with benchmarks/make_ensemble.py.

Data (../shared/data, see its README), one cell per example:
- Tecom crops with expert masks (nucleus + cytoplasm); validation NNN % 5 == 0.
- BCCD smears with exactly one WBC box and one class in classes.csv; validation
  odd image numbers (as wbc_data.bccd()). The cell mask is the label of the
  shipped segmenter that best overlaps the box (an ellipse in the box if none).
- wbc_crops: augmented copies of BCCD cells (320x240). Their file names do not
  identify the source cell (files sharing the first number show different cells),
  so each file is matched to its BCCD image by SIFT votes (cached), and takes
  that image's split: a validation cell never appears in training in any form.
  The votes are bimodal: files with almost none (< 6) come from images outside
  BCCD trainval and are used for training only; ambiguous files are dropped, and
  so are files whose source image has several WBC boxes.
  Masks: the shipped segmenter, the largest WBC found.
Caches (masks, matches, windows) go to /tmp/cls_cache, never the repository.

Every validation figure is computed with napari_wbc.core.classify.classify on the
full image and the cell's mask: the exact path users run.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wbc_data  # noqa: E402

from napari_wbc.core import classify as C  # noqa: E402
from napari_wbc.core.io import atomic_write, read_image, to_rgb  # noqa: E402

CACHE = Path(os.environ.get("NAPARI_WBC_CLS_CACHE", "/tmp/cls_cache"))
COMMON = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
WIN_MARGIN = 1.4  # cached window = 1.4 x the inference window (room for zoom-out and shifts)
CACHE_PX = 2  # cached windows hold 2 px per input pixel


def _write_cache(f: Path, write) -> None:
    """Write a cache (or figures) file whole or not at all (``write(binary file)`` on a temporary name, then a rename):
    a run stopped mid-write, or two runs building the same cache side by side, never leave half a file
    that a later run would read (:func:`napari_wbc.core.io.atomic_write`)."""
    def to(tmp):
        with open(tmp, "wb") as fh:
            write(fh)

    atomic_write(f, to)


# ------------------------------------------------------------------ wbc_crops -> BCCD source
def _sift(grey):
    from skimage.feature import SIFT

    s = SIFT()
    try:
        s.detect_and_extract(grey)
    except RuntimeError:
        return np.zeros((0, 128), np.float32)
    return s.descriptors.astype(np.float32)


def _grey(path, size=None):
    from PIL import Image
    from skimage.color import rgb2gray

    im = Image.open(path).convert("RGB")
    if size is not None:
        im = im.resize(size)
    return rgb2gray(np.asarray(im))


def crop_sources(log=print) -> dict:
    """{"<class>/<file>": [bccd image or None, votes, runner-up votes]} (cached).

    SIFT descriptors of each wbc_crops file vote (Lowe ratio 0.8) for the BCCD
    image (halved to 320x240, also mirrored) holding their nearest neighbour.
    """
    import torch

    out_f = CACHE / "crop_sources.json"
    out = json.loads(out_f.read_text()) if out_f.exists() else {}
    files = [f"{c.name}/{f.name}" for c in sorted((wbc_data.DATA / "wbc_crops").iterdir()) for f in sorted(c.glob("*.jpeg"))]
    if all(k in out for k in files):
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    bf = CACHE / "bccd_sift.npz"
    if bf.exists():
        z = np.load(bf)
        pool, owner, names = z["pool"], z["owner"], [str(n) for n in z["names"]]
    else:
        log("SIFT on BCCD images (once)...")
        names = sorted(p.name for p in (wbc_data.DATA / "bccd/images").glob("*.jpg"))
        descs, own = [], []
        for i, n in enumerate(names):
            g = _grey(wbc_data.DATA / "bccd/images" / n, (320, 240))
            for flip in (False, True):
                d = _sift(g[:, ::-1] if flip else g)
                descs.append(d)
                own.append(np.full(len(d), i))
        pool, owner = np.concatenate(descs), np.concatenate(own)
        _write_cache(bf, lambda fh: np.savez(fh, pool=pool, owner=owner, names=np.array(names)))
    P = torch.from_numpy(pool)
    P = P / P.norm(dim=1, keepdim=True).clamp(min=1e-6)
    O = torch.from_numpy(owner)
    log(f"matching {len(files) - len(out)} wbc_crops files to BCCD images...")
    for k in files:
        if k in out:
            continue
        d = torch.from_numpy(_sift(_grey(wbc_data.DATA / "wbc_crops" / k)))
        if len(d) < 2:
            out[k] = [None, 0, 0]
            continue
        d = d / d.norm(dim=1, keepdim=True).clamp(min=1e-6)
        top = (d @ P.T).topk(2, dim=1)
        dist = torch.sqrt((2 - 2 * top.values).clamp(min=0))
        ok = dist[:, 0] < 0.8 * dist[:, 1]
        votes = torch.bincount(O[top.indices[ok, 0]], minlength=len(names))
        v, i = votes.topk(2)
        out[k] = [names[int(i[0])], int(v[0]), int(v[1])]
    _write_cache(out_f, lambda fh: fh.write(json.dumps(out).encode()))
    return out


NO_MATCH_VOTES = 6


def confident(match) -> bool:
    name, v1, v2 = match
    return name is not None and v1 >= 12 and v1 >= 2 * v2


def unmatched_groups(matches, log=print) -> dict:
    """{file: group} for the wbc_crops files that match no BCCD image (cached).

    Those come from cells outside BCCD trainval, several files per cell: files
    of a class whose SIFT descriptors vote for each other (as :func:`crop_sources`)
    are joined (union-find), so one cell counts once when sampling.
    """
    import torch

    f = CACHE / "crop_groups.json"
    keys = sorted(k for k, m in matches.items() if m[1] < NO_MATCH_VOTES)
    if f.exists():
        out = json.loads(f.read_text())
        if sorted(out) == keys:
            return out
    log(f"grouping {len(keys)} unmatched wbc_crops files...")
    parent = {k: k for k in keys}

    def find(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for cls in sorted({k.split("/")[0] for k in keys}):
        ck = [k for k in keys if k.startswith(cls + "/")]
        descs = [torch.from_numpy(_sift(_grey(wbc_data.DATA / "wbc_crops" / k))) for k in ck]
        descs = [d / d.norm(dim=1, keepdim=True).clamp(min=1e-6) for d in descs]
        pool = torch.cat(descs)
        owner = torch.cat([torch.full((len(d),), i) for i, d in enumerate(descs)])
        for i, d in enumerate(descs):
            if len(d) < 2:
                continue
            sim = d @ pool.T
            sim[:, owner == i] = -2  # not itself
            top = sim.topk(2, dim=1)
            dist = torch.sqrt((2 - 2 * top.values).clamp(min=0))
            ok = dist[:, 0] < 0.8 * dist[:, 1]
            votes = torch.bincount(owner[top.indices[ok, 0]], minlength=len(ck))
            for j in torch.nonzero(votes >= 12).ravel().tolist():
                parent[find(ck[i])] = find(ck[j])
    out = {k: find(k) for k in keys}
    _write_cache(f, lambda fh: fh.write(json.dumps(out).encode()))
    log(f"  {len(set(out.values()))} groups")
    return out


# ------------------------------------------------------------------ records
def bccd_table():
    with open(wbc_data.DATA / "bccd/classes.csv") as f:
        classes = {r["image"]: r["classes"] for r in csv.DictReader(f)}
    out = {}
    for img, xml, split in wbc_data.bccd():
        out[img.name] = {"path": img, "boxes": wbc_data.wbc_boxes(xml), "classes": classes.get(img.name, ""), "split": split}
    return out


def records(log=print) -> list[dict]:
    """Every usable labelled cell: source, name, class, split, group (one source cell), how to mask it."""
    recs = []
    tcls = wbc_data.tecom_types()
    for img, mask, split in wbc_data.tecom():
        recs.append({"source": "tecom", "name": img.name, "path": str(img), "mask": str(mask), "cls": tcls[img.name],
                     "split": split, "group": f"tecom/{img.name}"})
    bt = bccd_table()
    for name, b in bt.items():
        cl = b["classes"]
        if len(b["boxes"]) != 1 or not cl or ";" in cl:
            continue
        recs.append({"source": "bccd", "name": name, "path": str(b["path"]), "box": list(b["boxes"][0]), "cls": cl,
                     "split": b["split"], "group": f"bccd/{name}"})
    matches = crop_sources(log)
    groups = unmatched_groups(matches, log)
    n_unmatched = n_multi = n_ambiguous = 0
    for key, m in sorted(matches.items()):
        cls = key.split("/")[0]
        if confident(m):
            src = bt.get(m[0])
            if src is None or len(src["boxes"]) != 1:
                n_multi += 1
                continue
            split, group, box = src["split"], f"bccd/{m[0]}", src["boxes"][0]
        elif m[1] < NO_MATCH_VOTES:  # a cell of no BCCD trainval image (votes are bimodal): train only
            n_unmatched += 1
            split, group, box = "train", f"wbc_crops/{groups[key]}", None
        else:  # ambiguous: could be a validation cell
            n_ambiguous += 1
            continue
        recs.append({"source": "wbc_crops", "name": key, "path": str(wbc_data.DATA / "wbc_crops" / key), "cls": cls,
                     "split": split, "group": group, "source_box": box})
    log(f"wbc_crops: {len(matches)} files; {n_unmatched} match no BCCD image (train only); "
        f"{n_ambiguous} ambiguous and {n_multi} with a several-WBC source dropped")
    return recs


# ------------------------------------------------------------------ masks
def _ellipse_in_box(shape, box):
    y0, x0, y1, x1 = box
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, max((y1 - y0) / 2, 1), max((x1 - x0) / 2, 1)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _largest(lab):
    if lab.max() == 0:
        return None
    areas = np.bincount(lab.ravel())
    areas[0] = 0
    return lab == areas.argmax()


def _seg_version(seg) -> str:
    """The segmenter file and the segmentation code, so cached masks follow either's change."""
    import napari_wbc.core.segment as S

    code = hashlib.sha1(Path(S.__file__).read_bytes()).hexdigest()[:12]
    if seg is None:
        return f"none/{code}"
    return f"{hashlib.sha1(Path(seg).read_bytes()).hexdigest()[:12]}/{code}"


def _seg_record(seg):
    """How the card names the segmenter: repo-relative path (when inside the repo) and sha1."""
    if seg is None:
        return None
    p = Path(seg).resolve()
    repo = Path(__file__).resolve().parents[1]
    name = str(p.relative_to(repo)) if p.is_relative_to(repo) else str(p)
    return {"path": name, "sha1": hashlib.sha1(p.read_bytes()).hexdigest()}


def cell_mask(rec, rgb, seg, log=print):
    """(HxW bool mask of the record's cell, method string); cached by record and segmenter."""
    from scipy import ndimage as ndi

    if rec["source"] == "tecom":
        m = read_image(rec["mask"])
        m = (m if m.ndim == 2 else m[..., 0]) > 0
        lab = ndi.label(m)[0]
        return _largest(lab), "expert mask"
    tag = hashlib.sha1(f"{rec['source']}/{rec['name']}/{_seg_version(seg)}".encode()).hexdigest()[:16]
    f = CACHE / "masks" / f"{tag}.npz"
    if f.exists():
        z = np.load(f)
        return z["mask"], str(z["method"])
    from napari_wbc.core.segment import segment

    mask, method = None, None
    if rec["source"] == "bccd":
        y0, x0, y1, x1 = rec["box"]
        ell = _ellipse_in_box(rgb.shape[:2], rec["box"])
        if seg is not None:
            lab = segment(rgb, model=seg, device="cpu", diameter=float(np.sqrt((y1 - y0) * (x1 - x0))))
            best, best_iou = 0, 0.0
            for i in np.unique(lab[ell]):
                if i == 0:
                    continue
                li = lab == i
                iou = (li & ell).sum() / (li | ell).sum()
                if iou > best_iou:
                    best, best_iou = i, iou
            if best_iou >= 0.3:
                mask, method = lab == best, "segmenter"
        if mask is None:
            mask, method = ell, "ellipse in box"
    else:  # wbc_crops
        box = rec.get("source_box")
        d = float(np.sqrt((box[2] - box[0]) * (box[3] - box[1]))) / 2 if box else 90.0
        if seg is not None:
            lab = segment(rgb, model=seg, device="cpu", diameter=d)
            m = _largest(lab)
            if m is not None and m.sum() >= 0.15 * np.pi * (d / 2) ** 2:
                mask, method = m, "segmenter"
        if mask is None:  # the largest strongly blue-purple blob, filled
            x = rgb.astype(np.float32)
            score = ndi.gaussian_filter(x[..., 2] - x[..., 1], 2)
            valid = x.sum(-1) > 30  # not the black fill of the rotation
            from skimage.filters import threshold_otsu

            fg = (score > threshold_otsu(score[valid])) & valid
            fg = ndi.binary_opening(fg, iterations=2)
            m = _largest(ndi.label(fg)[0])
            if m is None:
                return None, "none"
            mask, method = ndi.binary_fill_holes(ndi.binary_closing(m, iterations=4)), "blue blob"
    f.parent.mkdir(parents=True, exist_ok=True)
    _write_cache(f, lambda fh: np.savez_compressed(fh, mask=mask, method=method))
    return mask, method


def load_rgb(path):
    """RGB uint8; wbc_crops' black rotation fill is painted the background colour (no user image has it)."""
    rgb = to_rgb(read_image(path))
    if "wbc_crops" in str(path):
        fill = ~valid_pixels(rgb)
        if fill.any():
            lum = rgb.astype(np.int32).sum(-1)
            bright = (~fill) & (lum >= np.percentile(lum[~fill], 75))
            rgb = rgb.copy()
            rgb[fill] = np.median(rgb[bright], axis=0).astype(np.uint8)
    return rgb


def valid_pixels(rgb):
    """Pixels that are image (not the black fill of wbc_crops' rotations)."""
    from scipy import ndimage as ndi

    black = rgb.astype(np.int32).sum(-1) < 30
    lab, _ = ndi.label(black)
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    fill = np.isin(lab, edge[edge > 0])
    if fill.any():  # and the dark JPEG fringe along it
        fill = ndi.binary_dilation(fill, iterations=2)
    return ~fill


# ------------------------------------------------------------------ cached windows
def build_windows(recs, seg, *, size, context, log=print):
    """Per record: raw RGB window (uint8), outside-image flag, soft cell mask, pixel probe (cached)."""
    import pickle

    key = json.dumps([sorted((r["source"], r["name"], r["split"], r["group"]) for r in recs), _seg_version(seg),
                      size, context, WIN_MARGIN, CACHE_PX], default=str)
    f = CACHE / f"windows_{hashlib.sha1(key.encode()).hexdigest()[:16]}.pkl"
    if f.exists():
        with open(f, "rb") as fh:
            return pickle.load(fh)
    out = _build_windows(recs, seg, size=size, context=context, log=log)
    _write_cache(f, lambda fh: pickle.dump(out, fh, protocol=pickle.HIGHEST_PROTOCOL))
    return out


def _build_windows(recs, seg, *, size, context, log=print):
    n = int(round(size * CACHE_PX * WIN_MARGIN))
    out = []
    t0 = time.time()
    for k, r in enumerate(recs):
        rgb = load_rgb(r["path"])
        mask, method = cell_mask(r, rgb, seg, log)
        if mask is None or not mask.any():
            log(f"  no cell found in {r['source']}/{r['name']}; skipped")
            continue
        ys, xs = np.nonzero(mask)
        cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
        side = C.window_side(mask.sum(), max(np.ptp(ys) + 1, np.ptp(xs) + 1), context) * WIN_MARGIN
        valid = valid_pixels(rgb)
        win = C.cut_window(rgb.astype(np.float32), cy, cx, side, np.nan)
        win[~C.cut_window(valid, cy, cx, side, False)] = np.nan
        outside = np.isnan(win[..., 0]).astype(np.float32)
        win = C.resize_square(np.nan_to_num(win, nan=255.0), n)
        outside = C.resize_square(outside, n) > 0.5
        m = C.resize_square(C.cut_window(mask.astype(np.float32), cy, cx, side, 0.0), n)
        rng = np.random.default_rng(k)
        pix = rgb[valid]
        probe = pix[rng.integers(0, len(pix), 4096)]
        out.append({**r, "win": np.clip(np.round(win), 0, 255).astype(np.uint8), "outside": outside,
                    "cmask": m.astype(np.float16), "probe": probe.astype(np.uint8), "mask_method": method,
                    "cell_mask": mask})
        if (k + 1) % 200 == 0:
            log(f"  windows {k + 1}/{len(recs)} ({time.time() - t0:.0f}s)")
    return out


# ------------------------------------------------------------------ augmentation
def window_tensor(windows):
    """All cached windows as one uint8 tensor N x 5 x n x n: RGB, inside-image flag, cell mask."""
    import torch

    arr = np.stack([
        np.concatenate([w["win"], (~w["outside"])[..., None].astype(np.uint8) * 255,
                        np.round(w["cmask"].astype(np.float32) * 255).astype(np.uint8)[..., None]], -1)
        for w in windows
    ])
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 1)))


def crop_probe(w, rng, margins=(0.03, 0.5), n=4096):
    """Pixels (n x 3 uint8) of the cached window ``w`` inside a square around its cell with a random margin
    (a share of the cell's larger side, in ``margins``): what the normalisation sees on a crop of one
    cell. None when too little is left."""
    cm = w["cmask"] > 0.5
    ys, xs = np.nonzero(cm)
    if len(ys) == 0:
        return None
    pad = rng.uniform(*margins) * max(np.ptp(ys) + 1, np.ptp(xs) + 1)
    y0, y1 = max(int(ys.min() - pad), 0), int(ys.max() + 1 + pad)
    x0, x1 = max(int(xs.min() - pad), 0), int(xs.max() + 1 + pad)
    px = w["win"][y0:y1, x0:x1][~w["outside"][y0:y1, x0:x1]]
    return px[rng.integers(0, len(px), n)] if len(px) >= 100 else None


def augment_batch(wt, windows, idx, rng, *, size, background, dilation, strength=1.0, stain=0.0, stain_share=1.0,
                  blur=(0.2, 1.0), noise=(0.3, 0.04), norm="percentiles", wide_hue=0.0, grey=0.1, crop=0.0):
    """Augmented inputs (B x 4 x size x size) for windows ``idx``: the geometric part on the batch in torch
    (any rotation, mirror, zoom +-15%, shift +-6%; sampled at 2x then 2x2-averaged, like the anti-aliased
    resize of inference), then per cell: stain/colour change, percentile normalisation from the changed
    image's pixel probe, mask outline jitter, background outside the (dilated) mask, blur and noise.

    ``stain``/``stain_share``: colour-deconvolution jitter (see colour_transform); ``blur``: (share of cells,
    largest Gaussian sigma in window pixels); ``noise``: (share of cells, largest noise sigma); ``norm``:
    "percentiles" or "od" (napari_wbc.core.classify.od_parameters, from the same probe); ``wide_hue``: share
    of cells whose hue turns by any angle; ``grey``: chance (times ``strength``) a cell is seen in grey;
    ``crop``: share of cells normalised as on a crop of one cell (:func:`crop_probe`), not the whole image."""
    import torch
    import torch.nn.functional as F
    from scipy import ndimage as ndi

    from napari_wbc.core.segment import normalise
    from napari_wbc.core.train import colour_transform

    B = len(idx)
    x = wt[torch.as_tensor(idx)].float() / 255.0
    ang = rng.uniform(0, 2 * math.pi, B)
    zoom = np.exp(rng.uniform(-0.15, 0.15, B)) / WIN_MARGIN  # output span / cached span
    flip = np.where(rng.random(B) < 0.5, -1.0, 1.0)
    shift = rng.uniform(-0.06, 0.06, (B, 2)) * zoom[:, None] * 2
    theta = np.zeros((B, 2, 3), np.float32)
    theta[:, 0, 0] = np.cos(ang) * zoom * flip
    theta[:, 0, 1] = -np.sin(ang) * zoom
    theta[:, 1, 0] = np.sin(ang) * zoom * flip
    theta[:, 1, 1] = np.cos(ang) * zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(torch.from_numpy(theta), (B, 5, 2 * size, 2 * size), align_corners=False)
    x = F.avg_pool2d(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False), 2).numpy()
    out = np.empty((B, 4, size, size), np.float32)
    for b, i in enumerate(idx):
        f = colour_transform(rng, strength, stain=stain, stain_share=stain_share, wide_hue=wide_hue, grey=grey)
        rgb = f(np.moveaxis(x[b, :3], 0, -1).reshape(-1, 3)).reshape(size, size, 3)
        probe = windows[i]["probe"]
        if crop > 0 and rng.random() < crop:
            cut = crop_probe(windows[i], rng)
            probe = probe if cut is None else cut
        probe = f(probe.astype(np.float32) / 255.0)
        if norm == "od":
            rgbn = C.od_normalise(rgb, *C.od_parameters(probe))
        else:
            lo, hi = np.percentile(probe, [0.5, 99.5], axis=0)
            rgbn = normalise(rgb, np.stack([lo, np.maximum(hi, lo + 1e-3)]))
        rgbn[x[b, 3] < 0.5] = background
        mask = x[b, 4]
        if rng.random() < 0.5:  # segmenter-like outline errors
            k = int(rng.integers(1, 3))
            hard = mask > 0.5
            hard = ndi.binary_dilation(hard, iterations=k) if rng.random() < 0.5 else ndi.binary_erosion(hard, iterations=k)
            if hard.any():
                mask = ndi.gaussian_filter(hard.astype(np.float32), 0.5)
        out[b] = C.finish_input(rgbn, mask, background=background, dilation=dilation)
        if rng.random() < blur[0]:
            out[b, :3] = ndi.gaussian_filter(out[b, :3], (0, rng.uniform(0.3, blur[1]), rng.uniform(0.3, blur[1])))
        if rng.random() < noise[0]:
            out[b, :3] += rng.normal(0, rng.uniform(0.01, noise[1]), (3, size, size)).astype(np.float32)
    return out


# ------------------------------------------------------------------ evaluation
def predict(windows, net, card, device="cpu"):
    """Probabilities (N x 5, CLASSES order) via classify() on each full image and cell mask."""
    probs = []
    for w in windows:
        rgb = load_rgb(w["path"])
        lab = w["cell_mask"].astype(np.int32)
        df = C.classify(rgb, lab, model=(net, card), device=device)
        probs.append(df[C.PROB_COLUMNS].to_numpy()[0])
    return np.array(probs)


def metrics(y_true, y_pred, classes=COMMON) -> dict:
    """Accuracy, balanced accuracy (mean recall over ``classes``), per-class recall, confusion (rows true)."""
    yt, yp = np.asarray(y_true), np.asarray(y_pred)
    keep = np.isin(yt, classes)
    yt, yp = yt[keep], yp[keep]
    recall = {c: (float((yp[yt == c] == c).mean()) if (yt == c).any() else None) for c in classes}
    rs = [v for v in recall.values() if v is not None]
    cm = [[int(((yt == a) & (yp == b)).sum()) for b in C.CLASSES] for a in classes]
    return {"n": int(len(yt)), "accuracy": float((yt == yp).mean()) if len(yt) else None,
            "balanced_accuracy": float(np.mean(rs)) if rs else None, "recall": recall,
            "count": {c: int((yt == c).sum()) for c in classes},
            "confusion": {"rows_true": classes, "cols_pred": C.CLASSES, "matrix": cm}}


SETS = ("tecom+bccd", "tecom", "bccd", "wbc_crops", "wbc_crops per cell")


def report(windows, probs) -> dict:
    """Metrics per validation set from probabilities (N x 5). ``wbc_crops per cell``: the mean
    probabilities of all files of one source cell, so each cell counts once."""
    pred = np.array([C.CLASSES[i] for i in np.asarray(probs).argmax(1)])
    true = np.array([w["cls"] for w in windows])
    src = np.array([w["source"] for w in windows])
    res = {}
    primary = np.isin(src, ["tecom", "bccd"])
    res["tecom+bccd"] = metrics(true[primary], pred[primary])
    for s in ("tecom", "bccd", "wbc_crops"):
        res[s] = metrics(true[src == s], pred[src == s])
    groups = sorted({w["group"] for w in windows if w["source"] == "wbc_crops"})
    gi = {g: i for i, g in enumerate(groups)}
    gp = np.zeros((len(groups), len(C.CLASSES)))
    gt = [None] * len(groups)
    for w, p in zip(windows, probs):
        if w["source"] == "wbc_crops":
            gp[gi[w["group"]]] += p
            gt[gi[w["group"]]] = w["cls"]
    res["wbc_crops per cell"] = metrics(np.array(gt), np.array([C.CLASSES[i] for i in gp.argmax(1)]))
    return res


def evaluate(windows, net, card, device="cpu") -> dict:
    return report(windows, predict(windows, net, card, device))


def evaluate_file(model, val, seg, out, command, overwrite=False) -> dict:
    """Score the classifier file ``model`` on the validation windows; write the figures as JSON to ``out``."""
    from napari_wbc.core.models import load_model

    if not Path(model).is_file():
        raise SystemExit(f"--evaluate: no classifier file at {model}")
    out = Path(out)
    if out.suffix != ".json":
        raise SystemExit(f"--out: with --evaluate, expected a .json file for the figures, got {out}")
    if out.exists() and not overwrite:
        raise SystemExit(f"--out: {out} exists (pass --overwrite to replace it)")
    net, card = load_model(model, kind="classifier", device="cpu")
    res = evaluate(val, net, card, "cpu")
    for k, v in res.items():
        print(f"val {k}: n={v['n']} acc {v['accuracy']} bal.acc {v['balanced_accuracy']} recall {v['recall']}")
    doc = {"model": str(model), "segmenter_for_masks": _seg_record(seg), "validation": res, "command": command}
    _write_cache(out, lambda fh: fh.write(json.dumps(doc, indent=1).encode()))
    print(f"saved {out}")
    return doc


# ------------------------------------------------------------------ training
def sample_weights(train, basophil_share):
    """Equal weight per common class; within a class equal weight per source set and per source cell."""
    from collections import Counter

    domain = ["tecom" if t["source"] == "tecom" else "bccd" for t in train]
    group_n = Counter(t["group"] for t in train)
    groups_per = Counter()  # (class, domain) -> number of source cells
    for g in {(t["cls"], d, t["group"]) for t, d in zip(train, domain)}:
        groups_per[g[:2]] += 1
    doms_per = Counter(k[0] for k in groups_per)
    w = np.zeros(len(train))
    for i, (t, d) in enumerate(zip(train, domain)):
        share = basophil_share if t["cls"] == "basophil" else (1 - basophil_share) / len(COMMON)
        w[i] = share / doms_per[t["cls"]] / groups_per[(t["cls"], d)] / group_n[t["group"]]
    return w / w.sum()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/runs/wbc_classifier.safetensors")
    ap.add_argument("--seg", default=str(Path(__file__).resolve().parents[1] / "src/napari_wbc/models/wbc_unet.safetensors"),
                    help="segmenter for the BCCD / wbc_crops cell masks ('none': boxes / colour blobs)")
    ap.add_argument("--minutes", type=float, default=12.0, help="training time budget (wall clock)")
    ap.add_argument("--steps", type=int, default=3000, help="fixed number of steps (0: as many as --minutes allow)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--input-size", type=int, default=96)
    ap.add_argument("--context", type=float, default=1.5)
    ap.add_argument("--basophil-share", type=float, default=0.03)
    ap.add_argument("--colour", type=float, default=0.5, help="strength of the stain/colour augmentation")
    ap.add_argument("--stain-jitter", type=float, default=0.0,
                    help="colour-deconvolution stain jitter: each stain's density scaled by up to +-this")
    ap.add_argument("--stain-share", type=float, default=1.0, help="share of cells the stain jitter is applied to")
    ap.add_argument("--blur-share", type=float, default=0.2, help="share of cells blurred")
    ap.add_argument("--blur-max", type=float, default=1.0, help="largest blur sigma, in input pixels")
    ap.add_argument("--noise-share", type=float, default=0.3, help="share of cells given noise")
    ap.add_argument("--noise-max", type=float, default=0.04, help="largest noise sigma (normalised intensity)")
    ap.add_argument("--wide-hue", type=float, default=0.0, help="share of cells whose hue turns by any angle")
    ap.add_argument("--grey", type=float, default=0.1,
                    help="chance (times --colour) that a cell is shown in grey, as a greyscale camera sees it")
    ap.add_argument("--crop-probe", type=float, default=0.0,
                    help="share of cells normalised as on a single-cell crop (percentiles of the pixels within a "
                         "random 3-50 %% margin around the cell, not of the whole image)")
    ap.add_argument("--norm", choices=["percentiles", "od"], default="percentiles",
                    help="input normalisation: per-channel percentiles, or optical density (white balance on the "
                         "background, one exponent bringing the darkest stain to a reference)")
    ap.add_argument("--ema", type=float, default=0.995, help="decay of the weight average that is shipped (0: last weights)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hold-out-source", nargs="*", default=[], choices=["tecom"],
                    help="train without this source and score all its cells (an unseen lab's stain and scanner; "
                         "BCCD cannot be held out: wbc_crops are copies of its cells)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--evaluate", metavar="MODEL", default=None,
                    help="train nothing: score this classifier file on the validation split, with the cell masks "
                         "of --seg (to compare classifiers on the same masks), and write the figures as JSON to --out")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from napari_wbc.core.models import build_network, save_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    seg = None if args.seg.lower() == "none" or not Path(args.seg).exists() else args.seg
    print(f"segmenter for masks: {seg or 'none (fallback shapes)'}", flush=True)
    t_start = time.time()
    recs = records()
    background, dilation = C.DEFAULT_BACKGROUND, C.DEFAULT_DILATION
    windows = build_windows(recs, seg, size=args.input_size, context=args.context)
    held = set(args.hold_out_source)
    train = [w for w in windows if w["split"] == "train" and w["source"] not in held]
    val = [w for w in windows if w["split"] == "val" or w["source"] in held]
    # no source cell may be on both sides
    assert not ({w["group"] for w in train} & {w["group"] for w in val})
    prep_s = time.time() - t_start
    print(f"data ready in {prep_s:.0f}s: train {len(train)} ({len({w['group'] for w in train})} cells), "
          f"val {len(val)} ({len({w['group'] for w in val})} cells)", flush=True)
    from collections import Counter

    print("train", sorted(Counter((w["source"], w["cls"]) for w in train).items()))
    print("val", sorted(Counter((w["source"], w["cls"]) for w in val).items()))
    print("mask methods", sorted(Counter((w["source"], w["mask_method"]) for w in windows).items()), flush=True)
    if args.evaluate:
        return evaluate_file(args.evaluate, val, seg, args.out, wbc_data.command_line(__file__, argv), overwrite=args.overwrite)

    arch = {"name": "SmallCNN", "in_channels": 4, "num_classes": len(C.CLASSES), "width": args.width, "dropout": 0.3}
    card = {"kind": "classifier", "arch": arch, "classes": C.CLASSES, "input_size": args.input_size,
            "context": args.context, "background_value": background, "mask_dilation": dilation,
            "normalisation": ({"method": C.OPTICAL_DENSITY, "background_percentile": C.OD_BACKGROUND_PERCENTILE,
                               "dark_percentile": C.OD_DARK_PERCENTILE, "reference": C.OD_REFERENCE}
                              if args.norm == "od" else
                              {"method": "per-image robust percentiles per RGB channel", "low": 0.5, "high": 99.5})}
    dev = torch.device(args.device)
    net = build_network(arch).to(dev)
    probs_w = sample_weights(train, args.basophil_share)
    targets = np.array([C.CLASSES.index(w["cls"]) for w in train])
    wt = window_tensor(train)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=5e-4)
    ema = None
    if args.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
    # time budget -> steps: measure the first 20 steps
    steps = args.steps
    t0 = time.time()
    step, running = 0, []
    sched = None
    net.train()
    while True:
        if steps and step >= steps:
            break
        idx = rng.choice(len(train), size=args.batch, p=probs_w)
        x = torch.from_numpy(augment_batch(wt, train, idx, rng, size=args.input_size, background=background,
                                           dilation=dilation, strength=args.colour,
                                           stain=args.stain_jitter, stain_share=args.stain_share,
                                           blur=(args.blur_share, args.blur_max),
                                           noise=(args.noise_share, args.noise_max), norm=args.norm,
                                           wide_hue=args.wide_hue, grey=args.grey, crop=args.crop_probe)).to(dev)
        y = torch.from_numpy(targets[idx]).to(dev)
        loss = F.cross_entropy(net(x), y, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(net)
        step += 1
        running.append(float(loss.detach()))
        if step == 20 and not steps:
            per = (time.time() - t0) / 20
            steps = max(int(args.minutes * 60 / per), 40)
            print(f"{per:.2f}s/step -> {steps} steps in {args.minutes} min", flush=True)
        if steps and sched is None:
            import warnings

            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(step):
                    sched.step()
        elif sched is not None:
            sched.step()
        if step % 100 == 0:
            print(f"step {step}/{steps} loss {np.mean(running):.4f} ({time.time() - t0:.0f}s)", flush=True)
            running = []
    train_s = time.time() - t0
    net.eval()
    t1 = time.time()
    last_res = None
    if ema is not None:  # the raw last weights, for the record; the average is what ships
        last_res = evaluate(val, net, card, "cpu")
        print(f"val (last weights, not shipped) tecom+bccd bal.acc {last_res['tecom+bccd']['balanced_accuracy']}")
        net = ema.module
        net.eval()
    res = evaluate(val, net, card, "cpu")
    tr_res = evaluate([w for w in train if w["source"] != "wbc_crops"], net, card, "cpu")
    for k, v in res.items():
        print(f"val {k}: n={v['n']} acc {v['accuracy']} bal.acc {v['balanced_accuracy']} recall {v['recall']}")
    print(f"train (fit) tecom+bccd bal.acc {tr_res['tecom+bccd']['balanced_accuracy']}", flush=True)
    counts = Counter((w["source"], w["split"], w["cls"]) for w in windows)
    card.update({
        "data": {
            "tecom": "Jiangxi Tecom crops with expert masks (labels noisy)",
            "bccd": "BCCD trainval smears with exactly one WBC box and one class",
            "wbc_crops": "augmented BCCD cell images, each matched to its BCCD source image by SIFT votes",
            "examples": {f"{s}/{sp}/{c}": n for (s, sp, c), n in sorted(counts.items())},
            "masks": {f"{s}/{m}": n for (s, m), n in sorted(Counter((w["source"], w["mask_method"]) for w in windows).items())},
            "segmenter_for_masks": _seg_record(seg),
        },
        "split": "Tecom NNN % 5 == 0 -> val; BCCD odd image number -> val; wbc_crops take their matched BCCD "
                 "image's split (files matching no BCCD trainval image: train only); no source cell on both sides"
                 + (f"; held out entirely (all cells scored, none trained on): {sorted(held)}" if held else ""),
        "training": {
            "steps": step, "batch": args.batch, "epochs_equivalent": round(step * args.batch / max(len(train), 1), 1),
            "lr": args.lr, "optimizer": "AdamW, one-cycle", "loss": "cross-entropy, label smoothing 0.1",
            "seed": args.seed, "threads": args.threads, "device": str(dev), "train_seconds": round(train_s),
            "prep_seconds": round(prep_s),
            "sampling": "class-balanced over the 4 common classes; within a class half Tecom, half BCCD-like, "
                        "equal weight per source cell",
            "augmentation": f"stain/colour (napari_wbc.core.train.colour_transform, strength {args.colour}), zoom +-15%, any rotation, "
                            f"mirror, shift +-6%, mask outline dilate/erode 1-2 px, stain jitter {args.stain_jitter} on "
                            f"{args.stain_share} of cells, blur sigma 0.3-{args.blur_max} px on {args.blur_share}, "
                            f"noise up to {args.noise_max} on {args.noise_share}, any hue on {args.wide_hue}, grey "
                            f"{args.grey} x strength, normalised as a single-cell crop on {args.crop_probe}",
            "basophil": f"only 2 training examples (Tecom 1, BCCD 1): drawn with share {args.basophil_share} "
                        "under full augmentation; basophil is a possible output but NOT validated (no "
                        "validation basophil exists)",
            "model_selection": (f"none: the exponential moving average (decay {args.ema}) of the weights at the "
                                "last step is shipped, decided before seeing validation" if ema is not None else
                                "none: the weights after the last step are shipped"),
        },
        "validation": res,
        "validation_last_weights_not_shipped": ({k: {kk: v[kk] for kk in ("n", "accuracy", "balanced_accuracy")}
                                                 for k, v in last_res.items()} if last_res else None),
        "train_fit": {"tecom+bccd": tr_res["tecom+bccd"]},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": wbc_data.command_line(__file__, argv),
    })
    print(f"eval {time.time() - t1:.0f}s", flush=True)
    path = save_model(net.cpu(), card, args.out, overwrite=args.overwrite)
    print(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return card


if __name__ == "__main__":
    main()
