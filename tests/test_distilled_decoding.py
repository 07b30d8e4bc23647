"""Distilled Decoding: the closed-form flow (token distribution, determinism), the teacher's noise ->
token map, the on-disk pair set (round trip, resume, keys), the Distiller contract, the generic loop,
and export (a fresh process with plain diffusers + trust_remote_code reproduces the student)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from stepdistill.algorithms.distilled_decoding import (
    DDConfig,
    DDStudent,
    DistilledDecoding,
    flow_map,
    flow_velocity,
    teacher_token_map,
)
from stepdistill.pipelines.ar_image import filter_logits

sys.path.insert(0, os.path.dirname(__file__))
from test_autoregressive import tiny_teacher  # noqa: E402


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher(seed=0, guidance_scale=1.5, top_k=6)


def _dd(teacher, tmp_path, **kw) -> DistilledDecoding:
    params = dict(
        num_pairs=48, shard_size=16, pairs_dir=str(tmp_path / "pairs"), flow_steps=8, split_points=[0, 8]
    )
    params.update(kw)
    return DistilledDecoding(teacher, DDConfig(**params))


# ---------------------------------------------------------------------------------------------
# the closed-form flow


def test_flow_maps_gaussian_noise_to_the_token_distribution():
    """Chi-square goodness of fit: tokens of the flow map over N(0, I) noise ~ softmax(logits)."""
    from scipy.stats import chisquare

    g = torch.Generator().manual_seed(0)
    v, d, n = 8, 2, 20000
    codes = torch.randn(v, d, generator=g)
    logits = filter_logits(torch.randn(v, generator=g) * 1.5, top_k=6)  # two codes filtered out
    p = torch.softmax(logits.double(), -1)
    noise = torch.randn(n, d, generator=g)
    tokens = flow_map(noise, codes, logits.expand(n, v), num_steps=32, solver="heun")
    counts = torch.bincount(tokens, minlength=v).double()
    kept = p > 0
    assert counts[~kept].sum() == 0  # filtered codes are never produced
    stat = chisquare(counts[kept].numpy(), (p[kept] * n).numpy())
    assert stat.pvalue > 1e-3, (counts.tolist(), (p * n).tolist(), stat)
    # and a point-mass distribution maps everything to its code
    one_hot = torch.full((v,), float("-inf"))
    one_hot[3] = 0.0
    assert torch.all(flow_map(noise[:500], codes, one_hot.expand(500, v)) == 3)


def test_flow_map_is_deterministic_and_row_independent():
    g = torch.Generator().manual_seed(1)
    codes, noise, logits = (
        torch.randn(16, 4, generator=g),
        torch.randn(64, 4, generator=g),
        torch.randn(64, 16, generator=g),
    )
    a = flow_map(noise, codes, logits)
    assert torch.equal(a, flow_map(noise.clone(), codes, logits))
    assert torch.equal(a[10:20], flow_map(noise[10:20], codes, logits[10:20]))


def test_flow_velocity_closed_form():
    g = torch.Generator().manual_seed(2)
    codes = torch.randn(5, 3, generator=g, dtype=torch.float64)
    logp = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), -1)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    # t = 1: x_1 = eps carries no information about x_0 -> E[x_0] = sum p_j c_j
    torch.testing.assert_close(flow_velocity(x, 1.0, codes, logp.expand(4, 5)), x - logp.exp() @ codes)
    # single atom: the exact trajectory is x_t = (1 - t) c + t eps, so v = eps - c everywhere
    c = codes[:1]
    eps = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = 0.3
    xt = (1 - t) * c + t * eps
    torch.testing.assert_close(flow_velocity(xt, t, c, torch.zeros(4, 1, dtype=torch.float64)), eps - c)
    _, end = flow_map(eps, c, torch.zeros(4, 1), return_x=True)
    torch.testing.assert_close(end, c.expand(4, 3) + 1e-3 * (eps - c), atol=1e-6, rtol=0)


def test_teacher_token_map_is_deterministic_and_uses_the_teachers_conditionals(teacher):
    codes = teacher.codebook.detach()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(6, teacher.num_tokens, teacher.embed_dim, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    flow = {"num_steps": 8}
    a = teacher_token_map(teacher, noise, labels, codes, flow)
    assert torch.equal(a, teacher_token_map(teacher, noise, labels, codes, flow))
    assert torch.equal(a[2:4], teacher_token_map(teacher, noise[2:4], labels[2:4], codes, flow))
    for i in (0, 5, 15):  # token i = flow map of eps_i under p(. | class, q_<i) (recomputed, uncached)
        logits = teacher.logits(a[:, :i], labels)
        assert torch.equal(a[:, i], flow_map(noise[:, i], codes, logits, num_steps=8))


# ---------------------------------------------------------------------------------------------
# the pair set


def test_pair_set_roundtrip_resume_and_keys(teacher, tmp_path):
    d = _dd(teacher, tmp_path)
    ps = d.pair_set()
    codes = d.student.codes
    assert ps.generate(teacher, 48, codes, d.flow_kwargs, max_new_shards=1) == 1  # "interrupted"
    assert ps.complete_shards() == [0] and not ps.is_complete(48)
    with pytest.raises(FileNotFoundError):
        ps.load(48)
    assert ps.generate(teacher, 48, codes, d.flow_kwargs) == 2  # resumes at shard 1
    assert ps.generate(teacher, 48, codes, d.flow_kwargs) == 0  # nothing left
    pairs = ps.load(48)
    assert pairs["noise"].shape == (48, 16, 2) and pairs["tokens"].shape == (48, 16)
    assert pairs["labels"].tolist() == [i % 10 for i in range(48)]
    # same as an uninterrupted generation elsewhere, and consistent with the map on the stored noise
    other = _dd(teacher, tmp_path / "other")
    full = other.ensure_pairs()
    assert other.pair_set().key == ps.key
    for k in pairs:
        assert torch.equal(pairs[k], full[k])
    torch.testing.assert_close(
        pairs["tokens"][:5], d.teacher_tokens(pairs["noise"][:5], pairs["labels"][:5]), rtol=0, atol=0
    )
    meta = json.loads((ps.folder / "meta.json").read_text())
    assert meta["key"] == ps.key and meta["guidance_scale"] == 1.5 and meta["top_k"] == 6
    # the key follows the teacher's sampling settings and weights, not num_pairs
    assert _dd(teacher, tmp_path, num_pairs=96).pair_set().key == ps.key
    assert _dd(teacher, tmp_path, flow_steps=16).pair_set().key != ps.key
    assert _dd(tiny_teacher(seed=0, guidance_scale=2.0, top_k=6), tmp_path).pair_set().key != ps.key
    assert _dd(tiny_teacher(seed=5, guidance_scale=1.5, top_k=6), tmp_path).pair_set().key != ps.key
    # float16 storage: the map is computed from the stored (rounded) noise
    half = _dd(teacher, tmp_path, storage_dtype="float16", num_pairs=16)
    hp = half.ensure_pairs()
    assert torch.equal(hp["noise"], hp["noise"].half().float())
    assert torch.equal(hp["tokens"], half.teacher_tokens(hp["noise"], hp["labels"]))


# ---------------------------------------------------------------------------------------------
# the student and the Distiller contract


def test_student_init_and_shapes(teacher, tmp_path):
    d = _dd(teacher, tmp_path)
    s = d.student
    emb = s.transformer.get_input_embeddings().weight
    assert emb.shape[0] == 8 + 10 + 1 + 2 + 2
    torch.testing.assert_close(emb[:19], teacher.transformer.get_input_embeddings().weight)
    assert s.sample_shape == (16, 2) and s.num_steps == 2
    noise = torch.randn(3, 16, 2)
    tok1 = s(noise, torch.tensor([1, 2, 3]), num_steps=1)
    tok2 = s(noise, torch.tensor([1, 2, 3]))
    assert tok1.shape == tok2.shape == (3, 16)
    assert torch.equal(tok1[:, :8], tok2[:, :8])  # step 2 keeps the prefix before the split point
    with pytest.raises(ValueError, match="split_points"):
        _dd(teacher, tmp_path, split_points=[1, 4])
    with pytest.raises(TypeError, match="autoregressive"):
        from stepdistill.teachers.analytic import GaussianMixtureTeacher

        DistilledDecoding(GaussianMixtureTeacher.ring(4, std=0.1), DDConfig())


def test_rbf_input_feature_reads_teacher_embedding_at_data_positions(teacher, tmp_path):
    from stepdistill.pipelines.distilled_decoding import dd_input_embeds

    s = _dd(teacher, tmp_path, rbf_tau=0.05).student
    assert s.layout["rbf_tau"] == 0.05
    q = torch.randint(0, 8, (2, 16))
    x = s.codes[q]
    emb = dd_input_embeds(
        s.transformer, x, torch.tensor([1, 2]), torch.ones(2, 16, dtype=torch.bool), s.layout, s.codes
    )
    table = teacher.transformer.get_input_embeddings().weight
    torch.testing.assert_close(emb[:, 1:], table[q], atol=1e-3, rtol=0)  # basis / indicator rows start at 0
    torch.testing.assert_close(emb[:, 0], table[torch.tensor([1, 2]) + 8])


def test_distiller_contract(teacher, tmp_path):
    d = _dd(teacher, tmp_path)
    assert DistilledDecoding.name == "dd" and DistilledDecoding.paper and not DistilledDecoding.needs_data
    groups = d.trainable()
    assert list(groups) == ["generator"] and d.phase(0) == ["generator"]
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in groups["generator"].parameters()}
    assert all(not p.requires_grad for p in d.teacher.parameters())
    source = d.make_source(seed=0)
    batch = source.batch(0, 0, 1, 8)
    vals = []
    for _ in range(2):
        torch.manual_seed(7)
        groups["generator"].zero_grad(set_to_none=True)
        out = d.loss(batch, 0, "generator", {})
        vals.append(out.loss.item())
    assert vals[0] == vals[1] and torch.isfinite(out.loss)
    assert set(out.logs) == {"ce", "token_acc"}
    out.loss.backward()
    own = [p for p in groups["generator"].parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in own)
    assert all(p.grad is None for p in teacher.parameters())
    # a plain condition source (no pairs in the batch) also works: pairs are drawn from the set
    out = d.loss({"real": None, "raw_cond": torch.tensor([0, 1, 2, 3]), "batch_size": 4}, 0, "generator", {})
    assert torch.isfinite(out.loss)


def test_generic_loop_trains_the_student(teacher, tmp_path):
    from stepdistill.config import TrainConfig
    from stepdistill.training import train

    d = _dd(teacher, tmp_path, num_pairs=32, split_points=[0])
    source = d.make_source(seed=0)
    pairs = d.ensure_pairs()
    acc0 = (d.student(pairs["noise"], pairs["labels"]) == pairs["tokens"]).float().mean()
    cfg = TrainConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=40,
        batch_size=32,
        default_lr=3e-3,
        checkpoint_every_steps=0,
        sample_every_steps=0,
        report_to=None,
        progress=False,
        resume=None,
    )
    result = train(d, source, cfg)
    acc1 = (d.student(pairs["noise"], pairs["labels"]) == pairs["tokens"]).float().mean()
    assert result["step"] == 40 and acc1 > acc0 + 0.2, (float(acc0), float(acc1))


# ---------------------------------------------------------------------------------------------
# export: a fresh process with plain diffusers reproduces the student (and the AR teacher)


def test_export_roundtrip_plain_diffusers_subprocess(teacher, tmp_path):
    from stepdistill.export import export_ar_teacher_pipeline, export_dd_pipeline
    from stepdistill.pipelines.distilled_decoding import DistilledDecodingPipeline

    d = _dd(teacher, tmp_path, rbf_tau=1.0)
    with torch.no_grad():  # move the student away from its initialisation
        for p in d.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema = {k: v + 0.01 for k, v in d.student.state_dict().items()}
    folder = export_dd_pipeline(d.student, teacher, tmp_path / "dd", paper=d.paper, use_ema_state=ema)
    live_folder = export_dd_pipeline(d.student, teacher, tmp_path / "dd-live", num_inference_steps=2)
    ar_folder = export_ar_teacher_pipeline(teacher, tmp_path / "ar")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["distilled_decoding", "DistilledDecodingPipeline"]
    assert index["transformer"] == ["transformers", "LlamaForCausalLM"] and index["split_points"] == [0, 8]
    assert index["rbf_tau"] == 1.0
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(4, 16, 2, generator=g)
    labels = torch.tensor([0, 4, 8, 9])
    expected = {k: d.student(noise, labels, num_steps=k).tolist() for k in (1, 2)}
    # in-process: the package class loads the folder directly, and equals the live student
    direct = DistilledDecodingPipeline.from_pretrained(str(live_folder))
    assert direct(class_labels=labels, noise=noise, output_type="tokens").images.tolist() == expected[2]
    ema_student = DDStudent(
        direct.transformer, d.student.codes, 10, (4, 4), [0, 8], d.student.codebook_scale, 1.0
    )
    ema_student.transformer.load_state_dict({k[len("transformer.") :]: v for k, v in ema.items()})
    expected_ema = {k: ema_student(noise, labels, num_steps=k).tolist() for k in (1, 2)}
    ar_expected = teacher.sample(
        class_labels=[1, 2], generator=[torch.Generator().manual_seed(i) for i in range(2)]
    )
    torch.save({"noise": noise, "labels": labels}, tmp_path / "inputs.pt")
    code = textwrap.dedent(
        f"""
        import json, sys, torch
        from diffusers import DiffusionPipeline
        inp = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        out = {{}}
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(pipe).__name__ == "DistilledDecodingPipeline", type(pipe)
        for k in (1, 2):
            out[k] = pipe(class_labels=inp["labels"], noise=inp["noise"], num_inference_steps=k, output_type="tokens").images.tolist()
        gens = [torch.Generator().manual_seed(i) for i in range(4)]
        img = pipe(class_labels=inp["labels"], generator=gens, output_type="np").images
        same = [torch.Generator().manual_seed(i) for i in range(4)]
        z = torch.stack([torch.randn(16, 2, generator=g) for g in same])
        by_gen = pipe(class_labels=inp["labels"], generator=[torch.Generator().manual_seed(i) for i in range(4)], output_type="tokens").images
        by_noise = pipe(class_labels=inp["labels"], noise=z, output_type="tokens").images
        ar = DiffusionPipeline.from_pretrained({str(ar_folder)!r}, trust_remote_code=True)
        ar_tok = ar(class_labels=[1, 2], generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="tokens").images
        assert "stepdistill" not in sys.modules
        print(json.dumps({{"dd": out, "shape": list(img.shape), "gen_eq_noise": bool(torch.equal(by_gen, by_noise)),
                          "ar": ar_tok.tolist()}}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["dd"]["1"] == expected_ema[1] and got["dd"]["2"] == expected_ema[2]
    assert expected_ema != expected  # the EMA weights were exported, not the live ones
    assert got["shape"] == [4, 8, 8, 1] and got["gen_eq_noise"]
    assert got["ar"] == ar_expected.tolist()


def test_run_ar_distillation_smoke(teacher, tmp_path):
    from stepdistill.config import load_config
    from stepdistill.export import export_ar_teacher_pipeline
    from stepdistill.run import build_teacher, run_distillation

    ar_folder = export_ar_teacher_pipeline(teacher, tmp_path / "ar")
    cfg = load_config(
        "digits-ar/dd",
        [
            f"teacher.path={ar_folder}",
            "teacher.guidance_scale=1.5",
            "algorithm.params.num_pairs=32",
            "algorithm.params.shard_size=16",
            "algorithm.params.flow_steps=4",
            f"algorithm.params.pairs_dir={tmp_path / 'pairs'}",
            "algorithm.params.split_points=[0, 8]",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=2",
            "train.batch_size=8",
            "train.report_to=null",
            "train.progress=false",
            "train.sample_every_steps=0",
            "train.ema_decay=0.9",
        ],
    )
    assert type(build_teacher(cfg.teacher)) is type(teacher)  # build_teacher knows kind: ar
    result = run_distillation(cfg)  # the generic entry dispatches AR teachers to run_ar_distillation
    assert result["step"] == 2 and os.path.exists(os.path.join(result["pipeline"], "distilled_decoding.py"))
    meta = json.loads(open(os.path.join(result["pipeline"], "stepdistill.json")).read())
    assert (
        meta["ema"] and meta["split_points"] == [0, 8] and meta["teacher_sampling"]["guidance_scale"] == 1.5
    )
    # re-export the run's checkpoint (EMA weights): same tokens as the pipeline written at the end
    from stepdistill.pipelines.distilled_decoding import DistilledDecodingPipeline
    from stepdistill.run import export_ar_run, export_run

    again = export_ar_run(tmp_path / "run", tmp_path / "again")
    generic = export_run(tmp_path / "run", tmp_path / "generic")  # the generic entry dispatches AR runs
    noise = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(0))
    toks = [
        DistilledDecodingPipeline.from_pretrained(str(f))(
            class_labels=[1, 2, 3], noise=noise, output_type="tokens"
        ).images
        for f in (result["pipeline"], again, generic)
    ]
    assert torch.equal(toks[0], toks[1])
    assert torch.equal(toks[0], toks[2])
