"""Losses against plain-loop references (values and gradients, float32/float64) and hand-computed cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from xmr.losses import BarlowTwinsLoss, InfoNCELoss, TripletLoss, make_loss


# ----------------------------------------------------------------------------------------------------------
# Plain-loop references: one scalar at a time, straight from the equations.
# ----------------------------------------------------------------------------------------------------------

def reference_triplet(image, text, margin, max_violation, reduction="sum"):
    batch = len(image)
    sim = lambda a, b: sum(a[k] * b[k] for k in range(len(a)))  # noqa: E731
    total_i2t, total_t2i = 0.0, 0.0
    for i in range(batch):
        positive = sim(image[i], text[i])
        costs_i2t = [max(0.0, margin - positive + sim(image[i], text[j])) for j in range(batch) if j != i]
        costs_t2i = [max(0.0, margin - positive + sim(image[j], text[i])) for j in range(batch) if j != i]
        reduce_negatives = max if max_violation else sum
        total_i2t = total_i2t + (reduce_negatives(costs_i2t) if costs_i2t else 0.0)
        total_t2i = total_t2i + (reduce_negatives(costs_t2i) if costs_t2i else 0.0)
    scale = 1.0 if reduction == "sum" else 1.0 / batch
    return (total_i2t + total_t2i) * scale


def reference_infonce(image, text, temperature, exclude_positive=False):
    batch = len(image)
    sim = lambda a, b: sum(a[k] * b[k] for k in range(len(a))) / temperature  # noqa: E731
    directions = []
    for anchors, others in ((image, text), (text, image)):
        total = 0.0
        for i in range(batch):
            candidates = [j for j in range(batch) if not (exclude_positive and j == i)]
            denominator = sum(torch.exp(sim(anchors[i], others[j])) for j in candidates)
            total = total - (sim(anchors[i], others[i]) - torch.log(denominator))
        directions.append(total / batch)
    return (directions[0] + directions[1]) / 2


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
    loss = 0.0
    for i in range(dim):
        for j in range(dim):
            c = sum(za[i][b] * zb[j][b] for b in range(batch)) / batch
            loss = loss + ((1 - c) ** 2 if i == j else lambd * c ** 2)
    return loss


def unit_pairs(batch, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator, dtype=dtype), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=generator, dtype=dtype), dim=-1)
    return image.requires_grad_(), text.requires_grad_()


def assert_matches_reference(module, reference, batch, dim, dtype):
    image, text = unit_pairs(batch, dim, dtype)
    ours = module(image, text)["loss"]
    grads = torch.autograd.grad(ours, (image, text))
    image_ref, text_ref = image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()
    theirs = reference(image_ref, text_ref)
    theirs_tensor = theirs if torch.is_tensor(theirs) else torch.tensor(theirs, dtype=dtype)
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, theirs_tensor.to(dtype), **tolerance)
    if theirs_tensor.requires_grad:
        ref_grads = torch.autograd.grad(theirs_tensor, (image_ref, text_ref))
        for got, expected in zip(grads, ref_grads):
            torch.testing.assert_close(got, expected, **tolerance)


DTYPES = [torch.float32, torch.float64]
SIZES = [(2, 3), (5, 16), (8, 3)]


# ----------------------------------------------------------------------------------------------------------
# Against the references
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,dim", SIZES)
@pytest.mark.parametrize("max_violation", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_triplet_matches_loop_reference(dtype, batch, dim, max_violation, reduction):
    module = TripletLoss(margin=0.2, max_violation=max_violation, reduction=reduction)
    assert_matches_reference(module, lambda a, b: reference_triplet(a, b, 0.2, max_violation, reduction),
                             batch, dim, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,dim", SIZES + [(1, 4)])
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


def test_gradcheck_in_float64():
    image, text = unit_pairs(4, 3, torch.float64, seed=3)
    for module in (TripletLoss(), TripletLoss(max_violation=True), InfoNCELoss(),
                   InfoNCELoss(exclude_positive_from_denominator=True), BarlowTwinsLoss()):
        assert torch.autograd.gradcheck(lambda a, b: module(a, b)["loss"], (image, text))


# ----------------------------------------------------------------------------------------------------------
# Hand-computed cases: 2-D unit vectors at chosen angles
# ----------------------------------------------------------------------------------------------------------

def angles(*degrees):
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


def test_triplet_hand_computed():
    # Images at 0 and 90 degrees; captions at 30 and 90 degrees. S = [[cos30, 0], [sin30, 1]].
    image, text = angles(0, 90), angles(30, 90)
    c30 = math.cos(math.pi / 6)
    # i2t: anchor 0: [0.2 - c30 + 0]_+ = 0; anchor 1: [0.2 - 1 + 0.5]_+ = 0.
    # t2i: caption 0 vs image 1: [0.2 - c30 + 0.5]_+ = 0; caption 1 vs image 0: [0.2 - 1 + 0]_+ = 0.
    assert float(TripletLoss(0.2)(image, text)["loss"]) == pytest.approx(0.0)
    # With margin 0.6: i2t anchor 1: 0.6 - 1 + 0.5 = 0.1; t2i caption 0: 0.6 - c30 + 0.5 = 1.1 - c30.
    losses = TripletLoss(0.6)(image, text)
    assert float(losses["loss_i2t"]) == pytest.approx(0.1)
    assert float(losses["loss_t2i"]) == pytest.approx(1.1 - c30)


def test_triplet_max_picks_the_hardest_negative_only():
    # Three pairs; for image 0 the negatives score 0.5 and 0 (captions at 60 and 90 degrees).
    image, text = angles(0, 60, 90), angles(0, 60, 90)
    sums = TripletLoss(0.6)(image, text)["loss_i2t"]
    maxes = TripletLoss(0.6, max_violation=True)(image, text)["loss_i2t"]
    # S = [[1, .5, 0], [.5, 1, c30], [0, c30, 1]] with c30 = cos 30 degrees. Margin 0.6, costs [0.6 - 1 + S_ij]_+:
    # anchor 0: [0.1, 0]; anchor 1: [0.1, c30 - 0.4]; anchor 2: [0, c30 - 0.4].
    c30 = math.cos(math.pi / 6)
    assert float(sums) == pytest.approx(0.1 + (0.1 + c30 - 0.4) + (c30 - 0.4))
    assert float(maxes) == pytest.approx(0.1 + (c30 - 0.4) + (c30 - 0.4))


def test_printed_sign_rewards_separating_positives():
    image, text = angles(0, 90), angles(0, 90)  # perfect retrieval: positives 1, negatives 0
    assert float(TripletLoss(0.2)(image, text)["loss"]) == 0.0
    # As printed: [0.2 - S_ij + S_ii]_+ = 1.2 for every (anchor, negative): 2 anchors x 2 directions.
    assert float(TripletLoss(0.2, printed_sign=True)(image, text)["loss"]) == pytest.approx(4 * 1.2)
    flipped = angles(0, 90), angles(180, 270)  # positives at -1: the printed loss is happiest here
    assert float(TripletLoss(0.2, printed_sign=True)(*flipped)["loss"]) == 0.0


def test_infonce_hand_computed_2x2():
    image, text = angles(0, 90), angles(0, 90)  # S = identity
    tau = 0.5
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    assert float(InfoNCELoss(tau)(image, text)["loss"]) == pytest.approx(expected)
    # Literal Eq. (4): the denominator holds only the negative: -(2 - 0) = -2 per anchor.
    assert float(InfoNCELoss(tau, exclude_positive_from_denominator=True)(image, text)["loss"]) == pytest.approx(-2.0)


def test_identical_embeddings_and_ties():
    same = angles(0, 0, 0)
    assert float(InfoNCELoss(0.1)(same, same)["loss"]) == pytest.approx(math.log(3))  # uniform over 3
    assert float(TripletLoss(0.2)(same, same)["loss"]) == pytest.approx(2 * 3 * 2 * 0.2)
    assert float(TripletLoss(0.2, max_violation=True)(same, same)["loss"]) == pytest.approx(2 * 3 * 0.2)


def test_batch_of_one():
    one = angles(10)
    assert float(TripletLoss()(one, one)["loss"]) == 0.0  # no negatives
    assert float(InfoNCELoss()(one, one)["loss"]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least one negative"):
        InfoNCELoss(exclude_positive_from_denominator=True)(one, one)
    with pytest.raises(ValueError, match="at least 2"):
        BarlowTwinsLoss()(one, one)


# ----------------------------------------------------------------------------------------------------------
# Temperature, Barlow Twins, registry, validation
# ----------------------------------------------------------------------------------------------------------

def test_learned_temperature_gets_gradient_and_is_clamped():
    image, text = unit_pairs(4, 3, torch.float32)
    loss = InfoNCELoss(0.07, learn_temperature=True)
    assert loss.temperature == pytest.approx(0.07)
    loss(image, text)["loss"].backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad != 0
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)  # 1/tau = e^10, beyond CLIP's cap of 100
    assert loss.temperature == pytest.approx(0.01)
    capped = InfoNCELoss(0.01)(image, text)["loss"]
    torch.testing.assert_close(loss(image, text)["loss"], capped)
    assert not any(p.requires_grad for p in InfoNCELoss(0.07).parameters())


def test_barlow_twins_perfect_decorrelated_pairs_give_zero():
    # Two columns that are standardised, uncorrelated, and identical across modalities: C = I.
    features = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    losses = BarlowTwinsLoss(lambd=1.0, eps=0.0)(features, features)
    assert float(losses["loss"]) == pytest.approx(0.0, abs=1e-12)
    # Swapped columns: C = [[0, 1], [1, 0]] -> on-diagonal 2, off-diagonal 2 scaled by lambd.
    swapped = BarlowTwinsLoss(lambd=0.25, eps=0.0)(features, features.flip(1))
    assert float(swapped["on_diagonal"]) == pytest.approx(2.0)
    assert float(swapped["loss"]) == pytest.approx(2.0 + 0.25 * 2.0)


def test_make_loss_names_and_errors():
    assert isinstance(make_loss("infonce", temperature=0.05), InfoNCELoss)
    assert make_loss("max_triplet").max_violation and not make_loss("sum_triplet").max_violation
    assert make_loss("barlow_twins").lambd == 0.0051
    with pytest.raises(ValueError, match="choose from"):
        make_loss("clip")


def test_shape_validation():
    with pytest.raises(ValueError, match="same shape"):
        InfoNCELoss()(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="same shape"):
        TripletLoss()(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="reduction"):
        TripletLoss(reduction="none")
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0)
