"""How the Triton launchers launch: through ``torch.library.wrap_triton`` where torch traces."""

from __future__ import annotations

from .. import backend

try:
    from torch.library import wrap_triton
except ImportError:  # torch < 2.6: no triton_op either (cat_kernels.ops), the custom ops serve
    wrap_triton = None


def kernel(fn):
    """`fn` (a ``triton.jit`` kernel) ready to index with a grid and call. Where torch traces the
    launch (:func:`cat_kernels.backend.tracing`: the ops' ``triton_op`` under torch.compile,
    fake tensors) it is wrapped, so the launch is recorded as a kernel node that Inductor
    schedules; in plain eager it is the kernel itself (the wrapper's dispatch costs per call)."""
    if wrap_triton is not None and backend.tracing():
        return wrap_triton(fn)
    return fn
