"""The state's buffers for CUDA graphs: allocated outside the steps, the same tensors in every
generation of the same shapes, and no tensor made inside a step that a later step reads."""

from __future__ import annotations

import flux_models
import harness
import pytest
import qwen_models
import torch
from sd3_models import inputs, tiny_sd3
from torch.utils._python_dispatch import TorchDispatchMode

import cat_pruning
from cat_pruning.cache import Float8Rows

STEPS = 7
# What a caching step remakes at its start (ForecastStore.begin_step) and reads only in that step.
PER_STEP = {"store.inv_dt", "store.weight_kv", "store.weight_out", "store.pos", "store.inv_span",
            "store.weight_slope"}  # fmt: skip
# the state's pools (their tensors are seen where used); the store's pool is looked into, so that a
# buffer a step makes there on first use is caught
SKIP = {"_pools", "_parked", "_stores"}
# the stores, and with fp8 K/V caches (scales, dequantization buffers)
STORES = {**harness.STORES, "forecast-float8": harness.STATEFUL_STORES["forecast-float8"],
          "reuse-float8": harness.STATEFUL_STORES["reuse-float8"]}


def tensors_of(state) -> dict[str, torch.Tensor]:
    """Every tensor the state and its cache store hold, by attribute (dict and tuple entries too)."""
    found = {}
    for owner, obj in (("state", state), ("store", state.cache)):
        for name, value in vars(obj).items():
            if name in SKIP:
                continue
            items = value.items() if isinstance(value, dict) else [("", value)]
            for key, v in items:
                if isinstance(v, Float8Rows):  # kv_dtype="float8": its data and scales
                    v = (v.data, v.scale)
                for i, t in enumerate(v if isinstance(v, tuple) else (v,)):
                    if isinstance(t, torch.Tensor):
                        found[f"{owner}.{name}" + (f"[{key}][{i}]" if key else "")] = t
    return found


def generation(model, kw, observe=None) -> list[torch.Tensor]:
    cat_pruning.reset(model, num_steps=STEPS)
    return harness.denoise(model, kw, STEPS, step_fn=lambda: (observe and observe(), cat_pruning.advance(model)))


def patched(store: dict, full_steps: int):
    model = tiny_sd3()
    cat_pruning.patch(model, backend="torch", keep_ratio=0.3, full_steps=full_steps, manual_steps=True,
                      **{**store, "refresh_every": 3 if store["forecast"] == "taylor" else 0})  # fmt: skip
    return model, model._cat_pruning.state


@pytest.mark.parametrize("full_steps", [2, 4])
@pytest.mark.parametrize("store", STORES.values(), ids=STORES.keys())
def test_buffers_keep_their_addresses_across_generations(store, full_steps):
    model, state = patched(store, full_steps)
    kw = inputs(seed=3)
    first = generation(model, kw)
    ptrs = {name: t.data_ptr() for name, t in tensors_of(state).items() if name not in PER_STEP}
    assert {"state.anchor", "state.idx", "state.recomputed", "store.noise"} <= set(ptrs)
    again = generation(model, kw)
    harness.assert_all_equal(again, first)
    assert {name: t.data_ptr() for name, t in tensors_of(state).items() if name not in PER_STEP} == ptrs
    other = inputs(seed=3, height=8, width=8)  # other shapes: new buffers, the same images as a fresh patch
    got = generation(model, other)
    fresh, _ = patched(store, full_steps)
    harness.assert_all_equal(got, generation(fresh, other))


@pytest.mark.parametrize("full_steps", [2, 4])
@pytest.mark.parametrize("store", STORES.values(), ids=STORES.keys())
def test_no_tensor_made_in_a_step_is_read_by_a_later_step(store, full_steps):
    """A forward may assign only PER_STEP tensors (which every caching step remakes before reading
    them); everything else it reads was allocated in eager code between steps. With full_steps=2
    the anchor is step 0, before the geometry is known: the first generation makes its buffer in
    that step, the next ones reuse it."""
    model, state = patched(store, full_steps)
    made: list[tuple[int, str, set[str], set[str]]] = []
    before: list[torch.Tensor] = []  # held until the forward ends, so no address or id is reused meanwhile

    def pre(module, args, kwargs):
        pools = [*(t for pool in state._pools.values() for t in pool.values()),
                 *(t for store in state._stores.values() for t in store._pool.values())]  # fmt: skip
        before[:] = [*tensors_of(state).values(), *pools]  # every buffer the state holds, its pools included

    def post(module, args, kwargs, output):
        memory, objects = {t.data_ptr() for t in before}, {id(t) for t in before}
        now = tensors_of(state)
        new_memory = {n for n, t in now.items() if t.data_ptr() not in memory}
        new_objects = {n for n, t in now.items() if id(t) not in objects}
        made.append((state.step, state.mode, new_memory, new_objects))

    model.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)
    model.register_forward_hook(post, with_kwargs=True)
    kw = inputs(seed=4)
    for gen in range(2):
        made.clear()
        generation(model, kw)
        for step, mode, new_memory, new_objects in made:
            allowed = PER_STEP | ({"state.anchor"} if full_steps == 2 and gen == 0 and step == 0 else set())
            assert new_memory <= allowed, (gen, step, mode, new_memory - allowed)
            if mode in state.cache.modes and mode != "anchor" and store["forecast"] == "taylor":
                assert {"store.inv_dt", "store.weight_kv", "store.pos"} <= new_objects, (step, mode)


