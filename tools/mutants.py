"""The mutation check: the method broken one piece at a time, and the suite made to catch every break.

    python -m tools.mutants             # each mutant in turn: a copy of the repository, the edit, the whole suite
    python -m tools.mutants --list      # the mutants, a line each
    python -m tools.mutants sds-sign ema-warm-up   # some of them

A mutant is a small edit of the method's code: Algorithm 1's equations, its constants, the clipping, the prompt order,
the EMA, the LoRA's scale. Each is applied to a fresh copy of the repository (the files git tracks, and those it does
not ignore), where the suite runs as `python -m pytest -x`, the method's tests (test_swiftbrush.py) first: a caught
mutant costs the time to its first failing test, a surviving one the whole suite. Each edit's text must stand exactly
once in its file, so a mutant that no longer fits the code stops the check in one line (tools/test_mutants.py keeps
the list fitting). docs/testing.md#the-mutation-check has the list, the test that catches each, and the time."""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_TESTS = "test_swiftbrush.py"  # run first: most mutants are caught there


class MutantError(Exception):
    """A mutant whose text is not in its file exactly once."""


@dataclass
class Mutant:
    name: str
    breaks: str    # what the edit does to the method, in the paper's words
    file: str
    edits: tuple   # (old, new) pairs; each old text stands exactly once in the file


