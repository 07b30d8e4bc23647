"""``stepdistill compare``: a short end-to-end run on a tiny random SD teacher (2 methods, 2 steps
each): every output exists, rows are well-formed (DESIGN.md section 8), a second invocation skips
the finished methods, and a method interrupted after its training resumes instead of retraining."""

from __future__ import annotations

import json

import pytest

from stepdistill.compare import compare

ROW_KEYS = ("benchmark", "teacher", "method", "nfe", "fid", "fid_detector", "n_samples", "images_per_s",
            "train_steps", "train_seconds", "commit", "command")

TINY = {
    "dmd2": """
base: t2i/dmd2_1step
description: tiny dmd2 for tests
algorithm:
  name: dmd2
  params:
    generator_timesteps: [899]
    update_ratio: 1
    critic_warmup_steps: 0
    regression_steps: 0
    regression_pairs: 0
""",
    "vsd": """
base: t2i/vsd
description: tiny vsd for tests
algorithm:
  name: vsd
  params:
    generator_timesteps: [899]
    lora_rank: 2
    lora_alpha: 2.0
""",
}
COMMON = ["train.batch_size=2", "train.sample_every_steps=0", "train.report_to=null", "train.progress=false",
          "train.log_every_steps=1"]


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def setup(tmp_path):
    from stepdistill.data.sources import PromptSource
    from stepdistill.testing import tiny_sd_pipeline_folder

    teacher = tiny_sd_pipeline_folder(tmp_path)
    presets = []
    for name, text in TINY.items():
        p = tmp_path / f"tiny_{name}.yaml"
        p.write_text(text)
        presets.append(str(p))
    prompts = tmp_path / "eval.txt"
    prompts.write_text("\n".join(PromptSource("train_300.txt").prompts[:6]) + "\n")
    return teacher, presets, prompts


def _run(setup, out, **kw):
    teacher, presets, prompts = setup
    return compare(str(teacher), presets, out, steps=2, overrides=COMMON + [f"train.dataset=prompts:{prompts}"],
                   num_images=6, seeds=[0, 1], prompts=str(prompts), curve_every=1, curve_images=4,
                   sheet_columns=3, quiet=True, **kw)


