"""The miniature's report: every student scored against the world's truth, beside the world itself and the teacher
(DDIM + CFG, and one step: Eq. 7 at initialisation), on fixed prompts and noises the same for every row."""
import copy
import glob
import hashlib
import inspect
import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file

import sample
from harness.atomic import atomic
from harness.checkpoint import read_log
from formats.models import cache_root, scheduler_config
from formats.text import Text, load_text
from harness.report import Report
from miniature import DEFAULTS, world
from miniature.teacher import SHIPPED, STAMP, build_teacher, teacher_name
from swiftbrush import Schedule, chain_noises, ema_weights, eps_cfg, f_theta, k_step_x0, run_label
import unet
from unet import load_unet

EVALUATION = {"miniature": {"seeds": (0, 1, 2), "per_prompt": 16, "ddim_steps": 25},   # 3 x 12 prompts x 16
              "miniature-quick": {"seeds": (0,), "per_prompt": 4, "ddim_steps": 5}}
COLUMNS = [("sampling_steps", "sampling steps", "{}"), ("steps", "training steps", "{}"),
           ("color_acc", "colour acc", "{:.2f}"), ("shape_acc", "shape acc", "{:.2f}"),
           ("pos_spread", "position spread px", "{:.2f}"), ("size_spread", "size spread px", "{:.2f}"),
           ("saturation", "mean abs pixel", "{:.3f}"), ("clipped", "clipped", "{:.3f}"),
           ("bg_noise", "background noise", "{:.3f}"), ("fd", "Frechet dist.", "{:.1f}"),
           ("start_error", "start error", "{:.3f}"), ("sec_per_step", "s/iter", "{:.2f}")]


