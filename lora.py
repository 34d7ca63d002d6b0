"""LoRA (Hu et al., 2021): named adapters beside the UNet's Linear and Conv2d layers, each switched on and off by
itself, so that ONE UNet in memory is all three networks of Algorithm 1:

    eps_psi    the frozen teacher    no adapter on      `lora_disabled(unet)`
    eps_phi    the LoRA teacher      adapter "phi" on   the UNet's own state once phi is injected
    eps_theta  the LoRA student      adapter "theta"    `Adapted(unet, "theta")` (--student-lora; the paper's
                                                        student is a full copy of the UNet instead)

An adapter adds (alpha / r) B A x to its layer's W x + b: A (`lora_down`, r x in) random, B (`lora_up`, out x r)
zero, so a fresh adapter changes nothing (loralib's `scaling = alpha / r`). On a Conv2d, A is a Conv2d with the
layer's kernel, stride and padding to r channels and B a 1x1 Conv2d (kohya's LoCon, peft's LoRA on convolutions):
B A with the kernel folded in is a weight of the layer's shape. The base weights keep their official keys
(`...to_q.weight`); an adapter sits beside them (`...to_q.adapters.phi.lora_down.weight`).
"""
import math
from contextlib import nullcontext
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unet import WeightsError


class Adapter(nn.Module):
    """One adapter on one layer: x -> (alpha / r) B A x."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.rank, self.alpha, self.enabled = rank, alpha, True
        # drawn on the CPU, from its generator, then moved: one seed gives one LoRA on every device
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       bias=False, device="cpu")
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, device="cpu")
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, device="cpu")
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, device="cpu")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.to(base.weight.device)

    def forward(self, x):
        return self.lora_up(self.lora_down(x)) * (self.alpha / self.rank)


def lora_weight(down, up, alpha):
    """(alpha / r) B A in the shape of the layer's weight (a Conv2d's [out, in, k, k]), in fp32."""
    rank = down.shape[0]
    return (up.float().flatten(1) @ down.float().flatten(1)).view(up.shape[0], *down.shape[1:]) * (alpha / rank)


class LoRALayer:
    """A Linear or Conv2d with adapters: its own output, plus each adapter's that is on."""

    def forward(self, x):
        out = self.base_forward(x)
        for adapter in self.adapters.values():
            if adapter.enabled:
                out = out + adapter(x)
        return out


class LoRALinear(LoRALayer, nn.Linear):
    def base_forward(self, x):
        return F.linear(x, self.weight, self.bias)


class LoRAConv2d(LoRALayer, nn.Conv2d):
    def base_forward(self, x):
        return self._conv_forward(x, self.weight, self.bias)


WITH_ADAPTERS = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}


def inject_lora(unet, rank=64, alpha=108.0, targets=("to_q", "to_v"), name="phi", on=True):
    """Add adapter `name` (switched on, or off) beside every Linear and Conv2d whose name ends with one of
    `targets` (e.g. "to_q", "to_out.0", "conv1"). A layer becomes its LoRA class in place (the same module, the same
    parameters). Returns the adapter's parameters (the only ones its optimiser should see)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")

    def is_target(layer_name, module):
        adaptable = type(module) in WITH_ADAPTERS or isinstance(module, LoRALayer)
        named = any(layer_name == t or layer_name.endswith("." + t) for t in targets)
        return adaptable and named and ".adapters." not in layer_name  # not an adapter's own layers

    found = [(n, m) for n, m in unet.named_modules() if is_target(n, m)]
    if not found:
        raise ValueError(f"no Linear or Conv2d layer in the UNet matches LoRA targets {list(targets)}")
    for layer_name, layer in found:
        if not isinstance(layer, LoRALayer):
            layer.__class__ = WITH_ADAPTERS[type(layer)]
            layer.adapters = nn.ModuleDict()
        if name in layer.adapters:
            raise ValueError(f"{layer_name} already has a LoRA {name!r}")
        layer.adapters[name] = Adapter(layer, rank, alpha)
        layer.adapters[name].enabled = on
    unet.recompute_context = adapters_as_now  # unet.py: a checkpointed block recomputes with its forward's adapters
    unet.all_adapters = all_adapters(unet)
    return lora_parameters(unet, name)


def lora_layers(unet):
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, LoRALayer)]


def all_adapters(unet):
    """[(name, adapter)] of every layer; kept as unet.all_adapters, so a switch walks no module tree."""
    return [(name, a) for _, m in lora_layers(unet) for name, a in m.adapters.items()]


def adapters(unet, name="phi"):
    """[(layer name, its adapter `name`)] in the UNet's order."""
    return [(n, m.adapters[name]) for n, m in lora_layers(unet) if name in m.adapters]


