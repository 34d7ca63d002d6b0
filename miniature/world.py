"""A tiny synthetic text-to-image world whose true distribution is known exactly.

The miniature of the project trains a small teacher diffusion model on this world and distills it into a one-step
student. Because we can sample the world and we know what every caption means, generated images can be scored
against the truth (does the object have the prompt's colour and shape, are positions/sizes as diverse as in the data,
does the generator over-saturate) instead of by eye. Images are [N, 3, 16, 16] float32 in [-1, 1], channels first.
"""
import json
import math
import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.frechet import frechet_distance  # the FID formula: one copy, for COCO and the miniature


RES = 16
# Components within [-0.7, 0.7]: data pixels never reach |x| > 0.7, so a generator's over-saturation and clipping
# (|x| > 0.95) are measurable. The background is exactly 0 (mid grey).
COLORS = {"red": (0.7, -0.7, -0.7), "green": (-0.7, 0.7, -0.7), "blue": (-0.7, -0.7, 0.7), "yellow": (0.7, 0.7, -0.7)}
SHAPES = ("circle", "square", "triangle")
PROMPTS = [f"a {c} {s}" for c in COLORS for s in SHAPES]
PALETTE = torch.tensor(list(COLORS.values()), dtype=torch.float32)  # [4, 3]
SIZE_RANGE = (3.0, 6.0)  # circle radius, square half-side, triangle half-width, in px

# A pixel belongs to a colour's object when its RGB distance to that colour is below this. Palette colours are >= 1.4
# apart, so at 0.6 (< 1.4 / 2) a pixel can be near at most one palette colour. Anti-aliased edges are colour * alpha,
# at distance (1 - alpha) * 1.21 from the colour: the threshold keeps edge pixels with alpha > ~0.5.
COLOR_THRESHOLD = 0.6
MIN_PIXELS = 10  # core pixels (see _object_masks) needed for 'object present'
REF_N, REF_SEED = 2000, 1234  # the fixed sample of the world that real statistics come from


def parse_caption(caption):
    """'a red circle' -> (color_idx, shape_idx). Raises ValueError when a colour or a shape word is missing."""
    words = caption.lower().split()
    colors = [i for i, c in enumerate(COLORS) if c in words]
    shapes = [i for i, s in enumerate(SHAPES) if s in words]
    if len(colors) != 1 or len(shapes) != 1:
        raise ValueError(f"caption {caption!r} must name exactly one of {list(COLORS)} and one of {SHAPES}")
    return colors[0], shapes[0]


def render_coverage(shape, cx, cy, size, res=RES, ss=4):
    """Fraction of each pixel covered by the shape, [N, res, res] in [0, 1].

    Anti-aliasing by 4x4 supersampling: simple, exact enough, deterministic. Pixel (i, j) spans [j, j+1] x [i, i+1],
    so coordinates are continuous and the pixel centre is (j + 0.5, i + 0.5). Triangles point up: apex (cx, cy - s),
    base from (cx - s, cy + s) to (cx + s, cy + s), so every shape fits in the box [cx +- s] x [cy +- s].
    """
    t = (torch.arange(res * ss, dtype=torch.float32) + 0.5) / ss
    x, y = t.view(1, 1, -1), t.view(1, -1, 1)
    shape, cx, cy, s = (torch.as_tensor(v).view(-1, 1, 1) for v in (shape, cx, cy, size))
    dx, dy = x - cx, y - cy
    circle = dx ** 2 + dy ** 2 <= s ** 2
    square = (dx.abs() <= s) & (dy.abs() <= s)
    triangle = (dy <= s) & (dx.abs() <= (dy + s) / 2)  # half-width grows from 0 at the apex to s at the base
    inside = torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))
    return F.avg_pool2d(inside.float()[:, None], ss)[:, 0]


def sample_world(n, seed=None, generator=None, prompts=None, centred=False):
    """Draw n images of the world -> (images [n,3,16,16], captions, attrs dict of [n] tensors).

    Colour and shape are uniform unless `prompts` (n captions) fixes them. All random numbers are drawn whether or
    not prompts are given, so a seed yields the same positions and sizes with and without prompts. centred: every
    object at the centre (a reference for collapsed positions).
    """
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    color = torch.randint(len(COLORS), (n,), generator=generator)
    shape = torch.randint(len(SHAPES), (n,), generator=generator)
    u = torch.rand(n, 3, generator=generator)
    if prompts is not None:
        assert len(prompts) == n, "need one prompt per image"
        parsed = torch.tensor([parse_caption(p) for p in prompts], dtype=torch.long).view(n, 2)
        color, shape = parsed[:, 0], parsed[:, 1]
    lo, hi = SIZE_RANGE
    size = lo + (hi - lo) * u[:, 0]
    cx = size + (RES - 2 * size) * u[:, 1]  # the whole object stays inside the image
    cy = size + (RES - 2 * size) * u[:, 2]
    if centred:
        cx = cy = torch.full((n,), RES / 2)
    alpha = render_coverage(shape, cx, cy, size)
    images = alpha[:, None] * PALETTE[color][:, :, None, None]  # blend colour over the 0 background
    captions = [PROMPTS[c * len(SHAPES) + s] for c, s in zip(color.tolist(), shape.tolist())]
    attrs = {"color": color, "shape": shape, "cx": cx, "cy": cy, "size": size}
    return images.contiguous(), captions, attrs


