"""Tiny random-weight diffusers / transformers components for tests and for exercising the code paths
of big models without downloads (each builds in well under a second on CPU).

* :func:`tiny_unet2d` -- a class-conditional (or unconditional) ``UNet2DModel``; class-conditional
  models get ``num_class_embeds = num_classes + 1`` (last index = null class for CFG).
* :func:`tiny_clip_tokenizer` -- a ``CLIPTokenizer`` built from a byte-level BPE vocabulary written
  by code (every byte has a token, so any prompt tokenizes; no hub access).
* :func:`tiny_sd_components` -- Stable-Diffusion-shaped ``unet`` / ``vae`` / ``text_encoder`` /
  ``tokenizer`` / ``scheduler`` (SD's scaled-linear DDPM schedule).
* :func:`tiny_sd_pipeline_folder` -- the above saved as a ``StableDiffusionPipeline`` folder.

Weights are seeded (default ``seed=0``) without touching the global RNG state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

#: the SD 1.x noise schedule
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def _seeded(seed: int):
    """Context manager: run model construction under ``torch.manual_seed(seed)`` and restore the
    global RNG afterwards."""
    rng = torch.random.fork_rng(devices=[])

    class _Ctx:
        def __enter__(self):
            rng.__enter__()
            torch.manual_seed(seed)

        def __exit__(self, *exc):
            return rng.__exit__(*exc)

    return _Ctx()


def tiny_unet2d(
    num_classes: int | None = 10,
    sample_size: int = 8,
    channels: int = 1,
    seed: int = 0,
    block_out_channels: tuple[int, ...] = (16, 32),
):
    """A tiny ``UNet2DModel``: ``num_class_embeds = num_classes + 1`` (``None``: unconditional)."""
    from diffusers import UNet2DModel

    with _seeded(seed):
        return UNet2DModel(
            sample_size=sample_size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=block_out_channels,
            layers_per_block=1,
            down_block_types=("DownBlock2D",) * len(block_out_channels),
            up_block_types=("UpBlock2D",) * len(block_out_channels),
            norm_num_groups=8,
            num_class_embeds=None if num_classes is None else num_classes + 1,
        )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def tiny_clip_tokenizer(tmp_dir: str | Path, model_max_length: int = 16):
    """A ``CLIPTokenizer`` from a locally written byte-level vocab.json + merges.txt.

    The vocabulary has every byte (alone and word-final ``</w>``), a few merges and CLIP's special
    tokens, so any text tokenizes.  Files go to ``tmp_dir/tiny-clip-tokenizer``.
    """
    from transformers import CLIPTokenizer

    folder = Path(tmp_dir) / "tiny-clip-tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    merges = [
        ("a", "b"),
        ("c", "d"),
        ("l", "o"),
        ("lo", "w</w>"),
        ("e", "r</w>"),
        ("t", "h"),
        ("th", "e</w>"),
    ]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)


def tiny_clip_text_encoder(tokenizer, hidden_size: int = 32, seed: int = 0):
    """A tiny ``CLIPTextModel`` matching ``tokenizer`` (vocabulary, special ids, max length)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=hidden_size,
    )
    with _seeded(seed):
        model = CLIPTextModel(config)
    return model.eval()


def tiny_sd_components(tmp_dir: str | Path, seed: int = 0, scheduler: str = "ddpm") -> dict[str, Any]:
    """Stable-Diffusion-shaped tiny components: ``unet`` (UNet2DConditionModel, 4x8x8 latents,
    cross-attention dim 32), ``vae`` (AutoencoderKL, 3x16x16 images), ``text_encoder``
    (CLIPTextModel), ``tokenizer`` and ``scheduler`` (``"ddpm"`` or ``"pndm"``, SD's scaled-linear
    schedule)."""
    from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel

    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=4,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            latent_channels=4,
            norm_num_groups=4,
            sample_size=16,
            layers_per_block=1,
        )
    tokenizer = tiny_clip_tokenizer(tmp_dir)
    text_encoder = tiny_clip_text_encoder(tokenizer, hidden_size=32, seed=seed)
    if scheduler == "ddpm":
        sched = DDPMScheduler(**SD_SCHEDULER_CONFIG)
    elif scheduler == "pndm":
        cfg = {k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "clip_sample"}
        sched = PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **cfg)
    else:
        raise ValueError(f"scheduler must be 'ddpm' or 'pndm', got {scheduler!r}")
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": sched,
    }


def tiny_sd_pipeline_folder(tmp_dir: str | Path, seed: int = 0, name: str = "tiny-sd") -> Path:
    """Save a tiny ``StableDiffusionPipeline`` to ``tmp_dir/name`` and return the folder."""
    from diffusers import StableDiffusionPipeline

    tmp_dir = Path(tmp_dir)
    parts = tiny_sd_components(tmp_dir, seed=seed)
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    out = tmp_dir / name
    pipe.save_pretrained(out, safe_serialization=True)
    return out