MUTANTS = [
    # Eq. 5 and Eq. 2, steps 2-3
    Mutant("vsd-sign", "VSD's g reversed, w (eps_phi - eps_psi); SDS untouched", "swiftbrush.py",
           (("return torch.nan_to_num(w * (eps_psi - eps_phi))",
             "return torch.nan_to_num(w * ((eps_phi - eps_psi) if cfg.loss == 'vsd' else (eps_psi - eps_phi)))"),)),
    Mutant("sds-sign", "SDS's g reversed, w (eps - eps_psi); VSD untouched", "swiftbrush.py",
           (("return torch.nan_to_num(w * (eps_psi - eps_phi))",
             "return torch.nan_to_num(w * ((eps_phi - eps_psi) if cfg.loss == 'sds' else (eps_psi - eps_phi)))"),)),
    Mutant("both-signs", "g reversed for VSD and SDS", "swiftbrush.py",
           (("return torch.nan_to_num(w * (eps_psi - eps_phi))", "return torch.nan_to_num(w * (eps_phi - eps_psi))"),)),
    Mutant("cfg-scales-swapped", "eps_psi at the LoRA teacher's CFG scale, eps_phi at the teacher's", "swiftbrush.py",
           (("eps_psi = eps_cfg(m.teacher, x_t, t, context, uncond, cfg.guidance, schedule)",
             "eps_psi = eps_cfg(m.teacher, x_t, t, context, uncond, cfg.lora_guidance, schedule)"),
            ("eps_phi = eps_cfg(m.teacher, x_t, t, context, uncond, cfg.lora_guidance, schedule)",
             "eps_phi = eps_cfg(m.teacher, x_t, t, context, uncond, cfg.guidance, schedule)"))),
    Mutant("psi-with-lora", "eps_psi computed with the LoRA on", "swiftbrush.py",
           (("with lora_disabled(m.teacher):\n            eps_psi", "with nullcontext():\n            eps_psi"),)),
    Mutant("w-sigma", "w(t) = sigma_t instead of sigma_t^2", "swiftbrush.py",
           (("w = sigma_t ** 2", "w = sigma_t"),)),
    Mutant("dmd-normaliser", "--weighting dmd's normaliser mean |x0 + x0_psi| instead of mean |x0 - x0_psi|",
           "swiftbrush.py", (("(x0 - x0_psi).abs().mean(", "(x0 + x0_psi).abs().mean("),)),
    Mutant("student-t-range", "the student's t ~ U(0.05 T, 0.95 T) instead of U(0.02 T, 0.98 T)", "swiftbrush.py",
           (("STUDENT_T = (0.02, 0.98)", "STUDENT_T = (0.05, 0.95)"),)),
    Mutant("eq1-swapped", "x_t = sigma_t x0 + alpha_t eps in the student's noising (Eq. 1)", "swiftbrush.py",
           (("x_t = alpha_t * x0 + sigma_t * eps  # Eq. 1", "x_t = sigma_t * x0 + alpha_t * eps  # Eq. 1"),)),
    Mutant("cfg-formula", "CFG as eps_c + s (eps_c - eps_u)", "swiftbrush.py",
           (("return eps_u + scale * (eps_c - eps_u)", "return eps_c + scale * (eps_c - eps_u)"),)),
    # Eq. 7, step 1
    Mutant("eq7-swapped", "f_theta = (z - alpha_T eps_theta) / sigma_T", "swiftbrush.py",
           (("return (z - sigma_T * eps_theta) / alpha_T", "return (z - alpha_T * eps_theta) / sigma_T"),)),
    Mutant("eq7-timestep", "the one-step student at t = T - 2 instead of T - 1", "swiftbrush.py",
           (("schedule.T - 1 if t is None", "schedule.T - 2 if t is None"),)),
    Mutant("v-to-eps", "a v model's eps as sigma_t v + alpha_t x_t", "swiftbrush.py",
           (("return alpha_t * unet_out + sigma_t * x_t", "return sigma_t * unet_out + alpha_t * x_t"),)),
    # step 4
    Mutant("surrogate-sign", "the surrogate 0.5 ||x0 - sg(x0 + g)||^2: the student climbs g", "swiftbrush.py",
           (("(x0 - g).detach())", "(x0 + g).detach())"),)),
    Mutant("surrogate-sum", "the surrogate summed, not averaged: its gradient g instead of g / N", "swiftbrush.py",
           (("0.5 * F.mse_loss(x0, (x0 - g).detach())", "0.5 * F.mse_loss(x0, (x0 - g).detach(), reduction='sum')"),)),
    # Eq. 6, step 5
    Mutant("eq6-unweighted", "Eq. 6 without its abar_t weighting", "swiftbrush.py",
           (("return F.mse_loss(alpha_t * schedule.eps(out, x_t, t), alpha_t * eps)",
             "return F.mse_loss(schedule.eps(out, x_t, t), eps)"),)),
    Mutant("eq6-plain-in-eps", "the plain loss in eps for every model (a v model's own output is v)", "swiftbrush.py",
           (("return F.mse_loss(out, schedule.target(x0.detach(), eps, t))",
             "return F.mse_loss(schedule.eps(out, x_t, t), eps)"),)),
    Mutant("eq6-t-range", "the LoRA teacher's t from the student's range instead of U(0, T)", "swiftbrush.py",
           (("torch.randint(0, schedule.T, (B,), generator=gen)", "torch.randint(20, 981, (B,), generator=gen)"),)),
    Mutant("no-dropout", "no prompt dropout: the LoRA teacher's unconditional branch never trained", "swiftbrush.py",
           (("P_UNCOND = 0.1", "P_UNCOND = 0.0"),)),
    Mutant("dropout-inverted", "90% of the prompts dropped instead of 10%", "swiftbrush.py",
           (("torch.rand(B, generator=gen) < p_uncond", "torch.rand(B, generator=gen) >= p_uncond"),)),
    Mutant("no-detach", "Eq. 6 without sg(x0): the LoRA teacher's loss reaches the student", "swiftbrush.py",
           (("x_t = alpha_t * x0.detach() + sigma_t * eps", "x_t = alpha_t * x0 + sigma_t * eps"),)),
    # the loop
    Mutant("no-reshuffle", "the prompts never reshuffled after the first epoch", "swiftbrush.py",
           (('state["order"], state["cursor"] = torch.randperm(len(state["order"]), generator=state["gen"]), 0',
             'state["cursor"] = 0'),)),
    Mutant("max-grad-norm", "gradients clipped to norm 10 instead of 1", "swiftbrush.py",
           (("MAX_GRAD_NORM = 1.0", "MAX_GRAD_NORM = 10.0"),)),
    Mutant("lora-unclipped", "the LoRA teacher's gradients not clipped", "swiftbrush.py",
           (('logs["grad_norm_lora"] = clip_and_step(state["opt_lora"])',
             'logs["grad_norm_lora"] = torch.nn.utils.get_total_norm([p.grad for p in state["opt_lora"].param_groups[0]'
             '["params"]]); state["opt_lora"].step(); state["opt_lora"].zero_grad()'),)),
    Mutant("no-skip", "a step whose gradients are not finite still updates the weights", "harness/checkpoint.py",
           (("found_inf = (~torch.isfinite(norm)).float()", "found_inf = torch.zeros_like(norm)"),)),
    Mutant("ema-lerp", "the EMA moved by d toward the student instead of 1 - d", "memory/ema.py",
           (("torch._foreach_lerp_(list(self.ema.values()), self.live, 1.0 - decay)",
             "torch._foreach_lerp_(list(self.ema.values()), self.live, decay)"),)),
    Mutant("host-ema-lerp", "the host's EMA moved by d toward the student instead of 1 - d", "memory/ema.py",
           (("torch._foreach_lerp_(list(ema.ema.values()), ema.buffers, 1.0 - decay)",
             "torch._foreach_lerp_(list(ema.ema.values()), ema.buffers, decay)"),)),
    Mutant("ema-every-10", "the EMA updated at every 10th step only", "swiftbrush.py",
           (("    if state[\"ema\"] is not None:\n        state[\"ema\"].update(",
             "    if state[\"ema\"] is not None and state[\"step\"] % 10 == 0:\n        state[\"ema\"].update("),)),
    Mutant("ema-warm-up", "the EMA's warm-up (1 + s) / (100 + s) instead of (1 + s) / (10 + s)", "swiftbrush.py",
           (("min(decay, (1 + s) / (10 + s))\n", "min(decay, (1 + s) / (100 + s))\n"),)),
    # the LoRA and --step-in-backward
    Mutant("lora-scale", "the LoRA's scale alpha / sqrt(r) in its forward and its merge alike", "lora.py",
           (("* (self.alpha / self.rank)", "* (self.alpha / self.rank ** 0.5)"),
            ("* (alpha / rank)", "* (alpha / rank ** 0.5)"))),
    Mutant("lora-recompute", "a checkpointed block recomputed with the UNet's own adapters, not its forward's",
           "lora.py", (("    unet.recompute_context = adapters_as_now", "    pass"),)),
    Mutant("lora-always-on", "the LoRA never switched off: eps_psi is eps_phi", "lora.py",
           (("            a.enabled = name in self.names", "            a.enabled = True"),)),
    Mutant("in-backward-unclamped", "--step-in-backward scales small gradients up to norm 1",
           "memory/step_in_backward.py",
           (("clip = torch.clamp(max_norm / (norm + 1e-6), max=1.0)", "clip = max_norm / (norm + 1e-6)"),)),
    Mutant("in-backward-no-skip", "--step-in-backward updates the weights on gradients that are not finite",
           "memory/step_in_backward.py",
           (("steps = skip_if_not_finite(opt.optimisers.values(), norm)", "steps = True"),)),
    Mutant("in-backward-unclipped", "--step-in-backward steps on unclipped gradients", "memory/step_in_backward.py",
           (("p.grad.mul_(clip)", "p.grad.mul_(1.0)"),)),
    # Beyond the paper: the student's lr schedule and its SDS start
    Mutant("lr-cosine-rising", "--lr-schedule cosine rises from 0 to lr instead of falling from lr to 0", "swiftbrush.py",
           (("return lr * 0.5 * (1 + math.cos(", "return lr * 0.5 * (1 - math.cos("),)),
    Mutant("sds-start-unused", "--sds-start trains the SDS student, and the VSD student starts from the teacher",
           "swiftbrush.py", (("(name, replace(cfg, student_init=start.out))]", "(name, cfg)]"),)),
]


