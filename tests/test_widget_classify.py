"""Classify WBCs widget, opened through the manifest, on a tiny disc image with a tiny random classifier."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.usefixtures("user_models")

PLUGIN = "napari-wbc"
TIMEOUT = 10_000
CLASSES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]


@pytest.fixture
def cls(make_napari_viewer, tiny_classifier, disc_smear):
    """``(viewer, widget, labels_layer)``: a labels layer made 'by Segment' for image 'smear'."""
    viewer = make_napari_viewer()
    image, labels = disc_smear
    viewer.add_image(image, name="smear", rgb=True, scale=(0.5, 0.5))
    from napari_wbc._widgets.segment import cell_features

    lab = viewer.add_labels(
        labels, name="smear WBC labels", scale=(0.5, 0.5), features=cell_features(labels),
        metadata={"napari_wbc": {"image_layer": "smear"}},
    )
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Classify WBCs")
    widget.model_combo.add_model(tiny_classifier, select=True)
    widget.device_combo.set_device("cpu")
    return viewer, widget, lab


def run(qtbot, widget, **kwargs):
    assert widget.classify(**kwargs) is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)


def types_layer(viewer):
    return viewer.layers["smear WBC labels types"]


def shown_counts(widget) -> dict:
    t = widget.count_table
    return {t.item(r, 0).text(): int(t.item(r, 1).text()) for r in range(t.rowCount())}


def test_classify_fills_features_points_and_counts(qtbot, cls):
    viewer, widget, lab = cls
    assert widget.labels_layer is lab and widget.image_combo.layer().name == "smear"
    run(qtbot, widget)
    f = lab.features
    assert list(f["index"]) == list(f["label"]) == [1, 2, 3, 4]
    for col in ("area", "centroid-0", "centroid-1", "cell_type", "confidence", "corrected", *[f"p_{c}" for c in CLASSES]):
        assert col in f, col
    assert set(f["cell_type"]) <= set(CLASSES)
    assert not f["corrected"].any()
    pts = types_layer(viewer)
    assert len(pts.data) == 4
    np.testing.assert_allclose(pts.scale, lab.scale)
    assert list(pts.text.values) == list(f["cell_type"])
    counts = shown_counts(widget)
    assert list(counts)[:5] == CLASSES and sum(counts.values()) == 4
    assert widget.total_label.text() == "total WBCs: 4"
    # the layer remembers which classifier typed it (Train fine-tunes that one with the corrected types)
    assert lab.metadata["napari_wbc"] == {"image_layer": "smear", "classifier": str(widget.model_combo.model_path())}


def test_correction_is_kept_on_rerun(qtbot, cls):
    viewer, widget, lab = cls
    run(qtbot, widget)
    t2 = lab.features.set_index("label").loc[2, "cell_type"]
    new_type = next(c for c in CLASSES if c != t2)
    click = SimpleNamespace(position=(14 * 0.5, 48 * 0.5), view_direction=None, dims_displayed=[0, 1])
    assert widget._on_click in lab.mouse_drag_callbacks
    widget._on_click(lab, click)  # a click on cell 2 (world coordinates, pan/zoom mode) picks it
    assert widget.cell_spin.value() == 2
    viewer.layers.selection.active = viewer.layers["smear"]  # another layer selected: a click picks too
    widget.cell_spin.setValue(0)
    assert widget._on_viewer_click in viewer.mouse_drag_callbacks
    widget._on_viewer_click(viewer, click)
    assert widget.cell_spin.value() == 2
    viewer.layers.selection.active = lab
    lab.selected_label = 3  # so does the layer's selected label
    assert widget.cell_spin.value() == 3
    lab.selected_label = 2
    widget.type_combo.setCurrentText(new_type)
    widget.set_type_button.click()
    row = lab.features.set_index("label").loc[2]
    assert row["cell_type"] == new_type and bool(row["corrected"])
    assert types_layer(viewer).text.values[1] == new_type
    from napari.utils.colormaps.standardize_color import transform_color

    from napari_wbc._widgets.classify import _color

    pts = types_layer(viewer)  # rings in the type's colour (the nucleus stays visible), updated with it
    assert (pts.face_color[:, 3] == 0).all()
    np.testing.assert_allclose(pts.border_color[1], transform_color(_color(new_type))[0])
    assert shown_counts(widget)[new_type] == int((lab.features["cell_type"] == new_type).sum())
    run(qtbot, widget)  # the model would say t2 again; the correction stays
    row = lab.features.set_index("label").loc[2]
    assert row["cell_type"] == new_type and bool(row["corrected"])
    assert lab.features["corrected"].sum() == 1


def test_edits_classify_only_new_cells(qtbot, cls, monkeypatch):
    import napari_wbc.core.classify as core_classify

    viewer, widget, lab = cls
    run(qtbot, widget)
    asked = []
    real = core_classify.iter_classify

    def spy(*args, **kwargs):
        asked.append(kwargs.get("ids"))
        yield from real(*args, **kwargs)

    monkeypatch.setattr(core_classify, "iter_classify", spy)
    yy, xx = np.mgrid[:64, :64]
    disc = np.nonzero((yy - 31) ** 2 + (xx - 31) ** 2 <= 16)
    lab.data_setitem(disc, 7)  # the user paints a new cell (emits the paint event)
    qtbot.waitUntil(lambda: 7 in set(lab.features["label"]) and pd.notna(
        lab.features.set_index("label").loc[7, "cell_type"]), timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert asked == [[7]]
    assert len(types_layer(viewer).data) == 5
    lab.fill((14, 14), 0)  # erase cell 1 (the fill tool, data coordinates)
    qtbot.waitUntil(lambda: 1 not in set(lab.features["label"]), timeout=TIMEOUT)
    assert sorted(lab.features["label"]) == [2, 3, 4, 7]
    assert len(types_layer(viewer).data) == 4
    assert widget.total_label.text() == "total WBCs: 4"
    assert asked == [[7]]  # erasing classifies nothing
    lab.undo()  # the cell comes back: it is classified again, alone
    qtbot.waitUntil(lambda: 1 in set(lab.features["label"]) and not widget.running, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: len(types_layer(viewer).data) == 5, timeout=TIMEOUT)
    assert asked == [[7], [1]]


def test_export_csv(qtbot, cls, tmp_path):
    viewer, widget, lab = cls
    run(qtbot, widget)
    widget.set_type(3, "eosinophil")
    written = widget.export_csv(tmp_path / "cells.csv")
    assert [p.name for p in written] == ["cells.csv", "cells_counts.csv"]
    cells = pd.read_csv(written[0])
    assert list(cells["label"]) == [1, 2, 3, 4]
    assert set(cells["image"]) == set(pd.read_csv(written[1])["image"]) == {"smear"}  # which smear they count
    assert cells.set_index("label").loc[3, "cell_type"] == "eosinophil"
    assert bool(cells.set_index("label").loc[3, "corrected"])
    counts = pd.read_csv(written[1]).set_index("cell_type")
    assert counts.loc["total", "count"] == 4 and counts.loc["total", "percent"] == 100.0
    assert counts.loc[CLASSES, "count"].sum() == 4
    assert "total typed" not in counts.index  # every cell typed: one total
    lab.data_setitem(np.nonzero(np.pad(np.ones((4, 4), bool), ((58, 2), (58, 2)))), 10)  # a cell not typed yet
    counts = pd.read_csv(widget.export_csv(tmp_path / "again.csv")[1]).set_index("cell_type")
    assert counts.loc["total", "count"] == 5 and np.isnan(counts.loc["total", "percent"])
    assert counts.loc["unclassified", "count"] == 1 and np.isnan(counts.loc["unclassified", "percent"])
    assert counts.loc["total typed", "count"] == 4 and counts.loc["total typed", "percent"] == 100.0
    assert counts.loc[CLASSES, "percent"].sum() == pytest.approx(100.0, abs=0.2)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def _second_field(viewer, disc_smear, types, name="smear2"):
    """Another smear ``name`` with a labels layer made 'by Segment' and typed as ``types`` (label 1..n)."""
    from napari_wbc._widgets.segment import cell_features

    image, labels = disc_smear
    viewer.add_image(image[::-1], name=name, rgb=True)
    feats = cell_features(labels[::-1].copy())
    feats["cell_type"] = pd.Series(types, dtype=object)
    return viewer.add_labels(labels[::-1].copy(), name=f"{name} WBC labels", features=feats,
                             metadata={"napari_wbc": {"image_layer": name}})


def test_the_slide_count_pools_every_segmented_field(qtbot, cls, disc_smear):
    """'the slide' counts the cells of every labels layer napari-wbc segmented or typed (fields of one
    smear), not a ground-truth mask; it follows fields added, typed and removed; corrections still go to
    the chosen layer."""
    viewer, widget, lab = cls
    run(qtbot, widget)
    mine = lab.features["cell_type"].value_counts().to_dict()
    second = _second_field(viewer, disc_smear, ["eosinophil", "eosinophil", "monocyte", None])
    viewer.add_labels(disc_smear[1], name="smear mask")  # a ground-truth mask opened beside the smear
    widget.labels_combo.set_layer(lab)
    assert sum(shown_counts(widget).values()) == 4 and widget.total_label.text() == "total WBCs: 4"
    widget.set_slide_scope(True)
    counts = shown_counts(widget)
    assert sum(counts.values()) == 8 and counts["unclassified"] == 1
    assert counts["eosinophil"] == mine.get("eosinophil", 0) + 2
    assert counts["monocyte"] == mine.get("monocyte", 0) + 1
    assert widget.total_label.text() == ("total WBCs: 8 in 2 fields; 93 more typed for a 100-cell differential")
    pooled = widget.counts().set_index("cell_type")
    assert pooled.loc[CLASSES, "percent"].sum() == pytest.approx(100.0, abs=0.2)  # of the 7 typed
    # a field typed while another layer is chosen (Segment's "classify cells"): counted at once
    f = second.features.copy()
    f.loc[3, "cell_type"] = "lymphocyte"
    second.features = f
    assert shown_counts(widget)["lymphocyte"] == mine.get("lymphocyte", 0) + 1
    assert "unclassified" not in shown_counts(widget)
    # a correction goes to the chosen layer and shows in the slide count
    old = lab.features.set_index("label").loc[1, "cell_type"]
    before = shown_counts(widget)["basophil"]
    widget.set_type(1, "basophil")
    assert shown_counts(widget)["basophil"] == before + (old != "basophil")
    assert sum(shown_counts(widget).values()) == 8
    assert second.features["cell_type"].tolist() == ["eosinophil", "eosinophil", "monocyte", "lymphocyte"]
    # a third field added, then one removed
    third = _second_field(viewer, disc_smear, ["neutrophil"] * 4, name="smear3")
    assert sum(shown_counts(widget).values()) == 12
    assert widget.total_label.text().startswith("total WBCs: 12 in 3 fields")
    viewer.layers.remove(second)
    assert sum(shown_counts(widget).values()) == 8
    # the first smear segmented again (its first labels edited): one labels layer per smear counts, the
    # chosen one, else the newest
    again = viewer.add_labels(lab.data[:, :32].copy(), name="smear WBC labels [2]", scale=(0.5, 0.5),
                              features=lab.features[lab.features["label"].isin([1, 3])],
                              metadata={"napari_wbc": {"image_layer": "smear"}})
    widget.labels_combo.set_layer(lab)
    assert sum(shown_counts(widget).values()) == 8
    assert widget.total_label.text().startswith("total WBCs: 8 in 2 fields (and 1 more labels layer of the same")
    widget.labels_combo.set_layer(third)
    assert sum(shown_counts(widget).values()) == 6  # the newest of smear's two layers: 2 cells
    viewer.layers.remove(again)
    widget.labels_combo.set_layer(lab)
    widget.set_slide_scope(False)
    assert sum(shown_counts(widget).values()) == 4 and widget.total_label.text() == "total WBCs: 4"


def test_next_to_review_with_the_slide_count_goes_to_the_least_confident_cell_of_any_field(qtbot, cls, disc_smear):
    viewer, widget, lab = cls
    run(qtbot, widget)
    second = _second_field(viewer, disc_smear, ["neutrophil"] * 4)
    f = second.features.copy()
    f["confidence"] = [0.9, 0.8, 0.95, 0.85]
    f["confidence"] = f["confidence"].astype(float)
    low = float(lab.features["confidence"].min())
    f.loc[1, "confidence"] = low / 2  # cell 2 of the second field: the least confident of the slide
    second.features = f
    widget.labels_combo.set_layer(lab)
    assert widget.review_next() == lab.features.sort_values(["confidence", "label"])["label"].iloc[0]  # this layer
    widget.set_slide_scope(True)
    assert widget.review_next() == 2
    assert widget.labels_layer is second and widget.cell_spin.value() == 2
    # that field shown, the other field's image, labels and types hidden
    assert second.visible and viewer.layers["smear2"].visible
    assert not lab.visible and not viewer.layers["smear"].visible and not types_layer(viewer).visible
    widget.set_type(2, "lymphocyte")  # corrected: the next one is the least confident left, wherever it is
    left = sorted([(c, 0, int(i), lab) for i, c in zip(lab.features["label"], lab.features["confidence"])]
                  + [(c, 1, int(i), second) for i, c in zip(f["label"], f["confidence"]) if i != 2],
                  key=lambda t: t[:3])
    label = widget.review_next()
    assert (widget.labels_layer, label) == (left[0][3], left[0][2])
    assert widget.labels_layer.visible
    for lyr in (lab, second):  # all confirmed: nothing left in the slide
        for i in lyr.features["label"]:
            widget.labels_combo.set_layer(lyr)
            widget.set_type(int(i), lyr.features.set_index("label").loc[int(i), "cell_type"])
    assert widget.review_next() is None and "nothing left to review in the slide" in widget.status.text()


def test_the_slide_count_is_exported_with_every_fields_cells(qtbot, cls, disc_smear, tmp_path):
    viewer, widget, lab = cls
    run(qtbot, widget)
    _second_field(viewer, disc_smear, ["eosinophil"] * 4)
    widget.labels_combo.set_layer(lab)
    widget.set_slide_scope(True)
    written = widget.export_csv(tmp_path / "slide.csv")
    assert [p.name for p in written] == ["slide.csv", "slide_counts.csv"]
    cells = pd.read_csv(written[0])
    assert cells["image"].tolist() == ["smear"] * 4 + ["smear2"] * 4  # each cell named by its smear
    assert cells["label"].tolist() == [1, 2, 3, 4] * 2
    counts = pd.read_csv(written[1]).set_index("cell_type")
    assert set(counts["image"]) == {"slide (2 fields)"}
    assert counts.loc["total", "count"] == 8 and counts.loc["total", "percent"] == 100.0
    assert counts.loc["eosinophil", "count"] == 4 + int((lab.features["cell_type"] == "eosinophil").sum())
    viewer.layers.remove("smear2 WBC labels")
    viewer.layers.remove(lab)
    with pytest.raises(ValueError, match="no segmented labels layer"):
        widget.export_csv(tmp_path / "none.csv")


def test_segment_then_classify_in_one_click(qtbot, make_napari_viewer, tiny_segmenter, tiny_classifier, disc_smear):
    viewer = make_napari_viewer()
    viewer.add_image(disc_smear[0], name="smear", rgb=True)
    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment WBCs")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Classify WBCs")
    widget.model_combo.add_model(tiny_classifier, select=True)
    seg.add_model(tiny_segmenter)
    seg.device_combo.set_device("cpu")
    seg.set_diameter(16)
    seg.classify_check.setChecked(True)
    seg.segment()
    qtbot.waitUntil(lambda: not seg.running, timeout=TIMEOUT)
    lab = viewer.layers["smear WBC labels"]
    assert widget.labels_layer is lab
    if len(lab.features):  # a random network may find no cell; when it does, they are typed
        assert lab.features["cell_type"].notna().all()
        assert len(viewer.layers["smear WBC labels types"].data) == len(lab.features)


def test_review_goes_from_least_confident_and_skips_confirmed(qtbot, cls):
    viewer, widget, lab = cls
    assert widget.review_next() is None  # nothing classified yet
    run(qtbot, widget)
    f = lab.features.copy()
    f["confidence"] = f["label"].map({1: 0.9, 2: 0.3, 3: 0.6, 4: 0.45}).astype(np.float32)
    lab.features = f
    assert widget.review_next() == 2
    assert widget.cell_spin.value() == 2
    centre = lab.features.set_index("label").loc[2, ["centroid-0", "centroid-1"]].to_numpy(float) * 0.5
    np.testing.assert_allclose(viewer.camera.center[-2:], centre)
    box = lab.features.set_index("label").loc[2, ["bbox-0", "bbox-1", "bbox-2", "bbox-3"]].to_numpy(float) * 0.5
    extent = max(box[2] - box[0], box[3] - box[1])
    assert viewer.camera.zoom * extent >= 249  # the cell shown large enough to judge
    viewer.camera.zoom = 1000.0
    widget.review_next()
    assert viewer.camera.zoom == 1000.0  # never zooms out
    widget.set_type_button.click()  # confirms the type shown
    row = lab.features.set_index("label").loc[2]
    assert bool(row["corrected"]) and row["confidence"] == 1.0
    assert row["cell_type"] == f.set_index("label").loc[2, "cell_type"]
    assert widget.review_next() == 4
    widget.review_button.click()
    assert widget.cell_spin.value() == 4
    for label in (4, 3, 1):
        assert widget.review_next() == label
        widget.set_type_button.click()
    assert widget.review_next() is None
    assert "nothing left to review" in widget.status.text()


def test_renamed_labels_layer_keeps_one_types_layer(qtbot, cls):
    """After the labels layer is renamed, a type correction updates its own points layer (renamed to
    match) instead of adding a second one and leaving the first stale."""
    from napari.layers import Points

    viewer, widget, lab = cls
    run(qtbot, widget)
    lab.name = "patient A"
    widget.cell_spin.setValue(2)
    new_type = next(c for c in CLASSES if c != lab.features.set_index("label").loc[2, "cell_type"])
    widget.type_combo.setCurrentText(new_type)
    widget.set_type_button.click()
    points = [lyr for lyr in viewer.layers if isinstance(lyr, Points)]
    assert [p.name for p in points] == ["patient A types"]
    assert points[0].text.values[1] == new_type


@pytest.mark.parametrize("typed_before", [False, True])
def test_cells_changed_while_classifying_get_their_own_types(qtbot, cls, typed_before):
    """Labels replaced while a run classifies the old ones (e.g. segmented again): the old run's
    results must not land on the new cells; the changed cells are typed again (also when an
    earlier run typed them: its types belong to the old outlines)."""
    import napari_wbc

    viewer, widget, lab = cls
    if typed_before:
        run(qtbot, widget)
    old = np.array(lab.data, copy=True)
    new = np.zeros_like(old)
    new[old == 1], new[old == 2], new[old == 3], new[old == 4] = 2, 1, 4, 3  # same outlines, ids shuffled
    new[40:50, 2:12] = 5  # and one more cell
    assert widget.classify() is not None
    lab.data = new  # before the run's result reaches the GUI thread
    qtbot.waitUntil(lambda: not widget.running and lab.features.get("cell_type") is not None
                    and lab.features["cell_type"].notna().sum() == 5, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    fresh = napari_wbc.classify(viewer.layers["smear"].data, new, model=widget.model_combo.model_path(), device="cpu")
    got = lab.features.set_index("label")
    for _, row in fresh.iterrows():
        assert got.loc[row["label"], "cell_type"] == row["cell_type"]
        assert abs(got.loc[row["label"], "confidence"] - row["confidence"]) < 1e-4


def test_edits_are_measured_off_the_gui_thread_and_overtaken_results_dropped(qtbot, cls, monkeypatch):
    """The labels are hashed and measured in a thread; a measurement that later edits overtook is
    dropped (then done again), and a type corrected meanwhile is kept."""
    import threading

    import napari_wbc._widgets.classify as mod

    viewer, widget, lab = cls
    run(qtbot, widget)
    gate, threads = threading.Event(), []
    real = mod._sync_job

    def slow(*args):
        threads.append(threading.current_thread())
        gate.wait(10)
        return real(*args)

    monkeypatch.setattr(mod, "_sync_job", slow)
    yy, xx = np.mgrid[:64, :64]
    lab.data_setitem(np.nonzero((yy - 31) ** 2 + (xx - 31) ** 2 <= 16), 7)
    qtbot.waitUntil(lambda: widget.syncing, timeout=TIMEOUT)  # measuring cell 7's edit, held at the gate
    new_type = next(c for c in CLASSES if c != lab.features.set_index("label").loc[2, "cell_type"])
    widget.set_type(2, new_type)  # a correction while it measures
    lab.data_setitem(np.nonzero((yy - 56) ** 2 + (xx - 8) ** 2 <= 9), 8)  # an edit that overtakes it
    gate.set()
    qtbot.waitUntil(lambda: {7, 8} <= set(lab.features["label"]) and not widget.running and not widget.syncing
                    and lab.features["cell_type"].notna().all(), timeout=TIMEOUT)
    assert threads and all(t is not threading.main_thread() for t in threads)
    row = lab.features.set_index("label").loc[2]
    assert row["cell_type"] == new_type and bool(row["corrected"])
    assert sorted(lab.features["label"]) == [1, 2, 3, 4, 7, 8]
    np.testing.assert_array_equal(lab.features.set_index("label").loc[8, "area"], (lab.data == 8).sum())
    assert len(types_layer(viewer).data) == 6


def test_table_follows_edits_made_before_the_widget_opened_and_export_is_current(qtbot, make_napari_viewer,
                                                                                tiny_classifier, disc_smear, tmp_path):
    from napari_wbc._widgets.segment import cell_features

    viewer = make_napari_viewer()
    image, labels = disc_smear
    viewer.add_image(image, name="smear", rgb=True)
    lab = viewer.add_labels(labels, name="smear WBC labels", features=cell_features(labels),
                            metadata={"napari_wbc": {"image_layer": "smear"}})
    lab.fill((14, 14), 0)  # erase cell 1 and paint cell 9 with no Classify widget open
    lab.data_setitem(np.nonzero(np.pad(np.ones((5, 5), bool), ((40, 19), (2, 57)))), 9)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Classify WBCs")
    qtbot.waitUntil(lambda: widget.total_label.text() == "total WBCs: 4" and not widget.syncing, timeout=TIMEOUT)
    assert sorted(lab.features["label"]) == [2, 3, 4, 9]
    lab.data_setitem(np.nonzero(np.pad(np.ones((4, 4), bool), ((58, 2), (58, 2)))), 10)
    written = widget.export_csv(tmp_path / "cells.csv")  # at once: before the widget has measured the edit
    assert sorted(pd.read_csv(written[0])["label"]) == [2, 3, 4, 9, 10]
    counts = pd.read_csv(written[1]).set_index("cell_type")
    assert counts.loc["total", "count"] == 5  # none typed: no percent is 100
    assert counts.loc["unclassified", "count"] == 5 and counts.loc["total typed", "count"] == 0
    assert counts["percent"].isna().all()  # not 0.0 % of each type (the CLI leaves them empty too)


def test_set_type_with_no_cell_chosen_says_how_to_choose_one(cls):
    viewer, widget, lab = cls
    with pytest.raises(ValueError, match="no cell chosen: click a cell"):
        widget.set_type(0, "lymphocyte")


def test_the_three_docks_fit_a_1000_px_screen(make_napari_viewer):
    """Classify alone needed 606 px and the three docks stacked 1243 px: napari's window grew past a
    1000 px screen, hiding Train's status line. Each dock now scrolls when it is short."""
    viewer = make_napari_viewer()
    heights = []
    for name in ("Segment WBCs", "Classify WBCs", "Train from corrections"):
        _, w = viewer.window.add_plugin_dock_widget("napari-wbc", name)
        heights.append(w.minimumSizeHint().height())
    assert sum(heights) <= 800, heights


