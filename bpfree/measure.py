"""Device-independent and device-level cost of a training step.

Everything here wraps a zero-argument callable (usually one `train_step` on a copy of the
method) and measures it without changing what it computes:

- `count_flops`: FLOPs by `torch.utils.flop_counter.FlopCounterMode` (deterministic, any device).
- `saved_tensor_bytes`: bytes autograd holds for backward, as the peak held at once and the total,
  counting each storage once and leaving out the parameters. A method that backwards block by
  block (NoProp) shows a peak of one block; end-to-end backprop shows all of them.
- `peak_step_memory`: on CUDA the allocator peak after a reset; on CPU the peak of live tensor
  bytes created during the step (a dispatch-mode count, deterministic) plus the bytes of the
  method's persistent state, since the OS-level RSS cannot be reset between measurements.
"""

from __future__ import annotations

import resource
import sys
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a clock read after it measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of `fn` (a multiply-add counts as 2)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Saved:
    """What a saved-tensor pack hook returns: holds the tensor until autograd releases it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> tuple[int, int]:
    """(peak bytes held for backward at once, total bytes saved) during one call of `fn`.

    `exclude` lists tensors that are not activations (pass the parameters): any saved tensor
    sharing storage with one of them is left out. Each storage counts once while it is held.
    """
    skip = {_storage_key(t) for t in exclude}
    held: dict[int, list[int]] = {}  # storage -> [references held, bytes]
    totals = {"live": 0, "peak": 0, "total": 0}

    def release(key: int) -> None:
        entry = held[key]
        entry[0] -= 1
        if entry[0] == 0:
            totals["live"] -= entry[1]
            del held[key]

    def pack(t: Tensor) -> Any:
        key = _storage_key(t)
        if key in skip or t.device.type == "meta":
            return t
        if key in held:
            held[key][0] += 1
        else:
            nbytes = t.untyped_storage().nbytes()
            held[key] = [1, nbytes]
            totals["live"] += nbytes
            totals["total"] += nbytes
            totals["peak"] = max(totals["peak"], totals["live"])
        box = _Saved(t)
        weakref.finalize(box, release, key)
        return box

    def unpack(packed: Any) -> Tensor:
        return packed.tensor if isinstance(packed, _Saved) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        fn()
    return totals["peak"], totals["total"]


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of storages created by ops under the mode and still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live: set[int] = set()
        self.current = 0
        self.peak = 0

    def _freed(self, key: int, nbytes: int) -> None:
        self.live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            # Forward AD's zero tangents (`_efficientzerotensor`) have no storage and no memory.
            if not isinstance(t, Tensor) or t._is_zerotensor():
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or key == 0:
                continue
            nbytes = storage.nbytes()
            self.live.add(key)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._freed, key, nbytes)
        return out


def state_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of distinct storages among `tensors` (parameters, buffers, optimiser state)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor):
            seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


@dataclass
class MemoryPeak:
    bytes: int
    kind: str  # "cuda-allocator" or "cpu-live-tensors"


def peak_step_memory(
    fn: Callable[[], Any], device: torch.device, persistent: Iterable[Tensor] = ()
) -> MemoryPeak:
    """Peak memory of one call of `fn`, including the persistent state passed in (CPU only:
    on CUDA the allocator already sees everything that is allocated)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return MemoryPeak(torch.cuda.max_memory_allocated(device), "cuda-allocator")
    with _LiveTensorBytes() as mode:
        fn()
    return MemoryPeak(state_bytes(persistent) + mode.peak, "cpu-live-tensors")


def process_peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (includes imports; cannot be reset)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
