"""Loading the compiled extension ``eekernels._C``.

``pip install --no-build-isolation .`` builds it at install time (setup.py). Where it was
not built (an isolated build without torch, a source checkout), the first op that needs
it compiles it with ninja through ``torch.utils.cpp_extension.load`` and caches the
result in torch's extension directory. Importing eekernels never fails because of it:
:func:`load` returns None and :func:`load_error` says why.

This module imports nothing from eekernels, so every op module can depend on it; what
must happen once the ops exist (their fake implementations) is registered with
:func:`on_load`.

Environment:
    EEKERNELS_NO_JIT=1   never compile at run time (use only a prebuilt ``_C``).
    EEKERNELS_JIT_CUDA=0 compile only the CPU kernels at run time, even if CUDA is there.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path
from typing import Callable, List, Optional

import torch

_lock = threading.RLock()  # reentrant: a callback may call on_load
_module = None
_error: Optional[str] = None
_tried = False
_callbacks: List[Callable[[], None]] = []


def _source_dir() -> Optional[Path]:
    here = Path(__file__).resolve().parent
    for cand in (here / "_csrc", here.parent / "csrc"):  # installed copy, then source checkout
        if (cand / "register.cpp").is_file():
            return cand
    return None


def _sources(root: Path, with_cuda: bool) -> List[str]:
    files = [root / "register.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((root / "cuda").glob("*.cu"))
    return [str(f) for f in files]


def _jit_build():
    from torch.utils import cpp_extension

    root = _source_dir()
    if root is None:
        raise RuntimeError("the C++ sources (csrc/) are not shipped with this install")
    want_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("EEKERNELS_JIT_CUDA", "1") != "0"
    )
    print(
        f"eekernels: compiling the C++{'/CUDA' if want_cuda else ''} ops with ninja "
        "(first use only; set EEKERNELS_NO_JIT=1 to skip)...",
        file=sys.stderr,
        flush=True,
    )
    # -fopenmp, as in setup.py: at::parallel_for is serial in a library built without it.
    cflags = ["-O3", "-fopenmp"] + (["-DEEKERNELS_WITH_CUDA"] if want_cuda else [])
    return cpp_extension.load(
        name="eekernels_C" + ("_cuda" if want_cuda else "_cpu"),
        sources=_sources(root, want_cuda),
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "-lineinfo", "-DEEKERNELS_WITH_CUDA", "-Xcompiler", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(root)],
        with_cuda=want_cuda,
        verbose=False,
    )


def load():
    """The loaded extension module, or None if it cannot be had (see :func:`load_error`)."""
    global _module, _error, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        try:
            _module = importlib.import_module(f"{__package__}._C")
        except ImportError as prebuilt:
            if os.environ.get("EEKERNELS_NO_JIT", "0") not in ("", "0"):
                _error = f"not built at install time ({prebuilt}) and EEKERNELS_NO_JIT is set"
            else:
                try:
                    _module = _jit_build()
                except Exception as e:  # compiler missing, build error...
                    _error = f"not built at install time, and compiling it now failed: {e}"
        if _module is not None:
            for fn in _callbacks:
                fn()
        _tried = True  # after the callbacks: no other thread sees the module before them
        return _module


def on_load(callback: Callable[[], None]) -> None:
    """Run ``callback`` once the extension is loaded: now if it already is, else right after
    a successful :func:`load` (never if loading fails)."""
    with _lock:
        if _tried:
            if _module is not None:
                callback()
        else:
            _callbacks.append(callback)


def load_error() -> str:
    """Why :func:`load` returned None ('' if it did not)."""
    load()
    return _error or ""
