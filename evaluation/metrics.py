"""The metrics, computed as SwiftBrush v2, DMD2 and GigaGAN compute them (docs/evaluation.md has the protocol):

- FID (Heusel et al. 2017): the Frechet distance of Inception-v3 pool features (2048), clean-fid's torchscript
  network `inception-2015-12-05.pt` (the TF-FID weights). Every image, generated or real, is centre-cropped to a
  square and Lanczos-resized to 256 px (GigaGAN's rule), then resized to 299 px by clean-fid's "clean" resize
  (its own resizer when clean-fid is installed, as it is wherever FID is measured).
- FD-DINOv2 (Stein et al. 2023, their dgm-eval): the same distance in DINOv2 ViT-L/14 features (1024: the CLS token
  after the last layer norm) of the same 256 px images resized to 224 px (bicubic), ImageNet mean and std.
- CLIP score: the mean over images of cos(E_image(image), E_text("A photo depicts " + caption)) with OpenCLIP
  ViT-g/14 (laion2b_s12b_b42k): the plain cosine of the two embeddings, so SwiftBrush's 0.29 is on this scale (not
  torchmetrics' 100 * max(cos, 0)). The model's PIL image processor (224 px, bicubic, centre crop) reads the same
  256 px square, as SwiftBrush v2's, DMD2's and GigaGAN's evaluations give it to OpenCLIP.
"""
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from harness.flags import UsageError

EVAL_SIZE = 256              # GigaGAN's centre crop + Lanczos, before every feature network
CLIP_MODEL = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"  # OpenCLIP ViT-g/14 laion2b_s12b_b42k, in transformers' layout
CLIP_PREFIX = "A photo depicts "  # prepended to each caption (Hessel et al. 2021), as GigaGAN, DMD2 and SwiftBrush v2
DINOV2_MODEL = "facebook/dinov2-large"  # ViT-L/14, dgm-eval's default (torch hub dinov2_vitl14: the same weights)
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
CLEANFID_FOLDER = "/tmp"     # where clean-fid itself keeps (and downloads) the Inception weights
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
METRICS = ("fid", "clip", "fd-dinov2")
CLEANFID_MISSING = ("FID needs clean-fid, which is not installed: `pip install clean-fid` (an optional install), or leave "
                    "fid out of the metrics")


def parse_metrics(text, flag="--metrics"):
    """"fid,clip" -> ["fid", "clip"]: names of METRICS, each once."""
    names = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not names or any(m not in METRICS for m in names):
        raise UsageError(f"{flag} {text!r}: give a comma-separated list of {', '.join(METRICS)}")
    return names


# --------------------------------------------------------------------------------------------------
# The statistics the Frechet distance compares


class FeatureStats:
    """Mean and covariance (n - 1 normalised, as np.cov) of features added batch by batch, in float64 and about
    the first batch's mean so that the sums do not cancel: 30K features never need to be held at once."""

    def __init__(self):
        self.n, self.shift, self.sum, self.outer = 0, None, 0.0, 0.0

    def add(self, features):
        f = np.asarray(features, np.float64)
        if self.shift is None:
            self.shift = f.mean(0)
        c = f - self.shift
        self.n += len(f)
        self.sum = self.sum + c.sum(0)
        self.outer = self.outer + c.T @ c

    def mean_cov(self):
        if self.n < 2:
            raise UsageError("a Frechet distance needs at least 2 images")
        m = self.sum / self.n
        return self.shift + m, (self.outer - self.n * np.outer(m, m)) / (self.n - 1)


# --------------------------------------------------------------------------------------------------
# What each network reads: the 256 px square, and from it each network's input


def square(image, size=EVAL_SIZE):
    """GigaGAN's rule: RGB, centre crop to the shorter side (torchvision's rounding), Lanczos to size x size."""
    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
    return image.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)


