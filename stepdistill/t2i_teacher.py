"""Training the embedded text-to-image teacher (see :mod:`stepdistill.teachers.text_to_image`).

Three stages on coloured MNIST (:mod:`stepdistill.data.colored_mnist`, training split only), each
cached under its own key (``<cache>/teachers/t2i-parts/<stage>-<key>``) so that a changed UNet
recipe reuses the trained VAE and text encoder, each resumable (atomic checkpoints every
``checkpoint_every_steps``; the batch and noise of step ``s`` are drawn from a generator seeded by
``(seed, stage, s)``, so a resumed run draws what the uninterrupted one would have):

1. ``vae`` -- AutoencoderKL, loss MSE + ``kl_weight`` KL, AdamW with warm-up and cosine decay;
   then the training set is encoded once (posterior mean and std) and ``scaling_factor`` is set to
   1 / std of the posterior samples (SD's rule for its 0.18215).
2. ``text`` -- CLIPTextModel trained contrastively against a small CNN image tower (CLIP's
   symmetric InfoNCE; image->text over all captions of the data set, text->image within the batch
   with every image of the same caption a positive) with a learnable temperature.  The image tower
   also carries three attribute heads (digit, fg, bg), used only to monitor the UNet's prompt
   accuracy during training (not an independent judge).  The text encoder is then **frozen**, as
   in SD: its per-token states of the 301 distinct prompts ("" included) are computed once.
3. ``unet`` -- UNet2DConditionModel trained as SD 1.5: epsilon prediction on latents
   ``scaling_factor * z``, ``z ~ q(z|x)``, scaled-linear betas 0.00085-0.012 over 1,000 steps,
   10% of captions replaced by "" (classifier-free guidance), AdamW, EMA of the weights.

``python -m stepdistill.t2i_teacher`` trains (or finds) the cached teacher and appends its cost row
to ``benchmarks/results/t2i_teacher_train.json``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .teachers.text_to_image import (
    SD15_SCHEDULE,
    T2ITeacherSpec,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    n_params,
    part_keys,
    spec_from_params,
)

STAGE_SALT = {"vae": 1, "text": 2, "unet": 3, "eval": 4}


# ---------------------------------------------------------------------------------------------
# small utilities


def _gen(seed: int, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + STAGE_SALT[stage] * 100_003 + int(step))


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), over the whole set."""
    mse = F.mse_loss(x.float().clamp(-1, 1), y.float()).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


class _Clock:
    """Wall and process CPU seconds, accumulated across resumes."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0):
        self.base_wall, self.base_cpu = wall, cpu
        self.t0, self.c0 = time.time(), time.process_time()

    @property
    def wall(self) -> float:
        return self.base_wall + time.time() - self.t0

    @property
    def cpu(self) -> float:
        return self.base_cpu + time.process_time() - self.c0


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def _load_ckpt(path: Path):
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _finish_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


class _Stage:
    """A stage folder: ``ckpt.pt`` while training, ``done.json`` (metrics) once finished."""

    def __init__(self, root: Path, name: str, key: str):
        self.name = name
        self.dir = root / f"{name}-{key}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt = self.dir / "ckpt.pt"
        self.done = self.dir / "done.json"

    def finished(self) -> dict | None:
        return json.loads(self.done.read_text()) if self.done.exists() else None


class Dist:
    """Data-parallel CPU training over ``world`` processes (gloo), world-size independent: every rank
    draws the same full batch and noise, takes rows ``rank::world``, and DDP averages the gradients, so
    the update is the full batch's (up to the order of float sums).  Rank 0 writes all files."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @property
    def main(self) -> bool:
        return self.rank == 0

    def part(self, *tensors):
        if self.world == 1:
            return tensors if len(tensors) > 1 else tensors[0]
        out = tuple(t[self.rank::self.world] for t in tensors)
        return out if len(out) > 1 else out[0]

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module)

    def total_cpu(self, clock: _Clock) -> float:
        """CPU seconds of all ranks: the resumed base plus every rank's own since it started (collective)."""
        own = time.process_time() - clock.c0
        if self.world > 1:
            import torch.distributed as tdist

            t = torch.tensor([own], dtype=torch.float64)
            tdist.all_reduce(t)
            own = float(t)
        return clock.base_cpu + own

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as tdist

            tdist.barrier()


class _VAEForward(nn.Module):
    """encode -> reparametrised sample with given noise -> decode (one forward for DDP)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, eps):
        post = self.vae.encode(x).latent_dist
        rec = self.vae.decode(post.mean + post.std * eps).sample
        return rec, post.mean, post.logvar


# ---------------------------------------------------------------------------------------------
# data


def load_training_data(spec: T2ITeacherSpec):
    """The training split (``variants`` colourings), the distinct captions and each image's caption index."""
    from .data.colored_mnist import load_split

    data = load_split("train", variants=spec.data.variants, seed=spec.data.seed)
    captions = sorted(set(data.captions))
    index = {c: i for i, c in enumerate(captions)}
    cap_idx = torch.tensor([index[c] for c in data.captions], dtype=torch.long)
    return data, captions, cap_idx


