"""Stable Diffusion's UNet (SD 1.x, 2.x and XL), from scratch, in the official (diffusers-layout) key names.

Every module is named after the keys of `unet/diffusion_pytorch_model.safetensors`
(`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`, ...), so the official weights
load with `load_state_dict(strict=True)` and no converter. Architecture: Rombach et al., "High-Resolution
Image Synthesis with Latent Diffusion Models" (CVPR 2022), as configured by `unet/config.json`; SDXL (Podell et al.,
"SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis", ICLR 2024) is the same blocks configured
otherwise (no attention at the first level, 1/2/10 transformer layers), plus the time embedding's "micro-conditioning":
the pooled text embedding and the image's size and crop (six ids) added to it (`add_embedding`).
"""
import json
import math
import os

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class WeightsError(ValueError):
    """A model folder, config or weights file that cannot be used; the message says what to do."""


# --------------------------------------------------------------------------------------------------
# Building blocks


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000):
    """Sinusoidal embedding of integer timesteps [B] -> [B, dim] (Vaswani et al. 2017, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else
                    [torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResnetBlock2D(nn.Module):
    def __init__(self, c_in, c_out, temb_dim, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, c_out) if temb_dim else None
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, cross-attention otherwise."""

    def __init__(self, dim, heads, context_dim=None, upcast=False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # key `to_out.0` (diffusers keeps a dropout at .1)

    def forward(self, x, context=None):
        context = x if context is None else context
        B, N, C = x.shape
        q, k, v = (p(s).view(B, -1, self.heads, C // self.heads).transpose(1, 2)
                   for p, s in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        if self.upcast and q.dtype == torch.float16:  # SD 2.1-768 overflows fp16 attention scores
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v).to(x.dtype)
        return self.to_out[0](out.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    """Gated GELU feed-forward input (Shazeer 2020): proj -> (h, gate) -> h * gelu(gate)."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, context_dim, upcast):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads, upcast=upcast)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, project in, transformer blocks over the H*W tokens, project out."""

    def __init__(self, channels, heads, context_dim, groups, layers, linear_proj, upcast):
        super().__init__()
        self.linear_proj = linear_proj  # SD 2.x: Linear; SD 1.x: 1x1 conv (same maths, other weight shape)
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = nn.Linear if linear_proj else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim, upcast) for _ in range(layers))
        self.proj_out = proj(channels, channels)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x)
        to_tokens = lambda a: a.permute(0, 2, 3, 1).reshape(B, H * W, C)
        h = to_tokens(self.proj_in(h)) if not self.linear_proj else self.proj_in(to_tokens(h))
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear_proj:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)
        return x + (h if self.linear_proj else self.proj_out(h))


class Downsample2D(nn.Module):
    def __init__(self, channels, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:  # the VAE pads right/bottom only
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)


class UNetBlock(nn.Module):
    """One down, mid or up block: resnets, optionally each followed by a spatial transformer, then a resampler.

    Down blocks return every intermediate output as a skip; up blocks consume one skip per resnet."""

    def __init__(self, kind, resnets, attentions, resample=None):
        super().__init__()
        self.kind = kind
        self.resnets = nn.ModuleList(resnets)
        if attentions:
            self.attentions = nn.ModuleList(attentions)
        if resample is not None:
            setattr(self, "downsamplers" if kind == "down" else "upsamplers", nn.ModuleList([resample]))

    def forward(self, x, temb, context, skips=None, up_size=None):
        attentions = getattr(self, "attentions", [None] * len(self.resnets))
        outputs = []
        if self.kind == "mid":
            x = self.resnets[0](x, temb)
            return self.resnets[1](attentions[0](x, context), temb), outputs
        skips = skips[::-1] if self.kind == "up" else [None] * len(self.resnets)  # not popped: checkpointing reruns this
        for resnet, attn, skip in zip(self.resnets, attentions, skips):
            if skip is not None:
                x = torch.cat([x, skip], dim=1)
            x = resnet(x, temb)
            if attn is not None:
                x = attn(x, context)
            outputs.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            outputs.append(x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, up_size)
        return x, outputs


# --------------------------------------------------------------------------------------------------
# The UNet

DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # type -> has attention
UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
UNSUPPORTED = {"class_embed_type": None, "encoder_hid_dim": None,
               "time_cond_proj_dim": None, "num_class_embeds": None, "only_cross_attention": False,
               "dual_cross_attention": False, "resnet_time_scale_shift": "default",
               "time_embedding_type": "positional", "center_input_sample": False, "act_fn": "silu",
               "attention_type": "default", "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_norm": None,
               "downsample_padding": 1, "mid_block_scale_factor": 1, "resnet_out_scale_factor": 1.0,
               "resnet_skip_time_act": False, "time_embedding_act_fn": None, "time_embedding_dim": None,
               "timestep_post_act": None, "encoder_hid_dim_type": None, "reverse_transformer_layers_per_block": None}
ADDITION_TYPES = (None, "text_time")  # addition_embed_type: none (SD 1.x/2.x) or SDXL's micro-conditioning
MICRO_IDS = 6  # SDXL's micro-conditioning: (original height, width, crop top, left, target height, width) in pixels


def sdxl_context(states, pooled, time_ids):
    """SDXL's conditioning as one tensor [B, L + k, D], so that CFG's batching, the LoRA teacher's prompt dropout and
    the ranks' shares treat it as SD's text states: the L token states, then k rows holding the pooled text embedding
    [B, P] and the six micro-conditioning ids [B, 6], zero-padded to D (k = 1 for SDXL: 1280 + 6 <= 2048)."""
    extra = torch.cat([pooled, time_ids.to(pooled.dtype)], dim=-1)
    width = states.shape[-1]
    rows = extra_rows(pooled.shape[-1], width)
    extra = F.pad(extra, (0, rows * width - extra.shape[-1]))
    return torch.cat([states, extra.view(len(states), rows, width).to(states.dtype)], dim=1)


