"""The report of one or more students (and of reference rows such as the teacher's): a markdown table, one grid
with a row of images per line, and the loss curves; written to table.md, results.json, grid.png, curves_*.png."""
import os

from harness.atomic import write_json, write_text
from harness.checkpoint import read_log
from harness.images import save_grid, save_plot

LOSS_COLUMNS = [("steps", "training steps", "{}"), ("loss_student", "student loss (last 10%)", "{:.3g}"),
                ("loss_lora", "LoRA loss (last 10%)", "{:.3g}"), ("sec_per_step", "s/iter", "{:.2f}")]
# The COCO-2014 numbers of python -m evaluation (evaluation/), also the columns of a Stable Diffusion report
EVAL_COLUMNS = [("images", "eval images", "{}"), ("fid", "FID", "{:.2f}"), ("clip_score", "CLIP score", "{:.4f}"),
                ("fd_dinov2", "FD-DINOv2", "{:.1f}")]
CURVES = {"student": "student surrogate loss 0.5*mean(g^2) per step", "lora": "LoRA teacher loss (Eq. 6) per step"}


class Report:
    def __init__(self, out, columns):
        self.out = out
        self.columns = columns  # (key, header, format) of each number shown
        self.rows = []          # (name, {key: value or (mean, std)})
        self.images = []        # (name, [N, 3, H, W] in [-1, 1])
        self.curves = {which: {} for which in CURVES}
        self.notes = []         # lines written under the table

    def add(self, name, numbers, images=None, curves=None):
        """A row of the table; its images as a row of the grid; curves = (label, the run's log rows)."""
        self.rows.append((name, numbers))
        if images is not None:
            self.images.append((name, images))
        if curves:
            label, log = curves
            for which in CURVES:
                if log and f"loss_{which}" in log[0]:
                    self.curves[which][label] = [(r["step"], r[f"loss_{which}"]) for r in log]

    def table(self):
        lines = ["| method | " + " | ".join(header for _, header, _ in self.columns) + " |",
                 "|---" * (len(self.columns) + 1) + "|"]
        for name, numbers in self.rows:
            cells = [_cell(numbers.get(key), fmt) for key, _, fmt in self.columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def write(self):
        """Write the files; returns the markdown table."""
        os.makedirs(self.out, exist_ok=True)
        md = "\n\n".join([self.table()] + self.notes)
        write_text(os.path.join(self.out, "table.md"), md + "\n")
        write_json(os.path.join(self.out, "results.json"), dict(self.rows))
        if self.images:
            save_grid([images for _, images in self.images], os.path.join(self.out, "grid.png"),
                      labels=[name for name, _ in self.images])
        for which, title in CURVES.items():
            if self.curves[which]:
                save_plot(self.curves[which], os.path.join(self.out, f"curves_{which}.png"), title=title)
        return md


def _cell(value, fmt):
    """'-' for no value; 'mean ± std' for a (mean, std) measured over seeds, the std left out when it is 0."""
    if value is None:
        return "-"
    if isinstance(value, (tuple, list)):
        mean, std = value
        return fmt.format(mean) + (f" ± {fmt.format(std)}" if std else "")
    return fmt.format(value)


def loss_numbers(cfg):
    """Where there is no truth to score against (Stable Diffusion): a run's last tenth's mean losses, and its speed."""
    log = read_log(cfg.out)
    tail = log[-max(1, len(log) // 10):]
    numbers = {"steps": cfg.steps}
    for key in ("loss_student", "loss_lora", "sec_per_step"):
        if key in tail[0]:
            numbers[key] = sum(r[key] for r in tail) / len(tail)
    return numbers
