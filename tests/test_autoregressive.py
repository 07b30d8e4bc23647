"""AR teacher (VQModel + LlamaForCausalLM): sampling filters, CFG, cached == recomputed logits,
batch independence, tokenizer, training stages, and the self-contained ARImagePipeline."""

from __future__ import annotations

import json

import pytest
import torch

from stepdistill.pipelines.ar_image import cfg_logits, filter_logits, sample_tokens
from stepdistill.teachers.autoregressive import (
    ARTeacher,
    ARTeacherSpec,
    LMSpec,
    VQSpec,
    VQTrainSpec,
    build_transformer,
    build_vqvae,
)
from stepdistill.training.tasks import ARLMTraining, VQTraining

TINY_VQ = VQSpec(
    block_out_channels=[8, 8], latent_channels=4, vq_embed_dim=2, num_vq_embeddings=8, norm_num_groups=4
)
TINY_LM = LMSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def tiny_teacher(seed: int = 0, **settings) -> ARTeacher:
    torch.manual_seed(seed)
    vq = build_vqvae(TINY_VQ)
    with torch.no_grad():  # spread the codebook (diffusers initialises it to +-1/V)
        vq.quantize.embedding.weight.normal_()
    lm = build_transformer(TINY_LM, TINY_VQ.num_vq_embeddings, 10, 16)
    with torch.no_grad():  # sharper logits than the default init, so filters and CFG matter
        lm.lm_head.weight.mul_(20.0)
    return ARTeacher(vq, lm, num_classes=10, **settings).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


# ---------------------------------------------------------------------------------------------
# sampling maths


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, -2.0, 4.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isfinite(out).tolist() == [[False, True, False, False, True]]
    assert torch.equal(out[torch.isfinite(out)], torch.tensor([5.0, 4.0]))
    assert torch.equal(filter_logits(logits, top_k=0), logits)  # disabled
    assert torch.equal(filter_logits(logits, top_k=99), logits)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    keep = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert keep(0.7) == [False, True, False, True]  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert keep(0.5) == [False, True, False, False]  # the most likely token alone reaches 0.5
    assert keep(0.81) == [True, True, False, True]
    assert keep(1.0) == [True] * 4
    p = torch.softmax(filter_logits(logits, top_p=0.7), -1)
    torch.testing.assert_close(p, torch.tensor([[0.0, 0.625, 0.0, 0.375]]))


def test_temperature_then_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2)
    with pytest.raises(ValueError):
        filter_logits(logits, temperature=0.0)


def test_inverse_cdf_draw_matches_probabilities_and_never_picks_filtered():
    logits = filter_logits(torch.tensor([[0.0, 1.0, 2.0, 3.0]]).log1p(), top_k=3)
    p = torch.softmax(logits, -1)[0]
    u = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000  # stratified uniforms
    tok = sample_tokens(logits.expand(20000, -1), u)
    freq = torch.bincount(tok, minlength=4).double() / 20000
    assert freq[0] == 0
    torch.testing.assert_close(freq, p.double(), atol=1e-3, rtol=0)


def test_cfg_is_applied_to_logits(teacher):
    labels = torch.tensor([3, 7])
    prefix = torch.tensor([[1, 2, 3], [4, 5, 6]])
    cond = teacher.forward_logits(prefix, labels)[:, -1]
    uncond = teacher.forward_logits(prefix, torch.full_like(labels, 10))[:, -1]
    got = teacher.logits(prefix, labels, guidance_scale=2.5)
    torch.testing.assert_close(got, uncond + 2.5 * (cond - uncond))
    torch.testing.assert_close(cfg_logits(cond, uncond, 1.0), cond)
    torch.testing.assert_close(teacher.logits(prefix, labels, guidance_scale=1.0), cond)
    # top-k after CFG: exactly k finite entries
    k = teacher.logits(prefix, labels, guidance_scale=2.5, top_k=3)
    assert torch.isfinite(k).sum(-1).tolist() == [3, 3]


def test_cached_generation_equals_recomputed_logits(teacher):
    labels = torch.tensor([0, 5, 9])
    settings = dict(guidance_scale=1.75, temperature=0.9, top_k=5, top_p=0.95)
    seen = []
    g = torch.Generator().manual_seed(0)

    def choose(i, logits):
        seen.append(logits.clone())
        return sample_tokens(logits, torch.rand(3, generator=g, dtype=torch.float64))

    tokens = teacher.generate(labels, choose, **settings)
    assert tokens.shape == (3, teacher.num_tokens) and int(tokens.max()) < teacher.codebook_size
    for i in (0, 1, 7, 15):
        ref = teacher.logits(tokens[:, :i], labels, **settings)
        assert torch.equal(torch.isinf(ref), torch.isinf(seen[i]))
        fin = torch.isfinite(ref)
        torch.testing.assert_close(seen[i][fin], ref[fin], atol=1e-4, rtol=1e-4)


def test_sampling_is_per_image_deterministic(teacher):
    labels = torch.tensor([1, 2, 3, 4])
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(4)]  # noqa: E731
    a = teacher.sample(class_labels=labels, generator=gens())
    b = teacher.sample(class_labels=labels, generator=gens())
    assert torch.equal(a, b)
    alone = teacher.sample(class_labels=labels[2:3], generator=[torch.Generator().manual_seed(102)])
    assert torch.equal(alone[0], a[2])


