"""finetune(): contract, atomic writes, bad input (tiny random network, CPU)."""
from __future__ import annotations

import numpy as np
import pytest

import napari_wbc
from napari_wbc.core import finetune as F
from napari_wbc.core.models import read_card
from napari_wbc.core.testing import make_tiny_segmenter


def _pair(seed=0, shape=(64, 64), n=3):
    rng = np.random.default_rng(seed)
    img = np.full(shape + (3,), 230, np.uint8)
    lab = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i in range(1, n + 1):
        cy, cx = rng.integers(10, shape[0] - 10), rng.integers(10, shape[1] - 10)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < 36
        img[m] = (90, 40, 140)
        lab[m] = i
    return img, lab


@pytest.fixture
def tiny(tmp_path):
    return make_tiny_segmenter(tmp_path / "base.safetensors", target_diameter=16)


@pytest.fixture(autouse=True)
def user_dir(tmp_path, monkeypatch):
    d = tmp_path / "userdata"
    monkeypatch.setattr(F, "user_models_dir", lambda: d)
    return d


def test_finetune_returns_loadable_model(tiny, tmp_path, user_dir):
    imgs, labs = zip(*[_pair(i) for i in range(3)])
    seen = []
    out = napari_wbc.finetune(list(imgs), list(labs), base=tiny, epochs=1, device="cpu",
                              progress=lambda e, t, m: seen.append((e, t)))
    assert out.exists() and out.suffix == ".safetensors"
    if out != tiny:  # a new model: in the user's data folder, with a card
        assert out.parent == user_dir
        card = read_card(out)
        assert card["finetune"]["base"] == str(tiny)
        assert card["finetune"]["epochs"] == 1
    assert seen and seen[-1] == (1, 1)
    lab = napari_wbc.segment(imgs[0], model=out, device="cpu", diameter=12)
    assert lab.shape == imgs[0].shape[:2]


def test_a_field_without_any_wbc_is_left_out_with_a_warning(tiny, user_dir, monkeypatch):
    """Labels that hold no cell were dropped without a word. Learning them as fields without any WBC was
    tried and added false WBCs (docs/benchmarks.md): they are left out, and the user is told which."""
    from napari_wbc.core import train as T

    seen = {}
    real = T.train_segmenter

    def spy(net, card, train, val, **kw):
        seen["samples"] = list(train) + list(val)
        return real(net, card, train, val, **kw)

    monkeypatch.setattr(T, "train_segmenter", spy)
    imgs, labs = map(list, zip(*[_pair(i) for i in range(2)]))
    field = np.full((64, 64, 3), 230, np.uint8)
    with pytest.warns(UserWarning, match=r"labels\[1\] hold no cell: images\[1\] is left out"):
        napari_wbc.finetune([imgs[0], field, imgs[1]], [labs[0], np.zeros((64, 64), np.int32), labs[1]],
                            base=tiny, epochs=1, device="cpu")
    assert seen["samples"] and all(s.labels.any() for s in seen["samples"])


def test_binary_mask_and_explicit_output(tiny, tmp_path):
    img, lab = _pair(1, shape=(80, 96))
    out = tmp_path / "mine.safetensors"
    p = napari_wbc.finetune([img], [lab > 0], base=tiny, epochs=1, device="cpu", output=out)
    assert p in (out, tiny)


def test_never_overwrites(tiny, tmp_path):
    img, lab = _pair()
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"user model")
    with pytest.raises(ValueError, match="exists"):
        napari_wbc.finetune([img], [lab], base=tiny, epochs=1, device="cpu", output=existing)
    assert existing.read_bytes() == b"user model"


def test_exception_mid_training_leaves_nothing(tiny, tmp_path, user_dir, monkeypatch):
    from napari_wbc.core import train as T

    img, lab = _pair()
    before = tiny.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("power cut")

    monkeypatch.setattr(T, "seg_loss", boom)
    out = tmp_path / "new.safetensors"
    with pytest.raises(RuntimeError, match="power cut"):
        napari_wbc.finetune([img, img], [lab, lab], base=tiny, epochs=1, device="cpu", output=out)
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not user_dir.exists() or not any(user_dir.iterdir())
    assert tiny.read_bytes() == before


def test_cancel_writes_nothing(tiny, tmp_path):
    img, lab = _pair()
    out = tmp_path / "c.safetensors"
    with pytest.raises(F.FinetuneCancelled):
        napari_wbc.finetune([img], [lab], base=tiny, epochs=2, device="cpu", output=out, should_stop=lambda: True)
    assert not out.exists()


@pytest.mark.parametrize(
    "images, labels, match",
    [
        ([np.zeros((64, 64, 3), np.uint8)], [np.zeros((64, 60), int)], "shape"),
        ([np.zeros((64, 64, 3), np.uint8)], [np.zeros((64, 64), int)], "no labelled pixel"),
        ([np.zeros((8, 8, 3), np.uint8)], [np.ones((8, 8), int)], "too small"),
        ([np.zeros((64, 64, 3), np.uint8)] * 2, [np.ones((64, 64), int)], "one label array per image"),
        ([], [], "empty"),
    ],
)
def test_bad_input(tiny, images, labels, match):
    with pytest.raises(ValueError, match=match):
        napari_wbc.finetune(images, labels, base=tiny, epochs=1, device="cpu")


def test_cell_types_finetune_the_classifier(tmp_path):
    """cell_types -> a classifier file beside the segmenter, recorded in its card, usable by classify()."""
    import json

    from napari_wbc.core.models import card_path
    from napari_wbc.core.testing import make_tiny_classifier

    cls = make_tiny_classifier(tmp_path / "cls.safetensors")
    seg = make_tiny_segmenter(tmp_path / "seg.safetensors", target_diameter=16)
    card = json.loads(card_path(seg).read_text())
    card["classifier"] = str(cls)  # a segmenter/classifier pair
    card_path(seg).write_text(json.dumps(card))
    imgs, labs = zip(*[_pair(i, n=3) for i in range(3)])
    types = [{1: "neutrophil", 2: "lymphocyte", 3: "monocyte"}] * 3
    seen = []
    out = napari_wbc.finetune(list(imgs), list(labs), base=seg, epochs=1, device="cpu",
                              output=tmp_path / "ft.safetensors", cell_types=types,
                              progress=lambda e, n, m: seen.append((m["stage"], e, n)))
    # the classifier's epochs are reported too (progress stopped at the segmenter's last epoch)
    assert seen[0] == ("segmenter", 1, 1) and seen[1:] == [("classifier", e, 10) for e in range(11)]
    from napari_wbc.core.finetune import paired_classifier

    card = read_card(out)
    assert card["classifier"] == "ft_classifier.safetensors"  # by name beside it: the pair can be moved
    cls_new = paired_classifier(out, card)
    assert cls_new == tmp_path / "ft_classifier.safetensors"
    table = napari_wbc.classify(imgs[0], labs[0], model=cls_new, device="cpu")
    assert list(table["label"]) == [1, 2, 3]
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in tmp_path.glob("ft*"):
        f.rename(moved / f.name)
    assert paired_classifier(moved / "ft.safetensors", card) == moved / "ft_classifier.safetensors"
    cc = read_card(moved / "ft_classifier.safetensors")  # its card describes it, not its base
    assert "command" not in cc and "data" not in cc and cc["finetune"]["base_card"]
    assert cc["finetune"]["seed"] == 0 and len(cc["finetune"]["base_sha256"]) == 64
    assert card["finetune"]["environment"]["torch"] and card["finetune"]["data_sha256"]


