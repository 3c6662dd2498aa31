"""Train from corrections widget, opened through the manifest, fine-tuning a tiny random model on a disc image."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

PLUGIN = "napari-wbc"
TIMEOUT = 60_000  # a few seconds alone; generous for a busy machine


@pytest.fixture
def quick_finetune(monkeypatch):
    """Epochs of 2 steps of 2 crops, and no hold-out (a random net cannot beat another on it)."""
    import napari_wbc.core.finetune as ft

    monkeypatch.setattr(ft, "STEPS_PER_EPOCH", 2)
    monkeypatch.setattr(ft, "BATCH_SIZE", 2)
    monkeypatch.setattr(ft, "_split_holdout", lambda samples, rng: (samples, []))


@pytest.fixture
def tr(make_napari_viewer, tiny_segmenter, disc_smear, user_models, quick_finetune, monkeypatch):
    """``(viewer, train_widget, segment_widget, labels_layer, messages)``."""
    import napari_wbc._widgets.train as train_mod

    messages = []
    for name in ("show_info", "show_warning", "show_error"):
        monkeypatch.setattr(train_mod, name, lambda msg, name=name: messages.append((name, msg)))
    viewer = make_napari_viewer()
    image, labels = disc_smear
    viewer.add_image(image, name="smear", rgb=True)
    lab = viewer.add_labels(labels, name="smear WBC labels", metadata={"napari_wbc": {"image_layer": "smear"}})
    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment WBCs")
    seg.add_model(tiny_segmenter)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Train from corrections")
    widget.device_combo.set_device("cpu")
    return viewer, widget, seg, lab, messages


def test_pairs_follow_layers(tr):
    viewer, widget, seg, lab, _ = tr
    assert widget.model_combo.model_path() == seg.model_combo.model_path()  # starts from Segment's model
    assert widget.pairs() == [(lab, viewer.layers["smear"])]  # paired through the metadata
    other = viewer.add_labels(np.zeros((64, 64), np.int32), name="hand made")
    assert [p[0] for p in widget.pairs()] == [lab]  # not ticked by default
    widget.set_pair(other, "smear")
    assert widget.pairs() == [(lab, viewer.layers["smear"]), (other, viewer.layers["smear"])]
    assert widget.pairs_table.rowCount() == 2
    viewer.layers.remove(other)
    assert widget.pairs_table.rowCount() == 1


def test_train_adds_model_to_segment(qtbot, tr, user_models):
    viewer, widget, seg, lab, messages = tr
    widget.auto_epochs.setChecked(False)
    widget.epochs.setValue(1)
    widget.train()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    models = list(user_models.glob("*.safetensors"))
    assert len(models) == 1 and models[0].with_suffix(".json").exists()
    assert seg.model_combo.model_path() == models[0]  # added to Segment and selected
    assert ("show_info", f"Train: new model {models[0].name} (no held-out cells to validate on)") in messages
    assert "epoch" not in widget.progress.format()  # reset when done
    assert widget.buttons.run.isEnabled()


def test_no_improvement_keeps_base(qtbot, tr, monkeypatch):
    import napari_wbc.core.finetune as ft

    viewer, widget, seg, lab, messages = tr
    base = widget.model_combo.model_path()
    def no_better(images, labels, base=None, **kw):  # warns as finetune does, and something else
        import warnings

        warnings.warn("fine-tuning did not improve on the base model; keeping the base model", ft.BaseKeptWarning)
        warnings.warn_explicit("an unrelated warning of the work", UserWarning,  # as from napari_wbc's code
                               os.path.join("site-packages", "napari_wbc", "core", "train.py"), 1)
        return Path(base)

    monkeypatch.setattr(ft, "finetune", no_better)
    widget.train()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: len(messages) >= 2, timeout=TIMEOUT)
    qtbot.wait(100)
    assert messages[-1][0] == "show_warning" and "no improvement" in messages[-1][1]
    warned = [m for kind, m in messages if kind == "show_warning"]
    assert "Train: an unrelated warning of the work" in warned  # the work's warnings reach the user
    assert sum("improve" in m for m in warned) == 1  # the outcome once, not also as the core's warning
    assert seg.model_combo.model_path() == base


def test_warnings_that_are_not_the_trainings_are_not_shown_as_its_own(qtbot, tr):
    from napari_wbc._widgets import train as train_mod

    viewer, widget, seg, lab, messages = tr
    ours = ("some finetune warning", UserWarning, os.path.join("x", "napari_wbc", "core", "finetune.py"), 1)
    napari_own = ("data shape exceeds GL_MAX_TEXTURE_SIZE", UserWarning, os.path.join("x", "napari", "layers.py"), 2)
    train_mod._show_work_warning(ours)
    train_mod._show_work_warning(napari_own)  # raised by napari in the GUI thread while training ran
    assert [m for kind, m in messages if kind == "show_warning"] == ["Train: some finetune warning"]


@pytest.mark.parametrize("how", ["cancel", "close the dock"])
def test_cancel_writes_nothing(qtbot, tr, user_models, how):
    """Cancel, or closing the dock (napari's remove_dock_widget un-parents the widget): training
    stops and nothing is written."""
    viewer, widget, seg, lab, messages = tr
    widget.auto_epochs.setChecked(False)
    widget.epochs.setValue(500)
    widget.train()
    qtbot.waitUntil(lambda: widget.progress.format().startswith("epoch"), timeout=TIMEOUT)
    assert not widget.buttons.run.isEnabled()
    if how == "cancel":
        widget.cancel()
    else:
        viewer.window.remove_dock_widget(widget)
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert ("show_info", "Train: cancelled, previous model kept") in messages
    assert not user_models.exists() or not any(user_models.iterdir())


def test_bad_pair_is_refused(tr):
    viewer, widget, seg, lab, messages = tr
    viewer.add_image(np.zeros((32, 32)), name="small")
    widget.set_pair(lab, "small")
    assert widget.train() is None
    assert messages[-1][0] == "show_error" and "differ in size" in messages[-1][1]


def test_progress_and_dice_message(qtbot, tr, user_models, monkeypatch):
    import json

    import napari_wbc.core.finetune as ft
    from napari_wbc.core.testing import make_tiny_segmenter

    viewer, widget, seg, lab, messages = tr

    def fake_finetune(images, labels, progress=None, **kwargs):
        progress(1, 2, {"loss": 0.5, "matched_dice": 0.7, "before_dice": 0.6, "tp": 1, "fn": 1})
        progress(3, 10, {"stage": "classifier", "holdout_accuracy": 0.75, "before_accuracy": 0.5})
        out = make_tiny_segmenter(user_models / "wbc_unet_ft_test.safetensors")
        card = json.loads(out.with_suffix(".json").read_text())
        card["finetune"] = {"holdout_before": {"matched_dice": 0.6, "tp": 1, "fn": 1}, "holdout_after": {"matched_dice": 0.7}}
        out.with_suffix(".json").write_text(json.dumps(card))
        return out

    monkeypatch.setattr(ft, "finetune", fake_finetune)
    shown = []
    widget._relay.progressed.connect(lambda *a: shown.append(widget.progress.format()))
    widget.train()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert shown == ["epoch 1/2 · loss 0.500 · val Dice 0.700 (before 0.600) on 2 held-out cells",
                     "classifier: epoch 3/10 · held-out accuracy 0.750 (before 0.500)"]
    assert messages[-1] == ("show_info", "Train: new model wbc_unet_ft_test.safetensors (validation Dice 0.600 -> 0.700 "
                                         "on 2 held-out cells: too few to tell)")
    assert seg.model_combo.model_path().name == "wbc_unet_ft_test.safetensors"
    assert seg.model_combo.currentText() == "yours: wbc_unet_ft_test"


def test_corrected_types_go_to_the_classifier(tr):
    """Cells whose type was corrected by hand are passed as cell_types (4 or more), others are not."""
    import pandas as pd

    viewer, widget, seg, lab, _ = tr
    ids = [int(i) for i in np.unique(lab.data) if i > 0]
    assert widget._corrected_types() is None  # no types at all
    n = len(ids)
    lab.features = pd.DataFrame({
        "index": ids, "label": ids, "cell_type": ["lymphocyte"] * n,
        "corrected": [True] * min(n, 4) + [False] * max(n - 4, 0),
    })
    got = widget._corrected_types()
    if n >= 4:
        assert got == [{i: "lymphocyte" for i in ids[:4]}]
    else:
        assert got is None
    data = lab.data.copy()
    data[data == ids[0]] = 0  # a corrected cell erased afterwards is not passed on (finetune would refuse it)
    got = widget._corrected_types([data])
    assert got is None or ids[0] not in got[0]


def test_present_finds_a_few_ids_in_a_layer():
    from napari_wbc.core.classifier_finetune import present_ids

    lab = np.zeros((3000, 3000), np.uint16)
    lab[5, 5], lab[2999, 2999] = 7, 300
    assert present_ids(lab, [7, 300, 9, 7]) == {7, 300}
    assert present_ids(lab.astype(np.int32), [1]) == set()


def test_a_classifier_trained_with_the_types_is_offered_in_classify(qtbot, tr, user_models, monkeypatch, tmp_path):
    import shutil

    import napari_wbc.core.classifier_finetune as cf
    from napari_wbc.core.testing import make_tiny_classifier

    viewer, widget, seg, lab, messages = tr
    tiny_cls = make_tiny_classifier(tmp_path / "c.safetensors")

    def fake_classifier(images, labels, cell_types, *, base, output, **kw):  # stands in for the training
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_cls, output)
        shutil.copy(tiny_cls.with_suffix(".json"), Path(output).with_suffix(".json"))
        return Path(output)

    monkeypatch.setattr(cf, "finetune_classifier", fake_classifier)
    ids = [int(i) for i in np.unique(lab.data) if i > 0]
    kinds = ["lymphocyte", "lymphocyte", "neutrophil", "monocyte"]  # enough to hold some out
    monkeypatch.setattr(widget, "_corrected_types", lambda labels=None, layers=None: [dict(zip(ids, kinds))])
    _, cls = viewer.window.add_plugin_dock_widget(PLUGIN, "Classify WBCs")
    widget.auto_epochs.setChecked(False)
    widget.epochs.setValue(1)
    widget.train()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert not [m for m in messages if m[0] == "show_error"], messages
    (new_cls,) = user_models.glob("*_classifier.safetensors")
    assert cls.model_combo.model_path() == new_cls  # offered in Classify and selected


def test_negative_labels_are_refused_before_training_with_the_layer_named(tr):
    viewer, widget, seg, lab, messages = tr
    bad = np.array(lab.data, dtype=np.int32)
    bad[:3, :3] = -1
    lab.data = bad
    assert widget.train() is None and not widget.running
    assert any(kind == "show_error" and "'smear WBC labels'" in msg and "ids >= 0" in msg for kind, msg in messages)


def test_types_too_few_to_check_are_not_learned_and_the_user_is_told(qtbot, tr, user_models, monkeypatch):
    viewer, widget, seg, lab, messages = tr
    ids = [int(i) for i in np.unique(lab.data) if i > 0]
    kinds = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]  # one of each: none can be held out
    monkeypatch.setattr(widget, "_corrected_types", lambda labels=None, layers=None: [dict(zip(ids, kinds))])
    widget.auto_epochs.setChecked(False)
    widget.epochs.setValue(1)
    widget.train()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert not [m for m in messages if m[0] == "show_error"], messages
    assert "the corrected types were not learned: too few corrected cells" in widget.status.text()
    assert not list(user_models.glob("*_classifier.safetensors"))


def test_labels_saved_and_opened_again_pair_with_their_own_image(tr, tmp_path):
    """Two smears of one size (one camera): labels saved with napari-wbc's writer and opened again were
    paired with whichever image came first; the writer records the image, the reader restores it, and
    a labels layer with nothing recorded is not guessed among several images of its size."""
    viewer, widget, seg, lab, messages = tr
    viewer.add_image(np.full((64, 64, 3), 230, np.uint8), name="another smear", rgb=True)
    viewer.layers.move(viewer.layers.index("another smear"), 0)  # listed first
    path = tmp_path / "corrected.tif"
    viewer.layers.selection.active = lab
    viewer.layers.save(str(path), selected=True, plugin="napari-wbc")
    viewer.layers.remove(lab)
    (reopened,) = viewer.open(str(path), plugin="napari-wbc")
    widget.set_pair(reopened)
    assert widget.pairs() == [(reopened, viewer.layers["smear"])]
    mine = viewer.add_labels(np.zeros((64, 64), np.uint16), name="drawn by hand")
    widget.set_pair(mine)
    assert (mine, None) in widget.pairs()  # two images of its size: the user picks


def test_only_corrected_segmentations_are_ticked(qtbot, tr, tiny_segmenter):
    """Every labels layer with an image was ticked: an untouched segmentation of another smear, or a
    second one of the image corrected in the first (which contradicts the corrections), trained too."""
    viewer, widget, seg, lab, _ = tr
    seg.set_diameter(16)
    seg.device_combo.set_device("cpu")
    seg.add_model(tiny_segmenter, select=True)
    lab.paint((2, 2), 9)  # the fixture's layer: corrected
    seg.segment()
    qtbot.waitUntil(lambda: not seg.running, timeout=TIMEOUT)
    fresh = viewer.layers["smear WBC labels [2]"]
    assert [p[0] for p in widget.pairs()] == [lab]  # the untouched one is listed, not ticked
    assert widget.pairs_table.rowCount() == 2
    fresh.paint((3, 3), int(fresh.data.max()) + 1)  # corrected now: ticked
    assert [p[0] for p in widget.pairs()] == [lab, fresh]
    widget.set_pair(fresh, use=False)  # the user's choice stands
    fresh.paint((4, 4), int(fresh.data.max()) + 1)
    assert [p[0] for p in widget.pairs()] == [lab]
    # a type corrected in Classify (no painting) is a correction too
    seg.segment()
    qtbot.waitUntil(lambda: not seg.running, timeout=TIMEOUT)
    third = viewer.layers["smear WBC labels [3]"]
    assert third not in [p[0] for p in widget.pairs()]
    ids = np.unique(third.data[third.data > 0])
    if len(ids):  # (a tiny random network may find no cell)
        f = third.features.copy()
        f["cell_type"], f["corrected"] = "lymphocyte", False
        third.features = f  # typed by the classifier: still not a correction
        assert third not in [p[0] for p in widget.pairs()]
        f.loc[0, "corrected"] = True
        third.features = f  # a type set by hand
        assert third in [p[0] for p in widget.pairs()]


def test_the_new_classifiers_held_out_figures_are_told(tmp_path):
    """'the classifier learned the corrected types' was said after a tie on one held-out cell."""
    import json

    from napari_wbc.core.finetune import holdout_text
    from napari_wbc.core.testing import make_tiny_classifier

    cls = make_tiny_classifier(tmp_path / "c.safetensors")
    card = json.loads(cls.with_suffix(".json").read_text())
    assert holdout_text(cls) == ""  # not fine-tuned: nothing to tell
    card["finetune"] = {"holdout_accuracy_before": 1.0, "holdout_accuracy_after": 1.0, "n_holdout": 1}
    cls.with_suffix(".json").write_text(json.dumps(card))
    assert holdout_text(cls) == " (held-out accuracy 1.00 -> 1.00 on 1 cell: too few to tell)"


def test_cells_typed_other_train_the_outlines_only_and_the_user_is_told(qtbot, tr, user_models, monkeypatch,
                                                                       tmp_path):
    """Cells set to "other" in Classify: the layer still trains (their outlines are white cells), they
    go to finetune, which leaves them out of the classifier's examples, and they do not count towards
    the 4 corrected cells the classifier needs."""
    import shutil

    import pandas as pd

    import napari_wbc.core.classifier_finetune as cf
    from napari_wbc.core.testing import make_tiny_classifier

    viewer, widget, seg, lab, messages = tr
    tiny_cls = make_tiny_classifier(tmp_path / "c.safetensors")
    passed = []

    def fake_classifier(images, labels, cell_types, *, base, output, **kw):  # stands in for the training
        passed.append(cell_types)
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_cls, output)
        shutil.copy(tiny_cls.with_suffix(".json"), Path(output).with_suffix(".json"))
        return Path(output)

    monkeypatch.setattr(cf, "finetune_classifier", fake_classifier)
    data = np.array(lab.data)
    data[50:56, 2:8], data[2:8, 50:56] = 5, 6  # two more cells
    lab.data = data
    ids = [int(i) for i in np.unique(data) if i > 0]
    assert len(ids) == 6
    kinds = ["lymphocyte", "other", "lymphocyte", "neutrophil", "other", "neutrophil"]
    lab.features = pd.DataFrame({"index": ids, "label": ids, "cell_type": kinds, "corrected": [True] * 6})
    assert widget._corrected_types() == [dict(zip(ids, kinds))]
    lab.features = pd.DataFrame({"index": ids, "label": ids, "cell_type": kinds[:4] + ["other", "other"],
                                 "corrected": [True] * 6})
    assert widget._corrected_types() is None  # 3 of the classifier's types: too few to learn from
    lab.features = pd.DataFrame({"index": ids, "label": ids, "cell_type": kinds, "corrected": [True] * 6})
    widget.auto_epochs.setChecked(False)
    widget.epochs.setValue(1)
    widget.train()
    assert "2 cells typed other trained the outlines only" in widget.status.text()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert not [m for m in messages if m[0] == "show_error"], messages
    assert passed == [[dict(zip(ids, kinds))]]
    assert "the classifier learned the corrected types" in widget.status.text()
    assert "(2 cells typed other trained the outlines only, not the classifier)" in widget.status.text()


def test_labels_emptied_by_hand_are_left_out_with_a_word_and_alone_are_refused(tr):
    """An emptied labels layer among others stopped training ('hold no cell'): now it is left out, the
    user told which; alone it is refused, named."""
    import pandas as pd

    viewer, widget, seg, lab, messages = tr
    ids = [int(i) for i in np.unique(lab.data) if i > 0]
    lab.features = pd.DataFrame({"index": ids, "label": ids, "cell_type": ["lymphocyte"] * len(ids),
                                 "corrected": [True] * len(ids)})
    empty = viewer.add_labels(np.zeros(lab.data.shape, np.int32), name="no WBC here")
    widget.set_pair(empty, "smear")
    images, labels, names, layers = widget._collect()
    assert names == ["smear WBC labels"] and len(images) == len(labels) == 1 and labels[0].any()
    assert layers == [lab]  # the corrected types go with the labels trained on, one mapping each
    types = widget._corrected_types(labels, layers)
    assert types is None if len(ids) < 4 else types == [{i: "lymphocyte" for i in ids}]
    assert messages[-1][0] == "show_warning" and "'no WBC here'" in messages[-1][1] and "left out" in messages[-1][1]
    widget.set_pair(lab, "smear", use=False)
    assert widget.train() is None and not widget.running
    assert messages[-1][0] == "show_error"
    assert "'no WBC here'" in messages[-1][1] and "hold no cell" in messages[-1][1]


def test_corrected_types_fine_tune_the_classifier_that_typed_them(qtbot, tr, monkeypatch, tmp_path):
    """auto: the classifier that typed the cells (an adapted one, say) is the one the corrected types
    fine-tune; one chosen in the list wins; unknown or several typers: finetune's default (the pair's)."""
    import napari_wbc.core.finetune as ft
    from napari_wbc._widgets.classify import note_classifier
    from napari_wbc.core.testing import make_tiny_classifier

    viewer, widget, seg, lab, messages = tr
    adapted = make_tiny_classifier(tmp_path / "wbc_classifier_adapted_x.safetensors")
    other = make_tiny_classifier(tmp_path / "other.safetensors")
    ids = [int(i) for i in np.unique(lab.data) if i > 0]
    kinds = ["lymphocyte", "lymphocyte", "neutrophil", "monocyte"]
    monkeypatch.setattr(widget, "_corrected_types", lambda labels=None, layers=None: [dict(zip(ids, kinds))])
    asked = []

    def fake_finetune(images, labels, base=None, classifier=None, **kw):
        asked.append(classifier)
        return Path(base)  # (no improvement: nothing written)

    monkeypatch.setattr(ft, "finetune", fake_finetune)

    def train():
        widget.train()
        qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)

    assert widget.classifier_combo.is_auto()  # the default
    train()  # nothing recorded on the layer
    assert asked[-1] is None
    note_classifier(lab, adapted)  # as Classify does when it types the layer
    train()
    assert asked[-1] == adapted
    assert lab.metadata["napari_wbc"]["image_layer"] == "smear"  # the rest of the metadata kept
    widget.classifier_combo.add_model(other, select=True)  # chosen by hand
    train()
    assert asked[-1] == other
    widget.classifier_combo.select_auto()
    adapted.unlink()  # gone since it typed them: the default again, not a missing file
    train()
    assert asked[-1] is None


def test_the_status_names_the_classifier_the_types_train(qtbot, tr, monkeypatch, tmp_path):
    import napari_wbc.core.finetune as ft
    from napari_wbc._widgets.classify import note_classifier
    from napari_wbc.core.testing import make_tiny_classifier

    viewer, widget, seg, lab, messages = tr
    adapted = make_tiny_classifier(tmp_path / "wbc_classifier_adapted_x.safetensors")
    ids = [int(i) for i in np.unique(lab.data) if i > 0]
    monkeypatch.setattr(widget, "_corrected_types", lambda labels=None, layers=None: [
        dict(zip(ids, ["lymphocyte", "lymphocyte", "neutrophil", "monocyte"]))])
    seen = []
    monkeypatch.setattr(ft, "finetune", lambda images, labels, base=None, **kw: seen.append(widget.status.text())
                        or Path(base))
    note_classifier(lab, adapted)
    widget.train()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert "the classifier 'wbc_classifier_adapted_x' (it typed them) on the corrected types" in seen[0]
    note_classifier(lab, None)  # nothing to note: the record stays
    assert lab.metadata["napari_wbc"]["classifier"] == str(adapted)


def test_the_types_train_list_keeps_auto_first_and_comes_back_to_it(tr, tmp_path, monkeypatch):
    from qtpy.QtWidgets import QFileDialog

    from napari_wbc._widgets._common import BROWSE
    from napari_wbc.core.testing import make_tiny_classifier

    viewer, widget, seg, lab, messages = tr
    combo = widget.classifier_combo
    texts = lambda: [combo.itemText(i) for i in range(combo.count())]  # noqa: E731
    assert texts()[0].startswith("auto") and texts()[-1] == BROWSE and combo.model_path() is None
    mine = make_tiny_classifier(tmp_path / "mine.safetensors")
    combo.add_model(mine, select=False)
    assert combo.is_auto() and texts()[0].startswith("auto") and "file: mine" in texts()
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: ("", ""))
    combo.setCurrentIndex(combo.count() - 1)
    combo.browse()  # "Browse..." then nothing chosen: back to auto
    assert combo.is_auto()
    combo.reload()
    assert combo.is_auto() and "file: mine" in texts()
    widget.model_combo.reload()  # the segmenter list has no auto item
    assert not widget.model_combo.is_auto() and widget.model_combo.model_path() is not None
