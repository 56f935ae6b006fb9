"""Every kernel variant the launchers produce compiles to cubin for sm_90 and sm_80, without a GPU, and the
generated code keeps the contract's unsigned arithmetic and spills nothing (gpuload/kernels/offline.py)."""

import json
import os
import subprocess
import sys

import pytest

from gpuload.kernels.offline import ARCHS, MIX_C1_BITS, MIX_C2_BITS, check_ptx

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """gpuload.kernels.offline run once per arch, the archs in parallel, each in a fresh process without the
    interpreter and with an empty Triton cache (so every variant really goes through ptxas)."""
    directory = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = {}
    for arch in ARCHS:
        out = directory / f"sm_{arch}.json"
        runs[arch] = (out, subprocess.Popen(
            [sys.executable, "-m", "gpuload.kernels.offline", "--arch", str(arch), "--json", str(out)],
            env={**env, "TRITON_CACHE_DIR": str(directory / f"cache_{arch}")},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for arch, (out, process) in runs.items():
        stdout, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, f"sm_{arch}:\n{stdout}\n{stderr[-4000:]}"
        with open(out) as f:
            results[arch] = (stdout, json.load(f)["archs"][str(arch)]["variants"])
    return results


@pytest.mark.parametrize("arch", ARCHS)
def test_every_variant_compiles_without_problems(compiled, arch):
    stdout, variants = compiled[arch]
    assert f"sm_{arch}:" in stdout and "0 with problems" in stdout, stdout
    assert all(v["problems"] == [] for v in variants)
    gathers = [v["constexprs"] for v in variants if v["kernel"] == "_gather_batch_kernel"]
    structures = {(c["SAMPLING"], c["CHUNKED"], c["MIXED"], c["ALIGNED"]) for c in gathers}
    assert len(structures) == 22  # 3 modes x whole/chunked x mixture; align='bos' (sequential: whole-stream only)
    assert {c["BLOCK"] for c in gathers} == {16, 32, 64, 128, 256, 512, 1024, 2048}
    assert {c["num_warps"] for c in gathers} == {1, 2, 4, 8}
    assert {(c["STEP_FROM_PTR"], c["ADVANCE_STEP"], c["WRITE_STARTS"]) for c in gathers} >= {
        (False, False, False), (True, False, False), (True, True, False), (False, False, True)}
    others = {v["kernel"] for v in variants} - {"_gather_batch_kernel"}
    assert others == {"_count_segments_kernel", "_doc_info_kernel", "_packed_gather_kernel"}


def mix64_ptx(shift_kind="u64"):
    """The PTX shape of one SplitMix64 round as ptxas sees it from the kernel."""
    return "\n".join([
        f"shr.{shift_kind} %rd2, %rd1, 30;", f"mul.lo.s64 %rd3, %rd2, {MIX_C1_BITS};",
        f"shr.{shift_kind} %rd4, %rd3, 27;", f"mul.lo.s64 %rd5, %rd4, {MIX_C2_BITS};", f"shr.{shift_kind} %rd6, %rd5, 31;",
        "rem.u64 %rd7, %rd6, %rd9;", "setp.ge.u64 %p1, %rd7, %rd9;", "div.u64 %rd8, %rd7, %rd9;"])


RANDOM = {"SAMPLING": 0, "CHUNKED": False, "MIXED": False, "ALIGNED": False}
SHUFFLE = {**RANDOM, "SAMPLING": 1}


def test_ptx_check_accepts_the_unsigned_hash():
    assert check_ptx("_gather_batch_kernel", RANDOM, mix64_ptx()) == []
    assert check_ptx("_gather_batch_kernel", SHUFFLE, mix64_ptx()) == []


@pytest.mark.parametrize("ptx,constexprs,problem", [
    (mix64_ptx("s64"), RANDOM, "arithmetic"),
    (mix64_ptx().replace("rem.u64", "rem.s64"), RANDOM, "signed remainder"),
    (mix64_ptx().replace("rem.u64", "mul.lo.s64"), RANDOM, "no unsigned remainder"),
    (mix64_ptx().replace("setp.ge.u64", "setp.ge.s64"), SHUFFLE, "cycle walk"),
    (mix64_ptx().replace("div.u64", "div.s64"), SHUFFLE, "epoch division"),
    (mix64_ptx().replace(str(MIX_C1_BITS), "12345"), RANDOM, "constant 0xbf58476d1ce4e5b9"),
    ("\n".join(mix64_ptx().splitlines()[1:]), RANDOM, "shifts by 30, 27 and 31"),
])
def test_ptx_check_catches_signed_or_missing_hash_ops(ptx, constexprs, problem):
    problems = check_ptx("_gather_batch_kernel", constexprs, ptx)
    assert any(problem in p for p in problems), problems
