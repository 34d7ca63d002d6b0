"""The step's logged numbers (losses, gradient norms), from the device to log.jsonl without making the GPU wait.

A step's numbers are tensors on the device. Reading them right after the step would make the host wait for the GPU
to finish it, and the GPU then waits for the host to write the log and draw and queue the next step. So `send`
queues them (averaged over the ranks, with whether any rank caught a signal) and copies them into pinned host memory
behind the step's kernels, and reads the *previous* step's, which is done by then: the GPU always has a step to run.
The host is at most one step ahead. A number that is not finite stops the run (TrainingDiverged, naming its step);
a signal caught by any rank stops every rank after the same step (the one whose numbers carry it, and the next,
already queued)."""
import json
import time

import torch

from harness.checkpoint import check_finite


class StepLog:
    """log.jsonl's rows, one step late. `caught`: ctrl_c_finishes_the_step's list of signals; `world`: the ranks."""

    def __init__(self, file, world, caught, bar=None):
        self.file, self.bar, self.world, self.caught = file, bar, world, caught
        self.sent = None  # the last step's numbers, on their way to the host
        self.stopping = False  # a rank caught a signal: stop after this step

    def send(self, step, logs, started, **known):
        """Queue step `step`'s numbers (`logs`: tensors on the device; `known`: numbers the host has, logged beside
        them), then write the previous step's row. sec_per_step: from `started` (time.time() as the step began) to
        the previous step's numbers read: the step's own time on the CPU, and once the host waits for the device
        (its steady state) on a GPU; not the samples or checkpoints written between steps."""
        losses = [k for k in logs if k.startswith("loss_")]
        norms = [k for k in logs if k not in losses]  # the same on every rank
        device = logs[losses[0]].device
        asynchronous = device.type == "cuda"  # pinned copies that need no wait; elsewhere (MPS) plain ones
        signal = torch.tensor([float(max(self.caught, default=0))]).to(device, non_blocking=asynchronous)
        values = torch.cat([self.world.mean(torch.stack([logs[k] for k in losses]).float()),  # one all-reduce
                            torch.stack([logs[k] for k in norms]).float(),
                            self.world.max(signal)])  # and one more: the strongest signal of any rank
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=asynchronous)
        host.copy_(values, non_blocking=asynchronous)
        done = torch.cuda.Event() if asynchronous else None
        if done is not None:
            done.record()
        previous, self.sent = self.sent, {"step": step, "names": losses + norms, "order": list(logs), "host": host,
                                          "done": done}
        if previous is not None:
            self._write(previous)
        self.sent["known"] = {"sec_per_step": round(time.time() - started, 4), **known}

    def add(self, numbers):
        """More numbers for the step just sent (its row is written at the next send, or at flush)."""
        self.sent["known"].update(numbers)

    def flush(self):
        """Write the last step's row now (before a checkpoint: the steps it holds were all finite)."""
        if self.sent is not None:
            self._write(self.sent)
            self.sent = None
        self.file.flush()

    def _write(self, sent):
        if sent["done"] is not None:
            sent["done"].synchronize()  # that step only: the one queued after it runs on
        *values, signal = sent["host"].tolist()
        numbers = dict(zip(sent["names"], values))
        numbers = {k: numbers[k] for k in sent["order"]}  # the step's order: loss_student, grad_norm_student, ...
        for name, value in numbers.items():
            check_finite(name, value, sent["step"])
        if signal and int(signal) not in self.caught:  # every rank exits with the same code
            self.caught.append(int(signal))
        self.stopping = self.stopping or bool(signal)
        row = {"step": sent["step"], **numbers, **sent["known"]}
        self.file.write(json.dumps(row) + "\n")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k[5:]: f"{v:.3g}" for k, v in numbers.items() if k.startswith("loss_")})
        return row
