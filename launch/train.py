"""Unlearning: ``deepspeed launch/train.py --deepspeed ds_configs/zero3.json --config launch/configs/tofu_palu.yaml
[key.path=value ...]`` (also under torchrun, mpirun, srun, or as a single process)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from palu_ds.process import run_main  # noqa: E402
from palu_ds.run import main  # noqa: E402

if __name__ == "__main__":
    run_main(main, "palu_ds unlearning")
