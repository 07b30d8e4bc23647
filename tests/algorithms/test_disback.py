"""DisBack: node recording and backtracking, LoRA-critic nodes, resume, the base method's loss, node
spacing and the recording learning-rate scale."""

from __future__ import annotations

import pytest
import torch
from support import FAST, begin_step, run_steps

from stepdistill.algorithms import REGISTRY, build


@pytest.mark.parametrize("base", ["dmd2", "vsd"])
def test_disback_records_nodes_and_backtracks(teacher, tmp_path, base):
    from safetensors.torch import load_file

    from stepdistill.algorithms.disback import DisBack

    params = {"base": base, "base_params": FAST[base], "recording_steps": 4, "num_nodes": 2,
              "switch_every_steps": 3, "nodes_dir": str(tmp_path)}
    d = build("disback", teacher, params)
    assert isinstance(d, DisBack) and type(d.base) is REGISTRY[base]  # composition, not a fork
    assert d.base.teacher is d.target  # the base method's "real" score is the swappable target
    gen0 = {k: v.clone() for k, v in d.generator_for_export().state_dict().items()}
    run_steps(d, teacher, 4)  # recording: generator frozen, critic trained
    for k, v in d.generator_for_export().state_dict().items():
        torch.testing.assert_close(v, gen0[k])
    assert d.node_files == ["node-001.safetensors"]
    # entering backtracking records the final node = the critic fitted to the initial generator
    begin_step(d, 4)
    assert d.node_files == ["node-001.safetensors", "node-002.safetensors"]
    last = load_file(str(tmp_path / "node-002.safetensors"))
    critic_state = d.base.critic.state_dict()
    assert set(last) == {n for n, p in d.base.critic.named_parameters() if p.requires_grad}  # weights only
    for k, v in last.items():
        torch.testing.assert_close(critic_state[k], v)
    assert d.path() == ["node-002.safetensors", "node-001.safetensors", None]  # degraded ... teacher
    assert d.targets() == ["node-001.safetensors", None]
    # target at steps 4..6 is node 1 (loaded into the target network), from step 7 the teacher
    assert d.current == 0 and not d.target.use_teacher
    node1 = load_file(str(tmp_path / "node-001.safetensors"))
    node_state = d.target.node_net.state_dict()
    for k, v in node1.items():
        torch.testing.assert_close(node_state[k], v)
    for step in (5, 6):
        begin_step(d, step)
        assert d.current == 0
    begin_step(d, 7)
    assert d.current == 1 and d.target.use_teacher
    x = torch.randn(4, 2)
    sigma = teacher.sigmas[500].expand(4)
    torch.testing.assert_close(d.target.denoise(x, sigma), teacher.denoise(x, sigma))
    assert d.switch_log == [4, 7]


