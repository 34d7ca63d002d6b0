"""The prompts of an evaluation: COCO-2014 validation captions picked by a fixed rule, or a text file.

The COCO rule (`coco_captions`), fixed so that every run and every user gets the same captions:
1. one caption per image: of the annotations of an image in `captions_val2014.json`, the one with the lowest
   annotation id, whitespace stripped (val2014: 40,504 images, 202,654 captions);
2. the images ordered by SHA-256 of "coco2014:<image id>" (a hash, not a random generator, so that the order
   cannot change with a library version), and the first n taken.
The first 5,000 of the 30,000 are then the 5,000 of `--n 5000`: a quick run's images are the start of a full one's.
"""
import hashlib
import json

from formats.prompts import read_prompts
from harness.flags import UsageError

SALT = "coco2014"
COCO_RULE = (f"one caption per image of captions_val2014.json: its lowest annotation id's, stripped; the images "
             f"ordered by sha256('{SALT}:<image id>'); the first n")


def coco_captions(path, n):
    """[(image id, caption)] of n COCO images by the rule above."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        images = {image["id"] for image in data["images"]}
        annotations = sorted(data["annotations"], key=lambda a: a["id"])
        first = {}
        for a in annotations:
            first.setdefault(a["image_id"], a["caption"].strip())
    except FileNotFoundError:
        raise UsageError(f"captions file {path!r} not found (COCO's annotations/captions_val2014.json)") from None
    except OSError as e:
        raise UsageError(f"cannot read captions file {path!r}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError):
        raise UsageError(f"captions file {path!r} is not JSON: pass COCO's annotations/captions_val2014.json") from None
    except (KeyError, TypeError, AttributeError):
        raise UsageError(f"captions file {path!r} is not a COCO captions file (it needs images[].id and "
                         f"annotations[].id/image_id/caption): pass annotations/captions_val2014.json") from None
    ids = sorted((i for i in images if first.get(i)), key=lambda i: hashlib.sha256(f"{SALT}:{i}".encode()).digest())
    return [(i, first[i]) for i in _first(ids, n, f"{path} has captions for {len(ids)} images")]


def text_prompts(path, n):
    """[(line number, prompt)] of the first n prompts of a text file (one per line; repeats kept, blank lines not)."""
    prompts = read_prompts(path)
    numbered = list(enumerate(prompts, 1))
    return _first(numbered, n, f"{path} has {len(prompts)} prompts")


def _first(items, n, have):
    if n > len(items):
        raise UsageError(f"--n {n}: {have}; pass --n {len(items)} or fewer")
    return items[:n]