def test_other_is_set_by_hand_and_counted_apart(qtbot, cls, tmp_path):
    """'other' (smudge cells, blasts...) is offered in 'Set type', never predicted, shown and exported
    on its own row, and left out of the five types' percentages; the total says how many."""
    viewer, widget, lab = cls
    run(qtbot, widget)
    assert [widget.type_combo.itemText(i) for i in range(widget.type_combo.count())] == [*CLASSES, "other"]
    widget.cell_spin.setValue(2)
    widget.type_combo.setCurrentText("other")
    widget.set_type_button.click()
    row = lab.features.set_index("label").loc[2]
    assert row["cell_type"] == "other" and bool(row["corrected"])
    assert types_layer(viewer).text.values[1] == "other"
    assert shown_counts(widget)["other"] == 1 and sum(shown_counts(widget)[c] for c in CLASSES) == 3
    assert widget.total_label.text() == "total WBCs: 4 (1 other, not in the percentages)"
    counts = widget.counts().set_index("cell_type")
    assert counts.loc[CLASSES, "percent"].sum() == pytest.approx(100.0, abs=0.2)  # of the 3 typed WBCs
    assert np.isnan(counts.loc["other", "percent"])
    widget.pick_cell(2)
    assert widget.type_combo.currentText() == "other" and "other" in widget.cell_info.text()
    counts = pd.read_csv(widget.export_csv(tmp_path / "cells.csv")[1]).set_index("cell_type")
    assert counts.loc["other", "count"] == 1 and np.isnan(counts.loc["other", "percent"])
    assert counts.loc["total typed", "count"] == 3 and counts.loc["total typed", "percent"] == 100.0
    assert counts.loc["total", "count"] == 4 and np.isnan(counts.loc["total", "percent"])
    assert pd.read_csv(tmp_path / "cells.csv").set_index("label").loc[2, "cell_type"] == "other"
    run(qtbot, widget)  # classified again: the hand-set "other" stays
    assert lab.features.set_index("label").loc[2, "cell_type"] == "other"


