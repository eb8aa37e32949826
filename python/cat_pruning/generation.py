"""Where a generation of a transformer patched on its own starts, when no pipeline says so.

A patched pipeline starts a generation at every call (its scheduler's ``set_timesteps``), and so
does a transformer patched on its own while a pipeline's ``__call__`` runs it (cat_pruning.api
finds that pipeline up the Python stack). A bare denoising loop is told by
:func:`cat_pruning.reset`; one that starts over without it would run its first steps on the
last generation's caches. :class:`TimestepWatch` notices that from the timestep: within a
generation it moves one way (down in diffusers' schedulers, up in some flow-matching loops),
so a step whose timestep moves the other way starts a new one.

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
