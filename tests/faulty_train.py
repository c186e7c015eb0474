"""launch/train.py with a fault injected through palu_ds.engine.Hooks (tests only; the library reads no fault
setting): ``faulty_train.py FAULT --deepspeed ... --config ... [key=value ...]``, FAULT a comma-separated list of

* ``crash_after=K``          every rank ends (status 17) right after optimizer step K (after any checkpoint of it)
* ``nan_from=K``             the loss is NaN from optimizer step K on
* ``grad_nan_from=K[,grad_nan_rank=R]`` from optimizer step K on, the loss stays finite but its gradient is NaN (on
                            rank R only, else every rank): DeepSpeed's own overflow check skips the update
* ``stop_rank=R[,stop_at=S]`` rank R SIGSTOPs itself before optimizer step S + 1 (default 3): a peer that hangs
* ``crash_in_save_model=1``  every rank ends (status 17) when the final model is about to be written
* ``mixed_attention=1``      the model's packed forward attends across rows (transformers' packed-sequence detection
                            off, its sdpa kept): what a model outside transformers' attention interface would do
"""
import os
import signal
import sys

import torch

from palu_ds.engine import Hooks
from palu_ds.process import run_main
from palu_ds.run import main


class Faults(Hooks):
    def __init__(self, spec: str):
        self.fault = dict(kv.split("=") for kv in spec.split(",") if "=" in kv)

    def before_step(self, trainer) -> None:
        f = self.fault
        if f.get("stop_rank") == str(trainer.rank) and trainer.step == int(f.get("stop_at", 3)):
            os.kill(os.getpid(), signal.SIGSTOP)

    def loss(self, trainer, loss):
        if "nan_from" in self.fault and trainer.step + 1 >= int(self.fault["nan_from"]):
            return loss * float("nan")
        if "grad_nan_from" in self.fault and trainer.step + 1 >= int(self.fault["grad_nan_from"]) and \
                self.fault.get("grad_nan_rank", str(trainer.rank)) == str(trainer.rank):
            p = next(trainer.engine.module.parameters())
            return loss + torch.sqrt((p * 0).sum())  # + 0, whose gradient is inf * 0 = NaN
        return loss

    def after_step(self, trainer) -> None:
        if self.fault.get("crash_after") == str(trainer.step):
            os._exit(17)

    def before_save_model(self, trainer) -> None:
        if "crash_in_save_model" in self.fault:
            os._exit(17)


if __name__ == "__main__":
    # the first argument, after the --local_rank=N the deepspeed launcher puts before the script's own
    fault = sys.argv.pop(next(i for i, a in enumerate(sys.argv) if i and not a.startswith("--local_rank")))
    if "mixed_attention" in fault:
        import transformers.masking_utils

        from palu_ds import packing

        packing.enable = lambda model: True  # the model keeps sdpa ...
        transformers.masking_utils.find_packed_sequence_indices = lambda position_ids: None  # ... blind to the rows
    run_main(main, "palu_ds unlearning with an injected fault (tests)", hooks=Faults(fault))
