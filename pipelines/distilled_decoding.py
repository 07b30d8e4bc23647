"""Distilled Decoding (DD1) pipeline: one- or two-step generation with a distilled AR image model.

Self-contained on purpose: this file imports only torch, numpy, PIL and diffusers (transformers is
needed by diffusers to load the ``transformer`` component), so it can be copied next to exported
weights and loaded by plain diffusers::

    import torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(class_labels=[0, 1, 2], num_inference_steps=1,
                  generator=torch.Generator().manual_seed(0)).images

What the student computes (Liu et al. 2025, "Distilled Decoding 1", §2.4-2.6 of the package's
research notes).  Noise ``eps`` has one ``d``-dimensional Gaussian vector per image token
(``d`` = codebook dimension); the flow space is the VQ codebook scaled by ``codebook_scale``.
The student is a stock ``LlamaForCausalLM`` whose embedding table holds, after the teacher's rows
(``[0, V)`` codes, ``V + c`` classes, ``V + num_classes`` null class), ``d`` *basis rows* and 2
*indicator rows* (0 = noise position, 1 = data position).  The input sequence is
``[class token, x_1, ..., x_n]`` with ``embed(x_i) = x_i @ E[basis] + E[indicator_i]``, given as
``inputs_embeds``; attention is causal and the output at ``x_i``'s position gives the logits of
token ``i`` (``q_i`` depends only on ``eps_i`` and ``q_{<i}``).  With split points
``[0, t_2, ...]``:

* step 1: all positions hold noise; tokens = argmax of the logits;
* step k > 1: positions ``< t_k`` hold the codebook vectors (flow space) of the tokens predicted
  so far (indicator "data"), positions ``>= t_k`` hold the *same* noise again; the predictions at
  ``>= t_k`` replace the previous ones.

Continuous head (DD1's ``final_layer_conti``; optional, config ``split_t``): a PixArt-style final
layer on the LM's last hidden state (after its final norm) -- ``LayerNorm`` without affine, then
``h * (1 + scale) + shift`` with ``(shift, scale) = scale_shift_table + class embedding`` (the class
token's row of the student's embedding table), then ``Linear(D -> d)`` -- predicting the token's
flow-space codebook vector directly.  Output assembly (DD1 ``get_final_x_BLC``): positions that
were data in the input are copied; predicted positions ``< split_t`` take the codebook vector of the
logits' argmax, positions ``>= split_t`` the continuous head's vector.  The image is decoded from
these vectors (divided back by ``codebook_scale``; the continuous ones are *not* snapped to the
codebook); ``output_type="tokens"`` reports the nearest code at continuous positions.  The head's
weights are ``continuous_head.safetensors`` beside ``model_index.json``, read by this file's own
code (:meth:`DistilledDecodingPipeline.continuous_head`) when the pipeline first needs them; a
folder without ``split_t`` (all older exports) has no head and behaves as before.

Teacher-involved sampling (DD1 ``eval_combine_sample.py``; ``teacher_fn`` + ``teacher_steps = k``,
needs a second split point ``t_2``): one student pass from the noise; its tokens before
``t_2 - k`` are kept; the teacher regenerates tokens ``t_2 - k .. t_2 - 1`` autoregressively after
that prefix (stepdistill's ``teacher_span_fn`` uses the teacher's own closed-form flow map on the
*same* noise by default, so the result stays a deterministic function of the noise, or ordinary
random draws as DD1 does, ``sampler="random"``); then a final student pass at
split point ``t_2`` predicts the rest.  Cost: ``2 + k`` LM passes (``k`` of them the teacher's
KV-cached single-token steps); ``k = 0`` is the plain two-step sampler, larger ``k`` moves the
sample toward the teacher's.

``dd_generate`` is also what the training-time student
(``stepdistill.algorithms.distilled_decoding.DDStudent``) calls, so for the same noise the pipeline
returns the training-time tokens.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from PIL import Image

__all__ = [
    "DistilledDecodingPipeline",
    "DDContinuousHead",
    "dd_layout",
    "dd_forward",
    "decode_vectors",
    "dd_input_embeds",
    "dd_logits",
    "dd_generate",
    "draw_noise",
]


# ---------------------------------------------------------------------------------------------
# the student's computation (shared with training)


def dd_layout(codebook_size: int, num_classes: int, embed_dim: int, rbf_tau: float | None = None) -> dict:
    """Row offsets of the student's embedding table (and the optional RBF input feature width)."""
    basis = codebook_size + num_classes + 1
    return {
        "rbf_tau": None if rbf_tau is None else float(rbf_tau),
        "codebook_size": int(codebook_size),
        "num_classes": int(num_classes),
        "embed_dim": int(embed_dim),
        "class_offset": int(codebook_size),
        "basis_offset": int(basis),
        "indicator_offset": int(basis + embed_dim),
        "vocab_size": int(basis + embed_dim + 2),
    }


