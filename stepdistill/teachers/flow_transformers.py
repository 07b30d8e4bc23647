"""Flow-matching transformer teachers: SD3 / SD3.5 (``SD3Transformer2DModel``) and FLUX.1
(``FluxTransformer2DModel``), in the package's noise-level language.

Both are rectified flows, ``x_t = (1 - t) x0 + t eps`` with velocity ``v = eps - x0``; the adapter
(:class:`~stepdistill.teachers.diffusion.DiffusersTeacher`, ``prediction_type="flow"``) maps
``sigma = t / (1 - t)`` and ``x_t = x / (1 + sigma)``.  The training grid is the scheduler's shifted
grid ``t' = s t / (1 + (s - 1) t)``: ``s`` is the config's ``shift`` (3.0 for SD3), or, when the
scheduler has ``use_dynamic_shifting`` (FLUX.1), ``s = exp(mu)`` with ``mu`` the stock pipeline's
``calculate_shift`` of the image token count of the teacher's sample shape (the exponential time
shift with ``mu`` equals the static shift ``exp(mu)``).

Conditions are built exactly as the stock pipelines' ``encode_prompt`` builds them:

* SD3: ``encoder_hidden_states`` = [penultimate hidden states of CLIP-L ++ CLIP-G along features,
  zero-padded to the T5 width] ++ T5 hidden states along the sequence (zeros when the folder has
  no ``text_encoder_3``); ``pooled_projections`` = CLIP-L pooled ++ CLIP-G pooled.  The
  unconditional input is the encoding of ``""`` (the pipeline's default negative prompt).
* FLUX.1: ``encoder_hidden_states`` = T5 hidden states, ``pooled_projections`` = CLIP pooler
  output.  Latents keep the (C, H, W) layout everywhere in the package; they are packed into 2x2
  patches (``_pack_latents``), given ``img_ids`` / ``txt_ids`` and unpacked at the network call.

Guidance-distilled FLUX.1 checkpoints (``guidance_embeds=True``, FLUX.1-dev) take the guidance
scale as a network input and have no true classifier-free guidance: for them
``embedded_guidance`` is True, ``denoise(x, sigma, cond, guidance_scale)`` feeds ``guidance_scale``
to the guidance embedding in a single network call and never runs an unconditional branch;
``denoise_raw`` (no guidance, by contract: critics' denoising losses, students) feeds guidance 1, so
a critic is trained and queried (``guidance_scale=1``) at the same input.  An exported FLUX-dev
student therefore runs with ``guidance_scale=1`` in ``FluxPipeline``.
Checkpoints without the embedding (FLUX.1-schnell) use ordinary CFG with the empty-prompt
encoding (the pipeline's ``true_cfg_scale`` with negative prompt ``""``), off at scale 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .base import Cond, cond_to, freeze
from .diffusion import DiffusersTeacher, TeacherLoadError, TokenGrid, load_folder_part

#: weights of the FLUX guidance embedding (present iff the checkpoint is guidance-distilled)
FLUX_GUIDANCE_PREFIX = "time_text_embed.guidance_embedder."


def calculate_shift(seq_len: int, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """The stock pipelines' ``mu`` for ``seq_len`` image tokens (a line through two points)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(seq_len * m + base_shift - m * base_seq_len)


