"""The COCO-2014 evaluation on tiny models: the Frechet distance against its closed form, the CLIP score against the
model's own embeddings, the caption rule on a fake captions_val2014.json, a stopped evaluation continued to the same
images and numbers, --ablation with the metric columns, and one line for each bad input. Inception is clean-fid's,
which is not installed here: a stand-in module takes its place."""
import importlib.machinery
import json
import os
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluation.generate
from conftest import cli, cli_args, cli_error, run
from evaluation import coco as coco_run
from evaluation import metrics
from evaluation.coco import main as evaluation_main
from evaluation.coco import parse_args
from evaluation.frechet import frechet_distance
from evaluation.prompts import coco_captions
from parity.tiny_sd import make_tiny_feature_models

# --------------------------------------------------------------------------------------------------
# The Frechet distance


def test_frechet_distance_is_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    a, b, mu1, mu2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16), rng.normal(size=16), rng.normal(size=16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_full_covariances_matches_the_eigenvalues_of_their_product():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(32, 32)), rng.normal(size=(32, 32))
    s1, s2 = x @ x.T / 32, y @ y.T / 32
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()  # Tr (S1 S2)^(1/2), another route
    assert frechet_distance(np.zeros(32), s1, np.ones(32), s2) == pytest.approx(
        32 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt, rel=1e-8)


def test_frechet_distance_of_large_samples_of_one_distribution_is_about_zero():
    rng = np.random.default_rng(2)
    mix = rng.normal(size=(6, 6))
    a, b, shifted = metrics.FeatureStats(), metrics.FeatureStats(), metrics.FeatureStats()
    for stats, shift in ((a, 0.0), (b, 0.0), (shifted, 0.5)):
        stats.add(rng.normal(size=(200_000, 6)) @ mix + 3.0 + shift)
    assert 0 <= frechet_distance(*a.mean_cov(), *b.mean_cov()) < 1e-3 * np.trace(mix.T @ mix)
    # a shift of 0.5 in each of the 6 dimensions: 6 * 0.25
    assert frechet_distance(*a.mean_cov(), *shifted.mean_cov()) == pytest.approx(1.5, abs=0.02)


def test_frechet_distance_is_stable_with_fewer_images_than_dimensions():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(12, 64)) + 0.1  # covariances of rank 9 and 11 in 64 dims
    (mu_a, s_a), (mu_b, s_b) = ((x.mean(0), np.cov(x, rowvar=False)) for x in (a, b))
    assert abs(frechet_distance(mu_a, s_a, mu_a, s_a)) < 1e-6 * np.trace(s_a)  # measured: 8e-8 of it
    fd = frechet_distance(mu_a, s_a, mu_b, s_b)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s_a @ s_b).real.clip(0)).sum()
    assert np.isfinite(fd) and fd > 0
    assert fd == pytest.approx(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt, rel=1e-6)


def test_feature_stats_added_in_batches_equal_numpys():
    x = np.random.default_rng(4).normal(size=(100, 8)) * 5 + 1000  # far from 0: the shift keeps the sums precise
    stats = metrics.FeatureStats()
    for i in range(0, 100, 7):
        stats.add(x[i:i + 7])
    mu, sigma = stats.mean_cov()
    assert np.allclose(mu, x.mean(0), rtol=0, atol=1e-9) and np.allclose(sigma, np.cov(x, rowvar=False), atol=1e-8)


# --------------------------------------------------------------------------------------------------
# Tiny feature networks, a fake COCO, real images


@pytest.fixture(scope="module")
def feature_models(tmp_path_factory):
    """(CLIP folder, DINOv2 folder): random tiny transformers models written by save_pretrained."""
    return make_tiny_feature_models(str(tmp_path_factory.mktemp("feature_models")))


