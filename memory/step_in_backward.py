"""--step-in-backward: the student's optimiser step taken inside its backward, so that its gradients never exist whole
(the student's gradients are a UNet's worth of fp32 memory; docs/memory.md has the plan with and without it).

The paper clips the student's gradients by their global norm, which is known only after a whole backward. So the
backward runs twice through the retained graph: the first takes each gradient's norm and frees the gradient, the
second scales each gradient as clip_grad_norm_ does, steps that parameter's own optimiser and frees it. Three pieces:

- `clip_and_step_in_backward`: that, for train_step;
- `OptimiserPerParameter`: one optimiser per parameter, stepped from that parameter's gradient hook; its
  state_dict is the one a single optimiser over all the parameters has (same indices, same tensors), so checkpoints
  do not depend on the mode;
- `each_gradient`: calls a function on each parameter's gradient as soon as a backward has accumulated it, then
  frees that gradient: at most one is held at a time (Tensor.register_post_accumulate_grad_hook)."""
from contextlib import contextmanager

import torch

from harness.checkpoint import skip_if_not_finite


def clip_and_step_in_backward(opt, loss, max_norm=1.0):
    """The student's clip-and-step (`opt`: an OptimiserPerParameter) inside its backward; returns the norm before
    clipping, a tensor. As swiftbrush.clip_and_step: a norm that is not finite skips every parameter's update
    (skip_if_not_finite: on the device, with fused Adam)."""
    norms = {}  # p -> the norm of p's gradient: one scalar per parameter

    def keep_norm(p):
        norms[p] = torch.linalg.vector_norm(p.grad)

    with each_gradient(opt.params, keep_norm):
        loss.backward(retain_graph=True)
    in_order = [norms[p] for p in opt.params if p in norms]  # clip_grad_norm_'s order, so its rounding too
    norm = torch.linalg.vector_norm(torch.stack(in_order))   # the norm of the norms, as clip_grad_norm_
    clip = torch.clamp(max_norm / (norm + 1e-6), max=1.0)    # clip_grad_norm_'s factor
    steps = skip_if_not_finite(opt.optimisers.values(), norm)

    def clip_and_step_one(p):
        p.grad.mul_(clip)
        if steps:
            opt.optimisers[p].step()

    with each_gradient(opt.params, clip_and_step_one):
        loss.backward()
    return norm


class OptimiserPerParameter:
    """make([p]) for each parameter p: optimisers[p] steps p alone. Elementwise optimisers (Adam) step each
    parameter as one optimiser over the whole list does."""

    def __init__(self, params, make):
        self.params = list(params)
        self.optimisers = {p: make([p]) for p in self.params}  # a tensor's hash is its identity

    @property
    def param_groups(self):
        """Each optimiser's one group (a learning rate set in each is set for all)."""
        return [o.param_groups[0] for o in self.optimisers.values()]

    def state_dict(self):
        state = {}
        for i, p in enumerate(self.params):
            own = self.optimisers[p].state_dict()["state"]
            if own:  # a parameter not stepped yet has none, as in one optimiser
                state[i] = own[0]
        group = self.optimisers[self.params[0]].state_dict()["param_groups"][0]  # the same settings in every one
        return {"state": state, "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, state_dict):
        group = state_dict["param_groups"][0]
        for i, p in enumerate(self.params):
            own = {0: state_dict["state"][i]} if i in state_dict["state"] else {}
            self.optimisers[p].load_state_dict({"state": own, "param_groups": [{**group, "params": [0]}]})


@contextmanager
def each_gradient(params, use):
    """Within the block, every backward calls use(p) once p.grad is accumulated, then sets p.grad = None."""
    def hook(p):
        use(p)
        p.grad = None

    handles = [p.register_post_accumulate_grad_hook(hook) for p in params]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
