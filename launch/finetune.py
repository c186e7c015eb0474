"""Plain SFT with the same engine (makes the target and retain models): ``deepspeed launch/finetune.py
--deepspeed ds_configs/zero2.json --config launch/configs/finetune.yaml data.forget.source=<train data>``.
The training data is ``data.forget``; the objective is the answer-token NLL."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from palu_ds.process import run_main  # noqa: E402
from palu_ds.run import main  # noqa: E402

if __name__ == "__main__":
    run_main(main, "palu_ds fine-tuning (SFT)", forced=["method.name=sft", "reference.mode=none"])
