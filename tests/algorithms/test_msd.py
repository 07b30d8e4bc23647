"""MSD: the condition partitions (contiguous, balanced k-means, mapping), the student schedules
(round-robin, concurrent, TSM first for smaller students), per-student data filtering and the
shared, unfiltered regression pairs."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from support import begin_step, make_batch

from stepdistill.algorithms import build
from stepdistill.algorithms.msd import contiguous_partition, kmeans_partition

BASE = {"update_ratio": 2}


def _msd(teacher, **params):
    return build("msd", teacher, {"num_students": 2, "base_params": BASE, **params})


# ---------------------------------------------------------------------------------------------
# partitions


@pytest.mark.parametrize("num_classes,k", [(10, 4), (8, 2), (7, 3), (5, 5), (1000, 4), (3, 1)])
def test_contiguous_partition_is_contiguous_balanced_and_complete(num_classes, k):
    route = contiguous_partition(num_classes, k)
    assert len(route) == num_classes
    assert route == sorted(route)  # contiguous class ranges, in order
    sizes = Counter(route)
    assert set(sizes) == set(range(k))  # every student gets classes
    assert max(sizes.values()) - min(sizes.values()) <= 1


def test_contiguous_partition_rejects_bad_student_counts():
    for k in (0, 11):
        with pytest.raises(ValueError, match="num_students"):
            contiguous_partition(10, k)


def _blobs(sizes, seed=0):
    """Well-separated Gaussian blobs of the given sizes (centres on the axes, 10 apart)."""
    g = torch.Generator().manual_seed(seed)
    dim = max(3, len(sizes))
    centres = torch.eye(dim)[: len(sizes)] * 10
    points = [centres[i] + 0.1 * torch.randn(n, dim, generator=g) for i, n in enumerate(sizes)]
    labels = [i for i, n in enumerate(sizes) for _ in range(n)]
    return torch.cat(points), labels


def test_kmeans_partition_recovers_separated_equal_clusters():
    x, labels = _blobs([6, 6, 6])
    route = kmeans_partition(x, 3)
    # one student per blob (up to the students' numbering)
    assert len({(lab, r) for lab, r in zip(labels, route)}) == 3
    assert sorted(Counter(route).values()) == [6, 6, 6]


@pytest.mark.parametrize("n,k", [(10, 3), (12, 4), (7, 2)])
def test_kmeans_partition_is_balanced_even_for_uneven_clusters(n, k):
    x, _ = _blobs([n - 2 * (k - 1)] + [2] * (k - 1))  # one big cluster: plain k-means would be uneven
    route = kmeans_partition(x, k)
    sizes = Counter(route)
    assert set(sizes) == set(range(k)) and sum(sizes.values()) == n
    assert max(sizes.values()) <= -(-n // k)  # capacity ceil(n / k) per student


def test_kmeans_partition_is_deterministic_under_its_seed():
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    assert kmeans_partition(x, 4, seed=3) == kmeans_partition(x, 4, seed=3)
    state = torch.get_rng_state()
    kmeans_partition(x, 4)
    assert torch.equal(torch.get_rng_state(), state)  # its own generator, not the global RNG
    with pytest.raises(ValueError, match="num_students"):
        kmeans_partition(x, 21)


def test_msd_partitions_route_every_class(teacher):
    assert _msd(teacher).route == contiguous_partition(8, 2)
    km = _msd(teacher, partition="kmeans")  # over the mixture means (a ring: two arcs of 4)
    assert sorted(Counter(km.route).values()) == [4, 4]
    mapping = [1, 0, 1, 0, 1, 0, 1, 0]
    d = _msd(teacher, partition="mapping", mapping=mapping)
    assert d.route == mapping and d.classes == [[1, 3, 5, 7], [0, 2, 4, 6]]
    with pytest.raises(ValueError, match="mapping"):
        _msd(teacher, partition="mapping", mapping=[0] * 8)  # student 1 unused


# ---------------------------------------------------------------------------------------------
# schedules


def test_round_robin_trains_one_student_per_step_on_its_own_clock(teacher):
    d = _msd(teacher)
    assert set(d.trainable()) == {"s0.generator", "s0.critic", "s1.generator", "s1.critic"}
    phases = [begin_step(d, s) for s in range(6)]
    # student k trains at steps k, k + 2, ...; its own step counter is step // 2 (TTUR ratio 2)
    assert phases == [["s0.generator", "s0.critic"], ["s1.generator", "s1.critic"], ["s0.critic"], ["s1.critic"],
                      ["s0.generator", "s0.critic"], ["s1.generator", "s1.critic"]]


def test_concurrent_trains_every_student_every_step(teacher):
    d = _msd(teacher, schedule="concurrent")
    assert begin_step(d, 0) == ["s0.generator", "s0.critic", "s1.generator", "s1.critic"]
    assert begin_step(d, 1) == ["s0.critic", "s1.critic"]
    with pytest.raises(ValueError, match="schedule"):
        _msd(teacher, schedule="random")


def test_smaller_students_run_tsm_first_then_the_base_schedule(teacher):
    d = _msd(teacher, width_multiplier=0.5, tsm_steps=2, tsm_lr=1e-3)
    assert d.small and d._tsm_total() == 4
    phases = [begin_step(d, s) for s in range(6)]
    assert phases[:4] == [["s0.generator"], ["s1.generator"]] * 2
    assert phases[4:] == [["s0.generator", "s0.critic"], ["s1.generator", "s1.critic"]]
    base_lr = d.students[0].lr_defaults()["generator"]
    assert d.lr_scale(0, "s0.generator") == pytest.approx(1e-3 / base_lr)
    assert d.lr_scale(4, "s0.generator") == 1.0
    # after TSM every fake score starts from its TSM-trained generator network
    for s in d.students:
        for k, v in s.critic.state_dict().items():
            torch.testing.assert_close(v, s.generator.denoiser.state_dict()[k])


# ---------------------------------------------------------------------------------------------
# per-student data


def test_slice_batch_draws_conditions_and_filters_real_data_to_the_students_classes(teacher):
    d = _msd(teacher)  # contiguous: student 0 has classes 0..3, student 1 has 4..7
    labels = torch.tensor([0, 5, 3, 7, 4, 1])
    real = torch.arange(12.0).reshape(6, 2)
    for k, classes in enumerate(d.classes):
        torch.manual_seed(k)
        sb = d._slice_batch({"real": real, "raw_cond": labels, "batch_size": 6}, k, 16)
        assert sb["batch_size"] == 16 and len(sb["raw_cond"]) == 16
        assert set(sb["raw_cond"].tolist()) <= set(classes)
        keep = torch.tensor([int(y) in classes for y in labels])
        assert torch.equal(sb["real"], real[keep]) and torch.equal(sb["real_raw_cond"], labels[keep])
    # no real image of this student's classes: no real data rather than someone else's
    sb = d._slice_batch({"real": real[:1], "raw_cond": labels[:1], "batch_size": 1}, 1, 4)
    assert sb["real"] is None and "real_raw_cond" not in sb
    # data-free batches stay data-free
    assert d._slice_batch({"raw_cond": None, "batch_size": 4}, 0, 4)["real"] is None


def test_loss_sees_only_the_students_conditions(teacher, monkeypatch):
    d = _msd(teacher)
    seen = []
    student = d.students[1]
    orig = type(student).loss

    def spy(self, batch, *a, **k):
        seen.append(batch)
        return orig(self, batch, *a, **k)

    monkeypatch.setattr(type(student), "loss", spy)
    cache: dict = {}
    out = d.loss(make_batch(teacher, n=16), 1, "s1.generator", cache)
    d.loss(make_batch(teacher, n=16), 1, "s1.critic", cache)
    assert set(out.logs) and all(k.startswith("s1.") for k in out.logs)
    assert seen[0] is seen[1]  # one sliced batch per student and step, shared by its groups
    assert set(seen[0]["raw_cond"].tolist()) <= set(d.classes[1])
    assert set(seen[0]["real_raw_cond"].tolist()) <= set(d.classes[1])


def test_regression_pairs_are_shared_and_unfiltered(teacher):
    d = _msd(teacher, base_params={**BASE, "regression_steps": 1, "regression_pairs": 8, "regression_sampler_steps": 2},
             shared_regression_pairs=16)
    pairs = [s.regression_pairs() for s in d.students]
    assert pairs[0] is pairs[1] and pairs[0].num_rows == 16
    labels = pairs[0].store.rows(list(range(16)))["raw_cond"]
    assert set(labels.tolist()) - set(d.classes[0])  # holds other students' classes too
