"""Screenshots of napari-wbc in a real napari window (run under Xvfb).

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py [IMAGE [FIELD ...]]

Opens a smear, segments it with the Segment widget, classifies it with the
Classify widget, corrects one cell, opens the Train widget, and saves PNGs to
docs/images/. With FIELDs (more images of the slide), also opens them, segments
them with "Segment every new image" and shows the slide's differential count
(06_slide.png), then runs "Segment a folder..." on a folder of the same fields (links; the results in
a temporary folder) and shows its status (07_folder.png). Uses the shipped models on the CPU.
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
    _, train = viewer.window.add_plugin_dock_widget("napari-wbc", "Train from corrections")
    wait(lambda: True)
    shot(viewer, "05_train.png")
    if len(sys.argv) > 2:  # more fields of the slide: segmented and typed in one click, counted together
        viewer.window.remove_dock_widget(train)
        for field in sys.argv[2:]:
            viewer.open(field, plugin="napari-wbc")
        seg.classify_check.setChecked(True)
        seg.segment_new()
        wait(lambda: not seg.running and seg._batch is None, timeout=600)
        cls.set_slide_scope(True)
        for lyr in viewer.layers:  # the last field on top, the others' outlines hidden under it
            lyr.visible = lyr.name.startswith(viewer.layers[-1].name.split(" WBC labels")[0])
        from qtpy.QtWidgets import QScrollArea

        area = cls.total_label.parent()
        while area is not None and not isinstance(area, QScrollArea):
            area = area.parent()
        if area is not None:  # the count and its total line in view
            area.ensureWidgetVisible(cls.total_label)
        shot(viewer, "06_slide.png")
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # the same fields as a folder, not opened
            folder = Path(tmp) / "slide 1"
            folder.mkdir()
            for field in sys.argv[2:]:
                (folder / Path(field).name).symlink_to(Path(field).resolve())
            seg.segment_folder(folder)
            wait(lambda: not seg.running, timeout=600)
            shot(viewer, "07_folder.png")
    viewer.close()


if __name__ == "__main__":
    main()
