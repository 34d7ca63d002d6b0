"""Benchmarks against diffusers (used here only as the baseline), on this machine's CPU, fp32.

    python -m tools.bench                     # all benchmarks: unet, then train
    python -m tools.bench unet                # our UNet vs diffusers' UNet2DConditionModel: forward, forward+backward
    python -m tools.bench train               # one Algorithm 1 (VSD) training iteration, ours vs diffusers + peft
    python -m tools.bench unet train --repeats 9 --threads 2 --no-memory
    python -m tools.bench train --mmap        # frozen weights left as views of the mmapped weights file

unet: both UNets get the same config (SD 2.1-base wiring, channels scaled down), weights and inputs; forward
(no_grad) and forward+backward of a weighted mean of the output.

train: ours is `swiftbrush.train_step` with ONE teacher UNet that is both eps_psi (LoRA off) and eps_phi (LoRA on),
plus the student. The baseline is what one writes with diffusers + peft: a frozen teacher UNet2DConditionModel, a
second UNet2DConditionModel carrying a peft LoRA (LoraConfig r, alpha, to_q/to_v) for eps_phi, and the student:
three UNets. Same config, weights, batch, CFG, losses, clipping and Adam. Both run the same Algorithm 1 FLOPs
(student forward+backward, eps_psi and eps_phi with CFG, the LoRA's diffusion loss forward+backward), so sharing
the teacher's weights between eps_psi and eps_phi saves memory (one UNet of weights), not time: expect a time
ratio near 1 and a memory ratio below 1.

Reading the tables: every ratio is ours / baseline, so < 1 is better for us (faster, or less memory).

Time: both implementations in one process, warm-up, then the repeats interleaved (ours and the baseline
alternately, the order flipped every round); medians. Threads: 1 intra-op thread by default (--threads); on a CPU
shared with other jobs torch's OpenMP threads spin-wait on each other, which makes multi-thread timings meaningless
(a 2-thread training step measured up to 50x slower).

Memory: one fresh subprocess per variant (and, for unet, per mode), which imports only what that variant needs,
warms up torch's lazily loaded kernels, builds the model(s) and inputs, then resets the kernel's RSS high-water mark
(VmHWM, via /proc/self/clear_refs) and runs the measured step(s). torch's CPU allocator is invisible to
tracemalloc, hence RSS. Where the reset is unavailable, ru_maxrss (which cannot be reset) is used instead, and
growth over it underestimates when construction peaked higher.
  unet:  "MiB" is the peak RSS during one step minus the RSS once model and inputs exist.
  train: "peak RSS" is the high-water mark over warm-up + 2 iterations; "over imports" subtracts the RSS the
         process had after its imports, "after build" is the RSS of the built models and optimisers over imports.
         Weights are materialised (private copies) by default: loaded from safetensors, frozen weights stay views
         of the mmapped file, so on the CPU the baseline's copies of one file would share their pages, whereas on
         an accelerator each copy is real memory. --mmap measures them as loaded.
"""
import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import unet

# unet: SD 2.1-base wiring (CrossAttn x3 + Down, linear proj, 64-dim heads, 1024-dim text states, 77 tokens),
# channels scaled 1/5 so that a 2-core CPU runs it in seconds. Heads = channels / 64 per block.
UNET_BENCH_CONFIG = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[64, 128, 256, 256],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    attention_head_dim=[1, 2, 4, 4], cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32)
UNET_BENCH_INPUT = dict(batch=2, latent=32, tokens=77)

# train: SD-shaped (CrossAttn x2 + Down, linear proj, 64-dim heads, 77 tokens), small enough for a 2-core CPU.
TRAIN_BENCH_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[64, 128, 128],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=[1, 2, 2], cross_attention_dim=256, use_linear_projection=True, norm_num_groups=32)
# Algorithm 1 settings (the paper's, LoRA rank scaled with the channels: 64/108 on 320-1280 channels -> 16/27).
TRAIN_BENCH = dict(batch=2, latent=32, tokens=77, prompts=64, lora_rank=16, lora_alpha=27.0, guidance=4.5,
                   lr=1e-6, lora_lr=1e-3)


