"""SDXL end to end on a tiny SDXL-shaped folder in the official layout (conftest's sdxl_root): its text, Algorithm 1
unchanged, resume, exports. The UNet's parity with diffusers is in parity/test_sdxl.py."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sample
import unet
from conftest import assert_same_ckpt, rel_err, run
from formats.export import export_one_step
from formats.text import load_text
from unet import load_unet

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


# --------------------------------------------------------------------------------------------------
# Algorithm 1 unchanged: the same loop trains, resumes and exports an SDXL student

STUDENTS = {"vsd": dict(loss="vsd"), "sds": dict(loss="sds"), "vsd-lora": dict(loss="vsd", student_lora=4),
            "vsd-k2": dict(loss="vsd", student_steps=2)}


@pytest.mark.parametrize("student", sorted(STUDENTS))
def test_sdxl_student_trains_and_resumes_exactly(sdxl_root, tmp_path, student, capsys):
    kw = {**STUDENTS[student], "diagnose_every": 1}  # the LoRA teacher's and the teacher's scores logged too
    m, state, log = run(sdxl_root, tmp_path / "straight", 3, **kw)
    assert "model: SDXL; the settings are the authors' for SD 2.1-base" in capsys.readouterr().out
    assert len(log) == 3 and all(np.isfinite(row["loss_student"]) and row["grad_norm_student"] > 0 for row in log[1:])
    assert m.latent_shape == (4, 8, 8) and m.embeddings[:1].shape == (1, 16 + 1, 128)  # 16 tokens + the row
    teacher = load_unet(sdxl_root)
    trained = m.student.state_dict() if not kw.get("student_lora") else None
    if trained is not None:  # the micro-conditioning's weights train with the rest
        key = "add_embedding.linear_1.weight"
        assert not torch.equal(trained[key], teacher.state_dict()[key])
    run(sdxl_root, tmp_path / "resumed", 2, **kw)
    run(sdxl_root, tmp_path / "resumed", 3, **kw)
    assert_same_ckpt(tmp_path / "straight" / "checkpoint.safetensors", tmp_path / "resumed" / "checkpoint.safetensors")


def sample_args(student=None, model=None, teacher_steps=0):
    return SimpleNamespace(student=student and str(student), model=model, prediction_type=None, n=2, seed=0,
                           teacher_steps=teacher_steps, student_steps=None, prompt=["a red circle", "a blue square"],
                           guidance=4.5, ema=True, device="cpu", resolution=None, lora_strength=1.0)


def test_sdxl_export_is_a_stable_diffusion_xl_pipeline_whose_one_step_is_ours(sdxl_root, tmp_path):
    """Trained at --resolution 32 (the model's own: 16), the student learns the ids of 32 px; its exported pipeline
    makes 32 px by default, conditioned on those ids, and its one step is sample.py's image from the same noise."""
    from diffusers import StableDiffusionXLPipeline
    m, _, _ = run(sdxl_root, tmp_path, 2, resolution=32)
    assert m.latent_shape == (4, 16, 16)
    assert unet.split_sdxl_context(m.embeddings[:1], 64)[2].tolist() == [[32, 32, 0, 0, 32, 32]]
    assert export_one_step(str(tmp_path))
    ours = sample.generate(sample_args(tmp_path))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "export" / "pipeline"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.force_zeros_for_empty_prompt
    for i, prompt in enumerate(["a red circle", "a blue square"]):
        z = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(i))  # sample.py's noise
        theirs = pipe(prompt, num_inference_steps=1, guidance_scale=0, latents=z, num_images_per_prompt=2,
                      output_type="pt").images  # its default size
        assert pipe.scheduler.timesteps.tolist() == [999] and theirs.shape[-1] == 32
        assert rel_err(ours[i][0], theirs * 2 - 1) < 1e-4


