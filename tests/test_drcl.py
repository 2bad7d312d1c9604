"""DRCL (xmr.methods.drcl) and CCA (xmr.methods.cca): equations against plain references, the pieces' algebra,
the code bugs kept as flags, training through xmr.train.fit, result files, and a two-modality toy problem the
method must solve."""
import copy
import math
from dataclasses import replace as dataclasses_replace

import pytest
import torch
import torch.nn.functional as F

from xmr.category_retrieval import (
    CrossModalData,
    Modality,
    evaluate_features,
    map_evaluation,
    map_table,
    pooled_query_units,
    pr_curves,
    stratified_split,
    uci_mfeat_data,
    unpaired_view_rows,
    wikipedia_data,
    xmedia_like_data,
)
from xmr.methods.cca import fit_cca, fit_mcca, run_cca, run_mcca
from xmr.methods.drcl import (
    ADAM_BETAS,
    AUTHORS_WIKIPEDIA_LOG,
    TABLE5_VARIANTS,
    DRCLSettings,
    PriorLearning,
    ReversibleConsistencyLoss,
    RSCModel,
    SPLModel,
    feature_mixup,
    generalized_cross_entropy,
    hardness_q,
    learn_prior,
    learn_priors,
    match_column_norms,
    modality_batch_size,
    prior_geometry,
    quality_score,
    random_orthogonal_prior,
    recast_anchors,
    record_run,
    run_drcl,
    run_result_fields,
    run_sdml,
    scaled_cosine,
    select_prior,
    train_modality,
    training_config,
)
from xmr.metrics import average_precisions
from xmr.results import read_record, write_result
from xmr.train import TrainResult, fit


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster than two and immune to oversubscription on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ---------------------------------------------------------------------------------------------------------------
# Plain references, one sample at a time, straight from the equations
# ---------------------------------------------------------------------------------------------------------------


def reference_gce(logits, targets, q):
    """mean_i [1 - (sum_c y_ic softmax(z_i)_c)^q] / q, in loops."""
    total = 0.0
    for i in range(len(logits)):
        exps = [math.exp(float(v)) for v in logits[i]]
        probs = [e / sum(exps) for e in exps]
        p = sum(float(targets[i][c]) * probs[c] for c in range(len(probs)))
        total += (1 - p ** q) / q
    return total / len(logits)


def reference_rsc(anchors, embeddings):
    """J_MSE and J_D with C(a, b) = 2 cos(a, b), in loops."""
    def cos2(a, b):
        return 2 * float(a @ b) / (float(a.norm()) * float(b.norm()))
    n, d = anchors.shape
    mse = sum(float(anchors[i, j] - embeddings[i, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)
    intra = sum((cos2(anchors[i], anchors[j]) - cos2(embeddings[i], embeddings[j])) ** 2
                for i in range(n) for j in range(n)) / n ** 2
    cross = sum((cos2(anchors[i], embeddings[j]) - cos2(anchors[j], embeddings[i])) ** 2
                for i in range(n) for j in range(n)) / n ** 2
    return mse, intra + cross


# ---------------------------------------------------------------------------------------------------------------
# Generalised cross-entropy and the hardness schedule (Eq. 1, 7)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("q", [0.01, 0.3, 1.0, 2.0])
def test_gce_matches_reference_hard_and_soft_labels(dtype, q):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=generator, dtype=dtype) * 3
    labels = torch.randint(0, 5, (7,), generator=generator)
    one_hot = F.one_hot(labels, 5).to(dtype)
    soft, _, _ = feature_mixup(one_hot, one_hot, 0.9, generator)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert float(generalized_cross_entropy(logits, labels, q)) == pytest.approx(reference_gce(logits, one_hot, q),
                                                                                rel=tolerance, abs=tolerance)
    assert float(generalized_cross_entropy(logits, one_hot, q)) == pytest.approx(reference_gce(logits, one_hot, q),
                                                                                 rel=tolerance, abs=tolerance)
    assert float(generalized_cross_entropy(logits, soft, q)) == pytest.approx(reference_gce(logits, soft, q),
                                                                              rel=tolerance, abs=tolerance)
    # the literal printed form agrees wherever it is defined
    assert float(generalized_cross_entropy(logits, soft, q, literal=True)) == pytest.approx(
        reference_gce(logits, soft, q), rel=max(tolerance, 1e-4 if q < 0.05 and dtype == torch.float32 else 0))


def test_gce_gradient_matches_autograd_of_the_printed_formula():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = F.one_hot(torch.randint(0, 4, (6,), generator=generator), 4).double()
    for q in (0.05, 0.7, 1.0):
        ours = torch.autograd.grad(generalized_cross_entropy(logits, targets, q), logits)[0]
        printed = ((1 - (targets * logits.softmax(1)).sum(1) ** q) / q).mean()
        reference = torch.autograd.grad(printed, logits)[0]
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


def test_gce_limits_cross_entropy_and_mae():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 6, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 6, (9,), generator=generator)
    cross_entropy = float(F.cross_entropy(logits, labels))
    assert float(generalized_cross_entropy(logits, labels, 0.0)) == pytest.approx(cross_entropy, rel=1e-14)
    for q in (1e-3, 1e-5, 1e-8):
        assert float(generalized_cross_entropy(logits, labels, q)) == pytest.approx(cross_entropy, rel=5 * q * 10)
    errors = [abs(float(generalized_cross_entropy(logits, labels, q)) - cross_entropy) for q in (1e-1, 1e-2, 1e-3)]
    assert errors[0] > errors[1] > errors[2]                               # converges as q -> 0
    mae = float((1 - logits.softmax(1).gather(1, labels[:, None])).mean())
    assert float(generalized_cross_entropy(logits, labels, 1.0)) == pytest.approx(mae, rel=1e-14)
    # float32, tiny q: the expm1 form stays exact where 1 - p**q cancels
    assert float(generalized_cross_entropy(logits.float(), labels, 1e-7)) == pytest.approx(cross_entropy, rel=1e-5)


