"""Packing whole documents into rows: gpuload's best-fit rule (gpuload/packing.py) against nanochat's
BestFit-Crop and plain concatenation, on the same documents, one epoch each.

    python benchmarks/bench_packing.py              # 200k documents, T=1024 and 2048, two length mixes
    python benchmarks/bench_packing.py --quick      # smoke mode (seconds), used by the tests

Documents (lengths include their BOS): "geometric", lengths geometric with mean 700 (the bench demo's), and
"heavy", a lognormal body around 300 tokens with 5% of documents longer than T (T+2 .. 8T). Columns:
cropped = document tokens no row of the epoch holds; floor = the tokens beyond the first T+1 of every
longer document, which no row-packer can place whole; BOS rows = rows that start at a document's BOS;
pieces = document pieces per row; plan us/row = host time to plan a row (plain Python for all three).
Then the loader's next() with pack="bestfit" against align="bos" on the native backend, same documents.

Expected before measuring (written with the rule): gpuload's groups are dealt once and drained whole, so
long documents are cropped once at T+1 and short ones fill the gaps: cropped close to the floor, below
nanochat's streaming buffer, which keeps refilling with long documents that rarely fit; with
remainder=True nothing is cropped (only each group's last partial row is dropped).
"""

from __future__ import annotations

import argparse
import bisect
import os
import sys
import tempfile
import time

import numpy as np

from gpuload import GPULoader, native
from gpuload.machine import benchmark_result, machine_info, machine_line
from gpuload.packing import BestFitPacking, packing_stats
from gpuload.shards import write_shard

BOS = 50256  # GPT-2's end of text


