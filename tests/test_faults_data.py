"""Faults in the feature cache and the dataset files give a clear, early error or a correct recovery.

Cache: a flipped byte is caught by the stored digest and re-extracted; a replaced image is a new key; orphaned
temporary files are removed and live writers' kept; a writer killed mid-save leaves no corrupt entry.
Data: empty files, repeated ids, overlapping splits, invalid UTF-8, truncated .mat files and text in a numeric
CSV raise DatasetFormatError naming the file (and the line), on small fakes of each dataset's real layout.
"""
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image
from test_data import BENCH, CHILD, FAKE_SPLITS, make_fake_flickr8k

from xmr.data import (
    DatasetFormatError,
    PairedFeatures,
    load_drcl_wikipedia_features,
    load_flickr8k,
    load_uci_mfeat,
    load_wikipedia,
    make_synthetic_image_captions,
)
from xmr.data.labelled_views import UCI_MFEAT_VIEW_FILES
from xmr.data.test_captions import load_test_captions
from xmr.features import STALE_TEMPORARY_SECONDS, ExtractionSettings, FeatureCache, image_features
from xmr.io import writer_tag

REPO = Path(__file__).resolve().parents[1]
REDOWNLOAD = "download it again"


# --- feature cache ---------------------------------------------------------------------------------------------

