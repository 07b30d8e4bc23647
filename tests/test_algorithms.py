"""Contract and maths tests for the distillation algorithms (registry-parametrised)."""

from __future__ import annotations

import pytest
import torch

from stepdistill.algorithms import REGISTRY, build
from stepdistill.algorithms.base import Distiller
from stepdistill.algorithms.common import GeneratorTimestepError, make_generator
from stepdistill.teachers.analytic import GaussianMixtureTeacher

# cheap settings so every algorithm builds in a second on the analytic teacher
FAST = {
    "dmd2": {"update_ratio": 2},
    "vsd": {"critic": "full"},
}


@pytest.fixture(scope="module")
def teacher():
    t = GaussianMixtureTeacher.ring(8, std=0.05)
    t.trainable_copy(fit_steps=200)  # warm the fitted-copy cache used below
    return t


def _build(name, teacher, **extra):
    params = dict(FAST.get(name, {}))
    params.update(extra)
    d = build(name, teacher, params)
    # use the cheaper fitted copies: rebuild networks from the 200-step fit
    return d


@pytest.fixture(autouse=True)
def _fast_copies(monkeypatch):
    orig = GaussianMixtureTeacher.trainable_copy

    def fast(self, hidden=128, fit_steps=200, seed=0):
        return orig(self, hidden=hidden, fit_steps=200, seed=seed)

    monkeypatch.setattr(GaussianMixtureTeacher, "trainable_copy", fast)


def _batch(teacher, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"raw_cond": teacher.random_raw_conditions(n, g), "real": teacher.sample_data(n, g), "batch_size": n}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registry_entries_declare_interface(name):
    cls = REGISTRY[name]
    assert issubclass(cls, Distiller)
    assert cls.name == name and cls.paper and cls.Config is not None


# diffusion distillers (the AR-teacher algorithm, Distilled Decoding, has its own contract tests)
DIFFUSION = sorted(n for n, c in REGISTRY.items() if getattr(c, "teacher_kind", "diffusion") != "ar")


@pytest.mark.parametrize("name", DIFFUSION)
def test_phase_updates_exactly_its_group(name, teacher):
    torch.manual_seed(0)
    d = _build(name, teacher)
    groups = d.trainable()
    teacher_params = list(teacher.parameters())
    for step in range(3):
        cache: dict = {}
        for group in d.phase(step):
            for m in groups.values():
                m.zero_grad(set_to_none=True)
            out = d.loss(_batch(teacher, seed=step), step, group, cache)
            assert torch.isfinite(out.loss), (name, group, out.loss)
            assert all(isinstance(v, float) for v in out.logs.values())
            out.loss.backward()
            own = [p for p in groups[group].parameters() if p.requires_grad]
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in own), f"{group} got no gradient"
            others = [p for g, m in groups.items() if g != group for p in m.parameters()]
            # other groups may receive gradients through the graph (e.g. the GAN loss through the
            # critic), but never through parameters shared with this group
            assert not set(map(id, own)) & set(map(id, others))
            assert all(p.grad is None for p in teacher_params)


@pytest.mark.parametrize("name", DIFFUSION)
def test_trainable_groups_exclude_teacher(name, teacher):
    d = _build(name, teacher)
    teacher_ids = {id(p) for p in teacher.parameters()}
    for m in d.trainable().values():
        assert not teacher_ids & {id(p) for p in m.parameters()}
    assert all(not p.requires_grad for p in d.teacher.parameters())


@pytest.mark.parametrize("name", DIFFUSION)
def test_loss_is_deterministic_under_seed(name, teacher):
    d = _build(name, teacher)
    vals = []
    for _ in range(2):
        torch.manual_seed(123)
        out = d.loss(_batch(teacher), 0, d.phase(0)[0], {})
        vals.append(float(out.loss))
    assert vals[0] == vals[1]


