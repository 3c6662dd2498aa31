"""segment(): contract, tiling, bad input (tiny random networks, CPU)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import napari_wbc
from napari_wbc.core import segment as S
from napari_wbc.core.testing import make_tiny_segmenter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_segmenter(tmp_path_factory.mktemp("m") / "tiny.safetensors", target_diameter=16)


def _discs(shape=(96, 128), centres=((30, 30), (60, 90)), r=10):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape + (3,), 230, np.uint8)
    for cy, cx in centres:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (90, 40, 140)
    return img


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("channels", [None, 3, 4])
def test_contract_shape_dtype(tiny, dtype, channels):
    img = _discs().astype(dtype)
    if channels is None:
        img = img[..., 0]
    elif channels == 4:
        img = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, img.dtype)], -1)
    lab = napari_wbc.segment(img, model=tiny, device="cpu", diameter=20)
    assert lab.shape == img.shape[:2]
    assert lab.dtype == np.int32
    ids = np.unique(lab)
    assert ids[0] >= 0
    # labels are 0..N without gaps
    assert set(ids[ids > 0]) == set(range(1, lab.max() + 1))


def test_diameter_auto_runs(tiny):
    lab = napari_wbc.segment(_discs(), model=tiny, device="cpu")
    assert lab.shape == (96, 128)


def test_instances_from_maps_splits_touching_cells():
    # two touching discs: one foreground component, two distance peaks
    yy, xx = np.mgrid[:60, :100]
    d1 = np.clip(1 - np.hypot(yy - 30, xx - 35) / 20, 0, 1)
    d2 = np.clip(1 - np.hypot(yy - 30, xx - 68) / 20, 0, 1)
    dist = np.maximum(d1, d2)
    fg = (dist > 0).astype(np.uint8) * 255
    lab = S.instances_from_maps(fg, (dist * 255).astype(np.uint8), min_area=50)
    assert lab.max() == 2
    assert lab[30, 35] != lab[30, 68]


def test_instances_from_maps_drops_small_objects():
    fg = np.zeros((50, 50), np.uint8)
    fg[5:8, 5:8] = 255  # 9 px "platelet"
    fg[20:40, 20:40] = 255  # 400 px cell
    dist = fg.copy()
    lab = S.instances_from_maps(fg, dist, min_area=50)
    assert lab.max() == 1 and lab[30, 30] == 1 and lab[6, 6] == 0


def test_tiled_equals_untiled_probabilities(tiny):
    """Tiles keep only their centres: away from the receptive field's reach the seams vanish."""
    from napari_wbc.core.device import resolve_device
    from napari_wbc.core.models import load_model

    rng = np.random.default_rng(1)
    x = rng.random((200, 260, 3)).astype(np.float32)
    net, _ = load_model(tiny, "segmenter", "cpu")
    dev = resolve_device("cpu")

    def run(tile):
        for item in S.iter_probabilities(x, net, dev, tile=tile, margin=64, batch_size=3):
            if item[0] == "probs":
                return item[1].astype(int), item[2].astype(int)

    fg1, d1 = run(tile=1024)  # one window (16 px of padding at the image border)
    fg2, d2 = run(tile=192)  # 2x3 windows with 64 px margins
    inner = (slice(32, -32), slice(32, -32))  # the border sees different padding, not seams
    assert np.abs(fg1 - fg2)[inner].max() <= 2  # uint8 probability units (1/255)
    assert np.abs(d1 - d2)[inner].max() <= 2


class _RunsOutOfMemory(__import__("torch").nn.Module):
    """Wraps a network: a batch larger than ``fits`` raises the device's out-of-memory error."""

    def __init__(self, net, fits, error):
        super().__init__()
        self.net, self.fits, self.error, self.batches = net, fits, error, []

    def parameters(self, recurse=True):
        return self.net.parameters(recurse)

    def forward(self, x):
        self.batches.append(x.shape[0])
        if x.shape[0] > self.fits:
            raise self.error
        return self.net(x)


@pytest.mark.parametrize("error", ["cuda", "runtime"])
def test_out_of_device_memory_retries_with_smaller_batches(tiny, error):
    """A GPU that cannot hold 8 tiles at once gets them in smaller batches, with the same result;
    one that cannot hold a single tile gets a MemoryError that says what to do."""
    import torch

    from napari_wbc.core.device import resolve_device
    from napari_wbc.core.models import load_model

    err = torch.cuda.OutOfMemoryError("CUDA out of memory.") if error == "cuda" else RuntimeError(
        "MPS backend out of memory (MPS allocated: 1 GB)")
    x = np.random.default_rng(2).random((300, 300, 3)).astype(np.float32)
    net, _ = load_model(tiny, "segmenter", "cpu")
    dev = resolve_device("cpu")

    def probs(model, batch_size):
        items = list(S.iter_probabilities(x, model, dev, tile=128, margin=16, batch_size=batch_size))
        return items[-1][1:], [i for i in items if i[0] == "progress"]

    want, want_progress = probs(net, 1)
    small = _RunsOutOfMemory(net, 2, err)
    got, progress = probs(small, 8)
    assert all((a == b).all() for a, b in zip(got, want))
    assert small.batches[:3] == [8, 4, 2] and max(small.batches[3:]) <= 2
    n_tiles = want_progress[-1][2]
    assert n_tiles == 16 and sum(small.batches[2:]) == n_tiles  # every tile once, once it fits
    assert progress[-1][1] == progress[-1][2] == n_tiles
    with pytest.raises(MemoryError, match="device='cpu'"):
        probs(_RunsOutOfMemory(net, 0, err), 8)
    with pytest.raises(RuntimeError, match="something else"):  # other errors are not retried
        probs(_RunsOutOfMemory(net, 0, RuntimeError("something else")), 8)


def test_windows_normalised_as_cut_equal_a_normalised_image(tiny):
    """Raw uint8 with its ranges gives the same probabilities as the image normalised beforehand."""
    from napari_wbc.core.device import resolve_device
    from napari_wbc.core.models import load_model

    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (150, 420, 3)).astype(np.uint8)
    ranges = S.channel_ranges(raw)
    net, _ = load_model(tiny, "segmenter", "cpu")
    dev = resolve_device("cpu")

    def run(x, r):
        for item in S.iter_probabilities(x, net, dev, tile=192, margin=32, ranges=r):
            if item[0] == "probs":
                return item[1], item[2]

    a, b = run(S.normalise(raw, ranges), None), run(raw, ranges)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()


