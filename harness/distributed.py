"""Data parallelism over the processes torchrun starts, with the maths of one process (docs/distributed.md).

    torchrun --standalone --nproc_per_node 8 swiftbrush.py --batch-size 128 ...   # 16 a GPU, as the paper

- `World`: this process's rank, read from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE;
  `accelerate launch --multi_gpu` sets the same ones). Without them, or with one rank, it is one process: no
  process group, no DDP, the plain code path.
- The one generator: every rank draws the whole batch's random numbers (prompt order, z, t, eps, the prompt-drop
  mask) from the loop's generator and keeps its rows (`World.share`), so the generator, the prompt order and its
  cursor are the same on every rank and equal to one process's, and a checkpoint resumes on any number of ranks.
  The authors' code seeds every rank the same, so with --seed every rank draws the same z, t and eps; DMD2 seeds
  seed + rank, and on resume every rank but 0 restarts its noise from its seed. Neither is one process's maths.
- DDP only over the two forwards that a backward follows (`data_parallel`): the student's in render, and the LoRA
  teacher's in diffusion_loss (only the LoRA requires grad, so only it is all-reduced; under --loss sds there is
  none, and DDP refuses a module without a trainable parameter). Each rank's loss is a mean over its B/N rows and
  DDP averages the gradients over the N ranks: the mean over B, one process's gradient up to summation order. The
  no-grad passes (the teacher's scores, the diagnostics, the samples) call the plain modules; the no-grad
  re-renders of --lora-steps go through the student's wrapper, where DDP does nothing without grad.
- Every rank agrees: the logged losses are all-reduced means, a NaN is seen by all, and a signal caught by any rank
  stops every rank after the same step (the strongest signal all-reduced with the step's numbers on the device,
  harness/steplog.py). Rank 0 writes.
"""
import gc
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from harness.flags import UsageError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# How long a rank waits at a collective before the job fails: past rank 0's longest write, the checkpoint and the
# exports (about 20 GB on SD 2.1-base, 17 minutes at 20 MB/s), while the others wait at the next barrier. NCCL's
# default is 10 minutes.
TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the rank on this machine, which picks its GPU
    local_size: int = 1  # torchrun's --nproc-per-node

    @property
    def main(self):
        """Rank 0: the one that writes (checkpoints, the EMA, log.jsonl, samples, exports, the report) and prints."""
        return self.rank == 0

    @classmethod
    def from_env(cls):
        if "WORLD_SIZE" not in os.environ:
            return cls()
        try:
            rank, size, local_rank, local_size = (int(os.environ.get(k, d)) for k, d in zip(ENV, (0, 1, 0, 1)))
        except ValueError:
            raise UsageError(f"torchrun's environment is not numbers: {[os.environ.get(k) for k in ENV]}") from None
        if not (0 <= rank < size and 0 <= local_rank < local_size <= size):
            raise UsageError(f"torchrun's environment does not hold together: RANK {rank}, WORLD_SIZE {size}, "
                             f"LOCAL_RANK {local_rank}, LOCAL_WORLD_SIZE {local_size}")
        return cls(rank, size, local_rank, local_size)

    def device(self, name):
        """The training device for --device `name`: over several ranks, cuda is each rank's LOCAL_RANK GPU."""
        device = torch.device(name)
        if self.size > 1 and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def start(self, device):
        """The process group, once per process: NCCL on CUDA, gloo on the CPU (env://: torchrun's rendezvous)."""
        if self.size == 1 or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)

    def share(self, rows, device=None):
        """This rank's rows of a draw of the whole batch, rows[rank * n:(rank + 1) * n], n = len(rows) / size; on
        `device` (to_device) if given."""
        if self.size > 1:
            n = len(rows) // self.size
            rows = rows[self.rank * n:(self.rank + 1) * n]
        return rows if device is None else to_device(rows, device)

    def mean(self, value):
        """The mean over the ranks of what each one has (a loss over its rows: the whole batch's): a number, or a
        tensor on the training device, reduced there without the host reading it."""
        if self.size == 1:
            return value
        if torch.is_tensor(value):
            total = value.clone()
            dist.all_reduce(total, dist.ReduceOp.SUM)
            return total / self.size
        return self._all_reduce([value], dist.ReduceOp.SUM)[0] / self.size

    def max(self, value):
        """The maximum over the ranks of a tensor on the training device, reduced there without the host reading it."""
        if self.size == 1:
            return value
        total = value.clone()
        dist.all_reduce(total, dist.ReduceOp.MAX)
        return total

    def same_on_every_rank(self, value):
        """Whether every rank has this number (e.g. the step each read from the checkpoint): one all-reduce."""
        if self.size == 1:
            return True
        high, minus_low = self._all_reduce([value, -value], dist.ReduceOp.MAX)
        return high == -minus_low

    def gather(self, values):
        """Every rank's `values` (a list of numbers), in rank order, on every rank."""
        if self.size == 1:
            return [list(values)]
        k = len(values)
        table = [0.0] * (k * self.size)
        table[self.rank * k:(self.rank + 1) * k] = values
        flat = self._all_reduce(table, dist.ReduceOp.SUM)
        return [flat[r * k:(r + 1) * k] for r in range(self.size)]

    def barrier(self):
        if self.size > 1:
            dist.barrier()

    @contextmanager
    def local_first(self):
        """The block runs on each machine's local rank 0 before its other ranks (the hub's download, the miniature's
        teacher: once per machine, into its cache). Every rank meets the one barrier once."""
        if self.size > 1 and self.local_rank > 0:
            dist.barrier()
        yield
        if self.size > 1 and self.local_rank == 0:
            dist.barrier()

    def _all_reduce(self, values, op):
        on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=on)
        dist.all_reduce(t, op)
        return t.tolist()


