"""`gpuload bench`: time every provider on the same shards and shapes; one table, JSON, and a plot.

Per provider and shape: warm-up batches, then `steps` timed batches, each from the call to the moment it
is usable (on CUDA: an event recorded on the current stream has completed). tokens/s and the speedup vs
nanogpt come from the total time of the timed batches (sustained throughput: a DataLoader's prefetch
queue makes single batches look cheaper than they are); median and p10-p90 describe single batches.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch

from gpuload.bench import BenchError
from gpuload.bench.dataset import demo_dataset
from gpuload.bench.providers import BASELINE, PROVIDER_NAMES, make_provider, unavailable
from gpuload.machine import benchmark_result, machine_info, machine_line
from gpuload.progress import Progress
from gpuload.shards import ShardError, TokenStream

SETTINGS = {  # batch sizes, sequence lengths, timed steps, warm-up steps
    "full": ((16, 64), (1024,), 200, 20),
    "quick": ((4, 16), (256,), 20, 3),
}
PROGRESS_EVERY_S = 0.1  # progress updates cost a few microseconds: not after every batch of a fast provider


def parse_device(text: Optional[str]) -> torch.device:
    """--device: cpu, cuda or cuda:N (default: cuda when available, else cpu)."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise BenchError(f"--device {text!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {text}: CUDA is not available here (torch {torch.__version__}); "
                             f"use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BenchError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    if device.type != "cpu":
        raise BenchError(f"--device {text}: expected cpu, cuda or cuda:N")
    return device


def choose_providers(names: Optional[Sequence[str]], device: torch.device) -> tuple[list[str], list[dict]]:
    """(providers to run, [{provider, reason}] skipped). Named providers must exist and be able to run."""
    if names is None:
        skipped = [{"provider": n, "reason": unavailable(n, device)} for n in PROVIDER_NAMES if unavailable(n, device)]
        return [n for n in PROVIDER_NAMES if not unavailable(n, device)], skipped
    for name in names:
        if name not in PROVIDER_NAMES:
            raise BenchError(f"--providers: unknown provider {name!r}; expected some of {', '.join(PROVIDER_NAMES)}")
        reason = unavailable(name, device)
        if reason:
            raise BenchError(f"--providers: {name} cannot run on {device} here ({reason})")
    return [n for n in PROVIDER_NAMES if n in names], []


def check_output(option: str, path: Optional[str], suffix: str) -> None:
    """Refuse an output path that cannot be written before minutes of benchmarking, not after."""
    if path is None:
        return
    if not path.lower().endswith(suffix):
        raise BenchError(f"{option} {path}: expected a path ending in {suffix}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise BenchError(f"{option} {path}: directory {directory} does not exist; create it or choose another path")


def open_data(data: Optional[str], cache_dir: Optional[str], quick: bool) -> tuple[list, dict]:
    """(shards, description) of --data, or of the demo dataset (written on first use)."""
    if data is None:
        demo = demo_dataset(cache_dir, quick=quick)
        paths, source = demo.paths, f"demo dataset {demo.directory} ({'reused' if demo.reused else 'written now'})"
    else:
        paths, source = data, f"--data {data}"
    try:
        stream = TokenStream(paths)
    except (ShardError, FileNotFoundError):
        raise  # they name the file and what to do already
    except ValueError as e:  # a glob holding both train and val shards
        raise BenchError(f"--data {data}: {e}") from e
    shards = stream.shards
    stream.close()
    return shards, {"source": source, "shards": len(shards), "num_tokens": sum(s.num_tokens for s in shards),
                    "token_dtype": str(shards[0].dtype), "paths": [s.path for s in shards]}


def check_shape(shards, batch_size: int, seq_len: int) -> None:
    first = shards[0]
    if first.num_tokens < batch_size * seq_len + 1:
        raise BenchError(
            f"{first.path}: holds {first.num_tokens:,} tokens; batch size {batch_size} x sequence length {seq_len} "
            f"needs {batch_size * seq_len + 1:,} in the first shard (nanoGPT's get_batch reads one file, nanochat's "
            f"loader B*T+1 contiguous tokens). Use a smaller --batch-size or --seq-len, or larger shards.")


def _device_wait(device: torch.device):
    """A function that returns once the batch just returned is usable by a step on `device`."""
    if device.type != "cuda":
        return lambda: None
    stream = torch.cuda.current_stream(device)
    done = torch.cuda.Event()

    def wait():
        # The training step runs on the current stream: a batch is produced when the work queued there has
        # finished, not when it was queued. Refills a loader overlaps on a side stream are not waited for.
        done.record(stream)
        done.synchronize()

    return wait


def _touch(x: torch.Tensor, y: torch.Tensor) -> None:
    """Read a token of each host batch, so no provider is timed on a lazily filled tensor."""
    if x.device.type == "cpu":
        int(x[-1, -1])
        int(y[-1, -1])


def time_provider(provider, steps: int, warmup: int, device: torch.device, progress: Progress):
    """(per-batch seconds, host CPU seconds per batch, last batch) of `steps` batches after `warmup`."""
    wait = _device_wait(device)
    for _ in range(warmup):
        x, y = provider()
        _touch(x, y)
        wait()
        progress.update(advance=1, nbytes=x.nbytes + y.nbytes, tokens=x.numel())
    samples = []
    pending, next_update = 0, 0.0
    cpu0, helpers0 = time.process_time(), provider.helper_cpu_seconds()
    for _ in range(steps):
        t0 = time.perf_counter()
        x, y = provider()
        _touch(x, y)
        wait()
        t1 = time.perf_counter()
        samples.append(t1 - t0)
        pending += 1
        if t1 >= next_update:
            progress.update(advance=pending, nbytes=pending * (x.nbytes + y.nbytes), tokens=pending * x.numel())
            pending, next_update = 0, t1 + PROGRESS_EVERY_S
    host_cpu = time.process_time() - cpu0 + provider.helper_cpu_seconds() - helpers0
    progress.update(advance=pending, nbytes=pending * (x.nbytes + y.nbytes), tokens=pending * x.numel())
    return samples, host_cpu / steps, (x, y)


def check_batch(name: str, batch, batch_size: int, seq_len: int, device: torch.device) -> None:
    """Every provider must deliver what a training step expects; a failure here is a bug in the provider."""
    x, y = batch
    for t, what in ((x, "x"), (y, "y")):
        if tuple(t.shape) != (batch_size, seq_len) or t.dtype != torch.int64 or t.device != device:
            raise RuntimeError(f"provider {name}: {what} is {tuple(t.shape)} {t.dtype} on {t.device}, expected "
                               f"({batch_size}, {seq_len}) torch.int64 on {device}")
    if not torch.equal(x[:, 1:], y[:, :-1]):
        raise RuntimeError(f"provider {name}: y is not x shifted by one token")


def measure(name: str, shards, batch_size: int, seq_len: int, steps: int, warmup: int, device: torch.device,
            label: str) -> dict:
    """One table row: provider `name` at one shape."""
    provider = make_provider(name, shards, batch_size, seq_len, device)
    progress = Progress(label, total=warmup + steps, rate="tokens")  # after construction: its rate is the loader's
    try:
        samples, host_cpu, last = time_provider(provider, steps, warmup, device, progress)
        check_batch(name, last, batch_size, seq_len, device)
    except BaseException:
        progress.abandon()
        raise
    finally:
        provider.close()
    progress.close()
    us = np.asarray(samples) * 1e6
    return {
        "provider": name, "sampling": provider.sampling, "device": str(device), "batch_size": batch_size,
        "seq_len": seq_len, "steps": steps, "warmup": warmup,
        "median_us": float(np.median(us)), "p10_us": float(np.quantile(us, 0.1)),
        "p90_us": float(np.quantile(us, 0.9)), "mean_us": float(us.mean()),
        "tokens_per_s": batch_size * seq_len * steps / float(np.sum(samples)),
        "host_cpu_us": host_cpu * 1e6, "speedup_vs_nanogpt": None,
        "batch_us": [round(float(u), 2) for u in us],
    }


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_nanogpt = tokens/s over nanogpt's tokens/s at the same shape (None without a nanogpt row)."""
    base = {(r["batch_size"], r["seq_len"]): r["tokens_per_s"] for r in rows if r["provider"] == BASELINE}
    for r in rows:
        baseline = base.get((r["batch_size"], r["seq_len"]))
        r["speedup_vs_nanogpt"] = r["tokens_per_s"] / baseline if baseline else None


def format_table(rows: list[dict]) -> str:
    width = max(len("provider"), *(len(r["provider"]) for r in rows))
    lines = [f"{'provider':<{width}}  {'device':<7} {'B':>4} {'T':>6} {'median us':>10} {'p10-p90 us':>19} "
             f"{'host CPU us':>11} {'Mtok/s':>8} {'vs nanogpt':>10}"]
    for r in rows:
        spread = f"{r['p10_us']:.1f}-{r['p90_us']:.1f}"
        speedup = f"{r['speedup_vs_nanogpt']:.1f}x" if r["speedup_vs_nanogpt"] is not None else "-"
        lines.append(f"{r['provider']:<{width}}  {r['device']:<7} {r['batch_size']:>4} {r['seq_len']:>6} "
                     f"{r['median_us']:>10.1f} {spread:>19} {r['host_cpu_us']:>11.1f} "
                     f"{r['tokens_per_s'] / 1e6:>8.1f} {speedup:>10}")
    return "\n".join(lines)


def run_bench(data: Optional[str] = None, cache_dir: Optional[str] = None,
              batch_sizes: Optional[Sequence[int]] = None, seq_lens: Optional[Sequence[int]] = None,
              steps: Optional[int] = None, device: Optional[str] = None, providers: Optional[Sequence[str]] = None,
              quick: bool = False, json_path: Optional[str] = None, plot_path: Optional[str] = None,
              argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark, print the table and the machine line, write JSON/PNG if asked; return the result."""
    default_batch_sizes, default_seq_lens, default_steps, warmup = SETTINGS["quick" if quick else "full"]
    batch_sizes, seq_lens = list(batch_sizes or default_batch_sizes), list(seq_lens or default_seq_lens)
    steps = steps or default_steps
    check_output("--json", json_path, ".json")
    check_output("--plot", plot_path, ".png")
    if plot_path and importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib: pip install 'gpuload[plot]' (or pip install matplotlib)")
    dev = parse_device(device)
    names, skipped = choose_providers(providers, dev)
    shards, dataset = open_data(data, cache_dir, quick)
    shapes = list(itertools.product(batch_sizes, seq_lens))
    for batch_size, seq_len in shapes:
        check_shape(shards, batch_size, seq_len)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    rows = []
    total = len(shapes) * len(names)
    for i, ((batch_size, seq_len), name) in enumerate(itertools.product(shapes, names), 1):
        label = f"bench {i}/{total} {name} B={batch_size} T={seq_len}"
        rows.append(measure(name, shards, batch_size, seq_len, steps, warmup, dev, label))
    add_speedups(rows)

    machine = machine_info()
    print(f"{dataset['source']}: {dataset['shards']} shards, {dataset['num_tokens']:,} tokens ({dataset['token_dtype']})")
    print(f"{steps} timed batches after {warmup} warm-up per row; random windows except nanochat-seq (sequential); "
          f"x and y int64 on {dev}; host CPU = process CPU time per batch, DataLoader workers included")
    print(format_table(rows))
    for s in skipped:
        print(f"skipped {s['provider']}: {s['reason']}")
    print(machine_line(machine))
    result = benchmark_result("bench", argv, json_path, program="gpuload", dataset=dataset,
                              settings={"steps": steps, "warmup": warmup, "device": str(dev), "quick": quick,
                                        "batch_sizes": batch_sizes, "seq_lens": seq_lens},
                              machine=machine, rows=rows, skipped=skipped)
    if plot_path:
        from gpuload.bench.plot import write_plot

        write_plot(rows, machine, plot_path)
    if json_path or plot_path:
        print(f"wrote {' and '.join(p for p in (json_path, plot_path) if p)}")
    sys.stdout.flush()
    return result
