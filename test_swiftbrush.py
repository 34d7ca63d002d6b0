"""Algorithm 1 on tiny random models in the official SD folder layout (conftest.py builds them): LoRA teacher, Eq. 7
student, Eq. 5 / Eq. 2 gradients and their surrogate loss, the loop (what changes and what must not), exact resume,
the score diagnostics, export, sampling, text encoding and the layout. diffusers serves as the oracle. The tool
around the method (CLI, kills, hub, ablation) is tested in harness/test_harness.py, the GPU recipe (bf16,
checkpointing, the memory plan) in memory/test_gpu_recipe.py."""
import copy
import gc
import json
import os
import threading
import weakref
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import lora
import sample
import swiftbrush as sb
from conftest import BASE, CPU, UNET_FILE, assert_same_ckpt, inputs, logged_now, read_ckpt, read_log, rel_err, run
from formats import models
from formats.text import load_text
from harness.steplog import StepLog
from memory.ema import EMA, HostEMA
from unet import load_unet

diffusers = pytest.importorskip("diffusers")

# --------------------------------------------------------------------------------------------------
# LoRA beside the attention projections


def test_lora_identity_toggle_merge_and_files(sd_root, tmp_path):
    x, ctx = inputs()
    t = torch.tensor([10, 700])
    net = load_unet(sd_root)
    with torch.no_grad():
        teacher = net(x, t, ctx)
        phi = lora.inject_lora(net, rank=4, alpha=8.0, targets=("to_q", "to_v"))
        assert len(phi) == 2 * len(lora.lora_layers(net)) > 0
        assert all(n.endswith(("to_q", "to_v")) for n, _ in lora.lora_layers(net))
        assert torch.equal(net(x, t, ctx), teacher)  # B = 0: a fresh LoRA changes nothing
        g = torch.Generator().manual_seed(3)
        for _, a in lora.adapters(net):
            a.lora_up.weight.copy_(0.1 * torch.randn(a.lora_up.weight.shape, generator=g))
        student = net(x, t, ctx)
        assert rel_err(teacher, student) > 1e-3
        with lora.lora_disabled(net):
            assert torch.equal(net(x, t, ctx), teacher)  # eps_psi through the same weights: bit-identical
        assert torch.equal(net(x, t, ctx), student)  # re-enabled on exit

        # the base weights keep exactly the official keys
        official = load_file(os.path.join(sd_root, UNET_FILE))
        base = lora.base_state_dict(net)
        assert set(base) == set(official)
        assert all(torch.equal(base[k], official[k]) for k in official)
        fresh = load_unet(sd_root)
        fresh.load_state_dict(base, strict=True)
        res = net.load_state_dict(official, strict=False)
        assert not res.unexpected_keys and set(res.missing_keys) == set(lora.lora_state_dict(net))

        # merge: same function, plain Linear layers, official keys only
        lora.merge_lora(net)
        assert not lora.lora_layers(net)
        assert not any(isinstance(m, lora.LoRALayer) for m in net.modules())
        assert set(net.state_dict()) == set(official)
        assert rel_err(student, net(x, t, ctx)) < 1e-5
    with pytest.raises(ValueError):
        lora.inject_lora(load_unet(sd_root), rank=0)
    with pytest.raises(ValueError):
        lora.inject_lora(net, rank=2, targets=("no_such_layer",))


def test_lora_is_drawn_from_the_cpu_generator_on_every_device(sd_root):
    """One seed, one LoRA, whatever the teacher's device: A is drawn on the CPU, then moved. A UNet on the meta
    device (no values, the way a CUDA one would draw from another generator) takes the same CPU draws as one on the
    CPU, so the CPU generator ends in the same state; kaiming-uniform's bound sqrt(1 / fan_in) holds."""
    states, nets = [], []
    for device in ("cpu", "meta"):
        net = load_unet(sd_root).to(device)
        torch.manual_seed(0)
        lora.inject_lora(net, rank=4, alpha=8.0)
        states.append(torch.get_rng_state())
        nets.append(net)
    assert torch.equal(*states) and not torch.equal(states[0], torch.manual_seed(0).get_state())
    for _, a in lora.adapters(nets[1]):
        assert a.lora_down.weight.device.type == a.lora_up.weight.device.type == "meta"
    for _, a in lora.adapters(nets[0]):
        assert 0 < a.lora_down.weight.abs().max() <= a.lora_down.in_features ** -0.5 and not a.lora_up.weight.any()


def test_lora_scale_is_alpha_over_r_as_loralib_and_peft():
    """W x + b + (alpha / r) B A x, loralib's `scaling = lora_alpha / r`, written out; peft's LoRA (rsLoRA off, its
    default) on the same weights gives the same output, and merging folds the same (alpha / r) B A into W."""
    from peft import LoraConfig, inject_adapter_in_model
    torch.manual_seed(0)
    r, alpha = 2, 7.0
    base = torch.nn.Linear(6, 5)
    x = torch.randn(3, 6)
    ours = torch.nn.Module()
    ours.to_q = copy.deepcopy(base)
    lora.inject_lora(ours, r, alpha, ["to_q"])
    layer = ours.to_q
    with torch.no_grad():
        layer.adapters["phi"].lora_up.weight.normal_()
        A, B = layer.adapters["phi"].lora_down.weight, layer.adapters["phi"].lora_up.weight
        want = x @ base.weight.T + base.bias + (alpha / r) * (x @ A.T) @ B.T
        assert rel_err(want, layer(x)) < 1e-6 and rel_err(want, base(x)) > 0.1

        holder = torch.nn.Module()
        holder.to_q = copy.deepcopy(base)
        theirs = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=["to_q"]), holder).to_q
        theirs.lora_A["default"].weight.copy_(A)
        theirs.lora_B["default"].weight.copy_(B)
        assert theirs.scaling["default"] == alpha / r
        assert rel_err(theirs(x), layer(x)) < 1e-6

        lora.merge_lora(ours)
        assert type(ours.to_q) is torch.nn.Linear and rel_err(want, ours.to_q(x)) < 1e-6


# --------------------------------------------------------------------------------------------------
# Algorithm 1, equation by equation, by hand: each expected value is computed here from the teacher's UNet, the
# scheduler's config and the paper's constants, never by the function under test; where two quantities could be
# swapped (the two scores, their CFG scales, the LoRA's switch) the test sets them apart so that a swap shows


def _abar_by_hand(root, t):
    with open(os.path.join(root, "scheduler", "scheduler_config.json")) as f:
        c = json.load(f)
    betas = np.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, c["num_train_timesteps"]) ** 2
    return float(np.prod(1 - betas[:t + 1]))


def _alpha_sigma_by_hand(root, t):
    """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) for each t of a batch, shaped [B, 1, 1, 1]."""
    abar = torch.tensor([_abar_by_hand(root, int(i)) for i in t], dtype=torch.float32).view(-1, 1, 1, 1)
    return abar.sqrt(), (1 - abar).sqrt()


