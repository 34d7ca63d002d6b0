"""SDXL in unet.py: the same blocks configured as SDXL, plus the micro-conditioning, against diffusers (the oracle)."""
import json

import pytest
import torch

import unet
from conftest import TOL, rel_err
from parity.configs import SDXL
from parity.test_sd import perturb, save_unet

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402

_XL_BLOCKS = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 2, 3], norm_num_groups=8,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8)
XL_SPECS = {  # pooled text 32 wide: 32 + 6 ids fit one context row (as SDXL's 1280 + 6 in 2048), or take three
    "one_row": dict(_XL_BLOCKS, cross_attention_dim=48, projection_class_embeddings_input_dim=32 + 6 * 8),
    "three_rows": dict(_XL_BLOCKS, cross_attention_dim=16, projection_class_embeddings_input_dim=32 + 6 * 8),
}


def xl_inputs(config, batch=2, seed=1):
    """(x, states, pooled, time_ids): the ids as SDXL's pipeline makes them, (h, w, top, left, h, w) in pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    states = torch.randn(batch, 5, config["cross_attention_dim"], generator=g)
    pooled = torch.randn(batch, 32, generator=g)
    time_ids = torch.tensor([[1024., 1024., 0., 0., 1024., 1024.], [768., 1344., 64., 0., 832., 1216.]][:batch])
    return x, states, pooled, time_ids


@pytest.fixture(scope="module", params=sorted(XL_SPECS))
def xl_pair(request, tmp_path_factory):
    config = XL_SPECS[request.param]
    folder = str(tmp_path_factory.mktemp(f"sdxl_{request.param}"))
    return save_unet(folder, config), unet.load_unet(folder), config


def _run_both(ref, ours, config, t):
    """Each model's output for the same inputs, and the pooled embedding each was given (leaves that want grad)."""
    x, states, pooled, time_ids = xl_inputs(config)
    p_ref, p_ours = pooled.clone().requires_grad_(True), pooled.clone().requires_grad_(True)
    want = ref(x, t, encoder_hidden_states=states, added_cond_kwargs={"text_embeds": p_ref, "time_ids": time_ids})
    got = ours(x, t, unet.sdxl_context(states, p_ours, time_ids))
    return want.sample, got, (p_ref, p_ours)


def test_sdxl_unet_forward_matches_diffusers(xl_pair):
    ref, ours, config = xl_pair
    with torch.no_grad():
        for t in (torch.tensor([10, 980]), 500):
            want, got, _ = _run_both(ref, ours, config, t)
            assert want.abs().max() > 1e-2
            assert rel_err(want, got) < TOL, f"t={t}: rel err {rel_err(want, got):.2e}"
        # the micro-conditioning reaches the output: other ids, another image
        x, states, pooled, time_ids = xl_inputs(config)
        a = ours(x, 500, unet.sdxl_context(states, pooled, time_ids))
        b = ours(x, 500, unet.sdxl_context(states, pooled, time_ids.flip(0)))
        assert rel_err(a, b) > 1e-3


def test_sdxl_unet_gradients_match_diffusers(xl_pair):
    ref, ours, config = xl_pair
    w = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ref.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    want, got, (p_ref, p_ours) = _run_both(ref, ours, config, torch.tensor([3, 640]))
    ((want + got) * w).sum().backward()  # one backward, two disjoint graphs
    assert rel_err(p_ref.grad, p_ours.grad) < TOL  # through add_embedding to the pooled text embedding
    g_ref, g = dict(ref.named_parameters()), dict(ours.named_parameters())
    for n in ("add_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight",
              "down_blocks.2.attentions.1.transformer_blocks.2.attn2.to_k.weight",
              "mid_block.attentions.0.proj_out.weight"):
        assert g_ref[n].grad.abs().max() > 0, n
        assert rel_err(g_ref[n].grad, g[n].grad) < TOL, f"{n}: rel err {rel_err(g_ref[n].grad, g[n].grad):.2e}"


def test_sdxl_context_round_trip():
    states, pooled, time_ids = torch.randn(3, 77, 16), torch.randn(3, 32), torch.rand(3, 6) * 2048
    packed = unet.sdxl_context(states, pooled, time_ids)
    assert packed.shape == (3, 77 + 3, 16)  # 32 + 6 values in rows of 16
    back = unet.split_sdxl_context(packed, 32)
    for a, b in zip((states, pooled, time_ids), back):
        assert torch.equal(a, b)


def test_full_size_sdxl_unet_keys_and_shapes():
    with torch.device("meta"):
        ref = UNet2DConditionModel(**SDXL)
        ours = unet.UNet(json.loads(json.dumps(SDXL)))  # as read from config.json
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {k for k in want if want[k] != got[k]} == set()
    n = sum(p.numel() for p in ours.parameters())
    assert abs(n - 2567.5e6) < 1e6, n  # SDXL base's 2.6 B UNet parameters
    assert got["add_embedding.linear_1.weight"] == (4 * 320, 2816)  # to the time embedding's width, 4 x 320
    assert ours.up_blocks[0].attentions[0].transformer_blocks.__len__() == 10  # up path reversed: 10, 2
    assert len(ours.mid_block.attentions[0].transformer_blocks) == 10