def test_undo_restores_the_type_and_the_corrected_mark(qtbot, cls):
    viewer, widget, lab = cls
    run(qtbot, widget)
    assert not widget.undo_button.isEnabled()
    before = lab.features.set_index("label")[["cell_type", "confidence", "corrected"]].copy()
    counts_before = shown_counts(widget)
    t2 = before.loc[2, "cell_type"]
    widget.set_type(2, next(c for c in CLASSES if c != t2))
    widget.set_type(3, "other")
    widget.set_type(3, "basophil")  # a second change of one cell
    assert widget.undo_button.isEnabled()
    widget.undo_button.click()
    assert lab.features.set_index("label").loc[3, "cell_type"] == "other"
    assert bool(lab.features.set_index("label").loc[3, "corrected"])
    assert widget.undo_type() == 3 and widget.undo_type() == 2
    after = lab.features.set_index("label")[["cell_type", "confidence", "corrected"]]
    pd.testing.assert_frame_equal(after, before)
    assert list(types_layer(viewer).text.values) == list(before["cell_type"])
    assert shown_counts(widget) == counts_before
    assert not widget.undo_button.isEnabled() and widget.undo_type() is None
    assert "nothing to undo" in widget.status.text()
    assert widget.next_to_review() is not None  # unconfirmed again: offered for review


