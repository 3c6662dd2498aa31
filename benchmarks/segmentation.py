"""Segmentation benchmark: the shipped U-Net vs an Otsu baseline vs the classic SigTuple U-Net.

    python benchmarks/segmentation.py [--train-classic-steps 600] [--speed] [--big]

Quality on the fixed validation split (benchmarks/wbc_data.py; never trained on):
- SigTuple (val patches + the val smear) and Tecom (val crops): matched-cell Dice
  (mean Dice over GT/prediction pairs matched one-to-one at IoU >= 0.5), with
  precision/recall/F1 of the matching;
- BCCD: WBC detection F1, a predicted cell matching a WBC box at box IoU >= 0.5;
  on the held-out odd-numbered images (even ones gave weak background labels)
  and on all 292 trainval images.
The shipped model runs with ``diameter=None`` (estimated, the default a user
gets) and with the known diameter (from the masks/boxes).
Speed: CPU segment() seconds per megapixel end to end, and the classic design's
forward pass on the same image; ``--big``: peak memory on a 10000x10000 smear.
Writes the markdown tables to stdout and to docs/benchmarks_segmentation.md.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wbc_data  # noqa: E402

from napari_wbc.core.metrics import label_boxes, match_boxes, match_instances, summarise  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"


# ------------------------------------------------------------------ baselines
def otsu_baseline(rgb, diameter=None):
    """Otsu on (1 - green) (nuclei absorb green), holes filled, small objects dropped."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    from napari_wbc.core.scale import estimate_diameter

    d = diameter or estimate_diameter(rgb)
    g = 1 - rgb[..., 1].astype(np.float32) / 255
    g = ndi.gaussian_filter(g, max(d / 40, 0.5))
    m = g > threshold_otsu(g)
    m = ndi.binary_fill_holes(ndi.binary_closing(m, iterations=max(1, int(d / 20))))
    m = remove_small_objects(m, max_size=int(0.2 * np.pi * (d / 2) ** 2))
    return ndi.label(m)[0]


def classic_net():
    from napari_wbc.core.nets import ClassicUnet

    return ClassicUnet(in_channels=1, classes=1, base=32, dropout=0.25)


def train_classic(steps, seed=0, log=print):
    """The SigTuple-challenge recipe: grey 128x128 native-resolution crops, Dice loss."""
    import torch

    from napari_wbc.core.train import _crop_rescaled

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = []
    for src in (wbc_data.sigtuple_patches, wbc_data.sigtuple_smears, wbc_data.tecom):
        for img, mask, sp in src():
            if sp == "train":
                rgb, lab = wbc_data.load_image_mask(img, mask)
                data.append((rgb.mean(-1).astype(np.float32) / 255, (lab > 0).astype(np.float32)))
    net = classic_net()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    net.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        xs, ys = [], []
        for _ in range(8):
            g, m = data[rng.integers(len(data))]
            cy, cx = rng.uniform(0, g.shape[0]), rng.uniform(0, g.shape[1])
            if g.shape[0] <= 128 and g.shape[1] <= 128:
                cy, cx = g.shape[0] / 2, g.shape[1] / 2
            xs.append(_crop_rescaled(g, cy, cx, 128, 128, 0, 1.0))
            ys.append(_crop_rescaled(m, cy, cx, 128, 128, 0, 0.0))
        x = torch.from_numpy(np.stack(xs)[:, None])
        y = torch.from_numpy(np.stack(ys)[:, None])
        p = torch.sigmoid(net(x))
        loss = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"classic step {step}/{steps} dice loss {float(loss):.3f} ({time.time()-t0:.0f}s)")
    net.eval()
    return net, time.time() - t0


def classic_segment(net, rgb, min_area=100):
    import torch
    from scipy import ndimage as ndi
    from skimage.morphology import remove_small_objects

    g = rgb.mean(-1).astype(np.float32) / 255
    h, w = g.shape
    H, W = int(np.ceil(h / 16) * 16), int(np.ceil(w / 16) * 16)
    x = np.ones((H, W), np.float32)
    x[:h, :w] = g
    with torch.inference_mode():
        p = torch.sigmoid(net(torch.from_numpy(x)[None, None]))[0, 0, :h, :w].numpy()
    m = remove_small_objects(p > 0.5, max_size=min_area)
    return ndi.label(m)[0]


# ------------------------------------------------------------------ evaluation
def val_sets():
    sets = {"SigTuple": [], "Tecom": []}
    for src, key in ((wbc_data.sigtuple_patches, "SigTuple"), (wbc_data.sigtuple_smears, "SigTuple"), (wbc_data.tecom, "Tecom")):
        for img, mask, sp in src():
            if sp == "val":
                sets[key].append((img.name, *wbc_data.load_image_mask(img, mask)))
    return sets


def known_diameter(lab):
    from napari_wbc.core.train import cell_diameter

    return cell_diameter(lab)


