"""The first BIG-bench run downloads the sdist with a message (what, how large, where, how to use a
copy) and pip's progress bar. Tested with a real `pip download` from a package index served on
127.0.0.1 (loopback only; the sdist is a small stand-in with an in-tree build backend, so that pip's
metadata step needs nothing from any other index)."""

import functools
import http.server
import os
import tarfile
import threading
from pathlib import Path

import pytest

from mtpeft.app.assets import bigbench_tarball

BACKEND = '''
import os


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    info = os.path.join(metadata_directory, "bigbench-1.0.0.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\\nName: bigbench\\nVersion: 1.0.0\\n")
    return "bigbench-1.0.0.dist-info"
'''
PYPROJECT = '[build-system]\nrequires = []\nbuild-backend = "stand_in_backend"\nbackend-path = ["."]\n'


def make_index(root: Path) -> Path:
    """root/simple/bigbench/{index.html, bigbench-1.0.0.tar.gz}; the archive is 200 kB of random bytes
    (pip draws its progress bar above 40 kB)."""
    src = root / "src" / "bigbench-1.0.0"
    src.mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "stand_in_backend.py").write_text(BACKEND)
    (src / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: bigbench\nVersion: 1.0.0\n")
    (src / "payload.bin").write_bytes(os.urandom(200_000))
    page = root / "simple" / "bigbench"
    page.mkdir(parents=True)
    sdist = page / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname="bigbench-1.0.0")
    (page / "index.html").write_text('<html><body><a href="bigbench-1.0.0.tar.gz">bigbench-1.0.0.tar.gz</a></body></html>')
    return sdist


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):  # no access log on the test's stderr
        pass

    def do_GET(self):
        QuietHandler.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def local_index(tmp_path):
    sdist = make_index(tmp_path / "index")
    handler = functools.partial(QuietHandler, directory=str(tmp_path / "index"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    QuietHandler.requests = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple", sdist
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_first_download_says_what_how_large_where_and_shows_progress(local_index, tmp_path, monkeypatch, capfd):
    index_url, sdist = local_index
    cache = tmp_path / "cache"
    monkeypatch.setenv("MTPEFT_CACHE", str(cache))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # only this index: not the machine's mirror
    monkeypatch.setenv("PIP_INDEX_URL", index_url)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    for key in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_CONSTRAINT"):
        monkeypatch.delenv(key, raising=False)

    path = Path(bigbench_tarball())
    out, err = capfd.readouterr()
    folder = cache / "bigbench"
    assert path == folder / "bigbench-1.0.0.tar.gz" and path.read_bytes() == sdist.read_bytes()
    said = " ".join((err + out).split())
    assert "downloading the BIG-bench 1.0.0 source archive bigbench-1.0.0.tar.gz (about 358 MB" in said
    assert f"with pip into {folder}" in said
    assert f"put bigbench-1.0.0.tar.gz into {folder}, or set MTPEFT_CACHE=" in said
    assert "bigbench-1.0.0.tar.gz (" in out and "kB)" in out  # pip's own line, with the real size
    assert "\u2501" in out  # pip's progress bar
    assert any(r.endswith("bigbench-1.0.0.tar.gz") for r in QuietHandler.requests)

    # Once there, it is used as it is: no message, no request.
    QuietHandler.requests = []
    assert Path(bigbench_tarball()) == path
    out, err = capfd.readouterr()
    assert "downloading" not in err + out and QuietHandler.requests == []
