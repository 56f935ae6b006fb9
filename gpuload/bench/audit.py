"""`gpuload bench --audit`: does each loader resume exactly mid-epoch, repeat itself, and resume on more ranks?

On the small demo dataset (2 x 1M uint16 tokens), a global batch of G = 8 rows of T = 64 tokens, seed 0:

- exact resume mid-epoch: one rank runs K + NEXT batches, saving its state_dict() after batch K; a fresh
  loader restores it, and its NEXT batches must equal the run's batches K .. K+NEXT.
- deterministic: a second run from scratch gives the same K + NEXT batches.
- elastic 2 -> 4: 2 ranks of G/2 rows run K + NEXT steps (states saved after step K). 4 ranks of G/4 rows
  from scratch must give the same global batches (the ranks' rows in rank order), and 4 fresh ranks, new
  rank r restoring the state of old rank r % 2, must continue with the 2-rank run's global batches
  K .. K+NEXT. A loader whose state is per rank has no better mapping: a new rank has no state of its own.

A peer that reads its rank from the environment (litdata: WORLD_SIZE, GLOBAL_RANK) is built with that
environment; mosaicml-streaming's ranks meet in shared memory and torch.distributed, so each of its ranks runs
in its own process, all ranks of a world at once, with a rendezvous on the loopback as torchrun sets it. The others are built with rank and world_size, one rank after another.
A "no" says what differed: other rows, or the same rows in another order.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from gpuload.bench.dataset import demo_dataset
from gpuload.bench.providers import GPULOAD_BACKENDS, NoState, convert_for, make_provider, provider_class
from gpuload.machine import benchmark_result, machine_info, machine_line

GLOBAL_BATCH, SEQ_LEN, SEED = 8, 64, 0
SAVE_AT, NEXT = 7, 10  # state saved after batch 7, then 10 batches compared
CHECKS = ("resume", "deterministic", "elastic")
HEADINGS = {"resume": "exact resume mid-epoch", "deterministic": "deterministic", "elastic": "elastic 2 -> 4"}


@dataclass(frozen=True)
class Unsaved:
    """What a rank returns instead of a state when its loader cannot save one."""

    reason: str


@contextmanager
def environment(variables: dict):
    """`variables` set in os.environ for the duration, then put back as they were."""
    before = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_rank(name: str, shards, world_size: int, rank: int, steps: int, save_at: Optional[int], state, device,
             cache_dir: Optional[str]):
    """(x of each of `steps` batches as int64 arrays, state saved after `save_at` batches) of one rank's loader,
    built and run with the environment its peer reads the rank from (rank_env)."""
    with environment(provider_class(name).rank_env(rank, world_size)):
        return _run_rank(name, shards, world_size, rank, steps, save_at, state, device, cache_dir)


def _run_rank(name, shards, world_size, rank, steps, save_at, state, device, cache_dir):
    from gpuload.bench.runner import check_batch

    batch_size = GLOBAL_BATCH // world_size
    provider = make_provider(name, shards, batch_size, SEQ_LEN, device, seed=SEED, rank=rank, world_size=world_size,
                             cache_dir=cache_dir)
    saved, xs = None, []
    try:
        if state is not None:
            provider.load_state_dict(state)
        for step in range(steps + 1):
            if step == save_at:
                try:
                    saved = provider.state_dict()
                except NoState as e:
                    saved = Unsaved(str(e))
            if step == steps:
                break
            batch = provider()
            check_batch(name, batch, batch_size, SEQ_LEN, device)
            xs.append(batch[0].cpu().numpy())
    finally:
        provider.close()
    return xs, saved


def _rank_process(job):
    """run_rank in a process of its own (a ProcessPoolExecutor job), with the rendezvous of its world."""
    args, rendezvous = job
    os.environ.update(rendezvous)
    return run_rank(*args)


def _rendezvous() -> dict:
    """MASTER_ADDR and a free MASTER_PORT on the loopback: torch.distributed's env:// rendezvous, which a peer
    whose ranks meet through torch.distributed (mosaicml-streaming) initializes as torchrun would have."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(s.getsockname()[1])}