def lora_parameters(unet, name="phi"):
    return [p for _, a in adapters(unet, name) for p in (a.lora_down.weight, a.lora_up.weight)]


def lora_state_dict(unet, name="phi"):
    return {k: v for k, v in unet.state_dict().items() if f".adapters.{name}." in k}


def base_state_dict(unet):
    """The UNet's weights without any adapter: exactly the official keys."""
    return {k: v for k, v in unet.state_dict().items() if ".adapters." not in k}


def adapters_on(unet, *names):
    """`with adapters_on(unet, "theta"):` within the block the adapters `names` are on and every other off; as they
    were after."""
    return AdapterSwitch(unet, names)


class AdapterSwitch:
    """adapters_on's context; a class, as a recomputation may enter it more than once (--step-in-backward's two
    backwards each recompute the checkpointed blocks)."""

    def __init__(self, unet, names):
        self.unet, self.names, self.before = unet, names, []

    def __enter__(self):
        every = getattr(self.unet, "all_adapters", [])
        self.before.append([(a, a.enabled) for _, a in every])
        for name, a in every:
            a.enabled = name in self.names
        return self.unet

    def __exit__(self, *error):
        for a, enabled in self.before.pop():
            a.enabled = enabled


def lora_disabled(unet):
    """`with lora_disabled(unet):` runs the frozen teacher eps_psi through the same weights as eps_phi."""
    return adapters_on(unet)


def adapters_as_now(unet):
    """A context that switches the UNet's adapters as they are now (entered later: a recomputation's)."""
    return adapters_on(unet, *{name for name, a in unet.all_adapters if a.enabled})


@torch.no_grad()
def merge_lora(unet, name="phi"):
    """Fold W += (alpha / r) B A of adapter `name` into the base weights and drop it; a layer left without adapters
    is a plain Linear or Conv2d again."""
    for _, layer in lora_layers(unet):
        if name in layer.adapters:
            adapter = layer.adapters.pop(name)
            delta = lora_weight(adapter.lora_down.weight, adapter.lora_up.weight, adapter.alpha)
            layer.weight.add_(delta.to(layer.weight.dtype))
        if not layer.adapters:
            del layer.adapters
            layer.__class__ = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear
    unet.all_adapters = all_adapters(unet)
    return unet


class Adapted(nn.Module):
    """The UNet with adapter `name` on, every other off, as a network of its own: its parameters and state dict are
    the adapter's alone, keyed as LoRA files key them (kohya's `lora_unet_<layer>.lora_down.weight`), its forward the
    UNet's. The LoRA student eps_theta is Adapted(teacher, "theta"): its optimiser, EMA, checkpoint and DDP see the
    adapter only, and the UNet's weights stay the teacher's."""

    def __init__(self, unet, name):
        super().__init__()
        self.name, self.layer_of = name, {}
        for layer_name, adapter in adapters(unet, name):
            key = "lora_unet_" + layer_name.replace(".", "_")
            self.add_module(key, adapter)
            self.layer_of[key] = layer_name
        self.__dict__["unet"] = unet  # not a submodule: the base weights are not this network's

    def forward(self, x, t, context):
        """The UNet with this adapter. On a bf16 base (--teacher-precision bf16) a pass made outside autocast
        (sample grids, a K-step chain: fp32 for a student of its own) runs under bf16 autocast: the base has no fp32
        weights to run in."""
        dtype = self.unet.conv_in.weight.dtype
        kind = "cpu" if x.device.type == "meta" else x.device.type
        cast = dtype != torch.float32 and not torch.is_autocast_enabled(kind)
        with adapters_on(self.unet, self.name), torch.autocast(kind, dtype) if cast else nullcontext():
            return self.unet(x, t, context)

    def train(self, mode=True):
        self.unet.train(mode)  # the UNet's mode decides its gradient checkpointing
        return super().train(mode)

    @property
    def config(self):
        return self.unet.config

    @property
    def gradient_checkpointing(self):
        return self.unet.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on):
        self.unet.gradient_checkpointing = on

    @torch.no_grad()
    def merged_state_dict(self, weights=None):
        """The plain UNet's state dict (official keys, fp32) with the adapter folded into its base weights: the
        adapter's own, or `weights`, a state dict of this network (its EMA)."""
        weights = weights or self.state_dict()
        # on the CPU: no second UNet on the device
        merged = {k: v.detach().to("cpu", torch.float32) for k, v in base_state_dict(self.unet).items()}
        for key, layer_name in self.layer_of.items():
            down, up = (weights[f"{key}.{part}.weight"].cpu() for part in ("lora_down", "lora_up"))
            delta = lora_weight(down, up, getattr(self, key).alpha)
            merged[f"{layer_name}.weight"] = merged[f"{layer_name}.weight"] + delta
        return merged


