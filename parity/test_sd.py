"""Stable Diffusion from scratch: parity of unet.py / vae.py with diffusers (the oracle) and the loader's errors.

Every parameter of an oracle model is perturbed before saving: diffusers zero-initialises some output convs, which
would hide wiring bugs behind them."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import unet
import vae
from conftest import TOL, rel_err
from parity.configs import SD15, SD21, SD21_BASE, SD_VAE

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402


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
    ({"addition_embed_type": "text_image"}, "addition_embed_type"),
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
