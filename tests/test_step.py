"""The engine's step (training/step.py) with an objective that is not SFT: the seam in objectives.py.

A one-weight regression objective, loss = sum over a micro-batch of (w x - y)^2, normalised by
the number of points of the whole step. Expected values are worked out by hand below."""

import contextlib

import pytest
import torch
from torch import nn

from sftlab.errors import TrainingError
from sftlab.training.distributed import Processes
from sftlab.training.step import train_step


class SquaredError(nn.Module):
    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x, y):
        residual = self.w * x - y
        return {"loss_sum": (residual**2).sum(), "points": torch.tensor(float(len(x))), "abs_sum": residual.abs().sum()}


class Regression:
    """Follows the Objective protocol: count, sums, module, records."""

    name = "regression"
    sums = ("loss_sum", "points", "abs_sum")

    def __init__(self, w: float):
        self.module = SquaredError(w)

    def count(self, batch: dict) -> float:
        return float(len(batch["x"]))

    def train_record(self, sums, seconds):
        return {"loss": sums["loss_sum"] / sums["points"]}

    def eval_record(self, sums):
        return {"eval_loss": sums["loss_sum"] / sums["points"]}


def batch(xs, ys, first_record=0):
    return {"x": torch.tensor(xs), "y": torch.tensor(ys), "real_tokens": len(xs),
            "record_index": list(range(first_record, first_record + len(xs)))}


def run_step(objective, batches, **options):
    optimizer = torch.optim.SGD(objective.module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return train_step(objective.module, objective, batches, processes=Processes(), optimizer=optimizer, lr_scheduler=scheduler,
                      parameters=list(objective.module.parameters()), max_grad_norm=None, autocast=contextlib.nullcontext(),
                      **options)


def test_a_step_is_the_mean_over_the_whole_step_for_any_objective():
    # w = 1; points (x, y): (1, 3) in the first micro-batch, (2, 0), (1, 1), (3, 3) in the second.
    # Residuals w x - y: -2 | 2, 0, 0 -> squared sum 4 + 4 = 8, |r| sum 4, over 4 points.
    # d/dw sum r^2 = sum 2 r x = 2(-2)(1) + 2(2)(2) = 4; the mean over the step's 4 points is 1.0,
    # so grad norm 1.0 and, with SGD lr 0.1, w = 1 - 0.1 = 0.9.
    objective = Regression(1.0)
    result = run_step(objective, [batch([1.0], [3.0]), batch([2.0, 1.0, 3.0], [0.0, 1.0, 3.0], first_record=1)])
    assert result.sums == {"loss_sum": 8.0, "points": 4.0, "abs_sum": 4.0, "tokens": 4.0, "empty_micro_batches": 0.0,
                           "forwards": 2.0}
    assert result.grad_norm == pytest.approx(1.0)
    assert float(objective.module.w) == pytest.approx(0.9)
    assert not result.skipped and not result.stop and result.learning_rate == 0.1


def test_the_split_of_a_step_does_not_change_the_update():
    points = [([1.0], [3.0]), ([2.0], [0.0]), ([1.0], [1.0]), ([3.0], [3.0])]
    one = Regression(1.0)
    run_step(one, [batch([x for p in points for x in p[0]], [y for p in points for y in p[1]])])
    four = Regression(1.0)
    run_step(four, [batch(*p) for p in points])
    assert float(one.module.w) == pytest.approx(float(four.module.w), abs=1e-7) == pytest.approx(0.9)


def test_an_empty_micro_batch_adds_nothing_and_is_counted():
    objective = Regression(1.0)
    result = run_step(objective, [batch([], []), batch([2.0], [0.0])])
    # one point, residual 2: loss 4, gradient 2 * 2 * 2 = 8, w = 1 - 0.8
    assert result.sums["empty_micro_batches"] == 1.0 and result.sums["loss_sum"] == 4.0
    assert float(objective.module.w) == pytest.approx(0.2)


def test_a_non_finite_step_stops_naming_the_records_or_is_skipped():
    with pytest.raises(TrainingError) as error:
        run_step(Regression(1.0), [batch([1.0], [float("inf")], first_record=7)], step=4)
    assert "non-finite loss at step 5" in str(error.value) and "[7]" in str(error.value)
    objective = Regression(1.0)
    result = run_step(objective, [batch([1.0], [float("inf")], first_record=7)], skip_nonfinite=True)
    assert result.skipped and result.records == [7] and float(objective.module.w) == 1.0