def run_world(name: str, shards, world_size: int, steps: int, device, cache_dir: Optional[str],
              save_at: Optional[int] = None, states: Optional[list] = None):
    """(global batches: the ranks' x stacked in rank order, per step; the states each rank saved)."""
    jobs = [(name, shards, world_size, rank, steps, save_at, None if states is None else states[rank], device,
             cache_dir) for rank in range(world_size)]
    if provider_class(name).ranks_in_processes:
        # spawn: a forked copy of this process would inherit its threads' locks and its DataLoader state.
        rendezvous = _rendezvous()
        with ProcessPoolExecutor(max_workers=world_size, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_rank_process, [(job, rendezvous) for job in jobs]))
    else:
        results = [run_rank(*job) for job in jobs]
    batches = [np.concatenate([xs[step] for xs, _ in results]) for step in range(steps)]
    return batches, [saved for _, saved in results]


def compare(got: list, want: list) -> Optional[str]:
    """None when the batches are equal, else what differs: other rows, or the same rows in another order."""
    different = [i for i, (a, b) in enumerate(zip(got, want)) if not np.array_equal(a, b)]
    if not different and len(got) == len(want):
        return None
    first = different[0] if different else min(len(got), len(want))
    rows_got = Counter(row.tobytes() for batch in got for row in batch)
    rows_want = Counter(row.tobytes() for batch in want for row in batch)
    if rows_got == rows_want:
        return f"the same rows in another order (from batch {first})"
    shared = sum((rows_got & rows_want).values()) / max(1, sum(rows_want.values()))
    return f"other rows from batch {first} ({shared:.0%} of the expected rows among them)"


