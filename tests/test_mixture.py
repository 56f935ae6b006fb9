"""Mixture row counts and row-to-source assignment vs exact-fraction and scalar oracles."""

import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from gpuload import native
from gpuload.mixture import SALT_MIXTURE, mixture_assignment, mixture_counts, mixture_rows, source_row_index
from gpuload.sampling import mix64_int


def oracle_counts(weights, global_batch):
    """Largest remainder written out: floors, then +1 by descending fraction, ties to the earlier source."""
    ws = [Fraction(w) for w in weights]
    quotas = [global_batch * w / sum(ws) for w in ws]
    counts = [int(q) for q in quotas]
    ranked = sorted(range(len(ws)), key=lambda k: (-(quotas[k] - counts[k]), k))
    for k in ranked[:global_batch - sum(counts)]:
        counts[k] += 1
    return counts


def oracle_slots(step, seed, global_batch):
    """Each row's rank by its unsigned 64-bit hash, from the definition in mixture.py's docstring."""
    key = mix64_int(mix64_int(seed ^ SALT_MIXTURE) + step)
    hashes = [mix64_int(key + g) for g in range(global_batch)]
    order = sorted(range(global_batch), key=lambda g: hashes[g])
    return [order.index(g) for g in range(global_batch)]


# --- counts -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights,global_batch,want", [
    ({"web": 0.7, "code": 0.3}, 8, [6, 2]),      # 5.6 / 2.4: the larger remainder takes the spare row
    ({"web": 0.7, "code": 0.3}, 10, [7, 3]),
    ([1, 1, 1], 4, [2, 1, 1]),                    # tie: the earlier source
    ([1, 1, 1], 5, [2, 2, 1]),
    ([0.1, 0.2, 0.7], 10, [1, 2, 7]),             # float weights whose sum is not exactly 1
    ([3, 1], 1, [1, 0]),
    ([1, 3], 1, [0, 1]),
    ([1e-9, 1.0], 4, [0, 4]),                     # a share that rounds to 0 gets no rows
    ([2.5, 2.5, 5.0], 2, [1, 0, 1]),          # .5 .5 1.0: the tie for the spare row goes first
    ([1, 1], 3, [2, 1]),
])
def test_counts_examples(weights, global_batch, want):
    assert mixture_counts(weights, global_batch) == want


def test_counts_equal_oracle_and_sum_to_global_batch():
    rng = random.Random(0)
    for trial in range(2000):
        k = rng.randint(1, 7)
        weights = [rng.choice([rng.random() + 1e-6, rng.randint(1, 9), 1 / rng.randint(1, 7)]) for _ in range(k)]
        global_batch = rng.choice([1, 2, 3, 7, 8, 24, 64, 100, 512, 1000, rng.randint(1, 5000)])
        counts = mixture_counts(weights, global_batch)
        assert counts == oracle_counts(weights, global_batch), (weights, global_batch)
        assert sum(counts) == global_batch
        total = sum(Fraction(w) for w in weights)
        for c, w in zip(counts, weights):
            assert abs(c - global_batch * Fraction(w) / total) < 1  # each count is the floor or the ceiling


def test_counts_from_dict_keep_source_order_and_ignore_scale():
    assert mixture_counts({"a": 1, "b": 2, "c": 1}, 8) == [2, 4, 2]
    assert mixture_counts({"c": 1, "b": 2, "a": 1}, 8) == [2, 4, 2]
    assert mixture_counts({"a": 0.25, "b": 0.5, "c": 0.25}, 8) == mixture_counts([10, 20, 10], 8)
    assert mixture_counts(np.array([0.3, 0.7]).tolist(), 10) == [3, 7]
    assert mixture_counts([np.float32(0.5), np.int64(1)], 3) == [1, 2]


@pytest.mark.parametrize("weights,global_batch,match", [
    ({}, 8, "weights are empty"),
    ([], 8, "weights are empty"),
    ({"web": 0.0, "code": 1.0}, 8, "'web' must be positive and finite, found 0.0"),
    ([1.0, -1.0], 8, r"'weights\[1\]' must be positive"),
    ([1.0, float("nan")], 8, "positive and finite"),
    ([1.0, float("inf")], 8, "positive and finite"),
    ([1.0, True], 8, "must be a number, found bool"),
    ({"web": "0.7"}, 8, "must be a number, found str"),
    ("0.7,0.3", 8, "must be a dict"),
    ([1.0], 0, "global_batch must be a positive int"),
    ([1.0], 2.0, "global_batch must be a positive int"),
    ([1.0], True, "global_batch must be a positive int"),
])
def test_counts_reject_bad_weights(weights, global_batch, match):
    with pytest.raises(ValueError, match=match):
        mixture_counts(weights, global_batch)


# --- assignment ---------------------------------------------------------------------------------

@pytest.mark.parametrize("weights,global_batch", [([0.7, 0.3], 8), ([0.5, 0.3, 0.2], 24), ([1], 5),
                                                  ([0.6, 0.25, 0.1, 0.05], 64), ([1, 1], 1), ([1, 2, 3], 7)])
def test_every_step_assigns_exact_counts_and_each_source_indexes_0_to_c(weights, global_batch):
    counts = mixture_counts(weights, global_batch)
    # Sorted by (source, index), the rows must read 0 .. c_0 - 1 of source 0, then source 1's, ...
    want = torch.cat([k * global_batch + torch.arange(c) for k, c in enumerate(counts)])
    for step in range(300):
        source, index = mixture_rows(17, step, counts)
        assert source.dtype == torch.int64 and index.dtype == torch.int64
        assert torch.equal(torch.sort(source * global_batch + index).values, want)


