"""Triton doc info: position_ids, cu_seqlens and max_seqlen of a batch x (B, T) in two launches.

cu_seqlens has a data-dependent length and each row's entries go after those of every row before it,
so a row needs the segment counts of the rows above it: a grid-wide dependency, hence two launches
(stream-ordered, no host round trip between them):
    1. _count_segments_kernel, one program per row: the row's segment count; it also fills its share
       of cu_seqlens with B*T (the padding and the final entry) and zeroes the max_seqlen slot.
    2. _doc_info_kernel, one program per row: position_ids by a running max scan of segment starts,
       the row's offset in cu_seqlens as the sum of the counts above it (B values, cheap next to T),
       the row's segment starts scattered there, and max_seqlen by atomic max. The last row's program
       writes the total segment count.
The buffer always has room for the worst case (capacity, at most B*T): with a capacity nothing waits
for the host (CUDA-graph capturable); without one, one sync reads (num_segments, max_seqlen) to trim
cu_seqlens and return ints. The reference is `gpuload.documents.doc_info_reference`, held to it with
`torch.equal` in tests/test_documents.py.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from gpuload.documents import DocInfo, check_doc_info_args
from gpuload.kernels.launch import PreparedLaunch, is_interpreted, next_power_of_2

_MIN_BLOCK = 16
_MAX_BLOCK = 1024  # columns per loop iteration: 1024 x 8 B of positions per store
_MAX_ROW_BLOCK = 1024  # counts summed per iteration for a row's cu_seqlens offset


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit(do_not_specialize=["bos"])
def _count_segments_kernel(x_ptr, counts_ptr, cu_ptr, info_ptr, bos: tl.int64, seq_len: tl.int64,
                           cu_len: tl.int64, fill_per_row: tl.int64, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * seq_len
    total = tl.num_programs(0).to(tl.int64) * seq_len
    count = tl.zeros((), tl.int64)
    for c0 in range(0, seq_len, BLOCK):
        cols = c0 + tl.arange(0, BLOCK).to(tl.int64)
        inside = cols < seq_len
        tok = tl.load(x_ptr + base + cols, mask=inside, other=0).to(tl.int64)
        is_start = ((tok == bos) | (cols == 0)) & inside
        count += tl.sum(is_start.to(tl.int64))
    tl.store(counts_ptr + row, count.to(tl.int32))

    # The padding value B*T everywhere first; kernel 2 overwrites the real starts (launch order).
    first = row * fill_per_row
    for f0 in range(0, fill_per_row, BLOCK):
        idx = first + f0 + tl.arange(0, BLOCK).to(tl.int64)
        tl.store(cu_ptr + idx, tl.full((BLOCK,), 0, tl.int32) + total.to(tl.int32),
                 mask=(idx < first + fill_per_row) & (idx < cu_len))
    tl.store(info_ptr + 1, tl.zeros((), tl.int32), mask=row == 0)


@triton.jit(do_not_specialize=["bos"])
def _doc_info_kernel(x_ptr, counts_ptr, pos_ptr, cu_ptr, info_ptr, bos: tl.int64, seq_len: tl.int64,
                     capacity: tl.int64, BLOCK: tl.constexpr, ROW_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * seq_len

    # Entries of the rows above come first in cu_seqlens.
    offset = tl.zeros((), tl.int64)
    for r0 in range(0, row, ROW_BLOCK):
        above = r0 + tl.arange(0, ROW_BLOCK).to(tl.int64)
        offset += tl.sum(tl.load(counts_ptr + above, mask=above < row, other=0).to(tl.int64))

    last_start = tl.zeros((), tl.int64)  # column of the segment the previous block ended in
    done = tl.zeros((), tl.int64)  # segment starts of this row seen so far
    longest = tl.zeros((), tl.int64)
    for c0 in range(0, seq_len, BLOCK):
        cols = c0 + tl.arange(0, BLOCK).to(tl.int64)
        inside = cols < seq_len
        tok = tl.load(x_ptr + base + cols, mask=inside, other=0).to(tl.int64)
        is_start = ((tok == bos) | (cols == 0)) & inside
        marks = tl.where(is_start, cols, -1)
        segment_start = tl.maximum(tl.associative_scan(marks, 0, _max_combine), last_start)
        positions = cols - segment_start
        tl.store(pos_ptr + base + cols, positions, mask=inside)
        longest = tl.maximum(longest, tl.max(tl.where(inside, positions + 1, 0)))
        last_start = tl.maximum(last_start, tl.max(marks))

        rank = done + tl.cumsum(is_start.to(tl.int64), 0) - 1
        dest = offset + rank
        tl.store(cu_ptr + dest, (base + cols).to(tl.int32), mask=is_start & (dest < capacity))
        done += tl.sum(is_start.to(tl.int64))

    tl.atomic_max(info_ptr + 1, longest.to(tl.int32))
    tl.store(info_ptr, (offset + done).to(tl.int32), mask=row == tl.num_programs(0) - 1)


def interpreter_active() -> bool:
    """True when this module's kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return is_interpreted(_doc_info_kernel)


