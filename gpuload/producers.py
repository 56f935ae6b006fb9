"""Producers: each backend's per-step production of a rank's batch, built once from the plan.

A producer holds everything its steps need, readers (rings or shard tables), prepared launches, output
buffers, and `produce(step)` is the per-step path (README, "Host cost per batch"):
- TritonProducer: per source, the ring's acquire / release (a lock on a whole-stream ring) around one
  prepared kernel launch (gpuload/kernels/triton_gather.py PreparedGather): no Python loop over rows, no
  host-device sync, no allocation with static buffers, no event on a whole-stream ring. With static
  buffers on whole-stream rings the step lives on the device (`counter`, [step, launch scratch]): the
  kernel reads it and its last program advances it, so next() can be captured in a CUDA graph and each
  replay gathers the next batch.
- NativeProducer: the C++ gather on the host from the memory maps (csrc/), copied to the device; the
  shard table's watch (csrc/watch.h) reports a shard changed under the maps within a bounded number of steps.
- TorchProducer: the plain-torch reference, reading the ring.
Producers import the plan; the loader imports the producers, never the other way round.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from gpuload import native
from gpuload.cuda import capture_error, capturing
from gpuload.documents import doc_info_reference
from gpuload.kernels.gather import gather_reference, packed_gather_reference
from gpuload.plan import Plan, Source
from gpuload.ring import Ring
from gpuload.sampling import MASK64, SAMPLING_IDS


def _open_rings(plan: Plan) -> list[Ring]:
    rings = []
    for source in plan.sources:
        source.ring = Ring(source.stream, source.layout, plan.rule, plan.seed, plan.device, plan.placement,
                           aligned=source.aligned)
        rings.append(source.ring)
    return rings


class Producer:
    """What every producer has: the plan, static outputs if asked for, doc info, and capture detection."""

    counter: Optional[torch.Tensor] = None  # a device step counter, when the step lives on the device
    rings: tuple = ()  # the torch and triton producers read rings (a list of them)

    def __init__(self, plan: Plan):
        self.plan = plan
        self.shape = (plan.batch_size, plan.seq_len)
        self.cuda_index = plan.device.index if plan.device.type == "cuda" else None
        self.out: Optional[tuple[torch.Tensor, torch.Tensor]] = self._outputs() if plan.static_buffers else None

    def _outputs(self, device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """An uninitialized (x, y) pair on `device` (default: the loader's)."""
        device = self.plan.device if device is None else device
        return (torch.empty(self.shape, dtype=self.plan.input_dtype, device=device),
                torch.empty(self.shape, dtype=torch.int64, device=device))

    def produce(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch made on the host, on the loader's device (in the static outputs when there are any)."""
        if self.out is not None:
            return self.out[0].copy_(x, non_blocking=True), self.out[1].copy_(y, non_blocking=True)
        if x.device != self.plan.device:
            return x.to(self.plan.device, non_blocking=True), y.to(self.plan.device, non_blocking=True)
        return x, y

    def doc_info(self, x: torch.Tensor):
        """Doc info of batch x: fixed shapes with the plan's capacity, or exact (one sync) for doc_info='exact'."""
        plan = self.plan
        if plan.doc_capacity is None:
            return doc_info_reference(x, plan.bos_token)
        doc = doc_info_reference(x, plan.bos_token, plan.doc_capacity)
        return doc._replace(max_seqlen=plan.seq_len)

    def set_seed(self, seed: int) -> None:
        """A resume took another seed (plan.seed has it already): it reorders a chunked ring's visits."""
        for ring in self.rings:
            ring.reset(seed)

    def check_not_capturing(self) -> None:
        """A step that needs the host for every batch must not be captured: it would replay one batch."""
        if self.cuda_index is not None and capturing(self.cuda_index):
            raise capture_error("next()")

    def close(self) -> None:
        """Drop what refers to the readers' memory, so the sources can give it back (Plan.close frees it)."""
        self.out = None


class NativeProducer(Producer):
    """The C++ gather (csrc/), GIL released, straight from the memory maps; pinned outputs copied to the device."""

    def __init__(self, plan: Plan):
        super().__init__(plan)
        # The stream's shard table keeps the memory maps alive while a call is in flight (the page cache is its
        # ring) and watches the files behind them (csrc/watch.h): a changed shard raises ShardChanged in next().
        self.tables = []
        for source in plan.sources:
            source.table = source.stream.table
            self.tables.append(source.table)
        B = plan.batch_size
        self._rows = np.arange(plan.rank * B, (plan.rank + 1) * B, dtype=np.int64)
        self._starts = np.empty(B, dtype=np.int64)
        self._which, self._index = np.empty(B, dtype=np.int64), np.empty(B, dtype=np.int64)

    def _host_outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        pin = self.cuda_index is not None  # pinned host memory lets the device copy run asynchronously
        return (torch.empty(self.shape, dtype=self.plan.input_dtype, pin_memory=pin),
                torch.empty(self.shape, dtype=torch.int64, pin_memory=pin))

    def produce(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_not_capturing()
        plan, T = self.plan, self.plan.seq_len
        int32 = plan.input_dtype == torch.int32
        tables = self.tables  # close() in another thread replaces the list: this step keeps its tables alive
        if not tables:
            raise RuntimeError("the loader was closed while next() ran; create a new GPULoader to go on")
        x, y = self._host_outputs()
        if plan.pack:  # the rows' pieces planned and gathered in C++ (csrc/packing.cpp)
            tables[0].gather_packed(plan.sources[0].packing, step, plan.rank * plan.batch_size, plan.global_batch,
                                    plan.sampling == "random", plan.batch_size, T, x.data_ptr(), int32,
                                    y.data_ptr(), plan.bos_token)
            return self._to_device(x, y)
        seed = plan.seed & MASK64
        if not plan.mixed:
            source, table = plan.sources[0], tables[0]
            if source.doc_starts is None:
                table.sample_and_gather(SAMPLING_IDS[plan.rule], seed, step, plan.rank * plan.batch_size,
                                        plan.global_batch, T, self._starts, x.data_ptr(), int32, y.data_ptr(),
                                        source.windows_per_chunk)
            else:
                self._aligned_starts(source, step, self._rows, self._starts)
                table.gather(self._starts, T, x.data_ptr(), int32, y.data_ptr(), step)
            return self._to_device(x, y)
        # The mixture in C++ too: gpuload.mixture.mixture_rows's rule, then per source the starts of its rows and
        # their gather straight into the batch rows they belong to.
        native.module().mixture_rows(seed, step, plan.counts, plan.rank * plan.batch_size, self._which, self._index)
        for k, (source, table) in enumerate(zip(plan.sources, tables)):
            rows = np.flatnonzero(self._which == k)
            if rows.size == 0:
                continue
            index, starts = self._index[rows], self._starts[:rows.size]
            if source.doc_starts is None:
                table.sample_rows_and_gather(SAMPLING_IDS[plan.rule], seed, step, index, source.rows,
                                             T, rows, starts, x.data_ptr(), int32, y.data_ptr(), plan.batch_size,
                                             source.windows_per_chunk)
            else:
                self._aligned_starts(source, step, index, starts)
                table.gather_rows(starts, T, rows, x.data_ptr(), int32, y.data_ptr(), plan.batch_size, step)
        return self._to_device(x, y)

    def close(self) -> None:
        """Drop the shard tables: the last reference stops each one's watch thread (joined)."""
        super().close()
        self.tables = []

    def _aligned_starts(self, source: Source, step: int, rows: np.ndarray, out: np.ndarray) -> None:
        """align='bos' window starts of `source`'s rows `rows` at `step` into `out`, in C++ (csrc/sampling.h)."""
        plan = self.plan
        table, pass0, pos0, visited = None, 0, 0, 0
        if source.aligned is not None:  # a chunked ring: the pass table the Triton kernel reads too
            pass0, pos0, table = source.aligned.step_table(plan.seed, step)
            table, visited = table.numpy(), source.aligned.num_visited
        native.module().aligned_starts(SAMPLING_IDS[plan.rule], plan.seed & MASK64, step, rows, source.rows,
                                       source.doc_starts.numpy(), table, pass0, pos0, visited, out)


class TorchProducer(Producer):
    """The plain-torch reference: window starts by gpuload/sampling.py, one indexing gather from the ring."""

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.rings = _open_rings(plan)

    def _packed(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """pack='bestfit': the rows' stream positions planned on the host, one indexed gather from the ring."""
        ring = self.rings[0]
        tokens = ring.acquire(step)
        try:
            positions = torch.from_numpy(self.plan.packed_positions(step))
            return packed_gather_reference(tokens, positions, self.plan.bos_token, self.plan.input_dtype)
        finally:
            ring.release(step)

    def produce(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_not_capturing()
        plan = self.plan
        if plan.pack:
            return self._to_device(*self._packed(step))
        which, index = plan.row_sources(step)
        parts = []
        for k, (source, ring) in enumerate(zip(plan.sources, self.rings)):
            tokens = ring.acquire(step)
            try:
                rows = torch.nonzero(which == k).flatten() if plan.mixed else None
                if rows is None or rows.numel():
                    starts, visits = plan.source_starts(source, step, index if rows is None else index[rows])
                    positions = ring.ring_positions(starts, visits).to(tokens.device)
                    bounds = torch.tensor([0, tokens.numel()], device=tokens.device)
                    parts.append((rows, *gather_reference([tokens], bounds, positions, plan.seq_len,
                                                          plan.input_dtype)))
            finally:
                ring.release(step)
        if not plan.mixed:
            return self._to_device(*parts[0][1:])
        # Zero-copy placement: the torch reference reads the host ring, and the rows meet on the host.
        device = parts[0][1].device
        x, y = self._outputs(device)
        for rows, part_x, part_y in parts:
            x[rows.to(device)], y[rows.to(device)] = part_x, part_y
        return self._to_device(x, y)


class TritonProducer(Producer):
    """One prepared Triton launch per source, reading its ring; the batch never leaves the device."""

    def __init__(self, plan: Plan):
        super().__init__(plan)
        from gpuload.kernels.triton_docs import PreparedDocInfo
        from gpuload.kernels.triton_gather import PreparedGather

        self.rings = _open_rings(plan)
        # The step on the device: static outputs (the addresses a graph captures), rings that never refill, and
        # no per-step read back to the host (doc_info="exact" syncs every step: it cannot be captured anyway).
        if (plan.static_buffers and plan.loop and plan.doc_info != "exact" and not plan.pack
                and all(source.chunking is None for source in plan.sources)):
            self.counter = torch.zeros(2, dtype=torch.int64, device=plan.device)
        x, y = self.out if self.out is not None else self._outputs()
        self.gathers = []
        for k, (source, ring) in enumerate(zip(plan.sources, self.rings) if not plan.pack else ()):
            layout = source.layout
            # The counter advances with the last source's launch, once every source has read it.
            last = k == len(plan.sources) - 1
            step = 0 if self.counter is None or last else self.counter[:1]
            self.gathers.append(PreparedGather(
                ring.tokens, plan.rule, plan.seed, step, plan.rank * plan.batch_size, plan.batch_size,
                source.rows, source.num_tokens, plan.seq_len, x, y, plan.input_dtype, chunking=layout.chunking,
                num_slots=layout.num_slots, slot_tokens=layout.slot_tokens, device=plan.device,
                mixture=(plan.counts, k) if plan.mixed else None, doc_starts=source.doc_starts,
                aligned_chunks=source.aligned, step_counter=self.counter if last else None))
        self.docs = None
        if plan.doc_info and plan.doc_capacity is not None:
            self.docs = PreparedDocInfo(x, plan.bos_token, plan.doc_capacity, static=self.out is not None)
        if plan.pack:  # two pinned host buffers of row positions, one device buffer the kernel reads
            shape, pin = (plan.batch_size, plan.seq_len + 1), self.cuda_index is not None
            self._positions_host = [torch.empty(shape, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
            self._positions_copied = [torch.cuda.Event() if pin else None for _ in range(2)]
            self._positions_device = torch.empty(shape, dtype=torch.int64, device=plan.device)

    def set_seed(self, seed: int) -> None:
        super().set_seed(seed)
        for gather in self.gathers:
            gather.set_seed(seed)

    def set_step(self, step: int) -> None:
        """A resume: the device counter takes the step (on the current stream, like the gathers)."""
        if self.counter is not None:
            self.counter.copy_(torch.tensor([step, 0], dtype=torch.int64), non_blocking=False)

    def _packed_triton(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """pack='bestfit': the rows' positions planned on the host into one of two pinned buffers, copied to the
        device on the current stream (the buffer is reused two steps later, once that copy is done), and one
        launch of the packed gather (gpuload/kernels/triton_packed.py)."""
        from gpuload.kernels.triton_packed import gather_packed_triton

        plan, ring = self.plan, self.rings[0]
        host, copied = self._positions_host[step % 2], self._positions_copied[step % 2]
        if copied is not None:
            copied.synchronize()  # the copy out of this buffer two steps ago (returns at once if never recorded)
        plan.packed_positions(step, host.numpy())
        x, y = self.out if self.out is not None else self._outputs()
        tokens = ring.acquire(step)
        try:
            positions = self._positions_device.copy_(host, non_blocking=True)
            if copied is not None:
                copied.record(torch.cuda.current_stream(plan.device))  # the stream the copy was queued on
            gather_packed_triton(tokens, positions, plan.bos_token, x, y)
        finally:
            ring.release(step)
        return x, y

    def produce(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.counter is None:
            self.check_not_capturing()
        if self.plan.pack:
            return self._packed_triton(step)
        if self.out is None:
            x, y = self._outputs()
        else:
            x = y = None  # the gathers keep the static outputs they were prepared with
        for gather, ring in zip(self.gathers, self.rings):
            ring.acquire(step)
            try:
                gather(step, x, y)
            finally:
                ring.release(step)
        return self.out if x is None else (x, y)

    def doc_info(self, x: torch.Tensor):
        if self.docs is not None:
            return self.docs(x)
        from gpuload.kernels.triton_docs import doc_info_triton

        return doc_info_triton(x, self.plan.bos_token)

    def close(self) -> None:
        """Drop the prepared launches: they hold the rings' tensors (a zero-copy ring's pinned pages among them).
        A CUDA graph captured around next() holds their addresses too: replay it no more after close()."""
        super().close()
        self.gathers, self.docs, self.counter = [], None, None


def make_producer(plan: Plan) -> Producer:
    return {"native": NativeProducer, "torch": TorchProducer, "triton": TritonProducer}[plan.backend](plan)