# --------------------------------------------------------------------------------------------------
# Shared: threads, models and inputs, timing, memory, tables


def set_threads(n=1):
    """torch intra-op threads; None or 0: all CPUs this process may run on."""
    n = n or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(n)
    return n


def _random_diffusers_unet(config, seed=0):
    """diffusers' UNet with random weights, perturbed so that nothing is zero."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**config)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return ref


def _unet_inputs(config, batch, latent, tokens, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], latent, latent, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, tokens, config["cross_attention_dim"], generator=g)
    return x, t, ctx


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved(fns, repeats, warmup):
    """fns: {name: callable}. Warm each up, then time them alternately (order flipped each round); medians."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(repeats):
        for k in (order if r % 2 == 0 else order[::-1]):
            times[k].append(_timed(fns[k]))
    return {k: statistics.median(v) for k, v in times.items()}, times


def _rss_mib(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def _peak_rss(fn):
    """Run fn; (RSS before it, peak RSS during it) in MiB. The peak is the kernel's RSS high-water mark, reset
    first via /proc/self/clear_refs (Linux >= 4.0); where that fails, ru_maxrss, which cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        fn()
        return before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before = _rss_mib()
    fn()
    return before, _rss_mib("VmHWM")


def _warm_libraries():
    """Load what the models load lazily (Adam's foreach/dynamo imports, oneDNN, SDPA, autograd) before any
    reference RSS is read, so that memory differences count tensors, not code."""
    p = torch.nn.Parameter(torch.randn(1, 4, 8, 8))
    opt = torch.optim.Adam([p], lr=1e-3)
    q = F.conv2d(p, torch.randn(4, 4, 3, 3), padding=1).flatten(2).transpose(1, 2)[:, None]
    F.scaled_dot_product_attention(q, q, q).square().mean().backward()
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    opt.step()


def _in_fresh_process(measure, **kwargs):
    """Run MEASURE[measure](**kwargs) in a fresh Python process (see main's "_mem"); its dict result."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "tools.bench", "_mem", measure, json.dumps(kwargs)], cwd=root,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"memory child {measure} {kwargs} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_child(measure, kwargs):
    kwargs = json.loads(kwargs)
    set_threads(kwargs.pop("threads"))
    _warm_libraries()
    print(json.dumps(MEASURE[measure](**kwargs)))


def _ratio_row(label, ours, base, fmt):
    return [label, format(ours, fmt), format(base, fmt), f"{ours / max(base, 1e-9):.2f}"]


def _table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


# --------------------------------------------------------------------------------------------------
# unet: our UNet vs diffusers' UNet2DConditionModel


def _unet_steps(model, is_ours, x, t, ctx):
    call = (lambda: model(x, t, ctx)) if is_ours else (lambda: model(x, t, encoder_hidden_states=ctx).sample)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))

    def forward():
        model.eval()
        with torch.no_grad():
            call()

    def forward_backward():
        model.train()
        model.zero_grad(set_to_none=True)
        (call() * w).mean().backward()

    return {"forward": forward, "forward+backward": forward_backward}


def _unet_memory(impl, mode):
    """In a fresh process: MiB of peak-RSS growth over one `mode` step of `impl`, once the model and inputs exist."""
    cfg = UNET_BENCH_CONFIG
    if impl == "ours":  # build only the measured model
        model = unet.UNet(json.loads(json.dumps(cfg)))
    else:
        from diffusers import UNet2DConditionModel
        model = UNet2DConditionModel(**cfg)
    step = _unet_steps(model, impl == "ours", *_unet_inputs(cfg, **UNET_BENCH_INPUT))[mode]
    before, peak = _peak_rss(step)
    return {"delta_mib": peak - before, "peak_mib": peak}


def bench_unet(repeats=7, warmup=2, memory=True, threads=1):
    threads = set_threads(threads)
    cfg, inp = UNET_BENCH_CONFIG, UNET_BENCH_INPUT
    ref = _random_diffusers_unet(cfg)
    ours = unet.UNet(json.loads(json.dumps(cfg)))
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, ctx = _unet_inputs(cfg, **inp)
    with torch.no_grad():  # same maths before timing anything
        err = _rel_err(ours(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"UNet: SD2.1-base wiring, block_out_channels={cfg['block_out_channels']}, heads={cfg['attention_head_dim']} "
          f"(head dim 64), {n_params / 1e6:.1f} M params; batch {inp['batch']}, {inp['latent']}x{inp['latent']} latents, "
          f"{inp['tokens']}x{cfg['cross_attention_dim']} context; fp32 CPU, {threads} threads, torch {torch.__version__}; "
          f"max rel err ours vs diffusers {err:.1e}")
    ours_steps, ref_steps = _unet_steps(ours, True, x, t, ctx), _unet_steps(ref, False, x, t, ctx)
    rows = []
    for mode in ("forward", "forward+backward"):
        med, _ = _interleaved({"ours": ours_steps[mode], "diffusers": ref_steps[mode]}, repeats, warmup)
        row = _ratio_row(mode, med["ours"], med["diffusers"], ".3f")
        if memory:
            mo, md = (_in_fresh_process("unet", impl=impl, mode=mode, threads=threads)["delta_mib"]
                      for impl in ("ours", "diffusers"))
            row += _ratio_row(mode, mo, md, ".0f")[1:]
        rows.append(row)
    header = ["", "ours s", "diffusers s", "ours/diffusers"]
    _table(header + (["ours MiB", "diffusers MiB", "ours/diffusers"] if memory else []), rows)
    print(f"(median of {repeats} interleaved runs after {warmup} warm-ups"
          + ("; MiB = peak RSS growth over model+inputs, one fresh process per cell)" if memory else ")"))
    return rows


# --------------------------------------------------------------------------------------------------
# train: one Algorithm 1 iteration, ours vs diffusers + peft; each build_* returns a no-argument step function


def _materialise(*modules):
    """Give every parameter its own private memory. Loaded from safetensors, frozen weights stay views of the
    mmapped file, so on the CPU several copies of one file share their pages (the baseline's frozen teacher and
    LoRA-teacher UNets would cost ~one UNet). On an accelerator each copy is real memory; this measures that."""
    with torch.no_grad():
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                t.data = t.data.clone()


def _text(seed=1):
    b = TRAIN_BENCH
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b["prompts"], b["tokens"], TRAIN_BENCH_UNET["cross_attention_dim"], generator=g)
    uncond = torch.randn(1, b["tokens"], TRAIN_BENCH_UNET["cross_attention_dim"], generator=g)
    return emb, uncond


def build_ours(folder, materialise=True):
    """Set up as swiftbrush.train() does (teacher frozen, LoRA injected into it, two Adams), step = train_step."""
    import swiftbrush as sb
    b = TRAIN_BENCH
    emb, uncond = _text()
    teacher = unet.load_unet(folder)
    if materialise:
        _materialise(teacher)
    cfg = sb.Config(model=folder, batch_size=b["batch"], lora_rank=b["lora_rank"], lora_alpha=b["lora_alpha"],
                    guidance=b["guidance"], lora_guidance=b["guidance"], lr=b["lr"], lora_lr=b["lora_lr"], ema_decay=0)
    m = sb.Models(teacher, copy.deepcopy(teacher), sb.Schedule(), [str(i) for i in range(b["prompts"])], emb, uncond,
                  (4, b["latent"], b["latent"]))
    state = sb.start_training(cfg, m, torch.device("cpu"))  # frozen teacher + LoRA, trainable student, two Adams

    def step():
        sb.train_step(m, cfg, state, nullcontext())
        state["step"] += 1

    step.student = lambda x, t, c: m.student(x, t, c)
    return step


def build_baseline(folder, materialise=True):
    """Three diffusers UNets (teacher, teacher + peft LoRA, student); Algorithm 1 written out plainly."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    b = TRAIN_BENCH
    emb, uncond = _text()
    abar = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    at = lambda t: (alpha[t].view(-1, 1, 1, 1), sigma[t].view(-1, 1, 1, 1))

    teacher = UNet2DConditionModel.from_pretrained(folder).requires_grad_(False).eval()
    fake = UNet2DConditionModel.from_pretrained(folder).requires_grad_(False)
    torch.manual_seed(0)
    fake.add_adapter(LoraConfig(r=b["lora_rank"], lora_alpha=b["lora_alpha"], target_modules=["to_q", "to_v"],
                                init_lora_weights=True))  # B = 0: eps_phi starts as eps_psi
    fake.train()
    phi = [p for p in fake.parameters() if p.requires_grad]
    student = UNet2DConditionModel.from_pretrained(folder).requires_grad_(True).train()
    if materialise:
        _materialise(teacher, fake, student)
    opt_student = torch.optim.Adam(student.parameters(), lr=b["lr"], betas=(0.9, 0.999), weight_decay=0.0)
    opt_lora = torch.optim.Adam(phi, lr=b["lora_lr"], betas=(0.9, 0.999), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    B, s = b["batch"], b["guidance"]

    def cfg_eps(unet, x_t, t, ctx):
        out = unet(torch.cat([x_t, x_t]), torch.cat([t, t]),
                   encoder_hidden_states=torch.cat([uncond.expand(B, -1, -1), ctx])).sample
        u, c = out.chunk(2)
        return u + s * (c - u)

    def step():
        ctx = emb[torch.randint(0, len(emb), (B,), generator=gen)]
        z = torch.randn(B, 4, b["latent"], b["latent"], generator=gen)
        T = torch.full((B,), 999, dtype=torch.long)
        a_T, s_T = at(T)
        x0 = (z - s_T * student(z, T, encoder_hidden_states=ctx).sample) / a_T          # 1: Eq. 7
        t = torch.randint(20, 981, (B,), generator=gen)                                 # 2
        eps = torch.randn(x0.shape, generator=gen)
        a_t, s_t = at(t)
        x_t = a_t * x0.detach() + s_t * eps
        with torch.no_grad():                                                           # 3: Eq. 5
            g = torch.nan_to_num(s_t ** 2 * (cfg_eps(teacher, x_t, t, ctx) - cfg_eps(fake, x_t, t, ctx)))
        loss = 0.5 * F.mse_loss(x0, (x0 - g).detach())                                  # 4
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt_student.step()
        opt_student.zero_grad(set_to_none=True)
        t2 = torch.randint(0, 1000, (B,), generator=gen)                                # 5: Eq. 6
        eps2 = torch.randn(x0.shape, generator=gen)
        drop = (torch.rand(B, generator=gen) < 0.1).view(B, 1, 1)
        ctx2 = torch.where(drop, uncond.expand_as(ctx), ctx)
        a2, s2 = at(t2)
        x_t2 = a2 * x0.detach() + s2 * eps2
        pred = fake(x_t2, t2, encoder_hidden_states=ctx2).sample
        loss_phi = F.mse_loss(a2 * pred, a2 * eps2)
        loss_phi.backward()
        torch.nn.utils.clip_grad_norm_(phi, 1.0)
        opt_lora.step()
        opt_lora.zero_grad(set_to_none=True)

    step.student = lambda x, t, c: student(x, t, encoder_hidden_states=c).sample
    return step


BUILD = {"ours": build_ours, "baseline": build_baseline}


def _train_memory(impl, folder, steps, materialise=True):
    """In a fresh process: import what `impl` needs, build it, then the peak RSS over `steps` iterations."""
    if impl == "ours":
        import swiftbrush  # noqa: F401  (no diffusers / peft in this process)
    else:
        from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: F401
        from peft import LoraConfig  # noqa: F401
    imports = _rss_mib()
    step = BUILD[impl](folder, materialise)
    built = _rss_mib()
    _, peak = _peak_rss(lambda: [step() for _ in range(steps)])
    return {"imports_mib": imports, "built_mib": built, "peak_mib": peak, "diffusers_loaded": "diffusers" in sys.modules}


def bench_train(repeats=7, warmup=2, memory=True, threads=1, materialise=True):
    threads = set_threads(threads)
    b = TRAIN_BENCH
    with tempfile.TemporaryDirectory() as folder:
        _random_diffusers_unet(TRAIN_BENCH_UNET).save_pretrained(folder)  # official unet/ folder layout
        ours, base = build_ours(folder, materialise), build_baseline(folder, materialise)
        x, t, ctx = _unet_inputs(TRAIN_BENCH_UNET, b["batch"], b["latent"], b["tokens"], seed=3)
        with torch.no_grad():  # same weights, same maths before timing anything
            err = _rel_err(ours.student(x, t, ctx), base.student(x, t, ctx))
        assert err < 1e-4, err
        n_params = sum(p.numel() for p in unet.load_unet(folder).parameters())
        med, all_times = _interleaved({"ours": ours, "baseline": base}, repeats, warmup)
        del ours, base
        print(f"Algorithm 1 (VSD) training iteration, fp32 CPU, {threads} threads, torch {torch.__version__}: "
              f"UNet block_out_channels={TRAIN_BENCH_UNET['block_out_channels']}, {n_params / 1e6:.1f} M params; "
              f"batch {b['batch']}, {b['latent']}x{b['latent']} latents, {b['tokens']}x"
              f"{TRAIN_BENCH_UNET['cross_attention_dim']} context, CFG {b['guidance']}, LoRA r={b['lora_rank']} "
              f"alpha={b['lora_alpha']} on to_q,to_v; student ours vs diffusers max rel err {err:.1e}")
        rows = [_ratio_row("s / iteration", med["ours"], med["baseline"], ".3f")]
        if memory:
            mo, mb = (_in_fresh_process("train", impl=impl, folder=folder, steps=warmup + 2, threads=threads,
                                        materialise=materialise) for impl in ("ours", "baseline"))
            assert not mo["diffusers_loaded"]
            over = lambda r, key: r[key] - r["imports_mib"]
            rows += [_ratio_row("peak RSS MiB", mo["peak_mib"], mb["peak_mib"], ".0f"),
                     _ratio_row("peak RSS over imports MiB", over(mo, "peak_mib"), over(mb, "peak_mib"), ".0f"),
                     _ratio_row("RSS after build, over imports MiB", over(mo, "built_mib"), over(mb, "built_mib"), ".0f")]
        _table(["", "ours", "diffusers+peft", "ours/baseline"], rows)
        print(f"(time: median of {repeats} interleaved iterations after {warmup} warm-ups each; all ours "
              f"{[round(s, 3) for s in all_times['ours']]}, baseline {[round(s, 3) for s in all_times['baseline']]}; "
              + (f"memory: one fresh process per variant, {warmup + 2} iterations; " if memory else "")
              + f"weights {'materialised (private copies)' if materialise else 'as loaded (mmap-shared)'})")
    return med, rows


# --------------------------------------------------------------------------------------------------

BENCHMARKS = {"unet": bench_unet, "train": bench_train}
MEASURE = {"unet": _unet_memory, "train": _train_memory}  # what a memory subprocess runs


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_mem"]:  # internal: one memory measurement in a fresh process
        return _memory_child(*argv[1:3])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", nargs="*", metavar="BENCHMARK",
                   help=f"benchmarks to run, of {', '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per implementation first")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op CPU threads (default 1: on a CPU shared with other jobs, OpenMP threads "
                        "spin-wait and a 2-thread step measured up to 50x slower; 0: all available CPUs)")
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess peak-memory measurements")
    p.add_argument("--mmap", action="store_true", help="train: keep frozen weights as views of the mmapped weights "
                   "file (copies of one file then share RSS pages: not what an accelerator would hold)")
    a = p.parse_args(argv)
    unknown = [w for w in a.which if w not in BENCHMARKS]
    if unknown:  # checked here: argparse rejects an empty nargs="*" list that has choices
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    common = dict(repeats=a.repeats, warmup=a.warmup, memory=not a.no_memory, threads=a.threads)
    for name in a.which or BENCHMARKS:
        BENCHMARKS[name](**common, **({"materialise": not a.mmap} if name == "train" else {}))


if __name__ == "__main__":
    main()