def _block_size(seq_len: int) -> int:
    return max(_MIN_BLOCK, min(_MAX_BLOCK, next_power_of_2(seq_len)))


def doc_info_forward(x: torch.Tensor, bos: int, capacity: int, block: int):
    """Launch both kernels on validated arguments; returns (position_ids, cu_seqlens buffer, info)."""
    batch, seq_len = x.shape
    cu_len = capacity + 1
    positions = torch.empty((batch, seq_len), dtype=torch.int64, device=x.device)
    cu_seqlens = torch.empty(cu_len, dtype=torch.int32, device=x.device)
    counts = torch.empty(batch, dtype=torch.int32, device=x.device)
    info = torch.empty(2, dtype=torch.int32, device=x.device)  # num_segments, max_seqlen
    num_warps = max(1, min(8, block // 256))
    _count_segments_kernel[(batch,)](x, counts, cu_seqlens, info, bos, seq_len, cu_len, -(-cu_len // batch),
                                     BLOCK=block, num_warps=num_warps)
    row_block = min(_MAX_ROW_BLOCK, next_power_of_2(batch))
    _doc_info_kernel[(batch,)](x, counts, positions, cu_seqlens, info, bos, seq_len, capacity,
                               BLOCK=block, ROW_BLOCK=row_block, num_warps=num_warps)
    return positions, cu_seqlens, info


def doc_info_triton(x: torch.Tensor, bos_token: int, capacity: Optional[int] = None,
                    block_size: Optional[int] = None) -> DocInfo:
    """Doc info of a batch x (B, T) int64/int32 on a CUDA device (or the CPU under TRITON_INTERPRET=1).

    Same values and types as `gpuload.documents.doc_info_reference(x, bos_token, capacity)`:
    - capacity None: exact cu_seqlens (num_segments + 1 values, a view of a B*T + 1 buffer) and ints;
      this costs one device-to-host sync (two int32 values).
    - capacity given: fixed shapes and no sync; cu_seqlens has capacity + 1 values padded with B*T,
      max_seqlen and num_segments are 0-d int32 tensors. flash_attn_varlen_func wants an int
      max_seqlen: under a CUDA graph pass T, a valid upper bound. Starts past the capacity are dropped,
      so use capacity >= B * gpuload.documents.max_segments_per_row(doc_starts, T).
    `block_size` (a power of two) overrides the columns processed per loop iteration.
    """
    bos = check_doc_info_args(x, bos_token, capacity, "doc_info_triton")
    if x.device.type != "cuda" and not interpreter_active():
        raise RuntimeError(f"doc_info_triton: x is on {x.device}, and Triton kernels run on a CUDA device; to run on "
                           f"the CPU set TRITON_INTERPRET=1 before importing triton, or use "
                           f"gpuload.documents.doc_info_reference")
    if not x.is_contiguous():
        raise ValueError("doc_info_triton: x must be contiguous; pass x.contiguous()")
    if block_size is None:
        block_size = _block_size(x.shape[1])
    elif isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 or \
            block_size & (block_size - 1):
        raise ValueError(f"doc_info_triton: block_size must be a power of two, found {block_size!r}")
    batch, seq_len = x.shape
    launch = (x, bos, batch * seq_len if capacity is None else capacity, block_size)
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):  # Triton launches on the current device
            positions, cu_seqlens, info = doc_info_forward(*launch)
    else:
        positions, cu_seqlens, info = doc_info_forward(*launch)
    if capacity is not None:
        return DocInfo(positions, cu_seqlens, info[1], info[0])
    num_segments, max_seqlen = info.tolist()
    return DocInfo(positions, cu_seqlens[:num_segments + 1], max_seqlen, num_segments)


class PreparedDocInfo:
    """Doc info of a loader's batches with a fixed capacity, prepared once: both kernels compiled and their
    arguments kept (gpuload/kernels/launch.py), so a step costs two cheap launches and no sync.

    `static`: the outputs are the same tensors every step (CUDA-graph capture); else fresh ones each step.
    max_seqlen is T, an upper bound that needs no sync; num_segments is a 0-d int32 tensor (the true count,
    which exceeds `capacity` when the batch overflowed it)."""

    def __init__(self, x: torch.Tensor, bos_token: int, capacity: int, static: bool):
        bos = check_doc_info_args(x, bos_token, capacity, "doc info")
        batch, seq_len = x.shape
        self.shape, self.capacity, self.static, self.device = (batch, seq_len), capacity, static, x.device
        block = _block_size(seq_len)
        options = {"num_warps": max(1, min(8, block // 256))}
        outputs = self._outputs()
        positions, cu_seqlens, counts, info = outputs
        common = {"x_ptr": x, "counts_ptr": counts, "cu_ptr": cu_seqlens, "info_ptr": info, "bos": bos,
                  "seq_len": seq_len, "BLOCK": block}
        self.count = PreparedLaunch(_count_segments_kernel, batch, {
            **common, "cu_len": capacity + 1, "fill_per_row": -(-(capacity + 1) // batch)}, options, x.device)
        self.scan = PreparedLaunch(_doc_info_kernel, batch, {
            **common, "pos_ptr": positions, "capacity": capacity,
            "ROW_BLOCK": min(_MAX_ROW_BLOCK, next_power_of_2(batch))}, options, x.device)
        self._slots = [(launch, {name: launch.slot(name) for name in launch.names if name.endswith("_ptr")})
                       for launch in (self.count, self.scan)]
        self._info = self._result(outputs)

    def _outputs(self):
        batch, seq_len = self.shape
        device = self.device
        return (torch.empty((batch, seq_len), dtype=torch.int64, device=device),
                torch.empty(self.capacity + 1, dtype=torch.int32, device=device),
                torch.empty(batch, dtype=torch.int32, device=device),
                torch.empty(2, dtype=torch.int32, device=device))  # num_segments, max_seqlen

    def _result(self, outputs) -> DocInfo:
        positions, cu_seqlens, _, info = outputs
        return DocInfo(positions, cu_seqlens, self.shape[1], info[0])

    def __call__(self, x: torch.Tensor) -> DocInfo:
        """The doc info of batch `x` (same shape and device as the one prepared with), on the current stream."""
        if self.static:
            outputs, result = None, self._info
        else:
            outputs = self._outputs()
            result = self._result(outputs)
        for launch, slots in self._slots:
            launch.set_device_tensor(slots["x_ptr"], x)
            if outputs is not None:
                positions, cu_seqlens, counts, info = outputs
                for name, tensor in (("counts_ptr", counts), ("cu_ptr", cu_seqlens), ("info_ptr", info),
                                     ("pos_ptr", positions)):
                    if name in slots:
                        launch.set_device_tensor(slots[name], tensor)
        self.count()  # PreparedLaunch makes the batch's device current when it is not
        self.scan()
        return result