def test_sdxl_teacher_ddim_with_cfg_is_diffusers_pipeline(sdxl_root):
    """sample.py's teacher (DDIM + CFG against the zero unconditional branch) is StableDiffusionXLPipeline's."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    ours = sample.generate(sample_args(model=sdxl_root, teacher_steps=3))
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_root, local_files_only=True)
    # SDXL's Euler config says neither: DDIMScheduler's defaults would clip the latents to [-1, 1] and end at abar = 1;
    # sample.py's DDIM reads the config as SD's DDIM configs say them (no clipping, abar_0 at the end)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    pipe.set_progress_bar_config(disable=True)
    for i, prompt in enumerate(["a red circle", "a blue square"]):
        z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(i))
        theirs = pipe(prompt, num_inference_steps=3, guidance_scale=4.5, latents=z, num_images_per_prompt=2,
                      output_type="pt").images
        assert rel_err(ours[i][0], theirs * 2 - 1) < 1e-4


def test_sdxl_lora_student_file_in_diffusers_is_our_one_step_student(sdxl_root, tmp_path):
    """The LoRA student's file (kohya's layout) on SDXL's pipeline via diffusers' load_lora_weights: our student's
    image from the same noise; at strength 0 the teacher's own one step."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    run(sdxl_root, tmp_path, 2, student_lora=4)
    assert export_one_step(str(tmp_path))
    file = tmp_path / "export" / "student-lora.safetensors"
    ours, teacher_one_step = sample.generate(sample_args(tmp_path)), sample.generate(sample_args(sdxl_root))
    from_file = sample.generate(sample_args(file, sdxl_root))  # sample.py applies the file to the teacher
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "export" / "pipeline"), local_files_only=True)
    pipe.unet = UNet2DConditionModel.from_pretrained(sdxl_root, subfolder="unet")  # the teacher's, then the LoRA
    pipe.load_lora_weights(str(file))
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    for scale, want in ((1.0, ours), (0.0, teacher_one_step)):
        theirs = pipe("a red circle", num_inference_steps=1, guidance_scale=0, latents=z, num_images_per_prompt=2,
                      output_type="pt", cross_attention_kwargs={"scale": scale}).images
        assert rel_err(want[0][0], theirs * 2 - 1) < 1e-4, scale
    assert rel_err(ours[0][0], from_file[0][0]) < 1e-5
    assert rel_err(ours[0][0], teacher_one_step[0][0]) > 1e-3  # the LoRA changes the image


def test_sdxl_hub_id_is_read_with_both_text_encoders(sdxl_root):
    """A hub id's files: both text encoders and tokenizers; its cached snapshot is whole only with both."""
    import shutil
    from pathlib import Path
    from huggingface_hub import constants
    from formats import models
    names = sorted(str(p.relative_to(sdxl_root)) for p in Path(sdxl_root).rglob("*") if p.is_file())
    wanted = models.hub_files("someone/tiny-sdxl", names)
    assert {"text_encoder_2/model.safetensors", "text_encoder_2/config.json", "tokenizer_2/tokenizer.json",
            "tokenizer/tokenizer.json", "model_index.json"} <= set(wanted)
    commit = "0123456789abcdef0123456789abcdef01234567"
    cached = os.path.join(constants.HF_HUB_CACHE, "models--someone--tiny-sdxl")
    shutil.copytree(sdxl_root, os.path.join(cached, "snapshots", commit))
    os.makedirs(os.path.join(cached, "refs"))
    with open(os.path.join(cached, "refs", "main"), "w") as f:
        f.write(commit)
    folder = models.resolve_model("someone/tiny-sdxl")
    assert folder.endswith(commit) and load_text(folder).sdxl
    os.remove(os.path.join(folder, "text_encoder_2", "model.safetensors"))  # half a snapshot: fetched again,
    with pytest.raises(unet.WeightsError, match="hub cache"):             # offline here: one line
        models.resolve_model("someone/tiny-sdxl")


def test_a_part_from_another_model_gets_one_line(sdxl_root, sd_root, tmp_path, capsys):
    """An SDXL folder without its second text encoder, or with SD's: one line, before any training."""
    import shutil
    from conftest import cli_args, cli_error
    for name, change in (("no-bigG", lambda root: shutil.rmtree(root / "text_encoder_2")),
                         ("sd-text", lambda root: (shutil.rmtree(root / "text_encoder"),
                                                   shutil.copytree(os.path.join(sd_root, "text_encoder"),
                                                                   root / "text_encoder")))):
        root = tmp_path / name
        shutil.copytree(sdxl_root, root)
        change(root)
        line = cli_error(cli_args(str(root), tmp_path / f"run-{name}", 1), capsys)
        assert "is a part from another model" in line and not (tmp_path / f"run-{name}").exists(), line
