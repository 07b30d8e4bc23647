"""Export trained students (and the embedded teacher) as diffusers pipeline folders.

What gets written (see DESIGN.md §3 "Export"):

* A ``UNet2DConditionModel`` student of a Stable-Diffusion-layout teacher (text encoder + tokenizer
  + VAE) becomes a **stock** ``StableDiffusionPipeline`` whose scheduler is an ``LCMScheduler``
  built from the teacher's noise schedule; no custom code is involved::

      pipe = StableDiffusionPipeline.from_pretrained(folder)
      pipe(prompt, num_inference_steps=1, timesteps=[899], guidance_scale=0.0)

* SDXL students -> stock ``StableDiffusionXLPipeline`` + ``LCMScheduler`` (1-step at 399 from pure
  noise: ``timesteps=[399]``; 4-step ``[999, 749, 499, 249]`` is LCM's default); SD3 / FLUX.1 students
  -> stock ``StableDiffusion3Pipeline`` / ``FluxPipeline`` + ``FlowMatchEulerDiscreteScheduler``
  (``shift=1``, no dynamic shifting, ``stochastic_sampling``) called with the student's flow times as
  ``sigmas=``; class-conditional DiT students with a VAE -> stock ``DiTPipeline`` + ``LCMScheduler``
  where LCM's default schedule is the student's (see :mod:`.text_to_image`, :mod:`.class_conditional`).
  Every folder's ``stepdistill.json`` records the exact stock call as ``pipeline_call``.

* LoRA students (peft adapters) of those text-to-image families -> the fused stock pipeline plus
  ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(folder)`` on the stock teacher
  pipeline (``lora="adapter"`` / ``"fused"`` for one of the two; :mod:`.lora`, ``docs/lora.md``).

* A class-conditional pixel-space ``UNet2DModel`` student (no VAE) whose timesteps are
  ``LCMScheduler``'s default schedule for its number of steps (``[999]``, ``[999, 749, 499, 249]``)
  becomes a **stock** ``ConsistencyModelPipeline`` with an ``LCMScheduler``, which runs exactly the
  training-time generator; no custom code is involved::

      pipe = DiffusionPipeline.from_pretrained(folder)
      pipe(batch_size=4, class_labels=[0, 1, 2, 3], num_inference_steps=len(timesteps))

* Any other ``UNet2DModel`` student (latent space with the teacher's VAE, other timesteps such as
  ``[899]``, unconditional, or ``stock_pipeline=False``) becomes the package's ``OneStepPipeline``;
  ``one_step.py`` is written into the folder and ``model_index.json``
  names the class in list form ``["one_step", "OneStepPipeline"]``, so that
  ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` works with only diffusers
  installed (and ``custom_pipeline=folder/one_step.py`` / ``OneStepPipeline.from_pretrained``).

* ``export_teacher_pipeline`` writes a class-conditional teacher UNet as a ``ClassConditionalPipeline``
  folder the same self-contained way, with ``num_classes`` a top-level key of ``model_index.json``.

* ``export_multi_student`` (MSD: K class-routed students -> ``MultiStudentPipeline``),
  ``export_ar_teacher_pipeline`` (VQ + causal LM -> ``ARImagePipeline``) and ``export_dd_pipeline``
  (Distilled Decoding -> ``DistilledDecodingPipeline``) write self-contained folders too.

Layout of this package (one module per output kind)::

    common.py             atomic folders, EMA loading, adapter folding, the LCM scheduler,
                          provenance metadata and the one model-card builder
    text_to_image.py      text-to-image students (SD, SDXL, SD3, FLUX.1) -> their stock pipelines
    lora.py               LoRA weights of LoRA students, checked LoRA loading, fusing a user's LoRA
    class_conditional.py  UNet2DModel students -> stock ConsistencyModelPipeline or OneStepPipeline;
                          DiT students -> stock DiTPipeline;
                          class-conditional teachers -> ClassConditionalPipeline
    multi_student.py      MSD students -> MultiStudentPipeline
    autoregressive.py     AR teachers -> ARImagePipeline; DD students -> DistilledDecodingPipeline

The self-contained pipeline files are written into the folder once, by the pipeline class's own
``save_pretrained`` (byte-identical to the installed file, which ``stepdistill.eval`` checks before
it runs a folder's code).

Where the training-time timesteps are recorded:

* ``OneStepPipeline`` folders: ``model_index.json`` ``"timesteps"`` (a pipeline ``__init__``
  argument, the default sampling schedule) and ``"num_classes"``;
* every student folder: ``scheduler/scheduler_config.json`` ``"_stepdistill_timesteps"`` (stock
  ``ConsistencyModelPipeline`` folders also ``"_stepdistill_num_classes"``: their UNet's
  ``num_class_embeds`` counts the null class).  The
  leading underscore matters: diffusers (0.42.1) silently keeps unknown ``_``-keys in a loaded
  scheduler's config (also through ``from_config`` into other scheduler classes), whereas a plain
  unknown key triggers "The config attributes ... are not expected and will be ignored" on every
  load.  Stock ``StableDiffusionPipeline`` folders also get ``"_stepdistill_timesteps"`` in
  ``model_index.json`` (likewise ignored silently by the loader);
* ``stepdistill.json`` (full metadata) and the model card ``README.md`` (exact call).

Scheduler settings: ``clip_sample=False`` and ``thresholding=False`` (the training-time generator
neither clips nor thresholds x0), and ``original_inference_steps = num_train_timesteps`` so every
integer timestep lies on LCM's "training schedule" (no warning for e.g. 749) and LCM's default
``num_inference_steps=k`` schedule is evenly spaced from ``T-1`` (4 steps: 999, 749, 499, 249).

Every folder is written atomically: it is built in ``<output_dir>.tmp-<pid>`` and moved into place
with ``os.replace``; an existing non-empty ``output_dir`` is refused unless ``overwrite=True``.
"""

