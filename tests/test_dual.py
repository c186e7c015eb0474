"""The dual variable: projected ascent by hand, warm-up, relative epsilon, checkpoints, open-unlearning's
per-micro-batch trajectory, and the ENGINE's own lambda path (palu_ds.engine.StepStats + Trainer.train_step) on 2
gloo ranks that see different retain losses and token counts yet hold the same lambda after every optimizer step."""

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from palu_ds.dual import DualVariable
from palu_ds.localrun import free_port
from palu_ds.methods import get_method


def _run(dual, windows, **kw):
    """One dual step per window, from the window's mean (what the engine all-reduces for it)."""
    out = []
    for window in windows:
        dual.update(sum(window) / len(window), **kw)
        out.append(dual.value)
    return out


def test_projected_dual_ascent_by_hand():
    # lambda <- max(0, lambda + eta (mean_window L - eps)), eta = 0.5, eps = 2
    dual = DualVariable(lambda0=1.0, eta=0.5, epsilon=2.0)
    assert _run(dual, [[3.0, 1.0], [4.0, 4.0], [0.0, 0.0], [0.0], [0.0]]) == [1.0, 2.0, 1.0, 0.0, 0.0]
    assert dual.steps == 5


def test_update_once_per_optimizer_step_not_per_micro_batch():
    """dual_update=step (default): micro-batches never move lambda; the end of the step moves it once, from the
    window's value. dual_update=micro_batch: the reverse."""
    dual = DualVariable(lambda0=0.0, eta=1.0, epsilon=0.0)
    for loss in (1.0, 2.0, 3.0, 6.0):                     # four micro-batches, one window
        assert dual.after_micro_batch(loss, 0, 10) == 0.0  # nothing moves before the optimizer step
    assert dual.after_step(3.0, 1, 10) == pytest.approx(3.0) and dual.steps == 1
    micro = DualVariable(lambda0=0.0, eta=1.0, epsilon=0.0, update_on="micro_batch")
    assert [micro.after_micro_batch(loss, 0, 10) for loss in (1.0, 2.0)] == [1.0, 3.0]
    assert micro.after_step(5.0, 1, 10) == 3.0 and micro.steps == 2


def test_warmup_steps_and_epochs():
    dual = DualVariable(lambda0=1.0, eta=1.0, epsilon=0.0, warmup_steps=2)
    assert _run(dual, [[1.0], [1.0], [1.0], [1.0]]) == [1.0, 1.0, 2.0, 3.0]
    dual = DualVariable(lambda0=1.0, eta=1.0, epsilon=0.0, warmup_epochs=1.0)
    with pytest.raises(ValueError):
        _run(dual, [[1.0]])                                # epoch warm-up needs the epoch
    dual = DualVariable(lambda0=1.0, eta=1.0, epsilon=0.0, warmup_epochs=1.0)
    for epoch, expect in ((0.0, 1.0), (0.5, 1.0), (1.0, 2.0), (1.5, 3.0)):
        dual.update(1.0, epoch=epoch)
        assert dual.value == expect


def test_relative_epsilon_needs_calibration():
    dual = DualVariable(lambda0=1.0, eta=1.0, epsilon_rel=0.1)
    assert dual.needs_calibration
    with pytest.raises(RuntimeError, match="calibrate"):
        dual.update(1.0)
    assert dual.calibrate(2.0) == pytest.approx(2.2)       # (1 + a) L_retain(reference)
    dual.update(3.2)
    assert dual.value == pytest.approx(2.0) and not dual.needs_calibration
    with pytest.raises(ValueError):
        DualVariable(lambda0=1.0, eta=1.0, epsilon=0.3, epsilon_rel=0.1)
    with pytest.raises(ValueError):
        DualVariable(lambda0=1.0, eta=1.0)