def test_tokenizer_roundtrip_shapes(teacher):
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    tok = teacher.encode(x)
    assert tok.shape == (5, 16) and tok.dtype == torch.long
    img = teacher.decode(tok)
    assert img.shape == (5, 1, 8, 8) and img.abs().max() <= 1
    assert teacher.codebook.shape == (8, 2) and teacher.token_order == "raster"
    assert teacher.null_token == 8 + 10


# ---------------------------------------------------------------------------------------------
# training stages


def test_training_stages_have_finite_losses_and_restart_dead_codes():
    torch.manual_seed(0)
    vq_algo = VQTraining(TINY_VQ, VQTrainSpec(restart_every_steps=1))
    with torch.no_grad():
        vq_algo.vqvae.quantize.embedding.weight.fill_(100.0)  # all codes dead
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    out = vq_algo.loss({"real": x, "raw_cond": None}, 0, "vqvae", {})
    assert torch.isfinite(out.loss) and out.logs["codes_used"] > 1
    out.loss.backward()
    assert any(p.grad is not None for p in vq_algo.vqvae.parameters())
    lm = build_transformer(TINY_LM, 8, 10, 16)
    lm_algo = ARLMTraining(TINY_LM, lm, 8, 10)
    out = lm_algo.loss(
        {"real": torch.randint(0, 8, (4, 16)), "raw_cond": torch.tensor([0, 1, 2, 3])}, 0, "transformer", {}
    )
    assert torch.isfinite(out.loss) and abs(out.loss.item() - torch.log(torch.tensor(8.0)).item()) < 1.0
    out.loss.backward()
    assert lm.model.embed_tokens.weight.grad is not None


def test_digits_ar_preset_parses():
    from stepdistill.config import from_dict, load_config

    cfg = load_config("digits-ar/teacher")
    assert cfg.teacher.kind == "ar" and cfg.description
    spec = from_dict(ARTeacherSpec, cfg.teacher.params, prefix="teacher.params.")
    assert spec.vq.num_vq_embeddings == 32 and len(spec.vq.block_out_channels) == 2


def test_run_ar_teacher_training_tiny(tmp_path):
    from stepdistill.config import load_config
    from stepdistill.run import run_ar_teacher_training

    cfg = load_config(
        "digits-ar/teacher",
        [
            "teacher.params.vq.block_out_channels=[8, 8]",
            "teacher.params.vq.norm_num_groups=4",
            "teacher.params.vq_train.max_steps=3",
            "teacher.params.lm.hidden_size=32",
            "teacher.params.lm.num_layers=1",
            "teacher.params.lm.num_heads=2",
            "teacher.params.lm.intermediate_size=64",
            "train.max_steps=3",
            "train.batch_size=8",
            "train.report_to=null",
            "train.sample_every_steps=0",
            "train.progress=false",
        ],
    )
    pipe_dir = run_ar_teacher_training(cfg, tmp_path / "t")
    info = json.loads((tmp_path / "t" / "teacher_training.json").read_text())
    assert info["num_tokens"] == 16 and info["codebook_size"] == 32
    t = ARTeacher.from_pretrained(pipe_dir)
    assert t.guidance_scale == cfg.teacher.guidance_scale and t.num_tokens == 16
    assert t.sample(n=2, generator=torch.Generator().manual_seed(0), decode=True).shape == (2, 1, 8, 8)


# ---------------------------------------------------------------------------------------------
# the self-contained pipeline


def test_pipeline_roundtrip_trust_remote_code(tmp_path):
    """Export, reload three ways, same tokens for the same generators.  (The fresh-process check
    with plain diffusers -- no stepdistill import -- runs in tests/test_distilled_decoding.py,
    together with the DD pipeline's, to pay the interpreter start-up once.)"""
    from diffusers import DiffusionPipeline

    from stepdistill.export import export_ar_teacher_pipeline
    from stepdistill.pipelines.ar_image import ARImagePipeline

    t = tiny_teacher(seed=1, guidance_scale=1.5, top_k=6, top_p=0.9)
    folder = export_ar_teacher_pipeline(t, tmp_path / "ar")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["ar_image", "ARImagePipeline"]
    assert index["transformer"] == ["transformers", "LlamaForCausalLM"]
    assert index["vqvae"] == ["diffusers", "VQModel"]
    assert (folder / "ar_image.py").exists() and (folder / "README.md").exists()
    labels = [0, 3, 9]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    expected = t.sample(class_labels=labels, generator=gens())
    again = ARTeacher.from_pretrained(folder)
    assert again.settings() == t.settings()
    assert torch.equal(again.sample(class_labels=labels, generator=gens()), expected)
    remote = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    assert type(remote).__name__ == "ARImagePipeline" and not type(remote).__module__.startswith(
        "stepdistill"
    )
    assert (
        remote(class_labels=labels, generator=gens(), output_type="tokens").images.tolist()
        == expected.tolist()
    )
    direct = ARImagePipeline.from_pretrained(str(folder))
    assert type(direct) is ARImagePipeline
    img = direct(class_labels=labels, generator=gens(), output_type="pt").images
    torch.testing.assert_close(img, (t.decode(expected) + 1) / 2)
