"""Unseen stain: segmenters trained without Tecom, scored on Tecom validation (and the other sets).

    python benchmarks/train_segmenter.py --exclude tecom --steps 1500 --eval-every 500 --batch 16 \\
        --threads 1 [--wide-hue 0.5] --out runs/no_tecom.safetensors
    python benchmarks/cross_domain.py runs/no_tecom.safetensors [more models ...] [--flip-tta 4]

Tecom's stain (orange-brown cytoplasm on a yellow background, tight single-cell crops) is far from
SigTuple's and BCCD's lilac, so a model that has never seen it stands in for the smears of other labs
and scanners that the project is also judged on. Prints matched Dice and detection F1 per model on
the validation split of benchmarks/wbc_data.py (diameter estimated, and known from the masks), and
BCCD detection F1 on the held-out odd images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import segmentation as B  # noqa: E402


def _flip_tta(k: int) -> None:
    """Make every segmenter that load_model returns average its outputs over ``k`` flips (an experiment)."""
    import torch

    from napari_wbc.core import models

    class Flipped(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def parameters(self, recurse=True):  # iter_probabilities reads the weights' dtype
            return self.net.parameters(recurse)

        def forward(self, x):
            flips = [(), (-1,)] + ([(-2,), (-1, -2)] if k == 4 else [])
            outs = [self.net(x.flip(f) if f else x).float() for f in flips]
            return torch.stack([o.flip(f) if f else o for o, f in zip(outs, flips)]).mean(0)

    load = models.load_model

    def flipped(model=None, kind="segmenter", device=None):
        net, card = load(model, kind, device)
        return (Flipped(net), card) if kind == "segmenter" else (net, card)

    models.load_model = flipped


def _adapt_bn(which: str) -> None:
    """Make every segmenter that load_model returns re-estimate its batch norms on each call's own input
    before predicting (AdaBN per window; an experiment): ``all`` of them, or ``shallow``: the encoder's
    stem and first stage. Runs the unfolded float32 network (the shipped path folds the batch norms away)."""
    import copy

    import torch

    from napari_wbc.core import models

    def chosen(net):
        return [m for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                and (which == "all" or n == "encoder.model.bn1" or n.startswith("encoder.model.blocks.0."))]

    class Adapted(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net.eval()

        def parameters(self, recurse=True):
            return self.net.parameters(recurse)

        def forward(self, x):
            a = copy.deepcopy(self.net)
            for bn in chosen(a):
                bn.reset_running_stats()
                bn.momentum = None
                bn.train()
            with torch.no_grad():
                a(x.float())
            return a.eval()(x.float())

    load = models.load_model

    def adapted(model=None, kind="segmenter", device=None):
        if kind != "segmenter":
            return load(model, kind, device)
        path = models.resolve_model_path(model, "segmenter")
        card = models.read_card(path)
        net = models.build_from_card(card, path)
        net.load_state_dict(models.read_weights(path, card))
        return Adapted(net.float()), card

    models.load_model = adapted


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="segmenter .safetensors files ('shipped' for the shipped one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flip-tta", type=int, default=1, choices=(1, 2, 4),
                    help="test-time augmentation (not in the package): average the network's outputs over 2 "
                         "(left-right) or 4 (and up-down) flips of every window")
    ap.add_argument("--adapt-bn", choices=("all", "shallow"), default=None,
                    help="test-time adaptation (not in the package): re-estimate the batch norms on each window")
    a = ap.parse_args(argv)
    import torch

    from napari_wbc import segment

    torch.set_num_threads(a.threads)
    if a.flip_tta > 1:
        _flip_tta(a.flip_tta)
    if a.adapt_bn:
        _adapt_bn(a.adapt_bn)
    sets = B.val_sets()
    print("| model | Tecom Dice / F1 (auto) | Tecom Dice / F1 (known) | SigTuple Dice / F1 (auto) | BCCD odd F1 (auto) |")
    print("|---|---|---|---|---|")
    for model in a.models:
        m = None if model == "shipped" else model

        def auto(rgb, _lab):
            return segment(rgb, model=m, device="cpu")

        def known(rgb, lab):
            return segment(rgb, model=m, device="cpu", diameter=B.known_diameter(lab))

        ta, _ = B.eval_masks(auto, sets["Tecom"])
        tk, _ = B.eval_masks(known, sets["Tecom"])
        sa, _ = B.eval_masks(auto, sets["SigTuple"])
        bc = B.eval_bccd(lambda rgb, d: segment(rgb, model=m, device="cpu"), "odd")
        print(f"| {Path(model).name} | {ta['matched_dice']:.3f} / {ta['f1']:.3f} | {tk['matched_dice']:.3f} / {tk['f1']:.3f} "
              f"| {sa['matched_dice']:.3f} / {sa['f1']:.3f} | {bc['f1']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