def test_disback_over_lora_vsd_records_adapter_deltas(tmp_path):
    """A LoRA critic's nodes hold only the adapter tensors; the target twin shares the critic's
    frozen base weights (no second UNet), loads a node, and a mismatched node is refused."""
    import json

    from diffusers import DDPMScheduler
    from safetensors.torch import load_file, save_file

    from stepdistill.teachers.diffusion import DiffusersTeacher
    from stepdistill.testing import tiny_unet2d

    cfg = dict(DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").config)
    teacher = DiffusersTeacher(tiny_unet2d(num_classes=10), cfg, num_classes=10)
    base_params = {"critic": "lora", "lora_rank": 4, "lora_alpha": 4.0, "lora_targets": ["conv1", "conv2"]}
    params = {"base": "vsd", "base_params": base_params, "recording_steps": 2, "num_nodes": 2,
              "switch_every_steps": 2, "nodes_dir": str(tmp_path)}
    d = build("disback", teacher, params)
    critic, twin = d.base.critic, d.target.node_net
    frozen = {n: p for n, p in critic.named_parameters() if not p.requires_grad}
    for n, p in twin.named_parameters():
        assert not p.requires_grad
        if n in frozen:
            assert p.data_ptr() == frozen[n].data_ptr(), n  # shared, not copied
    def batch_fn(step):  # image-free: conditions only
        return {"raw_cond": teacher.random_raw_conditions(8, torch.Generator().manual_seed(step)), "batch_size": 8}

    run_steps(d, teacher, 2, batch_fn=batch_fn)
    begin_step(d, 2)  # records the final node, then targets node 1
    node1 = load_file(str(tmp_path / "node-001.safetensors"))
    lora = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert set(node1) == lora and all("lora_" in k for k in node1)
    twin_state = twin.state_dict()
    for k, v in node1.items():
        torch.testing.assert_close(twin_state[k], v)
    assert any(v.abs().sum() > 0 for k, v in node1.items() if "lora_B" in k)  # the critic did move
    manifest = json.loads((tmp_path / "nodes.json").read_text())
    assert manifest["kind"] == "lora" and [r["file"] for r in manifest["nodes"]] == d.node_files
    assert manifest["nodes"][0]["bytes"] == (tmp_path / "node-001.safetensors").stat().st_size
    save_file({"model.not_a_key": torch.zeros(1)}, str(tmp_path / "node-001.safetensors"))
    with pytest.raises(ValueError, match="does not match this critic"):
        d._load_target("node-001.safetensors")


def test_disback_generator_steps_skip_recording(teacher, tmp_path):
    params = {"base": "dmd2", "base_params": {**FAST["dmd2"], "regression_steps": 3, "regression_pairs": 8}, "recording_steps": 2,
              "num_nodes": 1, "nodes_dir": str(tmp_path)}
    d = build("disback", teacher, params)
    assert [d.generator_steps(s) for s in range(8)] == [0, 1, 2, 3, 3, 3, 4, 5]
    assert [d.stage(s) for s in (2, 3, 4, 5)] == ["regression", "recording", "recording", "backtracking"]


def test_disback_resume_restores_nodes_and_target(teacher, tmp_path):
    params = {"base": "dmd2", "base_params": FAST["dmd2"], "recording_steps": 2, "num_nodes": 2,
              "switch_every_steps": 50, "nodes_dir": str(tmp_path)}
    d = build("disback", teacher, params)
    run_steps(d, teacher, 3)
    state = d.state_dict_extra()
    assert state["current"] == 0 and len(state["node_files"]) == 2
    d2 = build("disback", teacher, params)
    d2.load_state_dict_extra(state)
    assert d2.current == 0 and d2.node_files == d.node_files and not d2.target.use_teacher
    for a, b in zip(d.target.node_net.state_dict().values(), d2.target.node_net.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_disback_uses_base_generator_loss(teacher, tmp_path, monkeypatch):
    from stepdistill.algorithms.dmd2 import DMD2

    calls = []
    orig = DMD2._generator_loss

    def spy(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(DMD2, "_generator_loss", spy)
    params = {"base": "dmd2", "base_params": FAST["dmd2"], "recording_steps": 1, "num_nodes": 1,
              "switch_every_steps": 5, "nodes_dir": str(tmp_path)}
    d = build("disback", teacher, params)
    run_steps(d, teacher, 2)
    assert calls, "DisBack must train the generator through the base algorithm's own loss"


def test_disback_node_schedule():
    from stepdistill.algorithms.disback import node_schedule

    assert node_schedule(200, 4) == [50, 100, 150, 200]  # the paper's fixed interval
    assert node_schedule(200, 4, "geometric") == [4, 14, 53, 200]
    assert node_schedule(4, 4, "geometric") == [1, 2, 3, 4]  # strictly increasing even when rounding collides
    with pytest.raises(ValueError, match="geometric nodes"):
        node_schedule(2, 4, "geometric")


def test_disback_geometric_nodes_and_path_diagnostic(teacher, tmp_path):
    import json

    params = {"base": "dmd2", "base_params": FAST["dmd2"], "recording_steps": 9, "num_nodes": 3,
              "node_spacing": "geometric", "switch_every_steps": 5, "nodes_dir": str(tmp_path)}
    d = build("disback", teacher, params)
    assert d.node_steps == [2, 4, 9]
    run_steps(d, teacher, 10)  # recording (9 critic updates), then the first backtracking step
    info = json.loads((tmp_path / "nodes.json").read_text())["nodes"]
    assert [r["recording_step"] for r in info] == [2, 4, 9]
    dist = [r["distance_from_start"] for r in info]
    assert 0 < dist[0] < dist[1] < dist[2]  # the critic moves away from the teacher while recording
    assert info[-1]["fraction_of_path"] == 1.0 and 0 < info[0]["fraction_of_path"] < 1


def test_disback_recording_lr_scale_applies_to_recording_only(teacher, tmp_path):
    params = {"base": "dmd2", "base_params": {**FAST["dmd2"], "regression_steps": 2, "regression_pairs": 8},
              "recording_steps": 3, "num_nodes": 1, "recording_lr_scale": 0.1, "nodes_dir": str(tmp_path)}
    d = build("disback", teacher, params)
    base = [d.base.lr_scale(s, "critic") for s in range(2)]
    assert [d.stage(s) for s in (1, 2, 4, 5)] == ["regression", "recording", "recording", "backtracking"]
    assert [d.lr_scale(s, "critic") for s in range(2)] == base
    assert [d.lr_scale(s, "critic") for s in (2, 3, 4)] == pytest.approx([0.1 * d.base.lr_scale(s, "critic") for s in (2, 3, 4)])
    assert d.lr_scale(5, "critic") == d.base.lr_scale(2, "critic")
    with pytest.raises(ValueError, match="recording_lr_scale"):
        build("disback", teacher, {**params, "recording_lr_scale": 0})
