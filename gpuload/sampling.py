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

Chunked rule, for a ring smaller than the stream (`Chunking`): the stream is cut into K chunks of
Wc windows (C = Wc*T tokens, plus the next token; the last chunk holds the rest of the stream), and
the ring holds a few chunks at a time. A *visit* v is one stay of a chunk in the ring; a row reads
from the chunk of its visit only, so what is resident at a step is a function of the step alone.
    chunk order: order(e, pos) = K-1 if pos == K-1 else perm(seed ^ SALT_CHUNKS, e)(pos) over K-1
    sequential: o as above (identical to the whole-stream rule);  v = (w // M)*K + (w mod M) // Wc
    shuffle:    e = w // M, i = w mod M, pos = i // Wc, v = e*K + pos, j = order(e, pos),
                o = (j*Wc + perm(seed, v)(i - pos*Wc) over the Wc (last: M-(K-1)*Wc) windows of j) * T
    random:     v = step // max(1, Wc // G), j = order(v // K, v mod K),
                o = j*C + (h >> 1) mod (len_j - T)     uniform over the starts inside chunk j
With K = 1 each rule reduces to the whole-stream one; the loader uses the chunked rule only when the
ring is smaller than the stream (gpuload/ring.py).

llm.c's order (the loader's sampling="llmc", `llmc_row_starts`): shard by shard, shard k of n_k tokens
serving S_k = (n_k - 1) // (G*T) steps, then the next shard, then shard 0 again; step i of shard k reads
rows o = first_k + (i*G + g)*T. So each shard's last (n_k - 1) mod (G*T) tokens are dropped and no window
crosses two shards, as llm.c's DataLoader (llmc/dataloader.h, no shuffle) and its train_gpt2.py read.
The loader holds the epoch's row starts (8 bytes per T tokens) and row w = step*G + g reads S[w mod R],
the sequential rule over a table (gpuload/documents.py's aligned sequential rows use the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

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
SALT_CHUNKS = 0xA4093822299F31D0
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


@dataclass(frozen=True)
class Chunking:
    """The stream cut into chunks of `windows_per_chunk` windows, for a ring smaller than the stream."""

    num_tokens: int
    seq_len: int
    global_batch: int
    windows_per_chunk: int

    def __post_init__(self):
        if self.windows_per_chunk < self.global_batch:
            raise ValueError(f"a chunk must hold at least one global batch of windows: windows_per_chunk="
                             f"{self.windows_per_chunk} < global_batch={self.global_batch}")
        if self.num_chunks < 2:
            raise ValueError(f"windows_per_chunk={self.windows_per_chunk} covers the whole stream "
                             f"({self.num_windows} windows); use the whole-stream rule (chunking=None)")

    @cached_property  # read per step by the ring (step_visits): computed once
    def num_windows(self) -> int:
        return windows_per_epoch(self.num_tokens, self.seq_len)

    @property
    def chunk_tokens(self) -> int:
        """C: the stride between chunk starts in the stream."""
        return self.windows_per_chunk * self.seq_len

    @cached_property  # read per step by the ring (step_visits): computed once
    def num_chunks(self) -> int:
        return -(-self.num_windows // self.windows_per_chunk)

    @property
    def last_windows(self) -> int:
        return self.num_windows - (self.num_chunks - 1) * self.windows_per_chunk

    @cached_property  # read per step by the ring (step_visits): computed once
    def steps_per_visit(self) -> int:
        """random: steps that sample from one chunk before the next one (about one pass over its tokens)."""
        return max(1, self.windows_per_chunk // self.global_batch)

    @property
    def max_chunk_tokens(self) -> int:
        """Tokens a ring slot must hold: C + 1, or the last chunk, which also takes the stream's tail (< C + T)."""
        return max(self.chunk_tokens + 1, self.chunk_length(self.num_chunks - 1))

    def chunk_length(self, chunk: int) -> int:
        """Tokens of chunk `chunk` in the ring: its windows plus the next token (the last: up to the end)."""
        if chunk < self.num_chunks - 1:
            return self.chunk_tokens + 1
        return self.num_tokens - chunk * self.chunk_tokens

    def visit_chunk(self, sampling: str, seed: int, visit: int) -> int:
        """The chunk that visit `visit` brings into the ring."""
        epoch, pos = divmod(visit, self.num_chunks)
        if sampling == "sequential":
            return pos
        return int(chunk_order(seed, torch.tensor([epoch]), torch.tensor([pos]), self.num_chunks))

    def step_visits(self, sampling: str, step: int) -> tuple[int, int]:
        """First and last visit that the global rows of `step` read from."""
        if sampling == "random":
            visit = step // self.steps_per_visit
            return visit, visit
        first = step * self.global_batch
        return self._visit(first), self._visit(first + self.global_batch - 1)

    def _visit(self, w: int) -> int:
        epoch, index = divmod(w, self.num_windows)
        return epoch * self.num_chunks + index // self.windows_per_chunk


def chunk_order(seed: int, epoch: torch.Tensor, pos: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """order(e, pos): the chunk at position `pos` of pass `epoch`; the short last chunk stays last."""
    inner = feistel_permute(pos.clamp(max=num_chunks - 2), epoch, seed ^ SALT_CHUNKS, num_chunks - 1)
    return torch.where(pos == num_chunks - 1, num_chunks - 1, inner)


def _chunked_starts(sampling: str, seed: int, step: int, rows: torch.Tensor, c: Chunking) -> tuple[torch.Tensor, torch.Tensor]:
    T, K, Wc, M = c.seq_len, c.num_chunks, c.windows_per_chunk, c.num_windows
    if sampling == "random":
        visit = torch.full_like(rows, step // c.steps_per_visit)
        chunk = chunk_order(seed, visit // K, visit % K, K)
        valid_starts = torch.where(chunk == K - 1, c.chunk_length(K - 1) - T, c.chunk_tokens + 1 - T)
        base = mix64_int(mix64_int(seed ^ SALT_RANDOM) + step)
        h = mix64(rows + to_signed(base))
        return chunk * c.chunk_tokens + _lsr(h, 1) % valid_starts, visit
    w = rows + step * c.global_batch
    epoch, index = w // M, w % M
    pos = index // Wc
    visit = epoch * K + pos
    if sampling == "sequential":
        return index * T, visit
    within = index - pos * Wc
    chunk = chunk_order(seed, epoch, pos, K)
    # Rows of the short last chunk permute its fewer windows; compute both and pick per row.
    full = feistel_permute(within, visit, seed, Wc)
    last = feistel_permute(within.clamp(max=c.last_windows - 1), visit, seed, c.last_windows)
    return (chunk * Wc + torch.where(chunk == K - 1, last, full)) * T, visit


def llmc_row_starts(shard_tokens, seq_len: int, global_batch: int, names=None) -> torch.Tensor:
    """The row starts of one epoch of llm.c's order (module docstring) over shards of `shard_tokens` tokens.

    Raises ValueError naming the first shard (`names[k]`, else its index) smaller than one global batch plus a
    token, which llm.c refuses too (its DataLoader asserts ntok >= G*T + 1 for every shard)."""
    per_step = global_batch * seq_len
    pieces, first = [], 0
    for k, count in enumerate(shard_tokens):
        steps = (count - 1) // per_step
        if steps == 0:
            raise ValueError(f"{names[k] if names is not None else f'shard {k}'}: holds {count} tokens; llm.c's order "
                             f"needs every shard to hold one global batch and a token, G*T + 1 = {per_step + 1}. "
                             f"Lower batch_size * seq_len * world_size, or merge the shard into another")
        pieces.append(first + torch.arange(steps * global_batch, dtype=torch.int64) * seq_len)
        first += count
    return torch.cat(pieces)


def window_starts(sampling: str, seed: int, step: int, rows: torch.Tensor, global_batch: int,
                  num_tokens: int, seq_len: int, chunking: Optional[Chunking] = None) -> torch.Tensor:
    """Start token `o` of the window for each global row in `rows` at `step` (int64, same device).

    With `chunking`, the chunked rule for a ring smaller than the stream (see the module docstring).
    """
    return window_starts_and_visits(sampling, seed, step, rows, global_batch, num_tokens, seq_len, chunking)[0]


def window_starts_and_visits(sampling: str, seed: int, step: int, rows: torch.Tensor, global_batch: int,
                             num_tokens: int, seq_len: int,
                             chunking: Optional[Chunking] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(window starts, ring visit of each row); visits are None for the whole-stream rule."""
    check_domain(step, global_batch, num_tokens)
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {SAMPLING_MODES}")
    rows = rows.to(torch.int64)
    if chunking is not None:
        if (chunking.num_tokens, chunking.seq_len, chunking.global_batch) != (num_tokens, seq_len, global_batch):
            raise ValueError(f"{chunking} was made for another stream or shape than N={num_tokens}, "
                             f"T={seq_len}, G={global_batch}")
        return _chunked_starts(sampling, seed, step, rows, chunking)
    if sampling == "random":
        return random_starts(seed, step, rows, num_tokens, seq_len), None
    num_windows = windows_per_epoch(num_tokens, seq_len)
    w = rows + step * global_batch
    if sampling == "sequential":
        return (w % num_windows) * seq_len, None
    return feistel_permute(w % num_windows, w // num_windows, seed, num_windows) * seq_len, None
