"""Single files in, one-step models out: --model FILE.safetensors trains like the folder it came from, and the
exports (pipeline folder, single files) give our sample.py image in diffusers and in sample.py. diffusers is the
oracle; the hub is a temporary cache (conftest: offline)."""
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import sample
import swiftbrush as sb
from conftest import CPU, assert_same_ckpt, cli, cli_error, read_log, rel_err, run
from formats.export import export_one_step
from formats.models import CLIP_TOKENIZER, resolve_model
from formats.text import load_text
from formats.single_file import LDM_SCHEDULE, file_metadata, read_single_file, write_single_file
from parity.tiny_sd import make_tiny_sd
from unet import load_unet
from vae import load_vae

RUN = ["--steps", "2", "--batch-size", "1", "--lora-rank", "2", "--lora-alpha", "2", "--lr", "1e-3",
       "--save-every", "0", "--sample-every", "0", "--resolution", "16", "--prompts", "demo"]  # SD's 512 otherwise


def folder_as_single_file(root, path):
    """A diffusers folder written as one original-layout file, the way A1111 users hold SD."""
    text = load_text(root).encoders[0]
    family = "sd1" if text.config.hidden_act == "quick_gelu" else "sd2"
    write_single_file(path, load_unet(root).state_dict(), load_vae(os.path.join(root, "vae")).state_dict(),
                      text.state_dict(), family)
    return str(path)