def test_surrogate_gradient_is_intended_per_pixel_gradient():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    g = torch.randn(4, 3, 5, 5)
    Distiller.surrogate_loss(x, g).backward()
    torch.testing.assert_close(x.grad, g / x.numel())


class _Exact(torch.nn.Module):
    """A 'critic' that is exactly the teacher."""

    def __init__(self, teacher):
        super().__init__()
        self.t = teacher

    def denoise(self, *a, **k):
        return self.t.denoise(*a, **k)


def test_dmd_gradient_vanishes_when_critic_equals_teacher(teacher):
    d = _build("dmd2", teacher)
    d.critic = _Exact(teacher)
    torch.manual_seed(0)
    cache: dict = {}
    d.generator.zero_grad(set_to_none=True)
    out = d.loss(_batch(teacher), 0, "generator", cache)
    out.loss.backward()
    assert float(out.loss) == 0.0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in d.generator.parameters())


def test_vsd_gradient_vanishes_when_critic_equals_teacher(teacher):
    d = _build("vsd", teacher, critic_guidance_scale=1.0, guidance_scale=1.0)
    d.critic = _Exact(teacher)
    torch.manual_seed(0)
    out = d.loss(_batch(teacher), 0, "generator", {})
    assert float(out.loss) == 0.0


def test_dmd_gradient_is_normalised_score_difference(teacher, monkeypatch):
    """g = (x_fake - x_real) / mean|x - x_real|, injected with the 0.5*mean surrogate."""
    d = _build("dmd2", teacher)
    captured = {}
    orig = Distiller.surrogate_loss

    def spy(x, grad):
        captured["x"], captured["g"] = x.detach().clone(), grad.clone()
        return orig(x, grad)

    monkeypatch.setattr(Distiller, "surrogate_loss", staticmethod(spy))
    torch.manual_seed(5)
    d.loss(_batch(teacher), 0, "generator", {})
    # recompute with the same noise draws
    torch.manual_seed(5)
    batch = _batch(teacher)
    cond = teacher.encode_conditions(batch["raw_cond"])
    z = torch.randn((32, 2))
    with torch.no_grad():
        x = d.generator(z, cond)
        idx = torch.randint(d.min_step, d.max_step + 1, (32,))
        sigma = teacher.sigmas[idx]
        xt = x + sigma[:, None] * torch.randn_like(x)
        real = teacher.denoise(xt, sigma, cond)
        fake = d.critic.denoise(xt, sigma, cond, guidance_scale=1.0)
        g = (fake - real) / (x - real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(captured["x"], x)
    torch.testing.assert_close(captured["g"], g, rtol=1e-4, atol=1e-6)


def test_vsd_weighting_equals_swiftbrush_eps_form():
    """sigma/(1+sigma^2) (x0_L - x0_T) == (1 - abar)(eps_T - eps_L) for VP teachers."""
    sigma = torch.tensor([0.1, 1.0, 7.0])
    abar = 1 / (1 + sigma**2)
    x_t = torch.randn(3, 4)
    x0_t, x0_l = torch.randn(3, 4), torch.randn(3, 4)
    eps = lambda x0: (x_t - x0) / sigma[:, None]  # noqa: E731  (VE form; same eps as VP)
    lhs = (sigma / (1 + sigma**2))[:, None] * (x0_l - x0_t)
    rhs = (1 - abar)[:, None] * (eps(x0_t) - eps(x0_l)) * (1 + sigma**2).sqrt()[:, None] * abar.sqrt()[:, None]
    # the factor sqrt(abar)*sqrt(1+sigma^2) == 1: VP and VE eps agree
    torch.testing.assert_close(lhs, rhs)


def test_dmd2_ttur_phases(teacher):
    d = _build("dmd2", teacher, update_ratio=5, critic_warmup_steps=3)
    phases = [d.phase(s) for s in range(14)]
    assert phases[:3] == [["critic"]] * 3
    assert phases[3] == ["generator", "critic"]
    assert phases[4:8] == [["critic"]] * 4
    assert phases[8] == ["generator", "critic"]


def test_dmd2_regression_stage_then_dmd(teacher):
    d = _build("dmd2", teacher, regression_steps=2, regression_pairs=64, regression_sampler_steps=4)
    assert d.pairs["noise"].shape == (64, 2) and d.pairs["x0"].shape == (64, 2)
    assert d.phase(0) == ["generator"] and d.phase(1) == ["generator"]
    out = d.loss(_batch(teacher), 0, "generator", {})
    assert "regression" in out.logs
    assert "dm" in d.loss(_batch(teacher), 2, "generator", {}).logs


def test_dmd2_multistep_backward_simulation(teacher):
    d = _build("dmd2", teacher, generator_timesteps=[999, 749, 499, 249])
    assert d.generator.num_steps == 4
    out = d.loss(_batch(teacher), 7, "generator", {})
    assert torch.isfinite(out.loss)


def test_dmd2_gan_head_on_bottleneck(teacher):
    d = _build("dmd2", teacher, gan_weight_g=0.01)
    assert "gan_head" in d.critic_group
    out_c = d.loss(_batch(teacher), 1, "critic", {})
    assert {"gan_d", "d_real", "d_fake"} <= set(out_c.logs)
    out_g = d.loss(_batch(teacher), 0, "generator", {})
    assert "gan_g" in out_g.logs


def test_gan_needs_real_data(teacher):
    d = _build("dmd2", teacher, gan_weight_g=0.01)
    batch = _batch(teacher)
    batch["real"] = None
    with pytest.raises(ValueError, match="real data"):
        d.loss(batch, 1, "critic", {})


def test_epsilon_teacher_rejects_ill_posed_generator_timestep():
    from diffusers import DDPMScheduler

    from stepdistill.teachers.diffusion import DiffusersTeacher
    from stepdistill.teachers.training import UNetSpec, build_unet

    unet = build_unet(UNetSpec(block_out_channels=[8, 16], norm_num_groups=4))
    cfg = dict(DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon").config)
    t = DiffusersTeacher(unet, cfg, num_classes=10)
    with pytest.raises(GeneratorTimestepError, match="alpha_bar"):
        make_generator(t, [999])
    assert make_generator(t, [899]).timesteps == [899]
    cfg["prediction_type"] = "v_prediction"
    assert make_generator(DiffusersTeacher(unet, cfg, num_classes=10), [999]).timesteps == [999]


def test_unknown_algorithm_param_is_rejected(teacher):
    from stepdistill.config import ConfigError

    with pytest.raises(ConfigError, match="update_ratoi"):
        build("dmd2", teacher, {"update_ratoi": 3})
    with pytest.raises(ConfigError, match="unknown algorithm"):
        build("nope", teacher, {})


# ---------------------------------------------------------------------------------------------
# BOOT


class _NoData(dict):
    """A batch that fails loudly if an algorithm touches real data."""

    def __getitem__(self, key):
        if key == "real":
            raise AssertionError("data-free algorithm read batch['real']")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key == "real":
            raise AssertionError("data-free algorithm read batch['real']")
        return super().get(key, default)


def test_boot_never_touches_data(teacher):
    d = _build("boot", teacher)
    assert d.needs_data is False
    out = d.loss(_NoData(raw_cond=teacher.random_raw_conditions(8), batch_size=8), 0, "generator", {})
    assert torch.isfinite(out.loss)


def test_boot_target_is_one_exact_ddim_step():
    """The bootstrapped target equals one DDIM step (diffusers DDIMScheduler, eta=0) of the teacher
    from the student's own re-noised estimate, mapped back to signal space; delta = 1 - sigma_s/sigma_t."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from stepdistill.algorithms.boot import BOOT, BOOTConfig
    from stepdistill.teachers.diffusion import DiffusersTeacher
    from stepdistill.teachers.training import UNetSpec, build_unet

    torch.manual_seed(0)
    spec = UNetSpec(block_out_channels=[8, 16], norm_num_groups=4, prediction_type="epsilon")
    sched_cfg = dict(DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon").config)
    teacher = DiffusersTeacher(build_unet(spec), sched_cfg, num_classes=10)
    boot = BOOT(teacher, BOOTConfig(step_size=50))
    eps = torch.randn(3, 1, 8, 8)
    cond = teacher.encode_conditions([1, 2, 3])
    t = torch.tensor([950, 500, 120])
    s = t - 50
    with torch.no_grad():
        y_t = boot.student(eps, t, cond)
        sig_t, sig_s = teacher.sigmas[t], teacher.sigmas[s]
        f = teacher.denoise(y_t + sig_t[:, None, None, None] * eps, sig_t, cond)
        delta = 1 - sig_s / sig_t
        target = y_t + delta[:, None, None, None] * (f - y_t)
        # reference: diffusers DDIM in VP space
        ddim = DDIMScheduler.from_config(sched_cfg, clip_sample=False)
        ddim.set_timesteps(20)  # 1000 // 20 = 50 = step size
        ab = ddim.alphas_cumprod
        for i in range(3):
            a_t, a_s = ab[t[i]], ab[s[i]]
            x_vp = a_t.sqrt() * y_t[i : i + 1] + (1 - a_t).sqrt() * eps[i : i + 1]
            eps_hat = teacher.model(x_vp, t[i : i + 1], class_labels=cond["class_labels"][i : i + 1]).sample
            x_s = ddim.step(eps_hat, int(t[i]), x_vp).prev_sample
            y_s = (x_s - (1 - a_s).sqrt() * eps[i : i + 1]) / a_s.sqrt()
            torch.testing.assert_close(target[i : i + 1], y_s, rtol=1e-3, atol=1e-3)
            # delta closed form: 1 - exp(lambda_s - lambda_t), lambda = -log(alpha / sigma_vp)
            lam = lambda a: -torch.log(a.sqrt() / (1 - a).sqrt())  # noqa: E731
            torch.testing.assert_close(delta[i], 1 - torch.exp(lam(a_s) - lam(a_t)), rtol=1e-4, atol=1e-6)


def test_boot_student_at_query_timestep_is_exported_generator(teacher):
    d = _build("boot", teacher)
    eps = torch.randn(5, 2)
    cond = teacher.encode_conditions(torch.arange(5))
    with torch.no_grad():
        a = d.student(eps, torch.full((5,), d.config.query_timestep), cond)
        b = d.generator_for_export()(eps, cond)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# DisBack


def _begin(d, step):
    """What the trainer does at the start of a step: the side-effect hook, then the pure phase."""
    d.on_step_begin(step, True)
    return d.phase(step)


def _run_steps(d, teacher, steps, start=0, batch_fn=None):
    batch_fn = batch_fn or (lambda step: _batch(teacher, n=16, seed=step))
    opts = {k: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
            for k, m in d.trainable().items()}
    for step in range(start, start + steps):
        cache: dict = {}
        for group in _begin(d, step):
            out = d.loss(batch_fn(step), step, group, cache)
            out.loss.backward()
            opts[group].step()
            for o in opts.values():
                o.zero_grad(set_to_none=True)


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
    _run_steps(d, teacher, 4)  # recording: generator frozen, critic trained
    for k, v in d.generator_for_export().state_dict().items():
        torch.testing.assert_close(v, gen0[k])
    assert d.node_files == ["node-001.safetensors"]
    # entering backtracking records the final node = the critic fitted to the initial generator
    _begin(d, 4)
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
        _begin(d, step)
        assert d.current == 0
    _begin(d, 7)
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

    _run_steps(d, teacher, 2, batch_fn=batch_fn)
    _begin(d, 2)  # records the final node, then targets node 1
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
    _run_steps(d, teacher, 3)
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
    _run_steps(d, teacher, 2)
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
    _run_steps(d, teacher, 10)  # recording (9 critic updates), then the first backtracking step
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
