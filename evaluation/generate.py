"""The images of an evaluation: OUT/images/00000.png, ... one per prompt, generated in batches and skipped when present,
so that a stopped run continues where it stopped and ends with the images an unstopped run writes.

- The noise of image i is its own: x_T = randn(latent shape) from a CPU generator seeded with (seed << 32) + i (and
  then, for a K-step student, the K - 1 noises of its re-noising, in step order), so it does not depend on which
  images were already there.
- Batch k is always the prompts [kB, (k+1)B): generated whole when any of its images is missing (then only the
  missing ones are written), so every image comes from the same batch as in a straight run: the same bits on the
  same machine and --batch-size.
- Each PNG is written whole or not at all (harness/atomic.py): a killed run leaves no broken image. PNG encoding (zlib, fast
  level) runs in threads beside the next batch's UNet call and VAE decode.
"""
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from harness.atomic import atomic
from harness.flags import UsageError
from harness.images import to_uint8
from sample import sample_images
from swiftbrush import chain_noises

NOISE_RULE = "x_T of image i: torch.randn(latent shape) on the CPU, generator seeded with (seed << 32) + i"


def noise_rule(steps):
    """The protocol's words for the noises of a `steps`-step student's images (or of a teacher's: steps 1)."""
    if steps == 1:
        return NOISE_RULE
    return NOISE_RULE + f", then the {steps - 1} noises of the student's re-noising, each the same shape, in step order"


def image_path(folder, i):
    return os.path.join(folder, f"{i:05d}.png")


def noise(seed, indices, shape, steps=1):
    """x_T of each image index, and the batch's K - 1 re-noising noises of a K-step student (K = steps): each
    image's own generator, so a resumed run draws what a straight run draws."""
    drawn = [chain_noises(shape, steps, torch.Generator().manual_seed((seed << 32) + i)) for i in indices]
    z = torch.stack([z for z, _ in drawn])
    return z, [torch.stack([renoise[j] for _, renoise in drawn]) for j in range(steps - 1)]


def write_png(pixels, path):
    with atomic(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", compress_level=1)


def wait_for_writes(writes, folder):
    """Wait for a batch's PNG writes; a failed one (a full disk, a read-only folder) is one line."""
    try:
        for w in writes:
            w.result()
    except OSError as e:
        raise UsageError(f"cannot write the images into {folder}: {e.strerror or e}") from None


def generate_images(g, prompts, a, folder):
    """Write the missing images of `prompts` ([(key, text)]) with the Generator g; returns the n image paths."""
    from tqdm import tqdm
    os.makedirs(folder, exist_ok=True)
    n, B = len(prompts), a.batch_size
    paths = [image_path(folder, i) for i in range(n)]
    missing = {i for i in range(n) if not os.path.exists(paths[i])}
    if not missing:
        return paths
    batches = [range(k, min(n, k + B)) for k in range(0, n, B) if missing & set(range(k, min(n, k + B)))]
    t0 = time.time()
    with ThreadPoolExecutor(2) as writer, tqdm(total=n, initial=n - len(missing), desc="images", unit="img",
                                              dynamic_ncols=True) as bar:
        pending = []  # the writes of the last batches: at most two batches of images wait in memory
        for batch in batches:
            context = g.text.encode([prompts[i][1] for i in batch])
            z, renoise = noise(a.seed, batch, g.latent_shape, g.steps)
            images = to_uint8(sample_images(g, z, context, a.teacher_steps, a.guidance, renoise))
            pending.append([writer.submit(write_png, pixels, paths[i]) for i, pixels in zip(batch, images)
                            if i in missing])
            if len(pending) > 2:
                wait_for_writes(pending.pop(0), folder)
            bar.update(len(missing & set(batch)))
        for writes in pending:
            wait_for_writes(writes, folder)
    print(f"images: {len(missing)} generated in {time.time() - t0:.1f} s "
          f"({len(missing) / (time.time() - t0):.2f} images/s) into {folder}")
    return paths
