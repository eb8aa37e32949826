"""Regional compilation of a patched pipeline (issue 11): Flux declares `_repeated_blocks`; the other
four families' lists are empty in diffusers 0.42.1, so compile_repeated_blocks raises there, patched
or not. Its own file: compiling takes most of a minute on two cores."""

from __future__ import annotations

import torch
from test_robustness import FAMILIES, build, close, modes, patch, run


def test_flux_compile_repeated_blocks_after_patch():
    """The hooks stay eager, the blocks compile (fullgraph); the pruned pipeline equals eager."""
    torch._dynamo.reset()
    fam = FAMILIES["flux"]
    pipe = build(fam)
    patch(pipe, 0.5)
    eager = run(fam, pipe)
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    close(run(fam, pipe), eager)
    assert modes(pipe)[-1] == "pruned"
    torch._dynamo.reset()