def test_tiled_labels_equal_untiled(tmp_path, monkeypatch):
    """Same labels from one window and from many tiles (a decisive random net: head scaled up)."""
    import torch

    monkeypatch.setenv("NAPARI_WBC_CPU_BF16", "0")  # float32: the random net is too fragile for bfloat16

    from napari_wbc.core.models import build_network, read_card, save_model

    p = make_tiny_segmenter(tmp_path / "t.safetensors", target_diameter=16, seed=3)
    card = read_card(p)
    net = build_network(card["arch"])
    from safetensors.torch import load_file

    net.load_state_dict(load_file(str(p)))
    with torch.no_grad():  # a decisive net: probabilities far from 0.5 except at edges
        for prm in net.segmentation_head.parameters():
            prm.mul_(4.0)
    p2 = save_model(net, card, tmp_path / "decisive.safetensors")
    img = np.tile(_discs(), (3, 3, 1))
    out = {}
    for tile in (2048, 256):  # one window vs several windows with 64 px margins
        for item in S.iter_segment(img, model=p2, device="cpu", diameter=20, tile=tile):
            if item[0] == "labels":
                out[tile] = item[1]
    a, b = out[2048], out[256]
    assert 0 < (a > 0).mean() < 1
    # seams move a few boundary pixels at most (receptive field > margin); cells stay the same
    assert ((a > 0) == (b > 0)).mean() > 0.995
    assert abs(int(a.max()) - int(b.max())) <= max(1, 0.1 * a.max())


def test_progress_reports_tiles(tiny):
    calls = []
    napari_wbc.segment(np.tile(_discs(), (4, 4, 1)), model=tiny, device="cpu", diameter=16, progress=lambda d, t: calls.append((d, t)))
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] >= 1


def test_generator_can_stop_early(tiny):
    gen = S.iter_segment(np.tile(_discs(), (4, 4, 1)), model=tiny, device="cpu", diameter=16, tile=128)
    first = [next(gen) for _ in range(2)]
    gen.close()  # cancel: nothing returned, no error
    assert first[0][0] == "diameter"


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((0, 0, 3), np.uint8), "empty"),
        (np.zeros((4, 32, 32, 3), np.uint8), "shape"),
        (np.zeros((32, 32, 5), np.uint8), "shape"),
        (np.full((32, 32, 3), np.nan, np.float32), "NaN"),
        (np.zeros((32, 32, 3), bool), "dtype"),
        (np.zeros((32, 32, 3), complex), "dtype"),
        (np.zeros((4, 4, 3), np.uint8), "too small"),
    ],
)
def test_bad_input(tiny, bad, match):
    with pytest.raises(ValueError, match=match):
        napari_wbc.segment(bad, model=tiny, device="cpu")


@pytest.mark.parametrize("d", [0, -5, float("nan"), "big", True, 1, 0.3, 3.9])
def test_bad_diameter(tiny, d):
    with pytest.raises(ValueError, match="diameter"):
        napari_wbc.segment(_discs(), model=tiny, device="cpu", diameter=d)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("value", [0, 1])
def test_a_flat_image_has_no_cells(dtype, value):
    """All black (the red-cell estimate once divided by zero there) or all white: no cell, no error
    (the shipped model: a random network may call anything a cell)."""
    top = {np.uint8: 255, np.uint16: 65535, np.float32: 1.0}[dtype]
    img = np.full((120, 150, 3), value * top, dtype)
    lab = napari_wbc.segment(img, device="cpu")
    assert lab.shape == (120, 150) and lab.max() == 0


def test_bad_model_and_device(tmp_path, tiny):
    with pytest.raises(ValueError, match="does not exist"):
        napari_wbc.segment(_discs(), model=tmp_path / "nope.safetensors", device="cpu")
    with pytest.raises(ValueError, match="not available|not a valid"):
        napari_wbc.segment(_discs(), model=tiny, device="tpu9")


def test_cell_table():
    lab = np.zeros((20, 20), np.int32)
    lab[2:5, 2:6] = 3
    lab[10:12, 10:11] = 7
    t = S.cell_table(lab)
    assert list(t["label"]) == [3, 7]
    assert list(t["area"]) == [12, 2]
    assert {"centroid-0", "centroid-1", "bbox-0", "bbox-3"} <= set(t.columns)
    assert len(S.cell_table(np.zeros((5, 5), int))) == 0


def test_estimate_diameter_scales_with_zoom():
    from skimage.transform import rescale

    from napari_wbc.core.scale import estimate_diameter

    rng = np.random.default_rng(0)
    img = np.full((300, 300, 3), 235, np.uint8)
    yy, xx = np.mgrid[:300, :300]
    for _ in range(40):  # "red cells" of radius 9
        cy, cx = rng.integers(10, 290, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 81] = (200, 120, 130)
    d1 = estimate_diameter(img)
    d2 = estimate_diameter((rescale(img, 2, channel_axis=-1, preserve_range=True)).astype(np.uint8))
    assert 1.6 < d2 / d1 < 2.4


