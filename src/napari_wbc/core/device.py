"""Choosing the torch device: ``auto`` means cuda, then mps, then cpu."""
from __future__ import annotations


def available_devices() -> list[str]:
    """Device names usable here, best first, always ending with ``cpu``."""
    import torch

    out = []
    if torch.cuda.is_available():
        out.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    out.append("cpu")
    return out


def resolve_device(device=None):
    """Turn ``None``/``"auto"``/a string/a ``torch.device`` into a ``torch.device``.

    Raises ValueError naming the device when it is unknown or not available here.
    """
    import torch

    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        return torch.device(available_devices()[0])
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise ValueError(f"device must be None, 'auto' or a torch device string, got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a valid torch device string") from e
    if dev.type not in available_devices():
        raise ValueError(
            f"device {device!r} is not available here; available: {', '.join(available_devices())}"
        )
    return dev
