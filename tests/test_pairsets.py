"""Teacher-generated pair sets: sharded safetensors + a keyed json index, atomic, resumable, split
over ranks, streamed (``stepdistill.data.pairsets``); DMD2's regression pairs made on first use with
the run's prompts and CFG for text teachers; Distilled Decoding's pairs streamed by its source."""

from __future__ import annotations

import json

import pytest
import torch

from stepdistill.algorithms import build
from stepdistill.data.pairsets import PairStore, weight_digest


def _shard_fn(calls):
    def make(i, rows):
        calls.append(i)
        g = torch.Generator().manual_seed(i)
        x = torch.randn(len(rows), 3, generator=g, device="cpu")
        return {"x": x, "row": torch.tensor(list(rows), device="cpu")}, {"text": [f"p{r}" for r in rows]}
    return make


def test_store_shards_index_and_streamed_rows(tmp_path):
    calls: list[int] = []
    store = PairStore(tmp_path, {"a": 1}, num_rows=10, shard_size=4)
    assert store.num_shards == 3 and store.missing() == [0, 1, 2]
    assert store.ensure(_shard_fn(calls), rank=0, world=1) == 3
    index = json.loads((store.folder / "index.json").read_text())
    assert index["key"] == store.key and index["num_rows"] == 10 and index["settings"] == {"a": 1}
    rows = store.rows(torch.tensor([9, 0, 5], device="cpu"))
    assert rows["row"].tolist() == [9, 0, 5] and rows["text"] == ["p9", "p0", "p5"]
    assert rows["x"].shape == (3, 3)
    # streamed: only the shards holding the rows are opened
    fresh = PairStore(tmp_path, {"a": 1}, num_rows=10, shard_size=4)
    fresh.rows([1, 2])
    assert list(fresh._open) == [0]
    # another setting is another set
    assert PairStore(tmp_path, {"a": 2}, num_rows=10, shard_size=4).key != store.key
    with pytest.raises(IndexError):
        store.rows([10])


def test_store_is_resumable_and_split_over_ranks(tmp_path):
    one: list[int] = []
    ref = PairStore(tmp_path / "one", {"a": 1}, num_rows=10, shard_size=2)
    ref.ensure(_shard_fn(one), rank=0, world=1)
    # a killed generation (2 shards written) continues with the missing ones only
    calls: list[int] = []
    store = PairStore(tmp_path / "resumed", {"a": 1}, num_rows=10, shard_size=2)
    assert store.ensure(_shard_fn(calls), rank=0, world=1, max_new_shards=2) == 2
    assert not store.is_complete() and not list(store.folder.glob(".*tmp*"))
    assert store.ensure(_shard_fn(calls), rank=0, world=1) == 3 and calls == [0, 1, 2, 3, 4]
    # rank r of 2 writes the shards i = r (mod 2)
    split: list[int] = []
    two = PairStore(tmp_path / "two", {"a": 1}, num_rows=10, shard_size=2)
    two.ensure(_shard_fn(split), rank=1, world=2, fill_missing=False)
    assert split == [1, 3] and two.missing() == [0, 2, 4]
    two.ensure(_shard_fn(split), rank=0, world=2, fill_missing=False)
    assert two.is_complete()
    every = list(range(10))
    for other in (store, two):
        a, b = ref.rows(every), other.rows(every)
        assert torch.equal(a["x"], b["x"]) and a["text"] == b["text"]


def test_weight_digest_tells_weights_apart():
    a = torch.nn.Linear(4, 4)
    b = torch.nn.Linear(4, 4)
    assert weight_digest(a) == weight_digest(a) and weight_digest(a) != weight_digest(b)


def _sd_teacher(tmp_path):
    from stepdistill.teachers.diffusion import DiffusersTeacher
    from stepdistill.testing import SD_SCHEDULER_CONFIG, tiny_sd_components

    p = tiny_sd_components(tmp_path)
    return DiffusersTeacher(p["unet"], dict(SD_SCHEDULER_CONFIG), text_encoder=p["text_encoder"],
                            tokenizer=p["tokenizer"], vae=p["vae"], guidance_scale=3.0)


PROMPTS = ["a red cat", "a blue dog", "a green bird", "a cat on a mat", "two cats", "a dog"]


def test_text_teacher_regression_pairs_carry_prompts_and_cfg(tmp_path):
    """DMD2's regression pairs of a text teacher are sampled from the run's prompts with CFG
    ``real_guidance_scale`` (they used to be unconditional: no prompt, no guidance)."""
    from stepdistill.config import TrainConfig

    teacher = _sd_teacher(tmp_path)
    params = {"regression_steps": 1, "regression_pairs": 5, "regression_sampler_steps": 2,
              "regression_shard_size": 2, "real_guidance_scale": 4.0, "generator_timesteps": [899],
              "pairs_dir": str(tmp_path / "pairs")}
    d = build("dmd2", teacher, params)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), dataset=f"prompts:{tmp_path / 'prompts.txt'}")
    d.build_source(cfg)  # the run's prompt source
    pairs = d.regression_pairs()
    rows = pairs.store.rows(list(range(5)))
    assert len(rows["raw_cond"]) == 5 and set(rows["raw_cond"]) <= set(PROMPTS)
    with torch.no_grad():
        cond = teacher.encode_conditions(rows["raw_cond"][:2])
        x0 = teacher.sample(cond=cond, num_steps=2, noise=rows["noise"][:2], guidance_scale=4.0)
        uncond = teacher.sample(cond=None, num_steps=2, noise=rows["noise"][:2])
    torch.testing.assert_close(rows["x0"][:2], x0, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(rows["x0"][:2], uncond, atol=1e-4)
    # the regression loss encodes the rows' prompts
    out = d.loss({"batch_size": 3, "raw_cond": None}, 0, "generator", {})
    assert torch.isfinite(out.loss) and "regression" in out.logs
    # without any prompt source, a text teacher's pairs are refused (not silently unconditional)
    bare = build("dmd2", teacher, {**params, "pairs_dir": str(tmp_path / "p2")})
    with pytest.raises(ValueError, match="need prompts"):
        bare.regression_pairs()


def test_distilled_decoding_source_streams_rows(tmp_path):
    from stepdistill.teachers.autoregressive import ARTeacher, LMSpec, VQSpec, build_transformer, build_vqvae

    vq_spec = VQSpec(block_out_channels=[8, 8], latent_channels=4, vq_embed_dim=2, num_vq_embeddings=8,
                     norm_num_groups=4)
    torch.manual_seed(0)
    vq = build_vqvae(vq_spec)
    lm = build_transformer(LMSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                           vq_spec.num_vq_embeddings, 10, 16)
    teacher = ARTeacher(vq, lm, num_classes=10, guidance_scale=1.5, top_k=6).eval().requires_grad_(False)
    d = build("dd", teacher, {"num_pairs": 12, "shard_size": 4, "flow_steps": 4, "split_points": [0, 8],
                              "pairs_dir": str(tmp_path / "dd")})
    source = d.make_source(seed=0)
    assert not d.pair_set().folder.exists()  # nothing generated before the first batch
    batch = source.batch(0, 0, 1, 5)
    assert d.pair_set().is_complete(12) and d._pairs is None  # generated, never loaded whole
    full = d.pair_set().load(12)
    idx = source._plan.indices(0, 0, 1, 5)
    assert torch.equal(batch["tokens"], full["tokens"][idx]) and torch.equal(batch["noise"], full["noise"][idx])
    assert torch.equal(batch["raw_cond"], full["labels"][idx])
