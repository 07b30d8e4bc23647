"""MSD: Multi-Student Distillation (Song et al., ICML 2025, arXiv 2410.23274).
Spec: shared/docs/research/algos_boot_dd_msd.md §3.

The condition space is split into K disjoint groups; student k is a one-step generator trained
by a base algorithm (DMD2) only on its group's conditions (distribution-matching and fake-score
losses see only V_k; real data for the GAN is filtered to V_k), while the regression pairs are
shared and *not* filtered (the paper: filtering them causes mode collapse).  Smaller students
(``width_multiplier < 1``) are first pretrained by Teacher Score Matching (TSM): the small network
regresses the teacher's denoiser on noised inputs; the result initialises both the generator and
the fake score.  All students train in one run (``schedule``: round-robin, one student per step,
or concurrent, every student every step) under the generic loop; groups are named
``s<k>.generator`` / ``s<k>.critic``.

Routing (``partition``): contiguous class ranges, k-means over condition embeddings (balanced by
size), or a user-given mapping; stored in the exported config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..teachers.base import DelegatingTeacher, DiffusionTeacher, append_dims
from . import REGISTRY, register
from .base import NO_PROMPTS_MESSAGE, Distiller, LossOutput, is_text_conditional
from .common import RegressionPairs, batch_size_of, denoising_weight

# ---------------------------------------------------------------------------------------------
# partitions


def contiguous_partition(num_classes: int, k: int) -> list[int]:
    """class -> student for K contiguous, (nearly) equal class ranges."""
    if not 1 <= k <= num_classes:
        raise ValueError(f"need 1 <= num_students <= num_classes ({num_classes}), got {k}")
    return [min(c * k // num_classes, k - 1) for c in range(num_classes)]


def kmeans_partition(embeddings: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> list[int]:
    """Balanced k-means over per-condition embeddings (equal-size groups, as the paper asks).

    Plain k-means gave very uneven clusters in the paper; here each step assigns points to centres
    greedily by distance under a capacity of ceil(n / k) per centre."""
    n = embeddings.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= num_students <= number of conditions ({n}), got {k}")
    g = torch.Generator().manual_seed(seed)
    x = embeddings.reshape(n, -1).float()
    centres = x[torch.randperm(n, generator=g)[:k]].clone()
    cap = -(-n // k)
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        d = torch.cdist(x, centres)
        order = d.flatten().argsort()
        assign = torch.full((n,), -1, dtype=torch.long)
        counts = [0] * k
        for flat in order.tolist():
            i, j = divmod(flat, k)
            if assign[i] < 0 and counts[j] < cap:
                assign[i] = j
                counts[j] += 1
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
        if torch.allclose(new, centres):
            break
        centres = new
    return assign.tolist()


@dataclass
class MSDConfig:
    num_students: int = 4
    partition: str | None = None  # contiguous | kmeans | mapping; None = contiguous (classes), kmeans (text)
    partition_prompts: str | list | None = None  # text teachers: prompts to partition; None = the run's prompts
    mapping: list = field(default_factory=list)  # class -> student, for partition=mapping
    base: str = "dmd2"
    base_params: dict = field(default_factory=dict)
    schedule: str = "round_robin"  # round_robin | concurrent
    width_multiplier: float = 1.0  # < 1: smaller students (channels scaled), TSM-pretrained
    tsm_steps: int = 0  # teacher-score-matching steps per student (smaller students only)
    tsm_lr: float = 2e-4
    shared_regression_pairs: int = 0  # pairs shared by all students (not filtered); 0 = base's own setting


class _StudentTeacher(DelegatingTeacher):
    """The real teacher, except that ``trainable_copy`` hands out the (smaller) student network."""

    def __init__(self, teacher: DiffusionTeacher, student_net: DiffusionTeacher):
        super().__init__(teacher)
        self.student_net = student_net

    def trainable_copy(self):
        # the Distiller put this wrapper (and so ``student_net``) in eval mode; a trainable copy is in
        # train mode like every adapter's, with label dropout off (smaller_copy switched it off)
        net = copy.deepcopy(self.student_net)
        net.requires_grad_(True)
        net.train()
        return net


#: class-conditional DiT networks (diffusers' label embedder drops 10% of the labels in train mode)
DIT_KINDS = ("Transformer2DModel", "DiTTransformer2DModel")


def smaller_copy(teacher: DiffusionTeacher, width: float) -> DiffusionTeacher:
    """A freshly initialised student network scaled by ``width`` (``width == 1``: the teacher's
    ``trainable_copy``).  UNets: the adapter's ``smaller_copy`` (channel counts scaled).  DiTs
    (``Transformer2DModel`` / ``DiTTransformer2DModel``, no ``block_out_channels``): the number of
    attention heads scaled (head width kept), so the hidden width shrinks by ``width``.

    Every result has diffusers' label dropout switched off (:func:`disable_label_dropout`): the
    network is built fresh from its config and put in train mode, where a DiT's ``LabelEmbedding``
    would replace 10% of the class labels by the null class while the real score it is matched to
    stays conditional."""
    from ..teachers.diffusion import disable_label_dropout

    if width == 1.0:
        new = teacher.trainable_copy()
    elif type(getattr(teacher, "model", None)).__name__ in DIT_KINDS:
        cfg = dict(teacher.model.config)
        heads = int(cfg["num_attention_heads"])
        small_heads = max(1, int(round(heads * width)))
        if small_heads >= heads:
            raise ValueError(f"width_multiplier={width} leaves this DiT's {heads} attention heads unchanged; "
                             f"use a smaller width (at most {(heads - 1) / heads:.3g})")
        cfg["num_attention_heads"] = small_heads
        small = type(teacher.model).from_config(cfg)
        new = teacher.trainable_copy()  # same adapter (schedule, classes, shared VAE), then swap the network
        new.model = small.float().train().to(teacher.sigmas.device)
    else:
        new = teacher.smaller_copy(width)
    if isinstance(getattr(new, "model", None), nn.Module):
        disable_label_dropout(new.model)
    return new


@register
class MSD(Distiller):
    name = "msd"
    paper = "Song et al., Multi-Student Diffusion Distillation for Better One-Step Generators, ICML 2025"
    Config = MSDConfig

    def __init__(self, teacher: DiffusionTeacher, config: MSDConfig):
        super().__init__(teacher, config)
        c = config
        num_classes = getattr(teacher, "num_classes", None)
        self.text = is_text_conditional(teacher)
        self.text_route: dict | None = None  # text teachers: {prompts, assign, centroids} (made on first use)
        partition = c.partition or ("kmeans" if self.text else "contiguous")
        if self.text:
            if partition != "kmeans":
                raise ValueError(f"MSD partitions the prompts of a text-conditional teacher by k-means over pooled "
                                 f"text embeddings: algorithm.params.partition must be kmeans (or null), got {partition!r}")
            if c.num_students < 1:
                raise ValueError("algorithm.params.num_students must be >= 1")
            self.route = None
        elif num_classes is None:
            raise ValueError("MSD routes by class or by prompt: the teacher must be class- or text-conditional")
        elif partition == "contiguous":
            self.route = contiguous_partition(num_classes, c.num_students)
        elif partition == "mapping":
            if len(c.mapping) != num_classes or sorted(set(c.mapping)) != list(range(c.num_students)):
                raise ValueError(f"algorithm.params.mapping must list a student in 0..{c.num_students - 1} "
                                 f"for each of the {num_classes} classes, using every student")
            self.route = [int(v) for v in c.mapping]
        elif partition == "kmeans":
            emb = self._class_embeddings(teacher, num_classes)
            self.route = kmeans_partition(emb, c.num_students)
        else:
            raise ValueError(f"algorithm.params.partition must be contiguous | kmeans | mapping, got {c.partition!r}")
        if c.schedule not in ("round_robin", "concurrent"):
            raise ValueError("algorithm.params.schedule must be round_robin or concurrent")
        from ..config import from_dict

        base_cls = REGISTRY[c.base]
        base_cfg = from_dict(base_cls.Config, c.base_params, prefix="algorithm.params.base_params.")
        pairs = None
        self._pair_args = None
        if getattr(base_cfg, "regression_steps", 0) > 0:
            n_pairs = c.shared_regression_pairs or base_cfg.regression_pairs
            # one set shared by the students (made on first use, on the teacher's device)
            self._pair_args = dict(num_pairs=n_pairs, num_steps=base_cfg.regression_sampler_steps,
                                   sampler=base_cfg.regression_sampler, guidance_scale=base_cfg.real_guidance_scale,
                                   seed=base_cfg.regression_seed, shard_size=base_cfg.regression_shard_size,
                                   batch_size=base_cfg.regression_batch_size, root=base_cfg.pairs_dir)
            self._regression_prompts = getattr(base_cfg, "regression_prompts", None)
            if not self.text:  # text teachers: made in build_source, once the run's prompts are known
                pairs = RegressionPairs(teacher, **self._pair_args)
            base_cfg.regression_pairs = 1  # each student gets the shared set below instead of its own
        self.small = c.width_multiplier != 1.0
        students = []
        for _ in range(c.num_students):
            src = teacher
            if self.small:
                src = _StudentTeacher(teacher, smaller_copy(teacher, c.width_multiplier))
            s = base_cls(src, base_cfg)
            if pairs is not None:
                s._regression = pairs  # shared, unfiltered (paper App. B.2)
            if self.small:
                s.teacher = teacher  # the real score is always the real teacher
            students.append(s)
        self.students = nn.ModuleList(students)
        self.classes = None if self.text else [
            [y for y in range(num_classes) if self.route[y] == k] for k in range(c.num_students)]
        if self.text and c.partition_prompts is not None:
            from ..data.sources import PromptSource

            self.partition_text(PromptSource(c.partition_prompts).prompts)
        self._tsm_done = [not self.small or c.tsm_steps == 0] * c.num_students

    # -- text teachers: prompt partition ---------------------------------------------------------
    def partition_text(self, prompts: list[str]) -> dict:
        """Balanced k-means (deterministic, seed 0) over the pooled text embeddings of the distinct
        ``prompts`` (the paper's SD setting); student k trains on the prompts assigned to it.  The
        centroids route unseen prompts at inference (the exported pipeline computes the pooled
        embedding with the stock text encoder)."""
        from ..pipelines.multi_student import pooled_prompt_embeddings

        uniq = sorted(set(str(p) for p in prompts))
        k = self.config.num_students
        if len(uniq) < k:
            raise ValueError(f"MSD needs at least num_students={k} distinct prompts to partition, got {len(uniq)}")
        t = self.teacher
        te = t.text_encoder if getattr(t, "text_encoder", None) is not None else t._text_encoder()
        emb = pooled_prompt_embeddings(t.tokenizer, te, uniq)
        assign = kmeans_partition(emb, k)
        cent = torch.stack([emb[torch.tensor(assign) == j].mean(0) for j in range(k)])
        self.text_route = {"prompts": uniq, "assign": [int(a) for a in assign], "centroids": cent.tolist()}
        self.prompt_groups = [[p for p, a in zip(uniq, assign) if a == j] for j in range(k)]
        return self.text_route

    def _text_partition(self) -> dict:
        if self.text_route is None:
            prompts = getattr(getattr(self, "condition_source", None), "prompts", None)
            if not prompts:
                raise ValueError(NO_PROMPTS_MESSAGE.format(algo=self.name) +
                                 " (or algorithm.params.partition_prompts, the prompts MSD partitions)")
            self.partition_text(prompts)
        return self.text_route

    def route_prompts(self, prompts) -> list[int]:
        """The student of each prompt (the training partition's table, else the nearest centroid)."""
        from ..pipelines.multi_student import route_prompts

        r = self._text_partition()
        t = self.teacher
        te = t.text_encoder if getattr(t, "text_encoder", None) is not None else t._text_encoder()
        return route_prompts(prompts, dict(zip(r["prompts"], r["assign"])), r["centroids"], t.tokenizer, te)

    def build_source(self, train_cfg, rank: int = 0, world: int = 1):
        source = super().build_source(train_cfg, rank, world)
        if self.text and self.text_route is None:
            self._text_partition()
        if self.text and self._pair_args is not None:
            self._share_text_pairs(source)
        return source

    def _share_text_pairs(self, source) -> None:
        """One prompted regression set (the run's prompts, or base_params.regression_prompts; CFG
        real_guidance_scale) shared by every student, unfiltered (paper App. B.2)."""
        if self._regression_prompts is not None:
            from ..data.sources import PromptSource

            source = PromptSource(self._regression_prompts, seed=self._pair_args["seed"])
        pairs = RegressionPairs(self.teacher, **self._pair_args, prompt_source=source)
        for s in self.students:
            s._regression = pairs

    @staticmethod
    def _class_embeddings(teacher, num_classes):
        model = getattr(teacher, "model", None)
        emb = getattr(model, "class_embedding", None) if model is not None else None
        if emb is None:
            emb = getattr(teacher, "means", None)
            if emb is None:
                raise ValueError("partition=kmeans needs class embeddings (UNet class_embedding or mixture means)")
            return emb[:num_classes]
        return emb.weight[:num_classes].detach()

    # -- groups and schedule ------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Module]:
        out = {}
        for k, s in enumerate(self.students):
            for g, m in s.trainable().items():
                out[f"s{k}.{g}"] = m
        return out

    def lr_defaults(self) -> dict[str, float]:
        out = {}
        for k, s in enumerate(self.students):
            for g, v in s.lr_defaults().items():
                out[f"s{k}.{g}"] = v
        return out

    def lr_scale(self, step: int, group: str) -> float:
        k, g = self._split(group)
        if self._in_tsm(step):
            return self.config.tsm_lr / self.students[k].lr_defaults()[g]
        fn = getattr(self.students[k], "lr_scale", None)
        return fn(self._student_step(step), g) if fn else 1.0

    def _split(self, group: str) -> tuple[int, str]:
        head, g = group.split(".", 1)
        return int(head[1:]), g

    def _in_tsm(self, step: int) -> bool:
        return self.small and step < self._tsm_total()

    def _tsm_total(self) -> int:
        per = self.config.tsm_steps
        return per * (self.config.num_students if self.config.schedule == "round_robin" else 1)

    def _active(self, step: int) -> list[int]:
        s = step - (self._tsm_total() if self.small else 0)
        if self.config.schedule == "concurrent":
            return list(range(self.config.num_students))
        return [s % self.config.num_students] if s >= 0 else [step % self.config.num_students]

    def _student_step(self, step: int) -> int:
        s = step - (self._tsm_total() if self.small else 0)
        return s // self.config.num_students if self.config.schedule == "round_robin" else s

    def on_step_begin(self, step: int, is_main: bool) -> None:
        """The first step after teacher score matching starts each fake score from its TSM network."""
        if self.small and not self._in_tsm(step) and not all(self._tsm_done):
            self._finish_tsm()

    def phase(self, step: int) -> list[str]:
        """Groups for ``step`` (pure): the TSM generators, then the active students' base phases."""
        if self._in_tsm(step):
            return [f"s{k}.generator" for k in self._active(step)]
        out = []
        for k in self._active(step):
            out += [f"s{k}.{g}" for g in self.students[k].phase(self._student_step(step))]
        return out

    def _finish_tsm(self) -> None:
        """After TSM the fake score starts from the TSM network too (paper Fig. 3)."""
        for k, s in enumerate(self.students):
            s.critic.load_state_dict(s.generator.denoiser.state_dict())
            self._tsm_done[k] = True

    def generator_for_export(self):
        return [s.generator_for_export() for s in self.students]

    # -- glue: grid and export -------------------------------------------------------------------
    def sample_images(self, n: int, generator=None):
        """The grid with each class routed to its student (one noise draw for the whole grid)."""
        gens = self.generator_for_export()
        raw = self.grid_conditions(n, generator)
        device = self.teacher.sigmas.device
        if self.text:
            return self._sample_text(gens, raw, n, generator, device)
        # seeded CPU noise, moved to the students' device (the same grid on every device)
        z = torch.randn((n, *gens[0].sample_shape), generator=generator, device="cpu").to(device)
        x0 = torch.zeros_like(z)
        with torch.no_grad():
            for k, student in enumerate(gens):
                idx = torch.tensor([i for i in range(n) if self.route[int(raw[i])] == k], dtype=torch.long,
                                   device=device)
                if len(idx):
                    was = student.training
                    student.eval()
                    x0[idx] = student(z[idx], self.teacher.encode_conditions(raw[idx]))
                    student.train(was)
            img = self.teacher.decode(x0)
        return img.clamp(-1, 1) if img.ndim == 4 else img

    def _sample_text(self, gens, raw, n, generator, device):
        if raw is None:
            raw = [self._text_partition()["prompts"][i % len(self.text_route["prompts"])] for i in range(n)]
        raw = list(raw)
        route = self.route_prompts(raw)
        z = torch.randn((n, *gens[0].sample_shape), generator=generator, device="cpu").to(device)
        x0 = torch.zeros_like(z)
        with torch.no_grad():
            for k, student in enumerate(gens):
                rows = [i for i in range(n) if route[i] == k]
                if rows:
                    was = student.training
                    student.eval()
                    idx = torch.tensor(rows, dtype=torch.long, device=device)
                    x0[idx] = student(z[idx], self.teacher.encode_conditions([raw[i] for i in rows]))
                    student.train(was)
            img = self.teacher.decode(x0)
        return img.clamp(-1, 1) if img.ndim == 4 else img

    def export_groups(self) -> list[str]:
        return [f"s{k}.generator" for k in range(len(self.students))]

    def export(self, output_dir, *, ema_state=None, extra=None, overwrite=False, lora="auto"):
        """One multi-student pipeline routing each class to its student (no EMA: MSD has no single
        EMA group).  The multi-student pipelines have no LoRA loader: ``lora`` may be ``"auto"`` or
        ``"fused"`` (LoRA students' adapters are folded into their weights)."""
        from ..export.common import check_lora_mode

        check_lora_mode(lora, has_lora_loader=False, what="an MSD run (a multi-student pipeline)")
        if not self.exportable():
            return None
        from ..export import export_multi_student

        if self.text:
            from ..export.multi_student import export_text_multi_student

            return export_text_multi_student(self.generator_for_export(), self.teacher, self._text_partition(),
                                             output_dir, algorithm=self.name, paper=self.paper, extra=extra,
                                             overwrite=overwrite)
        return export_multi_student(self.generator_for_export(), self.teacher, self.route, output_dir,
                                    algorithm=self.name, paper=self.paper, extra=extra, overwrite=overwrite)

    # -- data filtering ------------------------------------------------------------------------
    def _slice_batch(self, batch: dict, k: int, n: int) -> dict:
        """Conditions drawn uniformly from student k's classes (prompts); real data filtered to them."""
        if self.text:
            self._text_partition()
            group = self.prompt_groups[k]
            idx = torch.randint(0, len(group), (n,), device="cpu").tolist()
            out = {"raw_cond": [group[i] for i in idx], "batch_size": n, "real": None}
            real, caps = batch.get("real"), batch.get("raw_cond")
            if real is not None and caps is not None and not isinstance(caps, torch.Tensor):
                keep = [i for i, r in enumerate(self.route_prompts(list(caps))) if r == k]
                if keep:
                    out["real"] = real[torch.tensor(keep, dtype=torch.long, device=real.device)]
                    out["real_raw_cond"] = [caps[i] for i in keep]
            return out
        classes = torch.tensor(self.classes[k], device="cpu")  # raw conditions are host data
        idx = torch.randint(0, len(classes), (n,), device="cpu")
        out = {"raw_cond": classes[idx], "batch_size": n, "real": None}
        real, labels = batch.get("real"), batch.get("raw_cond")
        if real is not None and labels is not None:
            keep = torch.isin(torch.as_tensor(labels), classes)
            if keep.any():
                out["real"] = real[keep]
                out["real_raw_cond"] = torch.as_tensor(labels)[keep]
        return out

    def loss(self, batch: dict, step: int, group: str, cache: dict) -> LossOutput:
        k, g = self._split(group)
        n = batch_size_of(batch)
        key = f"msd_batch{k}"
        if key not in cache:
            cache[key] = self._slice_batch(batch, k, n)
            cache[f"msd_cache{k}"] = {}
        sb = cache[key]
        if self._in_tsm(step):
            return self._tsm_loss(k, sb)
        out = self.students[k].loss(sb, self._student_step(step), g, cache[f"msd_cache{k}"])
        out.logs = {f"s{k}.{name}": v for name, v in out.logs.items()}
        return out

    def _tsm_loss(self, k: int, sb: dict) -> LossOutput:
        """Teacher score matching: the small denoiser regresses the teacher's x0 on noised inputs."""
        student = self.students[k].generator.denoiser
        x0 = sb.get("real")
        if x0 is None:
            raise ValueError("MSD teacher-score-matching (width_multiplier < 1) noises real images: set train.dataset")
        n = x0.shape[0]
        cond = self.teacher.encode_conditions(sb["real_raw_cond"])
        idx = torch.randint(0, self.teacher.num_train_timesteps, (n,), device=x0.device)
        sigma = self.teacher.sigmas[idx]
        xt = self.teacher.add_noise(x0, sigma)
        with torch.no_grad():
            target = self.teacher.denoise(xt, sigma, cond, guidance_scale=1.0)
        pred = student.denoise_raw(xt, sigma, cond)
        w = denoising_weight(sigma, "edm")
        loss = (append_dims(w, 1) * ((pred - target) ** 2).flatten(1).mean(1)).mean()
        return LossOutput(loss, {f"s{k}.tsm": loss.detach()})

    def state_dict_extra(self) -> dict:
        return {"tsm_done": list(self._tsm_done), "route": self.route, "text_route": self.text_route}

    def load_state_dict_extra(self, state: dict) -> None:
        self._tsm_done = list(state.get("tsm_done", self._tsm_done))
        if self.text and state.get("text_route") is not None:
            r = state["text_route"]
            self.text_route = r
            self.prompt_groups = [[p for p, a in zip(r["prompts"], r["assign"]) if a == j]
                                  for j in range(self.config.num_students)]

