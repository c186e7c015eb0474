"""Plain SFT with the same engine (makes the target and retain models): ``deepspeed launch/finetune.py
--deepspeed ds_configs/zero2.json --config launch/configs/finetune.yaml data.forget.source=<train data>``.
The training data is ``data.forget``; the objective is the answer-token NLL. Installed without a checkout:
``deepspeed --module palu_ds.finetune ...`` (palu_ds/finetune.py)."""

from palu_ds.finetune import DESCRIPTION, FORCED
from palu_ds.process import run_main
from palu_ds.run import main
from palu_eval import trainer_evaluator

if __name__ == "__main__":
    run_main(main, DESCRIPTION, forced=FORCED, evaluator_for=trainer_evaluator)