# ------------------------------------------------------------------------------------- the Bayes-optimal start
def posterior_mean(x_t, candidates, alpha_t, sigma_t):
    """E[x_0 | x_t] when x_0 is uniform over `candidates` [K, 3, H, W] and x_t = alpha_t x_0 + sigma_t eps (Eq. 1):
    the candidates averaged with weights softmax_k(-|x_t - alpha_t x0_k|^2 / (2 sigma_t^2)). x_t: [N, 3, H, W]."""
    x, c = x_t.flatten(1).double(), candidates.flatten(1).double()
    d2 = (x ** 2).sum(1, keepdim=True) - 2 * alpha_t * x @ c.T + alpha_t ** 2 * (c ** 2).sum(1)  # [N, K]
    return (torch.softmax(-d2 / (2 * sigma_t ** 2), dim=1) @ c).float().view_as(x_t)


@torch.no_grad()
def bayes_optimal_start(z, captions, alpha_T, sigma_T, n=4096, seed=7):
    """The best any one-step generator can output from x_T = z given its caption: E[x_0 | x_T = z, caption],
    by Monte Carlo over n samples of the world with that caption (a teacher's Eq. 7 output estimates this)."""
    out = torch.empty_like(z)
    for caption in dict.fromkeys(captions):
        rows = [i for i, c in enumerate(captions) if c == caption]
        candidates, _, _ = sample_world(n, seed=seed, prompts=[caption] * n)
        out[rows] = posterior_mean(z[rows], candidates, alpha_T, sigma_T)
    return out


# ----------------------------------------------------------------------------------------------------- metrics
def _near_colors(images):
    """Whether each pixel is within COLOR_THRESHOLD of each palette colour, [N, 4, H, W] bool.

    Squared distance expanded as |x|^2 - 2 x.p + |p|^2 so that it is one small matrix product (fast on CPU).
    """
    d2 = ((images ** 2).sum(1, keepdim=True) - 2 * torch.einsum("nchw,kc->nkhw", images, PALETTE)
          + (PALETTE ** 2).sum(1).view(1, -1, 1, 1))
    return d2 < COLOR_THRESHOLD ** 2


def _object_masks(images):
    """Per palette colour, [N, 4, H, W] float: pixels near it with >= 2 such neighbours (the object mask) and with
    >= 3 (its core, used to decide presence).

    Dropping isolated pixels is what keeps noise from forming an 'object': clipped noise puts ~7% of pixels near each
    palette colour, but scattered. A real object loses almost nothing from its mask (even a triangle's apex pixel has
    two object pixels below it) and keeps >= 13 core pixels, while noise rarely keeps more than a few (at most 6 in
    4000 clipped-noise images); MIN_PIXELS sits between the two.
    """
    near = _near_colors(images).float()
    n, k, h, w = near.shape
    neighbours = F.conv2d(near.reshape(n * k, 1, h, w), torch.ones(1, 1, 3, 3), padding=1).view(n, k, h, w) - near
    return near * (neighbours >= 2), near * (neighbours >= 3)


