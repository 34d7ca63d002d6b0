"""Shared by the test files: nothing leaves this machine or touches the user's caches, one intra-op thread, the
relative error used for every parity check, and a tiny Stable Diffusion folder with the helpers that train on it."""
import atexit
import io
import json
import os
import shutil
import tempfile
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import swiftbrush as sb
from harness import checkpoint
from harness.steplog import StepLog
from tools.cards import sd21_base_on_meta  # noqa: F401 (the tests' too)
from parity.tiny_sd import make_tiny_sd, make_tiny_sdxl

# Set before anything imports huggingface_hub (it reads them once): no download ever, an empty hub cache, and the
# miniature's teacher cache in a temporary folder too.
_CACHES = tempfile.mkdtemp(prefix="swiftbrush-tests-")
atexit.register(shutil.rmtree, _CACHES, ignore_errors=True)
os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=os.path.join(_CACHES, "hf"),
                  SWIFTBRUSH_CACHE=os.path.join(_CACHES, "swiftbrush"))

TOL = 1e-4  # max|a-b| / max|a| in fp32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning threads
    made the tests 10-20x slower; restored after each module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


# --------------------------------------------------------------------------------------------------
# A tiny Stable Diffusion folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) and runs on it


CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# A tiny Stable Diffusion folder: unet/ vae/ text_encoder/ tokenizer/ scheduler/ (built by diffusers, the oracle)


@pytest.fixture(scope="session")
def sd_root(tmp_path_factory):
    return make_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="session")
def sdxl_root(tmp_path_factory):
    return make_tiny_sdxl(str(tmp_path_factory.mktemp("tiny_sdxl")))


@pytest.fixture(scope="session")
def sd_root_v(sd_root, tmp_path_factory):
    """The same weights, declared v-prediction."""
    root = str(tmp_path_factory.mktemp("tiny_sd_v") / "sd")
    shutil.copytree(sd_root, root)
    path = os.path.join(root, "scheduler", "scheduler_config.json")
    with open(path) as f:
        c = json.load(f)
    c["prediction_type"] = "v_prediction"
    with open(path, "w") as f:
        json.dump(c, f)
    return root


UNET_FILE = os.path.join("unet", "diffusion_pytorch_model.safetensors")


def inputs(B=2, seed=1, L=16, D=32, hw=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, hw, hw, generator=g), torch.randn(B, L, D, generator=g)


# Training runs: tiny and fast.
BASE = dict(batch_size=2, lora_rank=4, lora_alpha=8.0, lr=1e-3, save_every=0, sample_every=0, seed=0, prompts="demo")


def run(root, out, steps, models=None, **kw):
    """train(); returns (models, state, the log rows this call wrote)."""
    done = len(checkpoint.read_log(out)) if os.path.exists(os.path.join(out, "log.jsonl")) else 0
    m, state = sb.train(sb.Config(model=root, out=str(out), steps=steps, **{**BASE, **kw}), models=models,
                        progress=False)
    return m, state, checkpoint.read_log(out)[done:]


def logged_now(logs, state):
    """train_step's numbers as train() logs them (harness/steplog.py), read at once: the row it writes."""
    log = StepLog(io.StringIO(), state["world"], [])
    log.send(state["step"] + 1, logs, time.time())
    log.flush()
    return json.loads(log.file.getvalue())


def cli_args(root, out, steps):
    return ["--model", root, "--out", str(out), "--steps", str(steps), "--batch-size", "2", "--lora-rank", "4",
            "--lora-alpha", "8", "--lr", "1e-3", "--save-every", "0", "--sample-every", "0", "--prompts", "demo"]


def cli(argv):
    return sb.main(argv)


def cli_error(argv, capsys):
    """Run the CLI expecting a clean exit with an error; returns the one-line message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(argv)
    err = capsys.readouterr().err
    code = e.value.code
    assert code not in (0, None)
    assert "Traceback" not in err
    if isinstance(code, str):  # sys.exit("swiftbrush: error: ...")
        assert code.startswith("swiftbrush: ") and "\n" not in code.strip(), code
        return code
    lines = err.strip().splitlines()  # argparse: usage, then one "prog: error: ..." line
    assert code == 2 and "error: " in lines[-1] and lines[0].startswith("usage:"), err
    return lines[-1]


def read_ckpt(path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def same_tensors(a, b):
    """The checkpoints' tensors (weights, EMA, LoRA, both Adam states, RNG, order) equal bit for bit; their configs
    may differ."""
    (ta, _), (tb, _) = read_ckpt(a), read_ckpt(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def assert_same_ckpt(a, b):
    (ta, ma), (tb, mb) = read_ckpt(a), read_ckpt(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ca, cb = json.loads(ma.pop("config")), json.loads(mb.pop("config"))
    ca.pop("out"), cb.pop("out")
    assert ca == cb and ma == mb


def read_log(out):
    rows = checkpoint.read_log(out)
    for r in rows:
        r.pop("sec_per_step"), r.pop("peak_gb")
    return rows


@pytest.fixture(scope="module")  # module: after one_thread, so that its numbers match the runs it is compared with
def straight6(sd_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight6")
    m, state, _ = run(sd_root, out, 6)
    return str(out), m, state