@pytest.mark.gpu
@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_cuda_graphs_match_eager(store):
    """torch.compile(mode="reduce-overhead"): the steps replay as CUDA graphs that read the state's
    buffers in place; two generations give eager's outputs (the second replays the first's graphs)."""
    model, _ = patched(store, 4)
    model = model.cuda()
    kw = inputs(seed=5, device="cuda")
    eager = [out.clone() for out in generation(model, kw)]
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for _ in range(2):
        cat_pruning.reset(model, num_steps=STEPS)
        x, outs = kw["hidden_states"], []
        for i in range(STEPS):
            torch.compiler.cudagraph_mark_step_begin()
            t = torch.full((x.shape[0],), 1000.0 * (1 - i / STEPS), device="cuda")
            with torch.no_grad():
                out = compiled(**{**kw, "hidden_states": x}, timestep=t, return_dict=False)[0].clone()
            cat_pruning.advance(model)
            outs.append(out)
            x = x - 0.1 * out
        harness.assert_all_close(outs, eager, harness.F32)
    torch._dynamo.reset()


# ---------------------------------------------------------------------- the buffer attention reads


class _Cats(TorchDispatchMode):
    """Records the shape of every aten.cat output, with the state's step mode at the time."""

    def __init__(self, state) -> None:
        super().__init__()
        self.state, self.seen = state, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket is torch.ops.aten.cat:
            self.seen.append((self.state.mode, tuple(out.shape)))
        return out


def _joint_family(name: str):
    """(model, inputs, rows attention reads beside the N image rows, step loop) of a family whose
    attention concatenates other streams' keys with the image keys."""
    if name == "sd3":
        return tiny_sd3(), inputs(seed=6), 0, harness.denoise  # [image; text], (B, H, L, D)
    if name == "flux":
        return flux_models.tiny_flux(), flux_models.inputs(seed=6), 0, flux_models.run_steps
    model = qwen_models.tiny_qwen()  # a reference image: rows after the image rows too
    return model, qwen_models.inputs(seed=6, reference=((2, 3),)), 6, qwen_models.run_steps


@pytest.mark.parametrize("store", ["forecast", "reuse"])
@pytest.mark.parametrize("family", ["sd3", "flux", "qwen"])
def test_pruned_steps_attend_without_concatenating_the_image_rows(family, store):
    """On CAT-F's pruned steps the forecast of the N image keys and values is written into a buffer
    with room for the text (and reference) rows, which are copied beside it: no concatenation
    copies the N rows again (issue 21 item 1). The reuse store attends its cache, concatenated
    as before: the count shows the check sees such a concatenation."""
    model, kw, reference, run = _joint_family(family)
    cat_pruning.patch(model, backend="torch", keep_ratio=0.3, full_steps=2, manual_steps=True,
                      **harness.STORES[store])  # fmt: skip
    state = model._cat_pruning.state
    cats = _Cats(state)
    cat_pruning.reset(model, num_steps=STEPS)
    with cats:
        run(model, kw, STEPS, step_fn=lambda: cat_pruning.advance(model))
    joint = state.geometry.num_tokens + state.geometry.text + reference  # keys of a joint attention
    pruned = [shape for mode, shape in cats.seen if mode == "pruned"]
    assert pruned, "no concatenation in a pruned step at all: the check would see nothing"
    full_rows = [shape for shape in pruned if joint in shape and len(shape) >= 3]  # K/V, not a key mask
    if store == "reuse":
        assert full_rows, pruned
    else:
        assert not full_rows, full_rows
        assert state.cache.joint and state.cache.wide
    cat_pruning.unpatch(model)
