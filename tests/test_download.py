"""Downloads against a local HTTP server on 127.0.0.1: Range resume after a dropped connection,
re-fetch of a corrupt shard, permanent failures, the hub's sha256 and commit headers, an unreachable
server, and the `data download` command end to end."""

import gzip
import hashlib
import http.server
import io
import threading
import time
from pathlib import Path
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chibichat.common import ChibiError, Home
from chibichat.data.corpora import get_corpus
from chibichat.data.download import download_corpus, download_file, shard_indices, validate_parquet


def parquet_bytes(n_docs, seed, row_group_size=64):
    texts = [f"document {seed}-{i} " + "lorem ipsum " * (i % 7) for i in range(n_docs)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=row_group_size, compression="zstd")
    return buf.getvalue(), texts


class Server:
    """Serves `files` (path -> bytes). `faults` (path -> list of modes) applies one mode per request
    in order, then serves normally: "drop" sends the headers and half the body then closes,
    "corrupt" serves garbage of the same length, "500" answers 500, "full" ignores Range and sends
    the whole file with 200, "416" answers 416 stating no size; "broken" in `always` is forever. A Range
    from the file's size on is answered as a real server (the hub's CDN) answers it: 416 with Content-Range
    "bytes */<size>" (RFC 9110). `served` counts the body bytes sent per registered path.

    A file under /datasets/<repo>/resolve/<revision>/ is answered as the Hugging Face hub answers for an LFS
    file: a 302 to /cdn/... (which serves the bytes) carrying X-Repo-Commit, X-Linked-Etag (the file's
    sha256, quoted) and X-Linked-Size. Files are registered under resolve/main/; a request for
    resolve/<commit>/ of `commit` or an earlier one in `commits` gets the same file and that commit (main:
    the current `commit`). `advertise` (path -> sha256) states another sha256 for a file, `state_commit`
    another commit for every answer. `requests` is keyed by the registered path, `raw` lists the request
    paths as sent. A path in `gzip` is answered gzip-encoded (Content-Encoding, the compressed length) to a
    client whose Accept-Encoding allows gzip, as GitHub's raw files are. `auth` lists (request path, Authorization
    header or None); `cdn_base` (another server's base URL) is where the hub's 302s point, else this server."""

    def __init__(self):
        self.files, self.faults, self.always = {}, defaultdict(list), {}
        self.requests = defaultdict(list)  # registered path -> [Range header or None]
        self.served = defaultdict(int)
        self.raw = []
        self.commit, self.commits = "c" * 40, set()
        self.advertise, self.state_commit = {}, None
        self.hub = True  # False: resolve paths answered as a plain mirror does, the bytes with no hub headers
        self.gzip = set()
        self.auth, self.cdn_base = [], ""
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                server.raw.append(self.path)
                server.auth.append((self.path, self.headers.get("Authorization")))
                cdn = self.path.startswith("/cdn/")
                path, commit = self.path.removeprefix("/cdn"), None
                if "/resolve/" in path and not cdn:
                    head, rest = path.split("/resolve/", 1)
                    revision, name = rest.split("/", 1)
                    if revision not in ("main", server.commit, *server.commits):
                        revision = None  # a commit this repo never had: 404
                    path = f"{head}/resolve/main/{name}"
                    commit = revision and (server.commit if revision == "main" else revision)
                if not cdn:
                    server.requests[path].append(self.headers.get("Range"))
                if path not in server.files or (commit is None and "/resolve/" in path and not cdn):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if commit is not None and server.hub:  # the hub's answer for an LFS file: where the bytes are, and what
                    data = server.files[path]
                    sha = server.advertise.get(path, hashlib.sha256(data).hexdigest())
                    self.send_response(302)
                    self.send_header("Location", server.cdn_base + "/cdn" + path)
                    self.send_header("X-Repo-Commit", server.state_commit or commit)
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files[path]
                mode = server.always.get(path) or (server.faults[path].pop(0) if server.faults[path] else None)
                if mode in ("500", "416"):
                    self.send_response(int(mode))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if mode in ("corrupt", "broken"):
                    data = bytes((b * 7 + 13) % 256 for b in data)
                encoded = path in server.gzip and "gzip" in self.headers.get("Accept-Encoding", "")
                if encoded:
                    data = gzip.compress(data)
                start = 0
                rng = self.headers.get("Range")
                if rng and mode is None:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                if encoded:
                    self.send_header("Content-Encoding", "gzip")
                self.end_headers()
                if mode == "slow":  # a quarter quickly, then a trickle
                    q = len(body) // 4
                    self.wfile.write(body[:q])
                    server.served[path] += q
                    try:
                        for k in range(q, len(body), 16384):
                            time.sleep(0.05)
                            self.wfile.write(body[k : k + 16384])
                            server.served[path] += len(body[k : k + 16384])
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the client stopped reading: that is what the test wants
                    return
                if mode == "drop":
                    self.wfile.write(body[: len(body) // 2])
                    server.served[path] += len(body) // 2
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)
                server.served[path] += len(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with Server() as s:
        yield s


FAST = dict(retries=4, backoff=0.01, timeout=10, log=None, chunk_size=256)  # small reads: a drop keeps the bytes before it


def test_dropped_connection_resumes_with_range(server, tmp_path):
    data, _ = parquet_bytes(500, 0)
    server.files["/a.parquet"] = data
    server.faults["/a.parquet"] = ["drop"]
    dest = download_file(server.base + "/a.parquet", tmp_path / "a.parquet", validate=validate_parquet, **FAST)
    assert dest.read_bytes() == data
    reqs = server.requests["/a.parquet"]
    # The second request resumed where the first broke off (minus the unfinished last read).
    assert reqs[0] is None and len(reqs) == 2 and reqs[1].startswith("bytes=")
    assert len(data) // 2 - 256 < int(reqs[1][6:-1]) <= len(data) // 2
    assert not (tmp_path / "a.parquet.part").exists()


def test_the_rename_into_place_is_fsynced(server, tmp_path, fsynced):
    data, _ = parquet_bytes(50, 5)
    server.files["/f.parquet"] = data
    (tmp_path / "shards").mkdir()
    download_file(server.base + "/f.parquet", tmp_path / "shards" / "f.parquet", validate=validate_parquet, **FAST)
    assert (tmp_path / "shards" / "f.parquet").read_bytes() == data and fsynced(tmp_path / "shards")


def test_a_failed_fsync_after_the_download_is_renamed_into_place_is_a_warning(server, tmp_path, fail_dir_fsync, capsys):
    """The downloaded file has its name, whole and checked: a failed fsync of its folder after that is a warning
    that its surviving a power loss is unconfirmed, not an error (the file is kept and returned)."""
    data, _ = parquet_bytes(50, 5)
    server.files["/f.parquet"] = data
    shards = tmp_path / "shards"
    shards.mkdir()
    fail_dir_fsync(shards)  # EIO for the shards folder only: the file itself is fsynced as usual
    assert download_file(server.base + "/f.parquet", shards / "f.parquet", validate=validate_parquet,
                         **FAST) == shards / "f.parquet"
    assert capsys.readouterr().err == (
        f"warning: {shards / 'f.parquet'} was written, but the fsync of its folder failed (Input/output error "
        "(errno 5)), so it may not survive a power loss; check that disk\n")
    assert (shards / "f.parquet").read_bytes() == data and not (shards / "f.parquet.part").exists()


@pytest.mark.parametrize("code", ["EXDEV", "EIO"])
def test_a_failed_rename_of_the_finished_download_names_both_files_and_keeps_the_part(server, tmp_path, monkeypatch,
                                                                                      code):
    """Any OS error of the rename of the checked `.part` into place (not only a full or read-only disk) is a
    ChibiError naming both files, the OS error and what to do; the complete `.part` is kept."""
    import errno
    import os

    data, _ = parquet_bytes(50, 5)
    server.files["/f.parquet"] = data
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(".part"):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    dest, part = tmp_path / "f.parquet", tmp_path / "f.parquet.part"
    with pytest.raises(ChibiError) as e:
        download_file(server.base + "/f.parquet", dest, validate=validate_parquet, **FAST)
    n = getattr(errno, code)
    assert str(e.value) == (
        f"cannot rename the finished download {part} to {dest}: {os.strerror(n)} (errno {n}). {part} is complete "
        f"and checked: rename it to {dest} by hand, or fix the cause (free space, the permissions of {tmp_path}) "
        "and re-run the same command")
    assert part.read_bytes() == data and not dest.exists()


HUB_SHARD = "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00000.parquet"


@pytest.mark.parametrize("hub", [True, False], ids=["hub", "plain-server"])
def test_a_complete_part_left_by_a_failed_rename_is_checked_and_renamed_with_no_byte_fetched_again(
        server, tmp_path, monkeypatch, hub):
    """The re-run the failed rename's message asks for resumes at the `.part`'s size; the server's 416 states
    that size (Content-Range "bytes */N"), so the `.part` is whole: it is validated and checked against what the
    server states (the hub: on its redirect) like a fresh download, then renamed, with no body byte sent again."""
    import errno
    import os

    data, _ = parquet_bytes(50, 5)
    server.files[HUB_SHARD] = data
    server.hub = hub
    url, dest, part = server.base + HUB_SHARD, tmp_path / "f.parquet", tmp_path / "f.parquet.part"
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(".part"):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ChibiError, match="is complete and checked"):
        download_file(url, dest, validate=validate_parquet, **FAST)
    monkeypatch.setattr(os, "replace", real)  # the cause is fixed: re-run the same command
    assert part.read_bytes() == data and server.served[HUB_SHARD] == len(data)
    validated, got, info = [], [], {}

    def validate(path):
        validated.append((path, path.stat().st_size))
        validate_parquet(path)

    assert download_file(url, dest, validate=validate, on_bytes=got.append, info=info, **FAST) == dest
    assert dest.read_bytes() == data and not part.exists()
    assert server.requests[HUB_SHARD] == [None, f"bytes={len(data)}-"]
    assert server.served[HUB_SHARD] == len(data) and got == []  # the first run's body only
    assert validated == [(part, len(data))]
    assert info == ({"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "commit": server.commit} if hub
                    else {"sha256": None, "size": None, "commit": None})


@pytest.mark.parametrize("check", ["sha256", "validate"])
def test_a_complete_sized_part_with_wrong_bytes_is_refused_and_fetched_again(server, tmp_path, check):
    """A `.part` the size the 416 states passes no check for that: bytes that are not the sha256 the hub states, or
    that fail validate, are deleted and the file fetched again from byte 0, as a fresh download's would be."""
    data, _ = parquet_bytes(50, 5)
    wrong = bytes((b * 7 + 13) % 256 for b in data)
    server.files[HUB_SHARD] = data
    server.hub = check == "sha256"  # a plain server states no sha256: validate is the check
    dest, part = tmp_path / "f.parquet", tmp_path / "f.parquet.part"
    part.write_bytes(wrong)
    logs = []
    download_file(server.base + HUB_SHARD, dest, validate=None if check == "sha256" else validate_parquet,
                  **{**FAST, "log": logs.append})
    assert dest.read_bytes() == data and not part.exists()
    assert server.requests[HUB_SHARD] == [f"bytes={len(data)}-", None] and server.served[HUB_SHARD] == len(data)
    if check == "sha256":
        assert logs == [f"f.parquet: attempt 1/4 failed (the downloaded bytes have sha256 "
                        f"{hashlib.sha256(wrong).hexdigest()}, not the {hashlib.sha256(data).hexdigest()} the server "
                        "states for the file (X-Linked-Etag))"]
    else:
        assert len(logs) == 1 and logs[0].startswith(f"f.parquet: attempt 1/4 failed (downloaded file is invalid: "
                                                     f"{part} is not a valid parquet file (")


@pytest.mark.parametrize("stated", ["another size", "no size"])
def test_a_416_that_states_another_size_or_none_starts_the_file_over(server, tmp_path, stated):
    """A 416 for a resume whose Content-Range states another size than the `.part`'s (here: a longer `.part`), or
    no size at all (then even a `.part` of the right size cannot be told whole), deletes it and fetches from 0."""
    data, _ = parquet_bytes(50, 5)
    server.files["/f.parquet"] = data
    dest, part = tmp_path / "f.parquet", tmp_path / "f.parquet.part"
    part.write_bytes(data + b"tail" if stated == "another size" else data)
    if stated == "no size":
        server.faults["/f.parquet"] = ["416"]
    offset = part.stat().st_size
    logs = []
    download_file(server.base + "/f.parquet", dest, validate=validate_parquet, **{**FAST, "log": logs.append})
    assert dest.read_bytes() == data and not part.exists()
    assert server.requests["/f.parquet"] == [f"bytes={offset}-", None] and server.served["/f.parquet"] == len(data)
    what = f"{len(data):,} bytes" if stated == "another size" else "no size"
    assert logs == [f"f.parquet: attempt 1/4 failed (HTTP 416 for a resume at byte {offset:,}: the server states "
                    f"{what} for the file)"]


def test_server_ignoring_range_restarts_the_file(server, tmp_path):
    data, _ = parquet_bytes(500, 6)
    server.files["/r.parquet"] = data
    server.faults["/r.parquet"] = ["drop", "full"]
    download_file(server.base + "/r.parquet", tmp_path / "r.parquet", validate=validate_parquet, **FAST)
    assert (tmp_path / "r.parquet").read_bytes() == data  # the 200 body replaced the partial bytes
    assert len(server.requests["/r.parquet"]) == 2 and server.requests["/r.parquet"][1].startswith("bytes=")


def test_corrupt_download_is_refetched_from_scratch(server, tmp_path):
    data, _ = parquet_bytes(300, 1)
    server.files["/b.parquet"] = data
    server.faults["/b.parquet"] = ["corrupt", "500"]
    dest = download_file(server.base + "/b.parquet", tmp_path / "b.parquet", validate=validate_parquet, **FAST)
    assert dest.read_bytes() == data
    assert server.requests["/b.parquet"] == [None, None, None]  # no Range after a corrupt file


def test_partial_part_file_from_earlier_run_is_resumed(server, tmp_path):
    data, _ = parquet_bytes(300, 2)
    server.files["/c.parquet"] = data
    (tmp_path / "c.parquet.part").write_bytes(data[:1000])
    download_file(server.base + "/c.parquet", tmp_path / "c.parquet", validate=validate_parquet, **FAST)
    assert (tmp_path / "c.parquet").read_bytes() == data
    assert server.requests["/c.parquet"] == ["bytes=1000-"]


def test_existing_valid_file_is_kept_and_invalid_one_replaced(server, tmp_path):
    data, _ = parquet_bytes(50, 3)
    server.files["/d.parquet"] = data
    (tmp_path / "d.parquet").write_bytes(data)
    download_file(server.base + "/d.parquet", tmp_path / "d.parquet", validate=validate_parquet, **FAST)
    assert server.requests["/d.parquet"] == []
    (tmp_path / "d.parquet").write_bytes(data[: len(data) // 3])  # truncated on disk
    download_file(server.base + "/d.parquet", tmp_path / "d.parquet", validate=validate_parquet, **FAST)
    assert (tmp_path / "d.parquet").read_bytes() == data and len(server.requests["/d.parquet"]) == 1


def test_permanent_failures_raise_clear_errors(server, tmp_path):
    data, _ = parquet_bytes(50, 4)
    server.files["/bad.parquet"] = data
    server.always["/bad.parquet"] = "broken"
    with pytest.raises(ChibiError) as e:
        download_file(server.base + "/bad.parquet", tmp_path / "bad.parquet", validate=validate_parquet, **FAST)
    assert "bad.parquet" in str(e.value) and "4 attempts" in str(e.value) and "not a valid parquet" in str(e.value)
    assert len(server.requests["/bad.parquet"]) == 4 and not (tmp_path / "bad.parquet").exists()
    with pytest.raises(ChibiError, match="HTTP 404"):
        download_file(server.base + "/missing.parquet", tmp_path / "m.parquet", **FAST)
    assert len(server.requests["/missing.parquet"]) == 1  # a 404 is not retried
    with pytest.raises(ChibiError, match="could not download"):  # nothing listens on this port
        download_file("http://127.0.0.1:9/x", tmp_path / "x", retries=2, backoff=0.01, timeout=2, log=None)


def test_a_server_that_compresses_for_clients_that_accept_gzip_is_asked_for_the_bytes_as_they_are(server, tmp_path):
    """requests accepts gzip unless told otherwise; the length such a server states would be the compressed one,
    for the decompressed bytes requests hands over, and every attempt would fail."""
    data = b'{"question": "Which gas do plants take in?"}\n' * 400
    server.files["/valid-v1.3.json"] = data
    server.gzip.add("/valid-v1.3.json")
    assert download_file(server.base + "/valid-v1.3.json", tmp_path / "v.json", **FAST).read_bytes() == data
    assert server.requests["/valid-v1.3.json"] == [None]  # one attempt, from byte 0


def test_validate_parquet(tmp_path):
    data, _ = parquet_bytes(200, 5)
    (tmp_path / "ok.parquet").write_bytes(data)
    validate_parquet(tmp_path / "ok.parquet")
    mid = bytearray(data)
    mid[len(data) // 2 : len(data) // 2 + 200] = b"\x00" * 200  # damage inside a data page, footer intact
    (tmp_path / "mid.parquet").write_bytes(bytes(mid))
    validate_parquet(tmp_path / "mid.parquet", full=False)  # the cheap check reads only metadata
    with pytest.raises(ChibiError, match="mid.parquet"):
        validate_parquet(tmp_path / "mid.parquet")
    (tmp_path / "html.parquet").write_text("<html>rate limited</html>")
    with pytest.raises(ChibiError, match="html.parquet"):
        validate_parquet(tmp_path / "html.parquet", full=False)



def test_validate_parquet_refuses_a_text_column_that_is_not_utf8(tmp_path):
    """Damage that leaves the pages decodable can still break a string's UTF-8, which decoding the row groups
    does not check (pyarrow checks it only when asked, or when the text is read for training)."""
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["caf\u00e9 au lait"] * 3}), buf, compression="none", use_dictionary=False)
    data = buf.getvalue().replace("\u00e9".encode(), b"\xc3\x28")
    (tmp_path / "u.parquet").write_bytes(data)
    with pytest.raises(ChibiError) as e:
        validate_parquet(tmp_path / "u.parquet")
    assert str(e.value) == (f"{tmp_path / 'u.parquet'} is not a valid parquet file (ArrowInvalid: Column 0: In chunk "
                            "0: Invalid: Invalid UTF8 sequence at string index 0)")


def test_shard_indices_pin_val():
    fw = get_corpus("fineweb-edu")
    assert shard_indices(fw, 3) == [0, 1, 2, 1822]
    assert shard_indices(fw, 0) == [1822]
    assert len(shard_indices(fw, -1)) == 1823
    for bad in (-2, 1823):
        with pytest.raises(ChibiError, match="-n must be"):
            shard_indices(fw, bad)


def test_download_corpus_end_to_end(server, tmp_path, monkeypatch):
    """Three train shards + pinned val through the parallel downloader, with faults; then read back."""
    corpus = get_corpus("fineweb-edu")
    texts = {}
    for i in (0, 1, 2, 1822):
        data, texts[i] = parquet_bytes(130, i)
        server.files[f"/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{i:05d}.parquet"] = data
    p = "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{:05d}.parquet"
    server.faults[p.format(0)] = ["drop"]
    server.faults[p.format(1)] = ["corrupt"]
    home = Home(tmp_path)
    monkeypatch.setenv("CHIBICHAT_HF_ENDPOINT", server.base)
    paths = download_corpus(corpus, home, 3, workers=3, retries=3, backoff=0.01, timeout=10, progress=False)
    assert [x.name for x in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", "shard_01822.parquet"]
    train = corpus.shards("train", home)
    assert [d for s in train for g in range(s.num_groups()) for d in s.read_group(g)] == texts[0] + texts[1] + texts[2]
    assert train[0].num_groups() == 3  # 130 docs in row groups of 64
    assert list(corpus.iter_documents("val", home)) == texts[1822]
    assert sorted(f.name for f in corpus.data_dir(home).iterdir() if not f.name.startswith(".")) == \
        ["manifest.json"] + [x.name for x in paths]

    # A shard that stays broken: the rest is kept and the error names the shard.
    server.always[p.format(3)] = "broken"
    server.files[p.format(3)] = parquet_bytes(10, 3)[0]
    with pytest.raises(ChibiError) as e:
        download_corpus(corpus, home, 4, workers=2, retries=2, backoff=0.01, timeout=10, progress=False)
    assert "1 of 5 shards" in str(e.value) and "shard 3" in str(e.value)
    assert len(server.requests[p.format(0)]) == 2  # shard 0 was not fetched again


def test_the_hub_token_goes_with_the_shard_requests_to_the_endpoint_only(server, tmp_path, monkeypatch, no_hf_token):
    """HF_TOKEN goes to the endpoint's resolve URLs (and a redirect on the same server), never to a CDN on another
    server (port) the hub redirects to; without a token no request carries one."""
    corpus = get_corpus("fineweb-edu")
    p = "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{:05d}.parquet"
    for i in (0, 1822):
        server.files[p.format(i)] = parquet_bytes(20, i)[0]
    kw = dict(base_url=server.base, retries=2, backoff=0.01, timeout=10, progress=False)
    download_corpus(corpus, Home(tmp_path / "a"), 1, **kw)
    assert sorted(server.auth) == sorted((q, None) for i in (0, 1822) for q in (p.format(i), "/cdn" + p.format(i)))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    server.auth.clear()
    download_corpus(corpus, Home(tmp_path / "b"), 1, **kw)
    assert sorted(server.auth) == sorted((q, "Bearer hf_secret") for i in (0, 1822)
                                         for q in (p.format(i), "/cdn" + p.format(i)))
    with Server() as cdn:
        cdn.files = server.files
        server.cdn_base, server.auth = cdn.base, []
        download_corpus(corpus, Home(tmp_path / "c"), 1, **kw)
    assert sorted(server.auth) == sorted((p.format(i), "Bearer hf_secret") for i in (0, 1822))
    assert sorted(cdn.auth) == sorted(("/cdn" + p.format(i), None) for i in (0, 1822))


def test_download_rejects_non_online_corpora(tmp_path):
    for name in ("embedded-en", f"local:{tmp_path}"):
        with pytest.raises(ChibiError, match="nothing to download"):
            download_corpus(get_corpus(name), Home(tmp_path), 1, progress=False)
    with pytest.raises(ChibiError, match="--workers"):
        download_corpus(get_corpus("climbmix"), Home(tmp_path), 1, workers=0, progress=False)
    with pytest.raises(ChibiError, match="http"):
        download_corpus(get_corpus("climbmix"), Home(tmp_path), 1, base_url="file:///tmp", progress=False)


def test_cli_data_download(server, tmp_path, capsys):
    from chibichat.cli import main

    p = "/datasets/kajuma/ABEJA-CC-JA-edu/resolve/main/10%25/train-{:05d}-of-00378.parquet"
    for i in (0, 377):
        server.files[p.format(i)] = parquet_bytes(20, i)[0]
    home = str(tmp_path / "home")
    argv = ["data", "download", "abeja-ja", "-n", "1", "--workers", "2", "--base-url", server.base, "--no-progress", "--home", home]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 shard(s) ready" in out and "1 of 377 train shards, val shard present" in out
    assert main(["data", "list", "abeja-ja", "--home", home]) == 0
    assert "1 of 377 train shards" in capsys.readouterr().out
    assert main(argv[:3] + ["-n", "2"] + argv[5:]) == 2  # shard 1 is not on the server
    assert "HTTP 404" in capsys.readouterr().err
    assert main(argv + ["--retries", "0"]) == 2
    assert "--retries" in capsys.readouterr().err


def test_cli_data_download_without_progress_logs_refetches_and_retries_to_stderr(server, tmp_path, capsys):
    """--no-progress hides the bar, not the warnings that would be written above it."""
    from chibichat.cli import main

    p = "/datasets/kajuma/ABEJA-CC-JA-edu/resolve/main/10%25/train-{:05d}-of-00378.parquet"
    for i in (0, 377):
        server.files[p.format(i)] = parquet_bytes(20, i)[0]
    home = tmp_path / "home"
    d = home / "data" / "abeja-ja"
    d.mkdir(parents=True)
    (d / "train-00000-of-00378.parquet").write_bytes(b"PAR1 not a parquet file")
    server.faults[p.format(377)] = ["500"]
    argv = ["data", "download", "abeja-ja", "-n", "1", "--workers", "1", "--base-url", server.base, "--no-progress",
            "--home", str(home)]
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("train-00000-of-00378.parquet: existing file is invalid (")
               and line.endswith("); fetching it again") for line in err), err
    assert "train-00377-of-00378.parquet: attempt 1/5 failed (HTTP 500)" in err


def japanese_parquet_bytes(n_docs, seed):
    """A shard shaped like fineweb-2-edu-japanese's: Japanese `text` plus the metadata columns."""
    texts = [f"文書{seed}-{i}：東京都に住んでいる私は、毎朝コーヒーを飲みます。" * (1 + i % 5) for i in range(n_docs)]
    table = pa.table({"text": texts, "id": [f"<urn:{seed}:{i}>" for i in range(n_docs)],
                      "score": [2.5 + (i % 10) / 10 for i in range(n_docs)], "token_count": [len(t) for t in texts]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=32, compression="zstd")
    return buf.getvalue(), texts


def test_fineweb2_japanese_download_validates_and_reads(server, tmp_path, capsys):
    """The Japanese online corpus through the same machinery: a corrupt shard is detected and fetched
    again, a dropped one retried; `data list` shows it; a tokenizer trains on it with the ja split."""
    from chibichat.cli import main

    p = "/datasets/hotchpotch/fineweb-2-edu-japanese/resolve/main/data/train-{:05d}-of-01239.parquet"
    texts = {}
    for i in (0, 1, 1238):
        server.files[p.format(i)], texts[i] = japanese_parquet_bytes(40 + i % 7, i)
    server.faults[p.format(0)] = ["corrupt"]  # same length, garbage: only validation can tell
    server.faults[p.format(1)] = ["drop"]
    home = str(tmp_path / "home")
    argv = ["data", "download", "fineweb-2-edu-japanese", "-n", "2", "--workers", "2", "--base-url", server.base,
            "--no-progress", "--home", home, "--retries", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3 shard(s) ready" in out and "2 of 1238 train shards, val shard present" in out
    assert len(server.requests[p.format(0)]) == 2  # the corrupt copy was rejected and fetched again
    assert len(server.requests[p.format(1)]) == 2  # the dropped connection was retried
    corpus = get_corpus("fineweb-2-edu-japanese")
    assert list(corpus.iter_documents("train", Home(Path(home)))) == texts[0] + texts[1]
    assert list(corpus.iter_documents("val", Home(Path(home)))) == texts[1238]
    assert main(["data", "list", "fineweb-2-edu-japanese", "--home", home]) == 0
    assert "2 of 1238 train shards" in capsys.readouterr().out

    # a shard damaged on disk after the download is found by the next run and replaced
    shard0 = corpus.shard_path(Home(Path(home)), 0)
    shard0.write_bytes(shard0.read_bytes()[:-100])
    assert main(argv) == 0
    capsys.readouterr()
    assert len(server.requests[p.format(0)]) == 3
    assert list(corpus.iter_documents("train", Home(Path(home))))[: len(texts[0])] == texts[0]

    # ja corpus -> the Japanese-aware split by default
    assert main(["tokenizer", "train", "--corpus", "fineweb-2-edu-japanese", "--vocab-size", "300", "--home", home]) == 0
    assert "(ja split)" in capsys.readouterr().out


def test_interrupt_stops_running_downloads_and_keeps_part(server, tmp_path, monkeypatch):
    from chibichat.data import download

    p = "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{:05d}.parquet"
    for i in (0, 1822):
        server.files[p.format(i)] = bytes(range(256)) * 8192  # 2 MB: ~5 s at the trickle
        server.always[p.format(i)] = "slow"

    def interrupted(futures):
        time.sleep(0.5)  # let both downloads start and write their first chunks
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "as_completed", interrupted)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        download_corpus(get_corpus("fineweb-edu"), Home(tmp_path), 1, workers=2, base_url=server.base, progress=False)
    assert time.monotonic() - t0 < 3.5  # stopped at the next 256 KB chunk, did not wait for the trickle
    d = tmp_path / "data" / "fineweb-edu"
    assert (d / "shard_00000.parquet.part").stat().st_size >= download.CHUNK  # kept for a resume
    assert not (d / "shard_00000.parquet").exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_an_unreachable_server_stops_the_whole_batch_after_retries_attempts(tmp_path, monkeypatch, capsys):
    """Offline (here: a closed port), 8 shards on 4 workers cost `retries` attempts in all, not `retries` per
    shard, and end in one message instead of one error per shard."""
    import requests

    from chibichat.cli import main

    attempts = []
    real_get = requests.get

    def counting_get(url, *a, **kw):
        attempts.append(url)
        return real_get(url, *a, **kw)

    monkeypatch.setattr(requests, "get", counting_get)
    base = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(ChibiError) as e:
        download_corpus(get_corpus("fineweb-edu"), Home(tmp_path), 7, workers=4, base_url=base, retries=3,
                        backoff=0.01, timeout=5, progress=False)
    assert len(attempts) == 3 and time.monotonic() - t0 < 5
    assert str(e.value).startswith(f"cannot reach {base}: 3 attempts in a row got no answer (last: ConnectionError")
    assert str(e.value).endswith("offline? Check the network (or --base-url / $CHIBICHAT_HF_ENDPOINT) and re-run the "
                                 "same command: it resumes partial files")
    attempts.clear()
    capsys.readouterr()
    assert main(["data", "download", "fineweb-edu", "-n", "20", "--base-url", base, "--retries", "2", "--no-progress",
                 "--home", str(tmp_path)]) == 2
    *retried, error, last = capsys.readouterr().err.split("\n")
    assert len(attempts) == 2 and error.startswith(f"chibichat data: error: cannot reach {base}: 2 attempts") \
        and last == ""  # one message, no line per shard
    assert len(retried) == 2 and all(" attempt 1/2 failed (ConnectionError: " in line for line in retried)


def test_a_shard_whose_bytes_are_not_the_sha256_the_hub_states_is_refused(server, tmp_path, monkeypatch):
    """The hub states each LFS file's sha256 (X-Linked-Etag on its redirect): a shard served as another valid
    parquet file than the one stated is deleted and refused, never renamed into place."""
    corpus = get_corpus("fineweb-edu")
    p = "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{:05d}.parquet"
    stated, _ = parquet_bytes(40, 0)
    server.files[p.format(0)], _ = parquet_bytes(40, 99)  # readable parquet, but not the file the hub states
    server.advertise[p.format(0)] = hashlib.sha256(stated).hexdigest()
    server.files[p.format(1822)], _ = parquet_bytes(40, 1822)
    monkeypatch.setenv("CHIBICHAT_HF_ENDPOINT", server.base)
    home = Home(tmp_path)
    with pytest.raises(ChibiError) as e:
        download_corpus(corpus, home, 1, workers=2, retries=2, backoff=0.01, timeout=10, progress=False)
    got = hashlib.sha256(server.files[p.format(0)]).hexdigest()
    assert f"shard 0: could not download {server.base}{p.format(0)} after 2 attempts (last error: the downloaded " \
           f"bytes have sha256 {got}, not the {hashlib.sha256(stated).hexdigest()} the server states for the file " \
           "(X-Linked-Etag))" in str(e.value)
    assert "1 of 2 shards" in str(e.value)
    assert not corpus.shard_path(home, 0).exists() and not corpus.shard_path(home, 0).with_suffix(".parquet.part").exists()
    assert corpus.shard_path(home, 1822).exists()  # the val shard's bytes are the stated ones
    assert all(path.startswith("/cdn/") or "/resolve/main/" in path for path in server.raw)  # the hub's redirects


def test_shards_come_from_one_commit_recorded_and_pinned(server, tmp_path, monkeypatch, capsys):
    """The first download records the dataset commit the hub answers from (X-Repo-Commit) with each shard's
    verified sha256; later downloads ask for that commit, not main, so a dataset updated in between is never
    mixed in; a server that answers from another commit anyway is refused."""
    from chibichat.data.download import read_manifest

    corpus = get_corpus("fineweb-edu")
    p = "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{:05d}.parquet"
    for i in (0, 1, 2, 1822):
        server.files[p.format(i)], _ = parquet_bytes(30, i)
    monkeypatch.setenv("CHIBICHAT_HF_ENDPOINT", server.base)
    home = Home(tmp_path)
    download_corpus(corpus, home, 1, workers=2, retries=2, backoff=0.01, timeout=10, progress=False)
    first = server.commit
    m = read_manifest(corpus, home)
    assert m["commit"] == first and m["repo"] == "karpathy/fineweb-edu-100b-shuffle"
    assert m["shards"]["shard_00000.parquet"] == {"sha256": hashlib.sha256(server.files[p.format(0)]).hexdigest(),
                                                  "size": len(server.files[p.format(0)]), "commit": first}
    server.commits.add(first)
    server.commit = "d" * 40  # main moved on
    server.raw.clear()
    download_corpus(corpus, home, 2, workers=2, retries=2, backoff=0.01, timeout=10, progress=False)
    assert [r for r in server.raw if not r.startswith("/cdn/")] == [
        f"/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/{first}/shard_00001.parquet"]
    assert read_manifest(corpus, home)["shards"]["shard_00001.parquet"]["commit"] == first
    server.state_commit = "e" * 40  # a server that ignores the pin
    with pytest.raises(ChibiError) as e:
        download_corpus(corpus, home, 3, workers=2, retries=2, backoff=0.01, timeout=10, progress=False)
    assert f"shard_00002.parquet comes from commit {'e' * 40} of the dataset, but the other shards come from commit " \
           f"{first}: delete the corpus folder to download every shard from one commit" in str(e.value)
    assert not corpus.shard_path(home, 2).exists()
    assert capsys.readouterr().err == ""  # every shard verified: no note


def test_a_server_that_states_no_sha256_is_named_and_its_shards_recorded_unverified(server, tmp_path, monkeypatch,
                                                                                    capsys):
    corpus = get_corpus("fineweb-edu")
    p = "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{:05d}.parquet"
    for i in (0, 1822):
        server.files[p.format(i)], _ = parquet_bytes(30, i)
    server.hub = False  # a plain mirror
    download_corpus(corpus, Home(tmp_path), 1, workers=2, retries=2, backoff=0.01, timeout=10, base_url=server.base,
                    progress=False)
    assert capsys.readouterr().err == (f"note: {server.base} stated no sha256 (X-Linked-Etag) for 2 of the 2 shard(s) "
                                       "fetched (not the Hugging Face hub?): they were checked as parquet only\n")
    from chibichat.data.download import read_manifest

    m = read_manifest(corpus, Home(tmp_path))
    assert m["commit"] is None and m["shards"]["shard_01822.parquet"]["sha256"] is None


@pytest.mark.parametrize("bad, what", [("", None), (" \n\t\u3000", None), (None, "a null")],
                         ids=["empty", "whitespace", "null"])
def test_a_downloaded_shard_with_a_null_text_is_refused_with_its_row(server, tmp_path, bad, what):
    """A null text in a downloaded shard is an error naming the shard file and the row (row groups of 2: row 4
    is the first row of group 2), with the fix: a fresh copy, or the row removed where the hub's file holds it.
    A blank text is the hub's data, read as the empty document it is (a local parquet file's is refused)."""
    corpus = get_corpus("fineweb-edu")
    p = "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{:05d}.parquet"
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["r0", "r1", "r2", "r3", bad, "r5"]}), buf, row_group_size=2)
    server.files[p.format(0)] = buf.getvalue()
    server.files[p.format(1822)], _ = parquet_bytes(4, 1822)
    home = Home(tmp_path)
    download_corpus(corpus, home, 1, workers=1, retries=2, backoff=0.01, timeout=10, base_url=server.base,
                    progress=False)
    (s,) = corpus.shards("train", home)
    assert s.read_group(0) == ["r0", "r1"] and s.read_group(1) == ["r2", "r3"]
    if what is None:
        assert s.read_group(2) == [bad, "r5"]
        return
    with pytest.raises(ChibiError) as e:
        s.read_group(2)
    assert str(e.value) == (
        f"{corpus.shard_path(home, 0)} row 4 (counting from 0) has {what} 'text'; delete it and run `chibichat data "
        "download fineweb-edu` (it re-downloads missing shards); if the new copy has it too, the hub's file holds "
        "it: remove that row from it")


