"""Benchmark the WBC classifier on the fixed validation split, beside a simple baseline.

    python benchmarks/classification.py [--model src/napari_wbc/models/wbc_classifier.safetensors]

Validation cells: Tecom NNN % 5 == 0, BCCD odd image numbers (one WBC box, one class),
and the wbc_crops files whose matched BCCD source image is odd (see train_classifier.py;
they are augmented copies of BCCD validation cells, reported apart). Cell masks are
the ones the training script used (Tecom: expert masks; BCCD/wbc_crops: the shipped
segmenter's cell that best fits the box / the largest WBC).

Baseline: 40 colour and shape features per cell (normalised colour statistics of the
whole cell, of its dark "nucleus" part and of the rest; nucleus area fraction, number
of nucleus pieces, solidity, eccentricity) and a multinomial logistic regression
(torch, L2, class-balanced), trained on the train split. No sklearn.
Writes docs/benchmarks_classification.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_classifier as TC  # noqa: E402

from napari_wbc.core import classify as C  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ baseline
def features(w) -> np.ndarray:
    """Scale-free colour/shape features of one cell (from the same 4-channel input the CNN sees)."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.measure import regionprops

    from napari_wbc.core.segment import channel_ranges

    rgb = TC.load_rgb(w["path"]).astype(np.float32)
    lab = w["cell_mask"].astype(np.int32)
    sl = ndi.find_objects(lab)[0]
    x = C.cell_input(rgb, channel_ranges(rgb), lab, 1, sl, lab.sum(), size=64, context=1.5, background=1.0,
                     dilation=0)
    cell = x[3] > 0.5
    if cell.sum() < 4:
        cell = x[3] >= x[3].max() * 0.5
    px = x[:3, cell].T  # N x 3
    lum = px.mean(1)
    try:
        t = threshold_otsu(lum) if np.ptp(lum) > 1e-3 else lum.mean()
    except ValueError:
        t = lum.mean()
    nuc_px = lum <= t
    nuc = np.zeros_like(cell)
    nuc[cell] = nuc_px
    cyto = px[~nuc_px] if (~nuc_px).any() else px
    nucp = px[nuc_px] if nuc_px.any() else px

    def stats(p):
        return np.concatenate([p.mean(0), p.std(0), np.percentile(p, [10, 90], axis=0).ravel()])

    props = regionprops(cell.astype(np.int32))[0]
    npieces = ndi.label(nuc)[1]
    nprops = regionprops(nuc.astype(np.int32))
    nsol = nprops[0].solidity if nprops else 1.0
    chroma = px - px.mean(1, keepdims=True)
    f = np.concatenate([
        stats(px), stats(nucp), cyto.mean(0), cyto.std(0),
        chroma.mean(0), [nuc_px.mean(), npieces, min(npieces, 4), nsol, props.solidity, props.eccentricity,
                         (px[:, 0] - px[:, 2]).mean(), (cyto[:, 0] - cyto[:, 2]).mean()],
    ])
    return f.astype(np.float32)


def fit_logreg(X, y, weights, *, l2=1e-2, steps=500, seed=0):
    """Multinomial logistic regression by L-BFGS (torch); returns predict_proba."""
    import torch

    torch.manual_seed(seed)
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Xt = torch.from_numpy((X - mu) / sd).float()
    yt = torch.from_numpy(y).long()
    wt = torch.from_numpy(weights).float()
    W = torch.zeros(X.shape[1], len(C.CLASSES), requires_grad=True)
    b = torch.zeros(len(C.CLASSES), requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.cross_entropy(Xt @ W + b, yt, reduction="none") * wt).sum() / wt.sum()
        loss = loss + l2 * (W**2).sum()
        loss.backward()
        return loss

    opt.step(closure)

    def predict(Xn):
        with torch.no_grad():
            return torch.softmax(torch.from_numpy((Xn - mu) / sd).float() @ W + b, 1).numpy()

    return predict


# ------------------------------------------------------------------ report
def _fmt(v):
    return "-" if v is None else f"{v:.3f}"