def clean_resize(image, size=299):
    """clean-fid's "clean" resize as its make_resizer("PIL", False, "bicubic", (size, size)) computes it: each channel
    in float32 through PIL's bicubic, not rounded, clipped to [0, 255] (bicubic overshoots at sharp edges; clean-fid
    clips since 0.1.21): [3, size, size], what its Inception network reads."""
    x = np.asarray(image, np.float32)
    channels = [Image.fromarray(x[:, :, c]).resize((size, size), Image.BICUBIC) for c in range(3)]
    return np.stack([np.asarray(c).clip(0, 255) for c in channels])


@functools.cache
def cleanfid_resizer():
    """clean-fid's own "clean" resizer (HWC in, HWC float32 out), or None where clean-fid is not installed."""
    try:
        from cleanfid.resize import build_resizer
    except ImportError:
        return None
    return build_resizer("clean")


def inception_input(image):
    """The 256 px square resized for Inception by clean-fid's own resizer, or by clean_resize (the same formula)
    without clean-fid: [3, 299, 299] float32 in [0, 255]."""
    resizer = cleanfid_resizer()
    return clean_resize(image) if resizer is None else resizer(np.asarray(image)).transpose(2, 0, 1)


def dinov2_input(image):
    """dgm-eval's DINOv2 transform: bicubic to 224 x 224, [0, 1], ImageNet mean and std: [3, 224, 224]."""
    x = np.asarray(image.resize((224, 224), Image.BICUBIC), np.float32) / 255
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32).transpose(2, 0, 1)


# --------------------------------------------------------------------------------------------------
# The networks. Each reads a batch of its inputs and returns numbers per image.


class Inception:
    """clean-fid's Inception-v3 (an optional install: `pip install clean-fid`), its 2048 pool features."""
    key, input = "fid", "inception"

    def __init__(self, weights, device):
        try:
            from cleanfid.inception_torchscript import InceptionV3W
        except ImportError:
            raise UsageError(CLEANFID_MISSING) from None
        if weights and os.path.basename(weights) != INCEPTION_FILE:
            raise UsageError(f"--inception-weights {weights}: clean-fid reads its weights under the name "
                             f"{INCEPTION_FILE}; rename the file")
        if weights and not os.path.isfile(weights):
            raise UsageError(f"--inception-weights {weights} not found")
        folder = os.path.dirname(os.path.abspath(weights)) if weights else CLEANFID_FOLDER
        here = os.path.isfile(os.path.join(folder, INCEPTION_FILE))
        try:
            self.model = InceptionV3W(folder, download=not here).to(device).eval()
        except Exception as e:
            why = "cannot be read" if here else "are not there and cannot be downloaded"
            raise UsageError(f"FID: clean-fid's Inception weights {os.path.join(folder, INCEPTION_FILE)} {why} "
                             f"({type(e).__name__}): fetch {INCEPTION_URL} and pass --inception-weights FILE, or "
                             f"leave fid out of --metrics") from None
        self.device, self.source = device, f"clean-fid {INCEPTION_FILE}"

    @torch.no_grad()
    def __call__(self, batch):
        return self.model(torch.from_numpy(np.stack(batch)).to(self.device)).double().cpu().numpy()


class DINOv2:
    """transformers' Dinov2Model: the CLS token after the last layer norm (pooler_output)."""
    key, input = "fd-dinov2", "dinov2"

    def __init__(self, source, device):
        from transformers import Dinov2Model
        self.model = load_pretrained(Dinov2Model, source, "--dinov2-model", use_safetensors=True,
                                     dtype=torch.float32).to(device).eval()
        self.device, self.source = device, source

    @torch.no_grad()
    def __call__(self, batch):
        x = torch.from_numpy(np.stack(batch)).to(self.device)
        return self.model(pixel_values=x).pooler_output.double().cpu().numpy()