def _student_draws(root, x0, seed):
    """Steps 2's draws from a generator seeded `seed`, in score_gradient's order: t ~ U(0.02 T, 0.98 T) (T = 1000:
    20..980 inclusive, as the authors' randint(20, 981)), then eps ~ N(0, I). Returns t, eps, alpha_t, sigma_t."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(20, 980 + 1, (len(x0),), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    return (t, eps, *_alpha_sigma_by_hand(root, t))


def _cfg_by_hand(unet, x_t, t, ctx, uncond, scale, lora_on):
    """eps_u + s (eps_c - eps_u), the two branches as two separate calls, the LoRA switched as asked."""
    with lora.adapters_on(unet, *(["phi"] if lora_on else [])):
        eps_u = unet(x_t, t, uncond.expand(len(x_t), -1, -1))
        eps_c = unet(x_t, t, ctx)
    return eps_u + scale * (eps_c - eps_u)


def _perturb_lora(unet, seed=9):
    """A LoRA that has learnt something (B no longer 0), so that eps_phi is not eps_psi."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in lora.lora_parameters(unet):
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_f_theta_at_step0_is_teachers_x0_prediction(sd_root, sd_root_v, pred):
    """Eq. 7: x0 = (z - sigma_T eps_theta(z, T, y)) / alpha_T at T = 999, the student being the teacher at step 0."""
    root = sd_root if pred == "epsilon" else sd_root_v
    m = sb.load_models(sb.Config(model=root, prompts="demo"), CPU)
    assert m.schedule.prediction_type == pred and m.latent_shape == (4, 8, 8)
    abar = _abar_by_hand(root, 999)
    assert abs(m.schedule.abar[999].item() - abar) < 1e-7
    a, s = abar ** 0.5, (1 - abar) ** 0.5
    z, ctx = inputs(seed=4)
    with torch.no_grad():
        out = m.teacher(z, torch.tensor([999, 999]), ctx)
        want = (z - s * out) / a if pred == "epsilon" else a * z - s * out  # v: x0 = alpha z - sigma v
        got = sb.f_theta(m.student, z, ctx, m.schedule)
        assert rel_err(want, got) < 1e-5
        # the eps ablation: the student's eps as the image (for a v model, eps = alpha v + sigma z)
        eps = out if pred == "epsilon" else a * out + s * z
        assert rel_err(eps, sb.f_theta(m.student, z, ctx, m.schedule, param="eps")) < 1e-6


@pytest.fixture
def vsd_models(sd_root):
    """Models as train() sets them up for VSD: a LoRA on the teacher UNet."""
    m = sb.load_models(sb.Config(model=sd_root, prompts="demo"), CPU)
    torch.manual_seed(0)
    lora.inject_lora(m.teacher, 4, 8.0)
    return m


def _x0_ctx(m):
    z = torch.randn((2, *m.latent_shape), generator=torch.Generator().manual_seed(7))
    ctx = m.embeddings[:2]
    with torch.no_grad():
        return sb.f_theta(m.student, z, ctx, m.schedule), ctx


def test_vsd_gradient_is_zero_at_start_and_sds_is_not(vsd_models):
    m = vsd_models
    x0, ctx = _x0_ctx(m)
    vsd, sds = sb.Config(loss="vsd"), sb.Config(loss="sds")
    g = sb.score_gradient(m, vsd, x0, ctx, torch.Generator().manual_seed(0))
    assert torch.equal(g, torch.zeros_like(g))  # eps_psi == eps_phi exactly: same weights, LoRA B = 0
    g = sb.score_gradient(m, sds, x0, ctx, torch.Generator().manual_seed(0))
    assert g.abs().max() > 1e-3
    other_cfg = sb.Config(loss="vsd", lora_guidance=1.0)  # different CFG scales: the two scores differ
    assert sb.score_gradient(m, other_cfg, x0, ctx, torch.Generator().manual_seed(0)).abs().max() > 1e-4


def test_vsd_gradient_by_hand(vsd_models, sd_root):
    """Eq. 5: g = sigma_t^2 (eps_psi(x_t, t, y) - eps_phi(x_t, t, y)), x_t = alpha_t x0 + sigma_t eps (Eq. 1), eps_psi
    the UNet with its LoRA off at CFG `guidance`, eps_phi with it on at CFG `lora_guidance`. The scales are set apart
    (3 and 1.5) and the LoRA is not zero, so that reversing the difference, swapping the scales or running both scores
    with the same LoRA switch each gives another g (checked: each is far from the right one in some row; w = sigma_t
    and sigma_t^2 differ where t is small)."""
    m = vsd_models
    _perturb_lora(m.teacher)
    x0, ctx = _x0_ctx(m)
    g = sb.score_gradient(m, sb.Config(loss="vsd", guidance=3.0, lora_guidance=1.5), x0, ctx,
                          torch.Generator().manual_seed(5))
    t, eps, a, s = _student_draws(sd_root, x0, seed=5)
    x_t = a * x0 + s * eps
    with torch.no_grad():
        score = {(scale, on): _cfg_by_hand(m.teacher, x_t, t, ctx, m.uncond, scale, on)
                 for scale in (3.0, 1.5) for on in (False, True)}
    want = s ** 2 * (score[3.0, False] - score[1.5, True])
    assert rel_err(want, g) < 1e-4
    for wrong in (s ** 2 * (score[1.5, True] - score[3.0, False]),   # the difference reversed
                  s ** 2 * (score[1.5, False] - score[3.0, True]),    # the scales swapped
                  s ** 2 * (score[3.0, True] - score[1.5, True]),     # eps_psi with the LoRA on
                  s * (score[3.0, False] - score[1.5, True])):       # w(t) = sigma_t
        assert max(rel_err(want[i], wrong[i]) for i in range(len(g))) > 0.1  # in one of the rows at least


def test_sds_gradient_by_hand(vsd_models, sd_root):
    """Eq. 2: g = sigma_t^2 (eps_psi(x_t, t, y) - eps), eps_psi with CFG and its LoRA off, eps the noise of x_t."""
    m = vsd_models
    _perturb_lora(m.teacher)  # SDS has no LoRA in training; here it must not leak into eps_psi
    x0, ctx = _x0_ctx(m)
    g = sb.score_gradient(m, sb.Config(loss="sds", guidance=3.0), x0, ctx, torch.Generator().manual_seed(5))
    t, eps, a, s = _student_draws(sd_root, x0, seed=5)
    with torch.no_grad():
        eps_psi = _cfg_by_hand(m.teacher, a * x0 + s * eps, t, ctx, m.uncond, 3.0, lora_on=False)
    assert rel_err(s ** 2 * (eps_psi - eps), g) < 1e-4


def test_dmd_weighting_by_hand(vsd_models, sd_root):
    """--weighting dmd (DMD, Yin et al. 2024): g = (x0_phi - x0_psi) / mean |x0 - x0_psi| written in eps, i.e.
    w = sigma_t / alpha_t / mean_chw |x0 - x0_psi| per sample, x0_psi = (x_t - sigma_t eps_psi) / alpha_t."""
    m = vsd_models
    _perturb_lora(m.teacher)
    x0, ctx = _x0_ctx(m)
    cfg = sb.Config(loss="vsd", guidance=3.0, lora_guidance=1.5, weighting="dmd")
    g = sb.score_gradient(m, cfg, x0, ctx, torch.Generator().manual_seed(5))
    t, eps, a, s = _student_draws(sd_root, x0, seed=5)
    x_t = a * x0 + s * eps
    with torch.no_grad():
        eps_psi = _cfg_by_hand(m.teacher, x_t, t, ctx, m.uncond, 3.0, lora_on=False)
        eps_phi = _cfg_by_hand(m.teacher, x_t, t, ctx, m.uncond, 1.5, lora_on=True)
    x0_psi, x0_phi = (x_t - s * eps_psi) / a, (x_t - s * eps_phi) / a
    normaliser = torch.stack([(x0[i] - x0_psi[i]).abs().mean() for i in range(len(x0))]).view(-1, 1, 1, 1)
    assert rel_err((x0_phi - x0_psi) / normaliser, g) < 1e-4


