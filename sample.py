"""Sampling: the one-step student f_theta (or a K-step student), and the multi-step teacher (DDIM + classifier-free
guidance).

    python sample.py --student runs/vsd --prompt "a cat" --n 4                     # one step (a K-step run: K)
    python sample.py --student runs/vsd --prompt "a cat" --teacher-steps 25        # + the teacher, side by side
    python sample.py --model SD_FOLDER_OR_HUB_ID --teacher-steps 25 --prompt "a cat" # the teacher alone

--student: a run folder, or any export of one (python -m formats.export): its pipeline/ folder, student.safetensors,
or a UNet alone (student-unet.safetensors, a unet/ folder) with --model, the teacher that gives the VAE and text; a
LoRA student's student-lora.safetensors with --model, the teacher or any finetune of it (--lora-strength).
--model: a folder, a hub id or a single file, as for swiftbrush.py.
"""
import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from harness.images import save_grid
from formats.export import read_student
from formats.models import latent_shape, resolve_model, scheduler_config, trailing_timesteps
from formats.text import load_text
from harness.flags import AT_LEAST_1, UsageError
from swiftbrush import Schedule, autocast_for, chain_noises, eps_cfg, k_step_x0
from unet import UNet, WeightsError, load_unet
from vae import load_vae, pixels_per_latent, to_images


