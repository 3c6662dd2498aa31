"""Model files: safetensors weights + a JSON card, built from the card's config.

A model file is ``<name>.safetensors`` with ``<name>.json`` beside it. The card
holds ``kind`` ("segmenter" or "classifier"), ``arch`` (the constructor config)
and everything needed to use the weights (input scale, normalisation, classes),
plus provenance (data, split, epochs, validation figures).
No pickle anywhere: loading a model never runs code from the file.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
SHIPPED = {
    "segmenter": MODELS_DIR / "wbc_unet.safetensors",
    "classifier": MODELS_DIR / "wbc_classifier.safetensors",
}
# further shipped models a user may choose (never the default); see docs/models.md
SHIPPED_OPTIONAL = {
    "segmenter": [],
    "classifier": [MODELS_DIR / "wbc_classifier_stain_robust.safetensors"],
}


def shipped_models(kind: str) -> list[Path]:
    """The shipped models of ``kind`` that are installed: the default first, then the optional ones."""
    return [p for p in [SHIPPED[kind], *SHIPPED_OPTIONAL.get(kind, [])] if p.exists()]

class _SharedExclusive:
    """Many holders at once (forward passes) or one alone (``torch.fx`` tracing, which replaces
    ``torch.nn.Module.__call__`` for the whole process while it runs: a forward pass in another
    thread then fails with "module is not installed as a submodule"). A waiting exclusive holder
    goes first. Not re-entrant: hold it around single calls only."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    def shared(self):
        return _Hold(self, False)

    def exclusive(self):
        return _Hold(self, True)

    def _acquire(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._waiting += 1
                while self._exclusive or self._shared:
                    self._cond.wait()
                self._waiting -= 1
                self._exclusive = True
            else:
                while self._exclusive or self._waiting:
                    self._cond.wait()
                self._shared += 1

    def _release(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._exclusive = False
            else:
                self._shared -= 1
            self._cond.notify_all()


class _Hold:
    def __init__(self, lock: _SharedExclusive, exclusive: bool):
        self.lock, self.exclusive = lock, exclusive

    def __enter__(self):
        self.lock._acquire(self.exclusive)

    def __exit__(self, *exc):
        self.lock._release(self.exclusive)


# forward passes hold it shared (forward_pass()), graph tracing exclusively
GRAPH_LOCK = _SharedExclusive()


def forward_pass():
    """Context for one forward (or training) pass of a network: never while another thread traces a
    graph with ``torch.fx`` (model loading, :func:`inference_network`)."""
    return GRAPH_LOCK.shared()


_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()
_LOAD_LOCK = threading.Lock()  # one load at a time: a second caller of the same model waits and reuses it


def card_path(path) -> Path:
    return model_file(path).with_suffix(".json")


def model_file(path) -> Path:
    """The ``.safetensors`` path of a model named ``path`` (``x``, ``x.json`` or ``x.safetensors``);
    a name with dots keeps them (``run v1.2`` -> ``run v1.2.safetensors``, not ``run v1.safetensors``)."""
    p = Path(path).expanduser()
    if p.suffix in (".safetensors", ".json"):
        return p.with_suffix(".safetensors")
    return p.with_name(p.name + ".safetensors")


def existing_model_file(path) -> Path | None:
    """The weights (``.safetensors``) or card (``.json``) of ``path`` that already exists, if any:
    a new model must not be written there (models are never overwritten)."""
    return next((p for p in (Path(path), card_path(path)) if os.path.lexists(p)), None)  # a dangling link too


def resolve_model_path(model, kind: str) -> Path:
    """``None`` -> the shipped model of ``kind``; a shipped model's name (``"wbc_classifier_stain_robust"``)
    -> that model; otherwise a checked path to a .safetensors file."""
    if isinstance(model, (str, Path)) and not Path(model).suffix and not Path(model).expanduser().exists():
        name = str(model)
        named = {p.stem: p for p in shipped_models(kind)}
        if name in named:
            return named[name]
        for other in SHIPPED:
            if other != kind and name in {p.stem for p in shipped_models(other)}:
                raise ValueError(f"{name!r} is the shipped {other}; expected a {kind} "
                                 f"({', '.join(sorted(named)) or 'none shipped'}, or a model file)")
    if model is None:
        if not SHIPPED[kind].exists():
            raise ValueError(
                f"the shipped {kind} model is not installed ({SHIPPED[kind].name} missing); "
                "reinstall napari-wbc or pass a model file"
            )
        return SHIPPED[kind]
    p = Path(model).expanduser()
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    if p.is_dir():
        raise ValueError(f"model {str(model)!r} is a folder; expected a .safetensors model file")
    if not p.exists():
        raise ValueError(f"model file {str(p)!r} does not exist")
    if p.suffix != ".safetensors":
        raise ValueError(f"model file {str(p)!r} must be a .safetensors file with a .json card beside it")
    if not card_path(p).exists():
        raise ValueError(f"model file {str(p)!r} has no JSON card {card_path(p).name!r} beside it")
    return p


def read_card(path, kind: str | None = None) -> dict:
    """The card of model file ``path`` (checked: an object with a known ``kind`` and an ``arch``); with
    ``kind``, a ValueError naming the file when it is a model of another kind."""
    cp = card_path(path)
    try:
        card = json.loads(cp.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"model card {str(cp)!r} could not be read: {e}") from e
    if not isinstance(card, dict):
        raise ValueError(f"model card {str(cp)!r} holds a JSON {type(card).__name__}; expected an object "
                         "with 'kind' and 'arch'")
    for key in ("kind", "arch"):
        if key not in card:
            raise ValueError(f"model card {str(cp)!r} lacks the required key {key!r}")
    if card["kind"] not in SHIPPED:
        raise ValueError(f"model card {str(cp)!r}: kind {card['kind']!r} is not one of {', '.join(SHIPPED)}")
    arch = card["arch"]
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise ValueError(f"model card {str(cp)!r}: 'arch' must be an object with the network's 'name'")
    if kind is not None and card["kind"] != kind:
        raise ValueError(f"model file {str(path)!r} is a {card['kind']}, expected a {kind}")
    return card


def build_from_card(card: dict, path=None):
    """:func:`build_network` for a model file's card: any failure (an unknown encoder, a wrong
    argument) is a ValueError naming the file."""
    try:
        return build_network(card["arch"])
    except Exception as e:  # noqa: BLE001 - smp/timm raise KeyError, TypeError, RuntimeError
        where = f"model file {str(path)!r}" if path is not None else "the model card"
        raise ValueError(f"{where}: its architecture cannot be built ({type(e).__name__}: {e})") from e


def build_network(arch: dict):
    """Build an untrained network from a card's ``arch`` config."""
    import segmentation_models_pytorch as smp

    arch = dict(arch)
    name = arch.pop("name")
    if name == "Unet":
        return smp.Unet(encoder_weights=None, **arch)
    if name == "SmallCNN":
        from .nets import SmallCNN

        return SmallCNN(**arch)
    if name == "Ensemble":
        from .nets import Ensemble

        members = arch.get("members")
        if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
            raise ValueError("an Ensemble model card needs 'members': a non-empty list of architectures")
        return Ensemble([build_network(m) for m in members])
    if name == "ClassicUnet":
        from .nets import ClassicUnet

        return ClassicUnet(**arch)
    raise ValueError(f"unknown network architecture {name!r} in model card")


def load_model(model=None, kind: str = "segmenter", device=None):
    """Load (cached per file, mtime and device) a model; returns ``(network, card)``.

    The network is in eval mode on ``device``. A segmenter is made ready for
    inference only (:func:`inference_network`) and, on CPUs with native
    bfloat16 (:func:`~napari_wbc.core.device.cpu_bf16_fast`), stored in
    bfloat16, so that its weights are not cast again on every call. On CPU it
    then runs through a frozen TorchScript trace (:func:`traced_network`;
    ``NAPARI_WBC_JIT=0`` turns that off).
    """
    from .device import cpu_bf16_fast, resolve_device

    path = resolve_model_path(model, kind)
    dev = resolve_device(device)
    cpu_segmenter = kind == "segmenter" and dev.type == "cpu"
    bf16 = cpu_segmenter and cpu_bf16_fast()
    jit = cpu_segmenter and _jit_enabled()
    key = (str(path.resolve()), _stamp(path), _stamp(card_path(path)), str(dev), bf16, jit)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    with _LOAD_LOCK:
        with _CACHE_LOCK:
            if key in _CACHE:  # loaded by another thread (a widget's preload) while this one waited
                return _CACHE[key]
        return _load_uncached(path, kind, dev, bf16, jit, key)


# a card's settings that are numbers (the segmenter's working scale, the classifier's input)
NUMERIC_SETTINGS = {"target_diameter": (1.0, 1e4), "input_size": (8, 1024), "context": (0.5, 10.0)}


def _check_settings(card: dict, path) -> None:
    """ValueError naming the file and the key when a numeric setting is not a number in its range
    (found at load - once - not as a failure on every image)."""
    for key, (lo, hi) in NUMERIC_SETTINGS.items():
        if key not in card:
            continue
        value = card[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= float(value) <= hi
        if not ok:
            raise ValueError(f"model card {str(card_path(path))!r}: {key!r} must be a number from {lo:g} to "
                             f"{hi:g}, got {value!r}")


def _stamp(path: Path) -> tuple:
    """What tells a changed file: a copy that keeps the modification time (``cp -p``) still gets a
    new inode or change time, an edited card a new size or time."""
    st = path.stat()
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


def read_weights(path, card: dict | None = None) -> dict:
    """The state dict of model file ``path``, checked against its card's ``weights_sha256`` (written
    by :func:`save_model`; cards without it, from before, are not checked): weights swapped for
    another model's, or damaged in a copy, are a ValueError naming both files."""
    import hashlib

    from safetensors.torch import load

    path = Path(path)
    card = read_card(path) if card is None else card
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise ValueError(f"model file {str(path)!r} could not be read: {e}") from e
    want = card.get("weights_sha256")
    if want is not None and hashlib.sha256(blob).hexdigest() != str(want).lower():
        raise ValueError(
            f"model file {str(path)!r} does not hold the weights its card {card_path(path).name!r} was saved "
            "with (SHA-256 differs): the file was replaced or damaged. Keep each .safetensors with the .json "
            "saved beside it, or save the model again")
    try:
        return load(blob)
    except Exception as e:  # noqa: BLE001 - any failure here means a broken file
        raise ValueError(f"model file {str(path)!r} could not be loaded: {e}") from e


def _load_uncached(path: Path, kind: str, dev, bf16: bool, jit: bool, key):
    card = read_card(path, kind)
    _check_settings(card, path)
    net = build_from_card(card, path)
    state = read_weights(path, card)
    try:
        net.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - any failure here means a broken file
        raise ValueError(f"model file {str(path)!r} could not be loaded: {e}") from e
    net.eval().to(dev)
    if kind == "segmenter":
        net = inference_network(net)
    if bf16:
        import torch

        net = net.to(torch.bfloat16)
    if jit:
        net = traced_network(net)
    with _CACHE_LOCK:
        _CACHE[key] = (net, card)
    return net, card


def _jit_enabled() -> bool:
    """CPU segmenters run through a frozen TorchScript trace unless ``NAPARI_WBC_JIT=0``."""
    import os

    return os.environ.get("NAPARI_WBC_JIT", "1").strip() != "0"


def traced_network(net):
    """``net`` (an :func:`inference_network`, on CPU) wrapped in a :class:`~napari_wbc.core.nets.TracedNetwork`."""
    import torch

    from .nets import TracedNetwork

    p = next(net.parameters())
    example = torch.rand(1, 3, 64, 64, dtype=p.dtype, device=p.device).contiguous(memory_format=torch.channels_last)
    return TracedNetwork(net, example)


def inference_network(net):
    """``net`` made faster for inference only (eval mode; never train the result).

    Batch norms that follow a plain convolution (timm's fused batch-norm-activation
    modules included) are folded into it (``torch.fx`` tracing; left as they are
    where the graph cannot be traced) and the weights
    are stored channels-last, which the CPU and GPU convolution kernels run
    about twice as fast on these networks. Outputs equal the original's up to
    float rounding (tested).
    """
    import copy

    import torch

    net = copy.deepcopy(net).eval()
    _split_norm_act(net)
    try:
        from torch.fx.experimental.optimization import fuse

        with GRAPH_LOCK.exclusive():  # fx patches torch.nn.Module.__call__ process-wide while tracing
            net = fuse(net)
    except Exception:  # noqa: BLE001 - an untraceable graph only loses the folding
        pass
    return net.to(memory_format=torch.channels_last)


def _split_norm_act(net) -> None:
    """Replace timm's fused ``BatchNormAct2d`` (batch norm, dropout, activation in one module) in place
    by a plain ``BatchNorm2d`` followed by its dropout and activation, so that folding can see the
    batch norm (traced, the fused module is a bare function call that ``fuse`` cannot fold)."""
    import torch

    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if not (
                isinstance(child, torch.nn.BatchNorm2d)
                and type(child).__name__ == "BatchNormAct2d"
                and isinstance(getattr(child, "drop", None), torch.nn.Module)
                and isinstance(getattr(child, "act", None), torch.nn.Module)
            ):
                continue
            bn = torch.nn.BatchNorm2d(
                child.num_features, eps=child.eps, momentum=child.momentum,
                affine=child.affine, track_running_stats=child.track_running_stats,
            )
            state = child.state_dict()
            try:
                bn.load_state_dict(state)
            except RuntimeError:  # not the layout expected: leave this one as it is
                continue
            if state:
                bn = bn.to(next(iter(state.values())).device)
            setattr(parent, name, torch.nn.Sequential(bn.eval(), child.drop, child.act))


def _temp_file(path: Path, data: bytes) -> str:
    """``data`` in a hidden temporary file beside ``path`` (flushed to disk, mode 0644)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a model file is for everyone who can read the folder
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _publish_new(tmp: str, path: Path) -> None:
    """Give the finished temporary file ``tmp`` the name ``path`` only if no file has it: checking
    and naming in one step (a hard link), so two runs saving at once never replace each other's."""
    try:
        os.link(tmp, path)  # FileExistsError when taken
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: reserve the name exclusively, then fill it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


def save_model(net, card: dict, path, *, overwrite: bool = False, unique: bool = False) -> Path:
    """Write ``net``'s weights (fp32 safetensors) and ``card`` atomically; returns the weights' path.

    Never replaces an existing file (the weights or the card) unless ``overwrite``: the check and
    the naming are one step, so a second run saving to the same name at the same moment fails
    (``FileExistsError``) instead of replacing it. With ``unique`` a taken name gets ``_2``, ``_3``...
    (dated default names of two runs started in the same second). Nothing is left under the final
    names when writing fails.
    """
    import hashlib

    from safetensors.torch import save

    path = model_file(path)
    for key in ("kind", "arch"):
        if key not in card:
            raise ValueError(f"model card lacks the required key {key!r}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    blob = save(state, metadata={"kind": str(card["kind"])})
    card = {**card, "weights_sha256": hashlib.sha256(blob).hexdigest()}  # checked at load (read_weights)
    text = json.dumps(card, indent=2, default=str).encode()
    wanted = path
    while True:  # (with unique, again under the next free name when another run took this one meanwhile)
        if unique and not overwrite:
            from .io import free_path

            path = free_path(wanted, lambda p: existing_model_file(p) is not None)
        taken = None if overwrite else existing_model_file(path)
        if taken is not None:
            raise FileExistsError(f"model file {str(taken)!r} exists; refusing to overwrite it")
        tmp_card, tmp_w = _temp_file(card_path(path), text), None
        published = []
        try:
            tmp_w = _temp_file(path, blob)
            # card first (harmless alone), weights last: the .safetensors appearing marks completion
            for tmp, final in ((tmp_card, card_path(path)), (tmp_w, path)):
                if overwrite:
                    os.replace(tmp, final)
                else:
                    _publish_new(tmp, final)
                published.append(final)
            from .io import fsync_path

            fsync_path(path.parent, best_effort=True)  # the new names on disk too (the data is: _temp_file)
            return path
        except FileExistsError:
            if not unique:
                raise FileExistsError(f"model file {str(path)!r} was written meanwhile; refusing to overwrite it") from None
        finally:
            for tmp in (tmp_card, tmp_w):
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
            if len(published) == 1:  # the card alone: not a model
                published[0].unlink(missing_ok=True)


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
