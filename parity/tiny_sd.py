"""Tiny random Stable Diffusion folders in the official layout, written by diffusers' and transformers'
save_pretrained: the oracle builds what the tests load. Test support only; the product never imports diffusers."""
import torch

from miniature import world


def make_tiny_sd(root, vae=True, pred="epsilon"):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    ids = world.write_tokenizer(f"{root}/tokenizer", max_length=16)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, **ids))
    te.save_pretrained(f"{root}/text_encoder")
    u = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                             cross_attention_dim=32, layers_per_block=1, norm_num_groups=8, sample_size=8,
                             in_channels=4, out_channels=4)
    with torch.no_grad():
        for p in u.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # diffusers zero-initialises conv_out: make every path matter
    u.save_pretrained(f"{root}/unet")
    if vae:
        AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                      layers_per_block=1, sample_size=16).save_pretrained(f"{root}/vae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, prediction_type=pred).save_pretrained(f"{root}/scheduler")
    return root
