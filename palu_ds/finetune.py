"""Plain SFT with the same engine (makes the target and retain models) as an installed module: ``deepspeed --module
palu_ds.finetune --deepspeed DS.json --config launch/configs/finetune.yaml data.forget.source=<train data>``
(or ``torchrun -m`` / ``python -m``); launch/finetune.py is the same run. The training data is ``data.forget``; the
objective is the answer-token NLL."""

from palu_ds.process import run_main
from palu_ds.run import main, plugin_evaluator

DESCRIPTION = "palu_ds fine-tuning (SFT)"
FORCED = ["method.name=sft", "reference.mode=none"]  # whatever the config says: SFT, no reference

if __name__ == "__main__":
    run_main(main, DESCRIPTION, forced=FORCED, evaluator_for=plugin_evaluator)
