"""The orders of the loaders people reproduce: llm.c's DataLoader (sampling="llmc"), held to a Python port
of its dataloader_next_batch, and modded-nanogpt's BOS-aligned sequential rows (sampling="sequential",
align="bos"), held to a plain-Python walk of its rule."""

import bisect

import numpy as np
import pytest
import torch

from gpuload import GPULoader, native
from gpuload.kernels import triton_gather
from gpuload.shards import write_shard

# Triton through its CPU interpreter here (tests/conftest.py), compiled on a GPU.
BACKENDS = ["torch"] + (["native"] if native.available() else []) + \
    (["triton"] if triton_gather.interpreter_active() or torch.cuda.is_available() else [])
BOS = 0


class LlmcDataLoader:
    """llm.c's DataLoader without shuffle, ported from llmc/dataloader.h (karpathy/llm.c at 835bb2e): shards in
    order, each serving (ntok - 1) // (G*T) batches; rank r of a batch reads B*T + 1 tokens at idx*G*T + r*B*T."""

    def __init__(self, shards, B, T, process_rank, num_processes):
        self.shards, self.B, self.T = shards, B, T
        self.total_batch = num_processes * B * T
        self.local_offset = process_rank * B * T
        for tokens in shards:
            assert tokens.size >= self.total_batch + 1  # llm.c asserts it for every shard at init
        self.reset()

    def load_shard(self, index):
        self.tokens = self.shards[index]
        self.shard_num_samples = (self.tokens.size - 1) // self.total_batch

    def reset(self):
        self.current_shard_idx = 0
        self.current_sample_idx = 0
        self.load_shard(0)

    def advance(self):
        if self.current_shard_idx == len(self.shards) - 1:  # past the last shard: a new epoch
            self.reset()
            return
        self.current_shard_idx += 1
        self.current_sample_idx = 0
        self.load_shard(self.current_shard_idx)

    def load_batch(self):
        offset = self.current_sample_idx * self.total_batch + self.local_offset
        buffer = self.tokens[offset:offset + self.B * self.T + 1].astype(np.int64)
        self.inputs, self.targets = buffer[:-1].reshape(self.B, self.T), buffer[1:].reshape(self.B, self.T)

    def next_batch(self):
        if self.current_sample_idx >= self.shard_num_samples:  # the next batch would go past the shard's end
            self.advance()
        self.load_batch()
        self.current_sample_idx += 1
        return self.inputs, self.targets


def llmc_shards(tmp_path, sizes, seed=0):
    rng = np.random.default_rng(seed)
    arrays, paths = [], []
    for i, n in enumerate(sizes):
        arrays.append(rng.integers(0, 50257, n, dtype=np.int64).astype(np.uint16))
        paths.append(str(tmp_path / f"fineweb_train_{i:06d}.bin"))
        write_shard(paths[-1], arrays[-1])
    return paths, arrays


def make(paths, backend, **kw):
    kw.setdefault("rank", 0)
    kw.setdefault("world_size", 1)
    on_gpu = backend == "triton" and not triton_gather.interpreter_active()
    return GPULoader(paths, device="cuda" if on_gpu else "cpu", backend=backend, **kw)


def host(batch):
    return [t.cpu() for t in batch]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,world", [(2, 16, 1), (3, 8, 2), (1, 5, 3)])
