"""Original single-file Stable Diffusion checkpoints (CompVis/LDM and Stability's sgm layouts) <-> our parts, SD 1.x,
2.x and SDXL.

The file A1111 and ComfyUI load (`v1-5-pruned-emaonly.safetensors`, `v2-1_512-ema-pruned.safetensors`) holds the
UNet under `model.diffusion_model.`, the VAE under `first_stage_model.` and the text encoder under
`cond_stage_model.transformer.` (SD 1: a transformers CLIPTextModel) or `cond_stage_model.model.` (SD 2: the
OpenCLIP text tower). SDXL's (`sd_xl_base_1.0.safetensors`, sgm's DiffusionEngine) keeps the UNet and VAE prefixes
and holds its two text towers under `conditioner.embedders.0.transformer.` (CLIP ViT-L, transformers names) and
`conditioner.embedders.1.model.` (OpenCLIP ViT-bigG, open_clip names). Our parts use the diffusers folder names
(unet.py, vae.py) and transformers' `text_model.*`.

The mapping is written once, as data: each table row is an (ours, original) pair of key prefixes, read left to
right to write a file and right to left to read one. `{i}` is a block and `{j}` a layer within it on our side;
the original's own numbers for them (`{d}`, `{u}`, `{m}`, `{k}`, `{r}`, `{s}`) come from `renumber`. A row may carry
a sub-table for the rest of the key. Sources: diffusers `scripts/convert_diffusers_to_original_stable_diffusion.py`
and `src/diffusers/loaders/single_file_utils.py`; for SDXL also Stability-AI/generative-models (sgm) and ComfyUI's
`comfy/supported_models.py` (docs/single-files.md has the details).
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
# SDXL's UNet: SD's, plus sgm's `label_emb = Sequential(Sequential(Linear, SiLU, Linear))`, the pooled text and the
# six micro-conditioning ids into the time embedding (diffusers' add_embedding; DIFFUSERS_TO_LDM_MAPPING's
# "addition_embed_type" rows). Its own table, so that an SD 1.x/2.x file with these keys is still refused.
UNET_XL = [("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")] + UNET
# SDXL's OpenCLIP bigG: SD 2's tower (all 32 blocks used: the pooled output runs the last one) with its projection,
# which open_clip applies as `x @ text_projection` [width, dim] and transformers as a Linear [dim, width]: one is the
# other's transpose (see to_original / from_original), as diffusers' convert_open_clip_checkpoint and ComfyUI's
# clip_text_transformers_convert read it.
OPENCLIP_G = [("text_projection.weight", "text_projection")] + [row for row in OPENCLIP if row[1] != "text_projection"]
PARTS = {"unet": ("model.diffusion_model.", UNET), "vae": ("first_stage_model.", VAE),
         "sd1": ("cond_stage_model.transformer.", CLIP), "sd2": ("cond_stage_model.model.", OPENCLIP),
         "unet_xl": ("model.diffusion_model.", UNET_XL), "sdxl_l": ("conditioner.embedders.0.transformer.", CLIP),
         "sdxl_g": ("conditioner.embedders.1.model.", OPENCLIP_G)}
# Each family's parts: its UNet table and its text encoders, in the folder's order (text_encoder, text_encoder_2).
FAMILIES = {"sd1": ("unet", ("sd1",)), "sd2": ("unet", ("sd2",)), "sdxl": ("unet_xl", ("sdxl_l", "sdxl_g"))}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
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
    if part not in ("unet", "unet_xl"):
        return 1, 1, ()
    if original:  # input_blocks.{per * (i + 1)}.0.op is the first downsampler
        blocks = len(_indices(keys, r"input_blocks\.(\d+)\.0\.op\.")) + 1
        return blocks, len(_indices(keys, r"output_blocks\.(\d+)\.")) // blocks - 1, ()
    return (len(_indices(keys, r"down_blocks\.(\d+)\.")), len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\.")),
            _indices(keys, r"up_blocks\.(\d+)\.attentions\."))


PART_NAMES = {"unet": "a Stable Diffusion 1.x/2.x UNet", "vae": "a Stable Diffusion 1.x/2.x/XL VAE",
              "sd1": "a Stable Diffusion 1.x/2.x text encoder", "sd2": "a Stable Diffusion 1.x/2.x text encoder",
              "unet_xl": "an SDXL UNet", "sdxl_l": "SDXL's CLIP ViT-L text encoder",
              "sdxl_g": "SDXL's OpenCLIP ViT-bigG text encoder"}


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
        shown = ", ".join(unknown[:3]) if to_original else ", ".join(PARTS[part][0] + k for k in unknown[:3])
        raise WeightsError(f"{len(unknown)} tensors are not part of {PART_NAMES[part]} (e.g. {shown}); "
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
    prefix in memory (CLIPTextModelWithProjection keeps it, and its projection sits beside it)."""
    return {k if k.startswith("text_model.") or k == "text_projection.weight" else "text_model." + k: v
            for k, v in text.items()}


