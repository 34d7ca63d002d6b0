"""The GPU recipe on the CPU: --precision bf16 (bf16 autocast, the fp32 student, gradient checkpointing), the
teacher's passes in --teacher-precision, fp32 sampling outside autocast, and the memory plan that decides
checkpointing and the EMA's place. Moved from test_swiftbrush.py, unchanged."""
import copy
import json
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import lora
import sample
import swiftbrush as sb
from conftest import BASE, CPU, assert_same_ckpt, inputs, rel_err, run, sd21_base_on_meta
from unet import load_unet

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("loss,param,teacher_precision,cosine", [
    ("vsd", "x0", None, 0.95), ("vsd", "eps", "bf16", None), ("sds", "x0", "bf16", 0.95), ("sds", "eps", None, 0.95)])
def test_bf16_recipe_trains_on_the_cpu(sd_root, tmp_path, loss, param, teacher_precision, cosine):
    """The teacher's weights fp32 by default, bf16 with --teacher-precision bf16, and never changed by training; the
    student's two steps go where the fp32 recipe's go: the cosine of the two changes of its weights (measured: 0.99).
    Not for VSD with a bf16 teacher (measured 0.19): its g, a small difference of two bf16 passes, is mostly rounding
    at a LoRA this young (docs/memory.md#precision); that case is asserted to train, not where to."""
    start = load_unet(sd_root).state_dict()
    teacher = load_unet(sd_root).to(sb.teacher_dtype(teacher_precision)).state_dict()
    m, state, log = run(sd_root, tmp_path / "bf16", 2, loss=loss, param=param, precision="bf16", checkpointing="on",
                        teacher_precision=teacher_precision)
    assert all(math.isfinite(r["loss_student"]) for r in log) and len(log) == 2
    assert all(p.dtype == torch.float32 for p in m.student.parameters())  # fp32 master weights
    assert m.student.gradient_checkpointing and m.teacher.gradient_checkpointing
    base = {k: v for k, v in m.teacher.state_dict().items() if ".lora_" not in k}
    assert base.keys() == teacher.keys() and all(torch.equal(v, teacher[k]) for k, v in base.items())
    fp32 = run(sd_root, tmp_path / "fp32", 2, loss=loss, param=param)[0]
    change = lambda student: torch.cat([(v - start[k]).flatten() for k, v in student.state_dict().items()])
    bf16_change, fp32_change = change(m.student), change(fp32.student)
    assert bf16_change.abs().max() > 0
    if cosine is not None:
        assert torch.nn.functional.cosine_similarity(bf16_change, fp32_change, dim=0) > cosine


def test_checkpointing_auto_follows_the_plan(sd_root, tmp_path, monkeypatch):
    """--checkpointing auto: off on the CPU (no device memory to plan); with a (faked) device total, on only where the
    states and the activations without it would not fit, and the EMA on the device only where it fits too."""
    from memory import plan as memory
    m, state, _ = run(sd_root, tmp_path / "cpu", 1, precision="bf16")
    assert not m.student.gradient_checkpointing and state["plan"]["device memory"] is None
    for total, on, ema_on_device in ((1e-4, True, False), (100.0, False, True)):
        monkeypatch.setattr(memory, "device_memory_gb", lambda device: total)
        m, state, _ = run(sd_root, tmp_path / str(total), 1)
        assert m.student.gradient_checkpointing == m.teacher.gradient_checkpointing == on
        plan = json.load(open(tmp_path / str(total) / "memory.json"))
        assert (plan["checkpointing"], plan["EMA on the device"]) == (on, ema_on_device)
        assert ("EMA of the student" in plan["device"]) == ema_on_device
    m, _, _ = run(sd_root, tmp_path / "off", 1, checkpointing="off")  # the flag over the plan
    assert not m.student.gradient_checkpointing
    acts = state["plan"]["activations (estimate)"]
    assert 0 < acts["on"] < acts["off"]


