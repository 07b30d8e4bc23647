"""Text-to-image evaluation on coloured MNIST: the judges, metric sanity, bad input, the CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from stepdistill.data import colored_mnist as cm
from stepdistill.eval import judges as J
from stepdistill.eval.cli import main
from stepdistill.eval.errors import EvalInputError
from stepdistill.eval.t2i import check_prompts_for_tokenizer, evaluate_t2i, read_prompts, reference_features


@pytest.fixture(scope="module")
def det():
    return J.default_attribute_detector()


@pytest.fixture(scope="module")
def clip():
    from stepdistill.eval.clip_score import load_clip

    return load_clip(J.default_clip_judge_dir())


@pytest.fixture(scope="module")
def heldout():
    d = cm.load_split("heldout", variants=1, seed=7)
    return J.as_uint8(d.images), d.captions, d.attrs


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from stepdistill.testing import tiny_sd_pipeline_folder

    return tiny_sd_pipeline_folder(tmp_path_factory.mktemp("tiny-sd-t2i"))


def test_shipped_judges_record_their_training():
    info = json.loads((J.shipped_judges_dir() / J.ATTR_JUDGE_VERSION / "detector.json").read_text())
    assert info["eval"]["prompt_accuracy"] > 0.9 and "train-t2i-judges" in info["command"]
    clip_info = json.loads((J.default_clip_judge_dir() / J.JUDGE_INFO).read_text())
    assert clip_info["eval"]["cosine_true_caption"] > clip_info["eval"]["cosine_shuffled_caption"]
    assert "judge split" in info["train"]["data"] and "judge split" in clip_info["train"]["data"]


def test_judge_accuracy_and_shuffled_prompts_score_lower(det, clip, heldout):
    from stepdistill.eval.clip_score import clip_score

    x, caps, attrs = heldout
    acc = J.attribute_accuracy(det.predict(x), attrs)
    assert acc["prompt_accuracy"] > 0.9 and acc["fg_accuracy"] > 0.99 and acc["bg_accuracy"] > 0.99
    perm = torch.randperm(len(caps), generator=torch.Generator().manual_seed(0))
    shuf_attrs = attrs[perm]
    shuf_caps = [caps[i] for i in perm.tolist()]
    assert J.attribute_accuracy(det.predict(x), shuf_attrs)["prompt_accuracy"] < 0.2
    true = clip_score(x, caps, clip)["clip_score"]
    shuf = clip_score(x, shuf_caps, clip)["clip_score"]
    assert true > shuf + 5


def test_fid_of_a_set_against_itself_is_zero_and_other_colours_are_not(det):
    from stepdistill.eval.fid import FeatureStats, frechet_distance

    ref, info = reference_features(det)
    assert info["reference_n"] == 1000
    same = cm.load_split("heldout", variants=2, seed=0)
    st = FeatureStats.from_features(det.features(J.as_uint8(same.images)))
    assert abs(frechet_distance(st.mu, st.sigma, ref.mu, ref.sigma)) < 1e-6
    # a wrong distribution: every digit drawn in the same colour pair
    masks = torch.from_numpy(np.pad(cm._raw()[0][cm._split_indices()["heldout"]], ((0, 0), (2, 2), (2, 2))))
    x = cm.paint(masks.repeat(2, 1, 1), torch.zeros(1000, dtype=torch.long), torch.ones(1000, dtype=torch.long))
    st2 = FeatureStats.from_features(det.features(J.as_uint8(x)))
    assert frechet_distance(st2.mu, st2.sigma, ref.mu, ref.sigma) > 50


def test_judge_weights_are_not_the_teachers(tiny_pipe):
    judge = J.judge_fingerprint(J.shipped_judges_dir() / J.ATTR_JUDGE_VERSION) | J.judge_fingerprint(
        J.default_clip_judge_dir())
    assert len(judge) > 10
    teacher = J.judge_fingerprint(tiny_pipe)
    assert teacher and not judge & teacher
    try:  # the real teacher, when it is cached on this machine (never trained here)
        from stepdistill.t2i_teacher import t2i_teacher_dir
        real = t2i_teacher_dir() / "pipeline"
    except Exception:  # noqa: BLE001
        real = None
    if real is not None and (real / "model_index.json").is_file():
        assert not judge & J.judge_fingerprint(real)


def test_word_level_tokenizer_maps_each_word_to_one_token(tmp_path):
    tok = J.word_level_clip_tokenizer(tmp_path, cm.vocabulary())
    ids = tok("a red seven on a blue background", add_special_tokens=False)["input_ids"]
    assert len(ids) == 7 and tok.unk_token_id not in ids
    assert tok.unk_token_id in tok("a pink seven", add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------- bad input
def test_read_prompts_bad_inputs(tmp_path):
    with pytest.raises(EvalInputError, match="not found"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(EvalInputError, match="not a file"):
        read_prompts(tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(EvalInputError, match="empty"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"a red one on a blue background\n\xff\xfe bad\n")
    with pytest.raises(EvalInputError, match=r"not UTF-8.*line 2"):
        read_prompts(tmp_path / "bin.txt")
    (tmp_path / "words.txt").write_text("a red one on a blue background\na purple dog on a blue background\n")
    with pytest.raises(EvalInputError, match=r"prompt 2.*'dog', 'purple'"):
        read_prompts(tmp_path / "words.txt")
    prompts, attrs = read_prompts(tmp_path / "words.txt", need_attributes=False)
    assert attrs is None and len(prompts) == 2
    prompts, attrs = read_prompts(cm.EVAL_PROMPTS_FILE)
    assert len(prompts) == 1000 and attrs.shape == (1000, 3)


def test_tokenizer_checks_unknown_words_and_truncation(tmp_path):
    tok = J.word_level_clip_tokenizer(tmp_path / "w", cm.vocabulary(), model_max_length=9)
    with pytest.raises(EvalInputError, match="unknown to the pipeline's tokenizer: 'pink'"):
        check_prompts_for_tokenizer(["a pink one on a blue background"], tok)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        info = check_prompts_for_tokenizer(["a red one on a blue background a red one"], tok)
    assert info["truncated_prompts"] == 1 and any("truncates" in str(x.message) for x in w)
    assert check_prompts_for_tokenizer(["a red one on a blue background"], tok)["truncated_prompts"] == 0


# ---------------------------------------------------------------------------------------------- pipeline
def test_evaluate_tiny_pipeline_per_seed_spread(tiny_pipe, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(p["prompt"] + "\n" for p in cm.eval_prompts(6, seed=3)))
    res = evaluate_t2i(tiny_pipe, prompts, num_images=6, seeds=(0, 1), num_inference_steps=1, guidance_scale=2.0,
                       scheduler="ddim", batch_size=4)
    for k in ("fid", "clip_score", "prompt_accuracy", "digit_accuracy", "images_per_s"):
        assert k in res and f"{k}_std" in res
    assert res["metric"] == "FID-attr-N6" and len(res["per_seed"]) == 2 and res["scheduler"] == "DDIMScheduler"
    assert res["per_seed"][0]["fid"] != res["per_seed"][1]["fid"]
    again = evaluate_t2i(tiny_pipe, prompts, num_images=6, seeds=(0,), num_inference_steps=1, guidance_scale=2.0,
                         scheduler="ddim", batch_size=6, clip_model=False)
    assert again["per_seed"][0]["fid"] == pytest.approx(res["per_seed"][0]["fid"], rel=1e-6)
    assert "clip_score" not in again


def test_vae_reference_is_the_heldout_set_through_the_pipelines_vae(tiny_pipe, tmp_path, det):
    """reference='vae' scores against the held-out digits decoded by the pipeline's own VAE; the same
    sampled images give the plain FID and ``fid_vae`` in one pass."""
    from diffusers import StableDiffusionPipeline

    from stepdistill.eval.t2i import vae_reconstruct

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe)
    st, info = reference_features(det, "vae", vae=pipe.vae)
    plain, _ = reference_features(det, None)
    ref = cm.load_split("heldout", variants=2, seed=0)
    direct = np.asarray(det.features(vae_reconstruct(pipe.vae, ref.images)), np.float64).mean(0)
    np.testing.assert_allclose(st.mu, direct, rtol=1e-5, atol=1e-5)
    assert not np.allclose(st.mu, plain.mu, atol=1e-3)  # a random VAE changes the reference
    assert "through the pipeline's VAE" in info["reference"] and info["reference_n"] == 1000
    with pytest.raises(EvalInputError, match="needs a pipeline with a VAE"):
        reference_features(det, "vae")
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(p["prompt"] + "\n" for p in cm.eval_prompts(4, seed=2)))
    res = evaluate_t2i(tiny_pipe, prompts, num_images=4, seeds=(0,), num_inference_steps=1, scheduler="ddim",
                       clip_model=False, extra_references={"vae": "vae"})
    only = evaluate_t2i(tiny_pipe, prompts, num_images=4, seeds=(0,), num_inference_steps=1, scheduler="ddim",
                        clip_model=False, reference="vae")
    assert res["fid_vae"] == pytest.approx(only["fid"], rel=1e-6) and res["fid_vae"] != res["fid"]
    assert only["metric"] == "FID-attr-vae-N4" and res["metric"] == "FID-attr-N4"


def test_cli_t2i_json_and_bad_input(tiny_pipe, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(p["prompt"] + "\n" for p in cm.eval_prompts(4, seed=1)))
    rc = main(["t2i", str(tiny_pipe), "--prompts", str(prompts), "--seeds", "0,1", "--num-inference-steps", "1",
               "--scheduler", "euler", "--json", "--no-progress", "--clip-model", "none"])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 0
    res = json.loads(out)
    assert res["n"] == 4 and res["seeds"] == [0, 1] and "fid_std" in res
    for args, msg in [
        (["--prompts", str(tmp_path / "nope.txt")], "not found"),
        (["--prompts", str(tmp_path / "nope.txt"), "--seeds", "x"], "--seeds"),
        (["--scheduler", "heun9"], "unknown scheduler"),
        (["--num-images", "0"], "must be positive"),
    ]:
        capsys.readouterr()
        assert main(["t2i", str(tiny_pipe), *(["--num-images", "2"] if "--num-images" not in args else []), *args]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
    (tmp_path / "bad.txt").write_text("a red one on a blue background\nthe cat sat\n")
    assert main(["t2i", str(tiny_pipe), "--prompts", str(tmp_path / "bad.txt")]) == 2
    assert "unknown word(s) 'cat', 'sat', 'the'" in capsys.readouterr().err


def test_floors_with_a_vae(tiny_pipe):
    from stepdistill.eval.t2i import t2i_floors

    res = t2i_floors(tiny_pipe, seeds=(0, 1), num_images=200)
    assert res["train_images"] > res["heldout_recoloured"] > 0
    assert res["vae_train_images"] > res["train_images"]  # a random VAE destroys the images
    assert "vae_psnr_db" in res and res["n"] == 200


def test_fid_cli_with_the_t2i_detector(tmp_path, capsys):
    from stepdistill.eval.detectors import get_detector

    assert isinstance(get_detector("t2i"), J.AttributeDetector)
    a = cm.load_split("heldout", variants=1, seed=0)
    b = cm.load_split("heldout", variants=1, seed=5)
    np.savez(tmp_path / "a.npz", images=J.as_uint8(a.images).numpy())
    np.savez(tmp_path / "b.npz", images=J.as_uint8(b.images).numpy())
    assert main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--detector", "t2i", "--json",
                 "--no-progress"]) == 0
    same = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert same["metric"] == "FID-attr-N500" and abs(same["fid"]) < 1e-6
    assert main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--detector", "t2i", "--json",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fid"] > 1
