"""The miniature's students over training seeds, side by side:

    for s in 0 1 2 3 4; do python swiftbrush.py --model miniature --seed $s --out runs/miniature-seed$s; done
    python -m miniature.seeds runs/miniature-seed*

Each RUN is the --out of one run (or of an --ablation): their results.json tables are read, the reference rows (the
same in every run, since no training seed enters them) shown once, each student's row as the mean over the runs and
its range. A student trains through a two-player game (the student and its LoRA teacher), so its last digits move
with the training seed, and with the machine and library versions: the range is what a reader's run can differ by.
"""
import argparse
import json
import os
import sys

from miniature.report import COLUMNS

SHOWN = [column for column in COLUMNS if column[0] != "sec_per_step"]  # a time is not a result


def read_results(run):
    path = os.path.join(run, "results.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"seeds: error: {path}: {e}; pass the --out folders of finished miniature runs")


def mean(value):
    """A report's number: (mean, std) over its noise seeds, or a plain number, or None."""
    return value[0] if isinstance(value, list) else value


def cell(values, fmt):
    """'-' when no run has the number, the number when every run agrees, else 'mean (min-max)'."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    low, high = min(values), max(values)
    if fmt.format(low) == fmt.format(high):
        return fmt.format(low)
    return f"{fmt.format(sum(values) / len(values))} ({fmt.format(low)}-{fmt.format(high)})"


def spread_table(runs):
    """The markdown table of the runs' rows, in the first run's order (a row missing from a run is left out there)."""
    results = [read_results(run) for run in runs]
    lines = ["| method | " + " | ".join(header for _, header, _ in SHOWN) + " |", "|---" * (len(SHOWN) + 1) + "|"]
    for name in results[0]:
        rows = [r[name] for r in results if name in r]
        cells = [cell([mean(row.get(key)) for row in rows], fmt) for key, _, fmt in SHOWN]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="the --out folders of miniature runs with different --seed")
    a = p.parse_args(argv)
    print(f"{len(a.runs)} runs: {', '.join(a.runs)}\n")
    print(spread_table(a.runs))


if __name__ == "__main__":
    main()