def _measure(images, color_idx, shape_idx):
    """Per-image measurements: object mask from the PROMPT's colour, presence, colour, shape, centroid, size.

    A mask of 'every non-grey pixel' is fooled by residual noise (everything is non-grey); pixels near the prompt's
    colour are not, and requiring MIN_PIXELS core pixels of them makes 'object present' a real test.
    """
    n = images.shape[0]
    masks, cores = _object_masks(images)  # [N, 4, H, W]
    counts = masks.sum((2, 3))  # [N, 4]
    mask, area = masks[torch.arange(n), color_idx], counts[torch.arange(n), color_idx]  # [N, H, W], [N]
    present = cores[torch.arange(n), color_idx].sum((1, 2)) >= MIN_PIXELS
    # With COLOR_THRESHOLD < half the palette gap, the mean of the mask pixels is always nearest to the prompt's colour,
    # so the informative colour test is dominance: the prompt's colour must cover at least as many pixels as any other.
    color_ok = present & (area >= counts.max(1).values)
    # Mean object colour error (tint / desaturation of the object), measured where present.
    denom = area.clamp(min=1)[:, None]
    mean_rgb = (images * mask[:, None]).flatten(2).sum(-1) / denom
    color_err = (mean_rgb - PALETTE[color_idx]).norm(dim=1)
    c = torch.arange(RES, dtype=torch.float32) + 0.5
    mx = (mask.sum(1) * c).sum(-1) / area.clamp(min=1)
    my = (mask.sum(2) * c).sum(-1) / area.clamp(min=1)
    # Shape: render each candidate shape with the mask's area and centroid, and pick the best IoU. An analytic template
    # fit is robust for small objects, where a bounding-box fill ratio suffers from pixelisation (a radius-3 circle's
    # box can be 6 or 7 px wide, giving 0.79 or 0.58).
    ious = []
    for k, size in enumerate((torch.sqrt(area / math.pi), torch.sqrt(area) / 2, torch.sqrt(area / 2))):
        cy = my - size / 3 if k == 2 else my  # a triangle's centroid is a third of its half-height below the box centre
        tpl = render_coverage(torch.full((n,), k), mx, cy, size, ss=1)  # 1 sample per pixel: centre inside
        inter, union = (tpl * mask).flatten(1).sum(1), torch.maximum(tpl, mask).flatten(1).sum(1)
        ious.append(inter / union.clamp(min=1))
    shape_pred = torch.stack(ious, 1).argmax(1)
    # Background noise: std of the pixels away from the object (mask dilated by one pixel so anti-aliased edges,
    # which are part of the object, do not count as noise).
    bg = 1 - F.max_pool2d(mask[:, None], 3, 1, 1)[:, 0]
    bg_n = (bg.sum((1, 2)) * 3).clamp(min=1)
    bg_mean = (images * bg[:, None]).sum((1, 2, 3)) / bg_n
    bg_var = (((images - bg_mean.view(-1, 1, 1, 1)) ** 2) * bg[:, None]).sum((1, 2, 3)) / bg_n
    return {"present": present, "color_ok": color_ok, "shape_ok": present & (shape_pred == shape_idx),
            "color_err": color_err, "mx": mx, "my": my, "size": area.sqrt(), "bg_noise": bg_var.sqrt()}


def _spreads(m, prompt_ids):
    """Per-prompt std of centroid (mean of x and y std) and of size over present objects, averaged over prompts."""
    pos, size = [], []
    for p in prompt_ids.unique():
        sel = (prompt_ids == p) & m["present"]
        if sel.sum() >= 2:
            pos.append(0.5 * (m["mx"][sel].std() + m["my"][sel].std()))
            size.append(m["size"][sel].std())
    mean = lambda v: float(torch.stack(v).mean()) if v else float("nan")
    return mean(pos), mean(size)


