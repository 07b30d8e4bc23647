"""Multi-student (MSD) exports: K class-routed ``UNet2DModel`` or DiT (``Transformer2DModel`` /
``DiTTransformer2DModel``) students in one self-contained ``MultiStudentPipeline`` folder (``multi_student.py`` written in the folder and in ``students/`` by the
pipeline's ``save_pretrained``)."""

from __future__ import annotations

import copy
import operator
from pathlib import Path

import torch
from torch import nn

from .common import (
    ExportError,
    atomic_output_dir,
    check_student,
    fp32,
    frozen_part,
    jsonable,
    lcm_scheduler,
    provenance,
    remote_code_snippet,
    student_card,
    student_network,
    training_timesteps,
    unwrap,
    write_metadata,
)
from .common import teacher_name as _teacher_name

#: the class-conditional student networks MultiStudentPipeline runs
CLASS_STUDENT_KINDS = ("UNet2DModel", "Transformer2DModel", "DiTTransformer2DModel")
_DIT_KINDS = ("Transformer2DModel", "DiTTransformer2DModel")
_KIND_HINT = ("MultiStudentPipeline routes class labels to UNet2DModel or DiT (Transformer2DModel / "
              "DiTTransformer2DModel) students; prompt-routed students go through export_text_multi_student")


def _shared_settings(generators: list, denoisers: list) -> tuple[str, list[int], dict]:
    """Prediction type, timesteps and noise schedule, which all students must share."""
    first = denoisers[0]
    prediction_type, timesteps = first.prediction_type, training_timesteps(generators[0])
    schedule = jsonable(dict(first.scheduler_config))
    for k, (g, d) in enumerate(zip(generators, denoisers)):
        if d.prediction_type != prediction_type:
            raise ExportError(
                f"student {k} predicts {d.prediction_type!r}, student 0 {prediction_type!r}: the students share "
                "one scheduler, so they need the same prediction type"
            )
        ts = training_timesteps(g)
        if ts != timesteps:
            raise ExportError(
                f"student {k} was trained at timesteps {ts}, student 0 at {timesteps}: the students share one "
                "sampling schedule"
            )
        if jsonable(dict(d.scheduler_config)) != schedule:
            raise ExportError(f"student {k} has a different noise schedule (scheduler_config) than student 0")
    return prediction_type, timesteps, schedule


def _num_classes(teacher, first) -> int:
    num_classes = getattr(teacher, "num_classes", None) if teacher is not None else None
    if num_classes is None:
        num_classes = getattr(first, "num_classes", None)
    if num_classes is None:
        raise ExportError(
            "MultiStudentPipeline routes by class label: the teacher / students must be class-conditional "
            "(num_classes is None)"
        )
    return int(num_classes)


def check_route(route, num_classes: int, num_students: int) -> list[int]:
    """``route`` as a list of ints, one student index per class, every student used."""
    if isinstance(route, torch.Tensor):
        route = route.tolist()
    if route is None or isinstance(route, (str, bytes, dict)) or not hasattr(route, "__len__"):
        raise ExportError(f"route must be a list with one student index per class, got {route!r}")
    route = list(route)
    if len(route) != num_classes:
        raise ExportError(
            f"route has {len(route)} entries but the teacher has {num_classes} classes: route[c] must name the "
            f"student for every class c in 0..{num_classes - 1}"
        )
    clean = []
    for c, k in enumerate(route):
        try:
            if isinstance(k, bool):
                raise TypeError
            clean.append(operator.index(k))  # int, numpy / torch integers; not floats or bools
        except TypeError:
            raise ExportError(f"route[{c}] = {k!r} is not a student index (an integer)") from None
    homeless = [c for c, k in enumerate(clean) if not 0 <= k < num_students]
    if homeless:
        raise ExportError(
            f"classes {homeless} have no student: route sends them to {[clean[c] for c in homeless]}, but there "
            f"are {num_students} students (indices 0..{num_students - 1})"
        )
    idle = [k for k in range(num_students) if k not in clean]
    if idle:
        raise ExportError(f"students {idle} serve no class in route {clean}: drop them or fix the route")
    return clean


