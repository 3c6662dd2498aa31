"""False WBCs on fields without any WBC (held-out images only).

Most fields of a smear hold red cells and platelets only; a segmenter that finds a "WBC" in them
corrupts the count. This cuts such fields from held-out images and counts what segment() finds in
them, with ``diameter=None`` as a user runs it:

- BCCD odd (held-out) images: 240 x 240 windows at the four corners and the top and bottom middle,
  kept when they stay clear of every WBC box (with 15 % of the box's size as margin); plus the whole
  odd images that have no WBC box at all;
- the SigTuple validation smear (``017532875DDF``): 300 x 300 windows on a 150 px grid that stay at
  least 30 px (half a WBC) clear of every WBC mask.

BCCD boxes are sometimes missing (see ../shared/data/README.md), so a "false" cell may be an
unannotated WBC: ``--save DIR`` writes every window with a finding, outlined, for inspection.

    python benchmarks/empty_fields.py --threads 1 [--model PATH] [--save /tmp/empty]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wbc_data  # noqa: E402


def bccd_windows(win: int = 240):
    for img, rgb, boxes in wbc_data.bccd_with_boxes("val"):
        if not boxes:
            yield f"{img.stem} whole", rgb
            continue
        for y, x in wbc_data.clear_windows(rgb.shape, boxes, win):
            yield f"{img.stem} y{y} x{x}", rgb[y : y + win, x : x + win]


def sigtuple_windows(win: int = 300, step: int = 150, clear: int = 30):
    from scipy import ndimage as ndi

    for img, mask, split in wbc_data.sigtuple_smears():
        if split != "val":
            continue
        rgb, lab = wbc_data.load_image_mask(img, mask)
        occ = ndi.binary_dilation(lab > 0, iterations=clear)
        h, w = lab.shape
        for y in range(0, h - win + 1, step):
            for x in range(0, w - win + 1, step):
                if not occ[y : y + win, x : x + win].any():
                    yield f"{img.stem} y{y} x{x}", rgb[y : y + win, x : x + win]


def false_wbcs(fields, model=None, found=None):
    """``(fields, fields with a finding, cells found)`` by segment() with ``diameter=None`` over ``fields``
    (``(key, rgb)`` pairs); ``found(key, rgb, labels)`` is called for each field with a finding."""
    from napari_wbc import segment

    n = hit = cells = 0
    for key, rgb in fields:
        lab = segment(rgb, model=model, device="cpu")
        k = int(lab.max())
        n, hit, cells = n + 1, hit + (k > 0), cells + k
        if k and found is not None:
            found(key, rgb, lab)
    return n, hit, cells


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="segmenter file (default: the shipped one)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--save", default=None, help="folder for outlined windows with a finding")
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    save = Path(a.save) if a.save else None
    if save:
        from skimage.io import imsave
        from skimage.segmentation import find_boundaries

        save.mkdir(parents=True, exist_ok=True)
    print(f"model: {a.model or 'shipped'}")
    print("| fields | n | with a false WBC | false WBCs | per field |")
    print("|---|---|---|---|---|")
    for name, fields in (("BCCD odd, 240 px windows and WBC-free images", bccd_windows()),
                         ("SigTuple validation smear, 300 px windows", sigtuple_windows())):
        found = []

        def note(key, rgb, lab):
            found.append(key)
            if save:
                out = rgb.copy()
                out[find_boundaries(lab)] = (0, 255, 0)
                imsave(save / (key.replace(" ", "_") + ".png"), out, check_contrast=False)

        n, hit, cells = false_wbcs(fields, a.model, note)
        print(f"| {name} | {n} | {hit} ({hit / max(n, 1):.0%}) | {cells} | {cells / max(n, 1):.2f} |", flush=True)
        if found:
            print("  with findings: " + ", ".join(found), file=sys.stderr)


if __name__ == "__main__":
    main()
