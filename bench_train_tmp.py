"""Benchmark: one training iteration of Algorithm 1 (VSD), ours vs the straightforward diffusers + peft version, CPU.

    python bench_train_tmp.py                      # seconds per iteration and peak memory, ours vs baseline
    python bench_train_tmp.py --repeats 9 --threads 2 --no-memory

Ours: `swiftbrush.train_step` with ONE teacher UNet that is both eps_psi (LoRA off) and eps_phi (LoRA on), plus the
student. Baseline: what one writes with diffusers + peft: a frozen teacher UNet2DConditionModel, a second
UNet2DConditionModel carrying a peft LoRA (LoraConfig r, alpha, to_q/to_v) for eps_phi, and the student: three
UNets. Same config, weights, batch, CFG, losses, clipping and Adam; fp32 on the CPU.

Time: both in one process, warm-up, then interleaved (order flipped every round), medians. Memory: one fresh
subprocess per variant, which imports only what that variant needs, builds its models, then resets the kernel's
RSS high-water mark (/proc/self/clear_refs) and runs warm-up + timed iterations: "peak" is the RSS high-water mark
during training (ru_maxrss where the reset is unavailable), "over imports" subtracts the RSS the process had after
its imports (torch's CPU allocator is invisible to tracemalloc and cannot be reset in-process).
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

# SD-shaped (CrossAttn x2 + Down, linear proj, 64-dim heads, 77 tokens), small enough for a 2-core CPU.
TRAIN_BENCH_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[64, 128, 128],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=[1, 2, 2], cross_attention_dim=256, use_linear_projection=True, norm_num_groups=32)
# Algorithm 1 settings (the paper's, LoRA rank scaled with the channels: 64/108 on 320-1280 channels -> 16/27).
TRAIN_BENCH = dict(batch=2, latent=32, tokens=77, prompts=64, lora_rank=16, lora_alpha=27.0, guidance=4.5,
                   lr=1e-6, lora_lr=1e-3)


def set_threads(n=None):
    n = n or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(n)
    return n


def make_weights(folder, seed=0):
    """A random SD-shaped unet/ folder (official layout), perturbed so that no weight is zero."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**TRAIN_BENCH_UNET)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref.save_pretrained(folder)
    return folder


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


# --------------------------------------------------------------------------------------------------
# The two implementations of one Algorithm 1 iteration; each returns a no-argument step function.


def build_ours(folder, materialise=True):
    """Set up as swiftbrush.train() does (teacher frozen, LoRA injected into it, two Adams), step = train_step."""
    import swiftbrush as sb
    from lora import inject_lora
    from unet import load_unet
    b = TRAIN_BENCH
    emb, uncond = _text()
    teacher = load_unet(folder)
    if materialise:
        _materialise(teacher)
    cfg = sb.Config(model=folder, batch_size=b["batch"], lora_rank=b["lora_rank"], lora_alpha=b["lora_alpha"],
                    guidance=b["guidance"], lora_guidance=b["guidance"], lr=b["lr"], lora_lr=b["lora_lr"])
    m = sb.Models(teacher, copy.deepcopy(teacher), sb.Schedule(), [str(i) for i in range(b["prompts"])], emb, uncond,
                  (4, b["latent"], b["latent"]))
    m.unet.requires_grad_(False)
    m.student.requires_grad_(True).train()
    torch.manual_seed(0)
    phi = inject_lora(m.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","))
    for p in phi:
        p.requires_grad_(True)
    m.unet.train()
    opt_lora = torch.optim.Adam(phi, lr=cfg.lora_lr, betas=(0.9, 0.999), weight_decay=0.0)
    opt_student = torch.optim.Adam(m.student.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    state = {"step": 0, "cursor": 0, "order": torch.randperm(len(m.prompts), generator=gen)}

    def step():
        sb.train_step(m, cfg, state, opt_student, opt_lora, gen, nullcontext())
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


# --------------------------------------------------------------------------------------------------
# Measurement


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved(fns, repeats, warmup):
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
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _warm_libraries():
    """Load what both variants load lazily (Adam's foreach/dynamo imports, oneDNN, SDPA, autograd) before the
    reference RSS is read, so that "over imports" counts tensors, not code."""
    p = torch.nn.Parameter(torch.randn(1, 4, 8, 8))
    opt = torch.optim.Adam([p], lr=1e-3)
    q = torch.nn.functional.conv2d(p, torch.randn(4, 4, 3, 3), padding=1).flatten(2).transpose(1, 2)[:, None]
    F.scaled_dot_product_attention(q, q, q).square().mean().backward()
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    opt.step()


def _memory_child(impl, folder, steps, threads, materialise=True):
    """In a fresh process: import what `impl` needs, build it, then the peak RSS over warm-up + `steps` iterations."""
    set_threads(threads)
    if impl == "ours":
        import swiftbrush  # noqa: F401  (no diffusers / peft in this process)
    else:
        from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: F401
        from peft import LoraConfig  # noqa: F401
    _warm_libraries()
    imports = _rss_mib()
    step = BUILD[impl](folder, materialise)
    built = _rss_mib()
    reset = _reset_peak_rss()
    for _ in range(steps):
        step()
    peak = _rss_mib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"imports_mib": imports, "built_mib": built, "peak_mib": peak,
                      "diffusers_loaded": "diffusers" in sys.modules, "hwm_reset": reset}))


