#!/usr/bin/env bash
# The first run on a GPU machine, as one command: install, the CUDA tests, the GPU benchmarks; no network,
# no prompts, under 8 minutes on one H100/H200 (each step has its own time guard, and the whole run a budget).
#
#   bash benchmarks/gpu_acceptance.sh [--out DIR] [--budget SECONDS] [--dry-run]
#
# DIR (default $OUT, else ./acceptance-out) receives at most 8 files: acceptance.log (everything printed),
# summary.json (machine line, each step's status, seconds and command), kernels.json, ring.json, host.json,
# train_step.json, bench.json, bench.png. A failing or timed-out step is recorded and the next one still
# runs; the exit status is 1 if any step failed. --dry-run checks the arguments and the files the steps need, lists the
# steps with their guards, and runs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."

arguments="$*"
out="${OUT:-}"
budget=480
dry_run=0
usage="usage: bash benchmarks/gpu_acceptance.sh [--out DIR] [--budget SECONDS] [--dry-run]"
while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }; out="$2"; shift 2 ;;
        --budget) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }; budget="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) echo "$usage"; exit 0 ;;
        *) echo "gpu_acceptance: unknown argument '$1'; $usage" >&2; exit 2 ;;
    esac
done
out="${out:-acceptance-out}"
case "$budget" in ''|*[!0-9]*) echo "gpu_acceptance: --budget must be whole seconds, found '$budget'" >&2; exit 2 ;; esac
if [ "$budget" -lt 60 ]; then
    echo "gpu_acceptance: --budget $budget is too short to run anything (at least 60 s)" >&2; exit 2
fi
python=${PYTHON:-python3}
# pytest-xdist and pytest-timeout are on the GPU image; without them the tests run serially, unguarded per test.
test_options="-q -ra -p no:cacheprovider --durations=25"
"$python" -c "import xdist" 2>/dev/null && test_options="$test_options -n 8 --dist loadfile"
"$python" -c "import pytest_timeout" 2>/dev/null && test_options="$test_options --timeout 150"
# Nothing may reach for the network: pip looks at no index, and the steps find gpuload even if the install fails.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# name | guard (s) | command. The order is the order of value: the tests first, then the benchmarks. The
# guards add up to the default budget; a step that ends early leaves its time to the later ones.
steps=(
    "install|60|$python -m pip install --no-deps --no-build-isolation -e ."
    "machine|20|$python -c 'from gpuload.machine import machine_line; print(machine_line())'"
    "tests|170|$python -m pytest $test_options tests"
    "bench_kernels|45|$python benchmarks/bench_kernels.py --stream-tokens 268435456 --batch-sizes 32 256 2048 --json \$out/kernels.json"
    "bench_ring|45|$python benchmarks/bench_ring.py --shards 4 --steps 500 --json \$out/ring.json"
    "bench_host|45|$python benchmarks/bench_host.py --rounds 1 --configs whole-random,chunked-shuffle,aligned-random,mix4-random,static-whole-random,doc-whole-random --json \$out/host.json"
    "bench_train_step|50|$python benchmarks/bench_train_step.py --cache-dir \$cache --json \$out/train_step.json"
    "gpuload_bench|45|$python -m gpuload bench --cache-dir \$cache --batch-size 32 --steps 100 --json \$out/bench.json --plot \$out/bench.png"
)

# What the steps need from the machine's Python, checked before anything runs (and by --dry-run).
preflight() {
    "$python" - <<'PY'
import importlib, sys
needed = {"torch": "torch", "triton": "triton", "numpy": "numpy", "pyarrow": "pyarrow", "tiktoken": "tiktoken",
          "setuptools": "setuptools", "pybind11": "pybind11", "pytest": "pytest", "pytest_benchmark": "pytest-benchmark",
          "matplotlib": "matplotlib"}
missing = []
for module, package in needed.items():
    try:
        importlib.import_module(module)
    except Exception as e:
        missing.append(f"{package} ({type(e).__name__})")
import setuptools
major = int(setuptools.__version__.split(".")[0])
if major < 77:
    missing.append(f"setuptools >= 77 (found {setuptools.__version__}: pyproject's license field needs it)")
print("preflight: " + ("all present" if not missing else "missing " + ", ".join(missing)))
sys.exit(1 if missing else 0)
PY
}

