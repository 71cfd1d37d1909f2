"""The optimizer's opt-in memory savers: bf16 moment estimates, and the update fused into backward.

Full fine-tuning in fp32 with AdamW keeps four copies of the weights: the weights, their
gradient and AdamW's two moment estimates (16 bytes per parameter; Gemma 3 270M: 4.3 GB).

- `AdamWBF16States` stores the two moments in bfloat16 (12 bytes per parameter). They are
  updated in fp32 and rounded back *stochastically*: rounded to nearest, the second moment's
  update (1 - beta2) * g^2 = 0.001 * g^2 is below half a bf16 unit (2^-9 relative) as soon as g^2
  is ~half the running average, and the average would stop moving. Weights and gradients stay fp32.
- `step_in_backward` runs the optimizer on each parameter as soon as its gradient is complete
  (a post-accumulate-grad hook, as torchtune's optimizer-in-backward) and frees that gradient,
  so the whole model's gradient never exists at once. The update equals the ordinary step's
  exactly when nothing needs all gradients first: one micro-batch per step, no clipping.
"""

from __future__ import annotations

import math

import torch

# Elements per slice of a parameter in the bf16 update: the fp32 temporaries then stay small
# (a few x 64 MB) even for Gemma's 168M-value embedding, instead of several copies of it.
SLICE = 16 * 1024 * 1024


def _stochastic_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (unbiased)."""
    bits = x.view(torch.int32)
    # The low 16 bits are those bf16 drops; random bits added there carry into the kept ones with
    # that probability. On the magnitude bits, so the same for negative values.
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return (bits + noise).bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)


class AdamWBF16States(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) with exp_avg and exp_avg_sq in bfloat16."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int = 0,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        # Its own generator: the rounding noise does not shift the training's random stream.
        self.generator = torch.Generator().manual_seed(seed)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts loaded state to each parameter's dtype (fp32): back to bf16, exactly (bf16 -> fp32 -> bf16).
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(
                        p, dtype=torch.bfloat16, memory_format=torch.contiguous_format
                    )
                state["step"] += 1
                step = float(state["step"])
                step_size = lr / (1 - beta1**step)
                bias2_sqrt = math.sqrt(1 - beta2**step)
                weight, grad = p.view(-1), p.grad.reshape(-1)
                m_all, v_all = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
                for start in range(0, weight.numel(), SLICE):
                    w, g = weight[start : start + SLICE], grad[start : start + SLICE].float()
                    m = m_all[start : start + SLICE].float().lerp_(g, 1 - beta1)
                    v = v_all[start : start + SLICE].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    m_all[start : start + SLICE] = _stochastic_bf16(m, self.generator)
                    v_all[start : start + SLICE] = _stochastic_bf16(v, self.generator)
                    if decay:
                        w.mul_(1 - lr * decay)
                    w.addcdiv_(m, v.sqrt_().div_(bias2_sqrt).add_(eps), value=-step_size)
        return loss


class StepInBackward:
    """Steps `optimizer` on each parameter inside backward, as soon as its gradient is complete,
    then frees that gradient. The optimizer object stays the one the scheduler and checkpoints
    see; its state is the same as after ordinary steps. `take_grad_norm()` gives the step's total
    gradient norm (for the log), summed from the norms seen in the hooks."""

    def __init__(self, parameters: list[torch.Tensor], optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        self.squares = 0.0
        self.handles = [p.register_post_accumulate_grad_hook(self._step) for p in parameters]

    @torch.no_grad()
    def _step(self, param: torch.Tensor) -> None:
        self.squares += float(torch.linalg.vector_norm(param.grad)) ** 2  # per tensor in fp32, as clip_grad_norm_
        groups = self.optimizer.param_groups
        everything = [group["params"] for group in groups]
        # optimizer.step() on this one parameter: other parameters may hold gradients that are not
        # complete yet (a tied weight's head part lands before its lookup part), so they are hidden.
        for group in groups:
            group["params"] = [param] if group is self.groups[id(param)] else []
        try:
            self.optimizer.step()
        finally:
            for group, params in zip(groups, everything):
                group["params"] = params
        param.grad = None

    def take_grad_norm(self) -> float:
        norm, self.squares = math.sqrt(self.squares), 0.0
        return norm

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
