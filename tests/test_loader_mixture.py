"""GPULoader over a weighted mixture of datasets: exact rows per source, each source's contract, resume."""

import json
import os

import numpy as np
import pytest
import torch

from gpuload.documents import aligned_window_starts
from gpuload.loader import ring_budgets
from gpuload.mixture import mixture_counts, mixture_rows
from gpuload.sampling import window_starts_and_visits
from gpuload.shards import write_shard
from test_loader import BACKENDS, MODES, assert_same, batches, loader

BASE = 1_000_000  # source k's tokens are k * BASE + stream position: a token names its source and window


@pytest.fixture
def make_sources(tmp_path):
    """make_sources({name: [shard sizes]}) -> {name: [paths]}; source k's token = k * BASE + position."""

    def make(sizes_by_name, dtype=np.uint32):
        out = {}
        for k, (name, sizes) in enumerate(sizes_by_name.items()):
            os.makedirs(tmp_path / name, exist_ok=True)
            out[name], start = [], 0
            for i, n in enumerate(sizes):
                path = str(tmp_path / name / f"{name}_{i}.bin")
                write_shard(path, (k * BASE + np.arange(start, start + n)).astype(dtype))
                out[name].append(path)
                start += n
        return out

    return make


def expected_rows(ld, step, rows):
    """Each global row's (source, x row) by gpuload/mixture.py and its source's contract, from scratch."""
    counts = [s.rows for s in ld.sources]
    which, index = mixture_rows(ld.seed, step, counts, rows)
    x = torch.empty((len(rows), ld.seq_len), dtype=torch.int64)
    for k, source in enumerate(ld.sources):
        mine = which == k
        starts, _ = window_starts_and_visits(ld.sampling, ld.seed, step, index[mine], source.rows, source.num_tokens,
                                             ld.seq_len, source.chunking)
        x[mine] = k * BASE + starts[:, None] + torch.arange(ld.seq_len)
    return which, x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ring_tokens", [None, 3 * 4096])
def test_rows_follow_their_sources_contract_on_every_backend(make_sources, backend, mode, ring_tokens):
    # ring_tokens=3*4096 holds 'small' whole and chunks 'big' (water-filling), so both ring kinds are mixed.
    paths = make_sources({"big": [9000, 7001], "small": [700], "mid": [2000, 1500]})
    weights = {"big": 0.5, "small": 0.2, "mid": 0.3}
    B, T, world = 5, 8, 2
    lds = [loader(paths, weights=weights, batch_size=B, seq_len=T, sampling=mode, seed=3, rank=r, world_size=world,
                  backend=backend, ring_tokens=ring_tokens) for r in range(world)]
    assert [s.rows for s in lds[0].sources] == mixture_counts(weights, B * world) == [5, 2, 3]
    if ring_tokens is not None:
        assert lds[0].sources[0].chunking is not None and lds[0].sources[1].chunking is None
    for step in [0, 1, 2, 3, 700, 701]:
        for r, ld in enumerate(lds):
            ld.load_state_dict({**ld.state_dict(), "step": step})
            x, y = (t.cpu() for t in next(ld))
            which, want = expected_rows(ld, step, torch.arange(r * B, (r + 1) * B))
            assert torch.equal(x, want) and torch.equal(y, want + 1), (step, r)
            assert torch.equal(ld.row_sources(step)[0], which)
            assert torch.equal(ld.window_starts(step), want[:, 0] % BASE)


