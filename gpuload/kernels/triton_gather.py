"""Triton gather: one launch builds a rank's whole (B, T) batch (one per source of a mixture), window
starts computed in the kernel.

Each program owns one row's column block: it computes the row's window start from (seed, step, global
row) with exactly the arithmetic of `gpuload/sampling.py` (ported line for line from its docstring;
csrc/sampling.h is the same port in C++), then copies BLOCK tokens into x and the next BLOCK into y.
With align='bos' the start is an entry of the usable document starts, a device tensor the kernel
indexes by the rules of `gpuload/documents.py` (on a chunked ring, through a per-pass table).
The reference is `gpuload.sampling.window_starts` + `gpuload.kernels.gather.gather_reference`, held to
it with `torch.equal` in tests/test_triton_gather.py.

The hash is unsigned 64-bit: every value is `tl.uint64`, so `*` wraps modulo 2**64, `>>` is logical,
and `%`, `//` and `>=` are unsigned, both compiled (the sm_90 PTX has `shr.u64`, `rem.u64`, `div.u64`,
and `mul.lo` with the constants' exact bits) and in the interpreter (numpy uint64 arrays). Scalar
arguments arrive as int64 holding the same 64 bits and are cast with `.to(tl.uint64)`, which
sign-extends, so a value the interpreter types as int32 or uint32 gets the bits the compiled kernel's
int64 has.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from gpuload.cuda import resolve_device
from gpuload.documents import ALIGNED_MODES, SALT_ALIGNED_RANDOM, AlignedChunking
from gpuload.kernels.launch import PreparedLaunch, is_interpreted, next_power_of_2
from gpuload.mixture import SALT_MIXTURE
from gpuload.sampling import (FEISTEL_ROUNDS, MIX_C1, MIX_C2, SALT_CHUNKS, SALT_RANDOM, SALT_SHUFFLE, SAMPLING_IDS,
                              SAMPLING_MODES, Chunking, check_domain, feistel_half_bits, to_signed, windows_per_epoch)

# Module globals used inside @triton.jit must be constexpr. Values >= 2**63 become uint64 constants.
_MIX_C1 = tl.constexpr(MIX_C1)
_MIX_C2 = tl.constexpr(MIX_C2)
_SALT_RANDOM = tl.constexpr(SALT_RANDOM)
_SALT_SHUFFLE = tl.constexpr(SALT_SHUFFLE)
_SALT_CHUNKS = tl.constexpr(SALT_CHUNKS)
_SALT_MIXTURE = tl.constexpr(SALT_MIXTURE)
_SALT_ALIGNED_RANDOM = tl.constexpr(SALT_ALIGNED_RANDOM)
_FEISTEL_ROUNDS = tl.constexpr(FEISTEL_ROUNDS)

# The kernel unrolls the Feistel rounds with one key per round; a new round count is a new contract.
assert FEISTEL_ROUNDS == 6, "triton_gather unrolls exactly 6 Feistel rounds; update _feistel_encrypt"

# Tokens are read as unsigned so values >= 2**15 / 2**31 zero-extend; signed views share the bits.
_TOKEN_DTYPES = {torch.uint16: torch.uint16, torch.int16: torch.uint16,
                 torch.uint32: torch.uint32, torch.int32: torch.uint32}

# Column-block heuristic: grow BLOCK only once there are enough programs to fill the GPU (132 SMs on
# an H100 x ~8 resident CTAs ~= 1024); 2048 tokens x (8 B + 8 B) written = 32 KiB per program caps it.
_TARGET_PROGRAMS = 1024
_MIN_BLOCK = 16
_MAX_BLOCK = 2048
# Mixture rows ranked per loop iteration: 256 hashes are 2 KiB of registers per program, over 4 warps.
_MIX_BLOCK = 256


@triton.jit
def _mix64(x):
    # SplitMix64 finalizer on uint64: wrapping multiplies, logical shifts.
    x = (x ^ (x >> 30)) * _MIX_C1
    x = (x ^ (x >> 27)) * _MIX_C2
    return x ^ (x >> 31)


@triton.jit
def _feistel_encrypt(x, half, mask, k0, k1, k2, k3, k4, k5):
    left = x >> half
    right = x & mask
    left, right = right, left ^ (_mix64(right ^ k0) & mask)
    left, right = right, left ^ (_mix64(right ^ k1) & mask)
    left, right = right, left ^ (_mix64(right ^ k2) & mask)
    left, right = right, left ^ (_mix64(right ^ k3) & mask)
    left, right = right, left ^ (_mix64(right ^ k4) & mask)
    left, right = right, left ^ (_mix64(right ^ k5) & mask)
    return (left << half) | right


@triton.jit
def _feistel_permute(index, epoch, seed_key, n, half):
    """perm(seed, epoch)(index) over [0, n), seed_key = mix64(seed ^ SALT_SHUFFLE); uint64 scalars."""
    key_base = epoch * _FEISTEL_ROUNDS + seed_key
    k0 = _mix64(key_base)
    k1 = _mix64(key_base + 1)
    k2 = _mix64(key_base + 2)
    k3 = _mix64(key_base + 3)
    k4 = _mix64(key_base + 4)
    k5 = _mix64(key_base + 5)
    mask = (tl.full((), 1, tl.uint64) << half) - 1
    # Cycle walking: the domain 4**half is < 4 * n, so ~1.3 walks on average; the scalar loop is per
    # program (one row), so lanes never diverge.
    x = _feistel_encrypt(index, half, mask, k0, k1, k2, k3, k4, k5)
    while x >= n:
        x = _feistel_encrypt(x, half, mask, k0, k1, k2, k3, k4, k5)
    return x


@triton.jit
def _chunk_order(seed, epoch, pos, num_chunks, half_chunks):
    """order(e, pos) of the chunked rule: the short last chunk stays last, the others are permuted."""
    chunk_key = _mix64(seed ^ _SALT_CHUNKS ^ _SALT_SHUFFLE)
    last = num_chunks - 1
    inner = _feistel_permute(tl.minimum(pos, last - 1), epoch, chunk_key, last, half_chunks)
    return tl.where(pos == last, last, inner)


@triton.jit
def _window_start(seed, step, row, global_batch, num_tokens, num_windows, seq_len, half,
                  windows_per_chunk, num_chunks, chunk_tokens, last_windows, last_length, steps_per_visit,
                  half_last, half_chunks, SAMPLING: tl.constexpr, CHUNKED: tl.constexpr):
    """(window start, ring visit) of global row `row` at `step`; uint64 scalars. The visit is 0 unless CHUNKED."""
    visit = tl.zeros((), tl.uint64)
    if SAMPLING == 0:
        h = _mix64(_mix64(_mix64(seed ^ _SALT_RANDOM) + step) + row)
        if CHUNKED:
            visit = step // steps_per_visit
            epoch = visit // num_chunks
            chunk = _chunk_order(seed, epoch, visit - epoch * num_chunks, num_chunks, half_chunks)
            valid = tl.where(chunk == num_chunks - 1, last_length - seq_len, chunk_tokens + 1 - seq_len)
            start = chunk * chunk_tokens + (h >> 1) % valid
        else:
            start = (h >> 1) % (num_tokens - seq_len)
    else:
        w = step * global_batch + row
        epoch = w // num_windows
        index = w - epoch * num_windows
        if CHUNKED:
            pos = index // windows_per_chunk
            visit = epoch * num_chunks + pos
        if SAMPLING == 2:
            start = index * seq_len
        else:
            seed_key = _mix64(seed ^ _SALT_SHUFFLE)
            if CHUNKED:
                chunk = _chunk_order(seed, epoch, pos, num_chunks, half_chunks)
                is_last = chunk == num_chunks - 1
                within = _feistel_permute(index - pos * windows_per_chunk, visit, seed_key,
                                          tl.where(is_last, last_windows, windows_per_chunk),
                                          tl.where(is_last, half_last, half))
                start = (chunk * windows_per_chunk + within) * seq_len
            else:
                start = _feistel_permute(index, epoch, seed_key, num_windows, half) * seq_len
    return start, visit


@triton.jit
def _aligned_start(seed, step, row, global_batch, num_starts, half, doc_starts_ptr, table_ptr, table_len, pass0,
                   pos0, num_visited, SAMPLING: tl.constexpr, CHUNKED: tl.constexpr):
    """(window start, ring visit) of global row `row` at `step` for align='bos' (gpuload/documents.py): an index
    into the usable document starts (sequential: into the epoch's row starts), then one load. CHUNKED: the step's pass table (AlignedChunking.pass_table)
    places the row in its visit, scanning from the visit of the step's first row (at most 3 entries)."""
    w = step * global_batch + row
    visit = tl.zeros((), tl.uint64)
    if CHUNKED:
        lin = w - pass0 * num_starts
        pos = pos0
        nxt = tl.load(table_ptr + pos + 1).to(tl.uint64)
        while nxt <= lin:
            pos += 1
            nxt = tl.load(table_ptr + pos + 1).to(tl.uint64)
        first = tl.load(table_ptr + table_len + pos).to(tl.uint64)
        count = tl.load(table_ptr + 2 * table_len + pos).to(tl.uint64)
        visit = pass0 * num_visited + pos.to(tl.uint64)
        if SAMPLING == 0:
            h = _mix64(_mix64(_mix64(seed ^ _SALT_ALIGNED_RANDOM) + step) + row)
            index = first + (h >> 1) % count
        else:
            within = lin - tl.load(table_ptr + pos).to(tl.uint64)
            half_chunk = tl.load(table_ptr + 3 * table_len + pos).to(tl.uint64)
            index = first + _feistel_permute(within, visit, _mix64(seed ^ _SALT_SHUFFLE), count, half_chunk)
    else:
        if SAMPLING == 0:
            h = _mix64(_mix64(_mix64(seed ^ _SALT_ALIGNED_RANDOM) + step) + row)
            index = (h >> 1) % num_starts
        elif SAMPLING == 2:  # a table of the epoch's row starts, in order (sequential rows, llm.c's order)
            index = w % num_starts
        else:
            epoch = w // num_starts
            index = _feistel_permute(w - epoch * num_starts, epoch, _mix64(seed ^ _SALT_SHUFFLE), num_starts, half)
    start = tl.load(doc_starts_ptr + index.to(tl.int64, bitcast=True)).to(tl.uint64)
    return start, visit


@triton.jit
def _mixture_slot(seed, step, row, mix_rows, MIX_BLOCK: tl.constexpr):
    """slot(row) of gpuload/mixture.py: how many of the step's mix_rows row hashes are below row's own."""
    key = _mix64(_mix64(seed ^ _SALT_MIXTURE) + step)
    own = _mix64(key + row)
    below = tl.zeros((MIX_BLOCK,), tl.int64)
    others = tl.arange(0, MIX_BLOCK).to(tl.uint64)
    # Counting instead of sorting: O(G) per program, no second launch, and a CUDA graph replays it as is.
    for _ in range(0, mix_rows, MIX_BLOCK):
        hashes = _mix64(key + others)
        below += ((hashes < own) & (others < mix_rows.to(tl.uint64))).to(tl.int64)
        others += MIX_BLOCK
    return tl.sum(below, axis=0).to(tl.uint64)


@triton.jit(do_not_specialize=["seed", "step", "row0", "token_offset", "pass0", "pos0"])
def _gather_batch_kernel(
    tokens_ptr,
    x_ptr,
    y_ptr,
    starts_ptr,
    step_ptr,
    doc_starts_ptr,
    table_ptr,
    seed: tl.int64,
    step: tl.int64,
    row0: tl.int64,
    global_batch: tl.int64,
    num_tokens: tl.int64,
    num_windows: tl.int64,
    seq_len: tl.int64,
    feistel_half: tl.int64,
    token_offset: tl.int64,
    num_resident: tl.int64,
    num_col_blocks: tl.int64,
    windows_per_chunk: tl.int64,
    num_chunks: tl.int64,
    chunk_tokens: tl.int64,
    last_windows: tl.int64,
    last_length: tl.int64,
    steps_per_visit: tl.int64,
    half_last: tl.int64,
    half_chunks: tl.int64,
    num_slots: tl.int64,
    slot_tokens: tl.int64,
    mix_rows: tl.int64,
    mix_first: tl.int64,
    table_len: tl.int64,
    pass0: tl.int64,
    pos0: tl.int64,
    num_visited: tl.int64,
    SAMPLING: tl.constexpr,
    CHUNKED: tl.constexpr,
    MIXED: tl.constexpr,
    ALIGNED: tl.constexpr,
    STEP_FROM_PTR: tl.constexpr,
    ADVANCE_STEP: tl.constexpr,
    WRITE_STARTS: tl.constexpr,
    BLOCK: tl.constexpr,
    MIX_BLOCK: tl.constexpr,
):
    # Flat 1-D grid, column blocks of a row adjacent: neighbouring programs read neighbouring tokens
    # and there is no 65535 limit on rows as there would be on grid axis 1.
    pid = tl.program_id(0).to(tl.int64)
    row = pid // num_col_blocks
    col_block = pid - row * num_col_blocks

    # The step lives on the device when the launch is captured in a CUDA graph and replayed.
    if STEP_FROM_PTR:
        step_u = tl.load(step_ptr).to(tl.uint64)
    else:
        step_u = step.to(tl.uint64)
    # MIXED: this launch serves one source of a mixture, rows mix_first .. mix_first + global_batch - 1
    # of the mixture's slots (gpuload/mixture.py); row0 + row is the row of the whole batch of mix_rows,
    # and the row's index among the source's rows stands in for the global row of the contract.
    source_row = (row0 + row).to(tl.uint64)
    mine = row >= 0
    if MIXED:
        slot = _mixture_slot(seed.to(tl.uint64), step_u, source_row, mix_rows, MIX_BLOCK)
        mine = (slot >= mix_first.to(tl.uint64)) & (slot < (mix_first + global_batch).to(tl.uint64))
        source_row = tl.where(mine, slot - mix_first.to(tl.uint64), tl.zeros((), tl.uint64))
    # Scalar work per program (sm_90 PTX: 7 multiplies and one u64 remainder for random, 41 multiplies
    # for shuffle plus 12 per extra walk), redone by each column block rather than staged through
    # memory: cheaper than a second launch or a grid-wide barrier.
    if ALIGNED:  # align='bos': num_windows and feistel_half are those of the D usable document starts
        start_u, visit_u = _aligned_start(
            seed.to(tl.uint64), step_u, source_row, global_batch.to(tl.uint64), num_windows.to(tl.uint64),
            feistel_half.to(tl.uint64), doc_starts_ptr, table_ptr, table_len, pass0.to(tl.uint64), pos0,
            num_visited.to(tl.uint64), SAMPLING, CHUNKED)
    else:
        start_u, visit_u = _window_start(
            seed.to(tl.uint64), step_u, source_row, global_batch.to(tl.uint64),
            num_tokens.to(tl.uint64), num_windows.to(tl.uint64), seq_len.to(tl.uint64), feistel_half.to(tl.uint64),
            windows_per_chunk.to(tl.uint64), num_chunks.to(tl.uint64), chunk_tokens.to(tl.uint64),
            last_windows.to(tl.uint64), last_length.to(tl.uint64), steps_per_visit.to(tl.uint64),
            half_last.to(tl.uint64), half_chunks.to(tl.uint64), SAMPLING, CHUNKED)
    # start < num_tokens < 2**63, so the int64 with the same bits is the same number.
    start = start_u.to(tl.int64, bitcast=True)
    if WRITE_STARTS:
        tl.store(starts_ptr + row, start, mask=(col_block == 0) & mine)

    # Where the window lies in `tokens`: a stretch of the stream from token_offset on, or (CHUNKED) the
    # ring slot of the row's visit, holding the chunk that contains the window (gpuload/ring.py).
    if CHUNKED:
        src0 = ((visit_u % num_slots.to(tl.uint64)) * slot_tokens.to(tl.uint64)
                + start_u % chunk_tokens.to(tl.uint64)).to(tl.int64, bitcast=True)
    else:
        src0 = start - token_offset
    # One scalar residency test per row, folded into the column bound so the element masks stay
    # uniform across BLOCK; a window outside the resident span is never read and comes out as -1,
    # which no token can be, instead of an illegal address.
    # Rows of another mixture source get both bounds 0: nothing read, nothing written.
    resident = (src0 >= 0) & (src0 + seq_len + 1 <= num_resident)
    write_limit = tl.where(mine, seq_len, 0)
    read_limit = tl.where(resident, write_limit, 0)

    cols = col_block * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_row = cols < write_limit
    readable = cols < read_limit
    src = tokens_ptr + src0 + cols
    # x and y share T of their T+1 tokens: the second load hits the lines the first brought into L1,
    # so DRAM/L2 traffic is one read of the window; the bytes are dominated by the 16 B/token written.
    x_tok = tl.where(readable, tl.load(src, mask=readable, other=0).to(tl.int64), -1)
    y_tok = tl.where(readable, tl.load(src + 1, mask=readable, other=0).to(tl.int64), -1)

    out = row * seq_len + cols
    tl.store(x_ptr + out, x_tok.to(x_ptr.dtype.element_ty), mask=in_row)
    tl.store(y_ptr + out, y_tok, mask=in_row)

    # A captured loop's step counter (step_ptr[0]; step_ptr[1] counts this launch's programs): the last
    # program to count itself moves the step on. Every program read the step before its acq_rel atomic, so
    # all reads precede the write, and a replay of the launch gathers the next step: one launch per batch.
    if ADVANCE_STEP:
        # Every warp's read of the step before the one thread that counts the program (triton 3.6 puts no
        # barrier before a scalar atomic: without this, another warp's read could follow the release).
        tl.debug_barrier()
        done = tl.atomic_add(step_ptr + 1, 1)
        if done == tl.num_programs(0) - 1:
            tl.store(step_ptr + 1, 0)
            tl.store(step_ptr, step_u.to(tl.int64, bitcast=True) + 1)


def _block_size(batch: int, seq_len: int) -> int:
    block = next_power_of_2(max(1, batch * seq_len // _TARGET_PROGRAMS))
    block = min(block, _MAX_BLOCK, next_power_of_2(seq_len))
    return max(block, _MIN_BLOCK)


def gather_arguments(tokens, x, y, starts, step_tensor, mode_id, seed, step, row0, global_batch, num_tokens,
                     seq_len, token_offset, block, chunking=None, num_slots=1, slot_tokens=0, mixture=None,
                     aligned=None, advance=False) -> tuple[int, dict, dict]:
    """(grid, the kernel's arguments by name, launch options) on validated arguments: `tokens` unsigned 1-D,
    `seed`/`step` as int64 bits, `mixture` None or (rows of the whole batch, first slot of this source),
    `aligned` None or (usable document starts, pass table or None, its first pass, the position of the
    step's first row in it, K_E); `advance`: `step_tensor` is a step counter the launch moves on."""
    num_col_blocks = -(-seq_len // block)
    # align='bos' samples among the D usable document starts where the other rules sample windows.
    num_windows = windows_per_epoch(num_tokens, seq_len) if aligned is None else aligned[0].numel()
    batch = x.shape[0]
    if chunking is None:
        chunk_args = (0, 1, 1, 1, 1, 1, 1, 1)
        half = feistel_half_bits(num_windows)
    else:
        c = chunking
        chunk_args = (c.windows_per_chunk, c.num_chunks, c.chunk_tokens, c.last_windows,
                      c.chunk_length(c.num_chunks - 1), c.steps_per_visit, feistel_half_bits(c.last_windows),
                      feistel_half_bits(c.num_chunks - 1))
        # The whole-stream Feistel width is unused when chunked; within-chunk permutations of full chunks use it.
        half = feistel_half_bits(c.windows_per_chunk)
    doc_starts, table, pass0, pos0, num_visited = aligned if aligned is not None else (y, None, 0, 0, 0)
    names = ("windows_per_chunk", "num_chunks", "chunk_tokens", "last_windows", "last_length", "steps_per_visit",
             "half_last", "half_chunks")
    mix_rows, mix_first = mixture if mixture is not None else (0, 0)
    arguments = {
        "tokens_ptr": tokens, "x_ptr": x, "y_ptr": y, "starts_ptr": starts if starts is not None else y,
        "step_ptr": step_tensor if step_tensor is not None else y, "doc_starts_ptr": doc_starts,
        "table_ptr": table if table is not None else y, "seed": seed, "step": step, "row0": row0,
        "global_batch": global_batch, "num_tokens": num_tokens, "num_windows": num_windows, "seq_len": seq_len,
        "feistel_half": half, "token_offset": token_offset, "num_resident": tokens.numel(),
        "num_col_blocks": num_col_blocks, **dict(zip(names, chunk_args)), "num_slots": num_slots,
        "slot_tokens": slot_tokens, "mix_rows": mix_rows, "mix_first": mix_first,
        "table_len": table.shape[1] if table is not None else 0, "pass0": pass0, "pos0": pos0,
        "num_visited": num_visited,
        "SAMPLING": mode_id, "CHUNKED": chunking is not None, "MIXED": mixture is not None,
        "ALIGNED": aligned is not None, "STEP_FROM_PTR": step_tensor is not None,
        "ADVANCE_STEP": advance, "WRITE_STARTS": starts is not None,
        "BLOCK": block, "MIX_BLOCK": _MIX_BLOCK,
    }
    # 8 tokens per thread: x and y go out as 16 B vector stores when T % 16 == 0 (Triton specializes
    # seq_len on it); token loads stay scalar, since a window start has no known alignment, but each
    # warp instruction still covers one contiguous stretch.
    return batch * num_col_blocks, arguments, {"num_warps": max(1, min(8, block // 256))}


def gather_batch_forward(*launch):
    """Launch the kernel on validated arguments (those of `gather_arguments`)."""
    grid, arguments, options = gather_arguments(*launch)
    _gather_batch_kernel[(grid,)](**arguments, **options)
    return arguments["x_ptr"], arguments["y_ptr"]


def interpreter_active() -> bool:
    """True when this module's kernel was built by Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return is_interpreted(_gather_batch_kernel)


def _check_out(name, out, shape, dtype, device):
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        found = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"gather_batch_triton: {name} must be a {tuple(shape)} {dtype} tensor, found {found}")
    if out.device != device or not out.is_contiguous():
        raise ValueError(f"gather_batch_triton: {name} must be contiguous on {device}, found "
                         f"{'contiguous' if out.is_contiguous() else 'strided'} on {out.device}")
    return out


def _aligned_args(doc_starts, aligned_chunks, sampling, seed, step, step_tensor, chunking, slot_tokens, device):
    """gather_batch_forward's `aligned` for align='bos', after checking the arguments."""
    if sampling not in ALIGNED_MODES:
        raise ValueError(f"gather_batch_triton: align='bos' (doc_starts) works with sampling in {ALIGNED_MODES}, "
                         f"found {sampling!r}")
    if (not isinstance(doc_starts, torch.Tensor) or doc_starts.dim() != 1 or doc_starts.numel() == 0
            or doc_starts.dtype != torch.int64 or doc_starts.device != device or not doc_starts.is_contiguous()):
        found = (f"{tuple(doc_starts.shape)} {doc_starts.dtype} on {doc_starts.device}"
                 if isinstance(doc_starts, torch.Tensor) else type(doc_starts).__name__)
        raise ValueError(f"gather_batch_triton: doc_starts must be the usable document starts, a non-empty contiguous "
                         f"1-D int64 tensor on {device}, found {found}")
    if chunking is None:
        if aligned_chunks is not None:
            raise ValueError("gather_batch_triton: aligned_chunks is for a chunked ring; pass chunking= too")
        return doc_starts, None, 0, 0, 0
    if sampling == "sequential":
        raise ValueError("gather_batch_triton: sequential rows over a table of row starts need the whole stream in "
                         "the ring (no chunking)")
    if aligned_chunks is None or aligned_chunks.chunking != chunking or aligned_chunks.num_starts != doc_starts.numel():
        raise ValueError("gather_batch_triton: align='bos' on a chunked ring needs aligned_chunks=, the "
                         "documents.AlignedChunking of these doc_starts and this chunking")
    if slot_tokens < aligned_chunks.span_tokens:
        raise ValueError(f"gather_batch_triton: align='bos' on a chunked ring needs slots of at least "
                         f"{aligned_chunks.span_tokens} tokens (C + T), found slot_tokens={slot_tokens}")
    if step_tensor is not None:
        raise ValueError("gather_batch_triton: align='bos' on a chunked ring takes an int step: its pass table "
                         "is chosen on the host")
    pass0, pos0, table = aligned_chunks.step_table(seed, step, device)
    if device.type == "cuda":  # the cache frees it a pass later: not before this launch's stream is past it
        table.record_stream(torch.cuda.current_stream(device))
    return doc_starts, table, pass0, pos0, aligned_chunks.num_visited


def gather_batch_triton(tokens: torch.Tensor, sampling: str, seed: int, step, row0: int, batch: int,
                        global_batch: int, num_tokens: int, seq_len: int, out_x: torch.Tensor | None = None,
                        out_y: torch.Tensor | None = None, input_dtype: torch.dtype = torch.int64,
                        token_offset: int = 0, out_starts: torch.Tensor | None = None,
                        block_size: int | None = None, chunking: Chunking | None = None, num_slots: int = 1,
                        slot_tokens: int = 0, device: torch.device | None = None,
                        mixture: tuple[Sequence[int], int] | None = None,
                        doc_starts: torch.Tensor | None = None,
                        aligned_chunks: AlignedChunking | None = None,
                        step_counter: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows row0 .. row0+batch-1 of the global batch at `step`, in one launch: (x (B, T), y (B, T)).

    `tokens` holds stream positions [token_offset, token_offset + len(tokens)) of a stream of
    `num_tokens` tokens: 1-D contiguous uint16 or uint32 (int16 / int32 are taken as the same bits,
    i.e. as views of unsigned tokens). The caller guarantees every window is resident; a window that
    is not comes out as rows of -1. `seed` is taken modulo 2**64 (like csrc/sampling.h). `step` is an
    int inside the contract's domain (gpuload.sampling.check_domain) or an int64 tensor on the tokens'
    device that the kernel reads (one element). `step_counter`, instead, is a contiguous (2,) int64
    tensor [step, 0] that the kernel reads the step from and that the launch advances by one once every
    program has read it, so a captured CUDA graph gathers the next step at each replay (pass step=0 with
    it). `out_starts`, if given, is a (batch,) int64 tensor that receives the window starts.
    `block_size` overrides the column block.

    With `chunking` (gpuload.sampling.Chunking), the chunked rule, and `tokens` is a ring of `num_slots`
    slots of `slot_tokens` tokens: visit v's chunk j sits in slot v mod num_slots, stream position j*C
    at the slot's start (gpuload/ring.py keeps them there; `token_offset` must be 0).

    `doc_starts`, if given, selects align='bos' (gpuload/documents.py; random and shuffle): the sorted
    usable document starts, 1-D int64 on the batch's device (`documents.usable_document_starts`: the
    caller guarantees start + seq_len < num_tokens), read by the kernel; with `chunking`, `aligned_chunks`
    (the `documents.AlignedChunking` of those starts and that chunking) must come too, and its pass
    table is built on the host once per pass and copied to the device. `step` must then be an int.

    `device` is where the batch goes (default: the tokens' device). A CUDA device with `tokens` in
    pinned host memory is the zero-copy case: the kernel reads the host tokens through unified addressing.

    `mixture=(counts, k)` makes `tokens` source k of a mixture (gpuload/mixture.py): row0 .. row0+batch-1
    are then rows of the whole batch of sum(counts) rows, `global_batch` must be counts[k], and only the
    rows the step assigns to source k are written (with their index among source k's rows as the global
    row of the contract); the other rows of out_x / out_y are left as they are, for the other sources'
    launches to fill.
    """
    device, launch = _checked_launch(tokens, sampling, seed, step, row0, batch, global_batch, num_tokens, seq_len,
                                     out_x, out_y, input_dtype, token_offset, out_starts, block_size, chunking,
                                     num_slots, slot_tokens, device, mixture, doc_starts, aligned_chunks,
                                     step_counter)
    if device.type == "cuda":
        # Triton launches on the current device; make it the batch's one.
        with torch.cuda.device(device):
            return gather_batch_forward(*launch)
    return gather_batch_forward(*launch)


def _checked_launch(tokens, sampling, seed, step, row0, batch, global_batch, num_tokens, seq_len, out_x, out_y,
                    input_dtype, token_offset, out_starts, block_size, chunking, num_slots, slot_tokens, device,
                    mixture, doc_starts, aligned_chunks, step_counter=None):
    """gather_batch_triton's checks; (device, gather_arguments' positional arguments)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype not in _TOKEN_DTYPES:
        found = f"{tokens.dim()}-D {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"gather_batch_triton: tokens must be a 1-D uint16/uint32 tensor (or an int16/int32 view "
                         f"of one), found {found}")
    if tokens.stride(0) != 1:
        raise ValueError("gather_batch_triton: tokens must be contiguous (stride 1); pass tokens.contiguous()")
    device = tokens.device if device is None else resolve_device(device)
    if device != tokens.device and not (device.type == "cuda" and tokens.device.type == "cpu" and tokens.is_pinned()):
        raise ValueError(f"gather_batch_triton: tokens on {tokens.device} cannot be read by a kernel on {device}; "
                         f"pass tokens on {device}, or in pinned host memory (tensor.pin_memory()) for zero-copy")
    if device.type != "cuda" and not interpreter_active():
        raise RuntimeError(f"gather_batch_triton: tokens are on {device}, and Triton kernels run on a CUDA device; "
                           "to run on the CPU set TRITON_INTERPRET=1 before importing triton, or move the tokens "
                           "to a CUDA device")
    if sampling not in SAMPLING_IDS:
        raise ValueError(f"gather_batch_triton: unknown sampling {sampling!r}; expected one of {SAMPLING_MODES}")
    if input_dtype not in (torch.int64, torch.int32):
        raise ValueError(f"gather_batch_triton: input_dtype must be torch.int64 or torch.int32, found {input_dtype}")
    mix_args = None
    batch_rows = global_batch
    if mixture is not None:
        counts, source = mixture
        counts = list(counts)
        if not 0 <= source < len(counts) or any(c < 0 for c in counts) or counts[source] != global_batch:
            raise ValueError(f"gather_batch_triton: mixture=(counts, source) needs 0 <= source < len(counts) and "
                             f"global_batch == counts[source]; found counts={counts}, source={source}, "
                             f"global_batch={global_batch}")
        batch_rows = sum(counts)
        mix_args = (batch_rows, sum(counts[:source]))
    if seq_len < 1 or batch < 1 or row0 < 0 or batch_rows < row0 + batch:
        raise ValueError(f"gather_batch_triton: need seq_len >= 1, batch >= 1, 0 <= row0 and row0 + batch <= "
                         f"{'sum(counts)' if mixture is not None else 'global_batch'}; found seq_len={seq_len}, "
                         f"batch={batch}, row0={row0}, rows={batch_rows}")
    if not seq_len + 1 <= num_tokens < 1 << 63:
        raise ValueError(f"gather_batch_triton: num_tokens={num_tokens} must be in [seq_len + 1, 2**63) for "
                         f"seq_len={seq_len}: a window is seq_len + 1 tokens")
    if chunking is None and (token_offset < 0 or token_offset + tokens.numel() > num_tokens
                             or tokens.numel() < seq_len + 1):
        raise ValueError(f"gather_batch_triton: tokens ({tokens.numel()} at stream position {token_offset}) must "
                         f"hold at least one window of {seq_len + 1} tokens and lie inside the stream of "
                         f"{num_tokens} tokens")
    if chunking is not None:
        if (chunking.num_tokens, chunking.seq_len, chunking.global_batch) != (num_tokens, seq_len, global_batch):
            raise ValueError(f"gather_batch_triton: {chunking} was made for another stream or shape than "
                             f"num_tokens={num_tokens}, seq_len={seq_len}, global_batch={global_batch}")
        if token_offset != 0 or slot_tokens < chunking.max_chunk_tokens or tokens.numel() < num_slots * slot_tokens:
            raise ValueError(f"gather_batch_triton: a chunked ring needs token_offset=0 and {num_slots} slots of at "
                             f"least {chunking.max_chunk_tokens} tokens; found token_offset={token_offset}, "
                             f"slot_tokens={slot_tokens}, {tokens.numel()} tokens")
    if isinstance(step, torch.Tensor):
        if step.dtype != torch.int64 or step.numel() != 1 or step.device != device:
            raise ValueError(f"gather_batch_triton: a tensor step must be one int64 value on {device}, found "
                             f"{step.numel()} x {step.dtype} on {step.device}")
        step_tensor, step_bits = step, 0
    else:
        step = int(step)
        check_domain(step, batch_rows, num_tokens)
        step_tensor, step_bits = None, step
    if step_counter is not None:
        if (not isinstance(step_counter, torch.Tensor) or step_counter.dtype != torch.int64
                or step_counter.shape != (2,) or step_counter.device != device or not step_counter.is_contiguous()):
            raise ValueError(f"gather_batch_triton: step_counter must be a contiguous (2,) int64 tensor [step, 0] on "
                             f"{device}")
        if step_tensor is not None:
            raise ValueError("gather_batch_triton: pass step=0 with step_counter=: the kernel reads the step there")
        step_tensor = step_counter
    if block_size is None:
        block_size = _block_size(batch, seq_len)
    elif block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"gather_batch_triton: block_size must be a power of two, found {block_size}")

    x = _check_out("out_x", out_x, (batch, seq_len), input_dtype, device)
    y = _check_out("out_y", out_y, (batch, seq_len), torch.int64, device)
    starts = None if out_starts is None else _check_out("out_starts", out_starts, (batch,), torch.int64, device)
    aligned = None
    if doc_starts is not None or aligned_chunks is not None:
        aligned = _aligned_args(doc_starts, aligned_chunks, sampling, seed, step_bits, step_tensor, chunking,
                                slot_tokens, device)
    tokens = tokens.view(_TOKEN_DTYPES[tokens.dtype])
    return device, (tokens, x, y, starts, step_tensor, SAMPLING_IDS[sampling], to_signed(int(seed)), step_bits, row0,
                    global_batch, num_tokens, seq_len, token_offset, block_size, chunking, num_slots, slot_tokens,
                    mix_args, aligned, step_counter is not None)


class PreparedGather:
    """`gather_batch_triton` prepared once for a loader's steps: the same checks and arguments, and the
    compiled kernel (gpuload/kernels/launch.py). A step then sets the step, the outputs (unless they are
    fixed) and, for align='bos' on a chunked ring, the pass table, and launches: a few microseconds.

    Takes gather_batch_triton's arguments (out_x / out_y as the first step's outputs; `step` an int or the
    device step counter the kernel reads), except `block_size` and `out_starts`."""

    def __init__(self, tokens, sampling, seed, step, row0, batch, global_batch, num_tokens, seq_len, out_x, out_y,
                 input_dtype=torch.int64, chunking=None, num_slots=1, slot_tokens=0, device=None, mixture=None,
                 doc_starts=None, aligned_chunks=None, step_counter=None):
        device, launch = _checked_launch(tokens, sampling, seed, step, row0, batch, global_batch, num_tokens,
                                         seq_len, out_x, out_y, input_dtype, 0, None, None, chunking, num_slots,
                                         slot_tokens, device, mixture, doc_starts, aligned_chunks, step_counter)
        grid, arguments, options = gather_arguments(*launch)
        self.launch = PreparedLaunch(_gather_batch_kernel, grid, arguments, options, device)
        # Pointers this variant never reads point at the first step's y: keep it, so no address ever dangles.
        self._placeholder = arguments["y_ptr"]
        self.device, self.seed = device, seed
        self.table_chunks = aligned_chunks if chunking is not None and aligned_chunks is not None else None
        slot = self.launch.slot
        self._x, self._y, self._step, self._seed = slot("x_ptr"), slot("y_ptr"), slot("step"), slot("seed")
        self._table, self._pass0, self._pos0 = slot("table_ptr"), slot("pass0"), slot("pos0")
        self._table_in_use = None

    def set_seed(self, seed: int) -> None:
        self.seed = seed
        self.launch.values[self._seed] = to_signed(int(seed))

    def __call__(self, step: int, x: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None) -> None:
        """Gather `step` into x, y (default: the outputs it was prepared with or last given) on the current stream."""
        launch = self.launch
        if x is not None:
            launch.set_device_tensor(self._x, x)
            launch.set_device_tensor(self._y, y)
        launch.values[self._step] = step
        if self.table_chunks is not None:
            pass0, pos0, table = self.table_chunks.step_table(self.seed, step, self.device)
            if table is not self._table_in_use:  # a new pass: the cache frees it a pass later, after this stream
                if self.device.type == "cuda":
                    table.record_stream(torch.cuda.current_stream(self.device))
                self._table_in_use = table
                launch.set(self._table, table)
            launch.values[self._pass0] = pass0
            launch.values[self._pos0] = pos0
        launch()