def test_gce_literal_q_zero_is_nan_and_negative_q_is_rejected():
    logits, labels = torch.randn(3, 4), torch.tensor([0, 1, 2])
    assert math.isnan(float(generalized_cross_entropy(logits, labels, 0.0, literal=True)))
    # ... but its gradient is exactly zero (pow's backward at exponent 0): the authors' first epoch moves nothing
    logits.requires_grad_(True)
    gradient = torch.autograd.grad(generalized_cross_entropy(logits, labels, 0.0, literal=True), logits)[0]
    assert torch.equal(gradient, torch.zeros_like(logits))
    with pytest.raises(ValueError):
        generalized_cross_entropy(logits, labels, -0.1)


def test_hardness_schedule():
    assert [hardness_q(t) for t in (1, 2, 50, 100, 101, 200)] == pytest.approx([0.01, 0.02, 0.5, 1.0, 1.0, 1.0])
    assert hardness_q(5, ramp_epochs=10) == pytest.approx(0.5)
    assert hardness_q(1, literal_epoch_zero=True) == 0.0                  # the authors' SPL loop
    assert hardness_q(7, fixed=2.0) == 2.0


# ---------------------------------------------------------------------------------------------------------------
# Prior, quality score, mixup, recast anchors, RSC losses
# ---------------------------------------------------------------------------------------------------------------

def test_random_orthogonal_prior_has_orthonormal_columns_and_is_seeded():
    prior = random_orthogonal_prior(32, 10, seed=3)
    assert prior.shape == (32, 10)
    torch.testing.assert_close(prior.T @ prior, torch.eye(10), atol=1e-6, rtol=0)
    assert torch.equal(prior, random_orthogonal_prior(32, 10, seed=3))
    assert not torch.equal(prior, random_orthogonal_prior(32, 10, seed=4))
    with pytest.raises(ValueError):
        random_orthogonal_prior(5, 10)


@pytest.mark.parametrize("kind", ["orthogonal", "learned-like"])
def test_pseudo_inverse_recovers_identity(kind):
    """W+ W = I_C for the random orthogonal prior and for a non-orthogonal full-rank one (learned priors grow)."""
    prior = random_orthogonal_prior(64, 10, seed=5)
    if kind == "learned-like":
        noise = torch.randn(64, 10, generator=torch.Generator().manual_seed(6))
        prior = prior * torch.linspace(0.5, 6.0, 10) + 0.3 * noise
    loss = ReversibleConsistencyLoss(prior)
    torch.testing.assert_close(loss.prior_inverse @ loss.prior, torch.eye(10), atol=1e-5, rtol=0)
    if kind == "orthogonal":
        torch.testing.assert_close(loss.prior_inverse, prior.T, atol=1e-5, rtol=0)   # W+ = W^T here only


def test_rescale_to_unit_anchors():
    from xmr.methods.drcl import rescale_to_unit_anchors
    orthogonal = random_orthogonal_prior(32, 10, seed=13)
    torch.testing.assert_close(rescale_to_unit_anchors(orthogonal), orthogonal, atol=1e-6, rtol=0)
    learned = orthogonal * 4 + 0.2 * torch.randn(32, 10, generator=torch.Generator().manual_seed(14))
    rescaled = rescale_to_unit_anchors(learned)
    assert float(torch.linalg.pinv(rescaled).norm(dim=1).mean()) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(F.normalize(rescaled, dim=0), F.normalize(learned, dim=0))   # same directions


def test_ablation_variants_map_to_settings():
    from xmr.methods.drcl import ablation
    assert ablation(SMALL, "no_spl") == (SMALL, "random")
    assert ablation(SMALL, "rescaled_random_prior") == (SMALL, "random_rescaled")
    changed, prior = ablation(SMALL, "q_2")
    assert prior == "learned" and changed.fixed_q == 2.0 and changed.hidden_dim == SMALL.hidden_dim
    assert ablation(SMALL, "input_fa")[0].augmentation == "input"
    assert {reference for reference, _ in TABLE5_VARIANTS.values()} >= {"#1", "#2-#4", "#5", "#8", "#10", "#11"}


