"""Join classifiers trained by train_classifier.py (e.g. several seeds) into one ensemble model.

    python benchmarks/make_ensemble.py MEMBER.safetensors [MEMBER ...] --out OUT.safetensors [--overwrite]

The ensemble's output is the mean of its members' probabilities (napari_wbc.core.nets.Ensemble);
it is one safetensors file with one JSON card, loaded and fine-tuned like any classifier.
The members must agree on everything that shapes the input (size, context, classes,
normalisation, background, mask dilation). The card keeps each member's command, seed and
validation figures, and the ensemble is evaluated on the same fixed validation split
(classify() on the full image and cell mask, as train_classifier.py does).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_classifier as TC  # noqa: E402

INPUT_KEYS = ("classes", "input_size", "context", "background_value", "mask_dilation", "normalisation")


def combine(paths):
    """(Ensemble network, card) from member files; ValueError when they see cells differently."""
    import torch

    from napari_wbc.core.models import build_network, load_model

    nets, cards = [], []
    for p in paths:
        net, card = load_model(p, "classifier", "cpu")
        nets.append(net)
        cards.append(card)
    for k in INPUT_KEYS:
        values = {repr(c.get(k)) for c in cards}
        if len(values) > 1:
            raise ValueError(f"members disagree on {k!r}: {sorted(values)}")
    arch = {"name": "Ensemble", "members": [c["arch"] for c in cards]}
    ens = build_network(arch)
    with torch.no_grad():
        for slot, net in zip(ens.members, nets):
            slot.load_state_dict(net.state_dict())
    ens.eval()
    card = {k: cards[0][k] for k in ("kind", *INPUT_KEYS) if k in cards[0]}
    card["arch"] = arch
    card["data"] = cards[0].get("data")
    card["split"] = cards[0].get("split")
    card["members"] = [
        {"file": Path(p).name, "sha1": hashlib.sha1(Path(p).read_bytes()).hexdigest(), "command": c.get("command"),
         "seed": (c.get("training") or {}).get("seed"), "training": c.get("training"),
         "validation_tecom+bccd": (c.get("validation") or {}).get("tecom+bccd")}
        for p, c in zip(paths, cards)
    ]
    return ens, card


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("members", nargs="+", help="classifier .safetensors files (each with its JSON card)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seg", default=str(Path(__file__).resolve().parents[1] / "src/napari_wbc/models/wbc_unet.safetensors"),
                    help="segmenter for the validation cell masks (as train_classifier.py)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if len(args.members) < 2:
        ap.error("give at least two member models")

    import torch

    from napari_wbc.core.models import save_model

    torch.set_num_threads(args.threads)
    net, card = combine(args.members)
    seg = args.seg if Path(args.seg).exists() else None
    windows = TC.build_windows(TC.records(), seg, size=card["input_size"], context=card["context"])
    val = [w for w in windows if w["split"] == "val"]
    res = TC.evaluate(val, net, card, "cpu")
    for k, v in res.items():
        print(f"val {k}: n={v['n']} acc {v['accuracy']} bal.acc {v['balanced_accuracy']} recall {v['recall']}")
    card["validation"] = res
    card["training"] = {
        "what": f"ensemble of {len(args.members)} members trained by benchmarks/train_classifier.py; output = mean "
                "of the members' probabilities",
        "model_selection": "none: all members listed are shipped",
        **{k: (card["members"][0]["training"] or {}).get(k) for k in ("basophil", "augmentation", "sampling")},
    }
    card["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    card["command"] = "python benchmarks/make_ensemble.py " + " ".join(sys.argv[1:] if argv is None else argv)
    path = save_model(net, card, args.out, overwrite=args.overwrite)
    print(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return card


if __name__ == "__main__":
    main()
