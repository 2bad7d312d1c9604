"""The dual-encoder recipe end to end on a few real Flickr8k images: inputs, training, result file; the result
file of any Outcome (xmr.outcome.record) read back by xmr.results.read_record."""
import dataclasses
import math

import pytest
import torch

from xmr.data import CaptionInputs, load_flickr8k
from xmr.encoders import IMAGE_FEATURE_DIM, TEXT_FEATURE_DIM, ImageBackbone, TextBackbone, sort_region_inputs
from xmr.experiment import DualEncoderSettings, build_dual_encoder, run_dual_encoder
from xmr.features import ExtractionSettings, FeatureCache, load_caption_inputs
from xmr.methods.coder import CODERSettings, run_coder
from xmr.outcome import Outcome, record
from xmr.results import read_record
from xmr.train import TrainConfig


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return ExtractionSettings(batch_size=16, progress=False, cache=FeatureCache(tmp_path_factory.mktemp("cache")))


def test_inputs_for_frozen_and_fine_tuned_tops(data_root, settings):
    frozen = load_caption_inputs("test", num_images=6, root=data_root, settings=settings)
    assert frozen.image.shape == (6, 1280) and frozen.text.shape == (30, 384) and frozen.text_mask is None
    top = load_caption_inputs("test", image_top=1, text_top=1, num_images=6, root=data_root, settings=settings)
    assert top.image.shape == (6, 192, 7, 7) and top.text.shape[:1] == (30,) and top.text_mask is not None


def test_region_inputs_sort_once_and_feed_gpo_towers(data_root, settings):
    regions = load_caption_inputs("test", num_images=6, root=data_root, settings=settings, regions=True)
    assert regions.image.shape == (6, 49, 1280) and regions.text.shape[:1] == (30,)
    assert regions.image.dtype == torch.float16 and regions.text_mask.shape == regions.text.shape[:2]
    pooled = load_caption_inputs("test", num_images=6, root=data_root, settings=settings)
    torch.testing.assert_close(regions.image.float().mean(dim=1), pooled.image, atol=2e-3, rtol=2e-3)  # the grid's mean
    ordered = sort_region_inputs(regions, chunk=4)
    assert ordered.image.dtype == torch.float16
    assert bool((ordered.image[:, 1:] <= ordered.image[:, :-1]).all())
    torch.manual_seed(0)
    model = build_dual_encoder(DualEncoderSettings(embed_dim=8, pooling="gpo"))
    torch.testing.assert_close(model.encode_image(ordered.image), model.encode_image(regions.image))
    torch.testing.assert_close(model.encode_text(ordered.text, ordered.text_mask),
                               model.encode_text(regions.text, regions.text_mask))
    with pytest.raises(ValueError, match="sort_region_inputs needs region/token inputs"):
        sort_region_inputs(pooled)
    mixed = load_caption_inputs("test", image_top=1, num_images=6, root=data_root, settings=settings, regions=True)
    assert mixed.image.shape == (6, 192, 7, 7) and torch.equal(mixed.text, regions.text)  # lower image, tokens
    with pytest.raises(ValueError, match="pooling"):
        build_dual_encoder(DualEncoderSettings(pooling="max"))


@pytest.mark.parametrize("aggregation", ["mean", "gpo"])
def test_coder_fine_tunes_the_backbone_tops_on_cached_activations(data_root, settings, aggregation):
    """The GPU file's end-to-end setting at a small size: CODER (every term) with both tops trainable."""
    inputs = load_caption_inputs("test", image_top=1, text_top=1, num_images=6, root=data_root, settings=settings)
    captions = load_flickr8k("test", root=data_root).subset(6).captions
    coder = CODERSettings(embed_dim=8, queue_size=10, num_concepts=5, num_clusters=2, kmeans_iterations=3,
                          aggregation=aggregation)
    config = TrainConfig(max_epochs=1, batch_size=10, lr=1e-3, device="cpu", progress=False)
    outcome = run_coder(coder, config, inputs, inputs, inputs, captions, torch.randn(5, 16), image_top=1, text_top=1)
    assert math.isfinite(outcome.test_metrics["rsum"]) and outcome.training.best_epoch == 1
    assert outcome.parameters["image_top"] == 1 and outcome.parameters["aggregation"] == aggregation
    for upper, pretrained in ((outcome.model.image_backbone.upper, ImageBackbone(trainable_top=1)),
                              (outcome.model.text_backbone.upper, TextBackbone(trainable_top=1))):
        trained = dict(upper.named_parameters())
        changed = [name for name, value in pretrained.named_parameters()
                   if value.requires_grad and not torch.equal(value, trained[name])]
        assert changed, f"{type(upper).__name__}'s top was not trained"


