"""Architecture configs of the paper-scale teachers, recorded so that ``stepdistill plan`` can size
a run whose ``teacher.path`` names a hub id that is not on this machine (nothing is downloaded).

Each entry is what the teacher folder's ``model_index.json`` and component ``config.json`` files
say, reduced to the keys that shape the networks: ``{component: (library, class, config)}`` plus
folder-level keys (``num_classes``, ``grid_size``, ``codebook_size``, ``text_seq_len``).
:func:`stepdistill.plan.teacher_arch` builds every component on the ``meta`` device from these
configs (no weights), exactly as it does from a local folder's JSON files, so a recorded entry and
the real folder give the same parameter counts.  The counts each entry must produce are asserted
in ``tests/test_plan.py`` (``PARAMETER_COUNTS`` below, the published sizes).

Keys are hub ids (and the local folder a preset names, for the converted LlamaGen teacher);
``stepdistill plan --arch NAME`` forces an entry for any ``teacher.path``.
"""

from __future__ import annotations

from typing import Any

CLIP_L = {  # openai/clip-vit-large-patch14 text tower (SD 1.x, SDXL text_encoder, SD3 / FLUX CLIP-L)
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}
OPENCLIP_H = {  # SD 2.x text encoder (OpenCLIP ViT-H/14 text tower, penultimate layer -> 23 layers)
    "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 512,
}
OPENCLIP_BIGG = {  # SDXL / SD3 text_encoder_2 (OpenCLIP ViT-bigG/14 text tower, with projection)
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280,
}
T5_XXL = {  # google/t5-v1_1-xxl encoder (SD3 text_encoder_3, FLUX text_encoder_2)
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "is_encoder_decoder": False,
}
SD_VAE = {  # AutoencoderKL of SD 1.x / 2.x / SDXL / DiT (sd-vae-ft-ema)
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
FLOW_VAE = {**SD_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}  # SD3, FLUX

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "norm_num_groups": 32,
}
SD21_BASE_UNET = {**SD15_UNET, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
                  "use_linear_projection": True}
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
}
SD3_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
}
FLUX_DEV = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}
DIT_XL_2_256 = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8, "num_layers": 28,
    "attention_bias": True, "sample_size": 32, "patch_size": 2, "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5,
}
LLAMAGEN_L_VQ = {  # VQ-16 tokenizer as the llamagen/dd preset header converts it
    "in_channels": 3, "out_channels": 3, "block_out_channels": [128, 128, 256, 256, 512], "layers_per_block": 2,
    "latent_channels": 256, "vq_embed_dim": 8, "num_vq_embeddings": 16384, "norm_num_groups": 32,
    "sample_size": 256, "down_block_types": ["DownEncoderBlock2D"] * 5, "up_block_types": ["UpDecoderBlock2D"] * 5,
}
LLAMAGEN_L_LM = {
    "vocab_size": 16384 + 1000 + 1, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_key_value_heads": 16, "intermediate_size": 2816, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "max_position_embeddings": 512,
}

VAR_PATCH_NUMS = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
VAR_VQVAE = {  # FoundationVision/VAR vae_ch160v4096z32 (build_vae_var's VQVAE arguments)
    "vocab_size": 4096, "z_channels": 32, "ch": 160, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2,
    "using_sa": True, "using_mid_sa": True, "quant_resi": 0.5, "share_quant_resi": 4,
    "v_patch_nums": VAR_PATCH_NUMS,
}
VAR_D16 = {  # VAR-d16: width 64 * 16, 16 heads, attn_l2_norm, no shared adaLN
    "vocab_size": 4096, "z_channels": 32, "num_classes": 1000, "depth": 16, "embed_dim": 1024, "num_heads": 16,
    "mlp_ratio": 4.0, "norm_eps": 1e-6, "shared_aln": False, "attn_l2_norm": True, "patch_nums": VAR_PATCH_NUMS,
}

_SD15 = {"_class_name": "StableDiffusionPipeline", "unet": ("diffusers", "UNet2DConditionModel", SD15_UNET),
         "text_encoder": ("transformers", "CLIPTextModel", CLIP_L), "vae": ("diffusers", "AutoencoderKL", SD_VAE),
         "text_seq_len": 77}

