"""WGA, SatImp, UNDIAL and RMU (issue 28): the registry's terms equal open-unlearning's implementation -- value and
gradient on the same fixed tensors, its numbers transcribed below (open-unlearning is not imported) -- plus the hand
examples of the losses' docstrings.

The numbers were computed once by running open-unlearning's own loss code (locuslab/open-unlearning at d3d7cf9:
``compute_wga_loss``, ``compute_satimp_loss``, ``compute_undial_loss`` of ``src/trainer/utils.py`` and
``RMU.compute_activation_loss`` of ``src/trainer/unlearn/rmu.py``, the model's forward replaced by the tensors of
:func:`fixed`) in float32 with torch, gradients rounded to 8 decimals. RMU's forget term used the control vector
``palu_ds.losses.rmu_control_vector(4, 2.0, 0)`` = (1.0692010, 1.6551589, 0.1906275, 0.2844640) in place of
open-unlearning's unseeded ``torch.rand`` draw. UNDIAL: open-unlearning averages over every position and indexes
its onehot with the label, so it needs every position labelled (below V = 100 a -100 label is an IndexError); the
numbers are for such labels, where its mean and ours (over the answer tokens) coincide. RMU: open-unlearning
divides the [B] per-sequence sums by the [B, 1] token counts, a broadcast to [B, B] whose mean is
``mean_b(S_b) * mean_b(1 / n_b)`` instead of ``mean_b(S_b / n_b)``; the two agree when every sequence has as many
answer tokens, which the numbers' labels have (with the labels of :func:`fixed`, 3 and 2 tokens, it gives 0.9431993
for the retain term where the per-sequence mean is 1.0751009).
"""

import math

import pytest
import torch

from palu_ds import losses as L
from palu_ds.methods import StepInputs, get_method
from test_losses import _grad


def fixed(B=2, T=5, V=7):
    """Deterministic logits, reference logits and labels (prompt / padding = -100), no random generator."""
    i = torch.arange(B * T * V, dtype=torch.float64).reshape(B, T, V)
    logits = 2.5 * torch.sin(0.37 * i + 0.5) + 0.3 * torch.cos(1.3 * i)
    ref = 2.0 * torch.cos(0.23 * i - 0.2) + 0.5 * torch.sin(0.9 * i)
    labels = torch.tensor([[-100, -100, 3, 6, 1], [-100, 2, 0, -100, -100]])
    return logits.float(), ref.float(), labels


ALL_LABELLED = torch.tensor([[4, 1, 3, 6, 1], [5, 2, 0, 2, 6]])   # UNDIAL's case (see the module docstring)
EQUAL_COUNTS = torch.tensor([[-100, -100, 3, 6, 1], [-100, 2, 0, 5, -100]])   # RMU's case: 3 answer tokens each


def hidden_states(B=2, T=5, D=4):
    """RMU's fixed layer activations of the policy and of the reference."""
    i = torch.arange(B * T * D, dtype=torch.float64).reshape(B, T, D)
    return (1.5 * torch.sin(0.41 * i + 0.1)).float(), (1.2 * torch.cos(0.29 * i)).float()