ONE = World()  # one process


def to_device(x, device):
    """A tensor made on the CPU (the step's random draws, token ids) on `device` without the host waiting for it: on
    CUDA pinned, then copied asynchronously, where a plain copy would first wait for every kernel queued before it."""
    if device.type != "cuda" or not x.is_cpu:
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def check_world(cfg, world):
    """The flags that cannot run on these ranks: one line before any model loads."""
    if world.size == 1:
        return
    ranks = f"{world.size} ranks"
    if cfg.batch_size % world.size:
        raise UsageError(f"--batch-size {cfg.batch_size} does not split over {ranks}: it is the whole batch, over "
                         f"every rank, so pass a multiple of {world.size} (each rank takes batch / {world.size})")
    if cfg.step_in_backward:
        raise UsageError(f"--step-in-backward steps each parameter inside its backward, before DDP has averaged "
                         f"its gradient over the {ranks}: drop it (each rank holds batch / {world.size})")
    try:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise UsageError(f"--device {cfg.device!r}: {e}") from None
    if device.type not in ("cuda", "cpu"):
        raise UsageError(f"--device {cfg.device}: over {ranks}, cuda (NCCL) or cpu (gloo)")
    if device.type == "cuda" and device.index is not None and device.index != world.local_rank:
        raise UsageError(f"--device {cfg.device} under torchrun: each rank trains on the GPU of its LOCAL_RANK "
                         f"(this one's is cuda:{world.local_rank}); pass --device cuda or leave it out")
    if device.type == "cuda" and torch.cuda.device_count() < world.local_size:
        raise UsageError(f"--nproc-per-node {world.local_size} on a machine with {torch.cuda.device_count()} "
                         f"CUDA devices: one rank a GPU")


@contextmanager
def data_parallel(state, world, device):
    """Within the block, state["student_ddp"] and state["teacher_ddp"] (the modules the two grad-enabled forwards
    call, the plain ones in one process) are DDP wrappers over the ranks; they are released when it ends, also on
    an error, so that none outlives the process group (a rank aborted at exit otherwise). The wrappers live in
    `state` only, never in a local, so that a traceback keeps none alive."""
    if world.size == 1:
        yield
        return
    ids = [device.index] if device.type == "cuda" else None
    # gradient_as_bucket_view: the gradients are views of the all-reduce buckets, not a second copy of them
    state["student_ddp"] = DistributedDataParallel(state["student_ddp"], device_ids=ids, gradient_as_bucket_view=True)
    if state["opt_lora"] is not None:  # VSD: only the LoRA requires grad, so only it is bucketed and all-reduced
        state["teacher_ddp"] = DistributedDataParallel(state["teacher_ddp"], device_ids=ids,
                                                       gradient_as_bucket_view=True)
    try:
        yield
    finally:
        for key in ("student_ddp", "teacher_ddp"):
            if isinstance(state[key], DistributedDataParallel):
                state[key] = state[key].module
        gc.collect()


def accumulating(module, last):
    """Around a micro-batch's forward and backward: DDP all-reduces the gradients on the last one only (no_sync
    must hold the forward too, or the gradients are still synchronised); nothing for a plain module."""
    if last or not isinstance(module, DistributedDataParallel):
        return nullcontext()
    return module.no_sync()


def quiet_unless_main(world):
    """Ranks other than 0 print nothing (rank 0 speaks for the run); their errors still reach stderr."""
    if not world.main:
        sys.stdout = open(os.devnull, "w")


def close():
    """The process group goes, on a path where every rank got here (the end, or a stop they agreed on): after
    data_parallel has released the wrappers."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
