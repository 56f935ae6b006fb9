"""The CUDA calls gpuload's host code makes, in one place: device names, exactly pinned host memory, and
the streams, events and copies of a ring.

Everything here runs only on a machine with a GPU, so the ring reaches CUDA through one `CudaOps` object
that tests replace with a stand-in that queues work per stream and runs it only when an event or a
synchronize asks for it (tests/fake_cuda.py): ordering mistakes then show up on the CPU as wrong tokens.

Why each piece exists:
- A CUDA device always carries its index (`resolve_device`): `torch.device("cuda") != torch.device("cuda:0")`,
  so an unindexed name would fail every device check against the tensors it produced.
- torch's pinned allocator rounds each request up to a power of two and keeps freed blocks page-locked
  for the life of the process; a 2.1 GiB ring would pin 4 GiB, for good. `PinnedHost` maps exactly the
  pages asked for and registers them with cudaHostRegister, and `release()` gives them back.
- A thread starts on device 0: the filler sets its device before any CUDA call (else every rank of a node
  creates a context on GPU 0), makes the side stream its current stream, and puts itself in the relaxed
  stream-capture mode, so its copies and event waits never invalidate a CUDA graph the training loop
  captures meanwhile (torch.cuda.graph captures in the global mode, which forbids such calls from any
  thread in the default mode).
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Optional

import numpy as np
import torch

PAGE_BYTES = mmap.PAGESIZE
_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, not only the current one
_HOST_REGISTER_MAPPED = 2    # mapped into the device address space: kernels read it (zero-copy)
_CAPTURE_MODE_RELAXED = 2    # CU_STREAM_CAPTURE_MODE_RELAXED


def resolve_device(device) -> torch.device:
    """`device` as a torch.device; a CUDA device always with its index (None: the current CUDA device).

    Raises ValueError when CUDA is asked for and is not there, or the index is not a device of this machine.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device name; expected 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available here (torch {torch.__version__}); "
                         f"use device='cpu'")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if resolved.index is None else resolved.index
    if not 0 <= index < count:
        raise ValueError(f"device={device!r}: this machine has {count} CUDA device(s): use cuda:0 .. "
                         f"cuda:{count - 1}")
    return torch.device("cuda", index)


def _cudart():
    return torch.cuda.cudart()


def page_rounded(nbytes: int) -> int:
    return -(-max(nbytes, 1) // PAGE_BYTES) * PAGE_BYTES


class PinnedHost:
    """`count` elements of `dtype` in page-locked host memory: exactly the pages they need, registered with
    CUDA for every context and mapped for kernels (zero-copy), until `release()` unregisters them.

    The memory is an anonymous mapping, so it is page-aligned and goes back to the system when the last
    view of it is dropped; `tensor` is the 1-D view to use.
    """

    def __init__(self, count: int, dtype: torch.dtype, device: torch.device):
        self.nbytes = page_rounded(count * dtype.itemsize)
        self._map: Optional[mmap.mmap] = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE)
        bytes_view = torch.from_numpy(np.frombuffer(self._map, dtype=np.uint8))
        self.tensor: Optional[torch.Tensor] = bytes_view.view(dtype)[:count]
        self.address = bytes_view.data_ptr()
        self.registered = False
        with torch.cuda.device(device):  # the runtime call would otherwise create a context on the current device
            error = int(_cudart().cudaHostRegister(self.address, self.nbytes,
                                                   _HOST_REGISTER_PORTABLE | _HOST_REGISTER_MAPPED))
        if error != 0:
            self._map = self.tensor = None
            raise MemoryError(f"cudaHostRegister of {self.nbytes} bytes ({self.nbytes / 2**30:.2f} GiB) failed with "
                              f"cudaError {error}")
        self.registered = True

    def __del__(self):
        try:
            self.release()  # a last resort: owners release explicitly, once nothing reads the pages
        except Exception:
            pass

    def release(self) -> None:
        """Unpin the pages and drop this object's view (callers make sure no copy or kernel still reads them)."""
        if self.registered:
            self.registered = False
            error = int(_cudart().cudaHostUnregister(self.address))
            if error != 0:
                raise RuntimeError(f"cudaHostUnregister of {self.nbytes} bytes failed with cudaError {error}")
        self.tensor = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive somewhere: the pages go with it
                pass
            self._map = None


def _relax_capture_mode() -> None:
    """Put the calling thread in the relaxed stream-capture mode (driver API; the runtime's equivalent is
    not exposed by torch). Best effort: without it, a capture elsewhere can only fail, never corrupt."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return
    mode = ctypes.c_int(_CAPTURE_MODE_RELAXED)
    driver.cuThreadExchangeStreamCaptureMode(ctypes.byref(mode))


class CudaOps:
    """The CUDA work of one ring on `device` (an indexed CUDA device): what tests stand in for."""

    def __init__(self, device: torch.device):
        self.device = device

    def free_bytes(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0]

    def device_tokens(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(count, dtype=dtype, device=self.device)

    def pin(self, count: int, dtype: torch.dtype) -> PinnedHost:
        return PinnedHost(count, dtype, self.device)

    def new_stream(self):
        return torch.cuda.Stream(self.device)

    def new_event(self):
        return torch.cuda.Event()

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def enter_thread(self, stream=None) -> None:
        """A background thread's first CUDA step: its device, `stream` (if any) as its current stream, and the
        relaxed capture mode."""
        torch.cuda.set_device(self.device)
        if stream is not None:
            torch.cuda.set_stream(stream)
        _relax_capture_mode()

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst <- src on the calling thread's current stream (enter_thread made it the side stream)."""
        dst.copy_(src, non_blocking=True)

    def capturing(self) -> bool:
        """Whether the calling thread's current stream on this device is being captured into a CUDA graph."""
        with torch.cuda.device(self.device):
            return torch.cuda.is_current_stream_capturing()


def capture_error(what: str) -> RuntimeError:
    return RuntimeError(
        f"{what} was called while a CUDA graph is being captured on the current stream. A batch needs the host "
        f"(ring refills, the step counter), so a captured next() would replay one fixed batch: call next() "
        f"outside the captured region and copy the batch into the graph's static inputs "
        f"(static_x.copy_(x)), or capture only the model's step.")

