"""Typing on an unseen lab, then after the lab's own corrections (the Train widget's classifier step).

The docs' answer to an unseen stain is "correct some types and retrain"; this measures it. The base
is a classifier trained without any Tecom cell (``train_classifier.py --hold-out-source tecom``),
so Tecom is a lab it has never seen. Tecom's 300 crops are cut in two by file number: odd numbers
are the cells the user reviews, even numbers the test. Every crop is segmented with ``--model``
(as a user's smear is) and the label covering most of the expert mask is the cell.

A user reviews the odd half in one of two orders and types ``n`` cells: ``confidence`` (the
Classify widget's Next to review, least confident first, where every reviewed cell counts as
corrected whether its type changed or not) or ``random`` (cells in a shuffled order). Each ``n``
fine-tunes the base with ``core.classifier_finetune.finetune_classifier`` (what ``finetune(...,
cell_types=...)`` and the Train widget run: a quarter of the typed cells held out, the best epoch
kept, the base kept when no epoch beats it, held to the base's own calls with weight
``--distill-weight``), seed ``--seed``. Scored on the even half: balanced
accuracy over the four common types (basophil: one Tecom cell, left out), and the neutrophil share
of the count.

With ``--adapt`` the base is first adapted to the lab's stain from the odd half's cells, no types
(``napari_wbc.adapt_classifier``, the Classify widget's Adapt button); the review order, the
fine-tuning and its pull toward the base's calls then start from the adapted classifier.

    python benchmarks/classifier_finetune.py --base NO_TECOM.safetensors --threads 1
        [--model SEGMENTER] [--sizes 10 20 40 80] [--orders confidence random] [--seed 0]
        [--distill-weight W] [--adapt] [--out F.md]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wbc_data  # noqa: E402

TYPES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil")


def tecom_cells(model):
    """(number, RGB image, labels with the one cell, its label, expert type) for every Tecom crop whose
    expert mask a segmented cell covers; the segmentation's other cells are dropped."""
    from napari_wbc import segment

    types = wbc_data.tecom_types()
    cells, missed = [], []
    for img, mask, _ in wbc_data.tecom():
        rgb, expert = wbc_data.load_image_mask(img, mask)
        labels = segment(rgb, model=model, device="cpu")
        ids, n = np.unique(labels[expert > 0], return_counts=True)
        keep = n[ids > 0]
        if not len(keep) or keep.max() < 0.5 * (expert > 0).sum():
            missed.append(img.name)
            continue
        lab = int(ids[ids > 0][np.argmax(keep)])
        cells.append((int(img.stem), rgb, np.where(labels == lab, 1, 0).astype(np.int32), 1, types[img.name]))
    return cells, missed


def score(cells, model) -> dict:
    from napari_wbc import classify

    pred = [classify(rgb, lab, model=model, device="cpu").set_index("label").loc[k, "cell_type"]
            for _, rgb, lab, k, _ in cells]
    true = [c[4] for c in cells]
    rec = {t: np.mean([p == t for p, q in zip(pred, true) if q == t]) for t in TYPES if t in true}
    return {"balanced": float(np.mean(list(rec.values()))), "recall": rec,
            "neutrophil_share": float(np.mean([p == "neutrophil" for p in pred])),
            "true_neutrophil_share": float(np.mean([q == "neutrophil" for q in true]))}


def review_order(cells, base, order: str, seed: int) -> list[int]:
    from napari_wbc import classify

    if order == "random":
        return list(np.random.default_rng(seed).permutation(len(cells)))
    conf = [classify(rgb, lab, model=base, device="cpu").set_index("label").loc[k, "confidence"]
            for _, rgb, lab, k, _ in cells]
    return list(np.argsort(conf, kind="stable"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="classifier trained without Tecom")
    ap.add_argument("--model", default=None, help="segmenter (default: the shipped one)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 40, 80])
    ap.add_argument("--orders", nargs="+", choices=["confidence", "random"], default=["confidence", "random"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distill-weight", type=float, default=None,
                    help="weight of the pull toward the base's calls (default: the package's DISTILL_WEIGHT; 0: none)")
    ap.add_argument("--adapt", action="store_true",
                    help="adapt the base to the odd half's cells first (adapt_classifier, no types)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from napari_wbc.core import classifier_finetune
    from napari_wbc.core.classifier_finetune import finetune_classifier

    if a.distill_weight is not None:
        classifier_finetune.DISTILL_WEIGHT = a.distill_weight

    t0 = time.time()
    cells, missed = tecom_cells(a.model)
    cells = [c for c in cells if c[4] in TYPES]
    review = [c for c in cells if c[0] % 2 == 1]
    test = [c for c in cells if c[0] % 2 == 0]
    base = score(test, a.base)
    print(f"base: {base}", flush=True)
    rows = [("base (no correction)", "-", 0, base, None, None)]
    with tempfile.TemporaryDirectory() as tmp:
        start = a.base
        if a.adapt:
            from napari_wbc import adapt_classifier

            start = adapt_classifier([c[1] for c in review], [c[2] for c in review], model=a.base,
                                     output=Path(tmp) / "adapted.safetensors", seed=a.seed)
            adapted = score(test, start)
            print(f"adapted: {adapted}", flush=True)
            rows.append(("adapted to the odd half's cells (no correction)", "-", 0, adapted, None, None))
        for order in a.orders:
            idx = review_order(review, start, order, a.seed)
            for n in a.sizes:
                chosen = [review[i] for i in idx[:n]]
                out = Path(tmp) / f"{order}_{n}.safetensors"
                t1 = time.time()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        got = finetune_classifier([c[1] for c in chosen], [c[2] for c in chosen],
                                                  [{c[3]: c[4]} for c in chosen], base=start, output=out,
                                                  device="cpu", seed=a.seed)
                    except ValueError as e:  # too few cells to hold any out
                        print(f"{order} {n}: {e}", flush=True)
                        continue
                kept = Path(got) != out
                s = score(test, got)
                typed = {t: sum(c[4] == t for c in chosen) for t in TYPES}
                rows.append((order, " / ".join(str(typed[t]) for t in TYPES), n, s, kept, time.time() - t1))
                print(order, n, s, "kept base" if kept else "", [str(w.message)[:80] for w in caught], flush=True)
    lines = ["### Corrections from an unseen lab (Tecom), classifier fine-tuning", "",
             f"Command: `{wbc_data.command_line('classifier_finetune.py', argv)}`  ",
             f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {time.time() - t0:.0f} s; "
             f"distillation weight {classifier_finetune.DISTILL_WEIGHT:g}; "
             f"{len(review)} cells to review (odd numbers), {len(test)} test cells (even numbers; "
             f"{base['true_neutrophil_share']:.2f} neutrophils); crops without a segmented cell on the expert "
             f"mask: {len(missed)}", "",
             "| review order | cells typed | typed N / L / M / E | test balanced accuracy | " + " | ".join(TYPES)
             + " | neutrophil share of the count | base kept | fine-tune s |",
             "|---|---|---|---|" + "---|" * len(TYPES) + "---|---|---|"]
    for order, typed, n, s, kept, secs in rows:
        lines.append(f"| {order} | {n} | {typed} | {s['balanced']:.3f} | "
                     + " | ".join(f"{s['recall'].get(t, float('nan')):.3f}" for t in TYPES)
                     + f" | {s['neutrophil_share']:.2f} | {'' if kept is None else 'yes' if kept else 'no'} | "
                     + ("" if secs is None else f"{secs:.0f}") + " |")
    wbc_data.finish_table(lines, a.out)


if __name__ == "__main__":
    main()
