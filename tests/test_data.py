"""Tests of xmr.data: real-data counts and order, the official Flickr8k layout and its quirk key, error
messages, image decoding, and the synthetic set's determinism."""
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from xmr.data import (
    DATA_ENV_VAR,
    FLICKR8K_SPLITS,
    CorruptImageError,
    DatasetFormatError,
    DatasetNotFoundError,
    ImageCaptionSplit,
    load_drcl_wikipedia_features,
    load_flickr8k,
    load_image,
    load_uci_mfeat,
    load_wikipedia,
    make_synthetic_image_captions,
    resolve_data_root,
)

FLICKR8K_FORM = "https://forms.illinois.edu/sec/1713398"
QUIRK_IMAGE = "2258277193_586949ec62.jpg"
# Real lines of Flickr8k.token.txt (lines 1-20 and 6731-6735), the quirk key among them.
CHILD, DOGS = "1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg"
PAINTER, BENCH = "1002674143_1b742ab4b8.jpg", "1003163366_44323f5815.jpg"
TOKEN_LINES = {
    CHILD: [
        "A child in a pink dress is climbing up a set of stairs in an entry way .",
        "A girl going into a wooden building .",
        "A little girl climbing into a wooden playhouse .",
        "A little girl climbing the stairs to her playhouse .",
        "A little girl in a pink dress going into a wooden cabin .",
    ],
    QUIRK_IMAGE: [
        "people waiting for the subway",  # keyed "2258277193_586949ec62.jpg.1#0" in the file
        "Some people looking out windows in a large building .",
        "Three people are waiting on a train platform .",
        "Three people standing at a station .",
        "two woman and one man standing near train tracks .",
    ],
    DOGS: [
        "A black dog and a spotted dog are fighting",
        "A black dog and a tri-colored dog playing with each other on the road .",
        "A black dog and a white dog with brown spots are staring at each other in the street .",
        "Two dogs of different breeds looking at each other on the road .",
        "Two dogs on pavement moving toward each other .",
    ],
    PAINTER: [
        "A little girl covered in paint sits in front of a painted rainbow with her hands in a bowl .",
        "A little girl is sitting in front of a large painted rainbow .",
        "A small girl in the grass plays with fingerpaints in front of a white canvas with a rainbow on it .",
        "There is a girl with pigtails sitting in front of a rainbow painting .",
        "Young girl with pigtails painting outside in the grass .",
    ],
    BENCH: [
        "A man lays on a bench while his dog sits by him .",
        "A man lays on the bench to which a white dog is also tied .",
        "a man sleeping on a bench outside with a white and black dog sitting next to him .",
        "A shirtless man lies on a park bench with his dog .",
        "man laying on bench holding leash of dog sitting on ground",
    ],
}
# Disjoint, as the loader requires (an image in two splits is an error).
FAKE_SPLITS = {"train": [PAINTER], "dev": [BENCH], "test": [DOGS, QUIRK_IMAGE, CHILD]}


def make_fake_flickr8k(data_root: Path, image_folder: str = "Flicker8k_Dataset") -> Path:
    """A five-image Flickr8k in the official download's layout, full-resolution (non-square) JPEGs."""
    directory = data_root / "flickr8k"
    (directory / image_folder).mkdir(parents=True)
    lines = [f"{image_id}{'.1' if image_id == QUIRK_IMAGE and number == 0 else ''}#{number}\t{caption}"
             for image_id, captions in TOKEN_LINES.items() for number, caption in enumerate(captions)]
    # Reversed, so caption order must come from the #n, not from the file's order.
    (directory / "Flickr8k.token.txt").write_text("\n".join(reversed(lines)) + "\n")
    for split, image_ids in FAKE_SPLITS.items():
        (directory / f"Flickr_8k.{split}Images.txt").write_text("\n".join(image_ids) + "\n")
    for shade, image_id in enumerate(TOKEN_LINES):
        Image.new("RGB", (500, 375), (60 * shade, 100, 200)).save(directory / image_folder / image_id)
    return directory


