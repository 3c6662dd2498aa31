"""Small networks that are not in segmentation-models-pytorch."""
from __future__ import annotations

import sys

import torch
from torch import nn


def _block(cin, cout, dropout=0.0):
    layers = [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if dropout:
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """A compact VGG-style classifier for cell crops (RGB + mask channel)."""

    def __init__(self, in_channels: int = 4, num_classes: int = 5, width: int = 32, dropout: float = 0.2):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(in_channels, w), nn.MaxPool2d(2),
            _block(w, 2 * w), nn.MaxPool2d(2),
            _block(2 * w, 4 * w), nn.MaxPool2d(2),
            _block(4 * w, 8 * w),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(8 * w, num_classes)
        )

    def forward(self, x):
        return self.head(self.features(x))


class Ensemble(nn.Module):
    """Several classifiers as one: the output is the log of their mean softmax.

    ``softmax(Ensemble(x))`` is the members' mean probability, so callers (and
    cross-entropy training) treat it as any other classifier's logits.
    """

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members]).mean(0)
        return torch.log(probs.clamp_min(1e-12))


class ClassicUnet(nn.Module):
    """The classic SigTuple-challenge U-Net: 32..512 channels, dropout, 1 output.

    Used only as a benchmark baseline (greyscale 128x128 input, Dice loss).
    """

    def __init__(self, in_channels: int = 1, classes: int = 1, base: int = 32, dropout: float = 0.25):
        super().__init__()
        chs = [base * 2**i for i in range(5)]  # 32..512
        self.downs = nn.ModuleList()
        cin = in_channels
        for i, c in enumerate(chs):
            self.downs.append(_block(cin, c, dropout if i >= 3 else 0.0))
            cin = c
        self.ups = nn.ModuleList()
        self.upconvs = nn.ModuleList()
        for c in reversed(chs[:-1]):
            self.upconvs.append(nn.ConvTranspose2d(cin, c, 2, stride=2))
            self.ups.append(_block(2 * c, c))
            cin = c
        self.out = nn.Conv2d(cin, classes, 1)

    def forward(self, x):
        skips = []
        for i, d in enumerate(self.downs):
            x = d(x)
            if i < len(self.downs) - 1:
                skips.append(x)
                x = torch.nn.functional.max_pool2d(x, 2)
        for up, block, skip in zip(self.upconvs, self.ups, reversed(skips)):
            x = block(torch.cat([up(x), skip], 1))
        return self.out(x)


def _quiet_jit_deprecation() -> None:
    """Hide torch's notices that ``torch.jit.trace``/``freeze`` are deprecated (we fall back when they go).

    A filter on exactly those messages: ``warnings.catch_warnings`` would be simpler but is not
    thread-safe (models load in worker threads), and a race there can hide or leak every warning. (A
    ``catch_warnings`` block that another thread leaves while we trace can still drop this filter: the
    notice then shows once.)
    """
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.jit\.(trace|trace_method|freeze)` is deprecated",
                            category=FutureWarning)


class TracedNetwork(nn.Module):
    """An inference network run through a frozen TorchScript trace of itself (CPU).

    The trace runs the same operators with the same weights (outputs equal, tested)
    without Python's per-module overhead: about 5 ms less per call on this U-Net
    (15-30 % on inputs up to ~512 px; no gain on 768 px tiles). ``eager`` stays the reference and the fallback:
    where tracing fails, the trace disagrees with it on the example input, Python is 3.14 or
    later (unsupported by torch's tracer), or a traced call raises, the eager network runs instead
    (``torch.jit`` is deprecated; a torch without it only loses the speed).
    Inference only: never train it.
    """

    def __init__(self, eager: nn.Module, example: torch.Tensor):
        super().__init__()
        self.eager = eager.eval()
        self.traced = None
        if sys.version_info >= (3, 14):  # torch says its tracer "is not supported in Python 3.14+ and may break"
            return
        _quiet_jit_deprecation()
        try:
            from .models import forward_pass

            with torch.inference_mode(), forward_pass():
                traced = torch.jit.freeze(torch.jit.trace(self.eager, example, check_trace=False).eval())
                ref, out = self.eager(example).float(), traced(example).float()
            if out.shape == ref.shape and torch.allclose(out, ref, atol=1e-3, rtol=1e-2):  # else keep eager
                self.traced = traced
        except Exception:  # noqa: BLE001 - a graph that cannot be traced runs eagerly
            self.traced = None

    def forward(self, x):
        if self.traced is not None:
            try:
                return self.traced(x)
            except Exception as e:  # noqa: BLE001 - keep working: the eager network is the reference
                import warnings

                warnings.warn(f"napari-wbc: the traced network failed ({e}); running it eagerly from now on", RuntimeWarning)
                self.traced = None
        return self.eager(x)
