"""Checkpoints of a training run: one safetensors file (no pickle), written whole or not at all, and read back so that
a resumed run is bit-identical; the run's other files (unet/, swiftbrush.json, log.jsonl); Ctrl-C and NaN.

`cfg` is swiftbrush.Config, `m` its Models and `state` the loop's dict (step, cursor, order, gen, opt_student,
opt_lora, ema), as in nanoGPT's train.py: one state passed around, saved whole."""
import hashlib
import json
import math
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from harness.atomic import atomic, write_json, write_text
from harness.flags import UsageError
from lora import Adapted, lora_state_dict, save_lora_file

CHECKPOINT = "checkpoint.safetensors"  # in the run's --out folder
LORA_FILE = "student-lora.safetensors"  # a LoRA student's adapter, in unet/, unet_ema/ and the exports
# Flags that may differ between a run and its --resume (everything else must match the checkpoint). --checkpointing
# and --step-in-backward are memory choices with the same arithmetic (tested: bit-identical weights).
RESUMABLE = {"steps", "save_every", "sample_every", "diagnose_every", "device", "checkpointing", "step_in_backward",
             "out"}


class CheckpointError(ValueError):
    """An unreadable checkpoint, or one trained with other settings; the message says what to do."""


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN/inf; the last good checkpoint is left as it was."""


def check_finite(what, value, step):
    if not math.isfinite(value):
        raise TrainingDiverged(f"{what} became {value} at step {step}")


def skip_if_not_finite(optimisers, norm):
    """Whether to call each optimiser's step(), which skips its update where the gradients' `norm` is not finite, so
    a diverged step leaves the weights and the optimisers' states as they were: fused Adam (CUDA, the CPU) skips on
    the device (its found_inf), and the host need not read the norm before the step; other optimisers (on MPS) step
    only after the host has read it, a sync."""
    optimisers = list(optimisers)
    if all(opt.defaults.get("fused") for opt in optimisers):
        found_inf = (~torch.isfinite(norm)).float()
        for opt in optimisers:
            opt.found_inf = found_inf
        return True
    return bool(torch.isfinite(norm))


def check_out_folder(cfg, resume):
    """Before anything runs: --out must be a folder, and may hold a checkpoint only with --resume."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out!r} exists and is not a folder")
    has_checkpoint = os.path.exists(os.path.join(cfg.out, CHECKPOINT))
    if has_checkpoint and not resume:
        raise UsageError(f"{cfg.out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    if resume and not has_checkpoint:
        print(f"--resume: no checkpoint in {cfg.out} yet, so the run starts at step 0")


def save_tensors(tensors, path, metadata):
    with atomic(path) as tmp:  # a crash leaves the previous file whole
        save_file(tensors, tmp, metadata=metadata)


def _cpu(state_dict):
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def _optimiser_tensors(opt, prefix):
    sd = opt.state_dict()
    return {f"{prefix}/{i}/{k}": v.detach().cpu().contiguous() for i, s in sd["state"].items() for k, v in s.items()}


def _load_optimiser(opt, tensors, prefix, groups):
    state = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "/"):
            i, k = key[len(prefix) + 1:].split("/")
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(cfg, m, state, ema):
    """Rank 0 writes the checkpoint (its students equal every rank's; the EMA is its own) and exports the student
    beside it: unet/ and unet_ema/, `ema` being the EMA to export. Every rank waits for it."""
    if state["world"].main:
        write_checkpoint(cfg, m, state, ema)
        export_student(cfg, m, ema)
    state["world"].barrier()


def write_checkpoint(cfg, m, state, ema):
    """Everything an exact resume needs (student, EMA, LoRA, both Adam states, RNG, prompt order, step). Nothing in
    it depends on the number of ranks, so it resumes on any number."""
    tensors = {f"student/{k}": v for k, v in _cpu(m.student.state_dict()).items()}
    tensors.update({f"ema/{k}": v for k, v in _cpu(ema or {}).items()})  # on the device where it fits
    tensors.update({f"lora/{k}": v for k, v in _cpu(lora_state_dict(m.teacher)).items()})
    groups = {}
    for name in ("opt_student", "opt_lora"):
        if state[name] is not None:
            tensors.update(_optimiser_tensors(state[name], name))
            groups[name] = state[name].state_dict()["param_groups"]
    tensors["rng"] = state["gen"].get_state()
    tensors["order"] = state["order"]
    meta = {"config": json.dumps(asdict(cfg)), "step": str(state["step"]), "cursor": str(state["cursor"]),
            "param_groups": json.dumps(groups), "prompts_sha256": _sha(m.prompts)}
    save_tensors(tensors, os.path.join(cfg.out, CHECKPOINT), meta)


