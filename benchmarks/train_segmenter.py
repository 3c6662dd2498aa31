"""Train the shipped WBC segmenter from scratch (reproducible: fixed seeds and split).

The shipped model (version 0.5.0; 14 min on one CPU thread):

    python benchmarks/train_segmenter.py --steps 2500 --eval-every 250 --batch 16 --lr 0.003 \
        --threads 1 --stain-jitter 0.3 --stain-share 0.5 --field-norm 0.3 --empty-share 0.15 \
        --small-field 0.3 --ema 0.998

Data: SigTuple patches + smears and Tecom crops (full masks), BCCD even-numbered
images as weak negatives (everything outside WBC boxes is background; inside
is ignored). Validation (never trained on): see benchmarks/wbc_data.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wbc_data  # noqa: E402

from napari_wbc.core import train as T  # noqa: E402
from napari_wbc.core.models import build_network, save_model  # noqa: E402


def load(split, exclude=()):
    samples = []
    for src in (wbc_data.sigtuple_patches, wbc_data.sigtuple_smears, wbc_data.tecom):
        if src.__name__ in exclude:
            continue
        for img, mask, sp in src():
            if sp != split:
                continue
            rgb, lab = wbc_data.load_image_mask(img, mask)
            if lab.max() == 0:
                continue
            samples.append(T.make_sample(rgb, lab, name=f"{src.__name__}/{img.name}"))
    return samples


def load_bccd_weak():
    out = []
    for img, rgb, boxes in wbc_data.bccd_with_boxes("train"):
        if not boxes:
            continue
        w = np.ones(rgb.shape[:2], np.float32)
        for y0, x0, y1, x1 in boxes:
            py, px = 0.15 * (y1 - y0), 0.15 * (x1 - x0)
            w[max(int(y0 - py), 0) : int(y1 + py), max(int(x0 - px), 0) : int(x1 + px)] = 0
        lab = np.zeros(rgb.shape[:2], np.int32)
        s = T.make_sample(rgb, lab, diameter=wbc_data.box_diameter(boxes), weight=w, name=f"bccd/{img.name}")
        out.append(s)
    return out


def load_bccd_windows(every: int, win: int = 240):
    """Red-cell-only 240 px windows of the even (training) BCCD images, clear of every WBC box (15 %
    margin), one in ``every``: each its own sample, so it is normalised on itself as segment() would."""
    out, n = [], 0
    for img, rgb, boxes in wbc_data.bccd_with_boxes("train"):
        if not boxes:
            continue
        d = wbc_data.box_diameter(boxes)
        for y, x in wbc_data.clear_windows(rgb.shape, boxes, win):
            n += 1
            if n % every == 0:
                out.append(T.make_sample(rgb[y : y + win, x : x + win], np.zeros((win, win), np.int32), diameter=d,
                                         weight=np.ones((win, win), np.float32), name=f"bccd/{img.stem}_y{y}_x{x}"))
    return out


def with_defaults(args: dict) -> dict:
    """This script's arguments as a dict, those missing from ``args`` (a card older than an option) at their
    defaults: every model trained before an option trained as its default."""
    return {**vars(parser().parse_args([])), **args}


def training_data(args: dict) -> tuple[list, list]:
    """(annotated training samples, BCCD weak negatives) as the arguments ask (a dict as in
    :func:`crop_options`)."""
    a = with_defaults(args)
    train = load("train", a["exclude"] or [])
    bccd = [] if a["no_bccd"] else load_bccd_weak()
    if a["bccd_windows"]:
        bccd += load_bccd_windows(a["bccd_windows"])
    return train, bccd


def crop_options(args: dict) -> dict:
    """The training crops' options (``core.train.make_batch`` / ``random_crop`` keywords) from this script's
    arguments as a dict (``vars(args)``, or a card's ``training.args``; see :func:`with_defaults`)."""
    a = with_defaults(args)
    return {"crop": a["crop"], "wide_hue": a["wide_hue"], "stain": a["stain_jitter"], "stain_share": a["stain_share"],
            "stain_weak": not a["no_stain_on_weak"], "field_norm": a["field_norm"], "empty_share": a["empty_share"],
            "small_field": a["small_field"], "grey": a["grey_share"], "overlap": a["overlap_share"]}


def parser() -> argparse.ArgumentParser:
    """The command line of this script (also the defaults of a card's ``training.args``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--target-diameter", type=float, default=None,
                    help=f"WBC diameter (px) the network works at (default {T.TARGET_DIAMETER:g})")
    ap.add_argument("--crop", type=int, default=96, help="training crop side at network scale (px)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wide-hue", type=float, default=0.0,
                    help="share of training crops whose hue turns by any angle (stain variation)")
    ap.add_argument("--stain-jitter", type=float, default=0.0,
                    help="colour-deconvolution jitter: each stain's density scaled by up to +-this")
    ap.add_argument("--stain-share", type=float, default=1.0, help="share of training crops given the stain jitter")
    ap.add_argument("--no-stain-on-weak", action="store_true",
                    help="no stain jitter on the weakly labelled BCCD negatives")
    ap.add_argument("--field-norm", type=float, default=0.0,
                    help="share of crops normalised on a random field around them (0.75-4 crops wide), not the whole image")
    ap.add_argument("--empty-share", type=float, default=0.0,
                    help="share of crops centred far from any cell (red cells only), normalised on a field 1-2 crops wide")
    ap.add_argument("--small-field", type=float, default=0.0,
                    help="share of crops showing a small image (a field 0.35-1 crop wide, normalised on itself, padded around)")
    ap.add_argument("--ema", type=float, default=0.0,
                    help="keep and judge an exponential moving average of the weights with this decay per step (0: none)")
    ap.add_argument("--grey-share", type=float, default=0.1,
                    help="share of crops turned to grey, as a greyscale camera sees them (0.1 in every shipped model)")
    ap.add_argument("--bccd-windows", type=int, default=0,
                    help="add one in N red-cell-only 240 px windows of the training BCCD images as samples (0: none)")
    ap.add_argument("--overlap-share", type=float, default=0.0,
                    help="share of training crops laid under one or two more layers of red cells from other "
                         "training images (a thick smear; needs --empty-share for the red-cell fields)")
    ap.add_argument("--no-bccd", action="store_true", help="do not use BCCD weak negatives")
    ap.add_argument("--exclude", nargs="*", default=[], choices=["tecom", "sigtuple_patches", "sigtuple_smears"],
                    help="leave a data set out (for the fine-tuning benchmark's unseen domain)")
    ap.add_argument("--out", default="src/napari_wbc/models/wbc_unet.safetensors")
    return ap


def main(argv=None):
    a = parser().parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    train, bccd = training_data(vars(a))
    val = load("val", a.exclude)
    # every sample (BCCD weak negatives included) is drawn with the same chance
    train_all = train + bccd
    print(f"train {len(train)} + bccd weak {len(bccd)}, val {len(val)} (loaded in {time.time()-t0:.0f}s)", flush=True)
    # a fixed subset of validation for model selection during training (every 2nd)
    val_sel = val[::2]
    torch.manual_seed(a.seed)
    card = {
        "kind": "segmenter",
        "arch": T.SEGMENTER_ARCH,
        "target_diameter": a.target_diameter or T.TARGET_DIAMETER,
        "outputs": ["foreground", "normalised distance to cell edge"],
        "normalisation": "per-channel 0.5-99.5 percentile stretch of the whole image",
    }
    net = build_network(T.SEGMENTER_ARCH)
    best, hist = T.train_segmenter(
        net, card, train_all, val_sel, steps=a.steps, batch_size=a.batch, lr=a.lr,
        eval_every=a.eval_every, device=a.device, seed=a.seed, ema=a.ema, log=lambda s: print(s, flush=True),
        **crop_options(vars(a)),
    )
    if best is not None:
        net.load_state_dict(best)
    final = T.evaluate(net, card, val, a.device)
    card.update({
        "name": "wbc_unet",
        "version": "0.5.0",
        "created": datetime.date.today().isoformat(),
        "training": {
            "script": "benchmarks/train_segmenter.py",
            "args": vars(a),
            "data": {
                "sigtuple_patches_and_smears": "masks, train split (benchmarks/wbc_data.py)",
                "tecom": "masks (nucleus+cytoplasm), train split",
                "bccd_weak": f"{len(bccd)} even-numbered images, background outside WBC boxes",
            },
            "n_train": len(train), "n_val": len(val),
            "seed": a.seed,
            "wall_time_s": round(time.time() - t0),
            "history": hist,
        },
        "validation": {"all_val_known_diameter": final},
        "limits": "Research use only, not a medical device. Trained on three public data sets.",
    })
    p = save_model(net, card, a.out, overwrite=True)
    print(json.dumps(final, indent=1))
    print("wrote", p, f"{Path(p).stat().st_size/1e6:.1f} MB")


if __name__ == "__main__":
    main()