@pytest.mark.parametrize("loss", ["vsd", "sds"])
def test_surrogate_loss_gradient_is_g(vsd_models, loss):
    """Step 4: d/dx0 0.5 mean ||x0 - sg(x0 - g)||^2 = +g / N, so gradient descent moves x0 along -g; and through the
    student, d loss / d theta = (d f_theta / d theta)^T g / N."""
    m = vsd_models
    _perturb_lora(m.teacher)  # so VSD's g is not zero
    x0, ctx = _x0_ctx(m)
    g = sb.score_gradient(m, sb.Config(loss=loss), x0, ctx, torch.Generator().manual_seed(1))
    assert g.abs().max() > 1e-4
    x0 = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sb.surrogate_loss(x0, g), x0)
    # x0 - (x0 - g) is g up to one rounding at |x0|'s scale (fp32), hence the atol
    tol = 4 * torch.finfo(torch.float32).eps * x0.abs().max().item()
    assert torch.allclose(grad * x0.numel(), g, rtol=1e-5, atol=tol)
    z = torch.randn((2, *m.latent_shape), generator=torch.Generator().manual_seed(7))
    w = m.student.conv_out.weight
    x = sb.f_theta(m.student, z, ctx, m.schedule)
    (a,) = torch.autograd.grad(sb.surrogate_loss(x, g), w)
    x = sb.f_theta(m.student, z, ctx, m.schedule)
    (b,) = torch.autograd.grad(x, w, grad_outputs=g / x.numel())
    assert rel_err(b, a) < 1e-5