def test_estimate_diameter_on_a_large_smear_uses_full_resolution():
    """A big smear tiled from a small one gets the same estimate (not one from a blurred thumbnail)."""
    from napari_wbc.core.scale import estimate_diameter

    rng = np.random.default_rng(1)
    img = np.full((400, 400, 3), 235, np.uint8)
    yy, xx = np.mgrid[:400, :400]
    for _ in range(60):
        cy, cx = rng.integers(10, 390, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = (200, 120, 130)
    d_small = estimate_diameter(img)
    d_big = estimate_diameter(np.tile(img, (10, 10, 1)))  # 4000 x 4000
    assert abs(d_big / d_small - 1) < 0.15


def test_inference_network_folds_batchnorm_and_keeps_outputs():
    import torch

    from napari_wbc.core.models import build_network, inference_network
    from napari_wbc.core.testing import TINY_SEGMENTER_ARCH

    torch.manual_seed(0)
    net = build_network(TINY_SEGMENTER_ARCH).eval()
    with torch.no_grad():  # trained-looking batch-norm statistics, so folding them is not a no-op
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    fast = inference_network(net)
    n_bn = lambda m: sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    assert n_bn(fast) < n_bn(net)  # some were folded into their convolutions
    x = torch.rand(2, 3, 64, 96)
    with torch.inference_mode():
        ref = net(x)
        out = fast(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, atol=1e-4)
    assert n_bn(net) > 0 and net(x).shape == ref.shape  # the original is left as it was


def test_shipped_segmenter_has_every_batch_norm_folded():
    """timm's fused batch-norm + activation modules are folded too (none is left as a bare call)."""
    import torch

    from napari_wbc.core.models import build_network, inference_network, read_card, resolve_model_path

    card = read_card(resolve_model_path(None, "segmenter"))
    net = build_network(card["arch"]).eval()
    fast = inference_network(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert "batch_norm" not in getattr(fast, "code", "batch_norm")  # traced, with no functional batch norm
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(fast(x.contiguous(memory_format=torch.channels_last)), net(x), atol=1e-4)


def test_open_cross_matches_scipy():
    from scipy import ndimage as ndi

    from napari_wbc.core.scale import open_cross

    rng = np.random.default_rng(1)
    for shape in ((1, 1), (2, 7), (3, 3), (40, 57)):
        for p in (0.3, 0.6, 0.9, 1.0):
            m = rng.random(shape) < p
            assert (open_cross(m) == ndi.binary_opening(m)).all(), (shape, p)


def test_fill_holes_matches_scipy():
    from scipy import ndimage as ndi

    from napari_wbc.core.scale import fill_holes

    rng = np.random.default_rng(0)
    for p in (0.3, 0.5, 0.7):
        m = ndi.binary_opening(rng.random((60, 80)) < p)
        assert (fill_holes(m) == ndi.binary_fill_holes(m)).all()
    ring = np.zeros((20, 20), bool)
    ring[5:15, 5:15] = True
    ring[8:12, 8:12] = False
    assert fill_holes(ring)[10, 10] and fill_holes(ring).sum() == 100


def test_uint8_channel_ranges_equal_numpy_percentiles():
    rng = np.random.default_rng(1)
    for n in (1, 7, 1000):
        v = rng.integers(0, 256, (n, 3)).astype(np.uint8)
        ref = np.percentile(v.astype(np.float32), [0.5, 99.5], axis=0)
        np.testing.assert_allclose(S._percentiles_u8(v, (0.5, 99.5)), ref, rtol=0, atol=1e-4)


def test_estimated_scale_falls_back_when_nothing_is_found(tiny, monkeypatch):
    monkeypatch.setattr(S, "instances_from_maps", lambda fg, dist, min_area: np.zeros(fg.shape, np.int32))
    img = _discs()
    items = list(S.iter_segment(img, model=tiny, device="cpu"))
    ds = [it[1] for it in items if it[0] == "diameter"]
    assert len(ds) == 1 + len(S.FALLBACK_FACTORS)
    assert ds[1] == pytest.approx(ds[0] * S.FALLBACK_FACTORS[0])
    assert items[-1][0] == "labels" and items[-1][1].max() == 0
    # a diameter the user gave is trusted: one pass only
    items = list(S.iter_segment(img, model=tiny, device="cpu", diameter=20))
    assert [it[1] for it in items if it[0] == "diameter"] == [20.0]


def test_estimate_diameter_fits_inside_the_image():
    """A tight crop around one big cell: the estimate never exceeds the crop (0.8 of its longer side)."""
    from napari_wbc.core.scale import MAX_SHARE_OF_SIDE, estimate_diameter

    img = np.full((100, 110, 3), 235, np.uint8)
    yy, xx = np.mgrid[:100, :110]
    img[(yy - 50) ** 2 + (xx - 55) ** 2 < 40**2] = (150, 90, 160)  # one cell 80 px across fills the crop
    d = estimate_diameter(img)
    assert d <= MAX_SHARE_OF_SIDE * 110 + 1e-6
    big = np.pad(img, ((300, 300), (300, 300), (0, 0)), constant_values=235)
    assert estimate_diameter(big) > d  # the same cell in a wide field is not capped


def test_estimate_diameter_of_a_thin_strip_is_not_capped():
    """A strip cut from a smear keeps the smear's red-cell estimate (no red cells made into WBCs)."""
    from napari_wbc._sample_data import make_sample_data
    from napari_wbc.core.scale import estimate_diameter

    [(rgb, _, _)] = make_sample_data()
    strip = rgb[:40]  # 40 x 640, above the sample's one WBC
    assert estimate_diameter(strip) > 40


def test_cpu_bfloat16_gives_the_same_cells_as_float32(monkeypatch):
    """The shipped model on the shipped smear: bfloat16 on CPU changes next to no pixel."""
    from napari_wbc._sample_data import make_sample_data

    [(rgb, _, _)] = make_sample_data()
    import torch

    from napari_wbc.core.models import load_model

    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("NAPARI_WBC_CPU_BF16", flag)
        out[flag] = napari_wbc.segment(rgb, device="cpu", diameter=200)
        net, _ = load_model(None, "segmenter", "cpu")  # stored in the precision it runs in
        assert next(net.parameters()).dtype == (torch.bfloat16 if flag == "1" else torch.float32)
    assert out["0"].max() >= 1 and out["1"].max() == out["0"].max()
    assert ((out["0"] > 0) == (out["1"] > 0)).mean() > 0.999


def test_cpu_bf16_switch(monkeypatch):
    from napari_wbc.core import device as D

    monkeypatch.setenv("NAPARI_WBC_CPU_BF16", "0")
    assert D.cpu_bf16_fast() is False
    monkeypatch.setenv("NAPARI_WBC_CPU_BF16", "1")
    assert D.cpu_bf16_fast() is True
    monkeypatch.delenv("NAPARI_WBC_CPU_BF16")
    assert D.cpu_bf16_fast() == D._cpu_has_bf16()


def test_foreground_keeps_a_dark_nucleus_of_an_under_exposed_crop():
    """Dark areas enclosed by the field are cells, not out-of-field vignetting."""
    from napari_wbc.core.scale import foreground

    yy, xx = np.mgrid[:120, :120]
    img = np.full((120, 120, 3), 200, np.float32)  # background
    img[(yy - 60) ** 2 + (xx - 60) ** 2 < 35**2] = (150, 120, 160)  # cytoplasm
    nucleus = (yy - 60) ** 2 + (xx - 78) ** 2 < 22**2  # eccentric: it reaches the cell's edge
    img[nucleus] = (25, 10, 40)  # darker than a quarter of the background
    fg = foreground(img)
    assert fg[nucleus].mean() > 0.95
    img[:, :15] = 0  # a black slide edge along one side stays out of the field
    assert not foreground(img)[:, :10].any()


def _lobes(red_cells: bool):
    """Labels of three touching lobe-sized 'cells' at network scale (target 16 px) and the image they came from."""
    yy, xx = np.mgrid[:64, :64]
    small = np.zeros((64, 64), np.int32)
    img = np.full((64, 64, 3), 230, np.uint8)
    for i, (cy, cx) in enumerate(((26, 26), (26, 38), (38, 32)), start=1):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 7**2
        small[disc & (small == 0)] = i
        img[disc] = (90, 40, 140)
    if red_cells:
        for cy, cx in ((6, 6), (6, 56), (56, 6), (56, 56), (6, 30), (58, 32)):
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 5**2] = (200, 120, 130)
    return small, img


def test_one_cluster_growth():
    small, img = _lobes(red_cells=False)
    g = S._one_cluster_growth(small, 16.0, img)
    assert g is not None and S.CLUSTER_GROWTH[0] <= g <= S.CLUSTER_GROWTH[1]
    # red cells around it: the estimate had them to go by, so the cells are read as they are
    small, img = _lobes(red_cells=True)
    assert S._one_cluster_growth(small, 16.0, img) is None
    # two cells far apart are not one cluster; one cell is nothing to merge
    far = np.zeros((64, 64), np.int32)
    far[5:15, 5:15], far[50:60, 50:60] = 1, 2
    assert S._one_cluster_growth(far, 16.0, np.full((64, 64, 3), 230, np.uint8)) is None
    assert S._one_cluster_growth((small == 1).astype(np.int32), 16.0, img) is None


def _two_readings(tiny, monkeypatch, first, second, cluster=None, body=None):
    """Run iter_segment (diameter estimated) with the network's cells ``first`` at the first scale and
    ``second(shape)`` at the scale the cluster (or one-cell) check asks for, the checks' growth given;
    return the diameters passed and the labels."""
    calls = []

    def fake(fg, dist, min_area):
        calls.append(fg.shape)
        if len(calls) == 2:  # the pass at the checked scale
            return second(fg.shape)
        return S._resize(first, fg.shape, order=0)

    monkeypatch.setattr(S, "instances_from_maps", fake)
    monkeypatch.setattr(S, "_one_cluster_growth", lambda small, target, x: cluster)
    monkeypatch.setattr(S, "_one_body_growth", lambda small, target, x, shading=None, outside=None: body)
    items = list(S.iter_segment(_discs(), model=tiny, device="cpu", refine=True))
    return [it[1] for it in items if it[0] == "diameter"], items[-1][1]


def test_a_cluster_is_read_as_one_cell_only_if_the_network_says_so(tiny, monkeypatch):
    lobes, _ = _lobes(red_cells=False)

    def run(second):
        return _two_readings(tiny, monkeypatch, lobes, second, cluster=1.8)

    def one_cell(shape):
        out = np.zeros(shape, np.int32)
        out[shape[0] // 4 : 3 * shape[0] // 4, shape[1] // 4 : 3 * shape[1] // 4] = 1
        return out

    ds, labels = run(one_cell)
    assert ds[1] == pytest.approx(ds[0] * 1.8) and labels.max() == 1
    # the larger scale does not give one cell: the first reading is kept, at its own diameter
    ds, labels = run(lambda shape: np.zeros(shape, np.int32))
    assert ds[1] == pytest.approx(ds[0] * 1.8) and ds[2] == pytest.approx(ds[0])
    assert labels.max() == 3


def _cell_seen_too_large(red_cells: bool = False, touching: bool = False):
    """An image at network scale (target 16 px) of one WBC 40 px across (pale cytoplasm, three dark
    lobes) and the labels of a network that outlined one lobe only."""
    yy, xx = np.mgrid[:64, :64]
    img = np.full((64, 64, 3), 230, np.uint8)
    img[(yy - 32) ** 2 + (xx - 32) ** 2 < 20**2] = (150, 125, 185)  # cytoplasm
    small = np.zeros((64, 64), np.int32)
    for i, (cy, cx) in enumerate(((24, 24), (24, 40), (40, 32))):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 7**2
        img[disc] = (90, 40, 140)
        if i == 0:
            small[disc] = 1
    if red_cells:
        for cy, cx in ((5, 5), (5, 58), (58, 5), (58, 58), (5, 32), (59, 32), (32, 4), (32, 59)):
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 5**2] = (200, 120, 130)
    if touching:  # a whole WBC found, with pale red cells touching it: no other dark parts beside it
        img[:] = 230
        for cy, cx in ((32, 12), (32, 52), (12, 32), (52, 32)):
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 9**2] = (200, 120, 130)
        cell = (yy - 32) ** 2 + (xx - 32) ** 2 < 12**2
        img[cell] = (150, 125, 185)
        img[(yy - 32) ** 2 + (xx - 32) ** 2 < 7**2] = (90, 40, 140)
        small = cell.astype(np.int32)
    return small, img