def _check_shapes(denoisers: list, num_classes: int) -> None:
    shape, kind = None, None
    for k, d in enumerate(denoisers):
        net = unwrap(d.model)
        cfg = net.config
        this_kind = type(net).__name__
        if kind is not None and this_kind != kind:
            raise ExportError(
                f"student {k} is a {this_kind}, student 0 a {kind}: the students of one MultiStudentPipeline "
                "share one network class"
            )
        kind = this_kind
        key = "num_embeds_ada_norm" if kind in _DIT_KINDS else "num_class_embeds"
        embeds = cfg.get(key)
        if not embeds or int(embeds) < num_classes:
            raise ExportError(
                f"student {k} has {key}={embeds}: it cannot embed the {num_classes} class labels"
            )
        out_ch = cfg.get("out_channels") or cfg.in_channels
        if out_ch not in (cfg.in_channels, 2 * cfg.in_channels):
            raise ExportError(
                f"student {k} predicts {out_ch} channels from {cfg.in_channels}: expected in_channels, or twice "
                "that for a learned variance"
            )
        this = (cfg.in_channels, cfg.sample_size)
        if shape is not None and this != shape:
            raise ExportError(
                f"student {k} generates (in_channels, sample_size) = {this}, student 0 {shape}: all students "
                "must generate the same sample shape"
            )
        shape = this


def compact_ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, start, prev = [], None, None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            parts.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = prev = v
    if start is not None:
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
    return ", ".join(parts)


def _size_of(net: nn.Module) -> dict:
    """What makes a student big or small: UNet channel counts, DiT layers x heads x head width."""
    cfg = net.config
    if type(net).__name__ in _DIT_KINDS:
        return {"num_layers": int(cfg.num_layers), "num_attention_heads": int(cfg.num_attention_heads),
                "attention_head_dim": int(cfg.attention_head_dim)}
    return {"block_out_channels": list(cfg.block_out_channels)}


def _routing_note(denoisers: list, route: list[int], classes: list[list[int]]) -> tuple[str, list[dict]]:
    first = _size_of(unwrap(denoisers[0].model))
    rows = [f"| student | classes | {' | '.join(first)} | parameters |", "|---|---|" + "---|" * len(first) + "---|"]
    sizes = []
    for k, d in enumerate(denoisers):
        net = unwrap(d.model)
        n_params = sum(p.numel() for p in net.parameters())
        size = _size_of(net)
        sizes.append({**size, "parameters": int(n_params)})
        rows.append(f"| {k} | {compact_ranges(classes[k])} | {' | '.join(str(v) for v in size.values())} | {n_params:,} |")
    note = "\n".join([
        f"**Routing.** Each class is generated by exactly one of the {len(denoisers)} students "
        "(one network evaluation per image per step); `route[c]` in `model_index.json` is the student "
        "for class `c`:",
        "",
        *rows,
        "",
        f"`route = {route}`",
        "",
        "`multi_student.py` (in this folder and in `students/`) holds the pipeline and the `StudentBank` "
        "container of the students; it needs only diffusers. With stepdistill installed, "
        "`from stepdistill.pipelines.multi_student import MultiStudentPipeline; "
        "MultiStudentPipeline.from_pretrained(folder)` loads it without remote code. By default the "
        "pipeline runs the training-time timesteps; pass a list of generators (one per image) to make "
        "each image's noise independent of the batch composition.",
    ])
    return note, sizes


def _student_nets(generators: list, use_ema_states: list) -> list[nn.Module]:
    nets, seen = [], set()
    for g, state in zip(generators, use_ema_states):
        net = student_network(g, state)
        if id(net) in seen:  # the same network twice: safetensors refuses shared tensors
            net = copy.deepcopy(net)
        seen.add(id(net))
        nets.append(net)
    return nets


