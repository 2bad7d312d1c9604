"""Losses against plain-loop references (values and gradients, float32/float64) and hand-computed cases, among them
shi2024's within-modality loss and the degeneracy of its printed Eq. (2)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xmr.losses import (
    LOSSES,
    BarlowTwinsLoss,
    InfoNCELoss,
    SupervisedContrastiveLoss,
    TripletLoss,
    make_loss,
    printed_term_of_cosine,
)

# ----------------------------------------------------------------------------------------------------------
# Plain-loop references: one scalar at a time, straight from the equations. Each returns the same keys as
# the module it checks.
# ----------------------------------------------------------------------------------------------------------


def dot(a, b):
    total = 0.0
    for k in range(len(a)):
        total = total + a[k] * b[k]
    return total


def hinge(x):
    return x if x > 0 else x * 0  # [x]_+, still a tensor so that its (zero) gradient exists


def reference_triplet(image, text, margin, max_violation, reduction="sum"):
    batch = len(image)
    total_i2t, total_t2i = 0.0, 0.0
    for i in range(batch):
        positive = dot(image[i], text[i])
        # image i as the anchor against captions j; caption i as the anchor against images j
        costs_i2t = [hinge(margin - positive + dot(image[i], text[j])) for j in range(batch) if j != i]
        costs_t2i = [hinge(margin - positive + dot(image[j], text[i])) for j in range(batch) if j != i]
        if costs_i2t:
            total_i2t = total_i2t + (max(costs_i2t) if max_violation else sum(costs_i2t))
            total_t2i = total_t2i + (max(costs_t2i) if max_violation else sum(costs_t2i))
    scale = 1.0 if reduction == "sum" else 1.0 / batch
    return {"loss": (total_i2t + total_t2i) * scale, "loss_i2t": total_i2t * scale, "loss_t2i": total_t2i * scale}


def reference_infonce(image, text, temperature, exclude_positive=False):
    batch = len(image)
    directions = []
    for anchors, others in ((image, text), (text, image)):
        total = 0.0
        for i in range(batch):
            denominator = 0.0
            for j in range(batch):
                if not (exclude_positive and j == i):
                    denominator = denominator + torch.exp(dot(anchors[i], others[j]) / temperature)
            total = total - torch.log(torch.exp(dot(anchors[i], others[i]) / temperature) / denominator)
        directions.append(total / batch)
    return {"loss": (directions[0] + directions[1]) / 2, "loss_i2t": directions[0], "loss_t2i": directions[1]}


def reference_barlow(image, text, lambd, eps=1e-5):
    batch, dim = image.shape

    def standardise(x):
        columns = []
        for d in range(dim):
            mean = sum(x[b, d] for b in range(batch)) / batch
            variance = sum((x[b, d] - mean) ** 2 for b in range(batch)) / batch
            columns.append([(x[b, d] - mean) / torch.sqrt(variance + eps) for b in range(batch)])
        return columns  # columns[d][b]

    za, zb = standardise(image), standardise(text)
    on_diagonal, off_diagonal = 0.0, 0.0
    for i in range(dim):
        for j in range(dim):
            c = sum(za[i][b] * zb[j][b] for b in range(batch)) / batch
            if i == j:
                on_diagonal = on_diagonal + (1 - c) ** 2
            else:
                off_diagonal = off_diagonal + c ** 2
    return {"loss": on_diagonal + lambd * off_diagonal, "on_diagonal": on_diagonal, "off_diagonal": off_diagonal}


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64]
SIZES = [(batch, dim) for batch in (2, 5, 8) for dim in (3, 16)]
SIZES_WITH_ONE = [(1, 3), (1, 16)] + SIZES


def tolerance(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


def unit_pairs(batch, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator, dtype=dtype), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=generator, dtype=dtype), dim=-1)
    return image.requires_grad_(), text.requires_grad_()


def gradients(value, inputs):
    """d value / d inputs, zeros where value does not depend on an input (or is a plain number)."""
    if not (torch.is_tensor(value) and value.requires_grad):
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(value, inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def assert_matches_reference(module, reference, batch, dim, dtype):
    """Every key of the reference, and its gradient with respect to both inputs, equals the module's."""
    image, text = unit_pairs(batch, dim, dtype)
    ours = module(image, text)
    image_ref, text_ref = image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()
    theirs = reference(image_ref, text_ref)
    assert set(theirs) <= set(ours)
    for key, expected in theirs.items():
        expected_tensor = expected if torch.is_tensor(expected) else torch.tensor(expected, dtype=dtype)
        assert ours[key].dtype == dtype
        torch.testing.assert_close(ours[key], expected_tensor, **tolerance(dtype))
        for got, want in zip(gradients(ours[key], (image, text)), gradients(expected, (image_ref, text_ref))):
            # atol relative to the largest entry: a B = 2 batch norm has large, ill-conditioned gradients
            scale = max(1.0, float(want.abs().max()))
            torch.testing.assert_close(got, want, rtol=tolerance(dtype)["rtol"], atol=tolerance(dtype)["atol"] * scale)
    return theirs


