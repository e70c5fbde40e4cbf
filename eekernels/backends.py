"""Backends: which implementations of the ops can run here, and which one an op uses.

Four backends, in the order of authority of DESIGN.md:

======== ============================================ ==========================
name     what                                         runs on
======== ============================================ ==========================
torch    the plain-PyTorch reference (the spec)       any device
cpu      C++ kernels in ``eekernels._C``              CPU tensors
triton   Triton kernels (``eekernels/triton``)        CUDA tensors; CPU tensors
                                                      only with TRITON_INTERPRET=1
cuda     CUDA C++ kernels in ``eekernels._C``         CUDA tensors
======== ============================================ ==========================

An op picks its backend from, in order: its ``backend=`` argument; the process default
(:func:`set_backend`, else env ``EEKERNELS_BACKEND``); else the fastest backend that can
run on the input's device. A backend asked for by name that cannot run raises
:class:`BackendUnavailableError` naming what is missing. A configured default that cannot
run on an input's device falls back to the best available one, with one warning.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import _extension

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "backend_report",
    "get_backend",
    "implementation",
    "register_implementation",
    "resolve",
    "runnable_backends",
    "set_backend",
]

BACKENDS = ("torch", "cpu", "triton", "cuda")

# Fastest first, per device type.
_PREFERENCE = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}

# (op, backend) -> the implementation: a function, or "module:function" imported on first use.
# Each op module registers its own (register_implementation); "torch" is the reference.
_IMPLEMENTATIONS: Dict[Tuple[str, str], Union[str, Callable]] = {}


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run in this process or on this device."""


_default: Optional[str] = None
_warned: set = set()
_resolved_impls: Dict[Tuple[str, str], Callable] = {}


_triton_import: Optional[str] = None  # "" when triton imports, else the error, once known


@torch.compiler.assume_constant_result
def _triton_import_error() -> str:
    """'' if triton imports here, else why not (computed once; a constant to torch.compile)."""
    global _triton_import
    if _triton_import is None:
        try:
            importlib.import_module("triton")
            _triton_import = ""
        except Exception as e:  # ImportError or a broken install
            _triton_import = str(e) or type(e).__name__
    return _triton_import


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _status(name: str) -> Tuple[bool, str]:
    """(usable in this process, reason if not)."""
    if name == "torch":
        return True, ""
    if name in ("cpu", "cuda"):
        ext = _extension.load()
        if ext is None:
            return False, f"the C++ extension eekernels._C is not available ({_extension.load_error()})"
        if name == "cuda":
            if not ext.with_cuda():
                return False, "eekernels._C was built without CUDA kernels (torch without CUDA or nvcc not found at build time)"
            if not torch.cuda.is_available():
                return False, "no CUDA device is available (torch.cuda.is_available() is False)"
        return True, ""
    if name == "triton":
        err = _triton_import_error()
        if err:
            return False, f"triton cannot be imported ({err})"
        if not torch.cuda.is_available() and not _triton_interpret():
            return False, "no CUDA device is available and TRITON_INTERPRET=1 is not set"
        return True, ""
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


def _runs_on(name: str, device_type: str) -> bool:
    if name == "torch":
        return True
    if name == "cpu":
        return device_type == "cpu"
    if name == "cuda":
        return device_type == "cuda"
    if name == "triton":
        return device_type == "cuda" or (device_type == "cpu" and _triton_interpret())
    return False


def available_backends() -> List[str]:
    """The backends that can run in this process, from :data:`BACKENDS`."""
    return [b for b in BACKENDS if _status(b)[0]]


def runnable_backends(device_type: str, include_reference: bool = True) -> List[str]:
    """The available backends that can run on tensors of ``device_type`` ("cpu", "cuda")."""
    return [b for b in available_backends()
            if _runs_on(b, device_type) and (include_reference or b != "torch")]