def test_compare_end_to_end_and_resume(setup, tmp_path, monkeypatch):
    from stepdistill.data import colored_mnist as cm
    from stepdistill.eval.fid import FeatureStats
    from stepdistill.eval.judges import as_uint8, default_attribute_detector

    ref = tmp_path / "teacher_stats.npz"  # stands in for the teacher's own DDIM-50 statistics
    x = as_uint8(cm.load_split("heldout", variants=1, seed=3).images[:200])
    FeatureStats.from_features(default_attribute_detector().features(x)).save(ref)
    out = tmp_path / "cmp"
    rows = _run(setup, out, teacher_reference=str(ref))
    assert [r["method"] for r in rows] == ["tiny_dmd2", "tiny_vsd"]
    for r in rows:
        for k in ROW_KEYS:
            assert k in r, k
        assert r["benchmark"] == "compare" and r["nfe"] == 1 and r["train_steps"] == 2
        assert r["fid"] == r["fid"] and r["fid"] >= 0  # finite
        assert r["fid_teacher"] == r["fid_teacher"] and r["fid_teacher"] != r["fid"]  # the teacher-relative FID
        assert r["clip_score"] is not None and r["prompt_accuracy"] is not None
        assert r["n_samples"] == 6 and r["seeds"] == [0, 1] and len(r["per_seed"]) == 2
        folder = out / "runs" / r["method"] / "pipeline"
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusionPipeline"  # stock export
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert sched["_class_name"] == "LCMScheduler" and sched.get("_stepdistill_timesteps") == [899]
        curve = (out / "runs" / r["method"] / "curve.jsonl").read_text().splitlines()
        assert [json.loads(c)["step"] for c in curve] == [1, 2]
    saved = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in saved] == ["tiny_dmd2", "tiny_vsd"]
    for name in ("compare.md", "fid_vs_step.png", "fid_vs_clip.png", "samples.png", "samples.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    table = (out / "compare.md").read_text()
    assert "tiny_dmd2" in table and "tiny_vsd" in table and "FID vs teacher" in table
    sheet = json.loads((out / "samples.json").read_text())
    assert sheet["rows"] == ["tiny_dmd2", "tiny_vsd"] and len(sheet["columns"]) == 3
    from PIL import Image

    w, h = Image.open(out / "samples.png").size
    assert h < w  # 2 rows of 3 tiles

    # second invocation: nothing is trained again
    import stepdistill.run as run_mod

    def boom(*a, **k):
        raise AssertionError("a finished method was trained again")

    monkeypatch.setattr(run_mod, "run_distillation", boom)
    again = _run(setup, out, teacher_reference=str(ref))
    assert [r["fid"] for r in again] == [r["fid"] for r in rows]


def test_compare_resumes_an_interrupted_method(setup, tmp_path):
    """A run killed after its checkpoints (row.json missing) resumes from the latest checkpoint."""
    out = tmp_path / "cmp"
    teacher, presets, prompts = setup
    compare(str(teacher), presets[:1], out, steps=2, overrides=COMMON + [f"train.dataset=prompts:{prompts}"],
            num_images=4, seeds=[0], prompts=str(prompts), sheet_columns=2, quiet=True)
    run_dir = out / "runs" / "tiny_dmd2"
    (run_dir / "row.json").unlink()  # as if killed between training and scoring
    rows = compare(str(teacher), presets[:1], out, steps=2, overrides=COMMON + [f"train.dataset=prompts:{prompts}"],
                   num_images=4, seeds=[0], prompts=str(prompts), sheet_columns=2, quiet=True)
    assert rows[0]["resumed_from"] is not None and rows[0]["train_steps"] == 2


# every t2i preset, shrunk to a few steps on the tiny teacher: trains and exports the pipeline its
# docs promise (stock StableDiffusionPipeline + LCMScheduler with the timesteps recorded; MSD's
# prompt-routing pipeline)
SHRINK = {
    "t2i/dmd2_1step": (3, ["algorithm.params.regression_steps=1", "algorithm.params.regression_pairs=4",
                           "algorithm.params.regression_sampler_steps=2", "algorithm.params.critic_warmup_steps=0",
                           "algorithm.params.update_ratio=1"], [999]),
    "t2i/dmd2_1step_lora": (3, ["algorithm.params.regression_steps=1", "algorithm.params.regression_pairs=4",
                                "algorithm.params.regression_sampler_steps=2", "algorithm.params.critic_warmup_steps=0",
                                "algorithm.params.update_ratio=1", "algorithm.params.generator_lora.rank=2",
                                "algorithm.params.generator_lora.alpha=2"], [999]),
    "t2i/dmd2_4step": (2, ["algorithm.params.critic_warmup_steps=0", "algorithm.params.update_ratio=1"],
                       [999, 749, 499, 249]),
    "t2i/vsd": (2, ["algorithm.params.lora_rank=2", "algorithm.params.lora_alpha=2.0"], [999]),
    "t2i/boot": (2, [], [20]),
    "t2i/disback_dmd2": (4, ["algorithm.params.recording_steps=1", "algorithm.params.num_nodes=1",
                             "algorithm.params.switch_every_steps=1", "algorithm.params.base_params.regression_steps=1",
                             "algorithm.params.base_params.regression_pairs=4",
                             "algorithm.params.base_params.regression_sampler_steps=2",
                             "algorithm.params.base_params.update_ratio=1"], [999]),
    "t2i/disback_vsd": (3, ["algorithm.params.recording_steps=1", "algorithm.params.num_nodes=1",
                            "algorithm.params.switch_every_steps=1", "algorithm.params.base_params.lora_rank=2",
                            "algorithm.params.base_params.lora_alpha=2.0"], [999]),
    "t2i/msd_k4": (8, ["algorithm.params.base_params.regression_steps=1", "algorithm.params.base_params.regression_pairs=4",
                       "algorithm.params.base_params.regression_sampler_steps=2",
                       "algorithm.params.base_params.critic_warmup_steps=0",
                       "algorithm.params.base_params.update_ratio=1"], [999]),
}
SHRINK["t2i/msd_k4_paper"] = SHRINK["t2i/msd_k4"]  # the same recipe at 4x the steps
MSD = ("t2i/msd_k4", "t2i/msd_k4_paper")


def test_every_t2i_preset_is_covered():
    from stepdistill.config import list_presets

    assert {p for p in list_presets() if p.startswith("t2i/") and p != "t2i/teacher"} == set(SHRINK)


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(SHRINK))
def test_t2i_preset_trains_and_exports_on_a_tiny_teacher(preset, setup, tmp_path):
    import torch
    from diffusers import DiffusionPipeline

    from stepdistill.config import load_config
    from stepdistill.run import run_distillation

    teacher, _, _ = setup
    steps, extra, timesteps = SHRINK[preset]
    cfg = load_config(preset, [*COMMON, f"train.output_dir={tmp_path / 'run'}", f"train.max_steps={steps}",
                               f"train.checkpoint_every_steps={steps}", *extra])
    cfg.teacher.kind, cfg.teacher.path, cfg.teacher.params = "diffusers", str(teacher), {}
    res = run_distillation(cfg)
    folder = res["pipeline"]
    index = json.loads((tmp_path / "run" / "pipeline" / "model_index.json").read_text())
    sched = json.loads((tmp_path / "run" / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "LCMScheduler" and sched["_stepdistill_timesteps"] == timesteps
    if preset in MSD:
        assert index["_class_name"] == ["multi_student", "TextMultiStudentPipeline"]
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
        assert len(set(index["route_students"])) == 4
    else:
        assert index["_class_name"] == "StableDiffusionPipeline"
        pipe = DiffusionPipeline.from_pretrained(folder)
    out = pipe(["a red seven on a blue background"], generator=torch.Generator().manual_seed(0), output_type="np",
               **({} if preset in MSD else {"timesteps": timesteps, "guidance_scale": 1.0}))
    assert out.images.shape[0] == 1 and (out.images == out.images).all()


def test_a_curve_point_scored_again_after_a_resume_replaces_the_old_one(tmp_path):
    """Killed after the step-750 point, resumed from checkpoint 600: step 750 is scored again and
    must not appear twice (seen in the t2i DisBack-VSD run)."""
    from stepdistill.compare import record_curve_point

    f = tmp_path / "curve.jsonl"
    for step, fid in ((250, 9.0), (500, 8.0), (750, 7.0)):
        record_curve_point(f, {"step": step, "fid": fid})
    pts = record_curve_point(f, {"step": 750, "fid": 6.5})
    lines = [json.loads(ln) for ln in f.read_text().splitlines()]
    assert lines == pts and [p["step"] for p in lines] == [250, 500, 750] and lines[-1]["fid"] == 6.5
    assert not (tmp_path / "curve.jsonl.tmp").exists()
