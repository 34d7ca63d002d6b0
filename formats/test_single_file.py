"""single_file.py against diffusers, the oracle: round trips, diffusers' own LDM converters, diffusers'
from_single_file, the full-size SD 1.5 / 2.1 key sets (on the meta device), and one clear line for bad files."""
import functools
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import rel_err
from formats import single_file as sf
from unet import UNet, WeightsError
from vae import AutoencoderKL as OurVAE

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as ref  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

# Tiny SD 1- and SD 2-shaped models. Heads cannot be read from a file, so these follow each family's rule: SD 1
# has 8 heads per UNet block, SD 2 and both text towers have 64-wide heads. Three UNet blocks, so that one up block
# has attention and an upsampler (the upsampler's slot moves) and one has neither. SD 2's text tower has 23
# layers as in the real one: diffusers hard-codes dropping OpenCLIP block 23.
TINY = {
    "sd1": dict(unet=dict(block_out_channels=(32, 32, 64), attention_head_dim=8, use_linear_projection=False),
                text=dict(num_hidden_layers=2, hidden_act="quick_gelu")),
    "sd2": dict(unet=dict(block_out_channels=(64, 64, 128), attention_head_dim=[1, 1, 2], use_linear_projection=True),
                text=dict(num_hidden_layers=23, hidden_act="gelu")),
}
SD_UNET = dict(cross_attention_dim=64, layers_per_block=2, sample_size=8, norm_num_groups=32,
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
OPENCLIP = sf.PARTS["sd2"][0]


@functools.lru_cache(maxsize=None)
def tiny(family):
    """(unet, vae, text encoder) built by diffusers/transformers, randomised so that every weight matters."""
    torch.manual_seed({"sd1": 0, "sd2": 1}[family])
    unet = UNet2DConditionModel(**SD_UNET, **TINY[family]["unet"])
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=1, vocab_size=1000,
                                        max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                                        **TINY[family]["text"]))
    with torch.no_grad():
        for p in [*unet.parameters(), *vae.parameters()]:
            p.add_(torch.randn_like(p) * 0.02)  # diffusers zero-initialises conv_out and some projections
    return unet.eval(), vae.eval(), text.eval()


def text_sd(model):
    """The text encoder's weights as the official `text_encoder/model.safetensors` names them (`text_model.*`)."""
    return {"text_model." + k.removeprefix("text_model."): v for k, v in model.state_dict().items()}


def parts(family):
    unet, vae, text = tiny(family)
    return unet.state_dict(), vae.state_dict(), text_sd(text)


def last_block(orig):
    """A fake 24th OpenCLIP block (plus the contrastive head): what a real SD 2 file carries beyond our encoder."""
    n = max(int(k.split(".")[4]) for k in orig if k.startswith(OPENCLIP + "transformer.resblocks."))
    block = {k.replace(f".resblocks.{n}.", f".resblocks.{n + 1}."): torch.randn_like(v)
             for k, v in orig.items() if f".resblocks.{n}." in k}
    width = orig[OPENCLIP + "token_embedding.weight"].shape[1]
    return block | {OPENCLIP + "text_projection": torch.randn(width, 32), OPENCLIP + "logit_scale": torch.tensor(4.6)}


def assert_same(a, b):
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def file_tensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# ---------------------------------------------------------------------------------------------------------------
# 1. Round trips: parts -> file -> parts, and file -> parts (+ extra) -> file, bit for bit.


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_round_trip(family, tmp_path):
    unet, vae, text = parts(family)
    path = str(tmp_path / "model.safetensors")
    sf.write_single_file(path, unet, vae, text, family)
    assert not os.path.exists(path + ".tmp")
    got = sf.read_single_file(path)
    assert got["family"] == family and got["extra"] == {}
    for (_, sd), want in zip((got["unet"], got["vae"], got["text"]), (unet, vae, text)):
        assert_same(sd, want)
    # The configs read from the shapes build models that take these weights strictly.
    UNet(got["unet"][0]).load_state_dict(got["unet"][1], strict=True)
    OurVAE(got["vae"][0]).load_state_dict(got["vae"][1], strict=True)
    te = CLIPTextModel(CLIPTextConfig(**got["text"][0]))
    te.load_state_dict({k.removeprefix("text_model."): v for k, v in got["text"][1].items()}, strict=True)
    assert te.config.hidden_act == {"sd1": "quick_gelu", "sd2": "gelu"}[family]

    # With the teacher's extra tensors (an SD 2 file's 24th block): written back as they came, and read again the
    # same way, so teacher file -> parts -> student file keeps everything the original tools expect.
    orig, meta = file_tensors(path)
    save_file(orig, path)  # without our metadata, as diffusers' script or ComfyUI write a 23-block SD 2 file
    assert_same(sf.read_single_file(path)["text"][1], text)  # every block read: only a block 23 is SD 2's unused one
    extra = last_block(orig) if family == "sd2" else {"alphas_cumprod": torch.rand(1000)}
    sf.write_single_file(path, unet, vae, text, family, extra=extra)
    full, meta = file_tensors(path)
    assert_same(full, orig | extra)
    got = sf.read_single_file(path)
    assert_same(got["text"][1], text)
    assert_same(got["extra"], extra)
    sf.write_single_file(str(tmp_path / "again.safetensors"), got["unet"][1], got["vae"][1], got["text"][1], family,
                         extra=got["extra"])
    assert_same(file_tensors(str(tmp_path / "again.safetensors"))[0], full)


