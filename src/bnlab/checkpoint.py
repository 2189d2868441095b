"""Checkpoints that survive crashes and resume bit-exactly.

A checkpoint holds the model's state_dict (parameters and BN running statistics, section 3.1), the
optimizer's state, the random number generator states (torch CPU and CUDA, numpy's global
``RandomState``, Python's ``random``), the step and a user ``extra`` (config, metrics).

* **Atomic**: written to a temporary file in the same directory, flushed and ``fsync``-ed, then
  renamed over the target with ``os.replace`` and the directory ``fsync``-ed. A process killed at
  any moment leaves either the previous checkpoint or the new one, never a mixture. The temporary
  file (``.<name>.tmp-*``) is locked by its writer; one a killed writer left behind is removed by
  the next save into the same directory.
* **Safe to load**: only ``torch.load(weights_only=True)``, which never unpickles arbitrary
  objects; everything stored is a tensor or a plain type (RNG states are converted to tensors).
  Saving refuses, before anything is written and with the key named, any value that loading
  would refuse (a numpy scalar, an ``IntEnum``, a namedtuple, ...).
* **Checked**: a SHA-256 digest over every stored value is saved with it and verified on load, so a
  truncated or corrupted file (even a flipped byte inside tensor data, which the zip container does
  not catch) raises ``ValueError`` naming the file.
* **All or nothing**: loading checks every key, shape and dtype against the model, the optimizer
  state against the optimizer and the RNG states, before the first value is copied; a checkpoint
  that does not fit raises ``ValueError`` naming the file and leaves model, optimizer and random
  generators as they were.
* **Compatible**: a plain ``torch.save(model.state_dict())`` file loads too, including torch
  BatchNorm checkpoints without ``num_batches_tracked`` (set to 0, as torch does for old files).
"""

from __future__ import annotations

import enum
import hashlib
import os
import random
import struct
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._fileutil import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "FORMAT"]

FORMAT = "bnlab-checkpoint-v1"
# What torch.load(weights_only=True) reads back as the same value, by *exact* type: subclasses
# (numpy.float64 of float, IntEnum of int, namedtuple of tuple, defaultdict of dict) are pickled
# by their own class, which weights_only loading refuses.
_SCALARS = (str, int, float, bool, type(None), bytes, complex)
_ATOMS = (*_SCALARS, torch.Size, torch.dtype, torch.device)
_TENSORS = (Tensor, nn.Parameter)
_MAPPINGS = (dict, OrderedDict)
_SEQUENCES = (list, tuple, set)


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
        elif isinstance(o, set):  # iteration order differs between processes: sort the parts
            h.update(f"S{len(o)}".encode())
            for part in sorted(_digest(v) for v in o):
                h.update(part.encode())
        elif isinstance(o, float):
            h.update(b"F" + struct.pack("<d", o))
        else:
            h.update(f"{type(o).__name__}:{o!r}".encode())

    visit(obj)
    return h.hexdigest()


def _check_plain(obj: Any, where: str) -> None:
    """Only what torch.load(weights_only=True) reads back: tensors, plain scalars, torch.Size,
    dtype and device, and dict/OrderedDict/list/tuple/set of them, all by exact type. Raises
    TypeError naming the key path of the first value that would make the file unloadable."""
    kind = type(obj)
    if kind in _TENSORS or kind in _ATOMS:
        return
    if kind in _MAPPINGS:
        for k, v in obj.items():
            if type(k) not in _SCALARS and type(k) is not tuple:
                raise TypeError(
                    f"save_checkpoint: {where} has a key {k!r} of type {type(k).__name__}; "
                    f"{_ALLOWED_TEXT}"
                )
            if type(k) is tuple:
                _check_plain(k, f"{where} key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if kind in _SEQUENCES:
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]" if kind is not set else f"{where} element {v!r}")
        return
    raise TypeError(
        f"save_checkpoint: {where} is a {_type_name(obj)}; {_ALLOWED_TEXT}"
    )


_ALLOWED_TEXT = (
    "only tensors, str/int/float/bool/None/bytes/complex, torch.Size/dtype/device and "
    "dict/list/tuple/set of them load with weights_only=True (convert numpy scalars with "
    ".item(), enums with int(), namedtuples with tuple() or ._asdict())"
)


