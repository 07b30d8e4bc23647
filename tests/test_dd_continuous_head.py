"""Distilled Decoding as published: the continuous head (``split_t``: CE before it, L2 regression
from it on, output assembly, export / reload with plain diffusers, decoding of unsnapped vectors)
and teacher-involved sampling (``teacher_steps``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from stepdistill.algorithms.distilled_decoding import DDConfig, DistilledDecoding, flow_map, teacher_span_fn
from stepdistill.pipelines.distilled_decoding import DDContinuousHead, DistilledDecodingPipeline, decode_vectors

sys.path.insert(0, os.path.dirname(__file__))
from test_autoregressive import tiny_teacher  # noqa: E402


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher(seed=0, guidance_scale=1.5, top_k=6)


def _dd(teacher, tmp_path, **kw) -> DistilledDecoding:
    params = dict(num_pairs=32, shard_size=16, pairs_dir=str(tmp_path / "pairs"), flow_steps=4,
                  split_points=[0, 8], split_t=12)
    params.update(kw)
    return DistilledDecoding(teacher, DDConfig(**params))


def _perturb(module, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------
# the head and the output assembly


def test_head_is_pixart_final_layer_conditioned_on_the_class_embedding():
    head = DDContinuousHead(6, 3)
    _perturb(head, 0.3)
    h, c = torch.randn(2, 5, 6), torch.randn(2, 6)
    shift, scale = (head.scale_shift_table[None] + c[:, None]).chunk(2, 1)
    expected = head.linear(F.layer_norm(h, (6,), eps=1e-6) * (1 + scale) + shift)
    torch.testing.assert_close(head(h, c), expected)
    assert DDContinuousHead(6, 3)(h, c).abs().max() == 0  # zero-initialised projection
    assert not any(isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine for m in head.modules())


def test_split_t_assembly_logits_before_continuous_after(teacher, tmp_path):
    d = _dd(teacher, tmp_path)
    s = d.student
    assert s.head is not None and s.split_t == 12
    _perturb(s.head, 0.3)
    noise = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 2, 3])
    tokens, vectors = s.generate(noise, labels, num_steps=1)
    logits, cont = s.predict(noise, labels, torch.zeros(3, 16, dtype=torch.bool))
    assert torch.equal(tokens[:, :12], logits.argmax(-1)[:, :12])
    torch.testing.assert_close(vectors[:, :12], s.codes[tokens[:, :12]], rtol=0, atol=0)
    torch.testing.assert_close(vectors[:, 12:], cont[:, 12:], rtol=0, atol=0)  # not snapped
    assert not torch.allclose(vectors[:, 12:], s.codes[tokens[:, 12:]])
    # the reported token there is the nearest code of the continuous vector
    d2 = (cont[:, 12:, None, :] - s.codes).pow(2).sum(-1)
    assert torch.equal(tokens[:, 12:], d2.argmin(-1))
    # two steps: the prefix before the split point is data (copied), the rest predicted again
    tok2, vec2 = s.generate(noise, labels)
    assert torch.equal(tok2[:, :8], tokens[:, :8]) and torch.equal(vec2[:, :8], vectors[:, :8])
    x = noise.clone()
    x[:, :8] = vectors[:, :8]
    is_data = torch.zeros(3, 16, dtype=torch.bool)
    is_data[:, :8] = True
    _, cont2 = s.predict(x, labels, is_data)
    torch.testing.assert_close(vec2[:, 12:], cont2[:, 12:], rtol=0, atol=0)
    # split_t = None: no head, today's behaviour (all positions from the logits)
    off = _dd(teacher, tmp_path, split_t=None).student
    assert off.head is None and "head" not in dict(off.named_children())
    t_off, v_off = off.generate(noise, labels, num_steps=1)
    torch.testing.assert_close(v_off, off.codes[t_off], rtol=0, atol=0)
    with pytest.raises(ValueError, match="split_t"):
        _dd(teacher, tmp_path, split_t=16)


def test_loss_ce_before_split_t_and_l2_after(teacher, tmp_path):
    d = _dd(teacher, tmp_path)
    s = d.student
    _perturb(s.head, 0.3)
    batch = d.make_source(seed=0).batch(0, 0, 1, 8)
    torch.manual_seed(3)
    out = d.loss(batch, 0, "generator", {})
    assert set(out.logs) == {"ce", "token_acc", "reg"}
    # recompute by hand with the same split draw
    torch.manual_seed(3)
    sp = torch.tensor(s.split_points)
    split = sp[torch.randint(0, 2, (8,))]
    noise, tokens, labels = batch["noise"], batch["tokens"], batch["raw_cond"]
    pos = torch.arange(16)
    is_data = pos[None] < split[:, None]
    x = torch.where(is_data[..., None], s.codes[tokens], noise)
    logits, cont = s.predict(x, labels, is_data)
    ce = F.cross_entropy(logits.reshape(-1, 8), tokens.reshape(-1), reduction="none").reshape(8, 16)
    reg = (cont - s.codes[tokens]).pow(2).mean(-1)
    pred = ~is_data
    ce_m, reg_m = pred & (pos < 12), pred & (pos >= 12)
    expected = ((ce * ce_m).sum() + 1.0 * (reg * reg_m).sum()) / pred.sum()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.logs["reg"], (reg * reg_m).sum() / reg_m.sum())
    out.loss.backward()
    assert s.head.linear.weight.grad.abs().sum() > 0
    # the CE does not see positions >= split_t: changing their logits' targets leaves it alone
    d0 = _dd(teacher, tmp_path, regression_weight=0.0)
    d0.student.load_state_dict(s.state_dict())
    torch.manual_seed(3)
    zero = d0.loss(batch, 0, "generator", {}).loss
    torch.testing.assert_close(zero, (ce * ce_m).sum() / pred.sum())


def test_training_reduces_the_regression_loss(teacher, tmp_path):
    d = _dd(teacher, tmp_path)
    source = d.make_source(seed=0)
    opt = torch.optim.Adam(d.student.parameters(), lr=3e-3)
    batch = source.batch(0, 0, 1, 32)

    def reg():  # the same split draw each time
        torch.manual_seed(123)
        with torch.no_grad():
            return float(d.loss(batch, 0, "generator", {}).logs["reg"])

    first = reg()
    for step in range(60):
        torch.manual_seed(step)
        out = d.loss(batch, step, "generator", {})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert reg() < 0.5 * first, (first, reg())


# ---------------------------------------------------------------------------------------------
# export / reload


def test_export_with_head_roundtrip_plain_diffusers(teacher, tmp_path):
    from stepdistill.export import export_dd_pipeline

    d = _dd(teacher, tmp_path, rbf_tau=1.0)
    _perturb(d.student, 0.05)
    _perturb(d.student.head, 0.3, seed=1)
    ema = {k: v + 0.01 for k, v in d.student.state_dict().items()}
    folder = export_dd_pipeline(d.student, teacher, tmp_path / "dd", use_ema_state=ema)
    assert (folder / "continuous_head.safetensors").is_file()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["split_t"] == 12
    # the expected output: the student with the EMA weights
    d_ema = _dd(teacher, tmp_path, rbf_tau=1.0)
    d_ema.student.load_state_dict(ema)
    noise = torch.randn(4, 16, 2, generator=torch.Generator().manual_seed(11))
    labels = torch.tensor([0, 4, 8, 9])
    expected = {}
    with torch.no_grad():
        for k in (1, 2):
            tok, vec = d_ema.student.generate(noise, labels, num_steps=k)
            img = d_ema.student.decode(teacher.vqvae, tok, vec)
            expected[k] = (tok, (img.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1))
            snapped = (teacher.decode(tok).float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
            assert (snapped - expected[k][1]).abs().max() > 1e-3  # decoding the vectors is not the snap
    direct = DistilledDecodingPipeline.from_pretrained(str(folder))
    got = direct(class_labels=labels, noise=noise, output_type="np", num_inference_steps=2).images
    torch.testing.assert_close(torch.from_numpy(got), expected[2][1], atol=1e-5, rtol=0)
    torch.save({"noise": noise, "labels": labels}, tmp_path / "inputs.pt")
    code = textwrap.dedent(
        f"""
        import json, sys, torch
        from diffusers import DiffusionPipeline
        inp = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        out = {{}}
        for k in (1, 2):
            tok = pipe(class_labels=inp["labels"], noise=inp["noise"], num_inference_steps=k, output_type="tokens").images
            img = pipe(class_labels=inp["labels"], noise=inp["noise"], num_inference_steps=k, output_type="np").images
            out[k] = [tok.tolist(), img.tolist()]
        assert "stepdistill" not in sys.modules
        print(json.dumps(out))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for k in (1, 2):
        assert out[str(k)][0] == expected[k][0].tolist()
        torch.testing.assert_close(torch.tensor(out[str(k)][1]), expected[k][1], atol=1e-5, rtol=0)