def test_unet_only_and_ckpt(tmp_path):
    unet, _, _ = parts("sd2")
    path = str(tmp_path / "unet.safetensors")
    sf.write_single_file(path, unet, family="sd2")
    got = sf.read_single_file(path, full=False)
    assert got["vae"] is None and got["text"] is None and got["family"] == "sd2"
    assert_same(got["unet"][1], unet)
    assert not got["unet"][0]["upcast_attention"] and got["unet"][0]["sample_size"] == 64  # SD 2.x-base's
    assert got["unet"][0]["attention_head_dim"] == [1, 1, 2]  # the SD 2 rule, from the metadata's family
    # A Lightning-style .ckpt (tensors under "state_dict", besides other entries) reads the same.
    ckpt = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": sf.to_original(*parts("sd1"), family="sd1"), "global_step": 7}, ckpt)
    got = sf.read_single_file(ckpt)
    assert got["family"] == "sd1"
    for (_, sd), want in zip((got["unet"], got["vae"], got["text"]), parts("sd1")):
        assert_same(sd, want)


# ---------------------------------------------------------------------------------------------------------------
# 2. Our reading equals diffusers' own LDM converters, key for key, tensor for tensor; and diffusers reading what
# we write gives back the models' weights (the other direction).


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_matches_diffusers_converters(family):
    unet_model, vae_model, text_model = tiny(family)
    unet, vae, text = parts(family)
    orig = sf.to_original(unet, vae, text, family)
    unused = (last_block(orig) if family == "sd2" else  # what a real file holds beyond our parts
              {"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(16)[None]})
    orig |= unused
    ours = sf.from_original(orig)
    assert_same(ours["extra"], unused)

    theirs_unet = ref.convert_ldm_unet_checkpoint(orig, dict(unet_model.config))
    theirs_vae = ref.convert_ldm_vae_checkpoint(orig, dict(vae_model.config))
    if family == "sd1":
        theirs_text = ref.convert_ldm_clip_checkpoint(orig)
        theirs_text.pop("text_model.embeddings.position_ids")  # a buffer transformers no longer loads
    else:
        theirs_text = ref.convert_open_clip_checkpoint(text_model, orig)
    for mine, theirs, model in ((ours["unet"], theirs_unet, unet), (ours["vae"], theirs_vae, vae),
                                (ours["text"], theirs_text, text)):
        assert_same(mine, theirs)
        assert_same(theirs, model)


# ---------------------------------------------------------------------------------------------------------------
# 3. diffusers' StableDiffusionPipeline.from_single_file loads a file we wrote, offline, and computes what ours do.


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_from_single_file(family, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from miniature import world
    from transformers import CLIPTokenizer
    unet_model, vae_model, text_model = tiny(family)
    folder = str(tmp_path / "config")  # the diffusers folder whose configs from_single_file reads (no weights used)
    world.write_tokenizer(str(tmp_path / "tok"), max_length=16)
    StableDiffusionPipeline(unet=unet_model, vae=vae_model, text_encoder=text_model,
                            tokenizer=CLIPTokenizer.from_pretrained(str(tmp_path / "tok")),
                            scheduler=DDIMScheduler(clip_sample=False), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    path = str(tmp_path / "model.safetensors")
    unet, vae, text = parts(family)  # complete in the original layout, as our exports: diffusers ignores the rest
    sf.write_single_file(path, unet, vae, text, family, extra=sf.original_only_tensors(family, text, {}))
    pipe = StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)

    got = sf.read_single_file(path)
    unet, vae = UNet(got["unet"][0]), OurVAE(got["vae"][0])
    unet.load_state_dict(got["unet"][1], strict=True)
    vae.load_state_dict(got["vae"][1], strict=True)
    te = CLIPTextModel(CLIPTextConfig(**got["text"][0])).eval()
    te.load_state_dict({k.removeprefix("text_model."): v for k, v in got["text"][1].items()}, strict=True)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 64, generator=g)
    ids = torch.randint(0, 1000, (2, 16), generator=g)
    with torch.no_grad():
        pairs = [(unet(x, torch.tensor([10, 900]), ctx), pipe.unet(x, torch.tensor([10, 900]), ctx).sample),
                 (vae.decode(x), pipe.vae.decode(x).sample),
                 (te(ids).last_hidden_state, pipe.text_encoder(ids).last_hidden_state),
                 (pipe.text_encoder(ids).last_hidden_state, text_model(ids).last_hidden_state)]
    for mine, theirs in pairs:
        assert rel_err(theirs, mine) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# 4. The full-size SD 1.5 and SD 2.1 key sets (meta tensors: names and shapes, no memory).

FULL = {
    "sd1": dict(unet=dict(attention_head_dim=8, cross_attention_dim=768),
                text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          hidden_act="quick_gelu"),
                known={"model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
                       "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                       "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
                       "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072)}),
    "sd2": dict(unet=dict(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True),
                text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                          hidden_act="gelu"),
                known={"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
                       "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
                       "model.diffusion_model.input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
                       OPENCLIP + "transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
                       OPENCLIP + "positional_embedding": (77, 1024)}),
}
KNOWN_VAE = {"first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
             "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
             "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
             "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
             "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1)}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_key_sets(family):
    spec = FULL[family]
    with torch.device("meta"):
        unet_model = UNet2DConditionModel(**spec["unet"])
        vae_model = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4)
        text_model = CLIPTextModel(CLIPTextConfig(**spec["text"]))
    unet, vae, text = unet_model.state_dict(), vae_model.state_dict(), text_sd(text_model)
    orig = sf.to_original(unet, vae, text, family)
    extra = last_block(orig) if family == "sd2" else {}
    orig |= extra
    for key, shape in (spec["known"] | KNOWN_VAE).items():
        assert tuple(orig[key].shape) == shape, key
    # Back with nothing missing and nothing left over; diffusers' converters agree on every name and shape.
    back = sf.from_original(orig)
    assert back["extra"].keys() == extra.keys()
    theirs_text = (ref.convert_ldm_clip_checkpoint(orig) if family == "sd1" else
                   ref.convert_open_clip_checkpoint(text_model, orig))
    for mine, theirs, want in ((back["unet"], ref.convert_ldm_unet_checkpoint(orig, dict(unet_model.config)), unet),
                               (back["vae"], ref.convert_ldm_vae_checkpoint(orig, dict(vae_model.config)), vae),
                               (back["text"], theirs_text, text)):
        assert mine.keys() == theirs.keys() == want.keys()
        assert all(mine[k].shape == theirs[k].shape == want[k].shape for k in want)
    # The configs read from the shapes are the published ones, and build our models with exactly these tensors.
    config = sf.unet_config(back["unet"], family)
    for field in ("block_out_channels", "attention_head_dim", "cross_attention_dim", "use_linear_projection",
                  "layers_per_block", "down_block_types", "up_block_types", "in_channels", "out_channels"):
        want = unet_model.config[field]
        assert config[field] == (list(want) if isinstance(want, tuple) else want), field
    with torch.device("meta"):
        ours = UNet(config).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in unet.items()}
    text_config = sf.text_config(back["text"], family)
    assert {k: text_config[k] for k in spec["text"]} == spec["text"]
    assert sf.vae_config(back["vae"])["block_out_channels"] == [128, 256, 512, 512]


# The original layout's keys, from its sources (ldm's LatentDiffusion.register_schedule; transformers' CLIPTextModel
# before 4.31 for SD 1; open_clip's text tower for SD 2: 24 blocks, text_projection, logit_scale), against what a
# file we write holds: every key the original code loads strictly, and nothing else.
LDM_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
               "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
               "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"}