def test_a_cached_shard_that_changed_since_its_download_is_fetched_again(server, tmp_path, monkeypatch, capsys):
    """A cached shard whose bytes changed (a failing disk, an edit) may still parse as parquet, with other text:
    a re-run checks it against the size and sha256 the manifest recorded and fetches it again."""
    corpus = get_corpus("fineweb-edu")
    p = "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{:05d}.parquet"
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"lorem ipsum {i}" for i in range(20)]}), buf, compression="none")
    server.files[p.format(0)] = buf.getvalue()
    server.files[p.format(1822)], _ = parquet_bytes(10, 1822)
    monkeypatch.setenv("CHIBICHAT_HF_ENDPOINT", server.base)
    home = Home(tmp_path)
    kw = dict(workers=1, retries=2, backoff=0.01, timeout=10, progress=False)
    download_corpus(corpus, home, 1, **kw)
    shard = corpus.shard_path(home, 0)
    changed = shard.read_bytes().replace(b"lorem", b"LOREM")
    shard.write_bytes(changed)
    validate_parquet(shard)  # still a readable parquet file
    capsys.readouterr()
    download_corpus(corpus, home, 1, **kw)
    assert shard.read_bytes() == server.files[p.format(0)]
    assert capsys.readouterr().err == (
        f"shard_00000.parquet: existing file is invalid ({shard} has sha256 {hashlib.sha256(changed).hexdigest()}, "
        f"not the {hashlib.sha256(server.files[p.format(0)]).hexdigest()} recorded in "
        f"{corpus.data_dir(home) / 'manifest.json'} when it was downloaded); fetching it again\n")
    assert len(server.requests[p.format(0)]) == 2 and len(server.requests[p.format(1822)]) == 1
