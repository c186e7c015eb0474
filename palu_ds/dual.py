"""The dual variable lambda of the retain constraint ``L_retain <= eps`` (arXiv 2506.05314, Alg. 1).

Primal objective (per step, lambda a constant coefficient, not a parameter):
    ``gamma * L_forget + lambda * (L_retain - eps)``
Dual ascent, once per *optimizer* step, projected to lambda >= 0:
    ``lambda <- max(0, lambda + eta * (L_retain - eps))``
where ``L_retain`` is the retain loss over the whole accumulation window AND all ranks, so every rank holds the same
lambda (unlike open-unlearning's ``pdu.py``, which updates per micro-batch from the rank-local loss).
eps is absolute, or ``(1 + a) * L_retain(reference)`` measured before training (:meth:`DualVariable.calibrate`).
Controller in the style of OpenRLHF's ``kl_controller.py``.

It never communicates: the engine feeds :meth:`after_step` the constraint term it already all-reduced with the rest
of the step (palu_ds.engine.StepStats), so every rank computes the same value from the same number.

open-unlearning's trajectory (``dual_update="micro_batch"``, ``method.params.dual_update=micro_batch``): its
``PDU.final_loss_value`` runs once per micro-batch -- the micro-batch's loss uses the current lambda, THEN
``lambda <- max(0, lambda + eta * (L_retain(micro-batch) - eps))`` -- so with gradient accumulation G lambda takes G
dual steps per optimizer step.  Its ``DualOptimizationCallback`` turns updates on at the end of the first epoch
``e >= dual_warmup_epochs``: no update in the first ``dual_warmup_epochs`` epochs.  The engine calls
:meth:`after_micro_batch` after each micro-batch with the micro-batch's mean retain loss over all ranks (on one GPU
this is open-unlearning's value; it uses the rank-local one, so its ranks' lambdas drift apart -- ours stay equal)
and the optimizer steps completed before the current one; with ``dual_update="step"`` (default) it calls
:meth:`after_step` once per optimizer step.  TOFU settings of its run: lambda0 100, eta 5, eps 0.3, warm-up 5 epochs.
"""

from __future__ import annotations

from typing import Any, Mapping

UPDATE_ON = ("step", "micro_batch")


class DualVariable:
    def __init__(self, lambda0: float, eta: float, epsilon: float | None = None, epsilon_rel: float | None = None,
                 warmup_steps: int = 0, warmup_epochs: float = 0.0, update_on: str = "step"):
        if update_on not in UPDATE_ON:
            raise ValueError(f"dual_update must be one of {UPDATE_ON}, got {update_on!r}")
        self.update_on = update_on
        if (epsilon is None) == (epsilon_rel is None):
            raise ValueError("give exactly one of epsilon (absolute) and epsilon_rel (eps = (1 + a) L_retain(ref))")
        if lambda0 < 0 or eta < 0:
            raise ValueError(f"lambda0 and eta must be >= 0, got {lambda0}, {eta}")
        self.value, self.eta, self.epsilon, self.epsilon_rel = float(lambda0), float(eta), epsilon, epsilon_rel
        self.warmup_steps, self.warmup_epochs = int(warmup_steps), float(warmup_epochs)
        self.steps = 0                                   # optimizer steps seen (warm-up ones included)
        self._sum = self._weight = 0.0

    @classmethod
    def from_hparams(cls, hp: Mapping[str, Any]) -> "DualVariable":
        """From a method's hyperparameters: ``lambda0, eta_lambda, epsilon | epsilon_rel, dual_warmup_steps/epochs,
        dual_update`` (``step`` | ``micro_batch``)."""
        return cls(hp["lambda0"], hp["eta_lambda"], hp.get("epsilon"), hp.get("epsilon_rel"),
                   hp.get("dual_warmup_steps", 0), hp.get("dual_warmup_epochs", 0.0), hp.get("dual_update", "step"))

    @property
    def needs_calibration(self) -> bool:
        return self.epsilon is None

    def calibrate(self, reference_retain_loss: float) -> float:
        """Set ``eps = (1 + a) * L_retain(reference)`` (measured before the first step, over all ranks); returns eps."""
        self.epsilon = (1.0 + self.epsilon_rel) * float(reference_retain_loss)
        return self.epsilon

    def update(self, retain_loss: float, step: int | None = None, epoch: float | None = None) -> float:
        """One dual ascent step from the retain loss of the whole window, already reduced over ranks; returns lambda.

        ``step`` counts dual updates including this one (1-based; default: internal count) -- optimizer steps, or
        micro-batches with ``dual_update="micro_batch"``.  Warm-up: lambda is unchanged while ``step <= warmup_steps``
        or ``epoch < warmup_epochs``."""
        if self.epsilon is None:
            raise RuntimeError("epsilon_rel is set but calibrate() was not called before the first update")
        if epoch is None and self.warmup_epochs > 0:
            raise ValueError("warmup_epochs is set: pass the current (fractional) epoch")
        self.steps = self.steps + 1 if step is None else int(step)
        if self.steps > self.warmup_steps and (epoch is None or epoch >= self.warmup_epochs):
            self.value = max(0.0, self.value + self.eta * (float(retain_loss) - self.epsilon))
        return self.value

    def after_micro_batch(self, retain_loss: float, steps_done: int, steps_per_epoch: int) -> float:
        """``dual_update="micro_batch"``: one dual step from this micro-batch's retain loss, unless inside the
        warm-up (``steps_done`` = optimizer steps completed before the current one, so the epoch is the number of
        epochs already finished, as open-unlearning's end-of-epoch switch sees it); otherwise nothing.  Returns
        lambda (the value the next micro-batch uses)."""
        if self.update_on != "micro_batch":
            return self.value
        return self.update(retain_loss, epoch=steps_done / max(1, steps_per_epoch))

    def after_step(self, retain_loss: float, steps_done: int, steps_per_epoch: int) -> float:
        """``dual_update="step"``: one dual step from the window's retain loss (reduced over ranks); ``steps_done``
        includes this step (the epoch reached at its end); otherwise nothing.  Returns lambda."""
        if self.update_on != "step":
            return self.value
        return self.update(retain_loss, epoch=steps_done / max(1, steps_per_epoch))

    def state_dict(self) -> dict:
        return {"value": self.value, "epsilon": self.epsilon, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.value, self.epsilon, self.steps = float(state["value"]), state["epsilon"], int(state["steps"])
