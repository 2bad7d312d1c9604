"""shi2024: the within-modality losses against plain-loop references, the printed Eq. (2)'s degeneracy, the
positive-set datasets, caption-to-caption retrieval against a naive evaluation, the three stages (the mapping
stage trains only the mapping), and the caption-only test sets."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from xmr.data import DatasetFormatError, DatasetNotFoundError
from xmr.data.test_captions import CaptionSet, load_test_captions, pooled_caption_features
from xmr.encoders import IMAGE_FEATURE_DIM, TEXT_FEATURE_DIM, count_trainable_parameters
from xmr.experiment import CaptionInputs
from xmr.features import ExtractionSettings, FeatureCache
from xmr.methods.semantic_unification import (
    CaptionGroups,
    CaptionRetrievalValidator,
    MappedDualEncoder,
    PairDistanceLoss,
    PretrainedSpace,
    RegionCropViews,
    SemanticContrastiveLoss,
    SemanticSpace,
    SemanticUnificationSettings,
    build_space,
    caption_retrieval_metrics,
    map_spaces,
    printed_term_of_cosine,
    random_crop_weights,
    record_unification,
    run_semantic_unification,
    train_mapping,
    train_text_space,
)
from xmr.metrics import mean_average_precision
from xmr.train import TrainConfig

DTYPES = [torch.float32, torch.float64]


def tolerance(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Plain-loop references, one scalar at a time
# ----------------------------------------------------------------------------------------------------------

def dot(a, b):
    total = 0.0
    for k in range(len(a)):
        total = total + a[k] * b[k]
    return total


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
    """Eq. (2) as printed: sum_i | Euclidean(F_i, F_{i+1}) + dot(F_i, F_{i+1}) | over consecutive set members."""
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


def check_against(reference, loss, features, labels, dtype):
    ours = loss(features, labels)["loss"]
    copy = features.detach().clone().requires_grad_()
    theirs = reference(copy, labels)
    theirs = theirs if torch.is_tensor(theirs) else torch.tensor(theirs, dtype=dtype)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, theirs.to(dtype), **tolerance(dtype))
    (grad_ours,) = torch.autograd.grad(ours, features, allow_unused=True)
    grad_theirs = torch.autograd.grad(theirs, copy, allow_unused=True)[0] if theirs.requires_grad else None
    grad_ours = torch.zeros_like(features) if grad_ours is None else grad_ours
    grad_theirs = torch.zeros_like(copy) if grad_theirs is None else grad_theirs
    torch.testing.assert_close(grad_ours, grad_theirs, **tolerance(dtype))


LABEL_SETS = {
    "pairs": [0, 0, 1, 1, 2, 2],
    "captions of 2 images": [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    "an anchor without positive": [0, 0, 1, 2, 2, 3],
    "all one set": [4, 4, 4, 4],
    "no positives": [0, 1, 2],
    "one item": [0],
}


# ----------------------------------------------------------------------------------------------------------
# Supervised contrastive loss (the working reading of Eqs. 2 and 4)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LABEL_SETS))
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_supervised_contrastive_matches_reference(dtype, name, temperature):
    labels = torch.tensor(LABEL_SETS[name])
    features = unit_features(len(labels), 5, dtype)
    check_against(lambda f, y: reference_supervised_contrastive(f, y, temperature),
                  SemanticContrastiveLoss(temperature), features, labels, dtype)


def test_supervised_contrastive_hand_computed():
    # a = (1, 0) and b = (0, 1) share a label, c = (-1, 0) does not; temperature 1.
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    loss = SemanticContrastiveLoss(temperature=1.0)(features, torch.tensor([0, 0, 1]))["loss"]
    anchor_a = math.log(1 + math.exp(-1))  # -log(e^0 / (e^0 + e^-1))
    anchor_b = math.log(2)  # -log(e^0 / (e^0 + e^0)); c has no positive and is not an anchor
    assert float(loss) == pytest.approx((anchor_a + anchor_b) / 2, abs=1e-12)


def test_supervised_contrastive_without_positives_is_zero_with_zero_gradient():
    features = unit_features(3, 4, torch.float64)
    loss = SemanticContrastiveLoss()(features, torch.tensor([0, 1, 2]))["loss"]
    (gradient,) = torch.autograd.grad(loss, features)
    assert float(loss.detach()) == 0.0 and torch.equal(gradient, torch.zeros_like(gradient))


def test_supervised_contrastive_prefers_aligned_positives():
    negative = torch.tensor([0.0, 1.0])
    loss = SemanticContrastiveLoss(temperature=0.1)

    def with_positive_at(angle):
        positive = torch.tensor([math.cos(angle), math.sin(angle)])
        return float(loss(torch.stack([torch.tensor([1.0, 0.0]), positive, negative]), torch.tensor([0, 0, 1]))["loss"])

    assert with_positive_at(0.0) < with_positive_at(math.pi / 2) < with_positive_at(math.pi)


def test_supervised_contrastive_needs_labels_and_checks_shapes():
    with pytest.raises(ValueError, match="labels"):
        SemanticContrastiveLoss()(unit_features(3, 2, torch.float32))
    with pytest.raises(ValueError, match="shape"):
        SemanticContrastiveLoss()(unit_features(3, 2, torch.float32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="temperature"):
        SemanticContrastiveLoss(temperature=0.0)


# ----------------------------------------------------------------------------------------------------------
# Eq. (2) as printed
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LABEL_SETS))
def test_printed_formula_matches_reference(dtype, name):
    labels = torch.tensor(LABEL_SETS[name])
    features = unit_features(len(labels), 5, dtype, seed=1)
    check_against(reference_printed, SemanticContrastiveLoss(printed_formula=True), features, labels, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_printed_formula_without_labels_uses_every_consecutive_pair(dtype):
    features = unit_features(6, 3, dtype, seed=2)
    check_against(lambda f, y: reference_printed(f), SemanticContrastiveLoss(printed_formula=True), features, None,
                  dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_printed_formula_is_degenerate(dtype):
    """Identical and opposite unit vectors cost the same: the printed loss cannot tell a positive pair from an
    opposite one; its per-pair maximum is in between, at cosine 1/2."""
    loss = SemanticContrastiveLoss(printed_formula=True)
    labels = torch.tensor([0, 0])
    same = torch.tensor([[0.6, 0.8], [0.6, 0.8]], dtype=dtype)
    opposite = torch.tensor([[0.6, 0.8], [-0.6, -0.8]], dtype=dtype)
    assert float(loss(same, labels)["loss"]) == pytest.approx(1.0, abs=1e-12)
    assert float(loss(opposite, labels)["loss"]) == pytest.approx(1.0, abs=1e-12)
    cosines = torch.tensor([-1.0, 0.0, 0.5, 1.0], dtype=dtype)
    torch.testing.assert_close(printed_term_of_cosine(cosines),
                               torch.tensor([1.0, math.sqrt(2), 1.5, 1.0], dtype=dtype))
    # the SupCon reading separates the two cases
    supcon = SemanticContrastiveLoss(temperature=0.1)
    negative = torch.tensor([[0.8, -0.6]], dtype=dtype)
    assert float(supcon(torch.cat([same, negative]), torch.tensor([0, 0, 1]))["loss"]) < float(
        supcon(torch.cat([opposite, negative]), torch.tensor([0, 0, 1]))["loss"])


def test_printed_formula_is_minimised_by_collapse():
    """Every term is at least 1 on the unit sphere, and all features on one point reach that minimum."""
    loss = SemanticContrastiveLoss(printed_formula=True)
    features = unit_features(50, 8, torch.float64, seed=3)
    labels = torch.zeros(50, dtype=torch.long)
    collapsed = F.normalize(torch.ones(50, 8, dtype=torch.float64), dim=-1)
    assert float(loss(collapsed, labels)["loss"]) == pytest.approx(49.0, abs=1e-9)
    assert float(loss(features, labels)["loss"].detach()) > 49.0
    cosines = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    assert float(printed_term_of_cosine(cosines).min()) >= 1.0 - 1e-12


def test_printed_formula_gradient_is_finite_at_identical_features():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    loss = SemanticContrastiveLoss(printed_formula=True)(features, torch.tensor([0, 0]))["loss"]
    (gradient,) = torch.autograd.grad(loss, features)
    assert torch.isfinite(gradient).all()


# ----------------------------------------------------------------------------------------------------------
# Stage 3 loss
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_pair_distance_is_two_minus_two_cosine(dtype):
    image, text = unit_features(5, 4, dtype, seed=4), unit_features(5, 4, dtype, seed=5)
    result = PairDistanceLoss()(image, text)
    expected = sum(2 - 2 * dot(image[i], text[i]) for i in range(5)) / 5
    torch.testing.assert_close(result["loss"], expected, **tolerance(dtype))
    torch.testing.assert_close(result["pair_cosine"], (1 - expected / 2).detach(), **tolerance(dtype))


# ----------------------------------------------------------------------------------------------------------
# Positive sets
# ----------------------------------------------------------------------------------------------------------

def test_caption_groups_hold_all_captions_of_an_image():
    text = torch.arange(30, dtype=torch.float16).view(15, 2)
    groups = CaptionGroups(text, captions_per_image=5)
    item = groups[1]
    assert len(groups) == 3 and item["text"].dtype == torch.float32
    torch.testing.assert_close(item["text"], text[5:10].float())
    assert int(item["label"]) == 1 and set(item) == {"text", "label"}
    with pytest.raises(ValueError):
        CaptionGroups(torch.zeros(7, 2), captions_per_image=5)


def test_random_crop_weights_are_rectangular_averages():
    generator = torch.Generator().manual_seed(0)
    weights = random_crop_weights(200, side=7, min_crop=4, generator=generator).view(200, 7, 7)
    torch.testing.assert_close(weights.sum(dim=(1, 2)), torch.ones(200))
    for crop in weights:
        rows, columns = (crop > 0).any(dim=1), (crop > 0).any(dim=0)
        height, width = int(rows.sum()), int(columns.sum())
        assert 4 <= height <= 7 and 4 <= width <= 7
        assert int((crop > 0).sum()) == height * width  # a full rectangle
        torch.testing.assert_close(crop[crop > 0], torch.full((height * width,), 1.0 / (height * width)))
    with pytest.raises(ValueError, match="min_crop"):
        random_crop_weights(1, side=7, min_crop=8)


def test_full_crop_is_the_pooled_feature():
    grid = torch.randn(3, 49, 6).half()
    views = RegionCropViews(grid, views=2, min_crop=7)
    item = views[2]
    torch.testing.assert_close(item["image"], grid[2].float().mean(dim=0).expand(2, 6))
    assert int(item["label"]) == 2


def test_region_crop_views_use_class_labels_and_check_shapes():
    grid = torch.randn(4, 49, 3)
    views = RegionCropViews(grid, views=3, labels=torch.tensor([5, 5, 6, 6]))
    assert views[1]["image"].shape == (3, 3) and int(views[1]["label"]) == 5
    with pytest.raises(ValueError, match="grid"):
        RegionCropViews(torch.randn(4, 48, 3))
    with pytest.raises(ValueError, match="labels"):
        RegionCropViews(grid, labels=torch.tensor([0, 1]))


def test_semantic_space_flattens_views_item_major():
    space = build_space(SemanticUnificationSettings(text_space_dim=8), "text")
    batch = {"text": torch.randn(3, 5, TEXT_FEATURE_DIM), "label": torch.tensor([7, 8, 9])}
    losses = space.training_losses(batch)
    features = space(batch["text"].flatten(0, 1))
    labels = torch.tensor([7] * 5 + [8] * 5 + [9] * 5)
    torch.testing.assert_close(losses["loss"], space.loss(features, labels)["loss"])
    assert -1 <= float(losses["negative_cosine"]) <= float(losses["positive_cosine"]) + 1


# ----------------------------------------------------------------------------------------------------------
# Caption-to-caption retrieval
# ----------------------------------------------------------------------------------------------------------

def naive_caption_retrieval(features, captions_per_image, cutoffs=(1, 5, 10)):
    """Each caption against all the others, with xmr.metrics' MAP and a plain sort for the hits."""
    count = len(features)
    groups = torch.arange(count) // captions_per_image
    hits = {k: 0 for k in cutoffs}
    precisions = []
    for query in range(count):
        others = [j for j in range(count) if j != query]
        gallery, gallery_groups = features[others], groups[others]
        precisions.append(mean_average_precision(features[query : query + 1], groups[query : query + 1], gallery,
                                                 gallery_groups))
        sims = F.normalize(gallery, dim=1) @ F.normalize(features[query], dim=0)
        order = torch.argsort(sims, descending=True)
        relevant = (gallery_groups[order] == groups[query]).tolist()
        for k in cutoffs:
            hits[k] += any(relevant[:k])
    return {**{f"r{k}": 100.0 * hits[k] / count for k in cutoffs}, "map": sum(precisions) / count}


