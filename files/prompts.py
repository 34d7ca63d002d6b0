"""The text states of a prompt list of any length, in bounded memory: each batch's prompts are encoded when the batch
is drawn, by the frozen text encoder kept on the training device, so no [P, 77, D] tensor of all P prompts is ever
held (the paper's ~1.4 M JourneyDB prompts at 315 KB each would be ~440 GB).

Why per batch and not a memory-mapped cache of precomputed states on disk (what the authors' code reads): measured
on this CPU (`python -m tools.bench_options prompts`, README), the cache costs a pass over every prompt before step 1 and
77 x D x 2-4 bytes of disk per prompt (220-440 GB at paper scale), and its pages, once read, count in the process's
resident memory; encoding per batch costs one text-encoder forward of B prompts per render (SD 2.1-base: ~1% of an
iteration's FLOPs) and the encoder's weights on the device (0.68 GB in bf16). The miniature takes the same path."""
import torch

from files.models import encode_prompts, load_text


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