def mutated(mutant, text):
    """The file's text with the mutant's edits."""
    for old, new in mutant.edits:
        if text.count(old) != 1:
            raise MutantError(f"mutant {mutant.name}: {old!r} stands {text.count(old)} times in {mutant.file}, not "
                              f"once: the code moved on, so update tools/mutants.py")
        text = text.replace(old, new)
    return text


def repository_files(root=ROOT):
    """The files of the working tree that git tracks or does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    return [path for path in listed.split("\0") if path and os.path.isfile(os.path.join(root, path))]


def mutated_copy(mutant, into, root=ROOT):
    """The repository copied into `into`, the mutant's file edited (before anything is written)."""
    with open(os.path.join(root, mutant.file), encoding="utf-8") as f:
        text = mutated(mutant, f.read())
    for path in repository_files(root):
        os.makedirs(os.path.join(into, os.path.dirname(path)), exist_ok=True)
        shutil.copy2(os.path.join(root, path), os.path.join(into, path))
    with open(os.path.join(into, mutant.file), "w", encoding="utf-8") as f:
        f.write(text)


def the_suite(root=ROOT):
    """Every test file of the repository, the method's first (pytest runs files in the order named), but this tool's
    own: a mutated file fails its check that every mutant fits the code, which would count every mutant caught."""
    own = "tools/test_mutants.py"
    found = sorted(p for p in repository_files(root) if re.fullmatch(r"(.*/)?test_\w+\.py", p)
                   and p not in (METHOD_TESTS, own))
    return [METHOD_TESTS, *found]