OPEN_UNLEARNING = {  # (method, hyper-parameters): (loss, its gradient w.r.t. the logits / hidden states)
    ('wga', 1.0): (-0.32011666893959045, [
        [[0, 0, 0, 0, 0, 0, 0],
         [-0.0070643, -0.00318838, -0.00204716, 0.01443275, -0.00066174, -0.00053616, -0.00093502],
         [-0.00056469, -0.00130844, -0.00231076, -0.00458618, -0.01195533, -0.02579214, 0.04651755],
         [-0.02319578, 0.03728042, -0.00776512, -0.00418147, -0.00144375, -0.0004522, -0.00024209],
         [0, 0, 0, 0, 0, 0, 0]],
        [[-0.00619539, -0.0071433, 0.0335056, -0.01048112, -0.00669905, -0.00226647, -0.00072027],
         [0.04092449, -0.01050518, -0.00587308, -0.00311587, -0.00272219, -0.005113, -0.01359518],
         [0, 0, 0, 0, 0, 0, 0],
         [0, 0, 0, 0, 0, 0, 0],
         [0, 0, 0, 0, 0, 0, 0]],
    ]),
    ('wga', 2.0): (-0.08191531151533127, [
        [[0, 0, 0, 0, 0, 0, 0],
         [-0.00055309, -0.00024963, -0.00016028, 0.00112999, -5.181e-05, -4.198e-05, -7.321e-05],
         [-0.00020783, -0.00048156, -0.00085046, -0.00168792, -0.0044001, -0.00949266, 0.01712053],
         [-0.00574823, 0.0092386, -0.0019243, -0.00103623, -0.00035778, -0.00011206, -5.999e-05],
         [0, 0, 0, 0, 0, 0, 0]],
        [[-0.00131851, -0.00152024, 0.00713068, -0.0022306, -0.0014257, -0.00048235, -0.00015329],
         [0.01174451, -0.00301478, -0.00168546, -0.00089419, -0.00078121, -0.00146733, -0.00390154],
         [0, 0, 0, 0, 0, 0, 0],
         [0, 0, 0, 0, 0, 0, 0],
         [0, 0, 0, 0, 0, 0, 0]],
    ]),
    ('satimp', (5.0, 1.0)): (-0.0015035427641123533, [
        [[0, 0, 0, 0, 0, 0, 0],
         [-2.4e-07, -1.1e-07, -7e-08, 5e-07, -2e-08, -2e-08, -3e-08],
         [-6.55e-06, -1.517e-05, -2.679e-05, -5.318e-05, -0.00013863, -0.00029907, 0.00053939],
         [-6.58e-05, 0.00010576, -2.203e-05, -1.186e-05, -4.1e-06, -1.28e-06, -6.9e-07],
         [0, 0, 0, 0, 0, 0, 0]],
        [[-1e-05, -1.154e-05, 5.411e-05, -1.693e-05, -1.082e-05, -3.66e-06, -1.16e-06],
         [0.00019792, -5.081e-05, -2.84e-05, -1.507e-05, -1.317e-05, -2.473e-05, -6.575e-05],
         [0, 0, 0, 0, 0, 0, 0],
         [0, 0, 0, 0, 0, 0, 0],
         [0, 0, 0, 0, 0, 0, 0]],
    ]),
    ('satimp', (1.0, 2.0)): (-0.17962701618671417, [
        [[0, 0, 0, 0, 0, 0, 0],
         [-0.00600142, -0.00270867, -0.00173915, 0.01226124, -0.00056217, -0.00045549, -0.00079434],
         [-0.00022552, -0.00052255, -0.00092284, -0.00183157, -0.00477458, -0.01030055, 0.01857761],
         [-0.0131238, 0.02109267, -0.00439338, -0.00236581, -0.00081685, -0.00025585, -0.00013697],
         [0, 0, 0, 0, 0, 0, 0]],
        [[-0.00383898, -0.00442635, 0.02076179, -0.00649464, -0.00415108, -0.00140442, -0.00044632],
         [0.02080591, -0.00534081, -0.00298586, -0.0015841, -0.00138395, -0.00259944, -0.00691176],
         [0, 0, 0, 0, 0, 0, 0],
         [0, 0, 0, 0, 0, 0, 0],
         [0, 0, 0, 0, 0, 0, 0]],
    ]),
    ('undial', 10.0): (2.236210346221924, [
        [[-0.01646373, 0.01761046, -0.02332531, -0.00420772, 0.01360711, 0.01156224, 0.00121696],
         [0.01304171, -0.01496482, -0.01176835, 0.00978607, -0.00098425, 0.00068673, 0.00420291],
         [-0.01324326, -0.01858842, -0.021056, -0.01519296, 0.00041822, 0.02165857, 0.04600385],
         [0.05299956, 0.03097614, -0.00179418, -0.01342489, -0.01826787, -0.02112506, -0.02936371],
         [0, 0, 0, 0, 0, 0, 0]],
        [[-0.03028878, -0.02369837, 0.02660118, 0.01530399, 0.01238149, 0.00211519, -0.00241471],
         [0.03587204, 0.00757446, -0.00632492, -0.01152684, -0.01079934, -0.00871352, -0.00608189],
         [-0.00518033, -0.01268887, 0.00680891, -0.00816376, 0.01459334, 0.01366614, -0.00903543],
         [0.02935145, 0.00083793, -0.01208624, -0.01080053, -0.00567446, -0.0028866, 0.00125845],
         [0, 0, 0, 0, 0, 0, 0]],
    ]),
    ('undial', 1.0): (2.211461067199707, [
        [[-0.01347647, 0.00389581, -0.0185953, -0.00116552, 0.01512386, 0.01238822, 0.00182939],
         [0.01475373, -0.01336867, -0.01065821, 0.00484957, -0.00073677, 0.00082864, 0.00433169],
         [-0.01182247, -0.01650655, -0.01855699, -0.01289393, 0.00240741, 0.02387353, 0.033499],
         [0.05319848, 0.02645652, -0.0010212, -0.01255818, -0.0174757, -0.02032, -0.02827992],
         [0, 0, 0, 0, 0, 0, 0]],
        [[-0.02626467, -0.01999021, 0.01622626, 0.01658854, 0.01298672, 0.00249209, -0.00203872],
         [0.03234632, 0.00800614, -0.00578574, -0.01101032, -0.01032752, -0.00815366, -0.00507521],
         [-0.00469436, -0.01158823, -0.0018461, -0.00631535, 0.0162021, 0.01524139, -0.00699944],
         [0.02960167, 0.00116204, -0.01181164, -0.010651, -0.00560695, -0.00285092, 0.0001568],
         [0, 0, 0, 0, 0, 0, 0]],
    ]),
    ('rmu_retain', None): (1.70120108127594, [
        [[0, 0, 0, 0],
         [0, 0, 0, 0],
         [0.03858618, 0.01071037, -0.01185115, -0.02446249],
         [-0.02480399, -0.01327588, 0.00710625, 0.0313035],
         [0.05322764, 0.06692371, 0.06775093, 0.05334997]],
        [[0, 0, 0, 0],
         [-0.13954818, -0.15663671, -0.15243237, -0.12550123],
         [-0.07796444, -0.01534221, 0.05416414, 0.12084966],
         [0.17496276, 0.2082129, 0.21508801, 0.19376841],
         [0, 0, 0, 0]],
    ]),
    ('rmu_forget', 2.0): (2.684065818786621, [
        [[0, 0, 0, 0],
         [0, 0, 0, 0],
         [-0.1186195, -0.21341965, -0.12483259, -0.1480507],
         [-0.20823252, -0.23210227, -0.06948803, -0.02785274],
         [-0.04310502, -0.04941645, 0.1004744, 0.1012136]],
        [[0, 0, 0, 0],
         [-0.15069109, -0.23777422, -0.1374332, -0.14680862],
         [-0.19335371, -0.20605299, -0.03658615, 0.00644797],
         [-0.01309112, -0.0286644, 0.10852474, 0.09522786],
         [0, 0, 0, 0]],
    ]),
}


