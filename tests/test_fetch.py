"""``xmr.data.fetch`` offline: tiny archives in the original formats, served from a local HTTP server with Range
support, fetched into a temporary data root and read back with the real loaders."""
import dataclasses
import hashlib
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from xmr.data import fetch as fetch_module
from xmr.data import load_flickr8k, load_uci_mfeat
from xmr.data.fetch import FetchError, check, fetch, format_report
from xmr.data.registry import (
    COCO_FLICKR30K_TEST_CAPTIONS,
    FLICKR8K,
    REGISTRY,
    UCI_MFEAT,
    UCI_MFEAT_VIEWS,
    FileCheck,
    with_base_url,
)

REPO = Path(__file__).resolve().parents[1]


# --- a local server that honours Range and can drop a connection halfway ----------------------------------------

class Server:
    def __init__(self, directory: Path):
        self.directory = directory
        self.requests: list[tuple[str, str | None]] = []  # (file name, Range header)
        self.cut_once: dict[str, int] = {}                # file name -> bytes to send before dropping the connection
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                range_header = self.headers.get("Range")
                server.requests.append((name, range_header))
                path = server.directory / name
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = int(range_header.removeprefix("bytes=").split("-")[0]) if range_header else 0
                if start >= len(data) and range_header:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206 if range_header else 200)
                if range_header:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                cut = server.cut_once.pop(name, None)
                self.wfile.write(data[start:cut] if cut is not None else data[start:])
                if cut is not None:
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    served = Server(tmp_path_factory.mktemp("served"))
    served.thread.start()
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()


# --- tiny archives in the original formats ----------------------------------------------------------------------