from __future__ import annotations

from pathlib import Path

from .autoregressive import export_ar_teacher_pipeline, export_dd_pipeline
from .class_conditional import (
    DIT_KINDS,
    export_consistency_student,
    export_dit_student,
    export_one_step_student,
    export_teacher_pipeline,
    stock_pipeline_reproduces,
)
from .common import (
    LCM_PREDICTION_TYPES,
    METADATA_FILE,
    SCHEDULER_TIMESTEPS_KEY,
    SUPPORTED,
    ExportError,
    ExportModeError,
    atomic_output_dir,
    check_lora_mode,
    check_student,
    unwrap,
)
from .lora import check_lora_keys, fuse_lora_into_pipeline, load_lora
from .multi_student import export_multi_student
from .text_to_image import LORA_MODES, export_sd_student, export_text_student, text_family  # noqa: F401

__all__ = [
    "ExportError",
    "ExportModeError",
    "LORA_MODES",
    "check_lora_mode",
    "atomic_output_dir",
    "export_generator",
    "export_teacher_pipeline",
    "export_multi_student",
    "export_ar_teacher_pipeline",
    "export_dd_pipeline",
    "SCHEDULER_TIMESTEPS_KEY",
    "METADATA_FILE",
    "LCM_PREDICTION_TYPES",
    "SUPPORTED",
    "check_lora_keys",
    "load_lora",
    "fuse_lora_into_pipeline",
    "export_sd_student",
]


def export_generator(
    generator,
    teacher,
    output_dir: str | Path,
    *,
    algorithm: str,
    paper: str = "",
    metrics: dict | None = None,
    extra: dict | None = None,
    use_ema_state: dict | None = None,
    overwrite: bool = False,
    teacher_name: str | None = None,
    stock_pipeline: bool = True,
    lora: str = "auto",
) -> Path:
    """Write ``generator`` (a :class:`stepdistill.students.Generator`) as a diffusers folder.

    Args:
        generator: the trained student; its network is ``generator.denoiser.model``, its
            training-time timesteps ``generator.timesteps`` and its parametrisation
            ``generator.denoiser.prediction_type``.
        teacher: the teacher it was distilled from (gives text encoders / tokenizers / VAE and the
            name in the model card).
        output_dir: destination folder (written atomically).
        algorithm, paper, metrics, extra: recorded in the model card and ``stepdistill.json``.
        use_ema_state: EMA weights to export instead of the live ones: a state dict of the network
            (keys may carry a ``denoiser.model.`` prefix) or a diffusers ``EMAModel.state_dict()``.
        overwrite: replace a non-empty existing ``output_dir``.
        teacher_name: how to name the teacher in the card (default: its ``_name_or_path``); a LoRA
            folder's snippet loads the teacher pipeline from it.
        stock_pipeline: write a stock ``ConsistencyModelPipeline`` + ``LCMScheduler`` folder (no
            custom code) for class-conditional pixel ``UNet2DModel`` students whose timesteps are
            LCM's default schedule (it reproduces them exactly); ``False``: always the package's
            self-contained ``OneStepPipeline`` for ``UNet2DModel`` students.
        lora: LoRA students (peft adapters) of text-to-image teachers: ``"auto"`` = ``"both"``: the full
            stock pipeline with the adapter fused in *and* ``pytorch_lora_weights.safetensors`` for
            ``pipe.load_lora_weights(folder)`` on the stock teacher pipeline (with the folder's
            scheduler swapped in); ``"adapter"``: only the LoRA weights, scheduler and card;
            ``"fused"``: only the full pipeline.  Other students' adapters are always fused (their
            pipelines have no LoRA loader).

    Returns the folder.  Raises ``NotImplementedError`` for students that cannot be exported
    (see :data:`SUPPORTED`).
    """
    denoiser = check_student(generator)
    out = Path(output_dir).expanduser().absolute()
    check_lora_mode(lora)
    kwargs = dict(algorithm=algorithm, paper=paper, metrics=metrics, extra=extra, use_ema_state=use_ema_state,
                  overwrite=overwrite)
    if text_family(denoiser.model) is not None:
        return export_text_student(generator, teacher, out, teacher_name_=teacher_name, lora=lora, **kwargs)
    check_lora_mode(lora, has_lora_loader=False, what=f"a {type(unwrap(denoiser.model)).__name__} student")
    if type(unwrap(denoiser.model)).__name__ in DIT_KINDS:
        return export_dit_student(generator, teacher, out, teacher_name=teacher_name, **kwargs)
    if stock_pipeline and stock_pipeline_reproduces(generator, teacher):
        return export_consistency_student(generator, teacher, out, teacher_name=teacher_name, **kwargs)
    return export_one_step_student(generator, teacher, out, teacher_name=teacher_name, **kwargs)
