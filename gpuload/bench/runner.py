"""`gpuload bench`: time every provider on the same shards and shapes; one table, JSON, and a plot.

Per shape, every provider is built (a peer's converter run first, or its cached copy reused) and its
first batch taken, then warm-up batches, then `steps` timed batches in interleaved rounds, each batch
from the call to the moment it is usable (on CUDA: an event recorded on the current stream has
completed). tokens/s and the speedup vs nanogpt come from the total time of the timed batches
(sustained throughput: a DataLoader's prefetch queue makes single batches look cheaper than they are);
median and p10-p90 describe single batches. Memory: RSS and PSS of the provider's worker processes
plus what the bench process grew by while that provider ran, sampled after its first batch and after
each of its rounds (memory.py).
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
from gpuload.bench.memory import cpu_seconds, descendants, rss_pss, total_rss_pss
from gpuload.bench.providers import BASELINE, PEER_NAMES, PROVIDER_NAMES, convert_for, make_provider, unavailable
from gpuload.machine import benchmark_result, machine_info, machine_line
from gpuload.progress import Progress
from gpuload.shards import ShardError, TokenStream

SETTINGS = {  # batch sizes, sequence lengths, timed steps, warm-up steps, rounds
    "full": ((16, 64), (1024,), 200, 20, 10),
    "quick": ((4, 16), (256,), 20, 3, 2),
}
PROGRESS_EVERY_S = 0.1  # progress updates cost a few microseconds: not after every batch of a fast provider
SETTLE_POLL_S = 0.02  # workers refilling a prefetch queue of 2 batches each finish within a few polls
SETTLE_TIMEOUT_S = 2.0
QUICK_SKIP = "peers are off with --quick; name them with --providers"


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


def choose_providers(names: Optional[Sequence[str]], device: torch.device,
                     quick: bool = False) -> tuple[list[str], list[dict]]:
    """(providers to run, [{provider, reason}] skipped). Named providers must exist and be able to run; by
    default all that can run here, without the peers with `quick`."""
    if names is None:
        reasons = {n: QUICK_SKIP if quick and n in PEER_NAMES else unavailable(n, device) for n in PROVIDER_NAMES}
        return ([n for n in PROVIDER_NAMES if not reasons[n]],
                [{"provider": n, "reason": reasons[n]} for n in PROVIDER_NAMES if reasons[n]])
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


def check_batch(name: str, batch, batch_size: int, seq_len: int, device: torch.device) -> None:
    """Every provider must deliver what a training step expects; a failure here is a bug in the provider."""
    x, y = batch
    for t, what in ((x, "x"), (y, "y")):
        if tuple(t.shape) != (batch_size, seq_len) or t.dtype != torch.int64 or t.device != device:
            raise RuntimeError(f"provider {name}: {what} is {tuple(t.shape)} {t.dtype} on {t.device}, expected "
                               f"({batch_size}, {seq_len}) torch.int64 on {device}")
    if not torch.equal(x[:, 1:], y[:, :-1]):
        raise RuntimeError(f"provider {name}: y is not x shifted by one token")


class Timed:
    """One provider in an interleaved measurement: its loader, helper processes, samples and memory."""

    def __init__(self, name: str, shards, batch_size: int, seq_len: int, device: torch.device,
                 cache_dir: Optional[str]):
        self.name, self.batch_size, self.seq_len, self.device = name, batch_size, seq_len, device
        self.conversion = convert_for(name, shards, seq_len, cache_dir)  # before the clock: its own column
        self.samples, self.cpu_seconds, self.last = [], 0.0, None
        self.main_bytes = [0, 0]  # RSS, PSS this provider added to the bench process, as sampled
        self.peak = [None, None]
        before, self.helpers = descendants(), set()
        main0 = rss_pss(os.getpid())
        wait = _device_wait(device)
        t0 = time.perf_counter()
        self.provider = make_provider(name, shards, batch_size, seq_len, device, cache_dir=cache_dir)
        try:
            batch = self.provider()
            _touch(*batch)
            wait()
            self.first_batch_s = time.perf_counter() - t0
            check_batch(name, batch, batch_size, seq_len, device)
            self._helpers(before)
            self.sample_memory(main0)
        except BaseException:
            self.provider.close()
            raise

    def _helpers(self, before: set) -> None:
        """Processes started since `before` (taken when this provider's turn began) are this provider's."""
        self.helpers |= descendants() - before

    def helper_cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.helpers)

    def sample_memory(self, main_before) -> None:
        """Add what the bench process grew by since `main_before` to this provider's share, then take a sample."""
        main_now = rss_pss(os.getpid())
        for i in (0, 1):
            if main_now[i] is not None and main_before[i] is not None:
                self.main_bytes[i] += main_now[i] - main_before[i]
        workers = total_rss_pss(self.helpers)
        for i in (0, 1):
            if main_now[i] is None:
                continue
            value = self.main_bytes[i] + (workers[i] or 0)
            self.peak[i] = value if self.peak[i] is None else max(self.peak[i], value)

    def warm_up(self, steps: int, progress: Progress) -> None:
        before, main0 = descendants(), rss_pss(os.getpid())
        wait = _device_wait(self.device)
        for _ in range(steps):
            x, y = self.provider()
            _touch(x, y)
            wait()
            progress.update(advance=1, nbytes=x.nbytes + y.nbytes, tokens=x.numel())
        self._helpers(before)
        settle(self)
        self.sample_memory(main0)

    def round(self, steps: int, progress: Progress) -> None:
        """`steps` timed batches, then wait for the workers to refill their queues (their CPU time counts)."""
        before, main0 = descendants(), rss_pss(os.getpid())
        wait = _device_wait(self.device)
        provider = self.provider
        pending, next_update = 0, 0.0
        cpu0, helpers0 = time.process_time(), self.helper_cpu()
        for _ in range(steps):
            t0 = time.perf_counter()
            x, y = provider()
            _touch(x, y)
            wait()
            t1 = time.perf_counter()
            self.samples.append(t1 - t0)
            pending += 1
            if t1 >= next_update:
                progress.update(advance=pending, nbytes=pending * (x.nbytes + y.nbytes), tokens=pending * x.numel())
                pending, next_update = 0, t1 + PROGRESS_EVERY_S
        main_cpu = time.process_time() - cpu0
        self._helpers(before)  # a DataLoader restarts its workers at an epoch's end
        settle(self)
        self.cpu_seconds += main_cpu + self.helper_cpu() - helpers0
        progress.update(advance=pending, nbytes=pending * (x.nbytes + y.nbytes), tokens=pending * x.numel())
        self.last = (x, y)
        self.sample_memory(main0)

    def row(self, steps: int, warmup: int, rounds: int) -> dict:
        us = np.asarray(self.samples) * 1e6
        mib = [None if v is None else v / 2**20 for v in self.peak]
        conversion = self.conversion
        return {
            "provider": self.name, "sampling": self.provider.sampling, "device": str(self.device),
            "batch_size": self.batch_size, "seq_len": self.seq_len, "steps": steps, "warmup": warmup,
            "rounds": rounds, "median_us": float(np.median(us)), "p10_us": float(np.quantile(us, 0.1)),
            "p90_us": float(np.quantile(us, 0.9)), "mean_us": float(us.mean()),
            "tokens_per_s": self.batch_size * self.seq_len * steps / float(np.sum(self.samples)),
            "host_cpu_us": self.cpu_seconds / steps * 1e6, "speedup_vs_nanogpt": None,
            "conversion_s": None if conversion is None else conversion.seconds,
            "conversion_reused": None if conversion is None else conversion.reused,
            "first_batch_s": self.first_batch_s, "peak_rss_mib": mib[0], "peak_pss_mib": mib[1],
            "helper_processes": len(self.helpers),
            "batch_us": [round(float(u), 2) for u in us],
        }

    def close(self) -> None:
        self.provider.close()


def settle(timed: Timed, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Wait until `timed`'s helper processes stop using CPU (their prefetch queues are full), so that their work
    is not done while the next provider is timed."""
    if not timed.helpers:
        return
    deadline, last = time.perf_counter() + timeout_s, timed.helper_cpu()
    while time.perf_counter() < deadline:
        time.sleep(SETTLE_POLL_S)
        now = timed.helper_cpu()
        if now == last:
            return
        last = now


def measure_group(names: Sequence[str], shards, batch_size: int, seq_len: int, steps: int, warmup: int,
                  device: torch.device, label: str, rounds: int = 1, cache_dir: Optional[str] = None) -> list[dict]:
    """One table row per provider in `names` at one shape, timed in `rounds` interleaved rounds.

    Each provider is converted (peers), built and asked for its first batch in turn, all stay alive, then
    every round times `steps // rounds` batches of each in turn, so drift on a noisy machine hits all alike.
    """
    per_round = steps // rounds
    if per_round < 1:
        raise BenchError(f"--steps {steps} with --rounds {rounds}: expected at least one step per round")
    steps = per_round * rounds
    timed: list[Timed] = []
    progress = Progress(label, total=len(names) * (warmup + steps), rate="tokens")
    try:
        for name in names:
            timed.append(Timed(name, shards, batch_size, seq_len, device, cache_dir))
        for t in timed:
            t.warm_up(warmup, progress)
        for _ in range(rounds):
            for t in timed:
                t.round(per_round, progress)
        for t in timed:
            check_batch(t.name, t.last, batch_size, seq_len, device)
    except BaseException:
        progress.abandon()
        raise
    finally:
        for t in timed:
            t.close()
    progress.close()
    return [t.row(steps, warmup, rounds) for t in timed]


def measure(name: str, shards, batch_size: int, seq_len: int, steps: int, warmup: int, device: torch.device,
            label: str, rounds: int = 1, cache_dir: Optional[str] = None) -> dict:
    """One table row: provider `name` at one shape."""
    return measure_group([name], shards, batch_size, seq_len, steps, warmup, device, label, rounds, cache_dir)[0]


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_nanogpt = tokens/s over nanogpt's tokens/s at the same shape (None without a nanogpt row)."""
    base = {(r["batch_size"], r["seq_len"]): r["tokens_per_s"] for r in rows if r["provider"] == BASELINE}
    for r in rows:
        baseline = base.get((r["batch_size"], r["seq_len"]))
        r["speedup_vs_nanogpt"] = r["tokens_per_s"] / baseline if baseline else None


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _converts(row: dict) -> str:
    if row["conversion_s"] is None:
        return "no"
    return f"{row['conversion_s']:.1f} s" + (" (cached)" if row["conversion_reused"] else "")


def format_table(rows: list[dict]) -> str:
    width = max(len("provider"), *(len(r["provider"]) for r in rows))
    lines = [f"{'provider':<{width}}  {'reads':<15} {'converts':>14} {'device':<7} {'B':>4} {'T':>6} "
             f"{'median us':>10} {'p10-p90 us':>19} {'host CPU us':>11} {'Mtok/s':>8} {'1st batch s':>11} "
             f"{'RSS MiB':>8} {'PSS MiB':>8} {'vs nanogpt':>10}"]
    for r in rows:
        spread = f"{r['p10_us']:.1f}-{r['p90_us']:.1f}"
        speedup = _cell(r["speedup_vs_nanogpt"], ".2f") + ("x" if r["speedup_vs_nanogpt"] is not None else "")
        lines.append(f"{r['provider']:<{width}}  {r['sampling']:<15} {_converts(r):>14} {r['device']:<7} "
                     f"{r['batch_size']:>4} {r['seq_len']:>6} {r['median_us']:>10.1f} {spread:>19} "
                     f"{r['host_cpu_us']:>11.1f} {r['tokens_per_s'] / 1e6:>8.1f} {r['first_batch_s']:>11.2f} "
                     f"{_cell(r['peak_rss_mib'], '.0f'):>8} {_cell(r['peak_pss_mib'], '.0f'):>8} {speedup:>10}")
    return "\n".join(lines)


def run_bench(data: Optional[str] = None, cache_dir: Optional[str] = None,
              batch_sizes: Optional[Sequence[int]] = None, seq_lens: Optional[Sequence[int]] = None,
              steps: Optional[int] = None, device: Optional[str] = None, providers: Optional[Sequence[str]] = None,
              quick: bool = False, json_path: Optional[str] = None, plot_path: Optional[str] = None,
              argv: Optional[Sequence[str]] = None, rounds: Optional[int] = None) -> dict:
    """Run the benchmark, print the table and the machine line, write JSON/PNG if asked; return the result."""
    default_batch_sizes, default_seq_lens, default_steps, warmup, default_rounds = SETTINGS["quick" if quick else "full"]
    batch_sizes, seq_lens = list(batch_sizes or default_batch_sizes), list(seq_lens or default_seq_lens)
    steps = steps or default_steps
    rounds = min(rounds or default_rounds, steps)
    steps = steps // rounds * rounds
    check_output("--json", json_path, ".json")
    check_output("--plot", plot_path, ".png")
    if plot_path and importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib: pip install 'gpuload[plot]' (or pip install matplotlib)")
    dev = parse_device(device)
    names, skipped = choose_providers(providers, dev, quick)
    shards, dataset = open_data(data, cache_dir, quick)
    shapes = list(itertools.product(batch_sizes, seq_lens))
    for batch_size, seq_len in shapes:
        check_shape(shards, batch_size, seq_len)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    rows = []
    for i, (batch_size, seq_len) in enumerate(shapes, 1):
        label = f"bench {i}/{len(shapes)} B={batch_size} T={seq_len} ({len(names)} loaders)"
        rows.extend(measure_group(names, shards, batch_size, seq_len, steps, warmup, dev, label, rounds, cache_dir))
    add_speedups(rows)

    machine = machine_info()
    print(f"{dataset['source']}: {dataset['shards']} shards, {dataset['num_tokens']:,} tokens ({dataset['token_dtype']})")
    print(f"{steps} timed batches per row in {rounds} interleaved rounds, after {warmup} warm-up; reads: random "
          f"windows, shuffled fixed blocks, or the stream in order; x and y int64 on {dev}; host CPU = process CPU "
          f"time per batch, worker processes included; 1st batch = construction + first batch; RSS/PSS = peak of "
          f"the loader's workers + what it added to this process; converts = the peer's own converter, run once")
    print(format_table(rows))
    for s in skipped:
        print(f"skipped {s['provider']}: {s['reason']}")
    print(machine_line(machine))
    result = benchmark_result("bench", argv, json_path, program="gpuload", dataset=dataset,
                              settings={"steps": steps, "warmup": warmup, "rounds": rounds, "device": str(dev),
                                        "quick": quick, "batch_sizes": batch_sizes, "seq_lens": seq_lens},
                              machine=machine, rows=rows, skipped=skipped)
    if plot_path:
        from gpuload.bench.plot import write_plot

        write_plot(rows, machine, plot_path)
    if json_path or plot_path:
        print(f"wrote {' and '.join(p for p in (json_path, plot_path) if p)}")
    sys.stdout.flush()
    return result
