"""DiT teachers: trainable copies (critics, generators) must not drop class labels.

diffusers' DiT label embedder (``LabelEmbedding``, ``class_dropout_prob`` 0.1 by default) replaces
labels by the null class at random whenever the module is in train mode.  A trainable copy is in
train mode, so without a fix a tenth of a DiT generator's samples would be unconditional while the
real score it is matched to is conditional.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, Transformer2DModel

from stepdistill.teachers.diffusion import DiffusersTeacher, disable_label_dropout


def _dit(cls=Transformer2DModel, seed=0):
    torch.manual_seed(seed)
    return cls(
        norm_type="ada_norm_zero",
        num_embeds_ada_norm=10,
        patch_size=2,
        sample_size=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
    ).eval()


def _teacher(cls=Transformer2DModel):
    return DiffusersTeacher(_dit(cls), dict(DDPMScheduler().config), num_classes=10)


def _label_dropout_modules(net):
    return [m for m in net.modules() if type(m).__name__ == "LabelEmbedding"]


def test_stock_dit_drops_labels_in_train_mode():
    """The hazard itself (guards the test below against a diffusers change that hides it)."""
    net = _dit().train()
    emb = _label_dropout_modules(net)
    assert emb and emb[0].dropout_prob > 0
    labels = torch.zeros(2000, dtype=torch.long)
    torch.manual_seed(0)
    out = emb[0](labels)
    null = emb[0].embedding_table.weight[10]
    dropped = (out - null).abs().sum(1) < 1e-6
    assert 0.05 < dropped.float().mean() < 0.15


def test_trainable_copy_keeps_every_label():
    for cls in (Transformer2DModel, DiTTransformer2DModel):
        teacher = _teacher(cls)
        student = teacher.trainable_copy()
        assert student.model.training
        assert all(m.dropout_prob == 0 for m in _label_dropout_modules(student.model))
        # the frozen teacher keeps its config (an exported student carries the original value)
        assert student.model.config.get("num_embeds_ada_norm") == 10
        x = torch.randn(64, 4, 8, 8)
        labels = torch.arange(64) % 10
        cond = {"class_labels": labels}
        with torch.no_grad():
            ref = teacher.denoise(x, 2.0, cond)
            torch.manual_seed(0)
            got = student.denoise(x, 2.0, cond)
        # train mode with label dropout would replace ~6 of 64 rows by the unconditional output
        assert torch.allclose(got, ref, atol=1e-5), (got - ref).flatten(1).abs().amax(1)


def test_disable_label_dropout_is_idempotent_and_returns_the_module():
    net = _dit().train()
    assert disable_label_dropout(disable_label_dropout(net)) is net
    emb = _label_dropout_modules(net)[0]
    assert emb.dropout_prob == 0
    # the null-class row stays (the teacher's CFG needs it)
    assert emb.embedding_table.weight.shape[0] == 11


def test_dit_bottleneck_is_a_token_map():
    """DiT blocks output (B, N, D) tokens; bottleneck() lays them on the 2x2-patch grid."""
    from stepdistill.algorithms.common import GANHead

    teacher = _teacher()
    module, to_map = teacher.bottleneck()
    assert module is teacher.model.transformer_blocks[-1]
    seen = []
    h = module.register_forward_hook(lambda m, a, o: seen.append(to_map(o)))
    with torch.no_grad():
        teacher.denoise_raw(torch.randn(3, 4, 8, 8), torch.full((3,), 1.0), {"class_labels": torch.tensor([1, 2, 3])})
    h.remove()
    assert seen[0].shape == (3, 16, 4, 4)
    assert GANHead((16, 4, 4))(seen[0]).shape[0] == 3
