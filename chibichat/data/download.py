"""Robust downloads: one file (`download_file`) and the shards of an online corpus (`download_corpus`).

download_file fetches into `<dest>.part`, resumes a partial `.part` with an HTTP Range request,
retries network errors and 5xx/408/429 answers with exponential backoff, checks the length, runs a
validator on the finished bytes (a corrupt file is deleted and fetched again from scratch), checks
them against the size and sha256 the Hugging Face hub states for the file (hub_metadata), and only
then renames `.part` to `dest`, so `dest` is always complete. A `.part` that is already whole (a run
whose rename failed) gets a 416 for its resume stating that size: it is checked the same way and
renamed, with no byte fetched again. A per-file lock keeps two processes (e.g. torchrun ranks) from
writing the same `.part`.

download_corpus fetches many shards in parallel as one batch (_Batch): a server that does not answer
at all ends the whole batch after `retries` such attempts in a row, and every shard must come from
one commit of the dataset, recorded in <data dir>/manifest.json and pinned in the URLs of later
downloads.
"""

from __future__ import annotations

import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from chibichat.common import (ChibiError, Home, atomic_write_json, eprint, file_lock, fsync_renamed, read_json,
                              sha256_file)

# Client errors worth retrying: request timeout, rate limit. Any other 4xx is permanent.
RETRY_STATUS_4XX = {408, 429}
# Bytes per read: a dropped connection loses at most the chunk being read, so keep it modest.
CHUNK = 1 << 18


class _Retry(Exception):
    """A failed attempt that may succeed if tried again."""


class _Unreachable(Exception):
    """The batch's server did not answer `limit` attempts in a row: every download of the batch stops."""


class _Batch:
    """What the downloads of one batch (download_corpus) share.

    Reachability: attempts that got no answer are counted batch-wide, and an attempt starts only while the
    unanswered ones (failed and still waiting) number fewer than `limit`, so an unreachable server costs
    `limit` attempts in all, not `limit` per file; any answer (an HTTP error too) resets the count.
    Commit: every file must come from one commit of the dataset (X-Repo-Commit): `commit` is the pinned one,
    else the first answer's."""

    def __init__(self, limit: int, commit: str | None):
        self.limit, self.commit = limit, commit
        self.failures = self.pending = 0
        self.down: str | None = None  # why the batch stopped
        self.cond = threading.Condition()

    def begin(self) -> None:
        with self.cond:
            while self.down is None and self.failures + self.pending >= self.limit:
                self.cond.wait()
            if self.down is not None:
                raise _Unreachable(self.down)
            self.pending += 1

    def answered(self) -> None:
        with self.cond:
            self.pending -= 1
            self.failures = 0
            self.cond.notify_all()

    def unanswered(self, why: str | None) -> None:
        """An attempt ended before an answer: `why` when it got none (counted), None when it was stopped."""
        with self.cond:
            self.pending -= 1
            if why is not None:
                self.failures += 1
                if self.failures >= self.limit and self.down is None:
                    self.down = why
            self.cond.notify_all()

    def stop(self, why: str) -> None:
        with self.cond:
            self.down = self.down or why
            self.cond.notify_all()

    def sleep(self, seconds: float) -> None:
        """Back off, waking early when the batch stops."""
        with self.cond:
            self.cond.wait_for(lambda: self.down is not None, timeout=seconds)

    def same_commit(self, commit: str | None, url: str) -> None:
        """ChibiError when `url` answered from another commit than the batch's files."""
        if commit is None:
            return
        with self.cond:
            if self.commit is None:
                self.commit = commit
            elif commit != self.commit:
                raise ChibiError(f"{url} comes from commit {commit} of the dataset, but the other shards come from "
                                 f"commit {self.commit}: delete the corpus folder to download every shard from one "
                                 "commit")


# A sha256 as the hub's ETag states it for an LFS file (a git file's ETag is its 40-digit blob sha1).
SHA256_ETAG = re.compile(r"[0-9a-f]{64}")


