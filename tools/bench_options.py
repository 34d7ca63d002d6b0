"""What the GPU recipe's options cost and save, measured on this CPU, each against the plain run.

    python -m tools.bench_options                # train, then prompts
    python -m tools.bench_options train          # checkpointing, Adam's step, torch.compile (compiles ~5 minutes),
                                                 # the step inside the backward
    python -m tools.bench_options train backward # only the options whose names contain a word given
    python -m tools.bench_options prompts        # prompt states: encoded per batch, memory-mapped cache, all in RAM

train: swiftbrush.train_step on a medium SD-shaped UNet (tools/bench.py's TRAIN_BENCH_UNET, 9 M parameters, batch 2,
32x32 latents, 77x256 text states, VSD with a rank-16 LoRA), fp32. Each option is set up beside the plain run in one
process and timed interleaved with it (medians; 1 thread, as tools/bench.py, for the same reasons); its peak RSS is
measured in a fresh process per option (the kernel's high-water mark reset after one warm-up iteration, then 2
iterations: peak minus the RSS before them), so memory and time come from the same code but not the same process.

prompts: the states of a batch of 16 prompts from a medium text encoder (CLIP, SD 2's width 1024, 2 layers):
encoded per batch (formats/prompts.py, what a run does), read from a memory-mapped fp16 .npy cache of precomputed
states (what the authors' code does; its rows here are random, its cost of writing is the encoder's time per prompt
times the list), or indexed from one tensor in RAM (what a run did before). Time per batch, and the peak RSS of a
fresh process that sets up each way for 1k, 10k and 100k prompts (the cache and RAM: 1k, 10k) and then draws
1000 random batches (encoded per batch: 10).
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch

import swiftbrush as sb
import unet
from tools.bench import TRAIN_BENCH, TRAIN_BENCH_UNET, _interleaved, _peak_rss, _rss_mib, _table, _warm_libraries, \
    set_threads

OPTIONS = {"plain: fp32, fused Adam, no checkpointing": {},
           "gradient checkpointing on": {"checkpointing": "on"},
           "Adam's multi-tensor (foreach) step instead of the fused one": {"adam": "foreach"},
           "torch.compile of both UNets": {"compile": True},
           "the student's step inside its backward (--step-in-backward)": {"step_in_backward": True}}
TEXT = dict(vocab_size=1000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=16,
            max_position_embeddings=77, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
BATCH_OF_PROMPTS = 16


# --------------------------------------------------------------------------------------------------
# train: one Algorithm 1 iteration with each option


def build_train(option):
    """train_step set up as swiftbrush.train() sets it up, with `option` (a dict of OPTIONS); a no-argument step."""
    b = TRAIN_BENCH
    torch.manual_seed(0)
    teacher = unet.UNet(json.loads(json.dumps(TRAIN_BENCH_UNET)))
    g = torch.Generator().manual_seed(1)
    states = torch.randn(b["prompts"], b["tokens"], TRAIN_BENCH_UNET["cross_attention_dim"], generator=g)
    cfg = sb.Config(batch_size=b["batch"], lora_rank=b["lora_rank"], lora_alpha=b["lora_alpha"], lr=b["lr"],
                    lora_lr=b["lora_lr"], ema_decay=0, checkpointing=option.get("checkpointing", "off"),
                    step_in_backward=option.get("step_in_backward", False))
    m = sb.Models(teacher, unet.UNet(teacher.config), sb.Schedule(), [str(i) for i in range(b["prompts"])], states,
                  states[:1] * 0, (4, b["latent"], b["latent"]))
    m.student.load_state_dict(teacher.state_dict())
    state = sb.start_training(cfg, m, torch.device("cpu"))
    if option.get("adam") == "foreach":
        for name in ("opt_student", "opt_lora"):
            params = state[name].param_groups[0]["params"]
            lr = state[name].param_groups[0]["lr"]
            state[name] = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, foreach=True)
    if option.get("compile"):
        m.student, m.teacher = torch.compile(m.student), torch.compile(m.teacher)

    def step():
        sb.train_step(m, cfg, state, nullcontext())
        state["step"] += 1
    return step


def _train_memory(name):
    step = build_train(OPTIONS[name])
    step()  # warm-up (and compilation)
    before, peak = _peak_rss(lambda: [step() for _ in range(2)])
    return {"peak_over_before_mib": peak - before, "peak_mib": peak}


def bench_train(repeats=5, warmup=2, threads=1, which=None):
    set_threads(threads)
    names = which or list(OPTIONS)
    plain = next(iter(OPTIONS))
    rows = []
    for name in names[1:] if names[0] == plain else names:
        t0 = time.perf_counter()
        steps = {plain: build_train({}), name: build_train(OPTIONS[name])}
        med, _ = _interleaved(steps, repeats, warmup)
        setup = time.perf_counter() - t0
        mem = {n: _in_fresh_process("train", n, threads) for n in (plain, name)}
        rows.append([name, f"{med[name]:.3f}", f"{med[plain]:.3f}", f"{med[name] / med[plain]:.2f}",
                     f"{mem[name]['peak_over_before_mib']:.0f}", f"{mem[plain]['peak_over_before_mib']:.0f}",
                     f"{mem[name]['peak_over_before_mib'] / max(mem[plain]['peak_over_before_mib'], 1e-9):.2f}",
                     f"{setup:.0f}"])
        del steps
    print(f"Algorithm 1 (VSD) iteration, {TRAIN_BENCH_UNET['block_out_channels']} UNet, batch {TRAIN_BENCH['batch']}, "
          f"fp32 CPU, {threads} thread(s), torch {torch.__version__}")
    _table(["option", "s", "plain s", "time ratio", "peak MiB", "plain MiB", "memory ratio", "setup+warm-up s"], rows)
    print(f"(time: median of {repeats} interleaved iterations after {warmup} warm-ups, option and plain in one process; "
          f"MiB: peak RSS over 2 iterations above the RSS before them, one fresh process per option)")
    return rows


# --------------------------------------------------------------------------------------------------
# prompts: the text states of a batch


def _text():
    from transformers import CLIPTextConfig, CLIPTextModel
    from formats.text import Text
    from tools.selfcheck import RandomTokens
    torch.manual_seed(0)
    return Text([RandomTokens(TEXT["vocab_size"])], [CLIPTextModel(CLIPTextConfig(**TEXT))])


def _prompts(n):
    return [f"a photo of thing number {i}, {i % 97} of them" for i in range(n)]


def build_prompts(way, n, folder):
    """A function of a tensor of indices -> their states, set up `way` for n prompts."""
    from formats.prompts import PromptEmbeddings
    if way == "per batch":
        return PromptEmbeddings(_text(), _prompts(n)).__getitem__
    if way == "in RAM":
        return torch.randn(n, 77, TEXT["hidden_size"]).__getitem__
    path = os.path.join(folder, f"states-{n}.npy")
    if not os.path.exists(path):  # random rows: the cost of encoding them is per batch's time x n
        rows = np.lib.format.open_memmap(path + ".tmp.npy", mode="w+", dtype=np.float16, shape=(n, 77, TEXT["hidden_size"]))
        for i in range(0, n, 1000):
            rows[i:i + 1000] = np.random.default_rng(i).standard_normal((min(1000, n - i), 77, TEXT["hidden_size"]))
        rows.flush()
        del rows
        os.replace(path + ".tmp.npy", path)
    cache = np.load(path, mmap_mode="r")
    return lambda idx: torch.from_numpy(cache[np.sort(idx.numpy())].astype(np.float32))


def _prompts_memory(way, n, folder):
    batches = 10 if way == "per batch" else 1000  # the cache: enough random batches to touch most of its pages
    imports = _rss_mib()
    get = build_prompts(way, n, folder)
    built = _rss_mib()
    gen = torch.Generator().manual_seed(0)

    def draw():  # each batch dropped once drawn, as a run does
        for _ in range(batches):
            get(torch.randint(0, n, (BATCH_OF_PROMPTS,), generator=gen))
    _, peak = _peak_rss(draw)
    return {"built_mib": built - imports, "peak_mib": peak - imports}


def bench_prompts(repeats=7, warmup=2, threads=1):
    set_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        n = 10_000
        gets = {way: build_prompts(way, n, folder) for way in ("per batch", "memory-mapped cache", "in RAM")}
        gen = torch.Generator().manual_seed(0)
        med, _ = _interleaved({w: (lambda g=g: g(torch.randint(0, n, (BATCH_OF_PROMPTS,), generator=gen)))
                               for w, g in gets.items()}, repeats, warmup)
        del gets
        rows = []
        for way, sizes in (("per batch", (1_000, 10_000, 100_000)), ("memory-mapped cache", (1_000, 10_000)),
                           ("in RAM", (1_000, 10_000))):
            for size in sizes:
                mem = _in_fresh_process("prompts", json.dumps([way, size, folder]), threads)
                cache = os.path.join(folder, f"states-{size}.npy")
                disk = os.path.getsize(cache) / 2 ** 20 if way == "memory-mapped cache" else 0
                rows.append([way, f"{size}", f"{1000 * med[way]:.2f}", f"{mem['built_mib']:.0f}",
                             f"{mem['peak_mib']:.0f}", f"{disk:.0f}"])
    print(f"text states of {BATCH_OF_PROMPTS} prompts, CLIP width {TEXT['hidden_size']}, {TEXT['num_hidden_layers']} "
          f"layers, fp32 CPU, {threads} thread(s)")
    _table(["way", "prompts", "ms per batch (10k)", "RSS after setup MiB", "peak RSS MiB", "disk MiB"], rows)
    print("(ms: median of interleaved batches at 10k prompts; RSS over the process's imports, one fresh process per "
          "row, 1000 random batches, 10 encoded per batch; the cache's rows are fp16 and random, writing them is not timed)")
    return rows


# --------------------------------------------------------------------------------------------------


def _in_fresh_process(kind, arg, threads):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "tools.bench_options", "_mem", kind, arg, str(threads)], cwd=root,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"memory child {kind} {arg} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_child(kind, arg, threads):
    set_threads(int(threads))
    _warm_libraries()
    result = _train_memory(arg) if kind == "train" else _prompts_memory(*json.loads(arg))
    print(json.dumps(result))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_mem"]:
        return _memory_child(*argv[1:4])
    if argv[:1] == ["train"] and argv[1:]:  # train, only the options whose names contain one of these words
        return bench_train(which=[name for name in OPTIONS if any(word in name for word in argv[1:])])
    which = argv or ["train", "prompts"]
    for name in which:
        {"train": bench_train, "prompts": bench_prompts}[name]()


if __name__ == "__main__":
    main()
