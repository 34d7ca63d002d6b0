"""Original single-file Stable Diffusion checkpoints (CompVis/LDM layout) <-> our parts, SD 1.x and 2.x.

The file A1111 and ComfyUI load (`v1-5-pruned-emaonly.safetensors`, `v2-1_512-ema-pruned.safetensors`) holds the
UNet under `model.diffusion_model.`, the VAE under `first_stage_model.` and the text encoder under
`cond_stage_model.transformer.` (SD 1: a transformers CLIPTextModel) or `cond_stage_model.model.` (SD 2: the
OpenCLIP text tower). Our parts use the diffusers folder names (unet.py, vae.py) and transformers' `text_model.*`.

The mapping is written once, as data: each table row is an (ours, original) pair of key prefixes, read left to
right to write a file and right to left to read one. `{i}` is a block and `{j}` a layer within it on our side;
the original's own numbers for them (`{d}`, `{u}`, `{m}`, `{k}`, `{r}`, `{s}`) come from `renumber`. A row may carry
a sub-table for the rest of the key. Sources: diffusers `scripts/convert_diffusers_to_original_stable_diffusion.py`
and `src/diffusers/loaders/single_file_utils.py`.
"""
import functools
import math
import os
import pickle
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from harness.atomic import atomic
from unet import WeightsError

# ---------------------------------------------------------------------------------------------------------------
# The tables: (ours, original[, sub-table for the rest of the key]). First match wins, so specific rows come first.
# None on our side: a known original tensor we do not use (returned in `extra` so a file can be written back).

UNET_RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
               ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]
UNET = [
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("conv_in.", "input_blocks.0.0."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
    ("down_blocks.{i}.downsamplers.0.conv.", "input_blocks.{d}.0.op."),
    ("down_blocks.{i}.resnets.{j}.", "input_blocks.{d}.0.", UNET_RESNET),
    ("down_blocks.{i}.attentions.{j}.", "input_blocks.{d}.1."),  # transformer names are the same in both
    ("mid_block.attentions.0.", "middle_block.1."),
    ("mid_block.resnets.{j}.", "middle_block.{m}.", UNET_RESNET),
    ("up_blocks.{i}.upsamplers.0.conv.", "output_blocks.{u}.{s}.conv."),
    ("up_blocks.{i}.resnets.{j}.", "output_blocks.{u}.0.", UNET_RESNET),
    ("up_blocks.{i}.attentions.{j}.", "output_blocks.{u}.1."),
]
VAE_RESNET = [("conv_shortcut.", "nin_shortcut.")]
VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                 ("to_out.0.", "proj_out.")]  # 1x1 convs in the original: see to_original / from_original
VAE = [  # {c}: encoder or decoder
    ("{c}.conv_in.", "{c}.conv_in."),
    ("{c}.conv_out.", "{c}.conv_out."),
    ("{c}.conv_norm_out.", "{c}.norm_out."),
    ("{c}.mid_block.attentions.0.", "{c}.mid.attn_1.", VAE_ATTENTION),
    ("{c}.mid_block.resnets.{j}.", "{c}.mid.block_{k}.", VAE_RESNET),
    ("encoder.down_blocks.{i}.resnets.{j}.", "encoder.down.{i}.block.{j}.", VAE_RESNET),
    ("encoder.down_blocks.{i}.downsamplers.0.", "encoder.down.{i}.downsample."),
    ("decoder.up_blocks.{i}.resnets.{j}.", "decoder.up.{r}.block.{j}.", VAE_RESNET),
    ("decoder.up_blocks.{i}.upsamplers.0.", "decoder.up.{r}.upsample."),
    ("quant_conv.", "quant_conv."),
    ("post_quant_conv.", "post_quant_conv."),
    (None, "loss."),  # the autoencoder's training loss, carried by a few files
]
CLIP = [(None, "text_model.embeddings.position_ids"),  # a buffer, not a weight, in current transformers
        ("text_model.", "text_model."),
        (None, "embeddings.position_ids"),  # files from transformers < 4.x name the rest without `text_model.`
        ("text_model.embeddings.", "embeddings."), ("text_model.encoder.", "encoder."),
        ("text_model.final_layer_norm.", "final_layer_norm.")]
