"""One reused buffer per (device, dtype) that 4-bit layers dequantize their weight into.

Dequantizing into a fresh tensor on every call costs a full-size allocation and its page faults each
forward, recompute and backward, and glibc keeps the freed blocks, so anonymous memory grows by
dequantized weights nobody uses. A buffer per thread, grown to the largest layer and then reused,
removes both. Per thread, because two threads (a DataLoader-free inference server, say) must never
write into the buffer another is multiplying with.
"""

from __future__ import annotations

import threading

import torch

from lightning_qlora.quantization.backends import linear4bit_op

_local = threading.local()


def _buffers() -> dict[tuple[torch.device, torch.dtype], torch.Tensor]:
    buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] | None = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = {}
        _local.buffers = buffers
    return buffers


def workspace(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A `shape` view of this thread's buffer for (`device`, `dtype`); its content is undefined.

    The view is only valid until the next call with the same device and dtype: callers use it within
    one operation and keep nothing that aliases it.
    """
    numel = shape[0] * shape[1]
    key = (device, dtype)
    buffers = _buffers()
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffers.pop(key, None)  # free the smaller buffer before allocating its replacement
        # An ordinary tensor even under inference_mode, so later training steps can write into it.
        with torch.inference_mode(False):
            buffer = torch.empty(numel, dtype=dtype, device=device)
        buffers[key] = buffer
    return buffer[:numel].view(shape)


def workspace_bytes() -> int:
    """Bytes this thread's buffers hold, the native operator's band buffers too (for reports and tests)."""
    return sum(b.numel() * b.element_size() for b in _buffers().values()) + linear4bit_op.workspace_bytes()


def release_workspace() -> None:
    """Drop this thread's buffers, the native operator's too (they are rebuilt on the next 4-bit matmul)."""
    _buffers().clear()
    linear4bit_op.release_workspace()
