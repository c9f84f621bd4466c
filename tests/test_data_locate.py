"""data.locate: where the data comes from, checksums, and the download.

The download is served from a local ``http.server`` on 127.0.0.1, from a zip
built in tmp_path out of the shared copy; nothing leaves the machine.
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from data import locate
from data.locate import MD5, download_movielens, md5, resolve_data, verify_movielens


@pytest.fixture
def no_shared_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Points the shared copy and the download folder at empty tmp locations."""
    monkeypatch.setattr(locate, "SHARED_COPY", tmp_path / "no-shared" / "ml-100k")
    monkeypatch.setattr(locate, "DOWNLOAD_DIR", tmp_path / "raw" / "ml-100k")
    return tmp_path


def folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


# --- resolve_data -----------------------------------------------------------------


def test_explicit_path_beats_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    given, env = folder(tmp_path / "given"), folder(tmp_path / "env")
    monkeypatch.setenv("EMAREC_DATA", str(env))
    assert resolve_data(given) == given
    assert resolve_data(str(given)) == given


def test_environment_beats_the_shared_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared, env = folder(tmp_path / "shared"), folder(tmp_path / "env")
    monkeypatch.setattr(locate, "SHARED_COPY", shared)
    monkeypatch.setenv("EMAREC_DATA", str(env))
    assert resolve_data() == env


def test_shared_copy_is_used_when_nothing_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = folder(tmp_path / "shared")
    monkeypatch.setattr(locate, "SHARED_COPY", shared)
    monkeypatch.setattr(locate, "download_movielens", _refuse_download)
    assert resolve_data() == shared
    assert resolve_data(None) == shared


def test_default_shared_copy_is_the_one_beside_the_checkout() -> None:
    expected = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k"
    assert locate.SHARED_COPY == expected
    if expected.is_dir():
        assert resolve_data() == expected


def test_earlier_download_is_reused(
    no_shared_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = folder(locate.DOWNLOAD_DIR)
    for name in MD5:
        (raw / name).write_text("x")
    monkeypatch.setattr(locate, "download_movielens", _refuse_download)
    assert resolve_data() == raw


def test_download_is_the_last_resort(
    no_shared_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder(locate.DOWNLOAD_DIR)
    (locate.DOWNLOAD_DIR / "u.data").write_text("partial")  # incomplete: not reused
    calls = []

    def fake_download(target: Path, url: str = locate.ARCHIVE_URL) -> Path:
        calls.append(target)
        return target

    monkeypatch.setattr(locate, "download_movielens", fake_download)
    assert resolve_data() == locate.DOWNLOAD_DIR
    assert calls == [locate.DOWNLOAD_DIR]


def test_missing_given_path_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setattr(locate, "download_movielens", _refuse_download)
    with pytest.raises(FileNotFoundError) as caught:
        resolve_data(missing)
    assert "--data" in str(caught.value)
    assert str(missing) in str(caught.value)


def test_missing_environment_path_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("EMAREC_DATA", str(missing))
    monkeypatch.setattr(locate, "download_movielens", _refuse_download)
    with pytest.raises(FileNotFoundError, match=r"EMAREC_DATA points at .*nowhere"):
        resolve_data()


def test_given_path_expands_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    data = folder(tmp_path / "ml")
    assert resolve_data("~/ml") == data


def _refuse_download(*args, **kwargs):
    raise AssertionError("resolve_data must not download here")


# --- checksums --------------------------------------------------------------------


def copy_dataset(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in MD5:
        shutil.copyfile(source / name, target / name)
    return target


def test_shared_copy_matches_the_published_checksums(ml100k_dir: Path) -> None:
    verify_movielens(ml100k_dir)
    lines = (ml100k_dir / "MD5SUMS").read_text().splitlines()
    sums = {name: digest for digest, name in (line.split() for line in lines)}
    assert {name: sums[name] for name in MD5} == MD5


def test_checksum_mismatch_names_the_file(ml100k_dir: Path, tmp_path: Path) -> None:
    copy = copy_dataset(ml100k_dir, tmp_path / "ml-100k")
    with open(copy / "u.item", "ab") as f:
        f.write(b"\n")
    with pytest.raises(ValueError) as caught:
        verify_movielens(copy)
    message = str(caught.value)
    assert str(copy / "u.item") in message
    assert f"has MD5 {md5(copy / 'u.item')}, expected {MD5['u.item']}" in message


def test_missing_archive_file_is_named(ml100k_dir: Path, tmp_path: Path) -> None:
    copy = copy_dataset(ml100k_dir, tmp_path / "ml-100k")
    (copy / "u.genre").unlink()
    with pytest.raises(ValueError, match=re.escape(f"{copy / 'u.genre'} is missing")):
        verify_movielens(copy)


def test_md5_of_a_known_string(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    assert md5(tmp_path / "f") == "900150983cd24fb0d6963f7d28e17f72"


# --- download -----------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1, and its base URL."""
    root = folder(tmp_path / "www")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def build_zip(source: Path, archive: Path, corrupt: str | None = None) -> Path:
    """The GroupLens layout: every file under ``ml-100k/``."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in MD5:
            content = (source / name).read_bytes()
            if name == corrupt:
                content = content.replace(b"\t5\t", b"\t1\t", 1)
            zf.writestr(f"ml-100k/{name}", content)
    return archive


def test_download_unpacks_and_verifies(
    ml100k_dir: Path, tmp_path: Path, served: tuple[Path, str]
) -> None:
    root, base = served
    build_zip(ml100k_dir, root / "ml-100k.zip")
    target = tmp_path / "data" / "raw" / "ml-100k"
    folder(target)
    (target / "stale.txt").write_text("from an earlier, broken attempt")

    assert download_movielens(target, f"{base}/ml-100k.zip") == target

    assert sorted(p.name for p in target.iterdir()) == sorted(MD5)
    for name, expected in MD5.items():
        assert md5(target / name) == expected, name


def test_download_with_a_corrupt_file_fails_on_the_md5(
    ml100k_dir: Path, tmp_path: Path, served: tuple[Path, str]
) -> None:
    root, base = served
    build_zip(ml100k_dir, root / "ml-100k.zip", corrupt="u.data")
    target = tmp_path / "raw" / "ml-100k"
    with pytest.raises(ValueError, match=r"u\.data has MD5 [0-9a-f]{32}, expected"):
        download_movielens(target, f"{base}/ml-100k.zip")
    assert not target.exists(), "nothing is unpacked into place when a check fails"


def test_download_of_a_missing_archive_raises(
    tmp_path: Path, served: tuple[Path, str]
) -> None:
    _, base = served
    with pytest.raises(OSError, match="404"):
        download_movielens(tmp_path / "raw", f"{base}/absent.zip")
    assert not (tmp_path / "raw").exists()
