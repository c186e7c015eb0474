"""Unlearning as an installed module: ``deepspeed --module palu_ds.train --deepspeed DS.json --config RUN.yaml
[key.path=value ...]``, ``torchrun -m palu_ds.train ...`` or ``python -m palu_ds.train ...`` -- no checkout needed.
launch/train.py is the same run (the documented form in a checkout). An in-training evaluator (``eval.every``) comes
from the installed plugin (palu_ds.run.plugin_evaluator), so the library imports no palu_eval package."""

from palu_ds.process import run_main
from palu_ds.run import main, plugin_evaluator

DESCRIPTION = "palu_ds unlearning"

if __name__ == "__main__":
    run_main(main, DESCRIPTION, evaluator_for=plugin_evaluator)
