"""`gpuload prepare` throughput against tiktoken's own encode_ordinary_batch, same text and cores, one run.

    python benchmarks/bench_prepare.py --workers 2            # 32 MB of text, jsonl/parquet/txt inputs
    python benchmarks/bench_prepare.py --quick --workers 1    # smoke mode (seconds), used by the tests

Offline by design: the text is synthetic (Zipf-distributed words, some non-ASCII, documents of
log-normal length) and the default encoding is a ~50k-token ranks file built from it in-process, so
BPE does real merging work; `--encoding bytes` or a cached tiktoken name work too. tiktoken's number
is pure encoding of strings already in memory; gpuload's includes everything `gpuload prepare`
does: spawning workers, reading and parsing the input file, encoding, writing shards and manifest.
Providers run interleaved in rounds, so drift on a noisy machine hits them alike.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import tempfile
import time

import numpy as np
import pyarrow
import pyarrow.parquet as pq
import tiktoken

from gpuload.encodings import get_encoding
from gpuload.machine import benchmark_result, machine_info, machine_line
from gpuload.prepare import default_workers, prepare
from gpuload.shards import open_shard

SYLLABLES = ["ka", "to", "ri", "an", "el", "mo", "su", "the", "ing", "er", "on", "pre", "st", "ou", "ly", "ch",
             "é", "ü", "ß", "qu", "x", "ion", "a", "e", "i", "o", "u"]
DOC_SEP = "<|endoftext|>"  # as in TinyStories' .txt files
FORMATS = ("jsonl", "parquet", "txt")


def synthetic_corpus(nbytes: int, seed: int = 0, vocabulary: int = 20_000):
    """Documents totalling about `nbytes` of UTF-8, and the word list with its Zipf probabilities."""
    rng = np.random.default_rng(seed)
    words = np.array(["".join(rng.choice(SYLLABLES, n)) for n in rng.integers(1, 5, vocabulary)], dtype=object)
    p = 1.0 / np.arange(1, vocabulary + 1) ** 1.1
    p /= p.sum()
    glue = np.array([" ", " ", " ", ", ", ". ", ".\n\n"], dtype=object)
    docs, total = [], 0
    while total < nbytes:
        n = int(rng.lognormal(6.0, 1.0)) + 5
        tokens = words[rng.choice(vocabulary, n, p=p)]
        gaps = glue[np.minimum(rng.geometric(0.75, n) - 1, len(glue) - 1)]
        parts = np.empty(2 * n, dtype=object)
        parts[0::2], parts[1::2] = tokens, gaps
        if rng.random() < 0.3:
            parts[1] = f" {int(rng.integers(0, 10**6))} "
        doc = "".join(parts).strip()
        docs.append(doc)
        total += len(doc.encode("utf-8"))
    return docs, list(words), p


def synthetic_ranks(words, p, target: int = 50_000) -> dict:
    """256 bytes, then every prefix of the most frequent words (with and without a leading space)."""
    ranks = {bytes([i]): i for i in range(256)}
    for i in np.argsort(-p):
        for form in (" " + words[i], words[i]):
            b = form.encode("utf-8")
            for n in range(2, len(b) + 1):
                if b[:n] not in ranks:
                    ranks[b[:n]] = len(ranks)
                    if len(ranks) >= target:
                        return ranks
    return ranks


def write_ranks(ranks: dict, path: str) -> None:
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


def write_inputs(docs, directory: str) -> dict:
    """The same documents as .jsonl, .parquet (1024 rows per row group) and one .txt split by DOC_SEP."""
    paths = {fmt: os.path.join(directory, f"corpus.{fmt}") for fmt in FORMATS}
    with open(paths["jsonl"], "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"id": len(doc), "text": doc}) + "\n")
    pq.write_table(pyarrow.table({"text": docs}), paths["parquet"], row_group_size=1024)
    with open(paths["txt"], "w", encoding="utf-8") as f:
        f.write(DOC_SEP.join(docs))
    return paths


def read_stream(directory: str) -> np.ndarray:
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    return np.concatenate([open_shard(os.path.join(directory, s["file"])).memmap() for s in manifest["shards"]])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=32, help="megabytes of text (default: 32)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="gpuload workers = tiktoken threads (default: all cores)")
    parser.add_argument("--encoding", default="synthetic",
                        help="'synthetic' (a ~50k ranks file built from the text), 'bytes', a name or PATH.tiktoken")
    parser.add_argument("--formats", default=",".join(FORMATS), help="inputs to time (default: jsonl,parquet,txt)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke mode: 0.2 MB, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.mb, args.rounds = 0.2, 1
    formats = [f for f in args.formats.split(",") if f]

    with tempfile.TemporaryDirectory() as tmp:
        docs, words, p = synthetic_corpus(int(args.mb * 1e6))
        spec = args.encoding
        if spec == "synthetic":
            spec = os.path.join(tmp, "synthetic.tiktoken")
            write_ranks(synthetic_ranks(words, p), spec)
        enc = get_encoding(spec)
        text_bytes = sum(len(d.encode("utf-8")) for d in docs)
        paths = write_inputs(docs, tmp)

        expected = None
        samples = {"tiktoken": []} | {f"gpuload-{fmt}": [] for fmt in formats}
        num_tokens = 0
        for _ in range(args.rounds):
            start = time.perf_counter()
            encoded = enc.encode_ordinary_batch(docs, num_threads=args.workers)
            samples["tiktoken"].append(time.perf_counter() - start)
            if expected is None:
                num_tokens = sum(len(t) for t in encoded)
                eot = enc.eot_token
                expected = np.concatenate([np.append(np.asarray(t, dtype=np.int64), eot) for t in encoded])
            del encoded
            for fmt in formats:
                out = os.path.join(tmp, f"out-{fmt}")
                start = time.perf_counter()
                prepare([paths[fmt]], out, encoding=spec, workers=args.workers, overwrite=True, quiet=True,
                        doc_sep=DOC_SEP if fmt == "txt" else None)
                samples[f"gpuload-{fmt}"].append(time.perf_counter() - start)
                got = read_stream(out)
                if not np.array_equal(got, expected):
                    raise SystemExit(f"gpuload-{fmt}: tokens differ from tiktoken's encode_ordinary_batch")

    base = statistics.median(samples["tiktoken"])
    rows = []
    for name, times in samples.items():
        median = statistics.median(times)
        rows.append({"provider": name, "median_s": median, "min_s": min(times), "max_s": max(times),
                     "mb_per_s": text_bytes / median / 1e6, "tokens_per_s": num_tokens / median,
                     "ratio_vs_tiktoken": base / median})
    machine = {**machine_info(), "tiktoken": tiktoken.__version__, "pyarrow": pyarrow.__version__}
    print(f"{text_bytes / 1e6:.1f} MB of text, {len(docs):,} documents, {num_tokens:,} tokens, encoding "
          f"{enc.name} (vocabulary {enc.n_vocab:,}), {args.workers} workers/threads, {args.rounds} rounds")
    print(f"{'provider':<16} {'MB/s':>8} {'min-max s':>14} {'Mtok/s':>8} {'vs tiktoken':>12}")
    for r in rows:
        print(f"{r['provider']:<16} {r['mb_per_s']:>8.2f} {r['min_s']:>6.2f}-{r['max_s']:<7.2f} "
              f"{r['tokens_per_s'] / 1e6:>8.2f} {r['ratio_vs_tiktoken']:>11.2f}x")
    print(f"{machine_line(machine)}, tiktoken {machine['tiktoken']}, pyarrow {machine['pyarrow']}")
    return benchmark_result(
        "prepare", argv, args.json, text_bytes=text_bytes, documents=len(docs), tokens=num_tokens,
        encoding=enc.name, vocab_size=enc.n_vocab, workers=args.workers, rounds=args.rounds, machine=machine,
        rows=rows)


if __name__ == "__main__":  # guarded: prepare's spawned workers re-import this script
    main()