def test_match_column_norms_and_prior_geometry():
    orthogonal = random_orthogonal_prior(32, 10, seed=3)
    noise = torch.randn(32, 10, generator=torch.Generator().manual_seed(4))
    learned = orthogonal * torch.linspace(2.0, 6.0, 10) + 0.3 * noise
    control = match_column_norms(orthogonal, learned)
    torch.testing.assert_close(control.norm(dim=0), learned.norm(dim=0))
    torch.testing.assert_close(F.normalize(control, dim=0), orthogonal)               # directions kept: orthogonal
    random_geometry = prior_geometry(orthogonal, orthogonal)
    assert random_geometry["column_norm_mean"] == pytest.approx(1.0)
    assert random_geometry["column_abs_cos_max"] < 1e-6 and random_geometry["cos_to_initial_mean"] == pytest.approx(1.0)
    geometry = prior_geometry(learned, orthogonal)
    assert geometry["column_norm_min"] == pytest.approx(float(learned.norm(dim=0).min()))
    assert geometry["column_abs_cos_max"] > 0.01 and geometry["pinv_identity_error"] < 1e-8
    assert prior_geometry(control)["column_abs_cos_max"] < 1e-6
    two = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 1.0]])                 # norms 3 and sqrt 2, cosine 0
    assert prior_geometry(two)["column_norm_mean"] == pytest.approx((3 + math.sqrt(2)) / 2)
    with pytest.raises(ValueError, match="shape"):
        match_column_norms(orthogonal, learned[:, :5])


def test_quality_score_by_hand():
    prior = torch.eye(3)
    embeddings = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]])   # softmax (1/2, 1/4, 1/4), uniform
    labels = torch.tensor([0, 2])
    assert quality_score(embeddings, labels, prior) == pytest.approx((0.5 + 1 / 3) / 2)


def test_select_prior_takes_the_highest_score():
    priors = {name: PriorLearning(torch.zeros(2, 2), TrainResult(best_epoch=1, best_metrics={"quality_score": score}))
              for name, score in (("image", 0.4), ("text", 0.7), ("audio", 0.5))}
    assert select_prior(priors) == "text"
    assert priors["text"].score == 0.7 and priors["text"].best_epoch == 1


def test_feature_mixup_labels():
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(20, 8, generator=generator)
    labels = torch.randint(0, 5, (20,), generator=generator)
    targets = F.one_hot(labels, 5).float()
    mixed, mixed_targets, permutation = feature_mixup(features, targets, 0.9, generator)
    assert sorted(permutation.tolist()) == list(range(20))
    torch.testing.assert_close(mixed, 0.9 * features + 0.1 * features[permutation])
    torch.testing.assert_close(mixed_targets.sum(1), torch.ones(20))
    for i in range(20):
        j = int(permutation[i])
        expected = torch.zeros(5)
        expected[labels[i]] += 0.9
        expected[labels[j]] += 0.1
        torch.testing.assert_close(mixed_targets[i], expected)             # 1.0 on one class when labels agree
    assert (mixed_targets.argmax(1) == labels).all()                       # lambda = 0.9 keeps the own class first


def test_recast_anchors():
    """r = y W+ maps back to the label exactly (r W* = y) and, for one-hot labels, is W+'s row of the class."""
    generator = torch.Generator().manual_seed(8)
    prior = random_orthogonal_prior(16, 4, seed=9) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    inverse = torch.linalg.pinv(prior)
    labels = torch.tensor([0, 3, 1, 1])
    one_hot = F.one_hot(labels, 4).float()
    anchors = recast_anchors(one_hot, inverse)
    torch.testing.assert_close(anchors, inverse[labels])
    torch.testing.assert_close(anchors @ prior, one_hot, atol=1e-5, rtol=0)
    _, soft, _ = feature_mixup(one_hot, one_hot, 0.9, generator)
    torch.testing.assert_close(recast_anchors(soft, inverse) @ prior, soft, atol=1e-5, rtol=0)
    # same-class anchors coincide; anchors of different classes are orthogonal for an orthogonal prior
    orthogonal = random_orthogonal_prior(16, 4, seed=9)
    anchors = recast_anchors(one_hot, orthogonal.T)
    assert torch.equal(anchors[2], anchors[3])
    assert abs(float(anchors[0] @ anchors[1])) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rsc_losses_match_reference(dtype):
    generator = torch.Generator().manual_seed(10)
    prior = random_orthogonal_prior(12, 4, seed=11).to(dtype) * 3
    loss = ReversibleConsistencyLoss(prior, alpha=0.1, beta=0.1, eta=1.0).to(dtype)
    embeddings = F.normalize(torch.randn(6, 12, generator=generator, dtype=dtype), dim=1)
    targets = F.one_hot(torch.randint(0, 4, (6,), generator=generator), 4).to(dtype)
    embeddings, targets, _ = feature_mixup(embeddings, targets, 0.9, generator)
    out = loss(embeddings, targets, q=0.4)
    anchors = targets @ loss.prior_inverse
    mse, discrimination = reference_rsc(anchors, embeddings)
    label = reference_gce(embeddings @ loss.prior, targets, 0.4)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    assert float(out["mse"]) == pytest.approx(mse, rel=tolerance)
    assert float(out["discrimination"]) == pytest.approx(discrimination, rel=tolerance)
    assert float(out["label"]) == pytest.approx(label, rel=tolerance)
    assert float(out["loss"]) == pytest.approx(label + 0.1 * discrimination + 0.1 * mse, rel=tolerance)