def export_multi_student(
    generators: list,
    teacher,
    route: list[int],
    output_dir: str | Path,
    *,
    algorithm: str = "msd",
    paper: str = "",
    metrics: dict | None = None,
    extra: dict | None = None,
    use_ema_states: list | None = None,
    overwrite: bool = False,
    teacher_name: str | None = None,
) -> Path:
    """Write K class-routed students (MSD) as one self-contained ``MultiStudentPipeline`` folder.

    Args:
        generators: the K trained students (:class:`stepdistill.students.Generator`, e.g.
            ``MSD.generator_for_export()``); ``UNet2DModel`` or DiT networks (one class for all) of
            any width, sharing the teacher's noise schedule, parametrisation, training-time
            timesteps and sample shape.
        teacher: the teacher (gives the VAE of latent students and the name in the model card).
        route: ``route[c]`` = index of the student that generates class ``c`` (``MSD.route``); one
            entry per class of the teacher, every entry in ``0..K-1``, every student used.
        output_dir: destination folder (written atomically).
        algorithm, paper, metrics, extra: recorded in the model card and ``stepdistill.json``.
        use_ema_states: ``None`` or a list of K entries, each ``None`` (live weights) or an EMA state
            as accepted by :func:`export_generator`'s ``use_ema_state``.
        overwrite: replace a non-empty existing ``output_dir``.
        teacher_name: how to name the teacher in the card (default: its ``_name_or_path``).

    The folder holds ``model_index.json`` (list-form ``_class_name``, ``route``, ``num_classes``,
    ``timesteps``), ``multi_student.py`` (also in ``students/``), ``students/`` (one ``StudentBank``
    model with all K networks), ``scheduler/`` (``LCMScheduler`` with ``_stepdistill_timesteps``),
    optionally ``vae/``, ``stepdistill.json`` and ``README.md``.  Raises :class:`ExportError` for an
    invalid route or mismatched students, ``NotImplementedError`` for non-exportable students.
    """
    if isinstance(generators, nn.Module) and not isinstance(generators, nn.ModuleList):
        generators = [generators]
    generators = list(generators)
    if not generators:
        raise ExportError("export_multi_student needs at least one student generator")
    k_students = len(generators)
    denoisers = [check_student(g, CLASS_STUDENT_KINDS, f"student {k}: ", _KIND_HINT) for k, g in enumerate(generators)]
    prediction_type, timesteps, schedule = _shared_settings(generators, denoisers)
    num_classes = _num_classes(teacher, denoisers[0])
    student_class = type(unwrap(denoisers[0].model)).__name__
    route = check_route(route, num_classes, k_students)
    classes = [[c for c in range(num_classes) if route[c] == k] for k in range(k_students)]
    use_ema_states = [None] * k_students if use_ema_states is None else list(use_ema_states)
    if len(use_ema_states) != k_students:
        raise ExportError(f"use_ema_states has {len(use_ema_states)} entries for {k_students} students")
    _check_shapes(denoisers, num_classes)

    out = Path(output_dir).expanduser().absolute()
    labels = list(range(min(num_classes, 4)))
    snippet = remote_code_snippet(
        out, f"images = pipe(class_labels={labels}, generator=torch.Generator().manual_seed(0)).images"
    )
    note, sizes = _routing_note(denoisers, route, classes)
    meta = {
        "format": 1, "algorithm": algorithm, "paper": paper,
        "teacher": _teacher_name(teacher, generators[0], teacher_name, extra),
        "pipeline": "MultiStudentPipeline", "student_class": student_class,
        "num_students": k_students, "route": route, "classes": classes, "students": sizes,
        "timesteps": timesteps, "timestep_indices": [int(t) for t in generators[0].timesteps],
        "prediction_type": prediction_type, "num_classes": num_classes,
        "sample_shape": list(getattr(generators[0], "sample_shape", ()) or ()),
        "ema": [s is not None for s in use_ema_states],
        "scheduler": "LCMScheduler", "teacher_scheduler_config": schedule,
        **provenance(metrics, extra, snippet),
    }
    return _write(out, overwrite, generators, use_ema_states, denoisers[0], meta, student_card(meta, snippet, [note]),
                  frozen_part(teacher, generators[0], "vae"))


def _write(out, overwrite, generators, use_ema_states, first, meta, card, vae) -> Path:
    from stepdistill.pipelines.multi_student import MultiStudentPipeline, StudentBank

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        pipe = MultiStudentPipeline(
            students=StudentBank.from_unets(_student_nets(generators, use_ema_states)),
            scheduler=lcm_scheduler(first.scheduler_config, meta["prediction_type"], meta["timesteps"]),
            vae=fp32(vae),
            route=meta["route"],
            timesteps=meta["timesteps"],
            num_classes=meta["num_classes"],
        )
        pipe.save_pretrained(tmp, safe_serialization=True)  # also writes multi_student.py (root + students/)
        write_metadata(tmp, meta, card)
    return out