def test_state_dict_round_trip():
    a = DualVariable(lambda0=1.0, eta=0.5, epsilon_rel=0.5)
    a.calibrate(2.0)
    _run(a, [[5.0], [4.0]])
    b = DualVariable(lambda0=1.0, eta=0.5, epsilon_rel=0.5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert (b.value, b.epsilon, b.steps) == (a.value, a.epsilon, a.steps)
    assert _run(a, [[7.0]]) == _run(b, [[7.0]])


def test_update_with_a_reduced_value_and_the_engines_step_count():
    dual = DualVariable(lambda0=1.0, eta=1.0, epsilon=0.5, warmup_steps=2)
    assert [dual.update(v, step) for step, v in enumerate([3.0, 3.0, 3.0, 0.0], start=1)] == [1.0, 1.0, 3.5, 3.0]
    assert dual.steps == 4
    assert dual.update(0.0) == 2.5 and dual.steps == 5        # without step: internal count


def test_from_method_hparams_and_relative_epsilon():
    """pd_flat's paper defaults (lambda0=100, eta=5, eps=0.3); eps_rel=a gives eps=(1+a)*L_ref: (1+0.5)*2 = 3."""
    hp = get_method("pd_flat").hparams()
    dual = DualVariable.from_hparams(hp)
    assert (dual.value, dual.eta, dual.epsilon, dual.warmup_steps) == (100.0, 5.0, 0.3, 0)
    dual = DualVariable.from_hparams({**hp, "lambda0": 3.0, "eta_lambda": 0.1, "epsilon": None, "epsilon_rel": 0.5,
                                      "dual_warmup_steps": 7})
    assert dual.needs_calibration
    assert dual.calibrate(2.0) == 3.0
    assert (dual.value, dual.eta, dual.epsilon, dual.warmup_steps) == (3.0, 0.1, 3.0, 7)
    with pytest.raises(ValueError, match="exactly one"):
        DualVariable.from_hparams({**hp, "epsilon_rel": 0.5})


# ---------------------------------------------------------------------------------------------- 2 ranks, gloo
# (per-token retain NLL, answer tokens) of each micro-batch a rank sees: [optimizer step][micro-batch]. The ranks differ
# in losses AND token counts; rank 1's 4th step holds a NaN logit (a non-finite step on one rank only).
NAN = float("nan")
LOSSES = {0: [[(1.0, 2), (2.0, 3)], [(0.5, 4), (0.5, 1)], [(0.3, 3), (0.1, 3)], [(0.1, 2), (0.2, 2)],
              [(2.0, 2), (2.0, 2)]],
          1: [[(4.0, 4), (3.0, 1)], [(0.1, 3), (0.3, 1)], [(0.2, 1), (0.2, 2)], [(NAN, 2), (0.1, 1)],
              [(5.0, 2), (1.0, 1)]]}
LAM0, ETA, EPS, V, T = 1.0, 1.0, 1.0, 8, 6


def _batch(nll: float, n: int) -> dict:
    """One row whose n answer tokens (id 1) each have NLL ``nll`` under the logits :func:`_logits` makes."""
    labels = torch.full((1, T), -100)
    labels[0, 1:1 + n] = 1
    return {"example_id": torch.tensor([0]), "input_ids": torch.ones(1, T, dtype=torch.long),
            "attention_mask": torch.ones(1, T, dtype=torch.long), "labels": labels,
            "sens_mask": torch.zeros(1, T, dtype=torch.bool), "common_mask": torch.zeros(1, T, dtype=torch.bool),
            "nll": torch.tensor([nll])}


def _logits(batch: dict, w: torch.Tensor) -> torch.Tensor:
    """Logits 0 but a = -log((e^nll - 1)/(V - 1)) on token 1: NLL(1) = log(1 + (V - 1) e^-a) = nll (NaN stays NaN)."""
    nll = float(batch["nll"])
    a = -math.log(math.expm1(nll) / (V - 1)) if nll == nll else NAN
    logits = torch.zeros(1, T, V)
    logits[..., 1] = a
    return logits + w  # attached to the fake engine's one weight, so backward runs


class _Stream:
    def __init__(self, batches):
        self.batches = iter(batches)

    def next(self):
        return next(self.batches)


class _Engine:
    """What Trainer.train_step asks of DeepSpeed: backward, step, the optimizer's param groups, the grad norm."""

    def __init__(self):
        self.w = torch.zeros((), requires_grad=True)
        self.optimizer = torch.optim.SGD([self.w], lr=0.0)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()

    def get_global_grad_norm(self):
        return None


def _threads() -> list[str]:
    """The names of this process's native threads."""
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))


