"""The memory of a run's prompt list as it grows: converted once into the cache of formats/prompts.py, then read one
prompt at a time, against the baseline of holding the prompts as a Python list.

    python -m tools.bench_prompts                      # 10 000 and 1 000 000 prompts (a 1 M .json of ~250 MB on disk)
    python -m tools.bench_prompts --sizes 1000 20000   # any sizes

For each size a JourneyDB-like .json (a list of objects with a "prompt" field, ~200 characters a prompt) is written
once into --folder, then each row runs in a fresh process (RSS is a process's), over the RSS after its imports:
- convert: `open_prompts` converts the .json into its cache (the streaming parse and writer): the peak;
- draw: the cache opened, the epoch's order made (torch.randperm, as the loop does), and 1000 batches of 16 prompts
  drawn in that order: the RSS after the setup and the peak over the batches;
- list in RAM (the baseline): the prompts read into a Python list, as a run held them before: the RSS.
Each way's growth from the smallest to the largest size is printed beside it. The text encoder is left out: its
memory does not depend on the prompt count (docs/memory.md measures it).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from tools.bench import _peak_rss, _rss_mib, _table

BATCH, BATCHES = 16, 1000
WAYS = ("convert", "draw", "list in RAM")


def write_json(path, n):
    """n JourneyDB-like prompts as a .json list of objects, streamed to disk."""
    words = "a cinematic photo of an old lighthouse on a rocky coast at dusk, volumetric light, highly detailed".split()
    with open(path + ".tmp", "w") as f:
        f.write("[")
        for i in range(n):
            prompt = " ".join(words[(i + k) % len(words)] for k in range(30)) + f", number {i}"
            f.write(("," if i else "") + json.dumps({"prompt": prompt, "id": i}))
        f.write("]")
    os.replace(path + ".tmp", path)


def measure(way, path):
    """One row's numbers, in this (fresh) process: {"setup_mib", "peak_mib"} over the RSS after the imports."""
    from formats.prompts import open_prompts, prompts_in_file
    imports = _rss_mib()
    if way == "convert":
        _, peak = _peak_rss(lambda: open_prompts(path))
        return {"setup_mib": None, "peak_mib": peak - imports}
    if way == "list in RAM":
        held = []
        _, peak = _peak_rss(lambda: held.extend(p.strip() for p in prompts_in_file(path)))
        return {"setup_mib": _rss_mib() - imports, "peak_mib": peak - imports, "n": len(held)}
    prompts = open_prompts(path)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0))
    setup = _rss_mib() - imports

    def draw():  # each batch dropped once drawn, as a run does
        for b in range(BATCHES):
            start = (b * BATCH) % max(len(prompts) - BATCH, 1)
            [prompts[i] for i in order[start:start + BATCH].tolist()]
    _, peak = _peak_rss(draw)
    return {"setup_mib": setup, "peak_mib": peak - imports}


def in_fresh_process(way, path, cache):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "tools.bench_prompts", "_child", way, path], cwd=root,
                         capture_output=True, text=True, env={**os.environ, "SWIFTBRUSH_CACHE": cache})
    if out.returncode:
        raise RuntimeError(f"{way} {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(sizes, folder):
    rows, by_way = [], {}
    with tempfile.TemporaryDirectory() as cache:  # a cache of its own: the conversion row converts every time
        for n in sizes:
            path = os.path.join(folder, f"prompts-{n}.json")
            if not os.path.exists(path):
                write_json(path, n)
            for way in WAYS:
                got = in_fresh_process(way, path, os.path.join(cache, way))  # draw converts into its own, untimed
                by_way.setdefault(way, []).append(got["peak_mib"])
                disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(cache, way))
                           for f in fs) / 2 ** 20 if way == "convert" else None
                rows.append([f"{n}", way, "-" if got["setup_mib"] is None else f"{got['setup_mib']:.1f}",
                             f"{got['peak_mib']:.1f}", f"{os.path.getsize(path) / 2 ** 20:.0f}",
                             "-" if disk is None else f"{disk:.0f}"])
    _table(["prompts", "way", "RSS after setup MiB", "peak RSS MiB", ".json MiB", "cache MiB"], rows)
    print(f"(over each fresh process's RSS after its imports; draw: {BATCHES} batches of {BATCH} in the epoch's order)")
    for way, peaks in by_way.items():
        print(f"  {way}: peak {peaks[0]:.1f} MiB at {sizes[0]} prompts, {peaks[-1]:.1f} MiB at {sizes[-1]} "
              f"(+{peaks[-1] - peaks[0]:.1f} MiB for {sizes[-1] / sizes[0]:.0f}x the prompts)")
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        print(json.dumps(measure(*argv[1:3])))
        return None
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    p.add_argument("--folder", help="where the .json files are written (kept for the next run; default: a temporary)")
    a = p.parse_args(argv)
    if a.folder:
        os.makedirs(a.folder, exist_ok=True)
        return bench(a.sizes, a.folder)
    with tempfile.TemporaryDirectory() as folder:
        return bench(a.sizes, folder)


if __name__ == "__main__":
    main()