CLIP_LAYER = [f"self_attn.{p}_proj.{w}" for p in ("q", "k", "v", "out") for w in ("weight", "bias")] + \
    [f"{m}.{w}" for m in ("layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2") for w in ("weight", "bias")]
OPENCLIP_BLOCK = [f"{m}.{w}" for m in ("ln_1", "attn.out_proj", "ln_2", "mlp.c_fc", "mlp.c_proj") for w in ("weight", "bias")] \
    + ["attn.in_proj_weight", "attn.in_proj_bias"]
ORIGINAL_TEXT = {
    "sd1": {"cond_stage_model.transformer.text_model." + k for k in
            ["embeddings.position_ids", "embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
             "final_layer_norm.weight", "final_layer_norm.bias"]
            + [f"encoder.layers.{i}.{k}" for i in range(12) for k in CLIP_LAYER]},
    "sd2": {OPENCLIP + k for k in ["token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                                   "text_projection", "logit_scale"]
            + [f"transformer.resblocks.{i}.{k}" for i in range(24) for k in OPENCLIP_BLOCK]},
}


def _full_size_text(family):
    """The full-size text tower of SD 1.5 or SD 2.1 (23 layers: the folder's), on the meta device."""
    with torch.device("meta"):
        return text_sd(CLIPTextModel(CLIPTextConfig(**FULL[family]["text"])))


@pytest.mark.parametrize("family, n_text", [("sd1", 197), ("sd2", 294)])
def test_written_files_hold_every_key_of_the_original_layout(family, n_text):
    text = _full_size_text(family)
    extra = sf.original_only_tensors(family, text, {})
    written = sf.to_original(text=text, family=family) | extra
    assert len(ORIGINAL_TEXT[family]) == n_text
    assert {k for k in written if k.startswith("cond_stage_model.")} == ORIGINAL_TEXT[family]
    assert {k for k in written if not k.startswith("cond_stage_model.")} == LDM_BUFFERS
    for name in LDM_BUFFERS:
        assert written[name].shape == (1000,) and written[name].dtype == torch.float32
    if family == "sd1":
        ids = written["cond_stage_model.transformer.text_model.embeddings.position_ids"]
        assert ids.dtype == torch.int64 and ids.shape == (1, 77) and torch.equal(ids.cpu(), torch.arange(77)[None])
    else:
        assert written[OPENCLIP + "text_projection"].shape == (1024, 1024) and written[OPENCLIP + "logit_scale"].shape == ()
        for k in OPENCLIP_BLOCK:
            assert written[OPENCLIP + f"transformer.resblocks.23.{k}"].shape == written[
                OPENCLIP + f"transformer.resblocks.22.{k}"].shape, k
    # read back, the added tensors are the file's extra and our parts are whole: 23 (SD 2) or 12 (SD 1) layers
    back = sf.from_original(written | {k: v for k, v in sf.to_original(*parts(family), family).items()
                                       if not k.startswith("cond_stage_model.")})
    assert back["extra"].keys() == extra.keys() and back["text"].keys() == text.keys()


def test_the_added_tensors_change_nothing_sd_computes():
    """The schedule is ldm's own (A1111 samples with its alphas_cumprod: the abar of our f_theta, bit for bit); an
    all-zero OpenCLIP block is the identity; text_projection the identity, logit_scale ln 100."""
    from swiftbrush import Schedule
    schedule = sf.ldm_schedule({})
    assert torch.equal(schedule["alphas_cumprod"], Schedule().abar)
    assert abs(schedule["alphas_cumprod"][-1].item() - 0.0046600985) < 1e-9
    assert abs(schedule["sqrt_recipm1_alphas_cumprod"][-1].item() - 14.614641) < 1e-5  # sigma_max of A1111, ComfyUI
    assert schedule["posterior_variance"][0] == 0 and schedule["posterior_mean_coef1"][0] == 1
    assert schedule["posterior_log_variance_clipped"][0] == torch.tensor(math.log(1e-20), dtype=torch.float32)
    text = text_sd(tiny("sd2")[2])  # 23 layers, width 64
    extra = sf.original_only_tensors("sd2", text, {})
    block = {k.split("resblocks.23.")[1]: v for k, v in extra.items() if "resblocks.23." in k}
    assert len(block) == 12 and all(not v.any() for v in block.values())
    width, inner = block["mlp.c_fc.weight"].shape[1], block["mlp.c_fc.weight"].shape[0]
    attn, ln_1, ln_2 = torch.nn.MultiheadAttention(width, 1), torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
    c_fc, c_proj = torch.nn.Linear(width, inner), torch.nn.Linear(inner, width)
    for module, name in ((attn, "attn."), (ln_1, "ln_1."), (ln_2, "ln_2."), (c_fc, "mlp.c_fc."), (c_proj, "mlp.c_proj.")):
        module.load_state_dict({k[len(name):]: v for k, v in block.items() if k.startswith(name)}, strict=True)
    x = torch.randn(5, 2, width)  # open_clip's ResidualAttentionBlock: x + attn(ln_1(x)), then + mlp(ln_2(x))
    x1 = x + attn(*[ln_1(x)] * 3, need_weights=False)[0]
    assert torch.equal(x1 + c_proj(torch.nn.functional.gelu(c_fc(ln_2(x1)))), x)
    assert torch.equal(extra[OPENCLIP + "text_projection"], torch.eye(width))
    assert extra[OPENCLIP + "logit_scale"].item() == pytest.approx(math.log(100))


# ---------------------------------------------------------------------------------------------------------------
# 5. Bad input: one line that names the problem and what to do.


class NotATensor:  # a pickled object of this class needs code to unpickle
    pass


def write_bad(kind, path):
    orig = sf.to_original(*parts("sd1"), family="sd1")
    if kind == "sdxl":
        save_file(orig | {"conditioner.embedders.1.model.positional_embedding": torch.ones(4)}, path)
    elif kind == "lora_kohya":
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 4)}, path)
    elif kind == "lora_peft":
        save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(4, 4)}, path)
    elif kind == "diffusers_layout":
        save_file(parts("sd1")[0], path)
    elif kind == "unet_only":
        save_file({k: v for k, v in orig.items() if k.startswith("model.")}, path)
    elif kind == "sdxl_unet_keys":
        save_file(orig | {"model.diffusion_model.label_emb.0.0.weight": torch.ones(4, 4)}, path)
    elif kind == "truncated":
        save_file(orig, path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif kind == "corrupt_ckpt":
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 this is not a zip archive")
    elif kind == "pickle_code":
        torch.save({"state_dict": {"model.diffusion_model.conv_in.weight": torch.ones(1)}, "obj": NotATensor()}, path)
    elif kind == "empty":
        save_file({}, path)
    elif kind == "inpainting":  # 4 latent + 4 masked-image + 1 mask channels
        conv_in = "model.diffusion_model.input_blocks.0.0.weight"
        save_file(orig | {conv_in: torch.cat([orig[conv_in]] * 3, dim=1)[:, :9].contiguous()}, path)


BAD = [("sdxl", ".safetensors", "SDXL"), ("lora_kohya", ".safetensors", "LoRA"), ("lora_peft", ".safetensors", "LoRA"),
       ("diffusers_layout", ".safetensors", "no model.diffusion_model"),
       ("empty", ".safetensors", "found e.g. nothing"),
       ("unet_only", ".safetensors", "full checkpoint"), ("sdxl_unet_keys", ".safetensors", "label_emb"),
       ("truncated", ".safetensors", "corrupt or truncated"), ("corrupt_ckpt", ".ckpt", "corrupt or truncated"),
       ("pickle_code", ".ckpt", "pickled code"), ("missing", ".safetensors", "not found"),
       ("unknown_extension", ".onnx", "unknown extension"), ("inpainting", ".safetensors", "inpainting")]


@pytest.mark.parametrize("kind,ext,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input(kind, ext, words, tmp_path):
    path = str(tmp_path / f"model{ext}")
    write_bad(kind, path)
    with pytest.raises(WeightsError) as e:
        sf.read_single_file(path)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("args,words", [
    (dict(path="model.ckpt"), "write a .safetensors"),
    (dict(family="sdxl"), "family must be"),
    (dict(extra={"model.diffusion_model.out.2.bias": torch.ones(4)}), "overwrite"),
    (dict(extra={"first_stage_model.encoder.foo": torch.ones(4)}), "overwrite"),
    (dict(unet={"down_blocks.0.foo.weight": torch.ones(1)}), "not part of a Stable Diffusion"),
])
def test_bad_write(args, words, tmp_path):
    unet, vae, text = parts("sd1")
    args = dict(path="model.safetensors", unet=unet, vae=vae, text=text, family="sd1") | args
    args["path"] = str(tmp_path / args["path"])
    with pytest.raises(WeightsError) as e:
        sf.write_single_file(**args)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_sd1_text_keys_without_text_model_prefix_read_the_same(tmp_path):
    """Files saved from older transformers name SD 1's text encoder `cond_stage_model.transformer.encoder.*`."""
    unet, vae, text = parts("sd1")
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in sf.to_original(unet, vae, text, "sd1").items()}
    save_file(old, str(tmp_path / "old.safetensors"))
    assert_same(sf.read_single_file(str(tmp_path / "old.safetensors"))["text"][1], text)
