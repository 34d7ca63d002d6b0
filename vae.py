"""Stable Diffusion's AutoencoderKL (the VAE between 8x-downsampled latents and RGB), from scratch.

Module names follow the official `vae/` keys, so the weights load strictly. Latent convention as in SD:
x_0 = encode(image) * scaling_factor, image = decode(x_0 / scaling_factor).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from unet import Downsample2D, ResnetBlock2D, Upsample2D, WeightsError, load_into, read_config


class VAEAttention(nn.Module):
    """Single-head self-attention over the H*W positions of the mid block, with a residual."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (p(h)[:, None] for p in (self.to_q, self.to_k, self.to_v))
        h = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Block(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D / UNetMidBlock2D (no time embedding)."""

    def __init__(self, c_in, c_out, n, groups, down=False, up=False, mid=False):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(c_in if i == 0 else c_out, c_out, None, groups, 1e-6)
                                     for i in range(n))
        if mid:
            self.attentions = nn.ModuleList([VAEAttention(c_out, groups)])
        if down:
            self.downsamplers = nn.ModuleList([Downsample2D(c_out, padding=0)])
        if up:
            self.upsamplers = nn.ModuleList([Upsample2D(c_out)])

    def forward(self, x):
        if hasattr(self, "attentions"):  # mid: resnet, attention, resnet
            return self.resnets[1](self.attentions[0](self.resnets[0](x)))
        for resnet in self.resnets:
            x = resnet(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class Coder(nn.Module):
    """The encoder (image -> 2 x latent moments) or the decoder (latent -> image)."""

    def __init__(self, c_in, c_out, boc, layers, groups, decoder):
        super().__init__()
        n = len(boc)
        self.conv_in = nn.Conv2d(c_in, boc[-1] if decoder else boc[0], 3, padding=1)
        if decoder:
            self.mid_block = Block(boc[-1], boc[-1], 2, groups, mid=True)
            rboc = boc[::-1]
            self.up_blocks = nn.ModuleList(Block(rboc[max(i - 1, 0)], rboc[i], layers + 1, groups, up=i < n - 1)
                                           for i in range(n))
        else:
            self.down_blocks = nn.ModuleList(Block(boc[max(i - 1, 0)], boc[i], layers, groups, down=i < n - 1)
                                             for i in range(n))
            self.mid_block = Block(boc[-1], boc[-1], 2, groups, mid=True)
        self.conv_norm_out = nn.GroupNorm(groups, boc[0] if decoder else boc[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(boc[0] if decoder else boc[-1], c_out, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        if hasattr(self, "down_blocks"):
            for block in self.down_blocks:
                x = block(x)
        x = self.mid_block(x)
        for block in getattr(self, "up_blocks", []):
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = c = dict(config)
        for key, ok in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            bad = [b for b in c.get(key, [ok]) if b != ok]
            if bad:
                raise WeightsError(f"vae config: unsupported {key} {bad}; AutoencoderKL uses {ok}")
        boc, layers, groups = list(c["block_out_channels"]), c.get("layers_per_block", 2), c.get("norm_num_groups", 32)
        z = c.get("latent_channels", 4)
        self.scaling_factor = c.get("scaling_factor") or 0.18215  # absent in some SD 2.1 copies
        self.encoder = Coder(c.get("in_channels", 3), 2 * z, boc, layers, groups, decoder=False)
        self.decoder = Coder(z, c.get("out_channels", 3), boc, layers, groups, decoder=True)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if c.get("use_quant_conv", True) else nn.Identity()
        self.post_quant_conv = nn.Conv2d(z, z, 1) if c.get("use_post_quant_conv", True) else nn.Identity()

    def encode(self, image, sample=False, generator=None):
        """image in [-1, 1] -> latent mean (or a sample of the diagonal Gaussian), unscaled."""
        mean, logvar = self.quant_conv(self.encoder(image)).chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)

    def decode(self, latents):
        """unscaled latents -> image, nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))


def pixels_per_latent(config):
    """The VAE's downsampling, from its config: 2 at every level but the last (SD's and SDXL's 4 levels: 8)."""
    return 2 ** (len(config["block_out_channels"]) - 1)


@torch.no_grad()
def to_images(vae, x0, chunk=4):
    """x_0 -> images in [-1, 1] on the CPU: image = decode(x_0 / scaling_factor); with no VAE, x_0 are the pixels.
    The VAE visits x_0's device (a GPU) only for the call, and decodes `chunk` images at a time: at SDXL's 1024 px
    a decode holds about 2 GB an image in fp32 (its last level: 128 channels of 1024 x 1024)."""
    if vae is None:
        return x0.float().clamp(-1, 1).cpu()
    home, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    vae.to(x0.device)
    images = [vae.decode(part.to(dtype) / vae.scaling_factor).float().clamp(-1, 1).cpu() for part in x0.split(chunk)]
    vae.to(home)
    return torch.cat(images)


def _remap_legacy(sd):
    """Older files name the mid-block attention query/key/value/proj_attn, sometimes as 1x1 convs."""
    names = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if ".attentions." in k and len(parts) >= 2 and parts[-2] in names:
            k = ".".join(parts[:-2] + [names[parts[-2]], parts[-1]])
            if v.ndim == 4:
                v = v[:, :, 0, 0]
        out[k] = v
    return out


def load_vae(folder, dtype=torch.float32) -> AutoencoderKL:
    """Load the official `vae/` folder (config.json + diffusion_pytorch_model[.fp16].safetensors)."""
    folder, config = read_config(folder, "vae")
    try:
        with torch.device("meta"):
            model = AutoencoderKL(config)
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{folder}/config.json is not an AutoencoderKL config ({type(e).__name__}: {e})") from None
    return load_into(model, folder, remap=_remap_legacy, dtype=dtype).eval()
