"""palu_ds.dither: the bf16 dither of the starting weights (``train.bf16_dither``)."""
import pytest
import torch

from palu_ds.dither import bf16_dither, dither_model


def _cells(w):
    """Each element's bf16 value and the spacing of bf16 values there."""
    b = w.to(torch.bfloat16).float()
    return b, torch.exp2(torch.floor(torch.log2(b.abs())) - 7)


def test_dither_keeps_every_bf16_value_and_spreads_the_weights_over_their_cells():
    g = torch.Generator().manual_seed(0)
    on_grid = (torch.randn(20000, generator=g) * 0.1).to(torch.bfloat16).float()  # a checkpoint stored in bf16
    w = torch.cat([on_grid, torch.tensor([0.0, -0.0, 1.0, -2.0, float("inf"), float("nan")])])
    out = bf16_dither(w, torch.Generator().manual_seed(1))
    assert out.dtype == torch.float32 and out.shape == w.shape
    assert torch.equal(out.to(torch.bfloat16)[:-1], w.to(torch.bfloat16)[:-1])  # the bf16 model is unchanged
    assert torch.isnan(out[-1]) and out[-2] == float("inf") and out[-6] == 0 and out[-5] == 0
    b, ulp = _cells(on_grid)
    offset = (out[:20000] - b) / ulp
    assert offset.abs().max() <= 0.5
    assert (offset == 0).float().mean() < 0.02  # was 100% on the grid
    # spread uniformly over the cell (those at a power of two keep w on one side: a few percent stay at 0)
    assert offset.mean().abs() < 0.02 and 0.25 < offset.std() < 0.31
    assert torch.equal(out[:-1], bf16_dither(w, torch.Generator().manual_seed(1))[:-1])  # the generator decides
    assert not torch.equal(out[:-1], bf16_dither(w, torch.Generator().manual_seed(2))[:-1])


def test_at_a_power_of_two_the_dither_stays_inside_the_narrower_cell_below():
    """1.0's cell is [1 - 2^-9, 1 + 2^-8]: a draw below 1 - 2^-9 would round to 0.99609375, so it keeps 1.0."""
    out = bf16_dither(torch.ones(4000), torch.Generator().manual_seed(0))
    assert out.min() >= 1 - 2 ** -9 and out.max() < 1 + 2 ** -8
    assert torch.equal(out.to(torch.bfloat16), torch.ones(4000, dtype=torch.bfloat16))
    assert 0.1 < (out == 1.0).float().mean() < 0.45  # the draws below the narrow half: about a quarter
    assert (out > 1.0).float().mean() > 0.4


def test_dither_model_dithers_the_trainable_weights_by_seed_and_name():
    def model():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        m[1].weight.requires_grad_(False)  # frozen (e.g. LoRA's base weights): left alone
        m[2].weight.data.normal_()  # a norm runs in fp32 under autocast: left alone
        return m

    a, b = model(), model()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    assert dither_model(a, seed=3) == 8 * 8 + 8 + 8
    assert torch.equal(a[1].weight, before["1.weight"]) and torch.equal(a[2].weight, before["2.weight"])
    for k in ("0.weight", "0.bias", "1.bias"):
        assert not torch.equal(a.state_dict()[k], before[k])
        assert torch.equal(a.state_dict()[k].to(torch.bfloat16), before[k].to(torch.bfloat16))
    # the noise of a weight depends on the seed and its name, not on the order the parameters are met
    b.register_parameter("extra", torch.nn.Parameter(torch.randn(3)))
    dither_model(b, seed=3)
    for k in ("0.weight", "0.bias", "1.bias"):
        assert torch.equal(a.state_dict()[k], b.state_dict()[k])
    c = model()
    dither_model(c, seed=4)
    assert not torch.equal(c[0].weight, a[0].weight)


def test_bf16_dither_on_an_fp32_run_is_a_config_error(tiny, target, tmp_path):
    """``train.bf16_dither=true`` where the run resolves to fp32: refused by name before the model loads, exit 2."""
    from e2e import launch
    from test_engine_e2e import unlearn_args

    out = tmp_path / "run"
    p = launch("launch/train.py", unlearn_args(tiny, target, str(out), "grad_diff", 0,
                                               ["train.precision=fp32", "train.bf16_dither=true"]),
               nproc=1, check=False)
    assert p.returncode == 2
    assert "config error: train.bf16_dither=true applies to bf16 training" in p.stderr
    assert not (out / "model").exists()


@pytest.mark.parametrize("precision", ["bf16"])
def test_a_bf16_run_from_the_dithered_start_trains(tiny, target, tmp_path, precision):
    """One process, stage 0: the dithered bf16 run trains; its first step's terms equal the undithered bf16 run's (the
    same bf16 weights in every product at step 0; the tiny model's head is untied, so its embedding lookup is not
    dithered), and the weights it saves differ from that run's."""
    from e2e import launch, state, summary
    from test_engine_e2e import unlearn_args

    runs = {}
    for name, extra in (("plain", []), ("dither", ["train.bf16_dither=true"])):
        runs[name] = str(tmp_path / name)
        launch("launch/train.py", unlearn_args(tiny, target, runs[name], "grad_diff", 0,
                                               ["train.max_steps=2", f"train.precision={precision}", *extra]), nproc=1)
    plain, dither = summary(runs["plain"]), summary(runs["dither"])
    terms = [k for k in plain["first"] if k.startswith("loss/")]
    assert terms and all(dither["first"][k] == plain["first"][k] for k in terms)
    wa, wb = state(plain["model"]), state(dither["model"])
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
