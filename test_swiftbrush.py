"""The tests of swiftbrush-min (CPU, tiny random models in the official folder layouts, a few minutes).

1. Stable Diffusion from scratch: parity of unet.py / vae.py with diffusers (the oracle), loader errors.
2. Algorithm 1: LoRA teacher, Eq. 7 student, Eq. 5 / Eq. 2 gradients and their surrogate loss, the loop (what
   changes and what must not), exact resume, crash and NaN safety, CLI errors, export, sampling, text.
3. The miniature's world: generator, truth-based metrics, tokenizer, images; the quick end-to-end run.
Every parameter of an oracle model is perturbed before saving: diffusers zero-initialises some output convs,
which would hide wiring bugs behind them.
"""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora
import sample
import swiftbrush as sb
import unet
import vae
import world
from unet import WeightsError, load_unet

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

TOL = 1e-4  # max|a-b| / max|a| in fp32
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning threads
    made the tests 10-20x slower; restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()




# ==================================================================================================
# 1. Stable Diffusion from scratch
# ==================================================================================================




def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_inputs(spec, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, H, W, L = spec["batch"], spec["h"], spec["w"], spec["ctx_len"]
    x = torch.randn(B, 4, H, W, generator=g)
    ctx = torch.randn(B, L, spec["config"]["cross_attention_dim"], generator=g)
    return x, ctx


# --------------------------------------------------------------------------------------------------
# Tiny UNet configs

SD1_TINY = dict(  # SD 1.x wiring: int attention_head_dim (= heads), conv proj_in/out
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 48, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, cross_attention_dim=24, norm_num_groups=8, use_linear_projection=False)

SD2_TINY = dict(  # SD 2.x wiring: per-block head counts, linear proj_in/out, upcast_attention
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=[2, 4, 4, 8], cross_attention_dim=40, norm_num_groups=8, use_linear_projection=True,
    upcast_attention=True)

# Written to config.json with `num_attention_heads` (diffusers refuses that argument in __init__, so the oracle is
# built with the same numbers as `attention_head_dim`); 2 transformer layers per block; odd input size;
# the other timestep-embedding convention.
HEADS_TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=[2, 4, 4], transformer_layers_per_block=2, cross_attention_dim=16, norm_num_groups=16,
    use_linear_projection=True, flip_sin_to_cos=False, freq_shift=1)

SPECS = {
    "sd1": dict(config=SD1_TINY, batch=2, h=16, w=16, ctx_len=7),
    "sd2": dict(config=SD2_TINY, batch=2, h=16, w=24, ctx_len=5),
    "heads_odd": dict(config=HEADS_TINY, batch=2, h=13, w=11, ctx_len=3, num_attention_heads=True),
}


def save_unet(folder, config, seed=0, num_attention_heads=False):
    """Random diffusers UNet with perturbed weights, saved to `folder`; returns the diffusers model."""
    torch.manual_seed(seed)
    ref = perturb(UNet2DConditionModel(**config), seed)
    ref.save_pretrained(folder)
    if num_attention_heads:  # move the head counts to `num_attention_heads`; put a decoy in attention_head_dim
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["num_attention_heads"], cfg["attention_head_dim"] = cfg["attention_head_dim"], 7
        with open(path, "w") as f:
            json.dump(cfg, f)
    return ref


@pytest.fixture(scope="module", params=sorted(SPECS))
def unet_pair(request, tmp_path_factory):
    spec = SPECS[request.param]
    folder = str(tmp_path_factory.mktemp(f"unet_{request.param}"))
    ref = save_unet(folder, spec["config"], num_attention_heads=spec.get("num_attention_heads", False))
    ours = unet.load_unet(folder)
    return ref, ours, spec, folder


# --------------------------------------------------------------------------------------------------
# UNet parity


def test_unet_forward_matches_diffusers(unet_pair):
    ref, ours, spec, _ = unet_pair
    x, ctx = make_inputs(spec)
    B = spec["batch"]
    timesteps = [torch.tensor([10, 980][:B] + [500] * (B - 2)), 500, torch.tensor(999), torch.tensor([37])]
    with torch.no_grad():
        for t in timesteps:
            want = ref(x, t, encoder_hidden_states=ctx).sample
            got = ours(x, t, ctx)
            assert got.shape == want.shape == x.shape
            assert want.abs().max() > 1e-2  # the perturbation left a non-trivial output
            assert rel_err(want, got) < TOL, f"t={t}: rel err {rel_err(want, got):.2e}"
        # different timesteps in the batch give different outputs (the embedding is per sample)
        a = ours(x, torch.tensor([1] * B), ctx)
        b = ours(x, torch.tensor([900] * B), ctx)
        assert rel_err(a, b) > 1e-3


def _grads(model, x, ctx, t, w):
    model.zero_grad(set_to_none=True)
    x, ctx = x.clone().requires_grad_(True), ctx.clone().requires_grad_(True)
    out = model(x, t, ctx) if isinstance(model, unet.UNet) else model(x, t, encoder_hidden_states=ctx).sample
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, x.grad, ctx.grad


def _grad_inputs(spec, seed):
    x, ctx = make_inputs(spec)
    return x, ctx, torch.tensor([3, 640][:spec["batch"]]), torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


def test_unet_gradients_match_diffusers(unet_pair):
    ref, ours, spec, _ = unet_pair
    x, ctx, t, w = _grad_inputs(spec, 5)
    o_ref, g_ref, gx_ref, gc_ref = _grads(ref, x, ctx, t, w)
    o, g, gx, gc = _grads(ours, x, ctx, t, w)
    assert rel_err(o_ref, o) < TOL
    assert rel_err(gx_ref, gx) < TOL and rel_err(gc_ref, gc) < TOL
    assert set(g) == set(g_ref) == {n for n, _ in ours.named_parameters()}  # every parameter gets a gradient
    named = ["conv_in.weight", "time_embedding.linear_1.weight",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
             "mid_block.attentions.0.proj_in.weight", "up_blocks.0.resnets.0.conv1.weight", "conv_out.bias"]
    for n in named:
        assert g_ref[n].abs().max() > 0, n
        assert rel_err(g_ref[n], g[n]) < TOL, f"{n}: rel err {rel_err(g_ref[n], g[n]):.2e}"
    worst = max(g_ref, key=lambda n: rel_err(g_ref[n], g[n]))
    assert rel_err(g_ref[worst], g[worst]) < 1e-3, f"{worst}: rel err {rel_err(g_ref[worst], g[worst]):.2e}"


