"""Tiny random Stable Diffusion folders in the official layout, written by diffusers' and transformers'
save_pretrained: the oracle builds what the tests load. Test support only; the product never imports diffusers."""
import torch

from miniature import world


# Sizes that follow the rules a single file is read by (formats/single_file.py: 32 norm groups; 8 heads per UNet block
# in SD 1, 64-wide heads in SD 2 and in both text towers), so that folder -> single file -> folder is exact.
SINGLE_FILE_SIZES = {
    "sd1": dict(unet=dict(block_out_channels=(32, 64), attention_head_dim=8, norm_num_groups=32,
                          cross_attention_dim=64),
                vae=dict(norm_num_groups=32, block_out_channels=(32, 64)),
                text=dict(hidden_size=64, intermediate_size=128, num_attention_heads=1, hidden_act="quick_gelu")),
    "sd2": dict(unet=dict(block_out_channels=(64, 128), attention_head_dim=[1, 2], norm_num_groups=32,
                          cross_attention_dim=64, use_linear_projection=True),
                vae=dict(norm_num_groups=32, block_out_channels=(32, 64)),
                text=dict(hidden_size=64, intermediate_size=128, num_attention_heads=1, hidden_act="gelu")),
}
SIZES = dict(unet=dict(block_out_channels=(32, 64), attention_head_dim=4, norm_num_groups=8, cross_attention_dim=32),
             vae=dict(norm_num_groups=4, block_out_channels=(8, 16)),
             text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4))


def make_tiny_sd(root, vae=True, pred="epsilon", family=None):
    """family None: the smallest sizes; "sd1" / "sd2": sizes that survive a round trip through a single file."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    sizes = SINGLE_FILE_SIZES[family] if family else SIZES
    torch.manual_seed(0)
    ids = world.write_tokenizer(f"{root}/tokenizer", max_length=16)
    te = CLIPTextModel(CLIPTextConfig(num_hidden_layers=2, **sizes["text"], **ids))
    te.save_pretrained(f"{root}/text_encoder")
    u = UNet2DConditionModel(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, sample_size=8,
                             in_channels=4, out_channels=4, **sizes["unet"])
    with torch.no_grad():
        for p in u.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # diffusers zero-initialises conv_out: make every path matter
    u.save_pretrained(f"{root}/unet")
    if vae:
        AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                      latent_channels=4, layers_per_block=1, sample_size=16,
                      **sizes["vae"]).save_pretrained(f"{root}/vae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, prediction_type=pred).save_pretrained(f"{root}/scheduler")
    return root


def make_tiny_feature_models(root):
    """(CLIP folder, DINOv2 folder) for the evaluation's tests and benchmark: random tiny transformers models, each
    with what it loads beside it (tokenizer and image processor for CLIP)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config, Dinov2Model
    clip, dino = f"{root}/clip", f"{root}/dinov2"
    torch.manual_seed(0)
    ids = world.write_tokenizer(clip, max_length=16)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config={**tower, **ids}, vision_config={**tower, "image_size": 32, "patch_size": 8},
                         projection_dim=16)).save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                             patch_size=14)).save_pretrained(dino)
    return clip, dino


# SDXL-shaped: no attention at the first level, 1 and 2 transformer layers, 64-wide heads and 32 norm groups (the
# sizes an SDXL single file is read by), two text towers (CLIP-L's quick_gelu, bigG's gelu with its projection)
# whose states concatenate to the UNet's 128-wide context, and the micro-conditioning (8-wide id embeddings).
SDXL_SIZES = dict(text=dict(hidden_size=64, intermediate_size=128, num_attention_heads=1, num_hidden_layers=2),
                  pooled=64, id_width=8)


def make_tiny_sdxl(root):
    """A tiny SDXL folder in the official layout (StableDiffusionXLPipeline.save_pretrained): unet, vae (SDXL's scaling
    factor), text_encoder + tokenizer, text_encoder_2 + tokenizer_2 (padding with "!"), scheduler, model_index.json."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    s = SDXL_SIZES
    torch.manual_seed(0)
    ids = world.write_tokenizer(f"{root}/tokenizer", max_length=16)
    tokenizer = CLIPTokenizer.from_pretrained(f"{root}/tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(f"{root}/tokenizer", pad_token="!")  # as OpenCLIP bigG's
    text_encoder = CLIPTextModel(CLIPTextConfig(**s["text"], **ids, hidden_act="quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**s["text"], **ids, hidden_act="gelu",
                                                                projection_dim=s["pooled"]))
    u = UNet2DConditionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128), layers_per_block=1, transformer_layers_per_block=[1, 2],
        attention_head_dim=[1, 2],
        norm_num_groups=32, cross_attention_dim=2 * s["text"]["hidden_size"], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=s["id_width"],
        projection_class_embeddings_input_dim=s["pooled"] + 6 * s["id_width"], sample_size=8, in_channels=4,
        out_channels=4)
    with torch.no_grad():
        for p in u.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # diffusers zero-initialises conv_out: make every path matter
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(32, 64), norm_num_groups=32, latent_channels=4, layers_per_block=1,
                        sample_size=16, scaling_factor=0.13025, force_upcast=True)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer_2, unet=u, scheduler=scheduler).save_pretrained(root)
    return root