def test_rsc_losses_vanish_at_the_anchors():
    """Embeddings equal to their recast anchors give J_MSE = J_D = 0 (the fixed point RSC pulls towards)."""
    prior = random_orthogonal_prior(10, 3, seed=12)
    targets = F.one_hot(torch.tensor([0, 1, 2, 1]), 3).float()
    loss = ReversibleConsistencyLoss(prior)
    out = loss(recast_anchors(targets, loss.prior_inverse), targets, q=1.0)
    assert float(out["mse"]) == pytest.approx(0.0, abs=1e-12)
    assert float(out["discrimination"]) == pytest.approx(0.0, abs=1e-10)
    torch.testing.assert_close(scaled_cosine(targets, targets).diagonal(), torch.full((4,), 2.0))


def test_ablation_switches_reach_the_loss():
    prior = random_orthogonal_prior(8, 3)
    assert DRCLSettings(use_label_loss=False).loss(prior).eta == 0.0
    assert DRCLSettings(use_discrimination_loss=False).loss(prior).alpha == 0.0
    assert DRCLSettings(use_mse_loss=False).loss(prior).beta == 0.0
    assert DRCLSettings(fixed_q=0.5).q(1) == 0.5 and DRCLSettings(q_ramp_epochs=10).q(5) == 0.5
    transpose = DRCLSettings(recast="transpose").loss(prior * 2)
    torch.testing.assert_close(transpose.prior_inverse, (prior * 2).T)
    with pytest.raises(ValueError):
        DRCLSettings(augmentation="pixels")


# ---------------------------------------------------------------------------------------------------------------
# Training: a two-modality toy problem, the code bugs, data splits
# ---------------------------------------------------------------------------------------------------------------

def toy_problem(seed=0, classes=4, sizes=(240, 160), test_size=80, noise=0.5, paired=False):
    """Two modalities (different input maps) of the same 4 classes: unpaired, with different sample counts, or
    ``paired`` (both views of one latent sample per row, ``sizes[0]`` training rows)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, 6, generator=generator) * 1.5
    maps = {"a": torch.randn(6, 20, generator=generator), "b": torch.randn(6, 9, generator=generator)}

    def sample(count):
        labels = torch.randint(0, classes, (count,), generator=generator)
        return labels, centres[labels] + noise * torch.randn(count, 6, generator=generator)

    def split(counts):
        if paired:
            labels, latent = sample(counts[0])
            return {name: Modality(torch.tanh(latent @ maps[name]), labels) for name in maps}
        drawn = {name: sample(count) for name, count in zip(maps, counts)}
        return {name: Modality(torch.tanh(drawn[name][1] @ maps[name]), drawn[name][0]) for name in maps}

    return CrossModalData(split(sizes), split((test_size, test_size)), split((test_size, test_size)), classes,
                          paired=paired)


# fixed budgets (no early stop) keep these toy runs comparable with the authors' loop
SMALL = DRCLSettings(hidden_dim=64, embed_dim=16, q_ramp_epochs=10, spl_max_epochs=20, spl_patience=None)
FAST = training_config(max_epochs=20, patience=None, batch_size=40, lr=1e-3, seed=0)


def short_training(epochs, **changes):
    return training_config(**{"max_epochs": epochs, "patience": None, "batch_size": 40, "lr": 1e-3, **changes})


def test_drcl_solves_a_two_modality_toy_problem():
    data = toy_problem()
    run = run_drcl(data, SMALL, FAST)
    metrics = map_table(run.embed(data.test))
    chance = map_table({name: Modality(torch.randn(len(m), 16), m.labels) for name, m in data.test.items()})
    assert metrics["map_all_a2b"] > 0.85 and metrics["map_all_b2a"] > 0.85, metrics
    assert chance["map_all_avg"] < 0.45
    assert run.prior_source in ("a", "b") and run.prior_source == select_prior(run.priors)
    for learned in run.priors.values():                                    # SPL learned: score above chance 1/4
        assert learned.score > 0.5 and 1 <= learned.best_epoch <= SMALL.spl_max_epochs
        assert learned.score == max(row["val_quality_score"] for row in learned.training.history)
    for trained in run.encoders.values():
        assert 1 <= trained.best_epoch <= FAST.max_epochs
        assert trained.training.stopped_by == "budget" and trained.training.epochs_run == FAST.max_epochs
        assert trained.best_validation_loss == min(row["val_loss"] for row in trained.training.history)
    curves = pr_curves(run.embed(data.test))
    assert set(curves) == {"a2b", "b2a"} and len(curves["a2b"]) == 11


def test_every_ablation_variant_and_sdml_train_on_the_toy_problem():
    data = toy_problem(seed=1)
    priors = learn_priors(data, SMALL, FAST)
    short = short_training(6)
    for variant in (dict(augmentation="none"), dict(augmentation="input"), dict(fixed_q=2.0),
                    dict(use_label_loss=False), dict(use_discrimination_loss=False), dict(use_mse_loss=False),
                    dict(recast="transpose")):
        settings = DRCLSettings(**{**SMALL.__dict__, **variant})
        run = run_drcl(data, settings, short, priors=priors)
        assert 0 < map_table(run.embed(data.test))["map_all_avg"] <= 1
    random_prior = run_drcl(data, SMALL, short, prior="random")
    assert random_prior.prior_source == "random" and not random_prior.priors
    torch.testing.assert_close(random_prior.prior, random_prior.initial_prior)
    control = run_drcl(data, SMALL, short, priors=priors, prior="random_rescaled")
    selected = priors[select_prior(priors)].prior
    assert control.prior_source == "random_rescaled" and not control.priors
    torch.testing.assert_close(control.prior.norm(dim=0), selected.norm(dim=0))
    torch.testing.assert_close(F.normalize(control.prior, dim=0), random_prior.prior)
    with pytest.raises(ValueError, match="prior must be"):
        run_drcl(data, SMALL, short, priors=priors, prior="c")
    per_modality = run_drcl(data, SMALL, short, priors=priors, prior="b")
    assert torch.equal(per_modality.prior, priors["b"].prior)
    sdml = run_sdml(data, 64, 16, short_training(15))
    assert map_table(sdml.embed(data.test))["map_all_avg"] > 0.8
    learned = run_sdml(data, 64, 16, short, prior=priors["a"].prior)
    assert learned.prior_source == "given"


def test_prior_from_last_epoch_flag():
    data = toy_problem(seed=2)
    initial = random_orthogonal_prior(16, 4)
    eight = dataclasses_replace(SMALL, spl_max_epochs=8, spl_lr=1e-2)
    best = learn_prior(data.train["a"], 4, initial, eight, FAST)
    last = learn_prior(data.train["a"], 4, initial, dataclasses_replace(eight, prior_from_last_epoch=True), FAST)
    assert best.score == last.score and best.best_epoch == last.best_epoch   # the same run and reported score
    assert torch.equal(best.prior, last.prior) == (best.best_epoch == 8)   # ... but W from another epoch


def test_literal_q_at_epoch_zero_trains_on_without_moving_in_epoch_one():
    """The authors' q = 0 first epoch prints NaN but has a zero gradient: no exception, no update, then training."""
    data = toy_problem(seed=2)
    initial = random_orthogonal_prior(16, 4)
    literal = dataclasses_replace(SMALL, literal_q_at_epoch_zero=True, spl_lr=1e-2)
    model = SPLModel(data.train["a"].features.shape[1], initial, literal, seed=0)
    before = copy.deepcopy(model.state_dict())
    result = fit(model, data.train["a"], dataclasses_replace(FAST, max_epochs=1, select_by=None))
    for name, value in model.state_dict().items():                          # encoder and W: exactly unchanged
        assert torch.equal(value, before[name]), name
    assert result.history[0]["train_printed_nan"] == 1.0 and result.history[0]["train_loss"] == 0.0
    three = learn_prior(data.train["a"], 4, initial, dataclasses_replace(literal, spl_max_epochs=3), FAST)
    rows = three.training.history
    assert [row["train_printed_nan"] for row in rows] == [1.0, 0.0, 0.0]
    assert rows[0]["val_quality_score"] == pytest.approx(SPLModel(20, initial, literal).quality(data.train["a"]))
    assert rows[2]["val_quality_score"] > rows[0]["val_quality_score"]       # trained on after the NaN epoch
    assert not torch.equal(three.prior, initial)


