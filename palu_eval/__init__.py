"""TOFU and MUSE evaluation for palu_ds: metrics, batched/distributed scoring, CLI (``palu_eval/run.py``) and
report (``palu_eval/report.py``).

In-training use::

    from palu_eval import evaluate, SuiteConfig
    out = evaluate(model, tokenizer, SuiteConfig(suite="tofu", split="forget10", data="data/tofu",
                                                 splits=("forget", "retain"), forget_quality=False))
    out.summary["forget/prob"], out.summary["model_utility"]

The training engine gets :func:`trainer_evaluator` from its entry point (launch/train.py) as a callable.
"""

from palu_ds.data.errors import DataError

from .api import evaluate, trainer_evaluator
from .config import MissingRetainResults, SuiteConfig
from .results import EvalOutput

__all__ = ["evaluate", "trainer_evaluator", "SuiteConfig", "EvalOutput", "MissingRetainResults", "DataError"]