OPENCLIP_LAYER = [("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                  ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj."),
                  ("self_attn.qkv_proj.", "attn.in_proj_")]  # q, k, v stacked: see fuse_qkv / split_qkv
OPENCLIP = [
    ("text_model.embeddings.token_embedding.", "token_embedding."),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm.", "ln_final."),
    ("text_model.encoder.layers.{n}.", "transformer.resblocks.{n}.", OPENCLIP_LAYER),
    (None, "text_projection"), (None, "logit_scale"), (None, "attn_mask"),  # contrastive head, causal mask
]
PARTS = {"unet": ("model.diffusion_model.", UNET), "vae": ("first_stage_model.", VAE),
         "sd1": ("cond_stage_model.transformer.", CLIP), "sd2": ("cond_stage_model.model.", OPENCLIP)}
UNUSED_OPENCLIP_BLOCK = "transformer.resblocks.23."  # ViT-H's last block: SD 2 conditions on the penultimate layer,
# so diffusers (and we) never load it; files written without it (ours, diffusers' script) read the same


def renumber(fields, to_original, blocks, layers, up_attention):
    """The block-index arithmetic, both ways. We count (block i, layer j). The original counts the UNet's layers in
    one running index with a slot for each resampler, numbers the VAE decoder's blocks in reverse and its mid
    resnets from 1, and puts an upsampler after the up block's attention when there is one."""
    f, per = dict(fields), layers + 1
    if to_original:
        i, j = int(f.get("i", 0)), int(f.get("j", layers))  # a resampler takes the slot after the last layer
        f.update(d=per * i + j + 1, u=per * i + j, m=2 * j, k=j + 1, r=blocks - 1 - i,
                 s=2 if i in up_attention else 1)
    else:
        if "d" in f:
            f["i"], f["j"] = divmod(int(f["d"]) - 1, per)
        if "u" in f:
            f["i"], f["j"] = divmod(int(f["u"]), per)
        if "m" in f:
            f["j"] = int(f["m"]) // 2
        if "k" in f:
            f["j"] = int(f["k"]) - 1
        if "r" in f:
            f["i"] = blocks - 1 - int(f["r"])
    return f


_FIELD = re.compile(r"\\\{(\w)\\\}")


@functools.lru_cache(maxsize=None)
def _pattern(prefix):
    return re.compile(_FIELD.sub(lambda m: f"(?P<{m[1]}>{'encoder|decoder' if m[1] == 'c' else '[0-9]+'})",
                                 re.escape(prefix)))


def rename(key, table, to_original, shape=(1, 1, ())):
    """The key renamed by the first matching row; None for a row whose other side is None; KeyError if no row."""
    src, dst = (0, 1) if to_original else (1, 0)
    for row in table:
        match = row[src] is not None and _pattern(row[src]).match(key)
        if match:
            if row[dst] is None:
                return None
            rest = key[match.end():]
            if len(row) > 2:
                try:
                    rest = rename(rest, row[2], to_original)
                except KeyError:
                    pass  # a name both layouts share (weight, bias, norm1, ...)
            return row[dst].format(**renumber(match.groupdict(), to_original, *shape)) + rest
    raise KeyError(key)


def _indices(keys, regex):
    return {int(m[1]) for m in map(re.compile(regex).match, keys) if m}


def block_shape(part, keys, original):
    """(blocks, layers per block, up blocks with attention): the numbers `renumber` needs, from key names."""
    if part == "vae":
        return len(_indices(keys, r"decoder\.up\.(\d+)\." if original else r"decoder\.up_blocks\.(\d+)\.")), 1, ()
    if part != "unet":
        return 1, 1, ()
    if original:  # input_blocks.{per * (i + 1)}.0.op is the first downsampler
        blocks = len(_indices(keys, r"input_blocks\.(\d+)\.0\.op\.")) + 1
        return blocks, len(_indices(keys, r"output_blocks\.(\d+)\.")) // blocks - 1, ()
    return (len(_indices(keys, r"down_blocks\.(\d+)\.")), len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\.")),
            _indices(keys, r"up_blocks\.(\d+)\.attentions\."))


