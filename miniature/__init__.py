"""The miniature: SwiftBrush end to end on a laptop CPU, in minutes, measured against a known truth.

`python swiftbrush.py` on a machine without a CUDA GPU, or `--model miniature` anywhere:
- world.py: a synthetic text-to-image world (16x16 RGB, one of 3 shapes in one of 4 colours at a random position
  and size on grey, captioned "a red circle", ...) whose truth is known, and metrics against that truth;
- teacher.py: a tiny teacher trained on it with the same UNet, schedule and diffusion loss as the real thing,
  shipped as a Stable Diffusion folder (weights/, 3.3 MB): from there on it is just another --model folder;
- swiftbrush.train: the very loop used on Stable Diffusion, with the defaults below;
- report.py: each student, the teacher (one step and DDIM) and the world itself scored in one table.
`--model miniature-quick` does the same in seconds (a 40-step teacher, 3 + 6 student steps, a small evaluation): it
checks an install, not the method. The miniature imports the method; the method imports it only to resolve --model.
"""
import os

# The miniature's training defaults, where they differ from the authors' (swiftbrush.Config); measured in
# docs/log.md (2026-12-05). Any flag overrides them.
DEFAULTS = {
    "sds_start": 1200,                   # the student starts from an SDS student (1200 steps at a quarter of VSD's
                                         # cost), as SwiftBrush v2 starts from SD-Turbo: clean images, which VSD then
                                         # spreads; from the teacher VSD keeps a pixel noise it hardly sees (the previous
                                         # teacher, a 400-step start: background 0.088, not 0.072; docs/miniature.md)
    "steps": 800,                        # then VSD: shapes, positions and sizes spread like the teacher's; the last
                                         # 100 steps draw more of the shapes right without adding background, where
                                         # more or faster LoRA-teacher updates trade one for the other (docs/miniature.md)
    "batch_size": 8,                     # as good as 16 here, and faster per step
    "lr": 2e-4,                          # the student's; the authors' 1e-6 is for the 866 M-parameter SD UNet
    "lr_schedule": "cosine",             # to 0 at the end: the last steps settle the student instead of moving it
    "weighting": "dmd",                  # DMD's w(t), uniform over t in x0: small t, where pixel noise shows, count
    "lora_rank": 8, "lora_alpha": 8.0,   # rank 64 would be full rank for these 32- and 64-wide projections
    "lora_targets": "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,conv_shortcut,"
                    "downsamplers.0.conv,upsamplers.0.conv,time_emb_proj",  # every Linear and Conv2d of the blocks
                                         # (swiftbrush.STUDENT_LORA_TARGETS, LCM-LoRA's), not to_q, to_v alone
    "guidance": 2.0,                     # at CFG 4.5 this small teacher's own samples lose colour and diversity
    "lora_guidance": 2.0,                # one scale for both, as the authors: 2 vs 1 leaves a CFG push that saturates
    "lora_steps": 3, "lora_loss": "plain",  # DMD2's two time-scale update and the plain loss: with one abar-weighted
                                         # LoRA step per student step the LoRA teacher lags and every student
                                         # collapses to one layout per prompt; the more updates, the more of the
                                         # student's shapes it models and the truer VSD draws them, but also the more
                                         # of its pixel noise, which VSD then keeps. In the same time, 2 updates x 900
                                         # steps: shape 0.87 (seed 0); 4 x 600: background 0.063-0.066 (seeds 0-2);
                                         # 3 x 700: shape 0.89-0.91, background 0.047-0.050 (docs/miniature.md); a
                                         # faster LoRA teacher (lr 1.5e-3) trades the same way as a 4th update
    "ema_decay": 0.99,                   # the report scores the raw student and its EMA
    "save_every": 200, "sample_every": 200, "diagnose_every": 100,
    "device": "cpu",                     # 16x16 pixels and 0.8 M parameters: a GPU would not be faster
    "out": "runs/miniature",
}

# The LoRA student's lr (--student-lora without --lr), ten times LCM-LoRA's 1e-4, which Stable Diffusion keeps: a LoRA's
# B starts at zero and a step moves B A, so at 1e-4 this student stayed near its start (docs/miniature.md)
STUDENT_LORA_LR = 1e-3

QUICK = {**DEFAULTS, "sds_start": 3, "steps": 6, "batch_size": 4, "save_every": 0, "sample_every": 0, "diagnose_every": 3,
         "out": "runs/miniature-quick"}


def miniature_defaults(model, flags):
    """The defaults of --model miniature or miniature-quick: DEFAULTS or QUICK, and the world's captions as prompts."""
    from harness.flags import UsageError
    from miniature.teacher import teacher_folder
    if "prompts" in flags:
        raise UsageError("the miniature's prompts are its world's 12 captions: drop --prompts, or pass --model")
    if "prediction_type" in flags:
        raise UsageError("--prediction-type is for a single-file --model; the miniature's teacher says its own")
    return {**(QUICK if model == "miniature-quick" else DEFAULTS),
            "prompts": os.path.join(teacher_folder(model), "prompts.txt")}
