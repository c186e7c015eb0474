"""Unlearning: ``deepspeed launch/train.py --deepspeed ds_configs/zero3.json --config launch/configs/tofu_palu.yaml
[key.path=value ...]`` (also under torchrun, mpirun, srun, or as a single process). Installed without a checkout:
``deepspeed --module palu_ds.train ...`` (palu_ds/train.py)."""

from palu_ds.process import run_main
from palu_ds.run import main
from palu_ds.train import DESCRIPTION
from palu_eval import trainer_evaluator

if __name__ == "__main__":
    run_main(main, DESCRIPTION, evaluator_for=trainer_evaluator)
