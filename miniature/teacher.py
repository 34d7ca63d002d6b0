"""The miniature's teacher: trained on the world (world.py) with the same UNet, DDPM schedule and diffusion loss as
Stable Diffusion, a small frozen random CLIP text encoder and a tokenizer written by world.py; pixel space, no VAE.

The miniature's teacher ships in the repository (miniature/weights/, 3.3 MB), built by this file's recipe, so a first
run starts at the student; `python -m miniature.teacher` rebuilds it from the recipe (15-30 minutes on 2 cores) and
replaces it only if the new one passes its checks. Any other recipe (miniature-quick's, or this one edited) is built
once per machine into the cache (SWIFTBRUSH_CACHE, else $XDG_CACHE_HOME/swiftbrush, else ~/.cache/swiftbrush), in a
folder named after a hash of its recipe. Either is written whole or not at all (harness/atomic.py) and trusted only
while the SHA-256 of every file matches the stamp written with it; a damaged one is rebuilt into the cache."""
import hashlib
import json
import os

import torch

from harness.atomic import atomic
from harness.checkpoint import export_unet
from formats.models import cache_root
from formats.text import load_text
from miniature import world
from swiftbrush import Schedule, cosine_lr, diffusion_loss, f_theta
from unet import UNet, load_unet

MAX_LENGTH = 8  # tokens: "a yellow triangle" is 5 with bos/eos
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "in_channels": 3, "out_channels": 3, "sample_size": world.RES,
    "block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": 1, "cross_attention_dim": 32,
    "norm_num_groups": 8, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
TEXT_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
SCHEDULER_CONFIG = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction", "clip_sample": False,
                    "set_alpha_to_one": False, "steps_offset": 1}
# The shapes are what a teacher learns last: 3000 steps with the lr decayed to 0 draw them (DDIM shape 0.99) where 1500
# at a constant lr left "a blue square" at 0.85, which every student then lost
# (docs/miniature.md#the-teacher-3000-steps-with-the-lr-decayed)
TRAINING = {"miniature": {"steps": 3000, "batch_size": 64, "lr": 1e-3, "lr_schedule": "cosine", "seed": 0},
            "miniature-quick": {"steps": 40, "batch_size": 16, "lr": 1e-3, "lr_schedule": "cosine", "seed": 0}}
STAMP = "miniature.json"
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")  # the miniature's, built by its recipe
# What the shipped teacher must show before a rebuild replaces it: its 25-step DDIM + CFG samples (sample.py) on the
# world's 12 prompts x 8 noises (the shipped one: colour 1.00, shape 1.00), and its one-step start (Eq. 7) near E[x0|z]
CHECKS = {"color_acc": 0.98, "shape_acc": 0.95, "start_error": 0.06}  # the previous teacher: shape 0.94, 0.068


def recipe(model):
    return {"unet": UNET_CONFIG, "text": TEXT_CONFIG, "scheduler": SCHEDULER_CONFIG, "max_length": MAX_LENGTH,
            "training": TRAINING[model], "world": world.PROMPTS}


def teacher_name(model):
    """{model}-teacher-{a hash of its recipe}: the cache's folder, and the name its reference rows are cached under."""
    digest = hashlib.sha256(json.dumps(recipe(model), sort_keys=True).encode()).hexdigest()[:12]
    return f"{model}-teacher-{digest}"


def teacher_folder(model):
    """The shipped folder if it was built by `model`'s recipe as it is now, else the cache's."""
    if _stamped_recipe(SHIPPED) == recipe(model):
        return SHIPPED
    return os.path.join(cache_root(), teacher_name(model))


def _stamped_recipe(folder):
    try:
        with open(os.path.join(folder, STAMP)) as f:
            return json.load(f)["recipe"]
    except (OSError, ValueError, KeyError):
        return None