def write_coco(path, shuffle_seed=None):
    """A captions_val2014.json of 12 images (ids 100..111) with 2-3 captions each, listed in a shuffled order; the
    image 111 has none, so 11 can be picked. The caption with the lowest annotation id is 'first caption of N'."""
    images = [{"id": 100 + k, "file_name": f"COCO_val2014_{100 + k:012d}.jpg"} for k in range(12)]
    annotations = []
    for k in range(11):
        for j, ann_id in enumerate([1000 + 10 * k, 5000 + k, 9000 + k][:2 + k % 2]):
            text = f"  first caption of {100 + k}\n" if j == 0 else f"another caption of {100 + k}"
            annotations.append({"image_id": 100 + k, "id": ann_id, "caption": text})
    if shuffle_seed is not None:
        rng = np.random.default_rng(shuffle_seed)
        images, annotations = [images[i] for i in rng.permutation(12)], [annotations[i] for i in
                                                                         rng.permutation(len(annotations))]
    with open(path, "w") as f:
        json.dump({"info": {}, "images": images, "annotations": annotations}, f)
    return str(path)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """(captions file, folder of real images): images of several sizes and modes, as COCO's are."""
    root = tmp_path_factory.mktemp("coco")
    folder = root / "val2014"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for k, (w, h) in enumerate([(40, 30), (30, 40), (32, 32), (36, 36), (48, 20), (20, 48), (33, 31), (64, 64)]):
        pixels = (rng.uniform(size=(h, w, 3)) * np.linspace(0.3, 1, w)[None, :, None] * 255).astype(np.uint8)
        image = Image.fromarray(pixels).convert("L") if k == 3 else Image.fromarray(pixels)
        image.save(folder / f"COCO_val2014_{k:012d}.{'png' if k % 2 else 'jpg'}")
    (folder / "notes.txt").write_text("not an image")
    return write_coco(root / "captions_val2014.json"), str(folder)


