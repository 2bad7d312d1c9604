"""The dual-encoder recipe end to end on a few real Flickr8k images: inputs, training, result file."""
import json
import math

import pytest
import torch

from xmr.data import load_flickr8k
from xmr.encoders import ImageBackbone, TextBackbone
from xmr.experiment import (
    DualEncoderSettings,
    build_dual_encoder,
    load_caption_inputs,
    record_outcome,
    run_dual_encoder,
)
from xmr.features import ExtractionSettings, FeatureCache
from xmr.methods.coder import CODERSettings, run_coder
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
    ordered = regions.sorted_regions(chunk=4)
    assert ordered.image.dtype == torch.float16
    assert bool((ordered.image[:, 1:] <= ordered.image[:, :-1]).all())
    torch.manual_seed(0)
    model = build_dual_encoder(DualEncoderSettings(embed_dim=8, pooling="gpo"))
    torch.testing.assert_close(model.encode_image(ordered.image), model.encode_image(regions.image))
    torch.testing.assert_close(model.encode_text(ordered.text, ordered.text_mask),
                               model.encode_text(regions.text, regions.text_mask))
    with pytest.raises(ValueError, match="region/token"):
        pooled.sorted_regions()
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
    assert set(outcome.test_metrics) >= {"i2t_r1", "t2i_r10", "rsum"}
    assert outcome.trainable_parameters == (1280 + 1) * 16 + (384 + 1) * 16
    path = record_outcome(tmp_path, "timofeev2022", "smoke_infonce", outcome, model_settings, config)
    record = json.loads(path.read_text())
    assert record["parameters"]["loss"] == "infonce" and record["parameters"]["max_epochs"] == 2
    assert record["metrics"]["rsum"] == pytest.approx(outcome.test_metrics["rsum"])
    assert len(record["history"]) == 2 and record["trainable_parameters"] == outcome.trainable_parameters
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