def test_llmc_order_equals_llmc_dataloader(tmp_path, backend, B, T, world):
    """Across shards and epochs, single process and multi-rank: batch for batch, llm.c's."""
    paths, arrays = llmc_shards(tmp_path, [1000, 333, 700, 129])
    G = B * world
    epoch = sum((a.size - 1) // (G * T) for a in arrays)
    steps = 2 * epoch + 3 if backend != "triton" else min(2 * epoch + 3, 40)
    for rank in range(world):
        peer = LlmcDataLoader(arrays, B, T, rank, world)
        ld = make(paths, backend, batch_size=B, seq_len=T, sampling="llmc", rank=rank, world_size=world)
        for step in range(steps):
            want_x, want_y = peer.next_batch()
            x, y = host(next(ld))
            assert np.array_equal(x.numpy(), want_x) and np.array_equal(y.numpy(), want_y), (rank, step)


def test_llmc_order_differs_from_sequential_after_the_first_shard(tmp_path):
    """Why the mode exists: gpuload's sequential rule reads across shard ends, llm.c's does not."""
    paths, arrays = llmc_shards(tmp_path, [1000, 1000])
    peer = LlmcDataLoader(arrays, 4, 16, 0, 1)
    seq = make(paths, "torch", batch_size=4, seq_len=16, sampling="sequential")
    same = [np.array_equal(next(seq)[0].numpy(), peer.next_batch()[0]) for _ in range(20)]
    assert same[:15] == [True] * 15 and not all(same[15:])  # shard 0 serves (1000 - 1) // 64 = 15 steps


def test_llmc_resume_elastic_and_one_pass(tmp_path):
    paths, arrays = llmc_shards(tmp_path, [1000, 333, 700])
    ref = make(paths, "torch", batch_size=4, seq_len=8, sampling="llmc", world_size=1)
    want = [next(ref) for _ in range(60)]
    ld = make(paths, "torch", batch_size=4, seq_len=8, sampling="llmc")
    for _ in range(17):
        next(ld)
    state = ld.state_dict()
    for ranks in (1, 2, 4):  # the same global batch of 4 rows split over 1, 2 and 4 ranks
        parts = [make(paths, "torch", batch_size=4 // ranks, seq_len=8, sampling="llmc", rank=r, world_size=ranks)
                 for r in range(ranks)]
        for part in parts:
            part.load_state_dict(state)
        for step in range(17, 60):
            x = torch.cat([next(part)[0] for part in parts])
            assert torch.equal(x, want[step][0]), (ranks, step)
    one = make(paths, "torch", batch_size=4, seq_len=8, sampling="llmc", loop=False)
    epoch = sum((a.size - 1) // 32 for a in arrays)
    assert len(one) == epoch == len(list(one))


def test_llmc_refusals(tmp_path, make_shards):
    paths, _ = llmc_shards(tmp_path, [1000, 40])
    with pytest.raises(ValueError, match=r"fineweb_train_000001.bin: holds 40 tokens; llm.c's order needs every shard"):
        make(paths, "torch", batch_size=4, seq_len=16, sampling="llmc")
    paths, _ = llmc_shards(tmp_path, [5000, 5000])
    with pytest.raises(ValueError, match="needs the whole stream in the ring.*backend='native'"):
        make(paths, "torch", batch_size=2, seq_len=16, sampling="llmc", ring_tokens=8192)
    if native.available():  # the native backend reads the maps: no ring to hold
        next(make(paths, "native", batch_size=2, seq_len=16, sampling="llmc", ring_tokens=8192))
    with pytest.raises(ValueError, match="sampling='llmc' reads llm.c's fixed windows"):
        make(paths, "torch", batch_size=2, seq_len=16, sampling="llmc", align="bos", bos_token=BOS)
    with pytest.raises(ValueError, match="reads one dataset"):
        make({"a": paths[:1], "b": paths[1:]}, "torch", batch_size=2, seq_len=16, sampling="llmc",
             weights={"a": 1, "b": 1})


# --- modded-nanogpt: sequential rows that start at documents.

def document_stream(tmp_path, n, seed=0, mean_doc=40):
    tmp_path.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 1000, n).astype(np.uint16)
    tokens[rng.random(n) < 1 / mean_doc] = BOS
    tokens[0] = BOS
    paths = []
    for i, (a, b) in enumerate([(0, n // 3), (n // 3, n)]):
        paths.append(str(tmp_path / f"train_{i}.bin"))
        write_shard(paths[-1], tokens[a:b])
    return paths, tokens


def aligned_rows_oracle(tokens, T):
    """Row 0 at the first usable BOS; each next row at the first usable BOS at or after the previous start + T."""
    usable = [int(p) for p in np.flatnonzero(tokens == BOS) if p + T + 1 <= tokens.size]
    rows = [usable[0]]
    while True:
        i = bisect.bisect_left(usable, rows[-1] + T)
        if i == len(usable):
            return rows
        rows.append(usable[i])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [8, 33])
def test_sequential_aligned_rows_follow_the_rule(tmp_path, backend, T):
    paths, tokens = document_stream(tmp_path, 6000)
    rows = aligned_rows_oracle(tokens, T)
    B = 3
    ld = make(paths, backend, batch_size=B, seq_len=T, sampling="sequential", align="bos", bos_token=BOS)
    steps = 2 * len(rows) // B + 2 if backend != "triton" else 12  # past an epoch's end: rows start over
    for step in range(steps):
        x, y = host(next(ld))
        for b in range(B):
            o = rows[(step * B + b) % len(rows)]
            assert x[b, 0] == BOS and np.array_equal(x[b].numpy(), tokens[o:o + T]), (step, b)
            assert np.array_equal(y[b].numpy(), tokens[o + 1:o + T + 1])
    assert all(b - a >= T for a, b in zip(rows, rows[1:]))  # rows never overlap


def test_sequential_aligned_resume_elastic_and_one_pass(tmp_path):
    paths, tokens = document_stream(tmp_path, 6000)
    kw = dict(seq_len=16, sampling="sequential", align="bos", bos_token=BOS)
    ref = make(paths, "torch", batch_size=4, **kw)
    want = [next(ref)[0] for _ in range(40)]
    state = {**ref.state_dict(), "step": 11}
    parts = [make(paths, "torch", batch_size=2, rank=r, world_size=2, **kw) for r in range(2)]
    for part in parts:
        part.load_state_dict(state)
    for step in range(11, 40):
        assert torch.equal(torch.cat([next(part)[0] for part in parts]), want[step])
    one = make(paths, "torch", batch_size=4, loop=False, **kw)
    assert len(one) == len(aligned_rows_oracle(tokens, 16)) // 4 == len(list(one))
    paths, _ = document_stream(tmp_path / "long", 30000)
    with pytest.raises(ValueError, match="needs the whole stream in the ring"):
        make(paths, "torch", batch_size=2, ring_tokens=8192, **kw)
