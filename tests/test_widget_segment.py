"""Segment WBCs widget, opened through the manifest, on tiny images with a tiny random model."""
from __future__ import annotations

import threading

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("user_models")

PLUGIN = "napari-wbc"
TIMEOUT = 10_000


@pytest.fixture
def seg(make_napari_viewer, tiny_segmenter, disc_smear):
    """``(viewer, widget, image_layer)`` with the tiny model chosen, cpu, diameter 16 px."""
    viewer = make_napari_viewer()
    image, _ = disc_smear
    layer = viewer.add_image(image, name="smear", rgb=True, scale=(0.5, 0.5), translate=(10.0, 20.0))
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment WBCs")
    widget.add_model(tiny_segmenter, select=True)
    widget.device_combo.set_device("cpu")
    widget.set_diameter(16)
    return viewer, widget, layer


def run(qtbot, widget):
    worker = widget.segment()
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    return worker


def wbc_labels(viewer):
    from napari.layers import Labels

    return [lyr for lyr in viewer.layers if isinstance(lyr, Labels)]


def test_widget_lists_image_layers_and_models(seg, tiny_segmenter):
    viewer, widget, layer = seg
    assert widget.image_combo.layer() is layer
    viewer.add_image(np.zeros((32, 32)), name="other")
    assert [widget.image_combo.itemText(i) for i in range(widget.image_combo.count())] == ["smear", "other"]
    viewer.layers.remove("other")
    assert widget.image_combo.count() == 1
    assert widget.model_combo.model_path() == tiny_segmenter
    assert widget.model_combo.itemText(widget.model_combo.count() - 1) == "Browse..."
    devices = [widget.device_combo.itemText(i) for i in range(widget.device_combo.count())]
    assert devices[0] == "auto" and devices[-1] == "cpu"


def test_the_image_picker_starts_on_the_selected_image(make_napari_viewer):
    """With a sample and a smear open and the smear selected, Segment picked the first image layer."""
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32, 3), np.uint8), name="sample", rgb=True)
    smear = viewer.add_image(np.zeros((32, 32, 3), np.uint8), name="smear", rgb=True)
    viewer.add_image(np.zeros((32, 32, 3), np.uint8), name="third", rgb=True)
    viewer.layers.selection.active = smear
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment WBCs")
    assert widget.image_combo.layer() is smear
    viewer.layers.selection.clear()
    _, classify = viewer.window.add_plugin_dock_widget(PLUGIN, "Classify WBCs")
    assert classify.image_combo.layer() is viewer.layers["third"]  # nothing selected: the newest


def test_segment_adds_labels_layer(qtbot, seg, tiny_segmenter):
    viewer, widget, _ = seg
    run(qtbot, widget)
    (lab,) = wbc_labels(viewer)
    assert lab.name == "smear WBC labels"
    assert lab.data.shape == (64, 64)
    assert lab.data.dtype == np.uint16  # napari edits uint16 labels without remapping the whole layer
    np.testing.assert_allclose(lab.scale, (0.5, 0.5))
    np.testing.assert_allclose(lab.translate, (10.0, 20.0))
    feats = lab.features
    for col in ("index", "label", "area", "centroid-0", "centroid-1"):
        assert col in feats
    ids = np.unique(lab.data[lab.data > 0])
    assert sorted(feats["index"]) == sorted(feats["label"]) == list(ids)
    meta = lab.metadata["napari_wbc"]
    assert meta["image_layer"] == "smear"
    assert meta["model"] == str(tiny_segmenter)
    assert meta["diameter"] == 16
    assert widget.status.text().endswith("(WBC diameter 16 px, as set)")  # the scale used, to be checked
    assert widget.buttons.run.isEnabled()
    assert len(ids) and lab.selected_label == ids.max() + 1  # painting a missed cell makes a new one
    assert lab.contour == 1  # outlines (diameter 16 px): the cells' morphology stays visible


def test_the_status_says_the_estimated_diameter_it_used(qtbot, seg):
    viewer, widget, _ = seg
    widget.set_diameter(None)
    run(qtbot, widget)
    (lab,) = wbc_labels(viewer)
    used = lab.metadata["napari_wbc"]["diameter"]
    assert used is not None and used != 16
    assert widget.status.text().endswith(f"(WBC diameter {used:.0f} px, estimated)")


