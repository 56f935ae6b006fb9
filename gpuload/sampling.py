"""Window starts as pure functions of (seed, step, global row): the batch contract in code.

Every backend (torch, native C++, Triton) reproduces these functions bit for bit, so the arithmetic
is 64-bit integers only: no floating point, no host RNG. Tensors are int64 and hold unsigned 64-bit
values in two's complement (multiplication wraps modulo 2**64); right shifts are made logical with a
mask because torch's `>>` on int64 is arithmetic.

Definitions (all arithmetic modulo 2**64, `>>` logical):
    mix64(x)          SplitMix64's finalizer, a bijection of 64-bit words.
    random:     h  = mix64(mix64(mix64(seed ^ SALT_RANDOM) + step) + g)
                o  = (h >> 1) mod (N - T)                  uniform over [0, N-T-1]
    sequential: w  = step*G + g,  M = (N-1) // T,  o = (w mod M) * T
    shuffle:    w, M as above,  e = w // M,  o = perm(seed, e)(w mod M) * T
                perm: a 6-round Feistel network on 2*h bits (the smallest even width covering M),
                cycle-walked into [0, M); round key r = mix64(mix64(seed ^ SALT_SHUFFLE) + e*ROUNDS + r),
                round function F(R) = mix64(R ^ key) & (2**h - 1).

Domain: N <= 2**62 tokens and (step + 1) * G <= 2**63, so every value above fits a signed int64 and
the three implementations agree bit for bit (`check_domain` enforces it).
"""

from __future__ import annotations

import torch

SAMPLING_MODES = ("random", "shuffle", "sequential")
SAMPLING_IDS = {"random": 0, "shuffle": 1, "sequential": 2}  # csrc/sampling.h's enum Sampling, the Triton kernel
MAX_TOKENS = 1 << 62

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX_C1 = 0xBF58476D1CE4E5B9
MIX_C2 = 0x94D049BB133111EB
SALT_RANDOM = 0x243F6A8885A308D3  # digits of pi: arbitrary, fixed forever (they define the batches)
SALT_SHUFFLE = 0x13198A2E03707344
FEISTEL_ROUNDS = 6


def to_signed(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned `value`."""
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def mix64_int(x: int) -> int:
    """SplitMix64 finalizer on a Python int (unsigned 64-bit result)."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * MIX_C1) & MASK64
    x = ((x ^ (x >> 27)) * MIX_C2) & MASK64
    return x ^ (x >> 31)


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finalizer on an int64 tensor (same bits as `mix64_int`)."""
    x = (x ^ _lsr(x, 30)) * to_signed(MIX_C1)
    x = (x ^ _lsr(x, 27)) * to_signed(MIX_C2)
    return x ^ _lsr(x, 31)


def windows_per_epoch(num_tokens: int, seq_len: int) -> int:
    """Non-overlapping windows of T+1 tokens (sharing one token with the next) in a stream of N tokens."""
    return (num_tokens - 1) // seq_len


def feistel_half_bits(num_windows: int) -> int:
    """Half the width of the Feistel domain: the smallest h with 4**h >= num_windows (at least 1)."""
    return max(1, ((num_windows - 1).bit_length() + 1) // 2)


def check_domain(step: int, global_batch: int, num_tokens: int) -> None:
    """Raise ValueError outside the domain where the implementations are defined to agree."""
    if num_tokens > MAX_TOKENS:
        raise ValueError(f"streams of more than 2**62 tokens are not supported (got {num_tokens})")
    if step < 0 or (step + 1) * global_batch > 1 << 63:
        raise ValueError(f"step must be in [0, 2**63 / global_batch - 1] (got step={step}, global_batch={global_batch})")


def random_starts(seed: int, step: int, rows: torch.Tensor, num_tokens: int, seq_len: int) -> torch.Tensor:
    """nanoGPT-style starts, uniform over [0, N-T-1], for global rows `rows` of step `step`."""
    base = mix64_int(mix64_int(seed ^ SALT_RANDOM) + step)
    h = mix64(rows.to(torch.int64) + to_signed(base))
    return _lsr(h, 1) % (num_tokens - seq_len)


def feistel_permute(index: torch.Tensor, epoch: torch.Tensor, seed: int, num_windows: int) -> torch.Tensor:
    """perm(seed, epoch)(index): a bijection of [0, num_windows) per (seed, epoch), never stored."""
    half = feistel_half_bits(num_windows)
    mask = (1 << half) - 1
    seed_key = mix64_int(seed ^ SALT_SHUFFLE)
    keys = [mix64(epoch * FEISTEL_ROUNDS + to_signed(seed_key + r)) for r in range(FEISTEL_ROUNDS)]

    def encrypt(x: torch.Tensor) -> torch.Tensor:
        left, right = x >> half, x & mask
        for key in keys:
            left, right = right, left ^ (mix64(right ^ key) & mask)
        return (left << half) | right

    # Cycle walking: re-encrypt values that land outside [0, M); the domain is < 4M, so few rounds.
    x = encrypt(index)
    outside = x >= num_windows
    while bool(outside.any()):
        x = torch.where(outside, encrypt(x), x)
        outside = x >= num_windows
    return x


def window_starts(sampling: str, seed: int, step: int, rows: torch.Tensor, global_batch: int,
                  num_tokens: int, seq_len: int) -> torch.Tensor:
    """Start token `o` of the window for each global row in `rows` at `step` (int64, same device)."""
    check_domain(step, global_batch, num_tokens)
    rows = rows.to(torch.int64)
    if sampling == "random":
        return random_starts(seed, step, rows, num_tokens, seq_len)
    num_windows = windows_per_epoch(num_tokens, seq_len)
    w = rows + step * global_batch
    if sampling == "sequential":
        return (w % num_windows) * seq_len
    if sampling == "shuffle":
        return feistel_permute(w % num_windows, w // num_windows, seed, num_windows) * seq_len
    raise ValueError(f"unknown sampling {sampling!r}; expected one of {SAMPLING_MODES}")
