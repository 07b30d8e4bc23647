"""VAR as an autoregressive teacher (Tian et al., NeurIPS 2024, github.com/FoundationVision/VAR): the
next-*scale* teacher Distilled Decoding reports on (VAR-d16, 10 scale steps, FID 4.19 -> DD 1 step
9.94, 2 steps 7.82).

:class:`VARTeacher` speaks the AR teacher contract of :mod:`stepdistill.teachers.autoregressive`
(``codebook``, ``generate(labels, choose, **settings)``, ``decode``, ``num_tokens``, ``settings``,
``digest``, ``sample``, ``encode``, ``from_pretrained`` / ``save_pretrained``) with VAR's token layout:

* tokens are the concatenation of the scales ``patch_nums`` (VAR: 1, 2, 3, 4, 5, 6, 8, 10, 13, 16;
  ``num_tokens = sum n_k^2`` = 680), each ``n_k x n_k`` in raster order; ``scale_layout`` gives the
  flat ``(begin, end, n_k)`` of every scale and ``token_order = "scales"``;
* ``generate`` runs VAR's KV-cached scale-wise decoding; ``choose(k, logits)`` is called once per
  *scale* with the guided, filtered logits (B, n_k^2, V) and returns (B, n_k^2) tokens, so a
  per-token map (Distilled Decoding's ``flow_map``, which also broadcasts over the extra token axis)
  is applied to all tokens of a scale independently (:meth:`VARTeacher.token_map`);
* ``codebook`` is ``vqvae.quantize.embedding.weight`` (V, Cvae), what the decoder consumes (through
  ``f_hat``: bicubic-upsampled, phi-convolved, accumulated over the scales), and ``decode(tokens)``
  is that accumulation followed by the decoder;
* Distilled Decoding split points are *scale* indices ``0 .. num_scales - 1`` (``split_positions``
  converts them to token counts).

The computation lives in :mod:`stepdistill.pipelines.var_model` (the file written beside exported
weights).  Official checkpoints convert with :mod:`stepdistill.teachers.convert_var`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..pipelines.var_model import (
    COMPONENT_MODULE,
    VARDDPipeline,
    VARDDStudent,
    VARPipeline,
    VARTransformer,
    VARVQVAE,
    scale_layout,
    var_draw_uniforms,
    var_filter_logits,
    var_generate,
    var_sample_tokens,
)

__all__ = ["VARTeacher", "VAR_DEPTHS", "build_var_vqvae", "build_var_transformer", "is_var_folder",
           "load_var_pipeline", "var_token_map", "VARDDGenerator", "var_dd_loss", "train_var_dd", "export_var_dd"]

#: VAR's model zoo: depth -> (width, heads) as ``build_vae_var`` sets them (width = 64 * depth, heads = depth)
VAR_DEPTHS = {d: (64 * d, d) for d in (16, 20, 24, 30, 36)}


def build_var_vqvae(**overrides) -> VARVQVAE:
    """VAR's ``vae_ch160v4096z32`` architecture (``overrides`` for tiny test models)."""
    return VARVQVAE(**overrides)


def build_var_transformer(depth: int = 16, **overrides) -> VARTransformer:
    """VAR-d<depth> (width 64 * depth, depth heads, ``attn_l2_norm``, no shared adaLN)."""
    width, heads = VAR_DEPTHS.get(int(depth), (64 * int(depth), int(depth)))
    kw = {"depth": int(depth), "embed_dim": width, "num_heads": heads, **overrides}
    return VARTransformer(**kw)


def _components(folder: Path) -> dict:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return {}
    return json.loads(index_file.read_text(encoding="utf-8"))