def test_painting_after_segmenting_adds_a_new_cell(qtbot, seg):
    viewer, widget, _ = seg
    run(qtbot, widget)
    (lab,) = wbc_labels(viewer)
    n = len(np.unique(lab.data[lab.data > 0]))
    lab.paint((2, 2), lab.selected_label)  # a missed cell, painted with napari's brush as it comes
    assert len(np.unique(lab.data[lab.data > 0])) == n + 1


def test_rerun_keeps_edited_layer(qtbot, seg):
    viewer, widget, _ = seg
    run(qtbot, widget)
    run(qtbot, widget)  # untouched: replaced in place
    assert [lyr.name for lyr in wbc_labels(viewer)] == ["smear WBC labels"]
    first = wbc_labels(viewer)[0]
    first.paint((5, 5), 99)  # the user edits it
    edited = first.data.copy()
    run(qtbot, widget)
    assert [lyr.name for lyr in wbc_labels(viewer)] == ["smear WBC labels", "smear WBC labels [2]"]
    np.testing.assert_array_equal(first.data, edited)


@pytest.fixture
def held_result(monkeypatch) -> threading.Event:
    """Segmentations hold their labels until the returned event is set (or 10 s pass): a test can
    cancel while one runs."""
    import napari_wbc.core.segment as core_segment

    real = core_segment.iter_segment
    release = threading.Event()

    def slow_iter_segment(*args, **kwargs):
        for item in real(*args, **kwargs):
            if item[0] == "labels":
                release.wait(TIMEOUT / 1000)  # hold the result until the test has cancelled
            yield item

    monkeypatch.setattr(core_segment, "iter_segment", slow_iter_segment)
    return release


def test_cancel_adds_no_layer(qtbot, seg, held_result):
    viewer, widget, _ = seg
    release = held_result
    widget.segment()
    qtbot.waitUntil(lambda: widget.progress.maximum() > 0 and widget.progress.value() >= 1, timeout=TIMEOUT)
    assert not widget.buttons.run.isEnabled() and widget.buttons.cancel.isEnabled()
    widget.cancel()
    release.set()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert "cancelled" in widget.status.text()
    assert wbc_labels(viewer) == []
    assert widget.buttons.run.isEnabled()


def test_bad_model_reports_error(qtbot, seg, tmp_path, monkeypatch):
    import napari_wbc._widgets.segment as seg_mod

    viewer, widget, _ = seg
    errors = []
    monkeypatch.setattr(seg_mod, "show_error", errors.append)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a model")
    bad.with_suffix(".json").write_text('{"kind": "segmenter", "arch": {"name": "Unet"}}')
    widget.model_combo.blockSignals(True)
    widget.model_combo.insertItem(0, "broken", str(bad))
    widget.model_combo.setCurrentIndex(0)
    widget.model_combo.blockSignals(False)
    run(qtbot, widget)
    assert errors and "broken.safetensors" in errors[0]
    assert wbc_labels(viewer) == []


def test_add_model_checks_the_file(seg, tmp_path):
    _, widget, _ = seg
    with pytest.raises(ValueError, match="does not exist"):
        widget.add_model(tmp_path / "missing.safetensors")


