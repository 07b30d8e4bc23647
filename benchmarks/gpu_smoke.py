"""GPU smoke test: every algorithm for a few steps on tiny random teachers, through the real trainer.

Each case builds a tiny random-weight teacher folder (nothing is downloaded), then runs
``stepdistill.run.run_distillation`` on it -- the same path as ``stepdistill train``: teacher loaded by
``teacher.kind``/``teacher.path``, the accelerator moves the task to its device, mixed precision,
clipping, the sample grid, the final checkpoint and (unless ``--no-export``) the export -- for
``--steps`` steps.  On CUDA the frozen teacher is in bfloat16 and training runs under bf16 autocast;
on CPU both default to float32 (``--precision`` changes either).

Cases (teacher families as the package supports them):

* ``dmd2-sd`` / ``dmd2-sdxl`` / ``dmd2-sd3`` / ``dmd2-flux`` / ``dmd2-dit``: DMD2 with CFG on a
  Stable-Diffusion ``UNet2DConditionModel``, SDXL (two text encoders, pooled embeddings, time ids),
  SD3 and FLUX.1-dev (flow-matching transformers; FLUX's guidance embedding) and a class-conditional
  DiT (``Transformer2DModel`` + VAE);
* ``dmd2-pixel-gan``: DMD2 with the GAN head and the regression stage (teacher-generated pairs) on a
  digits-shaped class-conditional pixel ``UNet2DModel`` with the digits data;
* ``dmd2-sd-lora`` / ``dmd2-sd-offload``: a LoRA generator; the frozen text encoder / VAE offloaded
  to host memory (``teacher.params.offload_frozen``);
* ``vsd-sd`` (LoRA critic), ``vsd-sd3``, ``disback-sd`` (over DMD2), ``boot-sd``, ``msd-dit``
  (2 students over DMD2), ``distilled_decoding-ar`` (a VQ + Llama AR teacher).

Per row: ``step_seconds`` (median wall time of the steps after the first, CUDA synchronised;
``first_step_seconds`` separately, it includes lazy initialisation and the regression / pair
generation stages), ``peak_memory_bytes`` (CUDA: ``torch.cuda.max_memory_allocated`` over the whole
case, reset before it, minus what was allocated when it started; CPU: the peak RSS (Linux
``VmHWM``) above the RSS at the case's start, each case in a fresh process by default
(``--no-isolate``: all in one, where the allocator's reuse of freed memory makes later cases read
low)), ``ok`` and, for a failed case, the error (``traceback_lines``: its last lines, a list so that
``make_tables.py`` leaves it out of the table) (the other cases still run; the exit
status is 1 when any failed).

Rows go to ``benchmarks/results/gpu_smoke.json`` on CUDA and ``gpu_smoke_cpu.json`` on CPU
(DESIGN.md section 8; ``--output`` elsewhere).  Reproduce with::

    python benchmarks/gpu_smoke.py --device cuda            # ~1 minute of training on one GPU
    python benchmarks/gpu_smoke.py --device cpu --steps 2
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from common import git_commit, proc_status_bytes, reset_peak_rss  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARK = "gpu_smoke"
PROMPTS = ["a red cat", "a blue dog on grass", "a green bird", "a cat on a mat", "two dogs", "a yellow boat",
           "a small house", "a tree at night"]

# -------------------------------------------------------------------------------------------------
# tiny teacher folders (random weights, built in memory and saved with save_pretrained)


def _seed(s: int) -> None:
    import torch

    torch.manual_seed(s)


def _clip(hidden: int, tokenizer, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(**kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=4, sample_size=16, layers_per_block=1, **kw).eval()


def _t5(d_model: int):
    """A T5 encoder and a unigram tokenizer over the lower-case letters (built by code)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tk = Tokenizer(models.Unigram(pieces, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    enc = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=d_model, d_ff=37, d_kv=8, num_layers=2,
                                  num_heads=4, decoder_start_token_id=0)).eval()
    return enc, tok