@pytest.fixture(scope="module")
def student_run(sd_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    run(sd_root, out, 2)
    return str(out)


class StandInInception(torch.nn.Module):
    """In place of clean-fid's torchscript Inception: it checks what it is given, pools it to 48 numbers."""

    def __init__(self, path, download=True):
        super().__init__()
        if download and not os.path.exists(os.path.join(path, metrics.INCEPTION_FILE)):
            raise urllib.error.URLError("no network")

    def forward(self, x):
        assert x.shape[1:] == (3, 299, 299) and x.dtype == torch.float32 and x.max() > 1  # in [0, 255], not [0, 1]
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


@pytest.fixture
def cleanfid(monkeypatch, tmp_path):
    """A stand-in clean-fid package, its weights folder a temporary one."""
    package, module = types.ModuleType("cleanfid"), types.ModuleType("cleanfid.inception_torchscript")
    package.__spec__ = importlib.machinery.ModuleSpec("cleanfid", None)
    module.InceptionV3W, package.inception_torchscript = StandInInception, module
    monkeypatch.setitem(sys.modules, "cleanfid", package)
    monkeypatch.setitem(sys.modules, "cleanfid.inception_torchscript", module)
    monkeypatch.setattr(metrics, "CLEANFID_FOLDER", str(tmp_path))
    (tmp_path / metrics.INCEPTION_FILE).write_bytes(b"")  # there: nothing to download
    return tmp_path


def eval_args(out, coco, feature_models, *extra):
    captions, images = coco
    return ["--captions", captions, "--images", images, "--clip-model", feature_models[0], "--dinov2-model",
            feature_models[1], "--n", "6", "--batch-size", "4", "--out", str(out), "--device", "cpu", *extra]


# --------------------------------------------------------------------------------------------------
# The caption rule, CLIP score, DINOv2


def test_coco_rule_is_deterministic_one_caption_per_image_and_independent_of_the_files_order(tmp_path):
    picked = coco_captions(write_coco(tmp_path / "a.json"), 11)
    assert coco_captions(write_coco(tmp_path / "b.json", shuffle_seed=7), 11) == picked  # the file's order is no input
    assert sorted(i for i, _ in picked) == list(range(100, 111))  # each image with captions, once; 111 has none
    assert all(text == f"first caption of {i}" for i, text in picked)  # the lowest annotation id, stripped
    assert [i for i, _ in picked] != sorted(i for i, _ in picked)  # hashed, not in id order
    assert coco_captions(write_coco(tmp_path / "c.json"), 4) == picked[:4]  # --n 4: the first 4 of the full list


def test_clip_score_is_the_cosine_of_the_models_own_embeddings(feature_models):
    from transformers import CLIPModel, CLIPTokenizer
    score = metrics.CLIPScore(feature_models[0], torch.device("cpu"))
    rng = np.random.default_rng(6)
    images = [Image.fromarray((rng.uniform(size=(40 + 8 * k, 48, 3)) * 255).astype(np.uint8)) for k in range(3)]
    captions = ["a red circle", "a blue square on grey", "a green triangle"]
    got = score([score.pixels(im) for im in images], captions)

    model, tokenizer = CLIPModel.from_pretrained(feature_models[0]), CLIPTokenizer.from_pretrained(feature_models[0])
    text = tokenizer(["A photo depicts " + c for c in captions], padding=True, truncation=True, return_tensors="pt")
    pixels = torch.from_numpy(np.stack([score.pixels(im) for im in images]))
    assert pixels.shape == (3, 3, 32, 32)  # the processor's 32 px centre crop of each image
    with torch.no_grad():
        e_image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        e_text = model.text_projection(model.text_model(**text).pooler_output)
    by_hand = ((e_image / e_image.norm(dim=-1, keepdim=True)) * (e_text / e_text.norm(dim=-1, keepdim=True))).sum(-1)
    assert np.allclose(got, by_hand.numpy(), atol=1e-6) and np.all(np.abs(got) <= 1) and len(set(got)) == 3


def sharp_edged_square():
    """A 256 px uint8 square of black and white stripes and blocks: bicubic overshoots [0, 255] at every edge."""
    x = np.zeros((256, 256, 3), np.uint8)
    x[:, ::8] = x[:, 1::8] = 255
    x[64:128, 64:192, 1] = 255
    return Image.fromarray(x)


def test_inceptions_resize_is_clean_fids_clipped_bicubic():
    """clean-fid's "clean" resizer (clean-fid >= 0.1.21, where it is installed; the formula as it writes it, where not):
    PIL bicubic per channel in float32 to 299 px, clipped to [0, 255]. Without the clip a sharp edge overshoots."""
    image = sharp_edged_square()
    x = np.asarray(image)
    try:
        from cleanfid.resize import build_resizer
        theirs = build_resizer("clean")(x)
    except ImportError:  # clean-fid's make_resizer("PIL", False, "bicubic", (299, 299)), written out
        theirs = np.concatenate([np.asarray(Image.fromarray(x[:, :, c].astype(np.float32), mode="F").resize(
            (299, 299), resample=Image.BICUBIC)).clip(0, 255).reshape(299, 299, 1) for c in range(3)], axis=2)
    ours = metrics.inception_input(image)
    assert ours.dtype == np.float32 and ours.shape == (3, 299, 299)
    assert np.array_equal(ours, theirs.transpose(2, 0, 1)) and np.array_equal(metrics.clean_resize(image), ours)
    unclipped = np.stack([np.asarray(Image.fromarray(x[:, :, c].astype(np.float32)).resize((299, 299), Image.BICUBIC))
                          for c in range(3)])
    outside = (unclipped < 0) | (unclipped > 255)
    assert outside.mean() > 0.05 and np.abs(unclipped - ours).max() > 10  # what the clip removes
    assert np.array_equal(unclipped[~outside], ours[~outside])


def test_clip_reads_the_256_px_square_as_the_peers(feature_models, tmp_path):
    """prepare() gives CLIP's processor the centre-cropped 256 px Lanczos square, the image FID and FD-DINOv2 see."""
    score = metrics.CLIPScore(feature_models[0], torch.device("cpu"))
    rng = np.random.default_rng(8)
    image = Image.fromarray((rng.uniform(size=(40, 72, 3)) * 255).astype(np.uint8))
    image.save(tmp_path / "wide.png")
    got = metrics.prepare(str(tmp_path / "wide.png"), [score])["clip"]
    assert np.array_equal(got, score.pixels(metrics.square(image)))
    assert not np.allclose(got, score.pixels(image))  # the full-size image: another input


def test_dinov2_features_are_the_cls_token_after_the_last_layer_norm(feature_models):
    from transformers import Dinov2Model
    net = metrics.DINOv2(feature_models[1], torch.device("cpu"))
    image = metrics.square(Image.fromarray((np.random.default_rng(7).uniform(size=(30, 50, 3)) * 255).astype(np.uint8)))
    x = metrics.dinov2_input(image)
    assert image.size == (256, 256) and x.shape == (3, 224, 224)
    model = Dinov2Model.from_pretrained(feature_models[1])
    with torch.no_grad():
        tokens = model(pixel_values=torch.from_numpy(x)[None]).last_hidden_state  # layer-normed, CLS first
    assert np.allclose(net([x]), tokens[:, 0].numpy(), atol=1e-6) and net([x]).shape == (1, 32)


# --------------------------------------------------------------------------------------------------
# A whole evaluation: stopped, continued, the same images and numbers


def test_stopped_evaluation_continues_to_the_same_images_and_numbers(student_run, coco, feature_models, cleanfid,
                                                                      tmp_path, monkeypatch):
    straight = coco_run.evaluate(parse_args(["--student", student_run] + eval_args(tmp_path / "a", coco,
                                                                                     feature_models)))
    assert straight["images"] == 6 and {"fid", "clip_score", "fd_dinov2"} <= set(straight)
    assert json.load(open(tmp_path / "a" / "results.json"))["fid"] == straight["fid"]
    assert "| student" in (tmp_path / "a" / "results.md").read_text()
    pngs = [(tmp_path / "a" / "images" / f"{i:05d}.png").read_bytes() for i in range(6)]
    assert len(set(pngs)) == 6  # each image its own noise and caption

    calls = []
    def stop_at_the_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return sample_images(*args)
    sample_images = evaluation.generate.sample_images
    monkeypatch.setattr(evaluation.generate, "sample_images", stop_at_the_second_batch)
    argv = ["--student", student_run] + eval_args(tmp_path / "b", coco, feature_models)
    with pytest.raises(SystemExit) as e:
        evaluation_main(argv)
    assert e.value.code == 130 and sorted(os.listdir(tmp_path / "b" / "images")) == [f"{i:05d}.png" for i in range(4)]
    (tmp_path / "b" / "images" / "00004.png.tmp").write_bytes(b"half a png")  # what a kill during a write leaves
    os.remove(tmp_path / "b" / "images" / "00001.png")  # and an image lost: its batch is generated again
    monkeypatch.setattr(evaluation.generate, "sample_images", sample_images)
    resumed = coco_run.evaluate(parse_args(argv))
    assert [(tmp_path / "b" / "images" / f"{i:05d}.png").read_bytes() for i in range(6)] == pngs
    assert {k: resumed[k] for k in ("fid", "clip_score", "fd_dinov2")} == {k: straight[k] for k in
                                                                           ("fid", "clip_score", "fd_dinov2")}
    monkeypatch.setattr(evaluation.generate, "sample_images", lambda *a: pytest.fail("an image was there"))
    again = coco_run.evaluate(parse_args(argv))
    assert again["clip_score"] == straight["clip_score"] and again["fd_dinov2"] == straight["fd_dinov2"]
    assert sorted(os.listdir(tmp_path / "b" / "images")) == [f"{i:05d}.png" for i in range(6)]  # no .tmp left
    line = eval_error(argv + ["--seed", "1"])  # other noise: other images
    assert "holds the images of another evaluation (its seed differ" in line


def test_teacher_evaluation_on_a_prompt_file(sd_root, feature_models, tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n\na cat\na dog\n")
    results = coco_run.evaluate(parse_args(
        ["--model", sd_root, "--teacher-steps", "2", "--prompts", str(tmp_path / "prompts.txt"), "--n", "3",
         "--metrics", "clip", "--clip-model", feature_models[0], "--out", str(tmp_path / "t"), "--device", "cpu"]))
    assert results["images"] == 3 and results["model"].startswith("teacher") and "fid" not in results
    assert "DDIM 2 steps" in results["protocol"]["model"] and len(os.listdir(tmp_path / "t" / "images")) == 3


def test_a_k_step_students_images_are_its_k_steps_from_each_images_own_noises(student_run, feature_models, tmp_path):
    """--student-steps 2 (a one-step run sampled in 2 steps): image i is sample.py's 2-step image of its caption from
    its own z and eps', whatever the batch it is in; the protocol says so."""
    from harness.images import to_uint8
    from sample import load_generator, sample_images
    (tmp_path / "prompts.txt").write_text("a cat\na dog\na red circle\n")
    argv = ["--student", student_run, "--student-steps", "2", "--prompts", str(tmp_path / "prompts.txt"), "--n", "3",
            "--metrics", "clip", "--clip-model", feature_models[0], "--device", "cpu", "--batch-size", "1"]
    results = coco_run.evaluate(parse_args(argv + ["--out", str(tmp_path / "k2")]))
    assert "(2 steps, EMA)" in results["model"] and "then the 1 noises of the student's re-noising" in \
        results["protocol"]["noise"]
    g = load_generator(parse_args(argv + ["--out", str(tmp_path / "unused")]))
    z, renoise = evaluation.generate.noise(0, [2], g.latent_shape, 2)
    assert torch.equal(z, evaluation.generate.noise(0, [2], g.latent_shape)[0])  # the one-step student's z
    want = to_uint8(sample_images(g, z, g.text.encode(["a red circle"]), renoise=renoise))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "k2" / "images" / "00002.png")), want[0])
    one_step = coco_run.evaluate(parse_args(argv[:2] + argv[4:] + ["--out", str(tmp_path / "k1")]))
    assert "(1 step, EMA)" in one_step["model"] and one_step["clip_score"] != results["clip_score"]


