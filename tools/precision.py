"""The precision of VSD's two no-grad teacher passes, measured by what the student learns: over many draws, how much
variance the rounding of g = w(t) (eps_psi - eps_phi) (Eq. 5, CFG on both passes, as the recipe trains) adds to the
student's gradient, against the variance a draw already has, and whether it biases it, when eps_psi and eps_phi run
in fp32, in fp32 with the convolutions on TF32 (the authors': PyTorch's default), on TF32, in fp16 or in bf16.
docs/memory.md#precision has the tables, the rule and the decision.

    python -m tools.precision sd                 # an SD 2.1-base-shaped UNet, a LoRA scaled to 0.3% ... 10% effect
    python -m tools.precision miniature          # the miniature's LoRA teacher as it trains (steps 25, 100, 300)
    python -m tools.precision miniature --run RUN   # the last checkpoint of a finished miniature run

g is a small difference: eps_phi is eps_psi's UNet with a LoRA that changes its output by a few % ("the effect":
|eps_phi - eps_psi| / |eps_psi|, both with CFG, over the batch), while rounding in the UNet's body does not cancel
between the two passes. One draw's g is mostly Monte-Carlo noise around its expectation (t, the noise, the image,
the prompt), so rounding that is zero-mean over draws adds variance, not bias, and matters in proportion to the
variance there is: `over_draws` measures both, each draw seen by every precision with the same x0, prompts, t and
noise, the student's gradient the real surrogate loss's (step 4) backward through an fp64 copy of the student, so
that only g differs. `sd` also measures the student's own forward and backward (fp32, TF32, bf16 autocast) on the
exact g.

TF32 on the CPU is an emulation: the inputs and weights of every Linear and Conv2d (forward and backward) rounded to
TF32's 10-bit mantissa (round to nearest even), products accumulated in fp32; attention's own matmuls stay fp32, as
CUDA's fused fp32 attention kernels keep them. fp16 and bf16 are the teacher's weights in that dtype under its
autocast (bf16: the recipe's --teacher-precision bf16). On the CPU, about 15 s a draw of the SD-shaped UNet on one
thread (32 draws an effect: 8 minutes); nothing is timed."""
import argparse
import copy
import json
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F

import swiftbrush as sb
from lora import adapters, inject_lora
from unet import UNet

TEACHER_PASSES = ("fp32", "tf32 conv", "tf32", "fp16", "bf16")  # against the fp64 reference; "tf32 conv": the
# authors' (fp32 weights, convolutions on TF32 by PyTorch's default, matmuls in fp32)
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "tf32 conv": torch.float32, "tf32": torch.float32,
          "fp16": torch.float16, "bf16": torch.bfloat16}
STUDENT_PASSES = ("fp32", "tf32", "bf16 autocast")
EFFECTS = (0.003, 0.01, 0.03, 0.1)
# SD 2.1-base's blocks (CrossAttn x3 + Down, linear projections, 64-wide heads, 1024-wide text states, 77 tokens) at a
# fifth of its channels: tools/bench.py's UNET_BENCH_CONFIG; LoRA rank and alpha scaled with the channels (64/108 ->
# 16/27) on to_q, to_v as the authors'
SD_SHAPED = dict(batch=2, latent=32, tokens=77, lora_rank=16, lora_alpha=27.0, guidance=4.5)


# --------------------------------------------------------------------------------------------------
# TF32, emulated: fp32 operands rounded to a 10-bit mantissa, fp32 products and sums


def tf32_round(x):
    """Round fp32 to TF32's 10 mantissa bits (of fp32's 23), to nearest, ties to even; fp32 range kept."""
    bits = x.float().contiguous().view(torch.int32)
    lsb = (bits >> 13) & 1
    return ((bits + 0xFFF + lsb) & ~0x1FFF).view(torch.float32)


_LINEAR, _CONV2D = F.linear, F.conv2d