class CLIPScore:
    """transformers' CLIPModel, its tokenizer and its image processor (the PIL one, as OpenCLIP's transform is PIL
    based, whichever backend transformers would pick): cos(E_image, E_text) per image."""
    key, input = "clip", "clip"

    def __init__(self, source, device):
        from transformers import CLIPModel, CLIPTokenizer
        try:
            from transformers import CLIPImageProcessorPil as ImageProcessor  # transformers 5
        except ImportError:
            from transformers import CLIPImageProcessor as ImageProcessor  # transformers 4: the PIL one
        self.model = load_pretrained(CLIPModel, source, "--clip-model", use_safetensors=True,
                                     dtype=torch.float32).to(device).eval()  # fp32, as the peers' .float()
        self.tokenizer = load_pretrained(CLIPTokenizer, source, "--clip-model")
        self.image_processor = load_pretrained(ImageProcessor, source, "--clip-model")
        self.device, self.source = device, source

    def pixels(self, image):
        return self.image_processor(image, return_tensors="np")["pixel_values"][0]

    @torch.no_grad()
    def __call__(self, batch, captions):
        text = self.tokenizer([CLIP_PREFIX + c for c in captions], padding=True, truncation=True,
                              return_tensors="pt").to(self.device)
        pixels = torch.from_numpy(np.stack(batch)).to(self.device)
        e_text = _embedding(self.model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask))
        e_image = _embedding(self.model.get_image_features(pixel_values=pixels))
        return F.cosine_similarity(e_image.float(), e_text.float(), dim=-1).double().cpu().numpy()


def _embedding(out):
    """get_*_features' result: the projected embedding (transformers 4), or an output that holds it (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_pretrained(cls, source, flag, **kwargs):
    """A transformers model or processor from a folder or a hub id (hub cache first, else downloaded)."""
    from transformers.utils import logging
    logging.disable_progress_bar()
    try:
        return cls.from_pretrained(source, **kwargs)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"{flag} {source}: cannot load it ({type(e).__name__}: {first[:160]}); pass a folder, or a "
                         f"hub id that is in the hub cache or reachable (`hf download {source}`)") from None


def load_metrics(names, a, device):
    """The networks of --metrics, each loaded (or refused with one line) before any image is generated."""
    build = {"fid": lambda: Inception(a.inception_weights, device), "clip": lambda: CLIPScore(a.clip_model, device),
             "fd-dinov2": lambda: DINOv2(a.dinov2_model, device)}
    return [build[name]() for name in names]


# --------------------------------------------------------------------------------------------------
# Measuring a list of image files: decoding and resizing in threads, one batch ahead of the networks


def prepare(path, networks):
    """Each network's input from one image file."""
    try:
        with Image.open(path) as f:
            image = f.convert("RGB")
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    small = square(image)
    inputs = {}
    for net in networks:
        if net.input == "inception":
            inputs[net.input] = inception_input(small)
        elif net.input == "dinov2":
            inputs[net.input] = dinov2_input(small)
        else:
            inputs[net.input] = net.pixels(small)  # the 256 px square, as SwiftBrush v2, DMD2 and GigaGAN score it
    return inputs


def prepared_batches(paths, networks, batch_size):
    """Batches of prepare(), the next one decoded in threads while the networks measure the current one."""
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        ahead = [pool.submit(prepare, p, networks) for p in chunks[0]] if chunks else []
        for k in range(len(chunks)):
            now = ahead
            ahead = [pool.submit(prepare, p, networks) for p in chunks[k + 1]] if k + 1 < len(chunks) else []
            yield k * batch_size, [f.result() for f in now]


def measure(paths, networks, captions=None, batch_size=32, desc="features"):
    """{key: FeatureStats} of each Frechet network and {"clip": [cosines]} (with captions) over the image files."""
    from tqdm import tqdm
    stats = {net.key: FeatureStats() for net in networks if net.key != "clip"}
    cosines = []
    with tqdm(total=len(paths), desc=desc, unit="img", dynamic_ncols=True) as bar:
        for start, batch in prepared_batches(paths, networks, batch_size):
            for net in networks:
                inputs = [b[net.input] for b in batch]
                if net.key == "clip":
                    cosines.extend(net(inputs, captions[start:start + len(batch)]))
                else:
                    stats[net.key].add(net(inputs))
            bar.update(len(batch))
    return stats, cosines