@pytest.mark.parametrize("weighted", [True, False], ids=["abar", "plain"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_lora_teachers_loss_by_hand(sd_root, sd_root_v, pred, weighted):
    """Step 5, Eq. 6: t ~ U(0, T) (0..999), eps ~ N(0, I), x_t = alpha_t sg(x0) + sigma_t eps; weighted (the authors'):
    mean abar_t ||eps_hat - eps||^2 with eps_hat the model's output as eps (a v model's: alpha_t v + sigma_t x_t);
    plain: the MSE in the model's own output, eps or v = alpha_t eps - sigma_t x0. No gradient reaches x0 (sg)."""
    root = sd_root if pred == "epsilon" else sd_root_v
    m = sb.load_models(sb.Config(model=root, prompts="demo"), CPU)
    x0, ctx = _x0_ctx(m)
    x0 = x0.clone().requires_grad_(True)  # as a caller with the student's graph would pass it
    loss = sb.diffusion_loss(m.teacher, x0, ctx, m.uncond, m.schedule, torch.Generator().manual_seed(3),
                             p_uncond=0.0, abar_weighted=weighted)
    assert torch.autograd.grad(loss, x0, allow_unused=True) == (None,)  # sg(x0): the LoRA's loss leaves x0 alone
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (2,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a, s = _alpha_sigma_by_hand(root, t)
    x0 = x0.detach()
    x_t = a * x0 + s * eps
    with torch.no_grad():
        out = m.teacher(x_t, t, ctx)
    if weighted:
        eps_hat = out if pred == "epsilon" else a * out + s * x_t
        want = (a ** 2 * (eps_hat - eps) ** 2).mean()
    else:
        want = ((out - (eps if pred == "epsilon" else a * eps - s * x0)) ** 2).mean()
    assert abs(loss.item() - want.item()) < 1e-5 * want.item()


def test_lora_teachers_prompts_are_dropped_to_the_empty_prompt_one_in_ten(vsd_models, sd_root):
    """Eq. 6's prompts: each row's y is replaced by "" where u < 0.1 (the authors' 10%), u ~ U(0, 1) drawn after t
    and eps, so that the unconditional branch of eps_phi's CFG learns the student's images too. Over 16 rows whose
    draws drop some but not all (by hand), exactly those rows reach the UNet as "" and the others as their prompt."""
    m = vsd_models
    B = 16
    x0 = torch.randn((B, *m.latent_shape), generator=torch.Generator().manual_seed(1))
    ctx = m.embeddings[torch.arange(B) % len(m.embeddings)]
    seen = []

    def unet(x_t, t, context):
        seen.append(context)
        return m.teacher(x_t, t, context)

    sb.diffusion_loss(unet, x0, ctx, m.uncond, m.schedule, torch.Generator().manual_seed(2))  # the default rate
    gen = torch.Generator().manual_seed(2)
    torch.randint(0, 1000, (B,), generator=gen)  # t, then eps: drawn before u
    torch.randn(x0.shape, generator=gen)
    drop = torch.rand(B, generator=gen) < 0.1
    assert 0 < int(drop.sum()) < B  # this seed's draws drop some rows (2 of 16), not all
    (got,) = seen
    for i in range(B):
        assert torch.equal(got[i], m.uncond[0] if drop[i] else ctx[i]), i


# --------------------------------------------------------------------------------------------------
# The training loop


def _one_step(root, **kw):
    """Models and state as train() sets them up, with a LoRA that is not zero; returns (m, cfg, state)."""
    cfg = sb.Config(model=root, **{**BASE, "ema_decay": 0, **kw})
    m = sb.load_models(cfg, CPU)
    state = sb.start_training(cfg, m, CPU)
    if cfg.loss == "vsd":
        _perturb_lora(m.teacher)
    return m, cfg, state


@pytest.mark.parametrize("loss,param", [("vsd", "x0"), ("sds", "x0"), ("vsd", "eps")])
def test_a_step_moves_the_students_image_where_its_equation_says(sd_root, monkeypatch, loss, param):
    """The method's direction, through everything a step runs (train_step: render, g, the surrogate, clipping, Adam):
    after one step of batch 1, the student's image for the same z and y has moved, to first order, toward the
    teacher's denoised estimate x0_psi = (x_t - sigma_t eps_psi) / alpha_t and away from the LoRA teacher's x0_phi
    (VSD: along x0_psi - x0_phi, i.e. -(eps_psi - eps_phi)), or toward x0_psi from x0 itself (SDS: along
    -(eps_psi - eps)). The scores are computed here from the UNet at the step's own x_t and t (read from the teacher's
    first no-grad call), with the CFG scales set apart. The eps ablation's image (the raw eps) follows the same rule.
    Measured: cosine 0.56-0.74 over three seeds each, and the negative of it with g's sign reversed. With VSD, the LoRA
    teacher's step lowers its own Eq. 6 loss on the same draws."""
    m, cfg, state = _one_step(sd_root, loss=loss, param=param, batch_size=1, lr=1e-5, lora_lr=1e-4,
                              guidance=3.0, lora_guidance=1.5)
    seen, teacher_inputs, lora_losses = {}, [], []
    real_f_theta, real_diffusion_loss = sb.f_theta, sb.diffusion_loss

    def f_theta(student, z, context, *a):
        seen["z"], seen["y"] = z, context
        seen["x0"] = x0 = real_f_theta(student, z, context, *a)
        return x0

    def diffusion_loss(unet, x0, context, uncond, schedule, gen, **kw):
        before = gen.get_state()
        loss_phi = real_diffusion_loss(unet, x0, context, uncond, schedule, gen, **kw)
        again = lambda: real_diffusion_loss(unet, x0, context, uncond, schedule,
                                            torch.Generator().set_state(before), **kw).item()
        lora_losses.append((loss_phi.item(), again))
        return loss_phi

    monkeypatch.setattr(sb, "f_theta", f_theta)
    monkeypatch.setattr(sb, "diffusion_loss", diffusion_loss)
    hook = m.teacher.register_forward_pre_hook(
        lambda _, args: None if torch.is_grad_enabled() else teacher_inputs.append(args[:2]))
    sb.train_step(m, cfg, state, nullcontext())
    hook.remove()

    z, y, x0 = seen["z"], seen["y"], seen["x0"].detach()
    x_t, t = (v[:1] for v in teacher_inputs[0])  # CFG's batch is [x_t, x_t]
    with torch.no_grad():
        moved = real_f_theta(m.student, z, y, m.schedule, param) - x0
        eps_psi = _cfg_by_hand(m.teacher, x_t, t, y, m.uncond, 3.0, lora_on=False)
        if loss == "vsd":
            eps_phi = _cfg_by_hand(m.teacher, x_t, t, y, m.uncond, 1.5, lora_on=True)
        else:
            a, s = _alpha_sigma_by_hand(sd_root, t)
            eps_phi = (x_t - a * x0) / s  # the noise x_t was drawn with
    toward = -(eps_psi - eps_phi)
    cosine = (moved * toward).sum() / (moved.norm() * toward.norm())
    assert cosine > 0.3, cosine
    if loss == "vsd":
        ((loss_before, loss_after),) = [(before, again()) for before, again in lora_losses]
        assert loss_after < loss_before


@pytest.mark.parametrize("step_in_backward", [False, True], ids=["step", "step-in-backward"])
@pytest.mark.parametrize("scale", [1e4, 1e-3], ids=["large", "small"])
def test_each_network_steps_on_gradients_clipped_to_norm_1(sd_root, monkeypatch, scale, step_in_backward):
    """The authors clip the student's and the LoRA teacher's gradients each to global norm 1 (max_grad_norm 1.0).
    The gradients each Adam steps with, read inside its step, have norm min(n, 1), n their norm before clipping (the
    logged one): with both losses scaled up (n >> 1: scaled down to 1) and down (n << 1: untouched), through the
    student's two paths (the step after the backward, and --step-in-backward's per-parameter steps) and the LoRA's."""
    m, cfg, state = _one_step(sd_root, step_in_backward=step_in_backward, lora_guidance=1.5)
    for name in ("surrogate_loss", "diffusion_loss"):
        real = getattr(sb, name)
        monkeypatch.setattr(sb, name, lambda *a, real=real, **kw: scale * real(*a, **kw))
    squares = {"student": 0.0, "lora": 0.0}  # each network's squared gradient norm, summed over its Adam steps
    student = {id(p) for p in m.student.parameters()}
    real_step = torch.optim.Adam.step

    def step(opt, *a, **kw):
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        network = "student" if id(params[0]) in student else "lora"
        squares[network] += sum(float(p.grad.double().pow(2).sum()) for p in params)
        return real_step(opt, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    logs = logged_now(sb.train_step(m, cfg, state, nullcontext()), state)
    for network in ("student", "lora"):
        before = logs[f"grad_norm_{network}"]
        assert (before > 10) if scale > 1 else (0 < before < 0.1), (network, before)
        assert abs(squares[network] ** 0.5 - min(before, 1.0)) < 1e-4 * min(before, 1.0), network


@pytest.mark.parametrize("kw", [{}, {"loss": "sds"}, {"param": "eps"}, {"student_steps": 2, "grad_accum": 2,
                                                                         "lora_steps": 2}, {"step_in_backward": True},
                                {"student_lora": 4, "sdxl": True}],
                         ids=["vsd", "sds", "eps", "k2-accum2-lora2", "step-in-backward", "sdxl-lora-student"])
def test_a_training_step_reads_nothing_back_from_the_device(sd_root, kw, request):
    """A step reads nothing back from the device, so the host never waits for the GPU before the step ends:
    train_step on models on the meta device, where a tensor holds no data and any read of one (.item(), .cpu(), .tolist(), float(), an if on a tensor, a copy
    to the CPU) raises. The step's draws go there, the schedule is looked up there, the clipping norms and the losses
    stay there, and each optimiser is given its skip flag (fused Adam's found_inf) there; the step's log is the one
    read, a step later (harness/steplog.py). (Adam's own step is stubbed: the fused kernel has no meta version. Copies to the device are not
    reads and pass on the meta device: the step's go through to_device, pinned and asynchronous on CUDA.)"""
    meta = torch.device("meta")
    kw = dict(kw)
    root = request.getfixturevalue("sdxl_root") if kw.pop("sdxl", False) else sd_root  # SDXL: its ids' row too
    cfg = sb.Config(model=root, **{**BASE, "ema_decay": 0, **kw})
    m = sb.load_models(cfg, CPU)
    state = sb.start_training(cfg, m, meta)
    flags = []
    for opt in filter(None, (state["opt_student"], state["opt_lora"])):
        for one in getattr(opt, "optimisers", {None: opt}).values():  # --step-in-backward: one per parameter
            one.defaults["fused"] = True  # as on CUDA: fused Adam, whose step is stubbed (no meta kernel)
            one.step = lambda one=one: flags.append(one.found_inf)
    logs = sb.train_step(m, cfg, state, nullcontext())
    assert set(logs) == {"loss_student", "grad_norm_student"} | ({"loss_lora", "grad_norm_lora"} if "loss" not in kw
                                                                  else set())
    assert flags and all(t.device == meta for t in [*logs.values(), *flags])
    with pytest.raises(NotImplementedError, match="meta"):
        logged_now(logs, state)


def test_the_loop_reads_a_steps_numbers_after_queueing_the_next(sd_root, tmp_path, monkeypatch):
    """train() reads step n's numbers (the host's wait for the device) only once step n + 1 is queued, so the GPU
    has a step to run while the host writes the log and draws; the last step's before the checkpoint."""
    events, real_step, real_write = [], sb.train_step, StepLog._write
    monkeypatch.setattr(sb, "train_step", lambda *a: events.append("step") or real_step(*a))
    monkeypatch.setattr(StepLog, "_write", lambda log, sent: events.append(f"read {sent['step']}") or
                        real_write(log, sent))
    monkeypatch.setattr(sb, "save_run", lambda *a: events.append("save"))
    run(sd_root, tmp_path, 3)
    assert events == ["step", "step", "read 1", "step", "read 2", "read 3", "save"]


@pytest.mark.parametrize("fused, step_in_backward, student_lora", [
    (True, False, 0), (True, True, 0), (False, False, 0), (False, True, 0), (True, False, 4)],
    ids=["fused-step", "fused-step-in-backward", "not-fused-step", "not-fused-step-in-backward", "lora-student"])
def test_a_diverged_step_changes_no_weight_and_stops_the_run(sd_root, monkeypatch, step_in_backward, fused,
                                                             student_lora):
    """Gradients that are not finite (both losses made NaN) skip both Adam updates, on the device with fused Adam
    (CUDA, the CPU) and after the host has read the norm without it (MPS), so the student, the LoRA and both Adams'
    states are bit for bit what they were; the step's log then names the first number that is not finite and the step."""
    if not fused:
        monkeypatch.setattr(sb, "adam", lambda params, lr, device: torch.optim.Adam(params, lr=lr, foreach=False))
    m, cfg, state = _one_step(sd_root, step_in_backward=step_in_backward, lora_guidance=1.5, student_lora=student_lora)
    logged_now(sb.train_step(m, cfg, state, nullcontext()), state)  # one good step: Adam has a state
    sb.count_step(m, cfg, state)
    before = {k: v.clone() for k, v in {**m.student.state_dict(), **m.teacher.state_dict()}.items()}

    def adam():  # every tensor of both Adams' states: step, m, v
        states = [*state["opt_student"].state_dict()["state"].values(), *state["opt_lora"].state_dict()["state"].values()]
        return [v.clone() for per_parameter in states for v in per_parameter.values()]

    adam_before = adam()
    for name in ("surrogate_loss", "diffusion_loss"):
        real = getattr(sb, name)
        monkeypatch.setattr(sb, name, lambda *a, real=real, **kw: real(*a, **kw) * float("nan"))
    logs = sb.train_step(m, cfg, state, nullcontext())
    with pytest.raises(sb.TrainingDiverged, match="loss_student became nan at step 2"):
        logged_now(logs, state)
    after = {**m.student.state_dict(), **m.teacher.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(adam_before) > 3 and all(torch.equal(a, b) for a, b in zip(adam(), adam_before, strict=True))


def test_prompts_come_in_epochs_each_a_new_shuffle(sd_root):
    """next_prompts: the prompts in the order of a permutation drawn from the loop's generator, then of a new one
    each time one runs out: the concatenation of randperm draws, over five epochs of the 12 demo prompts in batches
    of 5 that straddle the epochs' ends."""
    cfg = sb.Config(model=sd_root, loss="sds", **BASE)
    m = sb.load_models(cfg, CPU)
    state = sb.start_training(cfg, m, CPU)
    n = len(m.prompts)
    drawn = torch.cat([sb.next_prompts(state, 5) for _ in range(12)])  # 60 = 5 epochs of 12
    gen = torch.Generator().manual_seed(cfg.seed)
    epochs = [torch.randperm(n, generator=gen) for _ in range(5)]
    assert torch.equal(drawn, torch.cat(epochs))
    assert all(sorted(e.tolist()) == list(range(n)) for e in epochs)
    assert len({tuple(e.tolist()) for e in epochs}) == 5  # each epoch its own order


def test_vsd_steps_change_the_student_and_the_lora_and_nothing_else(sd_root, tmp_path):
    """What moves: the student and the LoRA (where they move to is the direction test's, above); the teacher's weights
    stay bit for bit the file's and take no gradient; the first step's g is 0 (fresh LoRA), later ones not."""
    official = load_file(os.path.join(sd_root, UNET_FILE))
    m, _, log = run(sd_root, tmp_path / "vsd", 3)
    base = lora.base_state_dict(m.teacher)
    assert set(base) == set(official) and all(torch.equal(base[k], official[k]) for k in official)
    assert not any(p.requires_grad for k, p in m.teacher.named_parameters() if ".adapters." not in k)
    st = m.student.state_dict()
    assert set(st) == set(official)
    assert any(not torch.equal(st[k], official[k]) for k in official)  # the student moved
    ups = [a.lora_up.weight for _, a in lora.adapters(m.teacher)]
    assert ups and all(u.abs().max() > 0 for u in ups)  # the LoRA moved (B started at 0)
    assert len(log) == 3 and all(np.isfinite(h["loss_lora"]) and h["loss_lora"] > 0 for h in log)
    assert log[0]["grad_norm_student"] == 0.0  # step 1: eps_psi == eps_phi, g = 0
    assert log[-1]["grad_norm_student"] > 0
    tensors, meta = read_ckpt(tmp_path / "vsd" / "checkpoint.safetensors")
    assert meta["step"] == "3"
    assert any(k.startswith("lora/") for k in tensors) and any(k.startswith("opt_lora/") for k in tensors)


def test_lora_steps_and_lora_loss(sd_root, tmp_path, monkeypatch):
    """--lora-steps K: K LoRA updates per student update (DMD2's two time-scale update), each further one on fresh
    renders; --lora-loss: Eq. 6 weighted by abar_t (the default) or the model's own plain DDPM loss."""
    weighted, real = [], sb.diffusion_loss
    monkeypatch.setattr(sb, "diffusion_loss", lambda *a, **kw: weighted.append(kw["abar_weighted"]) or real(*a, **kw))
    _, state, log = run(sd_root, tmp_path / "k1", 2)
    assert weighted == [True, True]
    weighted.clear()
    _, state3, log3 = run(sd_root, tmp_path / "k3", 2, lora_steps=3, lora_loss="plain")
    assert weighted == [False] * 6
    steps = lambda opt: int(next(iter(opt.state.values()))["step"])
    assert (steps(state["opt_lora"]), steps(state3["opt_lora"])) == (2, 6)
    assert steps(state3["opt_student"]) == 2 and len(log3) == 2
    assert log3[0]["loss_student"] == log[0]["loss_student"]  # same first render; the LoRA then differs
    assert log3[1]["loss_lora"] != log[1]["loss_lora"]


@pytest.mark.parametrize("place", [EMA, HostEMA], ids=["on the device", "on the host"])
@pytest.mark.parametrize("kwargs", [{}, {"decay": 0.9}], ids=["EMAModel's defaults", "cap 0.9"])
def test_ema_is_the_authors_at_every_step(kwargs, place):
    """The EMA equals diffusers' EMAModel stepped every step on a student that changes at every step (a 10-step
    cadence is 38% off at step 100 on such a student): constructed with its defaults, as the authors construct it
    (train_swiftbrush.py: no decay given, so 0.9999, Config's default), and with a cap 0.9 that 150 steps reach;
    on the device (one lerp a step) and on the host (a copy and a worker's lerp)."""
    from diffusers.training_utils import EMAModel
    student = torch.nn.Linear(4, 3)
    reference = EMAModel(student.parameters(), **kwargs)
    decay = kwargs.get("decay", sb.Config.ema_decay)
    assert reference.decay == decay  # the authors' 0.9999 is Config's
    ours = place(student)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 151):  # the warm-up reaches the cap 0.9 at s = 80
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=gen))  # drifting: theta changes at every step
        reference.step(student.parameters())
        ours.update(sb.ema_decay_of_step(step, decay))
        if step in (1, 3, 30, 150):
            for (k, v), want in zip(ours.weights().items(), reference.shadow_params):
                assert torch.allclose(v, want, rtol=1e-5, atol=1e-5), (step, k)
    steps = [*range(1, 200), *range(89_985, 90_000), 65_000, 10 ** 6]  # 0.9999 binds from step 89,991 on
    assert [sb.ema_decay_of_step(n, decay) for n in steps] == [reference.get_decay(n) for n in steps]


def test_the_exported_ema_is_the_per_step_ema_of_the_run(sd_root, tmp_path, monkeypatch):
    """unet_ema/ and the checkpoint's EMA are e_n = d_n e_(n-1) + (1 - d_n) theta_n over every step of the run, by
    hand from the student after each step (d_1 = 0: the EMA starts as the student); a run resumed at step 4 ends
    with the same EMA, bit for bit."""
    thetas, real = [], sb.count_step

    def count_step(m, cfg, state):
        thetas.append({k: v.detach().clone() for k, v in m.student.state_dict().items()})
        real(m, cfg, state)

    monkeypatch.setattr(sb, "count_step", count_step)
    cfg = dict(model=sd_root, **{**BASE, "ema_decay": 0.3})
    sb.train(sb.Config(out=str(tmp_path / "six"), steps=6, **cfg), progress=False)
    ema = thetas[0]
    for n, theta in enumerate(thetas[1:], start=2):
        d = min(0.3, n / (n + 9))  # (1 + s) / (10 + s), s = n - 1: 2/11, 3/12, then the cap 0.3
        ema = {k: d * v + (1 - d) * theta[k] for k, v in ema.items()}
    exported = load_file(tmp_path / "six" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(exported[k], v, atol=1e-7) for k, v in ema.items())
    assert not torch.allclose(exported["conv_out.weight"], thetas[-1]["conv_out.weight"], atol=1e-5)
    in_checkpoint = {k[4:]: v for k, v in read_ckpt(tmp_path / "six" / "checkpoint.safetensors")[0].items()
                     if k.startswith("ema/")}
    assert all(torch.equal(in_checkpoint[k], v) for k, v in exported.items())
    sb.train(sb.Config(out=str(tmp_path / "resumed"), steps=4, **cfg), progress=False)
    sb.train(sb.Config(out=str(tmp_path / "resumed"), steps=6, **cfg), progress=False)
    resumed = load_file(tmp_path / "resumed" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(resumed[k], v) for k, v in exported.items())


def test_the_host_ema_does_not_make_the_step_wait_for_its_lerp(monkeypatch):
    """HostEMA.update returns while the worker still lerps (here held back by a lock); the next update waits for it,
    and weights() too; an error in the worker is raised in the training thread. The plan puts the EMA on the host
    only beside a GPU: on the CPU its copy is the host's own work, the lerp the worker's as on CUDA."""
    import memory.ema
    hold, lerps, real = threading.Event(), [], torch._foreach_lerp_

    def held_lerp(ema, live, weight):
        hold.wait()
        lerps.append(weight)
        real(ema, live, weight)

    monkeypatch.setattr(memory.ema.torch, "_foreach_lerp_", held_lerp)
    student = torch.nn.Linear(4, 3)
    ema = HostEMA(student)
    ema.update(0.0)  # returns: the worker waits on `hold`
    assert lerps == [] and not ema.free.is_set()
    threading.Timer(0.2, hold.set).start()
    ema.update(0.5)  # waits for the first lerp, then queues its own
    assert lerps == [1.0] and ema.waited_s > 0.1
    assert torch.equal(ema.weights()["weight"], student.weight) and lerps == [1.0, 0.5]
    ema.buffers = ema.buffers[:1]  # the worker's lerp now fails (two EMA tensors, one buffer)
    ema.update(0.5)
    with pytest.raises(RuntimeError):
        ema.weights()
    alive = weakref.ref(ema)
    del ema  # its worker holds it only while it lerps: the EMA goes with its run
    gc.collect()
    assert alive() is None


def test_adam_steps_are_the_fused_kernel(sd_root, tmp_path, monkeypatch):
    """One kernel for all parameters (no parameter-sized temporaries): both optimisers step through _fused_adam_."""
    calls, real = [], torch._fused_adam_
    monkeypatch.setattr(torch, "_fused_adam_", lambda params, *a, **kw: calls.append(len(params)) or
                        real(params, *a, **kw))
    m, state, _ = run(sd_root, tmp_path, 2)
    assert state["opt_student"].defaults["fused"] and state["opt_lora"].defaults["fused"]
    n_student, n_lora = len(list(m.student.parameters())), len(lora.lora_parameters(m.teacher))
    assert calls == [n_student, n_lora] * 2


def test_sds_mode_has_no_lora(sd_root, tmp_path):
    official = load_file(os.path.join(sd_root, UNET_FILE))
    m, _, log = run(sd_root, tmp_path / "sds", 3, loss="sds")
    assert not lora.lora_layers(m.teacher)
    assert set(m.teacher.state_dict()) == set(official)
    assert any(not torch.equal(m.student.state_dict()[k], official[k]) for k in official)
    tensors, meta = read_ckpt(tmp_path / "sds" / "checkpoint.safetensors")
    assert not any(k.startswith(("lora/", "opt_lora/")) for k in tensors)
    assert set(json.loads(meta["param_groups"])) == {"opt_student"}
    assert len(log) == 3 and not any("loss_lora" in h or "grad_norm_lora" in h for h in log)
    _, _, log = run(sd_root, tmp_path / "sds", 4, loss="sds")  # and an SDS checkpoint resumes
    assert len(log) == 1 and read_ckpt(tmp_path / "sds" / "checkpoint.safetensors")[1]["step"] == "4"


@pytest.mark.parametrize("loss", ["vsd", "sds"])
def test_score_errors_are_logged_and_tell_the_two_scores_apart(sd_root, tmp_path, loss):
    _, _, log = run(sd_root, tmp_path / loss, 2, loss=loss, diagnose_every=1)
    keys = [f"mse_{net}_t{t}" for t in (100, 300, 500, 700, 900) for net in ("psi", "phi")]
    assert all(k in row and np.isfinite(row[k]) and row[k] > 0 for row in log for k in keys)
    same = all(log[-1][f"mse_psi_t{t}"] == log[-1][f"mse_phi_t{t}"] for t in (100, 300, 500, 700, 900))
    assert same == (loss == "sds")  # SDS has no LoRA; VSD's LoRA has moved after a step


def test_resume_is_exact(sd_root, straight6, tmp_path):
    out6 = straight6[0]
    run(sd_root, tmp_path, 3)
    assert read_ckpt(tmp_path / "checkpoint.safetensors")[1]["step"] == "3"
    _, _, log = run(sd_root, tmp_path, 6)  # finds the checkpoint and continues
    assert len(log) == 3
    keys = load_file(str(tmp_path / "checkpoint.safetensors"))
    for prefix in ("student/", "ema/", "lora/", "opt_student/", "opt_lora/", "rng", "order"):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert_same_ckpt(os.path.join(out6, "checkpoint.safetensors"), tmp_path / "checkpoint.safetensors")
    assert read_log(out6) == read_log(tmp_path) and len(read_log(out6)) == 6
    t = load_file(os.path.join(out6, "checkpoint.safetensors"))
    assert any(not torch.equal(t["ema/" + k[8:]], v) for k, v in t.items() if k.startswith("student/"))


def test_cosine_lr_reaches_the_student_and_resumes_exactly(sd_root, tmp_path, monkeypatch):
    cfg = sb.Config(lr=1e-3, steps=4, lr_schedule="cosine")
    assert [sb.student_lr(cfg, n) for n in range(4)] == pytest.approx([1e-3, 8.5355e-4, 5e-4, 1.4645e-4], rel=1e-4)
    assert sb.student_lr(sb.Config(lr=1e-3, steps=4), 3) == 1e-3
    m, state, _ = run(sd_root, tmp_path / "straight", 4, lr_schedule="cosine", save_every=2)
    assert state["opt_student"].param_groups[0]["lr"] == sb.student_lr(cfg, 3)  # the last step's
    constant = run(sd_root, tmp_path / "constant", 4)[0].student.state_dict()
    assert any(not torch.equal(v, constant[k]) for k, v in m.student.state_dict().items())
    real_step = sb.train_step

    def crash_in_step_3(m, cfg, state, autocast):  # after step 2's checkpoint: a run of 4 steps, stopped
        if state["step"] == 2:
            raise RuntimeError("crash")
        return real_step(m, cfg, state, autocast)
    monkeypatch.setattr(sb, "train_step", crash_in_step_3)
    with pytest.raises(RuntimeError, match="crash"):
        run(sd_root, tmp_path / "resumed", 4, lr_schedule="cosine", save_every=2)
    monkeypatch.setattr(sb, "train_step", real_step)
    run(sd_root, tmp_path / "resumed", 4, lr_schedule="cosine", save_every=2)
    assert_same_ckpt(tmp_path / "straight" / "checkpoint.safetensors", tmp_path / "resumed" / "checkpoint.safetensors")


# --------------------------------------------------------------------------------------------------
# Export and sampling


def test_export_loads_with_ours_and_diffusers(straight6):
    from diffusers import UNet2DConditionModel
    out, m, state = straight6
    x, ctx = inputs(seed=11)
    t = torch.tensor([999, 400])
    with torch.no_grad():
        want = m.student(x, t, ctx)
        assert torch.equal(load_unet(os.path.join(out, "unet"))(x, t, ctx), want)
        ema = load_unet(os.path.join(out, "unet_ema"))
        assert all(torch.equal(v, state["ema"].weights()[k]) for k, v in ema.state_dict().items())
        assert not torch.equal(ema(x, t, ctx), want)
        ref = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).eval()
        assert rel_err(want, ref(x, t, encoder_hidden_states=ctx).sample) < 1e-4
    with open(os.path.join(out, "swiftbrush.json")) as f:
        info = json.load(f)
    assert info["param"] == "x0" and info["latent_shape"] == [4, 8, 8]


def test_sample_cli_writes_png(straight6, tmp_path, capsys):
    out = straight6[0]
    png = tmp_path / "s.png"
    sample.main(["--student", out, "--teacher-steps", "2", "--prompt", "a cat", "--prompt", "a dog", "--n", "2",
                 "--out", str(png)])
    img = Image.open(png)
    img.load()
    assert img.size[0] > 32 and img.size[1] > 64  # 4 rows (student and teacher per prompt), 2 columns
    with pytest.raises(SystemExit) as e:
        sample.main(["--student", str(tmp_path), "--prompt", "x", "--out", str(png)])
    assert "swiftbrush.json" in str(e.value.code) and "\n" not in str(e.value.code)
    run(straight6[1].folder, tmp_path / "eps", 1, param="eps")  # sampling refuses what training refuses
    with pytest.raises(SystemExit) as e:
        sample.main(["--student", str(tmp_path / "eps"), "--student-steps", "2", "--prompt", "x", "--out", str(png)])
    assert "eps student" in str(e.value.code) and "\n" not in str(e.value.code)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers_scheduler(sd_root, sd_root_v, pred):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    root = sd_root if pred == "epsilon" else sd_root_v
    ours, schedule = load_unet(root), sb.Schedule(models.scheduler_config(root))
    ref = UNet2DConditionModel.from_pretrained(os.path.join(root, "unet")).eval()
    sched = DDIMScheduler.from_pretrained(os.path.join(root, "scheduler"))
    assert sched.config.prediction_type == pred
    z, ctx = inputs(seed=12)
    uncond = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(13))
    N, s = 4, 3.0
    sched.set_timesteps(N)
    assert sample.ddim_timesteps(schedule, N).tolist() == sched.timesteps.tolist()
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = ref(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.expand(2, -1, -1), ctx])).sample
            u, c = out.chunk(2)
            x = sched.step(u + s * (c - u), t, x, eta=0.0).prev_sample
        got = sample.ddim_sample(ours, schedule, ctx, uncond, z, steps=N, guidance=s)
    assert rel_err(x, got) < 1e-4


