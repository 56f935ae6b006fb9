"""The ring: stream tokens held in memory for the gather, filled in bulk by a background thread.

Layout. `plan_ring` picks one of two layouts:
- whole stream (the default when it fits `default_ring_bytes()`, or `ring_tokens >= N`): one slot holds
  every token, filled once; batches follow the whole-stream contract (gpuload/sampling.py).
- chunked (`ring_tokens < N`): NUM_SLOTS page-aligned slots, each holding one chunk of the stream
  (`sampling.Chunking`). Visit v (one stay of a chunk) lives in slot v mod NUM_SLOTS. Which visits a
  step reads is a function of the step (`Chunking.step_visits`), so batches never depend on I/O timing:
  the consumer waits until its visits are loaded, and the filler overwrites a slot only once the
  consumer has moved past its visit (a step reads at most 3 visits, so 4 slots leave one filling ahead).
  With align='bos' (`documents.AlignedChunking`) the visits follow the document starts: a visit loads
  the C + T tokens from its chunk's start, and a step reads at most 4 visits (checked when built).

Placement on CUDA: "device" keeps the slots in device memory, refreshed on a side stream by async
copies through two pinned 16 MiB staging buffers (a read into one overlaps the copy out of the other),
so the host pins 32 MiB whatever the ring's size; the gather waits on the copy's event, and the copies
wait on the event of the last gather that read the slot. "zero-copy" keeps the slots in pinned host
memory (exactly the ring's pages, gpuload/cuda.py's PinnedHost) that the kernel reads through unified
addressing; the filler waits for the last gather that read a slot before overwriting it. A whole-stream
fill completes on the device before the first batch reads it (the filler waits for its copies), so
whole-stream gathers wait on nothing. On the CPU the ring is ordinary memory read in place. Every CUDA
call goes through one `gpuload.cuda.CudaOps`; the filler thread sets its device and capture mode first.

Faults. An exception in the filler (a shard changed since the loader opened it, a read error) is raised
by the next `acquire()`, i.e. the loader's next `next()`; every fill read is checked against the shard as
opened after it lands (TokenStream.read_into), so a changed shard never reaches the ring. The filler is
a daemon thread that holds no reference to the Ring, so an unclosed loader neither hangs interpreter exit
nor outlives its last reference.
"""

from __future__ import annotations

import atexit
import os
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from gpuload.cuda import CudaOps, capture_error
from gpuload.sampling import Chunking
from gpuload.shards import ShardChanged, TokenStream

if TYPE_CHECKING:
    from gpuload.documents import AlignedChunking

PLACEMENTS = ("device", "zero-copy")
NUM_SLOTS = 4
PAGE_BYTES = 4096
FILL_PIECE_BYTES = 16 << 20  # one read and one H2D copy; small enough for a prompt stop, large enough for bulk speed
DEFAULT_RING_BYTES = 4 << 30  # a node's default budget at most, shared by its ranks (default_ring_bytes)
WAIT_POLL_S = 0.2
CLOSE_WAIT_S = 60.0  # close() waits this long for a next() in flight before leaving the memory to the GC

_TORCH_TOKEN_DTYPES = {np.dtype(np.uint16): torch.uint16, np.dtype(np.uint32): torch.uint32}


