"""Diagnostic: how close to SigTuple's masks can the shipped network get if it learns only SigTuple?

    python benchmarks/sigtuple_specialist.py [--epochs 60]

Fine-tunes the shipped segmenter with the public ``napari_wbc.finetune`` on the SigTuple training
split alone (patches ``train-N`` with N % 5 != 0 and the four training smears) and scores the result
on the SigTuple validation split (matched-cell Dice, as benchmarks/segmentation.py). Nothing is
shipped: the model goes to /tmp. If even a SigTuple-only specialist stays well below 0.95, the
shortfall of the shipped model is the annotation style of the SigTuple masks, not missing data.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wbc_data  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/napari_wbc_sigtuple_specialist.safetensors")
    args = ap.parse_args(argv)

    import torch

    import napari_wbc
    from napari_wbc.core.metrics import match_instances, summarise

    torch.set_num_threads(args.threads)
    images, labels, val = [], [], []
    for source in (wbc_data.sigtuple_patches, wbc_data.sigtuple_smears):
        for img, mask, split in source():
            rgb, lab = wbc_data.load_image_mask(img, mask)
            if split == "train":
                images.append(rgb)
                labels.append(lab)
            else:
                val.append((rgb, lab))
    print(f"SigTuple: {len(images)} training images, {len(val)} validation images", flush=True)
    out = Path(args.out)
    for p in (out, out.with_suffix(".json")):
        p.unlink(missing_ok=True)  # a scratch file of this script only
    t0 = time.time()
    model = napari_wbc.finetune(images, labels, epochs=args.epochs, device="cpu", output=out,
                                progress=lambda e, n, m: print(f"epoch {e}/{n} hold-out Dice {m.get('matched_dice')}",
                                                               flush=True))
    print(f"fine-tuned in {time.time() - t0:.0f} s -> {model}")
    for name, m in (("shipped", None), ("SigTuple specialist", model)):
        s = summarise([match_instances(lab, napari_wbc.segment(rgb, model=m, device="cpu")) for rgb, lab in val])
        print(f"{name}: SigTuple validation matched Dice {s['matched_dice']:.4f}, F1 {s['f1']:.3f} "
              f"(TP/FP/FN {s['tp']}/{s['fp']}/{s['fn']})", flush=True)


if __name__ == "__main__":
    main()
