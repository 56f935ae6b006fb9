"""Memory and CPU of a loader's processes, read from /proc (Linux): the process tree, RSS, PSS, CPU seconds.

RSS counts every page a process maps, shared ones in full in each process, so the RSS of a loader and
its forked workers added up overstates what they cost; PSS divides each shared page among the
processes that map it, so PSS sums. Both count the page-cache pages of memory-mapped shards a process
has touched. Where /proc is absent every number is None and the table shows '-'.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (every thread's children: a worker may be forked from any thread)."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return found


def descendants(pid: Optional[int] = None) -> set[int]:
    """Every live process below `pid` (default: this process), at any depth."""
    todo, seen = [os.getpid() if pid is None else pid], set()
    while todo:
        for child in children(todo.pop()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc (Linux); 0 when it is gone or /proc is absent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


def rss_pss(pid: int) -> tuple[Optional[int], Optional[int]]:
    """(RSS, PSS) bytes of a live process; (None, None) when it is gone or /proc has no smaps_rollup."""
    values = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    values[key] = int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError):
        return None, None
    return values.get("Rss"), values.get("Pss")


def total_rss_pss(pids: Iterable[int]) -> tuple[Optional[int], Optional[int]]:
    """RSS and PSS of `pids` added up, skipping processes that are gone; None when none could be read."""
    rss = pss = None
    for pid in pids:
        r, p = rss_pss(pid)
        if r is not None:
            rss = (rss or 0) + r
        if p is not None:
            pss = (pss or 0) + p
    return rss, pss
