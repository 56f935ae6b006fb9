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
  pages asked for and registers them with the driver (cuMemHostRegister), and `release()` gives them back.
- A thread starts on device 0: the filler sets its device before any CUDA call (else every rank of a node
  creates a context on GPU 0), makes the side stream its current stream, and puts itself in the relaxed
  stream-capture mode, so its copies and event waits never invalidate a CUDA graph the training loop
  captures meanwhile (torch.cuda.graph captures in the global mode, which forbids such calls from any
  thread in the default mode).
- The side stream is the ring's own (cuStreamCreate), not one of torch's 32 pooled streams: a graph
  capture may run on a pooled stream, and copies queued there would land in the user's graph.
- Events the host waits on are blocking-sync events: the waiting thread sleeps instead of spinning a core.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
import warnings
from typing import Optional

import numpy as np
import torch

PAGE_BYTES = mmap.PAGESIZE
_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, not only the current one
_HOST_REGISTER_DEVICEMAP = 2  # mapped into the device address space: kernels read it (zero-copy)
_STREAM_NON_BLOCKING = 1     # no implicit synchronization with the legacy default stream
_CAPTURE_MODE_RELAXED = 2    # CU_STREAM_CAPTURE_MODE_RELAXED


class DriverError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the CUresult."""


class LibCuda:
    """The few CUDA driver calls gpuload makes itself, through ctypes (torch exposes none of them).

    The driver API, not the runtime's: it keeps no last-error state, so a failed registration cannot
    resurface as an unrelated error at torch's next kernel launch, and `context(index)` pushes a device's
    primary context explicitly, so a call from any thread lands on the right GPU and creates no context.
    """

    def __init__(self, path: str = "libcuda.so.1"):
        lib = ctypes.CDLL(path)
        p, i, u, z = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_size_t
        signatures = {
            "cuInit": [u], "cuDeviceGet": [ctypes.POINTER(i), i],
            "cuDevicePrimaryCtxRetain": [ctypes.POINTER(p), i], "cuDevicePrimaryCtxRelease_v2": [i],
            "cuCtxPushCurrent_v2": [p], "cuCtxPopCurrent_v2": [ctypes.POINTER(p)],
            "cuMemHostRegister_v2": [p, z, u], "cuMemHostUnregister": [p],
            "cuStreamCreate": [ctypes.POINTER(p), u], "cuStreamDestroy_v2": [p],
            "cuThreadExchangeStreamCaptureMode": [ctypes.POINTER(i)],
            "cuGetErrorName": [i, ctypes.POINTER(ctypes.c_char_p)],
        }
        for name, argtypes in signatures.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, i
        self.lib = lib
        self.check(lib.cuInit(0), "cuInit")

    def check(self, result: int, what: str) -> None:
        if result != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(result, ctypes.byref(name))
            raise DriverError(f"{what} failed with {(name.value or b'CUresult').decode()} ({result})")

    @contextlib.contextmanager
    def context(self, index: int):
        """Within: device `index`'s primary context is current in this thread (the previous one after)."""
        device = ctypes.c_int()
        self.check(self.lib.cuDeviceGet(ctypes.byref(device), index), f"cuDeviceGet({index})")
        context = ctypes.c_void_p()
        self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
        try:
            self.check(self.lib.cuCtxPushCurrent_v2(context), "cuCtxPushCurrent")
            try:
                yield
            finally:
                self.lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        finally:
            self.lib.cuDevicePrimaryCtxRelease_v2(device)

    def host_register(self, index: int, address: int, nbytes: int) -> int:
        """cuMemHostRegister (portable, device-mapped); returns the CUresult instead of raising."""
        with self.context(index):
            return self.lib.cuMemHostRegister_v2(address, nbytes, _HOST_REGISTER_PORTABLE | _HOST_REGISTER_DEVICEMAP)

    def host_unregister(self, index: int, address: int) -> None:
        with self.context(index):
            self.check(self.lib.cuMemHostUnregister(address), "cuMemHostUnregister")

    def create_stream(self, index: int) -> int:
        handle = ctypes.c_void_p()
        with self.context(index):
            self.check(self.lib.cuStreamCreate(ctypes.byref(handle), _STREAM_NON_BLOCKING), "cuStreamCreate")
        return handle.value

    def destroy_stream(self, index: int, handle: int) -> None:
        with self.context(index):
            self.check(self.lib.cuStreamDestroy_v2(handle), "cuStreamDestroy")

    def relax_capture_mode(self) -> None:
        """The calling thread's stream-capture mode becomes relaxed (no context needed: it is per thread)."""
        mode = ctypes.c_int(_CAPTURE_MODE_RELAXED)
        self.check(self.lib.cuThreadExchangeStreamCaptureMode(ctypes.byref(mode)), "cuThreadExchangeStreamCaptureMode")