def all_captions() -> list[tuple[str, tuple[int, int, int]]]:
    from .data.colored_mnist import PAIRS, caption

    return [(caption(d, f, b), (d, f, b)) for d in range(10) for (f, b) in PAIRS]


# ---------------------------------------------------------------------------------------------
# stage 1: VAE


def train_vae(spec: T2ITeacherSpec, stage: _Stage, data, progress: bool = True, dist: Dist | None = None) -> dict:
    dist = dist or Dist()
    s = spec.vae
    torch.manual_seed(spec.seed)
    vae = build_vae(s)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.lr, weight_decay=0.0)
    start, curve, clock = 0, [], _Clock()
    ck = _load_ckpt(stage.ckpt)
    if ck is not None:
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        start, curve, clock = ck["step"], ck["curve"], _Clock(ck["wall"], ck["cpu"])
    held = _heldout_images(256)
    x_all = data.images
    n = len(x_all)
    vae.train()
    fwd = dist.wrap(_VAEForward(vae))
    lat_shape = (s.latent_channels, x_all.shape[-2] // 2 ** (len(s.block_out_channels) - 1),
                 x_all.shape[-1] // 2 ** (len(s.block_out_channels) - 1))
    bar = _progress(s.steps, start, "t2i vae", progress and dist.main)
    for step in range(start, s.steps):
        g = _gen(spec.seed, "vae", step)
        x = x_all[torch.randint(0, n, (s.batch_size,), generator=g)]
        eps = torch.randn((s.batch_size, *lat_shape), generator=g)
        x, eps = dist.part(x, eps)
        _set_lr(opt, s.lr * _lr_factor(step, s.steps, s.warmup_steps, s.min_lr_ratio))
        rec, mu, logvar = fwd(x, eps)
        mse = F.mse_loss(rec, x)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = mse + s.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.update(1)
        done = step + 1
        if dist.main and (done % 250 == 0 or done == s.steps):
            p = _vae_psnr(vae, held)
            curve.append({"step": done, "wall_s": round(clock.wall, 1), "cpu_s": round(clock.cpu, 1),
                          "psnr_heldout_db": round(p, 2), "mse": mse.item(), "kl": kl.item()})
            bar.set_postfix(psnr=f"{p:.2f}")
        if done % spec.checkpoint_every_steps == 0 and done < s.steps:
            cpu_all = dist.total_cpu(clock)
            if dist.main:
                _atomic_torch_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": done, "curve": curve,
                                    "wall": clock.wall, "cpu": cpu_all}, stage.ckpt)
    bar.close()
    vae.eval()
    train_wall, train_cpu = clock.wall, dist.total_cpu(clock)
    if not dist.main:
        return {}
    # encode the training set once: posterior mean / std (the UNet stage samples z ~ q(z|x))
    t_enc, c_enc = time.time(), time.process_time()
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, n, 500):
            post = vae.encode(x_all[i:i + 500]).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)
    g = _gen(spec.seed, "vae", 10**7)
    z = mean + std * torch.randn(mean.shape, generator=g)
    scaling = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scaling)
    enc_wall, enc_cpu = time.time() - t_enc, time.process_time() - c_enc
    held_all = _heldout_images(None)
    final_psnr = _vae_psnr(vae, held_all)
    tmp = stage.dir / "vae.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    vae.save_pretrained(tmp, safe_serialization=True)
    _finish_dir(tmp, stage.dir / "vae")
    _atomic_torch_save({"mean": mean.half(), "std": std.half()}, stage.dir / "latents.pt")
    metrics = {
        "params": n_params(vae), "steps": s.steps, "batch_size": s.batch_size,
        "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1),
        "encode_wall_s": round(enc_wall, 1), "encode_cpu_s": round(enc_cpu, 1), "encoded_images": n,
        "psnr_heldout_db": round(final_psnr, 2), "scaling_factor": scaling, "latent_shape": list(mean.shape[1:]),
        "curve": curve, "spec": asdict(s),
    }
    _atomic_json(metrics, stage.done)
    stage.ckpt.unlink(missing_ok=True)
    return metrics


def _heldout_images(n: int | None):
    from .data.colored_mnist import load_split

    x = load_split("heldout", variants=1, seed=0).images
    return x if n is None else x[:n]


@torch.no_grad()
def _vae_psnr(vae, x) -> float:
    was = vae.training
    vae.eval()
    rec = torch.cat([vae.decode(vae.encode(x[i:i + 250]).latent_dist.mean).sample for i in range(0, len(x), 250)])
    vae.train(was)
    return psnr(rec, x)


