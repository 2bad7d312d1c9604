"""The retrieval explorer ranks what its model ranks, marks the ground truth, and rejects bad input clearly."""
import pytest
import torch

from xmr.data import CaptionInputs, make_synthetic_image_captions
from xmr.encoders import IMAGE_FEATURE_DIM, TEXT_FEATURE_DIM, DualEncoder, ProjectionHead, TextBackbone, Tower
from xmr.experiment import DualEncoderSettings
from xmr.explore import RetrievalExplorer, TrainedModel


@pytest.fixture(scope="module")
def explorer(tmp_path_factory):
    """A model whose image of index i sits at the mean of its captions' sentence embeddings, so the right
    answers are known: a caption finds its own image first, an image finds its own captions first."""
    split = make_synthetic_image_captions(tmp_path_factory.mktemp("images"), num_images=8)
    backbone = TextBackbone()
    with torch.no_grad():
        captions = backbone(**backbone.tokenize(list(split.captions)))["pooled"]  # (40, 384)
    image_inputs = torch.zeros(len(split), IMAGE_FEATURE_DIM)
    image_inputs[:, :TEXT_FEATURE_DIM] = captions.view(len(split), 5, -1).mean(1)
    image_head = ProjectionHead(IMAGE_FEATURE_DIM, TEXT_FEATURE_DIM)
    text_head = ProjectionHead(TEXT_FEATURE_DIM, TEXT_FEATURE_DIM)
    with torch.no_grad():
        image_head.net[-1].weight.copy_(torch.eye(TEXT_FEATURE_DIM, IMAGE_FEATURE_DIM))
        text_head.net[-1].weight.copy_(torch.eye(TEXT_FEATURE_DIM))
        image_head.net[-1].bias.zero_(), text_head.net[-1].bias.zero_()
    model = DualEncoder(Tower(image_head), Tower(text_head))
    trained = TrainedModel(model, DualEncoderSettings(embed_dim=TEXT_FEATURE_DIM))
    return RetrievalExplorer({"identity": trained}, split, CaptionInputs(image_inputs, captions), top_k=5)


def test_a_caption_finds_its_own_image_first(explorer):
    for image_index in (0, 3, 7):
        caption = explorer.split.captions[image_index * 5 + 1]
        assert explorer.search_text("identity", caption)[0] == image_index
        assert image_index in explorer.true_images(caption)


def test_an_image_finds_its_own_captions(explorer):
    ranked = explorer.search_image("identity", 2)
    assert explorer.true_captions(2) == [10, 11, 12, 13, 14]
    assert len(ranked) == 5 and ranked[0] in explorer.true_captions(2)


def test_free_text_query_has_no_ground_truth_but_is_ranked(explorer):
    assert explorer.true_images("a purple giraffe on the moon") == []
    assert len(explorer.search_text("identity", "a purple giraffe on the moon")) == 5


def test_bad_input_is_rejected_clearly(explorer):
    with pytest.raises(ValueError, match="type a caption"):
        explorer.search_text("identity", "   ")
    with pytest.raises(IndexError, match="outside 0..7"):
        explorer.search_image("identity", 8)
    with pytest.raises(KeyError, match="unknown model"):
        explorer.gallery("other")
    with pytest.raises(ValueError, match="same split"):
        RetrievalExplorer(explorer.models, explorer.split,
                          CaptionInputs(explorer.inputs.image[:4], explorer.inputs.text))


def test_widget_builds_with_a_first_view(explorer):
    import ipywidgets

    widget = explorer.widget()
    assert isinstance(widget, ipywidgets.VBox) and len(widget.children) == 4
