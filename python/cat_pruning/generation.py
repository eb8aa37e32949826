"""Where a patched model's generations start and its denoising steps end.

A patched pipeline starts a generation at every call (its scheduler's ``set_timesteps``, wrapped
on the instance: :func:`wrap_scheduler`) and ends a step at every ``scheduler.step``; so does a
transformer patched on its own while a pipeline's ``__call__`` runs it (:func:`follow` finds that
pipeline up the Python stack). Each step runs the transformer once (:func:`count_forward`).

A bare denoising loop is told by :func:`cat_pruning.reset`; one that starts over without it
would run its first steps on the last generation's caches. :class:`TimestepWatch` notices that
from the timestep: within a generation it moves one way (down in diffusers' schedulers, up in
some flow-matching loops), so a step whose timestep moves the other way starts a new one.

The value is read only where that costs no host synchronisation, in eager code (the patch's
pre-hook, never while torch.compile traces, never on the meta device):

- a timestep on the CPU (or a Python number) is read at the step's first forward, so the step
  itself runs as the new generation's first (the caller resets the state and warns);
- a CUDA timestep is copied to pinned host memory without blocking, and read at a later step
  once its copy event has completed: a restart is seen a step or a few late, after some steps
  ran on the stale caches, so the caller refuses to go on (an error saying to call reset());
- elsewhere (other accelerators, a timestep passed positionally, CUDA graph capture) nothing is
  read.

Samplers whose timestep goes back up on purpose within one generation (restart sampling,
RePaint's resampling jumps) look like restarts: run them through a patched pipeline, or patch
with manual_steps=True and call reset() yourself.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

# How many CUDA reads may wait for their copies; older ones are dropped unread (the device runs
# that far behind the host only in unusual loops, and then the check is skipped, not wrong).
_MAX_PENDING = 64


@dataclasses.dataclass(frozen=True)
class Restart:
    """A step whose timestep moved against its generation: from `before` to `now`. `late`: steps
    already run since (0 when the step has not run yet)."""

    before: float
    now: float
    late: int


class _CudaRead:
    """A non-blocking copy of a CUDA timestep's first value to pinned host memory."""

    def __init__(self, t: torch.Tensor) -> None:
        self.host = torch.empty((), dtype=t.dtype, pin_memory=True)
        self.host.copy_(t.reshape(-1)[0], non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(t.device))

    def ready(self) -> bool:
        return self.event.query()

    def value(self) -> float:
        return float(self.host)  # a CPU tensor: its copy has completed


def _read(timestep: Any) -> float | _CudaRead | None:
    """The timestep's value now, a pending read of it, or None where it cannot be read for free."""
    if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        return float(timestep)
    if not isinstance(timestep, torch.Tensor) or timestep.numel() == 0:
        return None
    if timestep.device.type == "cpu":
        return float(timestep.reshape(-1)[0])
    if timestep.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        return _CudaRead(timestep)
    return None


class TimestepWatch:
    """Follows the timestep of a bare denoising loop's steps (one value per step: the first forward
    of each; a step is one forward, or what lies between two cat_pruning.advance calls)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """A new generation begins (reset, a pipeline call, ...): forget the old one's timesteps."""
        self.generation = getattr(self, "generation", 0) + 1
        self.step = -1  # the state's step count at the last observed forward
        self.last: float | None = None  # the last step's timestep
        self.direction = 0  # +1 or -1 once the generation's timestep has moved
        self.pending: collections.deque = collections.deque()  # (generation, step, _CudaRead)

    def observe(self, step: int, timestep: Any, new_generation: bool, restart: Callable[[Restart], None]) -> None:
        """The first forward of step `step` (the state's count of finished steps) got `timestep`.

        new_generation: this forward starts a generation anyway (another geometry). A timestep
        moving against the generation calls `restart` (eager code only): at once for a CPU value,
        which the caller answers by resetting its state, or late for a CUDA one, which it answers
        by raising; either way the watch starts over first."""
        if new_generation or step < self.step:
            self.clear()  # reset by the caller since, or about to be
        elif step == self.step:
            return  # another forward of the same step
        self.step = step
        self._poll(restart)
        value = _read(timestep)
        if isinstance(value, _CudaRead):
            if len(self.pending) >= _MAX_PENDING:
                self.pending.popleft()
            self.pending.append((self.generation, step, value))
        elif value is not None:
            before = self._moved_back(value)
            if before is not None:
                self.clear()
                self.step, self.last = 0, value  # the first step of the generation the caller starts
                restart(Restart(before, value, 0))

    def _poll(self, restart: Callable[[Restart], None]) -> None:
        """Compare the CUDA reads whose copies have completed, in step order."""
        while self.pending and self.pending[0][2].ready():
            generation, step, read = self.pending.popleft()
            if generation != self.generation:
                continue
            value = read.value()
            before = self._moved_back(value)
            if before is not None:
                late = self.step - step
                self.clear()
                restart(Restart(before, value, late))
                return

    def _moved_back(self, value: float) -> float | None:
        """Record `value` as the next step's timestep; the previous one if it moved against the
        generation's direction, else None."""
        last, self.last = self.last, value
        if last is None or value == last:
            return None
        sign = 1 if value > last else -1
        if self.direction == 0:
            self.direction = sign
            return None
        return last if sign != self.direction else None


