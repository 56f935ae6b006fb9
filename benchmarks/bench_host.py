"""Host time per next(): what the training loop pays per batch, per backend and configuration.

    python benchmarks/bench_host.py                            # this checkout, every configuration
    python benchmarks/bench_host.py --compare 65efb51 --json out.json   # and an older revision, same run
    python benchmarks/bench_host.py --quick                    # smoke mode (a few hundred steps), used by tests

Each (revision, configuration) runs in a fresh process, the revisions interleaved over `--rounds`: B=32,
T=1024 random windows (unless named) from 32M page-cached uint16 tokens in documents of geometric lengths
(mean 700) that start with BOS 50256. Per configuration: median and p10-p90 microseconds of `next()` over
`--steps` calls after 50 warm-up calls, Python calls per step (sys.setprofile over 200 steps: 'call' and
'c_call' events), and torch operations per step (a TorchDispatchMode over 100 steps: allocations show up
there). On a machine without CUDA the triton backend runs as on a GPU up to the kernel launch: the
kernel is compiled for sm_90 (gpuload/kernels/offline.py's stand-in driver) and only the launcher
(Triton's CudaLauncher and its C call) is a stub, and CUDA's own calls (streams, events, the capture
check) are absent; such rows say `stubbed: true`. On a GPU everything is real, plus `graph-replay`: a
CUDA graph captured around next() with static buffers, replayed. Before timing, the stubbed run checks
that the loader's launch passes the kernel exactly the arguments Triton's own `kernel[grid](...)` route
passes for the same step (`launch_check`).

Configurations: whole-{random,shuffle,sequential} (the ring holds the stream), chunked-{...} (a ring of a
quarter of the stream), aligned-{random,shuffle} (align='bos'), aligned-chunked-shuffle, mix4-random (four
sources), static-whole-random (static_buffers=True), doc-whole-random (doc_info=True).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BOS = 50256
NUM_TOKENS = 32 << 20
B, T = 32, 1024
CONFIGS = {
    "whole-random": {}, "whole-shuffle": {"sampling": "shuffle"}, "whole-sequential": {"sampling": "sequential"},
    "chunked-random": {"chunked": True}, "chunked-shuffle": {"sampling": "shuffle", "chunked": True},
    "chunked-sequential": {"sampling": "sequential", "chunked": True},
    "aligned-random": {"align": True}, "aligned-shuffle": {"sampling": "shuffle", "align": True},
    "aligned-chunked-shuffle": {"sampling": "shuffle", "align": True, "chunked": True},
    "mix4-random": {"sources": 4}, "static-whole-random": {"static": True}, "doc-whole-random": {"doc_info": True},
}
NATIVE_CONFIGS = ("whole-random", "chunked-shuffle", "aligned-random", "mix4-random")


def write_data(directory: str) -> list[str]:
    import numpy as np

    from gpuload.shards import write_shard

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, BOS, NUM_TOKENS, dtype=np.int64)
    tokens[rng.random(NUM_TOKENS) < 1 / 700] = BOS
    tokens[0] = BOS
    paths = []
    for i, part in enumerate(np.array_split(tokens.astype(np.uint16), 4)):
        paths.append(os.path.join(directory, f"train_{i:06d}.bin"))
        write_shard(paths[-1], part)
    return paths


# --- the worker: one configuration in one process --------------------------------------------------------

def _stand_in(stub: bool):
    """Install the stand-in driver of this checkout's gpuload/kernels/offline.py (whatever gpuload is imported)."""
    spec = importlib.util.spec_from_file_location("_gpuload_offline", os.path.join(ROOT, "gpuload", "kernels",
                                                                                   "offline.py"))
    offline = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = offline  # its dataclasses look their module up there
    spec.loader.exec_module(offline)
    from triton.runtime import driver

    driver.set_active(offline.StandInDriver(90, stub_launches=stub))
    return offline


def make_loader(paths, backend: str, config: dict, device):
    from gpuload import GPULoader

    files = paths if config.get("sources", 1) == 1 else {f"s{k}": paths for k in range(config["sources"])}
    kw = dict(batch_size=B, seq_len=T, sampling=config.get("sampling", "random"), seed=1, rank=0, world_size=1,
              device=device, backend=backend, static_buffers=config.get("static", False))
    if config.get("sources", 1) > 1:
        kw["weights"] = {name: 1 for name in files}
    if config.get("chunked"):
        kw["ring_tokens"] = NUM_TOKENS // 4
    if config.get("align") or config.get("doc_info"):
        kw["bos_token"] = BOS
    if config.get("align"):
        kw["align"] = "bos"
    if config.get("doc_info"):
        kw["doc_info"] = True
    return GPULoader(files, **kw)