def dd_input_embeds(
    transformer, x: torch.Tensor, labels: torch.Tensor, is_data: torch.Tensor, layout: dict, codes=None
):
    """``[class, x_1..x_n]`` -> ``inputs_embeds`` (B, n + 1, D); ``x`` (B, n, d) in flow space.

    ``embed(x) = x @ E[basis] + E[indicator]``, plus, when ``layout["rbf_tau"]`` is set, the
    codebook-RBF feature ``softmax_j(-||x - c_j||^2 / (2 tau^2)) @ E[codes]`` (``codes`` (V, d) in
    flow space): a data position (``x = c_q``) then reads about the teacher's own token embedding
    ``E[q]``, a noise position a soft mixture of the embeddings of the codes near it."""
    table = transformer.get_input_embeddings().weight
    d = layout["embed_dim"]
    cls = table[labels.long() + layout["class_offset"]]
    basis = table[layout["basis_offset"] : layout["basis_offset"] + d]
    indicator = table[layout["indicator_offset"] + is_data.long()]
    x = x.to(table.dtype)
    h = x @ basis + indicator
    tau = layout.get("rbf_tau")
    if tau:
        if codes is None:
            raise ValueError("the RBF input feature needs the flow-space codebook (codes=...)")
        c = codes.to(table.dtype)
        d2 = (x.pow(2).sum(-1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(-1)).clamp_min(0)
        h = h + torch.softmax(-d2 / (2 * tau * tau), -1) @ table[: layout["codebook_size"]]
    return torch.cat([cls[:, None, :], h], 1)


class DDContinuousHead(torch.nn.Module):
    """DD1's continuous head (``final_layer_conti``), PixArt's ``T2IFinalLayer`` conditioned on the
    class embedding: ``Linear(D -> d)(LayerNorm(h) * (1 + scale) + shift)`` with
    ``(shift, scale) = scale_shift_table + c`` (``c`` (B, D) the class token's input embedding).
    ``linear`` starts at zero (PixArt / DiT zero-initialise the final projection)."""

    def __init__(self, hidden_size: int, embed_dim: int):
        super().__init__()
        self.hidden_size, self.embed_dim = int(hidden_size), int(embed_dim)
        self.norm = torch.nn.LayerNorm(self.hidden_size, elementwise_affine=False, eps=1e-6)
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.scale_shift_table = torch.nn.Parameter(
            torch.randn(2, self.hidden_size, generator=gen, device="cpu") / self.hidden_size**0.5
        )
        self.linear = torch.nn.Linear(self.hidden_size, self.embed_dim)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    @classmethod
    def from_state_dict(cls, state: dict) -> DDContinuousHead:
        d, hidden = state["linear.weight"].shape
        head = cls(hidden, d)
        head.load_state_dict(state)
        return head

    def forward(self, hidden: torch.Tensor, class_embedding: torch.Tensor) -> torch.Tensor:
        mod = self.scale_shift_table[None].to(hidden.dtype) + class_embedding[:, None, :].to(hidden.dtype)
        shift, scale = mod[:, 0:1], mod[:, 1:2]
        return self.linear(self.norm(hidden) * (1 + scale) + shift)


def _lm_logits_and_hidden(transformer, embeds: torch.Tensor, need_hidden: bool):
    """The LM's logits and (``need_hidden``) its last hidden state after the final norm (the
    ``lm_head``'s input): ``transformer.model`` for transformers causal LMs, a pre-hook on
    ``lm_head`` otherwise (LlamaGenGPT)."""
    if not need_hidden:
        out = transformer(inputs_embeds=embeds, use_cache=False)
        return (out.logits if hasattr(out, "logits") else out[0]), None
    if hasattr(transformer, "model") and hasattr(transformer, "lm_head"):
        hidden = transformer.model(inputs_embeds=embeds, use_cache=False)[0]
        return transformer.lm_head(hidden), hidden
    seen = {}
    hook = transformer.lm_head.register_forward_pre_hook(lambda module, args: seen.__setitem__("h", args[0]))
    try:
        out = transformer(inputs_embeds=embeds, use_cache=False)
    finally:
        hook.remove()
    return (out.logits if hasattr(out, "logits") else out[0]), seen["h"]


def dd_forward(
    transformer, x: torch.Tensor, labels: torch.Tensor, is_data: torch.Tensor, layout: dict, codes=None, head=None
):
    """One student pass: codebook logits (B, n, V) (position ``i`` predicts token ``i``) and, with a
    continuous ``head``, its flow-space vectors (B, n, d) (else ``None``)."""
    embeds = dd_input_embeds(transformer, x, labels, is_data, layout, codes)
    logits, hidden = _lm_logits_and_hidden(transformer, embeds, head is not None)
    cont = None if head is None else head(hidden[:, 1:], embeds[:, 0]).float()
    return logits[:, 1:, : layout["codebook_size"]], cont


def dd_logits(
    transformer, x: torch.Tensor, labels: torch.Tensor, is_data: torch.Tensor, layout: dict, codes=None
):
    """Codebook logits (B, n, V): position ``i`` predicts token ``i``."""
    return dd_forward(transformer, x, labels, is_data, layout, codes)[0]


def dd_step_inputs(noise: torch.Tensor, codes: torch.Tensor, tokens: torch.Tensor | None, split: int,
                   vectors: torch.Tensor | None = None):
    """Inputs of a step with split point ``split``: data before it (``vectors`` (B, n, d) in flow
    space when given, else the codebook vectors of ``tokens``), the original noise from it on.
    Returns ``(x, is_data)``."""
    b, n, _ = noise.shape
    is_data = torch.zeros(b, n, dtype=torch.bool, device=noise.device)
    if split <= 0 or (tokens is None and vectors is None):
        return noise, is_data
    x = noise.clone()
    data = vectors[:, :split] if vectors is not None else codes[tokens[:, :split].long()]
    x[:, :split] = data.to(noise.dtype)
    is_data[:, :split] = True
    return x, is_data


def nearest_codes(vectors: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook vector (B, n) for flow-space ``vectors`` (B, n, d)."""
    c = codes.to(vectors.dtype)
    d2 = c.pow(2).sum(-1) - 2 * vectors @ c.T
    return d2.argmin(-1)


def dd_predict(logits: torch.Tensor, cont, codes: torch.Tensor, split_t=None):
    """Output assembly of one pass: ``(tokens (B, n), flow-space vectors (B, n, d))``; positions
    ``>= split_t`` take the continuous head's vectors (and their nearest code as the token)."""
    tokens = logits.argmax(-1)
    vectors = codes[tokens]
    if cont is not None and split_t is not None:
        n = tokens.shape[1]
        st = min(max(int(split_t), 0), n)
        if st < n:
            vectors = torch.cat([vectors[:, :st], cont[:, st:].to(vectors.dtype)], 1)
            tokens = torch.cat([tokens[:, :st], nearest_codes(cont[:, st:].to(codes.dtype), codes)], 1)
    return tokens, vectors


def dd_generate(
    transformer,
    codes: torch.Tensor,
    noise: torch.Tensor,
    labels: torch.Tensor,
    split_points,
    layout: dict,
    num_steps: int | None = None,
    head=None,
    split_t: int | None = None,
    return_vectors: bool = False,
    teacher_fn=None,
    teacher_steps: int = 0,
):
    """Tokens (B, n) from noise (B, n, d) in ``num_steps`` student passes (default: all split points).

    ``codes`` (V, d) is the codebook in flow space (VQ codebook x ``codebook_scale``).  With a
    continuous ``head`` and ``split_t``, positions ``>= split_t`` come from the head.
    ``return_vectors``: also return the flow-space vectors (B, n, d) the image is decoded from.

    ``teacher_steps = k > 0`` (with ``teacher_fn(labels, prefix (B, s), noise, stop) -> tokens
    (B, stop)``, the prefix kept and ``stop - s`` tokens generated by the teacher): teacher-involved
    sampling, see the module docstring; ``num_steps`` then counts the student passes (default 2).
    """
    split_points = [int(s) for s in split_points]
    k = len(split_points) if num_steps is None else int(num_steps)
    if not 1 <= k <= len(split_points):
        raise ValueError(
            f"num_inference_steps must be in 1..{len(split_points)} (split points {split_points}), got {k}"
        )
    if split_points[0] != 0:
        raise ValueError(f"the first split point must be 0, got {split_points}")
    teacher_steps = int(teacher_steps or 0)
    if teacher_steps:
        if len(split_points) < 2 or k < 2:
            raise ValueError(
                "teacher-involved sampling needs a second split point and at least 2 student passes "
                f"(split points {split_points}, num_inference_steps {k})"
            )
        if teacher_fn is None:
            raise ValueError("teacher_steps > 0 needs teacher_fn (the teacher's tokens after a prefix)")
        if not 0 < teacher_steps <= split_points[1]:
            raise ValueError(f"teacher_steps must be in 0..{split_points[1]} (the second split point), got {teacher_steps}")
    tokens = vectors = None
    for step in range(k):
        split = split_points[step]
        if step == 1 and teacher_steps:
            start = split - teacher_steps
            prefix = teacher_fn(labels, tokens[:, :start], noise, split).long().to(tokens.device)
            tokens = torch.cat([prefix[:, :split], tokens[:, split:]], 1)
            vectors = torch.cat([codes[prefix[:, :split]].to(vectors.dtype), vectors[:, split:]], 1)
        x, is_data = dd_step_inputs(noise, codes, tokens, split, vectors)
        logits, cont = dd_forward(transformer, x, labels, is_data, layout, codes, head)
        pred, pvec = dd_predict(logits, cont, codes, split_t)
        if tokens is None:
            tokens, vectors = pred, pvec
        else:
            tokens = torch.cat([tokens[:, :split], pred[:, split:]], 1)
            vectors = torch.cat([vectors[:, :split], pvec[:, split:]], 1)
    return (tokens, vectors) if return_vectors else tokens


def decode_vectors(vqvae, vectors: torch.Tensor, grid_size, codebook_scale: float = 1.0) -> torch.Tensor:
    """Flow-space vectors (B, h*w, d) -> images in about [-1, 1]: divided by ``codebook_scale`` and
    decoded as they are (no snapping to the codebook)."""
    h, w = (int(grid_size[0]), int(grid_size[1]))
    emb = vqvae.quantize.embedding.weight
    quant = (vectors / float(codebook_scale)).reshape(vectors.shape[0], h, w, -1).permute(0, 3, 1, 2)
    out = vqvae.decode(quant.contiguous().to(emb.dtype), force_not_quantize=True, return_dict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


def draw_noise(generator, batch: int, num_tokens: int, embed_dim: int, device, dtype=torch.float32):
    """Unit Gaussian noise (B, n, d): one ``(n, d)`` draw from each generator of a list (per-image,
    batch-independent), or one ``(B, n, d)`` draw from a single generator."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images; pass one per image")
        z = torch.stack([torch.randn(num_tokens, embed_dim, generator=g, device=g.device) for g in generator])
    else:
        gdev = generator.device if generator is not None else device
        z = torch.randn(batch, num_tokens, embed_dim, generator=generator, device=gdev)
    return z.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# helpers duplicated from ar_image.py (this file must stand alone)


# Copied from stepdistill.pipelines.ar_image.decode_tokens with decode_tokens->_decode_tokens
def _decode_tokens(vqvae, tokens: torch.Tensor, grid_size) -> torch.Tensor:
    """Token indices (B, h*w) in raster order -> images in about [-1, 1] (B, C, H, W)."""
    h, w = (int(grid_size[0]), int(grid_size[1]))
    b = tokens.shape[0]
    emb = vqvae.quantize.embedding.weight
    quant = emb[tokens.reshape(-1).long()].reshape(b, h, w, emb.shape[1]).permute(0, 3, 1, 2).contiguous()
    out = vqvae.decode(quant.to(emb.dtype), force_not_quantize=True, return_dict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


# Copied from stepdistill.pipelines.ar_image.resolve_class_labels with resolve_class_labels->_class_labels
def _class_labels(class_labels, batch_size: int, num_images_per_prompt: int, num_classes: int, device):
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


# Copied from stepdistill.pipelines.ar_image.to_images with to_images->_to_images
def _to_images(x: torch.Tensor, output_type: str):
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


# Copied from stepdistill.pipelines.ar_image._write_self_contained
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


class DistilledDecodingPipeline(DiffusionPipeline):
    r"""One-/few-step sampler of a Distilled Decoding student.

    Components:
        vqvae ([`VQModel`]): the teacher's tokenizer (codebook and decoder).
        transformer ([`~transformers.LlamaForCausalLM`]): the student (see the module docstring).

    Config (``model_index.json``): ``num_classes``, ``codebook_size``, ``embed_dim`` (d),
    ``grid_size`` ([h, w], raster order), ``codebook_scale`` (flow space = codebook x scale),
    ``split_points`` (training-time split points, ``[0]`` or ``[0, t_2, ...]``),
    ``num_inference_steps`` (default number of passes), ``rbf_tau`` (width of the optional
    codebook-RBF input feature; ``null`` = DD's plain linear input layer) and ``split_t`` (first
    position taken from the continuous head, whose weights are ``continuous_head.safetensors`` in
    the folder; ``null`` = no head, all positions from the logits).
    """

    #: file (beside ``model_index.json``) holding the continuous head's weights
    head_file = "continuous_head.safetensors"

    model_cpu_offload_seq = "transformer->vqvae"

    def __init__(
        self,
        vqvae,
        transformer,
        num_classes: int = 10,
        codebook_size: int | None = None,
        embed_dim: int | None = None,
        grid_size: list[int] | None = None,
        codebook_scale: float = 1.0,
        split_points: list[int] | None = None,
        num_inference_steps: int = 1,
        rbf_tau: float | None = None,
        split_t: int | None = None,
    ):
        super().__init__()
        self._continuous_head = None
        self.register_modules(vqvae=vqvae, transformer=transformer)
        if vqvae is not None:
            if codebook_size is None:
                codebook_size = int(vqvae.config.num_vq_embeddings)
            if embed_dim is None:
                embed_dim = int(vqvae.quantize.embedding.weight.shape[1])
            if grid_size is None:
                down = 2 ** (len(vqvae.config.block_out_channels) - 1)
                grid_size = [int(vqvae.config.sample_size) // down] * 2
        self.register_to_config(
            num_classes=int(num_classes),
            codebook_size=None if codebook_size is None else int(codebook_size),
            embed_dim=None if embed_dim is None else int(embed_dim),
            grid_size=None if grid_size is None else [int(g) for g in grid_size],
            codebook_scale=float(codebook_scale),
            split_points=[int(s) for s in (split_points or [0])],
            num_inference_steps=int(num_inference_steps),
            rbf_tau=None if rbf_tau is None else float(rbf_tau),
            split_t=None if split_t is None else int(split_t),
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``DiffusionPipeline.save_pretrained`` plus this file as ``distilled_decoding.py`` and the list-form
        ``_class_name``, so the folder loads with ``DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)``; with ``split_t`` set, also the continuous head's weights
        (``continuous_head.safetensors``)."""
        if self.config.get("split_t") is not None and self.continuous_head is None:
            raise ValueError("split_t is set but the pipeline has no continuous head (set_continuous_head)")
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if type(self) is DistilledDecodingPipeline:
            _write_self_contained(save_directory, "distilled_decoding", "DistilledDecodingPipeline")
        if self.config.get("split_t") is not None:
            from safetensors.torch import save_file

            state = {k: v.detach().float().cpu().contiguous() for k, v in self.continuous_head.state_dict().items()}
            save_file(state, os.path.join(save_directory, self.head_file), metadata={"format": "pt"})
        return out

    def set_continuous_head(self, head, split_t: int | None) -> None:
        """Attach a :class:`DDContinuousHead` (or ``None``) and record ``split_t`` in the config."""
        if (head is None) != (split_t is None):
            raise ValueError("the continuous head and split_t go together (both set or both None)")
        self._continuous_head = head
        self.register_to_config(split_t=None if split_t is None else int(split_t))

    @staticmethod
    def split_student_state(student, state: dict | None):
        """``(LM state, head)`` of a training-time student's ``state_dict`` (``transformer.`` and
        ``head.`` keys, e.g. its EMA weights): the head is a copy of ``student.head`` holding the
        state's ``head.*`` weights (``None`` without a head)."""
        import copy

        live = getattr(student, "head", None)
        if state is None:
            return None, live
        lm = {k: v for k, v in state.items() if not k.startswith("head.")}
        if live is None:
            return lm, None
        head = copy.deepcopy(live).float()
        head.load_state_dict({k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")})
        return lm, head

    @property
    def continuous_head(self):
        """The continuous head (``None`` without ``split_t``); read from the folder the pipeline was
        loaded from (``continuous_head.safetensors``) on first use."""
        if self._continuous_head is None and self.config.get("split_t") is not None:
            self._continuous_head = self._load_head(self.name_or_path)
        return self._continuous_head

    def _load_head(self, where) -> DDContinuousHead:
        from safetensors.torch import load_file

        if where is None:
            raise ValueError("split_t is set but no continuous head was given and no folder is known to read it from")
        path = os.path.join(str(where), self.head_file)
        if os.path.isdir(str(where)) and not os.path.isfile(path):  # a local folder: never ask the Hub
            raise FileNotFoundError(f"split_t is set but {self.head_file} is not in {where}")
        if not os.path.isfile(path):
            try:  # a Hub repository id
                from huggingface_hub import hf_hub_download

                path = hf_hub_download(str(where), self.head_file)
            except Exception as err:  # noqa: BLE001 -- say what is missing
                raise FileNotFoundError(f"split_t is set but {self.head_file} is not in {where}") from err
        head = DDContinuousHead.from_state_dict(load_file(path))
        return head.eval().requires_grad_(False)

    # Copied from stepdistill.pipelines.one_step.OneStepPipeline.load_config with one_step->distilled_decoding, OneStepPipeline->DistilledDecodingPipeline
    @classmethod
    def load_config(cls, *args, **kwargs):
        """Exported folders name the pipeline class in list form (``["distilled_decoding", "DistilledDecodingPipeline"]``)
        for ``trust_remote_code`` loading; when this class itself is asked to load such a folder,
        use this class instead of the folder's copy of the code (no remote code needed)."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if cls is not DiffusionPipeline and isinstance(config.get("_class_name"), (list, tuple)):
            config["_class_name"] = cls.__name__
        return out

    @property
    def layout(self) -> dict:
        c = self.config
        return dd_layout(c.codebook_size, c.num_classes, c.embed_dim, c.get("rbf_tau"))

    @property
    def num_tokens(self) -> int:
        h, w = self.config.grid_size
        return int(h) * int(w)

    def flow_codebook(self) -> torch.Tensor:
        """(V, d) codebook in flow space (the student's data inputs)."""
        return self.vqvae.quantize.embedding.weight * float(self.config.codebook_scale)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        noise: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        num_images_per_prompt: int = 1,
        teacher_fn=None,
        teacher_steps: int = 0,
    ):
        r"""Generate images in one (or a few) forward passes.

        Args:
            class_labels: class ids; ``None`` gives ``batch_size`` images of classes ``0, 1, 2, ...``.
            num_inference_steps: number of student passes, ``1 .. len(split_points)`` (default: the
                config's ``num_inference_steps``).
            generator: a ``torch.Generator`` or one per image; draws the (B, n, d) noise.
            noise: explicit unit noise (B, n, d) instead of drawing it.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"tokens"`` (the (B, n) token indices).
            teacher_fn, teacher_steps: teacher-involved sampling (module docstring): ``teacher_fn(labels,
                prefix (B, s), noise (B, n, d), stop) -> tokens (B, stop)`` regenerates
                ``teacher_steps`` tokens before the second split point
                (``stepdistill.algorithms.distilled_decoding.teacher_span_fn(teacher, ...)`` makes one
                from an AR teacher); ``num_inference_steps`` then defaults to all split points.
        """
        cfg = self.config
        device = self._execution_device
        labels = _class_labels(class_labels, batch_size, num_images_per_prompt, cfg.num_classes, device)
        b = labels.shape[0]
        dtype = self.transformer.dtype
        if noise is None:
            noise = draw_noise(generator, b, self.num_tokens, cfg.embed_dim, device, torch.float32)
        else:
            expected = (b, self.num_tokens, cfg.embed_dim)
            if tuple(noise.shape) != expected:
                raise ValueError(f"noise must have shape {expected}, got {tuple(noise.shape)}")
            noise = noise.to(device=device, dtype=torch.float32)
        steps = cfg.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
        if teacher_steps and num_inference_steps is None:
            steps = len(cfg.split_points)
        codes = self.flow_codebook().to(device=device, dtype=torch.float32)
        head = self.continuous_head
        if head is not None:
            head = head.to(device=device, dtype=dtype)
        tokens, vectors = dd_generate(
            self.transformer, codes, noise.to(dtype), labels, cfg.split_points, self.layout, steps,
            head=head, split_t=cfg.get("split_t"), return_vectors=True,
            teacher_fn=teacher_fn, teacher_steps=teacher_steps,
        )
        if output_type == "tokens":
            image = tokens
        elif head is None:
            image = _to_images(_decode_tokens(self.vqvae, tokens, cfg.grid_size), output_type)
        else:  # continuous positions are decoded as predicted, not snapped
            vq = decode_vectors(self.vqvae, vectors.float(), cfg.grid_size, cfg.codebook_scale)
            image = _to_images(vq, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