def hub_metadata(r) -> dict:
    """The file's sha256, size and commit as the Hugging Face hub states them for a resolve URL, from the
    headers huggingface_hub's get_hf_file_metadata reads: X-Repo-Commit, X-Linked-Etag (else ETag) and
    X-Linked-Size, on the hub's own answer (the redirect to the CDN for an LFS file, or the file itself),
    which is the response in the redirect chain that carries X-Repo-Commit. Each None where not stated
    (another server; a git file, whose ETag is no sha256)."""
    for resp in (*r.history, r):
        h = resp.headers
        if "X-Repo-Commit" in h:
            etag = (h.get("X-Linked-Etag") or h.get("ETag") or "").removeprefix("W/").strip('"').lower()
            size = h.get("X-Linked-Size", "")
            return {"sha256": etag if SHA256_ETAG.fullmatch(etag) else None,
                    "size": int(size) if size.isdigit() else None, "commit": h["X-Repo-Commit"]}
    return {"sha256": None, "size": None, "commit": None}


def _check_source(part: Path, meta: dict) -> None:
    """The downloaded bytes against the size and sha256 the server states (hub_metadata); _Retry after
    deleting them on a mismatch (a resumed file whose first bytes were another version of it included)."""
    size = part.stat().st_size
    if meta["size"] is not None and size != meta["size"]:
        part.unlink()
        raise _Retry(f"got {size:,} bytes where the server states {meta['size']:,} for the file")
    if meta["sha256"] is not None:
        got = sha256_file(part)
        if got != meta["sha256"]:
            part.unlink()
            raise _Retry(f"the downloaded bytes have sha256 {got}, not the {meta['sha256']} the server states "
                         "for the file (X-Linked-Etag)")


# A 416's Content-Range (RFC 9110 section 14.4): the unsatisfied range form, which states the file's full size.
UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")


def _stated_length(r) -> int | None:
    """The full size of the file that a 416 answer states, None where it states none."""
    m = UNSATISFIED_RANGE.fullmatch(r.headers.get("Content-Range", "").strip())
    return int(m.group(1)) if m else None


class _Stopped(BaseException):
    """Raised inside a running download when the whole batch is being interrupted (not retried)."""


