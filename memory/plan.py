"""The memory plan of a run: what each part of Algorithm 1 holds, in GB, counted from the real tensors (so it is the
same on the `meta` device, for full-size models this machine cannot hold), printed at startup and written to
OUT/memory.json; and the measured peak, logged with every step (CUDA: max_memory_allocated; CPU: peak RSS).

The plan also decides, by that count, what memory buys time where there is room: gradient checkpointing
(`--checkpointing auto`: on only where the states and the activations without it would not fit the device) and the
EMA's place (on the device when everything fits with it, so no GPU -> CPU copy of the student every step)."""
import json
import os
import resource
from dataclasses import replace

import torch
import torch.nn.functional as F

from harness.atomic import write_json
from harness.flags import uses_bf16
from lora import Adapted, base_state_dict, inject_lora, lora_parameters
from unet import UNet

GB = 1e9
HEADROOM = 0.9  # of the device's memory: the CUDA context, cuBLAS workspaces and the allocator's slack take the rest


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_plan(cfg, m, state, device):
    """GB per part on the training device and on the CPU, the activations' estimate, and the two decisions
    (checkpointing, the EMA's place). `state`: start_training's, its optimisers made, its EMA not yet.

    Over N ranks (state["world"]) it is this rank's: a micro-batch of batch / N, the student's gradients in DDP's
    buckets (gradient_as_bucket_view: the gradients are views of them, held from step to step), DDP rebuilding
    its buckets once (at the second step, before the forward: a second copy for a moment), the EMA on rank 0."""
    world = state["world"]
    student = list(m.student.parameters())
    lora = lora_parameters(m.teacher) if state["opt_lora"] is not None else []
    text = getattr(m.embeddings, "text", None)  # formats/prompts.py; a plain tensor of states has none
    text_weights = [p for encoder in text.encoders for p in encoder.parameters()] if text else []
    if cfg.step_in_backward:  # each gradient is freed as soon as its parameter is stepped: at most the largest one
        grads = ("student grads (--step-in-backward: one parameter's at a time)", max(nbytes([p]) for p in student))
    elif world.size > 1:
        grads = ("student grads: DDP's buckets (held from step to step)", nbytes(student))
    else:
        grads = ("student grads (freed before the LoRA pass)", nbytes(student))
    lora_student = isinstance(m.student, Adapted)
    teacher = ("teacher UNet (eps_psi, and eps_phi's and the LoRA student's base: one copy)" if lora_student else
               "teacher UNet (eps_psi, and eps_phi's base: one copy)")
    on_device = {
        teacher: nbytes(base_state_dict(m.teacher).values()),
        "LoRA phi: weights, grads, Adam m and v": 4 * nbytes(lora),  # fp32, as the student's
        ("student theta: the LoRA's weights (fp32)" if lora_student else "student theta: weights"): nbytes(student),
        grads[0]: grads[1],
        "student Adam m and v": 2 * nbytes(student),
        "text encoder (frozen; encodes each batch's prompts)": nbytes(text_weights),
    }
    ema = nbytes(student) if cfg.ema_decay > 0 and world.main else 0
    states = sum(on_device.values())
    total = device_memory_gb(device)
    micro_batch = replace(cfg, batch_size=cfg.batch_size // world.size)  # this rank's share
    activations = activation_gb(m, micro_batch, bf16=uses_bf16(cfg.precision, device))  # the trained passes' autocast
    rebuild = nbytes(student) / GB if world.size > 1 else 0  # DDP's second set of buckets, before the activations
    if cfg.checkpointing == "auto":  # on only where the states and the activations without it do not fit
        checkpointing = total is not None and states / GB + max(activations["off"], rebuild) > HEADROOM * total
    else:
        checkpointing = cfg.checkpointing == "on"
    used = states / GB + max(activations["on" if checkpointing else "off"], rebuild)  # without the EMA
    ema_on_device = total is not None and ema > 0 and used + ema / GB <= HEADROOM * total
    if ema_on_device:
        on_device["EMA of the student"] = ema
    on_cpu = {"EMA of the student": 0 if ema_on_device else ema,
              "the student's copy the EMA is lerped from": 0 if ema_on_device or device.type == "cpu" else ema,
              "prompt embeddings": nbytes([m.embeddings]) if torch.is_tensor(m.embeddings) else 0}  # a tensor: all P
    plan = {"device": {k: round(v / GB, 2) for k, v in on_device.items()},
            "cpu": {k: round(v / GB, 2) for k, v in on_cpu.items()},
            "device states in all": round(sum(on_device.values()) / GB, 2),
            "activations (estimate)": {k: float(f"{v:.3g}") for k, v in activations.items()},
            "device memory": None if total is None else round(total, 1),
            "fits": total is None or used <= HEADROOM * total,
            "checkpointing": checkpointing, "EMA on the device": ema_on_device}
    if world.size > 1:
        plan.update({"rank": world.rank, "ranks": world.size, "micro-batch per rank": micro_batch.batch_size,
                     "DDP bucket rebuild (once, at step 2)": round(rebuild, 2)})
    return plan


def device_memory_gb(device):
    """A CUDA device's memory in GB; None elsewhere (the CPU's memory is not planned: no decision depends on it)."""
    return torch.cuda.get_device_properties(device).total_memory / GB if device.type == "cuda" else None


def activation_gb(m, cfg, bf16):
    """Estimated GB of the activations of the step's largest backward (the student's, or the LoRA teacher's: one
    UNet forward at the micro-batch, with grad), without ("off") and with ("on") per-block checkpointing.

    Counted on a copy of the architecture on the meta device (no memory): every tensor autograd saves for the
    backward but the weights, attention counted as a fused kernel saves. With checkpointing, a block keeps only its
    outputs, and its own saves come back one block at a time during the backward. Under bf16 autocast, fp32 student
    weights are also saved as bf16 copies (half the student) unless checkpointing recasts them block by block.
    Not counted: the CUDA context and workspaces (HEADROOM), transients of the no-grad CFG passes."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.device("meta"):
        net = UNet(json.loads(json.dumps(m.student.config)))
    if isinstance(m.student, Adapted):  # its adapters' own saves (the r-wide projections); the draws spare the RNG
        rank = next(iter(m.student.children())).rank
        with torch.random.fork_rng(devices=[]):
            inject_lora(net, rank, rank, list(m.student.layer_of.values()), name="theta")
    net = net.to(dtype).train()
    with torch.device("meta"):
        x = torch.zeros(cfg.batch_size, *m.latent_shape, dtype=dtype)
        context = torch.zeros(cfg.batch_size, *m.uncond.shape[1:], dtype=dtype)
    weights = {id(p) for p in net.parameters()}  # saved too, but held anyway: not activations
    saved, blocks = [], []  # the tensors kept for the backward; per block [first saved index, its outputs]

    def record_saved(t):
        is_weight = id(t) in weights or id(t._base) in weights  # a weight, or a view of one (a transpose)
        if not is_weight:
            saved.append(t)
        return t

    def block_starts(module, args):
        blocks.append([len(saved), None])

    def block_ends(module, args, out):
        blocks[-1][1] = [out[0], *out[1]]  # the hidden states and the skip connections it passes on

    for block in [*net.down_blocks, net.mid_block, *net.up_blocks]:
        block.register_forward_pre_hook(block_starts)
        block.register_forward_hook(block_ends)
    reference_attention = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fused_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(record_saved, lambda t: t):
            net(x, torch.zeros(cfg.batch_size, dtype=torch.long, device="meta"), context)
    finally:
        F.scaled_dot_product_attention = reference_attention
    ends = [start for start, _ in blocks[1:]] + [len(saved)]
    inside = [_unique_bytes(saved[start:end]) for (start, _), end in zip(blocks, ends)]
    outputs = sum(_unique_bytes(out) for _, out in blocks)
    forward_weights = base_state_dict(getattr(m.student, "unet", m.student)).values()  # the LoRA student's: the UNet's
    weight_copies = nbytes(w for w in forward_weights if w.dtype == torch.float32) / 2 if bf16 else 0
    off = _unique_bytes(saved) + weight_copies
    on = _unique_bytes(saved) - sum(inside) + outputs + max(inside)
    return {"off": off / GB, "on": on / GB}


def _unique_bytes(tensors):
    return nbytes({id(t): t for t in tensors}.values())


def fused_attention(q, k, v, **kwargs):
    return FusedAttentionSaves.apply(q, k, v)


class FusedAttentionSaves(torch.autograd.Function):
    """Counts as a fused attention kernel (flash or memory-efficient: what CUDA and the CPU run) saves for the
    backward: q, k, v, the output and one log-sum-exp per query, not the [N, N] weights that the meta device's
    reference path keeps (at 64x64 latents, 4096 x 4096 per head)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


def write_memory_plan(plan, out):
    write_json(os.path.join(out, "memory.json"), plan)
    lines = [f"  {k}: {v:.2f} GB" for where in ("device", "cpu") for k, v in plan[where].items() if v]
    acts, total = plan["activations (estimate)"], plan["device memory"]
    checkpointing = "on" if plan["checkpointing"] else "off"
    of_device = f", of {total:.1f} GB" if total else ""
    lines.append(f"  on the device in all: {plan['device states in all']:.2f} GB of states, activations "
                 f"~{acts[checkpointing]:.2f} GB (estimate; without checkpointing {acts['off']:.2f}, with it "
                 f"{acts['on']:.2f}){of_device}")
    lines.append(f"  gradient checkpointing {checkpointing}, the EMA on the "
                 f"{'device' if plan['EMA on the device'] else 'CPU'}")
    if "ranks" in plan:
        lines.append(f"  rank {plan['rank']} of {plan['ranks']}, micro-batch {plan['micro-batch per rank']} a rank; "
                     f"DDP rebuilds its buckets once at step 2 (+{plan['DDP bucket rebuild (once, at step 2)']:.2f} GB "
                     f"for a moment, before the activations); the other ranks hold no EMA")
    if not plan["fits"]:
        lines.append(f"  this does not fit the device ({HEADROOM:.0%} of {total:.1f} GB): lower --batch-size, "
                     f"raise --grad-accum")
    print("memory plan (peak_gb in log.jsonl says what was used):\n" + "\n".join(lines))


def peak_gb(device):
    """The peak so far: allocated CUDA memory, or this process's resident memory on the CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / GB, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3)  # Linux: KiB
