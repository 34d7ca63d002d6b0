"""Benchmarks against diffusers (used here only as the baseline), on this machine's CPU.

    python bench.py unet               # our UNet vs diffusers' UNet2DConditionModel: forward, forward+backward, memory
    python bench.py unet --repeats 9 --no-memory

Each benchmark runs both implementations in one process on the same config, weights and inputs, interleaving the
repeats (warm-up, then ours/diffusers alternately, the order flipped every round) and reports medians. Peak memory
is measured in a fresh subprocess per variant: the peak RSS (VmHWM, reset via /proc/self/clear_refs once the model and
inputs exist) during one step, minus the RSS before it (torch's CPU allocator is invisible to tracemalloc).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import unet

# SD 2.1-base wiring (CrossAttn x3 + Down, linear proj, 64-dim heads, 1024-dim text states, 77 tokens),
# channels scaled 1/5 so that a 2-core CPU runs it in seconds. Heads = channels / 64 per block.
UNET_BENCH_CONFIG = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[64, 128, 256, 256],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    attention_head_dim=[1, 2, 4, 4], cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32)
UNET_BENCH_INPUT = dict(batch=2, latent=32, tokens=77)


def cpu_threads():
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(n)
    return n


def _build_unets(config, seed=0):
    """diffusers' model with random (perturbed, so nothing is zero) weights, and ours with the same weights."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**config)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = unet.UNet(json.loads(json.dumps(config)))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _unet_inputs(config, batch, latent, tokens, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], latent, latent, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, tokens, config["cross_attention_dim"], generator=g)
    return x, t, ctx


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


def _proc_status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def _reset_peak_rss():
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_memory_child(impl, mode):
    """Run in a subprocess: MiB of peak-RSS growth over one `mode` step of `impl`, once the model and inputs exist."""
    cpu_threads()
    cfg, inp = UNET_BENCH_CONFIG, UNET_BENCH_INPUT
    if impl == "ours":  # build only the measured model
        model = unet.UNet(json.loads(json.dumps(cfg)))
    else:
        from diffusers import UNet2DConditionModel
        model = UNet2DConditionModel(**cfg)
    x, t, ctx = _unet_inputs(cfg, **inp)
    step = _unet_steps(model, impl == "ours", x, t, ctx)[mode]
    if _reset_peak_rss():  # peak RSS (VmHWM) from here on, over the current RSS
        base = _proc_status_mib("VmRSS")
        step()
        peak = _proc_status_mib("VmHWM")
    else:  # ru_maxrss cannot be reset: its growth underestimates when construction peaked higher
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"delta_mib": peak - base, "peak_mib": peak}))


def _peak_memory(impl, mode):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "_mem", impl, mode],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_unet(repeats=7, warmup=2, memory=True):
    threads = cpu_threads()
    cfg, inp = UNET_BENCH_CONFIG, UNET_BENCH_INPUT
    ours, ref = _build_unets(cfg)
    x, t, ctx = _unet_inputs(cfg, **inp)
    with torch.no_grad():  # same maths before timing anything
        a, b = ours(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample
        err = ((a - b).abs().max() / b.abs().max()).item()
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"UNet: SD2.1-base wiring, block_out_channels={cfg['block_out_channels']}, heads={cfg['attention_head_dim']} "
          f"(head dim 64), {n_params / 1e6:.1f} M params; batch {inp['batch']}, {inp['latent']}x{inp['latent']} latents, "
          f"{inp['tokens']}x{cfg['cross_attention_dim']} context; fp32 CPU, {threads} threads, torch {torch.__version__}; "
          f"max rel err ours vs diffusers {err:.1e}")
    ours_steps = _unet_steps(ours, True, x, t, ctx)
    ref_steps = _unet_steps(ref, False, x, t, ctx)
    rows = []
    for mode in ("forward", "forward+backward"):
        med, _ = _interleaved({"ours": ours_steps[mode], "diffusers": ref_steps[mode]}, repeats, warmup)
        row = [mode, f"{med['ours']:.3f}", f"{med['diffusers']:.3f}", f"{med['ours'] / med['diffusers']:.2f}"]
        if memory:
            mo, md = _peak_memory("ours", mode), _peak_memory("diffusers", mode)
            row += [f"{mo['delta_mib']:.0f}", f"{md['delta_mib']:.0f}", f"{mo['delta_mib'] / max(md['delta_mib'], 1e-9):.2f}"]
        rows.append(row)
    header = ["", "ours s", "diffusers s", "ratio"] + (["ours MiB", "diffusers MiB", "ratio"] if memory else [])
    _table(header, rows)
    print(f"(median of {repeats} interleaved runs after {warmup} warm-ups; MiB = peak RSS growth over model+inputs, "
          f"one fresh process per cell)")
    return rows


def _table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


BENCHMARKS = {"unet": bench_unet}


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["_mem"]:  # internal: one memory measurement in a fresh process
        return _peak_memory_child(*argv[1:3])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", nargs="+", choices=sorted(BENCHMARKS), help="benchmarks to run")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess peak-memory measurement")
    a = p.parse_args(argv)
    for name in a.which:
        BENCHMARKS[name](repeats=a.repeats, warmup=a.warmup, memory=not a.no_memory)


if __name__ == "__main__":
    main()