def extra_rows(pooled_dim, width):
    """How many context rows of `width` the pooled embedding and the six ids take: ceil((P + 6) / width)."""
    return -(-(pooled_dim + MICRO_IDS) // width)


def split_sdxl_context(context, pooled_dim):
    """sdxl_context's inverse: (token states [B, L, D], pooled [B, P], time_ids [B, 6])."""
    rows = extra_rows(pooled_dim, context.shape[-1])
    extra = context[:, -rows:].reshape(len(context), -1)
    return context[:, :-rows], extra[:, :pooled_dim], extra[:, pooled_dim:pooled_dim + MICRO_IDS]


def _per_block(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


class UNet(nn.Module):
    """eps_theta(x_t, t, context): `UNet2DConditionModel` of Stable Diffusion, driven by its config.json."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = c = dict(config)
        down_types, up_types = c.get("down_block_types"), c.get("up_block_types")
        for field, types, known in (("down_block_types", down_types, DOWN_TYPES),
                                    ("up_block_types", up_types, UP_TYPES)):
            bad = [b for b in (types or []) if b not in known]
            if not types or bad:
                raise WeightsError(f"unet config: unsupported {field} {bad or types}; this UNet supports "
                                   f"{sorted(known)} (Stable Diffusion 1.x, 2.x and XL)")
        if c.get("addition_embed_type") not in ADDITION_TYPES:
            raise WeightsError(f"unet config: addition_embed_type={c['addition_embed_type']!r} is not supported "
                               f"(SD 1.x/2.x: none; SDXL: 'text_time')")
        if c.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise WeightsError(f"unet config: unsupported mid_block_type {c['mid_block_type']!r}")
        for key, ok in UNSUPPORTED.items():
            if c.get(key, ok) != ok:
                raise WeightsError(f"unet config: {key}={c[key]!r} is not supported (SD 1.x/2.x/XL use {ok!r})")
        boc = list(c["block_out_channels"])
        n = len(boc)
        if len(down_types) != n or len(up_types) != n:
            raise WeightsError("unet config: down_block_types, up_block_types and block_out_channels differ in length")
        layers = c.get("layers_per_block", 2)
        groups, eps = c.get("norm_num_groups", 32), c.get("norm_eps", 1e-5)
        # Trap: `attention_head_dim` is the number of heads in SD configs; `num_attention_heads` wins if set.
        heads = _per_block(c.get("num_attention_heads") or c.get("attention_head_dim", 8), n)
        context_dims = _per_block(c.get("cross_attention_dim", 1024), n)
        tf_layers = _per_block(c.get("transformer_layers_per_block", 1), n)
        linear, upcast = c.get("use_linear_projection", False), c.get("upcast_attention", False)
        self.flip_sin_to_cos, self.freq_shift = c.get("flip_sin_to_cos", True), c.get("freq_shift", 0)
        temb_dim = boc[0] * 4

        def attn(ch, i):
            return Transformer2DModel(ch, heads[i], context_dims[i], groups, tf_layers[i], linear, upcast)

        self.conv_in = nn.Conv2d(c.get("in_channels", 4), boc[0], 3, padding=1)
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = nn.Linear(boc[0], temb_dim)
        self.time_embedding.linear_2 = nn.Linear(temb_dim, temb_dim)
        self.micro_dim = None  # SDXL: each micro-conditioning id's sinusoidal width (256)
        if c.get("addition_embed_type") == "text_time":  # [pooled text | 6 ids, each embedded] -> added to temb
            self.micro_dim = c["addition_time_embed_dim"]
            self.pooled_dim = c["projection_class_embeddings_input_dim"] - MICRO_IDS * self.micro_dim
            self.add_embedding = nn.Module()
            self.add_embedding.linear_1 = nn.Linear(c["projection_class_embeddings_input_dim"], temb_dim)
            self.add_embedding.linear_2 = nn.Linear(temb_dim, temb_dim)

        self.down_blocks = nn.ModuleList()
        ch_out = boc[0]
        for i, kind in enumerate(down_types):
            ch_in, ch_out = ch_out, boc[i]
            resnets = [ResnetBlock2D(ch_in if j == 0 else ch_out, ch_out, temb_dim, groups, eps) for j in range(layers)]
            attns = [attn(ch_out, i) for _ in range(layers)] if DOWN_TYPES[kind] else []
            self.down_blocks.append(UNetBlock("down", resnets, attns, Downsample2D(ch_out) if i < n - 1 else None))

        self.mid_block = UNetBlock("mid", [ResnetBlock2D(boc[-1], boc[-1], temb_dim, groups, eps) for _ in range(2)],
                                   [attn(boc[-1], n - 1)])

        self.up_blocks = nn.ModuleList()
        rboc, rheads = boc[::-1], list(range(n))[::-1]
        ch_out = rboc[0]
        for i, kind in enumerate(up_types):
            ch_prev, ch_out, ch_skip_in = ch_out, rboc[i], rboc[min(i + 1, n - 1)]
            resnets = [ResnetBlock2D((ch_prev if j == 0 else ch_out) + (ch_skip_in if j == layers else ch_out),
                                     ch_out, temb_dim, groups, eps) for j in range(layers + 1)]
            attns = [attn(ch_out, rheads[i]) for _ in range(layers + 1)] if UP_TYPES[kind] else []
            self.up_blocks.append(UNetBlock("up", resnets, attns, Upsample2D(ch_out) if i < n - 1 else None))

        self.conv_norm_out = nn.GroupNorm(groups, boc[0], eps=eps)
        self.conv_out = nn.Conv2d(boc[0], c.get("out_channels", 4), 3, padding=1)
        self.gradient_checkpointing = False

    @staticmethod
    def recompute_context(unet):
        """What a checkpointed block's recomputation (in the backward) runs under, made at its forward; lora.py sets
        its own, which switches the adapters as they were at the forward."""
        return nullcontext()

    def _run(self, block, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            contexts = lambda: (nullcontext(), self.recompute_context(self))
            return checkpoint(block, *args, use_reentrant=False, context_fn=contexts)
        return block(*args)

    def forward(self, x, t, context):
        """x: [B, C, H, W] noisy latents; t: int timesteps [B] or scalar; context: text states [B, 77, D] (SDXL: with
        the pooled embedding and micro-conditioning ids in its last row, sdxl_context)."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        temb = timestep_embedding(t, self.time_embedding.linear_1.in_features, self.flip_sin_to_cos, self.freq_shift)
        temb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(temb.to(x.dtype))))
        if self.micro_dim:  # SDXL: temb + MLP([pooled, emb(id_1), ..., emb(id_6)])
            context, pooled, time_ids = split_sdxl_context(context, self.pooled_dim)
            ids = timestep_embedding(time_ids.flatten(), self.micro_dim, self.flip_sin_to_cos, self.freq_shift)
            added = torch.cat([pooled, ids.view(len(pooled), -1).to(pooled.dtype)], dim=-1).to(temb.dtype)
            temb = temb + self.add_embedding.linear_2(F.silu(self.add_embedding.linear_1(added)))
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, outputs = self._run(block, x, temb, context)
            skips += outputs
        x, _ = self._run(self.mid_block, x, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            up_size = skips[-1].shape[-2:] if skips else None  # match odd sizes exactly
            x, _ = self._run(block, x, temb, context, block_skips, up_size)
        x = F.silu(self.conv_norm_out(x))
        kind = "cpu" if x.device.type == "meta" else x.device.type  # meta (the memory plan counts on it): no autocast
        with torch.autocast(kind, enabled=False):  # the output layer in its weights' dtype, not autocast's:
            return self.conv_out(x.to(self.conv_out.weight.dtype))  # fp32 for the student, whose eps Eq. 7 x 14.6


def architecture_difference(a, b):
    """The first way UNet a differs from UNet b as a network (a weight's name or shape, a module's attention heads or
    norm groups, the time embedding), said of a, or None; their configs' bookkeeping (versions, resolution) aside."""
    def layout(unet):
        weights = [(f"weight {k}", tuple(v.shape)) for k, v in unet.state_dict().items()]
        modules = [(f"module {name or 'UNet'}", (getattr(mod, "heads", None), getattr(mod, "num_groups", None)))
                   for name, mod in unet.named_modules()]
        return weights + modules + [("time embedding", (unet.flip_sin_to_cos, unet.freq_shift))]
    ours, theirs = layout(a), layout(b)
    for (name, x), (their_name, y) in zip(ours, theirs):
        if name != their_name:
            return f"{name} where the other has {their_name}"
        if x != y:
            return f"{name} is {x}, the other's {y}"
    if len(ours) != len(theirs):
        return f"{len(ours)} weights and modules, the other {len(theirs)}"
    return None


# --------------------------------------------------------------------------------------------------
# Loading official folders: one clear error for every way a folder can be wrong

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin")


def read_config(folder, subfolder, name="config.json"):
    """Resolve `folder` (the model root or its `subfolder/`) and read its config.json (or `name`)."""
    folder = str(folder)
    if not os.path.isdir(folder):
        raise WeightsError(f"model folder {folder!r} does not exist; pass a local Stable Diffusion folder "
                           f"(diffusers layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    if not os.path.exists(os.path.join(folder, name)) and os.path.isdir(os.path.join(folder, subfolder)):
        folder = os.path.join(folder, subfolder)
    path = os.path.join(folder, name)
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"{path} not found; expected the `{subfolder}/` folder of a Stable Diffusion "
                           f"checkout (or its root)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e}); re-copy it from the model repository") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path} is not a JSON object")
    return folder, config