def build_sd(tmp: Path) -> Path:
    from stepdistill.testing import tiny_sd_pipeline_folder

    return tiny_sd_pipeline_folder(tmp, name="sd")


def build_sdxl(tmp: Path) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from stepdistill.testing import tiny_clip_tokenizer

    _seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 24,  # 6 time ids x 8 + the pooled embedding
        cross_attention_dim=32 + 40,  # the two encoders' hidden sizes, concatenated
    )
    tok = tiny_clip_tokenizer(tmp / "sdxl-tok")
    pipe = StableDiffusionXLPipeline(
        unet=unet, text_encoder=_clip(32, tok), text_encoder_2=_clip(40, tok, projection=24), tokenizer=tok,
        tokenizer_2=tok, vae=_vae(),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1))
    pipe.save_pretrained(tmp / "sdxl")
    return tmp / "sdxl"


def build_sd3(tmp: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from stepdistill.testing import tiny_clip_tokenizer

    _seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=80, pooled_projection_dim=32 + 24, out_channels=4)
    tok = tiny_clip_tokenizer(tmp / "sd3-tok")
    t5, t5_tok = _t5(80)
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.1, scaling_factor=1.5), text_encoder=_clip(32, tok, projection=32), tokenizer=tok,
        text_encoder_2=_clip(40, tok, projection=24), tokenizer_2=tok, text_encoder_3=t5, tokenizer_3=t5_tok,
    ).save_pretrained(tmp / "sd3")
    return tmp / "sd3"


def build_flux(tmp: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from stepdistill.testing import tiny_clip_tokenizer

    _seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    tok = tiny_clip_tokenizer(tmp / "flux-tok")
    t5, t5_tok = _t5(32)
    FluxPipeline(
        transformer=transformer, vae=_vae(shift_factor=0.1, scaling_factor=1.5), text_encoder=_clip(32, tok),
        tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5_tok,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                  max_image_seq_len=4096, base_shift=0.5, max_shift=1.15),
    ).save_pretrained(tmp / "flux")
    return tmp / "flux"


def build_dit(tmp: Path) -> Path:
    from diffusers import DDPMScheduler, DiTPipeline, Transformer2DModel

    _seed(0)
    transformer = Transformer2DModel(norm_type="ada_norm_zero", num_embeds_ada_norm=10, patch_size=2, sample_size=8,
                                     in_channels=4, out_channels=8, num_layers=1, attention_head_dim=8,
                                     num_attention_heads=2)
    DiTPipeline(transformer=transformer, vae=_vae(), scheduler=DDPMScheduler()).save_pretrained(tmp / "dit")
    return tmp / "dit"


def build_pixel(tmp: Path) -> Path:
    """A digits-shaped (1x8x8, 10 classes + null) pixel ``UNet2DModel`` folder, v-prediction."""
    import diffusers
    from diffusers import DDPMScheduler

    from stepdistill.testing import tiny_unet2d

    out = tmp / "pixel"
    tiny_unet2d(num_classes=10, channels=1, sample_size=8).save_pretrained(out / "unet")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__, "num_classes": 10,
        "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    return out


def build_ar(tmp: Path) -> Path:
    from stepdistill.export import export_ar_teacher_pipeline
    from stepdistill.teachers.autoregressive import ARTeacher, LMSpec, VQSpec, build_transformer, build_vqvae

    vq_spec = VQSpec(block_out_channels=[8, 8], latent_channels=4, vq_embed_dim=2, num_vq_embeddings=8,
                     norm_num_groups=4)
    _seed(0)
    vq = build_vqvae(vq_spec)
    lm = build_transformer(LMSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                           vq_spec.num_vq_embeddings, 10, 16)
    teacher = ARTeacher(vq, lm, num_classes=10, guidance_scale=1.5, top_k=6).eval().requires_grad_(False)
    return export_ar_teacher_pipeline(teacher, tmp / "ar", overwrite=True)