@pytest.mark.parametrize("captions_per_image", [2, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_caption_retrieval_matches_naive(captions_per_image, dtype):
    generator = torch.Generator().manual_seed(captions_per_image)
    centres = torch.randn(8, 6, generator=generator, dtype=dtype).repeat_interleave(captions_per_image, 0)
    features = centres + 0.9 * torch.randn(centres.shape, generator=generator, dtype=dtype)
    ours = caption_retrieval_metrics(features, captions_per_image)
    theirs = naive_caption_retrieval(features, captions_per_image)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-9)
    chunked = caption_retrieval_metrics(features, captions_per_image, chunk_size=3)
    assert chunked == pytest.approx(ours, abs=1e-12)


def test_caption_retrieval_known_answers_and_ties():
    clustered = torch.eye(3).repeat_interleave(5, 0)  # every image's captions identical, images orthogonal
    assert caption_retrieval_metrics(clustered) == pytest.approx({"r1": 100.0, "r5": 100.0, "r10": 100.0, "map": 1.0})
    collapsed = torch.ones(10, 4)  # all equal: pessimistic ties put the 4 relevant captions after the 5 others
    metrics = caption_retrieval_metrics(collapsed)
    assert metrics["r1"] == 0.0 and metrics["r5"] == 0.0 and metrics["r10"] == 100.0
    assert metrics["map"] == pytest.approx(sum(j / (5 + j) for j in range(1, 5)) / 4)
    with pytest.raises(ValueError):
        caption_retrieval_metrics(torch.randn(7, 3))
    with pytest.raises(ValueError, match="NaN"):
        caption_retrieval_metrics(torch.full((10, 3), float("nan")))


def test_caption_retrieval_validator_reads_a_text_space():
    space = build_space(SemanticUnificationSettings(text_space_dim=8), "text")
    text = torch.randn(20, TEXT_FEATURE_DIM)
    metrics = CaptionRetrievalValidator(text, 5, batch_size=7)(space)
    assert metrics == pytest.approx(caption_retrieval_metrics(space(text).detach(), 5))


# ----------------------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------------------

def synthetic_inputs(num_images, seed):
    """Pooled-like features whose images and captions share a latent (so retrieval is learnable), and a grid."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(num_images, 16, generator=generator)
    grid = (latent @ torch.randn(16, IMAGE_FEATURE_DIM, generator=generator))[:, None, :] \
        + 0.5 * torch.randn(num_images, 49, IMAGE_FEATURE_DIM, generator=generator)
    text = (latent @ torch.randn(16, TEXT_FEATURE_DIM, generator=generator)).repeat_interleave(5, 0)
    text = text + 0.5 * torch.randn(text.shape, generator=generator)
    return CaptionInputs(grid.mean(dim=1), text), grid.half()


SMALL = TrainConfig(max_epochs=2, batch_size=8, lr=1e-3, progress=False, device="cpu")


def test_mapping_stage_trains_only_the_mapping():
    settings = SemanticUnificationSettings(text_space_dim=16, image_space_dim=12)
    train, _ = synthetic_inputs(32, seed=0)
    image_space, text_space = build_space(settings, "image").eval(), build_space(settings, "text").eval()
    before = {name: value.clone() for name, value in
              {**image_space.state_dict(prefix="image."), **text_space.state_dict(prefix="text.")}.items()}
    model, stage = train_mapping(image_space, text_space, settings, SMALL, train, train)
    assert stage.trainable_parameters == count_trainable_parameters(model) == 12 * 16 + 16
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {"mapping.weight", "mapping.bias"}
    after = {**model.image_space.state_dict(prefix="image."), **model.text_space.state_dict(prefix="text.")}
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed in the mapping stage"
    assert not model.image_space.training and not model.text_space.training
    # retrainable on its own: a second mapping on the same frozen spaces, with the distance objective
    again, _ = train_mapping(model.image_space, model.text_space,
                             SemanticUnificationSettings(16, 12, mapping_loss="distance"), SMALL, train)
    assert again.mapping is not model.mapping and again.image_space is model.image_space


def test_mapping_on_cached_space_features_equals_training_through_the_spaces():
    """The fast path (frozen spaces encoded once) ends with the same mapping as a plain fit that runs the spaces
    in every step."""
    from xmr.data import PairedFeatures
    from xmr.methods.semantic_unification import make_mapping_loss
    from xmr.train import fit

    settings = SemanticUnificationSettings(text_space_dim=16, image_space_dim=12)
    train, _ = synthetic_inputs(32, seed=5)
    image_space, text_space = build_space(settings, "image").eval(), build_space(settings, "text").eval()
    config = TrainConfig(max_epochs=3, batch_size=8, lr=1e-2, progress=False, device="cpu", seed=4)
    fast, _ = train_mapping(image_space, text_space, settings, config, train)
    torch.manual_seed(config.seed + 2)
    plain = MappedDualEncoder(image_space, text_space, torch.nn.Linear(12, 16), make_mapping_loss("infonce"))
    fit(plain, PairedFeatures(train.image, train.text, seed=config.seed), TrainConfig(**{**config.__dict__,
                                                                                          "select_by": None}))
    torch.testing.assert_close(fast.mapping.weight, plain.mapping.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.mapping.bias, plain.mapping.bias, rtol=1e-4, atol=1e-5)


def test_mapping_direction_and_unit_norm():
    settings = SemanticUnificationSettings(text_space_dim=16, image_space_dim=12, map_from="text")
    model = MappedDualEncoder(build_space(settings, "image"), build_space(settings, "text"), torch.nn.Linear(16, 12),
                              map_from="text")
    image = model.encode_image(torch.randn(4, IMAGE_FEATURE_DIM))
    text = model.encode_text(torch.randn(4, TEXT_FEATURE_DIM))
    assert image.shape == text.shape == (4, 12)
    torch.testing.assert_close(text.norm(dim=1), torch.ones(4))
    with pytest.raises(ValueError, match="map_from"):
        MappedDualEncoder(PretrainedSpace(), PretrainedSpace(), torch.nn.Linear(2, 2), map_from="both")


def test_three_stages_run_and_record(tmp_path):
    settings = SemanticUnificationSettings(text_space_dim=16, image_space_dim=16)
    train, grid = synthetic_inputs(40, seed=1)
    dev, _ = synthetic_inputs(10, seed=2)
    outcome = run_semantic_unification(settings, SMALL, SMALL, SMALL, train, grid, dev, dev)
    assert set(outcome.stages) == {"text_space", "image_space", "mapping"}
    assert outcome.stages["text_space"].trainable_parameters == TEXT_FEATURE_DIM * 16 + 16
    assert outcome.stages["image_space"].trainable_parameters == IMAGE_FEATURE_DIM * 16 + 16
    assert outcome.trainable_parameters == (TEXT_FEATURE_DIM + IMAGE_FEATURE_DIM) * 16 + 32 + 16 * 16 + 16
    assert outcome.training_time_s > 0 and "rsum" in outcome.test_metrics
    assert "val_map" in outcome.stages["text_space"].training.history[0]
    configs = {"text_space": SMALL, "image_space": SMALL, "mapping": SMALL}
    path = record_unification(tmp_path, "test_run", outcome, settings, configs)
    record = json.loads(path.read_text())
    assert record["paper_id"] == "shi2024" and record["metrics"]["rsum"] == outcome.test_metrics["rsum"]
    assert record["stages"]["mapping"]["trainable_parameters"] == 16 * 16 + 16
    assert {row["stage"] for row in record["history"]} == {"text_space", "image_space", "mapping"}


def test_map_spaces_shares_the_spaces_and_run_costs_reads_both_record_kinds(tmp_path):
    from xmr.experiment import DualEncoderSettings, record_outcome, run_dual_encoder
    from xmr.methods.semantic_unification import run_costs

    settings = SemanticUnificationSettings(text_space_dim=16, image_space_dim=16)
    train, grid = synthetic_inputs(40, seed=6)
    outcome = run_semantic_unification(settings, SMALL, SMALL, SMALL, train, grid, train, train)
    again = map_spaces(outcome.model.image_space, outcome.model.text_space, settings, SMALL, train, train, train)
    assert again.model.text_space is outcome.model.text_space and set(again.stages) == {"mapping"}
    half = map_spaces(PretrainedSpace(), outcome.model.text_space, settings, SMALL, train, train, train)
    assert (half.model.mapping.in_features, half.model.mapping.out_features) == (IMAGE_FEATURE_DIM, 16)
    path = record_unification(tmp_path, "test_unified", outcome, settings, {"mapping": SMALL})
    costs = run_costs(json.loads(path.read_text()))
    assert costs["trainable_parameters"] == outcome.trainable_parameters
    assert costs["mapping_parameters"] == 16 * 16 + 16
    assert costs["training_time_s"] == pytest.approx(outcome.training_time_s)
    joint_settings = DualEncoderSettings(embed_dim=16)
    joint = run_dual_encoder(joint_settings, SMALL, train, train, train)
    joint_costs = run_costs(json.loads(record_outcome(tmp_path, "test_joint", "run", joint, joint_settings,
                                                      SMALL).read_text()))
    assert joint_costs["trainable_parameters"] == (IMAGE_FEATURE_DIM + TEXT_FEATURE_DIM) * 16 + 32
    assert joint_costs["training_time_s"] == pytest.approx(sum(r["train_time_s"] for r in joint.training.history))


def test_pretrained_mapping_maps_backbone_spaces():
    train, _ = synthetic_inputs(32, seed=3)
    outcome = map_spaces(PretrainedSpace(), PretrainedSpace(), SemanticUnificationSettings(), SMALL,
                         train, train, train)
    assert outcome.trainable_parameters == IMAGE_FEATURE_DIM * TEXT_FEATURE_DIM + TEXT_FEATURE_DIM
    assert outcome.test_metrics["rsum"] > 0


@pytest.mark.parametrize("printed_formula", [True, False])
def test_printed_formula_training_collapses_the_space(printed_formula):
    """Captions with a shared component (as sentence embeddings have): the printed loss, which has no negatives,
    puts every caption on one point; the supervised contrastive reading keeps other images' captions apart."""
    generator = torch.Generator().manual_seed(4)
    text = (2.0 * torch.randn(1, TEXT_FEATURE_DIM, generator=generator)
            + torch.randn(40, TEXT_FEATURE_DIM, generator=generator).repeat_interleave(5, 0)
            + torch.randn(200, TEXT_FEATURE_DIM, generator=generator))
    settings = SemanticUnificationSettings(text_space_dim=16, printed_formula=printed_formula)
    config = TrainConfig(max_epochs=15, batch_size=8, lr=1e-2, progress=False, device="cpu")
    space, stage = train_text_space(settings, config, text, 5)
    negative_cosine = stage.training.history[-1]["train_negative_cosine"]
    assert isinstance(space, SemanticSpace) and stage.training.pairs_per_second > 0  # fit counts caption groups
    assert (negative_cosine > 0.99) if printed_formula else (abs(negative_cosine) < 0.2)


# ----------------------------------------------------------------------------------------------------------
# Caption-only test sets
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset,split,num_images", [("coco", "test5k", 5000), ("coco", "test1k", 1000),
                                                       ("flickr30k", "test", 1000), ("flickr30k", "dev", 1014)])
