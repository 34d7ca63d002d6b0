"""The one-step student in the forms other tools load, from a swiftbrush.py run folder:

- `pipeline/`: a diffusers StableDiffusionPipeline folder (the student's UNet with the teacher's VAE, text encoder
  and tokenizer) whose scheduler makes one step exactly Eq. 7: `pipe(prompt, num_inference_steps=1,
  guidance_scale=0)`;
- `student.safetensors`: an original single file (UNet, VAE, text encoder) that A1111, ComfyUI and Forge load as a
  checkpoint, complete in the original layout (the schedule buffers; SD 1's position_ids; SD 2's OpenCLIP block 23,
  text_projection and logit_scale); `student-unet.safetensors`: the UNet alone, in the same layout. Both in the
  teacher's stored dtype (the schedule buffers fp32, as the original code holds them).

Written into RUN/export (the student's EMA) at the end of training, and by this command for any run's checkpoint:

    python -m formats.export runs/swiftbrush            # the EMA student (the one sample.py uses)
    python -m formats.export runs/swiftbrush --raw      # the student as trained, into RUN/export-raw
"""
import argparse
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from formats.models import load_text, run_teacher, scheduler_config
from formats.single_file import EXTRA_FILE, original_only_tensors, write_single_file
from harness.atomic import atomic
from harness.flags import UsageError
from unet import WEIGHT_FILES, WeightsError
from vae import load_vae

# One DDIM step with this is Eq. 7: "trailing" puts it at t = 999 (the default "leading" with steps_offset 1 would
# run it at t = 1), and set_alpha_to_one makes the step return the predicted x0 itself, not a re-noised x0.
ONE_STEP = {"_class_name": "DDIMScheduler", "timestep_spacing": "trailing", "set_alpha_to_one": True,
            "clip_sample": False, "thresholding": False}
PIPELINE = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}


def export_one_step(run, raw=False):
    """Write the three exports of `run`'s student (its EMA unless raw); returns the folder, or None with the reason
    printed when the run's student is not a one-step Stable Diffusion model other tools can run."""
    with open(os.path.join(run, "swiftbrush.json")) as f:
        info = json.load(f)
    teacher, unet_dir = run_teacher(info), os.path.join(run, "unet" if raw else "unet_ema")
    if not os.path.isdir(unet_dir):  # trained without an EMA
        unet_dir = os.path.join(run, "unet")
    if not os.path.isdir(unet_dir):
        raise UsageError(f"{run} has no exported student yet (it stopped before its first checkpoint): --resume it")
    if info["param"] != "x0":
        print("export: an eps student (--param eps) outputs its image without Eq. 7, which other tools always apply: "
              "only its unet/ folder is written")
        return None
    if not os.path.isdir(os.path.join(teacher, "vae")):
        print("export: the teacher has no VAE (the miniature works in pixels): only unet/ and unet_ema/ are written")
        return None
    out = os.path.join(run, "export-raw" if raw else "export")
    with atomic(out) as tmp:  # whole or not at all
        write_pipeline(unet_dir, teacher, os.path.join(tmp, "pipeline"))
        unet = load_file(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"))
        vae = load_vae(os.path.join(teacher, "vae")).state_dict()
        text = load_text(teacher)[1]
        family = "sd1" if text.config.hidden_act == "quick_gelu" else "sd2"  # SD 2's OpenCLIP uses gelu
        scheduler = scheduler_config(teacher)
        said = {"prediction_type": scheduler.get("prediction_type", "epsilon")}  # not in the tensors
        dtype = stored_dtype(teacher)  # an fp16 teacher gives an fp16 file: half the disk, as the tools expect
        unet, vae, text = cast(unet, dtype), cast(vae, dtype), cast(text.state_dict(), dtype)
        # Complete in the original layout: the teacher file's own extra tensors where it was a single file, the
        # neutral ones (original_only_tensors) where it lacks them
        own = os.path.join(teacher, EXTRA_FILE)
        extra = original_only_tensors(family, text, scheduler) | (load_file(own) if os.path.exists(own) else {})
        write_single_file(os.path.join(tmp, "student.safetensors"), unet, vae, text, family, extra, said)
        write_single_file(os.path.join(tmp, "student-unet.safetensors"), unet, family=family, metadata=said)
    return out


def stored_dtype(teacher):
    """The dtype of the teacher's stored UNet weights (fp16 for most single files people hold)."""
    for name in WEIGHT_FILES:
        path = os.path.join(teacher, "unet", name)
        if name.endswith(".safetensors") and os.path.exists(path):
            with safe_open(path, "pt") as f:
                return f.get_tensor(next(iter(f.keys()))).dtype
    return torch.float32


def cast(state_dict, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def write_pipeline(unet_dir, teacher, folder):
    """A diffusers pipeline folder: the student's unet/, the teacher's other parts (hard links where the file system
    allows: no second copy on disk), the one-step scheduler."""
    for part, src in (("unet", unet_dir), ("vae", os.path.join(teacher, "vae")),
                      ("text_encoder", os.path.join(teacher, "text_encoder")),
                      ("tokenizer", os.path.join(teacher, "tokenizer"))):
        os.makedirs(os.path.join(folder, part))
        for name in os.listdir(src):
            source, target = os.path.realpath(os.path.join(src, name)), os.path.join(folder, part, name)
            if not name.endswith((".safetensors", ".bin")):  # configs are copied: editing them must not touch
                shutil.copy2(source, target)                  # the teacher's files or the hub cache
                continue
            target = target.replace(".fp16.", ".")  # an fp16-only teacher: diffusers finds it without `variant`
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
    scheduler = scheduler_config(teacher)
    os.makedirs(os.path.join(folder, "scheduler"))
    for name, obj in (("scheduler/scheduler_config.json", scheduler | ONE_STEP), ("model_index.json", PIPELINE)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(obj, f, indent=2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="output folder of swiftbrush.py")
    p.add_argument("--raw", action="store_true", help="the student as trained, not its EMA")
    a = p.parse_args(argv)
    if not os.path.exists(os.path.join(a.run, "swiftbrush.json")):
        sys.exit(f"export: error: {a.run} is not a swiftbrush.py output folder (no swiftbrush.json)")
    try:
        out = export_one_step(a.run, a.raw)
    except (UsageError, WeightsError) as e:
        sys.exit(f"export: error: {e}")
    if out:
        print(f"export: {out}/pipeline, {out}/student.safetensors, {out}/student-unet.safetensors")


if __name__ == "__main__":
    main()
