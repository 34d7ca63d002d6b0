"""PNG pictures with Pillow alone: grids of images (one row per tensor) and line plots of training curves."""
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from harness.atomic import atomic


def to_uint8(images):
    """[N, 3, H, W] in [-1, 1] -> [N, H, W, 3] uint8 (numpy), rounded: what a PNG holds."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def save_grid(rows, path, labels=None, pad=2):
    """PNG grid: one row per tensor [N,3,H,W] in [-1,1], optional label left of each row. Returns the PIL image.

    Small images are upscaled with nearest neighbour (16 px -> 64 px) so single pixels stay visible; images of 64 px
    or more (e.g. 512 px Stable Diffusion samples) are kept at their size.
    """
    h, w = rows[0].shape[-2:]
    assert all(r.shape[-2:] == (h, w) for r in rows), "all rows must share one image size"
    scale = max(1, 64 // max(h, w))
    ch, cw = h * scale, w * scale
    font = ImageFont.load_default()
    draw0 = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lw = max((draw0.textbbox((0, 0), s, font=font)[2] for s in labels), default=0) + 2 * pad if labels else 0
    ncol = max(r.shape[0] for r in rows)
    grid = Image.new("RGB", (lw + ncol * (cw + pad) + pad, len(rows) * (ch + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, r in enumerate(rows):
        y = pad + i * (ch + pad)
        if labels:
            draw.text((pad, y + ch // 2), str(labels[i]), fill=(0, 0, 0), font=font, anchor="lm")
        for j, a in enumerate(to_uint8(r)):
            tile = Image.fromarray(a).resize((cw, ch), Image.NEAREST)
            grid.paste(tile, (lw + pad + j * (cw + pad), y))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic(path) as tmp:
        grid.save(tmp, format="PNG")
    return grid


def _moving_average(y, window):
    """Centred moving average; the window shrinks at the ends instead of padding."""
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(len(y))
    lo, hi = np.clip(i - window // 2, 0, len(y)), np.clip(i + window // 2 + 1, 0, len(y))
    return (c[hi] - c[lo]) / (hi - lo)


PLOT_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def save_plot(curves, path, title="", size=(640, 400), smooth=None):
    """Line plot PNG of curves {name: [(x, y), ...]} with PIL only. Returns the PIL image.

    Noisy curves (training losses) are drawn faintly as they are and boldly smoothed with a centred moving average
    (window `smooth`, by default 1/20 of the points). Non-finite points are dropped. Axes carry min/max labels.
    """
    W, H = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", size, (255, 255, 255))
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    data = {k: np.array([(x, y) for x, y in v if math.isfinite(x) and math.isfinite(y)], dtype=float).reshape(-1, 2)
            for k, v in curves.items()}
    pts = np.concatenate(list(data.values()) + [np.zeros((0, 2))])
    (x0, y0), (x1, y1) = (pts.min(0), pts.max(0)) if len(pts) else ((0, 0), (1, 1))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)  # a flat curve still gets a range
    to_px = lambda x, y: (left + (x - x0) / (x1 - x0) * (W - left - right),
                          H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))
    draw.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    draw.text((W // 2, 5), title, fill=(0, 0, 0), font=font, anchor="mt")
    for v, yy in ((y0, H - bottom), (y1, top)):
        draw.text((left - 5, yy), f"{v:.4g}", fill=(0, 0, 0), font=font, anchor="rm")
    for v, xx in ((x0, left), (x1, W - right)):
        draw.text((xx, H - bottom + 5), f"{v:.4g}", fill=(0, 0, 0), font=font, anchor="mt")
    for i, (name, d) in enumerate(data.items()):
        color = PLOT_COLORS[i % len(PLOT_COLORS)]
        if len(d) == 0:
            continue
        window = smooth or max(1, len(d) // 20)
        if window > 1:
            faint = tuple(int(c + (255 - c) * 0.7) for c in color)
            draw.line([to_px(x, y) for x, y in d], fill=faint, width=1)
            d = np.stack([d[:, 0], _moving_average(d[:, 1], window)], 1)
        draw.line([to_px(x, y) for x, y in d], fill=color, width=2)
        if len(d) == 1:
            px, py = to_px(*d[0])
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        ly = top + 8 + 14 * i  # legend, top right inside the axes
        draw.line([W - right - 110, ly, W - right - 90, ly], fill=color, width=2)
        draw.text((W - right - 85, ly), str(name), fill=(0, 0, 0), font=font, anchor="lm")
    with atomic(path) as tmp:
        img.save(tmp, format="PNG")
    return img
