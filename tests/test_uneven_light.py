"""Uneven light evened out for the networks: what the segmenter and the classifier actually get."""
from __future__ import annotations

import numpy as np

from test_segment import _dimmed, _red_cells
from napari_wbc.core import segment as S
from napari_wbc.core.scale import shading


def test_unshade_does_not_make_a_z_scored_image_more_uneven():
    """shading() is fitted on levels shifted to min 0 (_levels), unshade() divides the raw values:
    on an image with negative values (z-scored) it amplifies the gradient instead of removing it."""
    img = _red_cells()
    dim = _dimmed(img, "gradient")
    z = (dim.astype(np.float32) - dim.mean()) / dim.std()
    light = shading(z)
    fixed = z if light is None else S.unshade(z, light, (0, 0), z.shape[:2])
    bg = img.min(-1) > 215
    left, right = bg.copy(), bg.copy()
    left[:, 160:], right[:, :160] = False, False
    before = abs(z[left].mean() - z[right].mean())
    after = abs(fixed[left].mean() - fixed[right].mean())
    assert after <= before, (before, after)


def test_unshade_image_band_by_band_is_the_whole_image_unshaded():
    """make_sample's test has 240 rows (< 512): one band, so a wrong band corner would pass it."""
    dim = _dimmed(_red_cells(), "vignette")
    light = shading(dim)
    np.testing.assert_array_equal(S.unshade_image(dim, light, rows=7), S.unshade(dim, light, (0, 0), dim.shape[:2]))


def test_cell_input_brings_the_cells_window_to_even_light():
    """classify()'s windows (cell_input) are normalised at their place: dropping ``(cy, cx)`` in
    cell_input passes every test of HEAD; this one fails then."""
    from napari_wbc.core import classify as C

    img = _red_cells()
    dim = _dimmed(img, "gradient")
    lab = np.zeros(img.shape[:2], np.int32)
    lab[110:130, 270:290] = 1  # in the dim part (light ~ 0.6)
    sl = (slice(110, 130), slice(270, 290))
    spec = {"low": 0.5, "high": 99.5}
    kw = dict(size=32, context=1.5, background=1.0, dilation=0)
    a = C.cell_input(img, C.image_normaliser(img, spec), lab, 1, sl, 400, **kw)
    b = C.cell_input(dim, C.image_normaliser(dim, spec), lab, 1, sl, 400, **kw)
    raw = C.cell_input(dim, lambda x, at=None: C.image_normaliser(dim, spec)(x), lab, 1, sl, 400, **kw)
    assert np.abs(b - a)[:3].mean() < 0.3 * np.abs(raw - a)[:3].mean()


def test_iter_probabilities_shows_the_network_the_evenly_lit_windows():
    """HEAD's test_the_network_sees_uneven_light_evened_out spies on iter_probabilities' arguments and
    unshades them itself: it passes with the ``shading`` argument ignored. This one looks at what the
    network gets."""
    import torch

    seen = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen.append(x.detach().numpy().copy())
            return torch.zeros((x.shape[0], 2, *x.shape[2:]))

    dim = _dimmed(_red_cells(), "gradient")
    light = shading(dim)
    ranges = S.channel_ranges(dim, shading=light)
    for _ in S.iter_probabilities(dim, Net(), torch.device("cpu"), ranges=ranges, shading=light):
        pass
    want = S.normalise(S.unshade(dim, light, (0, 0), dim.shape[:2]), ranges)
    got = np.moveaxis(seen[0][0], 0, -1)[16: 16 + dim.shape[0], 16: 16 + dim.shape[1]]  # (one window, 16 px border)
    np.testing.assert_allclose(got, want, atol=1e-5)
