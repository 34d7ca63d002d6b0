"""SwiftBrush: one-step text-to-image generation by Variational Score Distillation, image-free.

T. H. Nguyen, A. Tran, "SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score
Distillation", CVPR 2024 (arXiv 2312.05239). Read next to the paper: `train_step` is Algorithm 1.

    python swiftbrush.py --model SD_FOLDER --prompts prompts.txt --steps 20000 --out runs/vsd
    python swiftbrush.py --model SD_FOLDER --loss sds ...        # the paper's SDS ablation
    python swiftbrush.py                                         # the miniature (miniature.py), CPU, minutes
"""
import argparse
import copy
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from checkpoint import CheckpointError, export_unet, load_checkpoint, save_checkpoint, truncate_log
from lora import inject_lora, lora_disabled
from unet import UNet, WeightsError, load_unet, read_config

DEMO_PROMPTS = [
    "a photo of a cat sitting on a windowsill", "a red sports car on a mountain road at sunset",
    "a bowl of ramen, studio lighting", "an astronaut riding a horse, digital art",
    "a lighthouse on a cliff during a storm", "a watercolor painting of a fox in the snow",
    "a cozy cabin in the woods, autumn", "a portrait of an old fisherman, photograph",
    "a futuristic city skyline at night, neon lights", "a teddy bear reading a book",
    "a field of sunflowers under a blue sky", "a plate of sushi on a wooden table",
]


class UsageError(ValueError):
    """Bad flags, prompts or output folder; the message says what to do."""


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN/inf; the last good checkpoint is left as it was."""


@dataclass
class Config:
    model: str = None              # local SD folder (diffusers layout); None runs the miniature
    prompts: str = None            # text file, one prompt per line; None: DEMO_PROMPTS
    out: str = "runs/swiftbrush"
    steps: int = 20000
    loss: str = "vsd"              # vsd (Eq. 5) | sds (Eq. 2)
    param: str = "x0"              # x0 (Eq. 7) | eps (raw UNet output as the image): the paper's ablation
    weighting: str = "sigma2"      # w(t) = sigma_t^2 (ProlificDreamer, SwiftBrush) | dmd (DMD's normaliser)
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-6               # student
    lora_lr: float = 1e-3
    lora_rank: int = 64
    lora_alpha: float = 108.0
    lora_targets: str = "to_q,to_v"
    guidance: float = 4.5          # CFG of the teacher eps_psi
    lora_guidance: float = 4.5     # CFG of the LoRA teacher eps_phi
    ema_decay: float = 0.999       # per step; 0 disables the EMA
    resolution: int = None         # pixels; default from the model's config
    seed: int = 0
    save_every: int = 1000
    sample_every: int = 500
    device: str = None             # default: cuda if available


# Flags that may differ between a run and its --resume (everything else must match the checkpoint).
RESUMABLE = {"steps", "save_every", "sample_every", "device", "out"}


# --------------------------------------------------------------------------------------------------
# The DDPM schedule (Eq. 1): x_t = alpha_t * x_0 + sigma_t * eps


class Schedule:
    def __init__(self, config=None):
        c = config or {}
        self.T = T = c.get("num_train_timesteps", 1000)
        kind, b0, b1 = c.get("beta_schedule", "scaled_linear"), c.get("beta_start", 0.00085), c.get("beta_end", 0.012)
        if kind == "scaled_linear":
            betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float64) ** 2
        elif kind == "linear":
            betas = torch.linspace(b0, b1, T, dtype=torch.float64)
        else:
            raise UsageError(f"scheduler: beta_schedule {kind!r} is not supported (scaled_linear or linear)")
        self.prediction_type = c.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UsageError(f"scheduler: prediction_type {self.prediction_type!r} is not supported")
        self.config = c
        self.abar = torch.cumprod(1 - betas, 0).float()
        self.alpha, self.sigma = self.abar.sqrt(), (1 - self.abar).sqrt()

    def at(self, t, x):
        """alpha_t, sigma_t shaped to broadcast against x."""
        t = t.cpu()
        return (self.alpha[t].to(x.device).view(-1, 1, 1, 1), self.sigma[t].to(x.device).view(-1, 1, 1, 1))

    def eps(self, unet_out, x_t, t):
        """The UNet's output as eps: identity for eps-prediction, eps = alpha_t v + sigma_t x_t for v."""
        if self.prediction_type == "epsilon":
            return unet_out
        a, s = self.at(t, x_t)
        return a * unet_out + s * x_t