def test_undo_of_an_erased_cell_says_so_and_a_layer_keeps_its_own_undo(qtbot, cls):
    viewer, widget, lab = cls
    run(qtbot, widget)
    widget.set_type(1, "other")
    other = viewer.add_labels(np.array(lab.data), name="copy", features=lab.features.copy())
    widget.labels_combo.set_layer(other)
    assert widget.labels_layer is other and not widget.undo_button.isEnabled()
    widget.labels_combo.set_layer(lab)
    assert widget.undo_button.isEnabled()
    lab.fill((14, 14), 0)  # cell 1 erased
    qtbot.waitUntil(lambda: 1 not in set(lab.features["label"]), timeout=TIMEOUT)
    assert widget.undo_type() is None and "cell 1 is no longer in" in widget.status.text()
    assert not widget.undo_button.isEnabled()


def test_an_undone_type_correction_unticks_the_layer_in_train(qtbot, make_napari_viewer, tiny_classifier, disc_smear):
    """Train ticks a segmentation whose types were set by hand; when every one is undone it is as the
    segmenter made it again, and not ticked (as before the correction)."""
    from napari_wbc._widgets._common import data_hash
    from napari_wbc._widgets.segment import cell_features

    viewer = make_napari_viewer()
    image, labels = disc_smear
    viewer.add_image(image, name="smear", rgb=True)
    lab = viewer.add_labels(labels, name="smear WBC labels", features=cell_features(labels),
                            metadata={"napari_wbc": {"image_layer": "smear", "data_hash": data_hash(labels)}})
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train from corrections")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Classify WBCs")
    widget.model_combo.add_model(tiny_classifier, select=True)
    widget.device_combo.set_device("cpu")
    run(qtbot, widget)
    assert train.pairs() == []  # as segmented: not ticked
    widget.set_type(2, "other")
    widget.set_type(3, "lymphocyte")
    assert [p[0] for p in train.pairs()] == [lab]
    widget.undo_type()
    assert [p[0] for p in train.pairs()] == [lab]  # one correction left
    widget.undo_type()
    assert train.pairs() == []
    widget.set_type(2, "monocyte")
    assert [p[0] for p in train.pairs()] == [lab]
    lab.paint((2, 2), 9)  # painted: a correction no type undo takes back
    widget.undo_type()
    assert [p[0] for p in train.pairs()] == [lab]