# ---------------------------------------------------------------------- the patch's generations
# What starts a generation and ends a step of a patched model (docs/design.md section 6). `p` is
# the patch record of cat_pruning.api (its state, adapter, transformer, pipeline, driver, watch
# and wrapped schedulers).

# On the methods a patch wraps on an instance: the patch they belong to; on a scheduler's, the list
# of every patch they drive (a pipeline's two experts, from_pipe pipelines sharing the scheduler)
MARK = "_cat_pruning_patch"
# A pipeline's transformers: its transformer, and the second expert of Wan 2.2 A14B's pipelines,
# each patched with its own state
EXPERTS = ("transformer", "transformer_2")


def count_forward(state: Any) -> None:
    """One transformer call per denoising step and guidance branch: a second one in the same
    branch (a second model evaluation per step, true CFG in two calls without cache_context)
    would run on that branch's caches and overwrite the first's rows, so it is refused before it
    runs (eager code; a forward under torch.compile is not counted)."""
    state.forwards += 1
    if state.forwards > 1:
        how = ("the pipeline's scheduler.step closes a step" if state.driver == "pipeline" else
               "with manual_steps=True, call cat_pruning.advance(transformer) after each denoising step")
        where = f" in cache context {state.branch!r}" if state.branch else ""
        raise RuntimeError(
            f"cat_pruning: the transformer was called {state.forwards} times in denoising step {state.step}{where}; "
            f"each guidance branch of a patched transformer holds one set of caches, which a second call per step "
            f"would overwrite. One call per step and branch is supported ({how}); a pipeline that calls the "
            f"transformer once per CFG branch opens transformer.cache_context('cond') / ('uncond') around each "
            f"call, as diffusers' pipelines do. Unpatch to run this pipeline otherwise")


def enter_branch(p: Any, name: Any) -> None:
    """transformer.cache_context(name) opened (eager, in the pipeline's loop): the calls inside
    run on branch `name`'s caches and selection (CATState.use_branch)."""
    p.state.use_branch(getattr(name, "name", name) if not isinstance(name, str) else name)


def check_branch(state: Any) -> None:
    """A branch must run from its generation's first step (eager code): one that first appears
    later has no caches for its pruned steps."""
    if state.geometry is None and state.step > 0 and state.other_branches:
        auto = (" A bare transformer that counts a step per call cannot tell the branches of one step apart: patch "
                "it with manual_steps=True and call cat_pruning.advance(transformer) after each step."
                if state.driver == "auto" else "")
        raise RuntimeError(
            f"cat_pruning: the transformer was first called in cache context {state.branch!r} at denoising step "
            f"{state.step}, after {state.other_branches} had run; every guidance branch must run from the "
            f"generation's first step, since its pruned steps read its own caches.{auto}")