def assert_helpful(error: Exception, root: Path, layout_entries: list[str], source: str) -> None:
    message = str(error)
    for expected in [str(root), *layout_entries, source]:
        assert expected in message, f"{expected!r} missing from:\n{message}"


# --- data root -------------------------------------------------------------------------------------------------

def test_resolve_data_root_prefers_argument_over_environment(tmp_path, monkeypatch):
    (tmp_path / "from_env").mkdir()
    (tmp_path / "from_argument").mkdir()
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "from_env"))
    assert resolve_data_root(tmp_path / "from_argument") == tmp_path / "from_argument"
    assert resolve_data_root() == tmp_path / "from_env"


def test_resolve_data_root_without_either_explains_both(monkeypatch, tmp_path):
    import xmr.data.fetch

    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    monkeypatch.setattr(xmr.data.fetch, "SHARED_DATA", tmp_path / "no-shared")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DatasetNotFoundError, match=rf"not a directory.*{DATA_ENV_VAR}.*python -m xmr.data fetch"):
        resolve_data_root()
    with pytest.raises(DatasetNotFoundError, match="not a directory") as error:
        resolve_data_root(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(error.value)


# --- Flickr8k on the real data ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flickr8k(data_root) -> dict[str, ImageCaptionSplit]:
    return {split: load_flickr8k(split, data_root) for split in FLICKR8K_SPLITS}


@pytest.fixture(scope="module")
def flickr8k_token_file(data_root) -> dict[str, str]:
    """``{"<image>#<n>": caption}`` read naively from the real token file."""
    lines = (data_root / "flickr8k" / "Flickr8k.token.txt").read_text().splitlines()
    return dict(line.split("\t", 1) for line in lines)


@pytest.mark.data
@pytest.mark.parametrize("split, num_images", [("train", 6000), ("dev", 1000), ("test", 1000)])
def test_flickr8k_split_sizes(flickr8k, split, num_images):
    loaded = flickr8k[split]
    assert (loaded.dataset, loaded.split, len(loaded)) == ("flickr8k", split, num_images)
    assert len(set(loaded.image_ids)) == num_images
    assert len(loaded.captions) == 5 * num_images
    assert all(path.name == image_id for path, image_id in zip(loaded.image_paths, loaded.image_ids))
    assert loaded.image_paths[0].is_file() and loaded.image_paths[-1].is_file()


@pytest.mark.data
def test_flickr8k_splits_are_disjoint(flickr8k):
    train, dev, test = (set(flickr8k[split].image_ids) for split in FLICKR8K_SPLITS)
    assert not (train & dev or train & test or dev & test)


@pytest.mark.data
def test_flickr8k_first_test_caption_is_token_line_zero(flickr8k, data_root, flickr8k_token_file):
    first_image = (data_root / "flickr8k" / "Flickr_8k.testImages.txt").read_text().split()[0]
    test = flickr8k["test"]
    assert test.image_ids[0] == first_image
    assert test.captions[0] == flickr8k_token_file[f"{first_image}#0"]
    assert test.captions[4] == flickr8k_token_file[f"{first_image}#4"]


@pytest.mark.data
def test_flickr8k_every_caption_is_in_place(flickr8k, flickr8k_token_file):
    """Caption j of every split is its image's #(j mod 5) line: nothing, the quirk key included, shifts them."""
    for loaded in flickr8k.values():
        expected = [flickr8k_token_file[f"{image_id}#{number}"] for image_id in loaded.image_ids for number in range(5)]
        assert list(loaded.captions) == [caption.strip() for caption in expected]


@pytest.mark.data
def test_flickr8k_quirk_key_is_no_image(flickr8k, flickr8k_token_file):
    assert flickr8k_token_file[f"{QUIRK_IMAGE}.1#0"] == TOKEN_LINES[QUIRK_IMAGE][0]
    assert all(not image_id.endswith(".1") for loaded in flickr8k.values() for image_id in loaded.image_ids)


@pytest.mark.data
def test_caption_image_index_on_real_split(flickr8k):
    index = flickr8k["test"].caption_image_index()
    assert index.dtype == torch.long and index.shape == (5000,)
    assert index[:11].tolist() == [0] * 5 + [1] * 5 + [2]
    assert index[-1] == 999


@pytest.mark.data
def test_load_image_real_file(flickr8k):
    image = load_image(flickr8k["test"].image_paths[0])
    assert (image.mode, image.size) == ("RGB", (224, 224))


# --- Flickr8k layouts and errors on a fake root ----------------------------------------------------------------

@pytest.mark.parametrize("image_folder", ["Flicker8k_Dataset", "Flickr8k_Dataset", "images"])
def test_flickr8k_official_layout_and_quirk_key(tmp_path, image_folder):
    make_fake_flickr8k(tmp_path, image_folder)
    test = load_flickr8k("test", tmp_path)
    assert test.image_ids == tuple(FAKE_SPLITS["test"])
    assert test.image_paths[1] == tmp_path / "flickr8k" / image_folder / QUIRK_IMAGE
    assert list(test.captions) == [caption for image_id in FAKE_SPLITS["test"] for caption in TOKEN_LINES[image_id]]
    assert load_image(test.image_paths[0]).size == (224, 224)  # full-resolution 500 x 375, resized


def test_flickr8k_root_may_be_the_dataset_folder(tmp_path):
    directory = make_fake_flickr8k(tmp_path)
    assert load_flickr8k("dev", directory).captions == tuple(TOKEN_LINES[BENCH])


def test_flickr8k_rejects_unknown_split(tmp_path):
    make_fake_flickr8k(tmp_path)
    with pytest.raises(ValueError, match="val"):
        load_flickr8k("val", tmp_path)


FLICKR8K_LAYOUT = ["Flickr8k.token.txt", "Flickr_8k.testImages.txt", "Flicker8k_Dataset", "images/"]


def test_flickr8k_missing_root_error(tmp_path):
    with pytest.raises(DatasetNotFoundError) as error:
        load_flickr8k("test", tmp_path / "nowhere")
    assert_helpful(error.value, tmp_path / "nowhere", FLICKR8K_LAYOUT, FLICKR8K_FORM)
    assert "Hodosh" in str(error.value)


def test_flickr8k_missing_folder_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no flickr8k/ folder") as error:
        load_flickr8k("test", tmp_path)
    assert_helpful(error.value, tmp_path, FLICKR8K_LAYOUT, FLICKR8K_FORM)


def test_flickr8k_missing_split_file_error(tmp_path):
    directory = make_fake_flickr8k(tmp_path)
    (directory / "Flickr_8k.devImages.txt").unlink()
    assert len(load_flickr8k("test", tmp_path)) == 3  # other splits still load
    with pytest.raises(DatasetNotFoundError, match="missing Flickr_8k.devImages.txt") as error:
        load_flickr8k("dev", tmp_path)
    assert_helpful(error.value, tmp_path, FLICKR8K_LAYOUT, FLICKR8K_FORM)


def test_flickr8k_missing_image_error(tmp_path):
    directory = make_fake_flickr8k(tmp_path)
    (directory / "Flicker8k_Dataset" / CHILD).unlink()
    assert len(load_flickr8k("dev", tmp_path)) == 1  # the dev split does not need that image
    with pytest.raises(DatasetNotFoundError, match=f"1 of 3 test images are missing.*{CHILD}") as error:
        load_flickr8k("test", tmp_path)
    assert_helpful(error.value, tmp_path, FLICKR8K_LAYOUT, FLICKR8K_FORM)


def test_flickr8k_missing_image_folder_error(tmp_path):
    directory = make_fake_flickr8k(tmp_path, "images")
    (directory / "images").rename(directory / "pictures")
    with pytest.raises(DatasetNotFoundError, match="no image folder") as error:
        load_flickr8k("test", tmp_path)
    assert_helpful(error.value, tmp_path, FLICKR8K_LAYOUT, FLICKR8K_FORM)


def test_flickr8k_fewer_than_five_captions_error(tmp_path):
    directory = make_fake_flickr8k(tmp_path)
    token_file = directory / "Flickr8k.token.txt"
    token_file.write_text("".join(line for line in token_file.read_text().splitlines(keepends=True)
                                  if not line.startswith(f"{DOGS}#3")))
    assert len(load_flickr8k("train", tmp_path)) == 1
    with pytest.raises(DatasetFormatError, match=f"lack captions.*{DOGS}") as error:
        load_flickr8k("test", tmp_path)
    assert_helpful(error.value, tmp_path, FLICKR8K_LAYOUT, FLICKR8K_FORM)


# --- images ----------------------------------------------------------------------------------------------------

def test_load_image_converts_and_resizes(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (300, 120), 77).save(path)
    image = load_image(path, size=32)
    assert (image.mode, image.size, image.getpixel((5, 5))) == ("RGB", (32, 32), (77, 77, 77))


@pytest.mark.parametrize("contents", ["not an image", "truncated jpeg"])
def test_corrupt_image_names_the_file(tmp_path, contents):
    path = tmp_path / "broken_photo.jpg"
    if contents == "truncated jpeg":
        Image.effect_noise((256, 256), 64).convert("RGB").save(path, quality=95)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"definitely not a JPEG")
    with pytest.raises(CorruptImageError, match="broken_photo.jpg"):
        load_image(path)


