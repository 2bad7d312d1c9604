"""CODER (coder2022): diversity (Eq. 3), DCL (Eqs. 4-5) and M-DCL (Eq. 6) against plain-loop references, the
momentum queue and update, the prototype head (Eq. 7), the model (Eq. 8) and run_coder's Outcome. k-means:
test_cluster.py."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xmr.data import CaptionInputs, PairedFeatures
from xmr.encoders import count_trainable_parameters, masked_mean, sort_regions
from xmr.methods.coder import (
    PAPER_ID,
    CODERSettings,
    ConceptBranch,
    DiversityContrastiveLoss,
    MomentumQueue,
    PrototypeClassificationLoss,
    build_coder_model,
    concept_adjacency,
    concept_cooccurrence,
    concept_word_vectors,
    diversity_scores,
    mine_concepts,
    momentum_encoder,
    momentum_update,
    raw_diversity,
    run_coder,
)
from xmr.outcome import Outcome
from xmr.results import paper_numbers
from xmr.train import RetrievalValidator, TrainConfig, fit

DTYPES = (torch.float32, torch.float64)
MU, GAMMA, EPS = 0.1, 0.3, 0.1


# --- plain-loop references -----------------------------------------------------------------------------------

def reference_sims(anchors, candidates):
    """S[n][q] = <a_n, c_q> as 0-d tensors built from explicit sums (autograd flows through them)."""
    return [[sum(anchors[n, k] * candidates[q, k] for k in range(anchors.shape[1])) for q in range(len(candidates))]
            for n in range(len(anchors))]


def reference_raw_diversity(values, eps=EPS):
    """Eq. (3) literally: SD = sqrt(E(S^2) - E(S)^2) over the negatives, div = 1 / sigmoid(eps / SD)."""
    if not values:
        return 1.0
    mean = sum(values) / len(values)
    sd = math.sqrt(max(0.0, sum(v * v for v in values) / len(values) - mean * mean))
    if sd < 1e-7:  # float round-off of E(S^2) - E(S)^2 for equal values
        return 1.0
    return 1.0 / (1.0 / (1.0 + math.exp(-eps / sd)))


def reference_direction(sims, bank_sims=None, bank_negatives=False, diversity=True, bank_diversity=True,
                        form="literal", alpha=2.0, constant=1.0):
    """One direction of Eq. (5) (Eq. (4) when diversity=False) with loops; the diversity is a constant.
    form="infonce_margin": mu * -log(exp(S_nn / t) / (exp(S_nn / t) + sum_q exp((S_nq + gamma) / t)))."""
    size = len(sims)
    if diversity:
        raw = [reference_raw_diversity([float(sims[n][q].detach()) for q in range(size) if q != n])
               for n in range(size)]
        div = [r / max(raw) for r in raw]
        if bank_sims is not None and len(bank_sims[0]) > 0 and bank_diversity:
            raw_bank = [reference_raw_diversity([float(s.detach()) for s in bank_sims[n]]) for n in range(size)]
            div = [(d + r / max(raw_bank)) / 2 for d, r in zip(div, raw_bank)]
    else:
        div = [constant] * size
    total = 0.0
    printed = form in ("literal", "multi_similarity")
    shift = -GAMMA if printed else GAMMA
    for n in range(size):
        t = MU * div[n]
        inside = 1.0 if printed else torch.exp(sims[n][n] / t)
        for q in range(size):
            if q != n:
                inside = inside + torch.exp((sims[n][q] + shift) / t)
        if bank_negatives:
            for value in bank_sims[n]:
                inside = inside + torch.exp((value + shift) / t)
        if form == "literal":
            total = total + torch.log(torch.as_tensor(inside)) - torch.log(1 + sims[n][n])
        elif form == "multi_similarity":  # MS: (1/alpha) log(1 + exp(-alpha (S_nn - lambda))), lambda = gamma
            pull = torch.log(1 + torch.exp(-alpha * (sims[n][n] - GAMMA))) / alpha
            total = total + torch.log(torch.as_tensor(inside)) + pull / MU
        else:
            total = total - torch.log(torch.exp(sims[n][n] / t) / inside)
    return MU * total / size


def transpose(rows):
    return [list(column) for column in zip(*rows)]


def _unit(generator, dtype, rows, dim=4):
    leaf = torch.randn(rows, dim, generator=generator, dtype=dtype, requires_grad=True)
    return leaf, F.normalize(leaf, dim=1)


def _grads(value, leaves):
    return torch.autograd.grad(value, leaves, retain_graph=True)


# --- diversity (Eq. 3) -----------------------------------------------------------------------------------------

def test_diversity_hand_computed():
    sims = torch.tensor([[0.9, 0.5, -0.5], [0.1, 0.8, 0.1], [0.3, 0.3, 0.7]], dtype=torch.float64)
    # Row 0: negatives {0.5, -0.5}, SD 0.5; rows 1 and 2: two equal negatives, SD 0 (the least diverse).
    raw = raw_diversity(sims, eps=0.1)
    expected_top = 1 / (1 / (1 + math.exp(-0.1 / 0.5)))
    torch.testing.assert_close(raw, torch.tensor([expected_top, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(diversity_scores(sims), torch.tensor([1.0, 1 / expected_top, 1 / expected_top],
                                                                    dtype=torch.float64))


def test_diversity_is_detached_bounded_and_handles_no_negatives(generator):
    sims = torch.randn(6, 6, generator=generator, requires_grad=True).tanh()
    div = diversity_scores(sims)
    assert not div.requires_grad and div.max() == 1 and bool((div > 0.5).all())
    assert raw_diversity(torch.tensor([[0.3]])).item() == 1.0  # a batch of one: no negatives, the minimum


# --- DCL (Eqs. 4-5) ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("diversity", [True, False])
@pytest.mark.parametrize("form", DiversityContrastiveLoss.FORMS)
def test_dcl_matches_loop_reference(generator, dtype, diversity, form):
    image_leaf, image = _unit(generator, dtype, 5)
    text_leaf, text = _unit(generator, dtype, 5)
    loss = DiversityContrastiveLoss(MU, GAMMA, EPS, diversity=diversity, form=form)
    out = loss(image, text)
    sims = reference_sims(image, text)
    ref_i2t = reference_direction(sims, diversity=diversity, form=form)
    ref_t2i = reference_direction(transpose(sims), diversity=diversity, form=form)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(out["loss_i2t"], ref_i2t.to(dtype), **tol)
    torch.testing.assert_close(out["loss_t2i"], ref_t2i.to(dtype), **tol)
    torch.testing.assert_close(out["loss"], out["loss_i2t"] + out["loss_t2i"])
    for got, want in zip(_grads(out["loss"], (image_leaf, text_leaf)),
                         _grads(ref_i2t + ref_t2i, (image_leaf, text_leaf))):
        torch.testing.assert_close(got, want, **tol)


def test_explicit_diversity_changes_the_loss_and_the_implicit_form_ignores_it(generator):
    image = F.normalize(torch.randn(6, 4, generator=generator, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(6, 4, generator=generator, dtype=torch.float64), dim=1)
    explicit = DiversityContrastiveLoss(diversity=True)(image, text)["loss"]
    implicit = DiversityContrastiveLoss(diversity=False)(image, text)["loss"]
    assert not torch.isclose(explicit, implicit)


@pytest.mark.parametrize("dtype", DTYPES)
def test_diversity_one_equals_eq4(dtype):
    # Pairs at equally spaced angles: every anchor sees the same negative similarities, so every normalised
    # diversity is exactly 1 and Eq. (5) reduces to Eq. (4).
    angles = torch.arange(6, dtype=dtype) * (2 * math.pi / 6)
    image = torch.stack([angles.cos(), angles.sin()], dim=1)
    text = torch.stack([(angles + 0.2).cos(), (angles + 0.2).sin()], dim=1)
    sims = image @ text.T
    torch.testing.assert_close(diversity_scores(sims), torch.ones(6, dtype=dtype))
    explicit = DiversityContrastiveLoss(diversity=True)(image, text)
    implicit = DiversityContrastiveLoss(diversity=False)(image, text)
    for name in ("loss", "loss_i2t", "loss_t2i"):
        torch.testing.assert_close(explicit[name], implicit[name])
    # A batch of two has one negative per anchor: SD = 0 for every anchor, so div = 1 as well.
    pair = DiversityContrastiveLoss(diversity=True)(image[:2], text[:2])
    torch.testing.assert_close(pair["loss"], DiversityContrastiveLoss(diversity=False)(image[:2], text[:2])["loss"])


def test_dcl_hand_computed_two_pairs():
    theta = math.pi / 3
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    text = torch.tensor([[1.0, 0.0], [math.cos(theta), math.sin(theta)]], dtype=torch.float64)
    # S = [[1, cos 60], [0, sin 60]]; one negative per anchor, so div = 1 (SD = 0).
    i2t = MU / 2 * (math.log(1 + math.exp((0.5 - GAMMA) / MU)) - math.log(2)
                    + math.log(1 + math.exp((0.0 - GAMMA) / MU)) - math.log(1 + math.sqrt(3) / 2))
    t2i = MU / 2 * (math.log(1 + math.exp((0.0 - GAMMA) / MU)) - math.log(2)
                    + math.log(1 + math.exp((0.5 - GAMMA) / MU)) - math.log(1 + math.sqrt(3) / 2))
    out = DiversityContrastiveLoss()(image, text)
    assert out["loss_i2t"].item() == pytest.approx(i2t, rel=1e-12)
    assert out["loss_t2i"].item() == pytest.approx(t2i, rel=1e-12)
    assert out["loss_i2t"].item() == pytest.approx(0.042927, abs=1e-5)  # the numbers, worked by hand


@pytest.mark.parametrize("dtype", DTYPES)
def test_dcl_is_finite_at_opposite_positives(dtype):
    # S_nn = -1: log(1 + S_nn) = -inf unless clamped; value and gradient must stay finite.
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=dtype, requires_grad=True)
    text = torch.tensor([[-1.0, 0.0], [0.0, -1.0], [0.0, 1.0]], dtype=dtype, requires_grad=True)
    for diversity in (True, False):
        out = DiversityContrastiveLoss(diversity=diversity)(image, text)
        assert all(bool(torch.isfinite(value)) for value in out.values())
        grads = torch.autograd.grad(out["loss"], (image, text))
        assert all(bool(torch.isfinite(grad).all()) for grad in grads)
    # The clamp is log(positive_floor) times mu per opposite anchor.
    alone = DiversityContrastiveLoss(positive_floor=1e-6)(image[:1], text[:1])
    assert alone["loss_i2t"].item() == pytest.approx(-MU * math.log(1e-6), rel=1e-5)


def test_batch_of_one_is_the_positive_term_only():
    image = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    text = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    out = DiversityContrastiveLoss()(image, text)
    assert out["loss_i2t"].item() == pytest.approx(-MU * math.log(1.6))
    assert out["loss"].item() == pytest.approx(-2 * MU * math.log(1.6))


@pytest.mark.parametrize("bank_diversity", [True, False])
def test_banks_enter_only_the_diversity_of_the_in_batch_loss(generator, bank_diversity):
    _, image = _unit(generator, torch.float64, 4)
    _, text = _unit(generator, torch.float64, 4)
    _, image_bank = _unit(generator, torch.float64, 7)
    _, text_bank = _unit(generator, torch.float64, 7)
    loss = DiversityContrastiveLoss(bank_diversity=bank_diversity)
    out = loss(image, text, image_bank, text_bank)
    sims = reference_sims(image, text)
    ref_i2t = reference_direction(sims, reference_sims(image, text_bank), bank_diversity=bank_diversity)
    ref_t2i = reference_direction(transpose(sims), reference_sims(text, image_bank), bank_diversity=bank_diversity)
    torch.testing.assert_close(out["loss_i2t"], ref_i2t)
    torch.testing.assert_close(out["loss_t2i"], ref_t2i)
    without_banks = loss(image, text)["loss"]
    assert torch.isclose(out["loss"], without_banks) != bank_diversity


# --- M-DCL (Eq. 6) ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", DiversityContrastiveLoss.FORMS)
def test_memory_dcl_matches_loop_reference(generator, dtype, form):
    image_leaf, image = _unit(generator, dtype, 4)
    text_leaf, text = _unit(generator, dtype, 4)
    _, image_keys = _unit(generator, dtype, 4)
    _, text_keys = _unit(generator, dtype, 4)
    _, image_bank = _unit(generator, dtype, 6)
    _, text_bank = _unit(generator, dtype, 6)
    loss = DiversityContrastiveLoss(form=form)
    out = loss.with_memory(image, text, image_keys, text_keys, image_bank, text_bank)
    image_keys, text_keys, image_bank, text_bank = (t.detach() for t in (image_keys, text_keys, image_bank, text_bank))
    ref_i2t = reference_direction(reference_sims(image, text_keys), reference_sims(image, text_bank), True, form=form)
    ref_t2i = reference_direction(reference_sims(text, image_keys), reference_sims(text, image_bank), True, form=form)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(out["loss_i2t"], ref_i2t.to(dtype), **tol)
    torch.testing.assert_close(out["loss_t2i"], ref_t2i.to(dtype), **tol)
    for got, want in zip(_grads(out["loss"], (image_leaf, text_leaf)),
                         _grads(ref_i2t + ref_t2i, (image_leaf, text_leaf))):
        torch.testing.assert_close(got, want, **tol)


def test_memory_dcl_with_an_empty_bank_is_the_in_batch_loss(generator):
    _, image = _unit(generator, torch.float64, 5)
    _, text = _unit(generator, torch.float64, 5)
    empty = torch.zeros(0, 4, dtype=torch.float64)
    loss = DiversityContrastiveLoss()
    memory = loss.with_memory(image, text, image.detach(), text.detach(), empty, empty)
    in_batch = loss(image, text)
    for name in ("loss", "loss_i2t", "loss_t2i"):
        torch.testing.assert_close(memory[name], in_batch[name])


def test_same_image_candidates_are_not_negatives(generator):
    _, image = _unit(generator, torch.float64, 4)
    _, text = _unit(generator, torch.float64, 4)
    _, image_bank = _unit(generator, torch.float64, 5)
    _, text_bank = _unit(generator, torch.float64, 5)
    loss = DiversityContrastiveLoss()
    # Pairs 0 and 1 are two captions of image 7; bank entries 2 and 4 also belong to images in the batch.
    pair_ids, bank_ids = torch.tensor([7, 7, 8, 9]), torch.tensor([1, 2, 7, 3, 9])
    masked = loss.with_memory(image, text, image, text, image_bank, text_bank, pair_ids, bank_ids)
    # The same loss on explicit masks, built by loops.
    batch_mask = torch.tensor([[pair_ids[i] != pair_ids[j] for j in range(4)] for i in range(4)])
    bank_mask = torch.tensor([[pair_ids[i] != bank_ids[j] for j in range(5)] for i in range(4)])
    i2t, _ = loss.direction(image @ text.T, image @ text_bank.T, True, batch_mask, bank_mask)
    torch.testing.assert_close(masked["loss_i2t"], i2t)
    # Masking only removes negatives: every anchor's term can only drop.
    plain = loss.with_memory(image, text, image, text, image_bank, text_bank)
    assert masked["loss"] < plain["loss"]
    # With all ids distinct (and nothing shared with the bank) it is the plain loss.
    distinct = loss.with_memory(image, text, image, text, image_bank, text_bank, torch.arange(4),
                                torch.arange(10, 15))
    torch.testing.assert_close(distinct["loss"], plain["loss"])


def test_memory_dcl_sends_no_gradient_to_keys_or_banks(generator):
    _, image = _unit(generator, torch.float32, 3)
    _, text = _unit(generator, torch.float32, 3)
    others = [torch.randn(n, 4, generator=generator, requires_grad=True) for n in (3, 3, 5, 5)]
    out = DiversityContrastiveLoss().with_memory(image, text, *[F.normalize(o, dim=1) for o in others])
    out["loss"].backward()
    assert all(other.grad is None for other in others)


# --- the momentum queue and update ----------------------------------------------------------------------------

def test_queue_is_fifo_and_wraps_around():
    queue = MomentumQueue(size=5, dim=2)
    assert len(queue) == 0 and queue.contents().shape == (0, 2)
    rows = torch.arange(16.0).view(8, 2)  # key i is [2i, 2i + 1]
    queue.enqueue(rows[:3])
    torch.testing.assert_close(queue.contents(), rows[:3])
    queue.enqueue(rows[3:7])  # 7 keys into 5 slots: keys 0 and 1 leave first
    assert len(queue) == 5
    torch.testing.assert_close(queue.contents(), rows[2:7])
    queue.enqueue(rows[7:8])
    torch.testing.assert_close(queue.contents(), rows[3:8])
    queue.enqueue(torch.arange(28.0, 42.0).view(7, 2), torch.arange(14, 21))  # a batch larger than the queue
    torch.testing.assert_close(queue.contents(), torch.arange(32.0, 42.0).view(5, 2))  # keeps its last 5 keys
    assert queue.ids().tolist() == [16, 17, 18, 19, 20]
    queue.enqueue(rows[:2])  # keys without ids get -1
    assert queue.ids().tolist() == [18, 19, 20, -1, -1]


def test_queue_holds_no_gradient_and_survives_an_update_before_backward(generator):
    queue = MomentumQueue(size=4, dim=3)
    queue.enqueue(torch.randn(4, 3, generator=generator))
    features = torch.randn(2, 3, generator=generator, requires_grad=True)
    bank = queue.contents()
    value = (features @ bank.T).sum()
    queue.enqueue(features * 2)  # the MoCo order: loss, enqueue, then backward
    value.backward()  # the bank used by the loss is a copy: no in-place error
    assert not queue.keys.requires_grad and not bank.requires_grad
    assert features.grad is not None
    assert {"keys", "pointer", "filled"} <= set(queue.state_dict())  # checkpointed with the model


def test_momentum_update_formula_and_frozen_key_encoder(generator):
    query = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    key = momentum_encoder(query)
    assert all(not p.requires_grad for p in key.parameters())
    assert all(p.requires_grad for p in query.parameters())
    with torch.no_grad():
        for p in query.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
        query[1].running_mean.fill_(0.7)
    before = [p.clone() for p in key.parameters()]
    momentum_update(key, query, momentum=0.995)
    for old, new, q in zip(before, key.parameters(), query.parameters()):
        torch.testing.assert_close(new, 0.995 * old + 0.005 * q)
    torch.testing.assert_close(key[1].running_mean, torch.full((4,), 0.7))
    momentum_update(key, query, momentum=0.0)  # m = 0 copies the query encoder
    for new, q in zip(key.parameters(), query.parameters()):
        torch.testing.assert_close(new, q)


# --- the prototype head (Eq. 7) ------------------------------------------------------------------------------

def test_prototype_loss_matches_loop_reference(generator):
    image = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    text = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 2])
    loss = PrototypeClassificationLoss(dim=3, num_clusters=3).double()
    out = loss(image, text, labels)
    weight = loss.head.weight
    assert loss.head.bias is None and weight.shape == (3, 3)

    def reference(features):
        total = 0.0
        for i in range(len(labels)):
            logits = [sum(weight[k, d] * features[i, d] for d in range(3)) for k in range(3)]
            total = total - torch.log(torch.exp(logits[int(labels[i])]) / sum(torch.exp(x) for x in logits))
        return total / len(labels)

    ref_image, ref_text = reference(image), reference(text)
    torch.testing.assert_close(out["loss_image"], ref_image)
    torch.testing.assert_close(out["loss_text"], ref_text)
    for got, want in zip(torch.autograd.grad(out["loss"], (image, text, weight)),
                         torch.autograd.grad(ref_image + ref_text, (image, text, weight))):
        torch.testing.assert_close(got, want)


# --- the concept branch (Eq. 2) ---------------------------------------------------------------------------------

CAPTIONS = ["A dog runs on the grass", "a dog and a cat", "The cat sleeps", "two dogs run on grass",
            "a red ball on the grass"]


def test_concepts_are_the_most_frequent_content_words():
    assert mine_concepts(CAPTIONS, size=3) == ["grass", "cat", "dog"]  # grass in 3 captions; cat, dog in 2
    assert "the" not in mine_concepts(CAPTIONS, size=100) and "a" not in mine_concepts(CAPTIONS, size=100)


def test_cooccurrence_and_adjacency_match_loops():
    concepts = ["grass", "cat", "dog", "run"]
    counts, together = concept_cooccurrence(CAPTIONS, concepts)
    words = [set(caption.lower().split()) for caption in CAPTIONS]
    for i, a in enumerate(concepts):
        assert counts[i] == sum(a in w for w in words)
        for j, b in enumerate(concepts):
            assert together[i, j] == sum(a in w and b in w for w in words)
    adjacency = concept_adjacency(CAPTIONS, concepts, threshold=0.5).double()
    edges = torch.zeros(4, 4, dtype=torch.float64)
    for i in range(4):
        for j in range(4):
            passes = lambda x, y: counts[x] > 0 and together[x, y] / counts[x] >= 0.5  # noqa: E731
            edges[i, j] = 1.0 if i == j or passes(i, j) or passes(j, i) else 0.0
    degree = edges.sum(1)
    expected = torch.tensor([[edges[i, j] / math.sqrt(degree[i] * degree[j]) for j in range(4)] for i in range(4)])
    torch.testing.assert_close(adjacency, expected.double(), rtol=1e-6, atol=1e-7)
    assert edges[0, 2] == 1 and edges[1, 0] == 0  # P(grass | dog) = 1/2 passes; cat and grass never co-occur


def test_softmax_query_is_a_convex_combination_of_concepts(generator):
    branch = ConceptBranch(torch.randn(5, 7, generator=generator), torch.eye(5), image_dim=6, text_dim=4,
                           embed_dim=3, smoothness=2.0)
    images = torch.randn(4, 6, generator=generator)
    concepts = branch.concept_features()  # (5, 3)
    scores = branch.scores(branch.image_query(images), branch.image_bilinear, concepts)
    torch.testing.assert_close(scores.sum(1), torch.ones(4))
    for b in range(4):
        query = branch.image_bilinear(branch.image_query(images[b:b + 1]))[0]
        logits = [2.0 * float((query @ concepts[i]).detach()) for i in range(5)]
        weights = [math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]
        expected = sum(w * concepts[i] for i, w in enumerate(weights))
        torch.testing.assert_close(branch.encode_image(images)[b], expected, rtol=1e-5, atol=1e-6)


def test_concept_word_vectors_are_minilm_input_embeddings():
    from xmr.encoders import TextBackbone

    backbone = TextBackbone()
    vectors = concept_word_vectors(["dog", "skateboarding"], backbone)
    table = backbone.model.embeddings.word_embeddings.weight
    assert vectors.shape == (2, 384)
    torch.testing.assert_close(vectors[0], table[backbone.tokenizer.convert_tokens_to_ids("dog")])
    pieces = backbone.tokenizer("skateboarding", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(vectors[1], table[torch.tensor(pieces)].mean(0))


# --- the model: Eq. (8), fusion, training with fit ------------------------------------------------------------

COLOURS, ANIMALS = ["red", "blue", "green"], ["dog", "cat", "horse", "bird"]


def _toy_split(generator, num_images=24, per_image=5):
    """Images (N, 16) and captions (5N, 8) that share a class signal, and captions naming it."""
    classes = torch.arange(num_images) % 12
    image_basis, text_basis = torch.randn(12, 16, generator=generator), torch.randn(12, 8, generator=generator)
    image = image_basis[classes] + 0.3 * torch.randn(num_images, 16, generator=generator)
    text = text_basis[classes].repeat_interleave(per_image, 0) + 0.3 * torch.randn(num_images * per_image, 8,
                                                                                   generator=generator)
    captions = [f"a {COLOURS[int(c) % 3]} {ANIMALS[int(c) % 4]} on grass number {k}" for c in classes
                for k in range(per_image)]
    return image, text, captions


def _toy_model(generator, captions, **overrides):
    options = dict(embed_dim=8, queue_size=20, num_concepts=6, num_clusters=4, kmeans_iterations=5)
    settings = CODERSettings(**{**options, **overrides})
    words = None if not settings.concepts else torch.randn(6, 5, generator=generator)
    return build_coder_model(settings, captions, image_dim=16, text_dim=8, word_vectors=words)


def test_fused_similarity_is_beta_instance_plus_concept(generator):
    image, text, captions = _toy_split(generator)
    model = _toy_model(generator, captions).eval()
    fused = model.encode_image(image[:4]) @ model.encode_text(text[:6]).T
    v, w = model.encode_instances(image[:4], text[:6])
    vc = F.normalize(model.concept_branch.encode_image(image[:4]), dim=-1)
    wc = F.normalize(model.concept_branch.encode_text(text[:6]), dim=-1)
    torch.testing.assert_close(fused, 0.9 * v @ w.T + 0.1 * vc @ wc.T)
    plain = _toy_model(generator, captions, concepts=False, prototypes=False).eval()
    torch.testing.assert_close(plain.encode_image(image[:2]), plain.encode_instances(image[:2], text[:2])[0])


def test_objective_is_eq8_and_the_first_step_sees_an_empty_bank(generator):
    image, text, captions = _toy_split(generator)
    model = _toy_model(generator, captions, prototypes=False)
    batch = {"image": image[:6], "text": text[:30:5], "image_index": torch.arange(6)}
    losses = model.training_losses(batch)
    assert set(losses) == {"loss", "dcl_instance", "m_dcl", "dcl_concept"}
    torch.testing.assert_close(losses["loss"], 3 * losses["dcl_instance"] + losses["m_dcl"] + losses["dcl_concept"])
    # At the first step the key heads equal the query heads and the banks are empty: M-DCL = in-batch DCL.
    torch.testing.assert_close(losses["m_dcl"], losses["dcl_instance"])
    assert len(model.image_queue) == 6 and len(model.text_queue) == 6


def test_coder_trains_with_fit_clusters_each_epoch_and_keeps_keys_out_of_the_optimiser(generator):
    image, text, captions = _toy_split(generator)
    model = _toy_model(generator, captions)
    model.set_clustering_inputs(image, text, None, 5)
    assert all(not p.requires_grad for p in model.image_key_head.parameters())
    pairs = PairedFeatures(image, text, None, 5, caption_choice="all")
    clusterings = []
    original = model.on_epoch_start
    model.on_epoch_start = lambda epoch: (original(epoch), clusterings.append(model.prototype_labels.clone()))
    config = TrainConfig(max_epochs=2, batch_size=10, lr=1e-3, device="cpu", progress=False, seed=0)
    result = fit(model, pairs, config, validate=RetrievalValidator(image, text))
    assert len(clusterings) == 2 and all(labels.min() >= 0 and labels.max() < 4 for labels in clusterings)
    assert bool(model.clustered) and model.prototype_centroids.shape == (4, 8)
    assert {"train_loss", "train_pgc", "train_m_dcl", "train_dcl_concept"} <= set(result.history[-1])
    assert all(math.isfinite(row["train_loss"]) for row in result.history)
    assert len(model.image_queue) == 20  # 24 steps of 10 keys through a queue of 20
    assert not torch.equal(model.image_key_head.projection.net[-1].weight, model.image_head.projection.net[-1].weight)


def _toy_regions(generator, image, text, regions=4, tokens=6):
    """Region inputs (N, regions, 16) scattered around each toy image vector, token inputs (5N, tokens, 8) around
    each caption vector with right-padded masks of 2..tokens positions (padding zero, as the cache stores it)."""
    image_regions = image[:, None] + 0.5 * torch.randn(len(image), regions, image.shape[1], generator=generator)
    lengths = torch.randint(2, tokens + 1, (len(text),), generator=generator)
    mask = (torch.arange(tokens) < lengths[:, None]).long()
    text_tokens = (text[:, None] + 0.5 * torch.randn(len(text), tokens, text.shape[1], generator=generator))
    return image_regions, text_tokens * mask[..., None], mask


def test_gpo_aggregation_trains_every_aggregator_and_presorted_inputs_change_nothing(generator):
    image, text, captions = _toy_split(generator)
    regions, tokens, mask = _toy_regions(generator, image, text)
    model = _toy_model(generator, captions, aggregation="gpo")
    aggregators = {"image_head": model.image_head.pooling, "text_head": model.text_head.pooling,
                   "image_concept": model.image_concept_pooling, "text_concept": model.text_concept_pooling}
    before = {name: [p.detach().clone() for p in pooling.parameters()] for name, pooling in aggregators.items()}
    model.set_clustering_inputs(regions, tokens, mask, 5)
    config = TrainConfig(max_epochs=1, batch_size=10, lr=1e-2, device="cpu", progress=False, seed=0)
    result = fit(model, PairedFeatures(regions, tokens, mask, 5, caption_choice="all"), config)
    assert all(math.isfinite(loss) for loss in result.step_losses) and "train_pgc" in result.history[-1]
    for name, pooling in aggregators.items():  # each GPO is its own and is trained
        assert any(not torch.equal(a, b) for a, b in zip(pooling.parameters(), before[name])), name
    assert all(not p.requires_grad for p in model.image_key_head.parameters())  # the momentum copy, GPO included
    model.eval()
    sorted_regions, _ = sort_regions(regions)
    sorted_tokens, sorted_mask = sort_regions(tokens, mask)
    assert torch.equal(sorted_mask.long(), mask)  # right-padded: the sorted mask is the mask
    torch.testing.assert_close(model.encode_image(sorted_regions), model.encode_image(regions))
    torch.testing.assert_close(model.encode_text(sorted_tokens, mask), model.encode_text(tokens, mask))
    with pytest.raises(ValueError, match="region/token"):
        model.encode_image(image)  # pooled inputs


def test_backbone_features_are_what_each_modalitys_aggregators_read(generator):
    image, text, captions = _toy_split(generator)
    regions, tokens, mask = _toy_regions(generator, image, text)
    mean = _toy_model(generator, captions).eval()
    features, no_mask = mean.image_backbone_features(regions)  # "mean": the pooled features, no mask
    assert no_mask is None and features.shape == (24, 16)
    torch.testing.assert_close(features, regions.mean(dim=1))
    features, no_mask = mean.text_backbone_features(tokens, mask)
    assert no_mask is None and features.shape == (120, 8)
    torch.testing.assert_close(features, masked_mean(tokens, mask))
    gpo = _toy_model(generator, captions, aggregation="gpo").eval()
    for got, want in ((gpo.image_backbone_features(regions), sort_regions(regions)),
                      (gpo.text_backbone_features(tokens, mask), sort_regions(tokens, mask))):
        assert got[0].shape == want[0].shape and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(gpo.encode_text_instances(tokens, mask),
                               F.normalize(gpo.text_head(*sort_regions(tokens, mask)), dim=-1))
    with pytest.raises(ValueError, match="region/token"):
        gpo.text_backbone_features(text)  # pooled caption inputs


def test_mean_aggregation_reads_regions_as_their_mean(generator):
    image, text, captions = _toy_split(generator)
    regions, tokens, mask = _toy_regions(generator, image, text)
    model = _toy_model(generator, captions).eval()
    torch.testing.assert_close(model.encode_image(regions), model.encode_image(regions.mean(dim=1)))
    torch.testing.assert_close(model.encode_text(tokens, mask), model.encode_text(masked_mean(tokens, mask)))


def test_resumed_training_equals_uninterrupted(generator, tmp_path):
    image, text, captions = _toy_split(generator)
    words = torch.randn(6, 5, generator=generator)

    def run(epochs, checkpoint_dir):
        torch.manual_seed(0)
        settings = CODERSettings(embed_dim=8, queue_size=20, num_concepts=6, num_clusters=4, kmeans_iterations=5)
        model = build_coder_model(settings, captions, image_dim=16, text_dim=8, word_vectors=words)
        model.set_clustering_inputs(image, text, None, 5)
        config = TrainConfig(max_epochs=epochs, batch_size=10, lr=1e-3, device="cpu", progress=False, select_by=None)
        fit(model, PairedFeatures(image, text, None, 5, caption_choice="all"), config, checkpoint_dir=checkpoint_dir)
        return model

    run(1, tmp_path / "resumed")
    resumed, straight = run(2, tmp_path / "resumed"), run(2, None)
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)  # queues, key heads and pseudo labels included


def test_concepts_mined_from_flickr8k(data_root):
    from xmr.data import load_flickr8k

    captions = load_flickr8k("train", root=data_root).captions
    concepts = mine_concepts(captions, 400)
    assert len(concepts) == 400 and {"dog", "man", "water"} <= set(concepts) and "the" not in concepts
    adjacency = concept_adjacency(captions[:5000], concepts)
    assert torch.allclose(adjacency, adjacency.T) and bool((adjacency.diagonal() > 0).all())


def _one_step_under(model, batch, device_type):
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
        losses = model.training_losses(batch)
    losses["loss"].backward()
    return losses


@pytest.mark.parametrize("aggregation", ["mean", "gpo"])
def test_a_step_under_bfloat16_autocast_is_finite(generator, aggregation):
    image, text, captions = _toy_split(generator)
    mask = None
    if aggregation == "gpo":
        image, text, mask = _toy_regions(generator, image, text)
    model = _toy_model(generator, captions, aggregation=aggregation)
    model.set_clustering_inputs(image, text, mask, 5)
    model.on_epoch_start(1)
    batch = {"image": image[:6], "text": text[:30:5], "image_index": torch.arange(6)}
    if mask is not None:
        batch["text_mask"] = mask[:30:5]
    for _ in range(2):  # the second step reads bfloat16 features against the float32 queue
        losses = _one_step_under(model, batch, "cpu")
    assert all(bool(torch.isfinite(value)) for value in losses.values()) and "pgc" in losses
    assert model.image_queue.keys.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_keeps_queues_labels_and_clustering_on_the_device(generator):
    image, text, captions = _toy_split(generator)
    model = _toy_model(generator, captions)
    model.set_clustering_inputs(image, text, None, 5)
    config = TrainConfig(max_epochs=2, batch_size=10, lr=1e-3, device="cuda", progress=False, select_by=None)
    result = fit(model, PairedFeatures(image, text, None, 5, caption_choice="all"), config)
    assert all(math.isfinite(row["train_loss"]) for row in result.history)
    assert model.image_queue.keys.is_cuda and model.prototype_labels.is_cuda and model.prototype_centroids.is_cuda


def test_settings_reject_inconsistent_switches():
    with pytest.raises(ValueError, match="aggregation"):
        CODERSettings(aggregation="max")
    with pytest.raises(ValueError):
        CODERSettings(memory_bank=False, memory_loss=True)
    with pytest.raises(ValueError):
        CODERSettings(concepts=False, prototypes=True)


def test_paper_numbers_cover_the_tables():
    numbers = paper_numbers(PAPER_ID)
    assert numbers["table1_f30k"]["rows"]["CODER"] == [83.2, 96.5, 98.0, 63.1, 87.1, 93.0, 520.9]
    assert numbers["table1_coco1k"]["rows"]["CODER"][:3] == [82.1, 96.6, 98.8]
    assert len(numbers["table2_ablation_f30k"]["rows"]) == 5
    assert len(numbers["table3_dcl_configurations_f30k"]["rows"]) == 6
    assert [row[0] for row in numbers["table4_clusters_f30k"]["rows"].values()] == [5000, 10000, 15000, 20000]


def test_run_coder_is_seeded_by_the_config_and_clusters_when_it_has_prototypes(generator):
    image, text, captions = _toy_split(generator)
    words = torch.randn(6, 5, generator=generator)
    inputs = CaptionInputs(image, text)
    settings = CODERSettings(embed_dim=8, queue_size=20, num_concepts=6, num_clusters=4, kmeans_iterations=5,
                             seed=7)  # run_coder replaces the k-means seed by the config's
    config = TrainConfig(max_epochs=1, batch_size=10, lr=1e-3, device="cpu", progress=False, seed=3)
    first, again = (run_coder(settings, config, inputs, inputs, inputs, captions, words) for _ in range(2))
    assert first.test_metrics == again.test_metrics and first.model.settings.seed == 3
    assert bool(first.model.clustered) and len(first.training.step_losses) == 12  # "all": 120 captions / 10
    other = run_coder(settings, dataclasses.replace(config, seed=4), inputs, inputs, inputs, captions, words)
    assert not torch.equal(other.model.image_head.projection.net[-1].weight,
                           first.model.image_head.projection.net[-1].weight)
    assert first.trainable_parameters == count_trainable_parameters(first.model)
    assert isinstance(first, Outcome) and list(first.stages) == ["train"] and first.device == "cpu"
    assert first.training is first.stages["train"] and first.history == first.training.history
    parameters = first.parameters  # the settings with the config's seed, the config, and run_coder's own options
    assert parameters["seed"] == 3 and parameters["num_clusters"] == 4 and parameters["max_epochs"] == 1
    assert (parameters["caption_choice"], parameters["image_top"], parameters["text_top"]) == ("all", 0, 0)
    assert set(dataclasses.asdict(settings)) | set(dataclasses.asdict(config)) <= set(parameters)


@pytest.mark.parametrize("alpha", [2.0, 10.0])
def test_multi_similarity_pull_matches_loop_reference(generator, alpha):
    image_leaf, image = _unit(generator, torch.float64, 5)
    text_leaf, text = _unit(generator, torch.float64, 5)
    out = DiversityContrastiveLoss(MU, GAMMA, EPS, form="multi_similarity", ms_alpha=alpha)(image, text)
    sims = reference_sims(image, text)
    reference = (reference_direction(sims, form="multi_similarity", alpha=alpha)
                 + reference_direction(transpose(sims), form="multi_similarity", alpha=alpha))
    torch.testing.assert_close(out["loss"], reference, rtol=1e-10, atol=1e-12)
    for got, want in zip(_grads(out["loss"], (image_leaf, text_leaf)), _grads(reference, (image_leaf, text_leaf))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_multi_similarity_keeps_the_printed_negative_term(generator):
    """Same negatives, another pull: literal minus MS = -mu log(1 + S_nn) - softplus(-alpha (S_nn - gamma)) / alpha."""
    image = F.normalize(torch.randn(6, 4, generator=generator, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(6, 4, generator=generator, dtype=torch.float64), dim=1)
    literal = DiversityContrastiveLoss(MU, GAMMA, EPS, form="literal")(image, text)["loss_i2t"]
    ms = DiversityContrastiveLoss(MU, GAMMA, EPS, form="multi_similarity", ms_alpha=2.0)(image, text)["loss_i2t"]
    positives = (image * text).sum(dim=1)
    expected = (-MU * torch.log(1 + positives) - F.softplus(-2.0 * (positives - GAMMA)) / 2.0).mean()
    torch.testing.assert_close(literal - ms, expected)


def test_constant_diversity_is_the_implicit_form_at_a_scaled_temperature(generator):
    image_leaf, image = _unit(generator, torch.float64, 5)
    text_leaf, text = _unit(generator, torch.float64, 5)
    for form in DiversityContrastiveLoss.FORMS:
        out = DiversityContrastiveLoss(MU, GAMMA, EPS, diversity=False, form=form, constant_diversity=0.8)(image, text)
        sims = reference_sims(image, text)
        reference = (reference_direction(sims, diversity=False, form=form, constant=0.8)
                     + reference_direction(transpose(sims), diversity=False, form=form, constant=0.8))
        torch.testing.assert_close(out["loss"], reference, rtol=1e-10, atol=1e-12)
    assert DiversityContrastiveLoss(diversity=False).anchor_diversity(torch.eye(3)).tolist() == [1.0, 1.0, 1.0]