def test_checkpointing_may_change_on_resume_and_changes_nothing(sd_root, straight6, tmp_path):
    run(sd_root, tmp_path, 3, checkpointing="on")
    run(sd_root, tmp_path, 6)  # auto, here off: accepted (a memory choice, not the maths), and bit-identical
    assert_same_ckpt(os.path.join(straight6[0], "checkpoint.safetensors"), tmp_path / "checkpoint.safetensors")



def test_teacher_passes_run_in_the_teachers_precision_whatever_the_autocast(sd_root):
    """Under the bf16 recipe's autocast, --teacher-precision fp32's eps_psi and eps_phi run without autocast and TF32
    (g bit-identical to fp32's, the TF32 flags restored after); the default (tf32) allows TF32 (CUDA's: on the CPU
    nothing changes); bf16 runs them in bf16. The prompts' states are the fp32 encoder's, in autocast too."""
    grads, seen = {}, []
    for teacher_precision, autocast in (("fp32", False), ("fp32", True), (None, True), ("bf16", True)):
        cfg = sb.Config(model=sd_root, precision="bf16", teacher_precision=teacher_precision, **BASE)
        m = sb.load_models(cfg, CPU)
        sb.start_training(cfg, m, CPU)
        torch.manual_seed(0)
        for up in lora.lora_parameters(m.teacher)[1::2]:  # a fresh LoRA changes nothing: give it an effect
            up.data.normal_(std=0.05)
        hook = m.teacher.register_forward_hook(lambda *_: seen.append((torch.backends.cuda.matmul.allow_tf32,
                                                                         torch.is_autocast_enabled("cpu"))))
        torch.backends.cuda.matmul.allow_tf32 = True
        x0 = torch.randn((BASE["batch_size"], *m.latent_shape), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            context = m.embeddings[:BASE["batch_size"]]
            g = sb.score_gradient(m, cfg, x0, context, torch.Generator().manual_seed(2))
        assert torch.backends.cuda.matmul.allow_tf32 and context.dtype == torch.float32
        assert torch.equal(context, m.embeddings[:BASE["batch_size"]])
        hook.remove()
        grads[teacher_precision, autocast] = g
    assert seen == [(False, False)] * 4 + [(True, False)] * 2 + [(True, True)] * 2  # two passes (CFG batched) each
    assert torch.equal(grads["fp32", True], grads["fp32", False]) and torch.equal(grads[None, True], grads["fp32", False])
    assert not torch.equal(grads["bf16", True], grads["fp32", False])
    torch.backends.cuda.matmul.allow_tf32 = False


def test_a_bf16_teacher_needs_the_bf16_recipe(tmp_path, capsys):
    from conftest import cli_args, cli_error
    missing = str(tmp_path / "no-model")  # said before the model is read: on SD, before 5 GB are loaded
    line = cli_error(cli_args(missing, tmp_path / "out", 1) + ["--teacher-precision", "bf16"], capsys)
    assert "--teacher-precision bf16 needs --precision bf16" in line
    assert not os.path.exists(tmp_path / "out")


def test_bf16_first_gradient_is_close_to_fp32s(sd_root):
    grads = {}
    for precision in ("fp32", "bf16"):
        cfg = sb.Config(model=sd_root, loss="sds", precision=precision, **BASE)
        m = sb.load_models(cfg, CPU)
        state = sb.start_training(cfg, m, CPU)
        with sb.autocast_for(CPU, precision):
            x0, context = sb.render(m, cfg, state)
            g = sb.score_gradient(m, cfg, x0.detach(), context, state["gen"])
        assert x0.dtype == torch.float32  # Eq. 7 in fp32, on the output layer's fp32 eps
        sb.surrogate_loss(x0, g).backward()
        grads[precision] = torch.cat([p.grad.flatten() for p in m.student.parameters()])
    assert 0 < rel_err(grads["fp32"], grads["bf16"]) < 0.05  # measured: 0.007 (cosine 0.9999); SDS: g is O(1)


def test_bf16_resume_is_exact_and_exports_fp32(sd_root, tmp_path):
    run(sd_root, tmp_path / "straight", 4, precision="bf16")
    run(sd_root, tmp_path / "resumed", 2, precision="bf16")
    run(sd_root, tmp_path / "resumed", 4, precision="bf16")
    assert_same_ckpt(tmp_path / "straight" / "checkpoint.safetensors", tmp_path / "resumed" / "checkpoint.safetensors")
    exported = load_file(str(tmp_path / "straight" / "unet_ema" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in exported.values())


def test_sampling_runs_the_student_in_fp32_outside_autocast(straight6, tmp_path, monkeypatch):
    """sample.py's one step: fp32 weights and no autocast (Eq. 7 multiplies the eps's error by 14.6), while the
    teacher's DDIM steps run under autocast (faked here on the CPU as sample.py sets it on CUDA)."""
    seen, real = [], sample.k_step_x0

    def spy(student, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), {p.dtype for p in student.parameters()}))
        return real(student, *args, **kwargs)

    monkeypatch.setattr(sample, "k_step_x0", spy)
    monkeypatch.setattr(sample, "autocast_for", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    sample.main(["--student", straight6[0], "--teacher-steps", "2", "--prompt", "a cat", "--out", str(tmp_path / "s.png")])
    assert seen == [(False, {torch.float32})]


@pytest.mark.parametrize("K", [1, 2])
def test_training_grids_are_the_fp32_student_and_its_ema(sd_root, tmp_path, K):
    """The bf16 recipe's sample grid at step 4 is, pixel for pixel, the grid of the student and of its EMA (the model
    a run exports) each run by sample.py's k_step_x0 in fp32 outside autocast: two rows each, for seeds 0 and 1."""
    from harness.images import save_grid
    m, state, _ = run(sd_root, tmp_path, 4, precision="bf16", sample_every=4, student_steps=K, ema_decay=0.9)
    ema = copy.deepcopy(m.student)
    ema.load_state_dict(state["ema"].weights())
    assert not torch.equal(ema.conv_out.weight, m.student.conv_out.weight)
    rows = []
    for student in (m.student, ema):
        for seed in (0, 1):
            z, renoise = sb.chain_noises((4, *m.latent_shape), K, torch.Generator().manual_seed(seed))
            with torch.no_grad():
                x0 = sb.k_step_x0(student, z, renoise, m.embeddings[:4], m.schedule, K)
            rows.append(sb.to_images(m.vae, x0))
    want = save_grid(rows, tmp_path / "want.png", labels=["student", "student", "EMA", "EMA"])
    got = Image.open(tmp_path / "samples" / "step_000004.png").convert("RGB")
    assert np.array_equal(np.asarray(got), np.asarray(want.convert("RGB")))


def test_the_k_step_chain_runs_in_fp32_under_the_bf16_recipe(sd_root):
    """render's backward simulation (the student's no-grad steps to its step k + 1) as sample.py runs it, in fp32
    outside autocast (DMD2 too), under the bf16 recipe's autocast; only the step with gradient runs in bf16."""
    cfg = sb.Config(model=sd_root, student_steps=4, precision="bf16", **BASE)
    m = sb.load_models(cfg, CPU)
    state = sb.start_training(cfg, m, CPU)
    chains, real = [], sb.backward_simulation

    def backward_simulation(*args):
        chains.append((args, real(*args)))
        return chains[-1][1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sb, "backward_simulation", backward_simulation)
        while not chains or not chains[-1][0][2]:  # until a batch draws k >= 1 (a chain with a step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                x0, _ = sb.render(m, cfg, state)
    args, (x_t, t) = chains[-1]
    with torch.no_grad():
        want_x_t, want_t = real(*args)
    assert t == want_t and torch.equal(x_t, want_x_t) and x_t.dtype == torch.float32
    assert x0.dtype == torch.float32  # f_theta returns fp32 (its eps in bf16 under autocast)


def test_output_layer_runs_in_its_weights_dtype_under_autocast(sd_root):
    x, ctx = inputs(seed=3)
    student, teacher = load_unet(sd_root), load_unet(sd_root).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert student(x, 999, ctx).dtype == torch.float32  # the eps Eq. 7 multiplies by sigma_T / alpha_T
        assert teacher(x, 999, ctx).dtype == torch.bfloat16


def test_memory_plan_of_full_size_sd21_base_is_the_docs_table(sd_root, monkeypatch):
    from memory import plan as memory
    meta = torch.device("meta")
    cfg = sb.Config(model=sd_root, precision="bf16", ema_decay=0, batch_size=1, prompts="demo")
    m, state = sd21_base_on_meta(cfg)
    plan = memory.memory_plan(replace(cfg, ema_decay=0.999), m, state, meta)  # the EMA: counted, not copied off meta
    doc = open(os.path.join(os.path.dirname(sb.__file__), "docs", "memory.md")).read()
    table = doc[doc.index("| what | precision | GB |"):].split("\n\n")[0]
    rows = [line.split("|")[-2].strip() for line in table.splitlines()[2:8]]  # the six states' GB
    assert list(plan["device"].values()) == [float(r) for r in rows]
    assert f"**{plan['device states in all']:.1f}**" in table  # 18.8
    assert plan["cpu"] == {"EMA of the student": 3.46, "the student's copy the EMA is lerped from": 3.46,
                           "prompt embeddings": 0}
    acts = plan["activations (estimate)"]
    assert f"| {acts['off']:.2f} / {acts['on']:.2f} |" in table
    # --step-in-backward: the student's gradients one parameter's at a time (the largest, an up block's 3x3 conv)
    in_backward = memory.memory_plan(replace(cfg, ema_decay=0.999, step_in_backward=True), m, state, meta)
    grads = [gb for part, gb in in_backward["device"].items() if part.startswith("student grads")]
    largest = max(p.numel() for p in m.student.parameters()) * 4 / 1e9
    assert grads == [round(largest, 2)] and f"| {grads[0]:.2f} |" in table.splitlines()[9]
    assert f"**{in_backward['device states in all']:.1f}**" in table.splitlines()[10]
    # --teacher-precision bf16: the teacher's weights in bf16
    half = sd21_base_on_meta(replace(cfg, teacher_precision="bf16"))
    bf16_plan = memory.memory_plan(replace(cfg, ema_decay=0.999, teacher_precision="bf16", step_in_backward=True),
                                   *half, meta)
    teacher_gb = next(iter(bf16_plan["device"].values()))
    assert f"`--teacher-precision bf16`: {teacher_gb:.2f}" in table.splitlines()[2]
    assert f"**{bf16_plan['device states in all']:.1f}**" in table.splitlines()[11]

    # --checkpointing auto, the EMA's place and whether it fits, on (faked) cards: the docs' table, row for row
    decisions = doc[doc.index("| card GB | batch |"):].split("\n\n")[0].splitlines()[2:]
    assert decisions and {row.split("|")[-2].strip() for row in decisions} == {"yes", "no"}
    for row in decisions:
        total, batch, step_in_backward, teacher_precision, *want = [cell.strip() for cell in row.strip("|").split("|")]
        monkeypatch.setattr(memory, "device_memory_gb", lambda device: float(total))
        mt, st = (m, state) if teacher_precision == "fp32" else half
        p = memory.memory_plan(replace(cfg, ema_decay=0.999, batch_size=int(batch), teacher_precision=teacher_precision,
                                       step_in_backward=step_in_backward == "yes"), mt, st, meta)
        used = p["device states in all"] + p["activations (estimate)"]["on" if p["checkpointing"] else "off"]
        got = ["on" if p["checkpointing"] else "off", "device" if p["EMA on the device"] else "CPU", f"{used:.1f}",
               "yes" if p["fits"] else "no"]
        assert got == want, row