def test_cell_types_fine_tune_the_classifier_given(tmp_path):
    """classifier=: the corrected types fine-tune that classifier (an adapted one, say), not the pair's."""
    from napari_wbc.core.testing import make_tiny_classifier

    seg = make_tiny_segmenter(tmp_path / "seg.safetensors", target_diameter=16)
    mine = make_tiny_classifier(tmp_path / "adapted.safetensors", seed=5)
    imgs, labs = zip(*[_pair(i, n=3) for i in range(3)])
    types = [{1: "neutrophil", 2: "lymphocyte", 3: "monocyte"}] * 3
    with pytest.raises(ValueError, match="seg.safetensors' is a segmenter, expected a classifier"):
        napari_wbc.finetune(list(imgs), list(labs), base=seg, epochs=1, device="cpu", cell_types=types,
                            output=tmp_path / "x.safetensors", classifier=seg)
    with pytest.raises(ValueError, match="give cell_types too"):
        napari_wbc.finetune(list(imgs), list(labs), base=seg, epochs=1, device="cpu",
                            output=tmp_path / "y.safetensors", classifier=mine)
    assert not list(tmp_path.glob("[xy]*"))  # refused before any training: nothing written
    out = napari_wbc.finetune(list(imgs), list(labs), base=seg, epochs=1, device="cpu",
                              output=tmp_path / "ft.safetensors", cell_types=types, classifier=mine)
    from napari_wbc.core.finetune import paired_classifier

    cls_new = paired_classifier(out, read_card(out))
    assert cls_new is not None
    if cls_new.name == "ft_classifier.safetensors":  # trained (else the given one was kept, as its path says)
        assert read_card(cls_new)["finetune"]["base"] == str(mine)
    else:
        assert cls_new == mine


def test_cell_types_bad_type(tmp_path):
    from napari_wbc.core.classifier_finetune import finetune_classifier
    from napari_wbc.core.testing import make_tiny_classifier

    cls = make_tiny_classifier(tmp_path / "cls.safetensors")
    img, lab = _pair()
    with pytest.raises(ValueError, match="platelet"):
        finetune_classifier([img], [lab], [{1: "platelet"}], base=cls, output=tmp_path / "o.safetensors", device="cpu")


def test_classifier_finetune_trains_every_ensemble_member(tmp_path):
    """The shipped classifier is an ensemble: fine-tuning must reach all its members."""
    import torch
    import torch.nn.functional as F

    from napari_wbc.core.classifier_finetune import finetune_classifier
    from napari_wbc.core.models import load_model
    from napari_wbc.core.testing import make_tiny_classifier

    cls = make_tiny_classifier(tmp_path / "ens.safetensors", members=2)
    net, card = load_model(cls, "classifier", "cpu")
    assert card["arch"]["name"] == "Ensemble" and len(net.members) == 2
    net.train()
    net.zero_grad()
    F.cross_entropy(net(torch.rand(3, 4, 32, 32)), torch.tensor([0, 1, 2])).backward()
    for m in net.members:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    net.zero_grad()
    net.eval()

    imgs, labs = zip(*[_pair(i, n=3) for i in range(3)])
    types = [{1: "neutrophil", 2: "lymphocyte", 3: "monocyte"}] * 3
    out = finetune_classifier(list(imgs), list(labs), types, base=cls, output=tmp_path / "ft.safetensors",
                              device="cpu", epochs=2)
    _, new_card = load_model(out, "classifier", "cpu")
    assert new_card["arch"]["name"] == "Ensemble"
    table = napari_wbc.classify(imgs[0], labs[0], model=out, device="cpu")
    assert list(table["label"]) == [1, 2, 3]


@pytest.mark.parametrize("kw", [{"wide_hue": 1.0}, {"stain": 0.3}])
def test_stain_augmentations_change_colours_within_range(kw):
    from napari_wbc.core.train import colour_transform

    x = np.random.default_rng(0).random((500, 3)).astype(np.float32)
    plain = colour_transform(np.random.default_rng(1), 1.0)(x)
    for seed in (1, 2, 3):
        y = colour_transform(np.random.default_rng(seed), 1.0, **kw)(x)
        assert y.shape == x.shape and y.dtype == np.float32
        assert 0.0 <= y.min() and y.max() <= 1.0
    y1 = colour_transform(np.random.default_rng(1), 1.0, **kw)(x)
    assert np.abs(y1 - plain).mean() > 0.01  # same seed: the option changed the colours


def test_stain_share_zero_is_plain_colour_jitter():
    from napari_wbc.core.train import colour_transform

    x = np.random.default_rng(0).random((200, 3)).astype(np.float32)
    plain = colour_transform(np.random.default_rng(4), 1.0)(x)
    # share 0: the share draw happens but no deconvolution jitter; share 1: always jittered
    never = colour_transform(np.random.default_rng(4), 1.0, stain=0.3, stain_share=0.0)(x)
    always = colour_transform(np.random.default_rng(4), 1.0, stain=0.3, stain_share=1.0)(x)
    assert np.allclose(never, plain)
    assert np.abs(always - plain).mean() > 0.01


