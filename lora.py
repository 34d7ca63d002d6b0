"""LoRA (Hu et al., 2021) on the UNet's attention projections, for SwiftBrush's LoRA teacher eps_phi.

W x  ->  W x + (alpha / r) * B A x, with A (`lora_down`, r x in) random and B (`lora_up`, out x r) zero, so a
fresh LoRA changes nothing. The base weight keeps its official key (`...to_q.weight`): the LoRA sits beside
it (`...to_q.lora_down.weight`), so ONE UNet in memory is both the frozen teacher eps_psi (LoRA off) and the
LoRA teacher eps_phi (LoRA on).
"""
import json
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unet import WeightsError


class LoRALinear(nn.Linear):
    """An nn.Linear whose forward adds a low-rank update while `lora_enabled` is True."""

    @classmethod
    def wrap(cls, base: nn.Linear, rank, alpha):
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # shared, not copied: same keys, same memory
        self.rank, self.alpha, self.lora_enabled = rank, alpha, True
        # drawn on the CPU, from its generator, then moved: one seed gives one LoRA on every device
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, device="cpu")
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, device="cpu")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.lora_down.to(base.weight.device)
        self.lora_up.to(base.weight.device)
        return self

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.lora_enabled:
            out = out + self.lora_up(self.lora_down(x)) * (self.alpha / self.rank)
        return out


def _targets(unet, targets):
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            yield name, module


def inject_lora(unet, rank=64, alpha=108.0, targets=("to_q", "to_v")):
    """Wrap every Linear whose name ends with one of `targets` (e.g. "to_q", "to_out.0", "ff.net.2").

    Returns the LoRA parameters (the only ones an optimiser of eps_phi should see)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    found = list(_targets(unet, targets))
    if not found:
        raise ValueError(f"no Linear layer in the UNet matches LoRA targets {list(targets)}")
    for name, module in found:
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA")
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        parent._modules[child] = LoRALinear.wrap(module, rank, alpha)  # _modules: handles "to_out.0" too
    unet.lora_config = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    return lora_parameters(unet)


def lora_layers(unet):
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(unet):
    return [p for _, m in lora_layers(unet) for p in (m.lora_down.weight, m.lora_up.weight)]


def lora_state_dict(unet):
    return {k: v for k, v in unet.state_dict().items() if ".lora_down." in k or ".lora_up." in k}


def base_state_dict(unet):
    """The UNet's weights without any LoRA: exactly the official keys."""
    return {k: v for k, v in unet.state_dict().items() if ".lora_down." not in k and ".lora_up." not in k}


def set_lora(unet, enabled: bool):
    for _, m in lora_layers(unet):
        m.lora_enabled = enabled


@contextmanager
def lora_disabled(unet):
    """`with lora_disabled(unet):` runs the frozen teacher eps_psi through the same weights as eps_phi."""
    set_lora(unet, False)
    try:
        yield unet
    finally:
        set_lora(unet, True)


@torch.no_grad()
def merge_lora(unet):
    """Fold W += (alpha / r) B A into the base weights and drop the LoRA modules."""
    for name, m in lora_layers(unet):
        if m.lora_enabled:
            delta = m.lora_up.weight.float() @ m.lora_down.weight.float() * (m.alpha / m.rank)
            m.weight.add_(delta.to(m.weight.dtype))
        plain = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(plain)
        plain.in_features, plain.out_features, plain.weight, plain.bias = m.in_features, m.out_features, m.weight, m.bias
        parent_name, _, child = name.rpartition(".")
        unet.get_submodule(parent_name)._modules[child] = plain
    unet.__dict__.pop("lora_config", None)
    return unet


def save_lora(unet, path):
    tensors = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(unet).items()}
    save_file(tensors, path, metadata={"lora_config": json.dumps(unet.lora_config)})


def load_lora(unet, path):
    """Inject (if needed) and load LoRA weights saved by `save_lora`; checks keys and shapes."""
    try:
        with safe_open(path, "pt") as f:
            config = json.loads((f.metadata() or {})["lora_config"])
        tensors = load_file(path)
    except Exception as e:
        raise WeightsError(f"cannot read LoRA file {path}: {type(e).__name__}: {e}") from None
    if not lora_layers(unet):
        inject_lora(unet, config["rank"], config["alpha"], config["targets"])
    expected = lora_state_dict(unet)
    bad = sorted(set(expected) ^ set(tensors)) + [k for k in expected if k in tensors and expected[k].shape != tensors[k].shape]
    if bad:
        raise WeightsError(f"LoRA file {path} does not fit this UNet: {', '.join(bad[:4])}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k])
    return config