# ---------------------------------------------------------------------------------------------
# stage 2: text encoder (contrastive against an image tower)


class ImageTower(nn.Module):
    """Small CNN: 3x32x32 -> features; projection for the contrastive loss and attribute heads."""

    def __init__(self, channels=(32, 64, 128), projection_dim: int = 128, heads: bool = True):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, projection_dim)
        self.heads = nn.ModuleDict({"digit": nn.Linear(c_in, 10), "fg": nn.Linear(c_in, 6), "bg": nn.Linear(c_in, 6)}) \
            if heads else None

    def features(self, x):
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x):
        h = self.features(x)
        logits = {k: m(h) for k, m in self.heads.items()} if self.heads is not None else {}
        return self.proj(h), logits


class TextTower(nn.Module):
    """CLIPTextModel + projection of its pooled (end-of-text) state, as in CLIP."""

    def __init__(self, encoder, projection_dim: int):
        super().__init__()
        self.encoder = encoder
        self.proj = nn.Linear(encoder.config.hidden_size, projection_dim, bias=False)

    def forward(self, ids):
        return self.proj(self.encoder(input_ids=ids).pooler_output)


def _tokenize(tokenizer, prompts):
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train_text(spec: T2ITeacherSpec, stage: _Stage, data, progress: bool = True) -> dict:
    from .data.colored_mnist import vocabulary

    s = spec.text
    torch.manual_seed(spec.seed + 1)
    tok_dir = stage.dir / "tokenizer.build"
    tokenizer = build_tokenizer(vocabulary(), tok_dir, max_length=s.max_length)
    text = TextTower(build_text_encoder(s, tokenizer), s.projection_dim)
    tower = ImageTower(tuple(s.image_channels), s.projection_dim, heads=s.attribute_heads)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = list(text.parameters()) + list(tower.parameters()) + [logit_scale]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.01)
    caps = all_captions()
    cap_text = [c for c, _ in caps]
    cap_index = {c: i for i, c in enumerate(cap_text)}
    cap_ids = _tokenize(tokenizer, cap_text)
    img_cap = torch.tensor([cap_index[c] for c in data.captions])
    attrs = data.attrs
    start, curve, clock = 0, [], _Clock()
    ck = _load_ckpt(stage.ckpt)
    if ck is not None:
        text.load_state_dict(ck["text"])
        tower.load_state_dict(ck["tower"])
        with torch.no_grad():
            logit_scale.copy_(ck["logit_scale"])
        opt.load_state_dict(ck["opt"])
        start, curve, clock = ck["step"], ck["curve"], _Clock(ck["wall"], ck["cpu"])
    n = len(data)
    bar = _progress(s.steps, start, "t2i text", progress)
    for step in range(start, s.steps):
        g = _gen(spec.seed, "text", step)
        idx = torch.randint(0, n, (s.batch_size,), generator=g)
        x, ci, a = data.images[idx], img_cap[idx], attrs[idx]
        _set_lr(opt, s.lr * _lr_factor(step, s.steps, s.warmup_steps, s.min_lr_ratio))
        img_emb, heads = tower(x)
        img_emb = F.normalize(img_emb, dim=-1)
        txt_emb = F.normalize(text(cap_ids), dim=-1)  # all 300 captions each step (cheap)
        scale = logit_scale.clamp(max=math.log(100)).exp()
        logits = scale * img_emb @ txt_emb.T  # (B, 300)
        loss_i2t = F.cross_entropy(logits, ci)
        same = (ci[None, :] == ci[:, None]).float()  # text->image within the batch: all same-caption images
        t2i = logits[:, ci].T  # (B texts, B images)
        loss_t2i = -(same / same.sum(1, keepdim=True) * F.log_softmax(t2i, dim=1)).sum(1).mean()
        loss = 0.5 * (loss_i2t + loss_t2i)
        if heads:
            loss = loss + sum(F.cross_entropy(heads[k], a[:, j]) for j, k in enumerate(("digit", "fg", "bg"))) / 3
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.update(1)
        done = step + 1
        if done % 100 == 0 or done == s.steps:
            curve.append({"step": done, "wall_s": round(clock.wall, 1), "cpu_s": round(clock.cpu, 1),
                          "loss": loss.item(), "i2t_batch_acc": (logits.argmax(1) == ci).float().mean().item()})
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if done % spec.checkpoint_every_steps == 0 and done < s.steps:
            _atomic_torch_save({"text": text.state_dict(), "tower": tower.state_dict(), "logit_scale": logit_scale.detach(),
                                "opt": opt.state_dict(), "step": done, "curve": curve, "wall": clock.wall,
                                "cpu": clock.cpu}, stage.ckpt)
    bar.close()
    text.eval()
    tower.eval()
    wall, cpu = clock.wall, clock.cpu
    ev = _text_eval(text, tower, cap_ids, caps)
    tmp = stage.dir / "parts.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    text.encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    from safetensors.torch import save_file

    state = {f"tower.{k}": v.contiguous() for k, v in tower.state_dict().items()}
    state.update({f"text_proj.{k}": v.contiguous() for k, v in text.proj.state_dict().items()})
    state["logit_scale"] = logit_scale.detach().clone().reshape(1)
    save_file(state, str(tmp / "towers.safetensors"))
    _finish_dir(tmp, stage.dir / "parts")
    shutil.rmtree(tok_dir, ignore_errors=True)
    metrics = {
        "params_text_encoder": n_params(text.encoder), "params_image_tower": n_params(tower),
        "vocab_size": len(tokenizer), "max_length": s.max_length,
        "steps": s.steps, "batch_size": s.batch_size, "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
        **ev, "curve": curve, "spec": asdict(s),
    }
    _atomic_json(metrics, stage.done)
    stage.ckpt.unlink(missing_ok=True)
    return metrics


