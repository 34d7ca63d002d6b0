"""The precision study's measurement (tools/precision.py) on the tiny SD: over draws, fp32 teacher passes add next to
nothing to the variance of the student's gradient at a small LoRA effect, the others more as their mantissas shrink;
the statistics; and the TF32 emulation rounds as TF32 does."""
import pytest
import torch

import swiftbrush as sb
from conftest import BASE, CPU
from tools import precision

def test_tf32_rounding_is_to_nearest_even_on_a_10_bit_mantissa():
    x = torch.randn(10000) * 100
    assert torch.equal(precision.tf32_round(x), x.half().float())  # fp16's mantissa, in fp16's range
    ties = torch.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, -(1 + 2 ** -11), 1e30])
    assert precision.tf32_round(ties).tolist() == [1.0, 1 + 2 ** -9, -1.0, precision.tf32_round(ties)[3].item()]
    assert abs(precision.tf32_round(ties)[3].item() / 1e30 - 1) < 2 ** -11  # fp32's range, not fp16's


def test_variance_is_the_unbiased_total_variance_of_the_vectors():
    v = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean, total = precision.variance(v.sum(0), v.square().sum().item(), 7)
    assert torch.allclose(mean, v.mean(0)) and abs(total - v.var(0).sum().item()) < 1e-12
    e = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5 * v
    cov = precision.cross_covariance((v * e).sum().item(), v.mean(0), e.mean(0), 7)
    assert abs((v + e).var(0).sum().item() - (total + e.var(0).sum().item() + 2 * cov)) < 1e-12  # Var(G + e)


def test_over_draws_ranks_the_precisions_by_the_variance_they_add(sd_root):
    """The tiny SD with a random LoRA at a 1% effect, 4 draws: fp32 adds next to nothing to the student's gradient's
    variance, TF32 (on the convolutions, or on all) less than fp16, bf16 more than the variance itself."""
    torch.manual_seed(0)
    cfg = sb.Config(model=sd_root, **BASE)  # CFG 4.5 on both passes, as the authors
    m = sb.load_models(cfg, CPU)
    sb.start_training(cfg, m, CPU)
    precision.randomise_lora(m.teacher)

    def draw(d):
        g = torch.Generator().manual_seed(d)
        z, x0 = torch.randn((2, 2, *m.latent_shape), generator=g)
        return x0, z, m.embeddings[2 * d % 12:2 * d % 12 + 2]

    precision.set_effect(m, cfg, draw(0)[0], draw(0)[2], 0.01)
    r = precision.over_draws(m, cfg, draw, 4)
    assert 0.005 < r["effect"] < 0.02 and r["sampling"] > 0
    share = {name: r[name][0] for name in precision.TEACHER_PASSES}  # measured: 7e-8, 8.3%, 7.5%, 32%, 1846%
    assert share["fp32"] < 1e-5 < min(share["tf32 conv"], share["tf32"]) < share["fp16"] < 1 < share["bf16"]
    assert all(abs(r[name][2]) <= 2 * (share[name] * 1.0) ** 0.5 for name in share)  # |2 Cov| <= 2 sd(G) sd(e)


@pytest.mark.parametrize("argv, words", [
    (["miniature", "--run", "no/such/run"], "precision: error: --run no/such/run: "),
    (["miniature", "--steps", "25,x"], "argument --steps: '25,x': comma-separated ints"),
    (["sd", "--effects", "0,3"], "argument --effects: '0,3': each must be positive"),
])
def test_bad_input_is_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        precision.main(argv)
    said = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert words in said and "Traceback" not in said
