"""shi2024: the stage-3 losses, the spaces and the mapping (which trains only the mapping), the three stages as one
Outcome with the costs Sec. 3.3 is about, and the caption-only test sets. The within-modality loss is tested in
test_losses, caption-to-caption retrieval in test_metrics, the positive sets in test_views."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from xmr.data import CaptionInputs, DatasetFormatError, DatasetNotFoundError
from xmr.data.test_captions import CaptionSet, load_test_captions
from xmr.data.views import RegionCropViews
from xmr.encoders import IMAGE_FEATURE_DIM, TEXT_FEATURE_DIM, count_trainable_parameters
from xmr.features import ExtractionSettings, FeatureCache, pooled_caption_features
from xmr.methods.semantic_unification import (
    PAPER_ID,
    STAGES,
    CaptionRetrievalValidator,
    MappedDualEncoder,
    PairDistanceLoss,
    PretrainedSpace,
    SemanticSpace,
    SemanticUnificationSettings,
    build_space,
    caption_pseudo_classes,
    map_spaces,
    run_semantic_unification,
    time_to_best_s,
    time_to_dev_score,
    time_to_quality,
    train_image_space,
    train_mapping,
    train_text_space,
    trained_space,
    training_costs,
)
from xmr.metrics import caption_retrieval_metrics
from xmr.outcome import record
from xmr.train import HeldOutLossValidator, TrainConfig, TrainResult

DTYPES = [torch.float32, torch.float64]


def tolerance(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


def dot(a, b):
    total = 0.0
    for k in range(len(a)):
        total = total + a[k] * b[k]
    return total


def unit_features(count, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(count, dim, generator=generator, dtype=dtype), dim=-1).requires_grad_()


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
# The spaces
# ----------------------------------------------------------------------------------------------------------

def test_semantic_space_flattens_views_item_major():
    space = build_space(SemanticUnificationSettings(text_space_dim=8), "text")
    batch = {"text": torch.randn(3, 5, TEXT_FEATURE_DIM), "label": torch.tensor([7, 8, 9])}
    losses = space.training_losses(batch)
    features = space(batch["text"].flatten(0, 1))
    labels = torch.tensor([7] * 5 + [8] * 5 + [9] * 5)
    torch.testing.assert_close(losses["loss"], space.loss(features, labels)["loss"])
    assert -1 <= float(losses["negative_cosine"]) <= float(losses["positive_cosine"]) + 1


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


def test_three_stages_run_as_one_outcome_and_record(tmp_path):
    settings = SemanticUnificationSettings(text_space_dim=16, image_space_dim=16)
    train, grid = synthetic_inputs(40, seed=1)
    dev, _ = synthetic_inputs(10, seed=2)
    outcome = run_semantic_unification(settings, SMALL, SMALL, SMALL, train, grid, dev, dev)
    assert tuple(outcome.stages) == STAGES and outcome.training is outcome.stages["mapping"]
    stages = outcome.extra["stages"]
    assert stages["text_space"]["trainable_parameters"] == TEXT_FEATURE_DIM * 16 + 16
    assert stages["image_space"]["trainable_parameters"] == IMAGE_FEATURE_DIM * 16 + 16
    assert stages["mapping"]["trainable_parameters"] == 16 * 16 + 16
    assert [stage["selected_by"] for stage in stages.values()] == ["map", None, SMALL.select_by]
    assert outcome.trainable_parameters == (TEXT_FEATURE_DIM + IMAGE_FEATURE_DIM) * 16 + 32 + 16 * 16 + 16
    assert outcome.preparation_time_s > 0 and "rsum" in outcome.test_metrics
    assert outcome.training_time_s == pytest.approx(sum(stage["training_time_s"] for stage in stages.values()))
    assert "val_map" in outcome.stages["text_space"].history[0]
    assert {f"{name}_config" for name in STAGES} <= set(outcome.parameters)
    # each stage's config as it trained: stage 1 selects by dev caption MAP, stage 2 keeps its last epoch
    assert [outcome.parameters[f"{name}_config"]["select_by"] for name in STAGES] == ["map", None, SMALL.select_by]
    assert outcome.parameters["mapping_in_features"] == outcome.parameters["mapping_out_features"] == 16
    path = record(tmp_path, PAPER_ID, "test_run", outcome)
    written = json.loads(path.read_text())
    assert written["paper_id"] == "shi2024"
    assert written["metrics"]["rsum"] == pytest.approx(outcome.test_metrics["rsum"])
    assert written["metrics"]["val_rsum"] == pytest.approx(outcome.training.best_metrics["rsum"])
    assert written["stages"]["mapping"]["trainable_parameters"] == 16 * 16 + 16
    assert written["trainable_parameters"] == outcome.trainable_parameters
    assert written["training_time_s"] == pytest.approx(outcome.training_time_s)
    assert set(written["training"]["stages"]) == set(STAGES)
    assert [row["stage"] for row in written["history"]] == ["text_space"] * 2 + ["image_space"] * 2 + ["mapping"] * 2


def test_held_out_loss_scores_fixed_crops_and_leaves_the_model_as_found():
    settings = SemanticUnificationSettings(text_space_dim=16, image_space_dim=16)
    _, grid = synthetic_inputs(20, seed=3)
    space = build_space(settings, "image").train()
    validate = HeldOutLossValidator(RegionCropViews(grid, 2, 4), batch_size=8, seed=0)
    assert len(validate.batches) == 2  # full batches only: 20 items make two of 8
    first = validate(space)
    torch.manual_seed(123)  # the crops were drawn once: the global generator does not change them
    assert validate(space) == first and space.training
    again = HeldOutLossValidator(RegionCropViews(grid, 2, 4), batch_size=8, seed=1)
    assert again(space) != first["loss"]  # another seed, other crops
    with torch.no_grad():
        space.head.net[-1].weight.mul_(3.0)  # another model, another loss
    assert validate(space)["loss"] != first["loss"]
    with pytest.raises(ValueError, match="at least 2"):
        HeldOutLossValidator(RegionCropViews(grid[:1], 2, 4), batch_size=8)


def test_stage_two_validates_on_held_out_crops_unless_it_trains_on_classes():
    settings = SemanticUnificationSettings(text_space_dim=16, image_space_dim=16)
    _, grid = synthetic_inputs(32, seed=4)
    _, dev_grid = synthetic_inputs(16, seed=5)
    config = dataclasses.replace(SMALL, max_epochs=6, patience=2)
    _, stage = train_image_space(settings, config, grid, validation_grid=dev_grid)
    assert stage.selected_by == "loss" and stage.config.select_mode == "min"
    losses = [row["val_loss"] for row in stage.training.history]
    assert stage.training.best_epoch == 1 + losses.index(min(losses))
    assert stage.training.stopped_by in ("plateau", "budget")
    labels = torch.arange(32) % 4
    _, classes = train_image_space(settings, config, grid, labels, validation_grid=dev_grid)
    assert classes.selected_by is None and "val_loss" not in classes.training.history[0]


def test_map_spaces_shares_the_spaces_and_training_costs_of_both_run_kinds():
    from xmr.experiment import DualEncoderSettings, run_dual_encoder

    settings = SemanticUnificationSettings(text_space_dim=16, image_space_dim=16)
    train, grid = synthetic_inputs(40, seed=6)
    outcome = run_semantic_unification(settings, SMALL, SMALL, SMALL, train, grid, train, train)
    again = map_spaces(outcome.model.image_space, outcome.model.text_space, settings, SMALL, train, train, train)
    assert again.model.text_space is outcome.model.text_space and tuple(again.stages) == ("mapping",)
    assert "mapping_config" in again.parameters and "text_space_config" not in again.parameters
    half = map_spaces(PretrainedSpace(), outcome.model.text_space, settings, SMALL, train, train, train)
    assert (half.model.mapping.in_features, half.model.mapping.out_features) == (IMAGE_FEATURE_DIM, 16)

    costs, mapping = training_costs(outcome), outcome.stages["mapping"]
    assert costs["trainable_parameters"] == outcome.trainable_parameters
    assert costs["retrain_parameters"] == 16 * 16 + 16
    assert costs["training_time_s"] == pytest.approx(outcome.training_time_s)
    assert costs["retrain_time_s"] == pytest.approx(sum(row["train_time_s"] for row in mapping.history)
                                                    + outcome.preparation_time_s)
    assert time_to_best_s(mapping) == pytest.approx(sum(row["train_time_s"]
                                                        for row in mapping.history[:mapping.best_epoch]))
    assert time_to_best_s(outcome.stages["image_space"]) == pytest.approx(  # no selection: the last epoch
        sum(row["train_time_s"] for row in outcome.stages["image_space"].history))
    assert costs["retrain_time_to_best_s"] == pytest.approx(time_to_best_s(mapping) + outcome.preparation_time_s)
    assert costs["time_to_best_s"] <= costs["training_time_s"]
    assert training_costs(again)["retrain_parameters"] == training_costs(again)["trainable_parameters"]

    joint = run_dual_encoder(DualEncoderSettings(embed_dim=16), SMALL, train, train, train)
    joint_costs = training_costs(joint)  # retraining the cross-modal part of joint training is retraining it all
    assert joint_costs["trainable_parameters"] == joint_costs["retrain_parameters"] \
        == (IMAGE_FEATURE_DIM + TEXT_FEATURE_DIM) * 16 + 32
    assert joint_costs["training_time_s"] == joint_costs["retrain_time_s"] \
        == pytest.approx(sum(row["train_time_s"] for row in joint.training.history))
    assert joint_costs["time_to_best_s"] == joint_costs["retrain_time_to_best_s"] == time_to_best_s(joint.training)


def test_reused_spaces_are_not_retrained_and_are_recorded_as_they_trained():
    settings = SemanticUnificationSettings(text_space_dim=16, image_space_dim=16)
    train, grid = synthetic_inputs(40, seed=7)
    first = run_semantic_unification(settings, SMALL, SMALL, SMALL, train, grid, train, train)
    before = {name: value.clone() for name, value in first.model.text_space.state_dict().items()}
    labels = torch.arange(40) % 4
    second = run_semantic_unification(settings, SMALL, SMALL, SMALL, train, grid, train, train, image_labels=labels,
                                      text_space=trained_space(first, "text_space"))
    assert second.model.text_space is first.model.text_space
    assert second.model.image_space is not first.model.image_space
    for name, value in second.model.text_space.state_dict().items():
        assert torch.equal(value, before[name])
    assert second.stages["text_space"] is first.stages["text_space"]
    assert second.extra["stages"]["text_space"] == first.extra["stages"]["text_space"]
    assert second.parameters["text_space_config"] == first.parameters["text_space_config"]
    assert second.trainable_parameters == first.trainable_parameters
    text_to_image = SemanticUnificationSettings(text_space_dim=16, image_space_dim=16, map_from="text")
    third = run_semantic_unification(text_to_image, SMALL, SMALL, SMALL, train, grid, train, train,
                                     text_space=trained_space(first, "text_space"),
                                     image_space=trained_space(first, "image_space"))
    assert third.model.image_space is first.model.image_space and third.model.map_from == "text"
    assert third.extra["stages"]["image_space"] == first.extra["stages"]["image_space"]
    assert third.parameters["image_space_config"]["select_by"] is None
    with pytest.raises(ValueError, match="stage"):
        trained_space(first, "mapping")


def test_time_to_quality_counts_earlier_stages_in_full():
    settings = SemanticUnificationSettings(text_space_dim=16, image_space_dim=16)
    train, grid = synthetic_inputs(40, seed=8)
    outcome = run_semantic_unification(settings, SMALL, SMALL, SMALL, train, grid, train, train)
    mapping = outcome.stages["mapping"]
    target = mapping.history[0]["val_rsum"]
    costs = time_to_quality(outcome, target)
    earlier = sum(row["train_time_s"] for name in ("text_space", "image_space")
                  for row in outcome.stages[name].history)
    first_epoch = mapping.history[0]["train_time_s"] + outcome.preparation_time_s
    assert costs["epochs_to_dev_rsum"] == 1
    assert costs["retrain_time_to_dev_rsum_s"] == pytest.approx(first_epoch)
    assert costs["time_to_dev_rsum_s"] == pytest.approx(earlier + first_epoch)
    assert time_to_quality(outcome, max(row["val_rsum"] for row in mapping.history) + 1) is None


def test_time_to_dev_score_counts_steps_up_to_the_first_epoch_at_the_target():
    result = TrainResult(history=[{"epoch": 1, "train_time_s": 0.5, "val_rsum": 100.0},
                                  {"epoch": 2, "train_time_s": 0.25, "val_rsum": 150.0},
                                  {"epoch": 3, "train_time_s": 1.0, "val_rsum": 140.0}])
    assert time_to_dev_score(result, 100.0) == (0.5, 1)
    assert time_to_dev_score(result, 120.0) == (0.75, 2)
    assert time_to_dev_score(result, 150.0) == (0.75, 2)
    assert time_to_dev_score(result, 150.1) is None
    assert time_to_dev_score(result, 0.0, metric="map") is None  # a metric it never validated


def test_caption_pseudo_classes_group_images_whose_captions_agree():
    generator = torch.Generator().manual_seed(0)
    topics = F.normalize(torch.randn(3, TEXT_FEATURE_DIM, generator=generator), dim=-1)
    truth = torch.arange(30) % 3
    text = 5 * topics[truth].repeat_interleave(5, 0) + 0.3 * torch.randn(150, TEXT_FEATURE_DIM, generator=generator)
    labels = caption_pseudo_classes(text, 5, 3, seed=1)
    assert labels.shape == (30,)
    # the same partition as the topics, whatever the cluster numbering
    assert all(len(set(labels[truth == topic].tolist())) == 1 for topic in range(3))
    assert len(set(labels.tolist())) == 3
    assert torch.equal(labels, caption_pseudo_classes(text, 5, 3, seed=1))
    with pytest.raises(ValueError, match="per image"):
        caption_pseudo_classes(text[:7], 5, 3)


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