def test_menu_command_segments_selected_image(qtbot, make_napari_viewer, tiny_segmenter, disc_smear):
    from napari._app_model import get_app_model

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((16, 16)), name="other")
    viewer.add_image(disc_smear[0], name="smear", rgb=True)  # selected (last added)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment WBCs")
    widget.add_model(tiny_segmenter)
    widget.device_combo.set_device("cpu")
    widget.set_diameter(16)
    get_app_model().commands.execute_command("napari-wbc.segment_active").result()
    qtbot.waitUntil(lambda: "smear WBC labels" in viewer.layers, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert [lyr.name for lyr in wbc_labels(viewer)] == ["smear WBC labels"]


def test_device_combo_lists_devices_in_the_background(qtbot, monkeypatch):
    """Opening a widget never waits for torch: auto/cpu at once, accelerators when known, then the preload."""
    from napari_wbc._widgets import _common

    gate = threading.Event()

    def slow_listing():  # stands for the first torch import (seconds)
        gate.wait(10)
        return ["cuda", "cpu"]

    monkeypatch.setattr(_common, "_torch_loaded", lambda: False)
    monkeypatch.setattr(_common, "_list_devices", slow_listing)
    preloaded = []
    combo = _common.DeviceCombo(then=preloaded.append)
    qtbot.addWidget(combo)
    items = lambda: [combo.itemText(i) for i in range(combo.count())]  # noqa: E731
    assert items() == ["auto", "cpu"]  # without waiting for the listing
    gate.set()
    qtbot.waitUntil(lambda: items() == ["auto", "cuda", "cpu"], timeout=TIMEOUT)
    qtbot.waitUntil(lambda: preloaded == ["cuda"], timeout=TIMEOUT)  # the device "auto" stands for


def test_device_combo_set_device_waits_for_the_listing(qtbot, monkeypatch):
    from napari_wbc._widgets import _common

    gate = threading.Event()
    monkeypatch.setattr(_common, "_torch_loaded", lambda: False)
    monkeypatch.setattr(_common, "_list_devices", lambda: (gate.wait(10), ["mps", "cpu"])[1])
    combo = _common.DeviceCombo()
    qtbot.addWidget(combo)
    threading.Timer(0.2, gate.set).start()
    combo.set_device("mps")  # not listed yet: waits, then finds it
    assert combo.device() == "mps"
    with pytest.raises(ValueError, match="cuda"):
        combo.set_device("cuda")


def test_warm_up_loads_the_model_for_the_first_run(tiny_segmenter):
    from napari_wbc._widgets._common import warm_up
    from napari_wbc.core import models

    models.clear_cache()
    warm_up("segmenter", tiny_segmenter, "cpu")
    assert any(key[0] == str(tiny_segmenter.resolve()) for key in models._CACHE)


def test_concurrent_loads_share_one_network(tiny_segmenter):
    """A widget's preload and a run that starts meanwhile load the model once, not twice."""
    from napari_wbc.core import models

    models.clear_cache()
    out = []
    threads = [threading.Thread(target=lambda: out.append(models.load_model(tiny_segmenter, "segmenter", "cpu")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(out) == 3 and all(o[0] is out[0][0] for o in out)


def test_hide_triton_marks_it_absent_unless_allowed(monkeypatch):
    import sys

    from napari_wbc._widgets._common import hide_triton

    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.setenv("NAPARI_WBC_ALLOW_TRITON", "1")
    hide_triton()
    assert "triton" not in sys.modules
    monkeypatch.setenv("NAPARI_WBC_ALLOW_TRITON", "0")  # 0 means no, as for the other switches
    hide_triton()
    assert sys.modules["triton"] is None  # "import triton" now raises ImportError: torch treats it as missing
    monkeypatch.delitem(sys.modules, "triton")
    monkeypatch.delenv("NAPARI_WBC_ALLOW_TRITON")
    hide_triton()
    assert sys.modules["triton"] is None


def test_rerun_over_a_typed_layer_takes_its_old_types_away(qtbot, seg):
    """Re-segmenting an untouched but typed layer replaces its cells: the old types (features and the
    ``types`` points on the canvas) must not outlive them."""
    from napari_wbc._widgets.classify import find_types_layer, render_types

    viewer, widget, _ = seg
    run(qtbot, widget)
    (lab,) = wbc_labels(viewer)
    assert lab.data.max() > 0  # the tiny model finds cells in the disc smear
    f = lab.features.copy()
    f["cell_type"] = "neutrophil"
    lab.features = f
    assert render_types(viewer, lab) is not None
    run(qtbot, widget)
    assert [lyr.name for lyr in wbc_labels(viewer)] == ["smear WBC labels"]  # untouched: replaced
    assert "cell_type" not in lab.features
    assert find_types_layer(viewer, lab) is None


def test_classify_cells_uses_the_segmenters_paired_classifier(seg, tmp_path):
    """Without a Classify widget open, 'classify cells' types with the classifier fine-tuned together
    with the chosen segmenter (its card's ``classifier``), not the shipped one."""
    import json
    import shutil

    from napari_wbc.core.models import SHIPPED, card_path
    from napari_wbc.core.testing import make_tiny_classifier

    viewer, widget, _ = seg
    assert widget._classifier_choice() == SHIPPED["classifier"]
    cls = make_tiny_classifier(tmp_path / "paired_cls.safetensors")
    pair = tmp_path / "paired_seg.safetensors"
    shutil.copy(widget.model_combo.model_path(), pair)
    card = json.loads(card_path(widget.model_combo.model_path()).read_text())
    card["classifier"] = str(cls)
    card_path(pair).write_text(json.dumps(card))
    widget.add_model(pair, select=True)
    assert widget._classifier_choice() == cls


def test_image_removed_or_renamed_while_segmenting(qtbot, seg):
    viewer, widget, layer = seg
    assert widget.segment() is not None
    layer.name = "patient A"  # renamed before the result arrives: the result follows the new name
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    (lab,) = wbc_labels(viewer)
    assert lab.name == "patient A WBC labels" and lab.metadata["napari_wbc"]["image_layer"] == "patient A"
    assert widget.segment() is not None
    viewer.layers.remove(layer)  # removed before the result arrives: nothing is added
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert [lyr.name for lyr in wbc_labels(viewer)] == ["patient A WBC labels"]
    assert "was removed" in widget.status.text()


def test_labels_follow_their_image_through_a_rename_and_its_transform(qtbot, make_napari_viewer, tiny_segmenter,
                                                                       tiny_classifier, disc_smear):
    """The labels sit exactly on a rotated/sheared image in world coordinates (and so do the types
    points), and stay paired with it - not with another image of the same size - after it is renamed."""
    viewer = make_napari_viewer()
    image, _ = disc_smear
    viewer.add_image(np.full_like(image, 230), name="A", rgb=True)  # another image of the same size
    b = viewer.add_image(image, name="B", rgb=True, scale=(2, 2), translate=(5, 7), rotate=30, shear=[0.2])
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment WBCs")
    widget.add_model(tiny_segmenter, select=True)
    widget.device_combo.set_device("cpu")
    widget.set_diameter(16)
    widget.image_combo.set_layer(b)
    run(qtbot, widget)
    lab = viewer.layers["B WBC labels"]
    np.testing.assert_allclose(lab._data_to_world.affine_matrix, b._data_to_world.affine_matrix)
    b.name = "B renamed"
    _, cls = viewer.window.add_plugin_dock_widget(PLUGIN, "Classify WBCs")
    cls.model_combo.add_model(tiny_classifier, select=True)
    cls.device_combo.set_device("cpu")
    cls.labels_combo.set_layer(lab)
    assert cls._image_for(lab) is b and cls.image_combo.layer() is b
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train from corrections")
    assert train.pairs() == []  # untouched: listed, not ticked
    train.set_pair(lab)  # ticked: paired with its renamed image, not with A
    assert train.pairs() == [(lab, b)]
    lab.data = np.where(np.asarray(image).mean(-1) < 150, 1, 0).astype(np.uint16)  # one cell, whatever the net saw
    qtbot.waitUntil(lambda: len(lab.features) == 1 and not cls.syncing, timeout=TIMEOUT)
    assert cls.classify() is not None
    qtbot.waitUntil(lambda: not cls.running, timeout=TIMEOUT)
    pts = viewer.layers["B WBC labels types"]
    np.testing.assert_allclose(pts._data_to_world.affine_matrix, b._data_to_world.affine_matrix)


def test_a_lazy_image_is_loaded_by_the_worker_and_stacks_are_refused(qtbot, seg, monkeypatch):
    import dask.array as da

    import napari_wbc._widgets.segment as mod

    viewer, widget, layer = seg
    given = []
    real = mod.segment_job

    def spy(image, **kwargs):
        given.append(image)  # what the GUI thread handed over
        return (yield from real(image, **kwargs))

    monkeypatch.setattr(mod, "segment_job", spy)
    full = np.asarray(layer.data)
    layer.data = da.from_array(full, chunks=(32, 32, 3))
    run(qtbot, widget)
    assert len(given) == 1 and isinstance(given[0], da.Array)  # not computed on the GUI thread
    assert viewer.layers["smear WBC labels"].data.shape == (64, 64)
    errors = []
    monkeypatch.setattr(mod, "show_error", errors.append)
    viewer.add_image(np.zeros((3, 64, 64, 3), np.uint8), name="rgb movie", rgb=True)
    widget.image_combo.set_layer(viewer.layers["rgb movie"])
    assert widget.segment() is None and "expected a single 2-D image" in errors[-1]


def test_classify_cells_notes_the_classifier_on_the_layer(qtbot, seg, tiny_classifier, monkeypatch):
    """'classify cells' types with Classify's model and the labels layer remembers it (Train's auto
    choice of the classifier that the corrected types fine-tune)."""
    import napari_wbc.core.segment as core_segment

    viewer, widget, _ = seg
    image = np.asarray(viewer.layers["smear"].data)
    dark = image.mean(-1) < 150  # the discs, whatever the random net makes of them
    from skimage.measure import label as cc

    monkeypatch.setattr(core_segment, "iter_segment", lambda img, **kw: iter([("labels", cc(dark).astype(np.int32))]))
    _, cls = viewer.window.add_plugin_dock_widget(PLUGIN, "Classify WBCs")
    cls.model_combo.add_model(tiny_classifier, select=True)
    widget.classify_check.setChecked(True)
    run(qtbot, widget)
    (lab,) = wbc_labels(viewer)
    assert "cell_type" in lab.features and lab.features["cell_type"].notna().all()
    assert lab.metadata["napari_wbc"]["classifier"] == str(tiny_classifier)
    assert lab.metadata["napari_wbc"]["image_layer"] == "smear"


def test_segment_every_new_image_goes_through_the_fields_not_yet_segmented(qtbot, seg, disc_smear, monkeypatch):
    """One click segments every image without a labels layer (the fields of a slide), one after another;
    a stack is said so and passed over; clicked again, only images opened since are segmented."""
    import napari_wbc._widgets.segment as mod

    viewer, widget, layer = seg
    run(qtbot, widget)  # 'smear' has its labels already
    image, _ = disc_smear
    viewer.add_image(image[::-1], name="field 2", rgb=True)
    viewer.add_image(np.zeros((3, 64, 64, 3), np.uint8), name="rgb movie", rgb=True)
    viewer.add_image(image[:, ::-1], name="field 3", rgb=True)
    errors = []
    monkeypatch.setattr(mod, "show_error", errors.append)
    statuses = []
    widget.status.setText = lambda text, real=widget.status.setText: (statuses.append(text), real(text))[1]
    assert [lyr.name for lyr in widget.new_images()] == ["field 2", "rgb movie", "field 3"]
    assert widget.segment_new() is not None
    assert not widget.new_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.running and widget._batch is None, timeout=TIMEOUT)
    names = [lyr.name for lyr in wbc_labels(viewer)]
    assert names == ["smear WBC labels", "field 2 WBC labels", "field 3 WBC labels"]
    assert viewer.layers["field 3 WBC labels"].metadata["napari_wbc"]["image_layer"] == "field 3"
    assert len(errors) == 1 and "'rgb movie'" in errors[0]
    assert any("(image 1 of 3)" in t for t in statuses) and any("(image 3 of 3)" in t for t in statuses)
    assert widget.status.text().endswith("; 2 of 3 new images segmented")
    assert widget.new_button.isEnabled() and widget.buttons.run.isEnabled()
    # clicked again: only what was opened since
    viewer.add_image(image, name="field 4", rgb=True)
    assert [lyr.name for lyr in widget.new_images()] == ["rgb movie", "field 4"]
    viewer.layers.remove("rgb movie")
    run_new = widget.segment_new()
    assert run_new is not None
    qtbot.waitUntil(lambda: not widget.running and widget._batch is None, timeout=TIMEOUT)
    assert [lyr.name for lyr in wbc_labels(viewer)][-1] == "field 4 WBC labels" and len(wbc_labels(viewer)) == 4
    assert widget.segment_new() is None and "every open image has its labels layer" in widget.status.text()


def test_cancel_stops_a_run_of_new_images(qtbot, seg, disc_smear, held_result):
    viewer, widget, layer = seg
    image, _ = disc_smear
    viewer.add_image(image[::-1], name="field 2", rgb=True)
    release = held_result
    assert widget.segment_new() is not None
    qtbot.waitUntil(lambda: widget.progress.maximum() > 0 and widget.progress.value() >= 1, timeout=TIMEOUT)
    widget.cancel()
    release.set()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    qtbot.wait(100)
    assert not widget.running and widget._batch is None and widget._queue == []
    assert wbc_labels(viewer) == []  # neither the image being segmented nor the next one
    assert widget.status.text() == "cancelled; no layer was added for smear (0 of 2 images segmented before)"


@pytest.fixture
def smear_folder(tmp_path, disc_smear):
    """A folder of two smear images (PNG) and a text file."""
    from PIL import Image as PILImage

    image, _ = disc_smear
    folder = tmp_path / "slide 1"
    folder.mkdir()
    PILImage.fromarray(image).save(folder / "field_a.png")
    PILImage.fromarray(np.ascontiguousarray(image[::-1])).save(folder / "field_b.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_segment_a_folder_writes_what_the_batch_tool_writes(qtbot, seg, smear_folder, tiny_classifier, tmp_path):
    """A folder of smears is segmented and typed without opening them: the outputs are the batch tool's,
    the status gives the pooled count; run again, nothing is done twice and nothing overwritten."""
    import pandas as pd
    import tifffile

    from napari_wbc.core import batch

    viewer, widget, _ = seg
    _, cls = viewer.window.add_plugin_dock_widget(PLUGIN, "Classify WBCs")
    cls.model_combo.add_model(tiny_classifier, select=True)
    widget.classify_check.setChecked(True)
    n_layers = len(viewer.layers)
    assert widget.segment_folder(smear_folder) is not None
    assert not widget.folder_button.isEnabled() and not widget.buttons.run.isEnabled()
    assert widget.segment_folder(smear_folder) is None  # one run at a time
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert widget.folder_button.isEnabled() and widget.buttons.run.isEnabled()
    assert len(viewer.layers) == n_layers  # nothing opened
    out = smear_folder / "napari-wbc"
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["image"]) == ["field_a", "field_b"] and set(summary["status"]) == {"ok"}
    assert (out / "report.html").is_file()
    # the same as the command line tool's outputs with the same settings
    ref = tmp_path / "ref"
    files, _ = batch.collect_images([smear_folder], exclude=[out])
    settings = batch.Settings(model=str(widget.model_combo.model_path()), classifier=str(tiny_classifier),
                              device="cpu", diameter=16.0)
    ref_rows = batch.run_batch(files, ref, settings)
    for name in ("field_a", "field_b"):
        np.testing.assert_array_equal(tifffile.imread(out / f"{name}_labels.tif"),
                                      tifffile.imread(ref / f"{name}_labels.tif"))
        pd.testing.assert_frame_equal(pd.read_csv(out / f"{name}_cells.csv"), pd.read_csv(ref / f"{name}_cells.csv"))
    cells = int(summary["n_wbc"].sum())
    assert cells == sum(r["n_wbc"] for r in ref_rows) and cells > 0
    total = batch.pooled_counts(ref_rows)
    assert sum(total.values()) == cells
    text = widget.status.text()
    assert text.startswith(f"2 of 2 images: 2 segmented; {cells} WBCs: ")
    for c, k in total.items():
        if k:
            assert f"{c} {k} (" in text
    assert text.endswith(f"; results in {out}")
    assert widget.results.isVisibleTo(widget) and (out / "report.html").as_uri() in widget.results.text()
    # again: done before, not redone; the user's correction of a cells table is kept and counted
    cells_csv = out / "field_a_cells.csv"
    table = pd.read_csv(cells_csv)
    table.loc[0, "cell_type"] = "basophil"
    table.to_csv(cells_csv, index=False)
    stamp = (out / "field_b_labels.tif").stat().st_mtime_ns
    assert widget.segment_folder(smear_folder) is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert widget.status.text().startswith(f"2 of 2 images: 0 segmented, 2 done before; {cells} WBCs: ")
    assert "basophil" in widget.status.text()
    assert pd.read_csv(cells_csv).loc[0, "cell_type"] == "basophil"
    assert (out / "field_b_labels.tif").stat().st_mtime_ns == stamp


def test_cancel_ends_a_folder_run_after_the_image_being_segmented(qtbot, seg, smear_folder, monkeypatch):
    import pandas as pd

    import napari_wbc.core.segment as core_segment

    viewer, widget, _ = seg
    real = core_segment.iter_segment
    entered, release = threading.Event(), threading.Event()

    def held_iter_segment(*args, **kwargs):
        entered.set()
        release.wait(TIMEOUT / 1000)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(core_segment, "iter_segment", held_iter_segment)
    assert widget.segment_folder(smear_folder) is not None
    qtbot.waitUntil(entered.is_set, timeout=TIMEOUT)
    widget.cancel()
    assert "cancelling" in widget.status.text()
    release.set()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    out = smear_folder / "napari-wbc"
    assert widget.status.text().startswith("cancelled: 1 of 2 images: 1 segmented; ")
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["image"]) == ["field_a"]  # the image being segmented was finished and saved
    assert (out / "field_a_labels.tif").is_file() and not (out / "field_b_labels.tif").exists()
    assert "cancelled after 1 of 2 images" in (out / "report.html").read_text()


def test_segment_a_folder_refuses_what_it_cannot_do(seg, smear_folder, tmp_path, monkeypatch):
    import napari_wbc._widgets.segment as mod

    viewer, widget, _ = seg
    errors = []
    monkeypatch.setattr(mod, "show_error", errors.append)
    assert widget.segment_folder(smear_folder / "field_a.png") is None
    assert "'field_a.png'" not in errors[-1] and str(smear_folder / "field_a.png") in errors[-1]
    assert "is not a folder" in errors[-1]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    assert widget.segment_folder(empty) is None
    assert "no image files" in errors[-1] and str(empty) in errors[-1]
    blocked = tmp_path / "a file"
    blocked.write_text("x")
    assert widget.segment_folder(smear_folder, blocked / "out") is None
    assert "cannot be written to" in errors[-1] and str(blocked / "out") in errors[-1]
    assert not widget.running and widget.folder_button.isEnabled()


def test_a_folder_runs_results_open_paired_with_their_smears(qtbot, seg, smear_folder):
    """Opened in napari beside its image, a field's labels from 'Segment a folder' belong to that image
    (the slide count counts the field once, Next to review shows it) and carry the diameter used."""
    from napari_wbc._widgets._common import paired_image

    viewer, widget, _ = seg
    widget.segment_folder(smear_folder)
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    (image,) = viewer.open(str(smear_folder / "field_b.png"), plugin=PLUGIN)
    (labels,) = viewer.open(str(smear_folder / "napari-wbc" / "field_b_labels.tif"), plugin=PLUGIN)
    assert paired_image(viewer, labels) is image
    assert labels.metadata["napari_wbc"]["diameter"] == 16.0


def test_a_folder_run_cancelled_before_its_first_image_writes_nothing(qtbot, seg, smear_folder, monkeypatch):
    import napari_wbc.core.batch as batch

    viewer, widget, _ = seg
    real = batch.prepare_run
    entered, release = threading.Event(), threading.Event()

    def held_prepare_run(*args, **kwargs):  # the worker holds before the first image
        entered.set()
        release.wait(TIMEOUT / 1000)
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "prepare_run", held_prepare_run)
    assert widget.segment_folder(smear_folder) is not None
    qtbot.waitUntil(entered.is_set, timeout=TIMEOUT)
    widget.cancel()
    release.set()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert widget.status.text() == "cancelled before any of the 2 images was segmented; nothing was written"
    assert sorted(p.name for p in (smear_folder / "napari-wbc").iterdir()) == []
    assert not widget.results.isVisibleTo(widget)
