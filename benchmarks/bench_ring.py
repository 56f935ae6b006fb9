"""Ring refill rate: the ring's background filler vs a plain pinned copy of the same bytes, and next() cost.

    python benchmarks/bench_ring.py                 # 1 GiB of uint16 shards, a 256 MiB ring (4 slots)
    python benchmarks/bench_ring.py --json out.json
    python benchmarks/bench_ring.py --quick         # smoke mode (a few MB), used by the tests

Refill: a sequential loader whose ring is smaller than the stream is driven one visit at a time (the
consumer asks for the first step of each visit, so the filler always has free slots) over one pass of
the stream; GB/s counts the chunk bytes loaded. The floor, measured in the same run on the same sizes:
on CUDA a pinned host -> device `copy_` per placement ("device": what the ring must reach, >= 0.8x
is the target; "zero-copy": host -> pinned host), on the CPU a host -> host `copy_`. The shards are read
once first, so the filler copies from the page cache. next(): host microseconds per call at B x T on
every backend/placement this machine has (CUDA: time to return, and GPU time per batch by events).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from gpuload import GPULoader, native
from gpuload.machine import benchmark_result, machine_info, machine_line
from gpuload.shards import TokenStream

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fill import warm_page_cache, write_shards  # noqa: E402  (the same shards and page-cache warm-up)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def refill_rate(paths, device, placement, ring_tokens, seq_len, batch_size) -> dict:
    """GB/s of one pass of ring visits, and the number of bytes loaded."""
    ld = GPULoader(paths, batch_size=batch_size, seq_len=seq_len, sampling="sequential", device=device,
                   backend="triton" if device.type == "cuda" else "torch", ring_tokens=ring_tokens,
                   placement=placement, rank=0, world_size=1)
    source = ld.sources[0]
    chunking, ring = source.chunking, source.ring
    steps_per_chunk = chunking.windows_per_chunk / ld.global_batch
    first_steps = [int(v * steps_per_chunk + 0.999999) for v in range(chunking.num_chunks)]
    itemsize = source.stream.dtype.itemsize
    loaded = sum(chunking.chunk_length(v) for v in range(chunking.num_chunks)) * itemsize
    for step in (0, first_steps[1]):  # allocation and thread start outside the timing
        ring.acquire(step)
        ring.release(step)
    sync(device)
    t0 = time.perf_counter()
    for step in first_steps[2:]:
        ring.acquire(step)
        ring.release(step)
    sync(device)
    seconds = time.perf_counter() - t0
    loaded -= (chunking.chunk_length(0) + chunking.chunk_length(1)) * itemsize
    ld.close()
    return {"seconds": seconds, "bytes": loaded, "gb_per_s": loaded / seconds / 1e9}


def copy_rate(nbytes: int, device: torch.device, placement: str, repeats: int = 5) -> float:
    """Median GB/s of copying `nbytes` from pinned host memory to the ring's memory, in `nbytes // 4` pieces."""
    cuda = device.type == "cuda"
    src = torch.empty(nbytes // 4, dtype=torch.uint8, pin_memory=cuda)
    dst_device = device if cuda and placement == "device" else "cpu"
    dst = torch.empty(nbytes // 4, dtype=torch.uint8, device=dst_device, pin_memory=cuda and dst_device == "cpu")
    src.fill_(1)
    rates = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            dst.copy_(src, non_blocking=cuda)
        sync(device)
        rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def next_cost(paths, device, backend, placement, batch_size, seq_len, steps) -> dict:
    """Host microseconds per next() (median, p10, p90) and, on CUDA, GPU microseconds per batch."""
    ld = GPULoader(paths, batch_size=batch_size, seq_len=seq_len, sampling="random", device=device, backend=backend,
                   placement=placement, rank=0, world_size=1)
    for _ in range(5):
        next(ld)
    sync(device)
    host = []
    gpu = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        x, y = next(ld)
        host.append((time.perf_counter() - t0) * 1e6)
        if device.type == "cuda":
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end) * 1e3)
        else:
            int(x[-1, -1]) + int(y[-1, -1])
    ld.close()
    host.sort()
    result = {"host_us": statistics.median(host), "host_p10_us": host[len(host) // 10],
              "host_p90_us": host[len(host) * 9 // 10]}
    if gpu:
        result["gpu_us"] = statistics.median(gpu)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-tokens", type=int, default=64 << 20, help="uint16 tokens per shard")
    parser.add_argument("--ring-mib", type=int, default=256, help="ring size for the refill runs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200, help="timed next() calls per backend")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke mode: a few MB, a few steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.shards, args.shard_tokens, args.ring_mib, args.steps = 2, 1 << 20, 1, 20
        args.batch_size, args.seq_len = 4, 64
    device = torch.device(args.device)
    ring_tokens = (args.ring_mib << 20) // 2

    with tempfile.TemporaryDirectory(prefix="gpuload-bench-ring-") as directory:
        paths = write_shards(directory, args.shards, args.shard_tokens)
        stream = TokenStream(paths)
        warm_page_cache(stream)
        stream.close()
        placements = ["device", "zero-copy"] if device.type == "cuda" else ["device"]
        refill = []
        for placement in placements:
            rate = refill_rate(paths, device, placement, ring_tokens, args.seq_len, args.batch_size)
            floor = copy_rate(ring_tokens * 2, device, placement)
            refill.append({"placement": placement if device.type == "cuda" else "host", **rate,
                           "copy_gb_per_s": floor, "of_copy": rate["gb_per_s"] / floor})
        cases = [("native", "device")] if native.available() and device.type == "cpu" else []
        cases += [("torch", "device")]
        if device.type == "cuda":
            cases = [("triton", "device"), ("triton", "zero-copy")] + cases
        calls = [{"backend": b, "placement": p, **next_cost(paths, device, b, p, args.batch_size, args.seq_len,
                                                           args.steps)} for b, p in cases]

    machine = machine_info()
    total = args.shards * args.shard_tokens
    print(f"stream {total:,} uint16 tokens ({total * 2 / 2**30:.2f} GiB) from the page cache, ring {args.ring_mib} MiB")
    print(f"{'refill into':<12} {'GB/s':>8} {'copy GB/s':>10} {'of copy':>8}")
    for r in refill:
        print(f"{r['placement']:<12} {r['gb_per_s']:>8.2f} {r['copy_gb_per_s']:>10.2f} {r['of_copy']:>8.2f}")
    print(f"next() at B={args.batch_size}, T={args.seq_len}, random sampling, whole-stream ring")
    print(f"{'backend':<20} {'host us':>9} {'p10-p90 us':>16} {'GPU us':>8}")
    for c in calls:
        gpu = f"{c['gpu_us']:.1f}" if "gpu_us" in c else "-"
        name = c["backend"] + ("/" + c["placement"] if device.type == "cuda" and c["backend"] != "native" else "")
        print(f"{name:<20} {c['host_us']:>9.1f} "
              f"{c['host_p10_us']:>7.1f}-{c['host_p90_us']:<8.1f} {gpu:>8}")
    print(machine_line(machine))
    return benchmark_result("ring", argv, args.json, device=str(device), stream_tokens=total,
                            ring_tokens=ring_tokens, batch_size=args.batch_size, seq_len=args.seq_len,
                            machine=machine, refill=refill, next=calls)


if __name__ == "__main__":
    main()
