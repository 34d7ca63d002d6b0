"""Checkpoints and exports of swiftbrush.py: one safetensors file (no pickle), written to a temporary file and
renamed, so that a crash never leaves a broken checkpoint, and read back so that a resumed run is bit-identical."""
import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora import lora_state_dict


class CheckpointError(ValueError):
    """An unreadable checkpoint, or one trained with other settings; the message says what to do."""


def _atomic_save(tensors, path, metadata):
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a crash leaves the previous file whole


def _opt_tensors(opt, prefix):
    sd = opt.state_dict()
    tensors = {f"{prefix}/{i}/{k}": v.detach().cpu().contiguous() for i, s in sd["state"].items() for k, v in s.items()}
    return tensors, json.dumps(sd["param_groups"])


def _load_opt(opt, tensors, prefix, groups_json):
    state = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "/"):
            i, k = key[len(prefix) + 1:].split("/")
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(groups_json)})


def save_checkpoint(path, config, prompts, student, unet, ema, opt_student, opt_lora, state, gen):
    """Everything an exact resume needs: student, EMA, LoRA, both Adam states, RNG, prompt order, step."""
    tensors = {f"student/{k}": v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    tensors.update({f"ema/{k}": v.contiguous() for k, v in (ema or {}).items()})
    tensors.update({f"lora/{k}": v.detach().cpu().contiguous() for k, v in lora_state_dict(unet).items()})
    t, groups_s = _opt_tensors(opt_student, "opt_student")
    tensors.update(t)
    groups_l = None
    if opt_lora is not None:
        t, groups_l = _opt_tensors(opt_lora, "opt_lora")
        tensors.update(t)
    tensors["rng"] = gen.get_state()
    tensors["order"] = state["order"]
    meta = {"config": json.dumps(config), "step": str(state["step"]), "cursor": str(state["cursor"]),
            "opt_student_groups": groups_s, "opt_lora_groups": groups_l or "null",
            "prompts_sha256": _sha(prompts)}
    _atomic_save(tensors, path, meta)


def load_checkpoint(path, config, resumable, prompts, student, unet, ema, opt_student, opt_lora, state, gen):
    """Restore what save_checkpoint wrote, after checking that `config` (but for `resumable` keys) is the same."""
    try:
        with safe_open(path, "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    saved = json.loads(meta["config"])
    diff = [f"--{k.replace('_', '-')} {saved.get(k)} (now {v})" for k, v in config.items()
            if k not in resumable and saved.get(k) != v]
    if diff:
        raise CheckpointError(f"{path} was trained with other settings: {', '.join(diff)}; resume with the same "
                              f"flags (only --steps, --save-every, --sample-every may change)")
    if meta["prompts_sha256"] != _sha(prompts):
        raise CheckpointError(f"{path} was trained on another prompt list; resume with the same --prompts file")
    with torch.no_grad():
        for prefix, sd in (("student/", student.state_dict()), ("lora/", lora_state_dict(unet)), ("ema/", ema or {})):
            for k, v in sd.items():
                v.copy_(tensors[prefix + k])
    _load_opt(opt_student, tensors, "opt_student", meta["opt_student_groups"])
    if opt_lora is not None:
        _load_opt(opt_lora, tensors, "opt_lora", meta["opt_lora_groups"])
    gen.set_state(tensors["rng"])
    state.update(step=int(meta["step"]), cursor=int(meta["cursor"]), order=tensors["order"])


def _sha(prompts):
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def export_unet(state_dict, config, folder):
    """A standard `unet/` folder (config.json + diffusion_pytorch_model.safetensors): our load_unet and
    diffusers' UNet2DConditionModel.from_pretrained both read it unchanged."""
    os.makedirs(folder, exist_ok=True)
    _atomic_save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
                 os.path.join(folder, "diffusion_pytorch_model.safetensors"), {"format": "pt"})
    tmp = os.path.join(folder, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, os.path.join(folder, "config.json"))


def truncate_log(path, step):
    """Drop log lines written after the checkpoint (a crash between saves), so the log matches the weights."""
    if os.path.exists(path):
        keep = []
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        keep.append(line)
                except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                    pass
        with open(path, "w") as f:
            f.writelines(keep)