def read_schedule(folder):
    if not os.path.exists(os.path.join(folder, "scheduler", "scheduler_config.json")):
        return Schedule()  # SD defaults: scaled_linear 0.00085..0.012, T=1000, epsilon
    return Schedule(read_config(folder, "scheduler", "scheduler_config.json")[1])


# --------------------------------------------------------------------------------------------------
# Text: CLIP embeddings, computed once


def load_text(folder):
    from transformers import CLIPTextModel, CLIPTokenizer
    for sub in ("tokenizer", "text_encoder"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise WeightsError(f"{os.path.join(folder, sub)} not found; a Stable Diffusion folder has "
                               f"unet/, vae/, text_encoder/, tokenizer/, scheduler/")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
        encoder = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), use_safetensors=True)
    except Exception as e:
        raise WeightsError(f"cannot load the text encoder/tokenizer from {folder}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return tokenizer, encoder.eval()


@torch.no_grad()
def encode_prompts(tokenizer, encoder, prompts, batch_size=64):
    """Prompts -> last_hidden_state [N, 77, D], padded as SD pads (the pad token is the tokenizer's own)."""
    device = next(encoder.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(prompts[i:i + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out.append(encoder(ids.to(device)).last_hidden_state.float().cpu())
    return torch.cat(out)


def read_prompts(path):
    """UTF-8 text, one prompt per line; blank lines and duplicates ignored."""
    if path is None:
        return list(DEMO_PROMPTS)
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f]
    except FileNotFoundError:
        raise UsageError(f"prompt file {path!r} not found") from None
    except OSError as e:
        raise UsageError(f"cannot read prompt file {path!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"prompt file {path!r} is not UTF-8 text ({e})") from None
    prompts = list(dict.fromkeys(p for p in lines if p))
    if not prompts:
        raise UsageError(f"prompt file {path!r} has no prompts (one prompt per line)")
    return prompts


# --------------------------------------------------------------------------------------------------
# The models of Algorithm 1: student f_theta, teacher eps_psi and LoRA teacher eps_phi (one UNet)


@dataclass
class Models:
    unet: UNet          # teacher weights, frozen; with its LoRA on it is eps_phi, off it is eps_psi
    student: UNet       # f_theta's network, initialised from the teacher (trainable, fp32)
    schedule: Schedule
    prompts: list
    embeddings: torch.Tensor   # [P, L, D] on CPU
    uncond: torch.Tensor       # [1, L, D] embedding of "" (CFG's unconditional branch)
    latent_shape: tuple        # (C, H, W)
    vae: object = None         # None: the model works in pixel space (the miniature)
    history: list = None       # set by train(): the logged dict of every step
    ema: dict = None           # set by train(): the student's EMA state dict (None when --ema-decay 0)

    def decode(self, x0):
        if self.vae is not None:
            self.vae.to(x0.device)  # on CUDA the VAE visits the GPU only to draw the sample grid
        img = decode_latents(self.vae, x0)
        if self.vae is not None:
            self.vae.to("cpu")
        return img


@torch.no_grad()
def decode_latents(vae, x0):
    """x_0 latents -> images in [-1, 1] on the CPU (image = decode(x_0 / scaling_factor)); no VAE: pixels."""
    if vae is not None:
        x0 = vae.decode(x0.to(next(vae.parameters()).dtype) / vae.scaling_factor)
    return x0.float().clamp(-1, 1).cpu()


def load_models(cfg: Config, device):
    """Read the SD folder, encode the prompts once and free the text encoder."""
    unet = load_unet(cfg.model)  # the root or its unet/ folder
    schedule = read_schedule(cfg.model)
    vae = None
    if os.path.isdir(os.path.join(cfg.model, "vae")):
        from vae import load_vae
        vae = load_vae(os.path.join(cfg.model, "vae"))
    prompts = read_prompts(cfg.prompts)
    tokenizer, encoder = load_text(cfg.model)
    embeddings = encode_prompts(tokenizer, encoder.to(device), prompts)
    uncond = encode_prompts(tokenizer, encoder, [""])
    del tokenizer, encoder  # the text encoder is not needed again
    if device.type == "cuda":
        torch.cuda.empty_cache()
    factor = 2 ** (len(vae.config["block_out_channels"]) - 1) if vae is not None else 1
    res = cfg.resolution or unet.config.get("sample_size", 64) * factor
    multiple = factor * 2 ** (len(unet.config["block_out_channels"]) - 1)  # VAE and UNet downsampling
    if res % multiple:
        raise UsageError(f"--resolution {res} must be a multiple of {multiple}")
    latent_shape = (unet.config.get("in_channels", 4), res // factor, res // factor)
    student = copy.deepcopy(unet)
    return Models(unet, student, schedule, prompts, embeddings, uncond, latent_shape, vae)


def autocast_for(device):
    """bf16 autocast on CUDA; plain fp32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def f_theta(student, z, context, schedule, param="x0"):
    """The one-step generator. Eq. 7 (x0): f = (z - sigma_T eps_theta(z, T, y)) / alpha_T, with x_T = z."""
    T = torch.full((z.shape[0],), schedule.T - 1, device=z.device, dtype=torch.long)
    out = student(z, T, context)
    if param == "eps":  # the ablation: the raw network output is the image
        return out
    alpha_T, sigma_T = schedule.at(T, z)
    return (z - sigma_T * schedule.eps(out, z, T)) / alpha_T


def eps_cfg(unet, x_t, t, context, uncond, scale, schedule):
    """Classifier-free guidance: eps_u + s * (eps_c - eps_u), both branches in one batch."""
    if scale == 1.0:
        return schedule.eps(unet(x_t, t, context), x_t, t)
    x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])
    out = schedule.eps(unet(x2, t2, torch.cat([uncond.expand(x_t.shape[0], -1, -1), context])), x2, t2)
    eps_u, eps_c = out.float().chunk(2)
    return eps_u + scale * (eps_c - eps_u)


def score_gradient(m: Models, cfg: Config, x0, context, gen):
    """Steps 2-3 of Algorithm 1: g = w(t) * (eps_psi - eps_phi) (Eq. 5, VSD) or w(t) * (eps_psi - eps) (Eq. 2, SDS)."""
    sched, B = m.schedule, x0.shape[0]
    t = torch.randint(int(0.02 * sched.T), int(0.98 * sched.T) + 1, (B,), generator=gen).to(x0.device)  # U(0.02T, 0.98T)
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    alpha_t, sigma_t = sched.at(t, x0)
    x_t = alpha_t * x0 + sigma_t * eps  # Eq. 1
    uncond = m.uncond.to(x0.device)
    with torch.no_grad():
        with lora_disabled(m.unet):
            eps_psi = eps_cfg(m.unet, x_t, t, context, uncond, cfg.guidance, sched)
        eps_fake = eps if cfg.loss == "sds" else eps_cfg(m.unet, x_t, t, context, uncond, cfg.lora_guidance, sched)
    if cfg.weighting == "sigma2":
        w = sigma_t ** 2
    else:  # DMD (Yin et al. 2024): (x0_fake - x0_psi) / mean|x0 - x0_psi|, written in eps
        x0_psi = (x_t - sigma_t * eps_psi) / alpha_t
        w = sigma_t / alpha_t / (x0 - x0_psi).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5)
    return torch.nan_to_num(w * (eps_psi - eps_fake))


def surrogate_loss(x0, g):
    """0.5 * ||x0 - sg(x0 - g)||^2 (mean): its gradient w.r.t. x0 is g / x0.numel(), i.e. the step follows g."""
    return 0.5 * F.mse_loss(x0, (x0 - g).detach())


def diffusion_loss(unet, x0, context, uncond, schedule, gen, p_uncond=0.1, abar_weighted=True):
    """Eq. 6 (and plain DDPM training): ||eps_phi(alpha_t sg(x0) + sigma_t eps, t, y) - eps||^2.

    Weighted by abar_t = alpha_t^2 as the authors do; the prompt is dropped to "" with probability
    p_uncond so the unconditional branch used by CFG keeps learning the student's distribution too."""
    B = x0.shape[0]
    t = torch.randint(0, schedule.T, (B,), generator=gen).to(x0.device)
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    drop = (torch.rand(B, generator=gen) < p_uncond).to(x0.device).view(B, 1, 1)
    context = torch.where(drop, uncond.to(x0.device).expand_as(context), context)
    alpha_t, sigma_t = schedule.at(t, x0)
    x_t = alpha_t * x0.detach() + sigma_t * eps
    pred = schedule.eps(unet(x_t, t, context), x_t, t).float()
    w = alpha_t if abar_weighted else 1.0
    return F.mse_loss(w * pred, w * eps)


def _apply(opt, name, loss, state, logs):
    """Check the loss and gradient are finite, clip to norm 1, step, free the gradients."""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"loss_{name} became {loss} at step {state['step'] + 1}")
    norm = torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0).item()
    if not math.isfinite(norm):
        raise TrainingDiverged(f"the {name} gradient norm became {norm} at step {state['step'] + 1}")
    opt.step()
    opt.zero_grad(set_to_none=True)
    logs[f"grad_norm_{name}"] = norm


def train_step(m: Models, cfg: Config, state, opt_student, opt_lora, gen, autocast):
    """Algorithm 1, one iteration (over cfg.grad_accum micro-batches). Returns the numbers to log.

    The student is stepped (and its gradients freed) before the LoRA pass: one UNet of gradients less at the peak."""
    losses = {"loss_student": 0.0, **({"loss_lora": 0.0} if cfg.loss == "vsd" else {})}
    device = next(m.student.parameters()).device
    renders = []  # (sg(x0), y) of each micro-batch, for step 5
    for _ in range(cfg.grad_accum):
        idx = next_prompts(state, cfg.batch_size, gen)
        context = m.embeddings[idx].to(device)
        z = torch.randn((cfg.batch_size, *m.latent_shape), generator=gen).to(device)
        with autocast:
            x0 = f_theta(m.student, z, context, m.schedule, cfg.param).float()  # step 1: x0 = f_theta(z, y)
            g = score_gradient(m, cfg, x0.detach(), context, gen)                 # steps 2-3
        loss = surrogate_loss(x0, g)                                              # step 4: d loss / d x0 = g
        (loss / cfg.grad_accum).backward()
        losses["loss_student"] += loss.item() / cfg.grad_accum
        renders.append((x0.detach(), context))
    grads = {}
    _apply(opt_student, "student", losses["loss_student"], state, grads)
    if opt_lora is not None:                                                      # step 5: Eq. 6 on sg(x0)
        for x0, context in renders:
            with autocast:
                loss_phi = diffusion_loss(m.unet, x0, context, m.uncond, m.schedule, gen)
            (loss_phi / cfg.grad_accum).backward()
            losses["loss_lora"] += loss_phi.item() / cfg.grad_accum
        _apply(opt_lora, "lora", losses["loss_lora"], state, grads)
    return {**losses, **grads}


def next_prompts(state, n, gen):
    """The next n prompt indices of a shuffled epoch; a new permutation when one runs out."""
    idx = []
    while len(idx) < n:
        if state["cursor"] >= len(state["order"]):
            state["order"], state["cursor"] = torch.randperm(len(state["order"]), generator=gen), 0
        take = state["order"][state["cursor"]:state["cursor"] + n - len(idx)]
        idx += take.tolist()
        state["cursor"] += len(take)
    return torch.tensor(idx)


# --------------------------------------------------------------------------------------------------
# The training loop


def train(cfg: Config, models: Models = None, progress=True):
    """Run Algorithm 1 for cfg.steps iterations in total (continuing a checkpoint in cfg.out if present).

    Returns the Models: the student trained, with `history` and `ema` filled in."""
    from tqdm import tqdm
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    m = models or load_models(cfg, device)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt = os.path.join(cfg.out, "checkpoint.safetensors")
    has_ckpt = os.path.exists(ckpt)

    # Teacher: frozen (half precision on CUDA); LoRA teacher: the same UNet plus a LoRA (fp32 params).
    m.unet.requires_grad_(False).to(device, torch.bfloat16 if cuda else torch.float32)
    m.student.requires_grad_(True).to(device, torch.float32).train()  # fp32 master weights: lr 1e-6 vanishes in bf16
    m.unet.gradient_checkpointing = m.student.gradient_checkpointing = cuda
    opt_lora = None
    if cfg.loss == "vsd":
        torch.manual_seed(cfg.seed)  # LoRA init
        try:
            phi = inject_lora(m.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","))
        except ValueError as e:
            raise UsageError(f"--lora-targets {cfg.lora_targets!r}: {e}") from None
        m.unet.train()
        opt_lora = torch.optim.Adam(phi, lr=cfg.lora_lr, betas=(0.9, 0.999), weight_decay=0.0)
    opt_student = torch.optim.Adam(m.student.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    # The EMA lives on the CPU (it is not needed by the step) and is updated every EMA_EVERY steps.
    ema = {k: v.detach().float().cpu().clone() for k, v in m.student.state_dict().items()} if cfg.ema_decay > 0 else None

    gen = torch.Generator().manual_seed(cfg.seed)  # all of the loop's randomness: resumable exactly
    state = {"step": 0, "cursor": 0, "order": torch.randperm(len(m.prompts), generator=gen)}
    if has_ckpt:
        load_checkpoint(ckpt, asdict(cfg), RESUMABLE, m.prompts, m.student, m.unet, ema, opt_student, opt_lora,
                        state, gen)
        truncate_log(os.path.join(cfg.out, "log.jsonl"), state["step"])
    _write_run_info(cfg, m)

    autocast = autocast_for(device)
    bar = tqdm(total=cfg.steps, initial=state["step"], disable=not progress, desc=f"{cfg.loss}-{cfg.param}",
               dynamic_ncols=True)
    history, log = [], open(os.path.join(cfg.out, "log.jsonl"), "a")
    save = lambda: (save_checkpoint(ckpt, asdict(cfg), m.prompts, m.student, m.unet, ema, opt_student, opt_lora,
                                    state, gen), _export(cfg, m, ema))
    interrupted = []
    main_thread = threading.current_thread() is threading.main_thread()  # signals can only be caught there
    if main_thread:
        old_handler = signal.signal(signal.SIGINT, lambda *a: interrupted.append(1))  # finish the step, then save
    try:
        while state["step"] < cfg.steps and not interrupted:
            t0 = time.time()
            logs = train_step(m, cfg, state, opt_student, opt_lora, gen, autocast)
            state["step"] += 1
            if ema is not None and state["step"] % EMA_EVERY == 0:
                update_ema(ema, m.student, cfg.ema_decay ** EMA_EVERY)
            logs = {"step": state["step"], **logs, "lr": cfg.lr, **({"lora_lr": cfg.lora_lr} if opt_lora else {}),
                    "sec_per_step": round(time.time() - t0, 4)}
            log.write(json.dumps(logs) + "\n")
            history.append(logs)
            bar.update(1)
            bar.set_postfix({k[5:]: f"{v:.3g}" for k, v in logs.items() if k.startswith("loss_")})
            if cfg.sample_every and state["step"] % cfg.sample_every == 0:
                sample_grid(m, cfg, os.path.join(cfg.out, "samples", f"step_{state['step']:06d}.png"))
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < cfg.steps:
                log.flush()
                save()
        log.flush()
        save()
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, old_handler)
        log.close()
        bar.close()
    if interrupted:
        print(f"interrupted at step {state['step']}: checkpoint saved in {ckpt}; continue with --resume", file=sys.stderr)
        raise KeyboardInterrupt
    m.history, m.ema = history, ema
    return m


EMA_EVERY = 10


@torch.no_grad()
def update_ema(ema, student, decay):
    for k, v in student.state_dict().items():
        ema[k].lerp_(v.detach().float().cpu(), 1 - decay)


def _export(cfg, m, ema):
    export_unet(m.student.state_dict(), m.student.config, os.path.join(cfg.out, "unet"))
    if ema is not None:
        export_unet(ema, m.student.config, os.path.join(cfg.out, "unet_ema"))


def _write_run_info(cfg, m):
    """What sample.py needs to turn the exported UNet back into the one-step generator."""
    info = {"model": os.path.abspath(cfg.model), "param": cfg.param, "latent_shape": list(m.latent_shape),
            "config": asdict(cfg)}
    with open(os.path.join(cfg.out, "swiftbrush.json"), "w") as f:
        json.dump(info, f, indent=2)


@torch.no_grad()
def sample_grid(m: Models, cfg: Config, path, n_prompts=4, n_seeds=2):
    """Student samples for fixed prompts (the first ones) and fixed seeds, one row per seed."""
    from sample import save_grid
    device = next(m.student.parameters()).device
    k = min(n_prompts, len(m.prompts))
    rows = []
    for seed in range(n_seeds):
        z = torch.randn((k, *m.latent_shape), generator=torch.Generator().manual_seed(seed)).to(device)
        with autocast_for(device):
            x0 = f_theta(m.student, z, m.embeddings[:k].to(device), m.schedule, cfg.param)
        rows.append(m.decode(x0).cpu())
    save_grid(rows, path)


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local Stable Diffusion folder (diffusers layout); omit to run the miniature")
    p.add_argument("--prompts", help="text file, one prompt per line (default: a small built-in list)")
    p.add_argument("--out", default=None, help=f"output folder (default {d.out}; miniature: runs/miniature)")
    p.add_argument("--steps", type=int, default=None, help=f"total training iterations (default {d.steps})")
    p.add_argument("--loss", choices=["vsd", "sds"], default=d.loss, help="VSD (Eq. 5) or SDS (Eq. 2)")
    p.add_argument("--param", choices=["x0", "eps"], default=d.param, help="student output: Eq. 7 x0, or raw eps")
    p.add_argument("--weighting", choices=["sigma2", "dmd"], default=d.weighting, help="w(t): sigma_t^2 or DMD's")
    for name, kind in (("batch_size", int), ("grad_accum", int), ("lr", float), ("lora_lr", float),
                       ("lora_rank", int), ("lora_alpha", float), ("guidance", float), ("lora_guidance", float),
                       ("ema_decay", float), ("seed", int), ("save_every", int), ("sample_every", int)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(d, name),
                       help=f"default {getattr(d, name)}")
    p.add_argument("--lora-targets", default=d.lora_targets, help="comma-separated Linear names to adapt")
    p.add_argument("--resolution", type=int, help="image size in pixels (default: the model's)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out up to --steps")
    p.add_argument("--quick", action="store_true", help="miniature only: a fast smoke run")
    a = p.parse_args(argv)
    for name in ("steps", "resolution"):
        if getattr(a, name) is not None and getattr(a, name) <= 0:
            p.error(f"--{name} must be positive")
    for name in ("batch_size", "grad_accum", "lora_rank"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    for name in ("lr", "lora_lr", "lora_alpha"):
        if not (getattr(a, name) > 0 and math.isfinite(getattr(a, name))):
            p.error(f"--{name.replace('_', '-')} must be a positive number, got {getattr(a, name)}")
    for name in ("guidance", "lora_guidance"):
        if not math.isfinite(getattr(a, name)):
            p.error(f"--{name.replace('_', '-')} must be a finite number, got {getattr(a, name)}")
    if not 0 <= a.ema_decay < 1:
        p.error("--ema-decay must be in [0, 1)")
    if a.save_every < 0 or a.sample_every < 0:
        p.error("--save-every and --sample-every must be >= 0 (0: never)")
    if a.model is None and (a.prompts or a.resume):
        p.error("--prompts and --resume need --model (without --model the miniature runs)")
    if a.model is not None and a.quick:
        p.error("--quick is for the miniature (no --model)")
    return a


def config_from_args(a):
    cfg = Config(**{f.name: getattr(a, f.name) for f in fields(Config) if getattr(a, f.name, None) is not None})
    ckpt = os.path.join(cfg.out, "checkpoint.safetensors")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out!r} exists and is not a folder")
    if os.path.exists(ckpt) and not a.resume:
        raise UsageError(f"{cfg.out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    if a.resume and not os.path.exists(ckpt):
        raise UsageError(f"--resume: no checkpoint in {cfg.out}")
    return cfg


def main(argv=None):
    a = parse_args(argv)
    try:
        if a.model is None:
            import miniature
            return miniature.main(a)
        cfg = config_from_args(a)
        train(cfg)
        print(f"done: {cfg.steps} steps; student in {os.path.join(cfg.out, 'unet')} (EMA: unet_ema); "
              f"sample with: python sample.py --student {cfg.out} --prompt \"...\"")
    except (UsageError, WeightsError, CheckpointError) as e:
        sys.exit(f"swiftbrush: error: {e}")
    except TrainingDiverged as e:
        sys.exit(f"swiftbrush: training diverged: {e}. The last good checkpoint is untouched; try a lower --lr "
                 f"or --lora-lr and --resume")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
