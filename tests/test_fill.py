"""Bulk fill (native ShardFiles.fill and TokenStream.read_into) against NumPy, and shards changing under it."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from gpuload import native
from gpuload.native import open_native_files
from gpuload.shards import TokenStream, write_shard

PATHS = ["python"] + (["native"] if native.available() else [])
THREADS = [1, 2, 4, 0]  # 0 = auto
SMALL_REQUEST = 4096  # bytes: small enough that the test shards make many requests, so every thread gets work


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


def filler(path, stream, request_bytes=SMALL_REQUEST):
    """fill(start, count, threads) -> a fresh array, through the native or the pure-Python path."""
    if path == "native":
        files = open_native_files(stream, request_bytes=request_bytes)

        def fill(start, count, threads=0):
            out = np.empty(count, dtype=stream.dtype)
            files.fill(out.ctypes.data, start, count, threads)
            return out

        fill.files = files
        return fill

    def fill(start, count, threads=0):
        out = np.empty(count, dtype=stream.dtype)
        stream.read_into(out, start)
        return out

    return fill


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("threads", THREADS)
def test_ranges_equal_numpy(tmp_path, path, dtype, threads):
    sizes = [1, 7, 4096, 3, 60_001, 17, 2, 30_000, 5]  # odd sizes: requests and shards never line up
    stream, ref = make_stream(tmp_path, sizes, dtype)
    fill = filler(path, stream)
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
        np.testing.assert_array_equal(fill(start, count, threads), ref[start:start + count], err_msg=f"[{start}, +{count})")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("format,dtype", [("llmc", np.uint16), ("raw", np.uint16), ("npy", np.uint32), ("npy", np.int32)])
def test_every_shard_format(tmp_path, path, format, dtype):
    """The byte offset of the first token differs by format (llm.c header 1024, .npy header, raw 0)."""
    stream, ref = make_stream(tmp_path, [5_000, 333, 7_000], dtype, format=format)
    ref = ref.astype(stream.dtype)
    fill = filler(path, stream)
    for threads in (1, 4):
        np.testing.assert_array_equal(fill(0, ref.size, threads), ref)
        np.testing.assert_array_equal(fill(4_999, 400, threads), ref[4_999:5_399])


@pytest.mark.skipif(not native.available(), reason="native extension not built")
def test_native_default_request_size_and_auto_threads(tmp_path):
    stream, ref = make_stream(tmp_path, [3_000_001, 2_000_000, 999], np.uint16)  # ~10 MiB: several 4 MiB requests
    with open_native_files(stream) as files:
        assert files.request_bytes == 4 << 20 and files.num_tokens == ref.size and files.num_files == 3
        assert files.auto_threads(1000) == 1  # small copies stay on the calling thread
        assert 1 <= files.auto_threads(ref.size) <= min(8, len(os.sched_getaffinity(0)))
        for threads in THREADS:
            out = np.empty(ref.size - 11, dtype=np.uint16)
            files.fill(out.ctypes.data, 11, out.size, threads)
            np.testing.assert_array_equal(out, ref[11:])
    assert files.closed
    with open_native_files(stream, advise=True) as files:  # + posix_fadvise: same bytes
        assert files.advise
        out = np.empty(ref.size, dtype=np.uint16)
        files.fill(out.ctypes.data, 0, out.size)
        np.testing.assert_array_equal(out, ref)


@pytest.mark.skipif(not native.available(), reason="native extension not built")
def test_native_fills_torch_memory(tmp_path):
    """The destination is any caller-owned memory: here a torch tensor (a pinned one in the ring)."""
    torch = pytest.importorskip("torch")
    stream, ref = make_stream(tmp_path, [1000, 2000], np.uint32)
    dst = torch.zeros(2500, dtype=torch.int32)
    open_native_files(stream).fill(dst.data_ptr(), 300, 2500, 2)
    np.testing.assert_array_equal(dst.numpy().view(np.uint32), ref[300:2800])


@pytest.mark.parametrize("path", PATHS)
def test_range_outside_the_stream(tmp_path, path):
    stream, _ = make_stream(tmp_path, [100, 50], np.uint16)
    fill = filler(path, stream)
    for start, count in [(-1, 5), (0, 151), (140, 11), (151, 0), (2**62, 1)]:
        with pytest.raises(IndexError, match="outside the stream of 150"):
            fill(start, count)
    if path == "native":
        with pytest.raises(IndexError, match="outside the stream"):
            fill.files.fill(0, 0, -1)  # a negative count (np.empty refuses it before the Python path sees one)
        with pytest.raises(IndexError, match="outside the stream"):
            fill.files.fill(0, 2**62, 2**62)  # start + count overflows int64: checked without adding them
        with pytest.raises(ValueError, match="threads"):
            fill(0, 10, -2)


def test_read_into_checks_the_destination(tmp_path):
    stream, _ = make_stream(tmp_path, [100], np.uint16)
    for bad in [np.empty(10, np.uint32), np.empty((2, 5), np.uint16), np.empty(20, np.uint16)[::2], [0] * 10]:
        with pytest.raises(ValueError, match="read_into"):
            stream.read_into(bad, 0)


@pytest.mark.parametrize("path", PATHS)
def test_shard_truncated_after_opening_is_an_error_not_a_crash(tmp_path, path):
    stream, ref = make_stream(tmp_path, [10_000, 20_000, 10_000], np.uint16)
    fill = filler(path, stream)
    np.testing.assert_array_equal(fill(0, ref.size), ref)  # opens the files (the Python path opens on first use)
    victim = stream.shards[1].path
    os.truncate(victim, 1024 + 2 * 5_000)  # keep the header and the first 5,000 tokens of shard 1
    np.testing.assert_array_equal(fill(10_000, 5_000, 2), ref[10_000:15_000])  # what is left still reads
    for start, count, threads in [(15_000, 10, 1), (9_000, 30_000, 4), (0, ref.size, 0)]:
        with pytest.raises(OSError) as info:
            fill(start, count, threads)
        message = str(info.value)
        assert victim in message and "truncated or changed while training" in message
        assert "the file now holds 11024 bytes, the stream expects 41024" in message
    np.testing.assert_array_equal(fill(30_000, 10_000), ref[30_000:])  # other shards are untouched


def test_memmap_read_of_a_truncated_shard_kills_the_process(tmp_path):
    """Why fills use pread: the same read through the memmap is SIGBUS, not an exception."""
    stream, _ = make_stream(tmp_path, [200_000], np.uint16)
    code = ("import os, sys\nfrom gpuload.shards import TokenStream\n"
            f"s = TokenStream({stream.paths!r})\nos.truncate(s.paths[0], 4096)\nprint(int(s.arrays[0][150_000]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGBUS, result  # killed: no exception a loader could catch


@pytest.mark.parametrize("path", PATHS)
def test_shard_deleted_or_replaced_after_opening_still_reads(tmp_path, path):
    stream, ref = make_stream(tmp_path, [1_000, 2_000], np.uint32)
    fill = filler(path, stream)
    np.testing.assert_array_equal(fill(0, 10), ref[:10])  # opens (Python: the first shard only)
    np.testing.assert_array_equal(fill(1_500, 10), ref[1_500:1_510])
    os.remove(stream.paths[0])
    write_shard(stream.paths[1], np.zeros(2_000, np.uint32))  # a new file under the old name
    np.testing.assert_array_equal(fill(0, ref.size, 2), ref)  # the kept descriptors still see the old content


def test_read_into_names_a_shard_deleted_before_its_first_read(tmp_path):
    stream, _ = make_stream(tmp_path, [1_000, 2_000], np.uint16)
    os.remove(stream.paths[1])
    with pytest.raises(FileNotFoundError, match="shard_1.bin: cannot open the shard"):
        stream.read_into(np.empty(10, np.uint16), 1_500)


@pytest.mark.skipif(not native.available(), reason="native extension not built")
def test_native_open_errors_name_the_file(tmp_path):
    stream, _ = make_stream(tmp_path, [1_000], np.uint16)
    ShardFiles = native.module().ShardFiles
    missing = str(tmp_path / "missing.bin")
    with pytest.raises(FileNotFoundError, match="missing.bin: cannot open the shard"):
        ShardFiles([stream.paths[0], missing], [1024, 0], [1_000, 10], 2)
    with pytest.raises(OSError, match=r"expected at least 3026 bytes \(1001 tokens from byte 1024\), found 3024"):
        ShardFiles(stream.paths, [1024], [1_001], 2)  # one token more than the file holds
    with pytest.raises(ValueError, match="token_bytes"):
        ShardFiles(stream.paths, [1024], [1_000], 3)
    with pytest.raises(ValueError, match="one offset and one count per path"):
        ShardFiles(stream.paths, [1024, 0], [1_000], 2)


@pytest.mark.skipif(not native.available(), reason="native extension not built")
def test_native_close(tmp_path):
    stream, ref = make_stream(tmp_path, [1_000], np.uint16)
    files = open_native_files(stream)
    out = np.empty(10, np.uint16)
    files.fill(out.ctypes.data, 0, 10)
    files.close()
    files.close()  # idempotent
    assert files.closed
    with pytest.raises(ValueError, match="closed"):
        files.fill(out.ctypes.data, 0, 10)
    del files  # destruction after close is safe too


@pytest.mark.skipif(not native.available(), reason="native extension not built")
def test_native_concurrent_fills_from_python_threads(tmp_path):
    """fill releases the GIL and shares nothing mutable between calls: Python threads may fill at once."""
    from concurrent.futures import ThreadPoolExecutor

    stream, ref = make_stream(tmp_path, [50_000, 70_000], np.uint16)
    files = open_native_files(stream, request_bytes=SMALL_REQUEST)
    outs = [np.empty(60_000, np.uint16) for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: files.fill(outs[i].ctypes.data, i * 7_000, 60_000, 2), range(8)))
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out, ref[i * 7_000:i * 7_000 + 60_000])