# --------------------------------------------------------------------------------------------------
# Beyond the paper: K-step students (--student-steps, backward simulation) and --student-init


def test_trailing_timesteps_are_exactly_k_for_every_k():
    """From T - 1 down, each once, exactly K of them for every K (np.arange's float step gave K + 1 for 62 K of 1000,
    K = 61 the first, the last of them t = -1), with diffusers' values: DMD2's and LCM's 999, 749, 499, 249 for
    K = 4."""
    assert models.trailing_timesteps(1000, 4) == [999, 749, 499, 249]
    assert models.trailing_timesteps(1000, 3) == [999, 666, 332] and models.trailing_timesteps(1000, 1) == [999]
    assert models.trailing_timesteps(1000, 61)[-3:] == [48, 32, 15]
    for T in (1000, 1024):
        for steps in range(1, T + 1):
            ts = models.trailing_timesteps(T, steps)
            assert len(ts) == steps and ts[0] == T - 1 and ts[-1] >= 0 and all(a > b for a, b in zip(ts, ts[1:]))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_k_step_student_is_its_chain_by_hand(sd_root, sd_root_v, pred):
    root = sd_root if pred == "epsilon" else sd_root_v
    m = sb.load_models(sb.Config(model=root, prompts="demo"), CPU)
    z, ctx = inputs(seed=5)
    renoise = list(torch.randn((2, *z.shape), generator=torch.Generator().manual_seed(6)))
    x, ts, x0s = z, [999, 666, 332], []
    with torch.no_grad():
        for j, t in enumerate(ts):  # x0 of Eq. 7 written at t_j, then Eq. 1 at t_(j+1) with fresh noise
            a, s = _abar_by_hand(root, t) ** 0.5, (1 - _abar_by_hand(root, t)) ** 0.5
            out = m.student(x, torch.tensor([t, t]), ctx)
            x0s.append((x - s * out) / a if pred == "epsilon" else a * x - s * out)
            if j < 2:
                abar = _abar_by_hand(root, ts[j + 1])
                x = abar ** 0.5 * x0s[-1] + (1 - abar) ** 0.5 * renoise[j]
        for k in range(3):  # the x0 of step k + 1 after k re-noisings; with all K - 1 of them, the image
            assert rel_err(x0s[k], sb.k_step_x0(m.student, z, renoise[:k], ctx, m.schedule, 3)) < 1e-5
        one_step = sb.f_theta(m.student, z, ctx, m.schedule)
        assert torch.equal(sb.k_step_x0(m.student, z, [], ctx, m.schedule, 1), one_step)


