"""--student-lora: the student an adapter theta on the teacher's own UNet, which is then all three networks of
Algorithm 1 (lora.py), through the real loop on tiny SD folders: its parameters, checkpointing, exact resume, a bf16
teacher, old checkpoints."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
import swiftbrush as sb
from conftest import UNET_FILE, assert_same_ckpt, cli_args, cli_error, inputs, read_ckpt, rel_err, run
from unet import load_unet

# --------------------------------------------------------------------------------------------------
# --student-lora: the student an adapter theta on the teacher's own UNet, which is then all three networks


def test_the_lora_student_is_an_adapter_on_the_teachers_own_unet(sd_root, tmp_path):
    """After 3 steps: the student's parameters are the adapter theta's alone (LCM-LoRA's targets, every Linear and
    Conv2d of the blocks, alpha = r), the UNet's base weights are still the teacher's file, phi and theta both
    moved; with no adapter the UNet is the teacher, bit for bit; the student's forward is the UNet with theta merged
    (a plain UNet loaded from merged_state_dict), and leaves phi on and theta off, the UNet's own state."""
    official = load_file(os.path.join(sd_root, UNET_FILE))
    m, state, log = run(sd_root, tmp_path, 3, student_lora=4)
    theta = dict(m.student.named_parameters())
    assert m.student.unet is m.teacher and len(log) == 3 and log[-1]["grad_norm_student"] > 0
    assert set(theta) == {f"{key}.{part}.weight" for key in m.student.layer_of for part in ("lora_down", "lora_up")}
    adapted = set(m.student.layer_of.values())
    linear_and_conv = {n for n, mod in m.teacher.named_modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))
                       and ".adapters." not in n}
    assert adapted == {n for n in linear_and_conv if n.endswith(tuple("." + t for t in sb.STUDENT_LORA_TARGETS))}
    assert adapted == linear_and_conv - {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}
    assert {a.alpha / a.rank for _, a in lora.adapters(m.teacher, "theta")} == {1.0}
    base = lora.base_state_dict(m.teacher)
    assert set(base) == set(official) and all(torch.equal(base[k], official[k]) for k in official)
    assert all(a.lora_up.weight.any() for name in ("phi", "theta") for _, a in lora.adapters(m.teacher, name))
    x, ctx = inputs()
    t = torch.tensor([999, 400])
    plain = load_unet(sd_root)
    with torch.no_grad():
        with lora.lora_disabled(m.teacher):
            assert torch.equal(m.teacher(x, t, ctx), plain(x, t, ctx))  # eps_psi
        plain.load_state_dict(m.student.merged_state_dict())
        assert rel_err(m.student(x, t, ctx), plain(x, t, ctx)) < 1e-5
    assert [(name, a.enabled) for _, layer in lora.lora_layers(m.teacher) for name, a in layer.adapters.items()
            if layer is m.teacher.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q] == [
        ("phi", True), ("theta", False)]


@pytest.mark.parametrize("kw", [{}, {"step_in_backward": True}], ids=["step", "step-in-backward"])
def test_the_lora_student_trains_the_same_with_checkpointing(sd_root, tmp_path, kw):
    """Gradient checkpointing recomputes each block in the backward, after the student's forward has switched theta
    off again: the recomputation switches the adapters as they were at the forward, so the run is the same (the
    wrong adapters in the recomputation give other gradients)."""
    run(sd_root, tmp_path / "off", 2, student_lora=4, checkpointing="off", **kw)
    run(sd_root, tmp_path / "on", 2, student_lora=4, checkpointing="on", **kw)
    (off, _), (on, _) = read_ckpt(tmp_path / "off" / "checkpoint.safetensors"), read_ckpt(tmp_path / "on" /
                                                                                          "checkpoint.safetensors")
    assert all(rel_err(on[k].double(), off[k].double()) < 1e-5 for k in off if k.startswith(("student/", "lora/")))


def test_the_lora_student_resumes_exactly_and_refuses_student_init(sd_root, tmp_path, capsys):
    run(sd_root, tmp_path / "straight", 4, student_lora=4)
    run(sd_root, tmp_path / "resumed", 2, student_lora=4)
    run(sd_root, tmp_path / "resumed", 4, student_lora=4)
    assert_same_ckpt(tmp_path / "straight" / "checkpoint.safetensors", tmp_path / "resumed" / "checkpoint.safetensors")
    said = cli_error(cli_args(sd_root, tmp_path / "init", 2) + ["--student-lora", "4", "--student-init", sd_root],
                     capsys)
    assert said.startswith("swiftbrush: error: --student-lora trains an adapter on the teacher's own UNet")
    said = cli_error(cli_args(sd_root, tmp_path / "beyond", 2) + ["--student-lora", "4", "--ablation", "beyond"],
                     capsys)  # its last student starts from another: refused before the first one trains
    assert "--student-lora trains an adapter" in said and not (tmp_path / "beyond").exists()
    m, _, log = run(sd_root, tmp_path / "k2", 2, student_lora=4, student_steps=2)  # a 2-step LoRA student
    assert len(log) == 2 and log[-1]["grad_norm_student"] > 0


def test_the_lora_student_on_a_bf16_teacher_samples_and_runs_its_chain(sd_root, tmp_path):
    """On a bf16 base (--teacher-precision bf16) the student's passes made outside autocast (the sample grid, a
    2-step chain) run under bf16 autocast: the base has no fp32 weights to run in."""
    m, _, log = run(sd_root, tmp_path, 2, student_lora=4, precision="bf16", teacher_precision="bf16", sample_every=2,
                    student_steps=2)
    assert len(log) == 2 and os.path.exists(tmp_path / "samples" / "step_000002.png")
    assert m.teacher.conv_in.weight.dtype == torch.bfloat16


def test_a_checkpoint_from_before_named_adapters_resumes(sd_root, straight6, tmp_path):
    """Checkpoints written before the LoRA teacher's keys took its name (`X.lora_down.weight`, now
    `X.adapters.phi.lora_down.weight`) resume to the same run."""
    run(sd_root, tmp_path, 3)
    path = tmp_path / "checkpoint.safetensors"
    tensors, meta = read_ckpt(path)
    old = {k.replace(".adapters.phi.", "."): v for k, v in tensors.items()}
    assert any(k.startswith("lora/") and k.endswith(".to_q.lora_down.weight") for k in old)
    save_file(old, str(path), metadata=meta)
    run(sd_root, tmp_path, 6)
    assert_same_ckpt(os.path.join(straight6[0], "checkpoint.safetensors"), path)
