"""Test-time adaptation of the classifier's batch norms to a lab's cells (AdaBN): a measurement.

The classifier's BatchNorm statistics (running mean and variance) come from its training cells. AdaBN
re-estimates them on the cells to be typed, with no types needed and the weights unchanged, so that a
new lab's stain is brought to the statistics the network learned on. ``--depth d`` re-estimates only the
batch norms of the first ``d`` convolution blocks of the SmallCNN (4 = all of them).

Two questions, two sets (cell masks from ``--seg``, as ``train_classifier.py``):

- ``--sets unseen``: classifiers trained *without* Tecom (``train_classifier.py --hold-out-source tecom``),
  adapted on all 299 Tecom cells together and scored on them (an unseen lab);
- ``--sets indomain``: classifiers trained with every source, adapted on the Tecom validation cells (60)
  and on the BCCD validation cells (130), each set on its own, and scored there (a lab we trained on:
  does adapting hurt?).

    python benchmarks/bn_adaptation.py --sets unseen NO_TECOM.safetensors [...] --depths 1 2 3 4
    python benchmarks/bn_adaptation.py --sets indomain wbc_classifier --depths 1 2 3 4

``--cells 25 50 75 100 150`` adapts (as shipped) on that many cells drawn at random, ``--draws`` times
each, and scores on all cells of the set: how many cells adapting needs.

``--balance`` measures the class-balanced adaptation that napari-wbc ships as ``adapt_classifier`` (first
block only); plain AdaBN was not adopted. See docs/benchmarks.md ("Two tries at an unseen lab without any
corrections" and "Adapting to a lab's stain from its own cells").
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_classifier as TC  # noqa: E402
import wbc_data  # noqa: E402


def cell_inputs(windows, net, card):
    """The network inputs ``classify()`` makes for each window's cell (N x 4 x S x S), and its probabilities."""
    import torch
    from torch import nn

    class Recorder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.seen = inner, []

        def forward(self, x):
            self.seen.append(x.detach().clone())
            return self.inner(x)

    rec = Recorder(net)
    probs = TC.predict(windows, rec, card)
    return torch.cat(rec.seen), probs


def adapted(net, x, depth: int):
    """Plain AdaBN: a copy of ``net`` whose first ``depth`` blocks' batch norms hold the statistics of
    all of ``x``, unweighted (napari_wbc.core.adapt's re-estimation, seed 0)."""
    from napari_wbc.core.adapt import _statistics

    return _statistics(net, x, depth, 0, None)


def few_cells(net, card, x, probs, ws, src, name, set_name, sizes, draws):
    """Table rows: balanced accuracy on all of ``ws`` after adapting on ``n`` random cells of them, per n."""
    import numpy as np
    import torch

    from napari_wbc.core.adapt import adapted_network
    from napari_wbc.core.classify import CLASSES

    none = TC.report(ws, probs)[src]["balanced_accuracy"]
    rows = []
    for n in sizes:
        if n > len(ws):
            continue
        scores = []
        for seed in range(draws if n < len(ws) else 1):
            idx = np.sort(np.random.default_rng(seed).choice(len(ws), n, replace=False))
            with torch.no_grad():
                a_net = adapted_network(net, x[torch.from_numpy(idx)], card.get("classes") or CLASSES)
                p = torch.softmax(a_net(x).float(), 1).numpy()
            scores.append(TC.report(ws, p)[src]["balanced_accuracy"])
        rows.append(f"| {name} | {set_name} ({len(ws)}) | {n} | {len(scores)} | {none:.3f} | {np.mean(scores):.3f} | "
                    f"{min(scores):.3f} | {max(scores):.3f} |")
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("classifiers", nargs="+", help="classifier files or shipped names")
    ap.add_argument("--sets", choices=["unseen", "indomain"], required=True)
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--seg", default=str(Path(__file__).resolve().parents[1] / "src/napari_wbc/models/wbc_unet.safetensors"))
    ap.add_argument("--balance", action="store_true",
                    help="class-balanced adaptation as napari_wbc.adapt_classifier does it (cells weighted by "
                         "their predicted types, 3 rounds), instead of plain AdaBN")
    ap.add_argument("--cells", type=int, nargs="+", default=None, metavar="N",
                    help="adapt on N cells drawn at random from the set (--draws draws each, first block, balanced "
                         "as shipped) and score on all its cells: how many cells adapting needs")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="markdown table to write")
    a = ap.parse_args(argv)

    import torch

    from napari_wbc.core.adapt import adapted_network
    from napari_wbc.core.classify import CLASSES
    from napari_wbc.core.models import load_model

    torch.set_num_threads(a.threads)
    windows = TC.build_windows(TC.records(), a.seg, size=96, context=1.5)
    if a.sets == "unseen":  # name: (source, its windows)
        sets = {"Tecom, all (unseen)": ("tecom", [w for w in windows if w["source"] == "tecom"])}
    else:
        sets = {f"{name} val": (src, [w for w in windows if w["source"] == src and w["split"] == "val"])
                for name, src in (("Tecom", "tecom"), ("BCCD", "bccd"))}
    lines = [f"Command: `{wbc_data.command_line(__file__, argv)}`  ", "",
             "| classifier | cells | adapted blocks | balanced accuracy | neutrophil | lymphocyte | monocyte | eosinophil |",
             "|---|---|---|---|---|---|---|---|"]
    if a.cells:
        lines[2:] = ["| classifier | set | cells adapted on | draws | balanced accuracy, none | mean | min | max |",
                     "|---|---|---|---|---|---|---|---|"]
    for name in a.classifiers:
        net, card = load_model(name, "classifier", "cpu")
        net = copy.deepcopy(net).float().eval()
        if card.get("input_size") != 96 or card.get("context") != 1.5:
            raise SystemExit(f"{name}: this measurement cuts 96 px windows at context 1.5; the card says otherwise")
        for set_name, (src, ws) in sets.items():
            x, probs = cell_inputs(ws, net, card)
            if a.cells:
                lines.extend(few_cells(net, card, x, probs, ws, src, Path(name).stem, set_name, a.cells, a.draws))
                continue
            for depth in [0, *a.depths]:
                if depth:
                    with torch.no_grad():
                        a_net = (adapted_network(net, x, card.get("classes") or CLASSES, depth=depth) if a.balance
                                 else adapted(net, x, depth))
                        probs = torch.softmax(a_net(x).float(), 1).numpy()
                m = TC.report(ws, probs)[src]
                r = m["recall"]
                lines.append(f"| {Path(name).stem} | {set_name} ({m['n']}) | {depth or 'none'} | {m['balanced_accuracy']:.3f} | "
                             + " | ".join(f"{r[c]:.2f}" for c in ("neutrophil", "lymphocyte", "monocyte", "eosinophil")) + " |")
                print(lines[-1], flush=True)
    wbc_data.finish_table(lines, a.out)


if __name__ == "__main__":
    main()