class TF32Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        x, w = tf32_round(x), tf32_round(w)
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _LINEAR(x, w, b)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gy = tf32_round(gy)
        gx = gy @ w
        gw = gy.reshape(-1, gy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return gx, gw, gy.reshape(-1, gy.shape[-1]).sum(0) if ctx.has_bias else None


class TF32Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):
        x, w = tf32_round(x), tf32_round(w)
        ctx.save_for_backward(x, w)
        ctx.args, ctx.has_bias = (stride, padding, dilation, groups), b is not None
        return _CONV2D(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gy = tf32_round(gy)
        gx = torch.nn.grad.conv2d_input(x.shape, w, gy, *ctx.args)
        gw = torch.nn.grad.conv2d_weight(x, w.shape, gy, *ctx.args)
        return gx, gw, gy.sum((0, 2, 3)) if ctx.has_bias else None, None, None, None, None


@contextmanager
def emulated_tf32(linear=True):
    """Every F.conv2d (nn.Conv2d) and, unless linear=False, every F.linear (nn.Linear, the LoRA) in fp32 on TF32
    operands, forward and backward. linear=False: cuDNN's TF32 alone, PyTorch's default, as the authors ran."""
    if linear:
        F.linear = lambda x, w, b=None: TF32Linear.apply(x, w, b)
    F.conv2d = lambda x, w, b=None, stride=1, padding=0, dilation=1, groups=1: TF32Conv2d.apply(
        x, w, b, stride, padding, dilation, groups)
    try:
        yield
    finally:
        F.linear, F.conv2d = _LINEAR, _CONV2D


# --------------------------------------------------------------------------------------------------
# One measurement: g in each precision, and the student's gradient it gives


@contextmanager
def recorded_scores(into):
    """Records each eps_cfg result of score_gradient (eps_psi, then eps_phi) into the list `into`."""
    real = sb.eps_cfg

    def record(*args):
        out = real(*args)
        into.append(out)
        return out

    sb.eps_cfg = record
    try:
        yield
    finally:
        sb.eps_cfg = real


def teacher_in(m, name):
    """A copy of m with its teacher (LoRA included) in the dtype of `name`; the dtype its inputs come in."""
    dtype = DTYPES[name]
    inputs = torch.float64 if dtype == torch.float64 else torch.float32
    return replace(m, teacher=copy.deepcopy(m.teacher).to(dtype), uncond=m.uncond.to(inputs)), inputs


def g_of(m, cfg, x0, context, name, seed):
    """(g, eps_psi, eps_phi) of score_gradient with the teacher's passes in precision `name`, in fp64; a fresh
    generator seeded alike gives every precision the same t and noise."""
    mp, inputs = teacher_in(m, name)
    scores = []
    emulation = emulated_tf32(linear=name == "tf32") if name.startswith("tf32") else nullcontext()
    with recorded_scores(scores), emulation:
        g = sb.score_gradient(mp, cfg, x0.to(inputs), context.to(inputs), torch.Generator().manual_seed(seed))
    return g.double(), *(s.double() for s in scores)


class StudentGradient:
    """The student's parameter gradient of the surrogate loss (step 4) for any g, J^T g / N: backwards through one
    forward of the student, kept, in `precision` (fp64 unless the student's own precision is measured)."""

    def __init__(self, student, z, context, schedule, precision="fp64"):
        self.dtype = torch.float64 if precision == "fp64" else torch.float32
        self.student = copy.deepcopy(student).to(self.dtype).requires_grad_(True)
        bf16 = precision == "bf16 autocast"
        emulate = emulated_tf32() if precision == "tf32" else nullcontext()
        with emulate, torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=bf16):
            self.x0 = sb.f_theta(self.student, z.to(self.dtype), context.to(self.dtype), schedule)

    def __call__(self, g):
        loss = sb.surrogate_loss(self.x0, g.to(self.dtype))
        grads = torch.autograd.grad(loss, list(self.student.parameters()), retain_graph=True)
        return torch.cat([p.double().flatten() for p in grads])