def _dynamic_shift(scheduler_config: dict, seq_len: int) -> float | None:
    cfg = scheduler_config
    if not cfg.get("use_dynamic_shifting"):
        return None
    if cfg.get("time_shift_type", "exponential") != "exponential":
        raise TeacherLoadError(
            f"scheduler time_shift_type={cfg.get('time_shift_type')!r} is not supported (only exponential)"
        )
    mu = calculate_shift(
        seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    return math.exp(mu)


class _TextFlowTeacher(DiffusersTeacher):
    """Shared machinery: several frozen text encoders lent to copies, a cached empty-prompt row."""

    #: extra (encoder, tokenizer) attribute names beyond text_encoder / tokenizer
    _extra_encoders: tuple[str, ...] = ()
    #: components from_folder loads (name -> required)
    _folder_parts: dict[str, bool] = {}

    def _init_encoders(self, encoders: dict[str, Any]) -> None:
        for name in self._extra_encoders:
            enc = encoders.get(f"text_encoder_{name}")
            setattr(self, f"text_encoder_{name}", enc)
            setattr(self, f"tokenizer_{name}", encoders.get(f"tokenizer_{name}"))
            if enc is not None:
                freeze(enc)
        self._null_row: Cond | None = None

    @classmethod
    def from_folder(
        cls, path, src: str, index: dict, model, sched_cfg: dict, *, prediction_type=None,
        guidance_scale: float | None = None, dtype=torch.float32, null_prompt=None, sample_shape=None,
    ):
        parts = {
            name: load_folder_part(path, src, index, name, dtype, required=req)
            for name, req in cls._folder_parts.items()
        }
        parts["vae"] = load_folder_part(path, src, index, "vae", torch.float32, required=False)
        kw = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        return cls(model, sched_cfg, prediction_type=prediction_type, sample_shape=sample_shape, **parts, **kw)

    def _copy_kwargs(self) -> dict:
        kw = super()._copy_kwargs()
        for k in ("num_classes", "null_prompt"):
            kw.pop(k)
        for name in self._extra_encoders:
            kw[f"tokenizer_{name}"] = getattr(self, f"tokenizer_{name}")
        return kw

    def _shared_parts(self) -> dict:
        parts = super()._shared_parts()
        for name in self._extra_encoders:
            parts[f"text_encoder_{name}"] = self._shared_part(f"text_encoder_{name}")
        return parts

    @staticmethod
    def _tokens(tok, prompts, max_length, **kw) -> Tensor:
        return tok(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt", **kw
        ).input_ids

    def _null_cond_row(self) -> Cond:
        if self._null_row is None:
            self._null_row = self.encode_conditions([""])
        if self._null_row["encoder_hidden_states"].device != self.sigmas.device:
            self._null_row = cond_to(self._null_row, self.sigmas.device)
        return self._null_row

    def null_condition(self, batch_size: int) -> Cond:
        """The encoding of the empty prompt (the stock pipelines' default negative prompt)."""
        row = self._null_cond_row()
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in row.items()}

    def null_condition_like(self, cond: Cond | None, batch_size: int) -> Cond:
        null = self.null_condition(batch_size)
        if cond and "guidance" in cond:
            null["guidance"] = cond["guidance"]
        return null

    def random_raw_conditions(self, n: int, generator=None):
        return None

    def bottleneck(self):
        """The last joint (dual-stream) block's image stream on the patch grid: these blocks
        return ``(encoder_hidden_states, hidden_states)``; the text stream is not a feature map
        (and is None after SD3's last, context-pre-only block)."""
        blocks = self.model.transformer_blocks
        patch = 2 * int(self.model.config.get("patch_size") or 1) if isinstance(self, FluxTeacher) else int(
            self.model.config.get("patch_size") or 2
        )
        return blocks[-1], TokenGrid(self.sample_shape, patch, stream=1)


