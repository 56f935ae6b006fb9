"""What checking the shards costs: the native next() with its shard watch against the same loader without
it, and ring fill reads with their after-read checks against the bare copies, side by side in one run.

    python benchmarks/bench_integrity.py            # 32M tokens as 1 shard and as 1,000 shards
    python benchmarks/bench_integrity.py --quick    # smoke mode (seconds), used by the tests

The native backend reads the memory maps at every step; its shard table's watch (csrc/watch.h) costs the
step two uncontended mutex sections, and a thread that stats every shard at least every 0.1 s while
batches are read (off the training thread, without the GIL). A ring fill stats each shard a read
touched after the read (TokenStream.read_into). Expected before measuring: the watch well under 1% of
the native next() at B=32, T=1024 (~40 us) and a few percent at B=8, T=64; the fill check about 1 us
per shard per 16 MiB read, so negligible for shards of 100M tokens, and visible for 32K-token shards.

"unwatched" is the same loader with its shard tables rebuilt without file identities (no watch), i.e.
the per-step path before the watch existed; every batch of both is checked against the stream first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from gpuload import GPULoader, native
from gpuload.machine import benchmark_result, machine_info, machine_line
from gpuload.ring import FILL_PIECE_BYTES
from gpuload.shards import write_shard


def write_shards(directory: str, num_tokens: int, num_shards: int) -> str:
    """`num_shards` llm.c shards of random uint16 tokens in `directory`; returns the glob that names them."""
    rng = np.random.default_rng(0)
    per = num_tokens // num_shards
    for i in range(num_shards):
        write_shard(os.path.join(directory, f"train_{i:05d}.bin"), rng.integers(0, 50257, per, dtype=np.uint16))
    return os.path.join(directory, "train_*.bin")


def unwatched(ld: GPULoader) -> GPULoader:
    """`ld` with its native shard tables rebuilt without identities: the same gathers, no watch."""
    producer = ld._producer
    producer.tables = []
    for source in ld.sources:
        stream = source.stream
        source.table = native.module().ShardTable(stream.arrays, stream.paths)
        producer.tables.append(source.table)
    return ld


def checked(ld: GPULoader, pattern_tokens: np.ndarray, steps: int = 3) -> GPULoader:
    """Refuse a loader whose batches are not the stream's windows at its starts (nothing fake is timed)."""
    for _ in range(steps):
        starts = ld.window_starts(ld.step).numpy()
        x, y = next(ld)
        want = np.stack([pattern_tokens[s:s + ld.seq_len + 1] for s in starts]).astype(np.int64)
        if not (np.array_equal(x.numpy(), want[:, :-1]) and np.array_equal(y.numpy(), want[:, 1:])):
            raise SystemExit("bench_integrity: a loader read other windows than its starts")
    return ld


def time_interleaved(providers: dict, rounds: int, per_round: int) -> dict:
    """Microseconds per call of each provider, one sample per round, providers interleaved within a round."""
    for fn in providers.values():
        for _ in range(per_round):
            fn()
    samples = {name: [] for name in providers}
    for r in range(rounds):
        order = list(providers.items())
        for name, fn in (order if r % 2 == 0 else order[::-1]):  # no provider always first in a round
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            samples[name].append((time.perf_counter() - t0) / per_round * 1e6)
    return samples


def fill_providers(stream) -> dict:
    """One 16 MiB fill read (half the stream at most), at a moving start: with the after-read checks (read_into) and the bare copy."""
    piece = min(FILL_PIECE_BYTES // stream.dtype.itemsize, stream.num_tokens // 2)
    out = np.empty(piece, dtype=stream.dtype)
    positions = {"checked": 0, "bare": 0}
    span = stream.num_tokens - piece

    def step(name, read):
        def run():
            start = positions[name] % span
            positions[name] = start + piece
            read(start)
        return run

    return {"fill-checked": step("checked", lambda start: stream.read_into(out, start)),
            "fill-bare": step("bare", lambda start: stream.table.read(start, out.ctypes.data, out.size))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32 << 20)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 1000])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--per-round", type=int, default=200, help="next() calls per provider per round")
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke mode: 2M tokens, few rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.shards, args.rounds, args.per_round = 2 << 20, [1, 64], 3, 20
    if not native.available():
        raise SystemExit("bench_integrity: the native extension is not built (it is what the watch is part of)")

    shapes = [(32, 1024), (8, 64)]
    rows = []
    for num_shards in args.shards:
        with tempfile.TemporaryDirectory() as tmp:
            pattern = write_shards(tmp, args.tokens, num_shards)
            providers, loaders = {}, []
            for B, T in shapes:
                for name, wrap in (("watched", lambda ld: ld), ("unwatched", unwatched)):
                    ld = wrap(GPULoader(pattern, batch_size=B, seq_len=T, sampling="random", rank=0, world_size=1,
                                        device="cpu", backend="native"))
                    tokens = np.concatenate([np.asarray(a) for a in ld.sources[0].stream.arrays])
                    loaders.append(checked(ld, tokens))
                    providers[f"next-{name}-B{B}-T{T}"] = ld.__next__
            samples = time_interleaved(providers, args.rounds, args.per_round)
            # A fill read is ~100x a step: fewer of them per round, interleaved the same way.
            samples.update(time_interleaved(fill_providers(loaders[0].sources[0].stream), args.rounds,
                                            max(1, args.per_round // 50)))
            for ld in loaders:
                ld.close()
        for name, s in samples.items():
            baseline = name.replace("-watched", "-unwatched").replace("fill-checked", "fill-bare")
            median = statistics.median(s)
            # The median of per-round ratios: each round times both twins within milliseconds of each other.
            ratio = statistics.median(a / b for a, b in zip(s, samples[baseline]))
            rows.append({"provider": name, "shards": num_shards, "median_us": median,
                         "p10_us": float(np.quantile(s, 0.1)), "p90_us": float(np.quantile(s, 0.9)),
                         "vs_baseline": ratio})
    machine = machine_info()
    print(f"{args.tokens:,} tokens; {args.rounds} rounds; ratio = median over rounds of time / time of the unchecked twin")
    print(f"{'provider':<28} {'shards':>6} {'median us':>10} {'p10-p90 us':>18} {'ratio':>7}")
    for r in rows:
        print(f"{r['provider']:<28} {r['shards']:>6} {r['median_us']:>10.2f} {r['p10_us']:>8.2f}-{r['p90_us']:<9.2f} "
              f"{r['vs_baseline']:>7.3f}")
    print(machine_line(machine))
    return benchmark_result("integrity", argv, args.json, num_tokens=args.tokens, rounds=args.rounds,
                            per_round=args.per_round, machine=machine, rows=rows)


if __name__ == "__main__":
    sys.exit(main() and 0)
