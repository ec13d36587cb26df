"""One host->device copy per step for all of the step's metadata.

A step's metadata (token ids, positions, KV slots, block tables, the delta slot tiles, ...) is dozens of small
arrays. Copied one by one from pageable memory, each is a synchronous transfer on a GPU. Instead the builders
write their host values into one pinned buffer and get back, at once, views of a device buffer at the same
offsets; `upload()` then copies the bytes written in one non-blocking transfer, enqueued before any kernel
that reads them. On the CPU the host tensors are used as they are (no copy at all).

The buffers are reused step after step: `begin()` waits for the previous step's copy to have completed (in
practice it has: every step ends with the sampled tokens read back) before writing over the host buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_ALIGN = 16  # bytes: every view starts aligned for any dtype


class StepStaging:
    """Allocates staged device tensors for one step at a time; see the module docstring."""

    def __init__(self, device: torch.device | str, capacity: int = 1 << 16, separate_buffers: bool | None = None):
        """separate_buffers: a host and a device buffer with a copy between them (default: on a GPU); tests
        force it on the CPU to run the GPU's code path."""
        self.device = torch.device(device)
        self._separate = self.device.type != "cpu" if separate_buffers is None else separate_buffers
        self.capacity = 0
        self.used = 0
        self._grow_to = capacity
        self._event: torch.cuda.Event | None = None
        self.host: torch.Tensor | None = None
        self.dev: torch.Tensor | None = None
        self.copies = 0  # host->device transfers made in the current step (1 after upload; tests read it)

    @property
    def copies_data(self) -> bool:
        return self._separate

    def begin(self) -> StepStaging:
        """Starts a step: earlier views may be overwritten from now on."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        if self.copies_data and self._grow_to > self.capacity:
            self.capacity = self._grow_to
            self.host = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            self.dev = torch.empty(self.capacity, dtype=torch.uint8, device=self.device)
        self.used = 0
        self.copies = 0
        return self

    def __call__(self, values: Sequence[int] | Sequence[float] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The values as a 1-D tensor of `dtype` on the device; its contents arrive with upload()."""
        t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        t = t.to(dtype).reshape(-1)
        if not self.copies_data:
            return t
        nbytes = t.numel() * t.element_size()
        start = -(-self.used // _ALIGN) * _ALIGN
        if start + nbytes > self.capacity:
            # Too small this step: copy this one on its own, and grow before the next step (growing now would
            # move the views already handed out).
            self._grow_to = max(2 * self.capacity, start + nbytes + (1 << 16))
            self.copies += 1
            return (t.pin_memory() if self.device.type == "cuda" else t.clone()).to(self.device, non_blocking=True)
        assert self.host is not None and self.dev is not None
        self.host[start : start + nbytes].view(dtype).copy_(t)
        self.used = start + nbytes
        return self.dev[start : start + nbytes].view(dtype)

    def upload(self) -> None:
        """Copies everything staged since begin() to the device, in one non-blocking transfer."""
        if not self.copies_data or self.used == 0:
            return
        assert self.host is not None and self.dev is not None
        self.dev[: self.used].copy_(self.host[: self.used], non_blocking=True)
        self.copies += 1
        if self.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

