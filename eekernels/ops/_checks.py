"""Argument checks shared by the op families' validators (clear errors, no tensor reads)."""

from __future__ import annotations

import numbers

import torch

#: Dtypes of hidden states the kernels take.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, op: str, t, ndim=None, dtypes=None, device=None, min_dim=None) -> None:
    """Raise TypeError/ValueError unless ``t`` is a dense tensor with ``ndim`` dims (or at
    least ``min_dim``), a dtype in ``dtypes`` and on ``device`` (each when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dim{'' if ndim == 1 else 's'}, got shape {tuple(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dim(s), got a {t.dim()}-d tensor")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but {device} was expected (all inputs on one device)")


def needs_autograd(*args) -> bool:
    """Whether autograd records and a tensor among ``args`` requires grad: then an op runs
    its differentiable reference, whatever the backend."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args)


def real_number(who: str, name: str, value) -> float:
    """``value`` as a float when it is a real number (Python, NumPy, or a one-element real
    tensor), else a TypeError naming ``name`` (a string such as "0.3" is not a number)."""
    if type(value) is float or type(value) is int:  # the common case, before the ABC checks below
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex \
            and value.dtype != torch.bool:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a real number, got {type(value).__name__}")
    return float(value)