def test_rows_per_source_exact_every_step_and_token_shares_within_a_point(make_sources):
    paths = make_sources({"web": [6000], "code": [3000], "math": [1000]})
    for weights, G in (({"web": 0.7, "code": 0.2, "math": 0.1}, 100), ({"web": 5, "code": 3, "math": 1}, 128)):
        counts = mixture_counts(weights, G)
        world = 4
        lds = [loader(paths, weights=weights, batch_size=G // world, seq_len=4, rank=r, world_size=world,
                      sampling="shuffle", seed=11) for r in range(world)]
        tokens = np.zeros(3, dtype=np.int64)
        for step in range(200):
            x = torch.cat([next(ld)[0] for ld in lds])
            per_source = torch.bincount(x[:, 0] // BASE, minlength=3).tolist()
            assert per_source == counts, step  # exact at every step, whatever each rank holds
            assert torch.equal(x // BASE, (x[:, :1] // BASE).expand_as(x))  # a row never mixes sources
            tokens += np.bincount((x // BASE).flatten().numpy(), minlength=3)
        total = sum(weights.values())
        for k, name in enumerate(weights):
            assert abs(tokens[k] / tokens.sum() - weights[name] / total) < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ring_tokens", [None, 4 * 4096])  # whole streams, or two chunked rings of 4 slots
def test_resume_with_mixture_and_alignment_on_other_world_sizes(tmp_path, backend, ring_tokens):
    rng = np.random.default_rng(4)
    paths, streams = {}, []
    for k, name in enumerate(["web", "code"]):
        tokens = rng.integers(1, 1000, 20_000 - 8000 * k).astype(np.uint16)
        tokens[rng.choice(tokens.size, tokens.size // 60, replace=False)] = 7
        tokens[0] = 7
        os.makedirs(tmp_path / name)
        write_shard(tmp_path / name / "train_0.bin", tokens)
        paths[name] = [str(tmp_path / name / "train_0.bin")]
        streams.append(torch.from_numpy(tokens.astype(np.int64)))
    kw = dict(weights={"web": 2, "code": 1}, seq_len=16, sampling="shuffle", seed=5, bos_token=7, align="bos",
              doc_info=True, backend=backend, ring_tokens=ring_tokens)
    ld = loader(paths, batch_size=6, **kw)
    assert all((source.aligned is None) == (ring_tokens is None) for source in ld.sources)
    for step in range(4):  # each source's rows by its own aligned rule, read from its own stream
        x = next(ld)[0].cpu()
        which, index = ld.row_sources(step)
        for k, source in enumerate(ld.sources):
            starts = aligned_window_starts("shuffle", 5, step, index[which == k], source.rows, source.doc_starts.cpu(),
                                           source.num_tokens, source.aligned)
            assert torch.equal(x[which == k], streams[k][starts[:, None] + torch.arange(16)])
    state = json.loads(json.dumps(ld.state_dict()))
    rest = [next(ld) for _ in range(4)]
    resumed = [loader(paths, batch_size=2, rank=r, world_size=3, **kw) for r in range(3)]
    for r in resumed:
        r.load_state_dict(state)
    for x, y, doc in rest:
        parts = [next(r) for r in resumed]
        assert torch.equal(torch.cat([p[0].cpu() for p in parts]), x.cpu())
        assert torch.equal(torch.cat([p[1].cpu() for p in parts]), y.cpu())
        assert torch.equal(torch.cat([p[2].position_ids.cpu() for p in parts]), doc.position_ids.cpu())
        assert (x[:, 0] == 7).all()


def test_resume_with_other_weights_warns_and_follows_the_new_counts(make_sources):
    paths = make_sources({"a": [3000], "b": [3000]})
    kw = dict(batch_size=10, seq_len=8, sampling="sequential")
    old = loader(paths, weights={"a": 1, "b": 1}, **kw)
    batches(old, 3)
    state = old.state_dict()
    new = loader(paths, weights={"a": 7, "b": 3}, **kw)
    with pytest.warns(UserWarning, match=r"'a' 5 -> 7, 'b' 5 -> 3"):
        new.load_state_dict(state)
    fresh = loader(paths, weights={"a": 7, "b": 3}, **kw)
    fresh.load_state_dict({**fresh.state_dict(), "step": 3})
    assert_same(batches(new, 2), batches(fresh, 2))
    x, _ = next(new)  # sequential: source a's rows are its windows 5 * 7 .. 5 * 7 + 6
    a_rows = x[x[:, 0] < BASE]
    assert sorted(a_rows[:, 0].tolist()) == [w * 8 for w in range(35, 42)]


def test_resume_refuses_other_sources(make_sources, tmp_path):
    paths = make_sources({"a": [20_000], "b": [2000]})
    kw = dict(batch_size=4, seq_len=8)
    state = loader(paths, weights={"a": 1, "b": 1}, **kw).state_dict()
    with pytest.raises(ValueError, match=r"sources differs \(saved \['a', 'b'\], this loader \['b', 'a'\]\)"):
        loader({"b": paths["b"], "a": paths["a"]}, weights={"a": 1, "b": 1}, **kw).load_state_dict(state)
    with pytest.raises(ValueError, match=r"sources differs \(saved \['a', 'b'\], this loader \[None\]\)"):
        loader(paths["a"], **kw).load_state_dict(state)
    with pytest.raises(ValueError, match="the dataset of source 'b' differs"):
        loader({"a": paths["a"], "b": paths["a"]}, weights={"a": 1, "b": 1}, **kw).load_state_dict(state)
    with pytest.raises(ValueError, match="ring chunking of source 'a' differs"):
        loader(paths, weights={"a": 1, "b": 1}, ring_tokens=8 * 1024, **kw).load_state_dict(state)


def write_manifest(directory, encoding_name, vocab_size):
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump({"encoding_name": encoding_name, "vocab_size": vocab_size}, f)


def test_sources_must_share_width_and_vocabulary(make_sources, tmp_path):
    paths = make_sources({"a": [3000], "b": [2000]})
    os.makedirs(tmp_path / "wide")
    write_shard(tmp_path / "wide" / "w_0.bin", np.arange(3000, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"different token widths \(source 'a' \(.*a_0.bin\): uint32, source 'w'"):
        loader({"a": paths["a"], "w": [str(tmp_path / "wide" / "w_0.bin")]}, weights={"a": 1, "w": 1},
               batch_size=2, seq_len=8)
    write_manifest(tmp_path / "a", "gpt2", 50257)
    write_manifest(tmp_path / "b", "gpt2", 50257)
    loader(paths, weights={"a": 1, "b": 1}, batch_size=2, seq_len=8).close()  # same vocabulary: fine
    write_manifest(tmp_path / "b", "cl100k_base", 100277)
    with pytest.raises(ValueError, match=r"different vocabularies \('a': gpt2 \(50257 tokens, per .*a/manifest.json\)"
                                         r", 'b': cl100k_base"):
        loader(paths, weights={"a": 1, "b": 1}, batch_size=2, seq_len=8)


@pytest.mark.parametrize("files,kwargs,match", [
    ("mixture", dict(weights={"a": 1}), r"weights must name exactly the sources \['a', 'b'\]: missing \['b'\]"),
    ("mixture", dict(weights={"a": 1, "b": 1, "c": 1}), r"unknown \['c'\]"),
    ("mixture", dict(weights=None), "needs weights="),
    ("mixture", dict(weights=[1, 1]), "weights must be a dict"),
    ("mixture", dict(weights={"a": 1, "b": 0}), "must be positive"),
    ("mixture", dict(weights={"a": 1000, "b": 1}), r"source\(s\) \['b'\] get 0 of the 4 rows"),
    ("mixture", dict(weights={"a": 1, "b": 1}, loop=False, sampling="sequential"), "evaluate each source"),
    ("mixture", dict(weights={"a": 1, "b": 1}, ring_tokens=4096),
     r"ring_tokens=4096 is too small for this mixture: .* 'a' gets 2096 and needs 3000; .* ring_tokens >= 5000"),
    ("single", dict(weights={"a": 1}), "weights= is for a mixture"),
    ("unnamed", dict(weights={1: 1}), "names must be non-empty strings"),
])
def test_invalid_mixtures_are_clear_errors(make_sources, files, kwargs, match):
    paths = make_sources({"a": [3000], "b": [2000]})
    files = {"mixture": paths, "single": paths["a"], "unnamed": {1: paths["a"]}}[files]
    with pytest.raises(ValueError, match=match):
        loader(files, batch_size=4, seq_len=256 if "ring_tokens" in kwargs else 8, **kwargs)


def test_ring_budget_holds_small_sources_whole_and_splits_the_rest():
    assert ring_budgets([10, 1000, 1000], 600) == [10, 295, 295]
    assert ring_budgets([100, 200], 1000) == [100, 200]
    assert ring_budgets([500], 300) == [300]
    assert sum(ring_budgets([7, 3000, 50, 900], 2000)) <= 2000


@pytest.mark.parametrize("change,match", [
    (lambda s: s["sources"][0].update(rows=-5), r"sources\[0\]\['rows'\] must be >= 1"),
    (lambda s: s["sources"][1].update(rows=7), r"rows \[2, 7\] do not sum to the global batch 4"),
    (lambda s: s["sources"][1].update(num_tokens="2000"), r"sources\[1\]\['num_tokens'\] must be an integer"),
    (lambda s: (s["sources"].pop(), s["sources"][0].update(rows=4)), r"sources differs \(saved \['a'\]"),
])
def test_malformed_mixture_states_are_refused_and_change_nothing(make_sources, change, match):
    paths = make_sources({"a": [3000], "b": [2000]})
    ld = loader(paths, weights={"a": 1, "b": 1}, batch_size=4, seq_len=8)
    state = ld.state_dict()
    state["step"] = 9
    change(state)
    with pytest.raises(ValueError, match=match):
        ld.load_state_dict(state)
    assert ld.step == 0


def test_states_saved_before_mixtures_still_load(make_shards):
    paths = make_shards([3000])
    ld = loader(paths, batch_size=4, seq_len=8, sampling="shuffle", seed=2)
    source = ld.state_dict()["sources"][0]
    old = {"format": "gpuload.loader/1", "step": 5, "seed": 3, "sampling": "shuffle", "seq_len": 8, "global_batch": 4,
           "num_tokens": source["num_tokens"], "dataset": source["dataset"], "windows_per_chunk": 0, "align_bos": None}
    ld.load_state_dict(old)
    fresh = loader(paths, batch_size=4, seq_len=8, sampling="shuffle", seed=3)
    fresh.load_state_dict({**fresh.state_dict(), "step": 5})
    assert (ld.step, ld.seed) == (5, 3)
    assert_same(batches(ld, 2), batches(fresh, 2))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "native"])
def test_close_between_two_sources_raises_closed_not_a_crash(make_sources, backend):
    # Simulates close() from another thread landing while next() is between the sources' rings.
    paths = make_sources({"a": [3000], "b": [2000]})
    ld = loader(paths, weights={"a": 1, "b": 1}, batch_size=4, seq_len=8, backend=backend)
    second = ld.sources[1].ring
    acquire = second.acquire

    def close_first(step):
        ld.close()
        return acquire(step)

    second.acquire = close_first
    with pytest.raises(RuntimeError, match="closed"):
        next(ld)
    assert second.filler is None and second.closed
    with pytest.raises(RuntimeError, match="the loader is closed"):
        next(ld)
