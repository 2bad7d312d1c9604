"""Where each dataset comes from and what a complete copy holds: the registry behind ``python -m xmr.data``.

A :class:`Dataset` names its folder under the data root, the files to download (:class:`Resource`: an official
URL, or a public mirror where the original sits behind a form), how archive members map into that folder
(:class:`Extract`), and what a complete copy holds (:class:`FileCheck`, :class:`ImageFolderCheck`), so that
``check`` verifies the unpacked content whatever route the files took.

Checksums. The build machines reach no internet, so no remote archive's SHA-256 could be computed here: every
``Resource.sha256`` is ``None`` and ``Resource.sha256_note`` says so (``fetch`` prints the hash of what it
downloaded, to be recorded here). What *is* pinned is the unpacked content: line counts and SHA-256 of the small
text files (split lists, caption files), array shapes, row and column counts and image counts, all computed
from the reference copy in ``../shared/data`` (kept in the original formats).

Tests and private mirrors point every download elsewhere with ``fetch(..., mirror=URL)`` or ``$XMR_DATA_MIRROR``:
each resource is then fetched from ``URL/<Resource.filename>``; :func:`with_base_url` does the same on a registry.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

NO_REMOTE_CHECKSUM = ("unknown: the file could not be downloaded on the (offline) machine that wrote this "
                      "registry; `check` verifies the unpacked content instead")


@dataclass(frozen=True)
class Extract:
    """Which members of a download go where in the dataset folder.

    ``pattern`` is an ``fnmatch`` pattern matched against the last ``n`` components of a member's path, ``n``
    being the number of components of the pattern (so ``"coco_precomp/test_caps.txt"`` matches
    ``data/coco_precomp/test_caps.txt``). The matched components are written under ``into``. ``convert`` names
    a converter in ``xmr.data.fetch.CONVERTERS`` that rewrites the member (name and content) on the way.
    macOS metadata (``__MACOSX/``, ``._*``) never matches.
    """

    pattern: str
    into: str = ""
    convert: str | None = None


@dataclass(frozen=True)
class Resource:
    """One file to download."""

    filename: str                      # name in the download cache and on a mirror (unique in the registry)
    url: str                           # where fetch downloads it from
    kind: str                          # "zip", "tar" (any compression) or "file" (used as is)
    extract: tuple[Extract, ...]       # what to keep; every pattern must match at least one member
    sha256: str | None = None          # of the downloaded file; None where unknown (see sha256_note)
    sha256_note: str = NO_REMOTE_CHECKSUM
    size: str = ""                     # approximate download size, for the user
    note: str = ""                     # provenance: original vs mirror, forms, alternatives


@dataclass(frozen=True)
class FileCheck:
    """One file of a complete copy, relative to the dataset folder, and what its content must be."""

    path: str
    lines: int | None = None                          # non-empty lines
    sha256: str | None = None                         # of the file (CRLF line ends are accepted as LF)
    mat: tuple[tuple[str, tuple[int, ...]], ...] = ()  # MATLAB variables and their shapes
    csv_rows: int | None = None                       # data rows after the header row
    csv_columns: int | None = None                    # columns, the class column included
    class_block: int | None = None                    # last column = row // class_block (classes in blocks)


@dataclass(frozen=True)
class ImageFolderCheck:
    """An image folder (the first of ``folders`` present) with ``count`` images, holding every listed id."""

    folders: tuple[str, ...]
    count: int
    suffix: str = ".jpg"
    ids_from: tuple[str, ...] = ()  # files (in the dataset folder) listing image file names, one a line


@dataclass(frozen=True)
class Dataset:
    name: str                      # the name on the command line
    folder: str                    # folder under the data root that the loaders read
    title: str
    loader: str                    # the function that reads it
    citation: str
    homepage: str
    resources: tuple[Resource, ...]
    checks: tuple[FileCheck | ImageFolderCheck, ...]
    note: str = ""


def lines_sha(path: str, lines: int, sha256: str) -> FileCheck:
    return FileCheck(path, lines=lines, sha256=sha256)


# --- Flickr8k ---------------------------------------------------------------------------------------------------

FLICKR8K_FORM = "https://forms.illinois.edu/sec/1713398"
FLICKR8K_MIRROR = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"
FLICKR8K_TEXT_FILES = ("Flickr8k.token.txt", "Flickr8k.lemma.token.txt", "Flickr_8k.trainImages.txt",
                       "Flickr_8k.devImages.txt", "Flickr_8k.testImages.txt", "ExpertAnnotations.txt",
                       "CrowdFlowerAnnotations.txt", "readme.txt")
FLICKR8K_SPLIT_FILES = ("Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt", "Flickr_8k.testImages.txt")

FLICKR8K = Dataset(
    name="flickr8k",
    folder="flickr8k",
    title="Flickr8k: 8,091 images, 5 captions each, the official 6000/1000/1000 split",
    loader="xmr.data.load_flickr8k",
    citation=("M. Hodosh, P. Young and J. Hockenmaier (2013), 'Framing Image Description as a Ranking Task', "
              "JAIR 47:853-899"),
    homepage=FLICKR8K_FORM,
    note=("The original release is sent after a request form (" + FLICKR8K_FORM + "); fetch downloads the two "
          "archives of that release from the widely used public mirror of J. Brownlee (GitHub releases of "
          "jbrownlee/Datasets). Research use only; cite Hodosh et al. 2013. Images land in Flicker8k_Dataset/ "
          "(sic) at full resolution; the loader resizes them."),
    resources=(
        Resource(
            filename="Flickr8k_Dataset.zip",
            url=f"{FLICKR8K_MIRROR}/Flickr8k_Dataset.zip",
            kind="zip",
            extract=(Extract("*.jpg", into="Flicker8k_Dataset"),),  # whatever the archive's top folder
            size="about 1 GB",
            note=("mirror of the original Flickr8k_Dataset.zip (the original: the links e-mailed after the form "
                  + FLICKR8K_FORM + "); images in Flicker8k_Dataset/ (sic)"),
        ),
        Resource(
            filename="Flickr8k_text.zip",
            url=f"{FLICKR8K_MIRROR}/Flickr8k_text.zip",
            kind="zip",
            extract=tuple(Extract(name) for name in FLICKR8K_TEXT_FILES),
            size="about 2 MB",
            note="mirror of the original Flickr8k_text.zip (captions, splits, expert and crowd judgements)",
        ),
    ),
    checks=(
        lines_sha("Flickr8k.token.txt", 40460, "9b8608b02da9040581f1e3d4c8738db1fb6f63314342100432adc3962f77d71a"),
        lines_sha("Flickr_8k.trainImages.txt", 6000,
                  "e330ddd5156a4c2d2e2b67bc587e70e588f2d132bd8a10dc54dcb71e58115d8e"),
        lines_sha("Flickr_8k.devImages.txt", 1000,
                  "18ba829f47f6df1cb830bf7f0506e2ddf333818925299babbd1bbcaf50fdc504"),
        lines_sha("Flickr_8k.testImages.txt", 1000,
                  "c0924146c131458ceba45da59670fe9520eadce1e5cafffa16a817672a9b1f17"),
        lines_sha("ExpertAnnotations.txt", 5822, "56c2b1a9e1a46ba73b8b151abd7c3c8b1676fbacadb559d0c2eb6524b166cf4f"),
        lines_sha("CrowdFlowerAnnotations.txt", 47830,
                  "72a74aef443df4848fb1f3c23654ee9e0ca5b528198f68e2efedf11b6ca61260"),
        ImageFolderCheck(folders=("images", "Flicker8k_Dataset", "Flickr8k_Dataset"), count=8091,
                         ids_from=FLICKR8K_SPLIT_FILES),
    ),
)

# --- Wikipedia (Rasiwasia et al.) -------------------------------------------------------------------------------

WIKIPEDIA_HOME = "http://www.svcl.ucsd.edu/projects/crossmodal/"
WIKIPEDIA = Dataset(
    name="wikipedia",
    folder="wikipedia",
    title="Wikipedia cross-modal dataset: 2,866 pairs, 10 categories, SIFT BoW / LDA features, 2173/693 split",
    loader="xmr.data.load_wikipedia",
    citation=("N. Rasiwasia et al., 'A New Approach to Cross-Modal Multimedia Retrieval', ACM MM 2010"),
    homepage=WIKIPEDIA_HOME,
    note="Only the features and lists the loader reads are kept (the archive also holds the images and texts).",
    resources=(
        Resource(
            filename="wikipedia_dataset.zip",
            url=f"{WIKIPEDIA_HOME}wikipedia_dataset.zip",
            kind="zip",
            extract=(Extract("raw_features.mat"), Extract("trainset_txt_img_cat.list"),
                     Extract("testset_txt_img_cat.list"), Extract("categories.list")),
            note="the SVCL project page's archive (URL as linked from the page; not reachable from here)",
        ),
    ),
    checks=(
        FileCheck("raw_features.mat", mat=(("I_tr", (2173, 128)), ("I_te", (693, 128)),
                                           ("T_tr", (2173, 10)), ("T_te", (693, 10)))),
        lines_sha("trainset_txt_img_cat.list", 2173,
                  "30c1ba8afbe90da5986de9b12496b6dd2e4680d3876b79ab7aae2e437d5819a3"),
        lines_sha("testset_txt_img_cat.list", 693, "ec3123ee31cc89dd95fbeb23eb73b2ecfd1d8909bba863723471aad99408c1eb"),
        lines_sha("categories.list", 10, "4929f3ee00e9de9ffe11f9ab18fc8919b0f6182cc801309409df2f2d05e2b0f5"),
    ),
)

# --- DRCL's released Wikipedia features -------------------------------------------------------------------------

# The paper (Pu et al., IEEE TMM) gives https://github.com/perquisite/DRCL as its code; the copy of the authors'
# repository that could be inspected from here, QinYang79/DRCL, holds these files at this commit.
DRCL_REPO = "https://github.com/QinYang79/DRCL"
DRCL_COMMIT = "1c5f92ca6e6b6d3f1596474ddc676ea4853f3afd"
DRCL_RAW = f"https://raw.githubusercontent.com/QinYang79/DRCL/{DRCL_COMMIT}"
DRCL_FILES = {"wiki_0.mat": "features", "wiki_1.mat": "features", "W_2048X10wiki0.mat": "PriorW",
              "W_2048X10wiki1.mat": "PriorW", "W_2048X10wiki.mat": "PriorW"}
DRCL_FEATURE_MAT = (("test_fea", (462, 2048)), ("test_lab", (1, 462)), ("test_pred", (462, 10)))

DRCL_WIKIPEDIA_FEATURES = Dataset(
    name="drcl_wikipedia_features",
    folder="drcl_wikipedia_features",
    title="DRCL's released Wikipedia test features (462 x 2048 per modality) and learned priors W (2048 x 10)",
    loader="xmr.data.load_drcl_wikipedia_features",
    citation=("R. Pu, Y. Qin, D. Peng, X. Song and H. Zheng, 'Deep Reversible Consistency Learning for Cross-modal "
              "Retrieval', IEEE Transactions on Multimedia (arXiv:2501.05686)"),
    homepage=DRCL_REPO,
    note=("The paper's code link is https://github.com/perquisite/DRCL; the files are fetched from the authors' "
          f"repository {DRCL_REPO} pinned at commit {DRCL_COMMIT} (features/ and PriorW/)."),
    resources=tuple(
        Resource(filename=name, url=f"{DRCL_RAW}/{folder}/{name}", kind="file", extract=(Extract(name),),
                 size="about 3.7 MB" if folder == "features" else "about 80 kB",
                 note=f"{folder}/{name} in the authors' repository")
        for name, folder in DRCL_FILES.items()
    ),
    checks=(
        FileCheck("wiki_0.mat", mat=DRCL_FEATURE_MAT),
        FileCheck("wiki_1.mat", mat=DRCL_FEATURE_MAT),
        *(FileCheck(name, mat=(("W", (2048, 10)),)) for name in DRCL_FILES if name.startswith("W_")),
    ),
)

# --- UCI Multiple Features --------------------------------------------------------------------------------------

UCI_MFEAT_HOME = "https://archive.ics.uci.edu/dataset/72/multiple+features"
# Original file -> columns (features) per row; the CSV the loader reads has one more (the class).
UCI_MFEAT_VIEWS = {"mfeat-fou": 76, "mfeat-fac": 216, "mfeat-kar": 64, "mfeat-pix": 240, "mfeat-zer": 47,
                   "mfeat-mor": 6}

UCI_MFEAT = Dataset(
    name="uci_mfeat",
    folder="uci_mfeat",
    title="UCI Multiple Features: 2,000 handwritten digits x 6 feature views, 10 classes x 200",
    loader="xmr.data.load_uci_mfeat",
    citation="M. van Breukelen et al. (1998), UCI Machine Learning Repository (CC BY 4.0)",
    homepage=UCI_MFEAT_HOME,
    note=("The archive holds the original whitespace-separated files mfeat-fou ... mfeat-mor (2000 rows each, "
          "classes 0-9 in blocks of 200, no class column); fetch converts each to the CSV the loader reads "
          "(a header row, then the features and the class in the last column), keeping the numbers' text. The "
          "same six files are also at https://archive.ics.uci.edu/ml/machine-learning-databases/mfeat/."),
    resources=(
        Resource(
            filename="multiple+features.zip",
            url="https://archive.ics.uci.edu/static/public/72/multiple+features.zip",
            kind="zip",
            extract=tuple(Extract(name, convert="uci_mfeat_csv") for name in UCI_MFEAT_VIEWS),
            size="a few MB",
            note="the UCI repository's download of dataset 72",
        ),
    ),
    checks=tuple(FileCheck(f"{name}.csv", csv_rows=2000, csv_columns=columns + 1, class_block=200)
                 for name, columns in UCI_MFEAT_VIEWS.items()),
)

# --- COCO / Flickr30K test captions (SCAN precomp) --------------------------------------------------------------

SCAN_HOME = "https://github.com/kuanghuei/SCAN#download-data"
CAPTION_FILES = {  # file -> (lines, sha256)
    "coco_precomp/testall_caps.txt": (25000, "17842b221f8aa3cb409f01fd732335d929342279d73eff78a4caa04e383f37c6"),
    "coco_precomp/test_caps.txt": (5000, "0c7f8a429a2cdf108c3a8880c979803779f74fc2bfa59d0de3667a1d9d75485d"),
    "coco_precomp/dev_caps.txt": (5000, "b440b32e4fafa0a825ebdbc369e420d5a27d8733900ce60c9037f81ba3cb4c3c"),
    "f30k_precomp/test_caps.txt": (5000, "5614ab28b25bb6b822a8247a3504b290873c0b0a4eff77805b07763d2abb8e02"),
    "f30k_precomp/dev_caps.txt": (5070, "5ef92f119d117690cc8fc5bf375da99972285c0df415935781391125a2e41c52"),
}

COCO_FLICKR30K_TEST_CAPTIONS = Dataset(
    name="coco_flickr30k_test_captions",
    folder="coco_flickr30k_test_captions",
    title="Karpathy test/dev captions of MS-COCO (5K, 1K) and Flickr30K (1K) in the SCAN/VSE++ precomp layout",
    loader="xmr.data.test_captions.load_test_captions",
    citation=("Karpathy & Fei-Fei (CVPR 2015) splits of MS-COCO (Chen et al. 2015) and Flickr30K (Young et al., "
              "TACL 2014) captions, as distributed with SCAN (Lee et al., ECCV 2018)"),
    homepage=SCAN_HOME,
    note=("Only the five *_caps.txt files are kept, but the SCAN archive also holds the precomputed region "
          "features (tens of GB). VSE++'s http://www.cs.toronto.edu/~faghri/vsepp/data.tar has the same precomp "
          "layout (data/coco_precomp, data/f30k_precomp); whether its caption files equal SCAN's is not known "
          "here: `check` compares them with the reference hashes."),
    resources=(
        Resource(
            filename="scan_data.zip",
            url="https://scanproject.blob.core.windows.net/scan-data/data.zip",
            kind="zip",
            extract=tuple(Extract(path) for path in CAPTION_FILES),
            size="tens of GB (precomputed image features included)",
            note="SCAN's data.zip (data/coco_precomp, data/f30k_precomp, ...)",
        ),
    ),
    checks=tuple(lines_sha(path, lines, sha) for path, (lines, sha) in CAPTION_FILES.items()),
)

DATASETS: tuple[Dataset, ...] = (FLICKR8K, WIKIPEDIA, DRCL_WIKIPEDIA_FEATURES, UCI_MFEAT,
                                 COCO_FLICKR30K_TEST_CAPTIONS)
REGISTRY: dict[str, Dataset] = {dataset.name: dataset for dataset in DATASETS}


def with_base_url(registry: dict[str, Dataset], base_url: str) -> dict[str, Dataset]:
    """The registry with every resource fetched from ``base_url/<filename>`` (a mirror, or a test server)."""
    base = base_url.rstrip("/")
    return {name: dataclasses.replace(dataset, resources=tuple(
        dataclasses.replace(resource, url=f"{base}/{resource.filename}") for resource in dataset.resources))
        for name, dataset in registry.items()}


def _check_unique_filenames() -> None:
    names = [resource.filename for dataset in DATASETS for resource in dataset.resources]
    duplicates = {name for name in names if names.count(name) > 1}
    if duplicates:
        raise RuntimeError(f"resource file names must be unique in the registry: {sorted(duplicates)}")


_check_unique_filenames()