def _time_steps(ld, steps: int, sync) -> list[float]:
    times = []
    clock = time.perf_counter_ns
    for _ in range(steps):
        t0 = clock()
        next(ld)
        times.append((clock() - t0) / 1e3)
        sync()
    return times


def _calls_per_step(ld, steps: int = 200) -> float:
    count = [0]

    def profile(frame, event, arg):
        if event in ("call", "c_call"):
            count[0] += 1

    sys.setprofile(profile)
    try:
        for _ in range(steps):
            next(ld)
    finally:
        sys.setprofile(None)
    return count[0] / steps


def _torch_ops_per_step(ld, steps: int = 100) -> float:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    with Count():
        for _ in range(steps):
            next(ld)
    return Count.ops / steps


def _launch_check(paths, config: dict) -> str:
    """The loader's launch vs Triton's kernel[grid](...) route for the same step: their argument lists."""
    import torch

    from gpuload.kernels.triton_gather import _gather_batch_kernel, gather_batch_triton

    stub = sys.modules["_gpuload_offline"].StubLauncher
    ld = make_loader(paths, "triton", config, torch.device("cpu"))
    source = ld.sources[0]
    for _ in range(3):
        next(ld)
    step = ld.step
    before = stub.launches
    x, y = next(ld)[:2]
    # The step's first launch is its (first source's) gather; doc info's kernels follow it.
    grid, _, _, _, function, loader_args = stub.recent[-(stub.launches - before)]
    ring = source.ring
    tokens = ring.acquire(step)
    try:
        layout = source.layout
        counter = getattr(ld._producer, "counter", None)  # the device step counter of static whole-stream rings
        gather_batch_triton(tokens, ld.sampling, ld.seed, 0 if counter is not None else step, 0, B, source.rows,
                            source.num_tokens, T, x, y, ld.input_dtype, chunking=layout.chunking,
                            num_slots=layout.num_slots, slot_tokens=layout.slot_tokens,
                            mixture=(ld.counts, 0) if ld.mixed else None, doc_starts=source.doc_starts,
                            aligned_chunks=source.aligned, step_counter=counter)
    finally:
        ring.release(step)
    jit_grid, _, _, _, jit_function, jit_args = stub.recent[-1]
    # (packed metadata, launch metadata, enter hook, exit hook, *the kernel's arguments): the hooks and the
    # metadata they receive are the profiler's business (None when no hook listens); the rest must be equal.
    # Pointers this variant never reads (a placeholder each route picks) do not count.
    names = _gather_batch_kernel.arg_names
    flags = dict(zip(names, jit_args[4:]))
    unused = {"starts_ptr": not flags["WRITE_STARTS"], "step_ptr": not flags["STEP_FROM_PTR"],
              "step": flags["STEP_FROM_PTR"],
              "doc_starts_ptr": not flags["ALIGNED"], "table_ptr": not (flags["ALIGNED"] and flags["CHUNKED"])}

    def comparable(args):
        values = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args[4:]]
        return [args[0]] + [None if unused.get(name) else v for name, v in zip(names, values)]

    as_int, got = comparable(jit_args), comparable(loader_args)
    if (grid, function, got) != (jit_grid, jit_function, as_int):
        diff = [(name, g, w) for name, g, w in zip(["metadata", *names], got, as_int) if g != w]
        raise SystemExit(f"bench_host: the loader's launch differs from kernel[grid](...): grid {grid} vs {jit_grid}, "
                         f"compiled variant {function} vs {jit_function}, arguments (name, loader, triton) {diff[:6]}")
    ld.close()
    return "equal"


