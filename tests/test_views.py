"""Positive sets of one modality (xmr.data.views): caption groups, and crops of a region grid whose full crop is
the pooled feature."""
import pytest
import torch

from xmr.data.views import CaptionGroups, RegionCropViews, random_crop_weights


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
    with pytest.raises(ValueError, match="views"):
        RegionCropViews(grid, views=0)