def test_folder_without_head_still_loads_and_decodes_tokens(teacher, tmp_path):
    from stepdistill.export import export_dd_pipeline

    d = _dd(teacher, tmp_path, split_t=None)
    folder = export_dd_pipeline(d.student, teacher, tmp_path / "old")
    assert not (folder / "continuous_head.safetensors").exists()
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("split_t")  # a folder written before the head existed
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = DistilledDecodingPipeline.from_pretrained(str(folder))
    assert pipe.continuous_head is None
    noise = torch.randn(2, 16, 2, generator=torch.Generator().manual_seed(0))
    tok = pipe(class_labels=[1, 2], noise=noise, output_type="tokens").images
    assert torch.equal(tok, d.student(noise, torch.tensor([1, 2]), num_steps=1))
    img = pipe(class_labels=[1, 2], noise=noise, output_type="pt").images
    torch.testing.assert_close(img, (teacher.decode(tok) / 2 + 0.5).clamp(0, 1), atol=1e-6, rtol=0)


def test_decode_vectors_of_codes_equals_decoding_tokens(teacher):
    tok = torch.randint(0, 8, (2, 16), generator=torch.Generator().manual_seed(0))
    vec = teacher.codebook[tok] * 3.0
    torch.testing.assert_close(decode_vectors(teacher.vqvae, vec, (4, 4), 3.0).clamp(-1, 1), teacher.decode(tok),
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# teacher-involved sampling


def test_teacher_involved_sampling(teacher, tmp_path):
    d = _dd(teacher, tmp_path, split_t=None)
    _perturb(d.student, 0.05)
    s = d.student
    noise = torch.randn(5, 16, 2, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3, 4])
    one, _ = s.generate(noise, labels, num_steps=1)
    two, _ = s.generate(noise, labels, num_steps=2)
    flow = d.flow_kwargs
    for k in (1, 4, 8):
        tok, vec = s.generate(noise, labels, teacher=teacher, teacher_steps=k, flow=flow)
        start = 8 - k
        assert torch.equal(tok[:, :start], one[:, :start])  # the student's prefix is kept
        # tokens start..7: the teacher's flow map of the same noise after that prefix
        for i in range(start, 8):
            logits = teacher.logits(tok[:, :i], labels)
            assert torch.equal(tok[:, i], flow_map(noise[:, i], s.codes, logits, **flow))
        # the rest: a student pass at split point 8 with tokens < 8 as data
        x = noise.clone()
        x[:, :8] = s.codes[tok[:, :8]]
        is_data = torch.zeros(5, 16, dtype=torch.bool)
        is_data[:, :8] = True
        assert torch.equal(tok[:, 8:], s.logits(x, labels, is_data).argmax(-1)[:, 8:])
        torch.testing.assert_close(vec, s.codes[tok], rtol=0, atol=0)
    # teacher_steps = 8 (= t_2): tokens < 8 are the teacher's own map; 0 is the plain two-step sampler
    full = teacher_span_fn(teacher, s.codes, flow)(labels, one[:, :0], noise, 8)
    assert torch.equal(s.generate(noise, labels, teacher=teacher, teacher_steps=8, flow=flow)[0][:, :8], full)
    assert torch.equal(s.generate(noise, labels, teacher=teacher, teacher_steps=0)[0], two)
    with pytest.raises(ValueError, match="teacher_steps"):
        s.generate(noise, labels, teacher=teacher, teacher_steps=9)
    one_split = _dd(teacher, tmp_path, split_t=None, split_points=[0]).student
    with pytest.raises(ValueError, match="second split point"):
        one_split.generate(noise, labels, teacher=teacher, teacher_steps=2)
    # DD1's random teacher draws: the same distribution, reproducible per generator, cheaper per step
    from stepdistill.pipelines.ar_image import draw_uniforms, sample_tokens

    gens = [torch.Generator().manual_seed(i) for i in range(5)]
    rnd, _ = s.generate(noise, labels, teacher=teacher, teacher_steps=3, teacher_sampler="random", generator=gens)
    assert torch.equal(rnd[:, :5], one[:, :5])
    again = [torch.Generator().manual_seed(i) for i in range(5)]
    for i in range(5, 8):
        u = draw_uniforms(again, 5, "cpu")
        assert torch.equal(rnd[:, i], sample_tokens(teacher.logits(rnd[:, :i], labels), u))
    with pytest.raises(ValueError, match="sampler"):
        teacher_span_fn(teacher, s.codes, sampler="greedy")
    # the pipeline takes the same teacher function
    from stepdistill.export import export_dd_pipeline

    pipe = DistilledDecodingPipeline.from_pretrained(str(export_dd_pipeline(s, teacher, tmp_path / "p")))
    fn = teacher_span_fn(teacher, s.codes, flow)
    got = pipe(class_labels=labels, noise=noise, output_type="tokens", teacher_fn=fn, teacher_steps=4).images
    assert torch.equal(got, s.generate(noise, labels, teacher=teacher, teacher_steps=4, flow=flow)[0])