def test_one_body_growth():
    """One lobe found of a cell seen too large: the scale that makes the stained region one cell."""
    small, img = _cell_seen_too_large()
    g = S._one_body_growth(small, 16.0, img)
    assert g is not None and S.BODY_GROWTH_MIN <= g <= S.CLUSTER_GROWTH[1]
    assert g == pytest.approx(40 / 16, rel=0.15)
    # red cells all around: the estimate had them to go by
    lobe, crowded = _cell_seen_too_large(red_cells=True)
    assert S._one_body_growth(lobe, 16.0, crowded) is None
    # the whole cell found: nothing is missing
    yy, xx = np.mgrid[:64, :64]
    whole = ((yy - 32) ** 2 + (xx - 32) ** 2 < 20**2).astype(np.int32)
    assert S._one_body_growth(whole, 16.0, img) is None
    # a whole WBC with paler red cells touching it: its region is larger, but holds no more nucleus
    small, img = _cell_seen_too_large(touching=True)
    assert S._one_body_growth(small, 16.0, img) is None
    # two cells are the cluster check's
    two = small.copy()
    two[:4, :4] = 2
    assert S._one_body_growth(two, 16.0, img) is None


def test_a_dim_edge_beside_a_whole_cell_is_not_more_nucleus():
    """Under uneven light (a soft field edge) the dim smear beside a whole cell is as dark as its
    nucleus; the check looks at the image under even light, as the network does."""
    small, img = _cell_seen_too_large(touching=True)
    img[:] = 230
    yy, xx = np.mgrid[:64, :64]
    img[(yy - 32) ** 2 + (xx - 32) ** 2 < 12**2] = (150, 125, 185)
    img[(yy - 32) ** 2 + (xx - 32) ** 2 < 7**2] = (90, 40, 140)
    light = np.ones((64, 64), np.float32)
    light[20:44, 44:58] = 0.15  # a dim patch touching the cell
    dimmed = np.round(img * S.light_window(light, (0, 0), (64, 64), (64, 64))[..., None]).astype(np.uint8)
    assert S._one_body_growth(small, 16.0, dimmed) is not None  # read as more nucleus
    assert S._one_body_growth(small, 16.0, dimmed, shading=light) is None


