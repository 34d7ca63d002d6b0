"""The teacher named by --model (a local Stable Diffusion folder, a model-hub id or an original single-file
checkpoint) and its scheduler config; its text encoders are formats/text.py's.

A hub id is looked up in the local hub cache first (`huggingface_hub`: HF_HOME, HF_HUB_OFFLINE); only when it is
missing there is the hub asked, and then only the five folders we read (SDXL's seven) are fetched, one weights file
each.
A single file (the A1111/ComfyUI kind) is unpacked once into a folder of the same layout in our cache.
"""
import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from harness.atomic import atomic
from harness.flags import UsageError
from unet import WeightsError
from vae import pixels_per_latent

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# One weights file per folder: the first of these that the repository has.
WEIGHTS = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                    "diffusion_pytorch_model.bin"),
           "text_encoder": ("model.safetensors", "model.fp16.safetensors")}
WEIGHTS["vae"] = WEIGHTS["unet"]
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
SINGLE_FILE = (".safetensors", ".ckpt", ".pt")
CLIP_TOKENIZER = "openai/clip-vit-large-patch14"  # the CLIP BPE of SD 1, 2 and both SDXL's (SD 2, bigG pad with "!")
TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]
# --------------------------------------------------------------------------------------------------
# --model: a local folder or a hub id


def pick_model(given, paper_teacher):
    """--model as given; by default the paper's teacher on a CUDA GPU, the miniature elsewhere. Says which and why."""
    if given:
        print(f"model: {given}")
        return given
    if torch.cuda.is_available():
        print(f"model: {paper_teacher} (the paper's teacher; a CUDA GPU is here)")
        return paper_teacher
    print(f"model: miniature (no CUDA GPU here; with one the default is {paper_teacher})")
    return "miniature"


def resolve_model(name, prediction_type=None):
    """A local Stable Diffusion folder (returned as it is), a hub id (its snapshot in the hub cache) or a single file
    (its unpacked folder in our cache). `prediction_type`: a single file's, which the file does not say."""
    if name.lower().endswith(SINGLE_FILE):
        return unpack_single_file(name, prediction_type)
    if prediction_type:
        raise UsageError("--prediction-type is for a single-file --model: a folder's scheduler config says it")
    if os.path.exists(name) or not HUB_ID.match(name):
        return name  # the loaders say what is wrong with a folder
    return hub_snapshot(name)


def cache_root():
    """Where the miniature's teacher and unpacked single files live: SWIFTBRUSH_CACHE, else ~/.cache/swiftbrush."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "swiftbrush")
    return os.environ.get("SWIFTBRUSH_CACHE") or default


def weight_parts(sdxl):
    """{folder: its weights files, in order of preference} of a model; SDXL's with its second text encoder."""
    return {**WEIGHTS, "text_encoder_2": WEIGHTS["text_encoder"]} if sdxl else WEIGHTS


def hub_files(repo_id, names):
    """The files to fetch from a repository listing `names`: every config, the tokenizers, one weights file per folder
    (SDXL: text_encoder_2/ and tokenizer_2/ too)."""
    parts = weight_parts("text_encoder_2/config.json" in names)
    wanted = [n for n in names if n == "model_index.json" or n.startswith(("tokenizer/", "tokenizer_2/", "scheduler/"))
              or n in [f"{part}/config.json" for part in parts]]
    for part, choices in parts.items():
        found = [f"{part}/{c}" for c in choices if f"{part}/{c}" in names]
        if not found or f"{part}/config.json" not in names:
            raise WeightsError(f"{repo_id} on the hub has no {part}/config.json with weights: it is not a Stable "
                               f"Diffusion model in the diffusers layout ({', '.join(PARTS)})")
        wanted.append(found[0])
    return wanted


def _complete(folder):
    try:
        with open(os.path.join(folder, "model_index.json")) as f:
            part = json.load(f).get("text_encoder_2") or [None, None]  # [library, class], or [null, null]: none
        sdxl = part[-1] is not None
    except (OSError, ValueError, AttributeError, TypeError, IndexError):
        sdxl = False
    parts = weight_parts(sdxl)
    return all(os.path.exists(os.path.join(folder, part, "config.json")) for part in parts) and all(
        any(os.path.exists(os.path.join(folder, part, c)) for c in choices) for part, choices in parts.items())


