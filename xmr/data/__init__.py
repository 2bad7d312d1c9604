"""Dataset loaders: Flickr8k and its human relevance judgements, a synthetic shapes set, and labelled multi-view
feature sets."""
from .flickr8k import FLICKR8K_SPLITS, ImageCaptionSplit, load_flickr8k, load_image
from .labelled_views import LabelledViews, load_drcl_wikipedia_features, load_uci_mfeat, load_wikipedia
from .relevance import (
    CrowdJudgements,
    ExpertJudgements,
    RelevanceJudgements,
    load_crowd_judgements,
    load_expert_judgements,
)
from .root import (
    DATA_ENV_VAR,
    CorruptImageError,
    DatasetFormatError,
    DatasetNotFoundError,
    resolve_data_root,
)
from .synthetic import make_synthetic_image_captions

__all__ = [
    "DATA_ENV_VAR",
    "CorruptImageError",
    "CrowdJudgements",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "ExpertJudgements",
    "FLICKR8K_SPLITS",
    "ImageCaptionSplit",
    "LabelledViews",
    "RelevanceJudgements",
    "load_crowd_judgements",
    "load_drcl_wikipedia_features",
    "load_expert_judgements",
    "load_flickr8k",
    "load_image",
    "load_uci_mfeat",
    "load_wikipedia",
    "make_synthetic_image_captions",
    "resolve_data_root",
]

from .paired import CaptionInputs as CaptionInputs  # noqa: E402  (re-exported)
from .paired import PairedFeatures as PairedFeatures  # noqa: E402  (re-exported)

__all__.append("PairedFeatures")