def _type_name(obj: Any) -> str:
    """``float64 (numpy)``, ``Color (an IntEnum)``, ``Pair (a namedtuple)``, ``set``..."""
    kind = type(obj)
    if isinstance(obj, tuple) and hasattr(kind, "_fields"):
        return f"{kind.__name__} (a namedtuple)"
    if isinstance(obj, enum.Enum):
        base = next((b.__name__ for b in kind.__mro__[1:] if b.__module__ == "enum"), "Enum")
        return f"{kind.__name__} (an {base})"
    module = (kind.__module__ or "").split(".")[0]
    return kind.__name__ if module in ("builtins", "") else f"{kind.__name__} ({module})"


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

    ``extra`` (e.g. the resolved config as a dict) may hold tensors, str/int/float/bool/None/
    bytes/complex, torch.Size/dtype/device and dicts/lists/tuples/sets of them, by exact type;
    anything else (a numpy scalar, an ``IntEnum``, a namedtuple, in ``extra``, the optimizer's
    state or the model's extra state) raises ``TypeError`` naming the key before the file is
    touched, since ``torch.load(weights_only=True)`` would refuse the file. Temporary files that
    killed saves left in the directory are removed. Returns the path.
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
        "step": int(step),
        "rng": _rng_state(),
        "extra": dict(extra) if extra is not None else {},
    }
    _check_plain(dict(payload["model"]), "model.state_dict()")
    _check_plain(payload["extra"], "extra")
    if payload["optimizer"] is not None:
        _check_plain(payload["optimizer"], "optimizer.state_dict()")
    obj = {"format": FORMAT, "sha256": _digest(payload), "payload": payload}
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"save_checkpoint: directory {directory} of {path} does not exist")
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def _fill_num_batches_tracked(model: nn.Module, state: dict[str, Any]) -> None:
    """Checkpoints from torch BatchNorm layers older than num_batches_tracked: count 0."""
    for name, m in model.named_modules():
        nbt = getattr(m, "num_batches_tracked", None)
        if isinstance(nbt, Tensor) and isinstance(getattr(m, "running_mean", None), Tensor):
            prefix = f"{name}." if name else ""
            if prefix + "running_mean" in state and prefix + "num_batches_tracked" not in state:
                state[prefix + "num_batches_tracked"] = torch.zeros_like(nbt)


def _read(path: Path) -> tuple[dict[str, Any], Mapping[str, Any] | None]:
    """(model state, payload or None for a plain state_dict) of a checkpoint file."""
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
        missing = [k for k in ("model", "optimizer", "step", "rng", "extra") if k not in payload]
        if missing or not isinstance(payload["model"], Mapping):
            raise ValueError(f"load_checkpoint: {path} is not a complete bnlab checkpoint")
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
        state = OrderedDict(state)
        state._metadata = source._metadata  # type: ignore[attr-defined]
    return state, payload


def _keys_text(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")


def _check_model_state(path: Path, model: nn.Module, state: Mapping[str, Any], strict: bool
                       ) -> None:
    """Every tensor of ``state`` against the model's: keys (when ``strict``), shapes, dtypes."""
    own = model.state_dict(keep_vars=True)
    if strict:
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {_keys_text(missing)}")
            if unexpected:
                parts.append(f"unexpected {_keys_text(unexpected)}")
            raise ValueError(
                f"load_checkpoint: {path} does not match the model: {'; '.join(parts)}. Nothing "
                "was loaded (strict=False loads the keys both have)"
            )
    for key, mine in own.items():
        if key not in state or not isinstance(mine, Tensor) or key.endswith("_extra_state"):
            continue  # a module's extra state is checked by its own set_extra_state
        theirs = state[key]
        if not isinstance(theirs, Tensor):
            raise ValueError(
                f"load_checkpoint: {path}: '{key}' is a {type(theirs).__name__}, not a tensor. "
                "Nothing was loaded"
            )
        if nn.parameter.is_lazy(mine):
            continue  # an uninitialized lazy parameter takes the saved shape
        same = theirs.shape == mine.shape or (  # torch's one exception: (1,) into a 0-dim tensor
            mine.dim() == 0 and tuple(theirs.shape) == (1,)
        )
        if not same:
            raise ValueError(
                f"load_checkpoint: {path}: '{key}' has shape {tuple(theirs.shape)} in the "
                f"checkpoint but {tuple(mine.shape)} in the model. Nothing was loaded"
            )
        if theirs.dtype != mine.dtype:
            raise ValueError(
                f"load_checkpoint: {path}: '{key}' is {theirs.dtype} in the checkpoint but "
                f"{mine.dtype} in the model; convert the model (e.g. model.to({theirs.dtype})) "
                "to load it. Nothing was loaded"
            )


# optimizers whose per-parameter state tensors (other than scalars) have the parameter's shape
_ELEMENTWISE = tuple(
    getattr(torch.optim, n)
    for n in ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad",
              "Adadelta", "ASGD", "Rprop", "SparseAdam")
    if hasattr(torch.optim, n)
)  # fmt: skip


