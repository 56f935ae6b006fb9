"""Triton gather of packed rows (pack="bestfit"): one launch builds a rank's (B, T) batch from the rows'
stream positions, which the best-fit planner computes on the host (gpuload/packing.py, csrc/packing.cpp).

Each program owns one row's column block of the T+1 row tokens: it loads their positions, reads the tokens
there (a position of -1 is a BOS the stream does not hold there: a cropped tail put back), and writes
token k to x[k] (k < T) and y[k-1] (k >= 1). The reference is
`gpuload.kernels.gather.packed_gather_reference`, held to it with `torch.equal` in tests/test_packing.py.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from gpuload.kernels.launch import next_power_of_2


@triton.jit
def _packed_gather_kernel(tokens_ptr, positions_ptr, x_ptr, y_ptr, seq_len, bos, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inside = cols < seq_len + 1
    positions = tl.load(positions_ptr + row * (seq_len + 1) + cols, mask=inside, other=0)
    stream = positions >= 0
    tokens = tl.load(tokens_ptr + tl.where(stream, positions, 0), mask=inside & stream, other=0).to(tl.int64)
    values = tl.where(stream, tokens, bos)
    tl.store(x_ptr + row * seq_len + cols, values.to(x_ptr.dtype.element_ty), mask=inside & (cols < seq_len))
    tl.store(y_ptr + row * seq_len + cols - 1, values, mask=inside & (cols >= 1))


def gather_packed_triton(tokens: torch.Tensor, positions: torch.Tensor, bos_token: int, out_x: torch.Tensor,
                         out_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows into out_x (B, T; int64 or int32) and out_y (B, T; int64) from the stream positions
    `positions` (B, T+1 int64, -1: `bos_token`) into the whole-stream `tokens` (1-D), all on the launch's
    device, except `tokens` in pinned host memory for a zero-copy ring on CUDA."""
    batch, row_tokens = positions.shape
    seq_len = row_tokens - 1
    device = out_x.device
    for name, tensor, dtypes in (("positions", positions, (torch.int64,)), ("out_x", out_x, (torch.int64, torch.int32)),
                                 ("out_y", out_y, (torch.int64,))):
        if tensor.device != device or tensor.dtype not in dtypes or not tensor.is_contiguous():
            raise ValueError(f"gather_packed_triton: {name} must be a contiguous {' or '.join(map(str, dtypes))} "
                             f"tensor on {device}, found {tensor.dtype} on {tensor.device}")
    # A zero-copy ring: host memory registered with CUDA (gpuload.cuda.PinnedHost), which the kernel reads.
    zero_copy = device.type == "cuda" and tokens.device.type == "cpu"
    if tokens.device != device and not zero_copy:
        raise ValueError(f"gather_packed_triton: tokens must be on {device} (or in registered host memory for a "
                         f"zero-copy ring), found {tokens.device}")
    if tokens.dim() != 1 or tuple(out_x.shape) != (batch, seq_len) or tuple(out_y.shape) != (batch, seq_len):
        raise ValueError(f"gather_packed_triton: need 1-D tokens and (B, T) = ({batch}, {seq_len}) outputs, found "
                         f"tokens {tuple(tokens.shape)}, x {tuple(out_x.shape)}, y {tuple(out_y.shape)}")
    block = min(1024, next_power_of_2(row_tokens))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _packed_gather_kernel[(batch, triton.cdiv(row_tokens, block))](tokens, positions, out_x, out_y, seq_len,
                                                                       bos_token, BLOCK=block)
    return out_x, out_y
