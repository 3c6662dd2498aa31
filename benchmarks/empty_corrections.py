"""Fields without any WBC as corrections: does fine-tuning on them lower false WBCs?

    python benchmarks/empty_corrections.py --arm {none,cells,cells+empty} [--keep-all] [--threads 1]

A user who deletes the only (false) "cell" of a red-cell-only field leaves labels that hold no cell.
``finetune`` leaves such images out (with a warning). This measures the alternative that was tried:
learning them as fields without any WBC. From the shipped segmenter, with the same seed:

- ``cells``: fine-tuned on 10 BCCD training images with one WBC box each (the shipped model's outline
  accepted where it is the only cell found and matches the box);
- ``cells+empty``: the same plus the BCCD training-split 240 px red-cell-only windows
  (``wbc_data.clear_windows``) where the shipped model finds a false WBC, as all-zero labels, trained
  on at the cells' size and never held out (the code tried: ``--arm cells+empty`` passes them through
  ``train_segmenter`` itself, as the tried ``finetune`` did);
- ``none``: the shipped model.

``--keep-all`` keeps the fine-tuned weights even when they do not beat the base on the cells held out
(``finetune`` would return the base then), to see what the training itself did. Scored on held-out data
only: false WBCs per red-cell-only field (``empty_fields.py``'s two sets) and BCCD odd-image WBC
detection F1 (box IoU >= 0.5).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import empty_fields  # noqa: E402
import segmentation  # noqa: E402
import wbc_data  # noqa: E402


def training_material(with_empty: bool):
    import napari_wbc
    from napari_wbc.core.metrics import label_boxes, match_boxes

    images, labels, fields = [], [], []
    for _p, rgb, boxes in wbc_data.bccd_with_boxes("train"):
        if len(images) < 10 and len(boxes) == 1:
            lab = napari_wbc.segment(rgb, device="cpu")
            if lab.max() == 1 and match_boxes(boxes, label_boxes(lab))["tp"] == 1:
                images.append(rgb)
                labels.append(lab)
        if with_empty and boxes:
            for y, x in wbc_data.clear_windows(rgb.shape, boxes, 240):
                win = rgb[y : y + 240, x : x + 240]
                if napari_wbc.segment(win, device="cpu").max() > 0:
                    fields.append(win)
    return images, labels, fields


def with_fields(fields):
    """Patch ``train_segmenter`` so the fine-tune also trains on ``fields`` as all-zero labels, at the cells'
    median size, never held out (what the tried change to ``finetune`` did)."""
    from napari_wbc.core import train as T

    real = T.train_segmenter

    def patched(net, card, train, val, **kw):
        d = float(np.median([s.diameter for s in train + val]))
        extra = [T.make_sample(f, np.zeros(f.shape[:2], np.int32), diameter=d, name=f"field {i}")
                 for i, f in enumerate(fields)]
        return real(net, card, list(train) + extra, val, **kw)

    T.train_segmenter = patched


def keep_all():
    """The base's hold-out score reads 0, so the best epoch is kept whatever the base scored."""
    from napari_wbc.core import train as T

    real, calls = T.evaluate, []

    def evaluate(*a, **k):
        r = real(*a, **k)
        calls.append(r)
        return {**r, "matched_dice": 0.0, "f1": 0.0} if len(calls) == 1 else r

    T.evaluate = evaluate


def score(model) -> dict:
    """False WBCs on ``empty_fields.py``'s two sets, as ``(fields, cells)``, and BCCD odd-image detection
    (``segmentation.eval_bccd``), all with the diameter estimated."""
    import napari_wbc

    res = {}
    for name, gen in (("BCCD fields", empty_fields.bccd_windows()), ("SigTuple fields", empty_fields.sigtuple_windows())):
        n, _hit, cells = empty_fields.false_wbcs(gen, model)
        res[name] = (n, cells)
    res["BCCD odd"] = segmentation.eval_bccd(lambda rgb, _d: napari_wbc.segment(rgb, model=model, device="cpu"), "odd")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", choices=("none", "cells", "cells+empty"), required=True)
    ap.add_argument("--keep-all", action="store_true", help="keep the fine-tuned weights even if not better")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="folder for the fine-tuned model (default: a temporary one)")
    a = ap.parse_args(argv)
    import tempfile

    import torch

    import napari_wbc

    torch.set_num_threads(a.threads)
    model, note = None, "shipped"
    if a.arm != "none":
        images, labels, fields = training_material(a.arm == "cells+empty")
        if fields:
            with_fields(fields)
        if a.keep_all:
            keep_all()
        out = Path(a.out or tempfile.mkdtemp()) / f"{a.arm.replace('+', '_')}{'_all' if a.keep_all else ''}.safetensors"
        t0 = time.time()
        model = napari_wbc.finetune(images, labels, device="cpu", output=out, seed=0)
        kept = Path(model).resolve() != out.resolve()
        note = (f"{len(images)} images with cells, {len(fields)} fields without a WBC, {time.time() - t0:.0f} s"
                + ("; the base came back (no epoch beat it)" if kept else ""))
    r = score(model)
    b = r["BCCD odd"]
    (nb, kb), (ns, ks) = r["BCCD fields"], r["SigTuple fields"]
    print(f"| {a.arm}{' (kept whatever the hold-out)' if a.keep_all else ''} | {note} | {kb / nb:.3f} ({kb} in {nb}) "
          f"| {ks / ns:.2f} ({ks} in {ns}) | {b['f1']:.3f} ({b['tp']}/{b['fp']}/{b['fn']}) |")
    print(json.dumps({k: v for k, v in r.items() if k != "BCCD odd"}))


if __name__ == "__main__":
    main()
