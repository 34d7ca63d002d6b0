"""The text side of a model folder: prompts -> the UNet's context. Stable Diffusion 1.x/2.x have one CLIP text
encoder; SDXL has two, and conditions on the image's size as well (unet.sdxl_context)."""
import json
import os

import torch

from harness.distributed import to_device
from unet import MICRO_IDS, WeightsError, read_config, sdxl_context, split_sdxl_context
from vae import pixels_per_latent


class Text:
    """Prompts -> the UNet's context [N, L, D], in fp32 on the encoders' device; `uncond`, CFG's unconditional branch.

    Stable Diffusion: the CLIP text encoder's last hidden states (SD 2's is stored without its last layer); uncond is
    "" encoded. SDXL: CLIP ViT-L's and OpenCLIP ViT-bigG's penultimate hidden states concatenated (768 + 1280 = 2048),
    with bigG's projected pooled output and the micro-conditioning ids of an image_size (h, w) image, uncropped,
    in the last row; uncond zeros where the model asks for them (force_zeros_for_empty_prompt, as its pipeline)."""

    def __init__(self, tokenizers, encoders, image_size=None, zero_uncond=False):
        self.tokenizers, self.encoders = list(tokenizers), [e.eval().requires_grad_(False) for e in encoders]
        self.sdxl = len(self.encoders) == 2
        self.image_size, self.zero_uncond = image_size, zero_uncond
        self._uncond = None

    def to(self, device):
        """The encoders on `device`, in fp32 (as the authors encode their prompts, also under bf16 training)."""
        self.encoders = [e.to(device, torch.float32) for e in self.encoders]
        self._uncond = None
        return self

    @torch.no_grad()
    def encode(self, prompts, batch_size=64):
        """Padded as each tokenizer pads (its own pad token: SD 2's and SDXL's bigG pad with "!"), truncated to 77."""
        return torch.cat([self._encode(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])

    def _encode(self, prompts):
        device = next(self.encoders[0].parameters()).device
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            with torch.autocast(device.type, enabled=False):  # in the encoder's dtype (fp32), also inside training's
                out = encoder(to_device(ids, device), output_hidden_states=self.sdxl)
            states.append((out.hidden_states[-2] if self.sdxl else out.last_hidden_state).float())
            pooled = getattr(out, "text_embeds", None)  # bigG's (CLIPTextModelWithProjection), the last encoder's
        if not self.sdxl:
            return states[0]
        return self.with_micro_conditioning(torch.cat(states, dim=-1), pooled.float())

    def with_micro_conditioning(self, states, pooled):
        """SDXL's context: the ids (h, w, crop top 0, crop left 0, h, w), as its pipeline makes them by default."""
        h, w = self.image_size
        time_ids = to_device(torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32), states.device)  # no host wait
        return sdxl_context(states, pooled, time_ids.expand(len(states), -1))

    @property
    def uncond(self):
        """CFG's unconditional branch [1, L, D], encoded once."""
        if self._uncond is None:
            self._uncond = self.encode([""])
            if self.zero_uncond:
                states, pooled, _ = split_sdxl_context(self._uncond, self.encoders[1].config.projection_dim)
                self._uncond = self.with_micro_conditioning(torch.zeros_like(states), torch.zeros_like(pooled))
        return self._uncond


def check_text_fits(text, unet_config, folder):
    """One line where the folder's text encoders cannot condition its UNet (a part from another model): SDXL's UNet
    without SDXL's two encoders or the reverse, or text states of another width than the UNet's cross-attention."""
    sdxl_unet = unet_config.get("addition_embed_type") == "text_time"
    if sdxl_unet != text.sdxl:
        needs = "SDXL's two text encoders (text_encoder_2/ too)" if sdxl_unet else "one text encoder (SD 1.x/2.x)"
        raise WeightsError(f"{folder}: its UNet needs {needs}, and the folder has {len(text.encoders)}: is a part "
                           f"from another model? Re-copy the model's folders")
    width, context = sum(e.config.hidden_size for e in text.encoders), unet_config.get("cross_attention_dim", 1024)
    if width != context:
        raise WeightsError(f"{folder}: its text states are {width} wide, its UNet's cross-attention {context}: is a "
                           f"part from another model? Re-copy the model's folders")
    if sdxl_unet:
        ids = MICRO_IDS * unet_config["addition_time_embed_dim"]
        pooled, given = unet_config["projection_class_embeddings_input_dim"] - ids, text.encoders[1].config.projection_dim
        if given != pooled:
            raise WeightsError(f"{folder}: text_encoder_2's pooled embedding is {given} wide, the UNet's add_embedding "
                               f"takes {pooled}: is a part from another model? Re-copy the model's folders")


def load_text(folder, image_size=None):
    """The Text of a model folder: tokenizer/ and text_encoder/, and for SDXL tokenizer_2/ and text_encoder_2/.
    image_size: SDXL's (h, w) in pixels, by default the UNet's sample_size times the VAE's downsampling."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()  # a bar per load of a 3-file folder is noise
    sdxl = is_sdxl(folder)
    parts = [("tokenizer", "text_encoder", CLIPTextModel)]
    if sdxl:
        parts.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
    tokenizers, encoders = [], []
    for tokenizer_dir, encoder_dir, kind in parts:
        for sub in (tokenizer_dir, encoder_dir):
            if not os.path.isdir(os.path.join(folder, sub)):
                raise WeightsError(f"{os.path.join(folder, sub)} not found; a Stable Diffusion folder has unet, vae, "
                                   f"text_encoder, tokenizer and scheduler (SDXL also text_encoder_2, tokenizer_2)")
        weights = os.path.join(folder, encoder_dir, "model.safetensors")
        fp16_only = not os.path.exists(weights) and os.path.exists(weights.replace(".safetensors", ".fp16.safetensors"))
        try:
            tokenizers.append(CLIPTokenizer.from_pretrained(os.path.join(folder, tokenizer_dir)))
            encoders.append(kind.from_pretrained(os.path.join(folder, encoder_dir), use_safetensors=True,
                                                 variant="fp16" if fp16_only else None, dtype=torch.float32))
        except Exception as e:
            raise WeightsError(f"cannot load the text encoder/tokenizer from {folder}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not sdxl:
        text = Text(tokenizers, encoders)
    else:
        text = Text(tokenizers, encoders, image_size or default_image_size(folder), zero_uncond=zeros_for_empty(folder))
    if os.path.exists(os.path.join(folder, "unet", "config.json")):
        check_text_fits(text, read_config(os.path.join(folder, "unet"), "unet")[1], folder)
    return text


def is_sdxl(folder):
    """Whether a model folder is SDXL's: it has the second text encoder (OpenCLIP bigG)."""
    return os.path.isdir(os.path.join(folder, "text_encoder_2"))


def default_image_size(folder):
    """(h, w) in pixels a model makes by default: its UNet's sample_size times the VAE's downsampling (SDXL: 1024)."""
    _, unet_config = read_config(os.path.join(folder, "unet"), "unet")
    _, vae_config = read_config(os.path.join(folder, "vae"), "vae")
    side = unet_config.get("sample_size", 128) * pixels_per_latent(vae_config)
    return side, side


def zeros_for_empty(folder):
    """model_index.json's force_zeros_for_empty_prompt (its pipeline's default, True, where it does not say)."""
    try:
        with open(os.path.join(folder, "model_index.json")) as f:
            return bool(json.load(f).get("force_zeros_for_empty_prompt", True))
    except (OSError, ValueError):
        return True