def test_fine_tuning_trains_only_the_top_and_the_heads():
    model = build_dual_encoder(DualEncoderSettings(loss="max_triplet", embed_dim=32, image_top=1, text_top=1))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(name.startswith("image_tower.upper.upper.") for name in trainable)
    assert any(".encoder.layer.5." in name for name in trainable)
    assert not any(".encoder.layer.4." in name or "image_tower.upper.lower." in name for name in trainable)
    assert model.loss.max_violation


def test_run_and_record(data_root, settings, tmp_path):
    train = load_caption_inputs("train", num_images=24, root=data_root, settings=settings)
    dev = load_caption_inputs("dev", num_images=8, root=data_root, settings=settings)
    test = load_caption_inputs("test", num_images=8, root=data_root, settings=settings)
    model_settings = DualEncoderSettings(loss="infonce", embed_dim=16)
    config = TrainConfig(max_epochs=2, batch_size=8, lr=1e-3, progress=False, device="cpu")
    outcome = run_dual_encoder(model_settings, config, train, dev, test)
    assert isinstance(outcome, Outcome) and list(outcome.stages) == ["train"]
    assert set(outcome.test_metrics) >= {"i2t_r1", "t2i_r10", "rsum"}
    assert outcome.trainable_parameters == (1280 + 1) * 16 + (384 + 1) * 16
    path = record(tmp_path, "timofeev2022", "smoke_infonce", outcome)
    written = read_record(path)
    assert written["parameters"]["loss"] == "infonce" and written["parameters"]["max_epochs"] == 2
    assert written["metrics"]["rsum"] == pytest.approx(outcome.test_metrics["rsum"])
    assert len(written["history"]) == 2 and written["trainable_parameters"] == outcome.trainable_parameters
    # Same seed, same result: the recipe is deterministic on CPU.
    again = run_dual_encoder(model_settings, config, train, dev, test)
    assert again.test_metrics == outcome.test_metrics
    torch.testing.assert_close(outcome.model.image_tower.projection.net[1].weight,
                               again.model.image_tower.projection.net[1].weight, rtol=0, atol=0)


def test_new_queries_embed_like_the_cached_split(data_root, settings):
    """A caption or image of the split, encoded as a free query, lands where its cached features put it."""
    from xmr.data import load_flickr8k
    from xmr.experiment import encode_new_captions, encode_new_images
    from xmr.train import encode

    split = load_flickr8k("test", root=data_root).subset(3)
    for tops in ((0, 0), (1, 1)):
        model_settings = DualEncoderSettings(embed_dim=8, image_top=tops[0], text_top=tops[1])
        model = build_dual_encoder(model_settings).eval()
        cached = load_caption_inputs("test", *tops, num_images=3, root=data_root, settings=settings)
        images = encode(model.encode_image, cached.image)
        texts = encode(model.encode_text, cached.text, cached.text_mask)
        torch.testing.assert_close(encode_new_images(model, model_settings, list(split.image_paths[:2])),
                                   images[:2], atol=2e-3, rtol=0)  # the cache stores float16
        torch.testing.assert_close(encode_new_captions(model, model_settings, list(split.captions[:2])),
                                   texts[:2], atol=2e-3, rtol=0)