def _engine_worker(rank, world, port, out_dir, mode):
    """The engine's real Trainer.train_step (window counts, terms, StepStats all-reduce, skip, dual step) on pd_flat,
    with the model forward replaced by :func:`_logits` and DeepSpeed by :class:`_Engine`. The group comes from
    ``init_from_env`` as under torchrun; the threads left after destroying it go to ``threads<rank>.json``."""
    from palu_ds.config import load_config, resolve
    from palu_ds.dist import init_from_env
    from palu_ds.engine import Trainer
    from palu_ds.reference import NoReference

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert init_from_env()
    try:
        run = resolve(load_config(None, [
            "model.path=m", "data.forget.source=f", "data.retain.source=r", "method.name=pd_flat",
            "reference.mode=none", f"method.params.lambda0={LAM0}", f"method.params.eta_lambda={ETA}",
            f"method.params.epsilon={EPS}", "method.params.dual_warmup_steps=1", f"method.params.dual_update={mode}",
            "train.max_nonfinite=10"]))
        t = Trainer(run, "unused.json")
        t.rank, t.world, t.device, t.gas, t.total_steps, t.steps_per_epoch = rank, world, torch.device("cpu"), 2, 5, 5
        t.engine, t.reference, t.dual = _Engine(), NoReference(), t._build_dual()
        t.streams = {"forget": _Stream([_batch(1.0, 1)] * 10),
                     "retain": _Stream([_batch(*m) for window in LOSSES[rank] for m in window])}
        t._forward = lambda micro: ({n: _logits(b, t.engine.w) for n, b in micro.items()}, {})  # (logits, hidden)
        steps = []
        for _ in LOSSES[rank]:
            s = t.train_step()
            steps.append({"lam": t.dual.value, "retain": s["loss/retain"], "skipped": t.skipped,
                          "scalar_lam": s["dual/lambda"]})
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(steps, f)
    finally:
        dist.destroy_process_group()
    with open(f"{out_dir}/threads{rank}.json", "w") as f:
        json.dump(_threads(), f)


def _expected(mode: str) -> list[float]:
    """Lambda after each optimizer step, by hand: one dual step per finite optimizer step from the token-weighted
    retain NLL of the whole window on both ranks (step mode), or one per finite micro-batch from that micro-batch's
    token-weighted NLL on both ranks (micro_batch mode); the first dual step is the warm-up (no move)."""
    lam, updates, out = LAM0, 0, []
    for step in range(len(LOSSES[0])):
        groups = [LOSSES[0][step] + LOSSES[1][step]] if mode == "step" else \
            [[LOSSES[0][step][k], LOSSES[1][step][k]] for k in range(2)]
        for group in groups:
            mean = sum(nll * n for nll, n in group) / sum(n for _, n in group)
            if mean == mean:  # a non-finite window / micro-batch moves nothing
                updates += 1
                if updates > 1:
                    lam = max(0.0, lam + ETA * (mean - EPS))
        out.append(lam)
    return out


