"""Put the site's browser assets under ``_web_assets/vendor/`` so the built book works offline.

Sphinx and myst-nb load MathJax and the ipywidgets embed manager (with RequireJS) from CDNs by default. This script
fetches pinned releases from the npm registry (``npm pack``; a package registry, reachable from CI), unpacks the
files the site needs, and writes them where ``_config.yml`` points (``mathjax_path``, ``nb_ipywidgets_js``).
``_web_assets`` is an extra ``html_static_path``, so the files are served from ``_static/vendor/``; it is not
the top-level ``_static`` folder, whose every ``.js`` file jupyter-book would load on every page.
A second run with the files in place does nothing. Usage: ``python tools/vendor_web_assets.py [--force]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VENDOR = Path(__file__).resolve().parents[1] / "_web_assets" / "vendor"

# npm package -> (files or folders inside the package, destination folder under VENDOR)
PACKAGES = {
    "mathjax@3.2.2": ("package/es5", "mathjax"),
    "@jupyter-widgets/html-manager@1.0.15": ("package/dist", "html-manager"),
}
# what _config.yml references; present means done
EXPECTED = ("mathjax/tex-mml-chtml.js", "html-manager/embed.js")


def vendor(force: bool = False) -> None:
    if not force and all((VENDOR / path).exists() for path in EXPECTED):
        return
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("npm is needed once to fetch the site's MathJax/RequireJS/ipywidgets files (apt install npm)")
    with tempfile.TemporaryDirectory() as scratch:
        for package, (member, destination) in PACKAGES.items():
            packed = subprocess.run([npm, "pack", package, "--silent"], cwd=scratch, check=True,
                                    capture_output=True, text=True).stdout.split()[-1]
            with tarfile.open(Path(scratch) / packed) as archive:
                archive.extractall(Path(scratch) / destination, filter="data")
            source = Path(scratch) / destination / member
            target = VENDOR / destination
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            if source.is_dir():  # source maps are for debugging the packages, not for the site
                shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.map"))
            else:
                shutil.copy2(source, target / source.name)
    missing = [path for path in EXPECTED if not (VENDOR / path).exists()]
    if missing:
        sys.exit(f"vendoring left out {missing}: check the package layouts in {__file__}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="fetch again even if the files are present")
    vendor(parser.parse_args().force)
