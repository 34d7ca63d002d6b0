"""The flags of swiftbrush.py, each checked as it is read: a bad value is one argparse line naming the flag.

Only the flags given appear in the parsed result (argument_default=SUPPRESS), so that the model's own defaults (the
authors' for Stable Diffusion, the miniature's for the miniature) can fill in the rest."""
import argparse
import math

import torch


class UsageError(ValueError):
    """Bad flags, prompts or output folder: the run stops before it starts, with one line that says what to do."""


def _checked(kind, ok, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
        return value
    return parse


def training_device_flag(text):
    """--device: cpu, or a cuda (cuda:N) or mps device this machine has; else one line saying why not."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu, cuda, cuda:N or mps") from None
    here = {"cpu": lambda: True, "cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if device.type not in here:
        raise argparse.ArgumentTypeError(f"{text!r}: training runs on cpu, cuda, cuda:N or mps")
    if not here[device.type]():
        install = " (install the CUDA build of torch: README.md)" if device.type == "cuda" else ""
        raise argparse.ArgumentTypeError(f"{text!r}: this torch {torch.__version__} finds no {device.type.upper()} "
                                         f"device here{install}; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return text


AT_LEAST_1 = _checked(int, lambda v: v >= 1, ">= 1")
NEVER_OR_EVERY = _checked(int, lambda v: v >= 0, ">= 0 (0: never)")
POSITIVE = _checked(float, lambda v: 0 < v < math.inf, "positive")
FINITE = _checked(float, math.isfinite, "finite")
NUMBERS = {"steps": AT_LEAST_1, "batch_size": AT_LEAST_1, "grad_accum": AT_LEAST_1, "lora_rank": AT_LEAST_1,
           "lora_steps": AT_LEAST_1, "resolution": AT_LEAST_1, "seed": int, "lr": POSITIVE, "lora_lr": POSITIVE,
           "lora_alpha": POSITIVE,
           "guidance": FINITE, "lora_guidance": FINITE,
           "ema_decay": _checked(float, lambda v: 0 <= v < 1, "in [0, 1)"),
           "save_every": NEVER_OR_EVERY, "sample_every": NEVER_OR_EVERY, "diagnose_every": NEVER_OR_EVERY,
           "student_steps": AT_LEAST_1, "student_lora": _checked(int, lambda v: v >= 0, ">= 0 (0: the full student)"),
           "sds_start": _checked(int, lambda v: v >= 0, ">= 0 (0: the student starts from the teacher)")}


def uses_bf16(precision, device):
    """--precision, by default bf16 on CUDA and fp32 on the CPU (where bf16 runs too, to test the GPU recipe)."""
    return (precision or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"


def parse_args(argv, description, defaults):
    """`defaults`: swiftbrush.Config(), shown in the help."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--model", help=f"a local Stable Diffusion folder, a hub id, an original single file (.safetensors), "
                                   f"miniature or miniature-quick (default: {defaults.model} on a CUDA GPU, else miniature)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="a single-file --model's, which the file does not say (default epsilon: SD 1.x, 2.x-base)")
    p.add_argument("--prompts", help="a prompt file (.txt: one a line; .json, .jsonl, .csv, .parquet), a hub dataset "
                                     "id, or demo (12 built-in prompts); default on Stable Diffusion: JourneyDB's, "
                                     f"{defaults.prompts}, as the paper")
    p.add_argument("--out", help=f"output folder (default {defaults.out}; the miniature: runs/miniature)")
    p.add_argument("--loss", choices=["vsd", "sds"], help="VSD (Eq. 5, default) or SDS (Eq. 2)")
    p.add_argument("--param", choices=["x0", "eps"], help="student output: Eq. 7's x0 (default) or the raw eps")
    p.add_argument("--weighting", choices=["sigma2", "dmd"], help="w(t): sigma_t^2 (default) or DMD's")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"],
                   help="the student's lr: constant (default; the authors') or cosine (from --lr to 0 over the run)")
    p.add_argument("--lora-loss", choices=["abar", "plain"],
                   help="the LoRA teacher's loss: Eq. 6 weighted by abar_t (default) or the model's own DDPM loss")
    for name, kind in NUMBERS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=f"default {getattr(defaults, name)}")
    p.add_argument("--lora-targets", help=f"comma-separated Linear names to adapt (default {defaults.lora_targets})")
    p.add_argument("--student-init", help="start the student from another model of the teacher's architecture: a "
                                          "run, an export, a Stable Diffusion folder or hub id, a single file "
                                          "(default: a copy of the teacher)")
    p.add_argument("--device", type=training_device_flag, help="cuda, cuda:N, mps or cpu (default: cuda if available)")
    p.add_argument("--precision", choices=["bf16", "fp32"],
                   help="bf16: the GPU recipe, also on the CPU (default on CUDA) | fp32 (default on the CPU)")
    p.add_argument("--teacher-precision", choices=["fp32", "tf32", "bf16"],
                   help="the frozen teacher and its no-grad passes eps_psi, eps_phi, whose small difference is VSD's "
                        "g: tf32 (default: fp32 weights on CUDA's TF32; the CPU has none) | fp32 (TF32 off: 4.8x the "
                        "time) | bf16 (with --precision bf16: faster, a far noisier g) (docs/memory.md#precision)")
    p.add_argument("--checkpointing", choices=["auto", "on", "off"],
                   help="gradient checkpointing of both UNets: auto (default: on only where the memory plan "
                        "says the activations would not fit the device without it), on, off")
    p.add_argument("--step-in-backward", action="store_true",
                   help="step the student's Adam inside its backward (two backwards: the first for the clipping "
                        "norm), so that its gradients are never held whole; not with --grad-accum > 1")
    p.add_argument("--resume", action="store_true", default=False,
                   help="continue the checkpoint in --out if there is one, else start at step 0")
    p.add_argument("--ablation", nargs="?", const="paper", choices=["paper", "beyond"], default=False,
                   help="paper (the default): train the paper's three students (VSD + x0, SDS + x0, VSD + eps) and "
                        "compare them; beyond: VSD students in 1, 2 and 4 steps, the SDS student, and a VSD student "
                        "started from it")
    p.add_argument("--eval-captions", help="COCO's captions_val2014.json: evaluate each student (FID, CLIP score, "
                                           "FD-DINOv2) after training, with python -m evaluation; Stable Diffusion only")
    p.add_argument("--eval-images", help="COCO's val2014/ folder, the real images of FID and FD-DINOv2")
    p.add_argument("--eval-n", type=AT_LEAST_1, help="images per student (default 30000)")
    p.add_argument("--eval-metrics", help="default fid,clip,fd-dinov2")
    args = p.parse_args(argv)
    if args.ablation and args.resume:
        p.error("--ablation trains fresh students and cannot --resume: resume each of its folders alone")
    if args.ablation and ("loss" in args or "param" in args):
        p.error("--ablation sets --loss and --param itself: drop them")
    if args.ablation == "beyond" and ("student_steps" in args or "student_init" in args):
        p.error("--ablation beyond sets --student-steps and --student-init itself: drop them")
    if getattr(args, "step_in_backward", False) and getattr(args, "grad_accum", 1) > 1:
        p.error("--step-in-backward steps the student inside each backward, so it cannot hold gradients across "
                "--grad-accum micro-batches: use --grad-accum 1 or drop --step-in-backward")
    evals = [f"--{name.replace('_', '-')}" for name in ("eval_images", "eval_n", "eval_metrics") if name in args]
    if evals and "eval_captions" not in args:
        p.error(f"{', '.join(evals)}: evaluation needs --eval-captions captions_val2014.json")
    return args
