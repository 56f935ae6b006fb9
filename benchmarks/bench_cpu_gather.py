"""CPU batch production: gpuload's CPU backends against nanoGPT's get_batch, side by side in one run.

    python benchmarks/bench_cpu_gather.py                 # 100M-token file, B=32, T=1024
    python benchmarks/bench_cpu_gather.py --quick         # smoke mode (seconds), used by the tests

Providers run interleaved in rounds (each round times every provider on a block of batches), so drift
on a noisy machine hits them alike; the table reports the median and p10-p90 over rounds.

The `-aligned` providers start every row at a document (align="bos", bos_token = GPT-2's end of text,
50256): the written file holds documents of random lengths (see `write_token_file`). Against
`gpuload-<backend>` they price drawing starts among document starts; `-aligned-ring` does it with a
ring of a quarter of the stream (the chunked rule of gpuload/documents.py: a pass table per step; the
native backend gathers from the memory maps, so no ring refill is timed).
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
from gpuload.bench.providers import nanogpt_get_batch
from gpuload.machine import benchmark_result, machine_info, machine_line


BOS = 50256  # GPT-2's <|endoftext|>, which llm.c and nanoGPT put between documents
MEAN_DOC_TOKENS = 700  # web text is of this order; lengths are geometric around it


def aligned_provider(path: str, batch_size: int, seq_len: int, **kwargs):
    """next() of a BOS-aligned loader, after checking three of its batches against the file itself."""
    ld = GPULoader(path, batch_size=batch_size, seq_len=seq_len, seed=0, rank=0, world_size=1, device="cpu",
                   bos_token=BOS, align="bos", **kwargs)
    stream = np.memmap(path, dtype=np.uint16, mode="r")
    for step in range(3):
        starts = ld.window_starts(step).numpy()
        x, y = next(ld)
        want = np.stack([stream[o:o + seq_len + 1] for o in starts]).astype(np.int64)
        if not (np.array_equal(x.numpy(), want[:, :-1]) and np.array_equal(y.numpy(), want[:, 1:])
                and (want[:, 0] == BOS).all()):
            raise SystemExit(f"bench_cpu_gather: the aligned loader {kwargs} read other windows than its starts")
    return ld.__next__


def make_providers(path: str, batch_size: int, seq_len: int) -> dict:
    providers = {"nanogpt": lambda: nanogpt_get_batch(path, batch_size, seq_len)}
    backends = ["torch"] + (["native"] if native.available() else [])
    for backend in backends:
        ld = GPULoader(path, batch_size=batch_size, seq_len=seq_len, sampling="random", seed=0, rank=0,
                       world_size=1, device="cpu", backend=backend)
        providers[f"gpuload-{backend}"] = ld.__next__
        # The same file as three sources: what assigning rows to sources and gathering per source costs.
        mixed = GPULoader({"a": path, "b": path, "c": path}, weights={"a": 0.5, "b": 0.3, "c": 0.2},
                          batch_size=batch_size, seq_len=seq_len, sampling="random", seed=0, rank=0, world_size=1,
                          device="cpu", backend=backend)
        providers[f"gpuload-{backend}-mix3"] = mixed.__next__
    # Rows starting at documents: random on each backend, shuffle, and a ring of a quarter of the stream.
    aligned = {f"gpuload-{backend}-aligned": dict(backend=backend, sampling="random") for backend in backends}
    if native.available():
        aligned["gpuload-native-aligned-shuffle"] = dict(backend="native", sampling="shuffle")
        aligned["gpuload-native-aligned-ring"] = dict(backend="native", sampling="random",
                                                      ring_tokens=os.path.getsize(path) // 2 // 4)
    for name, kwargs in aligned.items():
        try:
            providers[name] = aligned_provider(path, batch_size, seq_len, **kwargs)
        except ValueError as e:  # --data without documents delimited by BOS
            print(f"bench_cpu_gather: skipping {name}: {e}", file=sys.stderr)
    return providers


def time_providers(providers: dict, rounds: int, per_round: int) -> dict:
    """Per-batch wall and process-CPU microseconds for each provider, one sample per round."""
    for fn in providers.values():  # warm-up: page cache, allocator, lazy imports
        for _ in range(per_round):
            fn()
    samples = {name: {"wall": [], "cpu": []} for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for _ in range(per_round):
                x, y = fn()
            wall1, cpu1 = time.perf_counter(), time.process_time()
            assert int(x[0, 1]) == int(y[0, 0])  # touch the batch: nothing is timed on lazy work
            samples[name]["wall"].append((wall1 - wall0) / per_round * 1e6)
            samples[name]["cpu"].append((cpu1 - cpu0) / per_round * 1e6)
    return samples


def quantile(values, q):
    return float(np.quantile(np.asarray(values), q))


def write_token_file(path: str, num_tokens: int) -> None:
    """A headerless uint16 .bin as nanoGPT's prepare.py writes it: documents of random tokens, each
    starting with BOS, of geometric lengths with mean MEAN_DOC_TOKENS."""
    rng = np.random.default_rng(0)
    chunk = 1 << 24
    with open(path, "wb") as f:
        for start in range(0, num_tokens, chunk):
            tokens = rng.integers(0, BOS, size=min(chunk, num_tokens - start), dtype=np.uint16)
            tokens[rng.random(tokens.size) < 1 / MEAN_DOC_TOKENS] = BOS
            if start == 0:
                tokens[0] = BOS
            tokens.tofile(f)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000_000, help="tokens in the benchmark file")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--per-round", type=int, default=20, help="batches timed per provider per round")
    parser.add_argument("--data", help="existing uint16 .bin file to use instead of writing one")
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke mode: 1M tokens, few rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.rounds, args.per_round = 1_000_000, 3, 3

    with tempfile.TemporaryDirectory() as tmp:
        path = args.data or os.path.join(tmp, "train.bin")
        if not args.data:
            write_token_file(path, args.tokens)
        num_tokens = os.path.getsize(path) // 2
        providers = make_providers(path, args.batch_size, args.seq_len)
        samples = time_providers(providers, args.rounds, args.per_round)

    tokens_per_batch = args.batch_size * args.seq_len
    base = statistics.median(samples["nanogpt"]["wall"])
    rows = []
    for name, s in samples.items():
        median = statistics.median(s["wall"])
        rows.append({
            "provider": name, "device": "cpu", "batch_size": args.batch_size, "seq_len": args.seq_len,
            "median_us": median, "p10_us": quantile(s["wall"], 0.1), "p90_us": quantile(s["wall"], 0.9),
            "cpu_us": statistics.median(s["cpu"]), "tokens_per_s": tokens_per_batch / median * 1e6,
            "speedup_vs_nanogpt": base / median,
        })
    machine = machine_info()
    print(f"{num_tokens:,} tokens, B={args.batch_size}, T={args.seq_len}, {args.rounds} rounds x {args.per_round} batches")
    print(f"{'provider':<30} {'median us':>10} {'p10-p90 us':>16} {'cpu us':>9} {'Mtok/s':>8} {'vs nanogpt':>11}")
    for r in rows:
        print(f"{r['provider']:<30} {r['median_us']:>10.1f} {r['p10_us']:>7.1f}-{r['p90_us']:<8.1f} {r['cpu_us']:>9.1f} "
              f"{r['tokens_per_s'] / 1e6:>8.1f} {r['speedup_vs_nanogpt']:>10.1f}x")
    print(machine_line(machine))
    return benchmark_result(
        "cpu_gather", argv, args.json, num_tokens=num_tokens, rounds=args.rounds, per_round=args.per_round,
        machine=machine, rows=rows)


if __name__ == "__main__":
    main()