# --------------------------------------------------------------------------------------------------
# LoRA files in kohya's layout, the one ComfyUI's LoraLoader, A1111 and diffusers' load_lora_weights read: for each
# layer `lora_unet_<its name, dots as underscores>.lora_down.weight`, `.lora_up.weight` and `.alpha`


def save_lora_file(adapted, weights, path, dtype=torch.float32):
    """An Adapted network's adapter as a LoRA file: its own weights, or `weights` (a state dict of it: its EMA)."""
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in (weights or adapted.state_dict()).items()}
    rank = alpha = None
    for key in adapted.layer_of:
        adapter = getattr(adapted, key)
        rank, alpha = adapter.rank, adapter.alpha
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                       "ss_network_alpha": str(alpha)})


def is_lora_file(path):
    """Whether a .safetensors file holds a LoRA in kohya's layout (its keys lora_unet_*)."""
    try:
        with safe_open(path, "pt") as f:
            return any(k.startswith("lora_unet_") for k in f.keys())
    except Exception:
        return False  # not readable: the caller's reader says why


def read_lora_file(path):
    """{layer key: (down, up, alpha)} of a LoRA file in kohya's layout (alpha = r where the file has none)."""
    try:
        tensors = load_file(path)
    except Exception as e:
        raise WeightsError(f"cannot read LoRA file {path}: {type(e).__name__}: {e}") from None
    keys = {k.rsplit(".", 2)[0] for k in tensors if k.endswith((".lora_down.weight", ".lora_up.weight"))}
    other = sorted(k for k in tensors if not k.startswith("lora_unet_"))
    if not keys or other:
        raise WeightsError(f"{path} is not a UNet LoRA in kohya's layout (lora_unet_*.lora_down.weight, lora_up, "
                           f"alpha)" + (f": it also holds {other[0]}" if other else ""))
    layers = {}
    for key in sorted(keys):
        down, up = tensors.get(f"{key}.lora_down.weight"), tensors.get(f"{key}.lora_up.weight")
        if down is None or up is None:
            raise WeightsError(f"{path}: {key} has no {'lora_up' if down is not None else 'lora_down'} weight")
        alpha = tensors.get(f"{key}.alpha")
        layers[key] = (down, up, down.shape[0] if alpha is None else float(alpha))
    return layers


@torch.no_grad()
def apply_lora_file(unet, path, strength=1.0):
    """Fold a LoRA file into the UNet's weights at `strength` (W += strength (alpha / r) B A), as ComfyUI's
    LoraLoader and A1111 apply it: the one-step LoRA on the teacher, or on any finetune of its architecture."""
    by_key = {"lora_unet_" + n.replace(".", "_"): m for n, m in unet.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d))}
    for key, (down, up, alpha) in read_lora_file(path).items():
        layer = by_key.get(key)
        if layer is None:
            raise WeightsError(f"{path} adapts {key}, which this UNet does not have: a LoRA of another architecture")
        delta = lora_weight(down, up, alpha)
        if delta.shape != layer.weight.shape:
            raise WeightsError(f"{path}: {key} is {tuple(delta.shape)}, the UNet's layer {tuple(layer.weight.shape)}: "
                               f"a LoRA of another architecture")
        layer.weight.add_((strength * delta).to(layer.weight.device, layer.weight.dtype))
    return unet