def check(mutant, tests=None, root=ROOT):
    """Runs the tests (default: the whole suite) on a mutated copy: ("caught", the first failing test), ("survived",
    "") or ("error", why)."""
    tests = tests or the_suite(root)
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as folder:
        mutated_copy(mutant, folder, root)
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=folder, capture_output=True, text=True)
    if done.returncode == 0:
        return "survived", ""
    failed = re.search(r"^FAILED (.+?)(?: - .*)?$", done.stdout, re.MULTILINE)  # the node id, before " - why"
    if done.returncode == 1 and failed:
        return "caught", failed.group(1)
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
    return "error", f"pytest exited {done.returncode}: {tail[0]}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.mutants", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="the mutants to check (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTANTS}
    unknown = [name for name in args.names if name not in known]
    if unknown:
        parser.error(f"no mutant named {', '.join(unknown)}: python -m tools.mutants --list names them")
    chosen = [known[name] for name in args.names] or MUTANTS
    if args.list:
        for m in chosen:
            print(f"{m.name:24} {m.file:28} {m.breaks}")
        return
    try:
        for m in chosen:  # every mutant fits the code before any suite runs
            with open(os.path.join(ROOT, m.file), encoding="utf-8") as f:
                mutated(m, f.read())
    except MutantError as e:
        sys.exit(f"mutants: error: {e}")
    print("| mutant | what it breaks | verdict | the first failing test | s |\n|---|---|---|---|---|", flush=True)
    verdicts, start = [], time.time()
    for m in chosen:
        t0 = time.time()
        verdict, detail = check(m)
        verdicts.append(verdict)
        breaks = m.breaks.replace("|", "\\|")  # a Markdown table's cell
        print(f"| {m.name} | {breaks} | {verdict} | {detail} | {time.time() - t0:.0f} |", flush=True)
    caught = verdicts.count("caught")
    print(f"\n{caught} of {len(chosen)} mutants caught in {(time.time() - start) / 60:.1f} min")
    if caught < len(chosen):
        sys.exit(1)


if __name__ == "__main__":
    main()
