"""open-unlearning's ``src/train.py`` with a step timer -- run by benchmarks/vs_open_unlearning.py in open-unlearning's
own virtual environment (transformers 4.45: nothing of palu_ds is imported here).

    PYTHONPATH=<checkout>/src OU_DIR=<checkout> OU_TIMES=<file.json> python benchmarks/ou_driver.py <overrides>

It wraps open-unlearning's ``trainer.load_trainer`` (then runs ``src/train.py`` as ``__main__``) to add a callback
that times each optimizer step (``on_step_begin`` to ``on_step_end``: forward, backward and the update) and counts
each step's tokens the way palu_ds does: every real token of the forget and retain rows, prompt and answer, up to
the row's last label (open-unlearning's collator masks every pad token out of ``attention_mask``, and when
pad == eos that would drop the answers' final eos too).  Writes
``{"step_seconds": [...], "step_tokens": [...]}`` to ``OU_TIMES`` (``.rank<R>`` appended on rank R > 0).
"""

import json
import os
import sys
import time


def real_tokens(batch: dict) -> int:
    """Tokens of each row up to and including its last labelled one (right padding)."""
    labels = batch["labels"]
    has = labels != -100
    last = labels.shape[1] - has.flip(1).int().argmax(1)
    return int((last * has.any(1)).sum())


def main() -> None:
    ou, out = os.environ["OU_DIR"], os.environ["OU_TIMES"]
    rank = int(os.environ.get("RANK", "0"))
    if rank:
        out = f"{out}.rank{rank}"
    import runpy

    import transformers

    import trainer as ou_trainer  # open-unlearning's src/trainer (its src/ is on PYTHONPATH)

    seconds, tokens = [], []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            tokens.append(0)

        def on_step_end(self, args, state, control, **kw):
            seconds.append(time.perf_counter() - self.t0)

    load = ou_trainer.load_trainer

    def load_trainer(*a, **k):
        trainer, args = load(*a, **k)
        trainer.add_callback(StepTimer())
        compute = trainer.compute_loss

        def compute_loss(model, inputs, *aa, **kk):
            if tokens:
                tokens[-1] += sum(real_tokens(inputs[n]) for n in ("forget", "retain") if n in inputs)
            return compute(model, inputs, *aa, **kk)

        trainer.compute_loss = compute_loss
        return trainer, args

    ou_trainer.load_trainer = load_trainer  # what src/train.py's ``from trainer import load_trainer`` then reads
    script = os.path.join(ou, "src", "train.py")
    sys.argv = [script, *sys.argv[1:]]
    try:  # as __main__, so that hydra finds ../configs next to the script
        runpy.run_path(script, run_name="__main__")
    finally:
        with open(out + ".tmp", "w") as f:
            json.dump({"step_seconds": seconds, "step_tokens": tokens[:len(seconds)]}, f)
        os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