def default_ring_bytes(local_ranks: int = 1) -> int:
    """One loader's default ring budget: the node's budget, min(4 GiB, 1/8 of physical memory), divided among
    the `local_ranks` ranks on the node (the loader passes gpuload.plan.local_world_size()). The whole stream
    goes in the ring up to it; larger streams are chunked.

    Per kind of memory: device memory (placement='device' rings on CUDA) and host memory (CPU and zero-copy
    rings) are budgeted apart, and each loader of a rank takes at most one share, so a node whose ranks each
    hold L loaders of one kind (train + val: 2) holds at most L node budgets of it, whatever its rank count.
    """
    if isinstance(local_ranks, bool) or not isinstance(local_ranks, int) or local_ranks < 1:
        raise ValueError(f"default_ring_bytes: local_ranks must be an integer >= 1 (the ranks on this node), "
                         f"got {local_ranks!r}")
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 * DEFAULT_RING_BYTES
    return min(DEFAULT_RING_BYTES, physical // 8) // local_ranks


@dataclass(frozen=True)
class RingLayout:
    """Where stream tokens live in the ring: `chunking` None means one slot holding the whole stream."""

    chunking: Optional[Chunking]
    num_slots: int
    slot_tokens: int  # the stride between slots

    @property
    def ring_tokens(self) -> int:
        return self.num_slots * self.slot_tokens


def smallest_chunked_ring(itemsize: int, seq_len: int, global_batch: int) -> int:
    """The fewest ring tokens whose page-aligned slots each hold one global batch of windows (plus a token)."""
    page = PAGE_BYTES // itemsize
    return NUM_SLOTS * (-(-((global_batch + 1) * seq_len) // page) * page)


def plan_ring(num_tokens: int, itemsize: int, seq_len: int, global_batch: int,
              ring_tokens: Optional[int] = None) -> RingLayout:
    """The layout for a stream of `num_tokens`; `ring_tokens` None = the whole stream within the default budget."""
    if ring_tokens is None:
        budget = default_ring_bytes() // itemsize
        ring_tokens = num_tokens if num_tokens <= budget else budget
    if ring_tokens >= num_tokens:
        return RingLayout(None, 1, num_tokens)
    page = PAGE_BYTES // itemsize
    slot = ring_tokens // NUM_SLOTS // page * page
    windows_per_chunk = (slot - seq_len) // seq_len if slot > seq_len else 0
    if windows_per_chunk < global_batch:
        need = smallest_chunked_ring(itemsize, seq_len, global_batch)
        raise ValueError(
            f"ring_tokens={ring_tokens} is too small for global batch {global_batch} x seq_len {seq_len}: each of the "
            f"ring's {NUM_SLOTS} slots must hold one global batch of windows, so ring_tokens must be at least {need} "
            f"(or at least the stream's {num_tokens} tokens to hold it whole)")
    return RingLayout(Chunking(num_tokens, seq_len, global_batch, windows_per_chunk), NUM_SLOTS, slot)


_live_fillers: "weakref.WeakSet[_Filler]" = weakref.WeakSet()


@atexit.register
def _stop_fillers_at_exit() -> None:
    # Stop the fillers while the interpreter is whole: a parked filler woken during finalization (by a
    # Ring's __del__) made the process abort with "terminate called without an active exception".
    for filler in list(_live_fillers):
        filler.stop()


class _HostMemory:
    """Unpinned host memory for a ring on the CPU: the same interface as gpuload.cuda.PinnedHost."""

    def __init__(self, count: int, dtype: torch.dtype):
        self.tensor: Optional[torch.Tensor] = torch.empty(count, dtype=dtype)
        self.nbytes = count * dtype.itemsize

    def release(self) -> None:
        self.tensor = None


def _allocate_host(count: int, dtype: torch.dtype, ops: Optional[CudaOps]):
    """Host memory for `count` tokens: pinned through `ops` on CUDA, ordinary on the CPU."""
    return _HostMemory(count, dtype) if ops is None else ops.pin(count, dtype)


class _Staging:
    """Two pinned buffers the filler stages device-placement copies through: a read into one overlaps the
    copy out of the other, and a buffer is refilled only once its previous copy has completed."""

    def __init__(self, ops: CudaOps, piece_tokens: int, dtype: torch.dtype):
        self.buffers = [ops.pin(piece_tokens, dtype) for _ in range(2)]
        self.copied: list = [None, None]  # the event after the last copy out of each buffer
        self.turn = 0

    def take(self) -> tuple[int, torch.Tensor]:
        """(index, tensor) of the next buffer, once no copy reads it any more."""
        i, self.turn = self.turn, self.turn ^ 1
        if self.copied[i] is not None:
            self.copied[i].synchronize()
        return i, self.buffers[i].tensor

    def drain(self) -> None:
        """Wait for every copy out of the buffers."""
        for event in self.copied:
            if event is not None:
                event.synchronize()

    def release(self) -> None:
        for buffer in self.buffers:
            buffer.release()
        self.buffers = []


class _Filler:
    """The background side of the ring: fills visit after visit, never more than the free slots allow."""

    def __init__(self, ring: "Ring", first_visit: int):
        self.stream, self.layout = ring.stream, ring.layout
        self.sampling, self.seed, self.aligned = ring.sampling, ring.seed, ring.aligned
        self.ops, self.side_stream = ring.ops, ring.side_stream
        self.host, self.device_ring, self.staging = ring.host, ring.device_ring, ring.staging
        self.slot_read, self.slot_copied = ring.slot_read, ring.slot_copied
        self.cond = threading.Condition()
        self.low = first_visit       # the consumer's lowest visit still needed; slots of older visits are free
        self.ready = first_visit - 1  # every visit in (ready - num_slots, ready] is resident
        self.stopped = False
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, args=(first_visit,), name="gpuload-ring-fill", daemon=True)
        self.thread.start()
        _live_fillers.add(self)

    def _run(self, visit: int) -> None:
        try:
            if self.ops is not None:
                self.ops.enter_thread(self.side_stream)
            whole = self.layout.chunking is None
            while True:
                with self.cond:
                    while not self.stopped and visit - self.layout.num_slots >= self.low:
                        self.cond.wait()
                    if self.stopped:
                        return
                if not self._fill(visit):
                    return
                if whole and self.staging is not None:
                    # The stream is on the device for good: no gather needs to wait for it, and the
                    # staging buffers go back once their last copies are done.
                    self.staging.drain()
                    self.staging.release()
                with self.cond:
                    self.ready = visit
                    self.cond.notify_all()
                if whole:
                    return
                visit += 1
        except BaseException as e:  # surfaces in the training loop at the next acquire()
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def _chunk_span(self, visit: int) -> tuple[int, int]:
        chunking = self.layout.chunking
        if chunking is None:
            return 0, self.stream.num_tokens
        if self.aligned is not None:
            return self.aligned.span(self.aligned.visit_chunk(self.seed, visit))
        chunk = chunking.visit_chunk(self.sampling, self.seed, visit)
        return chunk * chunking.chunk_tokens, chunking.chunk_length(chunk)

    def _fill(self, visit: int) -> bool:
        """Load visit `visit` into its slot; False when stopped meanwhile."""
        slot = visit % self.layout.num_slots
        start, count = self._chunk_span(visit)
        if self.layout.chunking is not None:
            self.stream.advise(*self._chunk_span(visit + 1))  # disk readahead for the next visit while this one reads
        base = slot * self.layout.slot_tokens
        piece = max(1, FILL_PIECE_BYTES // self.stream.dtype.itemsize)
        last_read = self.slot_read[slot]  # the gathers that read this slot's previous visit
        if self.device_ring is None:
            if last_read is not None:
                last_read.synchronize()  # zero-copy: they read the host slot about to be overwritten
            for offset in range(0, count, piece):
                if self.stopped:
                    return False
                n = min(piece, count - offset)
                self.stream.read_into(self.host[base + offset:base + offset + n].numpy(), start + offset)
            return True
        if last_read is not None:
            self.side_stream.wait_event(last_read)  # the copies below queue behind them on the device
        for offset in range(0, count, piece):
            if self.stopped:
                return False
            n = min(piece, count - offset)
            i, buffer = self.staging.take()
            self.stream.read_into(buffer[:n].numpy(), start + offset)
            self.ops.copy_async(self.device_ring[base + offset:base + offset + n], buffer[:n])
            copied = self.ops.new_event()
            copied.record(self.side_stream)
            self.staging.copied[i] = copied
        self.slot_copied[slot] = copied if count else None
        return True

    def release_below(self, visit: int) -> None:
        with self.cond:
            if visit > self.low:
                self.low = visit
                self.cond.notify_all()

    def wait_ready(self, visit: int, what: str) -> None:
        with self.cond:
            while self.ready < visit:
                if isinstance(self.error, ShardChanged):
                    raise ShardChanged(
                        f"{self.error} The ring stopped before loading the changed tokens, so no batch holds them; "
                        f"{what} need them. This loader stays stopped: restore the shard, then go on from this "
                        f"step with a new loader (load_state_dict), or create one on the new content."
                    ) from self.error
                if self.error is not None:
                    raise self.error
                if self.stopped:
                    raise RuntimeError(f"the loader was closed while next() waited for {what}")
                if not self.thread.is_alive():
                    raise RuntimeError(f"gpuload's ring fill thread stopped before loading {what}")
                self.cond.wait(WAIT_POLL_S)

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        if self.thread is not threading.current_thread():
            self.thread.join()


class Ring:
    """Stream tokens resident for the gather: `acquire(step)` -> the tensor to read, then `release(step)`
    once the gather is queued (always, in a `finally`: close() waits for the reader in between).

    Per step on CUDA, a whole-stream ring costs a lock and nothing else: its tokens never change once
    loaded. A chunked ring records one event when the step's first visit moves on (the gathers that read
    the visits left behind; the filler waits on it before reusing their slots) and makes the current stream
    wait once for each newly loaded visit's copies. One consumer stream at a time: when the current stream
    changes, the host waits for the gathers queued on the previous one (rare: a loop uses one stream).
    """

    def __init__(self, stream: TokenStream, layout: RingLayout, sampling: str, seed: int, device: torch.device,
                 placement: str = "device", aligned: Optional["AlignedChunking"] = None,
                 ops: Optional[CudaOps] = None):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if aligned is not None and aligned.chunking != layout.chunking:
            raise ValueError("Ring: the AlignedChunking was built for another chunking than the layout's")
        if device.type == "cuda" and device.index is None:
            raise ValueError(f"Ring: a CUDA device needs its index (gpuload.cuda.resolve_device), found {device}")
        _free_leftovers()
        self.stream, self.layout, self.sampling, self.seed = stream, layout, sampling, seed
        self.aligned = aligned  # align='bos' on a chunked ring: visits follow the document starts
        self.device, self.placement = device, placement
        # Every CUDA call of the ring goes through `ops` (tests pass a stand-in); None on the CPU.
        self.ops = ops if ops is not None else (CudaOps(device) if device.type == "cuda" else None)
        dtype = _TORCH_TOKEN_DTYPES[stream.dtype]
        nbytes = layout.ring_tokens * stream.dtype.itemsize
        self.host: Optional[torch.Tensor] = None
        self.device_ring: Optional[torch.Tensor] = None
        self.side_stream = None
        self._host_memory = None
        self.staging: Optional[_Staging] = None
        # Per slot: the event after the last gathers of its visit, and (device placement) after its copies.
        self.slot_read: list = [None] * layout.num_slots
        self.slot_copied: list = [None] * layout.num_slots
        self.filler: Optional[_Filler] = None
        self.closed = False
        self._lifecycle = threading.Lock()  # no filler starts once close() has begun
        self._reading = threading.Lock()    # held from acquire() to release(): close() frees nothing in between
        self._free_on_release = False
        self._resident: Optional[torch.Tensor] = None  # whole stream loaded: the tensor every step reads
        self._last_visits: Optional[tuple[int, int]] = None  # (first, last) visit of the previous step
        self._consumer = None      # (raw handle, stream) the gathers are queued on
        self._settled: Optional[tuple[int, int]] = None  # the last step's visits, when all is done for them
        self._waited_through = -1  # the consumer stream waits for the copies of visits up to this one
        if self.ops is not None and placement == "device":
            free = self.ops.free_bytes()
            if nbytes > free // 2:
                raise ValueError(
                    f"the ring ({nbytes / 2**30:.2f} GiB) is more than half of the {free / 2**30:.2f} GiB free on "
                    f"{device}: pass a smaller ring_tokens= (now {layout.ring_tokens}), or placement='zero-copy' to "
                    f"keep the ring in pinned host memory")
            self.device_ring = self.ops.device_tokens(layout.ring_tokens, dtype)
            self.side_stream = self.ops.new_stream()
        piece = min(layout.ring_tokens, FILL_PIECE_BYTES // stream.dtype.itemsize)
        count = 2 * piece if self.device_ring is not None else layout.ring_tokens
        try:
            if self.device_ring is not None:
                self.staging = _Staging(self.ops, piece, dtype)
            else:
                self._host_memory = _allocate_host(layout.ring_tokens, dtype, self.ops)
                self.host = self._host_memory.tensor
        except (RuntimeError, MemoryError) as e:
            raise MemoryError(
                f"could not allocate the ring: {count} tokens ({count * stream.dtype.itemsize / 2**30:.2f} GiB) of "
                f"{'pinned (page-locked) ' if self.ops is not None else ''}host memory ({e}). Pass a smaller "
                f"ring_tokens= to GPULoader (at least {NUM_SLOTS} slots of one global batch of windows), or free "
                f"host memory.") from e

    @property
    def tokens(self) -> Optional[torch.Tensor]:
        """What the gather reads: the device ring, or the host ring (zero-copy on CUDA, in place on the CPU)."""
        return self.device_ring if self.device_ring is not None else self.host

    def pinned_bytes(self) -> int:
        """Host bytes this ring keeps page-locked now (0 on the CPU)."""
        if self.ops is None:
            return 0
        buffers = self.staging.buffers if self.staging is not None else []
        if self._host_memory is not None:
            buffers = buffers + [self._host_memory]
        return sum(buffer.nbytes for buffer in buffers)

    def visits(self, step: int) -> tuple[int, int]:
        """First and last visit the rows of `step` read."""
        chunking = self.layout.chunking
        if chunking is None:
            return 0, 0
        if self.aligned is not None:
            return self.aligned.step_visits(self.seed, step)
        return chunking.step_visits(self.sampling, step)

    def acquire(self, step: int) -> torch.Tensor:
        """Wait until every token step `step` reads is resident; the returned tensor is safe to read on the
        current stream until `release(step)`, which must follow (also when the read fails)."""
        if not self._reading.acquire(blocking=False):
            raise RuntimeError("the ring is already being read: acquire() was not followed by release(), or two "
                               "threads read one ring at once (a GPULoader serializes its next() calls; a Ring "
                               "used directly must be read by one thread at a time)")
        try:
            if self._resident is not None and not self.closed:
                return self._resident
            return self._acquire(step)
        except BaseException:
            self._reading.release()
            raise

    def _acquire(self, step: int) -> torch.Tensor:
        first, last = self.visits(step)
        ops = self.ops
        if (first, last) == self._settled and not self.closed and (
                ops is None or ops.current_stream_handle() == self._consumer[0]):
            return self.tokens  # the visits of the step before, loaded and waited for on this stream
        self._settled = None
        if ops is not None and self.layout.chunking is not None:
            self._follow_consumer(first, last)
        filler = self.filler
        # A jump backwards (resume) or far ahead restarts the fill at the step's first visit.
        if filler is None or first < filler.low or first > max(filler.ready, filler.low) + self.layout.num_slots:
            filler = self._restart(first)
        if first > filler.low:
            filler.release_below(first)
        if filler.ready < last:
            filler.wait_ready(last, f"the tokens of step {step}")
        tokens = self.tokens
        if tokens is None or self.closed:
            raise RuntimeError("the loader was closed while next() ran; create a new GPULoader to go on")
        if self.layout.chunking is None:
            self._resident = tokens  # loaded for good (a device fill completed before `ready`)
        elif self.device_ring is not None and last > self._waited_through:
            stream = self._consumer[1]
            for visit in range(max(first, self._waited_through + 1), last + 1):
                copied = self.slot_copied[visit % self.layout.num_slots]
                if copied is not None:
                    stream.wait_event(copied)
            self._waited_through = last
        if self.layout.chunking is not None:
            self._settled = (first, last)
        return tokens

    def _follow_consumer(self, first: int, last: int) -> None:
        """CUDA, chunked: guard the slots of the visits the previous step read and this one leaves behind."""
        ops = self.ops
        stream = ops.current_stream()
        if self._consumer is None or stream != self._consumer[1]:
            if ops.capturing():
                raise capture_error("next() on a ring smaller than the stream")
            if self._consumer is not None:  # gathers queued on the previous stream: wait for them here
                done = ops.new_event()
                done.record(self._consumer[1])
                done.synchronize()
            self._consumer = (ops.current_stream_handle(), stream)
            self._waited_through = -1
        previous = self._last_visits
        self._last_visits = (first, last)
        if previous is None or previous[0] == first:
            return
        if ops.capturing():
            raise capture_error("next() on a ring smaller than the stream")
        read = ops.new_event()
        read.record(self._consumer[1])
        for visit in range(previous[0], previous[1] + 1):
            if not first <= visit <= last:
                self.slot_read[visit % self.layout.num_slots] = read

    def release(self, step: int) -> None:
        """After the reads of `step` are queued on the current stream (frees the ring if close() timed out)."""
        self._reading.release()
        if self._free_on_release:
            with self._reading:
                self._free()

    def ring_positions(self, starts: torch.Tensor, visits: Optional[torch.Tensor]) -> torch.Tensor:
        """Where each window start `starts` (stream positions) of visit `visits` lies in the ring.

        A start of chunk j's visit lies in [j*C, (j+1)*C) (the last chunk's: within C of its first token),
        with align='bos' too, so its offset in the slot is start mod C."""
        chunking = self.layout.chunking
        if chunking is None:
            return starts
        return (visits % self.layout.num_slots) * self.layout.slot_tokens + starts % chunking.chunk_tokens

    def _restart(self, first_visit: int) -> _Filler:
        with self._lifecycle:
            if self.closed:
                raise RuntimeError("the loader was closed while next() ran; create a new GPULoader to go on")
            if self.filler is not None:
                self.filler.stop()
            if self._consumer is not None:  # any slot may be reloaded now: after every gather queued so far
                read = self.ops.new_event()
                read.record(self._consumer[1])
                self.slot_read[:] = [read] * self.layout.num_slots
            self._waited_through = first_visit - 1  # the visits from here on are loaded anew
            self._settled = None
            self.filler = _Filler(self, first_visit)
            return self.filler

    def reset(self, seed: int) -> None:
        """Take another seed (a resume): it reorders the chunks, so a chunked ring refills at the next acquire."""
        if self.filler is not None and self.layout.chunking is not None:
            self.filler.stop()
            self.filler = None
        self._settled = None
        self.seed = seed

    def close(self) -> None:
        """Stop the filler and free the ring (pinned memory included) once the work queued on it is done:
        a next() in flight finishes first, then the device finishes the copies (which write the device
        ring and read the staging buffers) and the gathers that read the ring, on every stream."""
        with self._lifecycle:
            self.closed = True
        if self.filler is not None:
            self.filler.stop()  # wakes a next() waiting for a fill: it raises 'closed' and releases
            self.filler = None
        if not self._reading.acquire(timeout=CLOSE_WAIT_S):
            self._free_on_release = True  # the next() holding the ring frees it when it lets go
            warnings.warn(f"gpuload: a next() has held the ring for over {CLOSE_WAIT_S:.0f} s during close(); the "
                          f"ring is freed when it returns", RuntimeWarning, stacklevel=2)
            return
        try:
            self._free()
        finally:
            self._reading.release()

    def _free(self) -> None:
        self._free_on_release = False
        leftover = _Leftover(self.ops, self.side_stream, self.staging, self._host_memory)
        self.staging = self._host_memory = self.side_stream = None
        self.host = self.device_ring = self._resident = None
        leftover.free_or_defer()

    def __del__(self):
        filler = getattr(self, "filler", None)
        if filler is not None:
            filler.stop()
        if getattr(self, "closed", True):
            return
        try:
            # An unclosed ring: its pinned memory goes back once the queued work is done; inside a CUDA graph
            # capture, which forbids the synchronize, the next Ring or the interpreter's exit frees it.
            _Leftover(self.ops, self.side_stream, self.staging, self._host_memory).free_or_defer()
        except Exception:  # CUDA may already be shut down at interpreter exit
            pass


class _Leftover:
    """A ring's memory on its way back: freed once the device is done with the work queued on it."""

    def __init__(self, ops, side_stream, staging, host_memory):
        self.ops, self.side_stream, self.staging, self.host_memory = ops, side_stream, staging, host_memory

    def free(self) -> bool:
        """Free it now, or return False during a CUDA graph capture (where a synchronize is not allowed)."""
        if self.ops is not None:
            if self.ops.capturing():
                return False
            self.ops.synchronize()  # copies on the side stream and gathers on any stream, all done
            if self.side_stream is not None:
                self.ops.destroy_stream(self.side_stream)
        if self.staging is not None:
            self.staging.release()
        if self.host_memory is not None:
            self.host_memory.release()
        return True

    def free_or_defer(self) -> None:
        """Free it now, or, inside a capture, when the next Ring is made or the interpreter exits."""
        if not self.free():
            _leftovers.append(self)


_leftovers: list[_Leftover] = []


@atexit.register
def _free_leftovers() -> None:
    _leftovers[:] = [leftover for leftover in _leftovers if not leftover.free()]