def test_missing_image_is_not_called_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_image(tmp_path / "absent.jpg")
    assert not isinstance(error.value, CorruptImageError)


# --- synthetic set ---------------------------------------------------------------------------------------------

def test_synthetic_same_seed_gives_same_bytes(tmp_path):
    first = make_synthetic_image_captions(tmp_path / "a", num_images=12, seed=3)
    second = make_synthetic_image_captions(tmp_path / "b", num_images=12, seed=3)
    assert first.captions == second.captions and first.image_ids == second.image_ids
    assert [p.read_bytes() for p in first.image_paths] == [p.read_bytes() for p in second.image_paths]


def test_synthetic_different_seed_differs(tmp_path):
    first = make_synthetic_image_captions(tmp_path, num_images=12, seed=0)
    second = make_synthetic_image_captions(tmp_path, num_images=12, seed=1)
    assert set(first.image_ids).isdisjoint(second.image_ids)  # both sets coexist in one folder
    assert first.captions != second.captions
    assert [p.read_bytes() for p in first.image_paths] != [p.read_bytes() for p in second.image_paths]


def test_synthetic_images_match_their_captions(tmp_path):
    split = make_synthetic_image_captions(tmp_path, num_images=6, captions_per_image=3, size=48)
    assert (split.dataset, len(split), len(split.captions), split.captions_per_image) == ("synthetic", 6, 18, 3)
    backgrounds = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
    for index, path in enumerate(split.image_paths):
        image = Image.open(path)
        assert (image.format, image.size) == ("PNG", (48, 48))
        first_caption = split.captions[3 * index]
        assert first_caption.endswith(" background") and len(set(split.captions[3 * index: 3 * index + 3])) == 3
        background = first_caption.split()[-2]
        assert image.getpixel((0, 0)) == backgrounds[background] or image.getpixel((47, 47)) == backgrounds[background]