def angles(*degrees):
    """2-D unit vectors at the given angles, one per row (float64)."""
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


COS30 = math.cos(math.pi / 6)

# ----------------------------------------------------------------------------------------------------------
# Against the references
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,dim", SIZES_WITH_ONE)
@pytest.mark.parametrize("max_violation", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_triplet_matches_loop_reference(dtype, batch, dim, max_violation, reduction):
    module = TripletLoss(margin=0.2, max_violation=max_violation, reduction=reduction)
    theirs = assert_matches_reference(module, lambda a, b: reference_triplet(a, b, 0.2, max_violation, reduction),
                                      batch, dim, dtype)
    if batch > 1:  # some hinge is active, so the gradient comparison is not between two zeros
        assert float(theirs["loss"].detach()) > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,dim", SIZES_WITH_ONE)
def test_infonce_matches_loop_reference(dtype, batch, dim):
    assert_matches_reference(InfoNCELoss(0.07), lambda a, b: reference_infonce(a, b, 0.07), batch, dim, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,dim", SIZES)
def test_literal_eq4_matches_loop_reference(dtype, batch, dim):
    module = InfoNCELoss(0.07, exclude_positive_from_denominator=True)
    assert_matches_reference(module, lambda a, b: reference_infonce(a, b, 0.07, exclude_positive=True),
                             batch, dim, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,dim", SIZES)
def test_barlow_twins_matches_loop_reference(dtype, batch, dim):
    assert_matches_reference(BarlowTwinsLoss(0.0051), lambda a, b: reference_barlow(a, b, 0.0051), batch, dim, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_learned_temperature_matches_loop_reference_including_its_gradient(dtype):
    module = InfoNCELoss(0.1, learn_temperature=True).to(dtype)
    with torch.no_grad():
        module.logit_scale.fill_(1.7)  # a value away from the initial one, below the cap
    image, text = unit_pairs(5, 16, dtype, seed=1)
    ours = module(image, text)["loss"]
    got = torch.autograd.grad(ours, (image, text, module.logit_scale))
    scale = torch.tensor(1.7, dtype=dtype, requires_grad=True)
    image_ref, text_ref = image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()
    theirs = reference_infonce(image_ref, text_ref, temperature=torch.exp(-scale))["loss"]
    torch.testing.assert_close(ours, theirs, **tolerance(dtype))
    for ours_grad, want in zip(got, torch.autograd.grad(theirs, (image_ref, text_ref, scale))):
        torch.testing.assert_close(ours_grad, want, **tolerance(dtype))
    assert float(got[2]) != 0


def test_gradcheck_in_float64():
    image, text = unit_pairs(4, 3, torch.float64, seed=3)
    for module in (TripletLoss(), TripletLoss(max_violation=True), TripletLoss(0.5, reduction="mean"),
                   InfoNCELoss(), InfoNCELoss(exclude_positive_from_denominator=True), BarlowTwinsLoss()):
        assert torch.autograd.gradcheck(lambda a, b, m=module: m(a, b)["loss"], (image, text))
    learned = InfoNCELoss(0.2, learn_temperature=True).double()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    call = lambda a, b, s: torch.func.functional_call(learned, {"logit_scale": s}, (a, b))["loss"]  # noqa: E731
    assert torch.autograd.gradcheck(call, (image, text, scale))


# ----------------------------------------------------------------------------------------------------------
# Triplet: hand-computed cases with 2-D unit vectors at chosen angles
# ----------------------------------------------------------------------------------------------------------


def test_triplet_two_pairs_at_0_and_90_degrees():
    pairs = angles(0, 90)  # image = caption: S = identity, positives 1, negatives 0
    for max_violation in (False, True):
        assert float(TripletLoss(0.2, max_violation)(pairs, pairs)["loss"]) == 0.0  # 0.2 - 1 + 0 < 0
        # Margin 1.5: every (anchor, negative) costs 1.5 - 1 + 0 = 0.5; one negative per anchor, so sum = max.
        losses = TripletLoss(1.5, max_violation)(pairs, pairs)
        assert float(losses["loss_i2t"]) == pytest.approx(1.0)  # 2 anchors x 0.5
        assert float(losses["loss_t2i"]) == pytest.approx(1.0)
        assert float(losses["loss"]) == pytest.approx(2.0)
        assert float(TripletLoss(1.5, max_violation, reduction="mean")(pairs, pairs)["loss"]) == pytest.approx(1.0)


def test_triplet_directions_hand_computed():
    # Images at 0 and 90 degrees; captions at 30 and 90 degrees. S = [[cos30, 0], [sin30, 1]].
    image, text = angles(0, 90), angles(30, 90)
    # Margin 0.2. i2t: image 0 vs caption 1: [0.2 - c30 + 0]_+ = 0; image 1 vs caption 0: [0.2 - 1 + 0.5]_+ = 0.
    # t2i: caption 0 vs image 1: [0.2 - c30 + 0.5]_+ = 0; caption 1 vs image 0: [0.2 - 1 + 0]_+ = 0.
    assert float(TripletLoss(0.2)(image, text)["loss"]) == pytest.approx(0.0)
    # Margin 0.6: i2t image 1: 0.6 - 1 + 0.5 = 0.1; t2i caption 0: 0.6 - c30 + 0.5 = 1.1 - c30 (the others 0).
    losses = TripletLoss(0.6)(image, text)
    assert float(losses["loss_i2t"]) == pytest.approx(0.1)
    assert float(losses["loss_t2i"]) == pytest.approx(1.1 - COS30)


def test_triplet_max_keeps_the_hardest_negative_only():
    pairs = angles(0, 60, 90)
    # S = [[1, .5, 0], [.5, 1, c30], [0, c30, 1]]. Margin 0.6, costs [0.6 - 1 + S_ij]_+ = [S_ij - 0.4]_+:
    # anchor 0: [0.1, 0]; anchor 1: [0.1, c30 - 0.4]; anchor 2: [0, c30 - 0.4]. S is symmetric: t2i = i2t.
    sums = TripletLoss(0.6)(pairs, pairs)
    maxes = TripletLoss(0.6, max_violation=True)(pairs, pairs)
    assert float(sums["loss_i2t"]) == pytest.approx(0.1 + (0.1 + COS30 - 0.4) + (COS30 - 0.4))
    assert float(maxes["loss_i2t"]) == pytest.approx(0.1 + (COS30 - 0.4) + (COS30 - 0.4))
    assert float(maxes["loss_t2i"]) == pytest.approx(float(maxes["loss_i2t"]))


def test_triplet_tied_hardest_negatives_count_once():
    pairs = angles(0, 60, -60)
    # Anchor 0: both negatives at cos 60 = 0.5 (a tie), costs [0.6 - 1 + 0.5]_+ = 0.1 each.
    # Anchors 1 and 2: negatives at 0.5 and cos 120 = -0.5: costs 0.1 and 0.
    assert float(TripletLoss(0.6)(pairs, pairs)["loss_i2t"]) == pytest.approx(0.2 + 0.1 + 0.1)
    assert float(TripletLoss(0.6, max_violation=True)(pairs, pairs)["loss_i2t"]) == pytest.approx(0.1 + 0.1 + 0.1)


def test_triplet_identical_embeddings():
    same = angles(0, 0, 0)  # every similarity 1: every cost is the margin
    # sum: 2 directions x 3 anchors x 2 negatives; max: 2 directions x 3 anchors
    assert float(TripletLoss(0.2)(same, same)["loss"]) == pytest.approx(2 * 3 * 2 * 0.2)
    assert float(TripletLoss(0.2, max_violation=True)(same, same)["loss"]) == pytest.approx(2 * 3 * 0.2)
    assert float(TripletLoss(0.2, max_violation=True, reduction="mean")(same, same)["loss"]) == pytest.approx(2 * 0.2)


def test_printed_sign_rewards_separating_positives():
    pairs = angles(0, 90)  # perfect retrieval: positives 1, negatives 0
    assert float(TripletLoss(0.2)(pairs, pairs)["loss"]) == 0.0
    # As printed: [0.2 - S_ij + S_ii]_+ = 1.2 for every (anchor, negative): 2 anchors x 2 directions.
    assert float(TripletLoss(0.2, printed_sign=True)(pairs, pairs)["loss"]) == pytest.approx(4 * 1.2)
    flipped = angles(180, 270)  # each caption opposite its image: positives at -1, the printed loss is happiest
    assert float(TripletLoss(0.2, printed_sign=True)(pairs, flipped)["loss"]) == 0.0
    assert float(TripletLoss(0.2)(pairs, flipped)["loss"]) == pytest.approx(4 * 1.2)


# ----------------------------------------------------------------------------------------------------------
# InfoNCE: hand-computed cases, the literal Eq. (4), the learned temperature
# ----------------------------------------------------------------------------------------------------------


def test_infonce_two_pairs_at_0_and_90_degrees():
    pairs = angles(0, 90)  # S = identity
    # tau = 0.5: logits [[2, 0], [0, 2]]; every anchor: -log(e^2 / (e^2 + e^0)) = log(1 + e^-2).
    losses = InfoNCELoss(0.5)(pairs, pairs)
    for key in ("loss", "loss_i2t", "loss_t2i"):
        assert float(losses[key]) == pytest.approx(math.log(1 + math.exp(-2)))
    # Literal Eq. (4): the denominator holds only the negative: -log(e^2 / e^0) = -2 for every anchor.
    literal = InfoNCELoss(0.5, exclude_positive_from_denominator=True)(pairs, pairs)
    assert float(literal["loss"]) == pytest.approx(-2.0)
    # ... and is unbounded below as the temperature shrinks (-1/tau), where the standard form tends to 0.
    assert float(InfoNCELoss(0.05, exclude_positive_from_denominator=True)(pairs, pairs)["loss"]) == pytest.approx(-20)
    assert 0 < float(InfoNCELoss(0.05)(pairs, pairs)["loss"]) < 1e-8


def test_literal_infonce_is_bounded_below_by_log_b_minus_1_minus_2_over_tau():
    """With unit embeddings S lies in [-1, 1], so each anchor's literal Eq. (4) term, -S_ii / tau +
    log sum_{j != i} exp(S_ij / tau), is at least -1/tau + log(B - 1) - 1/tau; antipodal pairs reach it."""
    tau = 0.5
    literal = InfoNCELoss(tau, exclude_positive_from_denominator=True)
    antipodal = angles(0, 180)  # S = [[1, -1], [-1, 1]]: B = 2, the bound is -2 / tau
    assert float(literal(antipodal, antipodal)["loss"]) == pytest.approx(-2 / tau)
    generator = torch.Generator().manual_seed(0)
    for batch in (2, 8, 64):
        image = torch.nn.functional.normalize(torch.randn(batch, 16, generator=generator), dim=1)
        text = torch.nn.functional.normalize(image + 0.3 * torch.randn(batch, 16, generator=generator), dim=1)
        assert float(literal(image, text)["loss"]) >= math.log(batch - 1) - 2 / tau


def test_infonce_directions_differ_and_ties_hand_computed():
    # Images at 0 and 90 degrees, captions at 0 and 45: S = [[1, r], [0, r]] with r = cos 45 = sin 45.
    image, text = angles(0, 90), angles(0, 45)
    r = math.sqrt(0.5)
    losses = InfoNCELoss(1.0)(image, text)
    # i2t rows: image 0 logits [1, r] (positive 1), image 1 logits [0, r] (positive r).
    i2t = ((math.log(math.e + math.exp(r)) - 1) + (math.log(1 + math.exp(r)) - r)) / 2
    # t2i columns: caption 0 logits [1, 0] (positive 1); caption 1 logits [r, r], a tie: -log(1/2).
    t2i = ((math.log(math.e + 1) - 1) + math.log(2)) / 2
    assert float(losses["loss_i2t"]) == pytest.approx(i2t)
    assert float(losses["loss_t2i"]) == pytest.approx(t2i)
    assert float(losses["loss"]) == pytest.approx((i2t + t2i) / 2)
    literal = InfoNCELoss(1.0, exclude_positive_from_denominator=True)(image, text)
    assert float(literal["loss_i2t"]) == pytest.approx(((r - 1) + (0 - r)) / 2)  # log e^{S_neg} - S_pos
    assert float(literal["loss_t2i"]) == pytest.approx(((0 - 1) + (r - r)) / 2)


def test_infonce_identical_embeddings():
    same = angles(0, 0, 0)  # all logits equal, whatever the temperature
    for temperature in (0.07, 1.0):
        assert float(InfoNCELoss(temperature)(same, same)["loss"]) == pytest.approx(math.log(3))  # uniform over 3
        literal = InfoNCELoss(temperature, exclude_positive_from_denominator=True)(same, same)
        assert float(literal["loss"]) == pytest.approx(math.log(2))  # uniform over the 2 negatives


def test_literal_eq4_differs_from_the_standard_form_by_log_one_minus_p():
    # Per anchor: standard = log(e^pos + N) - pos, literal = log(N) - pos, so the difference is
    # log(1 + e^pos / N) = -log(1 - p) with p the softmax probability of the positive.
    image, text = unit_pairs(6, 16, torch.float64, seed=2)
    standard = InfoNCELoss(0.07)(image, text)
    literal = InfoNCELoss(0.07, exclude_positive_from_denominator=True)(image, text)
    logits = (image @ text.T).detach() / 0.07
    for key, direction in (("loss_i2t", logits), ("loss_t2i", logits.T)):
        positive_probability = direction.softmax(dim=1).diagonal()
        expected = -torch.log1p(-positive_probability).mean()
        torch.testing.assert_close(standard[key] - literal[key], expected)
        assert float((standard[key] - literal[key]).detach()) > 1e-3


def test_learned_temperature_is_a_parameter_that_gets_a_gradient():
    fixed, learned = InfoNCELoss(0.07), InfoNCELoss(0.07, learn_temperature=True)
    assert list(fixed.parameters()) == [] and fixed.logit_scale is None and fixed.temperature == 0.07
    assert isinstance(learned.logit_scale, nn.Parameter)
    assert float(learned.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))
    assert learned.temperature == pytest.approx(0.07)
    image, text = unit_pairs(4, 3, torch.float32)
    torch.testing.assert_close(learned(image, text)["loss"], fixed(image, text)["loss"])
    learned(image, text)["loss"].backward()
    assert learned.logit_scale.grad is not None and float(learned.logit_scale.grad) != 0
    with torch.no_grad():
        learned.logit_scale -= 0.5  # the property reads the live parameter
    assert learned.temperature == pytest.approx(0.07 * math.exp(0.5), rel=1e-6)
    assert make_loss("infonce", temperature=0.05).temperature == 0.05  # icone2024's value


def test_learned_temperature_is_clamped_at_one_hundredth():
    image, text = unit_pairs(4, 3, torch.float32)
    learned = InfoNCELoss(0.07, learn_temperature=True)
    with torch.no_grad():
        learned.logit_scale.fill_(10.0)  # 1/tau = e^10, beyond CLIP's cap of 100
    assert learned.temperature == pytest.approx(0.01)
    loss = learned(image, text)["loss"]
    torch.testing.assert_close(loss, InfoNCELoss(0.01)(image, text)["loss"])
    loss.backward()
    assert float(learned.logit_scale.grad) == 0.0  # past the cap the scale gets no gradient
    learned.logit_scale.grad = None
    with torch.no_grad():
        learned.logit_scale.fill_(math.log(100) - 0.1)  # just below the cap: unclamped
    learned(image, text)["loss"].backward()
    assert float(learned.logit_scale.grad) != 0.0
    with pytest.raises(ValueError, match="clamped"):
        InfoNCELoss(0.005, learn_temperature=True)


# ----------------------------------------------------------------------------------------------------------
# Barlow Twins
# ----------------------------------------------------------------------------------------------------------

DECORRELATED = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)


def test_barlow_twins_perfectly_correlated_decorrelated_features_give_zero():
    # Two columns with zero mean, unit variance and no correlation; the text side is an affine copy: C = I.
    text = 3 * DECORRELATED + torch.tensor([5.0, -2.0], dtype=torch.float64)
    exact = BarlowTwinsLoss(lambd=1.0, eps=0.0)(DECORRELATED, text)
    assert float(exact["loss"]) == pytest.approx(0.0, abs=1e-12)
    assert float(BarlowTwinsLoss()(DECORRELATED, text)["loss"]) < 1e-9  # eps 1e-5 shrinks C_ii a little
    # Swapped columns: C = [[0, 1], [1, 0]] -> on-diagonal 2, off-diagonal 2 scaled by lambd.
    swapped = BarlowTwinsLoss(lambd=0.25, eps=0.0)(DECORRELATED, DECORRELATED.flip(1))
    assert float(swapped["on_diagonal"]) == pytest.approx(2.0)
    assert float(swapped["off_diagonal"]) == pytest.approx(2.0)
    assert float(swapped["loss"]) == pytest.approx(2.0 + 0.25 * 2.0)


def test_barlow_twins_lambd_scales_only_the_off_diagonal_term():
    image, text = unit_pairs(8, 16, torch.float64, seed=4)
    by_lambd = {lambd: BarlowTwinsLoss(lambd)(image, text) for lambd in (0.0, 0.0051, 1.0)}
    on, off = by_lambd[0.0]["on_diagonal"], by_lambd[0.0]["off_diagonal"]
    assert float(off.detach()) > 0
    torch.testing.assert_close(by_lambd[0.0]["loss"], on)
    for lambd, losses in by_lambd.items():
        torch.testing.assert_close(losses["on_diagonal"], on)
        torch.testing.assert_close(losses["off_diagonal"], off)
        torch.testing.assert_close(losses["loss"], on + lambd * off)


def test_barlow_twins_standardises_like_batchnorm_without_affine():
    image, text = unit_pairs(8, 16, torch.float64, seed=5)
    batch_norm = nn.BatchNorm1d(16, affine=False, eps=1e-5).double().train()
    correlation = batch_norm(image).T @ batch_norm(text) / 8
    on = (1 - correlation.diagonal()).pow(2).sum()
    off = correlation.pow(2).sum() - correlation.diagonal().pow(2).sum()
    losses = BarlowTwinsLoss(0.0051)(image, text)
    torch.testing.assert_close(losses["on_diagonal"], on)
    torch.testing.assert_close(losses["off_diagonal"], off)
    # Standardised per feature: a positive rescaling and a shift of any column leaves the loss unchanged.
    scale = torch.linspace(0.5, 4.0, 16, dtype=torch.float64)
    no_eps = BarlowTwinsLoss(0.0051, eps=0.0)
    torch.testing.assert_close(no_eps(image * scale + 1.5, text)["loss"], no_eps(image, text)["loss"])


# ----------------------------------------------------------------------------------------------------------
# Supervised contrastive loss (shi2024 Eqs. 2/4, the faithful reading) and the printed Eq. (2)
# ----------------------------------------------------------------------------------------------------------

def reference_supervised_contrastive(features, labels, temperature):
    """SupCon L_out (Khosla et al. 2020, Eq. 2), averaged over anchors that have a positive."""
    count = len(features)
    total, anchors = 0.0, 0
    for i in range(count):
        positives = [p for p in range(count) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = 0.0
        for a in range(count):
            if a != i:
                denominator = denominator + torch.exp(dot(features[i], features[a]) / temperature)
        anchor = 0.0
        for p in positives:
            anchor = anchor - torch.log(torch.exp(dot(features[i], features[p]) / temperature) / denominator)
        total, anchors = total + anchor / len(positives), anchors + 1
    return total / anchors if anchors else features.sum() * 0.0


def reference_printed(features, labels=None):
    """shi2024 Eq. (2) as printed: sum_i | Euclidean(F_i, F_{i+1}) + dot(F_i, F_{i+1}) | over consecutive set
    members."""
    total = 0.0
    for i in range(len(features) - 1):
        if labels is not None and labels[i] != labels[i + 1]:
            continue
        difference = features[i] - features[i + 1]
        total = total + torch.abs(torch.sqrt(dot(difference, difference)) + dot(features[i], features[i + 1]))
    return total


def unit_features(count, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(count, dim, generator=generator, dtype=dtype), dim=-1).requires_grad_()


def check_labelled_against(reference, loss, features, labels, dtype):
    """The loss and its gradient equal the reference's, on one (N, D) tensor with set labels."""
    ours = loss(features, labels)["loss"]
    copy = features.detach().clone().requires_grad_()
    theirs = reference(copy, labels)
    theirs = theirs if torch.is_tensor(theirs) else torch.tensor(theirs, dtype=dtype)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, theirs.to(dtype), **tolerance(dtype))
    (grad_ours,) = gradients(ours, (features,))
    (grad_theirs,) = gradients(theirs, (copy,))
    torch.testing.assert_close(grad_ours, grad_theirs, **tolerance(dtype))


LABEL_SETS = {
    "pairs": [0, 0, 1, 1, 2, 2],
    "captions of 2 images": [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    "an anchor without positive": [0, 0, 1, 2, 2, 3],
    "all one set": [4, 4, 4, 4],
    "no positives": [0, 1, 2],
    "one item": [0],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LABEL_SETS))
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_supervised_contrastive_matches_reference(dtype, name, temperature):
    labels = torch.tensor(LABEL_SETS[name])
    features = unit_features(len(labels), 5, dtype)
    check_labelled_against(lambda f, y: reference_supervised_contrastive(f, y, temperature),
                           SupervisedContrastiveLoss(temperature), features, labels, dtype)


def test_supervised_contrastive_hand_computed():
    # a = (1, 0) and b = (0, 1) share a label, c = (-1, 0) does not; temperature 1.
    loss = SupervisedContrastiveLoss(temperature=1.0)(angles(0, 90, 180), torch.tensor([0, 0, 1]))["loss"]
    anchor_a = math.log(1 + math.exp(-1))  # -log(e^0 / (e^0 + e^-1))
    anchor_b = math.log(2)  # -log(e^0 / (e^0 + e^0)); c has no positive and is not an anchor
    assert float(loss) == pytest.approx((anchor_a + anchor_b) / 2, abs=1e-12)


def test_supervised_contrastive_without_positives_is_zero_with_zero_gradient():
    features = unit_features(3, 4, torch.float64)
    loss = SupervisedContrastiveLoss()(features, torch.tensor([0, 1, 2]))["loss"]
    (gradient,) = torch.autograd.grad(loss, features)
    assert float(loss.detach()) == 0.0 and torch.equal(gradient, torch.zeros_like(gradient))


def test_supervised_contrastive_prefers_aligned_positives():
    loss = SupervisedContrastiveLoss(temperature=0.1)

    def with_positive_at(degrees):
        return float(loss(angles(0, degrees, 90), torch.tensor([0, 0, 1]))["loss"])

    assert with_positive_at(0) < with_positive_at(90) < with_positive_at(180)


def test_supervised_contrastive_needs_labels_and_checks_shapes():
    with pytest.raises(ValueError, match="labels"):
        SupervisedContrastiveLoss()(unit_features(3, 2, torch.float32))
    with pytest.raises(ValueError, match="shape"):
        SupervisedContrastiveLoss()(unit_features(3, 2, torch.float32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="temperature"):
        SupervisedContrastiveLoss(temperature=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LABEL_SETS))
def test_printed_formula_matches_reference(dtype, name):
    labels = torch.tensor(LABEL_SETS[name])
    features = unit_features(len(labels), 5, dtype, seed=1)
    check_labelled_against(reference_printed, SupervisedContrastiveLoss(printed_formula=True), features, labels,
                           dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_printed_formula_without_labels_uses_every_consecutive_pair(dtype):
    features = unit_features(6, 3, dtype, seed=2)
    check_labelled_against(lambda f, y: reference_printed(f), SupervisedContrastiveLoss(printed_formula=True),
                           features, None, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_printed_formula_is_degenerate(dtype):
    """Identical and opposite unit vectors cost the same: the printed loss cannot tell a positive pair from an
    opposite one; its per-pair maximum is in between, at cosine 1/2."""
    loss = SupervisedContrastiveLoss(printed_formula=True)
    labels = torch.tensor([0, 0])
    same = torch.tensor([[0.6, 0.8], [0.6, 0.8]], dtype=dtype)
    opposite = torch.tensor([[0.6, 0.8], [-0.6, -0.8]], dtype=dtype)
    assert float(loss(same, labels)["loss"]) == pytest.approx(1.0, abs=1e-12)
    assert float(loss(opposite, labels)["loss"]) == pytest.approx(1.0, abs=1e-12)
    cosines = torch.tensor([-1.0, 0.0, 0.5, 1.0], dtype=dtype)
    torch.testing.assert_close(printed_term_of_cosine(cosines),
                               torch.tensor([1.0, math.sqrt(2), 1.5, 1.0], dtype=dtype))
    # the SupCon reading separates the two cases
    supcon = SupervisedContrastiveLoss(temperature=0.1)
    negative = torch.tensor([[0.8, -0.6]], dtype=dtype)
    assert float(supcon(torch.cat([same, negative]), torch.tensor([0, 0, 1]))["loss"]) < float(
        supcon(torch.cat([opposite, negative]), torch.tensor([0, 0, 1]))["loss"])


def test_printed_formula_is_minimised_by_collapse():
    """Every term is at least 1 on the unit sphere, and all features on one point reach that minimum."""
    loss = SupervisedContrastiveLoss(printed_formula=True)
    features = unit_features(50, 8, torch.float64, seed=3)
    labels = torch.zeros(50, dtype=torch.long)
    collapsed = F.normalize(torch.ones(50, 8, dtype=torch.float64), dim=-1)
    assert float(loss(collapsed, labels)["loss"]) == pytest.approx(49.0, abs=1e-9)
    assert float(loss(features, labels)["loss"].detach()) > 49.0
    cosines = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    assert float(printed_term_of_cosine(cosines).min()) >= 1.0 - 1e-12


def test_printed_formula_gradient_is_finite_at_identical_features():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    loss = SupervisedContrastiveLoss(printed_formula=True)(features, torch.tensor([0, 0]))["loss"]
    (gradient,) = torch.autograd.grad(loss, features)
    assert torch.isfinite(gradient).all()


# ----------------------------------------------------------------------------------------------------------
# Edge cases, validation, registry
# ----------------------------------------------------------------------------------------------------------


def test_batch_of_one():
    one = angles(10)
    for max_violation in (False, True):
        assert float(TripletLoss(max_violation=max_violation)(one, one)["loss"]) == 0.0  # no negatives
    assert float(InfoNCELoss()(one, one)["loss"]) == pytest.approx(0.0)  # softmax over one candidate
    with pytest.raises(ValueError, match="at least 2"):
        InfoNCELoss(exclude_positive_from_denominator=True)(one, one)
    with pytest.raises(ValueError, match="at least 2"):
        BarlowTwinsLoss()(one, one)


@pytest.mark.parametrize("module", [TripletLoss(), InfoNCELoss(), BarlowTwinsLoss()], ids=type)
def test_input_validation(module):
    with pytest.raises(ValueError, match="same shape"):
        module(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="same shape"):
        module(torch.randn(4, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="same shape"):
        module(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="same shape"):
        module(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="non-empty"):
        module(torch.randn(0, 4), torch.randn(0, 4))


def test_constructor_validation():
    with pytest.raises(ValueError, match="reduction"):
        TripletLoss(reduction="none")
    for temperature in (0, -0.1):
        with pytest.raises(ValueError, match="temperature"):
            InfoNCELoss(temperature=temperature)
    with pytest.raises(ValueError, match="lambd"):
        BarlowTwinsLoss(lambd=-1.0)


def test_make_loss_builds_every_name_with_its_options():
    assert set(LOSSES) == {"sum_triplet", "max_triplet", "infonce", "barlow_twins"}
    image, text = unit_pairs(4, 3, torch.float32)
    for name in LOSSES:
        assert torch.isfinite(make_loss(name)(image, text)["loss"])
    assert make_loss("max_triplet").max_violation and not make_loss("sum_triplet").max_violation
    triplet = make_loss("sum_triplet", margin=0.3, reduction="mean")
    assert (triplet.margin, triplet.reduction) == (0.3, "mean")
    assert make_loss("infonce", learn_temperature=True).logit_scale.requires_grad
    assert make_loss("barlow_twins").lambd == 0.0051 and make_loss("barlow_twins", lambd=0.1).lambd == 0.1
    with pytest.raises(ValueError, match="max_violation"):
        make_loss("sum_triplet", max_violation=True)  # the name already says which
    with pytest.raises(TypeError):
        make_loss("infonce", margin=0.2)


def test_make_loss_rejects_an_unknown_name_and_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown loss 'clip'") as error:
        make_loss("clip")
    assert all(name in str(error.value) for name in LOSSES)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    image, text = unit_pairs(8, 16, torch.float64, seed=6)
    for module in (TripletLoss(), TripletLoss(max_violation=True), InfoNCELoss(),
                   InfoNCELoss(exclude_positive_from_denominator=True), InfoNCELoss(learn_temperature=True).double(),
                   BarlowTwinsLoss()):
        on_cpu = module(image, text)
        cpu_grads = torch.autograd.grad(on_cpu["loss"], (image, text))
        gpu_image, gpu_text = (x.detach().cuda().requires_grad_() for x in (image, text))
        on_gpu = module.cuda()(gpu_image, gpu_text)
        gpu_grads = torch.autograd.grad(on_gpu["loss"], (gpu_image, gpu_text))
        for key in on_cpu:
            torch.testing.assert_close(on_gpu[key].cpu(), on_cpu[key])
        for got, want in zip(gpu_grads, cpu_grads):
            torch.testing.assert_close(got.cpu(), want)
        module.cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.isfinite(module.cuda()(gpu_image.float(), gpu_text.float())["loss"])
        module.cpu()