def _memory(impl, folder, steps, threads, materialise=True):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "_mem", impl, folder, str(steps), str(threads),
                          str(int(materialise))],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"memory child {impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def bench_train(repeats=7, warmup=2, memory=True, threads=None, materialise=True):
    threads = set_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        make_weights(folder)
        ours, base = build_ours(folder, materialise), build_baseline(folder, materialise)
        g = torch.Generator().manual_seed(3)
        x, c = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, TRAIN_BENCH_UNET["cross_attention_dim"], generator=g)
        with torch.no_grad():  # same weights, same maths before timing anything
            a, b = ours.student(x, torch.tensor([999, 10]), c), base.student(x, torch.tensor([999, 10]), c)
            err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 1e-4, err
        from unet import load_unet
        n_params = sum(p.numel() for p in load_unet(folder).parameters())
        med, all_times = _interleaved({"ours": ours, "baseline": base}, repeats, warmup)
        del ours, base
        b = TRAIN_BENCH
        print(f"Algorithm 1 (VSD) training iteration, fp32 CPU, {threads} threads, torch {torch.__version__}: "
              f"UNet block_out_channels={TRAIN_BENCH_UNET['block_out_channels']}, {n_params / 1e6:.1f} M params; "
              f"batch {b['batch']}, {b['latent']}x{b['latent']} latents, {b['tokens']}x"
              f"{TRAIN_BENCH_UNET['cross_attention_dim']} context, CFG {b['guidance']}, LoRA r={b['lora_rank']} "
              f"alpha={b['lora_alpha']} on to_q,to_v; student ours vs diffusers max rel err {err:.1e}")
        rows = [["s / iteration", f"{med['ours']:.3f}", f"{med['baseline']:.3f}", f"{med['ours'] / med['baseline']:.2f}"]]
        if memory:
            mo = _memory("ours", folder, warmup + 2, threads, materialise)
            mb = _memory("baseline", folder, warmup + 2, threads, materialise)
            assert not mo["diffusers_loaded"]
            rows.append(["peak RSS MiB", f"{mo['peak_mib']:.0f}", f"{mb['peak_mib']:.0f}",
                         f"{mo['peak_mib'] / mb['peak_mib']:.2f}"])
            over = lambda r: r["peak_mib"] - r["imports_mib"]
            rows.append(["peak RSS over imports MiB", f"{over(mo):.0f}", f"{over(mb):.0f}", f"{over(mo) / over(mb):.2f}"])
            rows.append(["RSS after build, over imports MiB", f"{mo['built_mib'] - mo['imports_mib']:.0f}",
                         f"{mb['built_mib'] - mb['imports_mib']:.0f}",
                         f"{(mo['built_mib'] - mo['imports_mib']) / (mb['built_mib'] - mb['imports_mib']):.2f}"])
        _table(["", "ours", "diffusers+peft", "ours/baseline"], rows)
        print(f"(time: median of {repeats} interleaved iterations after {warmup} warm-ups each; all ours "
              f"{[round(x, 3) for x in all_times['ours']]}, baseline {[round(x, 3) for x in all_times['baseline']]}; "
              f"memory: one fresh process per variant, {warmup + 2} iterations; weights "
              f"{'materialised (private copies)' if materialise else 'as loaded (mmap-shared)'})")
    return med, rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_mem"]:  # internal: one memory measurement in a fresh process
        return _memory_child(argv[1], argv[2], int(argv[3]), int(argv[4]), bool(int(argv[5])))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a CPU shared with other jobs, intra-op threads spin-wait and "
                        "a 2-thread step measured up to 50x slower; 0: all available CPUs)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--mmap", action="store_true", help="keep frozen weights as views of the mmapped weights file "
                   "(copies of one file then share RSS pages: not what an accelerator would hold)")
    a = p.parse_args(argv)
    bench_train(a.repeats, a.warmup, not a.no_memory, a.threads or None, not a.mmap)


if __name__ == "__main__":
    main()