TEACHERS = {"sd": build_sd, "sdxl": build_sdxl, "sd3": build_sd3, "flux": build_flux, "dit": build_dit,
            "pixel": build_pixel, "ar": build_ar}

# -------------------------------------------------------------------------------------------------
# cases: name -> (registry name, teacher, teacher section, algorithm params, train extras, export?)

TEXT = {"kind": "diffusers", "guidance_scale": 3.0}
CLASS = {"kind": "diffusers", "guidance_scale": 2.0}
CASES: dict[str, tuple[str, str, dict, dict, dict, bool]] = {
    "dmd2-sd": ("dmd2", "sd", TEXT, {"generator_timesteps": [899], "update_ratio": 1, "real_guidance_scale": 3.0},
                {}, True),
    "dmd2-sd-lora": ("dmd2", "sd", TEXT, {"generator_timesteps": [899], "update_ratio": 1,
                                          "generator_lora": {"rank": 4}}, {}, True),
    "dmd2-sd-offload": ("dmd2", "sd", {**TEXT, "params": {"offload_frozen": True}},
                        {"generator_timesteps": [899], "update_ratio": 1}, {}, True),
    "dmd2-sdxl": ("dmd2", "sdxl", {**TEXT, "guidance_scale": 5.0},
                  {"generator_timesteps": [399], "update_ratio": 1, "real_guidance_scale": 5.0}, {}, True),
    "dmd2-sd3": ("dmd2", "sd3", TEXT, {"generator_timesteps": [999], "update_ratio": 1}, {}, True),
    "dmd2-flux": ("dmd2", "flux", {**TEXT, "guidance_scale": 3.5, "params": {"sample_shape": [4, 8, 8]}},
                  {"generator_timesteps": [999], "update_ratio": 1}, {}, True),
    "dmd2-dit": ("dmd2", "dit", CLASS, {"generator_timesteps": [749], "update_ratio": 1}, {}, True),
    "dmd2-pixel-gan": ("dmd2", "pixel", CLASS,
                       {"generator_timesteps": [999], "update_ratio": 1, "gan_weight_g": 1e-3, "regression_steps": 1,
                        "regression_pairs": 4, "regression_sampler_steps": 2}, {"dataset": "digits"}, True),
    "vsd-sd": ("vsd", "sd", TEXT, {"critic": "lora", "lora_rank": 2, "generator_timesteps": [899]}, {}, True),
    "vsd-sd3": ("vsd", "sd3", TEXT, {"critic": "full", "generator_timesteps": [999]}, {}, True),
    "disback-sd": ("disback", "sd", TEXT, {"base_params": {"generator_timesteps": [899], "update_ratio": 1},
                                           "recording_steps": 1, "num_nodes": 1}, {}, True),
    "boot-sd": ("boot", "sd", TEXT, {}, {}, True),
    "msd-dit": ("msd", "dit", CLASS, {"num_students": 2, "base_params": {"generator_timesteps": [749],
                                                                         "update_ratio": 1}}, {}, True),
    "distilled_decoding-ar": ("dd", "ar", {"kind": "ar"},
                              {"num_pairs": 8, "shard_size": 4, "flow_steps": 4, "split_points": [0, 8]}, {}, True),
}
#: ``--only`` names (the registry's, plus the long name of Distilled Decoding)
ALIASES = {"distilled_decoding": "dd"}

# -------------------------------------------------------------------------------------------------
# measurement




class Memory:
    """Peak memory of one case: CUDA allocator peak, or peak RSS above the case's start on CPU."""

    def __init__(self, device: str):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device == "cuda" else "peak_rss_above_start"

    def start(self) -> None:
        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()  # what earlier cases left (0 in a fresh process)
        else:
            self.peak_reset = reset_peak_rss()  # VmHWM := VmRSS (False: the peak counts from process start)
            self.base = proc_status_bytes("VmRSS")

    def peak(self) -> dict:
        import torch

        if self.device == "cuda":
            return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated() - self.base),
                    "allocated_at_start_bytes": int(self.base),
                    "peak_reserved_bytes": int(torch.cuda.max_memory_reserved())}
        return {"peak_memory_bytes": max(0, proc_status_bytes("VmHWM") - self.base), "peak_reset": self.peak_reset}


