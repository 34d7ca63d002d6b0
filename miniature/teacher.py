"""The miniature's teacher: trained on the world (world.py) with the same UNet, DDPM schedule and diffusion loss as
Stable Diffusion, a small frozen random CLIP text encoder and a tokenizer written by world.py; pixel space, no VAE.

Built once per machine into the cache (SWIFTBRUSH_CACHE, else $XDG_CACHE_HOME/swiftbrush, else ~/.cache/swiftbrush),
in a folder named after a hash of its recipe, written whole or not at all (harness/atomic.py). It is reused only
while the SHA-256 of every file matches the stamp written with it; a stale or damaged one is rebuilt."""
import hashlib
import json
import os

import torch

from harness.atomic import atomic
from harness.checkpoint import export_unet
from formats.models import cache_root, encode_prompts, load_text
from miniature import world
from swiftbrush import Schedule, diffusion_loss
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
TRAINING = {"miniature": {"steps": 1500, "batch_size": 64, "lr": 1e-3, "seed": 0},       # docs/miniature.md
            "miniature-quick": {"steps": 40, "batch_size": 16, "lr": 1e-3, "seed": 0}}   # seconds: checks an install
STAMP = "miniature.json"


def recipe(model):
    return {"unet": UNET_CONFIG, "text": TEXT_CONFIG, "scheduler": SCHEDULER_CONFIG, "max_length": MAX_LENGTH,
            "training": TRAINING[model], "world": world.PROMPTS}


def teacher_folder(model):
    digest = hashlib.sha256(json.dumps(recipe(model), sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_root(), f"{model}-teacher-{digest}")


def _files_sha(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            if name != STAMP:
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
    """The folder of the miniature's teacher: from the cache, or trained now (plain DDPM loss, 10% caption dropout
    for CFG) and cached."""
    folder = teacher_folder(model)
    if is_intact(folder):
        print(f"teacher: {folder} (cached)")
        return folder
    print(f"teacher: training the miniature's teacher once for this machine, into {folder}")
    with atomic(folder, shared=True) as tmp:  # a killed build leaves only the temporary folder, a damaged teacher is replaced
        _train_teacher(tmp, TRAINING[model], progress)
        with open(os.path.join(tmp, STAMP), "w") as f:
            json.dump({"recipe": recipe(model), "files": _files_sha(tmp)}, f, indent=2)
    return folder


def _train_teacher(folder, training, progress):
    from tqdm import tqdm
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.utils import logging
    logging.disable_progress_bar()
    ids = world.write_tokenizer(os.path.join(folder, "tokenizer"), max_length=MAX_LENGTH)
    torch.manual_seed(training["seed"])
    text = CLIPTextModel(CLIPTextConfig(**ids, **TEXT_CONFIG))
    text.save_pretrained(os.path.join(folder, "text_encoder"))  # frozen and random: its states still name the words
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=2)
    with open(os.path.join(folder, "prompts.txt"), "w") as f:  # the default prompts of a student
        f.write("\n".join(world.PROMPTS) + "\n")
    tokenizer, encoder = load_text(folder)
    embeddings, uncond = encode_prompts(tokenizer, encoder, world.PROMPTS), encode_prompts(tokenizer, encoder, [""])
    unet, schedule = UNet(UNET_CONFIG), Schedule(SCHEDULER_CONFIG)
    opt = torch.optim.Adam(unet.parameters(), lr=training["lr"])
    gen = torch.Generator().manual_seed(training["seed"])
    for _ in tqdm(range(training["steps"]), desc="teacher", disable=not progress, dynamic_ncols=True):
        x0, _, attrs = world.sample_world(training["batch_size"], generator=gen)
        context = embeddings[attrs["color"] * len(world.SHAPES) + attrs["shape"]]
        loss = diffusion_loss(unet, x0, context, uncond, schedule, gen, p_uncond=0.1, abar_weighted=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    export_unet(unet.state_dict(), UNET_CONFIG, os.path.join(folder, "unet"))
