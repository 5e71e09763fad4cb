"""Peak bytes of live tensor storage on the CPU during real training steps.

torch's CPU allocator keeps no peak statistic, RSS mixes in the allocator's caching and every
library's pages, and torch's MemTracker refuses frozen parameters (LoRA). So this probe follows
every storage that an operator creates (a dispatch mode sees each one, in the forward, the
backward and the optimizer step) until it is freed, plus the storages that exist before it
starts (weights). What it measures is what a GPU's `max_memory_allocated` would report for the
same tensors, without the caching allocator's rounding.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class StoragePeak(TorchDispatchMode):
    """Live and peak bytes of the storages created inside the mode, over `baseline` bytes."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._seen: set[int] = set()
        self.live = 0
        self.peak = 0
        for tensor in existing:
            self._track(tensor.untyped_storage())
        self.baseline = self.live
        self.peak = self.live

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage.data_ptr()
        if key in self._seen or storage.nbytes() == 0 or storage.device.type != "cpu":
            return
        self._seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and not value.is_meta:
                self._track(value.untyped_storage())
        return out
