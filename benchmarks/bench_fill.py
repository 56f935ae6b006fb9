"""Bulk fill from the page cache into a ring-sized buffer: pread (read_into) vs memmap copy vs memcpy.

    python benchmarks/bench_fill.py                  # 8 shards x 64M uint16 tokens (1 GiB), 256 MiB fills
    python benchmarks/bench_fill.py --cold           # shards evicted from the page cache before every fill
    python benchmarks/bench_fill.py --quick          # smoke mode (a few MB, seconds), used by the tests

The shards are read once before timing, so every provider copies from the page cache (the steady state
of a dataset that fits in RAM). Providers run interleaved in rounds, each on the same fill positions, so
drift on a noisy machine hits them alike; the table reports the median and p10-p90 over all fills, and
the ratio to the floor: np.copyto from an in-memory array of the same size (one-thread memcpy).
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile
import time

import numpy as np

from gpuload.machine import benchmark_result, machine_info, machine_line
from gpuload.shards import TokenStream, write_shard


def write_shards(directory: str, num_shards: int, shard_tokens: int) -> list[str]:
    """llm.c uint16 shards of token = position mod 65536 (cheap to write, every fill checkable)."""
    paths = []
    for i in range(num_shards):
        path = os.path.join(directory, f"fill_{i:03d}.bin")
        first = i * shard_tokens
        write_shard(path, (np.arange(first, first + shard_tokens, dtype=np.int64) % 65536).astype(np.uint16))
        paths.append(path)
    return paths


def warm_page_cache(stream: TokenStream) -> None:
    """Read every shard once, through the files and through the memmaps (whose page tables fill on first touch)."""
    buf = bytearray(16 << 20)
    for path in stream.paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    for array in stream.arrays:
        for first in range(0, array.size, len(buf) // 2):
            np.frombuffer(buf, dtype=np.uint16)[:array[first:first + len(buf) // 2].size] = array[first:first + len(buf) // 2]


def evict_page_cache(stream: TokenStream) -> None:
    """--cold: drop the shards from the page cache (mapped pages must be unmapped first, or they stay)."""
    for array in stream.arrays:
        array._mmap.madvise(mmap.MADV_DONTNEED)
    for path in stream.paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def memmap_copy(stream: TokenStream, dst: np.ndarray, start: int) -> None:
    """What TokenStream.read does, into dst: a slice copy out of each shard's memmap."""
    shard = int(np.searchsorted(stream.starts, start, side="right")) - 1
    done = 0
    while done < dst.size:
        local = start + done - int(stream.starts[shard])
        take = min(dst.size - done, stream.shards[shard].num_tokens - local)
        np.copyto(dst[done:done + take], stream.arrays[shard][local:local + take])
        done += take
        shard += 1


def make_providers(stream: TokenStream, fill_tokens: int) -> dict:
    """name -> fn(dst, start) that fills dst with tokens [start, start + fill_tokens)."""
    floor_src = np.ones(fill_tokens, dtype=stream.dtype)  # touched: no page faults inside the timing
    return {
        "floor-memcpy": lambda dst, start: np.copyto(dst, floor_src),
        "python-read_into": lambda dst, start: stream.read_into(dst, start),
        "memmap-copyto": lambda dst, start: memmap_copy(stream, dst, start),
    }


def fill_starts(num_tokens: int, fill_tokens: int, count: int) -> list[int]:
    """Fill positions walking the stream (odd offsets, crossing shard boundaries), the same for every provider."""
    span = num_tokens - fill_tokens
    step = fill_tokens + 4093
    return [(k * step) % (span + 1) for k in range(count)]


def check(stream: TokenStream, providers: dict, dst: np.ndarray, start: int) -> None:
    expected = (np.arange(start, start + dst.size, dtype=np.int64) % 65536).astype(np.uint16)
    for name, fn in providers.items():
        if name.startswith("floor"):
            continue
        dst.fill(0)
        fn(dst, start)
        if not np.array_equal(dst, expected):
            raise AssertionError(f"{name}: filled tokens differ from the shards at start {start}")


