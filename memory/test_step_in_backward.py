"""--step-in-backward (memory/step_in_backward.py) through the real loop on tiny SD folders: the normal steps, the
clipping, a gradient never held whole, exact resume."""
import os

import pytest
import torch

import swiftbrush as sb
from conftest import BASE, CPU, assert_same_ckpt, read_log, run, same_tensors

# --------------------------------------------------------------------------------------------------
# --step-in-backward: the student's Adam step inside its backward (two backwards: the first for the clipping norm)


@pytest.mark.parametrize("loss,param,precision", [("vsd", "eps", "fp32"), ("sds", "x0", "fp32"),
                                                  ("vsd", "x0", "bf16"), ("sds", "eps", "bf16")])
def test_step_in_backward_takes_the_normal_steps(sd_root, tmp_path, loss, param, precision):
    """The same weights, Adam states and logs as the normal path after 3 steps (measured: bit-identical on the CPU);
    bf16 with checkpointing, whose segments are recomputed in each of the two backwards."""
    kw = dict(loss=loss, param=param, precision=precision, checkpointing="on" if precision == "bf16" else "off")
    run(sd_root, tmp_path / "normal", 3, **kw)
    m, state, log = run(sd_root, tmp_path / "in_backward", 3, step_in_backward=True, **kw)
    assert m.student.gradient_checkpointing == (precision == "bf16")
    assert log[-1]["grad_norm_student"] > 0 and read_log(tmp_path / "normal") == read_log(tmp_path / "in_backward")
    assert same_tensors(*(tmp_path / name / "checkpoint.safetensors" for name in ("normal", "in_backward")))


def test_step_in_backward_clips_as_clip_grad_norm(sd_root):
    """A large gradient (the loss x 1e4) is scaled to norm 1 exactly as clip_grad_norm_ scales it: Adam's first m is
    0.1 x the clipped gradient."""
    norms, first_m = {}, {}
    for in_backward in (False, True):
        cfg = sb.Config(model=sd_root, loss="sds", step_in_backward=in_backward, **BASE)
        m = sb.load_models(cfg, CPU)
        state = sb.start_training(cfg, m, CPU)
        x0, context = sb.render(m, cfg, state)
        loss = 1e4 * sb.surrogate_loss(x0, sb.score_gradient(m, cfg, x0.detach(), context, state["gen"]))
        if in_backward:
            norms[in_backward] = sb.clip_and_step_in_backward(state["opt_student"], loss).item()
        else:
            loss.backward()
            norms[in_backward] = sb.clip_and_step(state["opt_student"]).item()
        adam_state = state["opt_student"].state_dict()["state"]
        first_m[in_backward] = torch.cat([adam_state[i]["exp_avg"].flatten() for i in sorted(adam_state)])
    assert norms[True] == norms[False] > 100
    assert torch.equal(first_m[True], first_m[False])
    assert abs(torch.linalg.vector_norm(first_m[True]).item() / 0.1 - 1) < 1e-4  # the clipped gradient's norm: 1


def test_step_in_backward_never_holds_the_students_gradient_whole(sd_root, tmp_path):
    """Counted from hooks on every student parameter: when each gradient arrives, how many of them exist. The normal
    path holds all of them before its step; --step-in-backward one, in each of its two backwards."""
    for in_backward, most, calls_per_step in ((False, "all", 1), (True, 1, 2)):
        m = sb.load_models(sb.Config(model=sd_root, prompts="demo"), CPU)
        params, alive = list(m.student.parameters()), []
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: alive.append(sum(q.grad is not None for q in params)))
        run(sd_root, tmp_path / str(in_backward), 2, models=m, step_in_backward=in_backward)
        assert max(alive) == (len(params) if most == "all" else most)
        assert len(alive) == 2 * calls_per_step * len(params)


def test_step_in_backward_resumes_exactly_and_may_change_on_resume(sd_root, straight6, tmp_path):
    out6 = os.path.join(straight6[0], "checkpoint.safetensors")
    run(sd_root, tmp_path / "on", 3, step_in_backward=True)
    run(sd_root, tmp_path / "on", 6, step_in_backward=True)
    assert same_tensors(out6, tmp_path / "on" / "checkpoint.safetensors")
    assert read_log(straight6[0]) == read_log(tmp_path / "on")
    run(sd_root, tmp_path / "changed", 3, step_in_backward=True)  # the same Adam state either way: it may change
    run(sd_root, tmp_path / "changed", 6)
    assert_same_ckpt(out6, tmp_path / "changed" / "checkpoint.safetensors")