def test_a_part_is_read_as_the_whole_cell_only_if_the_network_finds_it_grown(tiny, monkeypatch):
    part, _ = _cell_seen_too_large()

    def run(second):
        return _two_readings(tiny, monkeypatch, part, second, body=2.0)

    def centred(r):  # one disc of radius r (share of the side) around the lobe's place
        def make(shape):
            yy, xx = np.mgrid[: shape[0], : shape[1]]
            cy, cx = 24 / 64 * shape[0], 24 / 64 * shape[1]
            return (((yy - cy) / shape[0]) ** 2 + ((xx - cx) / shape[1]) ** 2 < r**2).astype(np.int32)
        return make

    ds, labels = run(centred(0.3))  # the whole cell: far larger than the lobe, holding it
    assert ds[1] == pytest.approx(ds[0] * 2.0) and labels.max() == 1
    grown = (labels > 0).mean()
    # the same part seen coarser (not grown): the first reading is kept, at its own diameter
    ds, labels = run(centred(0.11))
    assert ds[1] == pytest.approx(ds[0] * 2.0) and ds[2] == pytest.approx(ds[0])
    assert labels.max() == 1 and (labels > 0).mean() < grown / 3
    # nothing at the larger scale: the first reading too
    ds, labels = run(lambda shape: np.zeros(shape, np.int32))
    assert ds[2] == pytest.approx(ds[0]) and labels.max() == 1


def test_cpu_segmenter_runs_traced_and_equals_the_eager_network(tiny, monkeypatch):
    """On CPU the segmenter runs through a frozen trace: same outputs at any size and batch; off with NAPARI_WBC_JIT=0."""
    import torch

    from napari_wbc.core.models import load_model
    from napari_wbc.core.nets import TracedNetwork

    monkeypatch.setenv("NAPARI_WBC_CPU_BF16", "0")
    net, _ = load_model(tiny, "segmenter", "cpu")
    assert isinstance(net, TracedNetwork) and net.traced is not None
    for shape in ((1, 3, 64, 64), (2, 3, 96, 160), (1, 3, 224, 32)):  # sizes other than the traced one
        x = torch.rand(*shape).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out, ref = net(x), net.eager(x)
        assert out.shape == (shape[0], 2, *shape[2:])
        assert torch.allclose(out, ref, atol=1e-5)
    monkeypatch.setenv("NAPARI_WBC_JIT", "0")
    eager, _ = load_model(tiny, "segmenter", "cpu")
    assert not isinstance(eager, TracedNetwork)


def test_tracing_shows_no_deprecation_notice(tiny):
    """torch.jit's deprecation notices are hidden (the eager fallback covers its removal); other warnings are not."""
    import warnings

    import torch

    from napari_wbc.core.models import build_network, read_card
    from napari_wbc.core.nets import TracedNetwork

    net = build_network(read_card(tiny)["arch"]).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TracedNetwork(net, torch.rand(1, 3, 64, 64))
        warnings.warn("a FutureWarning of someone else", FutureWarning)
    messages = [str(w.message) for w in caught]
    assert not any("deprecated" in m and "torch.jit" in m for m in messages), messages
    assert "a FutureWarning of someone else" in messages


def test_traced_network_falls_back_to_eager_when_the_trace_fails(tiny):
    import torch

    from napari_wbc.core.models import build_network, read_card
    from napari_wbc.core.nets import TracedNetwork

    net = build_network(read_card(tiny)["arch"]).eval()
    wrapped = TracedNetwork(net, torch.rand(1, 3, 64, 64))

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    wrapped.traced = Broken()
    x = torch.rand(1, 3, 64, 64)
    with pytest.warns(RuntimeWarning, match="eagerly"):
        out = wrapped(x)
    with torch.inference_mode():
        assert torch.equal(out, net(x)) and wrapped.traced is None
    untraceable = TracedNetwork(net, torch.rand(1, 5, 64, 64))  # wrong channel count: tracing fails
    assert untraceable.traced is None and untraceable(x).shape == (1, 2, 64, 64)


def test_a_trace_that_disagrees_or_a_new_python_keeps_the_eager_network(tiny, monkeypatch):
    import sys

    import torch

    from napari_wbc.core.models import build_network, read_card
    from napari_wbc.core.nets import TracedNetwork

    net = build_network(read_card(tiny)["arch"]).eval()
    example = torch.rand(1, 3, 64, 64)
    assert TracedNetwork(net, example).traced is not None
    freeze = torch.jit.freeze

    class Off(torch.nn.Module):  # a "trace" whose output is off by one
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x) + 1

    monkeypatch.setattr(torch.jit, "freeze", lambda m: Off(freeze(m)))
    assert TracedNetwork(net, example).traced is None
    monkeypatch.setattr(torch.jit, "freeze", freeze)
    monkeypatch.setattr(sys, "version_info", (3, 14, 0))
    assert TracedNetwork(net, example).traced is None


def test_percentile_from_counts_matches_numpy():
    from napari_wbc.core.scale import percentile_from_counts

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 1000):
        v = rng.integers(0, 50, n)
        counts = np.bincount(v)
        for q in (0, 10, 50, 90, 99, 100):
            assert percentile_from_counts(counts, q) == pytest.approx(np.percentile(v, q), abs=1e-9)
            root = percentile_from_counts(counts, q, np.sqrt(np.arange(len(counts))))
            assert root == pytest.approx(np.percentile(np.sqrt(v), q), abs=1e-9)


def test_red_cell_radius_of_discs_and_dtype_invariance():
    """Discs of radius 9 read as radius ~9, the same from uint8, uint16 and float input."""
    from napari_wbc.core.scale import estimate_rbc_radius, foreground

    img = np.full((160, 200, 3), 225, np.uint8)
    yy, xx = np.mgrid[:160, :200]
    for cy in range(15, 160, 26):
        for cx in range(15, 200, 26):
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 81] = (205, 120, 125)
    r = estimate_rbc_radius(img)
    assert 8.0 <= r <= 10.0
    from scipy import ndimage as ndi

    fg = foreground(img)  # the histogram of integer squared distances gives numpy's percentile exactly
    assert r == pytest.approx(np.percentile(ndi.distance_transform_edt(fg)[fg], 90) / 0.684, rel=1e-9)
    as_float = img.astype(np.float32) / 255
    as_u16 = img.astype(np.uint16) * 257
    assert (foreground(as_float) == foreground(img)).mean() > 0.999
    assert estimate_rbc_radius(as_float) == pytest.approx(r, rel=0.02)
    assert estimate_rbc_radius(as_u16) == pytest.approx(r, rel=0.02)
    z = (as_float - as_float.mean()) / as_float.std()  # negative values too
    assert estimate_rbc_radius(z) == pytest.approx(r, rel=0.02)


