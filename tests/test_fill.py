"""Bulk fill (TokenStream.read_into: the native copy from the maps, or pread) against NumPy, and shards changing under it."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from gpuload import native
from gpuload.shards import ShardChanged, TokenStream, write_shard



def make_stream(tmp_path, sizes, dtype, format="llmc", seed=0):
    """Shards of random tokens; returns the stream and the reference (the shards concatenated by NumPy)."""
    rng = np.random.default_rng(seed)
    high = np.iinfo(dtype).max
    arrays = [rng.integers(0, high, size=n, dtype=np.int64).astype(dtype) for n in sizes]
    paths = []
    for i, a in enumerate(arrays):
        path = str(tmp_path / f"shard_{i}.{'npy' if format == 'npy' else 'bin'}")
        write_shard(path, a, format=format)
        paths.append(path)
    return TokenStream(paths, token_dtype=dtype), np.concatenate(arrays)


def filler(stream):
    """fill(start, count) -> a fresh array holding tokens [start, start+count) of the stream."""

    def fill(start, count):
        out = np.empty(count, dtype=stream.dtype)
        stream.read_into(out, start)
        return out

    return fill


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_ranges_equal_numpy(tmp_path, dtype):
    sizes = [1, 7, 4096, 3, 60_001, 17, 2, 30_000, 5]  # odd sizes: requests and shards never line up
    stream, ref = make_stream(tmp_path, sizes, dtype)
    fill = filler(stream)
    n = ref.size
    ranges = [
        (0, n),                  # whole stream
        (4104 + 10, 50_000),     # inside one shard
        (0, 4112),               # the four first shards, from token 0
        (3, 64_120),             # many small shards, unaligned start
        (64_120, n - 64_123),    # across the last shards to near the end
        (n - 1, 1), (0, 1), (1, 0), (n, 0),  # single tokens, empty ranges (also at the end)
    ]
    rng = np.random.default_rng(1)
    for _ in range(20):  # many sizes, unaligned starts
        count = int(rng.integers(0, n // 2))
        ranges.append((int(rng.integers(0, n - count + 1)), count))
    for start, count in ranges:
        np.testing.assert_array_equal(fill(start, count), ref[start:start + count], err_msg=f"[{start}, +{count})")


@pytest.mark.parametrize("format,dtype", [("llmc", np.uint16), ("raw", np.uint16), ("npy", np.uint32), ("npy", np.int32)])
def test_every_shard_format(tmp_path, format, dtype):
    """The byte offset of the first token differs by format (llm.c header 1024, .npy header, raw 0)."""
    stream, ref = make_stream(tmp_path, [5_000, 333, 7_000], dtype, format=format)
    ref = ref.astype(stream.dtype)
    fill = filler(stream)
    np.testing.assert_array_equal(fill(0, ref.size), ref)
    np.testing.assert_array_equal(fill(4_999, 400), ref[4_999:5_399])


def test_range_outside_the_stream(tmp_path):
    stream, _ = make_stream(tmp_path, [100, 50], np.uint16)
    fill = filler(stream)
    for start, count in [(-1, 5), (0, 151), (140, 11), (151, 0), (2**62, 1)]:
        with pytest.raises(IndexError, match="outside the stream of 150"):
            fill(start, count)


def test_read_into_checks_the_destination(tmp_path):
    stream, _ = make_stream(tmp_path, [100], np.uint16)
    for bad in [np.empty(10, np.uint32), np.empty((2, 5), np.uint16), np.empty(20, np.uint16)[::2], [0] * 10]:
        with pytest.raises(ValueError, match="read_into"):
            stream.read_into(bad, 0)


@pytest.fixture(params=["native", "python"])
def read_path(request, monkeypatch):
    """Both read paths of TokenStream.read_into: the native copy from the maps, and pread on kept descriptors."""
    if request.param == "native" and not native.available():
        pytest.skip("native extension not built")
    if request.param == "python":
        monkeypatch.setenv("GPULOAD_NO_NATIVE", "1")
    return request.param


def test_shard_truncated_after_opening_is_an_error_not_a_crash(tmp_path, read_path):
    stream, ref = make_stream(tmp_path, [10_000, 20_000, 10_000], np.uint16)
    assert (stream.table is not None) == (read_path == "native")
    fill = filler(stream)
    np.testing.assert_array_equal(fill(0, ref.size), ref)
    victim = stream.shards[1].path
    os.truncate(victim, 1024 + 2 * 5_000)  # keep the header and the first 5,000 tokens of shard 1
    # Within what is left, beyond it, and across it: each read of shard 1 is refused, none returns zeros.
    for start, count in [(10_000, 5_000), (15_000, 10), (9_000, 30_000), (0, ref.size)]:
        with pytest.raises(OSError) as info:
            fill(start, count)
        message = str(info.value)
        assert victim in message, message
        assert ("truncated from 41024 to 11024 bytes" in message or "SIGBUS" in message
                or "the file now holds 11024 bytes, the stream expects 41024" in message), message
    np.testing.assert_array_equal(fill(30_000, 10_000), ref[30_000:])  # other shards are untouched
    np.testing.assert_array_equal(fill(0, 10_000), ref[:10_000])


def test_shard_rewritten_in_place_is_refused(tmp_path, read_path):
    stream, ref = make_stream(tmp_path, [1_000, 2_000], np.uint16)
    victim = stream.shards[1].path
    with open(victim, "r+b") as f:  # same size, new tokens: what `cp new old` or an editor does
        f.seek(1024 + 2 * 100)
        f.write(b"\0\0" * 10)
    os.utime(victim, ns=(stream.shards[1].identity.mtime_ns + 10**9,) * 2)  # a later write (not within one tick)
    with pytest.raises(ShardChanged, match="shard_1.bin: modified"):
        filler(stream)(900, 300)
    np.testing.assert_array_equal(filler(stream)(0, 1_000), ref[:1_000])


def test_memmap_read_of_a_truncated_shard_kills_the_process(tmp_path):
    """Why fills never read the maps from Python: a read of a truncated shard's lost page is SIGBUS, which
    kills the process; the native copy turns it into ShardFault, and the pure-Python path preads."""
    stream, _ = make_stream(tmp_path, [200_000], np.uint16)
    code = ("import os, sys\nfrom gpuload.shards import TokenStream\n"
            f"s = TokenStream({stream.paths!r})\nos.truncate(s.paths[0], 4096)\nprint(int(s.arrays[0][150_000]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGBUS, result  # killed: no exception a loader could catch


def test_shard_deleted_or_replaced_after_opening_still_reads(tmp_path, read_path):
    """Read through the files opened at construction, never by name: before its first read too."""
    stream, ref = make_stream(tmp_path, [1_000, 2_000], np.uint32)
    os.remove(stream.paths[0])
    write_shard(stream.paths[1], np.zeros(2_000, np.uint32))  # a new file under the old name (os.replace)
    fill = filler(stream)
    np.testing.assert_array_equal(fill(0, ref.size), ref)
    np.testing.assert_array_equal(fill(1_500, 10), ref[1_500:1_510])


def test_descriptors_kept_only_for_few_shards_with_the_native_extension(tmp_path, monkeypatch):
    if not native.available():
        pytest.skip("native extension not built")
    from gpuload import shards

    monkeypatch.setattr(shards, "_descriptor_budget", lambda: 49)
    for count, kept in [(49, 49), (50, 0)]:
        (tmp_path / str(count)).mkdir()
        before = len(os.listdir("/proc/self/fd"))
        stream, ref = make_stream(tmp_path / str(count), [100] * count, np.uint16)
        assert len(os.listdir("/proc/self/fd")) == before + kept
        np.testing.assert_array_equal(filler(stream)(0, ref.size), ref)
        stream.close()
        assert len(os.listdir("/proc/self/fd")) == before