def _batch(labels):
    return {"input_ids": labels.clamp(min=0), "labels": labels, "attention_mask": torch.ones_like(labels)}


def _term(method, hp, logits, labels, ref=None, hidden=None, term="forget"):
    """The method's ``term`` on one batch (named forget or retain), and its gradient w.r.t. the logits/hidden."""
    m = get_method(method)
    leaf = (hidden if hidden is not None else logits).clone().requires_grad_()
    x = StepInputs(logits={term: leaf if hidden is None else logits}, batches={term: _batch(labels)},
                   ref={term: ref or {}}, hidden={term: leaf} if hidden is not None else {})
    value = m.term_fns[term](x, m.hparams(hp))
    (grad,) = torch.autograd.grad(value, leaf)
    return value, grad


def _check(got, key):
    value, grad = OPEN_UNLEARNING[key]
    assert got[0].item() == pytest.approx(value, rel=1e-6, abs=1e-9)
    torch.testing.assert_close(got[1], torch.tensor(grad), rtol=0, atol=2e-8)


# ------------------------------------------------------------------------------------------- equal to open-unlearning
@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_wga_equals_open_unlearning(beta):
    logits, _, labels = fixed()
    _check(_term("wga", {"beta": beta}, logits, labels), ("wga", beta))


@pytest.mark.parametrize("betas", [(5.0, 1.0), (1.0, 2.0)])
def test_satimp_equals_open_unlearning(betas):
    logits, _, labels = fixed()
    _check(_term("satimp", {"beta1": betas[0], "beta2": betas[1]}, logits, labels), ("satimp", betas))


@pytest.mark.parametrize("beta", [10.0, 1.0])
def test_undial_equals_open_unlearning(beta):
    """Exact from the resident reference logits, and from the cache's parts with kl_topk = V (target first)."""
    logits, ref, _ = fixed()
    labels = ALL_LABELLED
    _check(_term("undial", {"beta": beta}, logits, labels, ref={"logits": ref}), ("undial", beta))
    V = ref.shape[-1]
    rows, targets = ref[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1)
    ids = L.target_first_topk_ids(rows, targets, V)
    assert (ids[:, 0] == targets).all() and (ids.sort(-1).values == torch.arange(V)).all()
    packed = {"ans_ids": ids, "ans_logps": rows.log_softmax(-1).gather(1, ids)}
    _check(_term("undial", {"beta": beta, "kl_topk": V}, logits, labels, ref=packed), ("undial", beta))
    # fewer reference ids: the tail is one bucket, a lower bound of the exact cross-entropy
    few = {k: v[:, :3] for k, v in packed.items()}
    exact = _term("undial", {"beta": beta}, logits, labels, ref={"logits": ref})[0]
    assert _term("undial", {"beta": beta, "kl_topk": 3}, logits, labels, ref=few)[0] <= exact + 1e-6