def test_grey_share_sets_how_often_colours_turn_grey():
    from napari_wbc.core.train import colour_transform

    x = np.random.default_rng(0).random((200, 3)).astype(np.float32)

    def n_grey(share):
        ys = [colour_transform(np.random.default_rng(s), 1.0, grey=share)(x) for s in range(40)]
        return sum(bool(np.allclose(y[:, 0], y[:, 1]) and np.allclose(y[:, 1], y[:, 2])) for y in ys)

    assert n_grey(0.0) == 0 and n_grey(1.0) == 40
    assert 0 < n_grey(0.25) < 40
    # the default (0.1) draws the same random numbers as any other share: same colours where neither turns grey
    a = colour_transform(np.random.default_rng(7), 1.0)(x)
    b = colour_transform(np.random.default_rng(7), 1.0, grey=0.0)(x)
    assert np.allclose(a, b) or np.allclose(a[:, 0], a[:, 1])


def test_stain_jitter_can_spare_weakly_labelled_samples():
    from napari_wbc.core.train import make_sample, random_crop

    rng = np.random.default_rng(0)
    img = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    lab = np.zeros((64, 64), np.int32)
    lab[20:40, 20:40] = 1
    weak = make_sample(img, lab, diameter=20, weight=np.ones((64, 64), np.float32))
    full = make_sample(img, lab, diameter=20)

    def x(sample, **kw):
        return random_crop(sample, np.random.default_rng(5), crop=32, target=16, **kw)[0]

    plain = x(weak)
    assert np.allclose(x(weak, stain=0.3, stain_weak=False), plain)  # spared: plain colour jitter
    assert not np.allclose(x(weak, stain=0.3), plain)  # default: weak samples are jittered too
    assert not np.allclose(x(full, stain=0.3, stain_weak=False), x(full))  # fully labelled: always jittered


def test_empty_points_keep_clear_of_cells_and_ignored_areas():
    from scipy import ndimage as ndi

    from napari_wbc.core.train import make_sample, with_empty_points

    img = np.full((80, 120, 3), 200, np.uint8)
    lab = np.zeros((80, 120), np.int32)
    lab[10:30, 10:30] = 1
    weight = np.ones((80, 120), np.float32)
    weight[50:70, 90:110] = 0  # an ignored box (a WBC without a mask)
    s = with_empty_points(make_sample(img, lab, diameter=20, weight=weight), min_distance=0.75)
    assert len(s.empty) > 0
    clear = ndi.distance_transform_edt((lab == 0) & (weight > 0))
    ys, xs = s.empty[:, 0].astype(int), s.empty[:, 1].astype(int)
    assert (clear[ys, xs] >= 15).all()
    # a crop-sized image filled by its cell has none
    full = make_sample(img[:24, :24], np.pad(np.ones((20, 20), np.int32), 2), diameter=20)
    assert len(with_empty_points(full).empty) == 0


def test_field_probe_reads_a_field_around_the_point():
    from napari_wbc.core.train import field_probe

    rgb = np.zeros((100, 100, 3), np.float32)
    rgb[:, 50:] = 1.0  # left half dark, right half bright
    rng = np.random.default_rng(0)
    for _ in range(20):
        px = field_probe(rgb, 50, 20, 30, rng)  # a 30 px field holding x=20 lies in the left half
        assert px is not None and px.shape[1] == 3 and (px == 0).all()
    assert field_probe(rgb, -200, -200, 30, rng) is None  # off the image: nothing to read


def test_empty_crops_are_normalised_on_their_field():
    from napari_wbc.core.train import make_sample, random_crop, with_empty_points

    # a dark cell on the left, pale "red cells" (values 150..170) on the right
    rng = np.random.default_rng(0)
    img = np.full((64, 256, 3), 220, np.uint8)
    img[:, 128:] = (150 + rng.random((64, 128, 3)) * 20).astype(np.uint8)
    lab = np.zeros((64, 256), np.int32)
    lab[22:42, 10:30] = 1
    img[lab == 1] = 40
    s = with_empty_points(make_sample(img, lab, diameter=20))

    def crop(**kw):
        return random_crop(s, np.random.default_rng(3), crop=32, target=20, jitter=0.0, colour=0.0, **kw)

    x_whole, fg, _, _ = crop()
    x_empty, fg_e, _, _ = crop(empty_share=1.0)
    assert fg_e.sum() == 0  # centred far from the cell
    # stretched on a field of red cells only, their darkest reach the bottom of the range
    assert x_empty.min() < 0.1
    assert crop(empty_share=1.0)[0].tolist() == x_empty.tolist()  # reproducible from the seed


def test_small_field_crops_show_a_small_image_normalised_on_itself():
    from napari_wbc.core.train import make_sample, random_crop, small_field_window

    rgb = np.zeros((200, 200, 3), np.float32)
    rgb[:, 100:] = 1.0  # left half dark, right half bright
    rng = np.random.default_rng(0)
    for _ in range(20):
        px, inside = small_field_window(rgb, 100, 40, 60, 32, rng)  # the field holds x=40: left half only
        assert (px == 0).all() and inside.dtype == bool
        frac = inside.mean()
        assert 0.3**2 <= frac <= 1.0  # 0.35-1 crop wide, a side never below 0.3 crop
        ys, xs = np.nonzero(inside)
        assert ys.max() - ys.min() + 1 <= 32 and xs.max() - xs.min() + 1 <= 32
    # off the image, or cut by its edge below a WBC diameter (0.3 crop) on a side: no small image
    assert all(small_field_window(rgb, -100, 50, 60, 32, rng) is None for _ in range(20))
    assert all(small_field_window(rgb[:, :15], 100, 7, 60, 32, rng) is None for _ in range(20))

    # in a crop: outside the small image the input is bright padding with no weight and no label
    img = np.full((96, 96, 3), 200, np.uint8)
    lab = np.zeros((96, 96), np.int32)
    lab[38:58, 38:58] = 1
    img[lab == 1] = 60
    s = make_sample(img, lab, diameter=20)
    x, fg, _, wgt = random_crop(s, np.random.default_rng(1), crop=48, target=20, jitter=0.0, colour=0.0,
                                small_field=1.0)
    out = wgt == 0
    assert 0 < out.sum() < out.size
    assert abs(float(np.median(x[:, out])) - 1.0) < 0.05 and fg[out].sum() == 0  # padding (under the noise augmentation)
    assert x[:, ~out].min() < 0.1  # stretched on the small image itself: the cell reaches the bottom


