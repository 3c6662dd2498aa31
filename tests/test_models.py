"""Model files: saving never replaces, broken cards are clear errors, the cache sees replaced files."""
from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image
import pytest

from napari_wbc.core import models as M
from napari_wbc.core.testing import make_tiny_classifier, make_tiny_segmenter


@pytest.fixture
def tiny(tmp_path):
    return make_tiny_segmenter(tmp_path / "seg.safetensors", target_diameter=16)


def _net_and_card(path):
    net, card = M.load_model(path, "segmenter", "cpu")
    return M.build_network(card["arch"]), card


def test_a_name_taken_while_saving_is_never_replaced(tiny, tmp_path, monkeypatch):
    """Two runs saving to one name at once: the second fails (or, with unique, takes name_2) and the
    first run's files stay whole; nothing is left half written."""
    net, card = _net_and_card(tiny)
    target = tmp_path / "run.safetensors"
    real = M._temp_file
    raced = []

    def racing(path, data):  # another run publishes the same name between our check and our write
        if path == target and not raced:
            raced.append(True)
            M.save_model(net, {**card, "name": "other run"}, target)
        return real(path, data)

    monkeypatch.setattr(M, "_temp_file", racing)
    with pytest.raises(FileExistsError):
        M.save_model(net, {**card, "name": "this run"}, target)
    assert json.loads(M.card_path(target).read_text())["name"] == "other run"
    target.unlink()
    M.card_path(target).unlink()
    raced.clear()
    got = M.save_model(net, {**card, "name": "this run"}, target, unique=True)
    assert got == tmp_path / "run_2.safetensors"
    assert json.loads(M.card_path(got).read_text())["name"] == "this run"
    assert json.loads(M.card_path(target).read_text())["name"] == "other run"
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_a_failed_save_leaves_no_card_alone(tiny, tmp_path, monkeypatch):
    net, card = _net_and_card(tiny)
    real = M._publish_new

    def fail_weights(tmp, path):
        if path.suffix == ".safetensors":
            raise OSError("disk full")
        return real(tmp, path)

    monkeypatch.setattr(M, "_publish_new", fail_weights)
    with pytest.raises(OSError, match="disk full"):
        M.save_model(net, card, tmp_path / "a.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.json", "seg.safetensors"]


def test_dotted_names_keep_their_dots(tiny, tmp_path):
    net, card = _net_and_card(tiny)
    assert M.save_model(net, card, tmp_path / "my model v1.2").name == "my model v1.2.safetensors"
    assert (tmp_path / "my model v1.2.json").is_file()
    assert M.model_file(tmp_path / "y.json") == tmp_path / "y.safetensors"


@pytest.mark.parametrize("text", ["null", "5", '"kind arch"', '["kind", "arch"]', '{"kind": "segmenter", "arch": "Unet"}',
                                  '{"kind": "detector", "arch": {"name": "Unet"}}'])
def test_cards_that_are_not_model_cards_are_value_errors(tiny, text):
    M.card_path(tiny).write_text(text)
    with pytest.raises(ValueError, match="seg.json"):
        M.read_card(tiny)


def test_an_architecture_that_cannot_be_built_names_the_file(tiny):
    card = json.loads(M.card_path(tiny).read_text())
    card["arch"]["encoder_name"] = "no-such-encoder"
    M.card_path(tiny).write_text(json.dumps(card))
    M.clear_cache()
    with pytest.raises(ValueError, match=r"seg\.safetensors.*architecture cannot be built"):
        M.load_model(tiny, "segmenter", "cpu")


def test_a_bad_file_in_the_user_folder_hides_no_other_model(tmp_path, monkeypatch):
    from napari_wbc.core import finetune as F

    monkeypatch.setattr(F, "user_models_dir", lambda: tmp_path)
    good = make_tiny_segmenter(tmp_path / "good.safetensors")
    bad = make_tiny_segmenter(tmp_path / "bad.safetensors")
    M.card_path(bad).write_text("null")
    os.symlink(tmp_path / "gone.safetensors", tmp_path / "dangling.safetensors")
    assert F.list_user_models("segmenter") == [good]


def test_the_cache_sees_a_replaced_file_even_with_the_old_time(tmp_path):
    a = make_tiny_segmenter(tmp_path / "a.safetensors", target_diameter=16)
    net1, _ = M.load_model(a, "segmenter", "cpu")
    st = a.stat()
    b = make_tiny_segmenter(tmp_path / "b.safetensors", target_diameter=16, seed=1)
    os.replace(b, a)  # new weights (and their card) under the old name, the old time put back (cp -p, rsync -t)
    os.replace(M.card_path(b), M.card_path(a))
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    net2, _ = M.load_model(a, "segmenter", "cpu")
    assert net2 is not net1
    card = json.loads(M.card_path(a).read_text())
    card["target_diameter"] = 20  # only the card edited
    M.card_path(a).write_text(json.dumps(card))
    assert M.load_model(a, "segmenter", "cpu")[1]["target_diameter"] == 20


