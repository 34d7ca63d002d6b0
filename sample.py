"""Sampling: the one-step student f_theta, and the multi-step teacher (DDIM + classifier-free guidance).

    python sample.py --student runs/vsd --prompt "a cat" --n 4                     # one step
    python sample.py --student runs/vsd --prompt "a cat" --teacher-steps 25        # + the teacher, side by side
    python sample.py --model SD_FOLDER --teacher-steps 25 --prompt "a cat"         # the teacher alone
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from swiftbrush import UsageError, autocast_for, decode_latents, eps_cfg, encode_prompts, f_theta, load_text, read_schedule
from unet import WeightsError, load_unet


def ddim_timesteps(schedule, steps):
    """The timesteps of an N-step DDIM (Song et al. 2021) as diffusers spaces them ("leading" by default)."""
    T, c = schedule.T, schedule.config
    spacing = c.get("timestep_spacing", "leading")
    if spacing == "leading":
        ts = np.arange(steps)[::-1] * (T // steps) + c.get("steps_offset", 0)
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)) - 1
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


def save_grid(rows, path, labels=None, pad=2):
    """PNG grid: one row per tensor [N,3,H,W] in [-1,1], optional label left of each row. Returns the PIL image.

    Small images are upscaled with nearest neighbour (16 px -> 64 px) so single pixels stay visible; images of 64 px
    or more (e.g. 512 px Stable Diffusion samples) are kept at their size.
    """
    h, w = rows[0].shape[-2:]
    assert all(r.shape[-2:] == (h, w) for r in rows), "all rows must share one image size"
    scale = max(1, 64 // max(h, w))
    ch, cw = h * scale, w * scale
    font = ImageFont.load_default()
    draw0 = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lw = max((draw0.textbbox((0, 0), s, font=font)[2] for s in labels), default=0) + 2 * pad if labels else 0
    ncol = max(r.shape[0] for r in rows)
    grid = Image.new("RGB", (lw + ncol * (cw + pad) + pad, len(rows) * (ch + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, r in enumerate(rows):
        y = pad + i * (ch + pad)
        if labels:
            draw.text((pad, y + ch // 2), str(labels[i]), fill=(0, 0, 0), font=font, anchor="lm")
        arr = ((r.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for j, a in enumerate(arr):
            tile = Image.fromarray(a).resize((cw, ch), Image.NEAREST)
            grid.paste(tile, (lw + pad + j * (cw + pad), y))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    return grid


def _moving_average(y, window):
    """Centred moving average; the window shrinks at the ends instead of padding."""
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(len(y))
    lo, hi = np.clip(i - window // 2, 0, len(y)), np.clip(i + window // 2 + 1, 0, len(y))
    return (c[hi] - c[lo]) / (hi - lo)


PLOT_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def save_plot(curves, path, title="", size=(640, 400), smooth=None):
    """Line plot PNG of curves {name: [(x, y), ...]} with PIL only. Returns the PIL image.

    Noisy curves (training losses) are drawn faintly as they are and boldly smoothed with a centred moving average
    (window `smooth`, by default 1/20 of the points). Non-finite points are dropped. Axes carry min/max labels.
    """
    W, H = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", size, (255, 255, 255))
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    data = {k: np.array([(x, y) for x, y in v if math.isfinite(x) and math.isfinite(y)], dtype=float).reshape(-1, 2)
            for k, v in curves.items()}
    pts = np.concatenate(list(data.values()) + [np.zeros((0, 2))])
    (x0, y0), (x1, y1) = (pts.min(0), pts.max(0)) if len(pts) else ((0, 0), (1, 1))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)  # a flat curve still gets a range
    to_px = lambda x, y: (left + (x - x0) / (x1 - x0) * (W - left - right),
                          H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))
    draw.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    draw.text((W // 2, 5), title, fill=(0, 0, 0), font=font, anchor="mt")
    for v, yy in ((y0, H - bottom), (y1, top)):
        draw.text((left - 5, yy), f"{v:.4g}", fill=(0, 0, 0), font=font, anchor="rm")
    for v, xx in ((x0, left), (x1, W - right)):
        draw.text((xx, H - bottom + 5), f"{v:.4g}", fill=(0, 0, 0), font=font, anchor="mt")
    for i, (name, d) in enumerate(data.items()):
        color = PLOT_COLORS[i % len(PLOT_COLORS)]
        if len(d) == 0:
            continue
        window = smooth or max(1, len(d) // 20)
        if window > 1:
            faint = tuple(int(c + (255 - c) * 0.7) for c in color)
            draw.line([to_px(x, y) for x, y in d], fill=faint, width=1)
            d = np.stack([d[:, 0], _moving_average(d[:, 1], window)], 1)
        draw.line([to_px(x, y) for x, y in d], fill=color, width=2)
        if len(d) == 1:
            px, py = to_px(*d[0])
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        ly = top + 8 + 14 * i  # legend, top right inside the axes
        draw.line([W - right - 110, ly, W - right - 90, ly], fill=color, width=2)
        draw.text((W - right - 85, ly), str(name), fill=(0, 0, 0), font=font, anchor="lm")
    img.save(path)
    return img


def load_run(student_dir, ema=True):
    """The exported student of a swiftbrush.py run and the model folder it was distilled from."""
    info_path = os.path.join(student_dir, "swiftbrush.json")
    if not os.path.exists(info_path):
        raise UsageError(f"{student_dir} is not a swiftbrush.py output folder (no swiftbrush.json)")
    with open(info_path) as f:
        info = json.load(f)
    sub = "unet_ema" if ema and os.path.isdir(os.path.join(student_dir, "unet_ema")) else "unet"
    return load_unet(os.path.join(student_dir, sub)), info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", help="output folder of swiftbrush.py (one-step generation)")
    p.add_argument("--model", help="Stable Diffusion folder (teacher); default: the one the student came from")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts (one grid row each)")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-steps", type=int, default=0, help="also (or only) sample the teacher with N DDIM steps")
    p.add_argument("--guidance", type=float, default=4.5, help="the teacher's CFG scale")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the student's EMA weights")
    p.add_argument("--out", default="sample.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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


def generate(a):
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    student, info = load_run(a.student, a.ema) if a.student else (None, None)
    model = a.model or info["model"]
    schedule = read_schedule(model)
    tokenizer, encoder = load_text(model)
    context, uncond = encode_prompts(tokenizer, encoder, a.prompt), encode_prompts(tokenizer, encoder, [""])
    vae = None
    if os.path.isdir(os.path.join(model, "vae")):
        from vae import load_vae
        vae = load_vae(os.path.join(model, "vae"), dtype).to(device)
    teacher = load_unet(model, dtype).to(device) if a.teacher_steps else None
    c = (info or {}).get("latent_shape") or [teacher.config.get("in_channels", 4)] + [teacher.config.get("sample_size", 64)] * 2
    autocast = autocast_for(device)
    student = student.to(device, dtype) if student is not None else None
    out = []
    for i, prompt in enumerate(a.prompt):
        z = torch.randn((a.n, *c), generator=torch.Generator().manual_seed(a.seed + i)).to(device)
        ctx = context[i:i + 1].expand(a.n, -1, -1).to(device)
        with torch.no_grad(), autocast:
            if student is not None:
                x0 = f_theta(student, z, ctx, schedule, info["param"])
                out.append((decode_latents(vae, x0), f"{prompt} (1 step)"))
            if teacher is not None:
                x0 = ddim_sample(teacher, schedule, ctx, uncond.to(device), z, a.teacher_steps, a.guidance)
                out.append((decode_latents(vae, x0), f"{prompt} (teacher, {a.teacher_steps} steps)"))
    return out


if __name__ == "__main__":
    main()