def features(images):
    """Fixed hand-made feature space for the Fréchet distance, [N, 60] float64.

    Chosen for transparency over a random conv net: 4x4 average-pooled pixels per channel (48: layout and colour),
    fraction of pixels near each palette colour and near grey (5: colour histogram), per-channel std (3: contrast),
    mean absolute neighbour difference per channel (3: edges vs texture/noise; pooling alone would hide noise), and
    the fraction of pixels beyond the data range (1: over-saturation). All features are O(1) in scale.
    """
    x = images.float()
    pooled = F.avg_pool2d(x, RES // 4).flatten(1)
    hist = _near_colors(x).float().mean((2, 3))
    grey = (x.abs().amax(1) < 0.1).float().mean((1, 2))[:, None]
    std = x.flatten(2).std(-1)
    grad = 0.5 * ((x[..., 1:, :] - x[..., :-1, :]).abs().mean((2, 3)) + (x[..., 1:] - x[..., :-1]).abs().mean((2, 3)))
    out = (x.abs().amax(1) > 0.75).float().mean((1, 2))[:, None]
    return torch.cat([pooled, hist, grey, std, grad, out], 1).double().numpy()


def _gaussian(f):
    return f.mean(0), np.cov(f, rowvar=False)


@lru_cache(maxsize=1)
def reference():
    """Statistics of a fixed-seed sample of the world, computed once per process: feature Gaussian and true spreads."""
    images, captions, attrs = sample_world(REF_N, seed=REF_SEED)
    m = _measure(images, attrs["color"], attrs["shape"])
    pos, size = _spreads(m, attrs["color"] * len(SHAPES) + attrs["shape"])
    mu, cov = _gaussian(features(images))
    return {"mu": mu, "cov": cov, "true_pos_spread": pos, "true_size_spread": size}


@torch.no_grad()
def evaluate(images, captions):
    """Score generated images [N,3,16,16] in [-1,1] against their captions and the world's truth -> dict of floats.

    present: an object of the prompt's colour was found; color_acc: ... and that colour dominates the image;
    shape_acc: ... and its shape is the prompt's; color_err: RGB distance of the object's mean colour to the palette
    colour (0.05 on real data: anti-aliased edges); bg_noise: std of the pixels away from the object; pos_spread /
    size_spread: diversity per prompt (px), to compare with true_*; saturation: mean |x|; clipped: fraction of
    |x| > 0.95 (0 in the data); fd: Fréchet distance to the world in the `features` space (~0.1 for 200 real images).
    """
    images = images.detach().float().cpu()
    assert images.shape[1:] == (3, RES, RES), f"expected [N, 3, {RES}, {RES}], got {tuple(images.shape)}"
    ids = torch.tensor([parse_caption(c) for c in captions], dtype=torch.long).view(-1, 2)
    m = _measure(images, ids[:, 0], ids[:, 1])
    pos, size = _spreads(m, ids[:, 0] * len(SHAPES) + ids[:, 1])
    ref = reference()
    mu, cov = _gaussian(features(images))
    present = m["present"]
    return {
        "n": len(captions),
        "present": float(present.float().mean()),
        "color_acc": float(m["color_ok"].float().mean()),
        "shape_acc": float(m["shape_ok"].float().mean()),
        "color_err": float(m["color_err"][present].mean()) if present.any() else float("nan"),
        "bg_noise": float(m["bg_noise"].mean()),
        "pos_spread": pos, "true_pos_spread": ref["true_pos_spread"],
        "size_spread": size, "true_size_spread": ref["true_size_spread"],
        "saturation": float(images.abs().mean()),
        "clipped": float((images.abs() > 0.95).float().mean()),
        "fd": frechet_distance(mu, cov, ref["mu"], ref["cov"]),
    }


# --------------------------------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode():
    """GPT-2/CLIP's reversible map from the 256 bytes to printable unicode characters (the byte-level alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, k = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + k)
            k += 1
    return [chr(c) for c in cs]


def _bpe(word, ranks):
    """CLIP's BPE on one word: characters with '</w>' on the last, then merge the best-ranked pair until none apply."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        first, second = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, math.inf))
        if (first, second) not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):  # merge every occurrence of the pair, left to right, as CLIP does
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == (first, second):
                merged.append(first + second)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def write_tokenizer(folder, words=None, max_length=16):
    """Write a tiny CLIP BPE tokenizer (vocab.json, merges.txt, configs) where each of `words` is a single token.

    The vocab holds the 256 byte-level characters with and without '</w>' (so any text tokenises, letter by letter if
    need be), one merge chain per word, then <|startoftext|> and <|endoftext|> last: the eos id is the largest, so
    CLIPTextModel's pooled output (argmax of input_ids when eos_token_id is the legacy 2) finds it. Merges for a new
    word are appended after the existing ones, continuing from how the existing merges already split it; lower
    priority merges never change how earlier words tokenise. Returns ids for configuring a CLIPTextConfig.
    """
    if words is None:
        words = ["a", *COLORS, *SHAPES]
    chars = _bytes_to_unicode()
    vocab = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges, ranks = [], {}
    for word in dict.fromkeys(w.lower() for w in words):
        # CLIP's pre-tokenizer splits text into letter runs and maps bytes to characters; for ASCII letters both are
        # the identity, so our character-level BPE here is exactly what the loaded tokenizer will do.
        assert word.isascii() and word.isalpha(), f"vocabulary words must be ASCII letters, got {word!r}"
        parts = _bpe(word, ranks)
        while len(parts) > 1:  # chain the leftover pieces left to right into one token
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = [pair[0] + pair[1]] + parts[2:]
        assert _bpe(word, ranks) == [word + "</w>"], word
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab[bos], vocab[eos] = len(vocab), len(vocab) + 1
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:  # loaders skip the header line
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": bos, "eos_token": eos, "unk_token": eos, "pad_token": eos}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
                   "errors": "replace", **special}, f, indent=2)
    return {"vocab_size": len(vocab), "bos_token_id": vocab[bos], "eos_token_id": vocab[eos],
            "pad_token_id": vocab[eos], "max_position_embeddings": max_length}