def worker(spec: dict) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    stubbed = not cuda and spec["backend"] == "triton"
    if stubbed:
        os.environ.pop("TRITON_INTERPRET", None)
        _stand_in(stub=True)
        from gpuload.kernels import triton_docs, triton_gather

        # The launchers take CPU tensors as under the interpreter; the kernels are compiled, not interpreted.
        triton_gather.interpreter_active = lambda: True
        triton_docs.interpreter_active = lambda: True
    import gpuload

    device = torch.device("cuda" if cuda else "cpu")
    config = CONFIGS[spec["config"]]
    row = {"tree": spec["tree"], "backend": spec["backend"], "config": spec["config"], "stubbed": stubbed,
           "gpuload": os.path.dirname(gpuload.__file__)}
    if stubbed and spec.get("check"):
        row["launch_check"] = _launch_check(spec["paths"], config)
    ld = make_loader(spec["paths"], spec["backend"], config, device)
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)
    for _ in range(50):
        next(ld)
    sync()
    times = sorted(_time_steps(ld, spec["steps"], sync))
    row.update(median_us=statistics.median(times), p10_us=times[len(times) // 10],
               p90_us=times[len(times) * 9 // 10], steps=len(times))
    row["calls_per_step"] = _calls_per_step(ld)
    row["torch_ops_per_step"] = _torch_ops_per_step(ld)
    if cuda and spec["config"] == "static-whole-random" and spec.get("graph"):
        row.update(_graph_replay(ld, spec["steps"]))
    ld.close()
    return row


def _graph_replay(ld, steps: int) -> dict:
    """next() captured in a CUDA graph and replayed: host microseconds per replay."""
    import torch

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        next(ld)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        graph.replay()
        times.append((time.perf_counter_ns() - t0) / 1e3)
        torch.cuda.synchronize()
    times.sort()
    return {"graph_replay_median_us": statistics.median(times), "graph_replay_p10_us": times[len(times) // 10],
            "graph_replay_p90_us": times[len(times) * 9 // 10]}


# --- the parent: trees, rounds, table ---------------------------------------------------------------------

def export_tree(revision: str, directory: str) -> str:
    """`revision`'s gpuload/ in `directory`, with this checkout's built native extension (csrc/ unchanged)."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", revision, "gpuload"], capture_output=True, check=True)
    tree = os.path.join(directory, revision)
    os.makedirs(tree)
    subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
    for name in os.listdir(os.path.join(ROOT, "gpuload")):
        if name.startswith("_native") and name.endswith(".so"):
            shutil.copy(os.path.join(ROOT, "gpuload", name), os.path.join(tree, "gpuload", name))
    return tree


def run_worker(tree_name: str, tree: str, backend: str, config: str, paths, steps: int, check: bool) -> dict:
    spec = {"tree": tree_name, "backend": backend, "config": config, "paths": paths, "steps": steps, "check": check,
            "graph": True}
    env = {**os.environ, "PYTHONPATH": tree + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)], env=env,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"bench_host: {tree_name} {backend} {config} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", nargs="*", default=[], metavar="REV", help="git revisions to measure too")
    parser.add_argument("--configs", help="comma-separated configurations (default: all)")
    parser.add_argument("--steps", type=int, default=2000, help="timed next() calls per configuration")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the revisions")
    parser.add_argument("--json", help="write every row to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke mode: two configurations, 300 steps, 1 round")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    configs = args.configs.split(",") if args.configs else list(CONFIGS)
    if args.quick:
        configs, args.steps, args.rounds = ["whole-random", "static-whole-random"], 300, 1
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")

    sys.path.insert(0, ROOT)
    from gpuload import native
    from gpuload.machine import benchmark_result, machine_info, machine_line

    rows = []
    with tempfile.TemporaryDirectory(prefix="gpuload-bench-host-") as directory:
        paths = write_data(directory)
        trees = [("worktree", ROOT)] + [(rev, export_tree(rev, directory)) for rev in args.compare]
        jobs = [(backend, config) for config in configs for backend in ("triton",)]
        if native.available():
            jobs += [("native", config) for config in configs if config in NATIVE_CONFIGS]
        for round_ in range(args.rounds):
            order = trees if round_ % 2 == 0 else trees[::-1]
            for backend, config in jobs:
                for name, tree in order:
                    check = round_ == 0 and name == "worktree" and backend == "triton"
                    row = run_worker(name, tree, backend, config, paths, args.steps, check)
                    row["round"] = round_
                    rows.append(row)
                    print(f"  {name:<10} {backend:<7} {config:<24} {row['median_us']:8.1f} us", file=sys.stderr)

    summary = []
    for backend, config in jobs:
        for name, _ in trees:
            mine = [r for r in rows if (r["tree"], r["backend"], r["config"]) == (name, backend, config)]
            if mine:
                best = min(mine, key=lambda r: r["median_us"])
                summary.append({**best, "median_us": statistics.median(r["median_us"] for r in mine)})
    machine = machine_info()
    print(f"next() host time, B={B}, T={T}, {NUM_TOKENS:,} uint16 tokens; the median over rounds of each round's "
          f"median")
    print(f"{'tree':<10} {'backend':<7} {'config':<24} {'median us':>9} {'p10-p90 us':>15} {'calls':>6} {'torch ops':>9}"
          f"  {'stubbed':<7}")
    for r in summary:
        print(f"{r['tree']:<10} {r['backend']:<7} {r['config']:<24} {r['median_us']:>9.1f} "
              f"{r['p10_us']:>7.1f}-{r['p90_us']:<7.1f} {r['calls_per_step']:>6.0f} {r['torch_ops_per_step']:>9.1f}"
              f"  {str(r['stubbed']).lower():<7}")
    print(machine_line(machine))
    return benchmark_result("host", argv, args.json, machine=machine, batch_size=B, seq_len=T,
                            num_tokens=NUM_TOKENS, rows=rows, summary=summary)


if __name__ == "__main__":
    main()