def test_upsampled_labels_stay_numbered_one_to_n():
    """A cell lost when brought back to the image's size (here a one-pixel cell, halved) leaves no gap in the ids."""
    small = np.zeros((40, 40), np.int32)
    small[4:16, 4:16] = 1
    small[21, 21] = 2  # not on the grid that the halving samples
    small[25:37, 25:37] = 3
    fg = np.where(small > 0, 255, 0).astype(np.uint8)
    out = S.upsample_instances(small, fg, (20, 20))
    assert set(np.unique(out)) == {0, 1, 2}
    assert out[5, 5] == 1 and out[15, 15] == 2
    small[21, 21] = 0
    small[20, 20] = 2  # on the grid: kept
    assert set(np.unique(S.upsample_instances(small, fg, (20, 20)))) == {0, 1, 2, 3}


def test_out_of_field_finds_dark_areas_coming_in_from_the_edges():
    from napari_wbc.core.scale import out_of_field

    img = np.full((200, 300, 3), 220, np.uint8)
    assert out_of_field(img) is None  # the field is everywhere
    yy, xx = np.mgrid[:200, :300]
    corner = (yy - 200) ** 2 + xx**2 < 80**2  # black vignetting in the lower left corner
    img[corner] = 5
    nucleus = (yy - 60) ** 2 + (xx - 200) ** 2 < 15**2  # as dark, but enclosed by the field
    img[nucleus] = 5
    out = out_of_field(img)
    assert out is not None and out.shape == (200, 300)
    assert out[corner].mean() > 0.99 and not out[nucleus].any() and not out[~corner].any()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_channel_ranges_are_those_of_the_smear_without_burned_in_black(dtype):
    """A black label box or scale bar (1-2 % of the image) pulled the low percentile to black: the
    network saw a flattened smear (BCCD F1 0.31-0.41). Near-black pixels do not count; the rest do."""
    rng = np.random.default_rng(0)
    img = rng.integers(60, 240, (120, 160, 3)).astype(np.uint8)
    img[40:60, 50:70] = (20, 10, 30)  # a nucleus darker than most: still smear
    marked = img.copy()
    marked[100:115, 100:150] = 0  # a burned-in black scale bar
    marked[5:12, 5:40] = 3  # and a label box's text
    scale = {np.uint8: 1, np.uint16: 257, np.float32: 1 / 255}[dtype]
    img, marked = (img * float(scale)).astype(dtype), (marked * float(scale)).astype(dtype)
    keep = np.ones(img.shape[:2], bool)
    keep[100:115, 100:150] = keep[5:12, 5:40] = False
    expected = np.percentile(marked[keep].astype(np.float64), [0.5, 99.5], axis=0)
    np.testing.assert_allclose(S.channel_ranges(marked), expected, rtol=1e-4)
    assert S.smear_pixels(img) is None  # no mark: every pixel counts, as before
    np.testing.assert_allclose(S.channel_ranges(img), np.percentile(img.astype(np.float64), [0.5, 99.5], axis=(0, 1)),
                               rtol=1e-4)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_channel_ranges_leave_out_burned_in_white_but_not_a_bright_background(dtype):
    """A white label box took the bright end from the background's level to white (BCCD F1 0.88):
    white marks above the smear's own bright end do not count. A background that runs up to white
    (saturated, as on Tecom crops) is the smear's and still counts."""
    rng = np.random.default_rng(1)
    img = rng.integers(60, 220, (120, 160, 3)).astype(np.uint8)
    marked = img.copy()
    marked[0:10, 0:50] = 255  # a white sample label box
    marked[3:7, 5:40] = 0  # its black text
    bright = rng.integers(150, 256, (120, 160, 3)).astype(np.uint8)  # runs up to white: background
    bright[0:10, 0:50] = 255
    scale = {np.uint8: 1, np.uint16: 257, np.float32: 1 / 255}[dtype]
    marked, bright = (marked * float(scale)).astype(dtype), (bright * float(scale)).astype(dtype)
    keep = np.ones(img.shape[:2], bool)
    keep[0:10, 0:50] = False
    expected = np.percentile(marked[keep].astype(np.float64), [0.5, 99.5], axis=0)
    np.testing.assert_allclose(S.channel_ranges(marked), expected, rtol=1e-4)
    assert S.channel_ranges(marked)[1].max() < 220 * scale
    assert S.smear_pixels(bright) is None
    np.testing.assert_allclose(S.channel_ranges(bright),
                               np.percentile(bright.astype(np.float64), [0.5, 99.5], axis=(0, 1)), rtol=1e-4)


def test_out_of_field_is_background_to_the_network_and_not_in_its_ranges(tiny, monkeypatch):
    """A black frame or round field of view: F1 0.00-0.25 on BCCD, with the right diameter too (the
    network saw black around the smear). Outside the field it now sees the smear's background level."""
    img = _discs((120, 160), ((50, 60), (70, 110)))
    img[:, :30] = 0  # the slide's edge
    seen = {}
    real = S.iter_probabilities

    def spy(x, net, device, *a, ranges=None, **k):
        seen["x"], seen["ranges"] = x.copy(), ranges
        yield from real(x, net, device, *a, ranges=ranges, **k)

    monkeypatch.setattr(S, "iter_probabilities", spy)
    napari_wbc.segment(img, model=tiny, device="cpu", diameter=16)  # the network's scale: the same size
    x, ranges = seen["x"], seen["ranges"]
    assert x.shape == img.shape and (x[:, :28] == np.asarray(ranges[1]).astype(np.uint8)).all()
    assert (x[:, 32:] == img[:, 32:]).all() and ranges[0].min() > 0  # the smear as it is; black not its low
    assert (img[:, :30] == 0).all()  # the caller's image is not changed


def test_drop_out_of_field_removes_cells_mostly_outside_and_renumbers():
    from napari_wbc.core.segment import drop_out_of_field

    small = np.zeros((40, 40), np.int32)
    small[2:10, 2:10] = 1  # all outside
    small[20:30, 5:15] = 2  # a fifth outside: kept
    small[20:30, 25:35] = 3  # inside
    outside = np.zeros((80, 80), bool)  # a mask on a finer grid of the same image
    outside[:24, :24] = True
    outside[40:60, 10:14] = True
    got = drop_out_of_field(small, outside)
    assert sorted(np.unique(got)) == [0, 1, 2]
    assert (got[20:30, 5:15] == 1).all() and (got[20:30, 25:35] == 2).all() and (got[2:10, 2:10] == 0).all()
    assert drop_out_of_field(small, None) is small


