"""The dual variable: projected ascent by hand, warm-up, relative epsilon, checkpoints, and a 2-process gloo run in
which the ranks see different retain losses yet hold the same lambda after every optimizer step."""

import json

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from palu_ds.dual import DualVariable
from palu_ds.methods import get_method


def _run(dual, windows, **kw):
    out = []
    for window in windows:
        for loss in window:
            dual.accumulate(loss)
        dual.step(**kw)
        out.append(dual.value)
    return out


def test_projected_dual_ascent_by_hand():
    # lambda <- max(0, lambda + eta (mean_window L - eps)), eta = 0.5, eps = 2
    dual = DualVariable(lambda0=1.0, eta=0.5, epsilon=2.0)
    assert _run(dual, [[3.0, 1.0], [4.0, 4.0], [0.0, 0.0], [0.0], [0.0]]) == [1.0, 2.0, 1.0, 0.0, 0.0]
    assert dual.steps == 5


def test_update_once_per_optimizer_step_not_per_micro_batch():
    dual = DualVariable(lambda0=0.0, eta=1.0, epsilon=0.0)
    for loss in (1.0, 2.0, 3.0, 6.0):                     # four micro-batches, one window
        dual.accumulate(loss)
        assert dual.value == 0.0                          # nothing moves before the optimizer step
    assert dual.step() == pytest.approx(3.0)
    assert dual.value == pytest.approx(3.0)
    dual.accumulate(1.0, weight=3)                         # weighted: (3*1 + 1*5) / 4 = 2
    dual.accumulate(5.0, weight=1)
    assert dual.step() == pytest.approx(2.0) and dual.value == pytest.approx(5.0)
    with pytest.raises(RuntimeError):
        dual.step()                                        # empty window


def test_warmup_steps_and_epochs():
    dual = DualVariable(lambda0=1.0, eta=1.0, epsilon=0.0, warmup_steps=2)
    assert _run(dual, [[1.0], [1.0], [1.0], [1.0]]) == [1.0, 1.0, 2.0, 3.0]
    dual = DualVariable(lambda0=1.0, eta=1.0, epsilon=0.0, warmup_epochs=1.0)
    with pytest.raises(ValueError):
        _run(dual, [[1.0]])                                # epoch warm-up needs the epoch
    dual = DualVariable(lambda0=1.0, eta=1.0, epsilon=0.0, warmup_epochs=1.0)
    for epoch, expect in ((0.0, 1.0), (0.5, 1.0), (1.0, 2.0), (1.5, 3.0)):
        dual.accumulate(1.0)
        dual.step(epoch=epoch)
        assert dual.value == expect


def test_relative_epsilon_needs_calibration():
    dual = DualVariable(lambda0=1.0, eta=1.0, epsilon_rel=0.1)
    assert dual.needs_calibration
    dual.accumulate(1.0)
    with pytest.raises(RuntimeError):
        dual.step()
    assert dual.calibrate(2.0) == pytest.approx(2.2)       # (1 + a) L_retain(reference)
    dual.accumulate(5.4)                                   # the window still holds 1.0: mean 3.2
    dual.step()
    assert dual.value == pytest.approx(2.0)
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
# retain losses seen by each rank: [step][micro-batch]
LOSSES = {0: [[1.0, 2.0], [0.5, 0.5], [3.0, 1.0], [0.1, 0.2], [2.0, 2.0]],
          1: [[4.0, 3.0], [0.1, 0.3], [0.0, 0.2], [0.1, 0.1], [5.0, 1.0]]}
LAM0, ETA, EPS = 1.0, 1.0, 1.0


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dual = DualVariable(lambda0=LAM0, eta=ETA, epsilon=EPS, warmup_steps=1)
        lams, reduced = [], []
        for window in LOSSES[rank]:
            for loss in window:
                dual.accumulate(loss)
            reduced.append(dual.step())
            lams.append(dual.value)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"lams": lams, "reduced": reduced}, f)
    finally:
        dist.destroy_process_group()


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
    hp = {**get_method("pd_flat").defaults, "dual_update": "micro_batch", "dual_warmup_epochs": 5}
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


def test_lambda_identical_across_two_gloo_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1                                         # bit-identical lambda (and reduced loss) on both ranks
    lam, expect = LAM0, []
    for step in range(len(LOSSES[0])):
        mean = sum(LOSSES[0][step] + LOSSES[1][step]) / 4   # window AND ranks
        assert r0["reduced"][step] == pytest.approx(mean)
        if step >= 1:                                       # warmup_steps=1
            lam = max(0.0, lam + ETA * (mean - EPS))
        expect.append(lam)
    assert r0["lams"] == pytest.approx(expect)
    assert 0.0 in expect and len(set(expect)) > 2           # the projection and real moves were exercised
    # a rank-local update (open-unlearning's PDU) would have drifted apart on these losses
    local = {r: _run(DualVariable(lambda0=LAM0, eta=ETA, epsilon=EPS, warmup_steps=1), LOSSES[r]) for r in (0, 1)}
    assert local[0] != local[1]