#: recorded architectures, keyed by hub id (or the local folder a preset names)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _SD15,
    "runwayml/stable-diffusion-v1-5": _SD15,
    "stabilityai/stable-diffusion-2-1-base": {
        "_class_name": "StableDiffusionPipeline",
        "unet": ("diffusers", "UNet2DConditionModel", SD21_BASE_UNET),
        "text_encoder": ("transformers", "CLIPTextModel", OPENCLIP_H),
        "vae": ("diffusers", "AutoencoderKL", SD_VAE), "text_seq_len": 77,
    },
    "stabilityai/stable-diffusion-xl-base-1.0": {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ("diffusers", "UNet2DConditionModel", SDXL_UNET),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_L),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", OPENCLIP_BIGG),
        "vae": ("diffusers", "AutoencoderKL", SD_VAE), "text_seq_len": 77,
    },
    "stabilityai/stable-diffusion-3-medium-diffusers": {
        "_class_name": "StableDiffusion3Pipeline",
        "transformer": ("diffusers", "SD3Transformer2DModel", SD3_MEDIUM),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection", CLIP_L),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", OPENCLIP_BIGG),
        "text_encoder_3": ("transformers", "T5EncoderModel", T5_XXL),
        "vae": ("diffusers", "AutoencoderKL", FLOW_VAE), "text_seq_len": 77 + 256,
    },
    "black-forest-labs/FLUX.1-dev": {
        "_class_name": "FluxPipeline",
        "transformer": ("diffusers", "FluxTransformer2DModel", FLUX_DEV),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_L),
        "text_encoder_2": ("transformers", "T5EncoderModel", T5_XXL),
        "vae": ("diffusers", "AutoencoderKL", FLOW_VAE), "text_seq_len": 512, "sample_shape": [16, 128, 128],
    },
    "facebook/DiT-XL-2-256": {
        "_class_name": "DiTPipeline",
        "transformer": ("diffusers", "Transformer2DModel", DIT_XL_2_256),
        "vae": ("diffusers", "AutoencoderKL", SD_VAE), "num_classes": 1000,
    },
    "checkpoints/llamagen-l-ar": {
        "_class_name": "ARImagePipeline",
        "vqvae": ("diffusers", "VQModel", LLAMAGEN_L_VQ),
        "transformer": ("transformers", "LlamaForCausalLM", LLAMAGEN_L_LM),
        "num_classes": 1000, "grid_size": [16, 16], "codebook_size": 16384,
    },
}
ARCHITECTURES["llamagen-l"] = ARCHITECTURES["checkpoints/llamagen-l-ar"]
ARCHITECTURES["checkpoints/var-d16"] = {  # VAR-d16 + vae_ch160v4096z32 as convert_var writes them
    "_class_name": "VARPipeline",
    "vqvae": ("var_model", "VARVQVAE", VAR_VQVAE),
    "transformer": ("var_model", "VARTransformer", VAR_D16),
    "num_classes": 1000,
}
ARCHITECTURES["var-d16"] = ARCHITECTURES["checkpoints/var-d16"]

#: denoiser parameter counts the recorded configs must give (published sizes; tests/test_plan.py)
PARAMETER_COUNTS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": 859_520_964,
    "stabilityai/stable-diffusion-2-1-base": 865_910_724,
    "stabilityai/stable-diffusion-xl-base-1.0": 2_567_463_684,
    "stabilityai/stable-diffusion-3-medium-diffusers": 2_028_328_000,
    # diffusers' Transformer2DModel port of DiT keeps a timestep + label embedder in every block's
    # AdaLayerNormZero (the paper's 675M share one), so the folder's denoiser is 750M parameters
    "facebook/DiT-XL-2-256": 749_826_464,
    "black-forest-labs/FLUX.1-dev": 11_901_408_320,
    "checkpoints/var-d16": 310_283_520,  # VAR-d16 ("310M" in the VAR model zoo)
}

__all__ = ["ARCHITECTURES", "PARAMETER_COUNTS"]
