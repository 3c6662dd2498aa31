"""Screenshots of napari-wbc in a real napari window (run under Xvfb).

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py [IMAGE]

Opens a smear, segments it with the Segment widget, classifies it with the
Classify widget, corrects one cell, opens the Train widget, and saves PNGs to
docs/images/. Uses the shipped models on the CPU.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

OUT = Path(__file__).resolve().parent / "images"


def wait(cond, timeout=300):
    t0 = time.time()
    while not cond():
        QApplication.processEvents()
        time.sleep(0.05)
        if time.time() - t0 > timeout:
            raise TimeoutError("timed out")
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.02)


def shot(viewer, name):
    OUT.mkdir(exist_ok=True)
    viewer.reset_view()
    wait(lambda: True)
    viewer.window._qt_window.grab().save(str(OUT / name))
    from PIL import Image  # 3/4 size, 256 colours: ~200 kB a screenshot

    im = Image.open(OUT / name).convert("RGB")
    im = im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.LANCZOS)
    im.quantize(256, method=Image.Quantize.MEDIANCUT).save(OUT / name, optimize=True)
    print("saved", OUT / name)


def main():
    from napari_wbc._sample_data import sample_path

    path = Path(sys.argv[1]) if len(sys.argv) > 1 else sample_path()
    viewer = napari.Viewer(title="napari-wbc")
    viewer.window._qt_window.resize(1500, 900)
    viewer.open(str(path), plugin="napari-wbc")
    image_name = viewer.layers[0].name
    _, seg = viewer.window.add_plugin_dock_widget("napari-wbc", "Segment WBCs")
    wait(lambda: True)
    shot(viewer, "01_open.png")
    seg.segment()
    wait(lambda: any(layer.name.startswith(f"{image_name} WBC labels") for layer in viewer.layers) and not seg.running)
    shot(viewer, "02_segment.png")
    _, cls = viewer.window.add_plugin_dock_widget("napari-wbc", "Classify WBCs")
    wait(lambda: True)
    cls.classify()
    wait(lambda: not cls.running and "cell_type" in cls.labels_layer.features)
    shot(viewer, "03_classify.png")
    first = cls.review_next()  # the least confident cell
    cls.set_type(first, "monocyte")
    wait(lambda: True)
    shot(viewer, "04_correct.png")
    viewer.window.add_plugin_dock_widget("napari-wbc", "Train from corrections")
    wait(lambda: True)
    shot(viewer, "05_train.png")
    viewer.close()


if __name__ == "__main__":
    main()
