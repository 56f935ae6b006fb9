"""Compile gpuload's Triton kernels for a GPU that is not here, and check what the compiler made of them.

    python -m gpuload.kernels.offline --arch 90 --arch 80          # every variant, one summary line per arch
    python -m gpuload.kernels.offline --arch 90 --json out.json    # every variant's record

Triton compiles for the current device's target, and a CPU machine has none: a stand-in driver
(`StandInDriver`) names the target instead. The launchers then run exactly as in training, on CPU tensors
(they are told the interpreter is on, so they accept them), over `LAUNCH_CASES`: every sampling mode x
token width x x dtype x whole/chunked ring x mixture x align='bos' (plus the step as a tensor, the
device step counter and the starts output), each BLOCK / num_warps the heuristic can pick, odd T, T = 1 and a large B, and the doc
info kernels with and without a capacity. Each launch becomes `JITFunction.warmup`, which compiles
without launching: Triton's own argument binding and specialization pick the variant, the wheel's
ptxas makes the cubin. Then, per variant:
- the hash is unsigned in the PTX: every SplitMix64 shift (by 30, 27, 31) is `shr.u64`, the
  multiplies carry the constants' exact bits, no `rem.s64`; random windows take `rem.u64`, shuffle
  compares with unsigned `setp` and divides with `div.u64` (a signed op would change batches for
  seeds and positions >= 2**63);
- no register spills: cuobjdump reports no stack and no local memory.
Run it in a process where TRITON_INTERPRET is unset when triton is first imported (tests/test_compile.py
starts one); nothing here needs a GPU or CUDA's driver.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

ARCHS = (90, 80)
MIX_C1_BITS = -4658895280553007687  # sampling.MIX_C1 as the signed 64-bit immediate PTX prints
MIX_C2_BITS = -7723592293110705685
BOS = 7


class StandInDriver:
    """What Triton's JIT asks of a driver before it compiles: the target. The device id is the arch, so
    kernels compiled for two archs in one process do not share a cache entry.

    With `stub_launches`, compiled kernels also "load" and "launch": the module handles are dummies and
    the launcher (Triton's CudaLauncher: its scratch handling and the C call) is `StubLauncher`, which
    records its arguments and does nothing; everything before it runs as on a GPU
    (benchmarks/bench_host.py prices the host side of a launch this way)."""

    def __init__(self, arch: int, stub_launches: bool = False):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        if stub_launches:
            self.utils = _StubUtils()
            self.launcher_cls = StubLauncher

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class _StubUtils:
    """The driver utilities a compiled kernel uses when it is first launched: dummy handles, H100-like limits."""

    def load_binary(self, name, kernel, shared, device):
        # module, function, registers, spills, max threads per block; the function handle names the cubin, so
        # two launches of the same handle are launches of the same compiled variant.
        return 1, zlib.crc32(kernel), 0, 0, 1024

    def get_device_properties(self, device):
        return {"max_shared_mem": 227 << 10, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def unload_module(self, module):
        pass


class StubLauncher:
    """Stands in for a compiled kernel's launcher; `recent` holds the arguments of the latest launches."""

    launches = 0
    recent: collections.deque = collections.deque(maxlen=16)

    def __init__(self, src, metadata):
        pass

    def __call__(self, grid_x, grid_y, grid_z, stream, function, *args):
        StubLauncher.launches += 1
        StubLauncher.recent.append((grid_x, grid_y, grid_z, stream, function, args))


@dataclass
class Variant:
    """One compiled kernel: what launched it, its constexprs, and what the checks found."""

    kernel: str
    case: str
    constexprs: dict
    registers: int = -1
    problems: list = field(default_factory=list)


@contextlib.contextmanager
def compiling_for(arch: int, sink: Callable):
    """Within: launches of gpuload's kernels compile for `arch` and call sink(kernel name, constexprs, compiled)."""
    from triton.runtime import driver

    from gpuload.kernels import triton_docs, triton_gather, triton_packed

    kernels = {"triton_gather": (triton_gather, ["_gather_batch_kernel"]),
               "triton_docs": (triton_docs, ["_count_segments_kernel", "_doc_info_kernel"]),
               "triton_packed": (triton_packed, ["_packed_gather_kernel"])}
    saved = []
    for module, names in kernels.values():
        if hasattr(module, "interpreter_active"):  # launchers that check where their tensors are
            if module.interpreter_active():
                raise RuntimeError("gpuload.kernels.offline compiles kernels: run it with TRITON_INTERPRET unset")
            saved.append((module, "interpreter_active", module.interpreter_active))
            module.interpreter_active = lambda: True  # the launchers then take CPU tensors
        for name in names:
            kernel = getattr(module, name)
            saved.append((module, name, kernel))
            setattr(module, name, _Warmup(kernel, sink))
    previous = driver._active  # not driver.active: without a GPU, making the default driver fails
    driver.set_active(StandInDriver(arch))
    try:
        yield
    finally:
        driver._active = previous
        for module, name, value in saved:
            setattr(module, name, value)


class _Warmup:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kw)` compiles it (warmup) instead of launching."""

    def __init__(self, kernel, sink: Callable):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
            constexprs = {k: v for k, v in kwargs.items() if k.isupper() or k == "num_warps"}
            self.sink(self.kernel.__name__, constexprs, compiled)
        return launch


# --- the launches: what a training run can ask of the launchers -------------------------------------------

_TOKEN_DTYPES = {"u16": torch.uint16, "u32": torch.uint32}
_X_DTYPES = {"i64": torch.int64, "i32": torch.int32}
_STRUCTURES = [(sampling, chunked, mixed, aligned)
               for sampling in ("random", "shuffle", "sequential") for chunked in (False, True)
               for mixed in (False, True) for aligned in (False, True)
               if not (aligned and chunked and sampling == "sequential")]  # sequential rows: whole-stream rings


def _stream(token_dtype: torch.dtype, num_tokens: int) -> torch.Tensor:
    """Tokens with a BOS every 13..61 positions (documents for align='bos')."""
    gen = torch.Generator().manual_seed(num_tokens)
    tokens = torch.randint(8, 1000, (num_tokens,), generator=gen, dtype=torch.int32)
    tokens[torch.cumsum(torch.randint(13, 62, (num_tokens // 13,), generator=gen), 0).clamp(max=num_tokens - 1)] = BOS
    tokens[0] = BOS
    return tokens.to(token_dtype)


def gather_case(sampling: str, token: str = "u16", x: str = "i64", B: int = 32, T: int = 1024, chunked: bool = False,
                mixed: bool = False, aligned: bool = False, step_tensor: bool = False, starts: bool = False,
                counter: bool = False):
    """One gather_batch_triton call as the loader makes it (mixture: source 1 of two, a quarter of the rows)."""
    from gpuload.documents import AlignedChunking, document_starts, sequential_row_starts, usable_document_starts
    from gpuload.kernels.triton_gather import gather_batch_triton
    from gpuload.ring import NUM_SLOTS, plan_ring, smallest_chunked_ring

    token_dtype, input_dtype = _TOKEN_DTYPES[token], _X_DTYPES[x]
    counts = [B - max(1, B // 4), max(1, B // 4)] if mixed else None
    rows = counts[1] if mixed else B
    itemsize = token_dtype.itemsize
    ring = smallest_chunked_ring(itemsize, T, rows) if chunked else None
    num_tokens = (3 * ring + 4097 if chunked else 64 * T + 4097)
    stream = _stream(token_dtype, num_tokens)
    layout = plan_ring(num_tokens, itemsize, T, rows, ring)
    kwargs = dict(out_x=torch.empty(B, T, dtype=input_dtype), out_y=torch.empty(B, T, dtype=torch.int64),
                  input_dtype=input_dtype, mixture=(counts, 1) if mixed else None)
    if chunked:
        tokens = stream[:layout.ring_tokens].clone()  # the ring's slots: contents do not matter to a compile
        kwargs.update(chunking=layout.chunking, num_slots=layout.num_slots, slot_tokens=layout.slot_tokens)
    else:
        tokens = stream
    if aligned:
        doc_starts = usable_document_starts(document_starts(stream, BOS), num_tokens, T)
        if sampling == "sequential":  # the epoch's row starts (align='bos' sequential; llm.c's order is alike)
            doc_starts = sequential_row_starts(doc_starts, T)
        kwargs["doc_starts"] = doc_starts
        if chunked:
            kwargs["aligned_chunks"] = AlignedChunking(layout.chunking, doc_starts, NUM_SLOTS)
    if starts:
        kwargs["out_starts"] = torch.empty(B, dtype=torch.int64)
    step = torch.tensor([7], dtype=torch.int64) if step_tensor else 7
    if counter:  # the loader's device step counter (static buffers, whole-stream rings: CUDA-graph capture)
        step, kwargs["step_counter"] = 0, torch.tensor([7, 0], dtype=torch.int64)
    gather_batch_triton(tokens, sampling, 1234, step, 0, B, rows, num_tokens, T, **kwargs)


def packed_case(token: str = "u16", x: str = "i64", B: int = 32, T: int = 1024):
    """One packed-rows launch (pack='bestfit') as the triton producer makes it."""
    from gpuload.kernels.triton_packed import gather_packed_triton

    tokens = _stream(_TOKEN_DTYPES[token], 8 * T + 1)
    positions = torch.randint(-1, tokens.numel(), (B, T + 1), dtype=torch.int64)
    gather_packed_triton(tokens, positions, BOS, torch.empty(B, T, dtype=_X_DTYPES[x]),
                         torch.empty(B, T, dtype=torch.int64))


def doc_info_case(x: str = "i64", B: int = 32, T: int = 1024, capacity: Optional[int] = None):
    from gpuload.kernels.triton_docs import doc_info_triton

    batch = _stream(torch.int32, B * T).to(torch.int64).view(B, T).to(_X_DTYPES[x])
    doc_info_triton(batch, BOS, capacity)


def launch_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    """(name, launch) for every launch the compile check makes; see the module docstring."""
    def name_of(kind, **kw):
        return kind + "(" + ", ".join(f"{k}={v}" for k, v in kw.items()) + ")"

    def gather(**kw):
        return name_of("gather", **kw), lambda: gather_case(**kw)

    for sampling, chunked, mixed, aligned in _STRUCTURES:
        shape = dict(sampling=sampling, chunked=chunked, mixed=mixed, aligned=aligned)
        yield gather(**shape, token="u16", x="i64")
        yield gather(**shape, token="u32", x="i32")
        yield gather(**shape, token="u32", x="i64", B=5, T=129)  # odd T: no 16-divisibility of seq_len
        yield gather(**shape, starts=True)
        if not (aligned and chunked):  # align='bos' on a chunked ring takes an int step (its pass table)
            yield gather(**shape, step_tensor=True)
        if not chunked:
            yield gather(**shape, counter=True)
    for block in (16, 32, 64, 128, 256, 512, 1024, 2048):  # _block_size: min(pow2(B*T/1024), pow2(T), 2048)
        T = max(16, block)
        B = 1 if block == 16 else -(-block * 1024 // T)
        yield gather(sampling="random", B=B, T=T)
        yield gather(sampling="shuffle", B=B, T=T, chunked=True, mixed=True, aligned=True)
    for sampling in ("random", "shuffle", "sequential"):
        yield gather(sampling=sampling, B=3, T=1)
    yield gather(sampling="random", B=70_000, T=16)  # more rows than a grid axis other than 0 allows
    for token, x, B, T in (("u16", "i64", 32, 1024), ("u32", "i32", 5, 129), ("u16", "i32", 1, 16),
                           ("u32", "i64", 64, 2048)):
        yield name_of("packed", token=token, x=x, B=B, T=T), \
            lambda token=token, x=x, B=B, T=T: packed_case(token, x, B, T)
    for x in ("i64", "i32"):
        for B, T in ((32, 1024), (5, 129), (1, 16), (3000, 2048)):
            for capacity in (None, 2 * B):
                yield name_of("doc_info", x=x, B=B, T=T, capacity=capacity), \
                    lambda x=x, B=B, T=T, capacity=capacity: doc_info_case(x, B, T, capacity)


# --- checks of the compiled code ---------------------------------------------------------------------------

def _shift_problems(ptx: str) -> list[str]:
    shifts = re.findall(r"\bshr\.([us])64\s+%rd\d+,\s*%rd\d+,\s*(\d+);", ptx)
    mix = [sign for sign, amount in shifts if amount in ("27", "30", "31")]
    problems = []
    if len(mix) < 3:
        problems.append(f"expected SplitMix64's shifts by 30, 27 and 31, found {len(mix)}")
    if "s" in mix:
        problems.append(f"{mix.count('s')} SplitMix64 shift(s) are arithmetic (shr.s64): the hash must shift logically")
    for bits in (MIX_C1_BITS, MIX_C2_BITS):
        if not re.search(rf"\bmul\.lo\.[us]64\s+%rd\d+,\s*%rd\d+,\s*{bits};", ptx):
            problems.append(f"no 64-bit multiply by the SplitMix64 constant {bits & ((1 << 64) - 1):#x}")
    return problems


def check_ptx(kernel: str, constexprs: dict, ptx: str) -> list[str]:
    """What the batch contract needs of a kernel's PTX; [] when all is well."""
    if kernel != "_gather_batch_kernel":
        return []
    problems = []
    sampling = constexprs["SAMPLING"]
    hashed = sampling in (0, 1) or constexprs["MIXED"]
    if hashed:
        problems += _shift_problems(ptx)
    if re.search(r"\brem\.s64\b", ptx):
        problems.append("a signed remainder (rem.s64): window starts are unsigned arithmetic")
    if sampling == 0 and not re.search(r"\brem\.u64\b", ptx):
        problems.append("random: no unsigned remainder (rem.u64) for (h >> 1) mod n")
    if sampling == 1:
        if not re.search(r"\bsetp\.(ge|lt|gt|le)\.u64\b", ptx):
            problems.append("shuffle: the cycle walk's comparison is not unsigned (setp.*.u64)")
        if not constexprs["ALIGNED"] or not constexprs["CHUNKED"]:
            if not re.search(r"\bdiv\.u64\b", ptx):
                problems.append("shuffle: the epoch division is not unsigned (div.u64)")
    return problems


def resource_usage(cubin: bytes) -> dict:
    """cuobjdump's REG / STACK / LOCAL of the one function in `cubin` (the tool ships with Triton's wheel)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out.stdout))
    return {key: int(value) for key, value in found.items()}


def compile_all(arch: int, cases=None) -> list[Variant]:
    """Compile every launch of `cases` (default: launch_cases()) for sm_`arch`; one Variant per distinct kernel."""
    variants: dict[str, Variant] = {}
    current = {"case": ""}

    def sink(kernel: str, constexprs: dict, compiled) -> None:
        key = compiled.hash if hasattr(compiled, "hash") else compiled.metadata.hash
        if key in variants:
            return
        variant = Variant(kernel, current["case"], constexprs)
        variant.problems = check_ptx(kernel, constexprs, compiled.asm["ptx"])
        usage = resource_usage(compiled.asm["cubin"])
        variant.registers = usage.get("REG", -1)
        if usage.get("STACK", 0) or usage.get("LOCAL", 0):
            variant.problems.append(f"register spills: stack {usage.get('STACK')} B, local {usage.get('LOCAL')} B")
        variants[key] = variant

    with compiling_for(arch, sink):
        for name, launch in (launch_cases() if cases is None else cases):
            current["case"] = name
            try:
                launch()
            except Exception as e:  # a compile error names the launch that hit it
                raise RuntimeError(f"sm_{arch}: {name} failed to compile: {type(e).__name__}: {e}") from e
    return list(variants.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS,
                        help="compute capability to compile for (repeatable; default: 90 and 80)")
    parser.add_argument("--json", help="write every variant's record to this file")
    args = parser.parse_args(argv)
    import triton

    report = {"triton": triton.__version__, "archs": {}}
    failed = False
    for arch in args.arch or ARCHS:
        t0 = time.perf_counter()
        variants = compile_all(arch)
        seconds = time.perf_counter() - t0
        bad = [v for v in variants if v.problems]
        failed |= bool(bad)
        kinds = {}
        for v in variants:
            kinds[v.kernel] = kinds.get(v.kernel, 0) + 1
        print(f"sm_{arch}: {len(variants)} variants compiled ({', '.join(f'{n} {k}' for k, n in kinds.items())}) "
              f"in {seconds:.1f} s with triton {triton.__version__}; max {max(v.registers for v in variants)} "
              f"registers; {len(bad)} with problems")
        for v in bad:
            print(f"  {v.case} {v.constexprs}: {'; '.join(v.problems)}")
        report["archs"][arch] = {"seconds": seconds, "variants": [vars(v) for v in variants]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
