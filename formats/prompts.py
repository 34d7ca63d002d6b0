"""The prompts a run trains on: a prompt file read once, and each batch's prompts encoded when the batch is drawn, by
the frozen text encoder kept on the training device, so that no table of every prompt's text states is ever held
(a list of any length trains in bounded memory).

Why per batch and not a memory-mapped cache of precomputed states on disk, which the authors' code reads: the
cache costs a pass over every prompt before the first step, its disk and, once read, its pages count in the
process's memory, while encoding per batch costs one text-encoder forward of the batch's prompts, a small share of
an iteration. docs/memory.md has the measurements. The miniature takes the same path."""
import torch

from formats.models import encode_prompts, load_text
from harness.flags import UsageError

DEMO_PROMPTS = [
    "a photo of a cat sitting on a windowsill", "a red sports car on a mountain road at sunset",
    "a bowl of ramen, studio lighting", "an astronaut riding a horse, digital art",
    "a lighthouse on a cliff during a storm", "a watercolor painting of a fox in the snow",
    "a cozy cabin in the woods, autumn", "a portrait of an old fisherman, photograph",
    "a futuristic city skyline at night, neon lights", "a teddy bear reading a book",
    "a field of sunflowers under a blue sky", "a plate of sushi on a wooden table",
]


def read_prompts(path, unique=True):
    """UTF-8 text, one prompt per line; blank lines ignored, and duplicates unless unique=False (an evaluation's
    prompt list, where each line is an image). None: DEMO_PROMPTS."""
    if path is None:
        return list(DEMO_PROMPTS)
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f]
    except FileNotFoundError:
        raise UsageError(f"prompt file {path!r} not found") from None
    except OSError as e:
        raise UsageError(f"cannot read prompt file {path!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"prompt file {path!r} is not UTF-8 text ({e})") from None
    prompts = [p for p in lines if p]
    prompts = list(dict.fromkeys(prompts)) if unique else prompts
    if not prompts:
        raise UsageError(f"prompt file {path!r} has no prompts (one prompt per line)")
    return prompts


class PromptEmbeddings:
    """embeddings[i] -> the text states [n, L, D] (fp32) of prompts[i] for a slice or a tensor of indices, encoded
    when asked for; `uncond` is the states of "" (CFG's unconditional branch), encoded once."""

    def __init__(self, tokenizer, encoder, prompts):
        self.tokenizer, self.encoder, self.prompts = tokenizer, encoder.eval().requires_grad_(False), prompts
        self.uncond = encode_prompts(tokenizer, encoder, [""])

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            chosen = self.prompts[index]
        else:
            chosen = [self.prompts[i] for i in torch.as_tensor(index).tolist()]
        return encode_prompts(self.tokenizer, self.encoder, chosen)


def prompt_embeddings(folder, prompts, device, dtype=torch.float32):
    """PromptEmbeddings of `prompts` with the text encoder of the Stable Diffusion folder, on `device` in `dtype`."""
    tokenizer, encoder = load_text(folder)
    return PromptEmbeddings(tokenizer, encoder.to(device, dtype), prompts)