def test_rmu_equals_open_unlearning():
    """Retain: the layer's activations against the reference's (packed at the answer tokens, labels != -100
    unshifted, as open-unlearning's mask); forget: against the seeded control vector of norm steering_coeff."""
    labels = EQUAL_COUNTS
    act, ref_act = hidden_states()
    mask = labels != -100
    _check(_term("rmu", {}, None, labels, ref={"hidden": ref_act[mask]}, hidden=act, term="retain"),
           ("rmu_retain", None))
    _check(_term("rmu", {"steering_coeff": 2.0}, None, labels, hidden=act), ("rmu_forget", 2.0))
    # unequal answer counts (3 and 2): the per-sequence mean, not open-unlearning's broadcast (module docstring)
    _, _, labels = fixed()
    mask = labels != -100
    d = ((act - ref_act) ** 2).mean(-1)
    per_seq = ((d * mask).sum(1) / mask.sum(1)).mean()
    got = _term("rmu", {}, None, labels, ref={"hidden": ref_act[mask]}, hidden=act, term="retain")[0]
    assert got.item() == pytest.approx(per_seq.item(), rel=1e-6) and got.item() == pytest.approx(1.0751009, rel=1e-6)
    assert (d * mask).sum(1).mean() * (1 / mask.sum(1)).mean() == pytest.approx(0.9431993, rel=1e-6)
    c = L.rmu_control_vector(4, 2.0, 0)
    assert c.norm().item() == pytest.approx(2.0) and torch.equal(c, L.rmu_control_vector(4, 2.0, 0))
    assert not torch.equal(c, L.rmu_control_vector(4, 2.0, 1))
    with pytest.raises(ValueError, match="hidden.*rows"):
        _term("rmu", {}, None, labels, ref={"hidden": ref_act[mask][1:]}, hidden=act, term="retain")


# ------------------------------------------------------------------------------------------- the docstrings' examples
def test_token_weighted_hand_values_and_gradients():
    half = torch.tensor([math.log(0.5)])
    assert L.wga_loss(half, 1.0).item() == pytest.approx(0.5 * math.log(0.5))
    assert _grad(lambda t: L.wga_loss(t, 1.0), half).item() == pytest.approx(0.5)      # p^beta
    assert L.satimp_loss(half, 5.0, 1.0).item() == pytest.approx(math.log(0.5) / 64)
    assert _grad(lambda t: L.satimp_loss(t, 5.0, 1.0), half).item() == pytest.approx(1 / 64)
    sure = torch.tensor([0.0])                                   # p = 1: SatImp's importance weight vanishes
    assert _grad(lambda t: L.satimp_loss(t, 1.0, 1.0), sure).item() == 0.0
    assert L.wga_loss(torch.tensor([-1.0]).bfloat16(), 1.0).dtype == torch.float32


def test_undial_hand_value_and_gradient():
    z, y = torch.zeros(1, 2), torch.tensor([0])
    ids, logps = torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]).log()
    assert L.undial_loss(z, y, ids, logps, math.log(3)).item() == pytest.approx(math.log(2), rel=1e-6)
    g = _grad(lambda t: L.undial_loss(t, y, ids, logps, math.log(3)), z)
    assert torch.allclose(g, torch.tensor([[0.25, -0.25]]))
    # column order does not matter: the target is found by id
    assert L.undial_loss(z, y, ids.flip(-1), logps, math.log(3)).item() == pytest.approx(math.log(2), rel=1e-6)
    assert L.target_first_topk_ids(torch.tensor([[0.1, 3.0, 2.0]]), torch.tensor([0]), 2).tolist() == [[0, 1]]


def test_rmu_distance_hand_value_and_gradient():
    h = torch.tensor([[1.0, 2.0]])
    assert L.rmu_distance(h, torch.zeros(2)).item() == pytest.approx(2.5)
    assert torch.allclose(_grad(lambda t: L.rmu_distance(t, torch.zeros(2)), h), torch.tensor([[1.0, 2.0]]))


def test_declarations():
    """What each new method declares (the generic checks of tests/test_methods.py run on them too)."""
    assert get_method("rmu").layer({}) == 7 and get_method("rmu").layer({"layer": 1}) == 1
    assert get_method("wga").layer({}) is None
    assert get_method("rmu").reference_parts_for("retain") == ("hidden",)
    assert get_method("undial").reference_parts_for("forget") == ("answer_topk",)
    assert get_method("undial").defaults["alpha"] == 0.0
    assert {k: get_method("satimp").defaults[k] for k in ("beta1", "beta2", "gamma", "alpha")} == \
        {"beta1": 5.0, "beta2": 1.0, "gamma": 1.0, "alpha": 0.1}
    assert dict(get_method("rmu").defaults) == {"steering_coeff": 2.0, "layer": 7, "gamma": 1.0, "alpha": 1.0,
                                                "control_seed": 0}