def time_providers(providers: dict, dst: np.ndarray, starts: list[int], rounds: int, per_round: int,
                   before=None) -> dict:
    """Seconds (wall and process CPU, all threads) per fill, one sample per fill; `before()` runs untimed."""
    samples = {name: {"wall": [], "cpu": []} for name in providers}
    k = 0
    for _ in range(rounds):
        round_starts = [starts[(k + i) % len(starts)] for i in range(per_round)]
        k += per_round
        for name, fn in providers.items():
            for start in round_starts:
                if before is not None:
                    before()
                wall0, cpu0 = time.perf_counter(), time.process_time()
                fn(dst, start)
                wall1, cpu1 = time.perf_counter(), time.process_time()
                samples[name]["wall"].append(wall1 - wall0)
                samples[name]["cpu"].append(cpu1 - cpu0)
    return samples


def quantile(values, q):
    return float(np.quantile(np.asarray(values), q))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-tokens", type=int, default=64 << 20, help="uint16 tokens per shard")
    parser.add_argument("--fill-mib", type=float, default=256, help="bytes per fill (one ring chunk)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=2, help="fills timed per provider per round")
    parser.add_argument("--cold", action="store_true",
                        help="evict the shards from the page cache before every fill (reads hit the disk)")
    parser.add_argument("--data", help="directory to write the shards in (default: a temporary one)")
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke mode: 4 x 512K tokens, 1 MiB fills, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.shards, args.shard_tokens, args.fill_mib, args.rounds, args.per_round = 4, 1 << 19, 1, 2, 1
    fill_tokens = int(args.fill_mib * 2**20) // 2

    with tempfile.TemporaryDirectory(dir=args.data) as tmp:
        paths = write_shards(tmp, args.shards, args.shard_tokens)
        stream = TokenStream(paths)
        if fill_tokens > stream.num_tokens:
            raise SystemExit(f"--fill-mib {args.fill_mib} is more than the {stream.num_tokens * 2 / 2**20:.0f} MiB "
                             f"of shards; pass a smaller --fill-mib or more --shards")
        if args.cold:
            for path in paths:  # written pages are dirty until flushed, and dirty pages cannot be evicted
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
        warm_page_cache(stream)
        dst = np.ones(fill_tokens, dtype=np.uint16)  # the ring chunk, touched once: no first-touch faults timed
        starts = fill_starts(stream.num_tokens, fill_tokens, 64)
        providers = make_providers(stream, fill_tokens)
        check(stream, providers, dst, starts[1])  # also warms the memmap's page tables and the Python path's files
        samples = time_providers(providers, dst, starts, args.rounds, args.per_round,
                                 before=(lambda: evict_page_cache(stream)) if args.cold else None)

    nbytes = fill_tokens * 2
    floor = nbytes / statistics.median(samples["floor-memcpy"]["wall"])
    rows = []
    for name, s in samples.items():
        median = statistics.median(s["wall"])
        rows.append({
            "provider": name, "fill_bytes": nbytes, "median_gbs": nbytes / median / 1e9,
            "p10_gbs": nbytes / quantile(s["wall"], 0.9) / 1e9, "p90_gbs": nbytes / quantile(s["wall"], 0.1) / 1e9,
            "median_ms": median * 1e3, "cpu_ms": statistics.median(s["cpu"]) * 1e3,
            "tokens_per_s": fill_tokens / median, "vs_floor": nbytes / median / floor,
        })
    machine = machine_info()
    print(f"{stream.num_tokens:,} uint16 tokens in {args.shards} shards ({stream.num_tokens * 2 / 2**20:,.0f} MiB, "
          f"{'evicted before every fill' if args.cold else 'page cache'}), fills of {nbytes / 2**20:g} MiB, {args.rounds} rounds x {args.per_round} fills")
    print(f"{'provider':<18} {'GB/s':>7} {'p10-p90 GB/s':>14} {'ms/fill':>8} {'cpu ms':>8} {'Gtok/s':>7} {'vs floor':>9}")
    for r in rows:
        print(f"{r['provider']:<18} {r['median_gbs']:>7.2f} {r['p10_gbs']:>6.2f}-{r['p90_gbs']:<7.2f} {r['median_ms']:>8.2f} "
              f"{r['cpu_ms']:>8.2f} {r['tokens_per_s'] / 1e9:>7.2f} {r['vs_floor']:>8.2f}x")
    print(machine_line(machine))
    return benchmark_result(
        "fill", argv, args.json, num_tokens=stream.num_tokens, shards=args.shards, fill_bytes=nbytes,
        rounds=args.rounds, per_round=args.per_round, cold=args.cold, machine=machine, rows=rows)


if __name__ == "__main__":
    main()