@pytest.mark.distributed  # the test tier (registered with the tiers of issue 15, part B)
@pytest.mark.parametrize("mode", ["step", "micro_batch"])
def test_engine_lambda_identical_across_two_gloo_ranks(tmp_path, mode):
    mp.spawn(_engine_worker, args=(2, free_port(), str(tmp_path), mode), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (0, 1):  # the group's threads end with it (else ~1 exit in 5 aborted: palu_ds.dist.import_dynamo_first)
        assert not [t for t in json.loads((tmp_path / f"threads{r}.json").read_text()) if "gloo" in t]
    assert r0 == r1                                         # bit-identical lambda, losses and counts on both ranks
    expect = _expected(mode)
    assert [s["lam"] for s in r0] == pytest.approx(expect, rel=1e-5)
    assert [s["scalar_lam"] for s in r0] == [s["lam"] for s in r0]
    assert [s["skipped"] for s in r0] == [0, 0, 0, 1, 1]     # rank 1's NaN skips the step on both ranks
    for step in (0, 1, 2, 4):                               # loss/retain: the token-weighted mean over window + ranks
        window = LOSSES[0][step] + LOSSES[1][step]
        want = sum(nll * n for nll, n in window) / sum(n for _, n in window)
        assert r0[step]["retain"] == pytest.approx(want, rel=1e-5)
    assert 0.0 in expect and len(set(expect)) > 2           # the projection and real moves were exercised
    if mode == "step":
        assert expect[3] == expect[2]                       # the skipped step leaves lambda where it was
    # a rank-local update (open-unlearning's PDU) would have drifted apart on these losses
    local = {r: _run(DualVariable(lambda0=LAM0, eta=ETA, epsilon=EPS, warmup_steps=1),
                     [[sum(nll * n for nll, n in w) / sum(n for _, n in w)] for w in LOSSES[r][:3]]) for r in (0, 1)}
    assert local[0] != local[1]


def _open_unlearning_lambdas(retain_losses, gas, steps_per_epoch, lambda0, eta, eps, warmup_epochs):
    """open-unlearning's PDU control flow, transcribed (src/trainer/unlearn/pdu.py at d3d7cf9): per micro-batch
    ``final_loss_value`` scales the losses by ``preferences`` (lambda = preferences[1]) and THEN, if ``can_update``,
    sets ``preferences[1] = max(0, preferences[1] + dual_step_size * (retain_loss - retain_loss_eps))``;
    ``can_update`` starts as ``dual_warmup_epochs == 0`` and ``DualOptimizationCallback.on_epoch_end`` turns it on
    once ``state.epoch >= dual_warmup_epochs``.  Returns the lambda each micro-batch's loss used."""
    preferences, can_update, used, i = [1.0, lambda0], warmup_epochs == 0, [], 0
    for epoch in range(len(retain_losses) // (gas * steps_per_epoch)):
        for _ in range(steps_per_epoch * gas):
            used.append(preferences[1])
            if can_update:
                preferences[1] = max(0, preferences[1] + eta * (retain_losses[i] - eps))
            i += 1
        if epoch + 1 >= warmup_epochs:  # on_epoch_end, state.epoch = epoch + 1
            can_update = True
    return used


# A constraint sequence: the per-micro-batch retain NLLs of a 10-epoch run, 3 optimizer steps per epoch, gradient
# accumulation 4 (120 micro-batches): below eps = 0.3 by 0.2..1.0, so lambda falls by 1..5 per dual step and
# reaches the projection at 0 within the run.
RECORDED = [0.3 - 0.2 * (1 + (7 * i) % 5) for i in range(120)]


def test_micro_batch_mode_reproduces_open_unlearning_lambda_trajectory():
    """dual_update=micro_batch + dual_warmup_epochs=5, driven as the engine drives it (after_micro_batch with the
    optimizer steps completed so far, after_step at the end of the step) gives, micro-batch by micro-batch, exactly
    the lambda open-unlearning's PDU uses: 100 through the 5 warm-up epochs (60 micro-batches), then
    100 - 5 * (0.2 + 0.6 + 1.0 + 0.4) = 89 after the first post-warm-up optimizer step (4 dual steps; the default
    per-step mode would move 5 * 0.55 = 2.75), and 0 once the projection binds."""
    gas, spe = 4, 3
    hp = get_method("pd_flat").hparams({"dual_update": "micro_batch", "dual_warmup_epochs": 5})
    assert (hp["lambda0"], hp["eta_lambda"], hp["epsilon"]) == (100.0, 5.0, 0.3)  # open-unlearning's TOFU run
    dual = DualVariable.from_hparams(hp)
    ours = []
    for step in range(len(RECORDED) // gas):
        window = RECORDED[step * gas:(step + 1) * gas]
        for loss in window:
            ours.append(dual.value)
            dual.after_micro_batch(loss, step, spe)
        dual.after_step(sum(window) / gas, step + 1, spe)  # a no-op in this mode
    want = _open_unlearning_lambdas(RECORDED, gas, spe, 100.0, 5.0, 0.3, 5)
    assert ours == pytest.approx(want, rel=0, abs=1e-12)
    assert ours[:61] == [100.0] * 61 and ours[64] == pytest.approx(89.0) and ours[-1] == 0.0
    assert min(ours) == 0.0 and ours.index(0.0) < 119
    # the default (one step per optimizer step, no warm-up) differs: one eta step of the window mean
    step_mode = DualVariable.from_hparams(get_method("pd_flat").defaults)
    step_mode.after_step(sum(RECORDED[:4]) / 4, 1, spe)
    assert step_mode.value == pytest.approx(100 - 5 * 0.55)
    with pytest.raises(ValueError, match="dual_update must be one of"):
        DualVariable.from_hparams({**hp, "dual_update": "epoch"})
