"""The largest batch that the memory plan fits on each card size, for the full student and the LoRA student, with
each teacher precision: the memory plan (memory/plan.py) of the real setup on the meta device, so nothing is
allocated and no weights are needed. SD 2.1-base at 512 px (the paper's run) and SDXL base 1.0 at 1024 px.

    python -m tools.cards                      # SD 2.1-base's table in docs/memory.md
    python -m tools.cards --student-lora 32    # another rank
    python -m tools.cards --model sdxl         # SDXL's table in docs/memory.md (about a minute)

A batch fits where the states and its activations (with gradient checkpointing where they would not fit without it,
as --checkpointing auto decides) are within 90% of the card; the activations are linear in the batch, so the
largest batch is read from the plan at batch 1 (SDXL's table: from the estimate at batches 1 and 2, since without
checkpointing a part of it does not grow with the batch). An estimate, not a measurement: no GPU has run it.
"""
import argparse
import json
from dataclasses import replace
from types import SimpleNamespace

import torch

import swiftbrush as sb
from formats.text import Text
from harness.flags import uses_bf16
from memory.plan import HEADROOM, activation_gb, memory_plan
from parity.configs import SD2_TEXT, SD21_BASE, SDXL, SDXL_TEXT, SDXL_TEXT_2
from unet import MICRO_IDS, sdxl_context

CARDS = (12, 16, 24, 40, 80)  # GB
SDXL_CARDS = (24, 40, 80, 141)  # GB; 141: an H200. On 16 GB none of the table's students fits (docs/memory.md#sdxl)
META = torch.device("meta")


def on_meta(cfg, unet_config, encoders, uncond):
    """A model's UNet (teacher and student) and its text encoders (fp32, as load_models gives them) on the meta
    device, set up by start_training: (m, state). `encoders`: functions that build them; `uncond`: a context
    [1, L, D] whose shape the activations' estimate reads."""
    with torch.device("meta"):
        teacher = sb.UNet(json.loads(json.dumps(unet_config)))
        # the full student built as the teacher was (on meta a copy is its architecture; copy.deepcopy took longer)
        student = None if cfg.student_lora else sb.UNet(json.loads(json.dumps(unet_config)))
        encoders = [build() for build in encoders]
    side = unet_config["sample_size"]
    m = SimpleNamespace(teacher=teacher, student=student,
                        prompts=["a cat"] * 12,
                        embeddings=SimpleNamespace(text=Text([None] * len(encoders), encoders)),  # the plan counts them
                        uncond=uncond, latent_shape=(unet_config["in_channels"], side, side))
    return m, sb.start_training(cfg, m, META)


def sd21_base_on_meta(cfg):
    """SD 2.1-base's UNet and SD 2's text encoder at 512 px (64x64 latents)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    return on_meta(cfg, SD21_BASE, [lambda: CLIPTextModel(CLIPTextConfig(**SD2_TEXT))], torch.zeros(1, 77, 1024))


def sdxl_on_meta(cfg):
    """SDXL base 1.0's UNet and its two text encoders (CLIP ViT-L, OpenCLIP ViT-bigG) at 1024 px (128x128 latents);
    the context is SDXL's as formats/text.py makes it: 77 token states and the row of the pooled embedding and the
    micro-conditioning ids (unet.sdxl_context), [1, 78, 2048]."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    uncond = sdxl_context(torch.zeros(1, 77, SDXL["cross_attention_dim"]),
                          torch.zeros(1, SDXL_TEXT_2["projection_dim"]), torch.zeros(1, MICRO_IDS))
    return on_meta(cfg, SDXL, [lambda: CLIPTextModel(CLIPTextConfig(**SDXL_TEXT)),
                               lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2))], uncond)


MODELS = {"sd21-base": sd21_base_on_meta, "sdxl": sdxl_on_meta}