@pytest.mark.parametrize("K", [1, 4])
def test_render_draws_one_k_a_batch_and_runs_the_chain_without_gradient(sd_root, K):
    """K = 1 renders the paper's f_theta(z) and draws only the prompts and z (the bits of a run before
    --student-steps); K = 4 draws k, runs k steps of its own chain without gradient and the step k + 1 with it."""
    cfg = sb.Config(model=sd_root, student_steps=K, **BASE)
    m = sb.load_models(cfg, CPU)
    state = sb.start_training(cfg, m, CPU)
    calls = []
    m.student.register_forward_hook(lambda module, args, out: calls.append((int(args[1][0]), torch.is_grad_enabled())))
    ts, ks = models.trailing_timesteps(1000, K), []
    for _ in range(10):
        replay = {**state, "gen": torch.Generator().set_state(state["gen"].get_state()), "order": state["order"]}
        calls.clear()
        x0, ctx = sb.render(m, cfg, state)
        k, seen = len(calls) - 1, list(calls)  # the UNet calls of render: its chain's k steps, then step k + 1
        assert seen == [(t, False) for t in ts[:k]] + [(ts[k], True)]
        ks.append(k)
        idx = sb.next_prompts(replay, cfg.batch_size)
        z = torch.randn((cfg.batch_size, *m.latent_shape), generator=replay["gen"])
        if K == 1:
            want = sb.f_theta(m.student, z, m.embeddings[idx], m.schedule, cfg.param)
        else:
            assert int(torch.randint(K, (1,), generator=replay["gen"])) == k
            renoise = [torch.randn(z.shape, generator=replay["gen"]) for _ in range(k)]
            want = sb.k_step_x0(m.student, z, renoise, m.embeddings[idx], m.schedule, K)
        assert torch.equal(state["gen"].get_state(), replay["gen"].get_state()) and torch.equal(ctx, m.embeddings[idx])
        assert torch.equal(x0, want) and x0.requires_grad
    assert set(ks) == ({0} if K == 1 else {0, 1, 2, 3})  # every step of the chain is trained


