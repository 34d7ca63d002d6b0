"""GPU memory: the plan that counts what a run holds and decides gradient checkpointing and the EMA's place
(plan.py), and --step-in-backward, the student's optimiser step inside its backward (step_in_backward.py)."""