def test_subset_keeps_first_images_and_their_captions(tmp_path):
    split = make_synthetic_image_captions(tmp_path, num_images=10)
    small = split.subset(3)
    assert (len(small), small.image_ids, small.image_paths) == (3, split.image_ids[:3], split.image_paths[:3])
    assert small.captions == split.captions[:15]
    assert small.caption_image_index().tolist() == [i // 5 for i in range(15)]
    assert (small.dataset, small.split) == (split.dataset, split.split)
    for bad in (0, 11):
        with pytest.raises(ValueError):
            split.subset(bad)


def test_image_caption_split_checks_caption_count():
    with pytest.raises(ValueError, match="captions"):
        ImageCaptionSplit("synthetic", "x", ("a.png",), (Path("a.png"),), ("one", "two"))


# --- labelled views on the real data ---------------------------------------------------------------------------

@pytest.mark.data
@pytest.mark.parametrize("split, num_rows", [("train", 2173), ("test", 693)])
def test_wikipedia_counts_and_labels(data_root, split, num_rows):
    loaded = load_wikipedia(split, data_root)
    assert len(loaded) == num_rows
    assert loaded.views["image"].shape == (num_rows, 128) and loaded.views["text"].shape == (num_rows, 10)
    assert loaded.views["image"].dtype == torch.float32 and loaded.labels.dtype == torch.long
    list_file = (data_root / "wikipedia" / f"{split}set_txt_img_cat.list").read_text().split()
    assert loaded.labels.tolist() == [int(category) - 1 for category in list_file[2::3]]
    assert set(loaded.labels.tolist()) == set(range(10))
    assert loaded.class_names[0] == "art" and len(loaded.class_names) == 10


@pytest.mark.data
def test_drcl_features(data_root):
    views, priors = load_drcl_wikipedia_features(data_root)
    assert len(views) == 462 and {name: tuple(v.shape) for name, v in views.views.items()} == {
        "image": (462, 2048), "text": (462, 2048)}
    assert views.labels.min() == 0 and views.labels.max() == 9
    assert views.class_names == load_wikipedia("test", data_root).class_names
    assert {name: tuple(w.shape) for name, w in priors.items()} == {
        "image": (2048, 10), "text": (2048, 10), "selected": (2048, 10)}
    assert torch.equal(priors["selected"], priors["image"]) and not torch.equal(priors["image"], priors["text"])


@pytest.mark.data
def test_uci_mfeat(data_root):
    loaded = load_uci_mfeat(data_root)
    dims = {name: view.shape[1] for name, view in loaded.views.items()}
    assert dims == {"fourier": 76, "profile": 216, "karhunen_loeve": 64,
                    "pixel": 240, "zernike": 47, "morphological": 6}
    assert len(loaded) == 2000 and all(view.shape[0] == 2000 for view in loaded.views.values())
    assert loaded.labels.bincount().tolist() == [200] * 10
    assert loaded.labels[:200].eq(0).all() and loaded.labels[-200:].eq(9).all()


# --- labelled views: errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("load, layout, source", [
    (lambda root: load_wikipedia("train", root), ["wikipedia/raw_features.mat", "categories.list"],
     "http://www.svcl.ucsd.edu/projects/crossmodal/"),
    (load_drcl_wikipedia_features, ["drcl_wikipedia_features/wiki_0.mat", "W_2048X10wiki.mat"], "DRCL"),
    (load_uci_mfeat, ["uci_mfeat/mfeat-fou.csv", "mfeat-mor.csv"],
     "https://archive.ics.uci.edu/dataset/72/multiple+features"),
], ids=["wikipedia", "drcl", "uci_mfeat"])
def test_labelled_views_missing_dataset_error(tmp_path, load, layout, source):
    with pytest.raises(DatasetNotFoundError) as error:
        load(tmp_path)
    assert_helpful(error.value, tmp_path, layout, source)