def export_text_multi_student(
    generators: list,
    teacher,
    text_route: dict,
    output_dir: str | Path,
    *,
    algorithm: str = "msd",
    paper: str = "",
    metrics: dict | None = None,
    extra: dict | None = None,
    overwrite: bool = False,
    teacher_name: str | None = None,
) -> Path:
    """Write K prompt-routed ``UNet2DConditionModel`` students (MSD on an SD-layout text teacher) as one
    self-contained ``TextMultiStudentPipeline`` folder (loads with ``DiffusionPipeline.from_pretrained(
    folder, trust_remote_code=True)``, the caller's explicit opt-in to run that file).

    ``text_route`` is ``MSD.text_route``: ``{"prompts", "assign", "centroids"}`` -- the training
    partition (prompt -> student) and the K centres of the pooled text embeddings that route any
    other prompt (the stock text encoder in the folder computes the pooled embedding at inference).
    One text encoder (SD 1.x/2.x layout) only: SDXL / SD3 / FLUX students are refused by name.
    """
    from stepdistill.pipelines.multi_student import StudentBank, TextMultiStudentPipeline

    generators = list(generators)
    if not generators:
        raise ExportError("export_text_multi_student needs at least one student generator")
    k_students = len(generators)
    hint = "TextMultiStudentPipeline routes prompts to UNet2DConditionModel students of an SD-layout (one text encoder) teacher"
    denoisers = [check_student(g, ("UNet2DConditionModel",), f"student {k}: ", hint) for k, g in enumerate(generators)]
    for part in ("text_encoder_2", "text_encoder_3"):
        if frozen_part(teacher, generators[0], part) is not None:
            raise ExportError(f"the teacher has {part}: {hint}")
    prediction_type, timesteps, schedule = _shared_settings(generators, denoisers)
    cents = [list(map(float, c)) for c in text_route["centroids"]]
    if len(cents) != k_students:
        raise ExportError(f"text_route has {len(cents)} centroids for {k_students} students")
    assign = [int(a) for a in text_route["assign"]]
    idle = [k for k in range(k_students) if k not in assign]
    if idle:
        raise ExportError(f"students {idle} serve no prompt of the partition")
    text_encoder = frozen_part(teacher, generators[0], "text_encoder")
    tokenizer = frozen_part(teacher, generators[0], "tokenizer")
    if text_encoder is None or tokenizer is None:
        raise ExportError("a prompt-routed export needs the teacher's text_encoder and tokenizer")
    out = Path(output_dir).expanduser().absolute()
    prompts = list(text_route["prompts"])
    snippet = remote_code_snippet(
        out, f"images = pipe({prompts[:2]!r}, generator=torch.Generator().manual_seed(0)).images"
    )
    sizes = [{"prompts": assign.count(k)} for k in range(k_students)]
    note = "\n".join([
        f"**Routing.** Each prompt is generated by exactly one of the {k_students} students: the prompts the "
        "students were trained on by their balanced k-means assignment over pooled text embeddings "
        "(`route_prompts` / `route_students` in `model_index.json`), any other prompt by the nearest of the "
        "`centroids` of its pooled embedding (the text encoder's `pooler_output`).",
        "",
        "| student | training prompts |", "|---|---|",
        *[f"| {k} | {s['prompts']} |" for k, s in enumerate(sizes)],
    ])
    meta = {
        "format": 1, "algorithm": algorithm, "paper": paper,
        "teacher": _teacher_name(teacher, generators[0], teacher_name, extra),
        "pipeline": "TextMultiStudentPipeline", "student_class": "UNet2DConditionModel",
        "num_students": k_students, "route": "prompt: table, else nearest pooled-embedding centroid",
        "students": sizes, "timesteps": timesteps, "timestep_indices": [int(t) for t in generators[0].timesteps],
        "prediction_type": prediction_type, "sample_shape": list(getattr(generators[0], "sample_shape", ()) or ()),
        "scheduler": "LCMScheduler", "teacher_scheduler_config": schedule,
        **provenance(metrics, extra, snippet),
    }
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        pipe = TextMultiStudentPipeline(
            students=StudentBank.from_unets(_student_nets(generators, [None] * k_students)),
            scheduler=lcm_scheduler(denoisers[0].scheduler_config, prediction_type, timesteps),
            text_encoder=fp32(text_encoder), tokenizer=tokenizer, vae=fp32(frozen_part(teacher, generators[0], "vae")),
            route_prompts=prompts, route_students=assign, centroids=cents, timesteps=timesteps,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_metadata(tmp, meta, student_card(meta, snippet, [note]))
    return out