@contextlib.contextmanager
def step_timer(device: str, times: list[float]):
    """Time every ``Trainer.train_step`` (CUDA synchronised before and after)."""
    import torch

    from stepdistill.training.loop import Trainer

    orig = Trainer.train_step

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(self, *a, **k):
        sync()
        t0 = time.perf_counter()
        out = orig(self, *a, **k)
        sync()
        times.append(time.perf_counter() - t0)
        return out

    Trainer.train_step = timed
    try:
        yield
    finally:
        Trainer.train_step = orig


def run_case(name: str, folder: Path, tmp: Path, args, mem: Memory) -> dict:
    from stepdistill.config import load_config
    from stepdistill.run import run_distillation

    algo, _, tsec, params, train_extra, export = CASES[name]
    params = dict(params)
    if algo == "disback":
        params["nodes_dir"] = str(tmp / name / "nodes")
    if algo == "dd":
        params["pairs_dir"] = str(tmp / name / "pairs")
    tsec = {**tsec, "path": str(folder), "dtype": args.teacher_dtype}
    train = {"output_dir": str(tmp / name / "run"), "max_steps": args.steps, "batch_size": args.batch,
             "mixed_precision": args.precision, "checkpoint_every_steps": 10**6, "sample_every_steps": 0,
             "num_sample_images": 2, "report_to": None, "progress": False, "log_every_steps": 1, "seed": 0,
             "resume": None, **train_extra}
    if tsec["kind"] != "ar" and tsec.get("guidance_scale") and "dataset" not in train:
        prompts = tmp / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        if folder.name in ("sd", "sdxl", "sd3", "flux"):
            train["dataset"] = f"prompts:{prompts}"
    cfg = load_config({"teacher": tsec, "algorithm": {"name": algo, "params": params}, "train": train})
    times: list[float] = []
    mem.start()
    t0 = time.perf_counter()
    with step_timer(args.device, times):
        result = run_distillation(cfg, export=export and not args.no_export)
    total = time.perf_counter() - t0
    d = result["distiller"]
    trainable = sum(p.numel() for m in d.trainable().values() for p in m.parameters() if p.requires_grad)
    logs = {k: round(float(v), 6) for k, v in (result.get("logs") or {}).items() if isinstance(v, (int, float))}
    row = {"steps_run": int(result["step"]), "first_step_seconds": round(times[0], 4) if times else None,
           "step_seconds": round(statistics.median(times[1:]), 4) if len(times) > 1 else None,
           "case_seconds": round(total, 2), "trainable_params": int(trainable),
           "exported": bool(result.get("pipeline")), **mem.peak(), "memory_kind": mem.kind,
           "final_logs": logs}
    del result, d
    return row


def one_case(name: str, args, tmp: Path, folders: dict[str, Path], mem: Memory) -> dict:
    """The measured fields of one case; a failure becomes ``ok: false`` with the error."""
    family = CASES[name][1]
    try:
        if family not in folders:
            folders[family] = TEACHERS[family](tmp / "teachers")
        return {"ok": True, "error": None, **run_case(name, folders[family], tmp, args, mem)}
    except Exception as e:  # one broken case must not hide the others
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[-2000:],
                "traceback_lines": traceback.format_exc().splitlines()[-12:]}
    finally:
        gc.collect()


def isolated_case(name: str, argv: list[str]) -> dict:
    """Run one case in a fresh process (``--child``): its peak RSS is its own."""
    cmd = [sys.executable, __file__, *argv, "--child", name]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"ok": False, "error": f"child process exited with {res.returncode}",
                "traceback_lines": res.stderr.splitlines()[-30:]}
    return json.loads(lines[-1])


