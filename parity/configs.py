"""The full-size configs of Stable Diffusion (unet/config.json, vae/config.json, SD 2's and SDXL's text encoders),
as the published folders hold them: for the meta-device tests, tools/cards.py's memory tables and tools/selfcheck.py,
which builds SD 2.1-base with random weights (no download)."""

_SD_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, in_channels=4, out_channels=4)
SD15 = dict(_SD_BLOCKS, attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False, sample_size=64)
SD21_BASE = dict(_SD_BLOCKS, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                 use_linear_projection=True, sample_size=64)
SD21 = dict(SD21_BASE, upcast_attention=True, sample_size=96)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512)
# SD 2.x's text encoder: OpenCLIP ViT-H's text tower, stored with 23 of its 24 layers (SD 2 uses the penultimate)
SD2_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json): no attention at the first level,
# 1/2/10 transformer layers, 64-wide heads, 2048-wide context (CLIP-L 768 + bigG 1280), the micro-conditioning
SDXL = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2, in_channels=4, out_channels=4,
            attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_embed_type_num_heads=64,
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128)
# SDXL base 1.0's two text encoders (its text_encoder/config.json and text_encoder_2/config.json): CLIP ViT-L's
# text tower (CLIPTextModel) and OpenCLIP ViT-bigG's (CLIPTextModelWithProjection, whose pooled projection is the
# UNet's pooled text embedding); SDXL reads the penultimate states of both, concatenated to 768 + 1280 = 2048
SDXL_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SDXL_TEXT_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