def test_unet_gradient_checkpointing_same_output_and_grads(unet_pair):
    _, ours, spec, _ = unet_pair
    x, ctx, t, w = _grad_inputs(spec, 6)
    o0, g0, gx0, gc0 = _grads(ours, x, ctx, t, w)
    calls = []
    hook = ours.down_blocks[0].resnets[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        ours.gradient_checkpointing = True
        ours.train()
        o1, g1, gx1, gc1 = _grads(ours, x, ctx, t, w)
    finally:
        ours.gradient_checkpointing = False
        ours.eval()
        hook.remove()
    assert len(calls) == 2, "checkpointing should recompute the block during backward"
    assert rel_err(o0, o1) < 1e-6
    assert rel_err(gx0, gx1) < 1e-5 and rel_err(gc0, gc1) < 1e-5
    assert set(g0) == set(g1)
    for n in g0:
        assert rel_err(g0[n], g1[n]) < 1e-5, n


def test_unet_load_from_pipeline_root(tmp_path):
    ref = save_unet(str(tmp_path / "unet"), SD1_TINY, seed=3)
    (tmp_path / "vae").mkdir()  # a pipeline root has other components too
    ours = unet.load_unet(tmp_path)
    assert ours.config["block_out_channels"] == list(SD1_TINY["block_out_channels"])
    x, ctx = make_inputs(SPECS["sd1"])
    with torch.no_grad():
        assert rel_err(ref(x, 250, encoder_hidden_states=ctx).sample, ours(x, 250, ctx)) < TOL


def test_unet_fp16_variant_file(tmp_path):
    torch.manual_seed(4)
    ref = perturb(UNet2DConditionModel(**SD2_TINY), 4).half()
    ref.save_pretrained(tmp_path, variant="fp16")
    files = sorted(os.listdir(tmp_path))
    assert "diffusion_pytorch_model.fp16.safetensors" in files and "diffusion_pytorch_model.safetensors" not in files
    ours = unet.load_unet(tmp_path)  # fp32 by default
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    ref = ref.float()
    x, ctx = make_inputs(SPECS["sd2"])
    with torch.no_grad():
        assert rel_err(ref(x, 250, encoder_hidden_states=ctx).sample, ours(x, 250, ctx)) < TOL
    half = unet.load_unet(tmp_path, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    sd = load_file(str(tmp_path / "diffusion_pytorch_model.fp16.safetensors"))
    assert all(torch.equal(half.state_dict()[k], v) for k, v in sd.items())


def test_unet_bin_weights_are_read_weights_only(tmp_path):
    ref = save_unet(str(tmp_path), SD1_TINY, seed=5)
    sd = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    os.remove(tmp_path / "diffusion_pytorch_model.safetensors")
    torch.save(sd, tmp_path / "diffusion_pytorch_model.bin")
    ours = unet.load_unet(tmp_path)
    x, ctx = make_inputs(SPECS["sd1"])
    with torch.no_grad():
        assert rel_err(ref(x, 77, encoder_hidden_states=ctx).sample, ours(x, 77, ctx)) < TOL
    # a pickle that needs arbitrary code (here: a class from this module) is refused, not executed
    torch.save({"conv_in.weight": _Payload()}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(unet.WeightsError, match="cannot read weights file .*diffusion_pytorch_model.bin"):
        unet.load_unet(tmp_path)


class _Payload:
    pass


# --------------------------------------------------------------------------------------------------
# VAE

VAE_TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                norm_num_groups=8, sample_size=32)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    ref = perturb(AutoencoderKL(**VAE_TINY), 0)
    ref.save_pretrained(folder)
    return ref, folder


def _vae_io(seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 24, 16, generator=g) * 2 - 1, torch.randn(2, 4, 6, 4, generator=g)


def _check_vae(ref, ours):
    image, z = _vae_io()
    with torch.no_grad():
        want_mean = ref.encode(image).latent_dist.mean
        got_mean = ours.encode(image)
        assert got_mean.shape == want_mean.shape == (2, 4, 6, 4)
        assert rel_err(want_mean, got_mean) < TOL
        want_img, got_img = ref.decode(z).sample, ours.decode(z)
        assert got_img.shape == want_img.shape == (2, 3, 24, 16)
        assert rel_err(want_img, got_img) < TOL


def test_vae_matches_diffusers(vae_folder):
    ref, folder = vae_folder
    ours = vae.load_vae(folder)
    _check_vae(ref, ours)
    # sampling: mean + std * eps, with std from the clamped log-variance, as diffusers' latent_dist.sample
    image, _ = _vae_io()
    with torch.no_grad():
        dist = ref.encode(image).latent_dist
        s = ours.encode(image, sample=True, generator=torch.Generator().manual_seed(9))
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(9))
    assert rel_err(dist.mean + dist.std * eps, s) < TOL


def test_vae_load_from_pipeline_root(vae_folder, tmp_path):
    ref, folder = vae_folder
    (tmp_path / "vae").mkdir()
    for name in os.listdir(folder):
        (tmp_path / "vae" / name).write_bytes((folder / name).read_bytes())
    _check_vae(ref, vae.load_vae(tmp_path))


def test_vae_scaling_factor(vae_folder, tmp_path):
    ref, folder = vae_folder
    for name in os.listdir(folder):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["scaling_factor"] = 0.13025
    cfg_path.write_text(json.dumps(cfg))
    assert vae.load_vae(tmp_path).scaling_factor == 0.13025
    del cfg["scaling_factor"]
    cfg_path.write_text(json.dumps(cfg))
    assert vae.load_vae(tmp_path).scaling_factor == 0.18215


@pytest.mark.parametrize("as_conv", [False, True], ids=["linear", "conv1x1"])
def test_vae_legacy_attention_keys(vae_folder, tmp_path, as_conv):
    ref, folder = vae_folder
    for name in os.listdir(folder):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    sd = load_file(path)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out, renamed = {}, 0
    for k, v in sd.items():
        for new, old in legacy.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                if as_conv and v.ndim == 2:
                    v = v[:, :, None, None]
                renamed += 1
        out[k] = v.contiguous()
    assert renamed == 16  # encoder + decoder mid blocks, 4 linears x (weight, bias)
    assert "encoder.mid_block.attentions.0.query.weight" in out
    save_file(out, path)
    _check_vae(ref, vae.load_vae(tmp_path))


# --------------------------------------------------------------------------------------------------
# Full-size configs on the meta device: keys and shapes equal to diffusers'

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


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("config", [SD15, SD21_BASE, SD21], ids=["sd15", "sd21base", "sd21"])
def test_full_size_unet_keys_and_shapes(config):
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
        ours = unet.UNet(json.loads(json.dumps(config)))  # as read from config.json: lists, not tuples
    want, got = _shapes(ref), _shapes(ours)
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {k for k in want if want[k] != got[k]} == set()
    if config is SD21_BASE:
        n = sum(p.numel() for p in ours.parameters())
        assert n == sum(p.numel() for p in ref.parameters())
        assert abs(n - 865.9e6) < 0.1e6, n


def test_full_size_vae_keys_and_shapes():
    with torch.device("meta"):
        ref = AutoencoderKL(**SD_VAE)
        ours = vae.AutoencoderKL(json.loads(json.dumps(SD_VAE)))
    assert _shapes(ref) == _shapes(ours)


# --------------------------------------------------------------------------------------------------
# Bad folders and files: one WeightsError that names the file / folder (and the keys)


@pytest.fixture(scope="module")
def good_unet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good_unet")
    save_unet(str(folder), SD1_TINY, seed=7)
    return folder


def _copy(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_error_missing_folder(tmp_path):
    with pytest.raises(unet.WeightsError, match="does not exist") as e:
        unet.load_unet(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    with pytest.raises(unet.WeightsError, match="does not exist"):
        vae.load_vae(tmp_path / "nope")


def test_error_no_config(good_unet_folder, tmp_path):
    d = _copy(good_unet_folder, tmp_path / "m")
    os.remove(d / "config.json")
    with pytest.raises(unet.WeightsError, match="config.json") as e:
        unet.load_unet(d)
    assert str(d) in str(e.value)
    (d / "config.json").write_text("{not json")
    with pytest.raises(unet.WeightsError, match="not valid JSON"):
        unet.load_unet(d)


def test_error_no_weights_file(good_unet_folder, tmp_path):
    d = _copy(good_unet_folder, tmp_path / "m")
    os.remove(d / WEIGHTS)
    with pytest.raises(unet.WeightsError, match="no weights") as e:
        unet.load_unet(d)
    assert str(d) in str(e.value) and WEIGHTS in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_error_corrupt_weights_file(good_unet_folder, tmp_path, damage):
    d = _copy(good_unet_folder, tmp_path / "m")
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    with pytest.raises(unet.WeightsError, match="cannot read weights file") as e:
        unet.load_unet(d)
    assert str(d / WEIGHTS) in str(e.value)


@pytest.mark.parametrize("change, words", [
    ({"down_block_types": ["CrossAttnDownBlock3D", "CrossAttnDownBlock2D", "DownBlock2D"]}, "CrossAttnDownBlock3D"),
    ({"addition_embed_type": "text_time"}, "addition_embed_type"),
    ({"up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}, "differ in length"),
    ({"block_out_channels": None}, "not a Stable Diffusion UNet config"),
], ids=["block3d", "sdxl", "lengths", "bad_channels"])
def test_error_unsupported_config(good_unet_folder, tmp_path, change, words):
    d = _copy(good_unet_folder, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(unet.WeightsError, match=words) as e:
        unet.load_unet(d)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("edit", ["missing", "unexpected", "shape"])
def test_error_key_mismatch(good_unet_folder, tmp_path, edit):
    d = _copy(good_unet_folder, tmp_path / "m")
    sd = load_file(str(d / WEIGHTS))
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    if edit == "missing":
        del sd[key]
        expect = ["1 missing keys", key]
    elif edit == "unexpected":
        sd["add_embedding.linear_1.weight"] = torch.zeros(3, 3)
        expect = ["1 unexpected keys", "add_embedding.linear_1.weight"]
    else:
        sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1)
        expect = ["wrong shapes", key, str(tuple(sd[key].shape))]
    save_file(sd, str(d / WEIGHTS))
    with pytest.raises(unet.WeightsError) as e:
        unet.load_unet(d)
    msg = str(e.value)
    assert str(d / WEIGHTS) in msg
    for word in expect:
        assert word in msg, (word, msg)


def test_error_many_missing_keys_are_abbreviated(good_unet_folder, tmp_path):
    d = _copy(good_unet_folder, tmp_path / "m")
    sd = load_file(str(d / WEIGHTS))
    gone = sorted(k for k in sd if k.startswith("mid_block."))
    for k in gone:
        del sd[k]
    save_file(sd, str(d / WEIGHTS))
    with pytest.raises(unet.WeightsError, match=f"{len(gone)} missing keys") as e:
        unet.load_unet(d)
    assert "..." in str(e.value) and len(str(e.value)) < 1000


# ==================================================================================================
# 2. Algorithm 1
# ==================================================================================================




# --------------------------------------------------------------------------------------------------
# A tiny Stable Diffusion folder: unet/ vae/ text_encoder/ tokenizer/ scheduler/


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


@pytest.fixture(scope="session")
def sd_root(tmp_path_factory):
    return make_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="session")
def sd_root_v(sd_root, tmp_path_factory):
    """The same weights, declared v-prediction."""
    root = str(tmp_path_factory.mktemp("tiny_sd_v") / "sd")
    shutil.copytree(sd_root, root)
    path = os.path.join(root, "scheduler", "scheduler_config.json")
    with open(path) as f:
        c = json.load(f)
    c["prediction_type"] = "v_prediction"
    with open(path, "w") as f:
        json.dump(c, f)
    return root


UNET_FILE = os.path.join("unet", "diffusion_pytorch_model.safetensors")


def inputs(B=2, seed=1, L=16, D=32, hw=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, hw, hw, generator=g), torch.randn(B, L, D, generator=g)


# Training runs: tiny and fast. EMA_EVERY is lowered so that a 6-step run updates the EMA before and after a
# resume at step 3 (the EMA's resumability is then tested too).
BASE = dict(batch_size=2, lora_rank=4, lora_alpha=8.0, lr=1e-3, save_every=0, sample_every=0, seed=0)


def run(root, out, steps, models=None, **kw):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sb, "EMA_EVERY", 2)
        return sb.train(sb.Config(model=root, out=str(out), steps=steps, **{**BASE, **kw}), models=models,
                        progress=False)


def cli_args(root, out, steps):
    return ["--model", root, "--out", str(out), "--steps", str(steps), "--batch-size", "2", "--lora-rank", "4",
            "--lora-alpha", "8", "--lr", "1e-3", "--save-every", "0", "--sample-every", "0"]


def cli(argv):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sb, "EMA_EVERY", 2)
        return sb.main(argv)


def cli_error(argv, capsys):
    """Run the CLI expecting a clean exit with an error; returns the one-line message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(argv)
    err = capsys.readouterr().err
    code = e.value.code
    assert code not in (0, None)
    assert "Traceback" not in err
    if isinstance(code, str):  # sys.exit("swiftbrush: error: ...")
        assert code.startswith("swiftbrush: ") and "\n" not in code.strip(), code
        return code
    lines = err.strip().splitlines()  # argparse: usage, then one "prog: error: ..." line
    assert code == 2 and "error: " in lines[-1] and lines[0].startswith("usage:"), err
    return lines[-1]


def read_ckpt(path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def assert_same_ckpt(a, b):
    (ta, ma), (tb, mb) = read_ckpt(a), read_ckpt(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ca, cb = json.loads(ma.pop("config")), json.loads(mb.pop("config"))
    ca.pop("out"), cb.pop("out")
    assert ca == cb and ma == mb


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:
        r.pop("sec_per_step")
    return rows


# --------------------------------------------------------------------------------------------------
# LoRA beside the attention projections


def test_lora_identity_toggle_merge_and_files(sd_root, tmp_path):
    x, ctx = inputs()
    t = torch.tensor([10, 700])
    net = load_unet(sd_root)
    with torch.no_grad():
        teacher = net(x, t, ctx)
        phi = lora.inject_lora(net, rank=4, alpha=8.0, targets=("to_q", "to_v"))
        assert len(phi) == 2 * len(lora.lora_layers(net)) > 0
        assert all(n.endswith(("to_q", "to_v")) for n, _ in lora.lora_layers(net))
        assert torch.equal(net(x, t, ctx), teacher)  # B = 0: a fresh LoRA changes nothing
        g = torch.Generator().manual_seed(3)
        for _, m in lora.lora_layers(net):
            m.lora_up.weight.copy_(0.1 * torch.randn(m.lora_up.weight.shape, generator=g))
        student = net(x, t, ctx)
        assert rel_err(teacher, student) > 1e-3
        with lora.lora_disabled(net):
            assert torch.equal(net(x, t, ctx), teacher)  # eps_psi through the same weights: bit-identical
        assert torch.equal(net(x, t, ctx), student)  # re-enabled on exit

        # the base weights keep exactly the official keys
        official = load_file(os.path.join(sd_root, UNET_FILE))
        base = lora.base_state_dict(net)
        assert set(base) == set(official)
        assert all(torch.equal(base[k], official[k]) for k in official)
        fresh = load_unet(sd_root)
        fresh.load_state_dict(base, strict=True)
        res = net.load_state_dict(official, strict=False)
        assert not res.unexpected_keys and set(res.missing_keys) == set(lora.lora_state_dict(net))

        # save / load into a fresh UNet (injects it from the file's metadata)
        path = str(tmp_path / "lora.safetensors")
        lora.save_lora(net, path)
        other = load_unet(sd_root)
        config = lora.load_lora(other, path)
        assert config == {"rank": 4, "alpha": 8.0, "targets": ["to_q", "to_v"]}
        assert torch.equal(other(x, t, ctx), student)

        # a file of another rank, or not a LoRA file at all
        wrong = load_unet(sd_root)
        lora.inject_lora(wrong, rank=2, alpha=8.0)
        with pytest.raises(WeightsError):
            lora.load_lora(wrong, path)
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"not a safetensors file")
        with pytest.raises(WeightsError):
            lora.load_lora(load_unet(sd_root), str(bad))

        # merge: same function, plain Linear layers, official keys only
        lora.merge_lora(net)
        assert not lora.lora_layers(net)
        assert not any(isinstance(m, lora.LoRALinear) for m in net.modules())
        assert set(net.state_dict()) == set(official)
        assert rel_err(student, net(x, t, ctx)) < 1e-5
    with pytest.raises(ValueError):
        lora.inject_lora(load_unet(sd_root), rank=0)
    with pytest.raises(ValueError):
        lora.inject_lora(net, rank=2, targets=("no_such_layer",))


# --------------------------------------------------------------------------------------------------
# The student (Eq. 7) and the score gradients (Eq. 5, Eq. 2)


def _abar_by_hand(root, t):
    with open(os.path.join(root, "scheduler", "scheduler_config.json")) as f:
        c = json.load(f)
    betas = np.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, c["num_train_timesteps"]) ** 2
    return float(np.prod(1 - betas[:t + 1]))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_f_theta_at_step0_is_teachers_x0_prediction(sd_root, sd_root_v, pred):
    root = sd_root if pred == "epsilon" else sd_root_v
    m = sb.load_models(sb.Config(model=root), CPU)
    assert m.schedule.prediction_type == pred and m.latent_shape == (4, 8, 8)
    abar = _abar_by_hand(root, 999)
    assert abs(m.schedule.abar[999].item() - abar) < 1e-7
    a, s = abar ** 0.5, (1 - abar) ** 0.5
    z, ctx = inputs(seed=4)
    with torch.no_grad():
        out = m.unet(z, torch.tensor([999, 999]), ctx)
        want = (z - s * out) / a if pred == "epsilon" else a * z - s * out  # v: x0 = alpha z - sigma v
        got = sb.f_theta(m.student, z, ctx, m.schedule)
        assert rel_err(want, got) < 1e-5
        assert torch.equal(sb.f_theta(m.student, z, ctx, m.schedule, param="eps"), out)


@pytest.fixture
def vsd_models(sd_root):
    """Models as train() sets them up for VSD: a LoRA on the teacher UNet."""
    m = sb.load_models(sb.Config(model=sd_root), CPU)
    torch.manual_seed(0)
    lora.inject_lora(m.unet, 4, 8.0)
    return m


def _x0_ctx(m):
    z = torch.randn((2, *m.latent_shape), generator=torch.Generator().manual_seed(7))
    ctx = m.embeddings[:2]
    with torch.no_grad():
        return sb.f_theta(m.student, z, ctx, m.schedule), ctx


def test_vsd_gradient_is_zero_at_start_and_sds_is_not(vsd_models):
    m = vsd_models
    x0, ctx = _x0_ctx(m)
    vsd, sds = sb.Config(loss="vsd"), sb.Config(loss="sds")
    g = sb.score_gradient(m, vsd, x0, ctx, torch.Generator().manual_seed(0))
    assert torch.equal(g, torch.zeros_like(g))  # eps_psi == eps_phi exactly: same weights, LoRA B = 0
    g = sb.score_gradient(m, sds, x0, ctx, torch.Generator().manual_seed(0))
    assert g.abs().max() > 1e-3
    other_cfg = sb.Config(loss="vsd", lora_guidance=1.0)  # different CFG scales: the two scores differ
    assert sb.score_gradient(m, other_cfg, x0, ctx, torch.Generator().manual_seed(0)).abs().max() > 1e-4


def test_sds_gradient_by_hand(vsd_models):
    """g = sigma_t^2 (eps_psi_cfg(x_t, t, y) - eps), with t, eps drawn as score_gradient draws them."""
    m = vsd_models
    x0, ctx = _x0_ctx(m)
    cfg = sb.Config(loss="sds", guidance=3.0)
    g = sb.score_gradient(m, cfg, x0, ctx, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(20, 981, (2,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    c = m.schedule.config
    betas = np.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, c["num_train_timesteps"]) ** 2
    abar = torch.tensor([float(np.prod(1 - betas[:int(i) + 1])) for i in t], dtype=torch.float32)
    a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    with torch.no_grad(), lora.lora_disabled(m.unet):
        e_u = m.unet(x_t, t, m.uncond.expand(2, -1, -1))
        e_c = m.unet(x_t, t, ctx)
    want = s ** 2 * (e_u + 3.0 * (e_c - e_u) - eps)
    assert rel_err(want, g) < 1e-4


@pytest.mark.parametrize("loss", ["vsd", "sds"])
def test_surrogate_loss_gradient_is_g(vsd_models, loss):
    m = vsd_models
    with torch.no_grad():  # a LoRA that has learnt something, so VSD's g is not zero
        g0 = torch.Generator().manual_seed(9)
        for p in lora.lora_parameters(m.unet):
            p.copy_(0.2 * torch.randn(p.shape, generator=g0))
    x0, ctx = _x0_ctx(m)
    g = sb.score_gradient(m, sb.Config(loss=loss), x0, ctx, torch.Generator().manual_seed(1))
    assert g.abs().max() > 1e-4
    x0 = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sb.surrogate_loss(x0, g), x0)
    # x0 - (x0 - g) is g up to one rounding at |x0|'s scale (fp32), hence the atol
    tol = 4 * torch.finfo(torch.float32).eps * x0.abs().max().item()
    assert torch.allclose(grad * x0.numel(), g, rtol=1e-5, atol=tol)
    # and through the student: d loss / d theta = (d f_theta / d theta)^T g / N
    z = torch.randn((2, *m.latent_shape), generator=torch.Generator().manual_seed(7))
    w = m.student.conv_out.weight
    x = sb.f_theta(m.student, z, ctx, m.schedule)
    (a,) = torch.autograd.grad(sb.surrogate_loss(x, g), w)
    x = sb.f_theta(m.student, z, ctx, m.schedule)
    (b,) = torch.autograd.grad(x, w, grad_outputs=g / x.numel())
    assert rel_err(b, a) < 1e-5


# --------------------------------------------------------------------------------------------------
# The training loop


def test_vsd_steps_train_student_and_lora_only(sd_root, tmp_path):
    official = load_file(os.path.join(sd_root, UNET_FILE))
    m = run(sd_root, tmp_path / "vsd", 3)
    base = lora.base_state_dict(m.unet)
    assert set(base) == set(official) and all(torch.equal(base[k], official[k]) for k in official)
    assert not any(p.requires_grad for k, p in m.unet.named_parameters() if "lora_" not in k)
    st = m.student.state_dict()
    assert set(st) == set(official)
    assert any(not torch.equal(st[k], official[k]) for k in official)  # the student moved
    ups = [mod.lora_up.weight for _, mod in lora.lora_layers(m.unet)]
    assert ups and all(u.abs().max() > 0 for u in ups)  # the LoRA moved (B started at 0)
    assert len(m.history) == 3 and all(np.isfinite(h["loss_lora"]) and h["loss_lora"] > 0 for h in m.history)
    assert m.history[0]["grad_norm_student"] == 0.0  # step 1: eps_psi == eps_phi, g = 0
    assert m.history[-1]["grad_norm_student"] > 0
    tensors, meta = read_ckpt(tmp_path / "vsd" / "checkpoint.safetensors")
    assert meta["step"] == "3"
    assert any(k.startswith("lora/") for k in tensors) and any(k.startswith("opt_lora/") for k in tensors)


def test_sds_mode_has_no_lora(sd_root, tmp_path):
    official = load_file(os.path.join(sd_root, UNET_FILE))
    m = run(sd_root, tmp_path / "sds", 3, loss="sds")
    assert not lora.lora_layers(m.unet)
    assert set(m.unet.state_dict()) == set(official)
    assert any(not torch.equal(m.student.state_dict()[k], official[k]) for k in official)
    tensors, meta = read_ckpt(tmp_path / "sds" / "checkpoint.safetensors")
    assert not any(k.startswith(("lora/", "opt_lora/")) for k in tensors)
    assert json.loads(meta["opt_lora_groups"]) is None
    assert all(h.get("loss_lora", 0) == 0 and h.get("lora_lr") is None for h in m.history)
    m2 = run(sd_root, tmp_path / "sds", 4, loss="sds")  # and an SDS checkpoint resumes
    assert len(m2.history) == 1 and read_ckpt(tmp_path / "sds" / "checkpoint.safetensors")[1]["step"] == "4"


@pytest.fixture(scope="module")
def straight6(sd_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight6")
    m = run(sd_root, out, 6)
    return str(out), m


def test_resume_is_exact(sd_root, straight6, tmp_path):
    out6, _ = straight6
    run(sd_root, tmp_path, 3)
    assert read_ckpt(tmp_path / "checkpoint.safetensors")[1]["step"] == "3"
    m = run(sd_root, tmp_path, 6)  # finds the checkpoint and continues
    assert len(m.history) == 3
    keys = load_file(str(tmp_path / "checkpoint.safetensors"))
    for prefix in ("student/", "ema/", "lora/", "opt_student/", "opt_lora/", "rng", "order"):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert_same_ckpt(os.path.join(out6, "checkpoint.safetensors"), tmp_path / "checkpoint.safetensors")
    assert read_log(out6) == read_log(tmp_path) and len(read_log(out6)) == 6
    t = load_file(os.path.join(out6, "checkpoint.safetensors"))
    assert any(not torch.equal(t["ema/" + k[8:]], v) for k, v in t.items() if k.startswith("student/"))


def test_resume_via_cli_and_refusals(sd_root, straight6, tmp_path, capsys):
    out6, _ = straight6
    out = tmp_path / "cli"
    cli(cli_args(sd_root, out, 3))
    line = cli_error(cli_args(sd_root, out, 6), capsys)  # a checkpoint exists and no --resume
    assert "--resume" in line and "checkpoint" in line
    line = cli_error(cli_args(sd_root, out, 6) + ["--resume", "--lr", "2e-3"], capsys)
    assert "--lr" in line
    line = cli_error(cli_args(sd_root, tmp_path / "empty", 6) + ["--resume"], capsys)
    assert "no checkpoint" in line
    cli(cli_args(sd_root, out, 6) + ["--resume"])
    assert_same_ckpt(os.path.join(out6, "checkpoint.safetensors"), out / "checkpoint.safetensors")
    assert read_log(out6) == read_log(out)


def test_interrupted_checkpoint_write_keeps_previous(sd_root, straight6, tmp_path, monkeypatch):
    out6, _ = straight6
    run(sd_root, tmp_path, 3)
    ckpt = tmp_path / "checkpoint.safetensors"
    before = ckpt.read_bytes()
    import checkpoint
    real = checkpoint.save_file

    def crash(tensors, path, metadata=None):  # half a file on disk, then the process "dies"
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="simulated"):
        run(sd_root, tmp_path, 6)
    monkeypatch.undo()
    assert ckpt.read_bytes() == before
    assert read_ckpt(ckpt)[1]["step"] == "3"
    run(sd_root, tmp_path, 6)  # the resume drops the log lines of the lost steps 4-6 and redoes them exactly
    assert_same_ckpt(os.path.join(out6, "checkpoint.safetensors"), ckpt)
    assert read_log(out6) == read_log(tmp_path)


def test_nan_raises_and_keeps_last_good_checkpoint(sd_root, tmp_path, capsys, monkeypatch):
    # a poisoned student passed in: divergence at step 1, nothing saved
    m = sb.load_models(sb.Config(model=sd_root), CPU)
    with torch.no_grad():
        m.student.conv_out.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(sb.TrainingDiverged, match="loss_student .*step 1"):
        run(sd_root, tmp_path / "a", 3, models=m)
    assert not (tmp_path / "a" / "checkpoint.safetensors").exists()

    # a student that becomes NaN after the step-3 checkpoint (via the CLI: a clear message)
    out = tmp_path / "b"
    args = cli_args(sd_root, out, 6)
    args[args.index("--save-every") + 1] = "1"
    seen = {}
    real = sb.train_step

    def poisoned(m, cfg, state, *a):
        if state["step"] == 3:
            seen["ckpt"] = (out / "checkpoint.safetensors").read_bytes()
            with torch.no_grad():
                m.student.conv_out.weight.fill_(float("nan"))
        return real(m, cfg, state, *a)

    monkeypatch.setattr(sb, "train_step", poisoned)
    line = cli_error(args, capsys)
    assert "diverged" in line and "loss_student" in line and "step 4" in line
    monkeypatch.undo()
    assert (out / "checkpoint.safetensors").read_bytes() == seen["ckpt"]
    tensors, meta = read_ckpt(out / "checkpoint.safetensors")
    assert meta["step"] == "3" and all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    cli(args + ["--resume"])  # and it resumes
    assert read_ckpt(out / "checkpoint.safetensors")[1]["step"] == "6"


# --------------------------------------------------------------------------------------------------
# Bad input through the CLI: a one-line message, no traceback


def test_cli_bad_input(sd_root, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = lambda model=sd_root: ["--model", model, "--out", out, "--steps", "1", "--batch-size", "1",
                                  "--lora-rank", "2", "--sample-every", "0"]
    assert "does not exist" in cli_error(base(str(tmp_path / "nope")), capsys)
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.txt"
    empty.write_text("")
    blank.write_text("\n   \n\t\n")
    for f in (empty, blank):
        assert "no prompts" in cli_error(base() + ["--prompts", str(f)], capsys)
    assert "not found" in cli_error(base() + ["--prompts", str(tmp_path / "missing.txt")], capsys)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    assert "UTF-8" in cli_error(base() + ["--prompts", str(latin1)], capsys)
    assert "--steps" in cli_error(base() + ["--steps", "-3"], capsys)
    assert "--lora-rank" in cli_error(base() + ["--lora-rank", "0"], capsys)
    assert "--batch-size" in cli_error(base() + ["--batch-size", "0"], capsys)
    assert "--lr" in cli_error(base() + ["--lr", "0"], capsys)
    for kind in ("garbage", "truncated"):
        bad = str(tmp_path / kind)
        shutil.copytree(sd_root, bad)
        path = os.path.join(bad, UNET_FILE)
        if kind == "garbage":
            with open(path, "wb") as f:
                f.write(b"\x00garbage" * 100)
        else:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
        line = cli_error(base(bad), capsys)
        assert "diffusion_pytorch_model.safetensors" in line and "corrupt" in line
    assert not os.path.exists(os.path.join(out, "checkpoint.safetensors"))


@pytest.mark.parametrize("case", [
    "lora_targets",
    "prompts_dir",
    "out_is_file",
    "lr_nan",
    "guidance_nan",
])
def test_cli_bad_input_more(sd_root, tmp_path, capsys, case):
    out = tmp_path / "out"
    extra = {"lora_targets": ["--lora-targets", "no_such_layer"], "prompts_dir": ["--prompts", str(tmp_path)],
             "out_is_file": [], "lr_nan": ["--lr", "nan"], "guidance_nan": ["--guidance", "nan"]}[case]
    if case == "out_is_file":
        out.write_text("not a folder")
    argv = ["--model", sd_root, "--out", str(out), "--steps", "1", "--batch-size", "1", "--lora-rank", "2",
            "--sample-every", "0"] + extra
    cli_error(argv, capsys)


def test_read_prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("b cat\n\n  a dog  \nb cat\ncafé ☕ 東京\n\n", encoding="utf-8")
    assert sb.read_prompts(str(p)) == ["b cat", "a dog", "café ☕ 東京"]
    assert sb.read_prompts(None) == sb.DEMO_PROMPTS


def test_read_prompts_utf8_bom(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_text("a cat\na dog\n", encoding="utf-8-sig")
    assert sb.read_prompts(str(p)) == ["a cat", "a dog"]


# --------------------------------------------------------------------------------------------------
# Export and sampling


def test_export_loads_with_ours_and_diffusers(straight6):
    from diffusers import UNet2DConditionModel
    out, m = straight6
    x, ctx = inputs(seed=11)
    t = torch.tensor([999, 400])
    with torch.no_grad():
        want = m.student(x, t, ctx)
        assert torch.equal(load_unet(os.path.join(out, "unet"))(x, t, ctx), want)
        ema = load_unet(os.path.join(out, "unet_ema"))
        assert all(torch.equal(v, m.ema[k]) for k, v in ema.state_dict().items())
        assert not torch.equal(ema(x, t, ctx), want)
        ref = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).eval()
        assert rel_err(want, ref(x, t, encoder_hidden_states=ctx).sample) < 1e-4
    with open(os.path.join(out, "swiftbrush.json")) as f:
        info = json.load(f)
    assert info["param"] == "x0" and info["latent_shape"] == [4, 8, 8]


def test_sample_cli_writes_png(straight6, tmp_path, capsys):
    from PIL import Image
    out, _ = straight6
    png = tmp_path / "s.png"
    sample.main(["--student", out, "--teacher-steps", "2", "--prompt", "a cat", "--prompt", "a dog", "--n", "2",
                 "--out", str(png)])
    img = Image.open(png)
    img.load()
    assert img.size[0] > 32 and img.size[1] > 64  # 4 rows (student and teacher per prompt), 2 columns
    with pytest.raises(SystemExit) as e:
        sample.main(["--student", str(tmp_path), "--prompt", "x", "--out", str(png)])
    assert "swiftbrush.json" in str(e.value.code) and "\n" not in str(e.value.code)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers_scheduler(sd_root, sd_root_v, pred):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    root = sd_root if pred == "epsilon" else sd_root_v
    ours, schedule = load_unet(root), sb.read_schedule(root)
    ref = UNet2DConditionModel.from_pretrained(os.path.join(root, "unet")).eval()
    sched = DDIMScheduler.from_pretrained(os.path.join(root, "scheduler"))
    assert sched.config.prediction_type == pred
    z, ctx = inputs(seed=12)
    uncond = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(13))
    N, s = 4, 3.0
    sched.set_timesteps(N)
    assert sample.ddim_timesteps(schedule, N).tolist() == sched.timesteps.tolist()
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = ref(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.expand(2, -1, -1), ctx])).sample
            u, c = out.chunk(2)
            x = sched.step(u + s * (c - u), t, x, eta=0.0).prev_sample
        got = sample.ddim_sample(ours, schedule, ctx, uncond, z, steps=N, guidance=s)
    assert rel_err(x, got) < 1e-4


# --------------------------------------------------------------------------------------------------
# Text


def test_encode_prompts_matches_clip_by_hand(sd_root):
    from transformers import CLIPTextModel
    tok, enc = sb.load_text(sd_root)
    ref = CLIPTextModel.from_pretrained(os.path.join(sd_root, "text_encoder")).eval()
    L = tok.model_max_length
    prompts = ["a cat, 2", "a red sports car on a mountain road at sunset"]  # the second is truncated
    got = sb.encode_prompts(tok, enc, prompts, batch_size=1)
    ids = tok(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(got, ref(ids).last_hidden_state)
    # "" -> [BOS, EOS, PAD ...] with the tokenizer's own pad token (SD 2.x pads with "!", not EOS)
    tok.pad_token = "!"
    pad = tok.convert_tokens_to_ids("!")
    assert pad != tok.eos_token_id
    by_hand = torch.tensor([[tok.bos_token_id, tok.eos_token_id] + [pad] * (L - 2)])
    got = sb.encode_prompts(tok, enc, [""])
    with torch.no_grad():
        assert got.shape == (1, L, 32) and torch.equal(got, ref(by_hand).last_hidden_state)
        assert not torch.equal(got, ref(torch.tensor([[tok.bos_token_id] + [tok.eos_token_id] * (L - 1)])).last_hidden_state)


# ==================================================================================================
# 3. The miniature's world
# ==================================================================================================


@pytest.fixture(scope="module")
def real():
    images, captions, attrs = world.sample_world(240, seed=0)
    return images, captions, attrs, world.evaluate(images, captions)


# ------------------------------------------------------------------------------------------------------ world
def test_sample_world_deterministic_per_seed():
    a, ca, aa = world.sample_world(16, seed=5)
    b, cb, ab = world.sample_world(16, seed=5)
    c, _, _ = world.sample_world(16, seed=6)
    d, cd, _ = world.sample_world(16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and ca == cb and all(torch.equal(aa[k], ab[k]) for k in aa)
    assert torch.equal(a, d) and ca == cd
    assert not torch.equal(a, c)


def test_sample_world_invariants():
    images, captions, attrs = world.sample_world(300, seed=1)
    assert images.shape == (300, 3, 16, 16) and images.dtype == torch.float32
    assert images.abs().max() <= 0.7 + 1e-6  # data never saturates: clipping by a generator is measurable
    assert set(captions) == set(world.PROMPTS)  # every colour x shape occurs
    for cap, ci, si in zip(captions, attrs["color"].tolist(), attrs["shape"].tolist()):
        assert world.parse_caption(cap) == (ci, si)
    s = attrs["size"]
    assert s.min() >= 3 and s.max() <= 6
    for c in (attrs["cx"], attrs["cy"]):
        assert (c - s >= 0).all() and (c + s <= 16).all()  # the object lies fully inside
    # Every pixel is the prompt's colour blended over the 0 background: image = alpha * colour, alpha in [0, 1].
    colour = world.PALETTE[attrs["color"]][:, :, None, None]
    alpha = images[:, :1] / colour[:, :1]
    assert torch.allclose(images, alpha * colour, atol=1e-6) and alpha.min() >= 0 and alpha.max() <= 1 + 1e-6
    assert (images[:, :, 0, :] == 0).float().mean() > 0.5  # mostly plain grey background at the top edge


def test_coverage_matches_analytic_area():
    s = torch.tensor([3.0, 4.5, 6.0] * 3)
    shape = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    cov = world.render_coverage(shape, torch.full((9,), 8.0), torch.full((9,), 8.0), s).sum((1, 2))
    area = torch.stack([math.pi * s[:3] ** 2, 4 * s[3:6] ** 2, 2 * s[6:] ** 2]).flatten()
    assert torch.allclose(cov, area, rtol=0.05)


def test_prompts_fix_colour_and_shape_but_not_layout():
    prompts = world.PROMPTS * 2
    images, captions, attrs = world.sample_world(24, seed=3, prompts=prompts)
    _, _, free = world.sample_world(24, seed=3)
    assert captions == prompts
    assert torch.equal(attrs["cx"], free["cx"]) and torch.equal(attrs["size"], free["size"])
    assert world.evaluate(images, captions)["color_acc"] == 1.0


def test_parse_caption():
    assert len(world.PROMPTS) == 12 and len(set(world.PROMPTS)) == 12
    assert [world.parse_caption(p) for p in world.PROMPTS] == [(c, s) for c in range(4) for s in range(3)]
    assert world.parse_caption("A Blue  TRIANGLE") == (2, 2)
    for bad in ("a purple circle", "a red", "a red blue square"):
        with pytest.raises(ValueError):
            world.parse_caption(bad)


# ---------------------------------------------------------------------------------------------------- metrics
def test_real_samples_score_well(real):
    images, captions, attrs, r = real
    assert r["present"] == 1.0 and r["color_acc"] >= 0.95 and r["shape_acc"] >= 0.95
    assert r["clipped"] == 0.0 and r["bg_noise"] < 0.01
    assert r["pos_spread"] == pytest.approx(r["true_pos_spread"], rel=0.2)
    assert r["size_spread"] == pytest.approx(r["true_size_spread"], rel=0.2)
    assert 1.5 < r["true_pos_spread"] < 3 and 1 < r["true_size_spread"] < 2.5
    assert 0.1 < r["saturation"] < 0.25
    assert 0 <= r["fd"] < 0.3


def test_grey_and_noise_score_badly(real):
    images, captions, _, r = real
    grey = world.evaluate(torch.zeros_like(images), captions)
    assert grey["present"] == 0 and grey["color_acc"] == 0 and grey["shape_acc"] == 0
    assert grey["fd"] > 10 * r["fd"]
    g = torch.Generator().manual_seed(0)
    for noise in (torch.randn(images.shape, generator=g), torch.randn(images.shape, generator=g).clamp(-1, 1),
                  0.3 * torch.randn(images.shape, generator=g)):
        m = world.evaluate(noise, captions)
        # Noise puts many pixels near every palette colour, but scattered: no object may be found in it.
        assert m["present"] <= 0.02 and m["color_acc"] <= 0.02 and m["shape_acc"] <= 0.02
        assert m["bg_noise"] > 0.25 and m["fd"] > 10 * r["fd"]
    assert world.evaluate(torch.randn(images.shape, generator=g), captions)["clipped"] > 0.2


def test_metrics_follow_the_captions(real):
    images, captions, _, r = real
    idx = [world.PROMPTS.index(c) for c in captions]
    other_colour = [world.PROMPTS[(i + 3) % 12] for i in idx]
    other_shape = [world.PROMPTS[i // 3 * 3 + (i + 1) % 3] for i in idx]
    m = world.evaluate(images, other_colour)
    assert m["color_acc"] == 0 and m["present"] == 0
    m = world.evaluate(images, other_shape)
    assert m["color_acc"] >= 0.95 and m["shape_acc"] <= 0.05
    assert m["fd"] == pytest.approx(r["fd"])  # the feature space does not see captions


def test_detects_noise_saturation_and_collapse(real):
    images, captions, _, r = real
    noisy = world.evaluate(images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1)),
                           captions)
    assert noisy["color_acc"] >= 0.95 and 0.07 < noisy["bg_noise"] < 0.13 and noisy["fd"] > r["fd"]
    hot = world.evaluate((1.4 * images).clamp(-1, 1), captions)
    assert hot["clipped"] > 0.1 and hot["saturation"] > r["saturation"] and hot["fd"] > 3 * r["fd"]
    one, caps, _ = world.sample_world(12, seed=9, prompts=world.PROMPTS)  # one image per prompt, repeated
    rep = torch.arange(240) % 12
    collapsed = world.evaluate(one[rep], [caps[i] for i in rep])
    assert collapsed["color_acc"] == 1 and collapsed["pos_spread"] < 1e-3 and collapsed["size_spread"] < 1e-3
    assert collapsed["fd"] > 3 * r["fd"]


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    d, mu = 5, np.arange(5.0)
    assert world.frechet_distance(mu, np.eye(d), mu, np.eye(d)) == pytest.approx(0, abs=1e-9)
    # N(0, I) vs N(m, 4 I): |m|^2 + d (1 + 4 - 2 * 2)
    assert world.frechet_distance(np.zeros(d), np.eye(d), mu, 4 * np.eye(d)) == pytest.approx(30 + d)
    # Non-commuting covariances: tr sqrt(C1 C2) is the sum of the square roots of the eigenvalues of C1 C2.
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    c1, c2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    expect = np.trace(c1) + np.trace(c2) - 2 * np.sqrt(np.linalg.eigvals(c1 @ c2).real).sum()
    assert world.frechet_distance(mu, c1, mu, c2) == pytest.approx(expect, rel=1e-6)
    assert world.frechet_distance(mu, c1, mu, c2) == pytest.approx(world.frechet_distance(mu, c2, mu, c1), rel=1e-6)


def test_evaluate_is_fast(real):
    import time
    images, captions, _, _ = real
    t = time.perf_counter()
    world.evaluate(images[:200], captions[:200])
    assert time.perf_counter() - t < 3.0  # ~0.25 s on an idle 2-core CPU; loose so that machine load does not flake


# -------------------------------------------------------------------------------------------------- tokenizer
def test_write_tokenizer_round_trip(tmp_path):
    from transformers import CLIPTokenizer
    words = ["a", *world.COLORS, *world.SHAPES]
    info = world.write_tokenizer(tmp_path, words, max_length=16)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length == 16 and len(tok) == info["vocab_size"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert (bos, eos, tok.pad_token_id) == (info["bos_token_id"], info["eos_token_id"], info["eos_token_id"])
    assert eos == info["vocab_size"] - 1  # largest id: CLIPTextModel's legacy argmax pooling finds it
    ids = tok(["a red circle", ""], padding="max_length", max_length=16)["input_ids"]
    assert ids[0][:5] == [bos, ids[0][1], ids[0][2], ids[0][3], eos] and ids[0][5:] == [eos] * 11
    assert ids[1] == [bos] + [eos] * 15
    # Every vocabulary word is one distinct, known token.
    word_ids = {w: tok(w)["input_ids"] for w in words}
    assert all(len(v) == 3 and v[0] == bos and v[2] == eos for v in word_ids.values())
    singles = [v[1] for v in word_ids.values()]
    assert len(set(singles)) == len(words) and eos not in singles and bos not in singles
    assert tok("A  RED Circle")["input_ids"] == tok("a red circle")["input_ids"]  # lower-casing, whitespace
    caps = [tok(p)["input_ids"] for p in world.PROMPTS]
    assert len({tuple(c) for c in caps}) == 12
    # An unknown word falls back to characters, not to unk.
    purple = tok("purple")["input_ids"][1:-1]
    assert len(purple) == 6 and eos not in purple
    assert tok.decode(ids[0], skip_special_tokens=True) == "a red circle"


# ---------------------------------------------------------------------------------------------------- pictures
def test_save_grid(tmp_path):
    red = world.PALETTE[0].view(1, 3, 1, 1).expand(3, 3, 16, 16)
    rows = [red, torch.zeros(5, 3, 16, 16)]
    sample.save_grid(rows, tmp_path / "g.png")
    img = Image.open(tmp_path / "g.png")
    assert img.size == (2 + 5 * (64 + 2), 2 + 2 * (64 + 2))  # 16 px upscaled x4, 2 px padding
    assert img.getpixel((2 + 32, 2 + 32)) == (217, 38, 38)  # (0.7 + 1) * 127.5 rounded, (-0.7 + 1) * 127.5
    assert img.getpixel((2 + 3 * 66 + 32, 2 + 32)) == (255, 255, 255)  # short row: empty cells stay white
    assert img.getpixel((2 + 32, 2 + 66 + 32)) == (128, 128, 128)
    labelled = sample.save_grid(rows, tmp_path / "l.png", labels=["red", "grey"])
    assert labelled.size[0] > img.size[0] and labelled.size[1] == img.size[1]
    sample.save_grid([torch.zeros(2, 3, 128, 128)], tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").size == (2 + 2 * 130, 2 + 130)  # large images are not upscaled


def test_save_plot(tmp_path):
    rng = np.random.default_rng(0)
    curves = {"loss": [(i, math.exp(-i / 100) + 0.1 * rng.standard_normal()) for i in range(300)],
              "fd": [(0, 3.0), (100, float("nan")), (200, 1.0)], "one": [(50, 0.5)], "none": []}
    sample.save_plot(curves, tmp_path / "p.png", "training", size=(500, 300))
    img = Image.open(tmp_path / "p.png").convert("RGB")
    assert img.size == (500, 300)
    pixels = set(map(tuple, np.asarray(img).reshape(-1, 3).tolist()))
    for colour in sample.PLOT_COLORS[:3]:
        assert colour in pixels  # each curve with data was drawn
    ma = sample._moving_average(np.arange(10.0), 3)
    assert np.allclose(ma[1:-1], np.arange(1.0, 9.0)) and ma[0] == 0.5


def test_miniature_quick_end_to_end_and_teacher_cache(tmp_path, capsys):
    import miniature
    out = str(tmp_path / "mini")
    sb.main(["--quick", "--out", out])
    for name in ("table.md", "results.json", "grid.png", "curves_student.png", "curves_lora.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    results = json.load(open(os.path.join(out, "results.json")))["results"]
    assert len(results) == 2 + len(miniature.METHODS)
    for r in results.values():
        assert 0 <= r["metrics"]["color_acc"][0] <= 1 and math.isfinite(r["metrics"]["fd"][0])
    table = open(os.path.join(out, "table.md")).read()
    assert "SDS, x0 student" in table and "the world (truth)" in table and table in capsys.readouterr().out
    assert Image.open(os.path.join(out, "grid.png")).size[1] >= 64 * (3 + len(miniature.METHODS))

    teacher = os.path.join(out, "teacher")
    weights = os.path.join(teacher, "unet", "diffusion_pytorch_model.safetensors")
    mtime = os.path.getmtime(weights)
    miniature.build_teacher(teacher, quick=True, progress=False)  # intact: reused, not retrained
    assert os.path.getmtime(weights) == mtime and "cached" in capsys.readouterr().out
    assert not miniature.cached_teacher(teacher, miniature._recipe(quick=False))  # another recipe is stale
    with open(weights, "r+b") as f:  # corrupt one byte: the cache must not be trusted
        f.seek(os.path.getsize(weights) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    assert not miniature.cached_teacher(teacher, miniature._recipe(quick=True))
    miniature.build_teacher(teacher, quick=True, progress=False)
    assert "cached" not in capsys.readouterr().out
    assert miniature.cached_teacher(teacher, miniature._recipe(quick=True))
    load_unet(teacher)


def test_ctrl_c_saves_a_checkpoint_and_resumes(sd_root, tmp_path):
    import subprocess
    import signal
    import sys
    import time
    out = str(tmp_path / "run")
    argv = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(sb.__file__)), "swiftbrush.py"), "--model",
            sd_root, "--out", out, "--batch-size", "1", "--lora-rank", "2", "--sample-every", "0", "--device", "cpu"]
    proc = subprocess.Popen(argv + ["--steps", "100000"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted at step" in err and "Traceback" not in err
    with safe_open(os.path.join(out, "checkpoint.safetensors"), "pt") as f:
        step = int(f.metadata()["step"])
    assert step >= 2 and len(open(log).readlines()) == step
    assert os.path.exists(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    done = subprocess.run(argv + ["--steps", str(step + 1), "--resume"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(open(log).readlines()) == step + 1