# --------------------------------------------------------------------------------------------------
# Text


def test_encode_prompts_matches_clip_by_hand(sd_root):
    from transformers import CLIPTextModel
    text = load_text(sd_root)
    tok = text.tokenizers[0]
    ref = CLIPTextModel.from_pretrained(os.path.join(sd_root, "text_encoder")).eval()
    L = tok.model_max_length
    prompts = ["a cat, 2", "a red sports car on a mountain road at sunset"]  # the second is truncated
    got = text.encode(prompts, batch_size=1)
    ids = tok(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(got, ref(ids).last_hidden_state)
    # "" -> [BOS, EOS, PAD ...] with the tokenizer's own pad token (SD 2.x pads with "!", not EOS)
    tok.pad_token = "!"
    pad = tok.convert_tokens_to_ids("!")
    assert pad != tok.eos_token_id
    by_hand = torch.tensor([[tok.bos_token_id, tok.eos_token_id] + [pad] * (L - 2)])
    got = text.uncond
    with torch.no_grad():
        assert got.shape == (1, L, 32) and torch.equal(got, ref(by_hand).last_hidden_state)
        assert not torch.equal(got, ref(torch.tensor([[tok.bos_token_id] + [tok.eos_token_id] * (L - 1)])).last_hidden_state)


# --------------------------------------------------------------------------------------------------
# The layout: the design card on top, ideas in folders, imports one way


def _imports(path, top_level_only=False):
    import ast
    tree = ast.parse(open(path).read())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_layout_and_one_way_imports():
    root = os.path.dirname(os.path.abspath(sb.__file__))
    ours = {"unet", "vae", "lora", "swiftbrush", "sample", "formats", "harness", "memory", "miniature", "tools",
            "parity", "evaluation"}
    top = {f for f in os.listdir(root) if f.endswith(".py")}
    assert top == {"swiftbrush.py", "unet.py", "vae.py", "lora.py", "sample.py", "test_swiftbrush.py", "conftest.py"}
    # unet <- vae, lora <- harness <- formats, memory <- swiftbrush <- sample <- evaluation <- miniature
    allowed = {"unet": set(), "vae": {"unet"}, "lora": {"unet"}, "harness": {"unet", "lora", "harness"},
               "formats": {"unet", "vae", "lora", "harness", "formats"},  # lora: a LoRA student's file, read
               "memory": {"unet", "lora", "harness", "memory"},
               "swiftbrush": {"unet", "vae", "lora", "harness", "formats", "memory"},
               "sample": {"unet", "vae", "harness", "formats", "swiftbrush"},
               "evaluation": {"unet", "vae", "harness", "formats", "swiftbrush", "sample", "evaluation"},
               "miniature": {"unet", "vae", "lora", "harness", "formats", "swiftbrush", "sample", "evaluation",
                             "miniature"}}
    for module, may in allowed.items():
        paths = ([os.path.join(root, module, f) for f in os.listdir(os.path.join(root, module))
                  if f.endswith(".py") and not f.startswith("test_")]  # tests may import anything
                 if os.path.isdir(os.path.join(root, module)) else [os.path.join(root, module + ".py")])
        for path in paths:
            assert _imports(path, top_level_only=True) & ours <= may, path
            upward = {"miniature", "evaluation", "swiftbrush"} if module == "swiftbrush" else set()  # see below; __main__
            assert _imports(path) & ours <= may | upward, path
    # swiftbrush.py imports the miniature only inside the function that resolves --model miniature, and evaluation/
    # only inside the one that evaluates students for --eval-captions
    import ast
    tree = ast.parse(open(os.path.join(root, "swiftbrush.py")).read())
    for package, user in (("miniature", "miniature_package"), ("evaluation", "coco_evaluation")):
        users = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                 and any(isinstance(n, ast.ImportFrom) and n.module.startswith(package)
                 or isinstance(n, ast.Import) and n.names[0].name.startswith(package) for n in ast.walk(f))}
        assert users == {user}, package


