"""Window gather: T+1 tokens per row from the token stream into x (B, T) and y (B, T).

`gather_reference` is the plain-torch reference every other gather (native C++, Triton) is held
to with `torch.equal`. It handles windows that cross shard boundaries, however small the shards.
"""

from __future__ import annotations

from typing import Sequence

import torch

# Read unsigned tokens through their signed views: CUDA's indexing kernels do not cover torch.uint16/uint32.
_SIGNED = {torch.uint16: (torch.int16, 0xFFFF), torch.uint32: (torch.int32, 0xFFFFFFFF)}


def _read(shard: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    if shard.dtype in _SIGNED:
        signed, mask = _SIGNED[shard.dtype]
        return shard.view(signed)[positions].to(torch.int64) & mask
    return shard[positions].to(torch.int64)


def gather_reference(shards: Sequence[torch.Tensor], shard_starts: torch.Tensor, starts: torch.Tensor,
                     seq_len: int, input_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """x[b] = stream[o : o+T], y[b] = stream[o+1 : o+T+1] for o = starts[b].

    `shards` are 1-D token tensors (uint16/uint32) whose concatenation is the stream, and
    `shard_starts[i]` is the stream position of shard i's first token (int64, len(shards) + 1 values,
    the last one the stream length).
    """
    positions = starts.to(torch.int64)[:, None] + torch.arange(seq_len + 1, device=starts.device)
    if len(shards) == 1:
        tokens = _read(shards[0], positions)
    else:
        shard_of = torch.searchsorted(shard_starts, positions, right=True) - 1
        tokens = torch.empty_like(positions)
        for s in torch.unique(shard_of).tolist():
            inside = shard_of == s
            tokens[inside] = _read(shards[s], positions[inside] - shard_starts[s])
    return tokens[:, :-1].to(input_dtype).contiguous(), tokens[:, 1:].contiguous()


def packed_gather_reference(tokens: torch.Tensor, positions: torch.Tensor, bos_token: int,
                            input_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows (pack='bestfit'): row b's T+1 tokens are tokens[positions[b]], with `bos_token` where a
    position is -1 (a BOS the stream does not hold there). `tokens` is the whole stream (1-D uint16/uint32);
    returns (x, y) as gather_reference does, on the tokens' device."""
    positions = positions.to(device=tokens.device, dtype=torch.int64)
    values = torch.where(positions < 0, bos_token, _read(tokens, positions.clamp(min=0)))
    return values[:, :-1].to(input_dtype).contiguous(), values[:, 1:].contiguous()