@pytest.mark.parametrize("seed", [0, 5, 2**64 - 1, -3])
def test_assignment_equals_scalar_oracle(seed):
    counts = [5, 0, 9, 2]
    bounds = np.cumsum([0] + counts)
    for step in (0, 1, 99, 2**50 + 1):
        source, index = mixture_rows(seed, step, counts)
        slots = oracle_slots(step, seed, sum(counts))
        want_source = [int(np.searchsorted(bounds, s, side="right")) - 1 for s in slots]
        assert source.tolist() == want_source
        assert index.tolist() == [s - int(bounds[k]) for s, k in zip(slots, want_source)]


def test_assignment_is_deterministic_and_changes_with_step_and_seed():
    counts = mixture_counts([0.5, 0.3, 0.2], 32)
    first = [mixture_assignment(3, s, counts) for s in range(50)]
    again = [mixture_assignment(3, s, counts) for s in range(50)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len({tuple(a.tolist()) for a in first}) == 50  # every step its own assignment
    assert not torch.equal(mixture_assignment(4, 0, counts), first[0])


def test_rows_subset_matches_the_global_assignment():
    # A rank asks for its own rows and gets what the whole global batch says about them.
    counts = mixture_counts({"web": 0.7, "code": 0.2, "math": 0.1}, 40)
    for step in (0, 3, 11):
        source, index = mixture_rows(8, step, counts)
        for rank in range(4):
            rows = torch.arange(rank * 10, rank * 10 + 10)
            assert torch.equal(mixture_assignment(8, step, counts, rows), source[rows])
            assert torch.equal(source_row_index(8, step, counts, rows), index[rows])


def test_each_row_position_visits_sources_in_proportion():
    # Over many steps, global row g belongs to source k about counts[k] / G of the time: rows are mixed,
    # not a fixed split of the batch.
    counts = mixture_counts([0.75, 0.25], 8)
    steps = 1000
    hits = torch.zeros(8, dtype=torch.int64)
    for step in range(steps):
        hits += (mixture_assignment(1, step, counts) == 1).to(torch.int64)
    # p = 0.25 over 1000 steps: 250 expected per row, sd ~14; 6 sd bounds.
    assert int(hits.min()) > 250 - 82 and int(hits.max()) < 250 + 82


def test_token_proportions_over_a_long_run_are_within_one_percent_of_weights():
    seq_len = 64
    for weights, global_batch in [({"web": 0.7, "code": 0.2, "math": 0.1}, 128), ([0.75, 0.25], 8),
                                  ([0.55, 0.3, 0.15], 100), ([5, 3, 2], 200)]:
        names = list(weights) if isinstance(weights, dict) else list(range(len(weights)))
        values = list(weights.values()) if isinstance(weights, dict) else weights
        counts = mixture_counts(weights, global_batch)
        tokens = torch.zeros(len(names), dtype=torch.int64)
        for step in range(150):
            tokens += torch.bincount(mixture_assignment(2, step, counts), minlength=len(names)) * seq_len
        shares = tokens.double() / tokens.sum()
        for share, w in zip(shares.tolist(), values):
            assert abs(share - w / sum(values)) <= 0.01, (weights, global_batch, shares)


def test_assignment_rejects_bad_counts_rows_and_steps():
    with pytest.raises(ValueError, match="non-negative ints summing"):
        mixture_assignment(0, 0, [3, -1])
    with pytest.raises(ValueError, match="non-negative ints summing"):
        mixture_assignment(0, 0, [0, 0])
    with pytest.raises(ValueError, match="non-negative ints summing"):
        mixture_assignment(0, 0, [1.0, 2])
    with pytest.raises(ValueError, match=r"rows must be in \[0, 4\)"):
        mixture_assignment(0, 0, [3, 1], rows=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="step must be"):
        mixture_assignment(0, -1, [3, 1])


def test_salts_are_distinct():
    # Each counter-based stream has its own salt, so no two of them coincide for the same seed.
    from gpuload import documents, sampling

    # By name: documents.py imports sampling's SALT_CHUNKS, which is one salt, not two.
    salts = {k: v for module in (sampling, documents) for k, v in vars(module).items() if k.startswith("SALT_")}
    salts["SALT_MIXTURE"] = SALT_MIXTURE
    assert len(salts) >= 5 and len(set(salts.values())) == len(salts)


@pytest.mark.skipif(not native.available(), reason="native extension not built")
def test_native_rows_equal_the_torch_rule():
    rng = random.Random(3)
    for trial in range(300):
        counts = [rng.randint(0, 40) for _ in range(rng.randint(1, 5))]
        counts[rng.randrange(len(counts))] += 1
        total = sum(counts)
        row0 = rng.randrange(total)
        count = rng.randint(1, total - row0)
        seed, step = rng.choice([0, 7, 2**64 - 1, rng.getrandbits(64)]), rng.choice([0, 1, rng.getrandbits(40)])
        source, index = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
        native.module().mixture_rows(seed, step, counts, row0, source, index)
        want_source, want_index = mixture_rows(seed, step, counts, torch.arange(row0, row0 + count))
        assert source.tolist() == want_source.tolist() and index.tolist() == want_index.tolist(), (counts, seed, step)
    with pytest.raises(ValueError, match="row0 \\+ len"):
        native.module().mixture_rows(0, 0, [2, 2], 3, np.empty(2, dtype=np.int64), np.empty(2, dtype=np.int64))
