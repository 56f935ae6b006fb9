"""Data mixtures: how many rows of each global batch each source gets, and which rows.

Counts are fixed for a run: source k gets c_k = G * w_k rounded by largest remainder (floor first,
then one more row to the sources with the largest fractional parts, ties to the earlier source), so
the counts sum to G exactly. Computed with exact fractions of the weights as given: no float rounding
decides a tie. The realized share of source k is c_k / G, within 1/G of w_k / sum(w).

Which global rows go to which source at step s is a pure function of (seed, s), like window starts:
    h_g     = mix64(mix64(mix64(seed ^ SALT_MIXTURE) + s) + g)     for every g in [0, G)
    slot(g) = the rank of h_g among h_0 .. h_{G-1}, as unsigned 64-bit values (mix64 is a bijection,
              so no two rows tie)
    row g goes to source k when cum_k <= slot(g) < cum_{k+1} (cum_k = c_0 + ... + c_{k-1}),
    and is row slot(g) - cum_k of that source at step s
(arithmetic modulo 2**64, as in gpuload/sampling.py). Each source thus sees, every step, its own
global batch of c_k rows indexed 0 .. c_k - 1, and keeps its own sampling position with the usual
contract: `window_starts(sampling, seed, s, index, c_k, N_k, T)`. A sort of G hashes rather than
sampling.feistel_permute: for all rows of a step at G = 512 (one thread of a 2-core VM), the Feistel
network's cycle walk took 3.7 ms, this whole function 0.3 ms.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Mapping, Optional, Sequence, Union

import torch

from gpuload.sampling import check_domain, mix64, mix64_int, to_signed

SALT_MIXTURE = 0xBE5466CF34E90C6C  # more digits of pi, unlike every other salt: fixed forever

Weights = Union[Mapping[str, float], Sequence[float]]


def _weight_list(weights: Weights) -> list[tuple[str, Fraction]]:
    if isinstance(weights, Mapping):
        items = list(weights.items())
    elif isinstance(weights, (list, tuple)):
        items = [(f"weights[{i}]", w) for i, w in enumerate(weights)]
    else:
        raise ValueError(f"mixture weights must be a dict {{source: weight}} or a list of weights, found "
                         f"{type(weights).__name__}")
    if not items:
        raise ValueError("mixture weights are empty; give one positive weight per source")
    out = []
    for name, w in items:
        if isinstance(w, bool) or not isinstance(w, (int, float)) and not hasattr(w, "__float__"):
            raise ValueError(f"mixture weight of {name!r} must be a number, found {type(w).__name__} {w!r}")
        value = float(w)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"mixture weight of {name!r} must be positive and finite, found {w!r}; drop the "
                             f"source instead of giving it weight 0")
        out.append((name, Fraction(w) if isinstance(w, int) else Fraction(value)))
    return out


def mixture_counts(weights: Weights, global_batch: int) -> list[int]:
    """Rows of each global batch per source, in source order: largest-remainder rounding of G * w / sum(w).

    Weights need not sum to 1 (they are normalized). A source whose share of G rounds to 0 gets no rows;
    the loader decides whether that is an error.
    """
    items = _weight_list(weights)
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"mixture_counts: global_batch must be a positive int, found {global_batch!r}")
    total = sum(w for _, w in items)
    quotas = [global_batch * w / total for _, w in items]
    counts = [q.numerator // q.denominator for q in quotas]
    # Largest fractional part first; sorted() is stable, so equal parts keep source order.
    order = sorted(range(len(items)), key=lambda k: quotas[k] - counts[k], reverse=True)
    for k in order[:global_batch - sum(counts)]:
        counts[k] += 1
    return counts


def _check_counts(counts: Sequence[int]) -> list[int]:
    counts = list(counts)
    if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts) or sum(counts) < 1:
        raise ValueError(f"mixture counts must be non-negative ints summing to the global batch (mixture_counts), "
                         f"found {counts!r}")
    return counts


def mixture_rows(seed: int, step: int, counts: Sequence[int], rows: Optional[torch.Tensor] = None,
                 device: Optional[Union[str, torch.device]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, index) for global rows `rows` (default: all G = sum(counts)) at `step`, int64 each.

    source[i] is the source of row rows[i]; index[i] its row among that source's c_k rows of the step.
    `rows` decides the device (else `device`, default CPU).
    """
    counts = _check_counts(counts)
    global_batch = sum(counts)
    check_domain(step, global_batch, 0)  # the step's domain; no tokens are involved
    if rows is None:
        rows = torch.arange(global_batch, dtype=torch.int64, device=device)
    rows = rows.to(torch.int64)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= global_batch):
        raise ValueError(f"mixture_rows: rows must be in [0, {global_batch}) (the global batch), found "
                         f"[{int(rows.min())}, {int(rows.max())}]")
    key = mix64_int(mix64_int(seed ^ SALT_MIXTURE) + step)
    every_row = torch.arange(global_batch, dtype=torch.int64, device=rows.device)
    # Flipping the sign bit makes int64 order the unsigned order.
    hashes = mix64(every_row + to_signed(key)) ^ to_signed(1 << 63)
    order = torch.sort(hashes).indices
    slot = torch.empty_like(order)
    slot[order] = every_row
    slot = slot[rows]
    sizes = torch.tensor(counts, dtype=torch.int64, device=rows.device)
    source_of_slot = torch.repeat_interleave(torch.arange(len(counts), device=rows.device), sizes)
    source = source_of_slot[slot]
    first = sizes.cumsum(0) - sizes
    return source, slot - first[source]


def mixture_assignment(seed: int, step: int, counts: Sequence[int], rows: Optional[torch.Tensor] = None,
                       device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Source index (int64) of each global row at `step`: exactly counts[k] rows of the G go to source k."""
    return mixture_rows(seed, step, counts, rows, device)[0]


def source_row_index(seed: int, step: int, counts: Sequence[int], rows: Optional[torch.Tensor] = None,
                     device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Each global row's index among the rows of its source at `step`: 0 .. counts[k] - 1 within source k."""
    return mixture_rows(seed, step, counts, rows, device)[1]
