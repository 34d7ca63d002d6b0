"""Where a paper-scale run stands on this machine, in two minutes: 20 Algorithm 1 iterations of the real train_step.

    python -m tools.selfcheck                        # CUDA: SD 2.1-base's exact UNet and text encoder, random weights
    python -m tools.selfcheck --model FOLDER_OR_HUB_ID  # a real teacher instead (its own text encoder; 12 demo prompts)
    python -m tools.selfcheck --batch-size 4 --checkpointing on --peak-tflops 989
    torchrun --standalone --nproc_per_node 8 -m tools.selfcheck   # data-parallel: 16 a GPU, per rank and in all

Without CUDA it runs the same on a small SD-shaped model in seconds (so CI runs it). Prints seconds per iteration,
images per second, the FLOPs of one iteration (counted by PyTorch's FlopCounterMode; they include the recomputed
forwards when gradient checkpointing is on), the model FLOPs utilisation (those FLOPs per second over the device's
peak dense bf16 FLOP/s, from the table below by device name, or --peak-tflops), the peak memory against the memory
plan, and the hours the paper's 65 000 iterations at batch 16 would take at this speed. Under torchrun every rank
runs it (the batch is the whole one, 16 a GPU by default, as swiftbrush.py's --batch-size) and rank 0 prints each
rank's images per second and MFU, and the whole run's. Random weights need no download: nothing here depends on
their values but the losses.
"""
import argparse
import copy
import json
import io
import sys
import time
import zlib
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

import swiftbrush as sb
from harness.distributed import World, check_world, close, data_parallel, quiet_unless_main
from harness.flags import AT_LEAST_1
from harness.steplog import StepLog
from memory.plan import peak_gb
from formats.prompts import PromptEmbeddings
from formats.text import Text
from parity.configs import SD2_TEXT, SD21_BASE
from tools.bench import TRAIN_BENCH_UNET
from unet import UNet

# Peak dense bf16 tensor FLOP/s (TFLOP/s, no sparsity), from the vendors' data sheets; the first name that the
# device's name contains wins, so the longer names come first.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H200", 989), ("H100", 989), ("B200", 2250),
                    ("A100", 312), ("L40S", 362), ("L40", 181), ("L4", 121), ("RTX 4090", 165), ("RTX 3090", 71),
                    ("A10", 125), ("A6000", 155)]
SMALL_TEXT = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
PAPER = {"steps": 65000, "batch": 16}  # the paper's run: 65,000 iterations at batch 16 (its supplementary)


class RandomTokens:
    """A tokenizer's stand-in for random weights (no vocabulary file needed): 77 ids per prompt, from its CRC."""
    model_max_length = 77

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def __call__(self, prompts, **kwargs):
        ids = [torch.randint(0, self.vocab_size, (self.model_max_length,),
                             generator=torch.Generator().manual_seed(zlib.crc32(p.encode()))) for p in prompts]
        return SimpleNamespace(input_ids=torch.stack(ids))


def random_models(cfg, device, big):
    """SD 2.1-base's UNet and text encoder (big) or small SD-shaped ones, random weights, as load_models gives."""
    from transformers import CLIPTextConfig, CLIPTextModel
    unet_config, text_config = (SD21_BASE, SD2_TEXT) if big else (TRAIN_BENCH_UNET, SMALL_TEXT)
    torch.manual_seed(0)
    with torch.device(device):  # built where it trains: SD 2.1-base's 866 M parameters initialise in a second
        teacher = UNet(json.loads(json.dumps(unet_config)))  # as read from config.json
        encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    prompts = [f"a random prompt number {i}" for i in range(256)]
    text = Text([RandomTokens(text_config["vocab_size"])], [encoder]).to(device)  # fp32
    embeddings = PromptEmbeddings(text, prompts)
    shape = (4, unet_config["sample_size"], unet_config["sample_size"])
    return sb.Models(teacher, copy.deepcopy(teacher), sb.Schedule(), prompts, embeddings, embeddings.uncond, shape)


def peak_tflops(device, given):
    """--peak-tflops, else the table's entry for the device's name; None when neither says."""
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_iterations(m, cfg, state, device, iterations):
    """The loop's pieces as train() runs them (train_step, the EMA's update, the step's numbers sent and the previous
    step's written: the host a step ahead of the device): the first iteration under the FLOP counter, the second a
    warm-up, the rest timed together. Returns (FLOPs of one iteration, seconds per iteration)."""
    iteration = loop_iteration(m, cfg, state, device)
    with FlopCounterMode(display=False) as counter:
        iteration()
    iteration()
    iteration.log.flush()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iterations - 2):
        iteration()
    iteration.log.flush()  # the last step's numbers: the host waits for the device to finish
    synchronize(device)
    return counter.get_total_flops(), (time.perf_counter() - t0) / (iterations - 2)


