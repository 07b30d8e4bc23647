"""COCO-2014 protocol from local files, with tiny stand-ins: random Inception weights, a tiny random
CLIP saved with save_pretrained, a few reference images, a tiny random SD pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stepdistill.eval.cli import main
from stepdistill.eval.coco import COCO_LAYOUT, INCEPTION_FILE, evaluate_coco, resolve_coco_files
from stepdistill.eval.errors import EvalInputError

pytest.importorskip("torch_fidelity", reason="torch-fidelity not installed (pip install 'stepdistill[fid]')")

PROMPTS = ["a red circle", "a blue square", "a green triangle", "two yellow dots"]


def _random_inception(path):
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        mp.undo()
    torch.save(net.state_dict(), path)


def _tiny_clip(folder, tmp):
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from stepdistill.eval.judges import _image_processor
    from stepdistill.testing import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer(tmp, model_max_length=16)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                           num_attention_heads=4),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    CLIPProcessor(image_processor=_image_processor(), tokenizer=tok).save_pretrained(folder)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    from PIL import Image

    from stepdistill.testing import tiny_sd_pipeline_folder

    root = tmp_path_factory.mktemp("coco")
    (root / COCO_LAYOUT["prompts"]).write_text("\n".join(PROMPTS) + "\n")
    ref = root / COCO_LAYOUT["reference_images"]
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(ref / f"{i:05d}.png")
    (root / COCO_LAYOUT["inception"]).mkdir()
    _random_inception(root / COCO_LAYOUT["inception"] / INCEPTION_FILE)
    _tiny_clip(root / COCO_LAYOUT["clip"], tmp_path_factory.mktemp("tok"))
    pipe = tiny_sd_pipeline_folder(tmp_path_factory.mktemp("pipe"))
    return root, pipe


def test_layout_resolution_and_missing_files(coco_root, tmp_path):
    root, _ = coco_root
    files = resolve_coco_files(root)
    assert files["prompts"].name == "prompts_30k.txt" and files["inception"].name == INCEPTION_FILE
    assert files["reference"].name == "reference" and files["clip"].name == "clip"
    with pytest.raises(EvalInputError, match=r"missing prompts.*reference.*Inception weights"):
        resolve_coco_files(tmp_path)
    with pytest.raises(EvalInputError, match="not a folder"):
        resolve_coco_files(tmp_path / "nope")


def test_coco_protocol_with_tiny_stand_ins(coco_root, tmp_path):
    root, pipe = coco_root
    res = evaluate_coco(pipe, root=root, num_images=4, seeds=(0, 1), num_inference_steps=1, guidance_scale=1.5,
                        batch_size=2, feature_dim=64)
    assert res["metric"] == "FID-N4" and res["fid_detector"] == "inception-v3-compat"
    assert len(res["per_seed"]) == 2 and "fid_std" in res and "clip_score_std" in res
    assert np.isfinite(res["fid"]) and res["reference_n"] == 5
    # precomputed statistics instead of the images, and the same numbers
    from stepdistill.eval.detectors import InceptionDetector
    from stepdistill.eval.metrics import compute_stats

    det = InceptionDetector(root / "inception" / INCEPTION_FILE, feature_dim=64)
    st = compute_stats(str(root / "reference"), det, None, cache=False, progress=False)
    st.save(tmp_path / "ref.npz")
    res2 = evaluate_coco(pipe, root=root, reference=tmp_path / "ref.npz", num_images=4, seeds=(0,),
                         num_inference_steps=1, guidance_scale=1.5, batch_size=4, feature_dim=64)
    assert res2["per_seed"][0]["fid"] == pytest.approx(res["per_seed"][0]["fid"], rel=1e-5)
    with pytest.raises(EvalInputError, match="features"):
        evaluate_coco(pipe, root=root, reference=tmp_path / "ref.npz", num_images=2, seeds=(0,), feature_dim=192)


def test_coco_cli(coco_root, tmp_path, capsys):
    root, pipe = coco_root
    rc = main(["coco", str(pipe), "--coco-root", str(root), "-n", "2", "--seeds", "0,1", "--num-inference-steps", "1",
               "--feature-dim", "64", "--json", "--no-progress"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 2 and res["seeds"] == [0, 1]
    assert main(["coco", str(pipe), "--coco-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing prompts" in err and "Traceback" not in err
    assert main(["coco", str(pipe), "--coco-root", str(root), "-n", "10"]) == 2
    assert "10 images requested" in capsys.readouterr().err