@pytest.mark.parametrize("scale", [1e-4, 1.0, 4095.0, 1e300])
def test_float_images_of_any_scale_normalise_alike(scale):
    """'The value range does not matter': a float image in 0..1e-4 collapsed to flat, one in 0..1e300
    overflowed float32 to inf."""
    import warnings

    from napari_wbc.core.segment import channel_ranges, check_image, normalise

    rng = np.random.default_rng(0)
    x = rng.random((40, 50, 3))
    ref = normalise(x.astype(np.float32), channel_ranges(x.astype(np.float32)))
    img = x * scale if scale > 1e30 else (x * scale).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow
        rgb = check_image(img)
        got = normalise(rgb, channel_ranges(rgb))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_outlining_many_cells_reports_progress_and_can_stop():
    """The full-resolution outlining (seconds on a large smear) yields progress, a point to cancel at."""
    from napari_wbc.core.segment import iter_upsample_instances, upsample_instances

    small = np.zeros((120, 120), np.int32)
    for k in range(130):
        y, x = divmod(k, 12)
        small[y * 10 + 2:y * 10 + 7, x * 10 + 2:x * 10 + 7] = k + 1
    fg = np.where(small > 0, 255, 0).astype(np.uint8)
    items = list(iter_upsample_instances(small, fg, (240, 240)))
    assert [i[:3] for i in items[:-1]] == [("outlining", 64, 130), ("outlining", 128, 130)]
    assert items[-1][0] == "labels" and items[-1][1].max() == 130
    np.testing.assert_array_equal(items[-1][1], upsample_instances(small, fg, (240, 240)))
    gen = iter_upsample_instances(small, fg, (240, 240))
    assert next(gen)[0] == "outlining"
    gen.close()  # cancelled there: nothing more is done


def _red_cells(shape=(240, 320), r=9, seed=0):
    """A field of red-cell discs (radius r, jittered grid) on a slightly noisy background."""
    rng = np.random.default_rng(seed)
    h, w = shape
    img = rng.normal(225, 2.0, (h, w, 3))
    yy, xx = np.mgrid[:h, :w]
    for cy in range(14, h - 8, 26):
        for cx in range(14, w - 8, 26):
            cy2, cx2 = cy + rng.integers(-3, 4), cx + rng.integers(-3, 4)
            img[(yy - cy2) ** 2 + (xx - cx2) ** 2 <= r * r] = (205, 120, 125)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ["gradient", "vignette"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_estimate_diameter_under_uneven_illumination(kind, dtype):
    """A brightness gradient (to 50 % across) or vignetting (corners at 45 %) is divided out: the dim
    background was read as cells (BCCD: 1.5-2.6x the WBC diameter)."""
    from napari_wbc.core.scale import estimate_diameter

    img = _red_cells()
    dim = _dimmed(img, "gradient" if kind == "gradient" else "vignette")
    d0 = estimate_diameter(img)
    d = estimate_diameter(dim.astype(dtype) / (255 if dtype == np.float32 else 1))
    assert d == pytest.approx(d0, rel=0.15)


@pytest.mark.parametrize("value", [255, 128, 0])
@pytest.mark.parametrize("where", ["around", "beside"])
def test_flat_frame_around_the_smear_is_not_smear(value, where):
    """A white or grey frame (a tile padded to size, empty glass filled by software) was taken for the
    background and the whole smear for cells (1.2-3x the diameter): the estimate is the smear's alone,
    and the frame is outside the field."""
    from napari_wbc.core.scale import estimate_diameter, out_of_field, smear_box

    img = _red_cells()
    h, w = img.shape[:2]
    if where == "around":
        out = np.full((h + 120, w + 120, 3), value, np.uint8)
        out[60:60 + h, 60:60 + w] = img
        box = (60, 60 + h, 60, 60 + w)
    else:
        out = np.full((h, w + 160, 3), value, np.uint8)
        out[:, :w] = img
        box = (0, h, 0, w)
    assert smear_box(out) == box
    assert estimate_diameter(out) == pytest.approx(estimate_diameter(img), rel=0.02)
    outside = out_of_field(out)
    frame = np.ones(out.shape[:2], bool)
    frame[box[0]:box[1], box[2]:box[3]] = False
    assert outside is not None and (outside == frame).all()


def test_saturated_background_is_not_a_frame():
    """White clipped background around the cells (Tecom crops) is flat too, but it is background: it
    does not leave the smear as a rectangle, and nothing changes."""
    from napari_wbc.core.scale import out_of_field, smear_box

    img = _red_cells()
    img[(img == img.max(-1, keepdims=True)).all(-1) | (img.min(-1) > 215)] = 255  # clip the background
    assert smear_box(img) is None
    assert out_of_field(img) is None


def test_soft_edged_round_field_of_view():
    """A round field fading to black over its outer 15 %: the dim ring was read as cells (0.34x the
    diameter on BCCD)."""
    from napari_wbc.core.scale import estimate_diameter

    img = _red_cells((320, 400))
    h, w = img.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) / (0.95 * max(h, w) / 2)
    soft = np.clip(np.rint(img * np.clip((1 - r) / 0.15, 0, 1)[..., None]), 0, 255).astype(np.uint8)
    assert estimate_diameter(soft) == pytest.approx(estimate_diameter(img), rel=0.15)


def test_no_illumination_correction_on_an_evenly_lit_tight_crop():
    """A cell filling a tight crop's middle looks like a dark centre, never like uneven light: the
    fitted light is held concave, and nothing is divided."""
    from napari_wbc.core.scale import _illumination, _luminance

    img = np.full((120, 120, 3), 230, np.uint8)
    yy, xx = np.mgrid[:120, :120]
    img[(yy - 60) ** 2 + (xx - 60) ** 2 < 40**2] = (150, 110, 170)
    _, _, lum, _ = _luminance(img)
    assert _illumination(lum, None) is None


def _dimmed(img, kind):
    h, w = img.shape[:2]
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    if kind == "gradient":
        light = 1 - 0.5 * xx / (w - 1)
    else:
        light = 1 - 0.55 * (((yy - (h - 1) / 2) / ((h - 1) / 2)) ** 2 + ((xx - (w - 1) / 2) / ((w - 1) / 2)) ** 2) / 2
    return np.clip(np.rint(img * light[..., None]), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ["gradient", "vignette"])