FLICKR_IDS = {"train": "1000268201_693b08cb0e.jpg", "dev": "1001773457_577c3a7d70.jpg",
              "test": "1002674143_1b742ab4b8.jpg"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def flickr8k_files() -> dict[str, bytes]:
    """The text archive's files for 3 images, one per split (with the original's key quirk)."""
    token_lines = [f"{image_id}#{n}\tcaption {n} of {split} image ." for split, image_id in FLICKR_IDS.items()
                   for n in range(5)]
    return {
        "Flickr8k.token.txt": ("\n".join(token_lines) + "\n").encode(),
        "Flickr8k.lemma.token.txt": ("\n".join(token_lines) + "\n").encode(),
        **{f"Flickr_8k.{split}Images.txt": f"{image_id}\n".encode() for split, image_id in FLICKR_IDS.items()},
        "ExpertAnnotations.txt": f"{FLICKR_IDS['test']}\t{FLICKR_IDS['test']}#0\t4\t4\t4\n".encode(),
        "CrowdFlowerAnnotations.txt": f"{FLICKR_IDS['dev']}\t{FLICKR_IDS['dev']}#1\t1.0\t3\t0\n".encode(),
        "readme.txt": b"Please cite: M. Hodosh, P. Young and J. Hockenmaier (2013)\r\n",
    }


def jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_flickr8k_archives(directory: Path) -> dict:
    """Flickr8k_Dataset.zip (Flicker8k_Dataset/, sic, with macOS metadata) and Flickr8k_text.zip; the registry
    entry expecting exactly these files."""
    with zipfile.ZipFile(directory / "Flickr8k_Dataset.zip", "w") as archive:
        for index, image_id in enumerate(FLICKR_IDS.values()):
            archive.writestr(f"Flicker8k_Dataset/{image_id}", jpeg((80 * index, 100, 200)))
            archive.writestr(f"__MACOSX/Flicker8k_Dataset/._{image_id}", b"\x00\x05\x16\x07")
    texts = flickr8k_files()
    with zipfile.ZipFile(directory / "Flickr8k_text.zip", "w") as archive:
        for name, data in texts.items():
            archive.writestr(name, data)
    checks = tuple(FileCheck(name, lines=data.decode().count("\n"), sha256=sha256(data))
                   for name, data in texts.items() if name != "readme.txt")
    return dataclasses.replace(FLICKR8K, checks=(*checks, dataclasses.replace(FLICKR8K.checks[-1], count=3)))


MFEAT_ROWS = 20  # 10 classes x 2


def write_mfeat_archive(directory: Path, rows: int = MFEAT_ROWS) -> dict[str, np.ndarray]:
    """The UCI zip: the six original whitespace-separated files (no class column, classes in blocks)."""
    rng = np.random.default_rng(0)
    tables = {}
    with zipfile.ZipFile(directory / "multiple+features.zip", "w") as archive:
        for name, columns in UCI_MFEAT_VIEWS.items():
            tables[name] = rng.normal(size=(rows, columns)).round(4) * 100
            text = "\n".join(" ".join(f"{value:13.6e}" for value in row) for row in tables[name]) + "\n"
            archive.writestr(f"mfeat/{name}", text)
        archive.writestr("mfeat/mfeat.info", "Multiple Features Database\n")
    return tables


def small_mfeat(rows: int = MFEAT_ROWS):
    return dataclasses.replace(UCI_MFEAT, checks=tuple(
        dataclasses.replace(spec, csv_rows=rows, class_block=rows // 10) for spec in UCI_MFEAT.checks))


@pytest.fixture(scope="module")
def archives(server):
    flickr8k = write_flickr8k_archives(server.directory)
    tables = write_mfeat_archive(server.directory)
    registry = with_base_url({"flickr8k": flickr8k, "uci_mfeat": small_mfeat()}, server.url)
    return {"registry": registry, "mfeat": tables}


def run_fetch(names, root, downloads, registry, **kwargs):
    return fetch(names, root, downloads, registry=registry, progressbar=False, log=lambda message: None, **kwargs)


# --- fetch + unpack gives what the loaders read -----------------------------------------------------------------

def test_fetch_flickr8k_unpacks_the_loader_layout(archives, tmp_path):
    root = tmp_path / "root"
    [result] = run_fetch(["flickr8k"], root, tmp_path / "downloads", archives["registry"])
    assert result.ok, result.problems
    folder = root / "flickr8k"
    assert sorted(path.name for path in (folder / "Flicker8k_Dataset").iterdir()) == sorted(FLICKR_IDS.values())
    assert not (folder / "__MACOSX").exists() and not list(root.glob(".*"))  # no metadata, no staging left
    for split, image_id in FLICKR_IDS.items():
        loaded = load_flickr8k(split, root)
        assert loaded.image_ids == (image_id,)
        assert loaded.captions == tuple(f"caption {n} of {split} image ." for n in range(5))
    # a second fetch finds it complete and downloads nothing
    assert run_fetch(["flickr8k"], root, tmp_path / "downloads", archives["registry"])[0].ok


def test_fetch_uci_mfeat_converts_the_original_format(archives, tmp_path):
    root = tmp_path / "root"
    [result] = run_fetch(["uci_mfeat"], root, tmp_path / "downloads", archives["registry"])
    assert result.ok, result.problems
    assert sorted(path.name for path in (root / "uci_mfeat").iterdir()) == sorted(
        f"{name}.csv" for name in UCI_MFEAT_VIEWS)
    loaded = load_uci_mfeat(root)
    assert loaded.labels.tolist() == [row // 2 for row in range(MFEAT_ROWS)]
    assert {name: view.shape[1] for name, view in loaded.views.items()} == {
        "fourier": 76, "profile": 216, "karhunen_loeve": 64, "pixel": 240, "zernike": 47, "morphological": 6}
    np.testing.assert_allclose(loaded.views["fourier"].numpy(), archives["mfeat"]["mfeat-fou"], rtol=1e-6)
    np.testing.assert_allclose(loaded.views["morphological"].numpy(), archives["mfeat"]["mfeat-mor"], rtol=1e-6)


def test_fetch_from_a_tar_keeps_only_the_registered_members(server, tmp_path):
    captions = {path: "\n".join(f"{path} caption {i}" for i in range(10)) + "\n"
                for path in ("coco_precomp/testall_caps.txt", "coco_precomp/test_caps.txt",
                             "coco_precomp/dev_caps.txt", "f30k_precomp/test_caps.txt", "f30k_precomp/dev_caps.txt")}
    with tarfile.open(server.directory / "captions.tar.gz", "w:gz") as archive:
        for path, text in {**captions, "coco_precomp/train_caps.txt": "not wanted\n"}.items():
            info = tarfile.TarInfo(f"data/{path}")
            info.size = len(text.encode())
            archive.addfile(info, io.BytesIO(text.encode()))
    resource = dataclasses.replace(COCO_FLICKR30K_TEST_CAPTIONS.resources[0], filename="captions.tar.gz",
                                   kind="tar", url=f"{server.url}/captions.tar.gz")
    dataset = dataclasses.replace(COCO_FLICKR30K_TEST_CAPTIONS, resources=(resource,), checks=tuple(
        FileCheck(path, lines=10, sha256=sha256(text.encode())) for path, text in captions.items()))
    root = tmp_path / "root"
    assert run_fetch(None, root, tmp_path / "downloads", {dataset.name: dataset})[0].ok
    folder = root / dataset.folder
    assert sorted(str(path.relative_to(folder)) for path in folder.rglob("*.txt")) == sorted(captions)


# --- resume, interruption, checksums ----------------------------------------------------------------------------

def test_resume_from_a_part_file(archives, server, tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    data = (server.directory / "Flickr8k_Dataset.zip").read_bytes()
    half = len(data) // 2
    (downloads / "Flickr8k_Dataset.zip.part").write_bytes(data[:half])
    server.requests.clear()
    assert run_fetch(["flickr8k"], tmp_path / "root", downloads, archives["registry"])[0].ok
    assert ("Flickr8k_Dataset.zip", f"bytes={half}-") in server.requests  # only the second half was asked for
    assert (downloads / "Flickr8k_Dataset.zip").read_bytes() == data
    assert not (downloads / "Flickr8k_Dataset.zip.part").exists()


def test_interrupted_download_leaves_nothing_in_the_root_and_resumes(archives, server, tmp_path):
    root, downloads = tmp_path / "root", tmp_path / "downloads"
    size = (server.directory / "multiple+features.zip").stat().st_size
    server.cut_once["multiple+features.zip"] = size // 2
    server.requests.clear()
    with pytest.raises(FetchError, match="run the same command again to resume"):
        run_fetch(["uci_mfeat"], root, downloads, archives["registry"])
    assert not root.exists()
    part = downloads / "multiple+features.zip.part"
    assert part.exists() and 0 < part.stat().st_size < size
    assert not (downloads / "multiple+features.zip").exists()
    kept = part.stat().st_size
    assert run_fetch(["uci_mfeat"], root, downloads, archives["registry"])[0].ok
    assert server.requests[-1] == ("multiple+features.zip", f"bytes={kept}-")
    assert load_uci_mfeat(root).labels.shape == (MFEAT_ROWS,)


def test_checksum_mismatch_is_clear_and_leaves_nothing_partial(archives, server, tmp_path):
    dataset = archives["registry"]["flickr8k"]
    wrong = "0" * 64
    bad = dataclasses.replace(dataset, resources=(
        dataset.resources[0], dataclasses.replace(dataset.resources[1], sha256=wrong)))
    root, downloads = tmp_path / "root", tmp_path / "downloads"
    with pytest.raises(FetchError) as error:
        run_fetch(["flickr8k"], root, downloads, {"flickr8k": bad})
    message = str(error.value)
    assert "checksum mismatch for Flickr8k_text.zip" in message and wrong in message
    assert "nothing was written to the data root" in message
    assert not root.exists()  # neither the dataset folder nor a staging folder
    assert sorted(path.name for path in downloads.iterdir()) == ["Flickr8k_Dataset.zip"]  # the good one stays
    # the right checksum installs it
    good = dataclasses.replace(dataset, resources=(dataset.resources[0], dataclasses.replace(
        dataset.resources[1], sha256=sha256((server.directory / "Flickr8k_text.zip").read_bytes()))))
    assert run_fetch(["flickr8k"], root, downloads, {"flickr8k": good})[0].ok


def test_unexpected_content_is_not_installed(archives, tmp_path):
    dataset = archives["registry"]["uci_mfeat"]
    expecting_more = dataclasses.replace(dataset, checks=(FileCheck("mfeat-fou.csv", csv_rows=2000),))
    root = tmp_path / "root"
    with pytest.raises(FetchError, match=r"20 data rows, expected 2000[\s\S]*Nothing was installed"):
        run_fetch(None, root, tmp_path / "downloads", {"uci_mfeat": expecting_more})
    assert not root.exists()  # not even the root it would have created
    assert run_fetch(None, root, tmp_path / "downloads", {"uci_mfeat": expecting_more}, verify=False)[0].problems


# --- check ------------------------------------------------------------------------------------------------------

def test_check_reports_complete_and_incomplete_roots(archives, tmp_path):
    registry = archives["registry"]
    root = tmp_path / "root"
    run_fetch(None, root, tmp_path / "downloads", registry)
    results = check(None, root, registry)
    assert [result.ok for result in results] == [True, True]
    assert format_report(results, root).splitlines()[0].startswith("OK       flickr8k")

    (root / "flickr8k" / "Flicker8k_Dataset" / FLICKR_IDS["test"]).unlink()
    token = root / "flickr8k" / "Flickr8k.token.txt"
    token.write_text(token.read_text().replace("caption 0 of dev", "a changed caption"))
    (root / "uci_mfeat" / "mfeat-kar.csv").unlink()
    results = check(None, root, registry)
    assert not any(result.ok for result in results)
    report = format_report(results, root)
    assert "holds 2 *.jpg images, expected 3" in report
    assert f"1 images of Flickr_8k.testImages.txt are missing from Flicker8k_Dataset/, e.g. {FLICKR_IDS['test']}" \
        in report
    assert "Flickr8k.token.txt: sha256" in report and "missing mfeat-kar.csv" in report
    assert f"fetch it with: python -m xmr.data fetch flickr8k --root {root}" in report
    assert f"fetch it with: python -m xmr.data fetch uci_mfeat --root {root}" in report


@pytest.mark.data
def test_check_accepts_the_reference_copy(data_root):
    results = check(None, data_root)
    assert all(result.ok for result in results), format_report(results, data_root)


# --- the default data root --------------------------------------------------------------------------------------

def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("XMR_DATA", str(tmp_path / "env"))
    assert fetch_module.default_data_root() == tmp_path / "env"
    monkeypatch.delenv("XMR_DATA")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.setattr(fetch_module, "SHARED_DATA", tmp_path / "shared" / "data")
    assert fetch_module.default_data_root() == tmp_path / "shared" / "data"
    monkeypatch.setattr(fetch_module, "SHARED_DATA", tmp_path / "absent")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert fetch_module.default_data_root() == tmp_path / "cache" / "xmr" / "data"


# --- the command line -------------------------------------------------------------------------------------------

def test_command_line(server, tmp_path):
    """The real registry, its files served by the local mirror ($XMR_DATA_MIRROR): DRCL's five .mat files."""
    features = {"test_fea": np.zeros((462, 2048), np.float32), "test_lab": np.arange(462).reshape(1, -1) % 10,
                "test_pred": np.zeros((462, 10), np.float32)}
    for name in ("wiki_0.mat", "wiki_1.mat"):
        scipy.io.savemat(server.directory / name, features)
    for name in ("W_2048X10wiki0.mat", "W_2048X10wiki1.mat", "W_2048X10wiki.mat"):
        scipy.io.savemat(server.directory / name, {"W": np.ones((2048, 10), np.float32)})
    root = tmp_path / "root"
    env = {**os.environ, "XMR_DATA_MIRROR": server.url, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("XMR_DATA", None)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "xmr.data", *args], check=False, capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=120)

    missing = cli("check", "--root", str(root))
    assert missing.returncode == 1
    for name in REGISTRY:
        assert f"MISSING  {name}" in missing.stdout
        assert f"python -m xmr.data fetch {name} --root {root}" in missing.stdout

    fetched = cli("fetch", "drcl_wikipedia_features", "--root", str(root), "--no-progress")
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert "drcl_wikipedia_features: installed in" in fetched.stdout
    assert (tmp_path / "cache" / "xmr" / "downloads" / "wiki_0.mat").is_file()  # the download cache, not the root
    assert sorted(path.name for path in (root / "drcl_wikipedia_features").iterdir()) == sorted(
        ["wiki_0.mat", "wiki_1.mat", "W_2048X10wiki0.mat", "W_2048X10wiki1.mat", "W_2048X10wiki.mat"])
    complete = cli("check", "drcl_wikipedia_features", "--root", str(root))
    assert complete.returncode == 0 and "OK       drcl_wikipedia_features" in complete.stdout



def test_command_line_rejects_unknown_names(capsys, tmp_path):
    from xmr.data.__main__ import main

    assert main(["fetch", "nonsense", "--root", str(tmp_path)]) == 1
    assert "unknown dataset(s) nonsense; choose from flickr8k, wikipedia" in capsys.readouterr().err
