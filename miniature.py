"""The miniature: SwiftBrush end to end on a laptop CPU, in minutes, measured against a known truth.

`python swiftbrush.py` (no --model) runs this. It
1. trains a tiny teacher on the synthetic world of world.py (16x16 RGB shapes with captions), with the same
   UNet (unet.py), DDPM schedule and diffusion loss (swiftbrush.py) as the real thing, a small frozen random
   CLIP text encoder (transformers) and a tokenizer written by world.py; pixel space, no VAE. The teacher is
   saved as a Stable Diffusion folder (unet/, text_encoder/, tokenizer/, scheduler/) and cached;
2. distils it with `swiftbrush.train`, the very loop used on Stable Diffusion: VSD + x0 student (SwiftBrush),
   SDS + x0 student, VSD + eps student (the paper's ablation);
3. scores every method against the world's truth on fixed prompts and seeds and prints the table.
"""
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict

import torch

import world
from checkpoint import export_unet
from sample import ddim_sample, save_grid, save_plot
from swiftbrush import Config, Schedule, diffusion_loss, encode_prompts, f_theta, load_text, read_schedule, train
from unet import UNet, load_unet

MAX_LENGTH = 8  # tokens: "a yellow triangle" is 5 with bos/eos
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "in_channels": 3, "out_channels": 3, "sample_size": world.RES,
    "block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": 1, "cross_attention_dim": 32,
    "norm_num_groups": 8, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
TEXT_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
SCHEDULER_CONFIG = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon", "clip_sample": False,
                    "set_alpha_to_one": False, "steps_offset": 1}
TEACHER = {"steps": 1500, "batch_size": 64, "lr": 1e-3, "seed": 0}
GUIDANCE = 2.0  # the teacher's CFG: at 4.5 this small teacher's own samples lose colour and diversity
STUDENT = dict(steps=800, batch_size=16, lr=1e-4, lora_lr=1e-3, lora_rank=8, lora_alpha=8.0, guidance=GUIDANCE,
               lora_guidance=1.0, ema_decay=0.0, save_every=0, sample_every=0, device="cpu", seed=0)
METHODS = [("SwiftBrush: VSD, x0 student", dict(loss="vsd", param="x0")),
           ("SDS, x0 student", dict(loss="sds", param="x0")),
           ("VSD, eps student", dict(loss="vsd", param="eps"))]
EVAL_SEEDS, EVAL_PER_PROMPT = (0, 1, 2), 16  # 3 x 12 prompts x 16 = 576 samples per method
QUICK = dict(teacher_steps=40, teacher_batch=16, student_steps=6, student_batch=4, eval_seeds=(0,), per_prompt=4,
             ddim_steps=5)


# --------------------------------------------------------------------------------------------------
# 1. The teacher, cached as a Stable Diffusion folder


def _recipe(quick):
    return {"unet": UNET_CONFIG, "text": TEXT_CONFIG, "scheduler": SCHEDULER_CONFIG, "max_length": MAX_LENGTH,
            "teacher": TEACHER if not quick else {**TEACHER, "steps": QUICK["teacher_steps"],
                                                   "batch_size": QUICK["teacher_batch"]},
            "world": world.PROMPTS}


