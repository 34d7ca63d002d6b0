"""The student's EMA, exact at every step: ema = d_n ema + (1 - d_n) theta_n after each step n of the student (the
authors' EMA, diffusers' EMAModel; swiftbrush.ema_decay_of_step gives d_n). Where the memory plan puts it:

- `EMA`: on the training device (or on the CPU when the student is there): one multi-tensor lerp a step, queued
  behind the step's kernels like them, no copy;
- `HostEMA`: in the host's memory, where the device has no room for a second fp32 student. Each step the student is
  copied into pinned host buffers on a side stream (the step's stream does not wait for it) and a worker thread lerps
  the EMA from them; the step's stream waits for the copy, on the GPU, only before the student's next optimiser step
  changes the weights it reads. The step waits on the host only when the worker is still lerping the previous step
  (a host lerp slower than a whole step); `waited_s` counts that time.

A 10-step cadence (the product of ten decays applied to the tenth step's weights) would be exact only for a student
constant between updates; this is exact, so a resume and a run of another length see the same EMA."""
import queue
import threading
import time
import weakref

import torch


class EMA:
    """The EMA on the student's own device: `update(d)` after each step."""

    def __init__(self, student):
        self.live = [v.detach() for v in student.state_dict().values()]  # the student's own tensors, fp32
        self.ema = {k: v.detach().float().clone() for k, v in student.state_dict().items()}

    def update(self, decay):
        torch._foreach_lerp_(list(self.ema.values()), self.live, 1.0 - decay)

    def weights(self):
        """The EMA as of the last update: a state dict, its tensors the EMA's own (a checkpoint loads into them)."""
        return self.ema

    def guard(self, optimiser):
        """Nothing to guard: the lerp is queued on the step's own stream."""


class HostEMA(EMA):
    """The EMA in host memory, updated from a non-blocking copy by a worker thread (the module's docstring)."""

    def __init__(self, student):
        self.live = [v.detach() for v in student.state_dict().values()]
        self.ema = {k: v.detach().float().to("cpu", copy=True) for k, v in student.state_dict().items()}
        pin = self.live[0].device.type == "cuda"  # pinned memory: a device-to-host copy that does not block
        self.buffers = [torch.empty(v.shape, dtype=v.dtype, pin_memory=pin) for v in self.live]
        self.side = torch.cuda.Stream(self.live[0].device) if pin else None
        self.copied = None  # the event of the last copy (CUDA), which the next optimiser step waits for
        self.free = threading.Event()  # the worker is done with the buffers
        self.free.set()
        self.jobs, self.error, self.waited_s = queue.Queue(), None, 0.0
        # the worker holds the EMA only while it lerps, so that a run's EMA is freed with the run (an --ablation)
        threading.Thread(target=lerp_each_job, args=(self.jobs, weakref.ref(self)), daemon=True).start()

    def __del__(self):
        self.jobs.put(None)  # the worker's last job: it ends

    def update(self, decay):
        start = time.perf_counter()
        self.free.wait()  # the worker has lerped the previous step from the buffers
        self.waited_s += time.perf_counter() - start
        self._raise_if_failed()
        self.free.clear()
        if self.side is None:  # a CPU (or MPS) student: the copy is the host's own work
            for buffer, v in zip(self.buffers, self.live):
                buffer.copy_(v)
        else:
            self.side.wait_stream(torch.cuda.current_stream(self.side.device))  # after the step's kernels
            with torch.cuda.stream(self.side):
                for buffer, v in zip(self.buffers, self.live):
                    buffer.copy_(v, non_blocking=True)
                self.copied = torch.cuda.Event()
                self.copied.record()
        self.jobs.put((decay, self.copied))

    def guard(self, optimiser):
        """The weights the copy reads stay as they were until it is done: before `optimiser` steps, the device's
        stream waits (on the GPU, the host does not) for the copy. An optimiser per parameter (--step-in-backward)
        is guarded in each of its optimisers."""
        for opt in getattr(optimiser, "optimisers", {None: optimiser}).values():
            opt.register_step_pre_hook(lambda *_: self._copy_before_the_step())

    def _copy_before_the_step(self):
        if self.copied is not None:
            torch.cuda.current_stream(self.side.device).wait_event(self.copied)

    def weights(self):
        self.free.wait()
        self._raise_if_failed()
        return self.ema

    def _raise_if_failed(self):
        if self.error is not None:
            raise self.error


def lerp_each_job(jobs, ema_ref):
    """HostEMA's worker: for each (decay, copy event) queued, the lerp from the buffers once the copy is done."""
    while (job := jobs.get()) is not None:
        decay, copied = job
        ema = ema_ref()
        if ema is None:
            return
        try:
            if copied is not None:
                copied.synchronize()
            torch._foreach_lerp_(list(ema.ema.values()), ema.buffers, 1.0 - decay)
        except BaseException as e:  # raised in the training thread at the next update
            ema.error = e
        ema.free.set()
        del ema
