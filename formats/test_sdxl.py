"""SDXL end to end on a tiny SDXL-shaped folder in the official layout (conftest's sdxl_root): its text, Algorithm 1
unchanged, resume, exports. The UNet's parity with diffusers is in parity/test_sdxl.py."""
import pytest
import torch

import unet
from formats.text import load_text

diffusers = pytest.importorskip("diffusers")


def test_sdxl_text_equals_diffusers_encode_prompt(sdxl_root):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_root)
    prompts = ["a red circle", "a blue square at the top, small and far away from the others"]  # the second truncated
    want = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    states, uncond_states, pooled, uncond_pooled = want
    text = load_text(sdxl_root)
    got = unet.split_sdxl_context(text.encode(prompts), pooled.shape[-1])
    assert torch.equal(got[0], states) and torch.equal(got[1], pooled)
    assert states.shape[-1] == 128 and not torch.equal(got[0][0], got[0][1])
    # the micro-conditioning of the model's own size: (h, w, 0, 0, h, w), h = w = 8 latents x 2 (the VAE) = 16 px
    assert got[2].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    want_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32, pooled.shape[-1])
    assert torch.equal(got[2][:1], want_ids)
    # CFG's unconditional branch: zeros (force_zeros_for_empty_prompt), the ids as the prompt's
    u = unet.split_sdxl_context(text.uncond, pooled.shape[-1])
    assert torch.equal(u[0], uncond_states[:1]) and torch.equal(u[1], uncond_pooled[:1])
    assert u[0].abs().sum() == 0 and torch.equal(u[2], got[2][:1])
    # another training resolution: its ids
    assert unet.split_sdxl_context(load_text(sdxl_root, (32, 48)).encode(prompts[:1]), 64)[2].tolist() == [
        [32, 48, 0, 0, 32, 48]]


def test_sdxl_uncond_is_encoded_where_the_model_does_not_ask_for_zeros(sdxl_root, tmp_path):
    import json
    import shutil
    root = tmp_path / "xl"
    shutil.copytree(sdxl_root, root)
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    text = load_text(str(root))
    assert torch.equal(text.uncond, text.encode([""])) and text.uncond[:, :-1].abs().sum() > 0