def place_tokenizer_in_hub_cache(tokenizer_dir):
    from huggingface_hub import constants
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    cached = os.path.join(constants.HF_HUB_CACHE, "models--" + CLIP_TOKENIZER.replace("/", "--"))
    shutil.copytree(tokenizer_dir, os.path.join(cached, "snapshots", commit))
    os.makedirs(os.path.join(cached, "refs"), exist_ok=True)
    with open(os.path.join(cached, "refs", "main"), "w") as f:
        f.write(commit)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny SD 1-sized folder, the same as a single file, and a 2-step run trained from the file (exported), with
    the CLIP tokenizer in the hub cache as a user who fetched it once has it."""
    base = tmp_path_factory.mktemp("single")
    root = make_tiny_sd(str(base / "sd1"), family="sd1")
    os.makedirs(base / "files")
    path = folder_as_single_file(root, base / "files" / "tiny-v1.safetensors")
    place_tokenizer_in_hub_cache(os.path.join(root, "tokenizer"))
    with pytest.MonkeyPatch.context() as mp:
        said = []
        mp.setattr("builtins.print", lambda *a, **k: said.append(" ".join(map(str, a))))
        cli(["--model", path, "--out", str(base / "run")] + RUN)
    return SimpleNamespace(root=root, file=path, run=base / "run", said="\n".join(said))


def test_single_file_model_trains_and_exports(sd1):
    assert "prediction type epsilon (assumed" in sd1.said and "export: " in sd1.said
    folder = json.load(open(sd1.run / "swiftbrush.json"))["folder"]
    for sub in ("unet", "vae"):  # unpacked exactly
        a = load_file(os.path.join(sd1.root, sub, "diffusion_pytorch_model.safetensors"))
        b = load_file(os.path.join(folder, sub, "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    text = load_text(sd1.root)
    tok, enc = text.tokenizers[0], text.encoders[0]
    ids = tok(["a red circle"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert torch.equal(enc(ids).last_hidden_state, load_text(folder).encoders[0](ids).last_hidden_state)
    # the exported single file holds the EMA student and the teacher's VAE and text encoder, unchanged
    parts = read_single_file(sd1.run / "export" / "student.safetensors")
    ema = load_file(sd1.run / "unet_ema" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(parts["unet"][1][k], v) for k, v in ema.items()) and parts["unet"][1].keys() == ema.keys()
    teacher = load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    assert not torch.equal(ema["conv_out.weight"], teacher["conv_out.weight"])  # trained: not the teacher
    assert read_single_file(sd1.run / "export" / "student-unet.safetensors", full=False)["vae"] is None


def sample_args(student, model=None, lora_strength=1.0):
    return SimpleNamespace(student=str(student), model=model, prediction_type=None, n=2, seed=0, teacher_steps=0,
                           student_steps=None, prompt=["a red circle", "a blue square"], guidance=4.5, ema=True,
                           device="cpu", resolution=16, lora_strength=lora_strength)


def test_exported_pipeline_is_our_one_step_generator_in_diffusers(sd1):
    from diffusers import StableDiffusionPipeline
    ours = sample.generate(sample_args(sd1.run))
    pipe = StableDiffusionPipeline.from_pretrained(str(sd1.run / "export" / "pipeline"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for i, prompt in enumerate(["a red circle", "a blue square"]):
        z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(i))  # sample.py's noise at 16 px
        theirs = pipe(prompt, num_inference_steps=1, guidance_scale=0, latents=z, num_images_per_prompt=2,
                      height=16, width=16, output_type="pt").images
        assert pipe.scheduler.timesteps.tolist() == [999]
        assert rel_err(ours[i][0], theirs * 2 - 1) < 1e-4


def test_sample_takes_every_form_of_the_student(sd1, capsys):
    export, folder = sd1.run / "export", json.load(open(sd1.run / "swiftbrush.json"))["folder"]
    ours = torch.cat([x for x, _ in sample.generate(sample_args(sd1.run))])
    for student, model in ((export / "pipeline", None), (export / "student.safetensors", None),
                           (export / "student-unet.safetensors", sd1.file), (sd1.run / "unet_ema", folder)):
        theirs = torch.cat([x for x, _ in sample.generate(sample_args(student, model))])
        assert rel_err(ours, theirs) < 1e-6, student
    with pytest.raises(SystemExit) as e:
        sample.main(["--student", str(export / "student-unet.safetensors"), "--prompt", "a red circle"])
    assert "UNet alone: pass --model" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        sample.main(["--student", os.path.dirname(sd1.file), "--prompt", "a red circle"])
    assert "not a swiftbrush.py run (no swiftbrush.json), an export of one" in str(e.value.code)


def test_sd2_file_unpacks_with_its_tokenizer_and_prediction_type(tmp_path, capsys):
    root = make_tiny_sd(str(tmp_path / "sd2"), family="sd2")
    path = folder_as_single_file(root, tmp_path / "v2.safetensors")
    shutil.copytree(os.path.join(root, "tokenizer"), tmp_path / "tokenizer")  # a tokenizer folder beside the file
    eps, v = resolve_model(path), resolve_model(path, "v_prediction")
    assert eps != v and "prediction type v_prediction" in capsys.readouterr().out
    assert json.load(open(os.path.join(v, "scheduler", "scheduler_config.json")))["prediction_type"] == "v_prediction"
    config = json.load(open(os.path.join(v, "unet", "config.json")))
    assert config["upcast_attention"] and config["sample_size"] == 96 and config["use_linear_projection"]
    text = load_text(eps)
    tokenizer, encoder = text.tokenizers[0], text.encoders[0]
    assert tokenizer.pad_token == "!"  # SD 2 pads with "!", SD 1 with its end token
    ids = tokenizer(["a red circle"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert torch.equal(encoder(ids).last_hidden_state, load_text(root).encoders[0](ids).last_hidden_state)


def test_bad_single_files_get_one_line(sd1, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("formats.models.CLIP_TOKENIZER", "openai/never-fetched")  # offline: not in the hub cache
    line = cli_error(["--model", sd1.file, "--prediction-type", "v_prediction", "--out", str(tmp_path / "out")] + RUN,
                     capsys)
    assert "tokenizer" in line and "openai/never-fetched" in line and "hf download" in line
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    pickled = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": SimpleNamespace()}}, pickled)
    for model, words in ((str(tmp_path / "missing.safetensors"), "not found"), (str(lora), "LoRA"),
                         (str(pickled), "pickle")):
        line = cli_error(["--model", model, "--out", str(tmp_path / "out")] + RUN, capsys)
        assert words in line, line
    line = cli_error(["--model", sd1.root, "--prediction-type", "v_prediction", "--out", str(tmp_path / "o")] + RUN,
                     capsys)
    assert "single-file" in line
    narrow = make_tiny_sd(str(tmp_path / "narrow"))  # UNet blocks 32 and 64 wide: SD 2's 64-wide heads give 0.5
    path = str(tmp_path / "narrow.safetensors")
    write_single_file(path, load_unet(narrow).state_dict(), load_vae(os.path.join(narrow, "vae")).state_dict(),
                      load_text(narrow).encoders[0].state_dict(), "sd2")
    line = cli_error(["--model", path, "--out", str(tmp_path / "out")] + RUN, capsys)
    assert "UNet block widths [32, 64] do not split into SD's heads (32 / 64 = 0.5)" in line
    assert "not Stable Diffusion 1.x/2.x-shaped" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_export_command_raw_and_what_it_refuses(sd1, tmp_path, capsys):
    from formats import export
    export.main([str(sd1.run), "--raw"])  # any run's checkpoint, the student as trained
    raw = load_file(sd1.run / "unet" / "diffusion_pytorch_model.safetensors")
    written = read_single_file(sd1.run / "export-raw" / "student-unet.safetensors", full=False)["unet"][1]
    assert written.keys() == raw.keys() and all(torch.equal(written[k], v) for k, v in raw.items())
    eps_run = tmp_path / "eps"
    shutil.copytree(sd1.run, eps_run, ignore=shutil.ignore_patterns("export*"))
    info = json.load(open(eps_run / "swiftbrush.json"))
    json.dump({**info, "param": "eps"}, open(eps_run / "swiftbrush.json", "w"))
    assert export.export_one_step(str(eps_run)) is None and "eps student" in capsys.readouterr().out
    assert not (eps_run / "export").exists()
    with pytest.raises(SystemExit) as e:
        export.main([str(tmp_path)])
    assert "not a swiftbrush.py output folder" in str(e.value.code)


def test_a_v_prediction_students_exports_say_so(tmp_path):
    root = make_tiny_sd(str(tmp_path / "v"), family="sd1", pred="v_prediction")
    run = tmp_path / "run"
    cli(["--model", root, "--out", str(run)] + RUN)
    exported = run / "export" / "student.safetensors"
    assert read_single_file(exported)["unet"] and file_metadata(exported)["prediction_type"] == "v_prediction"
    ours = torch.cat([x for x, _ in sample.generate(sample_args(run))])
    theirs = torch.cat([x for x, _ in sample.generate(sample_args(exported))])  # no --prediction-type needed
    assert rel_err(ours, theirs) < 1e-6


def test_a_run_survives_its_unpacked_teacher_being_deleted_and_export_needs_a_checkpoint(sd1, tmp_path, capsys):
    ours = torch.cat([x for x, _ in sample.generate(sample_args(sd1.run))])
    shutil.rmtree(json.load(open(sd1.run / "swiftbrush.json"))["folder"])  # the cache was cleared
    assert rel_err(ours, torch.cat([x for x, _ in sample.generate(sample_args(sd1.run))])) < 1e-6
    early = tmp_path / "early"  # a run killed before its first checkpoint: swiftbrush.json, no unet/ yet
    os.makedirs(early)
    shutil.copy(sd1.run / "swiftbrush.json", early / "swiftbrush.json")
    with pytest.raises(SystemExit) as e:
        from formats import export
        export.main([str(early)])
    assert "no exported student yet" in str(e.value.code) and os.listdir(early) == ["swiftbrush.json"]


def test_an_fp16_teacher_gives_fp16_single_files(sd1, tmp_path):
    root = str(tmp_path / "fp16")
    shutil.copytree(sd1.root, root)
    weights = os.path.join(root, "unet", "diffusion_pytorch_model.safetensors")
    save_file({k: v.half() for k, v in load_file(weights).items()}, weights)
    cli(["--model", root, "--out", str(tmp_path / "run")] + RUN)
    export = tmp_path / "run" / "export"
    written = load_file(export / "student.safetensors")
    assert {v.dtype for k, v in written.items() if k not in LDM_SCHEDULE and "position_ids" not in k} == {torch.float16}
    assert {written[k].dtype for k in LDM_SCHEDULE} == {torch.float32}  # as ldm holds them: A1111 samples with them
    assert {v.dtype for v in load_file(export / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").values()} \
        == {torch.float32}  # the pipeline keeps the trained fp32 weights: sample.py's image to 1e-4


# --------------------------------------------------------------------------------------------------
# Beyond the paper: a K-step student's exports, and --student-init from every form of a student


def test_k_step_student_resumes_exactly_and_its_pipeline_samples_our_k_steps(sd1, tmp_path):
    from diffusers import StableDiffusionPipeline
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(sd1.root, straight, 4, student_steps=2, diagnose_every=2, sample_every=2)  # the diagnostics in 2 steps
    run(sd1.root, resumed, 2, student_steps=2, diagnose_every=2, sample_every=2)
    run(sd1.root, resumed, 4, student_steps=2, diagnose_every=2, sample_every=2)
    assert_same_ckpt(straight / "checkpoint.safetensors", resumed / "checkpoint.safetensors")
    assert read_log(straight) == read_log(resumed) and "mse_phi_t500" in read_log(straight)[-1]
    assert (straight / "samples" / "step_000004.png").exists()
    export = Path(export_one_step(str(straight)))
    ours = sample.generate(sample_args(straight))
    assert [label for _, label in ours] == ["a red circle (2 steps)", "a blue square (2 steps)"]
    pipe = StableDiffusionPipeline.from_pretrained(str(export / "pipeline"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    for i, prompt in enumerate(["a red circle", "a blue square"]):  # z, then eps': drawn by the pipeline itself
        theirs = pipe(prompt, num_inference_steps=2, guidance_scale=0, generator=torch.Generator().manual_seed(i),
                      num_images_per_prompt=2, height=16, width=16, output_type="pt").images
        assert pipe.scheduler.timesteps.tolist() == [999, 499]
        assert rel_err(ours[i][0], theirs * 2 - 1) < 1e-4
    said = file_metadata(export / "student.safetensors")
    assert said["student_steps"] == "2" and json.loads(said["student_timesteps"]) == [999, 499]
    for form in (export / "pipeline", export / "student.safetensors"):  # each says its K
        theirs = sample.generate(sample_args(form))
        assert all(rel_err(a, b) < 1e-6 for (a, _), (b, _) in zip(ours, theirs)), form
    one_step = sample.generate(SimpleNamespace(**{**vars(sample_args(straight)), "student_steps": 1}))
    assert rel_err(ours[0][0], one_step[0][0]) > 1e-3 and one_step[0][1] == "a red circle (1 step)"


def test_lcm_timesteps_are_diffusers_lcm_schedulers_and_the_export_says_where_they_differ(sd1, tmp_path, capsys):
    from diffusers import LCMScheduler
    from formats.export import lcm_timesteps
    for T in (1000, 1024):
        for steps in range(2, 13):
            lcm = LCMScheduler(num_train_timesteps=T, original_inference_steps=steps)
            lcm.set_timesteps(steps)
            assert lcm_timesteps(T, steps) == lcm.timesteps.tolist(), (T, steps)
    run(sd1.root, tmp_path / "k3", 1, student_steps=3)
    capsys.readouterr()
    export_one_step(str(tmp_path / "k3"))
    said = capsys.readouterr().out
    assert "[998, 665, 332]" in said and "timesteps=[999, 666, 332]" in said


def test_student_init_from_a_run_an_export_and_a_single_file_trains(sd1, tmp_path, capsys):
    ema = load_file(sd1.run / "unet_ema" / "diffusion_pytorch_model.safetensors")
    export = sd1.run / "export"
    for i, init in enumerate((sd1.run, export / "pipeline", export / "student.safetensors",
                              export / "student-unet.safetensors")):
        m = sb.load_models(sb.Config(model=sd1.root, student_init=str(init), resolution=16, prompts="demo"), CPU)
        assert all(torch.equal(v, ema[k]) for k, v in m.student.state_dict().items()), init  # the student's start
        assert m.student_schedule is m.schedule  # the same prediction type as the teacher's
        if i < 3:
            out = tmp_path / f"run{i}"
            cli(["--model", sd1.root, "--student-init", str(init), "--out", str(out)] + RUN)
            assert len(read_log(out)) == 2 and json.load(open(out / "swiftbrush.json"))["config"]["student_init"]
    line = cli_error(["--model", sd1.root, "--student-init", make_tiny_sd(str(tmp_path / "other")),
                      "--out", str(tmp_path / "mismatch")] + RUN, capsys)
    assert "--student-init" in line and "not the teacher's UNet architecture" in line
    assert not (tmp_path / "mismatch").exists()


def test_a_student_started_from_a_v_model_keeps_its_prediction_type_everywhere(sd1, tmp_path):
    from diffusers import StableDiffusionPipeline
    v = str(tmp_path / "v")
    shutil.copytree(sd1.root, v)  # the same network, declared v-prediction: as SD-Turbo may differ from its teacher
    with open(os.path.join(v, "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(v, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({**config, "prediction_type": "v_prediction"}, f)
    m = sb.load_models(sb.Config(model=sd1.root, student_init=v, resolution=16, prompts="demo"), CPU)
    assert (m.schedule.prediction_type, m.student_schedule.prediction_type) == ("epsilon", "v_prediction")
    run = tmp_path / "run"
    cli(["--model", sd1.root, "--student-init", v, "--out", str(run)] + RUN)
    assert json.load(open(run / "swiftbrush.json"))["student_prediction_type"] == "v_prediction"
    export = run / "export"
    assert file_metadata(export / "student.safetensors")["prediction_type"] == "v_prediction"
    ours = sample.generate(sample_args(run))
    for form in (export / "pipeline", export / "student.safetensors"):
        theirs = sample.generate(sample_args(form))
        assert all(rel_err(a, b) < 1e-6 for (a, _), (b, _) in zip(ours, theirs)), form
    pipe = StableDiffusionPipeline.from_pretrained(str(export / "pipeline"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    theirs = pipe("a red circle", num_inference_steps=1, guidance_scale=0, latents=z, num_images_per_prompt=2,
                  height=16, width=16, output_type="pt").images
    assert rel_err(ours[0][0], theirs * 2 - 1) < 1e-4


@pytest.fixture(scope="module")
def lora_run(sd1, tmp_path_factory):
    """A 2-step LoRA student (rank 4) of the tiny SD 1 folder, exported."""
    out = tmp_path_factory.mktemp("lora") / "run"
    cli(["--model", sd1.root, "--out", str(out), "--student-lora", "4"] + RUN)
    return out


def test_the_lora_file_in_diffusers_is_our_one_step_student(sd1, lora_run):
    """diffusers' load_lora_weights reads the exported student-lora.safetensors (kohya's layout) onto the teacher's
    pipeline: with the exported one-step scheduler it gives our student's image from the same noise, within 1e-4;
    at strength 0 the teacher's own one step. The file has an adapter on every Linear and Conv2d of the blocks."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    file = lora_run / "export" / "student-lora.safetensors"
    tensors = load_file(file)
    assert any(k.endswith("resnets_0_conv1.lora_down.weight") for k in tensors) and any(
        k.endswith("time_emb_proj.alpha") for k in tensors) and all(k.startswith("lora_unet_") for k in tensors)
    ours = sample.generate(sample_args(lora_run))
    teacher_one_step = sample.generate(sample_args(sd1.root))
    pipe = StableDiffusionPipeline.from_pretrained(str(lora_run / "export" / "pipeline"), local_files_only=True)
    pipe.unet = UNet2DConditionModel.from_pretrained(sd1.root, subfolder="unet")  # the teacher's, then the LoRA
    pipe.load_lora_weights(str(file))
    loaded = [n for n, module in pipe.unet.named_modules() if "default_0" in getattr(module, "lora_A", {})]
    assert len(loaded) == len({k.rsplit(".", 2)[0] for k in tensors if k.endswith(".alpha")})  # every layer read
    pipe.set_progress_bar_config(disable=True)
    for i, prompt in enumerate(["a red circle", "a blue square"]):
        z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(i))  # sample.py's noise at 16 px
        for scale, want in ((1.0, ours), (0.0, teacher_one_step)):
            theirs = pipe(prompt, num_inference_steps=1, guidance_scale=0, latents=z, num_images_per_prompt=2,
                          height=16, width=16, output_type="pt", cross_attention_kwargs={"scale": scale}).images
            assert rel_err(want[i][0], theirs * 2 - 1) < 1e-4, (prompt, scale)
    assert rel_err(ours[0][0], teacher_one_step[0][0]) > 1e-3  # the LoRA changes the image


def test_sample_applies_the_lora_file_to_any_model_of_the_architecture(sd1, lora_run, capsys):
    """sample.py --student student-lora.safetensors --model M: the run's own student on its teacher (the merged
    unet_ema/ of the run), a finetune's at any strength, and one line without --model."""
    file = str(lora_run / "export" / "student-lora.safetensors")
    run_student = torch.cat([x for x, _ in sample.generate(sample_args(lora_run))])
    from_file = torch.cat([x for x, _ in sample.generate(sample_args(file, sd1.root))])
    assert rel_err(run_student, from_file) < 1e-5
    with pytest.raises(SystemExit) as e:
        sample.main(["--student", file, "--prompt", "a red circle"])
    assert "is a LoRA: pass --model" in str(e.value.code)