def rename_part(sd, part, to_original):
    """Rename one part's state dict; returns (renamed, known unused tensors). Unknown keys raise WeightsError."""
    table, shape = PARTS[part][1], block_shape(part, sd.keys(), not to_original)
    out, unused, unknown = {}, {}, []
    for key, tensor in sd.items():
        try:
            new = rename(key, table, to_original, shape)
        except KeyError:
            unknown.append(key)
            continue
        (unused if new is None else out)[new or key] = tensor
    if unknown:
        name = {"unet": "UNet", "vae": "VAE"}.get(part, "text encoder")
        shown = ", ".join(unknown[:3]) if to_original else ", ".join(PARTS[part][0] + k for k in unknown[:3])
        raise WeightsError(f"{len(unknown)} tensors are not part of a Stable Diffusion 1.x/2.x {name} (e.g. {shown}); "
                           f"{'pass diffusers-layout weights' if to_original else 'is this another model type?'}")
    return out, unused


QKV = ("q_proj", "k_proj", "v_proj")


def fuse_qkv(sd):
    """OpenCLIP stores q, k, v as one stacked `in_proj` tensor per layer."""
    out = {k.replace("q_proj", "qkv_proj"): torch.cat([sd[k.replace("q_proj", p)] for p in QKV])
           for k in sd if ".self_attn.q_proj." in k}
    return out | {k: v for k, v in sd.items() if not any(f".self_attn.{p}." in k for p in QKV)}


def split_qkv(sd):
    out = {k: v for k, v in sd.items() if ".qkv_proj." not in k}
    for k in sd.keys() - out.keys():  # clones: safetensors refuses tensors that share storage
        out |= {k.replace("qkv_proj", p): t.clone() for p, t in zip(QKV, sd[k].chunk(3))}
    return out


def text_model_names(text):
    """The text encoder's keys as its files name them: transformers >= 5.6 drops CLIPTextModel's `text_model.`
    prefix in memory."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text.items()}


def to_original(unet=None, vae=None, text=None, family="sd1"):
    """Our parts (diffusers-layout state dicts; any may be None) -> one dict in the original single-file layout."""
    if family not in ("sd1", "sd2"):
        raise WeightsError(f"family must be 'sd1' or 'sd2', not {family!r}")
    if text is not None:
        text = text_model_names(text)
        text = fuse_qkv(text) if family == "sd2" else text
    if vae is not None:  # the VAE's only Linear layers are its mid attention, stored as 1x1 convs
        vae = {k: v[:, :, None, None] if v.ndim == 2 else v for k, v in vae.items()}
    out = {}
    for part, sd in (("unet", unet), ("vae", vae), (family, text)):
        if sd is not None:
            out |= {PARTS[part][0] + k: v for k, v in rename_part(sd, part, to_original=True)[0].items()}
    return out


def from_original(sd, family=None):
    """One original-layout dict -> dict(family, unet, vae, text, extra): our state dicts (None when absent) and the
    original tensors we do not use (schedule buffers, EMA copies, OpenCLIP's last block and head, ...)."""
    check_is_sd(sd)
    found = [f for f in ("sd1", "sd2") if any(k.startswith(PARTS[f][0]) for k in sd)]
    if found:  # the text encoder names the family; a UNet-only file needs `family` (or: SD 2 projects with Linear)
        family = found[0]
    elif family is None:
        proj_in = sd.get(PARTS["unet"][0] + "middle_block.1.proj_in.weight")
        family = "sd2" if proj_in is not None and proj_in.ndim == 2 else "sd1"
    result, extra = {"family": family}, dict(sd)
    for name, part in (("unet", "unet"), ("vae", "vae"), ("text", family)):
        prefix = PARTS[part][0]
        mine = {k[len(prefix):]: extra.pop(k) for k in list(extra) if k.startswith(prefix)}
        if part == "sd2":
            extra |= {prefix + k: mine.pop(k) for k in list(mine) if k.startswith(UNUSED_OPENCLIP_BLOCK)}
        if not mine:
            result[name] = None
            continue
        ours, unused = rename_part(mine, part, to_original=False)
        extra |= {prefix + k: v for k, v in unused.items()}
        if part == "vae":
            ours = {k: v[:, :, 0, 0] if v.ndim == 4 and ".attentions." in k else v for k, v in ours.items()}
        result[name] = split_qkv(ours) if part == "sd2" else ours
    return result | {"extra": extra}


def check_is_sd(sd):
    """One clear line for the files people mistake for an SD 1.x/2.x checkpoint."""
    keys = list(sd)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise WeightsError("this is an SDXL checkpoint (conditioner.embedders.*); only Stable Diffusion 1.x/2.x "
                           "single files are supported: use an SD 1.x/2.x file")
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        raise WeightsError("this is a LoRA file, not a full checkpoint; load the base model's single file instead")
    if not any(k.startswith(PARTS["unet"][0]) for k in keys):
        raise WeightsError(f"not a Stable Diffusion 1.x/2.x single-file checkpoint: no model.diffusion_model.* keys "
                           f"(found e.g. {', '.join(keys[:3]) or 'nothing'}); for a diffusers folder, pass the folder")


# ---------------------------------------------------------------------------------------------------------------
# Architecture from the tensors' shapes: diffusers-style config.json dicts. What shapes cannot tell is SD's own
# value (the published configs): norm groups, sample size, scaling factor, token ids, and the heads: SD 1 has 8 per
# UNet block, SD 2 64-wide ones, like both text towers.

UNET_FIXED = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "center_input_sample": False,
              "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
              "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "num_class_embeds": None,
              "only_cross_attention": False}