def relative(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def cosine(a, b):
    return F.cosine_similarity(a, b, dim=0).item()


def over_draws(m, cfg, draw, n_draws):
    """What a precision of the teacher's passes does to what the student learns, over n_draws independent draws
    (draw(d) -> x0, z, y; score_gradient's own t and noise from seed d): with G the student's gradient on fp64's g and
    G_p on precision p's, e_p = G_p - G. Returns {"effect": the mean effect, "sampling": E||G - E G||^2, the variance
    a draw of this batch already has; name: (the added variance E||e_p - E e_p||^2 as a share of the sampling
    variance, the bias |E e_p| in units of its own noise floor sqrt(E||e_p - E e_p||^2 / n_draws), about 1 where
    there is none, and 2 Cov(G, e_p) as a share of the sampling variance: Var(G_p) = Var(G) + Var(e_p) + 2 Cov, so the
    first share and this one are together what the precision adds)}. Both variances are per sample over the batch's
    rows, so their ratio holds at any batch: an added share r makes a batch of 16 as noisy as one of 16 / (1 + r)."""
    sums = {}  # name -> [sum of the vectors, sum of their squared norms]
    cross = {}  # name -> the sum over the draws of <G, e_p>
    effects = []

    def add(name, v):
        total = sums.setdefault(name, [torch.zeros_like(v), 0.0])
        total[0] += v
        total[1] += v.square().sum().item()

    for d in range(n_draws):
        x0, z, context = draw(d)
        g_ref, psi, phi = g_of(m, cfg, x0, context, "fp64", seed=d)
        effects.append(relative(phi, psi))
        gradient = StudentGradient(m.student, z, context, m.schedule)
        G = gradient(g_ref)
        add("fp64", G)
        for name in TEACHER_PASSES:
            e = gradient(g_of(m, cfg, x0, context, name, seed=d)[0]) - G
            add(name, e)
            cross[name] = cross.get(name, 0.0) + (G * e).sum().item()
    spread = {name: variance(total, squares, n_draws) for name, (total, squares) in sums.items()}
    sampling, mean_G = spread["fp64"][1], spread["fp64"][0]
    covariance = {name: cross_covariance(cross[name], mean_G, spread[name][0], n_draws) for name in TEACHER_PASSES}
    return {"effect": sum(effects) / n_draws, "sampling": sampling,
            **{name: (spread[name][1] / sampling, spread[name][0].norm().item() / (spread[name][1] / n_draws) ** 0.5,
                      2 * covariance[name] / sampling)
               for name in TEACHER_PASSES}}


def cross_covariance(cross, mean_a, mean_b, n):
    """E<a - E a, b - E b>, unbiased, of n pairs of vectors from the sum of their dot products and their means."""
    return (cross - n * (mean_a * mean_b).sum().item()) / (n - 1)


def variance(total, squares, n):
    """(the mean vector, E||v - E v||^2, unbiased) of n vectors from their sum and the sum of their squared norms."""
    mean = total / n
    return mean, (squares - n * mean.square().sum().item()) / (n - 1)


# --------------------------------------------------------------------------------------------------
# The SD-shaped UNet: a random teacher, a random LoRA scaled to each effect size


def sd_shaped_models(seed=0):
    """Models of a random SD 2.1-base-shaped UNet (1/5 of its channels) with a random LoRA on to_q, to_v; the student a
    copy of the teacher (step 0); random text states. Returns (m, cfg, x0, z, context)."""
    from tools.bench import UNET_BENCH_CONFIG
    b = SD_SHAPED
    torch.manual_seed(seed)
    teacher = UNet(json.loads(json.dumps(UNET_BENCH_CONFIG)))
    student = copy.deepcopy(teacher)
    inject_lora(teacher, b["lora_rank"], b["lora_alpha"], ["to_q", "to_v"])
    randomise_lora(teacher)
    g = torch.Generator().manual_seed(seed + 1)
    shape = (4, b["latent"], b["latent"])
    context = torch.randn(b["batch"], b["tokens"], UNET_BENCH_CONFIG["cross_attention_dim"], generator=g)
    uncond = torch.randn(1, b["tokens"], UNET_BENCH_CONFIG["cross_attention_dim"], generator=g)
    z = torch.randn(b["batch"], *shape, generator=g)
    x0 = torch.randn(b["batch"], *shape, generator=g)  # latent-like (unit variance): a random student's image is not
    m = sb.Models(teacher.eval(), student, sb.Schedule(), [], None, uncond, shape)
    cfg = sb.Config(model="sd-shaped", guidance=b["guidance"], lora_guidance=b["guidance"])
    return m, cfg, x0, z, context


def randomise_lora(teacher, seed=0):
    """A trained LoRA's B is not zero: random, of A's scale, for set_effect to scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in adapters(teacher):
            up = adapter.lora_up.weight
            up.copy_(torch.randn(up.shape, generator=g) * adapter.lora_down.weight.std())


def set_effect(m, cfg, x0, context, target, seed=0):
    """Scale the LoRA's B by target / the effect it has (measured in fp32): the effect is near linear in the scale
    (over_draws says the effect reached, on average over its draws)."""
    _, psi, phi = g_of(m, cfg, x0, context, "fp32", seed)
    with torch.no_grad():
        for _, adapter in adapters(m.teacher):
            adapter.lora_up.weight.mul_(target / relative(phi, psi))


def sd_rows(effects=EFFECTS, n_draws=32):
    """The SD-shaped UNet with its LoRA scaled to each effect size: [(target, over_draws())], and the student's own
    precisions at the last."""
    m, cfg, x0, z, context = sd_shaped_models()

    def draw(d):  # a fresh image, noise and prompt states of the same statistics as the first
        gen = torch.Generator().manual_seed(1000 + d)
        return tuple(torch.randn(v.shape, generator=gen) for v in (x0, z, context))

    rows = []
    for target in effects:
        set_effect(m, cfg, x0, context, target)
        rows.append((target, over_draws(m, cfg, draw, n_draws)))
        print(row_text(f"{100 * target:g}%", rows[-1][1]), flush=True)
    return rows, student_precisions(m, cfg, x0, z, context)


def student_precisions(m, cfg, x0, z, context):
    """The cosine of the student's gradient to fp64's with its own forward and backward in each precision, on the
    exact (fp64) g of the LoRA as it is."""
    g_ref = g_of(m, cfg, x0, context, "fp64", 0)[0]
    reference = StudentGradient(m.student, z, context, m.schedule)(g_ref)
    return {name: cosine(StudentGradient(m.student, z, context, m.schedule, name)(g_ref), reference)
            for name in STUDENT_PASSES}


# --------------------------------------------------------------------------------------------------
# The miniature: its trained LoRA teacher at several steps of a real run


def miniature_batch(m, cfg, seed=0):
    """What a step renders: the first batch_size prompts y, fixed noises z and x0 = f_theta(z, y). (x0, z, y)"""
    context = m.embeddings[:cfg.batch_size]
    z = torch.randn((cfg.batch_size, *m.latent_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x0 = sb.f_theta(m.student, z, context, m.schedule, cfg.param)
    return x0, z, context


def trained_miniature(out, steps):
    """The default miniature run trained into `out` (continued if it holds a checkpoint): (step, models) at each of
    `steps`."""
    base, _ = sb.runs_from_args(sb.parse_args(["--model", "miniature", "--out", out]))
    for step in steps:
        m, state = sb.train(replace(base, steps=step), progress=False)
        yield state["step"], m, base


def run_config(run):
    """The Config a finished run folder recorded (swiftbrush.json), or one line saying why there is none."""
    path = os.path.join(run, "swiftbrush.json")
    try:
        with open(path) as f:
            return sb.Config(**{**json.load(f)["config"], "out": run})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise sb.UsageError(f"--run {run}: {path} is missing or not a run's ({e.__class__.__name__}): pass the --out "
                            f"folder of a finished run") from None


def finished_run(cfg):
    """(step, models, config) of a run folder's checkpoint, read without writing anything."""
    from harness.checkpoint import load_checkpoint
    cpu = torch.device("cpu")
    m = sb.load_models(cfg, cpu)
    state = sb.start_training(cfg, m, cpu)
    load_checkpoint(cfg, m, state)
    yield state["step"], m, cfg


def miniature_rows(models, n_draws=32):
    """[(step, over_draws())] of each (step, models, config) of `models`, over batches that step renders."""
    rows = []
    for step, m, cfg in models:
        # z from seed 1000 + d: score_gradient's t and noise come from seed d
        rows.append((step, over_draws(m, cfg, lambda d: miniature_batch(m, cfg, seed=1000 + d), n_draws)))
        print(row_text(f"step {step}", rows[-1][1]), flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# Tables


def row_text(label, r):
    cells = [f"{100 * r[name][0]:.2g}% ({100 * r[name][2]:+.2g}%) / {r[name][1]:.2f}" for name in TEACHER_PASSES]
    return f"| {label} | {100 * r['effect']:.3g}% | " + " | ".join(cells) + " |"


def header(first):
    return f"| {first} | effect | " + " | ".join(TEACHER_PASSES) + " |\n|---|---|" + "---|" * len(TEACHER_PASSES)


def positive_numbers(kind):
    """An argparse type: comma-separated positive numbers of `kind`, as a list."""
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: comma-separated {kind.__name__}s, e.g. 25,100,300") from None
        if min(values) <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: each must be positive")
        return values
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["sd", "miniature"])
    p.add_argument("--effects", type=positive_numbers(float), default=[100 * e for e in EFFECTS],
                   help=f"sd: the LoRA's effect sizes in %% (default {','.join(f'{100 * e:g}' for e in EFFECTS)})")
    p.add_argument("--steps", type=positive_numbers(int), default=[25, 100, 300],
                   help="miniature: the steps to measure at (default 25,100,300)")
    p.add_argument("--out", default="runs/precision-miniature", help="miniature: the run trained and measured")
    p.add_argument("--run", help="miniature: measure this finished run's last checkpoint instead (read only)")
    p.add_argument("--draws", type=int, default=32,
                   help="independent draws a row, at least 2 (default 32; the bias's floor falls as 1 / sqrt(draws))")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared CPU more spin)")
    a = p.parse_args(argv)
    if a.draws < 2:
        p.error(f"argument --draws: {a.draws}: at least 2, for a variance")
    torch.set_num_threads(a.threads)
    try:
        cfg = run_config(a.run) if a.run else None  # before anything is measured
        n_draws = a.draws
        print(f"each cell, over {n_draws} draws: the variance the precision adds to the student's gradient, as a share "
              f"of the variance a draw has (and 2 Cov(G, e), the rest of what it adds, the same way) / its bias in "
              f"units of its noise floor (about 1: none measurable)")
        if a.what == "sd":
            print(header("LoRA effect (target)"))
            _, students = sd_rows([e / 100 for e in a.effects], n_draws)
            print("\nthe student's own forward and backward, on the exact g: the cosine of its gradient to fp64's")
            for name, cos in students.items():
                print(f"| {name} | {cos:.7f} |")
        else:
            print(header("miniature, step"))
            miniature_rows(finished_run(cfg) if cfg else trained_miniature(a.out, a.steps), n_draws)
    except (sb.UsageError, sb.WeightsError, sb.CheckpointError) as e:
        sys.exit(f"precision: error: {e}")


if __name__ == "__main__":
    main()
