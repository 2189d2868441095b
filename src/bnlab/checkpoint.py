"""Checkpoints that survive crashes and resume bit-exactly.

A checkpoint holds the model's state_dict (parameters and BN running statistics, section 3.1), the
optimizer's state, the random number generator states (torch CPU and CUDA, numpy's global
``RandomState``, Python's ``random``), the step and a user ``extra`` (config, metrics).

* **Atomic**: written to a temporary file in the same directory, flushed and ``fsync``-ed, then
  renamed over the target with ``os.replace`` and the directory ``fsync``-ed. A process killed at
  any moment leaves either the previous checkpoint or the new one, never a mixture (a leftover
  ``.<name>.tmp-*`` file may remain next to it).
* **Safe to load**: only ``torch.load(weights_only=True)``, which never unpickles arbitrary
  objects; everything stored is a tensor or a plain type (RNG states are converted to tensors).
* **Checked**: a SHA-256 digest over every stored value is saved with it and verified on load, so a
  truncated or corrupted file (even a flipped byte inside tensor data, which the zip container does
  not catch) raises ``ValueError`` naming the file.
* **Compatible**: a plain ``torch.save(model.state_dict())`` file loads too, including torch
  BatchNorm checkpoints without ``num_batches_tracked`` (set to 0, as torch does for old files).
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._fileutil import fsync_dir

__all__ = ["save_checkpoint", "load_checkpoint", "FORMAT"]

FORMAT = "bnlab-checkpoint-v1"
_PLAIN = (str, int, float, bool, type(None))


# ------------------------------------------------------------------------------------ RNG states
def _rng_state() -> dict[str, Any]:
    """All global RNG states as tensors and plain types (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, mt, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),  # 624 x uint32
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(mt, dtype=torch.int64),  # 624 x uint32 + position
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ digest
def _digest(obj: Any) -> str:
    """SHA-256 over the structure and every value of ``obj`` (dict order, tensor bytes)."""
    h = hashlib.sha256()

    def visit(o: Any) -> None:
        if isinstance(o, Tensor):
            t = o.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(o.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, Mapping):
            h.update(f"D{len(o)}".encode())
            for k, v in o.items():
                visit(k)
                visit(v)
        elif isinstance(o, (list, tuple)):
            h.update(f"{'L' if isinstance(o, list) else 'U'}{len(o)}".encode())
            for v in o:
                visit(v)
        elif isinstance(o, float):
            h.update(b"F" + struct.pack("<d", o))
        else:
            h.update(f"{type(o).__name__}:{o!r}".encode())

    visit(obj)
    return h.hexdigest()


def _check_plain(obj: Any, where: str) -> None:
    """Only what torch.load(weights_only=True) can read back: tensors, plain types, containers."""
    if isinstance(obj, (Tensor, *_PLAIN)):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, _PLAIN):
                raise TypeError(f"save_checkpoint: {where} has a key of type {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"save_checkpoint: {where} is a {type(obj).__name__}; only tensors, str/int/float/bool/"
        "None and dicts/lists/tuples of them can be loaded with weights_only=True"
    )


# ------------------------------------------------------------------------------------ save / load
def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``, ``optimizer``, RNG states, ``step`` and ``extra`` to ``path`` atomically
    (temp file in the same directory, fsync, ``os.replace``, fsync of the directory).

    ``extra`` (e.g. the resolved config as a dict) may hold tensors, str/int/float/bool/None and
    dicts/lists/tuples of them; anything else raises ``TypeError`` before the file is touched.
    Returns the path.
    """
    path = Path(path)
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"save_checkpoint: step must be an int, got {type(step).__name__}")
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(
            f"save_checkpoint: extra must be a dict or None, got {type(extra).__name__}"
        )
    payload: dict[str, Any] = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": step,
        "rng": _rng_state(),
        "extra": dict(extra) if extra is not None else {},
    }
    _check_plain(payload["extra"], "extra")
    if payload["optimizer"] is not None:
        _check_plain(payload["optimizer"], "optimizer.state_dict()")
    obj = {"format": FORMAT, "sha256": _digest(payload), "payload": payload}
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"save_checkpoint: directory {directory} of {path} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return path


def _fill_num_batches_tracked(model: nn.Module, state: dict[str, Any]) -> None:
    """Checkpoints from torch BatchNorm layers older than num_batches_tracked: count 0."""
    for name, m in model.named_modules():
        nbt = getattr(m, "num_batches_tracked", None)
        if isinstance(nbt, Tensor) and isinstance(getattr(m, "running_mean", None), Tensor):
            prefix = f"{name}." if name else ""
            if prefix + "running_mean" in state and prefix + "num_batches_tracked" not in state:
                state[prefix + "num_batches_tracked"] = torch.zeros_like(nbt)


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (or a plain model state_dict saved with
    ``torch.save``) into ``model`` and, if given, ``optimizer``; restore the RNG states.

    Uses ``torch.load(weights_only=True)`` only. Returns ``{"step": int | None, "extra": dict,
    "path": Path}`` (``step`` is None for a plain state_dict). Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` naming the file when it is truncated, corrupted (digest
    mismatch) or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, unpickling and storage errors come in many types
        raise ValueError(
            f"load_checkpoint: {path} is truncated or corrupted and cannot be read "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        payload = obj.get("payload")
        if not isinstance(payload, Mapping) or _digest(payload) != obj.get("sha256"):
            raise ValueError(
                f"load_checkpoint: {path} is corrupted: its contents do not match the stored "
                "SHA-256 digest"
            )
        state = payload["model"]
    elif isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        payload = None
        state = obj
    else:
        raise ValueError(
            f"load_checkpoint: {path} is neither a bnlab checkpoint nor a model state_dict"
        )
    source = state
    state = dict(state)  # a copy to fill in; keep the version metadata BN loading consults
    if hasattr(source, "_metadata"):
        state = type(source)(state)
        state._metadata = source._metadata  # type: ignore[attr-defined]
    _fill_num_batches_tracked(model, state)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise ValueError(f"load_checkpoint: {path} does not match the model: {exc}") from exc
    if payload is None:
        if optimizer is not None:
            raise ValueError(
                f"load_checkpoint: {path} is a plain state_dict with no optimizer state"
            )
        return {"step": None, "extra": {}, "path": path}
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise ValueError(f"load_checkpoint: {path} was saved without an optimizer state")
        optimizer.load_state_dict(payload["optimizer"])
    if restore_rng:
        _set_rng_state(payload["rng"])
    return {"step": payload["step"], "extra": dict(payload["extra"]), "path": path}