VAE_FIXED = {"_class_name": "AutoencoderKL", "act_fn": "silu", "norm_num_groups": 32, "sample_size": 512,
             "scaling_factor": 0.18215}
TEXT_FIXED = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "layer_norm_eps": 1e-5,
              "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
              "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def check_heads(widths, divisor, what):
    """SD's rule for the heads (SD 2 and both text towers: 64 wide; SD 1's UNet: 8 per block) must split each width
    into whole heads, at least one: else the file is not SD-shaped, said in one line before a model divides by 0."""
    bad = [w for w in widths if w < divisor or w % divisor]
    if bad:
        raise WeightsError(f"its {what} widths {list(widths)} do not split into SD's heads ({bad[0]} / {divisor} = "
                           f"{bad[0] / divisor:g}): the file is not Stable Diffusion 1.x/2.x-shaped")


def unet_config(sd, family, upcast_attention=False, sample_size=64):
    blocks, layers, up_attention = block_shape("unet", sd.keys(), original=False)
    boc = [sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(blocks)]
    check_heads(boc, 64 if family == "sd2" else 8, "UNet block")
    attention = [f"down_blocks.{i}" if f"down_blocks.{i}.attentions.0.norm.weight" in sd else None
                 for i in range(blocks)]
    depth = [len(_indices(sd, rf"{b or 'mid_block'}\.attentions\.0\.transformer_blocks\.(\d+)\."))
             for b in attention]
    return UNET_FIXED | {
        "block_out_channels": boc, "layers_per_block": layers, "sample_size": sample_size,
        "in_channels": sd["conv_in.weight"].shape[1], "out_channels": sd["conv_out.weight"].shape[0],
        "down_block_types": ["CrossAttnDownBlock2D" if b else "DownBlock2D" for b in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if i in up_attention else "UpBlock2D" for i in range(blocks)],
        "attention_head_dim": 8 if family == "sd1" else [c // 64 for c in boc],  # = heads, a diffusers misnomer
        "cross_attention_dim": sd["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
        "use_linear_projection": sd["mid_block.attentions.0.proj_in.weight"].ndim == 2,  # SD 1: 1x1 conv
        "upcast_attention": upcast_attention}


def vae_config(sd):
    blocks = len(_indices(sd, r"encoder\.down_blocks\.(\d+)\."))
    return VAE_FIXED | {
        "block_out_channels": [sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(blocks)],
        "layers_per_block": len(_indices(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
        "down_block_types": ["DownEncoderBlock2D"] * blocks, "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "in_channels": sd["encoder.conv_in.weight"].shape[1], "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "latent_channels": sd["decoder.conv_in.weight"].shape[1]}


def text_config(sd, family):
    tokens = sd["text_model.embeddings.token_embedding.weight"]
    check_heads([tokens.shape[1]], 64, "text encoder")
    return TEXT_FIXED | {
        "hidden_act": "quick_gelu" if family == "sd1" else "gelu", "hidden_size": tokens.shape[1],
        "num_attention_heads": tokens.shape[1] // 64, "vocab_size": tokens.shape[0],
        "intermediate_size": sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": len(_indices(sd, r"text_model\.encoder\.layers\.(\d+)\.")),
        "max_position_embeddings": sd["text_model.embeddings.position_embedding.weight"].shape[0]}


# ---------------------------------------------------------------------------------------------------------------
# Files


def load_tensors(path):
    """(tensors, metadata) of a .safetensors file, or of a .ckpt/.pt read without running pickled code."""
    path, ext = str(path), os.path.splitext(str(path))[1].lower()
    if ext not in (".safetensors", ".ckpt", ".pt"):
        raise WeightsError(f"{path}: unknown extension {ext!r}; expected a .safetensors (or .ckpt/.pt) checkpoint")
    if not os.path.isfile(path):
        raise WeightsError(f"{path} not found; pass the path of a Stable Diffusion single-file checkpoint")
    try:
        if ext == ".safetensors":
            with safe_open(path, "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise WeightsError(f"{path} needs pickled code to load, which we refuse to run; convert it to "
                               f".safetensors with a tool you trust") from None
        raise WeightsError(f"cannot read {path}: the file is corrupt or truncated; download it again") from None
    except Exception as e:  # safetensors and torch raise many types for truncated or foreign files
        reason = str(e).split("\n")[0].split(". ")[0][:100]
        raise WeightsError(f"cannot read {path} ({type(e).__name__}: {reason}); the file is corrupt or truncated: "
                           f"download it again") from None
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # Lightning checkpoints wrap it
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise WeightsError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, {}


def read_single_file(path, full=True, upcast_attention=False, sample_size=64):
    """Read an original SD 1.x/2.x checkpoint: dict(family, unet=(config, sd), vae=(config, sd) or None,
    text=(config, sd) or None, extra). `upcast_attention=True, sample_size=96` for SD 2.x-768 (not in the file)."""
    sd, meta = load_tensors(path)
    parts = from_original(sd, meta.get("family"))
    unet = parts["unet"]
    if parts["vae"] is not None and unet["conv_in.weight"].shape[1] != parts["vae"]["decoder.conv_in.weight"].shape[1]:
        raise WeightsError(f"{path}: its UNet takes {unet['conv_in.weight'].shape[1]} input channels, not the VAE's "
                           f"latents alone: an inpainting, depth or instruct model, not a text-to-image one; use the "
                           f"base checkpoint")
    missing = [name for p, name in (("vae", "VAE (first_stage_model.*)"), ("text", "text encoder (cond_stage_model.*)"))
               if parts[p] is None]
    if full and missing:
        raise WeightsError(f"{path} has no {' and no '.join(missing)}; a full checkpoint (UNet, VAE and text encoder) "
                           f"is needed here, not a UNet-only file")
    family = parts["family"]
    configs = {"unet": lambda s: unet_config(s, family, upcast_attention, sample_size), "vae": vae_config,
               "text": lambda s: text_config(s, family)}
    return parts | {p: None if parts[p] is None else (configs[p](parts[p]), parts[p]) for p in configs}


def write_single_file(path, unet, vae=None, text=None, family="sd1", extra=None, metadata=None):
    """Write our parts as one original-layout .safetensors file (UNet-only when vae/text are None), atomically.
    `extra`: original tensors to carry over, e.g. `read_single_file(teacher)["extra"]` (OpenCLIP's last block);
    `metadata`: strings for the file's header, e.g. its prediction_type, which the tensors cannot say."""
    path = str(path)
    if not path.endswith(".safetensors"):
        raise WeightsError(f"{path}: write a .safetensors file (a .ckpt is a pickle, which we never write)")
    sd, extra = to_original(unet, vae, text, family), dict(extra or {})
    ours = (PARTS["unet"][0],) + ((PARTS["vae"][0],) if vae is not None else ())  # wholly ours: nothing to add
    clash = sorted(k for k in extra if k in sd or k.startswith(ours))
    if clash:
        raise WeightsError(f"{len(clash)} extra tensors would overwrite or add to the UNet/VAE/text weights being "
                           f"written (e.g. {clash[0]}); pass only tensors the parts do not hold")
    sd |= extra
    meta = {"format": "pt", "family": family, **(metadata or {})}
    with atomic(path) as tmp:  # never a half-written file
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=meta)


# ---------------------------------------------------------------------------------------------------------------
# The tensors of the original layout that our parts do not hold: what makes a written file complete for a strict load
# of the original code (ldm's LatentDiffusion with v1- / v2-inference.yaml, which A1111 builds its models with) and
# for ComfyUI, with values that change nothing SD computes. Sources: Stability-AI/stablediffusion and
# CompVis/stable-diffusion (ldm/models/diffusion/ddpm.py register_schedule), open_clip's text tower.

LDM_SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2")  # register_schedule's 12 buffers, in its order


def ldm_schedule(scheduler):
    """The 12 schedule buffers of ldm's LatentDiffusion, computed as register_schedule computes them (the betas in
    float64 torch, the rest in float64 numpy, v_posterior 0) and stored float32, also in an fp16 file: A1111 samples
    with the file's alphas_cumprod, and fp16 would round abar_999 = 0.0046601 to 0.0046616. `scheduler`: a diffusers
    scheduler config (SD's when {}); its scaled_linear is ldm's "linear", its linear ldm's "sqrt_linear"."""
    import numpy as np
    T, start, end = (scheduler.get(k, v) for k, v in (("num_train_timesteps", 1000), ("beta_start", 0.00085),
                                                       ("beta_end", 0.012)))
    kind = scheduler.get("beta_schedule", "scaled_linear")
    if kind not in ("scaled_linear", "linear"):
        raise WeightsError(f"beta_schedule {kind!r} has no original single-file layout (scaled_linear or linear)")
    if kind == "scaled_linear":
        betas = (torch.linspace(start ** 0.5, end ** 0.5, T, dtype=torch.float64) ** 2).numpy()
    else:
        betas = torch.linspace(start, end, T, dtype=torch.float64).numpy()
    alphas = 1. - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1., alphas_cumprod[:-1])
    v_posterior = 0.
    posterior_variance = ((1 - v_posterior) * betas * (1. - alphas_cumprod_prev) / (1. - alphas_cumprod)
                          + v_posterior * betas)
    values = (betas, alphas_cumprod, alphas_cumprod_prev, np.sqrt(alphas_cumprod), np.sqrt(1. - alphas_cumprod),
              np.log(1. - alphas_cumprod), np.sqrt(1. / alphas_cumprod), np.sqrt(1. / alphas_cumprod - 1),
              posterior_variance, np.log(np.maximum(posterior_variance, 1e-20)),
              betas * np.sqrt(alphas_cumprod_prev) / (1. - alphas_cumprod),
              (1. - alphas_cumprod_prev) * np.sqrt(alphas) / (1. - alphas_cumprod))
    return {name: torch.tensor(v, dtype=torch.float32) for name, v in zip(LDM_SCHEDULE, values)}


def original_only_tensors(family, text, scheduler):
    """The original layout's tensors beyond our parts: the 12 schedule buffers (ldm's values); SD 1's position_ids
    (int64 [1, 77], as transformers < 4.31 saved them); SD 2's OpenCLIP block 23 (all zeros, an exact identity: x + 0
    + 0; SD 2 conditions on block 22's output, so no reader's image changes), text_projection (the identity, shape
    [width, width]: diffusers reads the width from it) and logit_scale (ln 100; only CLIP scores read it). `text`:
    our text encoder's state dict, whose names, shapes, dtype and device these follow (the meta device works)."""
    out = ldm_schedule(scheduler)
    text = text_model_names(text)
    tokens = text["text_model.embeddings.token_embedding.weight"]
    like = dict(dtype=tokens.dtype, device=tokens.device)
    prefix = PARTS[family][0]
    if family == "sd1":
        if "text_model.embeddings.position_ids" not in text:  # a buffer that transformers >= 4.31 does not save
            n = text["text_model.embeddings.position_embedding.weight"].shape[0]
            out[prefix + "text_model.embeddings.position_ids"] = torch.arange(n)[None]  # int64, on the CPU
        return out
    last = UNUSED_OPENCLIP_BLOCK.split(".")[-2]  # "23": ViT-H's 24th block, absent from an SD 2 folder's 23 layers
    if len(_indices(text, r"text_model\.encoder\.layers\.(\d+)\.")) == int(last):
        block = fuse_qkv({k: v for k, v in text.items() if k.startswith(f"text_model.encoder.layers.{int(last) - 1}.")})
        for k, v in rename_part(block, "sd2", to_original=True)[0].items():
            out[prefix + k.replace(f".{int(last) - 1}.", f".{last}.")] = torch.zeros(v.shape, **like)
    width = tokens.shape[1]
    out[prefix + "text_projection"] = torch.eye(width, **like)
    out[prefix + "logit_scale"] = torch.full((), math.log(100.0), **like)
    return out


SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False,
             "steps_offset": 1}  # SD 1.x and 2.x were all trained on this schedule; only the prediction type differs
EXTRA_FILE = "original_extra.safetensors"  # a folder's unused original tensors, for writing a single file back


def write_folder(parts, folder, prediction_type):
    """`read_single_file`'s parts as a diffusers-layout folder (no tokenizer: a single file has none), with the
    original tensors a written-back file keeps (OpenCLIP's last block and head, the schedule buffers) in EXTRA_FILE."""
    import json
    names = {"unet": ("unet", "diffusion_pytorch_model.safetensors"),
             "vae": ("vae", "diffusion_pytorch_model.safetensors"), "text": ("text_encoder", "model.safetensors")}
    for part, (sub, weights) in names.items():
        config, sd = parts[part]
        os.makedirs(os.path.join(folder, sub))
        with open(os.path.join(folder, sub, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, sub, weights), {"format": "pt"})
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER | {"prediction_type": prediction_type}, f, indent=2)
    text = {k: v.contiguous() for k, v in parts["extra"].items()
            if k.startswith(PARTS[parts["family"]][0]) or k in LDM_SCHEDULE}  # the file's own, kept for writing back
    save_file(text, os.path.join(folder, EXTRA_FILE), {"family": parts["family"]})


def file_metadata(path):
    """The header metadata of a .safetensors file ({} for other files or none)."""
    if not str(path).endswith(".safetensors"):
        return {}
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except Exception:
        return {}  # read_single_file says what is wrong with the file


def is_full_checkpoint(path):
    """True if the file holds a VAE and a text encoder besides the UNet (read from its key names only)."""
    if str(path).endswith(".safetensors") and os.path.isfile(path):
        try:
            with safe_open(path, "pt") as f:
                keys = list(f.keys())
        except Exception as e:
            raise WeightsError(f"cannot read {path} ({type(e).__name__}); the file is corrupt or truncated: download "
                               f"it again") from None
    else:
        keys = list(load_tensors(path)[0])
    return all(any(k.startswith(p) for k in keys) for p in (PARTS["vae"][0], "cond_stage_model."))