def _describe(card: dict) -> str:
    """One line on the evaluated model (a single network or an ensemble of them)."""

    def one(arch, tr):
        return (f"{arch['name']} width {arch.get('width')}: {tr.get('steps')} steps of batch {tr.get('batch')} in "
                f"{tr.get('train_seconds')} s on {tr.get('threads')} CPU thread(s), seed {tr.get('seed')}")

    tr = card.get("training", {}) or {}
    head = f"Model: input {card['input_size']} px, context {card['context']}; "
    if card["arch"]["name"] == "Ensemble":
        members = card.get("members", [])
        body = (f"an ensemble (mean probability) of {len(card['arch']['members'])} networks: "
                + "; ".join(one(a, m.get("training") or {}) for a, m in zip(card["arch"]["members"], members)))
    else:
        body = one(card["arch"], tr)
    return head + body + f". Basophil: {tr.get('basophil', '-')}."


def section(results: dict, card: dict, command: str, n_info: str) -> str:
    lines = ["## WBC classification", "",
             f"Command: `{command}`", "",
             "Validation split (never trained on): Tecom `NNN % 5 == 0`, BCCD odd image numbers with one WBC "
             "box and one class; wbc_crops files whose matched BCCD source image is odd are augmented copies "
             "of BCCD validation cells and are reported apart. Balanced accuracy = mean recall over "
             "neutrophil, lymphocyte, monocyte, eosinophil (no basophil exists in validation). "
             f"{n_info}", ""]
    for set_name in TC.SETS:
        lines += [f"### {set_name}", "",
                  "| model | n | accuracy | balanced acc. | neutrophil | lymphocyte | monocyte | eosinophil |",
                  "|---|---|---|---|---|---|---|---|"]
        for model_name, res in results.items():
            m = res[set_name]
            r = m["recall"]
            lines.append(f"| {model_name} | {m['n']} | {_fmt(m['accuracy'])} | {_fmt(m['balanced_accuracy'])} | "
                         + " | ".join(_fmt(r[c]) for c in TC.COMMON) + " |")
        lines.append("")
    lines += ["### Confusion matrices (tecom+bccd; rows true, columns predicted)", ""]
    for model_name, res in results.items():
        m = res["tecom+bccd"]["confusion"]
        lines += [f"{model_name}:", "", "| true \\ pred | " + " | ".join(m["cols_pred"]) + " |",
                  "|---|" + "---|" * len(m["cols_pred"])]
        for name, row in zip(m["rows_true"], m["matrix"]):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
        lines.append("")
    lines += [_describe(card), ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "src/napari_wbc/models/wbc_classifier.safetensors"))
    ap.add_argument("--seg", default=None, help="segmenter used for the masks (default: the model card's)")
    ap.add_argument("--out", default=str(REPO / "docs/benchmarks_classification.md"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from napari_wbc.core.models import load_model

    torch.set_num_threads(args.threads)
    net, card = load_model(args.model, "classifier", "cpu")
    seg = args.seg or ((card.get("data", {}) or {}).get("segmenter_for_masks") or {})
    if isinstance(seg, dict):
        seg = str(REPO / seg["path"]) if seg.get("path") else None
    if seg and not Path(seg).exists():
        shipped = REPO / "src/napari_wbc/models/wbc_unet.safetensors"
        print(f"segmenter {seg} is gone; using {shipped}")
        seg = str(shipped) if shipped.exists() else None
    t0 = time.time()
    windows = TC.build_windows(TC.records(), seg, size=card["input_size"], context=card["context"])
    train = [w for w in windows if w["split"] == "train"]
    val = [w for w in windows if w["split"] == "val"]
    print(f"{len(train)} train, {len(val)} val cells ({time.time() - t0:.0f}s)", flush=True)

    results = {}
    results["shipped CNN"] = TC.evaluate(val, net, card, "cpu")

    t1 = time.time()
    Xtr = np.stack([features(w) for w in train])
    Xva = np.stack([features(w) for w in val])
    ytr = np.array([C.CLASSES.index(w["cls"]) for w in train])
    predict = fit_logreg(Xtr, ytr, TC.sample_weights(train, 0.0 + 1e-3))
    base = TC.report(val, predict(Xva))
    results["baseline: features + logistic regression"] = base
    print(f"baseline {time.time() - t1:.0f}s")

    src = np.array([w["source"] for w in val])
    n_info = ("Validation: " + ", ".join(f"{s} {int((src == s).sum())}" for s in ("tecom", "bccd", "wbc_crops"))
              + f" (wbc_crops from {len({w['group'] for w in val if w['source'] == 'wbc_crops'})} source cells; "
              "`wbc_crops per cell` averages the probabilities of each cell's files).")
    cmd = "python benchmarks/classification.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    text = section(results, card, cmd, n_info)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
