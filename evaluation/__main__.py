"""python -m evaluation: the command line of evaluation.evaluate (its docstring is the help's)."""
import argparse
import sys

import evaluation
from evaluation.metrics import CLIP_MODEL, DINOV2_MODEL, INCEPTION_FILE, METRICS, parse_metrics
from files.flags import AT_LEAST_1
from files.models import UsageError
from sample import model_flags
from unet import WeightsError


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m evaluation", description=evaluation.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model_flags(p)
    p.add_argument("--captions", help="COCO's annotations/captions_val2014.json: n captions by a fixed rule (README)")
    p.add_argument("--prompts", help="a text file instead, one prompt per line: its first n")
    p.add_argument("--images", help="the real images for FID and FD-DINOv2: COCO's val2014/ folder")
    p.add_argument("--n", type=AT_LEAST_1, default=30000, help="images to generate and measure (default 30000)")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"default {','.join(METRICS)}")
    p.add_argument("--clip-model", default=CLIP_MODEL, help=f"CLIP score's model, hub id or folder (default {CLIP_MODEL})")
    p.add_argument("--dinov2-model", default=DINOV2_MODEL, help=f"FD-DINOv2's, hub id or folder (default {DINOV2_MODEL})")
    p.add_argument("--inception-weights", help=f"a local {INCEPTION_FILE} for FID (default: clean-fid's own, "
                                               f"downloaded by it)")
    p.add_argument("--batch-size", type=AT_LEAST_1, default=16, help="images per UNet call and per feature batch")
    p.add_argument("--out", default="runs/eval", help="images/, evaluation.json, results.json, results.md")
    a = p.parse_args(argv)
    try:
        a.metrics = parse_metrics(a.metrics)
    except UsageError as e:
        p.error(str(e))
    if bool(a.captions) == bool(a.prompts):
        p.error("give --captions captions_val2014.json or --prompts FILE (one of them)")
    if a.student and a.teacher_steps:
        p.error("evaluate one model: --student RUN, or --model TEACHER with --teacher-steps N")
    if not a.student and not (a.model and a.teacher_steps > 0):
        p.error("give --student RUN (or any export of one), or --model TEACHER with --teacher-steps N")
    return a


def main(argv=None):
    a = parse_args(argv)
    try:
        evaluation.evaluate(a)
    except (UsageError, WeightsError) as e:
        sys.exit(f"evaluation: error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)  # the images written so far stay: run the same command again to continue


if __name__ == "__main__":
    main()
