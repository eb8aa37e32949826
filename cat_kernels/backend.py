"""Which implementation runs an op: the one place that decides.

Backends: ``triton`` (cat_kernels.triton), ``cuda`` (the compiled extension cat_kernels._C, CPU
and CUDA implementations), ``torch`` (cat_kernels.reference). ``auto`` picks per device:

- CUDA tensors: Triton when it imports, else the extension when built, else the reference;
- CPU tensors: Triton under ``TRITON_INTERPRET=1`` (the tests use it), else the extension's C++
  implementation when built, else the reference;
- meta tensors: the reference (shape propagation only).

An automatic fallback from Triton on a CUDA tensor warns once. A backend asked for by name
(argument or ``CAT_KERNELS_BACKEND``) that cannot run raises an error naming what is missing.
"""

from __future__ import annotations

import importlib
import os
import types
import warnings

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import reference

BACKENDS = ("auto", "triton", "cuda", "torch")
ENV_VAR = "CAT_KERNELS_BACKEND"


def _try_import(name: str) -> types.ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# Probed once at import, so that code traced by torch.compile only reads constants.
_TRITON = _try_import("cat_kernels.triton")
_EXTENSION = _try_import("cat_kernels.extension")
_warned: set[str] = set()


def triton_available() -> bool:
    return _TRITON is not None


def extension_available() -> bool:
    return _EXTENSION is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend(name: str | None = None) -> str:
    """The backend asked for: `name` if given and not "auto", else the environment, else auto."""
    if name is None or name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r} (argument or ${ENV_VAR})")
    return name


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve(device: torch.device, name: str | None = None) -> str:
    """Concrete backend ("triton", "cuda" or "torch") for tensors on `device`."""
    name = requested_backend(name)
    kind = device.type
    if kind == "meta" or name == "torch":
        return "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' was requested but `import triton` failed; pip install triton")
        if kind != "cuda" and not interpreting():
            raise RuntimeError(f"backend 'triton' runs {kind} tensors only with TRITON_INTERPRET=1")
        return "triton"
    if name == "cuda":
        if not extension_available():
            raise RuntimeError(
                "backend 'cuda' was requested but the extension cat_kernels._C is not built; "
                "reinstall with CAT_KERNELS_BUILD_EXT=1 (see README)"
            )
        return "cuda"
    # auto
    if kind == "cuda":
        if triton_available():
            return "triton"
        if extension_available():
            _warn_once("cat_kernels: triton is not importable; using the compiled extension")
            return "cuda"
        _warn_once("cat_kernels: neither triton nor the compiled extension is available; using torch")
        return "torch"
    if interpreting() and triton_available():
        return "triton"
    if extension_available():
        return "cuda"
    return "torch"


def tracing(*args: object) -> bool:
    """Whether torch may look inside an op call: torch.compile or export traces it, a dispatch
    mode is active (fake tensors, make_fx, FlopCounterMode) or an argument is a tensor subclass.
    The ops then go through their torch.library registrations, and the Triton launchers wrap
    their kernels for tracing; in plain eager both are skipped (their dispatch costs per call)."""
    return (
        torch.compiler.is_compiling()
        or _get_current_dispatch_mode() is not None
        or any(isinstance(a, torch.Tensor) and type(a) is not torch.Tensor for a in args)
    )


def module(backend: str) -> types.ModuleType:
    """The module holding the implementations of a concrete backend."""
    if backend == "torch":
        return reference
    mod = {"triton": _TRITON, "cuda": _EXTENSION}[backend]
    if mod is None:
        raise RuntimeError(f"backend {backend!r} is not available")
    return mod