def test_the_q_schedule_reaches_the_loss_through_on_epoch_start(monkeypatch):
    data = toy_problem(seed=3)
    prior = random_orthogonal_prior(16, 4)
    settings = dataclasses_replace(SMALL, q_ramp_epochs=4)
    model = RSCModel(data.train["a"].features.shape[1], prior, settings)
    seen = []
    forward = model.objective.forward
    monkeypatch.setattr(model.objective, "forward", lambda e, t, q: seen.append(q) or forward(e, t, q))
    steps = len(data.train["a"]) // 40
    fit(model, data.train["a"], dataclasses_replace(FAST, max_epochs=5, select_by=None))
    assert seen == [q for epoch in range(1, 6) for q in [settings.q(epoch)] * steps]
    assert seen[-1] == 1.0 and seen[0] == 0.25
    # SPL's literal schedule counts epochs from 0
    spl = SPLModel(20, prior, dataclasses_replace(settings, literal_q_at_epoch_zero=True))
    qs = []
    for epoch in (1, 2, 3):
        spl.on_epoch_start(epoch)
        qs.append(spl.q)
    assert qs == [0.0, 0.25, 0.5]


def test_fit_restores_the_epoch_with_the_lowest_validation_loss():
    data = toy_problem(seed=3)
    prior = random_orthogonal_prior(16, 4)
    settings = dataclasses_replace(SMALL, fixed_q=1.0)      # a fixed q: validation losses comparable across epochs
    trained = train_modality(data.train["a"], data.val["a"], 4, prior, settings, short_training(12, lr=3e-2))
    losses = [row["val_loss"] for row in trained.training.history]
    assert trained.best_epoch == 1 + losses.index(min(losses)) < len(losses)   # not simply the last epoch
    model = RSCModel(20, prior, settings)
    model.encoder = trained.encoder
    assert model.validation_loss(data.val["a"]) == pytest.approx(min(losses), rel=1e-6)
    assert model.validation_loss(data.val["a"]) != pytest.approx(losses[-1], rel=1e-6)


def test_training_budget_and_plateau_reach_every_stage():
    data = toy_problem(seed=3)
    settings = dataclasses_replace(SMALL, spl_max_epochs=4, spl_patience=None)
    run = run_drcl(data, settings, training_config(max_epochs=40, patience=1, batch_size=40, lr=3e-2))
    for learned in run.priors.values():
        assert learned.training.record()["epochs_budget"] == 4 and learned.training.stopped_by == "budget"
    for trained in run.encoders.values():
        assert trained.training.stopped_by == "plateau" and trained.training.epochs_run < 40
        assert trained.training.epochs_run == trained.best_epoch + 1


