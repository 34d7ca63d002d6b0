"""tools/cards.py: the docs' card table is the memory plan's, and its largest batch is the plan's own decision."""
import os
from dataclasses import replace

import torch

import swiftbrush as sb
from memory import plan as memory
from tools import cards


def docs_rows():
    doc = open(os.path.join(os.path.dirname(sb.__file__), "docs", "memory.md")).read()
    return doc[doc.index("| student | teacher's passes | states GB |"):].split("\n\n")[0].splitlines()[2:]


def test_the_docs_card_table_is_the_plans_and_its_batches_fit_where_one_more_does_not(monkeypatch):
    """The LoRA student's rows (rank 64, each teacher precision) and the full student's tf32 row, recomputed; for
    each card the plan itself (--checkpointing auto, the device's memory faked) fits the largest batch and not one
    more, so reading the batch off the plan at batch 1 is the plan's decision."""
    rows = {tuple(c.strip() for c in row.strip("|").split("|")[:2]): row for row in docs_rows()}
    assert len(rows) == 6
    for student, lora, teacher in (("full", 0, "tf32"), ("LoRA, rank 64", 64, "tf32"), ("LoRA, rank 64", 64, "bf16")):
        cfg = sb.Config(model="sd21-base", precision="bf16", teacher_precision=teacher, prompts="demo",
                        student_lora=lora)
        plan, batches = cards.largest_batches(cfg)
        want = (f"| {student} | {teacher} | {plan['device states in all']:.2f} | "
                f"{plan['activations (estimate)']['on']:.3f} | " + " | ".join(str(batches[gb]) for gb in cards.CARDS)
                + " |")
        assert rows[(student, teacher)] == want
    m, state = cards.sd21_base_on_meta(replace(cfg, batch_size=1, ema_decay=0))  # the LoRA student, bf16 teacher
    for gb in (16, 24):
        monkeypatch.setattr(memory, "device_memory_gb", lambda device: float(gb))
        fits = [memory.memory_plan(replace(cfg, batch_size=b), m, state, torch.device("meta"))["fits"]
                for b in (batches[gb], batches[gb] + 1)]
        assert fits == [True, False], gb