def running_pipeline(p: Any) -> Any | None:
    """The pipeline whose __call__ is running this transformer, found up the Python stack (eager
    code only): `DiffusionPipeline.from_pipe` makes pipelines that share the patched transformer,
    and the scheduler may have been replaced since the patch."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if owner is not None and hasattr(owner, "scheduler") and p.transformer in experts(owner):
            return owner
        frame = frame.f_back
    return None


def experts(pipeline: Any) -> list[Any]:
    """A pipeline's transformers (torch.compile'd ones unwrapped): its transformer, and the second
    expert of pipelines that switch to one at a timestep boundary (Wan 2.2 A14B's transformer_2)."""
    found = []
    for name in EXPERTS:
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            found.append(getattr(module, "_orig_mod", module))
    return found


def _patches(scheduler: Any) -> list:
    """The patches whose steps a scheduler's wrapped methods drive (empty: not wrapped)."""
    return getattr(vars(scheduler).get("step"), MARK, [])


def wraps(p: Any, scheduler: Any) -> bool:
    return p in _patches(scheduler)


def unwrap_scheduler(p: Any, scheduler: Any) -> None:
    """The scheduler's methods stop driving `p`; unwrapped when they drive no patch any more."""
    patches = _patches(scheduler)
    if p in patches:
        patches.remove(p)
        if not patches:
            for method in ("set_timesteps", "step"):
                scheduler.__dict__.pop(method, None)


def start_generation(p: Any, pipeline: Any) -> None:
    """A pipeline call begins (its scheduler's timesteps are set): reset, read its CFG, and warn
    when none of its steps can be pruned."""
    state = p.state
    timesteps = getattr(pipeline.scheduler, "timesteps", None)
    steps = p.adapter.steps_run(pipeline, p.transformer, timesteps) if timesteps is not None else None
    state.reset(steps)
    state.driver = "pipeline"
    p.watch.clear()
    p.adapter.check_pipeline(pipeline)
    state.reference_rows = p.adapter.reference_rows(pipeline)
    cfg = state.config.cfg_pairs
    state.cfg_pairs = p.adapter.cfg_pairs(pipeline) if cfg is None else cfg
    full = state.config.full_steps
    if steps is not None and steps <= full:
        warnings.warn(
            f"cat_pruning: full_steps={full} and this generation has {steps} denoising steps, so no step is "
            f"pruned (it runs as the unpatched pipeline); patch with full_steps < {steps} to prune",
            RuntimeWarning,
            stacklevel=4,
        )


def follow(p: Any, running: Any | None) -> None:
    """A transformer patched on its own, at a forward in eager code: inside a pipeline call it counts
    as a patched pipeline does (that pipeline's scheduler is wrapped, so each of its calls starts a
    generation at set_timesteps and each step ends at scheduler.step; the first call through a
    pipeline starts its generation here, its timesteps already set); outside one its own driver
    counts the steps again, from a new generation."""
    state = p.state
    if running is not None:
        if not wraps(p, running.scheduler):
            wrap_scheduler(p, running.scheduler)
            start_generation(p, running)
        elif state.driver != "pipeline":  # a call that set no timesteps after a bare loop
            start_generation(p, running)
    elif state.driver == "pipeline":
        start_bare_generation(p)


def start_bare_generation(p: Any, num_steps: int | None = None) -> None:
    """A bare loop's generation of num_steps steps (None: unknown) begins: step 0, the patch's own
    step driver and CFG pairing."""
    state = p.state
    state.reset(num_steps)
    state.driver = p.driver
    state.cfg_pairs = bool(state.config.cfg_pairs)
    p.watch.clear()


def restart(p: Any, restart: Restart) -> None:
    """A bare loop's timestep moved back (cat_pruning.generation): a new generation started without
    reset(). Seen before the step runs, the state resets and says so; seen late, steps ran on the
    last generation's caches, so the patch resets and refuses to go on."""
    reference = p.state.reference_rows
    p.state.reset(p.state.num_steps)  # a loop that restarts runs as many steps as before, on the same inputs
    p.state.reference_rows = reference
    moved = f"the timestep went from {restart.before:g} back to {restart.now:g}"
    advice = ("call cat_pruning.reset(transformer) before each generation of a bare denoising loop (or patch "
              "the pipeline, which starts one at every call)")
    if restart.late:
        raise RuntimeError(
            f"cat_pruning: {moved} {restart.late} step(s) ago, so a new generation started without "
            f"cat_pruning.reset(), and its steps since ran on the last generation's caches; {advice}. The patch "
            "has reset: the next forward is step 0"
        )
    warnings.warn(f"cat_pruning: {moved}, so a new generation starts at this step; {advice}", RuntimeWarning,
                  stacklevel=2)


def wrap_scheduler(p: Any, scheduler: Any) -> None:
    """Reset at each pipeline call (it sets the timesteps once) and advance after each step; a
    scheduler already wrapped for another patch (a pipeline's second expert, a from_pipe pipeline
    with another transformer) drives this one too.

    Both run in the pipeline's eager loop, outside any compiled transformer."""
    patches = _patches(scheduler)
    if patches:
        if p not in patches:
            patches.append(p)
            p.schedulers.append(scheduler)
        return
    patches = [p]
    set_timesteps, step = scheduler.set_timesteps, scheduler.step

    @functools.wraps(set_timesteps)  # pipelines inspect its signature (retrieve_timesteps: sigmas, mu)
    def wrapped_set_timesteps(*args: Any, **kwargs: Any) -> Any:
        out = set_timesteps(*args, **kwargs)
        for patch in list(patches):
            pipeline = running_pipeline(patch) or patch.pipeline  # a from_pipe pipeline may share this scheduler
            patch.sync()  # what was done to the model since the last call (cat_pruning.api)
            if pipeline is not None:
                start_generation(patch, pipeline)
            else:  # a bare loop setting the timesteps of a scheduler a transformer patch followed
                start_bare_generation(patch)
        return out

    @functools.wraps(step)
    def wrapped_step(*args: Any, **kwargs: Any) -> Any:
        for patch in patches:
            if patch.state.driver == "pipeline":  # else the bare loop's own driver counts (a followed pipeline's)
                patch.state.advance()
        return step(*args, **kwargs)

    setattr(wrapped_set_timesteps, MARK, patches)
    setattr(wrapped_step, MARK, patches)
    scheduler.set_timesteps = wrapped_set_timesteps
    scheduler.step = wrapped_step
    p.schedulers.append(scheduler)