def _cli(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if _cuda() else "cpu")
    ap.add_argument("--steps", type=int, default=3, help="training steps per case (the first is timed apart)")
    ap.add_argument("--batch", type=int, default=2, help="per-process batch size")
    ap.add_argument("--only", nargs="*", default=None, metavar="ALGO",
                    help=f"algorithms to run ({', '.join(sorted({c[0] for c in CASES.values()} | set(ALIASES)))})")
    ap.add_argument("--case", action="append", default=None, choices=sorted(CASES), help="cases to run (repeatable)")
    ap.add_argument("--precision", default=None, choices=["no", "bf16", "fp16"],
                    help="train.mixed_precision (default: bf16 on CUDA, no on CPU)")
    ap.add_argument("--teacher-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="the frozen teacher's dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--no-export", action="store_true", help="skip the export after training")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="each case in a fresh process (default: on CPU, where peak RSS is per process; on CUDA "
                         "the allocator's peak is reset per case and one process is used)")
    ap.add_argument("--output", default=None, help="results file (default: benchmarks/results/gpu_smoke[_cpu].json)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main() -> int:
    args = _cli()
    if args.device == "cuda" and not _cuda():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine (use --device cpu)")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # the accelerator picks the CPU even on a GPU machine
    cuda = args.device == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "no")
    args.teacher_dtype = args.teacher_dtype or ("bfloat16" if cuda else "float32")
    isolate = (not cuda) if args.isolate is None else args.isolate
    if args.child:
        with tempfile.TemporaryDirectory() as tmp_name:
            os.environ["STEPDISTILL_CACHE"] = str(Path(tmp_name) / "cache")
            print(json.dumps(one_case(args.child, args, Path(tmp_name), {}, Memory(args.device))))
        return 0
    only = None if args.only is None else {ALIASES.get(a, a) for a in args.only}
    names = args.case or [n for n, c in CASES.items() if only is None or c[0] in only]
    unknown = sorted(set(only or ()) - {c[0] for c in CASES.values()})
    if unknown or not names:
        raise SystemExit(f"no case for --only {' '.join(unknown or args.only or [])}")

    import diffusers
    import torch

    command = "python benchmarks/gpu_smoke.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    meta = {"benchmark": BENCHMARK, "command": command.strip(), "commit": git_commit(dirty_paths=("stepdistill",)),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": args.device,
            "device_name": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "mixed_precision": args.precision,
            "teacher_dtype": args.teacher_dtype, "steps": args.steps, "batch": args.batch,
            "isolated": isolate, "torch_threads": torch.get_num_threads()}
    child_argv = ["--device", args.device, "--steps", str(args.steps), "--batch", str(args.batch), "--precision",
                  args.precision, "--teacher-dtype", args.teacher_dtype] + (["--no-export"] if args.no_export else [])
    mem = Memory(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ["STEPDISTILL_CACHE"] = str(tmp / "cache")  # regression pairs etc. made fresh, not reused
        folders: dict[str, Path] = {}
        for name in names:
            algo, family = CASES[name][:2]
            res = isolated_case(name, child_argv) if isolate else one_case(name, args, tmp, folders, mem)
            row = {**meta, "case": name, "algorithm": algo, "teacher": family, **res}
            rows.append(row)
            if row["ok"]:
                step = row["step_seconds"] if row["step_seconds"] is not None else row["first_step_seconds"]
                print(f"{name:>22}: ok  step {step:.3f} s (first {row['first_step_seconds']:.3f} s)  "
                      f"peak {row['peak_memory_bytes'] / 2**20:8.1f} MiB  ({row['case_seconds']:.1f} s)", flush=True)
            else:
                print(f"{name:>22}: FAILED  {row['error'][:300]}", flush=True)
    out = Path(args.output) if args.output else RESULTS / ("gpu_smoke.json" if cuda else "gpu_smoke_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".json.tmp")
    part.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(part, out)
    failed = [r["case"] for r in rows if not r["ok"]]
    print(f"wrote {out} ({len(rows) - len(failed)}/{len(rows)} ok{'; failed: ' + ', '.join(failed) if failed else ''})")
    return 1 if failed else 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