def test_weights_swapped_or_damaged_are_found_at_load(tmp_path):
    a = make_tiny_segmenter(tmp_path / "a.safetensors", target_diameter=16)
    b = make_tiny_segmenter(tmp_path / "b.safetensors", target_diameter=16, seed=1)
    assert len(json.loads(M.card_path(a).read_text())["weights_sha256"]) == 64
    os.replace(b, a)  # another model's weights (same network) under a's card: loaded silently before
    with pytest.raises(ValueError, match=r"a\.safetensors.*does not hold the weights its card 'a\.json'"):
        M.load_model(a, "segmenter", "cpu")
    with pytest.raises(ValueError, match="does not hold the weights"):
        M.read_weights(a)  # what fine-tuning starts from
    card = json.loads(M.card_path(a).read_text())
    del card["weights_sha256"]  # a card written before the check: loads as it did
    M.card_path(a).write_text(json.dumps(card))
    M.load_model(a, "segmenter", "cpu")


def test_fine_tuning_refuses_a_base_whose_weights_are_not_its_own(tmp_path):
    from napari_wbc import finetune

    a = make_tiny_segmenter(tmp_path / "a.safetensors", target_diameter=16)
    b = make_tiny_segmenter(tmp_path / "b.safetensors", target_diameter=16, seed=1)
    os.replace(b, a)
    img = np.full((48, 48, 3), 230, np.uint8)
    lab = np.zeros((48, 48), np.int32)
    lab[10:26, 10:26] = 1
    img[lab > 0] = (120, 60, 160)
    with pytest.raises(ValueError, match="does not hold the weights"):
        finetune([img], [lab], base=a, output=tmp_path / "out.safetensors", epochs=1, device="cpu")
    assert not (tmp_path / "out.safetensors").exists()


def test_every_shipped_card_holds_its_weights_checksum():
    import hashlib

    shipped = sorted(M.Path(M.SHIPPED["segmenter"]).parent.glob("*.safetensors"))
    if not shipped:
        pytest.skip("shipped models not installed")
    for w in shipped:
        card = json.loads(M.card_path(w).read_text())
        assert card["weights_sha256"] == hashlib.sha256(w.read_bytes()).hexdigest(), w.name


def test_shipped_names_of_the_other_kind_say_so():
    if not M.SHIPPED["segmenter"].exists():
        pytest.skip("shipped models not installed")
    with pytest.raises(ValueError, match="'wbc_unet' is the shipped segmenter; expected a classifier"):
        M.resolve_model_path("wbc_unet", "classifier")
    assert M.resolve_model_path(M.Path("wbc_unet"), "segmenter") == M.SHIPPED["segmenter"]


def test_classify_checks_the_model_even_without_cells(tiny):
    import napari_wbc

    with pytest.raises(ValueError, match="is a segmenter, expected a classifier"):
        napari_wbc.classify(np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20), np.int32), model=tiny, device="cpu")
    cls = make_tiny_classifier(tiny.with_name("cls.safetensors"))
    assert len(napari_wbc.classify(np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20), np.int32), model=cls,
                                   device="cpu")) == 0


def test_a_card_setting_that_is_not_a_number_is_found_at_load(tiny, capsys):
    """Found once, at load (the CLI: exit 2 before any image), not as a failure on every image."""
    from napari_wbc.cli import main

    card = json.loads(M.card_path(tiny).read_text())
    card["target_diameter"] = "big"
    M.card_path(tiny).write_text(json.dumps(card))
    M.clear_cache()
    with pytest.raises(ValueError, match="'target_diameter' must be a number"):
        M.load_model(tiny, "segmenter", "cpu")
    assert main(["demo", "--device", "cpu", "--model", str(tiny)]) == 2
    assert "target_diameter" in capsys.readouterr().err
    inp = tiny.parent / "in"
    inp.mkdir()
    for i in range(2):
        PIL.Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(inp / f"x{i}.png")
    assert main(["segment", str(inp), "--out", str(tiny.parent / "out"), "--model", str(tiny), "--no-classify",
                 "--device", "cpu", "--quiet"]) == 2
    assert not (tiny.parent / "out").exists() or not list((tiny.parent / "out").glob("*.done"))


def test_forward_passes_and_graph_tracing_in_other_threads_do_not_collide(tiny):
    """torch.fx (batch-norm folding at model load) replaces torch.nn.Module.__call__ process-wide while
    it traces: a widget's background model load made a training or segmentation in another thread fail
    with "module is not installed as a submodule"."""
    import threading

    import torch

    from napari_wbc.core.segment import _forward

    net = M.build_network(json.loads(M.card_path(tiny).read_text())["arch"]).eval()
    arr = np.random.default_rng(0).random((1, 3, 64, 64)).astype(np.float32)
    errors, stop = [], threading.Event()

    def run_forwards():
        try:
            while not stop.is_set():
                _forward(net, arr, torch.device("cpu"), torch.float32, None)
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    t = threading.Thread(target=run_forwards)
    t.start()
    try:
        for _ in range(8):
            M.inference_network(net)
    finally:
        stop.set()
        t.join()
    assert not errors, errors


def test_a_dangling_link_counts_as_an_existing_model_file(tmp_path):
    """An --out that is a dangling symlink passed the start-up checks and failed only after training
    ('written meanwhile'), the trained weights lost."""
    import os

    from napari_wbc.core.models import existing_model_file

    link = tmp_path / "dang.safetensors"
    os.symlink(tmp_path / "nowhere.safetensors", link)
    assert existing_model_file(link) == link