def largest_batches(cfg, cards=CARDS):
    """(the plan at batch 1, {card GB: the largest batch that fits, 0 for none}) for cfg (the bf16 recipe) on SD
    2.1-base."""
    m, state = sd21_base_on_meta(replace(cfg, batch_size=1, ema_decay=0))
    plan = memory_plan(replace(cfg, batch_size=1), m, state, META)
    states, per_sample = plan["device states in all"], plan["activations (estimate)"]["on"]
    return plan, {gb: max(0, int((HEADROOM * gb - states) // per_sample)) for gb in cards}


def batches_with_and_without_checkpointing(cfg, cards):
    """For cfg.model ("sd21-base" or "sdxl"): (m, state: start_training's, with the plan at batch 1, the
    activations {"off", "on"} as (fixed GB, GB a sample), {"off": {card GB: the largest batch the plan runs without
    checkpointing}, "on": {... with it}}).

    The estimate (memory/plan.activation_gb, unrounded) at batches 1 and 2 gives each line: without checkpointing,
    autocast's bf16 copies of the fp32 weights are held whatever the batch; with it, nothing is. The plan leaves
    checkpointing off up to the "off" batch and turns it on above it, up to the "on" batch; 0: none fits."""
    m, state = MODELS[cfg.model](replace(cfg, batch_size=1, ema_decay=0))  # start_training's plan: batch 1, no EMA
    bf16 = uses_bf16(cfg.precision, META)
    at = [activation_gb(m, replace(cfg, batch_size=b), bf16=bf16) for b in (1, 2)]
    lines = {k: (at[0][k] - (at[1][k] - at[0][k]), at[1][k] - at[0][k]) for k in ("off", "on")}
    states = state["plan"]["device states in all"]
    batches = {k: {gb: max(0, int((HEADROOM * gb - states - fixed) // per_sample)) for gb in cards}
               for k, (fixed, per_sample) in lines.items()}
    return m, state, lines, batches


def table(student_lora=64):
    rows = ["| student | teacher's passes | states GB | activations GB a sample (checkpointing on) | "
            + " | ".join(f"{gb} GB" for gb in CARDS) + " |", "|---|---|---|---|" + "---|" * len(CARDS)]
    students = [("full", 0, False), ("full, `--step-in-backward`", 0, True), (f"LoRA, rank {student_lora}",
                                                                              student_lora, False)]
    for student, lora, in_backward in students:
        for teacher in ("tf32", "bf16"):  # tf32 also stands for fp32: the same fp32 weights, the same memory
            cfg = sb.Config(model="sd21-base", precision="bf16", teacher_precision=teacher, prompts="demo",
                            student_lora=lora, step_in_backward=in_backward)
            plan, batches = largest_batches(cfg)
            rows.append(f"| {student} | {teacher} | {plan['device states in all']:.2f} | "
                        f"{plan['activations (estimate)']['on']:.3f} | "
                        + " | ".join(str(batches[gb]) for gb in CARDS) + " |")
    return "\n".join(rows)


SDXL_STUDENTS = (("full", 0, False), ("full, `--step-in-backward`", 0, True), ("LoRA, rank {r}", None, False))


def sdxl_rows(student, teacher, state, lines, batches):
    """Two rows of SDXL's table (checkpointing off, then on) from batches_with_and_without_checkpointing."""
    rows, plan = [], state["plan"]
    for k in ("off", "on"):
        fixed, per_sample = lines[k]
        acts = f"{fixed:.2f} + {per_sample:.2f} b" if round(fixed, 2) else f"{per_sample:.2f} b"
        rows.append(f"| {student} | {teacher} | {k} | {plan['device states in all']:.2f} | {acts} | "
                    + " | ".join(str(batches[k][gb]) for gb in SDXL_CARDS) + " |")
    return rows


def sdxl_table(student_lora=64):
    rows = ["| student | teacher's passes | checkpointing | states GB | activations GB at batch b (estimate) | "
            + " | ".join(f"{gb} GB" for gb in SDXL_CARDS) + " |", "|---|---|---|---|---|" + "---|" * len(SDXL_CARDS)]
    for student, lora, in_backward in SDXL_STUDENTS:
        for teacher in ("tf32", "bf16"):  # tf32 also stands for fp32: the same fp32 weights, the same memory
            cfg = sb.Config(model="sdxl", precision="bf16", teacher_precision=teacher, prompts="demo",
                            student_lora=student_lora if lora is None else lora, step_in_backward=in_backward)
            _, state, lines, batches = batches_with_and_without_checkpointing(cfg, SDXL_CARDS)
            rows += sdxl_rows(student.format(r=student_lora), teacher, state, lines, batches)
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="sd21-base", help="the table's model (default sd21-base)")
    p.add_argument("--student-lora", type=int, default=64, help="the LoRA student's rank (default 64, LCM-LoRA's)")
    args = p.parse_args(argv)
    print((sdxl_table if args.model == "sdxl" else table)(args.student_lora))


if __name__ == "__main__":
    main()