def test_the_network_sees_uneven_light_evened_out(tiny, monkeypatch, kind):
    """Under a gradient to 50 % the network itself missed cells with the right diameter too (BCCD F1
    0.74): its windows are now those of the evenly lit smear, and its ranges too. An evenly lit smear
    is left exactly as it is."""
    from napari_wbc.core.scale import shading

    img = _red_cells()
    dim = _dimmed(img, kind)
    assert shading(img) is None
    light = shading(dim)
    assert light is not None and light.min() < 0.75
    seen = []
    real = S.iter_probabilities

    def spy(x, net, device, *a, ranges=None, shading=None, **k):
        seen.append((x.copy(), ranges, shading))
        yield from real(x, net, device, *a, ranges=ranges, shading=shading, **k)

    monkeypatch.setattr(S, "iter_probabilities", spy)
    for im in (img, dim):
        napari_wbc.segment(im, model=tiny, device="cpu", diameter=16)
    (x0, r0, s0), (x1, r1, s1) = seen
    assert s0 is None and s1 is not None
    even = S.unshade(x1, s1, (0, 0), x1.shape[:2]).astype(np.float32)
    error = np.abs(even - x0).mean()  # the fitted light is a smooth surface, not the true one
    assert error < 10 and error < 0.3 * np.abs(x1.astype(np.float32) - x0).mean()
    assert np.abs(r1 - r0).max() < 0.4 * np.abs(S.channel_ranges(dim) - r0).max()


def test_the_classifier_sees_uneven_light_evened_out():
    """The classifier's windows are brought to the light of the image's brightest part, as the
    segmenter's: a cell in the dim half is typed as the same cell in bright light."""
    from napari_wbc.core.classify import image_normaliser

    img = _red_cells()
    dim = _dimmed(img, "gradient")
    spec = {"low": 0.5, "high": 99.5}
    f0, f1 = image_normaliser(img, spec), image_normaliser(dim, spec)
    win = (slice(100, 140), slice(260, 300))  # in the dim part (light ~ 0.6)
    a = f0(img[win], (120, 280))
    error = np.abs(f1(dim[win], (120, 280)) - a).mean()
    assert error < 0.15 and error < 0.2 * np.abs(f1(dim[win]) - a).mean()  # without its place: as dim as it was


GREY_TABLE = {"bins": 4, "colours": [[0.1, 0.0, 0.6], [0.5, 0.3, 0.5], [0.8, 0.6, 0.6], [1.0, 1.0, 1.0]]}


def test_greyscale_images_are_told_from_colour_ones():
    img = _red_cells()
    grey = np.repeat(img.mean(-1, keepdims=True), 3, -1).astype(np.uint8)
    assert S.is_greyscale(grey) and S.is_greyscale(grey.astype(np.float32) / 255)
    assert not S.is_greyscale(img)
    assert not S.is_greyscale(np.full((20, 20, 3), 7, np.uint8))  # flat: nothing to tell


def test_grey_to_colour_maps_grey_levels_to_stained_colours():
    """Dark grey (a nucleus) comes out in the table's dark colour, the background in its light one;
    band by band is the whole image at once."""
    grey = np.repeat(_red_cells().mean(-1, keepdims=True), 3, -1).astype(np.uint16) * 200
    out = S.grey_to_colour(grey, GREY_TABLE)
    assert out.dtype == np.uint8 and out.shape == grey.shape
    dark, light = grey[..., 0] == grey.min(), grey[..., 0] == grey.max()
    np.testing.assert_allclose(out[dark].mean(0), np.array([0.1, 0.0, 0.6]) * 255, atol=2)
    np.testing.assert_allclose(out[light].mean(0), [255, 255, 255], atol=2)
    np.testing.assert_array_equal(S.grey_to_colour(grey, GREY_TABLE, rows=7), out)


def test_a_greyscale_camera_image_reaches_the_network_in_colour(tiny, monkeypatch, tmp_path):
    """A greyscale camera's smear (BCCD F1 0.800 as grey) is coloured by the segmenter card's
    grey_colours table before the network sees it (0.877); a colour image, or a card without the table,
    as before."""
    import json
    import shutil

    seen = []
    real = S.iter_probabilities

    def spy(x, *a, **k):
        seen.append(x.copy())
        yield from real(x, *a, **k)

    monkeypatch.setattr(S, "iter_probabilities", spy)
    model = tmp_path / "grey_seg.safetensors"
    shutil.copy(tiny, model)
    card = json.loads(Path(tiny).with_suffix(".json").read_text())
    card["grey_colours"] = GREY_TABLE
    model.with_suffix(".json").write_text(json.dumps(card))
    img = _red_cells()
    grey = np.repeat(img.mean(-1, keepdims=True), 3, -1).astype(np.uint8)
    for m, im in ((model, grey), (tiny, grey), (model, img)):
        napari_wbc.segment(im, model=str(m), device="cpu", diameter=16)
    coloured, plain, colour = seen
    assert np.abs(coloured[..., 2].astype(int) - coloured[..., 0]).mean() > 20  # blue-purple darks
    assert S.is_greyscale(plain)
    np.testing.assert_array_equal(colour, img)


@pytest.mark.parametrize("case", ["plain", "framed", "dimmed", "zscored", "large"])
def test_one_look_gives_the_same_field_and_diameter(case):
    """segment() takes one Look at the image for the field of view and the diameter: the same values
    as each computes alone (a flat frame, uneven light, no black level, a smear measured on crops)."""
    from napari_wbc.core.scale import Look, estimate_diameter, field_of_view

    img = np.full((160, 200, 3), 225, np.uint8)
    yy, xx = np.mgrid[:160, :200]
    for cy in range(15, 160, 26):
        for cx in range(15, 200, 26):
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 81] = (205, 120, 125)
    if case == "framed":
        img = np.pad(img, ((30, 30), (40, 40), (0, 0)), constant_values=255)
    elif case == "dimmed":
        img = (img * np.linspace(0.45, 1.0, 200)[None, :, None]).astype(np.uint8)
    elif case == "zscored":
        f = img.astype(np.float32)
        img = (f - f.mean()) / f.std()
    elif case == "large":
        img = np.tile(img, (11, 9, 1))  # 1760 x 1800: measured on crops at full resolution
    look = Look(img)
    a, b = field_of_view(img), field_of_view(img, look)
    for x, y in zip(a, b):
        assert (x is None and y is None) or np.array_equal(x, y)
    assert estimate_diameter(img, look=look) == estimate_diameter(img)
    if case == "framed":
        assert look.box is not None and a[0] is not None and a[0].any()
    if case == "dimmed":
        assert a[1] is not None  # the uneven light was found (and is the same from the shared look)