def _files_sha(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name == "miniature.json":
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def cached_teacher(folder, recipe):
    """True if `folder` holds a teacher built from this exact recipe whose files are intact and load."""
    try:
        with open(os.path.join(folder, "miniature.json")) as f:
            stamp = json.load(f)
        if stamp["recipe"] != json.loads(json.dumps(recipe)) or stamp["files"] != _files_sha(folder):
            return False
        load_unet(folder), load_text(folder)
        return True
    except Exception:  # missing, stale, corrupt: rebuild rather than trust it
        return False


def build_teacher(folder, quick=False, progress=True):
    """Train the tiny teacher on the world (plain DDPM loss, 10% caption dropout for CFG), unless cached."""
    recipe = _recipe(quick)
    if cached_teacher(folder, recipe):
        print(f"teacher: cached in {folder}")
        return folder
    from tqdm import tqdm
    from transformers import CLIPTextConfig, CLIPTextModel
    shutil.rmtree(folder, ignore_errors=True)
    ids = world.write_tokenizer(os.path.join(folder, "tokenizer"), max_length=MAX_LENGTH)
    torch.manual_seed(recipe["teacher"]["seed"])
    text = CLIPTextModel(CLIPTextConfig(**ids, **TEXT_CONFIG))
    text.save_pretrained(os.path.join(folder, "text_encoder"))  # frozen and random: its states still name the words
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=2)
    tokenizer, encoder = load_text(folder)
    captions = world.PROMPTS
    emb, uncond = encode_prompts(tokenizer, encoder, captions), encode_prompts(tokenizer, encoder, [""])
    unet, schedule = UNet(UNET_CONFIG), Schedule(SCHEDULER_CONFIG)
    opt = torch.optim.Adam(unet.parameters(), lr=recipe["teacher"]["lr"])
    gen = torch.Generator().manual_seed(recipe["teacher"]["seed"])
    steps, bs = recipe["teacher"]["steps"], recipe["teacher"]["batch_size"]
    for _ in tqdm(range(steps), desc="teacher", disable=not progress, dynamic_ncols=True):
        x0, caps, attrs = world.sample_world(bs, generator=gen)
        ctx = emb[attrs["color"] * len(world.SHAPES) + attrs["shape"]]
        loss = diffusion_loss(unet, x0, ctx, uncond, schedule, gen, p_uncond=0.1, abar_weighted=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    export_unet(unet.state_dict(), UNET_CONFIG, os.path.join(folder, "unet"))
    with open(os.path.join(folder, "miniature.json"), "w") as f:
        json.dump({"recipe": recipe, "files": _files_sha(folder)}, f, indent=2)
    return folder


# --------------------------------------------------------------------------------------------------
# 3. Evaluation on fixed prompts and seeds


def eval_batches(seeds, per_prompt):
    """(seed, captions, z): the same noise for every method."""
    captions = [p for p in world.PROMPTS for _ in range(per_prompt)]
    shape = (len(captions), 3, world.RES, world.RES)
    return [(s, captions, torch.randn(shape, generator=torch.Generator().manual_seed(1000 + s))) for s in seeds]


def conditioning(teacher_folder, captions):
    """(context, uncond, schedule) of the evaluation captions: encoded once, shared by every method."""
    tokenizer, encoder = load_text(teacher_folder)
    return (encode_prompts(tokenizer, encoder, captions), encode_prompts(tokenizer, encoder, [""]),
            read_schedule(teacher_folder))


@torch.no_grad()
def generate(kind, net, cond, z, param="x0", ddim_steps=25):
    ctx, uncond, schedule = cond
    if kind == "ddim":
        x = ddim_sample(net, schedule, ctx, uncond, z, ddim_steps, GUIDANCE)
    else:  # one step: f_theta (the teacher itself at initialisation)
        x = f_theta(net, z, ctx, schedule, param)
    return x.clamp(-1, 1)


def score(images_per_seed):
    """Mean and std over evaluation seeds of each metric."""
    rows = [world.evaluate(imgs, caps) for imgs, caps in images_per_seed]
    out = {}
    for k in rows[0]:
        vals = torch.tensor([r[k] for r in rows], dtype=torch.float64)
        out[k] = (float(vals.mean()), float(vals.std()) if len(rows) > 1 else 0.0)
    return out


COLUMNS = [("color_acc", "colour acc", "{:.2f}"), ("shape_acc", "shape acc", "{:.2f}"),
           ("pos_spread", "position spread px", "{:.2f}"), ("size_spread", "size spread px", "{:.2f}"),
           ("saturation", "mean abs pixel", "{:.3f}"), ("clipped", "clipped", "{:.3f}"),
           ("bg_noise", "background noise", "{:.3f}"), ("fd", "Frechet dist.", "{:.1f}")]


def table(results, truth):
    head = "| method | steps | " + " | ".join(c[1] for c in COLUMNS) + " | s/iter |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    lines.append("| the world (truth) | - | 1.00 | 1.00 | " + f"{truth['true_pos_spread']:.2f} | "
                 f"{truth['true_size_spread']:.2f} | {truth['saturation']:.3f} | 0.000 | 0.000 | 0.0 | - |")
    for name, r in results.items():
        cells = [(fmt.format(r["metrics"][k][0]) + (f" ± {fmt.format(r['metrics'][k][1])}" if r["metrics"][k][1] else ""))
                 for k, _, fmt in COLUMNS]
        lines.append(f"| {name} | {r['steps']} | " + " | ".join(cells) + f" | {r.get('sec_per_iter', '-')} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The whole experiment


def main(args):
    quick = args.quick
    out = args.out or ("runs/miniature-quick" if quick else "runs/miniature")
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    teacher_dir = build_teacher(os.path.join(out, "teacher"), quick)
    t_teacher = time.time() - t_start
    prompts_file = os.path.join(out, "prompts.txt")
    with open(prompts_file, "w") as f:
        f.write("\n".join(world.PROMPTS) + "\n")

    seeds = QUICK["eval_seeds"] if quick else EVAL_SEEDS
    per_prompt = QUICK["per_prompt"] if quick else EVAL_PER_PROMPT
    ddim_steps = QUICK["ddim_steps"] if quick else 25
    batches = eval_batches(seeds, per_prompt)
    teacher = load_unet(teacher_dir)
    cond = conditioning(teacher_dir, batches[0][1])  # every batch has the same captions
    results, grid_rows, curves_student, curves_lora = {}, [], {}, {}
    grid_idx = torch.arange(0, len(world.PROMPTS) * per_prompt, per_prompt)  # one sample of each prompt, seed 0

    def record(name, steps, imgs, extra=None):
        results[name] = {"steps": steps, "metrics": score([(x, caps) for x, (_, caps, _) in zip(imgs, batches)]),
                         **(extra or {})}
        grid_rows.append((name, imgs[0][grid_idx]))

    record(f"teacher, DDIM + CFG {GUIDANCE:g}", ddim_steps,
           [generate("ddim", teacher, cond, z, ddim_steps=ddim_steps) for _, _, z in batches])
    record("teacher, one step (Eq. 7 at init)", 1,
           [generate("one", teacher, cond, z) for _, _, z in batches])

    base = dict(STUDENT, model=teacher_dir, prompts=prompts_file)
    if quick:
        base.update(steps=QUICK["student_steps"], batch_size=QUICK["student_batch"])
    for name, overrides in METHODS:
        run_dir = os.path.join(out, f"{overrides['loss']}-{overrides['param']}")
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh distillation each time: the table is one run's
        cfg = Config(**base, **overrides, out=run_dir)
        t0 = time.time()
        m = train(cfg, progress=True)
        sec = (time.time() - t0) / cfg.steps
        student = m.student.eval()  # the raw student: an EMA over 800 steps mixes in the early, noisy students
        record(name, 1, [generate("one", student, cond, z, param=cfg.param) for _, _, z in batches],
               {"sec_per_iter": f"{sec:.2f}", "config": asdict(cfg)})
        short = f"{cfg.loss}-{cfg.param}"
        curves_student[short] = [(h["step"], h["loss_student"]) for h in m.history]
        if cfg.loss == "vsd":
            curves_lora[short] = [(h["step"], h["loss_lora"]) for h in m.history]

    truth_imgs, truth_caps, _ = world.sample_world(len(batches[0][1]), seed=99, prompts=batches[0][1])
    truth = world.evaluate(truth_imgs, truth_caps)
    md = table(results, truth)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"results": results, "truth": truth, "seconds": time.time() - t_start,
                   "seconds_teacher": t_teacher}, f, indent=2)
    save_grid([world.sample_world(len(grid_idx), seed=7, prompts=[world.PROMPTS[i] for i in range(len(grid_idx))])[0]]
              + [r for _, r in grid_rows], os.path.join(out, "grid.png"),
              labels=["the world (data)"] + [n for n, _ in grid_rows])
    save_plot(curves_student, os.path.join(out, "curves_student.png"),
              title="student surrogate loss 0.5*mean(g^2) per step")
    save_plot(curves_lora, os.path.join(out, "curves_lora.png"),
              title="LoRA teacher loss (Eq. 6) per step")
    print("\n" + md)
    print(f"\n{len(batches)} evaluation seeds x {len(batches[0][1])} samples (mean ± std over seeds). "
          f"Written to {out}: table.md, results.json, grid.png, curves_*.png ({time.time() - t_start:.0f} s, "
          f"of which the teacher {t_teacher:.0f} s)")
    return results