def to_original(unet=None, vae=None, text=None, family="sd1", text_2=None):
    """Our parts (diffusers-layout state dicts; any may be None) -> one dict in the original single-file layout.
    SDXL: `text` is CLIP ViT-L's (text_encoder/), `text_2` OpenCLIP bigG's (text_encoder_2/, with its projection)."""
    if family not in FAMILIES:
        raise WeightsError(f"family must be 'sd1', 'sd2' or 'sdxl', not {family!r}")
    if (family == "sdxl") != (text_2 is not None) and (text is not None or text_2 is not None):
        raise WeightsError(f"family must be 'sdxl' for two text encoders (text: CLIP ViT-L's, text_2: OpenCLIP "
                           f"bigG's), 'sd1' or 'sd2' for one; got family {family!r} with "
                           f"{'two text encoders' if text_2 is not None and text is not None else 'one'}")
    unet_part, text_parts = FAMILIES[family]
    texts = [text_model_names(text) if text is not None else None]
    if text_2 is not None:  # transformers' Linear weight [dim, width] -> open_clip's `x @ text_projection` [width, dim]
        texts.append({k: v.T if k == "text_projection.weight" else v
                      for k, v in fuse_qkv(text_model_names(text_2)).items()})
    if family == "sd2" and text is not None:
        texts[0] = fuse_qkv(texts[0])
    if vae is not None:  # the VAE's only Linear layers are its mid attention, stored as 1x1 convs
        vae = {k: v[:, :, None, None] if v.ndim == 2 else v for k, v in vae.items()}
    out = {}
    for part, sd in (("unet", unet), ("vae", vae), *zip(text_parts, texts)):
        if sd is not None:
            part = unet_part if part == "unet" else part
            out |= {PARTS[part][0] + k: v for k, v in rename_part(sd, part, to_original=True)[0].items()}
    return out


def file_family(sd, family=None):
    """The family a file's keys say: its text encoders' prefixes; for a UNet-only file `family` (our files' metadata),
    else SDXL's label_emb, else SD 2's Linear proj_in."""
    found = [f for f, (_, texts) in FAMILIES.items() if any(k.startswith(PARTS[t][0]) for t in texts for k in sd)]
    if len(found) > 1:
        raise WeightsError(f"the file holds the text encoders of {' and '.join(FAMILY_NAMES[f] for f in found)} "
                           f"({', '.join(PARTS[FAMILIES[f][1][0]][0] + '*' for f in found)}): a broken merge; use a "
                           f"checkpoint of one model")
    if found:
        return found[0]
    if family in FAMILIES:
        return family
    unet = PARTS["unet"][0]
    if unet + "label_emb.0.0.weight" in sd:
        return "sdxl"
    proj_in = sd.get(unet + "middle_block.1.proj_in.weight")
    return "sd2" if proj_in is not None and proj_in.ndim == 2 else "sd1"


def from_original(sd, family=None):
    """One original-layout dict -> dict(family, unet, vae, text, text_2, extra): our state dicts (None when absent;
    text_2 is SDXL's OpenCLIP bigG) and the original tensors we do not use (schedule buffers, EMA copies, OpenCLIP's
    last block and head, ...)."""
    check_is_sd(sd)
    family = file_family(sd, family)
    unet_part, text_parts = FAMILIES[family]
    result, extra = {"family": family, "text_2": None}, dict(sd)
    for name, part in (("unet", unet_part), ("vae", "vae"), *zip(("text", "text_2"), text_parts)):
        prefix = PARTS[part][0]
        mine = {k[len(prefix):]: extra.pop(k) for k in list(extra) if k.startswith(prefix)}
        if part == "sd2":
            extra |= {prefix + k: mine.pop(k) for k in list(mine) if k.startswith(UNUSED_OPENCLIP_BLOCK)}
        if part == "sdxl_g" and "text_projection.weight" in mine:  # transformers' form, as diffusers' own
            mine["text_projection"] = mine.pop("text_projection.weight").T  # convert_diffusers_to_original_sdxl.py
            # writes it (ComfyUI reads both forms: comfy/utils.py clip_text_transformers_convert)
        if not mine:
            result[name] = None
            continue
        ours, unused = rename_part(mine, part, to_original=False)
        extra |= {prefix + k: v for k, v in unused.items()}
        if part == "vae":
            ours = {k: v[:, :, 0, 0] if v.ndim == 4 and ".attentions." in k else v for k, v in ours.items()}
        if part == "sdxl_g":  # open_clip's [width, dim] projection -> transformers' Linear weight [dim, width]
            ours = {k: v.T.contiguous() if k == "text_projection.weight" else v for k, v in ours.items()}
        result[name] = split_qkv(ours) if part in ("sd2", "sdxl_g") else ours
    return result | {"extra": extra}


