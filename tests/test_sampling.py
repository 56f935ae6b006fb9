"""The batch contract's arithmetic: torch tensors vs a scalar Python oracle vs the native port."""

import random
import zlib

import numpy as np
import pytest
import torch

from gpuload import native
from gpuload.sampling import (Chunking, FEISTEL_ROUNDS, GOLDEN, MASK64, SALT_RANDOM, SALT_SHUFFLE, SAMPLING_IDS,
                              feistel_half_bits, feistel_permute, mix64, mix64_int, random_starts, to_signed,
                              window_starts, windows_per_epoch)


# --- a scalar oracle written from the definitions in sampling.py's docstring ------------------

def oracle_feistel(index, epoch, seed, m):
    half = feistel_half_bits(m)
    mask = (1 << half) - 1
    keys = [mix64_int(mix64_int(seed ^ SALT_SHUFFLE) + epoch * FEISTEL_ROUNDS + r) for r in range(FEISTEL_ROUNDS)]
    x = index
    while True:
        left, right = x >> half, x & mask
        for key in keys:
            left, right = right, left ^ (mix64_int(right ^ key) & mask)
        x = (left << half) | right
        if x < m:
            return x


def oracle_start(mode, seed, step, g, G, N, T):
    if mode == "random":
        h = mix64_int(mix64_int(mix64_int(seed ^ SALT_RANDOM) + step) + g)
        return (h >> 1) % (N - T)
    m = (N - 1) // T
    w = step * G + g
    if mode == "sequential":
        return (w % m) * T
    return oracle_feistel(w % m, w // m, seed & MASK64, m) * T


def test_mix64_matches_splitmix64_reference_outputs():
    # SplitMix64 seeded with 0 outputs mix64(k * GOLDEN) for k = 1, 2, 3 (Vigna's reference code).
    outputs = [mix64_int(k * GOLDEN) for k in (1, 2, 3)]
    assert outputs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_mix64_tensor_equals_python_ints():
    rng = random.Random(0)
    values = [0, 1, MASK64, 1 << 63, (1 << 63) - 1] + [rng.getrandbits(64) for _ in range(2000)]
    got = mix64(torch.tensor([to_signed(v) for v in values], dtype=torch.int64))
    assert got.tolist() == [to_signed(mix64_int(v)) for v in values]


@pytest.mark.parametrize("mode", ["random", "shuffle", "sequential"])
@pytest.mark.parametrize("N,T", [(2, 1), (1000, 7), (10_000, 64), (10**10, 1024), (3 * 2**31 + 5, 1)])
def test_window_starts_equal_oracle(mode, N, T):
    rng = random.Random(zlib.crc32(f"{mode} {N} {T}".encode()))  # hash() of str changes per process
    for _ in range(4):
        seed = rng.choice([0, 1, 1234, 2**63 + 17, -5])
        step = rng.choice([0, 1, 7, 10**6, 2**40])
        G = rng.choice([1, 8, 96])
        rows = torch.arange(G)
        got = window_starts(mode, seed, step, rows, G, N, T).tolist()
        assert got == [oracle_start(mode, seed, step, g, G, N, T) for g in range(G)]


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 16, 17, 97, 256, 1000, 4097])
def test_shuffle_is_a_permutation_per_epoch(m):
    index = torch.arange(m)
    perms = [feistel_permute(index, torch.full_like(index, e), 42, m) for e in range(3)]
    for perm in perms:
        assert sorted(perm.tolist()) == list(range(m))
    if m >= 16:
        assert not torch.equal(perms[0], perms[1])
        assert not torch.equal(perms[0], feistel_permute(index, torch.zeros_like(index), 43, m))


