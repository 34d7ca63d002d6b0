"""The one-step (or K-step) student in the forms other tools load, from a swiftbrush.py run folder:

- `pipeline/`: a diffusers StableDiffusionPipeline folder (the student's UNet with the teacher's VAE, text encoder
  and tokenizer; for SDXL a StableDiffusionXLPipeline, with the second encoder and tokenizer) whose scheduler makes
  one step exactly Eq. 7: `pipe(prompt, num_inference_steps=1, guidance_scale=0)`; for a K-step student its K
  steps: `num_inference_steps=K`;
- `student-lora.safetensors` (a LoRA student, `--student-lora`): its adapter alone, in kohya's layout, which ComfyUI's
  LoraLoader, A1111 and diffusers' `load_lora_weights` apply to the teacher, or to any finetune of it, at a strength;
- `student.safetensors`: an original single file (UNet, VAE, text encoder) that A1111, ComfyUI and Forge load as a
  checkpoint, complete in the original layout (the schedule buffers; SD 1's position_ids; SD 2's OpenCLIP block 23,
  text_projection and logit_scale); `student-unet.safetensors`: the UNet alone, in the same layout. Both in the
  teacher's stored dtype (the schedule buffers fp32, as the original code holds them).

Written into RUN/export (the student's EMA) at the end of training, and by this command for any run's checkpoint:

    python -m formats.export runs/swiftbrush            # the EMA student (the one sample.py uses)
    python -m formats.export runs/swiftbrush --raw      # the student as trained, into RUN/export-raw

`read_student` reads every one of these forms back, and a run, for sample.py, the evaluation and --student-init.
"""
import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from formats.models import (HUB_ID, SDXL_INDEX, SINGLE_FILE, hub_snapshot, resolve_model, run_teacher, scheduler_config,
                            trailing_timesteps)
from formats.text import is_sdxl, load_text, zeros_for_empty
from formats.single_file import (EXTRA_FILE, file_metadata, is_full_checkpoint, original_only_tensors, read_single_file,
                                 write_single_file)
from harness.atomic import atomic
from harness.checkpoint import LORA_FILE
from harness.flags import UsageError
from lora import apply_lora_file, is_lora_file
from unet import WEIGHT_FILES, UNet, WeightsError, load_unet
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
# A K-step student's K steps are an LCMScheduler's: x0 from the UNet's output at t_k, then alpha x0 + sigma eps' at
# t_(k+1) with eps' from the pipeline's generator, and the last x0 as the image. original_inference_steps = K: then
# num_inference_steps=K gives trailing's timesteps wherever K divides T (any other K: pass timesteps=[...]); a
# timestep_scaling of 1e4 makes its boundary condition c_skip x_t + c_out x0 the x0 itself (c_skip < 3e-9 at t >= 1).
# steps_offset, which LCMScheduler does not use, is 1 only to spare the pipeline's warning about SD's old configs.
K_STEPS = {"_class_name": "LCMScheduler", "clip_sample": False, "thresholding": False, "set_alpha_to_one": True,
           "timestep_scaling": 1e4, "steps_offset": 1}