def _check_optimizer_state(path: Path, optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """The saved optimizer state against ``optimizer``: groups and their sizes (what torch checks
    too), and the shape of every per-parameter state tensor for the element-wise optimizers."""
    where = f"load_checkpoint: {path}: the optimizer state"
    if not isinstance(saved, Mapping) or not isinstance(saved.get("state"), Mapping) or not \
            isinstance(saved.get("param_groups"), list):
        raise ValueError(f"{where} is damaged (no 'state' and 'param_groups'). Nothing was loaded")
    groups, saved_groups = optimizer.param_groups, saved["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError(
            f"{where} has {len(saved_groups)} parameter group(s), the optimizer "
            f"{len(groups)}. Nothing was loaded"
        )
    ids: dict[Any, Tensor] = {}
    for i, (g, sg) in enumerate(zip(groups, saved_groups, strict=True)):
        if not isinstance(sg, Mapping) or not isinstance(sg.get("params"), list):
            raise ValueError(f"{where}: parameter group {i} is damaged. Nothing was loaded")
        if len(sg["params"]) != len(g["params"]):
            raise ValueError(
                f"{where}: parameter group {i} has {len(sg['params'])} parameters in the "
                f"checkpoint but {len(g['params'])} in the optimizer. Nothing was loaded"
            )
        ids.update(zip(sg["params"], g["params"], strict=True))
    if not isinstance(optimizer, _ELEMENTWISE):
        return
    for pid, st in saved["state"].items():
        param = ids.get(pid)
        if param is None or not isinstance(st, Mapping):
            continue
        for name, value in st.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise ValueError(
                    f"{where}: '{name}' of parameter {pid} has shape {tuple(value.shape)}, the "
                    f"parameter {tuple(param.shape)}. Nothing was loaded"
                )


def _check_rng(path: Path, rng: Any) -> None:
    ok = (
        isinstance(rng, Mapping)
        and isinstance(rng.get("torch"), Tensor)
        and isinstance(rng.get("numpy"), Mapping)
        and isinstance(rng["numpy"].get("keys"), Tensor)
        and isinstance(rng.get("python"), Mapping)
        and isinstance(rng["python"].get("state"), Tensor)
    )
    if not ok:
        raise ValueError(
            f"load_checkpoint: {path}: the saved random generator states are damaged; "
            "restore_rng=False loads the rest. Nothing was loaded"
        )


class _Snapshot:
    """What loading changes, kept so that a failure can put it back: every parameter and buffer
    value, each module's extra state, the optimizer's state and groups (torch replaces them with
    new objects, so keeping the old ones suffices) and the RNG states."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.tensors = [
            (t, t.detach().clone())
            for t in [*model.parameters(), *model.buffers()]
            if not nn.parameter.is_lazy(t)
        ]
        self.extra = [
            (m, m.get_extra_state())
            for m in model.modules()
            if type(m).get_extra_state is not nn.Module.get_extra_state
        ]
        self.optimizer = optimizer
        self.opt = (optimizer.state, optimizer.param_groups) if optimizer is not None else None
        self.rng = _rng_state()

    @torch.no_grad()
    def restore(self) -> None:
        for t, value in self.tensors:
            t.copy_(value)
        for m, value in self.extra:
            m.set_extra_state(value)
        if self.optimizer is not None and self.opt is not None:
            self.optimizer.__setstate__({"state": self.opt[0], "param_groups": self.opt[1]})
        _set_rng_state(self.rng)


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (or a plain model state_dict saved with
    ``torch.save``) into ``model`` and, if given, ``optimizer``; restore the RNG states.

    All or nothing: the file is read and verified, then every key (with ``strict``), shape and
    dtype is checked against the model, the optimizer state against the optimizer (number and
    sizes of parameter groups, shapes of per-parameter state) and the RNG states, before the
    first value is copied; should copying still fail, model, optimizer and RNG states are put
    back as they were. Uses ``torch.load(weights_only=True)`` only. Returns ``{"step": int |
    None, "extra": dict, "path": Path}`` (``step`` is None for a plain state_dict). Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file when it is
    truncated, corrupted (digest mismatch), not a checkpoint, or does not fit the model or
    optimizer.
    """
    path = Path(path)
    state, payload = _read(path)
    _fill_num_batches_tracked(model, state)
    _check_model_state(path, model, state, strict)
    if optimizer is not None:
        if payload is None:
            raise ValueError(
                f"load_checkpoint: {path} is a plain state_dict with no optimizer state; "
                "nothing was loaded (pass optimizer=None to load the model alone)"
            )
        if payload["optimizer"] is None:
            raise ValueError(
                f"load_checkpoint: {path} was saved without an optimizer state; nothing was "
                "loaded (pass optimizer=None to load the model alone)"
            )
        _check_optimizer_state(path, optimizer, payload["optimizer"])
    restore_rng = restore_rng and payload is not None
    if restore_rng:
        _check_rng(path, payload["rng"])
    snapshot = _Snapshot(model, optimizer)
    try:
        model.load_state_dict(state, strict=strict)
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer"])
        if restore_rng:
            _set_rng_state(payload["rng"])
    except Exception as exc:
        snapshot.restore()
        raise ValueError(
            f"load_checkpoint: {path} does not fit the model or optimizer "
            f"({type(exc).__name__}: {exc}); the model, the optimizer and the random generators "
            "were left as they were"
        ) from exc
    if payload is None:
        return {"step": None, "extra": {}, "path": path}
    return {"step": payload["step"], "extra": dict(payload["extra"]), "path": path}
