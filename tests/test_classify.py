"""Cell typing (napari_wbc.core.classify) with tiny random networks on CPU."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_wbc.core import classify as C
from napari_wbc.core.models import SHIPPED


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from napari_wbc.core.testing import make_tiny_classifier

    return make_tiny_classifier(tmp_path_factory.mktemp("cls") / "tiny.safetensors")


def smear(h=48, w=56, dtype=np.uint8, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(150, 230, (h, w, 3)).astype(np.float64)
    img[10:22, 12:26] = (110, 60, 150)
    img = img / 255.0
    if channels == 4:
        img = np.concatenate([img, np.ones((h, w, 1))], -1)
    if channels == 1:
        img = img.mean(-1)
    if dtype == np.uint8:
        return np.round(img * 255).astype(np.uint8)
    if dtype == np.uint16:
        return np.round(img * 65535).astype(np.uint16)
    return img.astype(dtype)


def check_table(df, ids):
    assert list(df.columns[: len(C.COLUMNS)]) == C.COLUMNS
    assert df["label"].tolist() == sorted(ids)
    assert df["label"].dtype == np.int64
    assert df["cell_type"].isin(C.CLASSES).all()
    for c in ["confidence", *C.PROB_COLUMNS]:
        assert np.issubdtype(df[c].dtype, np.floating), c
    p = df[C.PROB_COLUMNS].to_numpy()
    assert np.allclose(p.sum(1), 1, atol=1e-4)
    assert ((p >= 0) & (p <= 1)).all()
    assert np.allclose(df["confidence"], p.max(1))
    assert (df["cell_type"].to_numpy() == np.array(C.CLASSES)[p.argmax(1)]).all()
    assert df.index.tolist() == list(range(len(ids)))


def test_classes_and_columns():
    assert C.CLASSES == ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
    assert C.COLUMNS == ["label", "cell_type", "confidence", "p_neutrophil", "p_lymphocyte", "p_monocyte",
                         "p_eosinophil", "p_basophil"]


def test_one_row_per_id_sorted_non_consecutive(tiny):
    img = smear()
    lab = np.zeros(img.shape[:2], np.int32)
    lab[10:22, 12:26] = 17
    lab[30:40, 30:45] = 5
    lab[2:6, 40:50] = 230
    df = C.classify(img, lab, model=tiny, device="cpu")
    check_table(df, [5, 17, 230])
    lab64 = lab.astype(np.int64)
    lab64[lab64 == 230] = 3_000_000_000  # huge sparse ids take another path: same answer
    big = C.classify(img, lab64, model=tiny, device="cpu")
    check_table(big, [5, 17, 3_000_000_000])
    assert np.allclose(big[C.PROB_COLUMNS].to_numpy(), df[C.PROB_COLUMNS].to_numpy(), atol=1e-5)


def test_empty_labels_give_empty_frame(tiny):
    img = smear()
    for ids in (None, []):
        df = C.classify(img, np.zeros(img.shape[:2], np.uint16), model=tiny, device="cpu", ids=ids)
        assert isinstance(df, pd.DataFrame)
        assert list(df.columns) == C.COLUMNS
        assert len(df) == 0
    assert C.empty_table()["label"].dtype == np.int64


def test_one_pixel_cells_at_borders_and_corners(tiny):
    img = smear()
    h, w = img.shape[:2]
    lab = np.zeros((h, w), np.int32)
    spots = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (0, w // 2), (h // 2, 0), (h // 2, w // 2)]
    for i, (y, x) in enumerate(spots, start=1):
        lab[y, x] = i
    lab[h - 3 :, w - 20 : w - 10] = 99  # a flat cell on the bottom edge
    df = C.classify(img, lab, model=tiny, device="cpu")
    check_table(df, list(range(1, len(spots) + 1)) + [99])


@pytest.mark.parametrize("kind", ["grey", "rgba", "uint16", "float", "grey1"])
def test_input_kinds(tiny, kind):
    img = {
        "grey": smear(channels=1),
        "rgba": smear(channels=4),
        "uint16": smear(dtype=np.uint16),
        "float": smear(dtype=np.float32),
        "grey1": smear(channels=1)[..., None],
    }[kind]
    lab = np.zeros(img.shape[:2], np.int64)
    lab[10:22, 12:26] = 1
    lab[30:35, 40:44] = 2
    check_table(C.classify(img, lab, model=tiny, device="cpu"), [1, 2])


def test_same_cell_same_answer_across_dtypes(tiny):
    lab = np.zeros((48, 56), np.int32)
    lab[10:22, 12:26] = 1
    a = C.classify(smear(), lab, model=tiny, device="cpu")[C.PROB_COLUMNS].to_numpy()
    b = C.classify(smear(dtype=np.uint16), lab, model=tiny, device="cpu")[C.PROB_COLUMNS].to_numpy()
    assert np.allclose(a, b, atol=1e-3)


def test_mismatched_shapes_raise(tiny):
    img = smear()
    with pytest.raises(ValueError, match=r"\(48, 50\).*\(48, 56\)"):
        C.classify(img, np.zeros((48, 50), np.int32), model=tiny)
    with pytest.raises(ValueError, match="shape"):
        C.classify(img, np.zeros((48, 56, 3), np.int32), model=tiny)


def test_bad_labels_raise(tiny):
    img = smear()
    lab = np.zeros(img.shape[:2], np.int32)
    lab[0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        C.classify(img, lab, model=tiny)
    with pytest.raises(ValueError, match="whole numbers"):
        C.classify(img, np.full(img.shape[:2], 0.5), model=tiny)


def test_ids_subset_matches_full_run(tiny):
    img = smear()
    lab = np.zeros(img.shape[:2], np.int32)
    lab[10:22, 12:26] = 3
    lab[30:40, 30:45] = 8
    lab[40:46, 2:9] = 11
    full = C.classify(img, lab, model=tiny, device="cpu")
    sub = C.classify(img, lab, model=tiny, device="cpu", ids=[11, 3])
    check_table(sub, [3, 11])
    pd.testing.assert_frame_equal(sub.reset_index(drop=True), full[full.label.isin([3, 11])].reset_index(drop=True),
                                  atol=1e-5)
    alias = C.classify_labels(img, lab, [8], model=tiny, device="cpu")
    check_table(alias, [8])
    with pytest.raises(ValueError, match="not present"):
        C.classify(img, lab, model=tiny, ids=[3, 4])
    with pytest.raises(ValueError, match="integer label ids"):
        C.classify(img, lab, model=tiny, ids=[1.7])  # not truncated to 1
    check_table(C.classify(img, lab, model=tiny, device="cpu", ids=np.array([8.0])), [8])


def test_bad_device_or_model_reported_without_cells(tiny, tmp_path):
    img = np.full((40, 40, 3), 200, np.uint8)
    empty = np.zeros((40, 40), np.int32)
    assert len(C.classify(img, empty, model=tiny, device="cpu")) == 0
    with pytest.raises(ValueError, match="not available|not a valid"):
        C.classify(img, empty, model=tiny, device="bogus")
    with pytest.raises(ValueError, match="does not exist"):
        C.classify(img, empty, model=tmp_path / "nope.safetensors", device="cpu")


def test_generator_progress_and_batches(tiny):
    img = smear()
    lab = np.zeros(img.shape[:2], np.int32)
    for i in range(5):
        lab[2 + 8 * i : 6 + 8 * i, 2:8] = i + 1
    items = list(C.iter_classify(img, lab, model=tiny, device="cpu", batch_size=2))
    assert items[0] == ("progress", 0, 3)
    assert [it for it in items if it[0] == "progress"][-1] == ("progress", 3, 3)
    assert items[-1][0] == "table"
    check_table(items[-1][1], [1, 2, 3, 4, 5])
    seen = []
    C.classify(img, lab, model=tiny, device="cpu", batch_size=4, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, 2), (1, 2), (2, 2)]


def test_loaded_network_tuple_and_no_grad_leak(tiny):
    from napari_wbc.core.models import load_model

    net, card = load_model(tiny, "classifier", "cpu")
    lab = np.zeros((48, 56), np.int32)
    lab[10:22, 12:26] = 1
    check_table(C.classify(smear(), lab, model=(net, card)), [1])


def test_cell_input_isolates_the_cell():
    """Pixels away from the cell are background; the mask is channel 4; size is fixed."""
    from napari_wbc.core.segment import channel_ranges

    img = smear().astype(np.float32)
    lab = np.zeros(img.shape[:2], np.int32)
    lab[10:22, 12:26] = 1
    lab[22:30, 12:26] = 2  # a neighbour touching the cell
    from scipy import ndimage as ndi

    sl = ndi.find_objects(lab)[0]
    x = C.cell_input(img, channel_ranges(img), lab, 1, sl, (lab == 1).sum(), size=32, context=1.5,
                     background=1.0, dilation=2)
    assert x.shape == (4, 32, 32) and x.dtype == np.float32
    m = x[3] > 0.5
    assert m.any() and not m.all()
    far = ~ndi.binary_dilation(m, iterations=3)
    assert np.allclose(x[:3, far], 1.0)
    # the same cell 4x larger gives nearly the same input (scale invariance)
    big = np.kron(img, np.ones((4, 4, 1), np.float32))
    blab = np.kron(lab, np.ones((4, 4), np.int32))
    sl4 = ndi.find_objects(blab)[0]
    x4 = C.cell_input(big, channel_ranges(big), blab, 1, sl4, (blab == 1).sum(), size=32, context=1.5,
                      background=1.0, dilation=2)
    assert np.abs(x4[3] - x[3]).mean() < 0.1


@pytest.mark.skipif(not SHIPPED["classifier"].exists(), reason="the shipped classifier is not built yet")
def test_shipped_model_loads_and_classifies(disc_smear):
    from napari_wbc.core.models import read_card

    card = read_card(SHIPPED["classifier"])
    assert card["kind"] == "classifier" and card["classes"] == C.CLASSES
    assert SHIPPED["classifier"].stat().st_size <= 16 * 2**20
    image, labels = disc_smear
    df = C.classify(image, labels, device="cpu")
    check_table(df, [1, 2, 3, 4])


def test_ensemble_is_the_mean_of_its_members(tmp_path):
    import torch

    from napari_wbc.core.models import build_network, clear_cache, save_model
    from napari_wbc.core.testing import make_tiny_classifier

    paths = [make_tiny_classifier(tmp_path / f"m{i}.safetensors", seed=i) for i in range(2)]
    from napari_wbc.core.models import load_model

    members = [load_model(p, "classifier", "cpu") for p in paths]
    card = dict(members[0][1], arch={"name": "Ensemble", "members": [c["arch"] for _, c in members]})
    ens = build_network(card["arch"])
    for slot, (net, _) in zip(ens.members, members):
        slot.load_state_dict(net.state_dict())
    path = save_model(ens, card, tmp_path / "ens.safetensors")
    clear_cache()

    img = smear()
    labels = np.zeros(img.shape[:2], np.int32)
    labels[10:22, 12:26] = 3
    labels[30:40, 30:50] = 7
    tables = [C.classify(img, labels, model=p, device="cpu") for p in paths]
    df = C.classify(img, labels, model=path, device="cpu")
    check_table(df, [3, 7])
    mean = np.mean([t[C.PROB_COLUMNS].to_numpy() for t in tables], 0)
    assert np.allclose(df[C.PROB_COLUMNS].to_numpy(), mean, atol=1e-5)
    # the members differ, so the test would notice an ensemble that used only one of them
    assert not np.allclose(tables[0][C.PROB_COLUMNS].to_numpy(), tables[1][C.PROB_COLUMNS].to_numpy(), atol=1e-4)
    with torch.no_grad():
        assert torch.isfinite(ens(torch.zeros(1, 4, 32, 32))).all()


def test_ensemble_card_needs_members():
    from napari_wbc.core.models import build_network

    with pytest.raises(ValueError, match="members"):
        build_network({"name": "Ensemble", "members": []})


def test_optional_shipped_classifier_by_name(sample_path):
    """The stain-robust classifier ships beside the default and is chosen by its name."""
    import napari_wbc
    from napari_wbc.core.io import read_image, to_rgb
    from napari_wbc.core.models import SHIPPED, read_card, resolve_model_path, shipped_models

    path = resolve_model_path("wbc_classifier_stain_robust", "classifier")
    assert path.is_file() and path.stat().st_size <= 16 * 2**20
    assert read_card(path)["kind"] == "classifier"
    assert shipped_models("classifier") == [SHIPPED["classifier"], path]  # the default stays first
    rgb = to_rgb(read_image(sample_path))
    labels = napari_wbc.segment(rgb, device="cpu")
    table = napari_wbc.classify(rgb, labels, model="wbc_classifier_stain_robust", device="cpu")
    assert len(table) == labels.max() and set(table["cell_type"]) <= set(read_card(path)["classes"])
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_path("wbc_classifier_no_such", "classifier")


def test_huge_cells_are_cut_strided_not_at_full_resolution():
    """A stray brush stroke across a smear (one label 6000 px long) was cut as a 6000 x 6000 window
    (1.8 GB, a minute) only to be shrunk to 64 px; windows past 4x the input are sampled instead."""
    from napari_wbc.core.classify import cut_window, inside_window, window_step

    assert window_step(300, 64) == 1 and window_step(511, 64) == 1 and window_step(6002, 64) == 23
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = rng.integers(1, 40, 2)
        arr = rng.integers(0, 100, (h, w))
        cy, cx = rng.uniform(-20, 60, 2)
        side = rng.uniform(1, 50)
        full, ins = cut_window(arr, cy, cx, side, -1), inside_window(arr.shape, cy, cx, side)
        for step in (2, 3, 7):
            np.testing.assert_array_equal(cut_window(arr, cy, cx, side, -1, step), full[::step, ::step])
            np.testing.assert_array_equal(inside_window(arr.shape, cy, cx, side, step), ins[::step, ::step])


@pytest.mark.parametrize("batch_size", [1.5, "2", None, True, 0])
def test_batch_size_must_be_a_whole_number(batch_size):
    import napari_wbc

    with pytest.raises(ValueError, match="batch_size"):
        napari_wbc.classify(np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20), np.int32), batch_size=batch_size)


def test_uint64_ids_past_int64_are_refused_not_made_negative():
    import napari_wbc

    lab = np.zeros((20, 20), np.uint64)
    lab[2:5, 2:5] = 2**63 + 5
    with pytest.raises(ValueError, match="too large"):
        napari_wbc.classify(np.zeros((20, 20, 3), np.uint8), lab)


def _stained(seed=0, h=96, w=96):
    """A smear-like float image in 0..1: a pale background, pink red cells, a purple two-lobed WBC."""
    rng = np.random.default_rng(seed)
    img = np.ones((h, w, 3), np.float32) * np.float32([0.95, 0.93, 0.9])
    yy, xx = np.mgrid[:h, :w]
    for _ in range(10):
        cy, cx = rng.uniform(0, h, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = (0.85, 0.55, 0.6)
    cell = (yy - 48) ** 2 + (xx - 48) ** 2 < 196
    img[cell] = (0.8, 0.7, 0.85)
    img[((yy - 45) ** 2 + (xx - 44) ** 2 < 25) | ((yy - 51) ** 2 + (xx - 53) ** 2 < 25)] = (0.45, 0.25, 0.6)
    labels = cell.astype(np.int32)
    return np.clip(img + rng.normal(0, 0.01, img.shape), 0.01, 1).astype(np.float32), labels


def test_optical_density_normalisation_evens_out_white_balance_and_stain_strength():
    img, _ = _stained()
    bg, k = C.od_parameters(img.reshape(-1, 3))
    ref = C.od_normalise(img, bg, k)
    # a yellow light (per-channel gain) and a stain twice as dark (optical density x2: value ** 2)
    for other in (img * np.float32([1.0, 0.95, 0.7]), img**2, (img * np.float32([0.9, 1.0, 0.8])) ** 1.5):
        bg2, k2 = C.od_parameters(other.reshape(-1, 3))
        np.testing.assert_allclose(C.od_normalise(other, bg2, k2), ref, atol=2e-3)
    # the darkest stain is brought to the reference optical density; the background to white
    od = -np.log(ref).sum(-1)
    assert np.percentile(od, C.OD_DARK_PERCENTILE) == pytest.approx(C.OD_REFERENCE, rel=1e-3)
    assert np.percentile(ref, 99.5, axis=(0, 1)) == pytest.approx([1, 1, 1], abs=1e-3)


def test_a_card_asking_for_optical_density_is_followed(tmp_path, monkeypatch):
    import json

    from scipy import ndimage as ndi

    from napari_wbc.core.models import card_path
    from napari_wbc.core.testing import make_tiny_classifier

    img, labels = _stained()
    darker = img**2  # the same smear stained twice as dark
    sl = ndi.find_objects(labels)[0]
    path = make_tiny_classifier(tmp_path / "od.safetensors", seed=3)
    card = json.loads(card_path(path).read_text())
    card["normalisation"] = {"method": C.OPTICAL_DENSITY, "background_percentile": 99.5, "dark_percentile": 99.5,
                             "reference": 1.2}
    card_path(path).write_text(json.dumps(card))

    def inputs(spec_card):
        settings, spec = C.input_settings(spec_card)
        return [C.cell_input(x, C.image_normaliser(x, spec), labels, 1, sl, labels.sum(), **settings)
                for x in (img, darker)]

    od, pct = inputs(card), inputs({})
    assert np.abs(od[0] - od[1]).max() < 5e-3  # the stain's strength no longer matters
    assert np.abs(pct[0] - pct[1]).max() > 0.1  # it does with per-channel percentiles
    seen = []
    real = C.image_normaliser
    monkeypatch.setattr(C, "image_normaliser", lambda rgb, spec: seen.append(spec) or real(rgb, spec))
    C.classify(img, labels, model=path, device="cpu")
    assert seen and seen[-1]["method"] == C.OPTICAL_DENSITY and seen[-1]["reference"] == 1.2