def _anchors(markdown):
    """The #anchors of a page's headings, as GitHub makes them: lower case, punctuation dropped, spaces to hyphens."""
    import re
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_of_the_docs_is_a_file_of_the_repository():
    """The reader's clone is all there is: README.md's and docs/'s relative links (and images) resolve to files inside
    it, and their #anchors to headings of those files."""
    import re
    root = os.path.dirname(os.path.abspath(sb.__file__))
    pages = ["README.md"] + [os.path.join("docs", f) for f in os.listdir(os.path.join(root, "docs")) if f.endswith(".md")]
    checked = 0
    for page in pages:
        text = open(os.path.join(root, page), encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue  # the web: arXiv, the peers' repositories
            file, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(root, os.path.dirname(page), file)) if file else os.path.join(root, page)
            assert path.startswith(root + os.sep) and os.path.isfile(path), (page, target)
            if anchor:
                assert anchor in _anchors(open(path, encoding="utf-8").read()), (page, target)
            checked += 1
    assert checked > 20


@pytest.mark.parametrize("module, absent", [
    ("swiftbrush", {"miniature", "evaluation", "tools", "sample", "parity"}),
    ("miniature.world", {"sample", "swiftbrush", "evaluation.coco", "evaluation.metrics", "harness", "formats"}),
])
def test_importing_loads_only_what_is_below(module, absent):
    """At import time too, imports go one way: in a fresh interpreter, importing the method loads nothing of the
    miniature, the evaluation or the tools; the miniature's world loads the method neither, only the Frechet
    distance's leaf module of evaluation/ (whose __init__ is a docstring)."""
    import subprocess
    import sys
    probe = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(sb.__file__)))
    loaded = set(json.loads(done.stdout))
    assert not {m for m in loaded if m in absent or m.split(".")[0] in absent}, module
    if module == "miniature.world":
        assert sorted(m for m in loaded if m.split(".")[0] == "evaluation") == ["evaluation", "evaluation.frechet"]