class SD3Teacher(_TextFlowTeacher):
    """Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` with CLIP-L, CLIP-G (both
    ``CLIPTextModelWithProjection``) and an optional T5 encoder; joint attention over the
    concatenated text tokens, ``pooled_projections`` from both CLIP encoders."""

    _extra_encoders = ("2", "3")
    _folder_parts = {
        "text_encoder": True, "tokenizer": True, "text_encoder_2": True, "tokenizer_2": True,
        "text_encoder_3": False, "tokenizer_3": False,
    }

    def __init__(
        self,
        model: nn.Module,
        scheduler_config: dict,
        prediction_type: str | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any = None,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2: Any = None,
        text_encoder_3: nn.Module | None = None,
        tokenizer_3: Any = None,
        vae: nn.Module | None = None,
        sample_shape: tuple[int, ...] | None = None,
        guidance_scale: float = 1.0,
        flow_shift: float | None = None,
        max_sequence_length: int = 256,
    ):
        if prediction_type not in (None, "flow"):
            raise TeacherLoadError(f"SD3 teachers are flow-matching models; prediction_type {prediction_type!r} is wrong")
        if tokenizer is None or tokenizer_2 is None:
            raise TeacherLoadError("an SD3 teacher needs both CLIP tokenizers (tokenizer, tokenizer_2)")
        cfg = model.config
        if sample_shape is None:
            s = int(cfg.get("sample_size") or 128)
            sample_shape = (int(cfg.get("in_channels") or 16), s, s)
        if flow_shift is None:
            p = int(cfg.get("patch_size") or 2)
            flow_shift = _dynamic_shift(dict(scheduler_config), (sample_shape[1] // p) * (sample_shape[2] // p))
        super().__init__(
            model, scheduler_config, prediction_type="flow", text_encoder=text_encoder, tokenizer=tokenizer,
            vae=vae, sample_shape=sample_shape, guidance_scale=guidance_scale, flow_shift=flow_shift,
        )
        self.max_sequence_length = int(max_sequence_length)
        self._init_encoders(
            dict(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
                 tokenizer_3=tokenizer_3)
        )

    def _copy_kwargs(self) -> dict:
        kw = super()._copy_kwargs()
        kw["max_sequence_length"] = self.max_sequence_length
        return kw

    def encode_conditions(self, raw) -> Cond | None:
        if raw is None:
            return None
        prompts = [raw] if isinstance(raw, str) else list(raw)
        device = self.sigmas.device
        max_len = self.tokenizer.model_max_length  # the pipeline's tokenizer_max_length, for both CLIPs
        hidden, pooled = [], []
        for tok, te in ((self.tokenizer, self._text_encoder()), (self.tokenizer_2, self._shared_part("text_encoder_2"))):
            if te is None:
                raise ValueError("this SD3 teacher has no CLIP text encoders (a copy whose teacher lent none?)")
            with torch.no_grad():
                out = te(self._tokens(tok, prompts, max_len).to(te.device), output_hidden_states=True)
            pooled.append(out[0].float())
            hidden.append(out.hidden_states[-2].float())
        clip = torch.cat(hidden, dim=-1)
        te3 = self._shared_part("text_encoder_3")
        if te3 is None or self.tokenizer_3 is None:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, self.model.config.joint_attention_dim)
        else:
            ids = self._tokens(self.tokenizer_3, prompts, self.max_sequence_length, add_special_tokens=True)
            with torch.no_grad():
                t5 = te3(ids.to(te3.device))[0].float()
        t5 = t5.to(clip.device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5], dim=-2).to(device),
            "pooled_projections": torch.cat(pooled, dim=-1).to(device),
        }