def check_is_sd(sd):
    """One clear line for the files people mistake for an SD 1.x/2.x/XL checkpoint."""
    keys = list(sd)
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):  # sgm's only OpenCLIP: A1111's test too
        raise WeightsError("this is an SDXL refiner (or an SD 2 file in the sgm layout): its one text encoder is "
                           "OpenCLIP at conditioner.embedders.0.model.*; only SD 1.x/2.x and SDXL base-shaped files "
                           "are supported: use the base model's file")
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        raise WeightsError("this is a LoRA file, not a full checkpoint; load the base model's single file instead")
    if not any(k.startswith(PARTS["unet"][0]) for k in keys):
        raise WeightsError(f"not a Stable Diffusion 1.x/2.x/XL single-file checkpoint: no model.diffusion_model.* keys "
                           f"(found e.g. {', '.join(keys[:3]) or 'nothing'}); for a diffusers folder, pass the folder")


# ---------------------------------------------------------------------------------------------------------------
# Architecture from the tensors' shapes: diffusers-style config.json dicts. What shapes cannot tell is SD's own
# value (the published configs): norm groups, sample size, scaling factor, token ids, and the heads: SD 1 has 8 per
# UNet block, SD 2 and SDXL 64-wide ones, like every text tower.

UNET_FIXED = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "center_input_sample": False,
              "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
              "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "num_class_embeds": None,
              "only_cross_attention": False}
VAE_FIXED = {"_class_name": "AutoencoderKL", "act_fn": "silu", "norm_num_groups": 32, "sample_size": 512,
             "scaling_factor": 0.18215}
TEXT_FIXED = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "layer_norm_eps": 1e-5,
              "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
              "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
