"""tools/selfcheck.py on the CPU: the small model through the real train_step, numbers that hold together."""
import pytest
import torch

from tools import selfcheck


def test_selfcheck_runs_on_the_cpu(capsys):
    one = selfcheck.main(["--iterations", "3", "--batch-size", "1", "--peak-tflops", "1"])
    two = selfcheck.main(["--iterations", "3", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert out.count("s/iter") == 2 and "% of 1.0 TFLOP/s" in out and "pass --peak-tflops" in out
    assert 1.9 < two["flops_per_iter"] / one["flops_per_iter"] < 2.1  # an iteration's FLOPs scale with the batch
    assert one["mfu"] == one["flops_per_iter"] / one["s_per_iter"] / 1e12 and two["mfu"] is None
    assert one["peak_gb"] > 0 and one["planned_gb"] > 0 and two["images_per_s"] == 2 / two["s_per_iter"]
    assert out.count("the GPU idle, waiting for the host: not measured (CUDA only)") == 2 and one["gpu_idle"] is None


def test_idle_share_is_the_gaps_between_the_devices_intervals():
    """Kernels (and copies, overlapping on other streams) from 0 to 100 ns with gaps 30-40 and 90-95: 15% idle."""
    assert selfcheck.idle_share([(0, 10), (5, 30), (40, 60), (50, 90), (55, 70), (95, 100)]) == pytest.approx(0.15)
    assert selfcheck.idle_share([(10, 20), (0, 10)]) == 0.0 and selfcheck.idle_share([]) is None


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA L4", 121),
                                          ("NVIDIA L40S", 362), ("NVIDIA GeForce RTX 4090", 165), ("Quadro P1000", None)])
def test_peak_flops_by_device_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    assert selfcheck.peak_tflops(torch.device("cuda"), None) == tflops
    assert selfcheck.peak_tflops(torch.device("cuda"), 500.0) == 500.0


def test_selfcheck_loads_a_given_model(sd_root, capsys):
    numbers = selfcheck.main(["--model", sd_root, "--iterations", "3"])
    assert f"selfcheck: {sd_root}" in capsys.readouterr().out and numbers["flops_per_iter"] > 0


def test_selfcheck_passes_step_in_backward(capsys):
    """--step-in-backward goes to the Config: the student's second backward shows in the FLOPs of an iteration."""
    plain = selfcheck.main(["--iterations", "3", "--batch-size", "1"])
    in_backward = selfcheck.main(["--iterations", "3", "--batch-size", "1", "--step-in-backward"])
    assert capsys.readouterr().out.count("the student stepped inside its backward") == 1
    assert 1.15 < in_backward["flops_per_iter"] / plain["flops_per_iter"] < 1.3  # measured 1.21: + 2 UNet forwards of ~9.5


def test_selfcheck_says_a_bf16_teacher_needs_the_bf16_recipe():
    with pytest.raises(SystemExit) as e:  # one line, as the training command says it, not a dtype traceback
        selfcheck.main(["--iterations", "3", "--teacher-precision", "bf16"])
    assert str(e.value.code).startswith("selfcheck: error: --teacher-precision bf16 needs --precision bf16")