def read_state_dict(path):
    """Tensors of a .safetensors file (or a .bin read with weights_only=True: no pickle code runs)."""
    try:
        if path.endswith(".bin"):
            return torch.load(path, map_location="cpu", weights_only=True)
        from safetensors.torch import load_file
        return load_file(path)
    except Exception as e:  # safetensors/torch raise many types for truncated or foreign files
        raise WeightsError(f"cannot read weights file {path}: {type(e).__name__}: {e}. The file is corrupt or "
                           f"truncated; download it again") from None


def load_into(model, folder, names=WEIGHT_FILES, remap=None, dtype=None):
    """Find the weights file in `folder`, check every key and shape, then load (strict)."""
    path = next((os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n))), None)
    if path is None:
        raise WeightsError(f"no weights in {folder}: expected one of {', '.join(names)}")
    sd = read_state_dict(path)
    if remap:
        sd = remap(sd)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{len(lst)} {what}: {', '.join(lst[:4])}{' ...' if len(lst) > 4 else ''}"
                 for what, lst in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("wrong shapes", wrong)) if lst]
        raise WeightsError(f"{path} does not match its config.json ({'; '.join(parts)}); "
                           f"is the weights file from a different model?")
    dtype = dtype or torch.float32
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model


def load_unet(folder, dtype=torch.float32) -> UNet:
    """Load the official `unet/` folder (config.json + diffusion_pytorch_model[.fp16].safetensors)."""
    folder, config = read_config(folder, "unet")
    try:
        with torch.device("meta"):  # no memory until the weights are assigned
            model = UNet(config)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, WeightsError):
            raise WeightsError(f"{folder}/config.json: {e}") from None
        raise WeightsError(f"{folder}/config.json is not a Stable Diffusion UNet config ({type(e).__name__}: {e})") from None
    return load_into(model, folder, dtype=dtype).eval()