@torch.no_grad()
def _text_eval(text, tower, cap_ids, caps) -> dict:
    """Held-out zero-shot accuracy: each held-out image's best caption among all 300 has all three
    attributes right; and the attribute heads' held-out accuracy (the monitor)."""
    from .data.colored_mnist import load_split

    held = load_split("heldout", variants=2, seed=0)
    txt = F.normalize(text(cap_ids), dim=-1)
    emb, heads = tower(held.images)
    best = (F.normalize(emb, dim=-1) @ txt.T).argmax(1)
    cap_attrs = torch.tensor([a for _, a in caps])
    zs = (cap_attrs[best] == held.attrs).all(1).float().mean().item()
    out = {"zero_shot_heldout_acc_all3": round(zs, 4)}
    if heads:
        pred = torch.stack([heads[k].argmax(1) for k in ("digit", "fg", "bg")], dim=1)
        out["monitor_heldout_acc_all3"] = round((pred == held.attrs).all(1).float().mean().item(), 4)
        out["monitor_heldout_acc_digit"] = round((pred[:, 0] == held.attrs[:, 0]).float().mean().item(), 4)
    return out


def load_monitor(stage_dir: Path, spec: T2ITeacherSpec) -> ImageTower | None:
    from safetensors.torch import load_file

    if not spec.text.attribute_heads:
        return None
    state = load_file(str(stage_dir / "parts" / "towers.safetensors"))
    tower = ImageTower(tuple(spec.text.image_channels), spec.text.projection_dim, heads=True)
    tower.load_state_dict({k[len("tower."):]: v for k, v in state.items() if k.startswith("tower.")})
    return tower.eval()


# ---------------------------------------------------------------------------------------------
# stage 3: UNet


def _assemble(vae, text_encoder, tokenizer, unet):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def prompt_accuracy(pipe, monitor: ImageTower, n: int = 200, steps: int = 8, cfg: float = 4.5, seed: int = 1,
                    batch: int = 100) -> float:
    """Fraction of generated images whose three attributes the monitor reads as the prompt's."""
    from .data.colored_mnist import eval_prompts

    prompts = eval_prompts(n, seed=seed)
    hits = []
    for i in range(0, n, batch):
        chunk = prompts[i:i + batch]
        img = pipe([p["prompt"] for p in chunk], num_inference_steps=steps, guidance_scale=cfg, output_type="pt",
                   generator=torch.Generator().manual_seed(seed * 7919 + i)).images
        _, heads = monitor(img * 2 - 1)
        pred = torch.stack([heads[k].argmax(1) for k in ("digit", "fg", "bg")], dim=1)
        want = torch.tensor([[p["digit"], p["fg"], p["bg"]] for p in chunk])
        hits.append((pred == want).all(1).float())
    return torch.cat(hits).mean().item()