BETAS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")  # the teacher's noise schedule


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
    steps, schedule = info.get("student_steps", 1), scheduler_config(teacher)
    prediction_type = info.get("student_prediction_type") or schedule.get("prediction_type", "epsilon")
    said = {"prediction_type": prediction_type}  # not in the tensors
    if steps > 1:
        T = schedule.get("num_train_timesteps", 1000)
        timesteps = trailing_timesteps(T, steps)
        said |= {"student_steps": str(steps), "student_timesteps": json.dumps(timesteps)}
        lcm = lcm_timesteps(T, steps)
        if lcm != timesteps:
            print(f"export: diffusers' LCMScheduler runs a {steps}-step student at t = {lcm}, "
                  f"training's are {timesteps}: pass timesteps={timesteps} to the pipeline for the trained student's "
                  f"(sample.py reads them from the files)")
    out = os.path.join(run, "export-raw" if raw else "export")
    with atomic(out) as tmp:  # whole or not at all
        write_pipeline(unet_dir, teacher, os.path.join(tmp, "pipeline"), pipeline_scheduler(schedule, steps,
                                                                                              prediction_type))
        unet = load_file(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"))
        vae = load_vae(os.path.join(teacher, "vae")).state_dict()
        encoders = load_text(teacher).encoders  # SD: one CLIP; SDXL: CLIP ViT-L and OpenCLIP bigG
        family = file_family(encoders)
        dtype = stored_dtype(teacher)  # an fp16 teacher gives an fp16 file: half the disk, as the tools expect
        unet, vae, text = cast(unet, dtype), cast(vae, dtype), cast(encoders[0].state_dict(), dtype)
        text_2, said_file = None, said
        if family == "sdxl":  # with bigG's pooled width, which an SDXL UNet alone does not say (unet_config there)
            text_2 = cast(encoders[1].state_dict(), dtype)
            said_file = said | {"pooled_dim": str(encoders[1].config.projection_dim)}
        # Complete in the original layout: the teacher file's own extra tensors where it was a single file, the
        # neutral ones (original_only_tensors) where it lacks them
        own = os.path.join(teacher, EXTRA_FILE)
        extra = original_only_tensors(family, text, schedule) | (load_file(own) if os.path.exists(own) else {})
        write_single_file(os.path.join(tmp, "student.safetensors"), unet, vae, text, family, extra, said_file, text_2)
        write_single_file(os.path.join(tmp, "student-unet.safetensors"), unet, family=family, metadata=said_file)
        lora_file = os.path.join(unet_dir, LORA_FILE)
        if os.path.exists(lora_file):  # a LoRA student: its adapter alone, for the teacher or any finetune of it
            with safe_open(lora_file, "pt") as f:
                meta = f.metadata() or {}
            save_file(cast(load_file(lora_file), dtype), os.path.join(tmp, LORA_FILE), metadata=meta | said)
    return out


def lcm_timesteps(T, steps):
    """The timesteps diffusers' LCMScheduler gives the exported pipeline's `steps` steps (original_inference_steps =
    steps, strength 1): k = T // steps apart, from steps * k - 1 down to k - 1. Training's trailing spacing only where
    steps divides T (4 of 1000: 999, 749, 499, 249; 3 of 1000: 998, 665, 332 against 999, 666, 332)."""
    k = T // steps
    return [steps * k - 1 - i * k for i in range(steps)]


def file_family(encoders):
    """The single file's family, from the teacher's text encoders: SDXL has two; of one, SD 1's CLIP uses quick_gelu,
    SD 2's OpenCLIP gelu."""
    if len(encoders) == 2:
        return "sdxl"
    return "sd1" if encoders[0].config.hidden_act == "quick_gelu" else "sd2"


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


def pipeline_scheduler(teacher, steps, prediction_type):
    """The exported pipeline's scheduler config: the teacher's (`teacher`) as one DDIM step that is Eq. 7, or for a
    K-step student an LCMScheduler on the teacher's noise schedule; the student's own prediction type."""
    if steps == 1:
        config = teacher | ONE_STEP
    else:
        config = {k: teacher[k] for k in BETAS if k in teacher} | K_STEPS | {"original_inference_steps": steps}
    if config.get("prediction_type", "epsilon") != prediction_type:
        config["prediction_type"] = prediction_type
    return config


def write_pipeline(unet_dir, teacher, folder, scheduler):
    """A diffusers pipeline folder (SDXL's for an SDXL teacher): the student's unet/, the teacher's other parts (hard
    links where the file system allows: no second copy on disk), the scheduler's config `scheduler`."""
    sdxl = is_sdxl(teacher)
    parts = ["vae", "text_encoder", "tokenizer"] + (["text_encoder_2", "tokenizer_2"] if sdxl else [])
    for part, src in [("unet", unet_dir)] + [(part, os.path.join(teacher, part)) for part in parts]:
        os.makedirs(os.path.join(folder, part))
        for name in os.listdir(src):
            if name == LORA_FILE:  # a LoRA student's adapter: an export of its own, not a part of the pipeline
                continue
            source, target = os.path.realpath(os.path.join(src, name)), os.path.join(folder, part, name)
            if not name.endswith((".safetensors", ".bin")):  # configs are copied: editing them must not touch
                shutil.copy2(source, target)                  # the teacher's files or the hub cache
                continue
            target = target.replace(".fp16.", ".")  # an fp16-only teacher: diffusers finds it without `variant`
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
    os.makedirs(os.path.join(folder, "scheduler"))
    pipeline = (SDXL_INDEX if sdxl else PIPELINE) | {"scheduler": ["diffusers", scheduler["_class_name"]]}
    if sdxl:  # CFG's unconditional branch as the teacher's pipeline makes it (formats/text.py)
        pipeline["force_zeros_for_empty_prompt"] = zeros_for_empty(teacher)
    for name, obj in (("scheduler/scheduler_config.json", scheduler), ("model_index.json", pipeline)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(obj, f, indent=2)


# --------------------------------------------------------------------------------------------------
# Every form of a student, read back


@dataclass
class StoredStudent:
    """A student as read from a run or any of its forms."""
    unet: UNet
    param: str = "x0"            # its output: x0 (Eq. 7) or eps (--param eps)
    steps: int = 1               # K of a K-step student; 1: one step
    prediction_type: str = None  # its own; None where a UNet alone does not say (then its teacher's)
    model: str = None            # the folder of the VAE, text encoder and schedule it samples with; None: not known
    latent_shape: tuple = None   # a run's x_0 shape


def read_student(path, model=None, prediction_type=None, ema=True, lora_strength=1.0):
    """A run folder (its EMA UNet unless not ema), an exported pipeline or any Stable Diffusion folder (a hub id
    too), a single file (full or UNet-only), a LoRA student's LoRA file (applied to `model` at `lora_strength`) or a
    unet/ folder, as a StoredStudent. `model`: the teacher's folder where it is known, `prediction_type`: a single
    file's where its metadata does not say."""
    if not os.path.exists(path) and HUB_ID.match(path):
        path = hub_snapshot(path)
    if os.path.exists(os.path.join(path, "swiftbrush.json")):  # a run: its EMA (or raw) UNet, its teacher
        with open(os.path.join(path, "swiftbrush.json")) as f:
            info = json.load(f)
        sub = "unet_ema" if ema and os.path.isdir(os.path.join(path, "unet_ema")) else "unet"
        return StoredStudent(load_unet(os.path.join(path, sub)), info["param"], info.get("student_steps", 1),
                             info.get("student_prediction_type"), model or run_teacher(info), info["latent_shape"])
    if any(os.path.exists(os.path.join(path, name)) for name in ("model_index.json", "unet/config.json")):
        # an exported pipeline, or any Stable Diffusion folder
        return StoredStudent(load_unet(path), **scheduler_says(scheduler_config(path)), model=model or path)
    if path.lower().endswith(SINGLE_FILE):
        said = file_metadata(path)  # our exports record K and the prediction type
        steps = int(said.get("student_steps", 1))
        if is_lora_file(path):
            if model is None:
                raise UsageError(f"{path} is a LoRA: pass --model, the model to apply it to (its teacher, or any "
                                 f"finetune of the teacher's architecture)")
            unet = apply_lora_file(load_unet(model), path, lora_strength)
            return StoredStudent(unet.eval(), steps=steps, model=model,
                                 prediction_type=said.get("prediction_type", prediction_type))
        if is_full_checkpoint(path):
            folder = resolve_model(path, prediction_type)
            return StoredStudent(load_unet(folder), steps=steps, model=model or folder,
                                 prediction_type=scheduler_config(folder).get("prediction_type", "epsilon"))
        config, sd = read_single_file(path, full=False)["unet"]
        unet = UNet(config)
        unet.load_state_dict(sd, strict=True)
        return StoredStudent(unet.eval(), steps=steps, prediction_type=said.get("prediction_type", prediction_type),
                             model=model)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise UsageError(f"{path}: not a swiftbrush.py run (no swiftbrush.json), an export of one, a Stable "
                         f"Diffusion folder nor a unet/ folder")
    return StoredStudent(load_unet(path), model=model)


def scheduler_says(config):
    """What a pipeline's scheduler config says of its student: K (ours: an LCMScheduler's original_inference_steps)
    and the prediction type."""
    steps = config.get("original_inference_steps", 1) if config.get("_class_name") == "LCMScheduler" else 1
    return {"steps": steps, "prediction_type": config.get("prediction_type", "epsilon")}


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