@dataclass(frozen=True)
class HubKind:
    """What hub_snapshot fetches from one kind of hub repository, and what it says when it cannot."""
    repo_type: str   # huggingface_hub's: "model" or "dataset"
    wanted: object   # (repo_id, the repository's file names) -> the files we read (raises when there are none)
    whole: object    # a cached snapshot folder -> whether it holds what we read
    instead: str     # what a user can pass instead of the hub id
    error: type      # what a failure raises


def hub_snapshot(repo_id, kind=None):
    """The cached snapshot of `repo_id` if it is whole; otherwise download what we read, with a progress bar.
    `kind`: a HubKind; by default a Stable Diffusion model's (hub_files, _complete)."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    kind = kind or MODEL_REPO
    try:
        folder = snapshot_download(repo_id, repo_type=kind.repo_type, local_files_only=True)
        if kind.whole(folder):
            return folder
    except (LocalEntryNotFoundError, OSError):
        pass
    cache, noun = constants.HF_HUB_CACHE, kind.repo_type
    try:
        wanted = kind.wanted(repo_id, HfApi().list_repo_files(repo_id, repo_type=kind.repo_type))
        return snapshot_download(repo_id, repo_type=kind.repo_type, allow_patterns=wanted)
    except GatedRepoError:
        raise kind.error(f"{repo_id} is gated on the hub: accept its terms there, then `hf auth login`") from None
    except RepositoryNotFoundError:
        raise kind.error(f"{repo_id}: no such local path or {noun} on the hub (a private one? `hf auth login`)") from None
    except (UsageError, WeightsError):
        raise
    except Exception as e:  # offline mode, no network, hub down: one line, whatever the library raised
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"the hub cannot be reached ({type(e).__name__})"
        flag = "" if noun == "model" else f" --repo-type {noun}"
        raise kind.error(f"{repo_id}: no such local path, and as a hub {noun} id it is not in the hub cache ({cache}) "
                         f"while {why}: download it with network (`hf download {repo_id}{flag}`), or "
                         f"{kind.instead}") from None


MODEL_REPO = HubKind("model", hub_files, _complete, "pass a folder", WeightsError)


# --------------------------------------------------------------------------------------------------
# --model FILE.safetensors: an original single-file checkpoint, unpacked once


# An unpacked SDXL file's model_index.json: a StableDiffusionXLPipeline folder (diffusers loads it as it is), whose
# CFG gives the empty prompt zeros (formats/text.py), as stabilityai/stable-diffusion-xl-base-1.0's says.
SDXL_INDEX = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
              "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
              "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
              "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
              "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}


def unpack_single_file(path, prediction_type=None):
    """The folder of an SD 1.x/2.x/XL single file, written into the cache on first use (keyed by the file's path,
    size, time and the prediction type), so every loader reads it like any other folder. The file says neither its
    prediction type (default epsilon: SD 1.x, 2.x-base, SDXL; SD 2.x-768 is v_prediction) nor its tokenizers."""
    from formats.single_file import FAMILY_NAMES, file_metadata, read_single_file, write_folder
    if not os.path.isfile(path):
        raise WeightsError(f"{path} not found; pass the path of a Stable Diffusion single-file checkpoint")
    prediction_type = prediction_type or file_metadata(path).get("prediction_type")  # our exports say it
    v = prediction_type == "v_prediction"  # SD 2.x-768: 768 px, attention upcast to fp32 (its config)
    stat = os.stat(path)
    key = json.dumps([os.path.realpath(path), stat.st_size, stat.st_mtime_ns, prediction_type or "epsilon"])
    name = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.join(cache_root(), f"single-{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")
    said = prediction_type or "epsilon (assumed: right for SD 1.x, 2.x-base and SDXL; SD 2.x-768 needs " \
                               "--prediction-type v_prediction)"
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        parts = read_single_file(path)
        family = parts["family"]
        if v and family != "sdxl":  # SD 2.x-768's config (SDXL's v finetunes keep SDXL's)
            parts["unet"][0].update(upcast_attention=True, sample_size=96)
        print(f"model: unpacking {path} ({FAMILY_NAMES[family]}) into {folder}")
        with atomic(folder, shared=True) as tmp:
            write_folder(parts, tmp, prediction_type or "epsilon")
            for sub, tokenizer in zip(("tokenizer", "tokenizer_2"),
                                      clip_tokenizers(family, os.path.dirname(os.path.abspath(path)))):
                tokenizer.save_pretrained(os.path.join(tmp, sub))
            with open(os.path.join(tmp, "model_index.json"), "w") as f:  # the mark of a whole folder
                index = SDXL_INDEX if family == "sdxl" else {"_class_name": "StableDiffusionPipeline"}
                json.dump(index | {"source": os.path.realpath(path)}, f, indent=2)
    print(f"model: {path}, prediction type {said}")
    return folder


def run_teacher(info):
    """The teacher folder a run recorded (swiftbrush.json); a single file's is unpacked again if the cache lost it."""
    if not os.path.isdir(info["folder"]) and info["model"].lower().endswith(SINGLE_FILE):
        return unpack_single_file(info["model"], info["config"].get("prediction_type"))
    return info["folder"]