def train_unet(spec: T2ITeacherSpec, stage: _Stage, vae_dir: Path, text_dir: Path, data_cap: list[str],
               progress: bool = True, dist: Dist | None = None) -> tuple[dict, nn.Module]:
    dist = dist or Dist()
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    s = spec.unet
    vae = AutoencoderKL.from_pretrained(vae_dir / "vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(text_dir / "parts" / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(text_dir / "parts" / "tokenizer"))
    lat = torch.load(vae_dir / "latents.pt", map_location="cpu", weights_only=True)
    mean, std = lat["mean"].float(), lat["std"].float()
    sf = float(vae.config.scaling_factor)
    monitor = load_monitor(text_dir, spec) if s.eval_every_steps and dist.main else None
    # the text encoder is frozen: per-token states of every distinct prompt, and of "" (SD's null prompt)
    uniq = sorted(set(data_cap))
    index = {c: i for i, c in enumerate(uniq)}
    cap_idx = torch.tensor([index[c] for c in data_cap])
    with torch.no_grad():
        emb = text_encoder(_tokenize(tokenizer, uniq + [""])).last_hidden_state
    cond, null = emb[:-1], emb[-1:]
    torch.manual_seed(spec.seed + 2)
    unet = build_unet(s, cross_attention_dim=text_encoder.config.hidden_size,
                      latent_channels=vae.config.latent_channels, sample_size=mean.shape[-1])
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched = DDPMScheduler(**{k: SD15_SCHEDULE[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                            "beta_schedule", "prediction_type", "clip_sample")})
    opt = torch.optim.AdamW(unet.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    start, curve, evals, clock = 0, [], [], _Clock()
    ck = _load_ckpt(stage.ckpt)
    if ck is not None:
        unet.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        start, curve, evals, clock = ck["step"], ck["curve"], ck["evals"], _Clock(ck["wall"], ck["cpu"])
    n = len(mean)
    T = SD15_SCHEDULE["num_train_timesteps"]
    unet.train()
    ema_params, live_params = list(ema.parameters()), list(unet.parameters())
    fwd = dist.wrap(unet)
    bar = _progress(s.steps, start, "t2i unet", progress and dist.main)
    eval_wall = 0.0
    for step in range(start, s.steps):
        g = _gen(spec.seed, "unet", step)
        idx = torch.randint(0, n, (s.batch_size,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
        t = torch.randint(0, T, (s.batch_size,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        zt = sched.add_noise(z0, noise, t)
        drop = torch.rand(s.batch_size, generator=g) < s.cond_dropout
        ehs = torch.where(drop[:, None, None], null.expand(s.batch_size, -1, -1), cond[cap_idx[idx]])
        zt, t, noise, ehs = dist.part(zt, t, noise, ehs)
        _set_lr(opt, s.lr * _lr_factor(step, s.steps, s.warmup_steps, s.min_lr_ratio))
        pred = fwd(zt, t, encoder_hidden_states=ehs, return_dict=False)[0]
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), s.max_grad_norm)
        opt.step()
        d = min(s.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in live_params], 1 - d)
        bar.update(1)
        done = step + 1
        if done % 100 == 0 or done == s.steps:
            curve.append({"step": done, "wall_s": round(clock.wall, 1), "cpu_s": round(clock.cpu, 1),
                          "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if monitor is not None and (done % s.eval_every_steps == 0 or done == s.steps):
            t_e = time.time()
            acc = prompt_accuracy(_assemble(vae, text_encoder, tokenizer, ema), monitor, n=s.eval_images)
            eval_wall += time.time() - t_e
            evals.append({"step": done, "wall_s": round(clock.wall, 1), "cpu_s": round(clock.cpu, 1),
                          "prompt_acc_ddim8_cfg4.5": round(acc, 4), "n": s.eval_images})
            bar.write(f"[t2i unet] step {done}: monitor prompt accuracy (DDIM 8, CFG 4.5, N={s.eval_images}) {acc:.3f}")
        if done % spec.checkpoint_every_steps == 0 and done < s.steps:
            cpu_all = dist.total_cpu(clock)
            if dist.main:
                _atomic_torch_save({"model": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                    "step": done, "curve": curve, "evals": evals, "wall": clock.wall,
                                    "cpu": cpu_all}, stage.ckpt)
    bar.close()
    wall, cpu = clock.wall, dist.total_cpu(clock)
    if not dist.main:
        return {}, ema
    tmp = stage.dir / "unet.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    ema.save_pretrained(tmp, safe_serialization=True)
    _finish_dir(tmp, stage.dir / "unet")
    metrics = {
        "params": n_params(unet), "steps": s.steps, "batch_size": s.batch_size,
        "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
        "monitor_eval_wall_s_this_session": round(eval_wall, 1),
        "evals": evals, "curve": curve, "spec": asdict(s),
    }
    _atomic_json(metrics, stage.done)
    stage.ckpt.unlink(missing_ok=True)
    return metrics, ema


# ---------------------------------------------------------------------------------------------
# the whole teacher


MODEL_CARD = """---
library_name: diffusers
pipeline_tag: text-to-image
tags: [stable-diffusion, stepdistill, embedded-teacher]
---
# stepdistill embedded text-to-image teacher (coloured MNIST)

A small latent text-to-image model in Stable Diffusion's layout, trained from scratch on CPU by
`stepdistill` (`stepdistill.t2i_teacher`, preset `configs/t2i/teacher.yaml`) on coloured real MNIST
digits (`stepdistill.data.colored_mnist`, training split: 4,500 digits x {variants} colourings).
Prompts: `"a <colour> <digit word> on a <colour> background"`, colours red, green, blue, yellow,
magenta, cyan (foreground != background).

| part | class | parameters | training |
|---|---|---|---|
| vae | AutoencoderKL {vae_channels}, 3x32x32 -> {latent} | {vae_params:,} | {vae_steps} steps, MSE + {kl} KL; held-out PSNR {psnr} dB; scaling_factor {sf:.5f} |
| text_encoder | CLIPTextModel hidden {hidden}, {layers} layers | {text_params:,} | {text_steps} contrastive steps vs a CNN image tower, then frozen; held-out zero-shot accuracy {zs} |
| tokenizer | CLIPTokenizer (byte-level BPE, one token per caption word), max length {maxlen} | | |
| unet | UNet2DConditionModel {unet_channels}, cross-attention dim {hidden} | {unet_params:,} | {unet_steps} steps, epsilon, SD 1.5 schedule, 10% caption dropout, EMA {ema} |
| scheduler | DDIMScheduler (SD 1.5 settings) | | |

Load with plain diffusers: `StableDiffusionPipeline.from_pretrained(folder)`; any stock scheduler
(`DDIMScheduler`, `DPMSolverMultistepScheduler`, `EulerDiscreteScheduler`, ...) samples it;
classifier-free guidance 4.5 and 8 DDIM steps are a good setting. No safety checker.
Training costs and curves: `training.json` in this folder.
"""


def _run_stages(spec: T2ITeacherSpec, parts_root: Path, progress: bool, dist: Dist) -> None:
    keys = part_keys(spec)
    st_vae, st_text, st_unet = (_Stage(parts_root, k, keys[k]) for k in ("vae", "text", "unet"))
    data, _, _ = load_training_data(spec)
    if not st_vae.finished():
        train_vae(spec, st_vae, data, progress, dist)
    dist.barrier()
    if not st_text.finished() and dist.main:  # small: one process (the others wait)
        train_text(spec, st_text, data, progress)
    dist.barrier()
    if not st_unet.finished():
        train_unet(spec, st_unet, st_vae.dir, st_text.dir, data.captions, progress, dist)
    dist.barrier()


def _stage_worker(rank: int, world: int, spec: T2ITeacherSpec, parts_root: str, progress: bool, port: int,
                  threads: int) -> None:
    import torch.distributed as tdist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(max(1, threads))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _run_stages(spec, Path(parts_root), progress, Dist(rank, world))
    finally:
        tdist.destroy_process_group()


def run_t2i_teacher_training(cfg, output: str | Path, progress: bool | None = None,
                             workers: int | None = None) -> Path:
    """Train (or reuse the cached parts of) the t2i teacher of ``cfg`` (a ``teacher.kind: t2i``
    RunConfig) and write a ``StableDiffusionPipeline`` folder to ``output/pipeline``.

    ``workers`` (default ``$STEPDISTILL_T2I_WORKERS`` or 1) CPU processes train the VAE and UNet
    data-parallel; the result does not depend on it beyond float summation order (not in the key)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if cfg.teacher.kind != "t2i":
        from .config import ConfigError

        raise ConfigError(f"run_t2i_teacher_training needs teacher.kind: t2i, got {cfg.teacher.kind!r}")
    spec = spec_from_params(cfg.teacher.params, seed=cfg.train.seed)
    if progress is None:
        progress = bool(cfg.train.progress)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    from .utils import cache_dir

    parts_root = cache_dir() / "teachers" / "t2i-parts"
    keys = part_keys(spec)
    load0 = os.getloadavg()
    threads = torch.get_num_threads()
    st_vae, st_text, st_unet = (_Stage(parts_root, k, keys[k]) for k in ("vae", "text", "unet"))
    if workers is None:
        workers = int(os.environ.get("STEPDISTILL_T2I_WORKERS", "1"))
    if not (st_vae.finished() and st_text.finished() and st_unet.finished()):
        if workers > 1:
            import socket

            import torch.multiprocessing as mp

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            mp.spawn(_stage_worker, args=(workers, spec, str(parts_root), progress, port, threads), nprocs=workers)
        else:
            _run_stages(spec, parts_root, progress, Dist())
    m_vae, m_text, m_unet = st_vae.finished(), st_text.finished(), st_unet.finished()
    vae = AutoencoderKL.from_pretrained(st_vae.dir / "vae")
    te = CLIPTextModel.from_pretrained(st_text.dir / "parts" / "text_encoder")
    tok = CLIPTokenizer.from_pretrained(str(st_text.dir / "parts" / "tokenizer"))
    unet = UNet2DConditionModel.from_pretrained(st_unet.dir / "unet")
    pipe = _assemble(vae, te, tok, unet)
    tmp = output / "pipeline.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    info = {
        "keys": keys, "spec": asdict(spec), "vae": m_vae, "text": m_text, "unet": m_unet,
        "loadavg_at_start": [round(v, 2) for v in load0], "loadavg_at_end": [round(v, 2) for v in os.getloadavg()],
        "torch_threads": threads, "workers": workers,
        "total_train_wall_s": round(sum(m[k] for m in (m_vae, m_text, m_unet) for k in ("train_wall_s",))
                                    + m_vae["encode_wall_s"], 1),
        "total_train_cpu_s": round(sum(m[k] for m in (m_vae, m_text, m_unet) for k in ("train_cpu_s",))
                                   + m_vae["encode_cpu_s"], 1),
    }
    _atomic_json(info, tmp / "training.json")
    (tmp / "README.md").write_text(MODEL_CARD.format(
        variants=spec.data.variants, vae_channels=tuple(spec.vae.block_out_channels),
        latent="x".join(map(str, m_vae["latent_shape"])), vae_params=m_vae["params"], vae_steps=spec.vae.steps,
        kl=spec.vae.kl_weight, psnr=m_vae["psnr_heldout_db"], sf=m_vae["scaling_factor"],
        hidden=spec.text.hidden_size, layers=spec.text.num_layers, text_params=m_text["params_text_encoder"],
        text_steps=spec.text.steps, zs=m_text["zero_shot_heldout_acc_all3"], maxlen=spec.text.max_length,
        unet_channels=tuple(spec.unet.block_out_channels), unet_params=m_unet["params"],
        unet_steps=spec.unet.steps, ema=spec.unet.ema_decay))
    from .config import save_config

    save_config(cfg, tmp / "stepdistill_config.yaml")  # the recipe beside the weights
    _finish_dir(tmp, output / "pipeline")
    return output / "pipeline"


# ---------------------------------------------------------------------------------------------
# the cache


def t2i_teacher_dir(preset: str = "t2i", overrides: list[str] | None = None, config=None) -> Path:
    """Cache folder of the t2i teacher for a preset + overrides, or a ``teacher.kind: t2i`` RunConfig
    (keyed by the resolved recipe)."""
    from .config import load_config
    from .utils import cache_dir

    cfg = config if config is not None else load_config(preset, overrides or [])
    spec = spec_from_params(cfg.teacher.params, seed=cfg.train.seed)
    return cache_dir() / "teachers" / f"t2i-{part_keys(spec)['unet']}"


def ensure_t2i_teacher(preset: str = "t2i", overrides: list[str] | None = None, quiet: bool = False,
                       progress: bool | None = None, workers: int | None = None, config=None) -> Path:
    """Return the cached text-to-image teacher's ``StableDiffusionPipeline`` folder, training it
    first when missing (``~/.cache/stepdistill/teachers/t2i-<key>/pipeline``, or under
    ``$STEPDISTILL_CACHE``).  Training resumes from its checkpoints if it was interrupted; ``workers``
    CPU processes train data-parallel (see :func:`run_t2i_teacher_training`)."""
    from .config import load_config

    cfg = config if config is not None else load_config(preset, overrides or [])
    out = t2i_teacher_dir(config=cfg)
    if (out / "pipeline" / "model_index.json").exists():
        return out / "pipeline"
    if not quiet:
        print(f"[stepdistill] text-to-image teacher not cached; training it once into {out} ...", flush=True)
    run_t2i_teacher_training(cfg, out, progress=progress, workers=workers)
    return out / "pipeline"


def build_t2i_teacher(tcfg):
    """``teacher.kind: t2i`` -> a frozen :class:`~stepdistill.teachers.diffusion.DiffusersTeacher` of the
    embedded text-to-image teacher: ``teacher.path`` if given, else the cached teacher of
    ``teacher.params.preset`` (default ``t2i``) or of the recipe in ``teacher.params`` (the preset's own
    teacher section), trained on first use."""
    from .config import ConfigError, load_config
    from .teachers.diffusion import DiffusersTeacher
    from .utils import DTYPES as dtypes
    if tcfg.dtype not in dtypes:
        raise ConfigError(f"teacher.dtype must be one of {', '.join(dtypes)}, got {tcfg.dtype!r}")
    params = dict(tcfg.params or {})
    if tcfg.path:
        path = tcfg.path
    elif set(params) <= {"preset"}:
        path = ensure_t2i_teacher(params.get("preset", "t2i"))
    else:
        path = ensure_t2i_teacher(config=load_config({"teacher": {"kind": "t2i", "params": params}}))
    return DiffusersTeacher.from_pretrained(str(path), prediction_type=tcfg.prediction_type,
                                            guidance_scale=tcfg.guidance_scale, dtype=dtypes[tcfg.dtype])


def cost_row(pipeline_dir: str | Path, command: str) -> dict:
    """The benchmark row (training cost of each part) from a trained folder's ``training.json``."""
    info = json.loads((Path(pipeline_dir) / "training.json").read_text())
    v, t, u = info["vae"], info["text"], info["unet"]
    return {
        "name": "t2i_teacher_train",
        "command": command,
        "teacher_key": info["keys"]["unet"],
        "vae": {k: v[k] for k in ("params", "steps", "batch_size", "train_wall_s", "train_cpu_s", "encode_wall_s",
                                  "encode_cpu_s", "psnr_heldout_db", "scaling_factor")},
        "vae_psnr_curve": [{k: c[k] for k in ("step", "wall_s", "cpu_s", "psnr_heldout_db")} for c in v["curve"]],
        "text": {k: t[k] for k in ("params_text_encoder", "params_image_tower", "steps", "batch_size", "train_wall_s",
                                   "train_cpu_s", "zero_shot_heldout_acc_all3") if k in t}
                | {k: t[k] for k in ("monitor_heldout_acc_all3", "monitor_heldout_acc_digit") if k in t},
        "unet": {k: u[k] for k in ("params", "steps", "batch_size", "train_wall_s", "train_cpu_s")},
        "unet_monitor_evals": u["evals"],
        "total_train_wall_s": info["total_train_wall_s"],
        "total_train_cpu_s": info["total_train_cpu_s"],
        "loadavg_at_start": info["loadavg_at_start"],
        "loadavg_at_end": info["loadavg_at_end"],
        "torch_threads": info["torch_threads"],
        "workers": info.get("workers", 1),
    }


QUICK_SETTINGS = ((8, 4.5), (8, 1.0), (25, 4.5), (8, 7.5))


def quick_prompt_accuracy(folder: str | Path, n: int = 500, settings=QUICK_SETTINGS) -> list[dict]:
    """Prompt accuracy of a pipeline folder under the shipped attribute judge (``t2i-attr-v1``), DDIM at
    (steps, CFG) ``settings``, prompts ``eval_prompts(n, seed=0)``, image ``i`` drawn with seed 10,000 + i.
    A one-seed check; the multi-seed grid with FID and CLIP score is ``benchmarks/t2i_teacher.py``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from .data.colored_mnist import eval_prompts
    from .eval.judges import as_uint8, attribute_accuracy, default_attribute_detector

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    det = default_attribute_detector()
    prompts = eval_prompts(n, seed=0)
    want = torch.tensor([[p["digit"], p["fg"], p["bg"]] for p in prompts])
    out = []
    for steps, cfg in settings:
        t0, imgs = time.time(), []
        for i in range(0, n, 100):
            chunk = prompts[i:i + 100]
            im = pipe([p["prompt"] for p in chunk], num_inference_steps=steps, guidance_scale=cfg, output_type="pt",
                      generator=[torch.Generator().manual_seed(10_000 + i + j) for j in range(len(chunk))]).images
            imgs.append(as_uint8(im * 2 - 1))
        acc = attribute_accuracy(det.predict(torch.cat(imgs)), want)
        out.append({"sampler": "ddim", "steps": steps, "cfg": cfg, "n": n, **acc, "wall_s": round(time.time() - t0, 1)})
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import shlex
    import sys

    ap = argparse.ArgumentParser(prog="python -m stepdistill.t2i_teacher",
                                 description="train (or find) the cached text-to-image teacher and record its cost")
    ap.add_argument("--preset", default="t2i")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process")
    ap.add_argument("--workers", type=int, default=None,
                    help="data-parallel CPU processes for the VAE and UNet (default $STEPDISTILL_T2I_WORKERS or 1)")
    ap.add_argument("--results", default="benchmarks/results/t2i_teacher_train.json")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--check", type=int, default=0, metavar="N",
                    help="also measure prompt accuracy with the shipped judge on N prompts (quick_prompt_accuracy)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.params.unet.steps=3000")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = ensure_t2i_teacher(args.preset, args.overrides, progress=not args.no_progress, workers=args.workers)
    print(f"[stepdistill] t2i teacher: {folder}")
    if args.results:
        cmd = "python -m stepdistill.t2i_teacher " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        row = cost_row(folder, cmd.strip())
        if args.check:
            row["quick_prompt_accuracy"] = {"judge": "t2i-attr-v1", "prompts": f"eval_prompts({args.check}, seed=0)",
                                            "image_seed": "10000 + i", "rows": quick_prompt_accuracy(folder, args.check)}
            for r in row["quick_prompt_accuracy"]["rows"]:
                print(json.dumps(r))
        print(json.dumps({k: v for k, v in row.items() if "curve" not in k and "evals" not in k}, indent=1))
        path = Path(args.results)
        rows = json.loads(path.read_text()) if path.exists() else []
        rows = [r for r in rows if r.get("teacher_key") != row["teacher_key"]] + [row]
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_json(rows, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