def test_real_caption_sets(data_root, dataset, split, num_images):
    captions = load_test_captions(dataset, split, root=data_root)
    assert len(captions) == num_images and len(captions.captions) == 5 * num_images
    assert all(caption and caption == caption.strip() for caption in captions.captions)
    assert captions.caption_image_index()[-1] == num_images - 1


def test_first_coco_caption_is_the_files_first_line(data_root):
    captions = load_test_captions("coco", "test5k", root=data_root)
    path = data_root / "coco_flickr30k_test_captions" / "coco_precomp" / "testall_caps.txt"
    assert captions.captions[0] == path.read_text(encoding="utf-8").splitlines()[0].strip()
    assert captions.subset(2).captions == captions.captions[:10]


def test_caption_set_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown caption set"):
        load_test_captions("coco", "train", root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="coco_flickr30k_test_captions") as error:
        load_test_captions("coco", "test5k", root=tmp_path)
    assert "SCAN" in str(error.value) and "testall_caps.txt" in str(error.value)
    folder = tmp_path / "coco_flickr30k_test_captions" / "f30k_precomp"
    folder.mkdir(parents=True)
    (folder / "test_caps.txt").write_text("a dog\n" * 7)
    with pytest.raises(DatasetFormatError, match="7 lines"):
        load_test_captions("flickr30k", "test", root=tmp_path)
    (folder / "test_caps.txt").write_text("a dog\n\na cat\na cat\na cat\n")
    with pytest.raises(DatasetFormatError, match="empty caption"):
        load_test_captions("flickr30k", "test", root=tmp_path)
    with pytest.raises(ValueError):
        CaptionSet("x", "y", ("a",) * 4)


def test_pooled_caption_features_are_cached(tmp_path):
    from xmr.encoders import TextBackbone

    captions = CaptionSet("toy", "test", ("a dog runs", "a dog is running", "the dog runs", "dog running",
                                          "a running dog", "a red car", "a car that is red", "red car",
                                          "the car is red", "a small red car"))
    backbone = TextBackbone()
    settings = ExtractionSettings(batch_size=4, progress=False, cache=FeatureCache(tmp_path))
    first = pooled_caption_features(captions, backbone, settings)
    assert first.shape == (10, TEXT_FEATURE_DIM) and len(list(tmp_path.glob("toy-test-*.pt"))) == 1
    expected = backbone(**backbone.tokenize(list(captions.captions)))["pooled"]
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(pooled_caption_features(captions, backbone, settings), first)  # from the cache
    assert caption_retrieval_metrics(first)["map"] == 1.0  # MiniLM separates dogs from cars
