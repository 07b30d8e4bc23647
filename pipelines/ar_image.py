"""Class-conditional autoregressive image pipeline: VQ tokenizer (diffusers ``VQModel``) + causal LM
(transformers ``LlamaForCausalLM``), LlamaGen-style.

Self-contained on purpose: this file imports only torch, numpy, PIL and diffusers (transformers is
needed by diffusers to load the ``transformer`` component, not by this file), so it can be copied
next to exported weights and loaded by plain diffusers::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(class_labels=[0, 1, 2], guidance_scale=1.5, generator=torch.Generator().manual_seed(0)).images

Vocabulary layout of the causal LM (``model_index.json`` keys ``codebook_size``, ``num_classes``)::

    [0, V)              image tokens (indices into the VQ codebook, V = codebook_size)
    V + c               class token of class c (0 <= c < num_classes), the sequence prefix
    V + num_classes     null class (unconditional prefix for classifier-free guidance)

The sequence is ``[class token, q_1, ..., q_n]`` with the ``n = h * w`` tokens in raster order
(row-major over the ``grid_size = (h, w)`` token grid); the logits at position ``i`` give the
distribution of ``q_{i+1}``.  Only the first ``V`` logits (the codebook) are ever used.

Sampling at each step (LlamaGen's order): classifier-free guidance on logits
``uncond + s * (cond - uncond)``, then ``/ temperature``, then top-k, then top-p (nucleus)
filtering, then one draw.  Draws are inverse-CDF with one uniform per image per step taken from
that image's ``torch.Generator`` when a list is given, so an image does not depend on the batch it
was generated in.  The same functions are used by ``stepdistill.teachers.autoregressive.ARTeacher``
(training-time teacher == pipeline).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from PIL import Image

__all__ = [
    "ARImagePipeline",
    "cfg_logits",
    "filter_logits",
    "draw_uniforms",
    "sample_tokens",
    "ar_generate",
    "decode_tokens",
    "resolve_class_labels",
    "to_images",
]


# ---------------------------------------------------------------------------------------------
# sampling maths (shared with the training-time teacher)


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: ``uncond + s * (cond - uncond)`` (``s = 1``: ``cond``)."""
    if uncond is None or guidance_scale == 1.0:
        return cond
    return uncond + guidance_scale * (cond - uncond)


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = 0, top_p: float | None = 1.0
) -> torch.Tensor:
    """Temperature, then top-k, then top-p filtering of ``(..., V)`` logits (float32 or wider).

    Removed entries become ``-inf``; ``softmax`` of the result is the sampling distribution.
    ``top_k <= 0`` / ``None`` and ``top_p >= 1`` / ``None`` disable the filters.  Top-p keeps the
    smallest set of most likely tokens whose probability reaches ``top_p`` (the token that crosses
    the threshold is kept, the most likely token always is).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = logits / float(temperature)
    v = logits.shape[-1]
    if top_k is not None and 0 < int(top_k) < v:
        kth = torch.topk(logits, int(top_k), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and float(top_p) < 1.0:
        if float(top_p) <= 0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of strictly better tokens
        remove_sorted = mass_before >= float(top_p)
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def draw_uniforms(generator, n: int, device) -> torch.Tensor:
    """``n`` uniforms in [0, 1): one from each generator of a list, or ``n`` from one generator."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} images; pass one per image")
        u = torch.cat([torch.rand(1, generator=g, device=g.device, dtype=torch.float64) for g in generator])
    else:
        gdev = generator.device if generator is not None else device
        u = torch.rand(n, generator=generator, device=gdev, dtype=torch.float64)
    return u.to(device)


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from ``softmax(logits)`` (B, V) with one uniform per row (B,)."""
    probs = torch.softmax(logits.double(), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    cdf = cdf / cdf[..., -1:]
    idx = torch.searchsorted(cdf, uniforms.double().reshape(-1, 1).to(cdf.device), right=True)
    idx = idx.clamp_max(probs.shape[-1] - 1).squeeze(-1)
    # never return a filtered (zero-probability) token, even at a cdf plateau
    bad = probs.gather(-1, idx[:, None]).squeeze(-1) <= 0
    if bad.any():
        idx = torch.where(bad, probs.argmax(-1), idx)
    return idx


@torch.no_grad()
def ar_generate(
    transformer,
    class_tokens: torch.Tensor,
    num_tokens: int,
    codebook_size: int,
    choose: Callable[[int, torch.Tensor], torch.Tensor],
    null_token: int | None = None,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = 0,
    top_p: float | None = 1.0,
) -> torch.Tensor:
    """Raster-order decoding with a KV cache: returns (B, num_tokens) token indices.

    ``choose(i, logits)`` picks token ``i`` (0-based) from the filtered, guided logits (B, V) --
    a random draw for ordinary sampling, the closed-form flow map for Distilled Decoding.
    Classifier-free guidance runs the conditional and the null-class prefix as one doubled batch.
    """
    b = class_tokens.shape[0]
    device = class_tokens.device
    use_cfg = guidance_scale != 1.0 and null_token is not None
    prefix = class_tokens.reshape(b, 1).long()
    if use_cfg:
        prefix = torch.cat([prefix, torch.full_like(prefix, int(null_token))], 0)
    out = transformer(input_ids=prefix, use_cache=True)
    cache = out.past_key_values
    last = out.logits[:, -1, :codebook_size].float()
    tokens = torch.empty(b, num_tokens, dtype=torch.long, device=device)
    for i in range(num_tokens):
        if use_cfg:
            logits = cfg_logits(last[:b], last[b:], guidance_scale)
        else:
            logits = last
        logits = filter_logits(logits, temperature, top_k, top_p)
        tok = choose(i, logits).long().to(device)
        tokens[:, i] = tok
        if i + 1 == num_tokens:
            break
        step_ids = tok.reshape(b, 1)
        if use_cfg:
            step_ids = torch.cat([step_ids, step_ids], 0)
        out = transformer(input_ids=step_ids, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        last = out.logits[:, -1, :codebook_size].float()
    return tokens


def decode_tokens(vqvae, tokens: torch.Tensor, grid_size) -> torch.Tensor:
    """Token indices (B, h*w) in raster order -> images in about [-1, 1] (B, C, H, W)."""
    h, w = (int(grid_size[0]), int(grid_size[1]))
    b = tokens.shape[0]
    emb = vqvae.quantize.embedding.weight
    quant = emb[tokens.reshape(-1).long()].reshape(b, h, w, emb.shape[1]).permute(0, 3, 1, 2).contiguous()
    out = vqvae.decode(quant.to(emb.dtype), force_not_quantize=True, return_dict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


def resolve_class_labels(class_labels, batch_size: int, num_images_per_prompt: int, num_classes: int, device):
    """Class ids (int, list, tensor or None = ``0, 1, 2, ...``) -> LongTensor; ``num_classes`` = null."""
    if class_labels is None:
        labels = torch.arange(batch_size) % num_classes
    else:
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0:
        raise ValueError("class_labels is empty")
    if labels.min() < 0 or labels.max() > num_classes:
        raise ValueError(
            f"class labels must lie in [0, {num_classes - 1}] (or {num_classes}, the null class), got {labels.tolist()}"
        )
    return labels.repeat_interleave(num_images_per_prompt).to(device)


def to_images(x: torch.Tensor, output_type: str):
    """[-1, 1] NCHW -> "pt" (NCHW in [0, 1]), "np" (NHWC in [0, 1]) or "pil" (grey for 1 channel)."""
    image = (x.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.detach().cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    if output_type != "pil":
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'tokens', got {output_type!r}")
    uint8 = (array * 255).round().astype(np.uint8)
    if uint8.shape[-1] == 1:
        return [Image.fromarray(a[..., 0]) for a in uint8]
    return [Image.fromarray(a) for a in uint8]


def _write_self_contained(save_directory, module_file: str, class_name: str) -> None:
    """Copy this file into the folder and name the class in list form in ``model_index.json``."""
    target = os.path.join(save_directory, f"{module_file}.py")
    source = os.path.abspath(__file__)
    if os.path.abspath(target) != source:
        shutil.copyfile(source, target)
    index_file = os.path.join(save_directory, "model_index.json")
    with open(index_file, encoding="utf-8") as f:
        index = json.load(f)
    index["_class_name"] = [module_file, class_name]
    with open(index_file, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# the pipeline


class ARImagePipeline(DiffusionPipeline):
    r"""Class-conditional VQ + causal-LM image generator (LlamaGen-style, raster order).

    Components:
        vqvae ([`VQModel`]): the tokenizer; its ``quantize.embedding`` is the codebook.
        transformer ([`~transformers.LlamaForCausalLM`]): the causal LM over
            ``codebook_size + num_classes + 1`` tokens (see the module docstring for the layout).

    Config (``model_index.json``): ``num_classes``, ``codebook_size``, ``grid_size`` (token grid
    ``[h, w]``) and the default sampling settings ``guidance_scale``, ``temperature``, ``top_k``,
    ``top_p``.
    """

    model_cpu_offload_seq = "transformer->vqvae"

    def __init__(
        self,
        vqvae,
        transformer,
        num_classes: int = 10,
        codebook_size: int | None = None,
        grid_size: list[int] | None = None,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
    ):
        super().__init__()
        self.register_modules(vqvae=vqvae, transformer=transformer)
        if codebook_size is None and vqvae is not None:
            codebook_size = int(vqvae.config.num_vq_embeddings)
        if grid_size is None and vqvae is not None:
            down = 2 ** (len(vqvae.config.block_out_channels) - 1)
            grid_size = [int(vqvae.config.sample_size) // down] * 2
        self.register_to_config(
            num_classes=int(num_classes),
            codebook_size=int(codebook_size) if codebook_size is not None else None,
            grid_size=[int(g) for g in grid_size] if grid_size is not None else None,
            guidance_scale=float(guidance_scale),
            temperature=float(temperature),
            top_k=int(top_k),
            top_p=float(top_p),
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``DiffusionPipeline.save_pretrained`` plus this file as ``ar_image.py`` and the list-form
        ``_class_name``, so the folder loads with ``DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)``."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if type(self) is ARImagePipeline:
            _write_self_contained(save_directory, "ar_image", "ARImagePipeline")
        return out

    # Copied from stepdistill.pipelines.one_step.OneStepPipeline.load_config with one_step->ar_image, OneStepPipeline->ARImagePipeline
    @classmethod
    def load_config(cls, *args, **kwargs):
        """Exported folders name the pipeline class in list form (``["ar_image", "ARImagePipeline"]``)
        for ``trust_remote_code`` loading; when this class itself is asked to load such a folder,
        use this class instead of the folder's copy of the code (no remote code needed)."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if cls is not DiffusionPipeline and isinstance(config.get("_class_name"), (list, tuple)):
            config["_class_name"] = cls.__name__
        return out

    @property
    def num_tokens(self) -> int:
        h, w = self.config.grid_size
        return int(h) * int(w)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        batch_size: int = 1,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        num_images_per_prompt: int = 1,
        num_inference_steps: int | None = None,
    ):
        r"""Generate images token by token.

        Args:
            class_labels: class ids; ``None`` gives ``batch_size`` images of classes ``0, 1, 2, ...``;
                ``num_classes`` (the null class) samples unconditionally.
            guidance_scale, temperature, top_k, top_p: sampling settings (default: the config's).
            generator: a ``torch.Generator`` or one per image (per-image draws, batch-independent).
            output_type: ``"pil"``, ``"np"`` (NHWC in [0, 1]), ``"pt"`` (NCHW in [0, 1]) or
                ``"tokens"`` (the (B, n) token indices).
            num_inference_steps: accepted for harness compatibility; must be ``None`` or the number
                of tokens (the model makes one LM pass per token).
        """
        cfg = self.config
        if num_inference_steps is not None and int(num_inference_steps) != self.num_tokens:
            raise ValueError(
                f"an autoregressive pipeline makes one pass per token ({self.num_tokens}); "
                f"num_inference_steps={num_inference_steps} is not supported"
            )
        device = self._execution_device
        labels = resolve_class_labels(
            class_labels, batch_size, num_images_per_prompt, cfg.num_classes, device
        )
        n = labels.shape[0]
        if isinstance(generator, (list, tuple)) and len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} images; pass one per image")
        gs = cfg.guidance_scale if guidance_scale is None else float(guidance_scale)
        temp = cfg.temperature if temperature is None else float(temperature)
        k = cfg.top_k if top_k is None else int(top_k)
        p = cfg.top_p if top_p is None else float(top_p)
        V = int(cfg.codebook_size)

        def choose(i, logits):
            return sample_tokens(logits, draw_uniforms(generator, n, logits.device))

        tokens = ar_generate(
            self.transformer,
            labels + V,
            self.num_tokens,
            V,
            choose,
            null_token=V + int(cfg.num_classes),
            guidance_scale=gs,
            temperature=temp,
            top_k=k,
            top_p=p,
        )
        if output_type == "tokens":
            image = tokens
        else:
            image = to_images(decode_tokens(self.vqvae, tokens, cfg.grid_size), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
