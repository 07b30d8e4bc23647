"""SDXL teachers: two CLIP text encoders, pooled text embeddings and micro-conditioning time ids.

Conditions are built exactly as ``StableDiffusionXLPipeline.encode_prompt`` / ``_get_add_time_ids``
build them (diffusers 0.3x-0.4x):

* ``encoder_hidden_states``: the penultimate hidden states of ``text_encoder`` (CLIPTextModel) and
  ``text_encoder_2`` (CLIPTextModelWithProjection), each on its tokenizer's ``model_max_length``
  padding, concatenated along the feature axis (768 + 1280 = 2048 for SDXL base);
* ``added_cond_kwargs.text_embeds``: the pooled, projected embedding of the first encoder whose
  first output is 2-D (``text_encoder_2``'s ``text_embeds``);
* ``added_cond_kwargs.time_ids``: ``original_size + crops_coords_top_left + target_size``
  (default: the sample resolution, no crop: (1024, 1024, 0, 0, 1024, 1024) for SDXL base).

The unconditional input is DMD2's (``sd_unified_model.py``: ``torch.zeros_like`` of the prompt
embedding and of the pooled embedding, the same ``time_ids``), which is also what the stock
pipeline does with ``force_zeros_for_empty_prompt=True`` (SDXL base's setting).  Folders that set
``force_zeros_for_empty_prompt: false`` get the embedding of ``""`` instead (``null_prompt="empty"``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Cond, freeze
from .diffusion import DiffusersTeacher, TeacherLoadError, load_folder_part

#: number of SDXL micro-conditioning values: original (h, w), crop (top, left), target (h, w)
NUM_TIME_IDS = 6


class SDXLTeacher(DiffusersTeacher):
    """An SDXL base UNet (``addition_embed_type="text_time"``) with its two text encoders.

    Args:
        model: ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``.
        scheduler_config: the pipeline's scheduler config (VP, epsilon for SDXL base).
        text_encoder / tokenizer: CLIPTextModel + tokenizer (the first encoder).
        text_encoder_2 / tokenizer_2: CLIPTextModelWithProjection + tokenizer (pooled embedding).
        vae: the latent decoder; also gives ``vae_scale_factor`` for the default time ids.
        null_prompt: "zeros" (DMD2, SDXL base) or "empty" (embedding of the empty prompt).
        original_size / crops_coords_top_left / target_size: the micro-conditioning; the sizes
            default to the sample resolution in pixels (latent size x vae scale factor).
    """

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
        null_prompt: str = "zeros",
        sample_shape: tuple[int, ...] | None = None,
        guidance_scale: float = 1.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        vae_scale_factor: int | None = None,
        **unused,
    ):
        if unused.pop("num_classes", None) is not None:
            raise TeacherLoadError("an SDXL teacher is text-conditional; it takes no num_classes")
        unused.pop("flow_shift", None)
        if unused:
            raise TypeError(f"unexpected arguments {sorted(unused)}")
        cfg = model.config
        if cfg.get("addition_embed_type") != "text_time":
            raise TeacherLoadError(
                "an SDXL teacher needs a UNet2DConditionModel with addition_embed_type='text_time', "
                f"got {cfg.get('addition_embed_type')!r}"
            )
        if tokenizer is None or tokenizer_2 is None:
            raise TeacherLoadError("an SDXL teacher needs both tokenizers (tokenizer, tokenizer_2)")
        super().__init__(
            model,
            scheduler_config,
            prediction_type=prediction_type,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            vae=vae,
            null_prompt=null_prompt,
            sample_shape=sample_shape,
            guidance_scale=guidance_scale,
        )
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        if text_encoder_2 is not None:
            freeze(text_encoder_2)
        if vae_scale_factor is None:
            vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.vae_scale_factor = int(vae_scale_factor)
        pixels = (self.sample_shape[1] * self.vae_scale_factor, self.sample_shape[2] * self.vae_scale_factor)
        self.original_size = tuple(int(v) for v in (original_size or pixels))
        self.crops_coords_top_left = tuple(int(v) for v in crops_coords_top_left)
        self.target_size = tuple(int(v) for v in (target_size or pixels))
        if len(self.time_ids_list()) != NUM_TIME_IDS:
            raise TeacherLoadError("original_size, crops_coords_top_left and target_size must be pairs")
        self._null_row: Cond | None = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_folder(
        cls, path, src: str, index: dict, model, sched_cfg: dict, *, prediction_type=None,
        guidance_scale: float = 1.0, dtype=torch.float32, null_prompt: str | None = None, sample_shape=None,
    ) -> SDXLTeacher:
        """Build from a ``StableDiffusionXLPipeline`` folder whose UNet is already loaded."""
        parts = {
            name: load_folder_part(path, src, index, name, dtype)
            for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        }
        vae = load_folder_part(path, src, index, "vae", torch.float32, required=False)
        if null_prompt is None:
            null_prompt = "zeros" if index.get("force_zeros_for_empty_prompt", True) else "empty"
        teacher = cls(
            model, sched_cfg, prediction_type=prediction_type, vae=vae, null_prompt=null_prompt,
            guidance_scale=guidance_scale, sample_shape=sample_shape, **parts,
        )
        teacher.check_time_embedding(path)
        return teacher

    def check_time_embedding(self, path="the SDXL teacher") -> None:
        """The UNet's added-embedding width must equal 6 time ids x ``addition_time_embed_dim``
        plus the pooled embedding width (the check ``_get_add_time_ids`` makes)."""
        cfg = self.model.config
        te2 = self._shared_part("text_encoder_2")
        if te2 is None:
            return
        pooled = te2.config.projection_dim
        want = cfg.addition_time_embed_dim * NUM_TIME_IDS + pooled
        got = cfg.projection_class_embeddings_input_dim
        if got != want:
            raise TeacherLoadError(
                f"{path}: the UNet expects an added embedding of width {got}, but {NUM_TIME_IDS} time ids x "
                f"{cfg.addition_time_embed_dim} + pooled {pooled} = {want} (an SDXL refiner or a mismatched "
                "text_encoder_2?)"
            )

    def _copy_kwargs(self) -> dict:
        kw = super()._copy_kwargs()
        kw.pop("num_classes")
        kw.pop("flow_shift")
        kw.update(
            tokenizer_2=self.tokenizer_2,
            original_size=self.original_size,
            crops_coords_top_left=self.crops_coords_top_left,
            target_size=self.target_size,
            vae_scale_factor=self.vae_scale_factor,
        )
        return kw

    def _shared_parts(self) -> dict:
        parts = super()._shared_parts()
        parts["text_encoder_2"] = self._shared_part("text_encoder_2")
        return parts

    # -- conditions -------------------------------------------------------------------------------
    def time_ids_list(self) -> list[int]:
        return [*self.original_size, *self.crops_coords_top_left, *self.target_size]

    def time_ids(self, batch_size: int) -> Tensor:
        """(B, 6) micro-conditioning, as ``_get_add_time_ids`` builds it (in the UNet's dtype
        there; float32 here, cast at the call)."""
        row = torch.tensor([self.time_ids_list()], dtype=torch.float32, device=self.sigmas.device)
        return row.expand(batch_size, -1).clone()

    def encode_conditions(self, raw) -> Cond | None:
        if raw is None:
            return None
        prompts = [raw] if isinstance(raw, str) else list(raw)
        device = self.sigmas.device
        hidden, pooled = [], None
        for tok, te in ((self.tokenizer, self._text_encoder()), (self.tokenizer_2, self._shared_part("text_encoder_2"))):
            if te is None:
                raise ValueError("this SDXL teacher has no text encoders (a copy whose teacher lent none?)")
            ids = tok(
                prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            with torch.no_grad():
                out = te(ids.to(te.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError("neither SDXL text encoder returned a pooled embedding (text_encoder_2 must have a projection)")
        emb = torch.cat(hidden, dim=-1).float().to(device)
        return {
            "encoder_hidden_states": emb,
            "added_cond_kwargs": {"text_embeds": pooled.float().to(device), "time_ids": self.time_ids(len(prompts))},
        }

    def _null_cond_row(self) -> Cond:
        if self._null_row is None:
            row = self.encode_conditions([""])
            if self.null_prompt == "zeros":
                row["encoder_hidden_states"] = torch.zeros_like(row["encoder_hidden_states"])
                row["added_cond_kwargs"]["text_embeds"] = torch.zeros_like(row["added_cond_kwargs"]["text_embeds"])
            self._null_row = row
        row = self._null_row
        if row["encoder_hidden_states"].device != self.sigmas.device:
            from .base import cond_to

            self._null_row = row = cond_to(row, self.sigmas.device)
        return row

    def null_condition(self, batch_size: int) -> Cond:
        """Zero prompt and pooled embeddings (DMD2's SDXL null) with the default time ids."""
        row = self._null_cond_row()
        return {
            "encoder_hidden_states": row["encoder_hidden_states"].expand(batch_size, -1, -1),
            "added_cond_kwargs": {
                "text_embeds": row["added_cond_kwargs"]["text_embeds"].expand(batch_size, -1),
                "time_ids": self.time_ids(batch_size),
            },
        }

    def null_condition_like(self, cond: Cond | None, batch_size: int) -> Cond:
        """:meth:`null_condition` with the ``time_ids`` of ``cond`` (the pipeline gives the
        negative branch the positive branch's time ids)."""
        null = self.null_condition(batch_size)
        extra = (cond or {}).get("added_cond_kwargs") or {}
        if "time_ids" in extra:
            null["added_cond_kwargs"]["time_ids"] = extra["time_ids"]
        return null

    def random_raw_conditions(self, n: int, generator=None):
        return None


__all__ = ["NUM_TIME_IDS", "SDXLTeacher"]
