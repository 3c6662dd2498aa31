"""Tiny randomly initialised models for tests and examples (no training, no download)."""
from __future__ import annotations

from pathlib import Path

from .classify import CLASSES  # (numpy only: light to import)

TINY_SEGMENTER_ARCH = {
    "name": "Unet",
    "encoder_name": "tu-mobilenetv3_small_050",
    "encoder_depth": 3,
    "decoder_channels": [16, 8, 8],
    "in_channels": 3,
    "classes": 2,
}


def make_tiny_segmenter(path, *, seed: int = 0, target_diameter: float = 16.0) -> Path:
    """Write a tiny random segmenter (safetensors + card) to ``path`` and return it."""
    import torch

    from .models import build_network, save_model

    torch.manual_seed(seed)
    net = build_network(TINY_SEGMENTER_ARCH)
    card = {
        "kind": "segmenter",
        "arch": TINY_SEGMENTER_ARCH,
        "target_diameter": target_diameter,
        "note": "tiny random network for tests",
    }
    return save_model(net, card, path, overwrite=True)


def make_tiny_classifier(path, *, seed: int = 0, input_size: int = 32, members: int = 1) -> Path:
    """Write a tiny random classifier (safetensors + card) to ``path`` and return it.

    ``members > 1`` makes an ensemble of that many tiny networks (as the shipped classifier is).
    """
    import torch

    from .models import build_network, save_model

    torch.manual_seed(seed)
    arch = {"name": "SmallCNN", "in_channels": 4, "num_classes": len(CLASSES), "width": 4}
    if members > 1:
        arch = {"name": "Ensemble", "members": [dict(arch) for _ in range(members)]}
    net = build_network(arch)
    card = {
        "kind": "classifier",
        "arch": arch,
        "classes": list(CLASSES),
        "input_size": input_size,
        "context": 1.5,
        "note": "tiny random network for tests",
    }
    return save_model(net, card, path, overwrite=True)
