"""harness/steplog.py: a step's numbers written a step late, so that the host never waits for the step it queued."""
import io
import json
import time

import pytest
import torch

from harness.checkpoint import TrainingDiverged
from harness.distributed import ONE
from harness.steplog import StepLog


def numbers(loss, norm):
    return {"loss_student": torch.tensor(loss), "grad_norm_student": torch.tensor(norm)}


def rows(file):
    return [json.loads(line) for line in file.getvalue().splitlines()]


def test_a_steps_row_is_written_when_the_next_step_is_sent():
    file = io.StringIO()
    log = StepLog(file, ONE, [])
    log.send(1, numbers(0.5, 2.0), time.time(), peak_gb=1.0)
    assert rows(file) == []  # step 1's numbers may still be computing: not read yet
    log.add({"mse_psi_t500": 0.25})
    log.send(2, numbers(0.25, 3.0), time.time(), peak_gb=1.5)
    assert [(r["step"], r["loss_student"], r["grad_norm_student"], r["peak_gb"], r.get("mse_psi_t500"))
            for r in rows(file)] == [(1, 0.5, 2.0, 1.0, 0.25)]
    log.flush()
    assert [r["step"] for r in rows(file)] == [1, 2] and list(rows(file)[1])[:3] == ["step", "loss_student",
                                                                                         "grad_norm_student"]
    log.flush()  # nothing pending: nothing written
    assert len(rows(file)) == 2


def test_a_signal_stops_after_the_step_that_carries_it_and_a_nan_names_its_step():
    caught = []
    log = StepLog(io.StringIO(), ONE, caught)
    log.send(1, numbers(0.5, 2.0), time.time())
    caught.append(15)  # SIGTERM during step 2
    log.send(2, numbers(0.5, 2.0), time.time())
    assert not log.stopping  # step 1's numbers carry no signal
    log.send(3, numbers(0.5, 2.0), time.time())
    assert log.stopping and caught == [15]
    log = StepLog(io.StringIO(), ONE, [])
    log.send(7, numbers(0.5, float("nan")), time.time())
    with pytest.raises(TrainingDiverged, match="grad_norm_student became nan at step 7"):
        log.send(8, numbers(0.5, 2.0), time.time())
