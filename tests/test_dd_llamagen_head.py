"""DD's continuous head on a (tiny, converted) LlamaGen teacher: the head reads the LlamaGenGPT's
last hidden state (the ``lm_head``'s input), and the exported folder -- whose GPT is this package's
own component -- reloads the head both in-process (``load_pipeline``) and with plain diffusers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_llamagen import GRID, VQ_D, gpt_state, teacher, vq_state  # noqa: E402,F401  (fixtures)


def test_dd_head_on_llamagen_export_and_reload(teacher, tmp_path):  # noqa: F811
    from stepdistill.algorithms.distilled_decoding import DDConfig, DistilledDecoding
    from stepdistill.export import export_dd_pipeline
    from stepdistill.pipelines.distilled_decoding import DistilledDecodingPipeline
    from stepdistill.teachers.llamagen import load_pipeline

    d = DistilledDecoding(teacher, DDConfig(num_pairs=16, shard_size=16, pairs_dir=str(tmp_path / "pairs"),
                                            flow_steps=4, flow_dtype="float32", codebook_scale=1.0,
                                            split_points=[0, 8], split_t=10))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in d.student.head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    # the head sees the GPT's final-norm output (what lm_head consumes)
    n = GRID * GRID
    noise = torch.randn(3, n, VQ_D, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 5, 9])
    seen = {}
    hook = d.student.transformer.lm_head.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0]))
    with torch.no_grad():
        _, cont = d.student.predict(noise, labels, torch.zeros(3, n, dtype=torch.bool))
    hook.remove()
    table = d.student.transformer.get_input_embeddings().weight
    ref = d.student.head(seen["h"][:, 1:], table[labels + d.student.layout["class_offset"]])
    torch.testing.assert_close(cont, ref)
    with torch.no_grad():
        expected = {}
        for k in (1, 2):
            tok, vec = d.student.generate(noise, labels, num_steps=k)
            expected[k] = (tok, (d.student.decode(teacher.vqvae, tok, vec) / 2 + 0.5).clamp(0, 1))
    folder = export_dd_pipeline(d.student, teacher, tmp_path / "dd", num_inference_steps=2)
    assert (folder / "continuous_head.safetensors").is_file()
    direct = load_pipeline(DistilledDecodingPipeline, folder)  # in-process, the installed classes
    assert torch.equal(direct(class_labels=labels, noise=noise, output_type="tokens").images, expected[2][0])
    img = direct(class_labels=labels, noise=noise, output_type="pt").images
    torch.testing.assert_close(img, expected[2][1], atol=1e-5, rtol=0)
    torch.save({"noise": noise, "labels": labels}, tmp_path / "inputs.pt")
    code = textwrap.dedent(
        f"""
        import json, torch
        from diffusers import DiffusionPipeline
        inp = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        print(json.dumps({{k: pipe(class_labels=inp["labels"], noise=inp["noise"], num_inference_steps=k,
                                   output_type="pt").images.tolist() for k in (1, 2)}}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for k in (1, 2):
        torch.testing.assert_close(torch.tensor(got[str(k)]), expected[k][1], atol=1e-5, rtol=0)
