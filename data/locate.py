"""Finds the interaction data: a given path, the environment, the shared copy, or
the public MovieLens-100K archive downloaded and checked."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_COPY = REPO_ROOT.parent / "shared" / "datasets" / "ml-100k"
DOWNLOAD_DIR = REPO_ROOT / "data" / "raw" / "ml-100k"
ARCHIVE_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
# MD5 of the files inside the GroupLens archive, as GroupLens publishes them.
MD5 = {
    "u.data": "6e47046882bad158b0efbb84cd5cb987",
    "u.genre": "eb781835e2577a877dbee07ecc27e9f0",
    "u.info": "6cae0afd8c0341aff31b631a192e57e6",
    "u.item": "c9e7f390115d79079537301d5204f3f7",
    "u.occupation": "035abaa2165f35cebce4b91e03481e0a",
    "u.user": "1b53539edc13caad0282c8500608a319",
}


def resolve_data(path: str | Path | None = None) -> Path:
    """Returns the data location.

    Order: ``path``, else ``EMAREC_DATA``, else ``../shared/datasets/ml-100k``
    beside the checkout when it exists, else the public archive downloaded into
    ``data/raw/`` and verified.

    Raises:
        FileNotFoundError: a given path does not exist.
    """
    given = path or os.environ.get("EMAREC_DATA")
    if given:
        given = Path(given).expanduser()
        if not given.exists():
            source = "--data" if path else "EMAREC_DATA"
            raise FileNotFoundError(f"{source} points at {given}, which does not exist")
        return given
    if SHARED_COPY.is_dir():
        return SHARED_COPY
    if all((DOWNLOAD_DIR / name).is_file() for name in MD5):
        return DOWNLOAD_DIR
    return download_movielens(DOWNLOAD_DIR)


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_movielens(folder: Path) -> None:
    """Checks every file against the published checksums.

    Raises:
        ValueError: a file is missing or differs, naming it.
    """
    for name, expected in MD5.items():
        if not (folder / name).is_file():
            raise ValueError(f"{folder / name} is missing from the MovieLens archive")
        actual = md5(folder / name)
        if actual != expected:
            raise ValueError(
                f"{folder / name} has MD5 {actual}, expected {expected}: the "
                "download is corrupt or not MovieLens-100K; delete it and retry"
            )


def download_movielens(target: Path, url: str = ARCHIVE_URL) -> Path:
    """Downloads the ml-100k archive, checks it and unpacks it into ``target``."""
    logger.info("downloading %s into %s", url, target)
    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(scratch) / "ml-100k.zip"
        with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f:
            shutil.copyfileobj(response, f)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(scratch)
        unpacked = Path(scratch) / "ml-100k"
        verify_movielens(unpacked)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(unpacked, target)
    return target