for file in setup.py tests benchmarks/bench_kernels.py benchmarks/bench_ring.py benchmarks/bench_train_step.py; do
    [ -e "$file" ] || { echo "gpu_acceptance: $file is missing: run from a checkout of gpuload" >&2; exit 2; }
done
mkdir -p "$out" 2>/dev/null && [ -w "$out" ] || { echo "gpu_acceptance: cannot write to --out $out" >&2; exit 2; }
out="$(cd "$out" && pwd)"
cache="${TMPDIR:-/tmp}/gpuload-acceptance-cache"  # the demo dataset: outside $out, which comes back whole

if [ "$dry_run" = 1 ]; then
    echo "gpu_acceptance: dry run; output to $out, budget ${budget}s, python: $python"
    preflight || echo "  (on the GPU machine these must all be present; the steps that need a missing one fail)"
    total=0
    for step in "${steps[@]}"; do
        IFS='|' read -r name guard command <<<"$step"
        total=$((total + guard))
        printf '  %-17s guard %4ss  %s\n' "$name" "$guard" "$(eval echo "\"$command\"")"
    done
    echo "  guards add up to ${total}s; steps past the budget are skipped and recorded as such"
    exit 0
fi

log="$out/acceptance.log"
records="$(mktemp)"
: >"$log"
preflight 2>&1 | tee -a "$log"
start=$(date +%s)
failed=0
for step in "${steps[@]}"; do
    IFS='|' read -r name guard command <<<"$step"
    left=$((budget - ($(date +%s) - start)))
    command="$(eval echo "\"$command\"")"
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped, ${left}s of the ${budget}s budget left" | tee -a "$log"
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "skipped (budget)" 0 "$guard" "$command" >>"$records"
        continue
    fi
    limit=$(( guard < left ? guard : left ))
    echo "== $name (guard ${limit}s): $command" | tee -a "$log"
    t0=$(date +%s)
    PYTHONUNBUFFERED=1 timeout --kill-after=10 "$limit" bash -c "$command" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    seconds=$(( $(date +%s) - t0 ))
    case "$rc" in
        0) status=ok ;;
        124|137) status="timed out after ${limit}s"; failed=1 ;;
        *) status="failed (exit $rc)"; failed=1 ;;
    esac
    echo "== $name: $status in ${seconds}s" | tee -a "$log"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$seconds" "$limit" "$command" >>"$records"
done

"$python" - "$records" "$out/summary.json" "$budget" "$arguments" <<'EOF' 2>&1 | tee -a "$log"
import json, sys
records, path, budget, arguments = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
steps = []
with open(records) as f:
    for line in f:
        name, status, seconds, guard, command = line.rstrip("\n").split("\t", 4)
        steps.append({"step": name, "status": status, "seconds": int(seconds), "guard_s": int(guard), "command": command})
try:
    from gpuload.machine import machine_info, machine_line
    machine = machine_info()
    line = machine_line(machine)
except Exception as e:  # the install step failed: say so instead of hiding the summary
    machine, line = None, f"machine unknown ({type(e).__name__}: {e})"
summary = {"command": f"bash benchmarks/gpu_acceptance.sh {arguments}".strip(), "budget_s": budget,
           "machine": machine, "machine_line": line, "steps": steps}
with open(path, "w") as f:
    json.dump(summary, f, indent=2)
print(line)
for s in steps:
    print(f"  {s['step']:<17} {s['status']:<24} {s['seconds']:>4}s")
EOF
rm -f "$records"
exit "$failed"
