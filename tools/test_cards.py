"""tools/cards.py: the docs' card tables (SD 2.1-base's and SDXL's) are the memory plan's, and their largest batches
are the plan's own decisions."""
import os
from dataclasses import replace

import torch

import swiftbrush as sb
from memory import plan as memory
from tools import cards


def docs_rows(header="| student | teacher's passes | states GB |"):
    doc = open(os.path.join(os.path.dirname(sb.__file__), "docs", "memory.md")).read()
    return doc[doc.index(header):].split("\n\n")[0].splitlines()[2:]


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


def test_the_docs_sdxl_table_is_the_plans_and_24_gb_needs_the_lora_student(monkeypatch):
    """SDXL's rows of the full student and the LoRA student (rank 64), with the tf32 teacher, recomputed on the meta
    device with the device's memory faked at 24 GB, so that start_training's own plan at batch 1 is the 24 GB card's:
    the full student does not fit there; the LoRA student does, with checkpointing only (its "off" cell is 0), at its
    "on" cell's batch, 1, and not at one more."""
    # lora.Adapter draws each adapter on the CPU before moving it to the meta device: SDXL's 243 M LoRA values, whose
    # initialisation took seconds of this test's time and changes no shape that the plan counts
    for init in ("kaiming_uniform_", "zeros_"):
        monkeypatch.setattr(torch.nn.init, init, lambda tensor, *args, **kwargs: tensor)
    monkeypatch.setattr(memory, "device_memory_gb", lambda device: 24.0)
    rows = {tuple(c.strip() for c in row.strip("|").split("|")[:3]): row
            for row in docs_rows("| student | teacher's passes | checkpointing | states GB |")}
    assert len(rows) == 12
    for student, lora in (("full", 0), ("LoRA, rank 64", 64)):
        cfg = sb.Config(model="sdxl", precision="bf16", teacher_precision="tf32", prompts="demo", student_lora=lora)
        m, state, lines, batches = cards.batches_with_and_without_checkpointing(cfg, cards.SDXL_CARDS)
        assert [rows[(student, "tf32", k)] for k in ("off", "on")] == cards.sdxl_rows(student, "tf32", state, lines,
                                                                                       batches)
        plan = state["plan"]  # batch 1 on the 24 GB card
        assert plan["device memory"] == 24.0 and plan["fits"] == bool(lora), student
        assert batches["off"][24] == 0 and batches["on"][24] == int(bool(lora)), student
    assert plan["checkpointing"]  # the LoRA student's batch 1: with checkpointing
    assert not memory.memory_plan(replace(cfg, batch_size=2), m, state, torch.device("meta"))["fits"]