def _attempt(url: str, part: Path, timeout: float, on_bytes: Callable[[int], None] | None, chunk_size: int,
             batch: _Batch | None = None, where: str = "--base-url", extra: dict[str, str] | None = None,
             auth: str | None = None) -> dict:
    """One request: append to `part` from its current size; raise _Retry on a recoverable failure. Returns
    what the server states about the file (hub_metadata).

    A 416 for the resume whose Content-Range states the size `part` already has: `part` is whole (a run whose
    rename into place failed) and is left as is, for the caller's checks of a finished download (the hub's
    size and sha256 are on its redirect, before the 416; a server stating neither: the size in the 416 and
    validate). A 416 stating another size, or none: `part` is deleted and the file fetched again from byte 0."""
    import requests

    offset = part.stat().st_size if part.exists() else 0
    # identity: the file's own bytes. requests asks for gzip by default, and a server that compresses text for
    # such clients (GitHub's raw files) states the compressed Content-Length and ranges over compressed bytes.
    headers = {**(extra or {}), "Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
    if batch:
        batch.begin()
    answered, no_answer = False, None
    try:
        with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
            answered = True
            if batch:
                batch.answered()
            whole = False
            if r.status_code == 416 and offset:
                stated = _stated_length(r)
                if stated != offset:
                    part.unlink()  # not the remote file's first bytes (longer, or a size we cannot tell): start over
                    raise _Retry(f"HTTP 416 for a resume at byte {offset:,}: the server states "
                                 f"{'no size' if stated is None else f'{stated:,} bytes'} for the file")
                whole = True
            elif r.status_code >= 500 or r.status_code in RETRY_STATUS_4XX:
                raise _Retry(f"HTTP {r.status_code}")
            elif r.status_code in (401, 403) and auth:
                sent = "refused the token sent" if "Authorization" in (extra or {}) else "got no token"
                raise ChibiError(f"{url} answered HTTP {r.status_code} {r.reason}: it {sent}; {auth}")
            elif r.status_code >= 400:
                raise ChibiError(f"{url} answered HTTP {r.status_code} {r.reason}; check the URL / {where}")
            meta = hub_metadata(r)
            if batch:
                batch.same_commit(meta["commit"], url)
            if whole:
                return meta  # nothing left to fetch: download_file checks `part` as any finished download
            if offset and r.status_code == 206:
                start = r.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
                if start != str(offset):
                    part.unlink()
                    raise _Retry(f"server resumed at {start!r}, not byte {offset}")
                mode = "ab"
            else:
                offset, mode = 0, "wb"  # 200: the server sent the whole file (it ignored or got no Range)
            expected = r.headers.get("Content-Length")
            expected = offset + int(expected) if expected is not None else None
            with open(part, mode) as f:
                for block in r.iter_content(chunk_size):
                    f.write(block)
                    if on_bytes:
                        on_bytes(len(block))
                f.flush()
                os.fsync(f.fileno())
    except requests.RequestException as e:  # connection refused/dropped, timeout, incomplete body
        if not answered and isinstance(e, requests.ConnectionError):  # refused, name not resolved, connect timeout
            no_answer = f"{type(e).__name__}: {e}"
        raise _Retry(f"{type(e).__name__}: {e}") from None
    finally:
        if batch and not answered:
            batch.unanswered(no_answer)
    size = part.stat().st_size
    if expected is not None and size != expected:
        raise _Retry(f"got {size} of {expected} bytes")
    return meta


def download_file(
    url: str,
    dest: str | os.PathLike,
    validate: Callable[[Path], None] | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    on_bytes: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = eprint,
    chunk_size: int = CHUNK,
    info: dict | None = None,
    batch: _Batch | None = None,
    where: str = "--base-url",
    headers: dict[str, str] | None = None,
    auth: str | None = None,
) -> Path:
    """Fetch `url` into `dest` atomically; returns dest. An existing valid `dest` is kept.

    validate(path) must raise (any exception) when the file is bad; a bad download is deleted and
    fetched again from byte 0, and so is one whose size or sha256 is not what the server states for the
    file (hub_metadata). Waits backoff * 2**k seconds before retry k+1. After `retries` failed attempts
    raises ChibiError; a partial `.part` is kept so a later call resumes it, and so is a complete one whose
    rename to `dest` failed (a ChibiError naming both): a later call gets a 416 for its resume stating its
    size, checks it as a fresh download and renames it, fetching no byte again. `info`, when given, is
    filled with what the server stated about the file it sent (hub_metadata; left empty when an existing
    dest was kept). `batch`: the download is one of a batch's (download_corpus). `where`: the setting that
    chooses the server, named in the errors as what to check. `headers`: sent with every request (the hub
    token: corpora.hf_auth_headers, which gives it only to the endpoint's own URLs). `auth`: what a 401/403
    answer should make the user do (the hub's: corpora.HF_AUTH_FIX), else it is treated as any other 4xx.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if retries < 1:
        raise ChibiError(f"retries must be >= 1, got {retries}")
    with file_lock(dest.with_name(f".{dest.name}.lock")):
        if dest.exists():
            try:
                if validate:
                    validate(dest)
                return dest
            except Exception as e:
                if log:
                    log(f"{dest.name}: existing file is invalid ({e}); fetching it again")
                dest.unlink()
        last = "no attempt made"
        for attempt in range(retries):
            if attempt:
                (batch.sleep if batch else time.sleep)(backoff * 2 ** (attempt - 1))
            try:
                meta = _attempt(url, part, timeout, on_bytes, chunk_size, batch, where, headers, auth)
                if validate:
                    try:
                        validate(part)
                    except Exception as e:
                        part.unlink()  # corrupt bytes cannot be resumed: start from scratch
                        raise _Retry(f"downloaded file is invalid: {e}") from None
                _check_source(part, meta)
                if info is not None:
                    info.update(meta)
            except _Retry as e:
                last = str(e)
                if log:
                    log(f"{dest.name}: attempt {attempt + 1}/{retries} failed ({last})")
                continue
            try:
                os.replace(part, dest)
            except OSError as e:
                raise ChibiError(
                    f"cannot rename the finished download {part} to {dest}: {e.strerror or e} (errno {e.errno}). "
                    f"{part} is complete and checked: rename it to {dest} by hand, or fix the cause (free space, "
                    f"the permissions of {dest.parent}) and re-run the same command"
                ) from None
            fsync_renamed(dest)  # the rename survives a power loss (the part was fsynced)
            return dest
    if batch and batch.down:
        raise _Unreachable(batch.down)
    raise ChibiError(
        f"could not download {url} after {retries} attempts (last error: {last}); check the network or "
        f"{where} and re-run the same command: it resumes partial files"
    )


# ----------------------------------------------------------------------------------------------
# Parquet validation


def validate_parquet(path: Path, full: bool = True) -> None:
    """Raise ChibiError unless `path` is a readable parquet file with at least one row group.

    Always: the footer and every row group's metadata. full=True also decodes every row group and checks
    its strings are UTF-8, which catches damage in the middle of a file whose footer is intact (pyarrow
    decodes a string's bytes without checking them).
    """
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        if pf.metadata.num_row_groups == 0:
            raise ValueError("no row groups")
        for i in range(pf.metadata.num_row_groups):
            pf.metadata.row_group(i)
            if full:
                pf.read_row_group(i).validate(full=True)
    except Exception as e:
        raise ChibiError(f"{path} is not a valid parquet file ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------
# Corpus shards


def shard_indices(corpus, num_shards: int) -> list[int]:
    """Train shards 0..n-1 plus the pinned val shard (always). -1 means every shard."""
    total = corpus.online.num_shards
    val = corpus.online.val_shard
    train_total = total - 1
    if num_shards == -1:
        num_shards = train_total
    if not 0 <= num_shards <= train_total:
        raise ChibiError(f"-n must be between 0 and {train_total} train shards (or -1 for all) for {corpus.name}; got {num_shards}")
    train = [i for i in range(total) if i != val][:num_shards]
    return train + [val]


def manifest_path(corpus, home: Home) -> Path:
    """<data dir>/manifest.json: {"repo", "commit" (the dataset commit the shards come from, pinned in later
    downloads; null where the server states none), "shards": {file name: {"sha256" (verified against the
    server's; null where it stated none), "size", "commit"}}}."""
    return corpus.data_dir(home) / "manifest.json"


def read_manifest(corpus, home: Home) -> dict:
    path = manifest_path(corpus, home)
    if not path.exists():
        return {"repo": corpus.online.repo, "commit": None, "shards": {}}
    m = read_json(path, f"shard manifest of {corpus.name}")
    if not isinstance(m, dict) or not isinstance(m.get("shards"), dict):
        raise ChibiError(f"shard manifest {path} has no \"shards\" object; delete it (the shards are then checked "
                         "as parquet only until they are downloaded again)")
    return m


def check_recorded(path: Path, record, manifest: Path) -> None:
    """ChibiError unless `path` has the size and sha256 that `record` (its manifest entry, or None) states
    for it: a shard changed since its download (a failing disk, an edit) may still parse as parquet."""
    if not isinstance(record, dict):
        return
    size, want = record.get("size"), record.get("sha256")
    if isinstance(size, int) and path.stat().st_size != size:
        raise ChibiError(f"{path} has {path.stat().st_size:,} bytes, not the {size:,} recorded in {manifest} when "
                         "it was downloaded")
    if isinstance(want, str):
        got = sha256_file(path)
        if got != want:
            raise ChibiError(f"{path} has sha256 {got}, not the {want} recorded in {manifest} when it was downloaded")


def download_corpus(
    corpus,
    home: Home,
    num_shards: int,
    workers: int = 4,
    base_url: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> list[Path]:
    """Download train shards 0..num_shards-1 and the pinned val shard of an online corpus, in parallel.

    Already-downloaded valid shards are skipped; one whose size or sha256 is not what the manifest recorded
    when it was downloaded is fetched again. Every shard comes from one commit of the dataset: the one
    the manifest records (pinned in the URLs), else the first answer's; each fetched shard is recorded in the
    manifest. `retries` attempts in a row that get no answer from the server, across all shards, stop the
    batch with one ChibiError (offline, or a wrong --base-url). Otherwise raises ChibiError listing every
    shard that failed (the others are kept). Retries and re-fetches are logged above the progress bar, or to
    stderr without one. The Hugging Face token (corpora.hf_token), if any, is sent with every request.
    """
    from chibichat.data.corpora import HF_AUTH_FIX, HF_ENDPOINT_ENV, OnlineCorpus, hf_auth_headers, hf_endpoint, hf_token

    if not isinstance(corpus, OnlineCorpus):
        raise ChibiError(f"{corpus.name} is not an online corpus: nothing to download (embedded corpora ship with the package)")
    if workers < 1:
        raise ChibiError(f"--workers must be >= 1, got {workers}")
    indices = shard_indices(corpus, num_shards)
    manifest = read_manifest(corpus, home)
    pinned = manifest.get("commit")
    urls = {i: corpus.online.url(i, base_url, pinned or "main") for i in indices}  # validates base_url up front
    token = hf_token()
    out_dir = corpus.data_dir(home)
    out_dir.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    bar = tqdm(total=len(indices), unit="shard", desc=f"{corpus.name}", disable=not progress, dynamic_ncols=True)
    got = [0]
    lock = threading.Lock()
    stop = threading.Event()  # set on Ctrl-C: running downloads stop at their next chunk, .part files stay
    batch = _Batch(retries, pinned)
    infos: dict[int, dict] = {i: {} for i in indices}

    def on_bytes(n: int) -> None:
        if stop.is_set():
            raise _Stopped()
        with lock:
            got[0] += n
            bar.set_postfix_str(f"{got[0] / 1e6:.1f} MB fetched", refresh=False)

    def validate(i: int, path: Path) -> None:
        # a cached shard (and a fresh copy: both come from the pinned commit) against its manifest entry
        check_recorded(path, manifest["shards"].get(corpus.online.filename(i)), manifest_path(corpus, home))
        validate_parquet(path)

    def one(i: int) -> Path:
        return download_file(
            urls[i], corpus.shard_path(home, i), validate=lambda path: validate(i, path), retries=retries,
            backoff=backoff, timeout=timeout, on_bytes=on_bytes, log=(lambda msg: bar.write(msg)) if progress else eprint,
            info=infos[i], batch=batch, headers=hf_auth_headers(urls[i], hf_endpoint(base_url), token),
            auth=HF_AUTH_FIX,
        )

    done, failed = [], {}
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with bar:
            futures = {pool.submit(one, i): i for i in indices}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    done.append(fut.result())
                except ChibiError as e:
                    failed[i] = str(e)
                bar.update(1)
    except _Unreachable as e:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        record_shards(corpus, home, infos)
        raise ChibiError(f"cannot reach {hf_endpoint(base_url)}: {retries} attempts in a row got no answer (last: {e}); "
                         f"offline? Check the network (or --base-url / ${HF_ENDPOINT_ENV}) and re-run the same "
                         "command: it resumes partial files") from None
    except BaseException:
        stop.set()
        batch.stop("stopped")
        pool.shutdown(wait=True, cancel_futures=True)
        record_shards(corpus, home, infos)
        raise
    pool.shutdown()
    record_shards(corpus, home, infos)
    fetched = [i for i in indices if infos[i]]
    unverified = [i for i in fetched if infos[i]["sha256"] is None]
    if unverified:
        eprint(f"note: {hf_endpoint(base_url)} stated no sha256 (X-Linked-Etag) for {len(unverified)} of the "
               f"{len(fetched)} shard(s) fetched (not the Hugging Face hub?): they were checked as parquet only")
    if failed:
        lines = "\n".join(f"  shard {i}: {msg}" for i, msg in sorted(failed.items()))
        raise ChibiError(f"{len(failed)} of {len(indices)} shards of {corpus.name} failed:\n{lines}")
    return sorted(done)


def record_shards(corpus, home: Home, infos: dict[int, dict]) -> None:
    """Add the shards fetched now (a non-empty info) to the manifest, with the commit they came from."""
    fetched = {corpus.online.filename(i): info for i, info in infos.items() if info}
    if not fetched:
        return
    path = manifest_path(corpus, home)
    with file_lock(path.with_name(".manifest.json.lock")):
        m = read_manifest(corpus, home)
        for name, info in fetched.items():
            m["shards"][name] = {"sha256": info["sha256"], "size": corpus.data_dir(home).joinpath(name).stat().st_size,
                                 "commit": info["commit"]}
            m["commit"] = m.get("commit") or info["commit"]
        atomic_write_json(path, m)