def is_var_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a VAR teacher or VAR DD pipeline folder (its ``model_index.json``)."""
    index = _components(Path(folder))
    name = index.get("_class_name")
    return isinstance(name, list) and list(name)[:1] == [COMPONENT_MODULE]


_CLASSES = {"VARVQVAE": VARVQVAE, "VARTransformer": VARTransformer, "VARDDStudent": VARDDStudent}
_PIPELINES = {"VARPipeline": VARPipeline, "VARDDPipeline": VARDDPipeline}


def load_var_pipeline(folder: str | Path):
    """A VAR pipeline folder loaded with the installed classes (no folder code runs)."""
    folder = Path(folder)
    index = _components(folder)
    if not is_var_folder(folder):
        raise ValueError(f"{folder} is not a VAR pipeline folder (model_index.json _class_name "
                         f"{index.get('_class_name')!r})")
    pipe_cls = _PIPELINES.get(index["_class_name"][1])
    if pipe_cls is None:
        raise ValueError(f"{folder}: unknown VAR pipeline class {index['_class_name'][1]!r}")
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue
        if entry[0] != COMPONENT_MODULE or entry[1] not in _CLASSES:
            raise ValueError(f"{folder}: component {name!r} is {entry}; expected one of {sorted(_CLASSES)}")
        components[name] = _CLASSES[entry[1]].from_pretrained(str(folder / name))
    config = {k: v for k, v in index.items() if not k.startswith("_") and k not in components}
    return pipe_cls(**components, **config)


class VARTeacher(nn.Module):
    """Frozen VAR teacher (see the module docstring).

    Args:
        vqvae: :class:`~stepdistill.pipelines.var_model.VARVQVAE`.
        transformer: :class:`~stepdistill.pipelines.var_model.VARTransformer` over the same scales.
        guidance_scale: VAR's ``cfg`` (ramped over the scales); top_k, top_p: VAR's filters
            (``top_p <= 0`` = off); temperature: 1.0 (VAR has none).  Defaults: DD's VAR setting
            (cfg 2.0, top-k 900, top-p 0.95).
    """

    kind: ClassVar[str] = "ar"
    token_order: ClassVar[str] = "scales"

    def __init__(self, vqvae: VARVQVAE, transformer: VARTransformer, guidance_scale: float = 2.0,
                 top_k: int = 900, top_p: float = 0.95, temperature: float = 1.0):
        super().__init__()
        if list(vqvae.config.v_patch_nums) != list(transformer.config.patch_nums):
            raise ValueError(f"the VQVAE's scales {vqvae.config.v_patch_nums} differ from the transformer's "
                             f"{transformer.config.patch_nums}")
        if int(vqvae.config.vocab_size) != int(transformer.config.vocab_size) or \
                int(vqvae.config.z_channels) != int(transformer.config.z_channels):
            raise ValueError("the VQVAE's codebook (vocab_size, z_channels) differs from the transformer's")
        self.vqvae = vqvae
        self.transformer = transformer
        self.num_classes = int(transformer.config.num_classes)
        self.guidance_scale = float(guidance_scale)
        self.top_k = int(top_k or 0)
        self.top_p = float(top_p or 0.0)
        self.temperature = float(temperature)

    # -- layout ---------------------------------------------------------------------------------
    @property
    def codebook(self) -> Tensor:
        """(V, Cvae) codebook, exactly as the decoder consumes it (through ``f_hat``)."""
        return self.vqvae.quantize.embedding.weight

    @property
    def codebook_size(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.codebook.shape[1])

    @property
    def patch_nums(self) -> list[int]:
        return list(self.transformer.config.patch_nums)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def scale_layout(self) -> list[tuple[int, int, int]]:
        return scale_layout(self.patch_nums)

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def split_positions(self, split_points) -> list[int]:
        """Scale split points -> token counts of their data prefixes (``t`` -> tokens of scales < t)."""
        out = []
        for t in split_points:
            if not 0 <= int(t) < self.num_scales:
                raise ValueError(f"VAR split points are scale indices in 0..{self.num_scales - 1}, got {t}")
            out.append(sum(p * p for p in self.patch_nums[: int(t)]))
        return out

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        s = int(self.vqvae.config.sample_size)
        return (int(self.vqvae.config.in_channels), s, s)

    @property
    def device(self) -> torch.device:
        return self.codebook.device

    def settings(self, **overrides: Any) -> dict:
        out = {"guidance_scale": self.guidance_scale, "temperature": self.temperature,
               "top_k": self.top_k, "top_p": self.top_p}
        out.update({k: v for k, v in overrides.items() if v is not None})
        return out

    # -- conditions -------------------------------------------------------------------------------
    def encode_conditions(self, raw) -> Tensor:
        labels = torch.as_tensor(raw, dtype=torch.long).reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"class ids must lie in [0, {self.num_classes}], got {labels.tolist()}")
        return labels.to(self.device)

    def random_raw_conditions(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randint(0, self.num_classes, (n,), generator=generator, device="cpu")

    # -- logits -----------------------------------------------------------------------------------
    def forward_logits(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forced raw logits (B, L', V) for the scales covered by ``tokens`` (B, L') plus the
        next one (all of them when ``tokens`` holds every scale): position ``i`` predicts token ``i``."""
        tokens = tokens.long().to(self.device)
        labels = self.encode_conditions(labels)
        n_have = tokens.shape[1]
        ends = [e for _, e, _ in self.scale_layout]
        if n_have and n_have not in ends:
            raise ValueError(f"tokens must cover whole scales (ends {ends}), got {n_have}")
        q = self.vqvae.quantize
        done = ends.index(n_have) + 1 if n_have else 0
        ms = [tokens[:, a:e] for a, e, _ in self.scale_layout[:done]]
        full = min(done + 1, self.num_scales)
        if done == 0:
            x = None
        else:  # the inputs of scales 1 .. done (idxBl_to_var_input over the known scales)
            hw = self.patch_nums[-1]
            f_hat = torch.zeros(tokens.shape[0], self.embed_dim, hw, hw, device=self.device)
            parts = []
            for si in range(min(done, self.num_scales - 1)):
                pn = self.patch_nums[si]
                h = q.embedding(ms[si]).transpose(1, 2).reshape(-1, self.embed_dim, pn, pn)
                f_hat, m = q.next_autoregressive_input(si, f_hat, h)
                parts.append(m.reshape(m.shape[0], self.embed_dim, -1).transpose(1, 2))
            x = torch.cat(parts, 1) if parts else None
        out = self.transformer(labels, x).logits
        return out[:, : self.scale_layout[full - 1][1]]

    def logits(self, tokens_so_far: Tensor, cond, guidance_scale: float | None = None,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None) -> Tensor:
        """Next-scale logits (B, n_k^2, V) after the whole scales ``tokens_so_far`` (B, L'), with VAR's
        ramped CFG and the filters applied -- recomputed without a cache (:meth:`generate` is the
        cached path)."""
        s = self.settings(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p)
        labels = self.encode_conditions(cond)
        b = labels.shape[0]
        tokens_so_far = tokens_so_far.reshape(b, -1)
        ends = [0] + [e for _, e, _ in self.scale_layout]
        si = ends.index(tokens_so_far.shape[1])
        a, e, _ = self.scale_layout[si]
        cfg = float(s["guidance_scale"])
        if cfg != 0.0:
            both = self.forward_logits(torch.cat([tokens_so_far, tokens_so_far]),
                                       torch.cat([labels, torch.full_like(labels, self.null_class)]))[:, a:e]
            t = cfg * si / (self.num_scales - 1)
            logits = (1 + t) * both[:b] - t * both[b:]
        else:
            logits = self.forward_logits(tokens_so_far, labels)[:, a:e]
        return var_filter_logits(logits, s["top_k"], s["top_p"], s["temperature"])

    # -- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, labels, choose, num_scales: int | None = None, **settings: Any) -> Tensor:
        """KV-cached scale-wise decoding; ``choose(k, logits (B, n_k^2, V)) -> tokens (B, n_k^2)``.
        Returns the flat tokens (B, num_tokens), or of the first ``num_scales`` scales."""
        s = self.settings(**settings)
        labels = self.encode_conditions(labels)
        return var_generate(self.transformer, self.vqvae, labels, choose, guidance_scale=s["guidance_scale"],
                            top_k=s["top_k"], top_p=s["top_p"], temperature=s["temperature"],
                            num_scales=num_scales)

    def span_fn(self, scale_fn):
        """``teacher_fn`` of teacher-involved DD sampling over scales: ``fn(labels, prefix (B, n), noise
        (B, L, d), stop) -> tokens (B, tokens of the first stop scales)`` -- the prefix's whole scales
        are fed as given (KV-cached, one teacher step per scale), each later scale up to ``stop`` is
        ``scale_fn(z (B, n_k^2, d), logits (B, n_k^2, V)) -> (B, n_k^2)`` (the scale's noise and the
        teacher's guided, filtered logits)."""
        layout = self.scale_layout
        ends = [0] + [e for _, e, _ in layout]

        @torch.no_grad()
        def fn(labels, prefix: Tensor, noise: Tensor, stop: int) -> Tensor:
            pre, z = prefix.to(self.device).long(), noise.to(self.device)
            if pre.shape[1] not in ends:
                raise ValueError(f"the prefix must hold whole scales ({ends} tokens), got {pre.shape[1]}")
            kept = ends.index(pre.shape[1])

            def choose(si: int, logits: Tensor) -> Tensor:
                a, e, _ = layout[si]
                return pre[:, a:e] if si < kept else scale_fn(z[:, a:e], logits)

            return self.generate(labels, choose, num_scales=int(stop))

        return fn

    @torch.no_grad()
    def sample(self, n: int | None = None, class_labels=None, generator=None, decode: bool = False,
               **settings: Any) -> Tensor:
        if class_labels is None:
            if n is None:
                raise ValueError("give n or class_labels")
            class_labels = torch.arange(n) % self.num_classes
        labels = self.encode_conditions(class_labels)
        b = labels.shape[0]

        def choose(si, logits):
            return var_sample_tokens(logits, var_draw_uniforms(generator, b, logits.shape[1], logits.device))

        tokens = self.generate(labels, choose, **settings)
        return self.decode(tokens) if decode else tokens

    def token_map(self, noise: Tensor, labels, token_fn, **settings: Any) -> Tensor:
        """Distilled Decoding's noise -> tokens map over scales (:func:`var_token_map`)."""
        return var_token_map(self, noise, labels, token_fn, **settings)

    # -- tokenizer ----------------------------------------------------------------------------------
    def decode(self, tokens: Tensor) -> Tensor:
        """Flat multi-scale tokens (B, num_tokens) -> images (B, C, H, W) in [-1, 1] via ``f_hat``."""
        return self.vqvae.decode_tokens(tokens.to(self.device))

    @torch.no_grad()
    def encode(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Images in [-1, 1] -> flat multi-scale tokens (VAR's residual quantisation)."""
        return torch.cat([self.vqvae.encode_tokens(images[i : i + batch_size].to(self.device))
                          for i in range(0, images.shape[0], batch_size)])

    # -- io -----------------------------------------------------------------------------------------
    def digest(self) -> str:
        from .autoregressive import module_digest

        return module_digest(self.vqvae, self.transformer)

    def to_pipeline(self) -> VARPipeline:
        return VARPipeline(vqvae=self.vqvae, transformer=self.transformer, guidance_scale=self.guidance_scale,
                           top_k=self.top_k, top_p=self.top_p, temperature=self.temperature)

    def save_pretrained(self, folder: str | Path) -> Path:
        """A self-contained ``VARPipeline`` folder (loads with plain diffusers, ``trust_remote_code``)."""
        self.to_pipeline().save_pretrained(str(folder), safe_serialization=True)
        return Path(folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32, **settings: Any) -> VARTeacher:
        pipe = load_var_pipeline(folder)
        if not isinstance(pipe, VARPipeline):
            raise ValueError(f"{folder} holds a {type(pipe).__name__}, not a VAR teacher (VARPipeline)")
        c = pipe.config
        defaults = {"guidance_scale": c.guidance_scale, "top_k": c.top_k, "top_p": c.top_p,
                    "temperature": c.temperature}
        defaults.update({k: v for k, v in settings.items() if v is not None})
        vqvae, transformer = pipe.vqvae, pipe.transformer
        if dtype != torch.float32:
            transformer = transformer.to(dtype)  # the VQVAE stays float32 (f-hat accumulation)
        teacher = cls(vqvae, transformer, **defaults)
        teacher.path = str(folder)
        return teacher.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Distilled Decoding over scales (the pieces DistilledDecoding needs for a VAR teacher)


def var_token_map(teacher: VARTeacher, noise: Tensor, labels, token_fn, max_rows: int = 4096,
                  **settings: Any) -> Tensor:
    """DD's noise -> tokens map over scales: run the teacher scale by scale; token ``i`` of scale ``k``
    is ``token_fn(noise[:, i], logits_k,i)`` with ``logits_k,i`` the teacher's guided, filtered logits
    of that token given the scales before ``k`` (the tokens of one scale are independent given them).

    ``token_fn(z (rows, d), logits (rows, V)) -> (rows,)`` is the per-token map -- Distilled Decoding's
    ``lambda z, lg: flow_map(z, codes, lg, **flow)`` (passed in: teachers import nothing from the
    algorithms).  The (B * n_k^2) rows of a scale go through it in chunks of ``max_rows`` (the flow
    map's (rows, V, d) tensors bound the memory)."""
    noise = noise.to(teacher.device)
    layout = teacher.scale_layout
    if tuple(noise.shape[1:2]) != (teacher.num_tokens,):
        raise ValueError(f"noise must have shape (B, {teacher.num_tokens}, d), got {tuple(noise.shape)}")

    def choose(si: int, logits: Tensor) -> Tensor:
        a, e, _ = layout[si]
        b, n, v = logits.shape
        z = noise[:, a:e].reshape(b * n, -1)
        lg = logits.reshape(b * n, v)
        out = torch.cat([token_fn(z[i : i + max_rows], lg[i : i + max_rows]) for i in range(0, b * n, max_rows)])
        return out.reshape(b, n)

    return teacher.generate(labels, choose, **settings)


class VARDDGenerator(nn.Module):
    """The VAR Distilled Decoding generator with the interface of
    :class:`~stepdistill.algorithms.distilled_decoding.DDStudent`: ``transformer`` (a
    :class:`~stepdistill.pipelines.var_model.VARDDStudent`) + the flow-space codebook as a buffer;
    ``generator(noise (B, L, d), labels, num_steps) -> tokens (B, L)``."""

    def __init__(self, transformer: VARDDStudent, codes: Tensor):
        super().__init__()
        self.transformer = transformer
        self.register_buffer("codes", codes.detach().clone().float(), persistent=False)
        self.num_classes = int(transformer.num_classes)
        self.codebook_scale = float(transformer.config.codebook_scale)

    @classmethod
    def from_teacher(cls, teacher: VARTeacher, split_points, codebook_scale: float = 1.0,
                     layerwise_n_d_embed: bool = True, split_t: int | None = None,
                     drop_path_rate: float = 0.0) -> VARDDGenerator:
        """``split_t`` (a scale index, DD's ``loss_split_t``): add the continuous head for the scales
        from it on (zero output at init).  ``drop_path_rate``: VAR's stochastic depth in training
        (linear over the blocks up to this rate; VAR-d16 trains with 0.1 x 16 / 24)."""
        st = VARDDStudent.from_teacher(teacher.transformer, split_points, codebook_scale, layerwise_n_d_embed,
                                       split_t=split_t, drop_path_rate=drop_path_rate)
        st.requires_grad_(True).train()
        return cls(st, (teacher.codebook.detach().float() * float(codebook_scale)).cpu())

    @property
    def split_points(self) -> list[int]:
        return self.transformer.split_points

    @property
    def num_steps(self) -> int:
        return len(self.split_points)

    @property
    def num_tokens(self) -> int:
        return self.transformer.L

    @property
    def sample_shape(self) -> tuple[int, int]:
        return (self.transformer.L, int(self.codes.shape[1]))

    def data_prefix(self, split: Tensor) -> Tensor:
        """Token counts of the data prefixes of per-sample scale split points (B,)."""
        ends = torch.tensor([0] + [e for _, e, _ in self.transformer.layout], device=split.device)
        return ends[split.long()]

    @property
    def split_t(self) -> int | None:
        """First *token* position of the continuous head (the first token of scale
        ``transformer.config.split_t``), as ``DDStudent.split_t``; ``None`` without the head."""
        return self.transformer.split_t_token

    @property
    def head(self):
        return self.transformer.final_layer_conti

    def logits(self, x: Tensor, labels: Tensor, is_data: Tensor) -> Tensor:
        return self.transformer.logits(x, labels, is_data)

    def predict(self, x: Tensor, labels: Tensor, is_data: Tensor) -> tuple[Tensor, Tensor | None]:
        """``DDStudent.predict``'s shape: logits (B, L, V) and the continuous head's flow-space
        vectors (B, L, d) (``None`` without the head)."""
        return self.transformer.predict(x, labels, is_data)

    def forward(self, noise: Tensor, cond: Tensor, num_steps: int | None = None, generator=None) -> Tensor:
        """Tokens (B, L) (with the head: the nearest codes at its scales; :meth:`generate` gives the vectors)."""
        return self.generate(noise, cond, num_steps)[0]

    def generate(self, noise: Tensor, cond: Tensor, num_steps: int | None = None, teacher_fn=None,
                 teacher_steps: int = 0, **_: Any) -> tuple[Tensor, Tensor]:
        """``DDStudent.generate``'s shape: ``(tokens (B, L), their flow-space vectors (B, L, d))``; with
        ``teacher_fn`` (``stepdistill.algorithms.distilled_decoding.teacher_span_fn(VARTeacher, codes,
        ...)``: teachers import nothing from the algorithms) and ``teacher_steps`` (in scales) the
        teacher-involved sampler (:func:`~stepdistill.pipelines.var_model.var_dd_generate`)."""
        from ..pipelines.var_model import var_dd_generate

        if teacher_steps:
            if teacher_fn is None:
                raise ValueError("teacher_steps > 0 needs teacher_fn (teacher_span_fn of the VAR teacher)")
            if num_steps is None:
                num_steps = self.num_steps
        return var_dd_generate(self.transformer, self.codes, noise.float(), cond.long(), num_steps,
                               teacher_fn=teacher_fn, teacher_steps=teacher_steps, return_vectors=True)

    def decode(self, vqvae, tokens: Tensor, vectors: Tensor | None = None) -> Tensor:
        """Images in [-1, 1] through ``f_hat``: from the vectors (divided back by ``codebook_scale``,
        not snapped) when the head is on, else from the tokens."""
        if self.head is not None and vectors is not None:
            return vqvae.decode_vectors(vectors / self.codebook_scale)
        return vqvae.decode_tokens(tokens)


def var_dd_loss(generator: VARDDGenerator, noise: Tensor, tokens: Tensor, labels: Tensor,
                rng: torch.Generator | None = None, label_smoothing: float = 0.0,
                regression_weight: float = 1.0) -> tuple[Tensor, dict]:
    """DD's training loss over scales (as ``DistilledDecoding.loss``): per pair a split point ``t``
    drawn from ``split_points``; the scales ``< t`` hold the pair's flow-space codes, the rest its
    noise; on the noise positions cross-entropy to the pair's tokens -- with the continuous head,
    only before its first position, and ``regression_weight`` x the head's L2 error to the pair's
    flow-space codes from it on (both summed over positions, divided by their number)."""
    import torch.nn.functional as F

    device = generator.codes.device
    noise, tokens, labels = noise.float().to(device), tokens.long().to(device), labels.long().to(device)
    b, n = tokens.shape
    sp = torch.tensor(generator.split_points, device=device)
    pick = torch.randint(0, sp.numel(), (b,), generator=rng, device="cpu").to(device)
    n_data = generator.data_prefix(sp[pick])
    is_data = torch.arange(n, device=device)[None, :] < n_data[:, None]
    x = torch.where(is_data[..., None], generator.codes[tokens], noise)
    logits, cont = generator.predict(x, labels, is_data)
    logits = logits.float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none",
                         label_smoothing=label_smoothing).reshape(b, n)
    target = ~is_data
    count = target.float().sum().clamp_min(1.0)
    ce_mask = target
    reg_sum = None
    if cont is not None:  # DD's regression for the head's scales (L2 in flow space), CE before them
        pos = torch.arange(n, device=device)[None, :]
        ce_mask = target & (pos < generator.split_t)
        reg = (cont.float() - generator.codes[tokens]).pow(2).mean(-1)
        reg_sum = (reg * (target & (pos >= generator.split_t)).float()).sum()
    ce_sum = (ce * ce_mask.float()).sum()
    loss = (ce_sum + (regression_weight * reg_sum if reg_sum is not None else 0.0)) / count
    with torch.no_grad():
        acc = ((logits.argmax(-1) == tokens).float() * ce_mask.float()).sum() / ce_mask.float().sum().clamp_min(1.0)
    logs = {"ce": float(ce_sum.detach() / ce_mask.float().sum().clamp_min(1.0)), "token_acc": float(acc)}
    if reg_sum is not None:
        logs["reg"] = float(reg_sum.detach() / (target.float().sum() - ce_mask.float().sum()).clamp_min(1.0))
    return loss, logs


def train_var_dd(generator: VARDDGenerator, pairs: dict[str, Tensor], steps: int, batch_size: int = 16,
                 lr: float = 1e-3, seed: int = 0) -> list[float]:
    """A minimal AdamW loop over a pair set ``{"noise", "tokens", "labels"}`` (tests and tiny demos; the
    generic trainer runs DD at scale once ``DistilledDecoding`` routes VAR teachers here)."""
    rng = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in generator.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    n = pairs["tokens"].shape[0]
    losses = []
    generator.train()
    for _ in range(int(steps)):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=rng)
        loss, _ = var_dd_loss(generator, pairs["noise"][idx], pairs["tokens"][idx], pairs["labels"][idx], rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def export_var_dd(generator: VARDDGenerator, teacher: VARTeacher, output_dir: str | Path,
                  num_inference_steps: int = 1, use_ema_state: dict | None = None, overwrite: bool = False) -> Path:
    """A self-contained ``VARDDPipeline`` folder (teacher's VQVAE + the student; ``var_model.py`` at the
    root and in both component folders): ``DiffusionPipeline.from_pretrained(folder,
    trust_remote_code=True)`` reproduces ``generator(noise, labels, num_steps)``.

    ``use_ema_state``: the generator's EMA ``state_dict()`` (``transformer.``-prefixed keys), exported
    instead of the live weights; an existing non-empty ``output_dir`` is refused unless ``overwrite``."""
    import copy

    steps = int(num_inference_steps)
    if not 1 <= steps <= generator.num_steps:
        raise ValueError(f"num_inference_steps must be in 1..{generator.num_steps}, got {steps}")
    out = Path(output_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True")
    student = copy.deepcopy(generator.transformer).float().eval()
    if use_ema_state is not None:
        state = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in use_ema_state.items()}
        student.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    pipe = VARDDPipeline(vqvae=copy.deepcopy(teacher.vqvae).float().eval(), transformer=student,
                         num_inference_steps=steps)
    pipe.save_pretrained(str(output_dir), safe_serialization=True)
    return Path(output_dir)