def test_shuffle_visits_every_window_once_per_epoch_across_steps():
    N, T, G = 1 + 50 * 8, 8, 7  # M = 50 windows, G does not divide M: epochs straddle batches
    m = windows_per_epoch(N, T)
    starts = torch.cat([window_starts("shuffle", 9, s, torch.arange(G), G, N, T) for s in range(3 * m // G + 1)])
    epochs = [starts[e * m:(e + 1) * m] for e in range(3)]
    for epoch in epochs:
        assert sorted((epoch // T).tolist()) == list(range(m))
    assert not torch.equal(epochs[0], epochs[1])


def test_shuffle_scales_to_huge_corpora():
    N, T = 10**10, 1  # 10^10 windows: nothing may be stored per window
    rows = torch.arange(4096)
    starts = window_starts("shuffle", 3, 10**5, rows, 4096, N, T)
    assert starts.unique().numel() == 4096 and int(starts.min()) >= 0 and int(starts.max()) < N - 1


def test_random_starts_uniform_over_whole_range():
    N, T = 1000, 10  # starts in [0, 989]: 990 values
    starts = torch.cat([random_starts(5, s, torch.arange(1000), N, T) for s in range(100)])
    counts = torch.bincount(starts, minlength=N - T)
    assert counts.numel() == N - T  # nothing beyond N-T-1
    assert int(counts.min()) > 0  # both ends and everything between are reachable
    expected = starts.numel() / (N - T)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < (N - T) * 1.25  # chi-square with 989 dof: mean 989, sd ~44


def test_random_starts_differ_by_seed_step_row():
    a = random_starts(0, 0, torch.arange(64), 10**9, 1024)
    assert a.unique().numel() == 64
    assert not torch.equal(a, random_starts(1, 0, torch.arange(64), 10**9, 1024))
    assert not torch.equal(a, random_starts(0, 1, torch.arange(64), 10**9, 1024))


def test_sequential_is_stream_order_with_wrap():
    N, T, G = 101, 10, 4  # M = 10 windows
    starts = torch.cat([window_starts("sequential", 0, s, torch.arange(G), G, N, T) for s in range(5)])
    assert starts.tolist() == [(w % 10) * 10 for w in range(20)]


@pytest.fixture
def sparse_table(tmp_path):
    """A native shard table over 3 * 2**31 + 7 uint16 tokens (positions past 2**32): sparse, mapped, never read."""
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(2 * SPARSE_N)
    return native.module().ShardTable([np.memmap(path, dtype=np.uint16, mode="r")])


SPARSE_N = 3 * 2**31 + 7


@pytest.mark.skipif(not native.available(), reason="native extension not built")
@pytest.mark.parametrize("mode", ["random", "shuffle", "sequential"])
# windows_per_chunk 0: the whole-stream rule; otherwise the chunked rule, with a short last chunk each time.
@pytest.mark.parametrize("T,windows_per_chunk", [(1, 0), (7, 0), (1024, 0), (1, 704), (7, 1000), (1024, 2**20 + 3)])
def test_native_window_starts_equal_torch(sparse_table, mode, T, windows_per_chunk):
    chunking = Chunking(SPARSE_N, T, 704, windows_per_chunk) if windows_per_chunk else None
    rng = random.Random(T + windows_per_chunk)
    out = np.empty(64, dtype=np.int64)
    for _ in range(5):
        seed, step, row0 = rng.getrandbits(64), rng.choice([0, 3, 2**33]), rng.choice([0, 64, 640])
        table_args = (windows_per_chunk,) if windows_per_chunk else ()
        sparse_table.window_starts(SAMPLING_IDS[mode], seed, step, row0, 704, T, out, *table_args)
        expected = window_starts(mode, seed, step, torch.arange(row0, row0 + 64), 704, SPARSE_N, T, chunking)
        assert out.tolist() == expected.tolist()


@pytest.mark.skipif(not native.available(), reason="native extension not built")
def test_native_refuses_chunks_smaller_than_a_global_batch(sparse_table):
    with pytest.raises(ValueError, match="windows_per_chunk must be 0 or in"):
        sparse_table.window_starts(0, 0, 0, 0, 704, 8, np.empty(64, dtype=np.int64), 703)


def test_domain_limits():
    rows = torch.arange(4)
    with pytest.raises(ValueError, match="step"):
        window_starts("sequential", 0, -1, rows, 4, 1000, 8)
    with pytest.raises(ValueError, match="step"):
        window_starts("sequential", 0, 2**62, rows, 4, 1000, 8)  # (step + 1) * G > 2**63
    window_starts("sequential", 0, 2**61 - 1, rows, 4, 1000, 8)  # (step + 1) * G == 2**63: the last valid step
    with pytest.raises(ValueError, match="2\\*\\*62"):
        window_starts("shuffle", 0, 0, rows, 4, 2**62 + 1, 1)


@pytest.mark.skipif(not native.available(), reason="native extension not built")
def test_native_bindings_check_their_arguments(tmp_path):
    mod = native.module()
    table = mod.ShardTable([np.arange(100, dtype=np.uint16)])
    out = np.empty(4, dtype=np.int64)
    with pytest.raises(ValueError, match="mode"):
        table.window_starts(7, 0, 0, 0, 4, 8, out)
    with pytest.raises(ValueError, match="row0"):
        table.window_starts(0, 0, 0, 2, 4, 8, out)  # rows 2..5 of a global batch of 4
    with pytest.raises(TypeError):
        table.window_starts(0, 0, 0, 0, 4, 8, np.empty(4, dtype=np.int32))  # no silent copy to write into
    with pytest.raises(IndexError, match="outside the stream"):
        table.gather(np.array([95], dtype=np.int64), 8, 0, False, 0)  # checked before any pointer is touched
    one = np.array([1], dtype=np.int64)
    with pytest.raises(IndexError, match="out row 4 outside x and y"):
        table.gather_rows(one, 8, np.array([4], dtype=np.int64), 0, False, 0, 4)
    with pytest.raises(IndexError, match="row 3 outside the global batch"):
        table.sample_rows_and_gather(0, 0, 0, np.array([3], dtype=np.int64), 3, 8, one, one.copy(), 0, False, 0, 4)
    with pytest.raises(ValueError, match="same length"):
        table.sample_rows_and_gather(0, 0, 0, one, 3, 8, np.array([0, 1], dtype=np.int64), one.copy(), 0, False, 0, 4)
    with pytest.raises(ValueError, match="token"):
        mod.ShardTable([np.arange(10, dtype=np.float64)])
    with pytest.raises(ValueError, match="mix"):
        mod.ShardTable([np.arange(10, dtype=np.uint16), np.arange(10, dtype=np.uint32)])
