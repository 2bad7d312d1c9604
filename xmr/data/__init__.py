"""Dataset loaders: Flickr8k, a synthetic shapes set, and labelled multi-view feature sets."""
from .flickr8k import FLICKR8K_SPLITS, ImageCaptionSplit, load_flickr8k, load_image
from .labelled_views import LabelledViews, load_drcl_wikipedia_features, load_uci_mfeat, load_wikipedia
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
    "DatasetFormatError",
    "DatasetNotFoundError",
    "FLICKR8K_SPLITS",
    "ImageCaptionSplit",
    "LabelledViews",
    "load_drcl_wikipedia_features",
    "load_flickr8k",
    "load_image",
    "load_uci_mfeat",
    "load_wikipedia",
    "make_synthetic_image_captions",
    "resolve_data_root",
]

from .paired import PairedFeatures  # noqa: E402

__all__.append("PairedFeatures")
