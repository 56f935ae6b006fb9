"""The `gpuload` command: bench, prepare, inspect and demo."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import traceback
import warnings
from typing import Optional, Sequence

# OS errors about a path the user gave; the project's own error types are added in _user_errors().
OS_USER_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "0": "\0", "\\": "\\"}


def count(text: str) -> int:
    """Parse a token count: 1000, 100M, 2.5k, 1G, 1e8."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGbB]?)\s*", text)
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
    try:
        value = float(match.group(1)) * scale[match.group(2).lower()]
        whole = int(value)
    except (AttributeError, ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected a count such as 1000, 100M or 2.5k, found {text!r}") from None
    if value != whole:
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, found {text!r}")
    return whole


def nbytes(text: str) -> int:
    """Parse a size in bytes: 1000, 64K, 256M, 1.5G (powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    try:
        return int(float(match.group(1)) * scale[match.group(2).lower()])
    except (AttributeError, ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected a size such as 1000, 64K, 256M or 1G, found {text!r}") from None


def positive(text: str) -> int:
    """Parse a whole number >= 1 (the demo passes these straight to GPULoader)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, found {text!r}")
    return value


def positive_list(text: str) -> list[int]:
    """Parse one or more whole numbers >= 1: 8 or 8,32 (a repeated option adds more)."""
    return [positive(part) for part in text.split(",")]


def name_list(text: str) -> list[str]:
    """Parse a comma-separated list of names: nanogpt,gpuload-cpu-native."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected one or more comma-separated names, found {text!r}")
    return names


def _flatten(lists):
    """[[8, 32], [8, 64]] -> [8, 32, 64]: repeated options and comma lists, first occurrence kept; None stays None."""
    return None if lists is None else list(dict.fromkeys(v for values in lists for v in values))


def _user_errors() -> tuple:
    """Errors that are the user's to fix: shown as one line, no traceback (GPULOAD_DEBUG=1 shows it).

    Only the project's own types: a ValueError from a bug must not pass as bad input. The modules are
    those the commands import anyway, so importing them here costs nothing on the error path.
    """
    from gpuload.bench import BenchError
    from gpuload.encodings import EncodingError
    from gpuload.prepare import PrepareError
    from gpuload.shards import ShardError
    return (BenchError, PrepareError, EncodingError, ShardError) + OS_USER_ERRORS


def unescape(text: str) -> str:
    r"""Turn the backslash escapes a shell passes through (\n \r \t \0 \\) into characters."""
    return re.sub(r"\\(.)", lambda m: ESCAPES.get(m.group(1), m.group(0)), text)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr, like the CLI's own, without the file and source line Python adds."""
    print(f"gpuload: warning: {str(message).removeprefix('gpuload: ')}", file=sys.stderr)


def _prepare(args) -> int:
    from gpuload.prepare import prepare

    def terminate(signum, frame):
        raise SystemExit(128 + signum)  # unwinds through prepare's cleanup, unlike the default SIGTERM

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if in_main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line  # prepare warns as a library does; the CLI speaks in one line
            manifest = prepare(
                args.inputs, args.out, encoding=args.encoding, field=args.field,
                doc_sep=unescape(args.doc_sep) if args.doc_sep is not None else None, strip=args.strip,
                bos=args.bos, shard_tokens=args.shard_tokens, val_tokens=args.val_tokens, workers=args.workers,
                overwrite=args.overwrite, skip_bad=args.skip_bad, quiet=args.quiet,
                **({"max_doc_bytes": args.max_doc_bytes} if args.max_doc_bytes is not None else {}))
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    skipped = manifest["skipped"]
    if skipped["count"]:
        first = skipped["examples"][0]
        print(f"gpuload: warning: skipped {skipped['count']:,} bad records (listed in {args.out}/manifest.json); "
              f"first: {first['where']}: {first['reason']}", file=sys.stderr)
    if not args.quiet:
        splits = {}
        for shard in manifest["shards"]:
            done = splits.setdefault(shard["split"], [0, 0])
            done[0] += 1
            done[1] += shard["tokens"]
        parts = ", ".join(f"{n} {split} ({tokens:,} tokens)" for split, (n, tokens) in splits.items())
        where = "after" if manifest["delimiter"]["placement"] == "eos" else "before"
        shards = len(manifest["shards"])
        print(f"wrote {shards} shard{'s' * (shards != 1)} to {args.out}: {parts}; {manifest['documents']:,} documents, "
              f"{manifest['token_dtype']}, encoding {manifest['encoding_name']} "
              f"(vocabulary {manifest['vocab_size']:,}), "
              f"delimiter {manifest['delimiter']['token']} {where} each document")
    return 0


def _inspect(args) -> int:
    from gpuload.inspect_shards import format_report, inspect

    reports = inspect(args.paths, encoding=args.encoding, num_tokens=args.tokens)
    if args.json:
        print(json.dumps(reports, indent=1))
    else:
        print("\n\n".join(format_report(r) for r in reports))
    return 0


def _bench(args) -> int:
    if args.audit:
        from gpuload.bench.audit import run_audit

        return run_audit(cache_dir=args.cache_dir, device=args.device, providers=_flatten(args.providers),
                         json_path=args.json, argv=args.argv)["status"]
    from gpuload.bench.runner import run_bench

    run_bench(data=args.data, cache_dir=args.cache_dir, batch_sizes=_flatten(args.batch_size),
              seq_lens=_flatten(args.seq_len), steps=args.steps, device=args.device,
              providers=_flatten(args.providers), quick=args.quick, json_path=args.json, plot_path=args.plot,
              argv=args.argv, rounds=args.rounds)
    return 0


def _demo(args) -> int:
    from gpuload.demo import run_demo

    run_demo(directory=args.dir, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
             sampling=args.sampling, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpuload", description="Token shards in, (B, T) GPU batches out.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    p = commands.add_parser(
        "bench", help="time gpuload against nanoGPT's get_batch, a torch DataLoader, nanochat's loader and the "
                      "peer libraries (litdata, mosaicml-streaming, torchdata, Grain, HF datasets)",
        description="Time every loader on the same shards and batch shapes and print one table: how it reads, "
                    "its conversion seconds, median and p10-p90 microseconds per batch, tokens/s, host CPU time "
                    "per batch, time to the first batch, peak RSS/PSS, speedup vs nanoGPT's get_batch. Without "
                    "--data, a synthetic demo dataset (400 MB of llm.c shards) is written to the cache directory "
                    "on first use and reused afterwards. --audit checks resume, determinism and elastic resume "
                    "instead.")
    p.add_argument("--data", metavar="GLOB", help="your shards: a file, directory or quoted glob (default: the demo dataset)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where the demo dataset is kept (default: $XDG_CACHE_HOME/gpuload, else ~/.cache/gpuload)")
    p.add_argument("--batch-size", type=positive_list, action="append", metavar="B[,B...]",
                   help="batch sizes; repeat or separate with commas (default: 16,64; --quick: 4,16)")
    p.add_argument("--seq-len", type=positive_list, action="append", metavar="T[,T...]",
                   help="sequence lengths; every batch size runs with every length (default: 1024; --quick: 256)")
    p.add_argument("--steps", type=positive, default=None, metavar="N",
                   help="timed batches per loader and shape (default: 200; --quick: 20)")
    p.add_argument("--rounds", type=positive, default=None, metavar="N",
                   help="interleaved rounds the timed batches are split into (default: 10; --quick: 2)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--providers", type=name_list, action="append", metavar="NAME[,NAME...]",
                   help="run only these loaders: nanogpt, torch-dataloader, torchdata, litdata, mosaic-streaming, "
                        "grain, hf-datasets, nanochat-seq, gpuload-cuda-triton-ring, gpuload-cuda-triton-zerocopy, "
                        "gpuload-cpu-native, gpuload-cpu-torch (default: all that can run here; with --quick, "
                        "without the peers)")
    p.add_argument("--quick", action="store_true",
                   help="small demo dataset, small shapes, few steps: seconds, for a smoke test")
    p.add_argument("--audit", action="store_true",
                   help="instead of timing: exact resume mid-epoch, determinism and elastic resume (2 -> 4 ranks) "
                        "of each loader, on the small demo dataset; a yes/no table with the reason for each no")
    p.add_argument("--json", metavar="PATH", help="write every number (and every batch time) to this JSON file")
    p.add_argument("--plot", metavar="PATH", help="write a PNG chart of tokens/s per loader and shape (needs matplotlib)")
    p.set_defaults(handler=_bench)

    p = commands.add_parser(
        "prepare", help="tokenize .txt, .jsonl and .parquet documents into llm.c shards",
        description="Tokenize documents with a tiktoken encoding into llm.c shards (train_NNNNNN.bin, "
                    "val_NNNNNN.bin) and a manifest.json in --out.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt, .jsonl, .parquet files, directories or globs")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if absent)")
    p.add_argument("--encoding", default="gpt2", metavar="NAME",
                   help="tiktoken name (gpt2, r50k_base, p50k_base, cl100k_base, o200k_base), 'bytes', "
                        "or PATH.tiktoken (default: gpt2)")
    p.add_argument("--field", default="text", help="JSONL field / Parquet column holding the text (default: text)")
    p.add_argument("--doc-sep", metavar="SEP",
                   help=r"split .txt files into documents on SEP (escapes \n \r \t \0 \\ understood); "
                        "default: each .txt file is one document")
    p.add_argument("--strip", action="store_true", help="strip leading and trailing whitespace from each document")
    p.add_argument("--bos", action="store_true",
                   help="put the delimiter before each document (nanochat) instead of after it (nanoGPT, llm.c)")
    p.add_argument("--shard-tokens", type=count, default=100_000_000, metavar="N",
                   help="tokens per shard, e.g. 100M (default: 100M)")
    p.add_argument("--val-tokens", type=count, default=0, metavar="N",
                   help="tokens from the start of the stream written to val_* shards (default: 0)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="worker processes (default: all cores)")
    p.add_argument("--max-doc-bytes", type=nbytes, default=None, metavar="SIZE",
                   help="largest .txt file read as one document without --doc-sep; a worker needs several "
                        "times its size in memory (default: 256M)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards already in --out (removed only after the new run succeeds)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad records and unreadable files, count them, instead of stopping at the first")
    p.add_argument("--quiet", action="store_true", help="no progress line and no summary")
    p.set_defaults(handler=_prepare)

    p = commands.add_parser(
        "inspect", help="describe token shards: format, counts, token range, delimiters, first tokens",
        description="Describe token shards. A directory or glob gives one line per shard and totals.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="shard file, directory or glob")
    p.add_argument("--encoding", default=None, metavar="NAME",
                   help="encoding to decode with and whose end-of-text token is counted "
                        "(default: the one in manifest.json)")
    p.add_argument("--tokens", type=count, default=16, metavar="N", help="first tokens to show (default: 16)")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.set_defaults(handler=_inspect)

    p = commands.add_parser("demo", help="write synthetic shards and print a few batches from GPULoader")
    p.add_argument("--dir", default=None, help="where to write the demo shards (default: a temporary directory)")
    p.add_argument("--batch-size", type=positive, default=4)
    p.add_argument("--seq-len", type=positive, default=16)
    p.add_argument("--steps", type=positive, default=3)
    p.add_argument("--sampling", choices=("random", "shuffle", "sequential"), default="random")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit status (2 for errors the user can fix)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and on bad arguments; callers get a status instead
        return e.code if isinstance(e.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in benchmark results as the command
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("gpuload: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gpuload inspect DIR | head`: stop quietly, and keep Python's exit flush quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        if os.environ.get("GPULOAD_DEBUG"):
            raise
        if isinstance(e, _user_errors()):
            print(f"gpuload: error: {e}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print("gpuload: internal error: please report it, with the command and the traceback above",
              file=sys.stderr)
        return 1