def backend_report() -> Dict[str, str]:
    """Each backend's status: ``"ok"`` or the reason it cannot run here."""
    out = {}
    for b in BACKENDS:
        ok, why = _status(b)
        out[b] = "ok" if ok else why
    return out


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend (``None`` restores automatic choice).

    Raises:
        ValueError: unknown name.
        BackendUnavailableError: the backend cannot run in this process.
    """
    global _default
    if name is None:
        _default = None
        return
    ok, why = _status(name)
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} is not available: {why}")
    _default = name


def get_backend() -> Optional[str]:
    """The configured default backend (:func:`set_backend`, else ``EEKERNELS_BACKEND``), or None."""
    if _default is not None:
        return _default
    env = os.environ.get("EEKERNELS_BACKEND", "").strip()
    return env or None


def _implements(name: str, op: Optional[str]) -> bool:
    """Whether backend ``name`` has an implementation of ``op`` (the reference has all)."""
    return op is None or name == "torch" or (op, name) in _IMPLEMENTATIONS


def _best(device_type: str, op: Optional[str] = None) -> str:
    for b in _PREFERENCE.get(device_type, ("torch",)):
        if _status(b)[0] and _runs_on(b, device_type) and _implements(b, op):
            return b
    return "torch"


def resolve(requested: Optional[str], device: torch.device, op: Optional[str] = None) -> str:
    """The backend an op runs for a tensor on ``device``.

    ``requested`` (an op's ``backend=`` argument) must be able to run (and, when ``op`` is
    given, implement ``op``), or this raises :class:`BackendUnavailableError`. Without it,
    the configured default is used when it can run on the device, else the best available
    backend, with one warning. With ``op``, the automatic choice only considers backends
    that implement it.
    """
    dt = device.type
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"unknown backend {requested!r}; choose one of {BACKENDS}")
        ok, why = _status(requested)
        if not ok:
            raise BackendUnavailableError(f"backend {requested!r} is not available: {why}")
        if not _runs_on(requested, dt):
            raise BackendUnavailableError(
                f"backend {requested!r} cannot run on {dt} tensors"
                + (" (set TRITON_INTERPRET=1 to run Triton on CPU)" if requested == "triton" else "")
            )
        if not _implements(requested, op):
            raise BackendUnavailableError(f"op {op!r} has no {requested!r} implementation")
        return requested
    default = get_backend()
    if default is not None:
        if default not in BACKENDS:
            raise ValueError(f"EEKERNELS_BACKEND={default!r} is not a backend; choose one of {BACKENDS}")
        ok, why = _status(default)
        if ok and _runs_on(default, dt) and _implements(default, op):
            return default
        if ok and _runs_on(default, dt):  # the default backend lacks this op: no warning
            return _best(dt, op)
        best = _best(dt, op)
        key = (default, dt)
        if key not in _warned:
            _warned.add(key)
            reason = why if not ok else f"it cannot run on {dt} tensors"
            warnings.warn(f"eekernels: default backend {default!r} unavailable ({reason}); using {best!r}", RuntimeWarning, stacklevel=3)
        return best
    return _best(dt, op)


def register_implementation(op: str, backends: Union[str, Sequence[str]], impl: Union[str, Callable]) -> None:
    """Declare that ``op`` runs on each of ``backends`` through ``impl``: a function, or a
    "module:function" string imported on first use (so importing eekernels never imports
    triton)."""
    for name in (backends,) if isinstance(backends, str) else backends:
        if name not in BACKENDS or name == "torch":
            raise ValueError(f"register_implementation: {name!r} is not a kernel backend; choose from {BACKENDS[1:]}")
        _IMPLEMENTATIONS[(op, name)] = impl
        _resolved_impls.pop((op, name), None)


def implementation(op: str, backend: str) -> Callable:
    """The function implementing ``op`` on ``backend`` (imported on first use)."""
    key = (op, backend)
    fn = _resolved_impls.get(key)
    if fn is None:
        target = _IMPLEMENTATIONS.get(key)
        if target is None:
            raise BackendUnavailableError(f"op {op!r} has no {backend!r} implementation")
        if isinstance(target, str):
            mod, attr = target.split(":")
            target = getattr(importlib.import_module(mod), attr)
        fn = _resolved_impls[key] = target
    return fn
