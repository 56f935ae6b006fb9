"""A stand-in for the CUDA calls of a ring (gpuload.cuda.CudaOps), so its ordering is tested on the CPU.

It models what makes GPU code go wrong: work queued on a stream does not run when it is queued. Each
stream is a queue of Python callables ("kernels", copies, event markers) that run only when something
needs them: `event.synchronize()` runs the event's stream up to the event, `stream.synchronize()` runs
all of it, and `stream.wait_event(e)` queues a step that first runs e's stream up to e (a device-side
dependency). A copy reads its source when it runs, not when it is queued, so a host buffer overwritten
too early, a read queued after the slot it reads was refilled, or a copy left pending at close() all
come out as wrong tokens or as work still queued. Device memory and pinned memory are CPU tensors; the
fake counts pinned bytes and records which threads called it and whether they entered first.
"""

from __future__ import annotations

import collections
import threading

import torch

from gpuload.cuda import page_rounded


class FakeStream:
    def __init__(self, gpu: "FakeGPU", name: str):
        self.gpu, self.name = gpu, name
        self.queue: collections.deque = collections.deque()

    def enqueue(self, work) -> None:
        """Queue `work` (a callable): what a kernel launch on this stream is."""
        self.gpu.check_thread("enqueue")
        with self.gpu.lock:
            self.queue.append(work)

    def run_one(self) -> None:
        with self.gpu.lock:
            work = self.queue.popleft()
            work()

    def wait_event(self, event: "FakeEvent") -> None:
        self.gpu.check_thread("wait_event")
        self.enqueue(event.synchronize)

    def synchronize(self) -> None:
        self.gpu.check_thread("stream.synchronize")
        with self.gpu.lock:
            while self.queue:
                self.run_one()


class FakeEvent:
    def __init__(self, gpu: "FakeGPU"):
        self.gpu, self.stream, self.done = gpu, None, False

    def record(self, stream: FakeStream) -> None:
        self.gpu.check_thread("event.record")
        assert self.stream is None, "the ring records each event once"
        self.stream = stream
        stream.enqueue(self._mark)

    def _mark(self) -> None:
        self.done = True

    def synchronize(self) -> None:
        self.gpu.check_thread("event.synchronize")
        with self.gpu.lock:
            while self.stream is not None and not self.done:
                self.stream.run_one()


class FakePinned:
    def __init__(self, gpu: "FakeGPU", count: int, dtype: torch.dtype):
        self.gpu, self.nbytes = gpu, page_rounded(count * dtype.itemsize)
        self.tensor = torch.full((count,), 7777, dtype=torch.int64).to(dtype)  # garbage until filled
        self.released = False
        gpu.pin_requests.append(count * dtype.itemsize)
        gpu.live_pinned.add(self)

    def release(self) -> None:
        self.released = True
        self.tensor = None
        self.gpu.live_pinned.discard(self)


class FakeGPU:
    """Implements gpuload.cuda.CudaOps's interface on the CPU."""

    def __init__(self, index: int = 0):
        self.device = torch.device("cuda", index)
        self.lock = threading.RLock()  # the consumer and the filler both make streams run
        self.default_stream = FakeStream(self, "default")
        self.streams = [self.default_stream]
        self.live_pinned: set = set()
        self.pin_requests: list[int] = []
        self.entered: list[tuple[str, torch.device]] = []  # (thread name, device) per enter_thread
        self.violations: list[str] = []
        self.capturing_now = False
        self._local = threading.local()

    def check_thread(self, what: str) -> None:
        """A background thread must enter (set its device) before its first CUDA call."""
        thread = threading.current_thread()
        if thread is not threading.main_thread() and not getattr(self._local, "entered", False):
            self.violations.append(f"{what} from thread {thread.name!r} before enter_thread")

    def pending(self) -> int:
        return sum(len(stream.queue) for stream in self.streams)

    def live_pinned_bytes(self) -> int:
        return sum(p.nbytes for p in self.live_pinned)

    # gpuload.cuda.CudaOps
    def free_bytes(self) -> int:
        return 1 << 40

    def device_tokens(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        self.check_thread("device_tokens")
        return torch.full((count,), 9999, dtype=torch.int64).to(dtype)

    def pin(self, count: int, dtype: torch.dtype) -> FakePinned:
        self.check_thread("pin")
        return FakePinned(self, count, dtype)

    def new_stream(self) -> FakeStream:
        stream = FakeStream(self, f"side{len(self.streams)}")
        self.streams.append(stream)
        return stream

    def new_event(self) -> FakeEvent:
        return FakeEvent(self)

    def current_stream(self) -> FakeStream:
        return getattr(self._local, "stream", self.default_stream)

    def enter_thread(self, stream=None) -> None:
        self.entered.append((threading.current_thread().name, self.device))
        self._local.entered = True
        if stream is not None:
            self._local.stream = stream

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.check_thread("copy_async")
        self.current_stream().enqueue(lambda: dst.copy_(src))

    def capturing(self) -> bool:
        return self.capturing_now
