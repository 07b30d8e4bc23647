"""A LoRA student (``algorithm.params.generator_lora``) on a bfloat16 teacher shares the teacher's
base tensors: its frozen base *is* the teacher's (same storage, teacher dtype), only the fp32 adapter
is its own, so the student costs no second copy of the network (FLUX: 48 GB of fp32 base before).
Its output is what the former fp32-copy student gave, to bf16 compute tolerance, and its exports
(fused weights, LoRA file) equal that fp32 student (the adapter is folded in float32, not in bf16).
"""

from __future__ import annotations

import torch
from test_teachers_sdxl import PROMPTS

from stepdistill.algorithms import build
from stepdistill.algorithms.common import add_generator_lora, parse_generator_lora
from stepdistill.export import export_generator
from stepdistill.export.common import student_network
from stepdistill.students import Generator
from stepdistill.teachers.diffusion import DiffusersTeacher
from stepdistill.testing import tiny_sd_pipeline_folder

LORA = {"rank": 4, "alpha": 8}


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _student(tmp_path):
    folder = tiny_sd_pipeline_folder(tmp_path)
    teacher = DiffusersTeacher.from_pretrained(folder, dtype=torch.bfloat16)
    torch.manual_seed(0)
    algo = build("dmd2", teacher, {"generator_timesteps": [899], "update_ratio": 1, "generator_lora": dict(LORA)})
    gen = algo.generator
    with torch.no_grad():  # a trained-looking adapter (B = 0 at the start would hide the adapter's path)
        g = torch.Generator().manual_seed(3)
        for n, p in gen.denoiser.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    # the student as the former code made it: a full fp32 copy of the teacher, the same adapter
    old = teacher.trainable_copy()
    add_generator_lora(old, parse_generator_lora(dict(LORA)))
    lora = {n: p for n, p in gen.denoiser.model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in old.model.named_parameters():
            if "lora_" in n:
                p.copy_(lora[n])
    return folder, teacher, algo, gen, Generator(old, gen.timesteps, boundary=gen.boundary)


def test_bf16_lora_student_shares_the_teachers_base_and_keeps_its_output(tmp_path):
    _, teacher, algo, gen, old = _student(tmp_path)
    net = gen.denoiser.model
    teacher_params = dict(teacher.model.named_parameters())
    teacher_storages = {_storage(p) for p in teacher.model.parameters()}
    base = [(n, p) for n, p in net.named_parameters() if "lora_" not in n]
    adapter = [(n, p) for n, p in net.named_parameters() if "lora_" in n]
    assert base and adapter
    for n, p in base:  # the base *is* the teacher's tensor: same storage, bf16, frozen
        assert _storage(p) in teacher_storages, f"{n}: a copy, not the teacher's tensor"
        assert p.dtype == torch.bfloat16 and not p.requires_grad, n
    assert net.conv_in.weight is teacher_params["conv_in.weight"]
    for n, p in adapter:  # the adapter is the student's own, fp32 and trainable
        assert _storage(p) not in teacher_storages and p.dtype == torch.float32 and p.requires_grad, n
    # trainable parameters are exactly the adapter: what the optimizer and EMA see
    assert [n for n, p in algo.generator.named_parameters() if p.requires_grad] == \
        [f"denoiser.model.{n}" for n, _ in adapter]

    cond = teacher.encode_conditions(PROMPTS)
    z = torch.randn((2, *teacher.sample_shape), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = gen(z, cond, generator=torch.Generator().manual_seed(5))
        ref = old(z, cond, generator=torch.Generator().manual_seed(5))
        net.disable_adapters()
        try:
            plain = gen(z, cond, generator=torch.Generator().manual_seed(5))
        finally:
            net.enable_adapters()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = float((out - ref).norm() / ref.norm())  # measured 2.5e-3 (bf16 compute)
    assert rel < 1e-2, f"bf16-base student differs from the fp32-copy student by {rel:.3g} (relative)"
    assert float((plain - ref).norm() / ref.norm()) > 2e-2  # the adapter's effect (5e-2) is above that tolerance

    # training reaches only the adapter (fp32 gradients), and leaves the shared teacher alone
    before = {n: p.detach().clone() for n, p in teacher.model.named_parameters()}
    out = algo.loss({"raw_cond": PROMPTS}, 0, "generator", {})
    out.loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n and g.dtype == torch.float32 for n, g in grads.items())
    assert any(float(g.abs().sum()) > 0 for g in grads.values())
    opt = torch.optim.AdamW([p for p in algo.generator.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    for n, p in teacher.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_bf16_lora_student_exports_fused_and_adapter_in_float32(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder, teacher, _, gen, old = _student(tmp_path)
    out = export_generator(gen, teacher, tmp_path / "export", algorithm="dmd2", lora="both")
    cond = teacher.encode_conditions(PROMPTS)
    ehs = cond["encoder_hidden_states"].float()
    x = torch.randn((2, *teacher.sample_shape), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([899, 899])
    with torch.no_grad():
        ref = old.denoiser.model(x, t, encoder_hidden_states=ehs, return_dict=False)[0]

    def close(net, what):
        with torch.no_grad():
            y = net(x, t, encoder_hidden_states=ehs, return_dict=False)[0]
        err = float((y - ref).abs().max())
        assert err <= 1e-5 * max(1.0, float(ref.abs().max())), f"{what}: max abs err {err:.3g} vs the fp32 student"

    # the network the fused export writes: adapter folded into an fp32 copy of the base
    fused_net = student_network(gen, None)
    assert all(p.dtype == torch.float32 for p in fused_net.parameters())
    close(fused_net, "student_network")
    assert next(gen.denoiser.model.parameters()).dtype == torch.bfloat16  # the live student is untouched
    # the fused pipeline folder
    pipe = StableDiffusionPipeline.from_pretrained(out)
    close(pipe.unet, "fused pipeline")
    # the LoRA file on the teacher's (bf16-valued) base in fp32
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.unet.load_state_dict({k: v.float() for k, v in teacher.model.state_dict().items()})
    pipe.load_lora_weights(out)
    close(pipe.unet, "teacher + LoRA file")