def test_uci_mfeat_missing_file_is_named(tmp_path):
    (tmp_path / "uci_mfeat").mkdir()
    (tmp_path / "uci_mfeat" / "mfeat-fou.csv").write_text("0,1\n0.5,0\n")
    with pytest.raises(DatasetNotFoundError, match="missing mfeat-fac.csv") as error:
        load_uci_mfeat(tmp_path)
    assert_helpful(error.value, tmp_path, ["uci_mfeat/mfeat-kar.csv"], "archive.ics.uci.edu")


def test_wikipedia_row_count_mismatch_fails(tmp_path):
    directory = tmp_path / "wikipedia"
    directory.mkdir()
    scipy.io.savemat(directory / "raw_features.mat", {
        "I_tr": np.ones((3, 128)), "T_tr": np.ones((2, 10)), "I_te": np.ones((1, 128)), "T_te": np.ones((1, 10))})
    (directory / "trainset_txt_img_cat.list").write_text("".join(f"t{i}\ti{i}\t{i + 1}\n" for i in range(3)))
    (directory / "categories.list").write_text("art\nbiology\ngeography\n")
    with pytest.raises(DatasetFormatError, match="row counts disagree") as error:
        load_wikipedia("train", tmp_path)
    assert "T_tr" in str(error.value) and str(tmp_path) in str(error.value)
