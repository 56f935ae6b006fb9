"""Gather kernel alone on the GPU: gpuload's Triton gather vs plain torch vs a device-to-device copy.

    python benchmarks/bench_kernels.py                    # B*T = 32K .. 16M tokens, T=1024, 1 GiB uint16 stream
    python benchmarks/bench_kernels.py --json out.json
    python benchmarks/bench_kernels.py --quick            # smoke mode: tiny shapes (interpreter on a CPU machine)

Each shape is checked against the plain-torch reference (window_starts + gather_reference) before it
is timed. Bandwidth counts the bytes each provider must move: the gather reads T+1 tokens per row and
writes x and y (8 B + 8 B per token with int64 x); the copy floor is `copy_` of a tensor the size of
x + y, which reads and writes those bytes (16 B + 16 B per token). "of copy" = gather GB/s / copy GB/s.
`triton-random-mix3` is the batch of a three-source mixture (0.5/0.3/0.2): three launches, each ranking
all B row hashes and writing its own rows; against `triton-random` it prices the mixture.
`triton-aligned-random` / `-shuffle` start every row at a document (align="bos"): the kernel draws an
index into the device-resident usable document starts and loads the start; against `triton-random` /
`triton-shuffle` they price alignment. The stream holds documents of geometric lengths (mean 700
tokens, or 1/64 of a --quick stream) starting with BOS = 50256.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from gpuload.documents import document_starts, usable_document_starts
from gpuload.machine import benchmark_result, machine_info, machine_line
from gpuload.mixture import mixture_counts

SAMPLINGS = ("random", "sequential", "shuffle")
ALIGNED_SAMPLINGS = ("random", "shuffle")
BOS = 50256  # GPT-2's <|endoftext|>


def load_kernel(quick: bool):
    """Import the Triton gather, choosing the interpreter for --quick on a machine without CUDA."""
    if quick and not torch.cuda.is_available():
        # Only effective if the kernel module is not imported yet (the jit decorator reads it).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from gpuload.kernels import triton_gather
    return triton_gather


def pick_device(triton_gather) -> str:
    if torch.cuda.is_available():
        return "cuda"
    if triton_gather.interpreter_active():
        return "cpu"
    sys.exit("bench_kernels: no CUDA device. This benchmark times GPU kernels; run it on a GPU machine, or use "
             "--quick for a smoke run of the kernel in Triton's CPU interpreter.")


def time_ms(fn, device: str) -> tuple[float, float, float]:
    """(median, p10, p90) milliseconds per call."""
    if device == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.1, 0.9]))
    fn()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return samples[1], samples[0], samples[-1]


def torch_gather(tokens, sampling, seed, step, batch, num_tokens, seq_len, input_dtype):
    """Plain torch on the device: window_starts, then one advanced-indexing gather of all T+1 columns.

    Indexes an int16 view and masks back to 16 bits: CUDA indexing kernels do not cover torch.uint16.
    """
    from gpuload.sampling import window_starts

    rows = torch.arange(batch, device=tokens.device)
    starts = window_starts(sampling, seed, step, rows, batch, num_tokens, seq_len)
    positions = starts[:, None] + torch.arange(seq_len + 1, device=tokens.device)
    window = tokens.view(torch.int16)[positions].to(torch.int64) & 0xFFFF
    return window[:, :-1].to(input_dtype), window[:, 1:].contiguous()


def reference_batch(cpu_tokens, sampling, seed, step, batch, seq_len, input_dtype, counts=None, doc_starts=None):
    """gpuload's reference on the CPU: what every provider must produce (`counts`: a mixture whose
    sources all read `cpu_tokens`; `doc_starts`: align='bos' among these usable document starts)."""
    from gpuload.documents import aligned_window_starts
    from gpuload.kernels.gather import gather_reference
    from gpuload.mixture import mixture_rows
    from gpuload.sampling import window_starts

    num_tokens = cpu_tokens.numel()
    if doc_starts is not None:
        starts = aligned_window_starts(sampling, seed, step, torch.arange(batch), batch, doc_starts, num_tokens)
    elif counts is None:
        starts = window_starts(sampling, seed, step, torch.arange(batch), batch, num_tokens, seq_len)
    else:
        source, index = mixture_rows(seed, step, counts)
        starts = torch.empty(batch, dtype=torch.int64)
        for k, c in enumerate(counts):
            starts[source == k] = window_starts(sampling, seed, step, index[source == k], c, num_tokens, seq_len)
    return gather_reference([cpu_tokens], torch.tensor([0, num_tokens]), starts, seq_len, input_dtype)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream-tokens", type=int, default=1 << 29, help="uint16 tokens in the device stream")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256, 2048, 16384],
                        help="rows per batch (B*T = 32K .. 16M tokens at T=1024)")
    parser.add_argument("--x-dtype", choices=["int64", "int32"], default="int64")
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny shapes")
    args = parser.parse_args(argv)
    if args.quick:
        args.stream_tokens, args.seq_len, args.batch_sizes = 4096, 33, [1, 4]

    triton_gather = load_kernel(args.quick)
    device = pick_device(triton_gather)
    input_dtype = getattr(torch, args.x_dtype)
    x_bytes = input_dtype.itemsize
    gen = torch.Generator().manual_seed(0)
    cpu_tokens = torch.randint(0, BOS, (args.stream_tokens,), generator=gen, dtype=torch.int32)
    mean_doc = min(700, args.stream_tokens // 64)
    cpu_tokens[torch.rand(args.stream_tokens, generator=gen) < 1 / mean_doc] = BOS
    cpu_tokens[0] = BOS
    cpu_tokens = cpu_tokens.to(torch.uint16)
    tokens = cpu_tokens.to(device)
    num_tokens, seq_len, seed, step = tokens.numel(), args.seq_len, 1234, 7
    doc_starts = usable_document_starts(document_starts(tokens, BOS), num_tokens, seq_len)
    cpu_doc_starts = doc_starts.cpu()

    rows = []
    for batch in args.batch_sizes:
        x = torch.empty(batch, seq_len, dtype=input_dtype, device=device)
        y = torch.empty(batch, seq_len, dtype=torch.int64, device=device)
        copy_src = torch.empty(batch * seq_len * (x_bytes + 8), dtype=torch.uint8, device=device)
        copy_dst = torch.empty_like(copy_src)
        for sampling in SAMPLINGS:
            triton_gather.gather_batch_triton(tokens, sampling, seed, step, 0, batch, batch, num_tokens, seq_len,
                                              out_x=x, out_y=y, input_dtype=input_dtype)
            want_x, want_y = reference_batch(cpu_tokens, sampling, seed, step, batch, seq_len, input_dtype)
            got = torch_gather(tokens, sampling, seed, step, batch, num_tokens, seq_len, input_dtype)
            for name, (gx, gy) in (("triton", (x, y)), ("torch", got)):
                if not (torch.equal(gx.cpu(), want_x) and torch.equal(gy.cpu(), want_y)):
                    sys.exit(f"bench_kernels: {name}-{sampling} differs from the reference at B={batch}, T={seq_len}")
            del want_x, want_y, got

        gather_bytes = batch * ((seq_len + 1) * tokens.element_size() + seq_len * (x_bytes + 8))
        providers = {"copy": (lambda: copy_dst.copy_(copy_src), 2 * copy_src.numel())}
        for sampling in SAMPLINGS:
            providers[f"triton-{sampling}"] = (
                lambda s=sampling: triton_gather.gather_batch_triton(tokens, s, seed, step, 0, batch, batch,
                                                                     num_tokens, seq_len, out_x=x, out_y=y,
                                                                     input_dtype=input_dtype),
                gather_bytes)
        # A three-source mixture (one launch per source, each ranking all B row hashes and writing its rows).
        counts = mixture_counts([0.5, 0.3, 0.2], batch) if batch >= 3 else None
        if counts is not None and min(counts) > 0:
            def mixture(counts=counts):
                for k in range(len(counts)):
                    triton_gather.gather_batch_triton(tokens, "random", seed, step, 0, batch, counts[k], num_tokens,
                                                      seq_len, out_x=x, out_y=y, input_dtype=input_dtype,
                                                      mixture=(counts, k))
            providers["triton-random-mix3"] = (mixture, gather_bytes)
            mixture()
            want_x, want_y = reference_batch(cpu_tokens, "random", seed, step, batch, seq_len, input_dtype, counts)
            if not (torch.equal(x.cpu(), want_x) and torch.equal(y.cpu(), want_y)):
                sys.exit(f"bench_kernels: triton-random-mix3 differs from the reference at B={batch}, T={seq_len}")
        for sampling in ALIGNED_SAMPLINGS:
            def aligned(s=sampling):
                triton_gather.gather_batch_triton(tokens, s, seed, step, 0, batch, batch, num_tokens, seq_len,
                                                  out_x=x, out_y=y, input_dtype=input_dtype, doc_starts=doc_starts)
            aligned()
            want_x, want_y = reference_batch(cpu_tokens, sampling, seed, step, batch, seq_len, input_dtype,
                                             doc_starts=cpu_doc_starts)
            if not (torch.equal(x.cpu(), want_x) and torch.equal(y.cpu(), want_y) and bool((want_x[:, 0] == BOS).all())):
                sys.exit(f"bench_kernels: triton-aligned-{sampling} differs from the reference at B={batch}, T={seq_len}")
            providers[f"triton-aligned-{sampling}"] = (aligned, gather_bytes)
        providers["torch-random"] = (
            lambda: torch_gather(tokens, "random", seed, step, batch, num_tokens, seq_len, input_dtype), gather_bytes)

        timings = {name: time_ms(fn, device) for name, (fn, _) in providers.items()}
        copy_gbs = providers["copy"][1] / timings["copy"][0] / 1e6
        for name, (_, nbytes) in providers.items():
            median, p10, p90 = timings[name]
            gbs = nbytes / median / 1e6
            rows.append({
                "provider": name, "device": device, "batch_size": batch, "seq_len": seq_len,
                "tokens": batch * seq_len, "x_dtype": args.x_dtype, "median_ms": median, "p10_ms": p10,
                "p90_ms": p90, "bytes": nbytes, "gb_per_s": gbs, "of_copy": gbs / copy_gbs,
                "tokens_per_s": batch * seq_len / median * 1e3,
                "speedup_vs_torch": timings["torch-random"][0] / median,
            })
        del x, y, copy_src, copy_dst

    machine = machine_info()
    print(f"stream {num_tokens:,} uint16 tokens, T={seq_len}, x {args.x_dtype}, y int64")
    print(f"{'provider':<22} {'B*T':>10} {'median ms':>10} {'p10-p90 ms':>19} {'GB/s':>8} {'of copy':>8} "
          f"{'Gtok/s':>8} {'vs torch':>9}")
    for r in rows:
        print(f"{r['provider']:<22} {r['tokens']:>10,} {r['median_ms']:>10.4f} {r['p10_ms']:>9.4f}-{r['p90_ms']:<9.4f} "
              f"{r['gb_per_s']:>8.1f} {r['of_copy']:>8.2f} {r['tokens_per_s'] / 1e9:>8.2f} "
              f"{r['speedup_vs_torch']:>8.1f}x")
    print(machine_line(machine))
    return benchmark_result(
        "kernels", argv, args.json, stream_tokens=num_tokens, machine=machine, rows=rows)


if __name__ == "__main__":
    main()
