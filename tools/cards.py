"""The largest batch of the paper's run (SD 2.1-base, 512 px) that the memory plan fits on each card size, for the full
student and the LoRA student, with each teacher precision: the memory plan (memory/plan.py) of the real setup on the
meta device, so nothing is allocated and no weights are needed.

    python -m tools.cards                      # the table in docs/memory.md
    python -m tools.cards --student-lora 32    # another rank

A batch fits where the states and its activations (with gradient checkpointing where they would not fit without it,
as --checkpointing auto decides) are within 90% of the card; the activations are linear in the batch, so the
largest batch is read from the plan at batch 1. An estimate, not a measurement: no GPU has run it.
"""
import argparse
import copy
import json
from dataclasses import replace
from types import SimpleNamespace

import torch

import swiftbrush as sb
from formats.text import Text
from memory.plan import HEADROOM, memory_plan
from parity.configs import SD2_TEXT, SD21_BASE

CARDS = (12, 16, 24, 40, 80)  # GB


def sd21_base_on_meta(cfg):
    """SD 2.1-base's UNet (teacher and student) and SD 2's text encoder (fp32, as load_models gives it) on the meta
    device, set up by start_training: (m, state)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        teacher = sb.UNet(json.loads(json.dumps(SD21_BASE)))
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD2_TEXT))
    m = SimpleNamespace(teacher=teacher, student=None if cfg.student_lora else copy.deepcopy(teacher),
                        prompts=["a cat"] * 12, embeddings=SimpleNamespace(text=Text([None], [text_encoder])),
                        uncond=torch.zeros(1, 77, 1024), latent_shape=(4, 64, 64))
    return m, sb.start_training(cfg, m, torch.device("meta"))


def largest_batches(cfg, cards=CARDS):
    """(the plan at batch 1, {card GB: the largest batch that fits, 0 for none}) for cfg (the bf16 recipe)."""
    m, state = sd21_base_on_meta(replace(cfg, batch_size=1, ema_decay=0))
    plan = memory_plan(replace(cfg, batch_size=1), m, state, torch.device("meta"))
    states, per_sample = plan["device states in all"], plan["activations (estimate)"]["on"]
    return plan, {gb: max(0, int((HEADROOM * gb - states) // per_sample)) for gb in cards}


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student-lora", type=int, default=64, help="the LoRA student's rank (default 64, LCM-LoRA's)")
    print(table(p.parse_args(argv).student_lora))


if __name__ == "__main__":
    main()