class MiniatureReport(Report):
    def __init__(self, out, model, write_to=None):
        super().__init__(out, COLUMNS)
        e = EVALUATION[model]
        self.captions = [p for p in world.PROMPTS for _ in range(e["per_prompt"])]
        self.shape = (len(self.captions), 3, world.RES, world.RES)
        self.seeds = [1000 + s for s in e["seeds"]]
        self.noises = [self.chain_noises(seed, 1)[0] for seed in self.seeds]  # x_T = z of each noise seed
        self.grid_index = torch.arange(0, len(self.captions), e["per_prompt"])  # one sample per prompt, seed 0
        folder = build_teacher(model)
        text = load_text(folder)
        self.context, self.uncond = text.encode(self.captions), text.uncond
        self.schedule = Schedule(scheduler_config(folder))

        n = len(self.captions)
        truth, _, _ = world.sample_world(n, seed=99, prompts=self.captions)
        centred, _, _ = world.sample_world(n, seed=99, prompts=self.captions, centred=True)
        noise = 0.4 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(98))
        self.add_row("the world (truth)", None, [truth])
        self.add_row("the world + noise 0.4 (reference)", None, [truth + noise])
        self.add_row("the world, objects centred, + noise 0.4 (reference)", None, [centred + noise])
        ref = self.reference_images(folder, model, write_to)
        self.bayes = ref["bayes"]
        self.add_row("Bayes-optimal one step, E[x0 given z] (reference)", 1, self.bayes, start=True)
        self.add_row(f"teacher, DDIM + CFG {DEFAULTS['guidance']:g}", e["ddim_steps"], ref["ddim"])
        self.add_row("teacher, one step (Eq. 7 at init)", 1, ref["one_step"], start=True)

    def chain_noises(self, seed, K):
        """z and the K - 1 noises of a K-step student's re-noising, of one noise seed: the same z for every K."""
        return chain_noises(self.shape, K, torch.Generator().manual_seed(seed))

    def add_row(self, name, sampling_steps, images_per_seed, start=False):
        """A reference row; start: also its rms distance to the Bayes-optimal one-step output (the 'start error')."""
        numbers, images = self.scored(images_per_seed)
        if start:
            errors = torch.tensor([(x - b).square().mean().sqrt().item() for x, b in zip(images_per_seed, self.bayes)])
            numbers["start_error"] = (errors.mean().item(), errors.std().item() if len(errors) > 1 else 0.0)
        self.add(name, {**numbers, "sampling_steps": sampling_steps}, images)

    def scored(self, images_per_seed):
        """Mean and std over the evaluation seeds of each metric, and the grid's row (one image per prompt)."""
        images_per_seed = [x.clamp(-1, 1) for x in images_per_seed]
        rows = [world.evaluate(x, self.captions) for x in images_per_seed]
        numbers = {}
        for key in rows[0]:
            values = torch.tensor([r[key] for r in rows], dtype=torch.float64)
            numbers[key] = (float(values.mean()), float(values.std()) if len(rows) > 1 else 0.0)
        return numbers, images_per_seed[0][self.grid_index]

    @torch.no_grad()
    def add_student(self, name, cfg, m, state):
        """The trained student's row (against the truth), and its EMA's when it has one."""
        log = read_log(cfg.out)
        run = {"sampling_steps": cfg.student_steps, "steps": cfg.steps,
               "sec_per_step": sum(r["sec_per_step"] for r in log) / len(log)}
        students = [(name, m.student.cpu().eval())]
        if state["ema"] is not None:
            ema = copy.deepcopy(students[0][1])
            ema.load_state_dict(ema_weights(state))
            students.append((f"{name}, EMA {cfg.ema_decay:g}", ema))
        noises = [self.chain_noises(seed, cfg.student_steps) for seed in self.seeds]
        for row, student in students:
            numbers, images = self.scored([k_step_x0(student, z, renoise, self.context, m.student_schedule,
                                                     cfg.student_steps, cfg.param) for z, renoise in noises])
            self.add(row, {**numbers, **run}, images, curves=(run_label(cfg), log) if row == name else None)

    @torch.no_grad()
    def reference_images(self, folder, model, write_to=None):
        """{"bayes", "ddim", "one_step"}: a list of images per noise seed. The Bayes-optimal start and the teacher's
        DDIM take a minute, so they are stored, keyed by the teacher's files, the evaluation and the code that makes
        them (reference_digest): the shipped teacher's ship beside it (`python -m miniature.report` writes them),
        any other's are cached; missing or damaged ones are computed and cached. write_to: compute them into it."""
        name = f"reference-{reference_digest(folder, model)}.safetensors"
        cached = os.path.join(cache_root(), f"{teacher_name(model)}-{name}")
        for path in [] if write_to else [os.path.join(folder, name), cached]:
            try:
                flat = load_file(path)
                seeds = range(len(self.noises))
                return {kind: [flat[f"{kind}_{i}"] for i in seeds] for kind in ("bayes", "ddim", "one_step")}
            except Exception:  # missing or damaged
                pass
        alpha_T, sigma_T = self.schedule.alpha[-1].item(), self.schedule.sigma[-1].item()
        teacher = load_unet(folder)
        ref = {"bayes": [world.bayes_optimal_start(z, self.captions, alpha_T, sigma_T) for z in self.noises],
               "ddim": [sample.ddim_sample(teacher, self.schedule, self.context, self.uncond, z,
                                           EVALUATION[model]["ddim_steps"], DEFAULTS["guidance"]) for z in self.noises],
               "one_step": [f_theta(teacher, z, self.context, self.schedule) for z in self.noises]}
        path = os.path.join(write_to, name) if write_to else cached
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic(path, shared=True) as tmp:  # a killed run leaves no half-written file
            save_file({f"{kind}_{i}": x.contiguous() for kind, xs in ref.items() for i, x in enumerate(xs)}, tmp)
        return ref


def reference_digest(folder, model):
    """What the reference rows depend on, hashed: the teacher's files, the evaluation, CFG, world.py, and the code that
    makes the rows (the prompts' encoding, the UNet, the schedule, sample.py's DDIM, Eq. 7 and CFG), not the rest of
    the files that hold it: an edit elsewhere in sample.py, swiftbrush.py or formats/text.py leaves the shipped rows
    current. Source, not the states' bytes: those may differ in their last bits from one CPU to another."""
    with open(os.path.join(folder, STAMP)) as f:
        teacher_files = json.load(f)["files"]
    makers = (world, Text, unet, Schedule, sample.ddim_timesteps, sample.ddim_sample, f_theta, eps_cfg)
    code = [inspect.getsource(maker) for maker in makers]
    key = json.dumps([teacher_files, EVALUATION[model], DEFAULTS["guidance"], *code], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def ship_reference_rows():
    """python -m miniature.report: the shipped teacher's reference rows, into miniature/weights (its old ones out)."""
    for old in glob.glob(os.path.join(SHIPPED, "reference-*.safetensors")):
        os.remove(old)
    MiniatureReport(tempfile.mkdtemp(), "miniature", write_to=SHIPPED)
    print(f"reference rows: {glob.glob(os.path.join(SHIPPED, 'reference-*.safetensors'))[0]}")


if __name__ == "__main__":
    ship_reference_rows()
