"""A stand-in for the CUDA calls of a ring (gpuload.cuda.CudaOps), so its ordering is tested on the CPU.

It models what makes GPU code go wrong: work queued on a stream does not run when it is queued. Each
stream is a queue of Python callables ("kernels", copies, event markers) that run only when something
needs them: `event.synchronize()` runs the event's stream up to the event, `stream.synchronize()` runs
all of it, and `stream.wait_event(e)` queues a step that first runs e's stream up to e (a device-side
dependency). A copy reads its source when it runs, not when it is queued, so a host buffer overwritten
too early, a read queued after the slot it reads was refilled, or a copy left pending at close() all
come out as wrong tokens or as work still queued.

Timing can hide a missing dependency (the work happened to run in a safe order), so the fake also checks
the order itself, as a race detector: every op gets a position on its stream; an op is ordered after
another when they share a stream, when its stream waited for an event recorded after it, or when the
other had completed before it was queued. A copy into device memory that a queued gather reads without
being ordered after it, or a gather of memory a copy writes without being ordered after that copy, is
recorded in `races`. Device memory and pinned memory are CPU tensors; the fake counts pinned bytes and
records which threads called it and whether they entered first.
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
        self.clock = 0       # positions handed out to the ops queued here
        self.completed = 0   # the last position that has run
        self.seen: dict = {}  # other stream -> the position this stream waits for (wait_event)

    def enqueue(self, work) -> int:
        """Queue `work` (a callable): what a kernel launch on this stream is. Returns its position."""
        self.gpu.check_thread("enqueue")
        with self.gpu.lock:
            self.clock += 1
            position = self.clock
            self.queue.append((position, work))
            return position

    def run_one(self) -> None:
        with self.gpu.lock:
            position, work = self.queue.popleft()
            work()
            self.completed = position

    def ordered_after(self) -> dict:
        """Per stream, the last position that work queued here now comes after."""
        with self.gpu.lock:
            after = {stream: stream.completed for stream in self.gpu.streams}
            for stream, position in self.seen.items():
                after[stream] = max(after[stream], position)
            after[self] = self.clock
            return after

    def wait_event(self, event: "FakeEvent") -> None:
        self.gpu.check_thread("wait_event")
        with self.gpu.lock:
            if event.stream is not None:
                self.seen[event.stream] = max(self.seen.get(event.stream, 0), event.position)
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
        self.position = stream.enqueue(self._mark)

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


def _region(tensor: torch.Tensor) -> tuple[int, int]:
    start = tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


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
        self.destroyed: list[str] = []
        self.races: list[str] = []
        self.reads: list = []   # (stream, position, lo, hi) of each gather's device reads
        self.writes: list = []  # the same for each copy into device memory
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

    def current_stream_handle(self) -> int:
        return id(self.current_stream())

    def use_stream(self, stream: FakeStream) -> None:
        """The calling thread's current stream from now on (torch.cuda.set_stream)."""
        self._local.stream = stream

    def enter_thread(self, stream=None) -> None:
        self.entered.append((threading.current_thread().name, self.device))
        self._local.entered = True
        if stream is not None:
            self._local.stream = stream

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.check_thread("copy_async")
        stream = self.current_stream()
        with self.lock:
            after = stream.ordered_after()
            region = _region(dst)
            for other, position, lo, hi in self.reads:
                if lo < region[1] and region[0] < hi and position > after[other]:
                    self.races.append(f"a copy on {stream.name} overwrites memory a gather queued on {other.name} "
                                      f"(position {position}) reads, without waiting for it")
            self.writes.append((stream, stream.enqueue(lambda: dst.copy_(src)), *region))

    def launch(self, work, reads) -> None:
        """A gather on the calling thread's current stream that reads the tensors `reads` (device memory)."""
        stream = self.current_stream()
        with self.lock:
            after = stream.ordered_after()
            regions = [_region(t) for t in reads]
            for other, position, lo, hi in self.writes:
                if any(lo < r[1] and r[0] < hi for r in regions) and position > after[other]:
                    self.races.append(f"a gather on {stream.name} reads memory a copy queued on {other.name} "
                                      f"(position {position}) writes, without waiting for it")
            position = stream.enqueue(work)
            self.reads.extend((stream, position, *r) for r in regions)

    def capturing(self) -> bool:
        return self.capturing_now

    def synchronize(self) -> None:
        """The whole device: every stream runs dry."""
        self.check_thread("synchronize")
        with self.lock:
            while self.pending():
                for stream in self.streams:
                    if stream.queue:
                        stream.run_one()

    def destroy_stream(self, stream: FakeStream) -> None:
        assert not stream.queue, f"{stream.name} destroyed with work queued"
        self.destroyed.append(stream.name)