def ddim_timesteps(schedule, steps):
    """The timesteps of an N-step DDIM (Song et al. 2021) as diffusers spaces them ("leading" by default)."""
    T, c = schedule.T, schedule.config
    spacing = c.get("timestep_spacing", "leading")
    if spacing == "leading":
        ts = np.arange(steps)[::-1] * (T // steps) + c.get("steps_offset", 0)
    elif spacing == "trailing":
        ts = np.array(trailing_timesteps(T, steps))
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()[::-1]
    else:
        raise UsageError(f"scheduler: timestep_spacing {spacing!r} is not supported")
    return torch.from_numpy(ts.astype(np.int64).copy())


@torch.no_grad()
def ddim_sample(unet, schedule, context, uncond, z, steps=25, guidance=4.5):
    """Deterministic DDIM (eta = 0) from x_T = z with CFG; returns x_0 (latents)."""
    T, abar = schedule.T, schedule.abar
    final = 1.0 if schedule.config.get("set_alpha_to_one", False) else abar[0].item()
    x = z
    for t in ddim_timesteps(schedule, steps).tolist():
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = eps_cfg(unet, x, tt, context, uncond, guidance, schedule)
        a_t = abar[t].item()
        a_prev = abar[t - T // steps].item() if t - T // steps >= 0 else final
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5  # Eq. 1 solved for x_0
        if schedule.config.get("clip_sample", False):
            r = schedule.config.get("clip_sample_range", 1.0)
            x0 = x0.clamp(-r, r)
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


def load_student(a):
    """The StoredStudent of --student (formats/export.read_student: a run, any export of one, a Stable Diffusion
    folder or a UNet alone), with the folder of the model that gives the VAE, text encoder and schedule."""
    model = resolve_model(a.model, a.prediction_type) if a.model else None
    is_run = os.path.exists(os.path.join(a.student, "swiftbrush.json"))
    if a.teacher_steps and model is None and not is_run:
        raise UsageError(f"--teacher-steps with --student {a.student}: pass --model, the teacher to sample")
    try:
        student = read_student(a.student, model, a.prediction_type, a.ema, a.lora_strength)
    except UsageError as e:  # it names the path: this names the flag
        raise UsageError(f"--student {e}") from None
    if student.model is None:
        raise UsageError(f"--student {a.student} is a UNet alone: pass --model, the teacher it was distilled from")
    return student


def model_flags(p):
    """The flags that say what to sample and how, shared with `python -m evaluation`."""
    p.add_argument("--student", help="output folder of swiftbrush.py, or an export of one (one-step generation)")
    p.add_argument("--model", help="Stable Diffusion folder, hub id or single file (teacher); default: the student's")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="a single file's, which the file does not say (default epsilon: SD 1.x, 2.x-base)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, help="pixels (default: the run's; else the model's, e.g. 512 for SD 2.1-base)")
    p.add_argument("--teacher-steps", type=int, default=0, help="the teacher (--model) with N DDIM steps + CFG")
    p.add_argument("--student-steps", type=AT_LEAST_1,
                   help="sample the student in K steps (default: the K it was trained with, which a run and its "
                        "exports record; 1 for a UNet alone)")
    p.add_argument("--guidance", type=float, default=4.5, help="the teacher's CFG scale")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the student's EMA weights")
    p.add_argument("--lora-strength", type=float, default=1.0,
                   help="a LoRA student's file as --student, applied to --model at this strength (1: the student "
                        "trained; --model may be any finetune of the teacher's architecture)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_flags(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts (one grid row each)")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--out", default="sample.png")
    a = p.parse_args(argv)
    if not a.student and not (a.model and a.teacher_steps):
        p.error("give --student OUT_DIR, or --model FOLDER with --teacher-steps N")
    if a.n < 1 or a.teacher_steps < 0:
        p.error("--n must be >= 1 and --teacher-steps >= 0")
    try:
        images = generate(a)
    except (UsageError, WeightsError) as e:
        sys.exit(f"sample: error: {e}")
    rows, labels = zip(*images)
    save_grid(list(rows), a.out, labels=list(labels) if len(rows) > 1 else None)
    print(a.out)


@dataclass
class Generator:
    """What images are sampled with: the student (one step or K) and/or the teacher (DDIM + CFG), the VAE, the
    text."""
    student: UNet              # None: the teacher alone
    param: str                 # the student's output: x0 (Eq. 7) or eps
    steps: int                 # the student's K (1: one step, Eq. 7)
    student_schedule: Schedule # the teacher's, with the student's own prediction type
    teacher: UNet              # None unless --teacher-steps
    vae: object                # None: pixel space (the miniature)
    schedule: Schedule         # the teacher's
    text: object               # formats/text.Text: prompts -> context and CFG's uncond, its encoders on the device
    latent_shape: tuple        # (C, H, W) of x_0
    device: torch.device


def load_generator(a):
    """The models of --student and/or --model with --teacher-steps, on --device."""
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    stored = load_student(a) if a.student else None
    steps = a.student_steps or (stored.steps if stored else 1)
    if steps > 1 and stored and stored.param == "eps":  # as training refuses it (swiftbrush.check_recipe)
        raise UsageError(f"--student-steps {steps}: {a.student} is an eps student (--param eps), whose output is no "
                         f"x0 to re-noise: it samples in one step")
    student, shape = (stored.unet, stored.latent_shape) if stored else (None, None)
    model = stored.model if stored else resolve_model(a.model, a.prediction_type)
    schedule = Schedule(scheduler_config(model))
    student_schedule = schedule.predicting(stored.prediction_type if stored else None)
    vae = None
    if os.path.isdir(os.path.join(model, "vae")):  # fp32 on every device, as diffusers decodes SDXL (force_upcast:
        vae = load_vae(os.path.join(model, "vae")).to(device)  # it overflows fp16; bf16 would round the image)
    teacher = load_unet(model, dtype).to(device) if a.teacher_steps else None
    unet = teacher if student is None else student
    c = shape if shape and not a.resolution else latent_shape(unet, vae, a.resolution)
    pixels = [side * (pixels_per_latent(vae.config) if vae else 1) for side in c[1:]]
    text = load_text(model, pixels).to(device)  # SDXL: conditioned on the size it makes; fp32 everywhere, as in
                                                # training (the authors encode prompts in fp32)
    student = student.to(device) if student is not None else None
    return Generator(student, stored.param if stored else None, steps, student_schedule, teacher, vae, schedule,
                     text, c, device)


@torch.no_grad()
def sample_images(g, z, context, teacher_steps=0, guidance=4.5, renoise=()):
    """Images in [-1, 1] on the CPU from x_T = z: the student's one step (or its K, re-noised with the K - 1 noises
    `renoise`), or the teacher's DDIM + CFG."""
    z, context = z.to(g.device), context.to(g.device)
    if not teacher_steps:  # fp32, no autocast: Eq. 7 multiplies the error of its eps by sigma_T / alpha_T
        renoise = [eps.to(g.device) for eps in renoise]
        return to_images(g.vae, k_step_x0(g.student, z, renoise, context, g.student_schedule, g.steps, g.param))
    with autocast_for(g.device):  # 25 steps: bf16 on CUDA
        x0 = ddim_sample(g.teacher, g.schedule, context, g.text.uncond, z, teacher_steps, guidance)
    return to_images(g.vae, x0)


def generate(a):
    g = load_generator(a)
    context = g.text.encode(a.prompt)
    out = []
    for i, prompt in enumerate(a.prompt):  # z, then a K-step student's noises: as diffusers' pipeline draws them
        z, renoise = chain_noises((a.n, *g.latent_shape), g.steps, torch.Generator().manual_seed(a.seed + i))
        ctx = context[i:i + 1].expand(a.n, -1, -1)
        if g.student is not None:
            out.append((sample_images(g, z, ctx, renoise=renoise), f"{prompt} ({g.steps} step{'s' * (g.steps > 1)})"))
        if g.teacher is not None:
            images = sample_images(g, z, ctx, a.teacher_steps, a.guidance)
            out.append((images, f"{prompt} (teacher, {a.teacher_steps} steps)"))
    return out


if __name__ == "__main__":
    main()