def test_undo_does_not_type_a_cell_of_a_new_segmentation(qtbot, cls):
    """Segmented again into the same layer (data and features replaced): label 2 is another cell now,
    never typed. Undo does not give it the old cell's type, and says why (found by a review)."""
    from napari_wbc._widgets.segment import cell_features

    viewer, widget, lab = cls
    run(qtbot, widget)
    widget.set_type(2, "other")
    new = np.zeros_like(lab.data)
    new[2:10, 2:10], new[20:30, 20:30] = 1, 2  # a new segmentation, untyped
    lab.data = new
    lab.features = cell_features(new)
    assert widget.undo_type() is None
    row = lab.features.set_index("label").loc[2]
    assert not isinstance(row.get("cell_type"), str)
    assert "changed since" in widget.status.text()


def test_adapt_to_the_open_smears_makes_and_chooses_a_new_classifier(qtbot, cls, tiny_classifier, monkeypatch,
                                                                     user_models):
    """Every segmented smear in the viewer gives its cells; the new file is chosen; the base is untouched."""
    from napari_wbc.core import adapt

    viewer, widget, lab = cls
    image, labels = viewer.layers["smear"].data, lab.data
    viewer.add_image(image[::-1].copy(), name="second", rgb=True)
    viewer.add_labels(labels[::-1].copy(), name="second WBC labels", metadata={"napari_wbc": {"image_layer": "second"}})
    assert [(a.name, b.name) for a, b in widget._adapt_pairs()] == [("smear WBC labels", "smear"),
                                                                     ("second WBC labels", "second")]
    before = tiny_classifier.read_bytes()
    monkeypatch.setattr(adapt, "MIN_CELLS", 50)
    assert widget.adapt() is not None  # 8 cells: refused with the count, nothing written
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert widget.status.text() == "failed" and not list(user_models.glob("*.safetensors"))
    monkeypatch.setattr(adapt, "MIN_CELLS", 8)
    assert widget.adapt() is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    made = list(user_models.glob("wbc_classifier_adapted*.safetensors"))
    assert len(made) == 1 and widget.model_combo.model_path() == made[0]
    assert "adapted on 8 cells of 2 smear(s)" in widget.status.text()
    assert tiny_classifier.read_bytes() == before
    run(qtbot, widget)  # the adapted classifier types the cells (of the newest labels layer, now followed)
    typed = widget.labels_layer.features
    assert widget.labels_layer.name == "second WBC labels"
    assert set(typed["cell_type"]) <= set(CLASSES) and len(typed) == 4


def test_adapt_cancel_writes_nothing(qtbot, cls, monkeypatch, user_models):
    from napari_wbc.core import adapt

    viewer, widget, lab = cls
    monkeypatch.setattr(adapt, "MIN_CELLS", 4)
    widget._adapt_stop.set()  # (a stale flag from before is not what stops the run: each run has its own)
    started = []
    real = adapt.adapted_network

    def slow(*a, **kw):  # cancel while the statistics are re-estimated
        started.append(1)
        widget.cancel()
        return real(*a, **kw)

    monkeypatch.setattr(adapt, "adapted_network", slow)
    assert widget.adapt() is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert started and widget.status.text() == "cancelled; no model was written"
    assert not list(user_models.glob("*.safetensors"))
    assert widget.buttons.run.isEnabled() and widget.adapt_button.isEnabled()