def load_checkpoint(cfg, m, state):
    """Restore what save_checkpoint wrote in cfg.out, if anything, after checking that cfg is the same but for
    RESUMABLE flags."""
    path = os.path.join(cfg.out, CHECKPOINT)
    if not os.path.exists(path):
        return
    try:
        with safe_open(path, "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    saved, default = json.loads(meta["config"]), asdict(type(cfg)())  # a flag newer than the checkpoint: its default
    diff = [f"--{k.replace('_', '-')} {saved.get(k, default[k])} (now {v})" for k, v in asdict(cfg).items()
            if k not in RESUMABLE and saved.get(k, default[k]) != v]
    if diff:
        raise CheckpointError(f"{path} was trained with other settings: {', '.join(diff)}; resume with the same flags "
                              f"(only --steps, --save-every, --sample-every, --diagnose-every, --device, "
                              f"--checkpointing, --step-in-backward may change)")
    if meta["prompts_sha256"] != _sha(m.prompts):
        raise CheckpointError(f"{path} was trained on another prompt list; resume with the same --prompts file")
    for k in [k for k in tensors if k.startswith("lora/") and ".adapters." not in k]:  # written before 2026-12-05's
        tensors[k.replace(".lora_", ".adapters.phi.lora_")] = tensors.pop(k)           # named adapters: the same LoRA
    parts = (("student/", m.student.state_dict()), ("lora/", lora_state_dict(m.teacher)),
             ("ema/", state["ema"].weights() if state["ema"] else {}))
    missing = [prefix + k for prefix, sd in parts for k in sd if prefix + k not in tensors]
    if missing:
        raise CheckpointError(f"{path} does not hold this run's networks ({missing[0]} is missing): it was written by "
                              f"another version of this code; start a new run in another --out")
    with torch.no_grad():
        for prefix, sd in parts:
            for k, v in sd.items():
                v.copy_(tensors[prefix + k])
    groups = json.loads(meta["param_groups"])
    for name in groups:
        _load_optimiser(state[name], tensors, name, groups[name])
    state["gen"].set_state(tensors["rng"])
    state.update(step=int(meta["step"]), cursor=int(meta["cursor"]), order=tensors["order"])


def _sha(prompts):
    """Of the prompts joined by newlines; a PromptList's was computed as it was written (formats/prompts.py)."""
    return getattr(prompts, "sha256", None) or hashlib.sha256("\n".join(prompts).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# What a run leaves besides its checkpoint


def export_unet(state_dict, config, folder):
    """A standard `unet/` folder (config.json + diffusion_pytorch_model.safetensors): our load_unet and
    diffusers' UNet2DConditionModel.from_pretrained both read it unchanged."""
    os.makedirs(folder, exist_ok=True)
    save_tensors(_cpu(state_dict), os.path.join(folder, "diffusion_pytorch_model.safetensors"), {"format": "pt"})
    write_json(os.path.join(folder, "config.json"), config)


def export_student(cfg, m, ema):
    """unet/ (the student as trained) and unet_ema/ (`ema`, its EMA, unless None) in cfg.out. A LoRA student's are
    its adapter merged into the teacher's weights, with the adapter alone beside them (LORA_FILE, kohya's layout).
    Their config's sample_size is the latent size trained (--resolution), the size a pipeline then makes by default:
    SDXL's micro-conditioning trained that size's ids."""
    config = {**m.student.config, "sample_size": m.latent_shape[1]}
    for folder, weights in (("unet", None), ("unet_ema", ema)):
        if folder == "unet_ema" and ema is None:
            continue
        folder = os.path.join(cfg.out, folder)
        if not isinstance(m.student, Adapted):
            export_unet(weights or m.student.state_dict(), config, folder)
            continue
        export_unet(m.student.merged_state_dict(weights), config, folder)
        with atomic(os.path.join(folder, LORA_FILE)) as tmp:
            save_lora_file(m.student, weights, tmp)


def write_run_info(cfg, m):
    """swiftbrush.json: what sample.py needs to turn the exported UNet back into the one-step (or K-step) generator."""
    info = {"model": cfg.model, "folder": os.path.abspath(m.folder), "param": cfg.param,
            "student_steps": cfg.student_steps, "student_prediction_type": m.student_schedule.prediction_type,
            "latent_shape": list(m.latent_shape), "config": asdict(cfg)}
    write_json(os.path.join(cfg.out, "swiftbrush.json"), info)


def read_log(out):
    """The rows of out/log.jsonl: one dict per step."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_log(path, step):
    """Drop log lines written after the checkpoint (a crash between saves), so the log matches the weights."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                pass
    write_text(path, "".join(keep))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM, after the step was finished and the checkpoint saved: exit code 128 + the signal,
    the shell's convention (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


@contextmanager
def ctrl_c_finishes_the_step(out, speak=True):
    """Ctrl-C (SIGINT) or SIGTERM (torchrun forwards both to its ranks; SLURM and schedulers send SIGTERM before
    they kill) appends the signal to the yielded list instead of stopping the process: the loop finishes its step
    and saves a checkpoint, and Interrupted comes at the end of the block. Signals can only be caught in the main
    thread. speak: this process tells the user (rank 0)."""
    caught = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    catch = lambda signum, frame: caught.append(signum)
    previous = {s: signal.signal(s, catch) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        if speak:
            print(f"interrupted: checkpoint saved in {out}; continue with --resume", file=sys.stderr)
        raise Interrupted(max(caught))