class FluxTeacher(_TextFlowTeacher):
    """FLUX.1: ``FluxTransformer2DModel`` with CLIP-L (pooled) and T5 (sequence); 2x2-packed
    latents with positional ids; the guidance embedding when ``guidance_embeds=True``."""

    _extra_encoders = ("2",)
    _folder_parts = {"text_encoder": True, "tokenizer": True, "text_encoder_2": True, "tokenizer_2": True}

    def __init__(
        self,
        model: nn.Module,
        scheduler_config: dict,
        prediction_type: str | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any = None,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2: Any = None,
        vae: nn.Module | None = None,
        sample_shape: tuple[int, ...] | None = None,
        guidance_scale: float | None = None,
        flow_shift: float | None = None,
        max_sequence_length: int = 512,
    ):
        if prediction_type not in (None, "flow"):
            raise TeacherLoadError(f"FLUX teachers are flow-matching models; prediction_type {prediction_type!r} is wrong")
        if tokenizer is None or tokenizer_2 is None:
            raise TeacherLoadError("a FLUX teacher needs both tokenizers (CLIP tokenizer, T5 tokenizer_2)")
        cfg = model.config
        out_ch = cfg.get("out_channels") or cfg.in_channels
        if out_ch != cfg.in_channels:
            raise TeacherLoadError(
                f"this FluxTransformer2DModel takes {cfg.in_channels} input channels but predicts {out_ch} "
                "(FLUX Fill / Control style, image-conditioned); only text-to-image FLUX.1 teachers are supported"
            )
        if sample_shape is None:  # the pipeline's default: 1024 px, 8x VAE -> 128x128 latents
            sample_shape = (int(cfg.in_channels) // 4, 128, 128)
        c, h, w = sample_shape
        if c * 4 != cfg.in_channels or h % 2 or w % 2:
            raise TeacherLoadError(
                f"FLUX latents are packed 2x2: sample_shape {tuple(sample_shape)} needs even H, W and "
                f"4 C = in_channels ({cfg.in_channels})"
            )
        if flow_shift is None:
            flow_shift = _dynamic_shift(dict(scheduler_config), (h // 2) * (w // 2))
        embedded = bool(cfg.get("guidance_embeds", False))
        if guidance_scale is None:
            guidance_scale = 3.5 if embedded else 1.0  # FluxPipeline's default guidance_scale
        super().__init__(
            model, scheduler_config, prediction_type="flow", text_encoder=text_encoder, tokenizer=tokenizer,
            vae=vae, sample_shape=sample_shape, guidance_scale=guidance_scale, flow_shift=flow_shift,
        )
        #: guidance is a network input (FLUX.1-dev): no unconditional branch, ever
        self.embedded_guidance = embedded
        self.max_sequence_length = int(max_sequence_length)
        self._init_encoders(dict(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2))

    def _copy_kwargs(self) -> dict:
        kw = super()._copy_kwargs()
        kw["max_sequence_length"] = self.max_sequence_length
        return kw

    # -- conditions -------------------------------------------------------------------------------
    def encode_conditions(self, raw) -> Cond | None:
        if raw is None:
            return None
        prompts = [raw] if isinstance(raw, str) else list(raw)
        te, te2 = self._text_encoder(), self._shared_part("text_encoder_2")
        if te is None or te2 is None:
            raise ValueError("this FLUX teacher has no text encoders (a copy whose teacher lent none?)")
        with torch.no_grad():
            ids = self._tokens(self.tokenizer, prompts, self.tokenizer.model_max_length)
            pooled = te(ids.to(te.device), output_hidden_states=False).pooler_output.float()
            ids = self._tokens(self.tokenizer_2, prompts, self.max_sequence_length)
            t5 = te2(ids.to(te2.device), output_hidden_states=False)[0].float()
        device = self.sigmas.device
        return {"encoder_hidden_states": t5.to(device), "pooled_projections": pooled.to(device)}

    def with_guidance(self, cond: Cond | None, guidance_scale: float, batch_size: int) -> Cond:
        """``cond`` (the empty prompt when None) with the embedded guidance value for each row."""
        cond = dict(cond) if cond else self.null_condition(batch_size)
        cond["guidance"] = torch.full((batch_size,), float(guidance_scale), device=self.sigmas.device)
        return cond

    # -- network evaluation -----------------------------------------------------------------------
    @staticmethod
    def pack(x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, H/2 * W/2, 4C), as ``FluxPipeline._pack_latents``."""
        b, c, h, w = x.shape
        return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(x: Tensor, h: int, w: int) -> Tensor:
        """Inverse of :meth:`pack` (``FluxPipeline._unpack_latents`` in latent units)."""
        b, _, d = x.shape
        return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)

    @staticmethod
    def image_ids(h: int, w: int, device, dtype) -> Tensor:
        """(H/2 * W/2, 3) positions (0, row, col), as ``FluxPipeline._prepare_latent_image_ids``."""
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] += torch.arange(h // 2)[:, None]
        ids[..., 2] += torch.arange(w // 2)[None, :]
        return ids.reshape(-1, 3).to(device=device, dtype=dtype)

    def _call_model(self, x_native: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        dtype = self._model_dtype()
        device = x_native.device
        kwargs = cond_to(dict(cond or {}), device, dtype) or {}
        b, _, h, w = x_native.shape
        t = torch.as_tensor(t, device=device).float()
        if t.ndim == 0:
            t = t.expand(b)
        guidance = kwargs.pop("guidance", None)
        if self.embedded_guidance:
            if guidance is None:  # denoise_raw is the unguided evaluation: guidance input 1
                guidance = torch.ones(b, device=device)
            guidance = guidance.float()
        else:
            guidance = None
        txt = kwargs["encoder_hidden_states"]
        out = self.model(
            hidden_states=self.pack(x_native.to(dtype)),
            timestep=(t / 1000).to(dtype),  # the pipeline divides its 0..1000 timesteps by 1000
            guidance=guidance,
            pooled_projections=kwargs["pooled_projections"],
            encoder_hidden_states=txt,
            txt_ids=torch.zeros(txt.shape[1], 3, device=device, dtype=dtype),
            img_ids=self.image_ids(h, w, device, dtype),
            return_dict=False,
        )[0]
        return self.unpack(out, h, w).float()

    def native_output(self, x_native, timestep, cond, guidance_scale: float = 1.0):
        if not self.embedded_guidance:
            return super().native_output(x_native, timestep, cond, guidance_scale)
        timestep = torch.as_tensor(timestep, device=x_native.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(x_native.shape[0])
        return self._call_model(x_native, timestep, self.with_guidance(cond, guidance_scale, x_native.shape[0]))

    def denoise(self, x, sigma, cond=None, guidance_scale=None):
        """Guidance-distilled checkpoints: ``guidance_scale`` is the guidance-embedding input
        (one call, no unconditional branch); otherwise ordinary CFG."""
        if not self.embedded_guidance:
            return super().denoise(x, sigma, cond, guidance_scale)
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        return self.denoise_raw(x, sigma, self.with_guidance(cond, w, x.shape[0]))


def _weight_keys(folder: Path) -> set[str] | None:
    """Tensor names of a diffusers model folder from its safetensors headers (None if unknown)."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        try:
            return set(json.loads(index[0].read_text())["weight_map"])
        except (OSError, ValueError, KeyError):
            return None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    keys: set[str] = set()
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                keys.update(fh.keys())
    except Exception:  # unreadable: the model load reports it
        return None
    return keys


def check_flux_guidance_weights(path, src: str, local: bool) -> None:
    """A FLUX folder's ``guidance_embeds`` flag must match its weights: a guidance-distilled
    checkpoint (FLUX.1-dev) carries ``time_text_embed.guidance_embedder.*``, one without
    (FLUX.1-schnell) does not.  A mismatch raises a one-line :class:`TeacherLoadError`."""
    if not local:
        return
    folder = Path(path) / "transformer"
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # the model load reports a missing / broken config
    keys = _weight_keys(folder)
    if keys is None:
        return
    flag = bool(cfg.get("guidance_embeds", False))
    has = any(k.startswith(FLUX_GUIDANCE_PREFIX) for k in keys)
    if flag and not has:
        raise TeacherLoadError(
            f"{path}: transformer/config.json sets guidance_embeds=true (a guidance-distilled checkpoint such as "
            f"FLUX.1-dev), so its weights were expected to hold {FLUX_GUIDANCE_PREFIX}* tensors, but they do not; "
            "use the matching weights, or set guidance_embeds=false for a checkpoint without a guidance embedding "
            "(FLUX.1-schnell style)"
        )
    if has and not flag:
        raise TeacherLoadError(
            f"{path}: the transformer weights hold a guidance embedding ({FLUX_GUIDANCE_PREFIX}*) but "
            "transformer/config.json sets guidance_embeds=false; expected guidance_embeds=true for a "
            "guidance-distilled checkpoint (FLUX.1-dev style)"
        )


__all__ = ["FLUX_GUIDANCE_PREFIX", "FluxTeacher", "SD3Teacher", "calculate_shift", "check_flux_guidance_weights"]