def eval_masks(fn, items):
    res, t = [], 0.0
    for name, rgb, lab in items:
        t0 = time.perf_counter()
        pred = fn(rgb, lab)
        t += time.perf_counter() - t0
        res.append(match_instances(lab, pred))
    return summarise(res), t


def eval_bccd(fn, which):
    from napari_wbc.core.io import read_image, to_rgb

    res = []
    for img, xml, sp in wbc_data.bccd():
        if which == "odd" and sp != "val":
            continue
        boxes = wbc_data.wbc_boxes(xml)
        rgb = to_rgb(read_image(img))
        d = wbc_data.box_diameter(boxes) if boxes else None
        pred = fn(rgb, d)
        res.append(match_boxes(boxes, label_boxes(pred)))
    return summarise(res)


def fmt(m, dice=True):
    s = f"{m['matched_dice']:.3f} | " if dice else ""
    return s + f"{m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['tp']}/{m['fp']}/{m['fn']}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="segmenter to test (default: shipped)")
    ap.add_argument("--train-classic-steps", type=int, default=600)
    ap.add_argument("--skip-classic", action="store_true")
    ap.add_argument("--classic-weights", default=str(RUNS / "classic_unet.safetensors"),
                    help="reuse the classic U-Net from here if it exists, else train it and save it here")
    ap.add_argument("--no-quality", action="store_true", help="skip the quality tables")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--gpu", action="store_true",
                    help="also time segment() on CUDA (batched tiles, fp16 autocast) on a 10000x10000 smear")
    ap.add_argument("--big", action="store_true", help="peak memory on a 10000x10000 smear (subprocess)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_segmentation.md"))
    a = ap.parse_args(argv)
    import torch

    from napari_wbc import segment

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = "cpu"
    lines = [f"Command: `{wbc_data.command_line(__file__, argv)}`  ",
             f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, date {time.strftime('%Y-%m-%d')}", ""]
    if a.no_quality:
        a.skip_classic = True
    sets = {} if a.no_quality else val_sets()
    ours_auto = lambda rgb, lab: segment(rgb, model=a.model, device=dev)  # noqa: E731
    ours_known = lambda rgb, lab: segment(rgb, model=a.model, device=dev, diameter=known_diameter(lab))  # noqa: E731
    otsu = lambda rgb, lab: otsu_baseline(rgb)  # noqa: E731
    methods = [("napari-wbc U-Net, diameter auto", ours_auto), ("napari-wbc U-Net, diameter known", ours_known), ("Otsu baseline", otsu)]
    classic = None
    if not a.skip_classic:
        from safetensors.torch import load_file, save_file

        cw = Path(a.classic_weights)
        if cw.exists():
            classic, ttrain = classic_net(), float("nan")
            classic.load_state_dict(load_file(str(cw)))
            classic.eval()
        else:
            classic, ttrain = train_classic(a.train_classic_steps, log=lambda s: print(s, file=sys.stderr, flush=True))
            cw.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in classic.state_dict().items()}, str(cw))
        methods.append((f"classic U-Net 7.8M (grey 128px, Dice; {a.train_classic_steps} steps, {ttrain/60:.0f} min CPU)", lambda rgb, lab: classic_segment(classic, rgb)))
    if not a.no_quality:
        lines += ["### Masks: matched-cell Dice (IoU >= 0.5 pairs) and detection", "",
                  "| set | method | matched Dice | precision | recall | F1 | TP/FP/FN |", "|---|---|---|---|---|---|---|"]
    for key, items in sets.items():
        for name, fn in methods:
            m, t = eval_masks(fn, items)
            lines.append(f"| {key} val ({len(items)} images) | {name} | {fmt(m)} |")
            print(lines[-1], flush=True)
    if not a.no_quality:
        lines += ["", "### BCCD: WBC detection (box IoU >= 0.5)", "",
                  "| images | method | precision | recall | F1 | TP/FP/FN |", "|---|---|---|---|---|---|"]
    bmethods = [("napari-wbc U-Net, diameter auto", lambda rgb, d: segment(rgb, model=a.model, device=dev)),
                ("napari-wbc U-Net, diameter from boxes", lambda rgb, d: segment(rgb, model=a.model, device=dev, diameter=d)),
                ("Otsu baseline", lambda rgb, d: otsu_baseline(rgb))]
    if classic is not None:
        bmethods.append(("classic U-Net", lambda rgb, d: classic_segment(classic, rgb)))
    for which in () if a.no_quality else ("odd", "all"):
        for name, fn in bmethods:
            m = eval_bccd(fn, which)
            label = "held-out odd (146)" if which == "odd" else "all trainval (292)"
            lines.append(f"| {label} | {name} | {fmt(m, dice=False)} |")
            print(lines[-1], flush=True)
    if a.speed:
        lines += ["", *speed(a.model, classic)]
    if a.big:
        lines += ["", *big_memory(a.model)]
    if a.gpu:
        lines += ["", *gpu_speed(a.model)]
    wbc_data.finish_table(lines, a.out)


