"""The memory plan of a run: what each part of Algorithm 1 holds, in GB, counted from the real tensors (so it is the
same on the `meta` device, for full-size models this machine cannot hold), printed at startup and written to
OUT/memory.json; and the measured peak, logged with every step (CUDA: max_memory_allocated; CPU: peak RSS)."""
import json
import os
import resource

import torch

from lora import lora_parameters

GB = 1e9


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_plan(m, state):
    """GB per part, as start_training placed them: on the training device, then on the CPU."""
    student = list(m.student.parameters())
    lora = lora_parameters(m.teacher) if state["opt_lora"] is not None else []
    is_lora = {id(p) for p in lora}
    on_device = {
        "teacher UNet (eps_psi, and eps_phi's base: one copy)": nbytes(p for p in m.teacher.parameters()
                                                                      if id(p) not in is_lora),
        "LoRA phi: weights, grads, Adam m and v": 4 * nbytes(lora),  # fp32, as the student's
        "student theta: weights": nbytes(student),
        "student grads (freed before the LoRA pass)": nbytes(student),
        "student Adam m and v": 2 * nbytes(student),
    }
    on_cpu = {"EMA of the student": nbytes(student) if state["ema"] is not None else 0,
              "prompt embeddings": nbytes([m.embeddings])}
    plan = {"device": {k: round(v / GB, 2) for k, v in on_device.items()},
            "cpu": {k: round(v / GB, 2) for k, v in on_cpu.items()}}
    plan["device states in all"] = round(sum(on_device.values()) / GB, 2)
    return plan


def write_memory_plan(plan, out):
    with open(os.path.join(out, "memory.json"), "w") as f:
        json.dump(plan, f, indent=2)
    lines = [f"  {k}: {v:.2f} GB" for where in ("device", "cpu") for k, v in plan[where].items() if v]
    print("memory plan (the states; activations come on top, and peak_gb in log.jsonl says what was used):\n"
          + "\n".join(lines) + f"\n  on the device in all: {plan['device states in all']:.2f} GB")


def peak_gb(device):
    """The peak so far: allocated CUDA memory, or this process's resident memory on the CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / GB, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3)  # Linux: KiB