def test_reference_statistics_are_cached_and_recomputed_when_damaged(coco, feature_models, tmp_path, monkeypatch):
    net = metrics.DINOv2(feature_models[1], torch.device("cpu"))
    files = coco_run.image_files(coco[1])
    assert len(files) == 8  # the .jpg and .png files, not notes.txt
    first = coco_run.reference_stats(coco[1], files, [net], 4)["fd-dinov2"]
    cached = [os.path.join(r, f) for r, _, fs in os.walk(os.environ["SWIFTBRUSH_CACHE"]) for f in fs
              if f.startswith("reference-fd-dinov2")]
    assert len(cached) == 1
    monkeypatch.setattr(coco_run, "measure", lambda *a, **k: pytest.fail("measured again"))
    again = coco_run.reference_stats(coco[1], files, [net], 4)["fd-dinov2"]
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    open(cached[0], "wb").write(b"damaged")
    monkeypatch.undo()
    redone = coco_run.reference_stats(coco[1], files, [net], 4)["fd-dinov2"]
    assert all(np.allclose(x, y) for x, y in zip(first, redone))


# --------------------------------------------------------------------------------------------------
# --ablation on Stable Diffusion ends with the metric columns


def test_ablation_table_gets_the_coco_columns(sd_root, coco, feature_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(coco_run, "CLIP_MODEL", feature_models[0])
    monkeypatch.setattr(coco_run, "DINOV2_MODEL", feature_models[1])
    out = tmp_path / "ablation"
    evaluate = ["--ablation", "--eval-captions", coco[0], "--eval-images", coco[1], "--eval-metrics", "clip,fd-dinov2"]
    line = cli_error(cli_args(sd_root, out, 1) + evaluate + ["--eval-n", "50"], capsys)  # checked before training
    assert "the COCO-2014 evaluation: --eval-n 50: " in line and not out.exists()  # the flag the user typed
    monkeypatch.setitem(sys.modules, "cleanfid", None)  # not installed
    line = cli_error(cli_args(sd_root, out, 1) + evaluate[:-1] + ["fid", "--eval-n", "3"], capsys)
    assert "FID needs clean-fid" in line and not out.exists()
    cli(cli_args(sd_root, out, 1) + evaluate + ["--eval-n", "3"])
    table = (out / "table.md").read_text().splitlines()
    assert table[0].endswith("| eval images | FID | CLIP score | FD-DINOv2 |")
    for line, name in zip(table[2:], ("vsd-x0", "sds-x0", "vsd-eps")):
        cells = [c.strip() for c in line.split("|")[-5:-1]]
        results = json.load(open(out / name / "eval" / "results.json"))
        assert cells == ["3", "-", f"{results['clip_score']:.4f}", f"{results['fd_dinov2']:.1f}"]


# --------------------------------------------------------------------------------------------------
# Bad input: one line each, nothing written


def eval_error(argv):
    with pytest.raises(SystemExit) as e:
        evaluation_main(argv)
    code = e.value.code
    assert isinstance(code, str) and code.startswith("evaluation: error: ") and "\n" not in code, code
    return code


@pytest.mark.parametrize("change, words", [
    ({"--captions": "missing.json"}, "not found"),
    ({"--captions": "not-json"}, "is not JSON"),
    ({"--captions": "empty"}, "cannot read captions file"),  # a folder
    ({"--captions": "not-coco"}, "not a COCO captions file"),
    ({"--n": "12"}, "--n 12: "),
    ({"--n": "1"}, "needs at least 2 images"),
    ({"--images": "missing-folder"}, "not a folder"),
    ({"--images": "empty"}, "holds 0 .jpg/.png images"),
    ({"--images": "unreadable"}, "not a readable image"),
    ({"--clip-model": "nobody/no-such-clip"}, "--clip-model nobody/no-such-clip: cannot load it"),
    ({"--dinov2-model": "nobody/no-such-dinov2"}, "hub cache or reachable"),
    ({"--metrics": "fid,clip"}, "FID needs clean-fid, which is not installed"),
    ({"--out": "a-file"}, "--out a-file exists and is not a folder"),
])
def test_bad_input_is_one_line(student_run, coco, feature_models, tmp_path, monkeypatch, change, words):
    (tmp_path / "not-json").write_text("{oops")
    (tmp_path / "not-coco").write_text(json.dumps({"images": [1, 2]}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("")
    (tmp_path / "unreadable").mkdir()
    for k in range(3):
        (tmp_path / "unreadable" / f"{k}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    monkeypatch.setitem(sys.modules, "cleanfid", None)  # not installed
    monkeypatch.chdir(tmp_path)
    argv = ["--student", student_run] + eval_args(tmp_path / "out", coco, feature_models, "--metrics", "clip,fd-dinov2")
    for flag, value in change.items():
        argv[argv.index(flag) + 1] = value
    assert words in eval_error(argv)
    assert not (tmp_path / "out").exists()


def test_damaged_protocol_and_failed_writes_are_one_line(student_run, coco, feature_models, tmp_path, monkeypatch):
    argv = ["--student", student_run] + eval_args(tmp_path / "out", coco, feature_models, "--metrics", "clip")
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "evaluation.json").write_text("{half a protocol")
    assert "evaluation.json is damaged: delete it" in eval_error(argv)
    os.remove(tmp_path / "out" / "evaluation.json")
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    assert "cannot write the images into" in eval_error(argv)
    assert not [name for name in os.listdir(tmp_path / "out" / "images") if name.endswith(".tmp")]  # none left


def test_inception_weights_one_line_each(cleanfid, tmp_path):
    os.remove(cleanfid / metrics.INCEPTION_FILE)  # not there, and the download fails
    with pytest.raises(coco_run.UsageError, match="cannot be downloaded .URLError.: fetch https://.*--inception-weights"):
        metrics.Inception(None, torch.device("cpu"))
    with pytest.raises(coco_run.UsageError, match="under the name inception-2015-12-05.pt"):
        metrics.Inception(str(tmp_path / "inception.pt"), torch.device("cpu"))
    local = tmp_path / "weights" / metrics.INCEPTION_FILE
    local.parent.mkdir()
    local.write_bytes(b"")
    net = metrics.Inception(str(local), torch.device("cpu"))
    image = metrics.square(Image.fromarray(np.full((20, 30, 3), 200, np.uint8)))
    assert np.allclose(net([metrics.clean_resize(image)]), 200, atol=1e-3)  # clean resize: no rounding, no rescale
