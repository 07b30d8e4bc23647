"""Distilled Decoding pair sets are streamed: ``PairSource`` reads only its batch's rows from the
safetensors shards (bounded open files, never a whole shard or set), each rank a disjoint part, the
same batches as indexing the whole loaded set; and the pair generation / the student's new code
paths name the device of every tensor they create (``tests/test_device.py``'s check)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from stepdistill.algorithms.distilled_decoding import DDConfig, DistilledDecoding, PairSource, teacher_span_fn

sys.path.insert(0, os.path.dirname(__file__))
from test_autoregressive import tiny_teacher  # noqa: E402
from test_device import StrictDevices  # noqa: E402


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher(seed=0, guidance_scale=1.5, top_k=6)


@pytest.fixture(scope="module")
def dd(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    d = DistilledDecoding(teacher, DDConfig(num_pairs=60, shard_size=8, pairs_dir=str(root), flow_steps=4,
                                            split_points=[0, 8], split_t=12))
    d.ensure_pairs(load=False)
    return d


def test_stream_equals_whole_load_and_ranks_are_disjoint(dd):
    whole = dd.pair_set().load(60)  # the old path: the whole set in memory
    world, bs = 2, 6
    sources = [PairSource(dd.pair_set(), 60, seed=3) for _ in range(world)]
    seen = []
    for step in range(5):  # 5 steps x 2 ranks x 6 = one epoch of 60
        for rank in range(world):
            batch = sources[rank].batch(step, rank, world, bs)
            idx = sources[rank]._plan.indices(step, rank, world, bs)
            assert torch.equal(batch["noise"], whole["noise"][idx])
            assert torch.equal(batch["tokens"], whole["tokens"][idx])
            assert torch.equal(batch["raw_cond"], whole["labels"][idx])
            seen += idx.tolist()
    assert sorted(seen) == list(range(60))  # disjoint across ranks, the epoch covered once


def test_stream_memory_and_open_files_stay_bounded(dd, monkeypatch):
    import safetensors
    import safetensors.torch

    from stepdistill.algorithms import distilled_decoding as mod

    opened, read = [], []

    class Counting:
        def __init__(self, path, **kw):
            self.f = real(path, **kw)
            opened.append(path)

        def get_slice(self, key):
            sl = self.f.get_slice(key)

            class S:
                def __getitem__(_, item):
                    t = sl[item]
                    read.append(t.numel() * t.element_size())
                    return t

            return S()

    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", Counting)
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("whole shard loaded"))
    monkeypatch.setattr(mod.PairSet, "load", lambda *a, **k: pytest.fail("whole set loaded"))
    ps = mod.PairSet(dd.pair_set().folder.parent, dd.pair_set().settings)
    ps.max_open_shards = 2
    source = PairSource(ps, 60, seed=0)
    row_bytes = 16 * 2 * 4 + 16 * 2 + 2  # float32 noise, int16 tokens, int16 label
    for step in range(20):  # two epochs
        before = len(read)
        batch = source.batch(step, 0, 1, 5)
        assert len(ps._handles) <= 2
        assert sum(read[before:]) == 5 * row_bytes  # exactly the batch's rows were read
        assert batch["noise"].shape == (5, 16, 2)
    assert len(opened) > 2  # shards were closed and reopened, never more than 2 at a time
    # least recently used goes first: a shard in use stays open
    ps._handles.clear()
    ps.rows([0, 8], 60)  # shards 0, 1
    ps.rows([1], 60)  # shard 0 used again
    ps.rows([16], 60)  # shard 2 evicts shard 1, not 0
    assert list(ps._handles) == [0, 2]


def test_generation_and_student_paths_name_their_devices(teacher, tmp_path):
    d = DistilledDecoding(teacher, DDConfig(num_pairs=16, shard_size=8, pairs_dir=str(tmp_path), flow_steps=4,
                                            split_points=[0, 8], split_t=12))
    noise = torch.randn(2, 16, 2, device="cpu")
    labels = torch.tensor([1, 2], device="cpu")
    with StrictDevices() as mode:
        d.ensure_pairs(load=False)
        batch = d.make_source(seed=0).batch(0, 0, 1, 4)
        torch.manual_seed(0)
        d.loss(batch, 0, "generator", {}).loss.backward()
        d.student.generate(noise, labels)
        d.student.generate(noise, labels, teacher=teacher, teacher_steps=3, flow=d.flow_kwargs)
        teacher_span_fn(teacher, d.student.codes)(labels, torch.zeros(2, 2, dtype=torch.long, device="cpu"), noise, 8)
        d.sample_images(2)
    assert not mode.sites, mode.sites
