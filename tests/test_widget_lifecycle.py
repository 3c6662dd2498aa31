"""Widgets whose dock or viewer is closed: they stop working, raise nothing and are not 'the' widget."""
from __future__ import annotations

import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("user_models")

PLUGIN = "napari-wbc"
TIMEOUT = 10_000


@pytest.fixture
def slot_errors(monkeypatch):
    """Exceptions raised in Qt slots (PyQt hands them to sys.excepthook)."""
    errors = []
    monkeypatch.setattr(sys, "excepthook", lambda t, v, tb: errors.append(f"{t.__name__}: {v}"))
    return errors


def slowed(monkeypatch, module, name, n=30, delay=0.1):
    """Make ``module.name`` (a core generator) yield ``n`` slow progress steps first."""
    real = getattr(module, name)

    def slow(*args, **kwargs):
        for i in range(n):
            time.sleep(delay)
            yield ("progress", i, n)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(module, name, slow)


@pytest.fixture
def smear_viewer(make_napari_viewer, disc_smear):
    from napari_wbc.core.segment import cell_features

    viewer = make_napari_viewer()
    image, labels = disc_smear
    viewer.add_image(image, name="smear", rgb=True)
    lab = viewer.add_labels(labels.astype(np.uint16), name="smear WBC labels", features=cell_features(labels),
                            metadata={"napari_wbc": {"image_layer": "smear"}})
    return viewer, lab


def test_a_closed_classify_dock_lets_go_of_its_layer_and_is_not_the_classify_widget(qtbot, smear_viewer,
                                                                                   tiny_classifier):
    from napari_wbc._widgets._common import find_widgets
    from napari_wbc._widgets.classify import ClassifyWidget

    viewer, lab = smear_viewer
    _, old = viewer.window.add_plugin_dock_widget(PLUGIN, "Classify WBCs")
    old.model_combo.add_model(tiny_classifier, select=True)
    qtbot.waitUntil(lambda: not old.syncing, timeout=TIMEOUT)
    assert old._on_click in lab.mouse_drag_callbacks
    viewer.window.remove_dock_widget(old)  # the dock's close button
    # before: the click handler stayed on the layer (keeping the closed widget alive), and the closed
    # widget measured and typed every later edit, and was still 'the Classify widget' for Segment
    assert old.closed and old._on_click not in lab.mouse_drag_callbacks and old.labels_layer is None
    _, new = viewer.window.add_plugin_dock_widget(PLUGIN, "Classify WBCs")  # opened again: shipped model
    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment WBCs")
    assert find_widgets(viewer, ClassifyWidget) == [new]
    assert seg._classifier_choice() == new.model_combo.model_path() != tiny_classifier
    lab.data_setitem(np.nonzero(np.pad(np.ones((4, 4), bool), ((58, 2), (58, 2)))), 9)
    qtbot.wait(50)
    assert not old.syncing and not old._sync_timer.isActive()
    qtbot.waitUntil(lambda: 9 in set(lab.features["label"]) and not new.syncing, timeout=TIMEOUT)
    assert lab.mouse_drag_callbacks.count(new._on_click) == 1 and old._on_click not in lab.mouse_drag_callbacks
    # nor does it follow the layers for the slide count any more (it would keep counting, unseen)
    def followers(emitter):
        return [ref[0]() for ref in emitter.callbacks if isinstance(ref, tuple)]

    assert old not in followers(viewer.layers.events.inserted) and old not in followers(lab.events.features)
    assert new in followers(viewer.layers.events.inserted) and new in followers(lab.events.features)


def test_closing_the_viewer_while_classifying_raises_nothing_and_stops_the_work(qtbot, smear_viewer,
                                                                               tiny_classifier, monkeypatch,
                                                                               slot_errors):
    import napari_wbc.core.classify as core_classify

    viewer, lab = smear_viewer
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Classify WBCs")
    widget.model_combo.add_model(tiny_classifier, select=True)
    widget.device_combo.set_device("cpu")
    slowed(monkeypatch, core_classify, "iter_classify")
    worker = widget.classify()
    qtbot.waitUntil(lambda: widget.progress.value() >= 1, timeout=TIMEOUT)
    viewer.close()  # the app lives on (another viewer, a notebook, a script)
    qtbot.waitUntil(lambda: not worker.is_running, timeout=TIMEOUT)
    qtbot.wait(100)
    assert worker.abort_requested  # stopped at its next step, not run to the end for nobody
    assert slot_errors == []  # was: RuntimeError: wrapped C/C++ object of type QLabel has been deleted


def test_closing_the_viewer_while_segmenting_stops_the_work(qtbot, make_napari_viewer, disc_smear,
                                                           tiny_segmenter, monkeypatch, slot_errors):
    import napari_wbc.core.segment as core_segment

    viewer = make_napari_viewer()
    viewer.add_image(disc_smear[0], name="smear", rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment WBCs")
    widget.add_model(tiny_segmenter)
    widget.device_combo.set_device("cpu")
    slowed(monkeypatch, core_segment, "iter_segment")
    worker = widget.segment()
    qtbot.waitUntil(lambda: widget.progress.value() >= 1, timeout=TIMEOUT)
    t0 = time.perf_counter()
    viewer.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=TIMEOUT)
    assert worker.abort_requested and time.perf_counter() - t0 < 2.0  # the 30 steps take 3 s
    qtbot.wait(100)
    assert slot_errors == []


def test_the_menu_command_while_segmenting_says_so_and_keeps_the_picker(qtbot, make_napari_viewer, disc_smear,
                                                                       tiny_segmenter, monkeypatch):
    from napari._app_model import get_app_model
    from napari.utils.notifications import notification_manager

    import napari_wbc.core.segment as core_segment

    viewer = make_napari_viewer()
    a = viewer.add_image(disc_smear[0], name="a", rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment WBCs")
    widget.add_model(tiny_segmenter)
    widget.device_combo.set_device("cpu")
    widget.set_diameter(16)
    slowed(monkeypatch, core_segment, "iter_segment", n=10)
    widget.segment()
    b = viewer.add_image(disc_smear[0][::-1].copy(), name="b", rgb=True)  # selected
    widget.image_combo.set_layer(a)  # (the picker follows a new image by itself)
    messages = []
    notification_manager.notification_ready.connect(lambda n: messages.append(n.message))
    assert get_app_model().commands.execute_command("napari-wbc.segment_active").result() is None
    assert widget.image_combo.layer() is a and b is not None
    assert any("still segmenting 'a'" in m and "'b'" in m for m in messages)
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert [lyr.name for lyr in viewer.layers] == ["a", "b", "a WBC labels"]


@pytest.mark.parametrize("kind", ["function", "generator"])
def test_work_that_ends_after_napari_quit_ends_quietly(qapp, kind):
    """Quitting napari while a worker ran (a brush stroke's measuring, Segment's last stage) deleted the
    worker's signals object; reporting to it raised in the pool thread and Qt aborted the process."""
    from qtpy import API_NAME

    from napari_wbc._widgets._common import _quit_safe_workers

    if API_NAME.startswith("PyQt"):
        from qtpy import sip

        delete = sip.delete
    else:
        import shiboken6

        delete = shiboken6.delete

    def work():
        return 1

    def gen_work():
        yield 1
        return 2

    generator_cls, function_cls = _quit_safe_workers()
    worker = function_cls(work) if kind == "function" else generator_cls(gen_work)
    delete(worker.signals)  # as when the application is gone
    worker.run()  # the pool thread's call: raised RuntimeError (then Qt aborted), now returns
