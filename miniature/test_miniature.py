"""The miniature: the synthetic world and its truth-based metrics, the tokenizer, images, the quick end-to-end run
and the teacher cache."""
import json
import math
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

import miniature
import swiftbrush as sb
from harness import checkpoint, images
from miniature import report, teacher, world
from unet import load_unet


@pytest.fixture(scope="module")
def real():
    images, captions, attrs = world.sample_world(240, seed=0)
    return images, captions, attrs, world.evaluate(images, captions)


# ------------------------------------------------------------------------------------------------------ world
def test_sample_world_deterministic_per_seed():
    a, ca, aa = world.sample_world(16, seed=5)
    b, cb, ab = world.sample_world(16, seed=5)
    c, _, _ = world.sample_world(16, seed=6)
    d, cd, _ = world.sample_world(16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and ca == cb and all(torch.equal(aa[k], ab[k]) for k in aa)
    assert torch.equal(a, d) and ca == cd
    assert not torch.equal(a, c)


def test_sample_world_invariants():
    images, captions, attrs = world.sample_world(300, seed=1)
    assert images.shape == (300, 3, 16, 16) and images.dtype == torch.float32
    assert images.abs().max() <= 0.7 + 1e-6  # data never saturates: clipping by a generator is measurable
    assert set(captions) == set(world.PROMPTS)  # every colour x shape occurs
    for cap, ci, si in zip(captions, attrs["color"].tolist(), attrs["shape"].tolist()):
        assert world.parse_caption(cap) == (ci, si)
    s = attrs["size"]
    assert s.min() >= 3 and s.max() <= 6
    for c in (attrs["cx"], attrs["cy"]):
        assert (c - s >= 0).all() and (c + s <= 16).all()  # the object lies fully inside
    # Every pixel is the prompt's colour blended over the 0 background: image = alpha * colour, alpha in [0, 1].
    colour = world.PALETTE[attrs["color"]][:, :, None, None]
    alpha = images[:, :1] / colour[:, :1]
    assert torch.allclose(images, alpha * colour, atol=1e-6) and alpha.min() >= 0 and alpha.max() <= 1 + 1e-6
    assert (images[:, :, 0, :] == 0).float().mean() > 0.5  # mostly plain grey background at the top edge


def test_coverage_matches_analytic_area():
    s = torch.tensor([3.0, 4.5, 6.0] * 3)
    shape = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    cov = world.render_coverage(shape, torch.full((9,), 8.0), torch.full((9,), 8.0), s).sum((1, 2))
    area = torch.stack([math.pi * s[:3] ** 2, 4 * s[3:6] ** 2, 2 * s[6:] ** 2]).flatten()
    assert torch.allclose(cov, area, rtol=0.05)


def test_prompts_fix_colour_and_shape_but_not_layout():
    prompts = world.PROMPTS * 2
    images, captions, attrs = world.sample_world(24, seed=3, prompts=prompts)
    _, _, free = world.sample_world(24, seed=3)
    assert captions == prompts
    assert torch.equal(attrs["cx"], free["cx"]) and torch.equal(attrs["size"], free["size"])
    assert world.evaluate(images, captions)["color_acc"] == 1.0


def test_parse_caption():
    assert len(world.PROMPTS) == 12 and len(set(world.PROMPTS)) == 12
    assert [world.parse_caption(p) for p in world.PROMPTS] == [(c, s) for c in range(4) for s in range(3)]
    assert world.parse_caption("A Blue  TRIANGLE") == (2, 2)
    for bad in ("a purple circle", "a red", "a red blue square"):
        with pytest.raises(ValueError):
            world.parse_caption(bad)


# ---------------------------------------------------------------------------------------------------- metrics
def test_real_samples_score_well(real):
    images, captions, attrs, r = real
    assert r["present"] == 1.0 and r["color_acc"] >= 0.95 and r["shape_acc"] >= 0.95
    assert r["clipped"] == 0.0 and r["bg_noise"] < 0.01
    assert r["pos_spread"] == pytest.approx(r["true_pos_spread"], rel=0.2)
    assert r["size_spread"] == pytest.approx(r["true_size_spread"], rel=0.2)
    assert 1.5 < r["true_pos_spread"] < 3 and 1 < r["true_size_spread"] < 2.5
    assert 0.1 < r["saturation"] < 0.25
    assert 0 <= r["fd"] < 0.3


def test_grey_and_noise_score_badly(real):
    images, captions, _, r = real
    grey = world.evaluate(torch.zeros_like(images), captions)
    assert grey["present"] == 0 and grey["color_acc"] == 0 and grey["shape_acc"] == 0
    assert grey["fd"] > 10 * r["fd"]
    g = torch.Generator().manual_seed(0)
    for noise in (torch.randn(images.shape, generator=g), torch.randn(images.shape, generator=g).clamp(-1, 1),
                  0.3 * torch.randn(images.shape, generator=g)):
        m = world.evaluate(noise, captions)
        # Noise puts many pixels near every palette colour, but scattered: no object may be found in it.
        assert m["present"] <= 0.02 and m["color_acc"] <= 0.02 and m["shape_acc"] <= 0.02
        assert m["bg_noise"] > 0.25 and m["fd"] > 10 * r["fd"]
    assert world.evaluate(torch.randn(images.shape, generator=g), captions)["clipped"] > 0.2


def test_metrics_follow_the_captions(real):
    images, captions, _, r = real
    idx = [world.PROMPTS.index(c) for c in captions]
    other_colour = [world.PROMPTS[(i + 3) % 12] for i in idx]
    other_shape = [world.PROMPTS[i // 3 * 3 + (i + 1) % 3] for i in idx]
    m = world.evaluate(images, other_colour)
    assert m["color_acc"] == 0 and m["present"] == 0
    m = world.evaluate(images, other_shape)
    assert m["color_acc"] >= 0.95 and m["shape_acc"] <= 0.05
    assert m["fd"] == pytest.approx(r["fd"])  # the feature space does not see captions


def test_detects_noise_saturation_and_collapse(real):
    images, captions, _, r = real
    noisy = world.evaluate(images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1)),
                           captions)
    assert noisy["color_acc"] >= 0.95 and 0.07 < noisy["bg_noise"] < 0.13 and noisy["fd"] > r["fd"]
    hot = world.evaluate((1.4 * images).clamp(-1, 1), captions)
    assert hot["clipped"] > 0.1 and hot["saturation"] > r["saturation"] and hot["fd"] > 3 * r["fd"]
    one, caps, _ = world.sample_world(12, seed=9, prompts=world.PROMPTS)  # one image per prompt, repeated
    rep = torch.arange(240) % 12
    collapsed = world.evaluate(one[rep], [caps[i] for i in rep])
    assert collapsed["color_acc"] == 1 and collapsed["pos_spread"] < 1e-3 and collapsed["size_spread"] < 1e-3
    assert collapsed["fd"] > 3 * r["fd"]


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    d, mu = 5, np.arange(5.0)
    assert world.frechet_distance(mu, np.eye(d), mu, np.eye(d)) == pytest.approx(0, abs=1e-9)
    # N(0, I) vs N(m, 4 I): |m|^2 + d (1 + 4 - 2 * 2)
    assert world.frechet_distance(np.zeros(d), np.eye(d), mu, 4 * np.eye(d)) == pytest.approx(30 + d)
    # Non-commuting covariances: tr sqrt(C1 C2) is the sum of the square roots of the eigenvalues of C1 C2.
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    c1, c2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    expect = np.trace(c1) + np.trace(c2) - 2 * np.sqrt(np.linalg.eigvals(c1 @ c2).real).sum()
    assert world.frechet_distance(mu, c1, mu, c2) == pytest.approx(expect, rel=1e-6)
    assert world.frechet_distance(mu, c1, mu, c2) == pytest.approx(world.frechet_distance(mu, c2, mu, c1), rel=1e-6)


def test_evaluate_is_fast(real):
    images, captions, _, _ = real
    t = time.perf_counter()
    world.evaluate(images[:200], captions[:200])
    assert time.perf_counter() - t < 3.0  # ~0.25 s on an idle 2-core CPU; loose so that machine load does not flake


# -------------------------------------------------------------------------------------------------- tokenizer
def test_write_tokenizer_round_trip(tmp_path):
    from transformers import CLIPTokenizer
    words = ["a", *world.COLORS, *world.SHAPES]
    info = world.write_tokenizer(tmp_path, words, max_length=16)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length == 16 and len(tok) == info["vocab_size"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert (bos, eos, tok.pad_token_id) == (info["bos_token_id"], info["eos_token_id"], info["eos_token_id"])
    assert eos == info["vocab_size"] - 1  # largest id: CLIPTextModel's legacy argmax pooling finds it
    ids = tok(["a red circle", ""], padding="max_length", max_length=16)["input_ids"]
    assert ids[0][:5] == [bos, ids[0][1], ids[0][2], ids[0][3], eos] and ids[0][5:] == [eos] * 11
    assert ids[1] == [bos] + [eos] * 15
    # Every vocabulary word is one distinct, known token.
    word_ids = {w: tok(w)["input_ids"] for w in words}
    assert all(len(v) == 3 and v[0] == bos and v[2] == eos for v in word_ids.values())
    singles = [v[1] for v in word_ids.values()]
    assert len(set(singles)) == len(words) and eos not in singles and bos not in singles
    assert tok("A  RED Circle")["input_ids"] == tok("a red circle")["input_ids"]  # lower-casing, whitespace
    caps = [tok(p)["input_ids"] for p in world.PROMPTS]
    assert len({tuple(c) for c in caps}) == 12
    # An unknown word falls back to characters, not to unk.
    purple = tok("purple")["input_ids"][1:-1]
    assert len(purple) == 6 and eos not in purple
    assert tok.decode(ids[0], skip_special_tokens=True) == "a red circle"


# ---------------------------------------------------------------------------------------------------- pictures
def test_save_grid(tmp_path):
    red = world.PALETTE[0].view(1, 3, 1, 1).expand(3, 3, 16, 16)
    rows = [red, torch.zeros(5, 3, 16, 16)]
    images.save_grid(rows, tmp_path / "g.png")
    img = Image.open(tmp_path / "g.png")
    assert img.size == (2 + 5 * (64 + 2), 2 + 2 * (64 + 2))  # 16 px upscaled x4, 2 px padding
    assert img.getpixel((2 + 32, 2 + 32)) == (217, 38, 38)  # (0.7 + 1) * 127.5 rounded, (-0.7 + 1) * 127.5
    assert img.getpixel((2 + 3 * 66 + 32, 2 + 32)) == (255, 255, 255)  # short row: empty cells stay white
    assert img.getpixel((2 + 32, 2 + 66 + 32)) == (128, 128, 128)
    labelled = images.save_grid(rows, tmp_path / "l.png", labels=["red", "grey"])
    assert labelled.size[0] > img.size[0] and labelled.size[1] == img.size[1]
    images.save_grid([torch.zeros(2, 3, 128, 128)], tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").size == (2 + 2 * 130, 2 + 130)  # large images are not upscaled


def test_save_plot(tmp_path):
    rng = np.random.default_rng(0)
    curves = {"loss": [(i, math.exp(-i / 100) + 0.1 * rng.standard_normal()) for i in range(300)],
              "fd": [(0, 3.0), (100, float("nan")), (200, 1.0)], "one": [(50, 0.5)], "none": []}
    images.save_plot(curves, tmp_path / "p.png", "training", size=(500, 300))
    img = Image.open(tmp_path / "p.png").convert("RGB")
    assert img.size == (500, 300)
    pixels = set(map(tuple, np.asarray(img).reshape(-1, 3).tolist()))
    for colour in images.PLOT_COLORS[:3]:
        assert colour in pixels  # each curve with data was drawn
    ma = images._moving_average(np.arange(10.0), 3)
    assert np.allclose(ma[1:-1], np.arange(1.0, 9.0)) and ma[0] == 0.5


def test_ablation_on_the_quick_miniature(tmp_path, capsys):
    out = str(tmp_path / "ablation")
    sb.main(["--model", "miniature-quick", "--ablation", "--out", out])
    printed = capsys.readouterr().out
    for name in ("table.md", "results.json", "grid.png", "curves_student.png", "curves_lora.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    results = json.load(open(os.path.join(out, "results.json")))
    rows = ["the world (truth)", "the world + noise 0.4 (reference)",
            "the world, objects centred, + noise 0.4 (reference)", "Bayes-optimal one step, E[x0 given z] (reference)",
            "teacher, DDIM + CFG 2", "teacher, one step (Eq. 7 at init)"]
    ema = f"EMA {miniature.QUICK['ema_decay']:g}"
    names = ["SDS, x0 student, the start", "SwiftBrush: VSD, x0 student, from an SDS start", "SDS, x0 student",
             "VSD, eps student"]  # the x0 VSD student after its start; the eps student from the teacher, as the paper's
    assert list(results) == rows + [row for name in names for row in (name, f"{name}, {ema}")]
    assert all(math.isfinite(r["fd"][0]) for r in results.values())
    # the paper's ablation, as far as six steps show it: the eps student's image is its raw eps, noise, so it is the
    # noisiest and the farthest from the world of the three (measured: background 0.72 against 0.41 and 0.11, FD 6.8
    # against 5.9 and 4.0)
    eps, x0_students = results[names[3]], [results[name] for name in names[1:3]]
    assert all(eps["bg_noise"][0] > r["bg_noise"][0] + 0.1 and eps["fd"][0] > r["fd"][0] for r in x0_students)
    assert results["the world (truth)"]["color_acc"][0] == 1.0 and results["the world (truth)"]["fd"][0] < 0.5
    assert results["Bayes-optimal one step, E[x0 given z] (reference)"]["start_error"][0] == 0
    assert results["teacher, one step (Eq. 7 at init)"]["start_error"][0] > 0
    assert results["the world, objects centred, + noise 0.4 (reference)"]["pos_spread"][0] < 0.5  # noise is not spread
    table = open(os.path.join(out, "table.md")).read()
    assert "| SDS, x0 student | 1 | 6 |" in table and table in printed
    assert Image.open(os.path.join(out, "grid.png")).size[1] >= 64 * 9  # a row per line of the table
    for flags in sb.ABLATIONS["paper"]:  # three students through the same loop, each in its own folder
        run = os.path.join(out, f"{flags['loss']}-{flags['param']}")
        config = json.load(open(os.path.join(run, "swiftbrush.json")))["config"]
        assert {k: config[k] for k in flags} == flags and config["steps"] == miniature.QUICK["steps"]
        assert len(checkpoint.read_log(run)) == miniature.QUICK["steps"]

    # a second run with another --out reuses the teacher built once for this machine
    sb.main(["--model", "miniature-quick", "--steps", "2", "--out", str(tmp_path / "again")])
    printed = capsys.readouterr().out
    assert "(cached)" in printed and "training the miniature's teacher" not in printed


def test_default_command_on_a_cpu_trains_one_student_on_the_miniature(tmp_path, capsys, monkeypatch):
    """`python swiftbrush.py --loss sds --steps 20 --out X` without a GPU: one SDS student on the miniature, 20 steps,
    scored beside the teacher. For the test's sake the miniature's teacher and evaluation are the quick ones."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(teacher.TRAINING, "miniature", teacher.TRAINING["miniature-quick"])
    monkeypatch.setitem(report.EVALUATION, "miniature", report.EVALUATION["miniature-quick"])
    out = str(tmp_path / "sds")
    sb.main(["--loss", "sds", "--steps", "20", "--out", out])
    printed = capsys.readouterr().out
    assert printed.startswith("model: miniature (no CUDA GPU here")
    assert len(checkpoint.read_log(out)) == 20
    config = json.load(open(os.path.join(out, "swiftbrush.json")))["config"]
    assert config["loss"] == "sds" and config["steps"] == 20 and config["model"] == "miniature"
    assert {k: config[k] for k in ("lr", "batch_size", "guidance")} == {k: miniature.DEFAULTS[k] for k in
                                                                        ("lr", "batch_size", "guidance")}
    assert "| SDS, x0 student | 1 | 20 |" in printed and "| teacher, one step (Eq. 7 at init) | 1 | - |" in printed
    results = json.load(open(os.path.join(out, "results.json")))
    raw, ema = results["SDS, x0 student"], results[f"SDS, x0 student, EMA {miniature.DEFAULTS['ema_decay']:g}"]
    assert raw["saturation"] != ema["saturation"]  # the EMA row scores the EMA weights, not the student's again
    assert os.path.getsize(os.path.join(out, "grid.png")) > 0


def test_a_k_step_student_is_scored_on_its_k_steps(tmp_path):
    """The report's row of a K-step student: K sampling steps, from each noise seed's z (the other rows' z) and its
    own K - 1 noises drawn after it."""
    _, [(name, cfg)] = sb.runs_from_args(sb.parse_args(["--model", "miniature-quick", "--student-steps", "2",
                                                        "--steps", "2", "--sds-start", "0", "--out", str(tmp_path / "k2")]))
    m, state = sb.train(cfg, progress=False)
    mini = report.MiniatureReport(str(tmp_path / "report"), "miniature-quick")
    mini.add_student(name, cfg, m, state)
    (row, numbers), (shown, images) = mini.rows[-2], mini.images[-2]  # the raw student's, before its EMA's
    assert row == shown == name == "VSD, x0 student, 2 steps" and numbers["sampling_steps"] == 2
    z, renoise = mini.chain_noises(mini.seeds[0], 2)
    assert torch.equal(z, mini.noises[0])
    with torch.no_grad():
        want = sb.k_step_x0(m.student, z, renoise, mini.context, m.student_schedule, 2).clamp(-1, 1)
    assert torch.equal(images, want[mini.grid_index])


def test_reference_rows_are_cached_beside_the_teacher_and_recomputed_when_damaged(tmp_path, monkeypatch):
    first = report.MiniatureReport(str(tmp_path / "a"), "miniature-quick")
    numbers = lambda r: json.dumps(r.rows)  # NaN (no object found) equals itself here
    folder = teacher.teacher_folder("miniature-quick")
    cached = [f for f in os.listdir(os.path.dirname(folder)) if f.startswith(os.path.basename(folder) + "-reference-")]
    assert len(cached) == 1 and cached[0].endswith(".safetensors")
    path = os.path.join(os.path.dirname(folder), cached[0])

    def expensive(*args, **kwargs):
        raise AssertionError("recomputed although cached")
    digest = report.reference_digest(folder, "miniature-quick")  # of the real code, not of the patch below
    with monkeypatch.context() as m:
        m.setattr(report, "reference_digest", lambda *args: digest)
        m.setattr(report.sample, "ddim_sample", expensive)
        m.setattr(world, "bayes_optimal_start", expensive)
        assert numbers(report.MiniatureReport(str(tmp_path / "b"), "miniature-quick")) == numbers(first)
    with open(path, "wb") as f:  # damaged: recomputed, to the same numbers
        f.write(b"not safetensors")
    assert numbers(report.MiniatureReport(str(tmp_path / "c"), "miniature-quick")) == numbers(first)
    assert os.path.getsize(path) > 100 and not os.path.exists(path + ".tmp")


def test_teacher_cache_is_reused_and_rebuilt_when_damaged(capsys):
    folder = teacher.build_teacher("miniature-quick", progress=False)
    assert folder.startswith(os.environ["SWIFTBRUSH_CACHE"])
    assert teacher.teacher_folder("miniature") != folder  # another recipe, another folder
    weights = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    mtime = os.path.getmtime(weights)
    capsys.readouterr()
    assert teacher.build_teacher("miniature-quick", progress=False) == folder  # intact: reused, not retrained
    assert os.path.getmtime(weights) == mtime and "(cached)" in capsys.readouterr().out
    with open(weights, "r+b") as f:  # flip one byte: the cache must not be trusted
        f.seek(os.path.getsize(weights) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    assert not teacher.is_intact(folder)
    teacher.build_teacher("miniature-quick", progress=False)
    assert "(cached)" not in capsys.readouterr().out
    assert teacher.is_intact(folder) and not os.path.exists(f"{folder}.tmp-{os.getpid()}")
    load_unet(folder)


def test_the_shipped_teacher_is_this_recipes_and_passes_its_checks():
    assert teacher.teacher_folder("miniature") == teacher.SHIPPED and teacher.is_intact(teacher.SHIPPED)
    numbers = teacher.teacher_checks(teacher.SHIPPED)
    assert teacher.failed_checks(numbers) == [], numbers
    assert teacher.failed_checks({**numbers, "shape_acc": 0.5}) == ["shape_acc 0.500 < 0.95"]


def test_the_shipped_teacher_ships_its_current_reference_rows():
    """Its reference rows (the teacher's DDIM, one step, E[x0 | z]) are keyed by what they depend on: an edit to
    world.py or to the code that makes them (reference_digest) leaves them unused, and this fails until
    `python -m miniature.report` writes them again."""
    from safetensors.torch import load_file
    from formats.models import scheduler_config
    from formats.text import load_text
    name = f"reference-{report.reference_digest(teacher.SHIPPED, 'miniature')}.safetensors"
    assert os.path.exists(os.path.join(teacher.SHIPPED, name)), "stale: run python -m miniature.report"
    one_step = load_file(os.path.join(teacher.SHIPPED, name))["one_step_0"]
    captions = [p for p in world.PROMPTS for _ in range(report.EVALUATION["miniature"]["per_prompt"])]
    context = load_text(teacher.SHIPPED).encode(captions)
    z = torch.randn(one_step.shape, generator=torch.Generator().manual_seed(1000))
    with torch.no_grad():
        want = sb.f_theta(load_unet(teacher.SHIPPED), z, context, sb.Schedule(scheduler_config(teacher.SHIPPED)))
    assert torch.allclose(one_step, want, atol=1e-5)


def test_a_damaged_shipped_teacher_is_trained_into_the_cache(tmp_path, monkeypatch, capsys):
    shipped = str(tmp_path / "weights")
    monkeypatch.setattr(teacher, "SHIPPED", shipped)
    teacher._write_teacher(shipped, "miniature-quick", progress=False)  # as if the quick recipe's were shipped
    assert teacher.build_teacher("miniature-quick", progress=False) == shipped and "(shipped)" in capsys.readouterr().out
    with open(os.path.join(shipped, "unet", "diffusion_pytorch_model.safetensors"), "r+b") as f:
        f.seek(1000)
        f.write(b"\0\0\0\0")
    folder = teacher.build_teacher("miniature-quick", progress=False)
    assert folder.startswith(os.environ["SWIFTBRUSH_CACHE"]) and teacher.is_intact(folder)
    assert "differ from its stamp" in capsys.readouterr().out


def test_rebuild_is_bit_exact_and_replaces_only_a_teacher_that_passes(tmp_path, monkeypatch, capsys):
    folder = str(tmp_path / "weights")
    # the checks' numbers stand in for teacher_checks (the shipped teacher's own are tested above): the quick
    # recipe's 40 steps teach no shapes
    monkeypatch.setattr(teacher, "teacher_checks", lambda f: {"color_acc": 1.0, "shape_acc": 0.97, "start_error": 0.05})
    teacher.rebuild("miniature-quick", folder, progress=False)
    stamp = open(os.path.join(folder, teacher.STAMP)).read()
    teacher.rebuild("miniature-quick", folder, progress=False)  # the recipe, trained again: the same bits
    assert "the same bits as before" in capsys.readouterr().out and open(os.path.join(folder, teacher.STAMP)).read() == stamp
    monkeypatch.setattr(teacher, "teacher_checks", lambda f: {"color_acc": 1.0, "shape_acc": 0.5, "start_error": 0.05})
    with pytest.raises(teacher.CheckFailed, match="fails its checks: shape_acc 0.500 < 0.95"):
        teacher.rebuild("miniature-quick", folder, progress=False)
    assert teacher.is_intact(folder) and open(os.path.join(folder, teacher.STAMP)).read() == stamp  # kept


def test_the_teacher_trains_with_its_lr_decayed_to_zero(tmp_path, monkeypatch):
    """The recipe's lr_schedule reaches the teacher's optimiser: lr (1 + cos(pi step / steps)) / 2 at each step."""
    seen, step = [], torch.optim.Adam.step

    def recorded_step(opt, *args, **kwargs):
        seen.append(opt.param_groups[0]["lr"])
        return step(opt, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recorded_step)
    training = {**teacher.TRAINING["miniature-quick"], "steps": 4, "batch_size": 2}
    assert training["lr_schedule"] == teacher.TRAINING["miniature"]["lr_schedule"] == "cosine"
    teacher._train_teacher(str(tmp_path), training, progress=False)
    lr = training["lr"]
    assert seen == pytest.approx([lr, lr * (2 + 2 ** 0.5) / 4, lr / 2, lr * (2 - 2 ** 0.5) / 4], rel=1e-12)


# ------------------------------------------------------------------------------------------ the Bayes-optimal start
def test_posterior_mean_of_two_constant_images_by_hand():
    """x_0 is a or b with probability 1/2: E[x_0 | x_t] = p a + (1 - p) b, p = sigmoid of the log-likelihood ratio."""
    a, b = torch.full((1, 3, 4, 4), 0.5), torch.full((1, 3, 4, 4), -0.3)
    x_t = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for alpha, sigma in ((0.3, 0.95), (0.0682, 0.9977), (0.9, 0.3)):
        log_a = -((x_t - alpha * a) ** 2).flatten(1).sum(1) / (2 * sigma ** 2)
        log_b = -((x_t - alpha * b) ** 2).flatten(1).sum(1) / (2 * sigma ** 2)
        p = torch.sigmoid(log_a - log_b).view(-1, 1, 1, 1)
        got = world.posterior_mean(x_t, torch.cat([a, b]), alpha, sigma)
        assert torch.allclose(got, p * a + (1 - p) * b, atol=1e-6)


def test_bayes_optimal_start_is_the_per_prompt_mean_when_x_T_says_little():
    captions = ["a red circle"] * 3 + ["a blue square"] * 3
    z = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    start = world.bayes_optimal_start(z, captions, alpha_T=1e-4, sigma_T=1.0, n=512)
    for caption, rows in (("a red circle", slice(0, 3)), ("a blue square", slice(3, 6))):
        mean = world.sample_world(512, seed=7, prompts=[caption] * 512)[0].mean(0)
        assert (start[rows] - mean).abs().max() < 1e-3
    # at SD's alpha_T the noise still tilts the mean: the outputs differ across z, but stay blurry and in range
    start = world.bayes_optimal_start(z, captions, alpha_T=0.068, sigma_T=0.998, n=512)
    assert (start[0] - start[1]).abs().max() > 1e-3 and start.abs().max() <= 0.7 + 1e-6


def test_seeds_table_shows_the_students_mean_and_range_and_the_references_once(tmp_path):
    from miniature import seeds
    runs = []
    for seed, (shape, fd) in enumerate(((0.70, 0.9), (0.80, 1.3))):
        rows = {"teacher, one step (Eq. 7 at init)": {"shape_acc": [0.33, 0.01], "fd": [1.1, 0.0], "sampling_steps": 1},
                "SwiftBrush: VSD, x0 student": {"shape_acc": [shape, 0.02], "fd": [fd, 0.0], "steps": 1200,
                                                "sec_per_step": 0.3 + seed}}
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        (run / "results.json").write_text(json.dumps(rows))
        runs.append(str(run))
    lines = seeds.spread_table(runs).splitlines()
    assert "s/iter" not in lines[0]
    teacher, student = (dict(zip(lines[0].split(" | "), row.split(" | "))) for row in lines[2:])
    assert teacher["shape acc"] == "0.33" and teacher["Frechet dist."] == "1.1"
    assert student["shape acc"] == "0.75 (0.70-0.80)" and student["Frechet dist."] == "1.1 (0.9-1.3)"
    assert student["training steps"] == "1200"