def _synthetic_split(generator, num_images):
    """Pooled inputs of the backbones' sizes where each image's captions lie near it (its first dimensions)."""
    image = torch.randn(num_images, IMAGE_FEATURE_DIM, generator=generator)
    text = image[:, :TEXT_FEATURE_DIM].repeat_interleave(5, 0)
    text = text + 0.5 * torch.randn(text.shape, generator=generator)
    return CaptionInputs(image, text)


def test_record_writes_a_file_read_record_reads_back(generator, tmp_path):
    train, dev, test = (_synthetic_split(generator, size) for size in (16, 8, 8))
    model_settings = DualEncoderSettings(embed_dim=8)
    config = TrainConfig(max_epochs=2, batch_size=8, lr=1e-3, progress=False, device="cpu")
    outcome = run_dual_encoder(model_settings, config, train, dev, test)
    assert outcome.parameters == {**dataclasses.asdict(model_settings), **dataclasses.asdict(config)}
    path = record(tmp_path, "timofeev2022", "synthetic", outcome, extra_parameters={"note": "synthetic"})
    assert path == tmp_path / "timofeev2022" / "synthetic.json"
    written = read_record(path)
    assert (written["paper_id"], written["run_name"], written["split"]) == ("timofeev2022", "synthetic", "test")
    assert written["parameters"]["note"] == "synthetic" and written["parameters"]["embed_dim"] == 8
    metrics = written["metrics"]
    assert {name: metrics[name] for name in outcome.test_metrics} == pytest.approx(outcome.test_metrics)
    validation = {name: value for name, value in metrics.items() if name.startswith("val_")}
    assert validation == pytest.approx({f"val_{name}": value for name, value in outcome.training.best_metrics.items()})
    assert validation["val_rsum"] == pytest.approx(outcome.training.best_metrics["rsum"]) and len(validation) > 1
    assert written["training"] == pytest.approx(outcome.training_record())
    assert written["training"]["best_epoch"] == outcome.training.best_epoch
    assert written["training"]["pairs_per_second"] == pytest.approx(outcome.training.pairs_per_second)
    assert written["per_query"] == outcome.per_query
    assert len(written["per_query"]["caption_ranks"]["t2i"]) == 40
    assert len(written["history"]) == 2 and written["trainable_parameters"] == outcome.trainable_parameters
    # Two stages: the training record holds each stage's, the history numbers the epochs on.
    staged = Outcome(outcome.model, outcome.parameters, {"warmup": outcome.training, "main": outcome.training},
                     outcome.test_metrics, outcome.per_query, outcome.trainable_parameters, "cpu")
    written = read_record(record(tmp_path, "timofeev2022", "synthetic_staged", staged))
    assert list(written["training"]["stages"]) == ["warmup", "main"] and written["training"]["epochs_run"] == 4
    assert [row["epoch"] for row in written["history"]] == [1, 2, 3, 4]
    assert [row["stage"] for row in written["history"]] == ["warmup", "warmup", "main", "main"]


def test_start_carries_over_the_trained_heads(generator):
    """A run started from a trained model begins where it ended (a tiny rate keeps it there); tops it did not
    train start pretrained, and a model of another size does not fit."""
    train, dev, test = (_synthetic_split(generator, size) for size in (16, 8, 8))
    config = TrainConfig(max_epochs=2, batch_size=8, lr=1e-3, progress=False, device="cpu")
    first = run_dual_encoder(DualEncoderSettings(embed_dim=8), config, train, dev, test)
    still = dataclasses.replace(config, max_epochs=1, lr=1e-12)
    again = run_dual_encoder(DualEncoderSettings(embed_dim=8), still, train, dev, test, start=first.model)
    for name, value in first.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[name], value, atol=1e-6, rtol=0)
    assert again.test_metrics == pytest.approx(first.test_metrics)
    topped = build_dual_encoder(DualEncoderSettings(embed_dim=8, image_top=1))
    missing, unexpected = topped.load_state_dict(first.model.state_dict(), strict=False)
    assert not unexpected and missing and all(".upper." in key for key in missing)
    with pytest.raises((ValueError, RuntimeError)):
        run_dual_encoder(DualEncoderSettings(embed_dim=16), still, train, dev, test, start=first.model)