def _files_sha(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            if name != STAMP and not name.startswith("reference-"):  # report.py's rows, stored beside it
                with open(path, "rb") as f:
                    out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def is_intact(folder):
    """True if `folder` holds a teacher whose files are the ones stamped when it was built, and load."""
    try:
        with open(os.path.join(folder, STAMP)) as f:
            if json.load(f)["files"] != _files_sha(folder):
                return False
        load_unet(folder), load_text(folder)
        return True
    except Exception:  # missing, damaged: rebuild rather than trust it
        return False


def build_teacher(model, progress=True):
    """The folder of the miniature's teacher: the shipped one, the cache's, or trained now (plain DDPM loss, 10%
    caption dropout for CFG) and cached."""
    folder = teacher_folder(model)
    if is_intact(folder):
        print(f"teacher: {folder} ({'shipped' if folder == SHIPPED else 'cached'})")
        return folder
    if folder == SHIPPED:  # a damaged checkout (a Git LFS pointer, a bad byte): the recipe rebuilds it in the cache
        print(f"teacher: {SHIPPED}'s files differ from its stamp ({STAMP}): a fresh checkout restores it")
        folder = os.path.join(cache_root(), teacher_name(model))
        if is_intact(folder):
            print(f"teacher: {folder} (cached)")
            return folder
    print(f"teacher: training the miniature's teacher once for this machine, into {folder}")
    _write_teacher(folder, model, progress)
    return folder


def _write_teacher(folder, model, progress):
    with atomic(folder, shared=True) as tmp:  # a killed build leaves only the temporary folder, a damaged teacher is replaced
        _train_teacher(tmp, TRAINING[model], progress)
        with open(os.path.join(tmp, STAMP), "w") as f:
            json.dump({"recipe": recipe(model), "files": _files_sha(tmp)}, f, indent=2)


def _train_teacher(folder, training, progress):
    from tqdm import tqdm
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.utils import logging
    logging.disable_progress_bar()
    ids = world.write_tokenizer(os.path.join(folder, "tokenizer"), max_length=MAX_LENGTH)
    torch.manual_seed(training["seed"])
    encoder = CLIPTextModel(CLIPTextConfig(**ids, **TEXT_CONFIG))
    encoder.save_pretrained(os.path.join(folder, "text_encoder"))  # frozen and random: its states still name the words
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=2)
    with open(os.path.join(folder, "prompts.txt"), "w") as f:  # the default prompts of a student
        f.write("\n".join(world.PROMPTS) + "\n")
    text = load_text(folder)
    embeddings, uncond = text.encode(world.PROMPTS), text.uncond
    unet, schedule = UNet(UNET_CONFIG), Schedule(SCHEDULER_CONFIG)
    opt = torch.optim.Adam(unet.parameters(), lr=training["lr"])
    gen = torch.Generator().manual_seed(training["seed"])
    for step in tqdm(range(training["steps"]), desc="teacher", disable=not progress, dynamic_ncols=True):
        x0, _, attrs = world.sample_world(training["batch_size"], generator=gen)
        context = embeddings[attrs["color"] * len(world.SHAPES) + attrs["shape"]]
        loss = diffusion_loss(unet, x0, context, uncond, schedule, gen, p_uncond=0.1, abar_weighted=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if training["lr_schedule"] == "cosine":
            for group in opt.param_groups:
                group["lr"] = cosine_lr(training["lr"], step, training["steps"])
        opt.step()
    export_unet(unet.state_dict(), UNET_CONFIG, os.path.join(folder, "unet"))


@torch.no_grad()
def teacher_checks(folder, per_prompt=8, seed=1000):
    """CHECKS' numbers of the teacher in `folder`: its DDIM + CFG samples' colour and shape accuracy (world.evaluate)
    and the rms distance of its one-step image to the Bayes-optimal E[x0 | z] (world.bayes_optimal_start)."""
    import sample
    from formats.models import scheduler_config
    from miniature import DEFAULTS
    text = load_text(folder)
    captions = [p for p in world.PROMPTS for _ in range(per_prompt)]
    context, uncond = text.encode(captions), text.uncond
    unet, schedule = load_unet(folder), Schedule(scheduler_config(folder))
    z = torch.randn((len(captions), 3, world.RES, world.RES), generator=torch.Generator().manual_seed(seed))
    samples = sample.ddim_sample(unet, schedule, context, uncond, z, 25, DEFAULTS["guidance"]).clamp(-1, 1)
    numbers = world.evaluate(samples, captions)
    alpha_T, sigma_T = schedule.alpha[-1].item(), schedule.sigma[-1].item()
    start = f_theta(unet, z, context, schedule)
    bayes = world.bayes_optimal_start(z, captions, alpha_T, sigma_T)
    return {"color_acc": numbers["color_acc"], "shape_acc": numbers["shape_acc"],
            "start_error": (start - bayes).square().mean().sqrt().item()}


def failed_checks(numbers):
    """The CHECKS `numbers` fails, as one line each (empty: it passes). The start error is an upper bound, the
    accuracies are lower bounds."""
    failed = []
    for key, bound in CHECKS.items():
        if key == "start_error" and numbers[key] > bound:
            failed.append(f"{key} {numbers[key]:.3f} > {bound}")
        if key != "start_error" and numbers[key] < bound:
            failed.append(f"{key} {numbers[key]:.3f} < {bound}")
    return failed


class CheckFailed(Exception):
    """A rebuilt teacher that fails its checks: the old one is kept."""


def rebuild(model="miniature", folder=SHIPPED, progress=True):
    """Train `model`'s recipe into a new folder, check it, and put it at `folder` only if it passes. Returns the
    checks' numbers; says whether the new weights equal the old ones bit for bit."""
    old = _files_sha(folder) if is_intact(folder) else None
    new = f"{folder}.rebuilt"
    _write_teacher(new, model, progress)
    numbers = teacher_checks(new)
    failed = failed_checks(numbers)
    if failed:
        raise CheckFailed(f"the rebuilt teacher ({new}) fails its checks: {'; '.join(failed)}; {folder} is kept")
    if old is None:
        compared = ""
    else:
        compared = ": the same bits as before" if old == _files_sha(new) else ": other bits than before"
    with atomic(folder) as tmp:
        os.replace(new, tmp)
    print(f"teacher: rebuilt into {folder}: " + ", ".join(f"{k} {v:.3f}" for k, v in numbers.items()) + compared)
    return numbers


if __name__ == "__main__":
    try:
        rebuild()
    except CheckFailed as e:
        raise SystemExit(f"miniature.teacher: {e}") from None
