"""``launch/train.py`` that also writes the model being trained as a Hugging Face folder after the optimizer steps
given first (the efficacy protocol's reported runs: the model at the selected epoch, for the NLL by position kind,
while the run keeps its 10-epoch schedule), and stops after the last of them (the rest of the schedule is never
used: the steps up to there and their evaluations are those of the whole run)::

    python benchmarks/tofu/train_snapshot.py --snapshot-steps 30,50 --deepspeed DS.json --config C.yaml [k=v ...]

writes ``<train.output_dir>/snapshots/step_000030/`` (as the final ``model/``, through ``Trainer.save_model``) and
ends after step 50 with its final checkpoint and model."""

import os
import sys

from palu_ds.checkpoint import tag_for
from palu_ds.engine import Hooks
from palu_ds.process import run_main
from palu_ds.run import main
from palu_eval import trainer_evaluator  # installed packages only: the launcher runs this file as a script


class Snapshots(Hooks):
    """After each optimizer step in ``steps``: the model as ``<output_dir>/snapshots/step_<N>``; after the last one
    the run ends (``total_steps`` cut there: the learning-rate schedule of the steps taken is unchanged)."""

    def __init__(self, steps):
        self.steps = frozenset(steps)

    def after_step(self, trainer) -> None:
        if trainer.step in self.steps:
            trainer.save_model(os.path.join(trainer.out_dir, "snapshots", tag_for(trainer.step)))
        if self.steps and trainer.step >= max(self.steps):
            trainer.total_steps = trainer.step


def pop_steps(argv: list[str]) -> list[int]:
    """``--snapshot-steps 30,50`` taken out of ``argv`` (the rest is launch/train.py's command line)."""
    if "--snapshot-steps" not in argv:
        return []
    i = argv.index("--snapshot-steps")
    value = argv[i + 1] if i + 1 < len(argv) else ""
    del argv[i:i + 2]
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--snapshot-steps takes optimizer steps like 30,50, got {value!r}") from None


if __name__ == "__main__":
    steps = pop_steps(sys.argv)
    run_main(main, "palu_ds unlearning (with snapshots)", hooks=Snapshots(steps), evaluator_for=trainer_evaluator)
