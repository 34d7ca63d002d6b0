"""Evaluation throughput on this machine, in images per second: generating one-step images (the student's UNet call,
the VAE decode, the PNG) and measuring them (decode, resize, CLIP and DINOv2), each against a naive baseline in the
same process that does one image at a time (batch 1, PNGs written in line at zlib's default level, no threads).

    python -m tools.bench_eval                  # tiny random models (diffusers builds the SD folder, as in the tests)
    python -m tools.bench_eval --images 64 --resolution 64

The models are tiny, so this measures what the pipeline costs around the networks, which is what batching and
overlap are for; at full size the networks dominate (docs/evaluation.md, for the GPU arithmetic).
"""
import argparse
import os
import shutil
import tempfile
import time

import torch
from PIL import Image

from evaluation.coco import parse_args as evaluation_args
from evaluation.generate import generate_images, noise
from evaluation.metrics import load_metrics, measure, prepare
from harness.images import to_uint8
from parity.tiny_sd import make_tiny_feature_models, make_tiny_sd
from sample import load_generator, sample_images
from tools.bench import set_threads


def naive_generation(g, prompts, a, folder):
    os.makedirs(folder, exist_ok=True)
    for i, (_, text) in enumerate(prompts):
        context = g.text.encode([text])
        z, renoise = noise(a.seed, [i], g.latent_shape, g.steps)
        pixels = to_uint8(sample_images(g, z, context, renoise=renoise))[0]
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.png"))


def naive_measurement(paths, networks, captions):
    for path, caption in zip(paths, captions):
        inputs = prepare(path, networks)
        for net in networks:
            if net.key == "clip":
                net([inputs[net.input]], [caption])
            else:
                net([inputs[net.input]])


def full_size_flops():
    """FLOPs (2 x multiply-adds) of one image through each full-size network, counted without weights or compute:
    our UNet and VAE on fake tensors (autocast refuses the meta device), transformers' towers on the meta device.
    The arithmetic of docs/evaluation.md's GPU estimate."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    from parity.configs import SD21_BASE, SD_VAE
    from unet import UNet
    from vae import AutoencoderKL

    def count(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    flops = {}
    with FakeTensorMode(), torch.no_grad():
        unet, vae = UNet(SD21_BASE), AutoencoderKL(SD_VAE)
        z, context = torch.zeros(1, 4, 64, 64), torch.zeros(1, 77, 1024)
        flops["student UNet, one step (SD 2.1-base, 64x64 latents)"] = count(lambda: unet(z, 999, context))
        flops["VAE decode to 512 px"] = count(lambda: vae.decode(z))
    with torch.device("meta"), torch.no_grad():
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(  # OpenCLIP ViT-g/14's image tower
            hidden_size=1408, intermediate_size=6144, num_hidden_layers=40, num_attention_heads=16, patch_size=14,
            image_size=224, projection_dim=1024))
        dino = Dinov2Model(Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                                        image_size=518))  # ViT-L/14
        pixels = torch.zeros(1, 3, 224, 224)
        flops["CLIP ViT-g/14 image tower, 224 px"] = count(lambda: clip(pixel_values=pixels))
        flops["DINOv2 ViT-L/14, 224 px"] = count(lambda: dino(pixel_values=pixels))
    return flops


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=48, help="images per timed run")
    p.add_argument("--resolution", type=int, default=64, help="pixels of the generated images")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the pool threads come on top)")
    b = p.parse_args(argv)
    set_threads(b.threads)
    flops = full_size_flops()
    print("| full-size network, one image | TFLOPs |\n|---|---|")
    for name, f in flops.items():
        print(f"| {name} | {f / 1e12:.3f} |")
    root = tempfile.mkdtemp(prefix="bench-eval-")
    try:
        sd = make_tiny_sd(os.path.join(root, "sd"))
        clip, dino = make_tiny_feature_models(os.path.join(root, "features"))
        with open(os.path.join(root, "prompts.txt"), "w") as f:
            f.write("".join(f"a photo of thing number {i}\n" for i in range(b.images)))
        a = evaluation_args(["--student", os.path.join(sd, "unet"), "--model", sd, "--prompts",
                             os.path.join(root, "prompts.txt"), "--n", str(b.images), "--metrics", "clip,fd-dinov2",
                             "--clip-model", clip, "--dinov2-model", dino, "--resolution", str(b.resolution),
                             "--device", "cpu"])
        g = load_generator(a)
        prompts = [(i, f"a photo of thing number {i}") for i in range(b.images)]
        networks = load_metrics(a.metrics, a, torch.device("cpu"))
        captions = [text for _, text in prompts]
        runs = {"generation": [], "generation (naive)": [], "measurement": [], "measurement (naive)": []}
        paths = generate_images(g, prompts, a, os.path.join(root, "warm"))  # warm-up, and the images measured
        for r in range(b.repeats):
            runs["generation"].append(timed(lambda: generate_images(g, prompts, a, os.path.join(root, f"o{r}"))))
            runs["generation (naive)"].append(timed(lambda: naive_generation(g, prompts, a, os.path.join(root, f"n{r}"))))
            runs["measurement"].append(timed(lambda: measure(paths, networks, captions, a.batch_size)))
            runs["measurement (naive)"].append(timed(lambda: naive_measurement(paths, networks, captions)))
        median = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
        print(f"\n{b.images} images of {b.resolution} px, batch {a.batch_size}, {b.threads} torch thread(s), "
              f"{os.cpu_count()} CPUs; median of {b.repeats} interleaved runs")
        print("| stage | ours images/s | naive images/s | ours/naive time |\n|---|---|---|---|")
        for stage in ("generation", "measurement"):
            ours, naive = median[stage], median[f"{stage} (naive)"]
            print(f"| {stage} | {b.images / ours:.1f} | {b.images / naive:.1f} | {ours / naive:.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