def clip_tokenizers(family, beside):
    """The CLIP tokenizers a single file does not carry, one per text encoder (SDXL: two, the same BPE): a
    `tokenizer/` folder beside the file, else the hub's (cached, or fetched: 4 small files). SD 1 and SDXL's CLIP-L
    pad with the end token, SD 2 and SDXL's bigG with "!" (as SDXL's tokenizer_2/ and ComfyUI's clip_g tokenizer)."""
    from huggingface_hub import snapshot_download
    from transformers import CLIPTokenizer
    local = os.path.join(beside, "tokenizer")
    try:
        if os.path.isdir(local):
            tokenizer = CLIPTokenizer.from_pretrained(local)
        else:
            try:
                source = snapshot_download(CLIP_TOKENIZER, allow_patterns=TOKENIZER_FILES, local_files_only=True)
                tokenizer = CLIPTokenizer.from_pretrained(source)
            except Exception:  # not cached (whole): ask the hub
                source = snapshot_download(CLIP_TOKENIZER, allow_patterns=TOKENIZER_FILES)
                tokenizer = CLIPTokenizer.from_pretrained(source)
    except Exception as e:
        raise WeightsError(f"a single file carries no tokenizer, and the CLIP one ({CLIP_TOKENIZER}) is neither in "
                           f"{local} nor in the hub cache, nor reachable ({type(e).__name__}): fetch it once with "
                           f"`hf download {CLIP_TOKENIZER} {' '.join(TOKENIZER_FILES)}`") from None
    pads = {"sd1": [None], "sd2": ["!"], "sdxl": [None, "!"]}[family]
    tokenizers = [tokenizer] + [copy.deepcopy(tokenizer) for _ in pads[1:]]
    for tokenizer, pad in zip(tokenizers, pads):
        if pad:
            tokenizer.pad_token = pad
    return tokenizers


# --------------------------------------------------------------------------------------------------
# The parts we read besides the UNet, VAE and text (formats/text.py): the scheduler config and the latent shape


def scheduler_config(folder):
    """scheduler/scheduler_config.json as a dict; {} (Stable Diffusion's defaults) when there is none."""
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e}); re-copy it from the model repository") from None


def trailing_timesteps(T, steps):
    """`steps` of the T timesteps spaced as diffusers' "trailing" spacing, from T - 1 down (4 of 1000: 999, 749, 499,
    249): a K-step student's, and a DDIM teacher's whose scheduler config asks for trailing spacing. Exactly `steps`
    of them: np.arange's float step gives one more for some (T, steps) (1000 and 61, 103, ...; diffusers' trailing
    spacing runs that extra step), so the first `steps` are taken, diffusers' values."""
    return [int(t) for t in np.round(np.arange(T, 0, -T / steps)[:steps]) - 1]


def latent_shape(unet, vae, resolution=None):
    """(C, H, W) of x_0 at `resolution` pixels (default: the UNet's sample_size), checked against the downsampling."""
    factor = pixels_per_latent(vae.config) if vae is not None else 1
    res = resolution or unet.config.get("sample_size", 64) * factor
    multiple = factor * 2 ** (len(unet.config["block_out_channels"]) - 1)  # VAE and UNet downsampling
    if res % multiple:
        raise UsageError(f"--resolution {res} must be a multiple of {multiple}")
    return unet.config.get("in_channels", 4), res // factor, res // factor
