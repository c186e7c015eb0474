"""The learning-rate schedule (palu_ds.schedule.lr_at): warm-up, then constant / linear / cosine, by hand."""
import pytest

from palu_ds.config import TrainConfig
from palu_ds.schedule import SCHEDULERS, lr_at


def _lrs(scheduler: str, warmup: int = 2, total: int = 6, lr: float = 1e-3) -> list[float]:
    train = TrainConfig(lr=lr, warmup_steps=warmup, scheduler=scheduler)
    return [lr_at(step, train, total) for step in range(total)]


def test_the_docstring_example_and_each_decay():
    # warm-up (s + 1) / W, then p = (s - W) / (S - W) = 0, 1/4, 2/4, 3/4
    assert _lrs("cosine") == pytest.approx([5e-4, 1e-3, 1e-3, 8.5355e-4, 5e-4, 1.4645e-4], rel=1e-4)
    assert _lrs("linear") == pytest.approx([5e-4, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert _lrs("constant") == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])
    assert _lrs("constant", warmup=0) == [1e-3] * 6


def test_past_the_end_and_every_scheduler_known():
    train = TrainConfig(lr=1.0, scheduler="linear")
    assert lr_at(10, train, 4) == 0.0                      # linear never goes below 0
    assert lr_at(10, TrainConfig(lr=1.0, scheduler="cosine"), 4) == pytest.approx(0.0)
    assert set(SCHEDULERS) == {"constant", "linear", "cosine"}