def speed(model, classic):
    import torch

    from napari_wbc import segment
    from napari_wbc.core.io import read_image, to_rgb

    out = ["### CPU speed (end to end segment(), diameter auto)", "",
           "| image | size | Mpx | segment() s, first / repeat | s/Mpx, first / repeat | classic forward s, first / repeat "
           "| ratio, first / repeat |", "|---|---|---|---|---|---|---|"]
    imgs = sorted((wbc_data.DATA / "sigtuple/unlabeled").glob("*.jpg"))[:3] + [wbc_data.DATA / "bccd/images/BloodImage_00001.jpg"]
    segment(to_rgb(read_image(imgs[0])), model=model, device="cpu")  # warm-up (model load)
    out.insert(0, f"{torch.get_num_threads()} torch CPU threads; classic = the 7.8M-parameter U-Net's forward pass on the "
                  "greyscale image at native resolution (as that design runs), same machine, same image. 'first' is "
                  "the first call on an image of that size (what one image costs); 'repeat' the median of 3 more "
                  "calls (what each further field of a batch costs).")
    out.insert(1, "")
    if classic is None:  # the forward pass costs the same trained or not
        classic = classic_net().eval()

    def timed(fn):
        t = []
        for _ in range(4):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        return t[0], float(np.median(t[1:]))

    for p in imgs:
        rgb = to_rgb(read_image(p))
        mp = rgb.shape[0] * rgb.shape[1] / 1e6
        ts = timed(lambda: segment(rgb, model=model, device="cpu"))
        g = torch.from_numpy(rgb.mean(-1).astype(np.float32)[None, None, : rgb.shape[0] // 16 * 16, : rgb.shape[1] // 16 * 16] / 255)
        with torch.inference_mode():
            tc = timed(lambda: classic(g))
        out.append(f"| {p.name} | {rgb.shape[1]}x{rgb.shape[0]} | {mp:.2f} | {ts[0]:.3f} / {ts[1]:.3f} | "
                   f"{ts[0]/mp:.2f} / {ts[1]/mp:.2f} | {tc[0]:.2f} / {tc[1]:.2f} | {tc[0]/ts[0]:.1f}x / {tc[1]/ts[1]:.1f}x |")
        print(out[-1], flush=True)
    return out


def gpu_speed(model):
    """Megapixels per second end to end on CUDA: batched 768 px tiles, fp16 autocast."""
    import torch

    from napari_wbc.core.io import read_image, to_rgb
    from napari_wbc.core.segment import iter_segment

    if not torch.cuda.is_available():
        return ["GPU: no CUDA device here; nothing measured."]
    tile = to_rgb(read_image(sorted((wbc_data.DATA / "sigtuple/unlabeled").glob("*.jpg"))[0]))
    img = np.tile(tile, (10000 // tile.shape[0] + 1, 10000 // tile.shape[1] + 1, 1))[:10000, :10000].copy()
    out = ["### GPU (CUDA) end to end", "", "| batch | Mpx | seconds | Mpx/s |", "|---|---|---|---|"]
    for bs in (1, 8):
        list(iter_segment(img[:2000, :2000], model=model, device="cuda", batch_size=bs))  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        list(iter_segment(img, model=model, device="cuda", batch_size=bs))
        torch.cuda.synchronize()
        t = time.perf_counter() - t0
        out.append(f"| {bs} | 100 | {t:.1f} | {100 / t:.1f} |")
    out.append(f"device: {torch.cuda.get_device_name(0)}")
    return out


BIG_CODE = r"""
import resource, time, numpy as np, sys
from napari_wbc import segment
from napari_wbc.core.io import read_image, to_rgb
tile = to_rgb(read_image(sys.argv[1]))
reps = (10000 // tile.shape[0] + 1, 10000 // tile.shape[1] + 1, 1)
img = np.tile(tile, reps)[:10000, :10000].copy()
del tile
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
lab = segment(img, model=None if sys.argv[2] == 'None' else sys.argv[2], device='cpu')
t = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{t:.1f} {base:.0f} {peak:.0f} {lab.max()}")
"""


def big_memory(model):
    src = sorted((wbc_data.DATA / "sigtuple/unlabeled").glob("*.jpg"))[0]
    r = subprocess.run([sys.executable, "-c", BIG_CODE, str(src), str(model)], capture_output=True, text=True)
    if r.returncode != 0:
        return [f"10000x10000 run failed: {r.stderr[-500:]}"]
    t, base, peak, n = r.stdout.split()[-4:]
    return ["### 10000 x 10000 smear (100 Mpx, tiled from a SigTuple smear), CPU", "",
            f"segment() took {float(t):.0f} s ({float(t)/100:.2f} s/Mpx), found {n} WBCs; peak RSS {float(peak)/1024:.2f} GiB "
            f"of which {float(base)/1024:.2f} GiB is the input image and Python/torch before the call."]


if __name__ == "__main__":
    main()