def test_training_is_seeded_and_refuses_empty_batches():
    data = toy_problem(seed=3)
    prior = random_orthogonal_prior(16, 4)
    settings = short_training(3, seed=5)
    first = train_modality(data.train["a"], data.val["a"], 4, prior, SMALL, settings)
    second = train_modality(data.train["a"], data.val["a"], 4, prior, SMALL, settings)

    def untimed(rows):
        return [{key: value for key, value in row.items() if not key.endswith("time_s")} for row in rows]

    assert untimed(first.training.history) == untimed(second.training.history)
    for a, b in zip(first.encoder.parameters(), second.encoder.parameters()):
        assert torch.equal(a, b)
    # the paper's batch of 1024 is capped to a quarter of a small modality, so every epoch takes steps ...
    capped = train_modality(data.train["b"], data.val["b"], 4, prior, SMALL, short_training(1, batch_size=1024))
    assert capped.training.epochs_run == 1 and capped.training.pairs_per_second > 0
    # ... and a modality too small for any batch is refused
    with pytest.raises(ValueError, match="no batch"):
        one_row = Modality(data.train["b"].features[:1], data.train["b"].labels[:1])
        train_modality(one_row, data.val["b"], 4, prior, SMALL, short_training(1))


def test_modality_batch_size_leaves_large_modalities_alone():
    assert modality_batch_size(2173, 100) == 100 and modality_batch_size(1400, 100) == 100
    assert modality_batch_size(117, 100) == 29 and modality_batch_size(117, 1024) == 29
    assert modality_batch_size(3, 100) == 2 and modality_batch_size(400, 100) == 100


def test_adam_uses_the_authors_betas():
    model = RSCModel(20, random_orthogonal_prior(16, 4), SMALL)
    assert [group["betas"] for group in model.parameter_groups(1e-3)] == [ADAM_BETAS]
    assert FAST.grad_clip_norm is None and not FAST.mixed_precision


def test_a_modality_fetches_whole_batches():
    rows = Modality(torch.arange(12.0).reshape(6, 2), torch.tensor([0, 1, 0, 1, 2, 2]))
    batch = rows[[4, 0, 3]]
    torch.testing.assert_close(batch["features"], torch.tensor([[8.0, 9.0], [0.0, 1.0], [6.0, 7.0]]))
    assert batch["labels"].tolist() == [2, 0, 1] and Modality.fetches_batches
    with pytest.raises(ValueError, match="paired"):
        CrossModalData({"a": rows, "b": Modality(rows.features, rows.labels.flip(0))}, {"a": rows}, {"a": rows}, 3,
                       paired=True)


# ---------------------------------------------------------------------------------------------------------------
# Per-query APs and result files
# ---------------------------------------------------------------------------------------------------------------


def check_query_means(metrics, per_query):
    query_means = per_query["query_means"]
    assert query_means
    for name, values in query_means.items():
        assert sum(values) / len(values) == pytest.approx(metrics[name], abs=1e-6), name
    return query_means