# SDXL base 1.0's published values (stabilityai/stable-diffusion-xl-base-1.0: unet/ and vae/config.json): 1024 px
# (128 latents), its VAE's scale, and the VAE decoded in fp32 (it overflows fp16). The micro-conditioning ids are
# embedded 256 wide: SDXL's pooled text is bigG's 1280-wide projection, and label_emb takes 1280 + 6 x 256 = 2816.
SAMPLE_SIZE = {"sd1": 64, "sd2": 64, "sdxl": 128}
UNET_XL_FIXED = {"addition_embed_type": "text_time", "addition_embed_type_num_heads": 64}
VAE_XL_FIXED = {"sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_POOLED = 1280
QUICK_GELU = ("sd1", "sdxl_l")  # OpenAI's CLIP ViT-L (SD 1, SDXL's first tower); OpenCLIP's ViT-H and bigG use gelu


def check_heads(widths, divisor, what, family="sd1"):
    """SD's rule for the heads (SD 2, SDXL and every text tower: 64 wide; SD 1's UNet: 8 per block) must split each
    width into whole heads, at least one: else the file is not SD-shaped, said in one line before a model divides
    by 0."""
    bad = [w for w in widths if w < divisor or w % divisor]
    if bad:
        shape = "SDXL" if family == "sdxl" else "Stable Diffusion 1.x/2.x"
        raise WeightsError(f"its {what} widths {list(widths)} do not split into SD's heads ({bad[0]} / {divisor} = "
                           f"{bad[0] / divisor:g}): the file is not {shape}-shaped")


def unet_config(sd, family, pooled_dim=None):
    """`pooled_dim`: SDXL's pooled text width (bigG's projection), which label_emb's input shares with the six ids'
    embeddings; SDXL's 1280 when None (a UNet alone does not say)."""
    blocks, layers, up_attention = block_shape("unet", sd.keys(), original=False)
    boc = [sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(blocks)]
    check_heads(boc, 8 if family == "sd1" else 64, "UNet block", family)
    attention = [f"down_blocks.{i}" if f"down_blocks.{i}.attentions.0.norm.weight" in sd else None
                 for i in range(blocks)]
    # A level without attention has no depth (diffusers ignores its entry: 1, as SDXL's published [1, 2, 10]), but
    # the last level's entry is also the mid block's depth (diffusers' transformer_layers_per_block[-1]).
    depth = [len(_indices(sd, rf"{b}\.attentions\.0\.transformer_blocks\.(\d+)\.")) if b else 1 for b in attention]
    if attention[-1] is None:
        depth[-1] = len(_indices(sd, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."))
    config = UNET_FIXED | {
        "block_out_channels": boc, "layers_per_block": layers, "sample_size": SAMPLE_SIZE[family],
        "in_channels": sd["conv_in.weight"].shape[1], "out_channels": sd["conv_out.weight"].shape[0],
        "down_block_types": ["CrossAttnDownBlock2D" if b else "DownBlock2D" for b in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if i in up_attention else "UpBlock2D" for i in range(blocks)],
        "attention_head_dim": 8 if family == "sd1" else [c // 64 for c in boc],  # = heads, a diffusers misnomer
        "cross_attention_dim": sd["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
        "use_linear_projection": sd["mid_block.attentions.0.proj_in.weight"].ndim == 2,  # SD 1: 1x1 conv
        "upcast_attention": False}
    if family != "sdxl":
        return config
    adm = sd["add_embedding.linear_1.weight"].shape[1]  # pooled text + 6 ids, each embedded `time` wide
    pooled = pooled_dim or SDXL_POOLED
    time, rest = divmod(adm - pooled, 6)
    if time < 1 or rest:
        whose = "its bigG's" if pooled_dim else "SDXL's"
        raise WeightsError(f"its UNet's label_emb takes {adm} values, not the pooled text ({whose} {pooled}) plus 6 "
                           f"embedded ids: not SDXL-shaped, or a UNet alone of another pooled width: read it with its "
                           f"text encoders (a full file)")
    return config | UNET_XL_FIXED | {"addition_time_embed_dim": time, "projection_class_embeddings_input_dim": adm}


def vae_config(sd, family="sd1"):
    blocks = len(_indices(sd, r"encoder\.down_blocks\.(\d+)\."))
    return VAE_FIXED | (VAE_XL_FIXED if family == "sdxl" else {}) | {
        "block_out_channels": [sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(blocks)],
        "layers_per_block": len(_indices(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
        "down_block_types": ["DownEncoderBlock2D"] * blocks, "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "in_channels": sd["encoder.conv_in.weight"].shape[1], "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "latent_channels": sd["decoder.conv_in.weight"].shape[1]}


def text_config(sd, part):
    """`part`: the text encoder's PARTS name: sd1, sd2, or SDXL's sdxl_l (CLIP ViT-L) and sdxl_g (OpenCLIP bigG,
    a CLIPTextModelWithProjection)."""
    tokens = sd["text_model.embeddings.token_embedding.weight"]
    check_heads([tokens.shape[1]], 64, "text encoder", "sdxl" if part.startswith("sdxl") else part)
    projection = {"architectures": ["CLIPTextModelWithProjection"],
                  "projection_dim": sd["text_projection.weight"].shape[0]} if part == "sdxl_g" else {}
    return TEXT_FIXED | projection | {
        "hidden_act": "quick_gelu" if part in QUICK_GELU else "gelu", "hidden_size": tokens.shape[1],
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


def read_single_file(path, full=True):
    """Read an original SD 1.x/2.x/XL checkpoint: dict(family, unet=(config, sd), vae=(config, sd) or None,
    text=(config, sd) or None, text_2=(config, sd) or None (SDXL's bigG), extra). The UNet's config has the family's
    sample size (SD 64, SDXL 128 latents) and no attention upcast: SD 2.x-768's differ, which the file does not say
    (formats/models.py sets them for --prediction-type v_prediction)."""
    sd, meta = load_tensors(path)
    parts = from_original(sd, meta.get("family"))
    unet = parts["unet"]
    if parts["vae"] is not None and unet["conv_in.weight"].shape[1] != parts["vae"]["decoder.conv_in.weight"].shape[1]:
        raise WeightsError(f"{path}: its UNet takes {unet['conv_in.weight'].shape[1]} input channels, not the VAE's "
                           f"latents alone: an inpainting, depth or instruct model, not a text-to-image one; use the "
                           f"base checkpoint")
    family = parts["family"]
    _, text_parts = FAMILIES[family]
    wanted = [("vae", "VAE (first_stage_model.*)")] + [
        (name, f"{PART_NAMES[part] if family == 'sdxl' else 'text encoder'} ({PARTS[part][0]}*)")
        for name, part in zip(("text", "text_2"), text_parts)]
    missing = [what for p, what in wanted if parts[p] is None]
    if full and missing:
        raise WeightsError(f"{path} has no {' and no '.join(missing)}; a full checkpoint (UNet, VAE and text "
                           f"encoder{'s' if len(text_parts) > 1 else ''}) is needed here, not a UNet-only or "
                           f"partial file")
    # SDXL's pooled width: bigG's projection, else what our UNet-only exports record, else SDXL's
    pooled = parts["text_2"]["text_projection.weight"].shape[0] if parts["text_2"] else int(meta.get("pooled_dim", 0))
    configs = {"unet": lambda s: unet_config(s, family, pooled_dim=pooled or None),
               "vae": lambda s: vae_config(s, family), "text": lambda s: text_config(s, text_parts[0]),
               "text_2": lambda s: text_config(s, text_parts[-1])}
    return parts | {p: None if parts[p] is None else (configs[p](parts[p]), parts[p]) for p in configs}


def write_single_file(path, unet, vae=None, text=None, family="sd1", extra=None, metadata=None, text_2=None):
    """Write our parts as one original-layout .safetensors file (UNet-only when vae/text are None), atomically.
    SDXL: `text` CLIP ViT-L's, `text_2` OpenCLIP bigG's state dict. `extra`: original tensors to carry over, e.g.
    `read_single_file(teacher)["extra"]` (OpenCLIP's last block); `metadata`: strings for the file's header, e.g. its
    prediction_type, which the tensors cannot say (an SDXL UNet alone: its pooled_dim)."""
    path = str(path)
    if not path.endswith(".safetensors"):
        raise WeightsError(f"{path}: write a .safetensors file (a .ckpt is a pickle, which we never write)")
    sd, extra = to_original(unet, vae, text, family, text_2), dict(extra or {})
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


def ldm_betas(scheduler):
    """The betas as ldm's and sgm's make_beta_schedule make them (float64 torch, then numpy). `scheduler`: a diffusers
    scheduler config (SD's when {}); its scaled_linear is ldm's "linear", its linear ldm's "sqrt_linear"."""
    T, start, end = (scheduler.get(k, v) for k, v in (("num_train_timesteps", 1000), ("beta_start", 0.00085),
                                                       ("beta_end", 0.012)))
    kind = scheduler.get("beta_schedule", "scaled_linear")
    if kind not in ("scaled_linear", "linear"):
        raise WeightsError(f"beta_schedule {kind!r} has no original single-file layout (scaled_linear or linear)")
    if kind == "scaled_linear":
        return (torch.linspace(start ** 0.5, end ** 0.5, T, dtype=torch.float64) ** 2).numpy()
    return torch.linspace(start, end, T, dtype=torch.float64).numpy()


def ldm_schedule(scheduler):
    """The 12 schedule buffers of ldm's LatentDiffusion, computed as register_schedule computes them (the betas in
    float64 torch, the rest in float64 numpy, v_posterior 0) and stored float32, also in an fp16 file: A1111 samples
    with the file's alphas_cumprod, and fp16 would round abar_999 = 0.0046601 to 0.0046616."""
    import numpy as np
    betas = ldm_betas(scheduler)
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


SGM_SCHEDULE = "denoiser.sigmas"  # SDXL's only schedule tensor: sgm's DiscreteDenoiser buffer


def sgm_sigmas(scheduler):
    """sgm's `denoiser.sigmas` (DiscreteDenoiser with LegacyDDPMDiscretization, num_idx 1000): sigma_t =
    sqrt((1 - abar_t) / abar_t) for t = 0 ... T - 1, the ratio taken in float64 and its root in float32, as sgm does
    (its two flips cancel). sgm, A1111 (sd_models_xl.extend_sdxl) and ComfyUI compute it from the betas themselves:
    the file's copy only completes the DiffusionEngine's state dict."""
    import numpy as np
    alphas_cumprod = np.cumprod(1. - ldm_betas(scheduler), axis=0)
    return {SGM_SCHEDULE: torch.tensor((1 - alphas_cumprod) / alphas_cumprod, dtype=torch.float32) ** 0.5}


def original_only_tensors(family, text, scheduler):
    """The original layout's tensors beyond our parts: the 12 schedule buffers (ldm's values; SDXL: sgm's one,
    denoiser.sigmas); SD 1's and SDXL's CLIP ViT-L position_ids (int64 [1, 77], as transformers < 4.31 saved them,
    and ComfyUI writes for SDXL); SD 2's OpenCLIP block 23 (all zeros, an exact identity: x + 0 + 0; SD 2 conditions
    on block 22's output, so no reader's image changes), text_projection (the identity, shape [width, width]: diffusers
    reads the width from it) and logit_scale (ln 100, also SDXL's bigG: only CLIP scores read it). `text`: our (first)
    text encoder's state dict, whose names, shapes, dtype and device these follow (the meta device works)."""
    out = sgm_sigmas(scheduler) if family == "sdxl" else ldm_schedule(scheduler)
    text = text_model_names(text)
    tokens = text["text_model.embeddings.token_embedding.weight"]
    like = dict(dtype=tokens.dtype, device=tokens.device)
    prefix = PARTS[FAMILIES[family][1][0]][0]
    if family in ("sd1", "sdxl"):
        if "text_model.embeddings.position_ids" not in text:  # a buffer that transformers >= 4.31 does not save
            n = text["text_model.embeddings.position_embedding.weight"].shape[0]
            out[prefix + "text_model.embeddings.position_ids"] = torch.arange(n)[None]  # int64, on the CPU
        if family == "sdxl":  # bigG's text_projection is a weight of ours, its logit_scale is not
            out[PARTS["sdxl_g"][0] + "logit_scale"] = torch.full((), math.log(100.0), **like)
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
# SDXL was trained on the same betas; its published scheduler (stabilityai/stable-diffusion-xl-base-1.0) is Euler's
SCHEDULER_XL = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False, "interpolation_type": "linear",
                "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
EXTRA_FILE = "original_extra.safetensors"  # a folder's unused original tensors, for writing a single file back


def write_folder(parts, folder, prediction_type):
    """`read_single_file`'s parts as a diffusers-layout folder (no tokenizer: a single file has none; SDXL's with
    text_encoder_2/), with the original tensors a written-back file keeps (OpenCLIP's last block and head, the
    schedule buffers) in EXTRA_FILE."""
    import json
    family = parts["family"]
    names = {"unet": ("unet", "diffusion_pytorch_model.safetensors"),
             "vae": ("vae", "diffusion_pytorch_model.safetensors"), "text": ("text_encoder", "model.safetensors"),
             "text_2": ("text_encoder_2", "model.safetensors")}
    for part, (sub, weights) in names.items():
        if part == "text_2" and family != "sdxl":
            continue
        config, sd = parts[part]
        os.makedirs(os.path.join(folder, sub))
        with open(os.path.join(folder, sub, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, sub, weights), {"format": "pt"})
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump((SCHEDULER_XL if family == "sdxl" else SCHEDULER) | {"prediction_type": prediction_type}, f, indent=2)
    prefixes = tuple(PARTS[part][0] for part in FAMILIES[family][1])
    text = {k: v.contiguous() for k, v in parts["extra"].items()  # the file's own, kept for writing back
            if k.startswith(prefixes) or k in LDM_SCHEDULE or k == SGM_SCHEDULE}
    save_file(text, os.path.join(folder, EXTRA_FILE), {"family": family})


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
    """True if the file holds a VAE and a text encoder (SDXL: two) besides the UNet (read from its key names only)."""
    if str(path).endswith(".safetensors") and os.path.isfile(path):
        try:
            with safe_open(path, "pt") as f:
                keys = list(f.keys())
        except Exception as e:
            raise WeightsError(f"cannot read {path} ({type(e).__name__}); the file is corrupt or truncated: download "
                               f"it again") from None
    else:
        keys = list(load_tensors(path)[0])
    texts = (PARTS["sdxl_l"][0], PARTS["sdxl_g"][0]) if any(k.startswith("conditioner.") for k in keys) else \
        ("cond_stage_model.",)
    return all(any(k.startswith(p) for k in keys) for p in (PARTS["vae"][0], *texts))