class TinyImageBackbone(torch.nn.Module):
    """The interface of :class:`xmr.encoders.ImageBackbone` at a few flops; counts how often it runs."""

    name = "tiny_image"
    trainable_top = 0
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        self.calls = 0

    def preprocess(self, images) -> torch.Tensor:
        arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W)

    def forward_lower(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return pixels * self.scale.view(1, 3, 1, 1)

    def forward_upper(self, lower: torch.Tensor) -> dict[str, torch.Tensor]:
        grid = F.adaptive_avg_pool2d(lower, 7).flatten(2).transpose(1, 2)  # (B, 49, 3)
        return {"grid": grid, "pooled": grid.mean(dim=1)}


@pytest.fixture
def tiny(tmp_path):
    split = make_synthetic_image_captions(tmp_path / "images", num_images=4)
    settings = ExtractionSettings(batch_size=2, progress=False, cache=FeatureCache(tmp_path / "cache"))
    return split, TinyImageBackbone(), settings


def test_flipped_byte_in_cache_entry_warns_and_recomputes(tiny, tmp_path):
    split, backbone, settings = tiny
    computed = {name: tensor.clone() for name, tensor in image_features(split, backbone, settings).items()}
    image_features(split, backbone, settings)
    assert backbone.calls == 2  # 4 images in batches of 2, then a hit
    [entry] = (tmp_path / "cache").glob("*.pt")
    data = bytearray(entry.read_bytes())
    offset = data.find(computed["pooled"].numpy().tobytes())
    assert offset >= 0
    data[offset + 5] ^= 0x01  # one bit of one float: torch.load alone serves it silently
    entry.write_bytes(bytes(data))

    with pytest.warns(UserWarning, match=re.escape(str(entry)) + ".*corrupt.*'pooled'"):
        repaired = image_features(split, backbone, settings)
    assert backbone.calls == 4  # extracted again
    for name, tensor in computed.items():
        assert torch.equal(repaired[name], tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt entry is sound
        assert torch.equal(image_features(split, backbone, settings)["pooled"], computed["pooled"])
    assert backbone.calls == 4


def test_concurrent_runs_extract_the_same_features_once(tiny):
    """Two runs needing one entry: the second waits on the entry's lock, then reads what the first saved."""
    import threading

    split, backbone, settings = tiny
    cache = settings.cache
    key = {"dataset": "probe", "split": "test"}
    order = []
    first_holds = threading.Event()

    def first():
        with cache.exclusive(key):
            first_holds.set()
            time.sleep(0.3)
            order.append("first done")

    def second():
        first_holds.wait()
        with cache.exclusive(key):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert order == ["first done", "second in"]

    image_features(split, backbone, settings), image_features(split, backbone, settings)
    assert backbone.calls == 2  # extracted once (2 batches), then read under the lock


def test_replaced_image_is_a_new_cache_key(tiny, tmp_path):
    split, backbone, settings = tiny
    before = image_features(split, backbone, settings)["pooled"].clone()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(split.image_paths[0], format="PNG")  # same name, new bytes
    after = image_features(split, backbone, settings)["pooled"]
    assert backbone.calls == 4  # a miss: extracted twice
    assert not torch.equal(after[0], before[0]) and torch.equal(after[1:], before[1:])
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def _finished_process_id() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporary_files_are_removed_and_live_writers_kept(tmp_path):
    host = writer_tag().rsplit("-", 1)[0]
    live_writer = subprocess.Popen(["sleep", "60"])
    try:
        dead = tmp_path / f".a.pt.{host}-{_finished_process_id()}.k2j4h5g6.tmp"  # fresh, but its writer is gone
        old = tmp_path / ".b.pt.x7y8z9w0.tmp"  # no writer in the name, untouched for an hour
        live = tmp_path / f".c.pt.{host}-{live_writer.pid}.q1w2e3r4.tmp"
        kept = [live, tmp_path / "entry.pt", tmp_path / "notes.tmp"]
        for path in [dead, old, *kept]:
            path.write_bytes(b"partial")
        an_hour_ago = time.time() - 3600
        os.utime(old, (an_hour_ago, an_hour_ago))
        cache = FeatureCache(tmp_path)  # opening cleans
        assert sorted(tmp_path.iterdir()) == sorted(kept)

        # Saving cleans too; the live writer's file goes once it has been idle past the limit.
        idle = time.time() - STALE_TEMPORARY_SECONDS - 60
        os.utime(live, (idle, idle))
        cache.save({"name": "x"}, {"x": torch.zeros(2)})
        assert not live.exists() and (tmp_path / "notes.tmp").exists()
    finally:
        live_writer.kill()
        live_writer.wait()


# Run in a child: save an entry, but stop for good halfway through writing it, until killed.
HALF_SAVE = r"""
import io, os, sys, time
from pathlib import Path
import torch
from xmr.features import FeatureCache

directory, marker = sys.argv[1], Path(sys.argv[2])
real_save = torch.save

def save_half_then_hang(obj, file):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    file.flush()
    os.fsync(file.fileno())
    marker.touch()
    time.sleep(600)

torch.save = save_half_then_hang
FeatureCache(directory).save({"name": "entry"}, {"x": torch.full((64, 8), 2.0)})
"""


def test_sigkill_during_save_leaves_no_corrupt_entry(tmp_path):
    directory, marker = tmp_path / "cache", tmp_path / "half_written"
    original = torch.arange(512.0).reshape(64, 8)
    entry = FeatureCache(directory).save({"name": "entry"}, {"x": original})
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", HALF_SAVE, str(directory), str(marker)],
                             env=environment, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the child never reached the middle of its save"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert len(list(directory.glob(".*.tmp"))) == 1  # the half-written file the kill left

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reopened = FeatureCache(directory)
        assert torch.equal(reopened.load({"name": "entry"})["x"], original)  # the old entry, intact
    assert sorted(directory.iterdir()) == [entry]  # the orphan is gone


# --- fake datasets in their real layouts -----------------------------------------------------------------------

def make_fake_wikipedia(data_root: Path) -> Path:
    """Wikipedia with 3 train and 2 test pairs in 3 categories."""
    directory = data_root / "wikipedia"
    directory.mkdir(parents=True)
    scipy.io.savemat(directory / "raw_features.mat", {
        "I_tr": np.arange(3 * 128.0).reshape(3, 128), "T_tr": np.ones((3, 10)),
        "I_te": np.ones((2, 128)), "T_te": np.ones((2, 10))})
    (directory / "trainset_txt_img_cat.list").write_text("".join(f"t{i}\ti{i}\t{i + 1}\n" for i in range(3)))
    (directory / "testset_txt_img_cat.list").write_text("".join(f"t{i}\ti{i}\t{i - 2}\n" for i in range(3, 5)))
    (directory / "categories.list").write_text("art\nbiology\ngeography\n")
    return directory


def make_fake_drcl(data_root: Path) -> Path:
    directory = data_root / "drcl_wikipedia_features"
    directory.mkdir(parents=True)
    for name in ("wiki_0.mat", "wiki_1.mat"):
        scipy.io.savemat(directory / name, {"test_fea": np.ones((4, 8), np.float32), "test_lab": np.arange(4)[None]})
    for name in ("W_2048X10wiki0.mat", "W_2048X10wiki1.mat", "W_2048X10wiki.mat"):
        scipy.io.savemat(directory / name, {"W": np.ones((8, 10))})
    return directory


def make_fake_uci_mfeat(data_root: Path) -> Path:
    """Every view: a header row, then 4 rows of 3 numbers and the class."""
    directory = data_root / "uci_mfeat"
    directory.mkdir(parents=True)
    for file in UCI_MFEAT_VIEW_FILES.values():
        (directory / file).write_text("0,1,2,3\n" + "".join(f"{row}.5,1,2,{row % 2}\n" for row in range(4)))
    return directory


def make_fake_test_captions(data_root: Path) -> Path:
    directory = data_root / "coco_flickr30k_test_captions" / "coco_precomp"
    directory.mkdir(parents=True)
    (directory / "testall_caps.txt").write_text("".join(f"caption {i}\n" for i in range(10)))
    return directory


def test_fakes_load(tmp_path):
    """The fakes are valid: each fault below is the only thing wrong."""
    for make in (make_fake_flickr8k, make_fake_wikipedia, make_fake_drcl, make_fake_uci_mfeat,
                 make_fake_test_captions):
        make(tmp_path)
    assert [len(load_flickr8k(split, tmp_path)) for split in FAKE_SPLITS] == [1, 1, 3]
    assert (len(load_wikipedia("train", tmp_path)), len(load_wikipedia("test", tmp_path))) == (3, 2)
    assert len(load_drcl_wikipedia_features(tmp_path)[0]) == 4
    assert len(load_uci_mfeat(tmp_path)) == 4
    assert len(load_test_captions("coco", "test5k", tmp_path)) == 2


# Each case: (fake maker, file under the data root to spoil, loader).
LOADERS = {
    "flickr8k_split": (make_fake_flickr8k, "flickr8k/Flickr_8k.testImages.txt", lambda r: load_flickr8k("test", r)),
    "flickr8k_tokens": (make_fake_flickr8k, "flickr8k/Flickr8k.token.txt", lambda r: load_flickr8k("test", r)),
    "wikipedia_list": (make_fake_wikipedia, "wikipedia/trainset_txt_img_cat.list",
                       lambda r: load_wikipedia("train", r)),
    "wikipedia_categories": (make_fake_wikipedia, "wikipedia/categories.list", lambda r: load_wikipedia("test", r)),
    "test_captions": (make_fake_test_captions, "coco_flickr30k_test_captions/coco_precomp/testall_caps.txt",
                      lambda r: load_test_captions("coco", "test5k", r)),
}


# --- empty files -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [*LOADERS, "uci_mfeat_header_only"])
def test_empty_file_is_rejected_with_its_name(tmp_path, case):
    if case == "uci_mfeat_header_only":
        make_fake_uci_mfeat(tmp_path)
        spoiled, load, problem = tmp_path / "uci_mfeat/mfeat-zer.csv", load_uci_mfeat, "has no rows of numbers"
        spoiled.write_text("0,1,2,3\n")
    else:
        make, relative, load = LOADERS[case]
        make(tmp_path)
        spoiled, problem = tmp_path / relative, "is empty"
        spoiled.write_text("\n  \n")
    with pytest.raises(DatasetFormatError, match=re.escape(f"{spoiled} {problem}")) as error:
        load(tmp_path)
    assert REDOWNLOAD in str(error.value)
    if case == "flickr8k_split":
        assert len(load_flickr8k("dev", tmp_path)) == 1  # other splits still load


def test_paired_features_reject_no_images():
    with pytest.raises(ValueError, match="no images"):
        PairedFeatures(torch.zeros(0, 4), torch.zeros(0, 4))


# --- repeated ids and overlapping splits -----------------------------------------------------------------------

def test_image_listed_twice_in_a_split_is_rejected(tmp_path):
    directory = make_fake_flickr8k(tmp_path)
    (directory / "Flickr_8k.devImages.txt").write_text(f"{BENCH}\n{BENCH}\n")
    with pytest.raises(DatasetFormatError, match=f"Flickr_8k.devImages.txt lists 1 image.* more than once: {BENCH}"):
        load_flickr8k("dev", tmp_path)

    wikipedia = make_fake_wikipedia(tmp_path)
    (wikipedia / "trainset_txt_img_cat.list").write_text("t0\ti0\t1\nt1\ti1\t2\nt2\ti0\t3\n")
    with pytest.raises(DatasetFormatError, match="trainset_txt_img_cat.list lists image id.* more than once: i0"):
        load_wikipedia("train", tmp_path)


def test_overlapping_splits_are_rejected(tmp_path):
    directory = make_fake_flickr8k(tmp_path)
    (directory / "Flickr_8k.devImages.txt").write_text(f"{BENCH}\n{CHILD}\n")  # CHILD is a test image too
    for split, other in [("dev", "Flickr_8k.testImages.txt"), ("test", "Flickr_8k.devImages.txt")]:
        with pytest.raises(DatasetFormatError, match=f"Flickr_8k.{split}Images.txt and {other}.*overlap: {CHILD}"):
            load_flickr8k(split, tmp_path)
    assert len(load_flickr8k("train", tmp_path)) == 1  # disjoint from both

    wikipedia = make_fake_wikipedia(tmp_path)
    (wikipedia / "testset_txt_img_cat.list").write_text("t3\ti3\t1\nt4\ti1\t2\n")  # image i1 is a train image
    with pytest.raises(DatasetFormatError, match="testset_txt_img_cat.list and trainset_txt_img_cat.list.*image i1"):
        load_wikipedia("test", tmp_path)


# --- unreadable contents ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [*LOADERS, "uci_mfeat"])
def test_invalid_utf8_names_the_file_and_line(tmp_path, case):
    if case == "uci_mfeat":
        make, relative, load = make_fake_uci_mfeat, "uci_mfeat/mfeat-pix.csv", load_uci_mfeat
    else:
        make, relative, load = LOADERS[case]
    make(tmp_path)
    spoiled = tmp_path / relative
    lines = spoiled.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1][:2] + b"\xff\xfe" + lines[1][2:]  # line 2: a Latin-1 file, a flipped bit...
    spoiled.write_bytes(b"".join(lines))
    expected = f"{spoiled}:2: not a row of numbers" if case == "uci_mfeat" else f"{spoiled}:2: not valid UTF-8"
    with pytest.raises(DatasetFormatError, match=re.escape(expected)) as error:
        load(tmp_path)
    assert REDOWNLOAD in str(error.value)


@pytest.mark.parametrize("kept", [0.0, 0.02, 0.5, 0.97])
@pytest.mark.parametrize("dataset", ["wikipedia", "drcl"])
def test_truncated_mat_file_names_the_file(tmp_path, dataset, kept):
    if dataset == "wikipedia":
        # The test split's I_te, T_te are the file's last variables: every truncation reaches them.
        spoiled, load = make_fake_wikipedia(tmp_path) / "raw_features.mat", lambda r: load_wikipedia("test", r)
    else:
        spoiled, load = make_fake_drcl(tmp_path) / "wiki_0.mat", load_drcl_wikipedia_features
    data = spoiled.read_bytes()
    spoiled.write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(DatasetFormatError, match=re.escape(str(spoiled))) as error:
        load(tmp_path)
    assert REDOWNLOAD in str(error.value)


@pytest.mark.parametrize("row, problem", [
    ("1,abc,2,0", "'abc' is not a number"),
    ("1,2,0", "3 columns where the header has 4"),
])
def test_text_in_numeric_csv_names_the_file_and_line(tmp_path, row, problem):
    directory = make_fake_uci_mfeat(tmp_path)
    spoiled = directory / "mfeat-kar.csv"
    lines = spoiled.read_text().splitlines()
    lines[3] = row
    spoiled.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match=re.escape(f"{spoiled}:4: not a row of numbers ({problem})")) as error:
        load_uci_mfeat(tmp_path)
    assert REDOWNLOAD in str(error.value)


def test_wikipedia_list_with_text_for_a_category_names_the_line(tmp_path):
    directory = make_fake_wikipedia(tmp_path)
    (directory / "trainset_txt_img_cat.list").write_text("t0\ti0\t1\nt1\ti1\tbiology\nt2\ti2\t3\n")
    with pytest.raises(DatasetFormatError, match=re.escape(f"{directory / 'trainset_txt_img_cat.list'}:2: expected")):
        load_wikipedia("train", tmp_path)