_libcuda_instance: Optional[LibCuda] = None
_libcuda_lock = threading.Lock()


def libcuda() -> LibCuda:
    """The process's LibCuda, loaded on first use (tests replace this function)."""
    global _libcuda_instance
    with _libcuda_lock:
        if _libcuda_instance is None:
            _libcuda_instance = LibCuda()
        return _libcuda_instance


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


def page_rounded(nbytes: int) -> int:
    return -(-max(nbytes, 1) // PAGE_BYTES) * PAGE_BYTES


class PinnedHost:
    """`count` elements of `dtype` in page-locked host memory: exactly the pages they need, registered with
    CUDA for every context and mapped for kernels (zero-copy), until `release()` unregisters them.

    The memory is an anonymous mapping, so it is page-aligned and goes back to the system when the last
    view of it is dropped; `tensor` is the 1-D view to use. A forked child does not inherit it.
    """

    def __init__(self, count: int, dtype: torch.dtype, device: torch.device):
        self.device_index = device.index
        self.nbytes = page_rounded(count * dtype.itemsize)
        self.registered = False
        self._map: Optional[mmap.mmap] = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE)
        if hasattr(mmap, "MADV_DONTFORK"):  # a DataLoader worker forked later must not copy-on-write pinned pages
            self._map.madvise(mmap.MADV_DONTFORK)
        bytes_view = torch.from_numpy(np.frombuffer(self._map, dtype=np.uint8))
        self.tensor: Optional[torch.Tensor] = bytes_view.view(dtype)[:count]
        self.address = bytes_view.data_ptr()
        del bytes_view
        lib = libcuda()
        result = lib.host_register(self.device_index, self.address, self.nbytes)
        if result != 0:
            self.release()
            try:
                lib.check(result, f"cuMemHostRegister of {self.nbytes} bytes ({self.nbytes / 2**30:.2f} GiB)")
            except DriverError as e:
                raise MemoryError(str(e)) from None
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
            libcuda().host_unregister(self.device_index, self.address)
        self.tensor = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive somewhere: the pages go with it
                pass
            self._map = None


_warned_capture_mode = False


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
        """A non-blocking stream of the ring's own: not one of torch's pooled streams, which a CUDA graph
        capture (torch.cuda.graph's capture stream, torch.compile's cudagraph trees) may be using."""
        return torch.cuda.ExternalStream(libcuda().create_stream(self.device.index), device=self.device)

    def destroy_stream(self, stream) -> None:
        libcuda().destroy_stream(self.device.index, stream.cuda_stream)

    def new_event(self):
        return torch.cuda.Event(blocking=True)  # a host waiting on it sleeps instead of spinning a core

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def current_stream_handle(self) -> int:
        """The current stream's handle (cheaper than current_stream(): no Python object)."""
        return torch._C._cuda_getCurrentRawStream(self.device.index)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def enter_thread(self, stream=None) -> None:
        """A background thread's first CUDA step: its device, `stream` (if any) as its current stream, and the
        relaxed capture mode."""
        global _warned_capture_mode
        torch.cuda.set_device(self.device)
        if stream is not None:
            torch.cuda.set_stream(stream)
        try:
            libcuda().relax_capture_mode()
        except (OSError, AttributeError, DriverError) as e:
            if not _warned_capture_mode:
                _warned_capture_mode = True
                warnings.warn(f"gpuload: the ring's fill thread could not enter the relaxed stream-capture mode "
                              f"({e}); capture CUDA graphs with capture_error_mode='thread_local' while a ring "
                              f"smaller than the stream refills", RuntimeWarning, stacklevel=2)

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst <- src on the calling thread's current stream (enter_thread made it the side stream)."""
        dst.copy_(src, non_blocking=True)

    def capturing(self) -> bool:
        return capturing(self.device.index)


def capturing(index: int) -> bool:
    """Whether the calling thread's current stream on CUDA device `index` is being captured into a CUDA graph
    (without a device switch when `index` is the current device: the per-step case)."""
    if torch._C._cuda_getDevice() == index:
        return torch._C._cuda_isCurrentStreamCapturing()
    with torch.cuda.device(index):
        return torch._C._cuda_isCurrentStreamCapturing()


def capture_error(what: str) -> RuntimeError:
    return RuntimeError(
        f"{what} was called while a CUDA graph is being captured on the current stream. This loader needs the "
        f"host for every batch (fresh outputs, ring refills, or a host-side gather), so a captured next() would "
        f"replay one fixed batch: call next() outside the captured region and copy the batch into the graph's "
        f"static inputs (static_x.copy_(x)), or, to capture next() itself, use backend='triton' with "
        f"static_buffers=True and a ring that holds each whole stream (README, 'CUDA graphs').")