def document_lengths(kind: str, count: int, seq_len: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "geometric":
        return rng.geometric(1 / 700, count) + 1
    lengths = rng.lognormal(np.log(300), 1.0, count).astype(np.int64) + 2
    long = rng.random(count) < 0.05
    lengths[long] = rng.integers(seq_len + 2, 8 * seq_len, int(long.sum()))
    return lengths


def nanochat_bestfit(lengths: np.ndarray, seq_len: int, buffer_size: int = 1000) -> dict:
    """nanochat's tokenizing_distributed_data_loader_bos_bestfit, on lengths: before each placement the buffer
    is refilled to `buffer_size` documents in stream order; the largest document that fits the space left is
    placed whole, else the shortest is cropped to fill the row (its tail dropped). Until the documents run out."""
    capacity = seq_len + 1
    stream = iter(lengths.tolist())
    buffer: list[int] = []  # sorted lengths
    rows = placed = pieces = 0
    exhausted = False
    while True:
        space, row_pieces, row_placed = capacity, 0, 0
        while space:
            while len(buffer) < buffer_size and not exhausted:
                try:
                    bisect.insort(buffer, next(stream))
                except StopIteration:
                    exhausted = True
            if not buffer:
                return {"rows": rows, "placed": placed, "pieces_per_row": pieces / max(rows, 1), "bos_rows": 1.0}
            at = bisect.bisect_right(buffer, space) - 1
            length = buffer.pop(at if at >= 0 else 0)
            take = length if at >= 0 else space
            space -= take
            row_pieces += 1
            row_placed += take
        rows, placed, pieces = rows + 1, placed + row_placed, pieces + row_pieces


def concatenation(lengths: np.ndarray, seq_len: int) -> dict:
    """The stream cut into consecutive windows (gpuload's sequential rule): nothing cropped, rows start anywhere."""
    total = int(lengths.sum())
    rows = (total - 1) // seq_len
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    bos_rows = np.isin(np.arange(rows) * seq_len, starts).mean()
    # A row of T+1 tokens from o holds the documents whose spans meet [o, o+T].
    first = np.searchsorted(starts, np.arange(rows) * seq_len, side="right") - 1
    last = np.searchsorted(starts, np.arange(rows) * seq_len + seq_len, side="right") - 1
    return {"rows": rows, "placed": rows * seq_len + 1, "pieces_per_row": float((last - first + 1).mean()),
            "bos_rows": float(bos_rows)}


def gpuload_bestfit(lengths: np.ndarray, seq_len: int, remainder: bool) -> dict:
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    packing = BestFitPacking(starts, int(lengths.sum()), seq_len, seed=0, remainder=remainder)
    stats = packing_stats(packing)
    return {"rows": stats["rows"], "placed": stats["placed"], "pieces_per_row": stats["pieces_per_row"],
            "bos_rows": 1.0}


PROVIDERS = {
    "gpuload-bestfit": lambda lengths, T: gpuload_bestfit(lengths, T, remainder=False),
    "gpuload-bestfit-remainder": lambda lengths, T: gpuload_bestfit(lengths, T, remainder=True),
    "nanochat-bestfit-crop": nanochat_bestfit,
    "concatenation": concatenation,
}


def loader_costs(lengths: np.ndarray, seq_len: int, batch_size: int, steps: int, directory: str) -> list[dict]:
    """Host time of next() on the native backend: pack='bestfit' (with and without the remainder) against
    align='bos' (rows that start at documents and run on), on a shard of these documents."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 50257, int(lengths.sum())).astype(np.uint16)
    tokens[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = BOS
    path = os.path.join(directory, "train.bin")
    write_shard(path, tokens)
    backend = "native" if native.available() else "torch"
    common = dict(batch_size=batch_size, seq_len=seq_len, bos_token=BOS, device="cpu", rank=0, world_size=1,
                  backend=backend)
    loaders = {"align-bos": GPULoader(path, sampling="random", align="bos", **common),
               "pack-bestfit": GPULoader(path, sampling="shuffle", pack="bestfit", **common),
               "pack-bestfit-remainder": GPULoader(path, sampling="shuffle", pack="bestfit", pack_remainder=True,
                                                   **common)}
    samples = {name: [] for name in loaders}
    for _ in range(5):  # interleaved rounds
        for name, ld in loaders.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                x, y = next(ld)
            samples[name].append((time.perf_counter() - t0) / steps * 1e6)
            assert int(x[0, 0]) == BOS
    base = float(np.median(samples["align-bos"]))
    return [{"provider": f"loader-{name}", "backend": backend, "seq_len": seq_len, "batch_size": batch_size,
             "median_us": float(np.median(s)), "vs_align_bos": float(np.median(s)) / base}
            for name, s in samples.items()]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=200_000)
    parser.add_argument("--seq-len", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke mode: 5k documents, T=256")
    args = parser.parse_args(argv)
    if args.quick:
        args.documents, args.seq_len = 5_000, [256]
    rows = []
    for kind in ("geometric", "heavy"):
        for T in args.seq_len:
            lengths = document_lengths(kind, args.documents, T)
            total = int(lengths.sum())
            floor = float(np.maximum(lengths - (T + 1), 0).sum() / total)
            for name, run in PROVIDERS.items():
                t0 = time.perf_counter()
                result = run(lengths, T)
                seconds = time.perf_counter() - t0
                cropped = 0.0 if name == "concatenation" else 1 - result["placed"] / total
                rows.append({"provider": name, "lengths": kind, "seq_len": T, "documents": args.documents,
                             "document_tokens": total, "rows": result["rows"], "cropped_fraction": cropped,
                             "floor": floor, "bos_rows": result["bos_rows"],
                             "pieces_per_row": result["pieces_per_row"],
                             "plan_us_per_row": seconds / max(result["rows"], 1) * 1e6})
    with tempfile.TemporaryDirectory() as tmp:
        costs = loader_costs(document_lengths("geometric", args.documents // 4, 1024), args.seq_len[0],
                             8 if args.quick else 32, 5 if args.quick else 50, tmp)
    machine = machine_info()
    print(f"{args.documents:,} documents per mix; one epoch each; utilization is 100% for all (no padding)")
    print(f"{'provider':<27} {'lengths':<9} {'T':>5} {'rows':>9} {'cropped':>8} {'floor':>6} {'BOS rows':>9} "
          f"{'pieces':>7} {'plan us/row':>12}")
    for r in rows:
        print(f"{r['provider']:<27} {r['lengths']:<9} {r['seq_len']:>5} {r['rows']:>9} {r['cropped_fraction']:>8.3f} "
              f"{r['floor']:>6.3f} {r['bos_rows']:>9.3f} {r['pieces_per_row']:>7.2f} {r['plan_us_per_row']:>12.1f}")
    print(f"next() on the {costs[0]['backend']} backend, B={costs[0]['batch_size']}, T={costs[0]['seq_len']}:")
    for r in costs:
        print(f"  {r['provider']:<30} {r['median_us']:>10.1f} us  x{r['vs_align_bos']:.2f} of align='bos'")
    print(machine_line(machine))
    return benchmark_result("packing", argv, args.json, documents=args.documents, machine=machine, rows=rows,
                            loader_rows=costs)


if __name__ == "__main__":
    sys.exit(main() and 0)