def common_space(split, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {name: Modality(torch.randn(len(m), 5, generator=generator) + m.labels[:, None], m.labels)
            for name, m in split.items()}


def test_per_query_means_equal_the_maps():
    features = common_space(toy_problem(seed=4, sizes=(200, 200), paired=True).test)
    metrics, per_query = map_evaluation(features, paired=True)
    assert metrics == map_table(features)
    query_means = check_query_means(metrics, per_query)
    assert set(query_means) == {"map_all_a2b", "map_all_b2a", "map_all_avg", "map_50_avg"}
    a2b = average_precisions(features["a"].features, features["a"].labels, features["b"].features,
                             features["b"].labels)
    b2a = average_precisions(features["b"].features, features["b"].labels, features["a"].features,
                             features["a"].labels)
    assert query_means["map_all_avg"] == pytest.approx(((a2b + b2a) / 2).tolist(), abs=5e-7)   # same query item
    # unpaired modalities share no query items: every query of every modality is a unit, weighted so that the
    # plain mean of the units is the average over directions
    unpaired = toy_problem(seed=4, sizes=(240, 160), test_size=80)
    unequal = {"a": unpaired.test["a"], "b": Modality(unpaired.test["b"].features[:50], unpaired.test["b"].labels[:50])}
    metrics, per_query = map_evaluation(common_space(unequal), paired=False)
    query_means = check_query_means(metrics, per_query)
    assert set(query_means) == {"map_all_a2b", "map_all_b2a", "map_all_avg", "map_50_avg"}
    assert len(query_means["map_all_avg"]) == 80 + 50


def test_pooled_query_units_by_hand():
    directions = {("a", "b"): torch.tensor([1.0, 0.0]), ("b", "a"): torch.tensor([0.5, 0.5, 0.5, 0.5]),
                  ("a", "c"): torch.tensor([0.0, 0.0])}
    units = pooled_query_units(directions)
    mean_of_maps = (0.5 + 0.5 + 0.0) / 3
    assert len(units) == 6 and float(units.mean()) == pytest.approx(mean_of_maps)
    # query "a" has two galleries: its items' APs averaged over them, times |S_a| N / (D N_a) = 2 * 6 / (3 * 2)
    torch.testing.assert_close(units[:2], torch.tensor([0.5, 0.0]) * 2)


def test_weak_view_average_of_three_modalities():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(10)
    features = {name: Modality(torch.randn(40, 5, generator=generator) + shift * labels[:, None], labels)
                for name, shift in (("a", 2.0), ("b", 1.0), ("c", 0.3))}
    for paired in (True, False):
        metrics, per_query = map_evaluation(features, paired=paired, weak_views=("b", "c"))
        assert metrics["map_all_weak_avg"] == pytest.approx((metrics["map_all_b2c"] + metrics["map_all_c2b"]) / 2)
        assert metrics["map_all_weak_avg"] < metrics["map_all_avg"]
        check_query_means(metrics, per_query)
    with pytest.raises(ValueError, match="weak_views"):
        CrossModalData(features, features, features, 4, weak_views=("b", "z"))


def test_run_files_validate_and_hold_the_training_stages(tmp_path):
    data = toy_problem(seed=4, sizes=(200, 200), paired=True)
    short = dataclasses_replace(SMALL, spl_max_epochs=3)
    run = run_drcl(data, short, short_training(4))
    metrics = record_run(tmp_path, "toy_drcl", run, data, "toy", {"seed": 0})
    written = read_record(tmp_path / "drcl2024" / "toy_drcl.json")      # validates against the schema
    assert written["metrics"] == pytest.approx(metrics) and "val_map_all_avg" in metrics
    assert all(isinstance(value, float) for value in written["metrics"].values())
    check_query_means(written["metrics"], written["per_query"])
    stages = written["training"]["stages"]
    assert set(stages) == {"prior_a", "prior_b", "encoder_a", "encoder_b"}
    assert stages["prior_a"]["epochs_budget"] == 3 and stages["encoder_b"]["epochs_run"] == 4
    assert written["training"]["epochs_run"] == 14 and written["training"]["stopped_by"] == "budget"
    assert set(written["quality_scores"]) == {"a", "b"} and written["prior_source"] == run.prior_source
    assert {row["stage"] for row in written["history"]} == {"prior", "encoder"}
    assert set(written["pr_curves"]) == {"a2b", "b2a"} and len(written["pr_curves"]["a2b"]) == 11
    assert written["prior_geometry"]["cos_to_initial_mean"] == pytest.approx(
        written["learned_prior_geometry"][run.prior_source]["cos_to_initial_mean"])
    # SDML and the random-prior ablation have no SPL stage
    sdml = run_sdml(data, 64, 16, short_training(3))
    fields = run_result_fields(sdml, data)
    assert set(fields["training"]["stages"]) == {"encoder_a", "encoder_b"} and fields["extra"]["quality_scores"] == {}
    write_result(tmp_path, "drcl2024", "toy_sdml", parameters={"seed": 0}, dataset="toy", split="test", **fields)
    read_record(tmp_path / "drcl2024" / "toy_sdml.json")
    # closed-form runs: CCA, multi-set CCA, and the evaluation of fixed (released) features
    for name, result in (("toy_cca", run_cca(data)), ("toy_mcca", run_mcca(data))):
        write_result(tmp_path, "drcl2024", name, parameters={"reg": 1e-3}, dataset="toy", split="test",
                     **result.result_fields())
        written = read_record(tmp_path / "drcl2024" / f"{name}.json")
        assert written["training"]["stopped_by"] == "closed_form" and written["dims"]
        assert set(written["pr_curves"]) == {"a2b", "b2a"}
        check_query_means(written["metrics"], written["per_query"])
    check = evaluate_features(common_space(data.test))
    write_result(tmp_path, "drcl2024", "toy_evaluator_check", parameters={"features": "raw"}, dataset="toy",
                 split="test", **check)
    written = read_record(tmp_path / "drcl2024" / "toy_evaluator_check.json")
    assert written["training"]["stopped_by"] == "closed_form"
    assert set(check_query_means(written["metrics"], written["per_query"])) >= {"map_all_avg", "map_50_avg"}


def test_stratified_split():
    labels = torch.arange(10).repeat_interleave(20)
    parts = stratified_split(labels, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=0)
    assert [len(parts[name]) for name in ("train", "val", "test")] == [140, 20, 40]
    assert len(torch.unique(torch.cat(list(parts.values())))) == 200
    assert torch.bincount(labels[parts["val"]]).tolist() == [2] * 10
    assert torch.equal(parts["test"], stratified_split(labels, {"train": 0.7, "val": 0.1, "test": 0.2}, 0)["test"])


# ---------------------------------------------------------------------------------------------------------------
# CCA
# ---------------------------------------------------------------------------------------------------------------

def correlated_views(n=2000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    x = torch.cat([shared[:, :1] + 0.5 * torch.randn(n, 1, generator=generator, dtype=torch.float64),
                   torch.randn(n, 3, generator=generator, dtype=torch.float64)], 1) \
            @ torch.randn(4, 4, generator=generator, dtype=torch.float64)
    y = torch.cat([shared[:, :1] + 0.5 * torch.randn(n, 1, generator=generator, dtype=torch.float64),
                   torch.randn(n, 2, generator=generator, dtype=torch.float64)], 1)
    return x, y


def test_cca_finds_the_shared_direction_with_whitened_projections():
    x, y = correlated_views()
    proj_x, proj_y, correlations = fit_cca(x, y, reg=0.0)
    expected = 1 / 1.25                                                      # corr(s + e1, s + e2), var(e) = 0.25
    assert float(correlations[0]) == pytest.approx(expected, abs=0.03)
    assert float(correlations[1]) < 0.1
    px, py = proj_x(x).double(), proj_y(y).double()
    empirical = (px[:, 0] * py[:, 0]).mean() / (px[:, 0].std() * py[:, 0].std())
    assert float(empirical) == pytest.approx(float(correlations[0]), abs=1e-3)
    torch.testing.assert_close(torch.cov(px.T), torch.eye(3, dtype=torch.float64), atol=1e-2, rtol=0)


def test_mcca_with_two_views_is_cca():
    x, y = correlated_views(seed=1)
    _, _, correlations = fit_cca(x, y, reg=1e-3)
    _, eigenvalues = fit_mcca({"x": x, "y": y}, dim=2, reg=1e-3)
    torch.testing.assert_close(eigenvalues, 1 + correlations[:2], atol=1e-8, rtol=0)


def test_cca_refuses_unpaired_modalities():
    for method in (run_cca, run_mcca):
        with pytest.raises(ValueError, match="unpaired"):
            method(toy_problem(seed=2, sizes=(100, 100)))


def test_cca_runs_on_the_toy_problem_with_paired_rows():
    paired = toy_problem(seed=4, sizes=(200, 200), paired=True)
    for result in (run_cca(paired), run_mcca(paired)):
        assert set(result.metrics) >= {"map_all_a2b", "map_all_b2a", "map_50_a2b", "map_all_avg", "map_50_avg"}
        check_query_means(result.metrics, result.per_query)
        assert result.metrics["map_all_avg"] > 0.5                         # the classes are linearly visible
        features = next(iter(result.test_features.values()))
        assert features["a"].features.shape[1] == next(iter(result.dims.values()))


# ---------------------------------------------------------------------------------------------------------------
# Real data (the splits the notebook uses)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.data
def test_wikipedia_split_as_in_the_paper(data_root):
    data = wikipedia_data(data_root)
    assert data.sizes() == {"image": {"train": 2173, "val": 231, "test": 462, "dim": 128},
                            "text": {"train": 2173, "val": 231, "test": 462, "dim": 10}}
    train = data.train["image"].features
    torch.testing.assert_close(train.mean(0), torch.zeros(128), atol=1e-4, rtol=0)   # standardised on train


@pytest.mark.data
def test_uci_split_is_stratified_and_seeded(data_root):
    data = uci_mfeat_data(data_root)
    assert len(data.modalities) == 6
    assert {sizes["train"] for sizes in data.sizes().values()} == {1400}
    assert torch.bincount(data.test["pixel"].labels).tolist() == [40] * 10
    assert torch.equal(data.test["pixel"].labels, uci_mfeat_data(data_root).test["pixel"].labels)


def test_unpaired_view_rows_give_every_item_to_one_view():
    labels = torch.arange(10).repeat_interleave(200)
    owned = unpaired_view_rows(labels, ("a", "b", "c"), (4, 2, 1), (0.7, 0.1, 0.2), seed=0)
    every = torch.cat([rows for part in owned.values() for rows in part.values()])
    assert len(every) == 2000 and len(torch.unique(every)) == 2000          # disjoint, and nothing left out
    train = owned["train"]
    assert len(train["a"]) > len(train["b"]) > len(train["c"]) and len(train["a"]) == pytest.approx(800, abs=10)
    assert torch.bincount(labels[train["b"]]).tolist() == [40] * 10            # stratified within each view
    with pytest.raises(ValueError, match="shares"):
        unpaired_view_rows(labels, ("a", "b"), (1, 0), (0.7, 0.1, 0.2))


@pytest.mark.data
def test_xmedia_like_stand_in_is_unpaired_unequal_and_noisier(data_root):
    data = xmedia_like_data(data_root)
    assert not data.paired and data.weak_views == ("fourier", "morphological")
    sizes = data.sizes()
    assert sizes["pixel"]["train"] > sizes["karhunen_loeve"]["train"] > sizes["fourier"]["train"]
    assert sum(size["train"] + size["val"] + size["test"] for size in sizes.values()) == 2000
    assert torch.equal(data.test["fourier"].features, xmedia_like_data(data_root).test["fourier"].features)
    clean = xmedia_like_data(data_root, noise=0.0)
    assert not torch.equal(clean.train["fourier"].features, data.train["fourier"].features)     # noise on weak
    torch.testing.assert_close(clean.train["pixel"].features, data.train["pixel"].features)      # not on strong
    metrics, per_query = map_evaluation(common_space(data.test), paired=False, weak_views=data.weak_views)
    check_query_means(metrics, per_query)


@pytest.mark.data
def test_the_authors_log_matches_our_evaluator_on_their_features(data_root):
    from xmr.data import load_drcl_wikipedia_features

    released, _ = load_drcl_wikipedia_features(data_root)
    features = {view: Modality(released.views[view].double(), released.labels) for view in released.views}
    metrics = evaluate_features(features)["metrics"]
    for key in ("map_all_image2text", "map_all_text2image", "map_all_avg", "map_50_image2text",
                "map_50_text2image", "map_50_avg"):
        assert metrics[key] == pytest.approx(AUTHORS_WIKIPEDIA_LOG[key], abs=2e-4), key