def loop_iteration(m, cfg, state, device):
    """One iteration of train()'s loop, without its files: a function, its StepLog as .log."""
    autocast = sb.autocast_for(device, cfg.precision)
    log = StepLog(io.StringIO(), state["world"], [])

    def iteration():
        started = time.time()
        logs = sb.train_step(m, cfg, state, autocast)
        sb.count_step(m, cfg, state)
        log.send(state["step"], logs, started)

    iteration.log = log
    return iteration


def gpu_idle_share(iteration, device, iterations=3):
    """The share of the time from the first kernel to the last of `iterations` iterations in which the GPU runs no
    kernel and no copy: the time it waits for the host. CUDA only (the profiler's device intervals), else None."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            iteration()
        iteration.log.flush()
        torch.cuda.synchronize(device)
    busy = [(e.start_ns(), e.end_ns()) for e in prof.profiler.kineto_results.events()
            if e.device_type() == torch.autograd.DeviceType.CUDA]
    return idle_share(busy)


def idle_share(intervals):
    """1 - (the length of the union of the [start, end) intervals) / (the last end - the first start); None for
    none."""
    if not intervals:
        return None
    intervals = sorted(intervals)
    busy, (start, end) = 0, intervals[0]
    for s, e in intervals[1:]:
        if s > end:  # a gap: the device was idle from end to s
            busy += end - start
            start = s
        end = max(end, e)
    busy += end - start
    span = max(e for _, e in intervals) - intervals[0][0]
    return 1 - busy / span if span > 0 else 0.0


def selfcheck(args):
    """Build, plan, run, and return the numbers printed (a dict)."""
    world = World.from_env()  # under torchrun: every rank runs the iterations, rank 0 prints
    quiet_unless_main(world)
    device = sb.training_device(args.device, world)
    big = device.type == "cuda" and not args.small
    batch = args.batch_size or (PAPER["batch"] if big else 2) * world.size  # the whole batch: 16 a GPU on CUDA
    cfg = sb.Config(model=args.model or "random", batch_size=batch, precision=args.precision, device=args.device,
                    teacher_precision=args.teacher_precision, checkpointing=args.checkpointing,
                    step_in_backward=args.step_in_backward, save_every=0, sample_every=0, diagnose_every=0,
                    prompts="demo")  # the speed does not depend on them
    check_world(cfg, world)
    sb.check_recipe(cfg, device)
    world.start(device)
    with world.local_first():
        m = sb.load_models(cfg, device) if args.model else random_models(cfg, device, big)
    state = sb.start_training(cfg, m, device, world)
    plan = state["plan"]
    what = args.model or ("SD 2.1-base's UNet and text encoder" if big else "a small SD-shaped UNet") + ", random weights"
    n_params = sum(p.numel() for p in m.student.parameters())
    precision = "bf16" if sb.uses_bf16(cfg.precision, device) else "fp32"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    ranks = f" over {world.size} ranks ({batch // world.size} a rank)" if world.size > 1 else ""
    print(f"selfcheck: {what} ({n_params / 1e6:.1f} M parameters), batch {batch}{ranks}, "
          f"latents {tuple(m.latent_shape)}, {precision}, the teacher's passes {args.teacher_precision or 'tf32'}, "
          f"checkpointing {'on' if plan['checkpointing'] else 'off'}, EMA on the "
          f"{'device' if plan['EMA on the device'] else 'CPU'}"
          + (", the student stepped inside its backward" if cfg.step_in_backward else "")
          + f"; {name}, torch {torch.__version__}")
    if not plan["fits"]:
        print(f"  the plan says this does not fit the device's {plan['device memory']:.1f} GB: expect out of memory; "
              f"try a smaller --batch-size")
    with data_parallel(state, world, device):
        flops, s_iter = run_iterations(m, cfg, state, device, args.iterations)
        idle = gpu_idle_share(loop_iteration(m, cfg, state, device), device)
    peak = peak_tflops(device, args.peak_tflops)
    per_rank = world.gather([s_iter, flops, peak_gb(device)])  # [[s/iter, FLOPs, peak GB]] of every rank
    # a step ends when the slowest rank's does; the run's FLOPs are every rank's, over all the devices' peak
    s_iter, flops = max(r[0] for r in per_rank), sum(r[1] for r in per_rank)
    activations = plan["activations (estimate)"]["on" if plan["checkpointing"] else "off"]
    planned = plan["device states in all"] + max(activations, plan.get("DDP bucket rebuild (once, at step 2)", 0))
    numbers = {"s_per_iter": s_iter, "images_per_s": batch / s_iter, "flops_per_iter": flops,
               "mfu": flops / s_iter / (peak * 1e12 * world.size) if peak else None, "peak_gb": peak_gb(device),
               "planned_gb": planned, "paper_hours": PAPER["steps"] * s_iter * PAPER["batch"] / batch / 3600,
               "gpu_idle": idle}
    print(f"  {args.iterations} iterations: {s_iter:.3f} s/iter (the last {args.iterations - 2}, run as train() "
          f"runs them), {numbers['images_per_s']:.2f} images/s" + (f" in all, over {world.size} ranks" if world.size > 1 else ""))
    print(f"  the GPU idle, waiting for the host: " + (f"{100 * idle:.1f}% of the time, {1000 * idle * s_iter:.1f} ms an "
          f"iteration (3 more iterations under the profiler)" if idle is not None else "not measured (CUDA only)"))
    if world.size > 1:
        numbers["ranks"] = [{"s_per_iter": s, "images_per_s": batch / world.size / s, "flops_per_iter": f,
                             "mfu": f / s / (peak * 1e12) if peak else None, "peak_gb": gb} for s, f, gb in per_rank]
        for r, one in enumerate(numbers["ranks"]):
            print(f"  rank {r}: {one['s_per_iter']:.3f} s/iter, {one['images_per_s']:.2f} images/s, "
                  + (f"MFU {100 * one['mfu']:.1f}%, " if peak else "") + f"peak memory {one['peak_gb']:.2f} GB")
    devices = f"{world.size} x " if world.size > 1 else ""
    print(f"  FLOPs per iteration (FlopCounterMode{', recomputation included' if plan['checkpointing'] else ''}"
          f"{', all ranks' if world.size > 1 else ''}): {flops:.3g}; "
          + (f"MFU {100 * numbers['mfu']:.1f}% of {devices}{peak} TFLOP/s (bf16 dense)" if peak
             else "MFU: unknown peak FLOP/s for this device, pass --peak-tflops"))
    print(f"  peak memory {numbers['peak_gb']:.2f} GB ({'CUDA max allocated' if device.type == 'cuda' else 'RSS'}); "
          f"the plan: {plan['device states in all']:.2f} GB of states + activations (estimate) = {planned:.2f} GB"
          + (f" of the device's {plan['device memory']:.1f} GB" if plan["device memory"] else ""))
    print(f"  the paper's {PAPER['steps']} iterations at batch {PAPER['batch']} at this speed: "
          f"{numbers['paper_hours']:.2f} hours ({PAPER['steps'] * PAPER['batch'] / batch * flops:.2g} FLOP)")
    return numbers


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Stable Diffusion folder or hub id (default: random weights, no download)")
    p.add_argument("--batch-size", type=AT_LEAST_1,
                   help=f"the whole batch, over every rank under torchrun (default {PAPER['batch']} a GPU on CUDA, the "
                        f"paper's; 2 a rank on the CPU)")
    p.add_argument("--iterations", type=int, default=20, help="Algorithm 1 iterations (>= 3; default 20)")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--teacher-precision", choices=["fp32", "tf32", "bf16"], help="as swiftbrush.py's (default tf32)")
    p.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--step-in-backward", action="store_true",
                   help="as swiftbrush.py's: the student's step inside its backward, its gradients never held whole")
    p.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s (default: by its name)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--small", action="store_true", help="the small model on CUDA too")
    args = p.parse_args(argv)
    if args.iterations < 3:
        p.error("--iterations must be >= 3 (one counted, one warm-up, the rest timed)")
    return args


def main(argv=None):
    try:
        numbers = selfcheck(parse_args(argv))
        close()  # torchrun's process group, if any
        return numbers
    except (sb.UsageError, sb.WeightsError) as e:
        sys.exit(f"selfcheck: error: {e}")
    except torch.cuda.OutOfMemoryError:
        sys.exit("selfcheck: out of GPU memory; try a smaller --batch-size or --checkpointing on")


if __name__ == "__main__":
    main()