def _failure(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"


def audit_provider(name: str, shards, device, cache_dir: Optional[str]) -> dict:
    """The audit row of provider `name`: each check 'yes' or 'no: why'."""
    row = {"provider": name, "sampling": provider_class(name).sampling}
    start = time.perf_counter()
    convert_for(name, shards, SEQ_LEN, cache_dir)  # once, before any run: the ranks' processes reuse it
    steps = SAVE_AT + NEXT
    try:
        first, (saved,) = run_world(name, shards, 1, steps, device, cache_dir, save_at=SAVE_AT)
    except Exception as e:
        row.update({check: f"no: a run from scratch raised {_failure(e)}" for check in CHECKS})
        row["seconds"] = time.perf_counter() - start
        return row

    if isinstance(saved, Unsaved):
        row["resume"] = f"no: {saved.reason}"
    else:
        try:
            resumed, _ = run_world(name, shards, 1, NEXT, device, cache_dir, states=[saved])
            why = compare(resumed, first[SAVE_AT:])
            row["resume"] = "yes" if why is None else f"no: restored after batch {SAVE_AT}: {why}"
        except Exception as e:
            row["resume"] = f"no: restoring the state raised {_failure(e)}"

    try:
        again, _ = run_world(name, shards, 1, steps, device, cache_dir)
        why = compare(again, first)
        row["deterministic"] = "yes" if why is None else f"no: a second run from scratch: {why}"
    except Exception as e:
        row["deterministic"] = f"no: a second run raised {_failure(e)}"

    if isinstance(saved, Unsaved):
        row["elastic"] = f"no: {saved.reason}"
    else:
        row["elastic"] = _elastic(name, shards, device, cache_dir, steps)
    row["seconds"] = time.perf_counter() - start
    return row


def _elastic(name: str, shards, device, cache_dir: Optional[str], steps: int) -> str:
    problems = []
    try:
        two, states = run_world(name, shards, 2, steps, device, cache_dir, save_at=SAVE_AT)
    except Exception as e:
        return f"no: 2 ranks raised {_failure(e)}"
    try:
        four, _ = run_world(name, shards, 4, steps, device, cache_dir)
        why = compare(four, two)
        if why is not None:
            problems.append(f"4 ranks from scratch against 2: {why}")
    except Exception as e:
        problems.append(f"4 ranks from scratch raised {_failure(e)}")
    try:
        resumed, _ = run_world(name, shards, 4, NEXT, device, cache_dir,
                               states=[states[rank % 2] for rank in range(4)])
        why = compare(resumed, two[SAVE_AT:])
        if why is not None:
            problems.append(f"2 ranks' states after step {SAVE_AT} resumed on 4: {why}")
    except Exception as e:
        problems.append(f"resuming 2 ranks' states on 4 raised {_failure(e)}")
    return "yes" if not problems else "no: " + "; ".join(problems)


def format_audit(rows: list[dict]) -> str:
    width = max(len("provider"), *(len(r["provider"]) for r in rows))
    cells = {check: max(len(HEADINGS[check]), 3) for check in CHECKS}
    lines = [f"{'provider':<{width}}  {'reads':<15} " + " ".join(f"{HEADINGS[c]:<{cells[c]}}" for c in CHECKS)
             + "  seconds"]
    for r in rows:
        lines.append(f"{r['provider']:<{width}}  {r['sampling']:<15} "
                     + " ".join(f"{r[c].split(':')[0]:<{cells[c]}}" for c in CHECKS) + f"  {r['seconds']:>7.1f}")
    for r in rows:
        for c in CHECKS:
            if r[c] != "yes":
                lines.append(f"  {r['provider']}, {HEADINGS[c]}: {r[c][len('no: '):]}")
    return "\n".join(lines)


def run_audit(cache_dir: Optional[str] = None, device: Optional[str] = None,
              providers: Optional[Sequence[str]] = None, json_path: Optional[str] = None,
              argv: Optional[Sequence[str]] = None) -> dict:
    """Audit every provider that can run here (or those named); print the table; 'status' is 1 when one of
    gpuload's own rows has a 'no' (a bug in gpuload), else 0."""
    from gpuload.bench.runner import check_output, choose_providers, parse_device

    check_output("--json", json_path, ".json")
    dev = parse_device(device)
    names, skipped = choose_providers(providers, dev)
    demo = demo_dataset(cache_dir, quick=True)
    from gpuload.shards import TokenStream

    stream = TokenStream(demo.paths)
    shards = stream.shards
    stream.close()
    rows = []
    for name in names:
        print(f"gpuload: audit {name} ...", file=sys.stderr, flush=True)
        rows.append(audit_provider(name, shards, dev, cache_dir))
    machine = machine_info()
    print(f"audit on {demo.directory}: {demo.num_tokens:,} tokens; global batch {GLOBAL_BATCH} x T={SEQ_LEN}, seed "
          f"{SEED}; state saved after batch {SAVE_AT}, {NEXT} batches compared; elastic: 2 ranks of "
          f"{GLOBAL_BATCH // 2} rows -> 4 of {GLOBAL_BATCH // 4}, new rank r restores old rank r % 2; on {dev}")
    print(format_audit(rows))
    for s in skipped:
        print(f"skipped {s['provider']}: {s['reason']}")
    print(machine_line(machine))
    broken = [r["provider"] for r in rows if r["provider"] in GPULOAD_BACKENDS and any(r[c] != "yes" for c in CHECKS)]
    if broken:
        print(f"gpuload: error: {', '.join(broken)} failed the audit: gpuload promises yes everywhere; please "
              f"report it with the table above", file=sys.stderr)
    result = benchmark_result("bench-audit", argv, json_path, program="gpuload", machine=machine,
                              settings={"global_batch": GLOBAL_BATCH, "seq_len": SEQ_LEN, "seed": SEED,
                                        "save_at": SAVE_AT, "next": NEXT, "device": str(dev),
                                        "dataset": demo.directory, "num_tokens": demo.num_tokens},
                              rows=rows, skipped=skipped)
    result["status"] = 1 if broken else 0
    if json_path:
        print(f"wrote {json_path}")
    sys.stdout.flush()
    return result