def test_a_crop_past_its_images_edge_shows_bright_padding_not_a_dark_line():
    from scipy import ndimage as ndi

    from napari_wbc.core.train import beyond_edge, make_sample, random_crop

    img = np.full((60, 60, 3), 200, np.uint8)
    lab = np.zeros((60, 60), np.int32)
    lab[5:25, 5:25] = 1  # a dark cell in the corner: crops around it run past the image's edge
    img[lab == 1] = 40
    s = make_sample(img, lab, diameter=23)
    for seed in range(10):  # 23 px cells to 20: the crop is resized, so its edge blends with the fill
        x, fg, _, wgt = random_crop(s, np.random.default_rng(seed), crop=48, target=20, jitter=0.0, colour=0.0)
        assert (wgt == 0).any()  # the crop runs past the image
        field = (wgt > 0) & ~ndi.binary_dilation(fg > 0, iterations=4)  # image, away from the cell (and blur)
        assert x[:, field].min() > 0.6, seed  # background, up to the edge: no dark line
    # the mask covers the fill and every pixel the resize blended with it
    out = beyond_edge((60, 60), 5.0, 5.0, 55.2, 48)
    assert out[0, 0] and not out[-1, -1] and out.sum() > (48 * 24.8 / 55.2) ** 2


def test_red_cell_layers_darken_a_crop_but_never_over_the_layer_images_wbcs():
    from napari_wbc.core.train import make_batch, make_sample, random_crop, red_cell_layer, with_empty_points

    # the layer image: a bright background, dark "red cells" (unlabelled) and one dark labelled WBC
    img = np.full((120, 120, 3), 220, np.uint8)
    lab = np.zeros((120, 120), np.int32)
    lab[10:30, 10:30] = 1
    img[lab == 1] = 30
    yy, xx = np.mgrid[:120, :120]
    for cy, cx in ((70, 40), (90, 90), (60, 100), (100, 30)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 120
    layer = with_empty_points(make_sample(img, lab, diameter=20))
    rng = np.random.default_rng(0)
    for _ in range(10):
        t = red_cell_layer(layer, 1.0, 120, rng)  # the whole image, turned and mirrored at random
        assert t.shape == (120, 120, 3) and t.min() >= 0 and t.max() <= 1
        assert 0.3 < t.min() < 0.7  # a red cell lets through about 120 / 220 of the light
        # the WBC (30 / 220) is never laid over anything: it became background
        assert (t > 0.5).all()

    # a layer with no red cells lets everything through; with red cells the crop's input darkens, its
    # targets stay (same labels, so the same empty points and the same random draws for both layers)
    blank = with_empty_points(make_sample(np.full((120, 120, 3), 220, np.uint8), lab, diameter=20))
    assert np.array_equal(blank.empty, layer.empty)
    assert (red_cell_layer(blank, 1.0, 120, np.random.default_rng(0)) == 1).all()
    cell = np.full((96, 96, 3), 200, np.uint8)
    clab = np.zeros((96, 96), np.int32)
    clab[38:58, 38:58] = 1
    cell[clab == 1] = 60
    s = make_sample(cell, clab, diameter=20)

    def crop(layers, seed):
        return random_crop(s, np.random.default_rng(seed), crop=48, target=20, jitter=0.0, colour=0.0, layers=layers)

    darker = 0
    for seed in range(8):
        clear, under = crop((blank, blank), seed), crop((layer, layer), seed)
        assert np.array_equal(clear[1], under[1]) and np.array_equal(clear[2], under[2])
        darker += under[0].mean() < clear[0].mean() - 0.01
    assert darker >= 6  # (a crop may fall where the layers' fields hold no red cell)
    # in a batch: overlap 0 draws nothing more from the generator (the shipped recipe's crops stay as they were)
    a = make_batch([s, layer], np.random.default_rng(4), 3, crop=32, target=20)
    b = make_batch([s, layer], np.random.default_rng(4), 3, crop=32, target=20, overlap=0.0)
    assert all(np.array_equal(u.numpy(), v.numpy()) for u, v in zip(a, b))
    c = make_batch([s, layer], np.random.default_rng(4), 3, crop=32, target=20, overlap=1.0)
    assert c[0].shape == a[0].shape and not np.array_equal(c[0].numpy(), a[0].numpy())


def test_train_segmenter_with_ema_keeps_the_averaged_weights(tiny, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from napari_wbc.core import train as T
    from napari_wbc.core.models import build_network, read_card

    samples = [T.make_sample(*_pair(i), diameter=12) for i in range(2)]
    judged = []

    def better_each_time(net, card, val, device, should_stop=None):  # every checkpoint beats the one before
        judged.append(net)
        return {"matched_dice": len(judged) / 10, "f1": 1.0}

    monkeypatch.setattr(T, "evaluate", better_each_time)

    def run(ema):
        judged.clear()
        card = read_card(tiny)
        net = build_network(card["arch"])
        net.load_state_dict(load_file(str(tiny)))
        state, hist = T.train_segmenter(net, card, samples, samples, steps=4, batch_size=2, eval_every=2,
                                        device="cpu", crop=32, ema=ema, log=lambda s: None)
        return net, state, hist

    net, state, hist = run(0.0)
    assert [h["step"] for h in hist] == [0, 2, 4] and all(j is net for j in judged)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())  # the last checkpoint's own weights
    net, state, _ = run(0.5)
    assert judged[0] is net and all(j is not net for j in judged[1:])  # checkpoints judge the average
    raw = net.state_dict()
    assert set(state) == set(raw)  # loadable into the network as it is
    assert any(v.is_floating_point() and not torch.equal(v, raw[k]) for k, v in state.items())  # not the last weights


def _paired_tiny(tmp_path):
    import json

    from napari_wbc.core.models import card_path
    from napari_wbc.core.testing import make_tiny_classifier

    cls = make_tiny_classifier(tmp_path / "cls.safetensors")
    seg = make_tiny_segmenter(tmp_path / "seg.safetensors", target_diameter=16)
    card = json.loads(card_path(seg).read_text())
    card["classifier"] = str(cls)
    card_path(seg).write_text(json.dumps(card))
    return seg, cls


def _worse_training(*args, **kwargs):
    """A stand-in for train_segmenter whose training moved the weights but never beat the base."""
    import torch

    net = args[0]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    return None, [{"step": 0}]


@pytest.mark.parametrize("classifier_improves", [True, False])
def test_cell_types_keep_the_base_segmenter_when_it_did_not_improve(tmp_path, monkeypatch, classifier_improves):
    """Corrected types still train the classifier, but the segmenter's weights stay the base's (not the worse last epoch)."""
    import shutil

    from safetensors.torch import load_file

    from napari_wbc.core import classifier_finetune as CF
    from napari_wbc.core import train as T

    seg, cls = _paired_tiny(tmp_path)
    monkeypatch.setattr(T, "train_segmenter", _worse_training)

    def fake_classifier(images, labels, cell_types, *, base, output, **kw):
        if not classifier_improves:
            return __import__("pathlib").Path(base)
        shutil.copy(cls, output)
        shutil.copy(cls.with_suffix(".json"), output.with_suffix(".json"))
        return output

    monkeypatch.setattr(CF, "finetune_classifier", fake_classifier)
    imgs, labs = zip(*[_pair(i, n=3) for i in range(4)])
    types = [{1: "neutrophil", 2: "lymphocyte", 3: "monocyte"}] * 4
    with pytest.warns(UserWarning, match="did not improve"):
        out = napari_wbc.finetune(list(imgs), list(labs), base=seg, epochs=1, device="cpu",
                                  output=tmp_path / "ft.safetensors", cell_types=types)
    if not classifier_improves:
        assert out == seg and not (tmp_path / "ft.safetensors").exists()
        return
    assert out == tmp_path / "ft.safetensors"
    card = read_card(out)
    assert card["finetune"]["kept_base_weights"] is True
    assert card["classifier"].endswith("ft_classifier.safetensors")
    base_w, new_w = load_file(str(seg)), load_file(str(out))
    assert base_w.keys() == new_w.keys() and all((base_w[k] == new_w[k]).all() for k in base_w)


@pytest.mark.parametrize("case", ["bad type", "not a mapping", "no cell", "classifier output exists", "erased cell"])
def test_cell_types_are_checked_before_any_training(tmp_path, monkeypatch, case):
    from napari_wbc.core import train as T

    seg, _ = _paired_tiny(tmp_path)

    def no_training(*a, **k):
        raise AssertionError("the segmenter trained before the bad input was reported")

    monkeypatch.setattr(T, "train_segmenter", no_training)
    imgs, labs = zip(*[_pair(i, n=3) for i in range(2)])
    types = {"bad type": [{1: "blast"}, {}], "not a mapping": [["neutrophil"], {}], "no cell": [{}, {}],
             "classifier output exists": [{1: "neutrophil"}, {}],
             "erased cell": [{1: "neutrophil", 2: "monocyte"}, {9: "lymphocyte"}]}[case]
    match = {"bad type": "blast", "not a mapping": "mapping", "no cell": "names no cell",
             "classifier output exists": "exists",
             "erased cell": r"cell_types\[1\] types label id\(s\) 9 that labels\[1\] does not hold"}[case]
    if case == "classifier output exists":
        (tmp_path / "ft_classifier.safetensors").write_bytes(b"user classifier")
    with pytest.raises(ValueError, match=match):
        napari_wbc.finetune(list(imgs), list(labs), base=seg, epochs=1, device="cpu",
                            output=tmp_path / "ft.safetensors", cell_types=types)
    if case == "classifier output exists":
        assert (tmp_path / "ft_classifier.safetensors").read_bytes() == b"user classifier"


@pytest.mark.parametrize("value", [1, 255, 7.0])
def test_binary_masks_of_any_value_are_split_into_cells(value):
    lab = np.zeros((40, 60), np.float32 if isinstance(value, float) else np.uint8)
    lab[5:15, 5:15] = value
    lab[20:30, 30:45] = value
    out = F._as_labels(lab, 0)
    assert out.dtype == np.int32 and sorted(np.unique(out)) == [0, 1, 2]
    inst = np.zeros((40, 60), np.uint16)
    inst[5:15, 5:15], inst[15:25, 5:15] = 3, 9  # touching instance labels stay as they are
    assert (F._as_labels(inst, 0) == inst).all()
    huge = inst.astype(np.uint64)
    huge[huge == 9] = 2**32 + 9  # would wrap in int32 (onto cell 9, or negative: background)
    out = F._as_labels(huge, 0)
    assert out.dtype == np.int32 and out.min() == 0 and len(np.unique(out)) == 3
    assert len(np.unique(out[5:15, 5:15])) == 1 and len(np.unique(out[15:25, 5:15])) == 1
    assert out[5, 5] != out[15, 5]


def test_cell_table_keeps_ids_past_int32():
    from napari_wbc.core.segment import cell_table

    lab = np.zeros((20, 20), np.uint64)
    lab[1:4, 1:4], lab[10:12, 10:12], lab[15:18, 2:5] = 2**32 + 7, 3, 2**31
    t = cell_table(lab).set_index("label")
    assert sorted(t.index) == [3, 2**31, 2**32 + 7]
    assert (t.loc[2**32 + 7, "area"], t.loc[3, "area"], t.loc[2**31, "centroid-0"]) == (9, 4, 16.0)


def test_output_card_existing_json_and_folder(tiny, tmp_path, monkeypatch):
    """An existing card (.json) is never overwritten; a folder as output gets a new dated file inside;
    the new card describes the fine-tuned model, not its base."""
    import json

    from napari_wbc.core import train as T
    from napari_wbc.core.models import card_path

    img, lab = _pair()
    notes = tmp_path / "results.json"
    notes.write_text('{"my": "notes"}')
    with pytest.raises(ValueError, match="results.json"):
        napari_wbc.finetune([img], [lab], base=tiny, epochs=1, device="cpu", output=tmp_path / "results.safetensors")
    assert json.loads(notes.read_text()) == {"my": "notes"}

    base_card = json.loads(card_path(tiny).read_text())
    base_card.update({"version": "9.9.9", "validation": {"all_val_known_diameter": {"matched_dice": 0.99}},
                      "limits": "Trained on three public data sets.", "training": {"args": {}}})
    card_path(tiny).write_text(json.dumps(base_card))
    monkeypatch.setattr(T, "train_segmenter", lambda net, *a, **k: (None, [{"step": 0}]))
    monkeypatch.setattr(F, "_split_holdout", lambda samples, rng: (samples, []))  # no hold-out: always written
    folder = tmp_path / "models"
    folder.mkdir()
    out = napari_wbc.finetune([img], [lab], base=tiny, epochs=1, device="cpu", output=folder)
    assert out.parent == folder and out.name.startswith("wbc_unet_ft_") and out.suffix == ".safetensors"
    card = read_card(out)
    assert "training" not in card and "validation" not in card
    assert card["version"] == "9.9.9+finetuned" and card["finetune"]["base_version"] == "9.9.9"
    assert card["limits"].startswith("Trained on three public data sets. Fine-tuned by its user")


def test_save_model_refuses_an_existing_card(tmp_path):
    from napari_wbc.core.models import save_model
    from napari_wbc.core.testing import make_tiny_segmenter

    tiny = make_tiny_segmenter(tmp_path / "a.safetensors")
    (tmp_path / "b.json").write_text("mine")
    from napari_wbc.core.models import build_network, read_card

    card = read_card(tiny)
    with pytest.raises(FileExistsError, match="b.json"):
        save_model(build_network(card["arch"]), card, tmp_path / "b.safetensors")
    assert (tmp_path / "b.json").read_text() == "mine" and not (tmp_path / "b.safetensors").exists()


@pytest.mark.parametrize("scale", [255.0, 4095.0])
def test_float_images_of_any_range_train_like_their_uint8_version(scale):
    """A float image in 0..255 or 0..4095 was clipped to 0..1 for training (white crops)."""
    from napari_wbc.core.train import make_sample

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 40, 3)).astype(np.uint8)
    img[0, 0] = 255  # the range's top is present, as in a real image
    lab = np.zeros((30, 40), np.int32)
    lab[5:15, 5:15] = 1
    ref = make_sample(img, lab).rgb
    got = make_sample(img.astype(np.float32) / 255.0 * scale, lab).rgb
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_12_bit_images_in_uint16_train_like_their_uint8_version():
    """12-bit camera data in uint16 (0..4095) was divided by 65535 for training: crops 16x darker
    than the same image in 8 bits, which the colour augmentation (stain, gains) works on."""
    from napari_wbc.core.train import make_sample

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 40, 3)).astype(np.uint8)
    img[0, 0] = 255
    lab = np.zeros((30, 40), np.int32)
    lab[5:15, 5:15] = 1
    ref = make_sample(img, lab).rgb
    got = make_sample((img.astype(np.uint32) * 4095 // 255).astype(np.uint16), lab).rgb
    np.testing.assert_allclose(got, ref, atol=2e-3)


def test_masks_at_or_below_one_and_negative_labels():
    lab = np.zeros((40, 60), np.float32)
    lab[5:15, 5:15], lab[20:30, 30:45] = 0.5, 0.5  # a binary mask of 0/0.5: two cells, not background
    assert sorted(np.unique(F._as_labels(lab, 0))) == [0, 1, 2]
    neg = np.zeros((40, 60), np.int32)
    neg[5:15, 5:15] = -1
    with pytest.raises(ValueError, match="labels\\[3\\] holds negative values"):
        F._as_labels(neg, 3)


def test_a_default_name_taken_meanwhile_gets_a_new_one(tiny, tmp_path, monkeypatch):
    """Two fine-tunes into one folder in the same second: the second gets _2, the first stays."""
    import shutil

    from napari_wbc.core.models import card_path

    taken = tmp_path / "out" / "wbc_unet_ft_20260101-000000.safetensors"
    taken.parent.mkdir()
    shutil.copy(tiny, taken)
    shutil.copy(card_path(tiny), card_path(taken))
    before = taken.read_bytes()
    monkeypatch.setattr(F, "_new_output_path", lambda stem, folder=None, tag="ft": taken)  # chosen before the other saved
    import napari_wbc.core.train as T

    def improved(net, *args, **kwargs):  # training that beat the base (whatever a random net does)
        return {k: v.clone() for k, v in net.state_dict().items()}, []

    monkeypatch.setattr(T, "train_segmenter", improved)
    imgs, labs = zip(*[_pair(i) for i in range(2)])
    out = napari_wbc.finetune(list(imgs), list(labs), base=tiny, epochs=1, device="cpu", output=tmp_path / "out")
    assert out == taken.with_name(taken.stem + "_2.safetensors")
    assert taken.read_bytes() == before and read_card(out)["finetune"]["epochs"] == 1


def test_without_a_hold_out_the_last_weights_are_kept(tiny):
    """With nothing held out there is nothing to pick an epoch by: the weights of the last step come
    back (the first evaluation's were kept, and progress showed Dice 0.000 for 'no figure')."""
    import torch

    from napari_wbc.core.models import build_network
    from napari_wbc.core.train import make_sample, train_segmenter

    card = read_card(tiny)
    net = build_network(card["arch"])
    img, lab = _pair(0)
    seen = []
    best, history = train_segmenter(net, card, [make_sample(img, lab)], [], steps=4, batch_size=2, eval_every=2,
                                    crop=48, progress=lambda step, steps, rec: seen.append(rec))
    final = net.state_dict()
    assert all(torch.equal(best[k], final[k].cpu()) for k in final)
    assert [r["matched_dice"] for r in seen] == [None, None]


def test_typed_cells_held_out_to_check_a_fine_tuned_classifier():
    """Few corrections over several types held nothing out (round(0.25 x 1 or 2) = 0), and a classifier
    fine-tuned on 5 cells was adopted unchecked (it then called every cell of the next smear eosinophil)."""
    from napari_wbc.core.classifier_finetune import check_cell_types, holdout_indices

    rng = np.random.default_rng(0)
    assert len(holdout_indices(np.array([0, 0, 1, 2, 3]), rng)) == 1  # one of the type with two cells
    assert len(holdout_indices(np.array([0] * 8 + [1] * 4), rng)) == 3  # a quarter of each type
    assert len(holdout_indices(np.array([0, 1, 2, 3]), rng)) == 0
    assert len(holdout_indices(np.array([0, 0, 1]), rng)) == 0  # fewer than 4
    card = {"classes": ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]}
    with pytest.raises(ValueError, match="too few corrected cells"):
        check_cell_types([{1: "neutrophil", 2: "lymphocyte"}, {1: "monocyte", 2: "eosinophil"}], card)
    check_cell_types([{1: "neutrophil", 2: "lymphocyte"}, {1: "monocyte", 2: "neutrophil"}], card)


def test_the_hold_out_is_a_quarter_of_the_cells_not_of_the_images():
    """One big corrected smear and a small image: the big one was held out whole (training had one cell)."""
    from napari_wbc.core import finetune as F
    from napari_wbc.core.train import make_sample

    big = make_sample(*_pair(0, shape=(200, 200), n=40), name="big")
    small = make_sample(*_pair(1, shape=(48, 48), n=1), name="small")
    n = len(big.centres)
    for order in ([big, small], [small, big]):
        for seed in range(4):
            train, val = F._split_holdout(order, np.random.default_rng(seed))
            n_val = sum(len(v.centres) for v in val)
            n_train = sum(len(t.centres) for t in train)
            assert 0.1 * n <= n_val <= 0.4 * n and n_train >= 0.6 * n, (seed, [v.name for v in val])
            assert any(t.name == "small" for t in train)
    # several images of similar size: whole images, about a quarter of the cells
    same = [make_sample(*_pair(i, shape=(96, 96), n=6), name=f"im{i}") for i in range(4)]
    train, val = F._split_holdout(same, np.random.default_rng(0))
    assert len(val) == 1 and len(train) == 3 and not val[0].name.endswith("[holdout]")


def test_cell_centres_are_the_centres_of_mass_without_whole_image_grids():
    from scipy import ndimage as ndi

    from napari_wbc.core.train import cell_centres

    _, lab = _pair(3, shape=(120, 140), n=12)
    lab[lab == 4] = 0  # a missing id
    ids = np.unique(lab[lab > 0])
    np.testing.assert_allclose(cell_centres(lab), np.array(ndi.center_of_mass(lab > 0, lab, ids)), atol=1e-9)
    sparse = np.where(lab > 0, lab.astype(np.int64) * 10**9, 0)  # huge sparse ids: same centres, same order
    np.testing.assert_allclose(cell_centres(sparse), cell_centres(lab), atol=1e-9)
    assert cell_centres(np.zeros((8, 8), np.int32)).shape == (0, 2)


def test_cancel_during_the_first_evaluation_stops_before_training(tiny, tmp_path, monkeypatch):
    """Cancel was honoured only at the first training step (100 s on a big corrected smear)."""
    from napari_wbc.core import train as T

    def no_training(*a, **k):
        raise AssertionError("training started after cancel")

    monkeypatch.setattr(T, "train_segmenter", no_training)
    imgs, labs = zip(*[_pair(i, n=3) for i in range(4)])
    with pytest.raises(F.FinetuneCancelled):
        napari_wbc.finetune(list(imgs), list(labs), base=tiny, epochs=2, device="cpu",
                            output=tmp_path / "c.safetensors", should_stop=lambda: True)
    assert not (tmp_path / "c.safetensors").exists()


def test_cancel_while_the_data_is_prepared(tiny, tmp_path, monkeypatch):
    """Preparing a big corrected smear takes tens of seconds per step (float copies, cell tables,
    rescaling); a cancel waited for the first evaluation. Now it is honoured between images, and
    between rescaling images in train_segmenter."""
    from napari_wbc.core import train as T

    made, stop = [], []
    real_make = T.make_sample

    def counting_make(*a, **k):
        made.append(1)
        stop.append(True)  # the user clicks Cancel while the first image is prepared
        return real_make(*a, **k)

    monkeypatch.setattr(T, "make_sample", counting_make)
    imgs, labs = zip(*[_pair(i, n=3) for i in range(4)])
    with pytest.raises(F.FinetuneCancelled):
        napari_wbc.finetune(list(imgs), list(labs), base=tiny, epochs=2, device="cpu",
                            output=tmp_path / "c.safetensors", should_stop=lambda: bool(stop))
    assert len(made) == 1 and not (tmp_path / "c.safetensors").exists()

    from napari_wbc.core.models import build_from_card, read_card

    rescaled = []
    monkeypatch.setattr(T, "rescaled", lambda s, t: rescaled.append(s) or s)
    samples = [real_make(im, lb) for im, lb in zip(imgs, labs)]
    state, history = T.train_segmenter(build_from_card(read_card(tiny), tiny), read_card(tiny), samples, [],
                                       steps=2, batch_size=2, crop=32, should_stop=lambda: len(rescaled) >= 1)
    assert state is None and history == [] and len(rescaled) == 1


def test_the_hold_out_is_evaluated_once_per_epoch_and_the_card_has_the_kept_figures(tiny, tmp_path, monkeypatch):
    import json

    from napari_wbc.core import train as T

    calls = []

    def better_each_time(net, card, val, device, should_stop=None):
        calls.append(1)
        return {"matched_dice": 0.5 + 0.1 * len(calls), "precision": 1.0, "recall": 1.0, "f1": 1.0,
                "tp": len(calls), "fp": 0, "fn": 0, "n_images": len(val)}

    monkeypatch.setattr(T, "evaluate", better_each_time)
    monkeypatch.setattr(F, "STEPS_PER_EPOCH", 2)
    imgs, labs = zip(*[_pair(i, n=3) for i in range(4)])
    out = napari_wbc.finetune(list(imgs), list(labs), base=tiny, epochs=2, device="cpu",
                              output=tmp_path / "e.safetensors")
    assert len(calls) == 3  # the base once, then each epoch (was 5: the base twice, the kept weights again)
    ft = json.loads(out.with_suffix(".json").read_text())["finetune"]
    assert ft["holdout_before"]["tp"] == 1 and ft["holdout_after"]["tp"] == 3  # the kept (last, best) epoch's
    assert ft["history"][-1]["tp"] == 3
    assert 0 <= ft["train_time_s"] <= ft["wall_time_s"]  # the whole run, data preparation included


def test_the_hold_out_strip_shares_the_image_and_labels_are_not_copied():
    """A big smear's hold-out strip copied the whole float32 image again (12 B/px), and int32 labels
    were copied on the way in (4 B/px): 59 -> 43 B/px at the peak of preparing a 64 Mpx smear."""
    from napari_wbc.core.train import make_sample

    img, lab = _pair(0, shape=(64, 128), n=8)
    assert F._as_labels(lab, 0) is lab  # int32 labels as they are (read only from there on)
    s = make_sample(img, lab)
    (tr,), (va,) = F._strip_holdout(s)
    assert np.shares_memory(tr.rgb, s.rgb) and np.shares_memory(va.rgb, s.rgb)
    np.testing.assert_array_equal(np.concatenate([tr.rgb, va.rgb], axis=1), s.rgb)


def test_the_classifier_fine_tuned_is_the_one_the_segmenter_types_with(tmp_path, monkeypatch):
    """finetune started from a `<stem>_classifier` lying beside a base segmenter whose card names
    none, while napari, the CLI and the batch type that segmenter's cells with the shipped classifier
    (classifier_for): corrections were then learned on top of another classifier than the one shown."""
    import shutil

    from napari_wbc.core import classifier_finetune as CF
    from napari_wbc.core.finetune import classifier_for
    from napari_wbc.core.testing import make_tiny_classifier

    seg = make_tiny_segmenter(tmp_path / "seg.safetensors", target_diameter=16)  # its card names no classifier
    make_tiny_classifier(tmp_path / "seg_classifier.safetensors")  # a stray file beside it
    assert classifier_for(seg) is None
    bases = []

    def fake_classifier(images, labels, cell_types, *, base, output, **kw):
        bases.append(base)
        shutil.copy(tmp_path / "seg_classifier.safetensors", output)
        shutil.copy(tmp_path / "seg_classifier.json", output.with_suffix(".json"))
        return output

    monkeypatch.setattr(CF, "finetune_classifier", fake_classifier)
    monkeypatch.setattr(CF, "check_cell_types", lambda *a: None)
    imgs, labs = zip(*[_pair(i, n=3) for i in range(2)])
    napari_wbc.finetune(list(imgs), list(labs), base=seg, epochs=1, device="cpu",
                        output=tmp_path / "ft.safetensors", cell_types=[{1: "neutrophil"}] * 2)
    assert bases == [None]  # the shipped classifier, as classifier_for says


def test_training_sees_uneven_light_evened_out_as_segment_does():
    """A user's smear under a brightness gradient trains the network on the evenly lit smear, as
    segment() and classify() show it to the network (training on the dim one taught it the wrong
    thing); an evenly lit smear is taken as it is."""
    from test_segment import _dimmed, _red_cells

    from napari_wbc.core.train import make_sample

    img = _red_cells()
    lab = np.zeros(img.shape[:2], np.int32)
    lab[40:70, 40:70] = 1
    even = make_sample(img, lab, diameter=30).rgb
    np.testing.assert_array_equal(even, img.astype(np.float32) / 255)
    dim = _dimmed(img, "gradient")
    got = make_sample(dim, lab, diameter=30).rgb
    raw = dim.astype(np.float32) / 255
    assert np.abs(got - even).mean() < 0.3 * np.abs(raw - even).mean()


def test_a_greyscale_smear_trains_in_the_colours_segment_shows_it(tmp_path, monkeypatch, tiny_segmenter):
    """segment() colours a greyscale camera's smear by its card's grey_colours table; fine-tuning on
    such a smear trains on the same colours (the base card's table; it carries over to the new card)."""
    import json
    import shutil

    from test_segment import GREY_TABLE, _red_cells

    from napari_wbc.core import segment as S
    from napari_wbc.core import train

    base = tmp_path / "grey_seg.safetensors"
    shutil.copy(tiny_segmenter, base)
    card = json.loads(tiny_segmenter.with_suffix(".json").read_text())
    card["grey_colours"] = GREY_TABLE
    base.with_suffix(".json").write_text(json.dumps(card))

    class Seen(Exception):
        pass

    def spy(image, labels, **k):
        raise Seen(image)

    monkeypatch.setattr(train, "make_sample", spy)
    grey = np.repeat(_red_cells().mean(-1, keepdims=True), 3, -1).astype(np.uint8)
    lab = np.zeros(grey.shape[:2], np.int32)
    lab[40:70, 40:70] = 1
    with pytest.raises(Seen) as got:
        F.finetune([grey], [lab], base=str(base), output=tmp_path / "out.safetensors", device="cpu", epochs=1)
    np.testing.assert_array_equal(got.value.args[0], S.grey_to_colour(grey, GREY_TABLE))


def _one_cell_images(kind, n, seed):
    """``n`` 48 x 48 images of one 16 px cell each: ``plain`` discs, or ``spotted`` (a dark centre)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:48, :48]
    imgs, labs = [], []
    for _ in range(n):
        cy, cx = rng.integers(18, 30, 2)
        img = np.full((48, 48, 3), 230, np.uint8)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 64
        img[disc] = (150, 110, 180)
        if kind == "spotted":
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 12] = (60, 20, 90)
        imgs.append(img)
        labs.append(disc.astype(np.int32))
    return imgs, labs


def test_distillation_loss_is_zero_only_where_the_networks_agree():
    import torch

    from napari_wbc.core.classifier_finetune import distillation_loss

    a = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    assert float(distillation_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(a, a.flip(1))) > 0.1


def test_classifier_fine_tuning_is_held_to_its_bases_calls(tmp_path, monkeypatch):
    """Corrections of a lab's cells are mostly of one or two types, and fine-tuning on them alone made the
    classifier call other types that too (Tecom: 10 least-confident cells, 9 neutrophils, took balanced
    accuracy 0.997 -> 0.756). The base's own calls are distilled into the new network: with their weight
    very high, cells re-typed against the base keep the base's type; at 0 the same run re-types them."""
    from napari_wbc.core import classifier_finetune as CF
    from napari_wbc.core.testing import make_tiny_classifier

    def types(model, imgs, labs):
        return [napari_wbc.classify(i, lab, model=model, device="cpu")["cell_type"][0] for i, lab in zip(imgs, labs)]

    monkeypatch.setattr(CF, "DISTILL_WEIGHT", 0.0)
    plain, plain_l = _one_cell_images("plain", 8, 0)
    spotted, spotted_l = _one_cell_images("spotted", 8, 1)
    base = CF.finetune_classifier(plain + spotted, plain_l + spotted_l,
                                  [{1: "neutrophil"}] * 8 + [{1: "lymphocyte"}] * 8,
                                  base=make_tiny_classifier(tmp_path / "random.safetensors"),
                                  output=tmp_path / "base.safetensors", device="cpu", epochs=6)
    test, test_l = _one_cell_images("spotted", 6, 3)
    assert types(base, test, test_l) == ["lymphocyte"] * 6  # the base learned the spotted cells
    retyped, retyped_l = _one_cell_images("spotted", 8, 4)
    free = CF.finetune_classifier(retyped, retyped_l, [{1: "monocyte"}] * 8, base=base,
                                  output=tmp_path / "free.safetensors", device="cpu", epochs=30)
    assert types(free, test, test_l) == ["monocyte"] * 6
    monkeypatch.setattr(CF, "DISTILL_WEIGHT", 30.0)
    held = CF.finetune_classifier(retyped, retyped_l, [{1: "monocyte"}] * 8, base=base,
                                  output=tmp_path / "held.safetensors", device="cpu", epochs=30)
    assert types(held, test, test_l) == ["lymphocyte"] * 6
    assert read_card(held)["finetune"]["distillation"] == {"weight": 30.0, "temperature": CF.DISTILL_TEMPERATURE}
