"""A small GPT's training step fed by each loader: step time and data-stall fraction vs no loader at all.

    python benchmarks/bench_train_step.py                  # demo dataset; 6 layers, d=512, B=16, T=1024
    python benchmarks/bench_train_step.py --json out.json --providers nanogpt,gpuload-cpu-native
    python benchmarks/bench_train_step.py --quick          # smoke mode on the CPU (seconds), used by the tests

The loop is nanoGPT's: the next batch is fetched right after the forward pass is queued, so a loader that
works asynchronously overlaps the device's work. Each provider trains the same model for `--rounds`
blocks of `--steps` steps; a block is timed between two device synchronizations. `resident` feeds one
batch that is already on the device every step: the same step with no loader. stall = 1 - resident step
time / provider step time, the fraction of the step spent waiting for data. On CUDA two more rows capture
the whole step (forward, backward, a capturable fused AdamW) in one CUDA graph: `resident-graph`, and
`gpuload-cuda-triton-graph` with next() captured inside it (static buffers, the step on the device);
their stall is against `resident-graph` (target: within 1%).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpuload.bench import BenchError
from gpuload.bench.providers import make_provider
from gpuload.bench.runner import check_shape, choose_providers, open_data, parse_device
from gpuload.cli import positive
from gpuload.machine import benchmark_result, machine_info, machine_line

# (layers, heads, width, batch size, sequence length, steps per block, blocks, warm-up steps)
CONFIGS = {"full": (6, 8, 512, 16, 1024, 20, 5, 10), "quick": (2, 2, 32, 2, 32, 2, 2, 1)}
VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 64, as nanoGPT does


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width, bias=False), nn.GELU(),
                                 nn.Linear(4 * width, width, bias=False))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT-2's architecture in miniature: token + position embeddings, pre-norm blocks, tied output head."""

    def __init__(self, vocab: int, seq_len: int, layers: int, heads: int, width: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_block(model, optimizer, fetch, first, steps: int, device: torch.device):
    """Seconds per step over `steps` steps starting from batch `first`; returns (seconds, the next batch)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    x, y = first
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        with autocast:
            loss = model(x, y)
        x, y = fetch()  # nanoGPT: fetch the next batch while the device works on this step
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return (time.perf_counter() - t0) / steps, (x, y)


def check_vocab(name: str, batch, vocab: int) -> None:
    largest = max(int(batch[0].max()), int(batch[1].max()))
    if largest >= vocab:
        raise BenchError(f"{name}: token id {largest} does not fit the model's vocabulary of {vocab}; "
                         f"pass --vocab-size {largest + 1} or more")


def time_feeds(model, optimizer, names, shards, B: int, T: int, device: torch.device, steps: int, rounds: int,
               warmup: int, vocab: int) -> list[dict]:
    """One row per feed: `resident` (a batch already on the device), then each provider, one at a time."""
    nanogpt = make_provider("nanogpt", shards, B, T, device)
    resident = tuple(t.clone() for t in nanogpt())  # made once, before any timing: the no-loader step
    nanogpt.close()
    rows = []
    for name in ["resident", *names]:
        # One provider alive at a time: idle DataLoader workers would otherwise share the cores.
        provider = None if name == "resident" else make_provider(name, shards, B, T, device)
        fetch = (lambda: resident) if provider is None else provider
        try:
            batch = fetch()
            check_vocab(name, batch, vocab)
            _, batch = train_block(model, optimizer, fetch, batch, warmup, device)
            times = []
            for _ in range(rounds):
                seconds, batch = train_block(model, optimizer, fetch, batch, steps, device)
                times.append(seconds * 1e3)
        finally:
            if provider is not None:
                provider.close()
        rows.append({"provider": name, "ms_per_step": float(np.median(times)), "p10_ms": float(np.quantile(times, 0.1)),
                     "p90_ms": float(np.quantile(times, 0.9)), "block_ms": times})
    return rows


def graph_feeds(model, shards, B: int, T: int, device: torch.device, steps: int, rounds: int, resident) -> list[dict]:
    """CUDA only: the whole training step captured in one CUDA graph (torch's whole-network recipe, a
    capturable fused AdamW), fed by a resident batch or by gpuload's next() captured inside the same graph
    (static buffers: the step lives on the device, so each replay trains on the next batch)."""
    from gpuload import GPULoader

    rows = []
    for name in ("resident-graph", "gpuload-cuda-triton-graph"):
        loader = None
        try:
            if name == "resident-graph":
                fetch = lambda: resident  # noqa: E731
            else:
                loader = GPULoader([s.path for s in shards], batch_size=B, seq_len=T, sampling="random", seed=0,
                                   rank=0, world_size=1, device=device, backend="triton", static_buffers=True,
                                   token_dtype=shards[0].dtype)
                fetch = loader.__next__
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True, capturable=True)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture: optimizer state, cuBLAS workspaces
                for _ in range(3):
                    x, y = fetch()
                    with autocast:
                        loss = model(x, y)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                x, y = fetch()
                with autocast:
                    loss = model(x, y)
                loss.backward()
                optimizer.step()
            times = []
            for _ in range(rounds):
                synchronize(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    graph.replay()
                synchronize(device)
                times.append((time.perf_counter() - t0) / steps * 1e3)
            rows.append({"provider": name, "ms_per_step": float(np.median(times)),
                         "p10_ms": float(np.quantile(times, 0.1)), "p90_ms": float(np.quantile(times, 0.9)),
                         "block_ms": times})
        except Exception as e:  # measured on a GPU only: report what failed, keep the other rows
            rows.append({"provider": name, "error": f"{type(e).__name__}: {e}"})
        finally:
            if loader is not None:
                loader.close()
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", metavar="GLOB", help="shards to train on (default: gpuload bench's demo dataset)")
    parser.add_argument("--cache-dir", metavar="DIR", help="where the demo dataset is kept (as gpuload bench)")
    parser.add_argument("--providers", help="comma-separated provider names (default: all that can run here)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--steps", type=positive, help="steps per timed block (default: 20; --quick: 2)")
    parser.add_argument("--rounds", type=positive, help="timed blocks per provider (default: 5; --quick: 2)")
    parser.add_argument("--vocab-size", type=positive, default=VOCAB, help=f"model vocabulary (default: {VOCAB})")
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny model and shapes, a few steps")
    args = parser.parse_args(argv)
    layers, heads, width, B, T, steps, rounds, warmup = CONFIGS["quick" if args.quick else "full"]
    steps, rounds = args.steps or steps, args.rounds or rounds

    try:
        device = parse_device(args.device)
        names, skipped = choose_providers(args.providers.split(",") if args.providers else None, device)
        shards, dataset = open_data(args.data, args.cache_dir, args.quick)
        check_shape(shards, B, T)
    except BenchError as e:
        parser.error(str(e))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = GPT(args.vocab_size, T, layers, heads, width).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")

    threads = torch.get_num_threads()
    if args.quick and device.type == "cpu":
        # Smoke mode shares small CI machines: intra-op threads spin-waiting against other processes made
        # each step 10x slower on a busy 2-core VM. One thread keeps it to seconds.
        torch.set_num_threads(1)
    try:
        rows = time_feeds(model, optimizer, names, shards, B, T, device, steps, rounds, warmup, args.vocab_size)
    except BenchError as e:
        parser.error(str(e))
    finally:
        torch.set_num_threads(threads)
    graphs = []
    if device.type == "cuda" and "gpuload-cuda-triton-ring" in names:
        resident = tuple(t.clone() for t in make_provider("nanogpt", shards, B, T, device)())
        graphs = graph_feeds(model, shards, B, T, device, steps, rounds, resident)

    base = rows[0]["ms_per_step"]
    for r in rows:
        r["stall"] = 1.0 - base / r["ms_per_step"]
    graph_base = graphs[0].get("ms_per_step") if graphs else None
    for r in graphs:  # against the same captured step fed by a resident batch
        if "ms_per_step" in r and graph_base:
            r["stall"] = 1.0 - graph_base / r["ms_per_step"]
    machine = machine_info()
    params = sum(p.numel() for p in model.parameters())
    print(f"GPT: {layers} layers, {heads} heads, width {width}, {params / 1e6:.1f}M parameters; B={B}, T={T}, "
          f"{rounds} blocks of {steps} steps on {device}; {dataset['source']}")
    print(f"{'provider':<30} {'ms/step':>9} {'p10-p90 ms':>17} {'data stall':>10}")
    for r in rows + graphs:
        if "error" in r:
            print(f"{r['provider']:<30} failed: {r['error']}")
            continue
        spread = f"{r['p10_ms']:.2f}-{r['p90_ms']:.2f}"
        print(f"{r['provider']:<30} {r['ms_per_step']:>9.2f} {spread:>17} {100 * r.get('stall', 0.0):>9.1f}%")
    for s in skipped:
        print(f"skipped {s['provider']}: {s['reason']}")
    print(machine_line(machine))
    return benchmark_result(
        "train_step", argv, args.json, model={"layers": layers, "heads": heads, "width": width,
                                             "vocab": args.vocab_size, "parameters": params},
        batch_size=B, seq_len=T, steps=steps, rounds=rounds, warmup=warmup, device=str(device), dataset=dataset,
        machine=machine, rows=rows, graph_rows=graphs, skipped=skipped)


if __name__ == "__main__":
    main()
