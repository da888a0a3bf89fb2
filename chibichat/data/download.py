"""Robust downloads: one file (`download_file`) and the shards of an online corpus (`download_corpus`).

download_file fetches into `<dest>.part`, resumes a partial `.part` with an HTTP Range request,
retries network errors and 5xx/408/429 answers with exponential backoff, checks the length, runs a
validator on the finished bytes (a corrupt file is deleted and fetched again from scratch), and
only then renames `.part` to `dest`, so `dest` is always complete. A per-file lock keeps two
processes (e.g. torchrun ranks) from writing the same `.part`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Iterator

from chibichat.common import ChibiError, Home, eprint, fsync_dir

# Client errors worth retrying: request timeout, rate limit. Any other 4xx is permanent.
RETRY_STATUS_4XX = {408, 429}
# Bytes per read: a dropped connection loses at most the chunk being read, so keep it modest.
CHUNK = 1 << 18


class _Retry(Exception):
    """A failed attempt that may succeed if tried again."""


class _Stopped(BaseException):
    """Raised inside a running download when the whole batch is being interrupted (not retried)."""


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, downloads still atomic
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _attempt(url: str, part: Path, timeout: float, on_bytes: Callable[[int], None] | None, chunk_size: int) -> None:
    """One request: append to `part` from its current size; raise _Retry on a recoverable failure."""
    import requests

    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
            if r.status_code == 416 and offset:
                part.unlink()  # our partial file is longer than the remote one: start over
                raise _Retry(f"HTTP 416 for a resume at byte {offset}")
            if r.status_code >= 500 or r.status_code in RETRY_STATUS_4XX:
                raise _Retry(f"HTTP {r.status_code}")
            if r.status_code >= 400:
                raise ChibiError(f"{url} answered HTTP {r.status_code} {r.reason}; check the URL / --base-url")
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
        raise _Retry(f"{type(e).__name__}: {e}") from None
    size = part.stat().st_size
    if expected is not None and size != expected:
        raise _Retry(f"got {size} of {expected} bytes")


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
) -> Path:
    """Fetch `url` into `dest` atomically; returns dest. An existing valid `dest` is kept.

    validate(path) must raise (any exception) when the file is bad; a bad download is deleted and
    fetched again from byte 0. Waits backoff * 2**k seconds before retry k+1. After `retries`
    failed attempts raises ChibiError; a partial `.part` is kept so a later call resumes it.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if retries < 1:
        raise ChibiError(f"retries must be >= 1, got {retries}")
    with _file_lock(dest.with_name(f".{dest.name}.lock")):
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
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                _attempt(url, part, timeout, on_bytes, chunk_size)
                if validate:
                    try:
                        validate(part)
                    except Exception as e:
                        part.unlink()  # corrupt bytes cannot be resumed: start from scratch
                        raise _Retry(f"downloaded file is invalid: {e}") from None
            except _Retry as e:
                last = str(e)
                if log:
                    log(f"{dest.name}: attempt {attempt + 1}/{retries} failed ({last})")
                continue
            os.replace(part, dest)
            fsync_dir(dest.parent)  # the rename survives a power loss (the part was fsynced)
            return dest
    raise ChibiError(
        f"could not download {url} after {retries} attempts (last error: {last}); check the network or "
        "--base-url and re-run the same command: it resumes partial files"
    )


# ----------------------------------------------------------------------------------------------
# Parquet validation


def validate_parquet(path: Path, full: bool = True) -> None:
    """Raise ChibiError unless `path` is a readable parquet file with at least one row group.

    Always: the footer and every row group's metadata. full=True also decodes every row group, which
    catches damage in the middle of a file whose footer is intact.
    """
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        if pf.metadata.num_row_groups == 0:
            raise ValueError("no row groups")
        for i in range(pf.metadata.num_row_groups):
            pf.metadata.row_group(i)
            if full:
                pf.read_row_group(i)
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

    Already-downloaded valid shards are skipped. Raises ChibiError listing every shard that failed
    (the others are kept).
    """
    from chibichat.data.corpora import OnlineCorpus

    if not isinstance(corpus, OnlineCorpus):
        raise ChibiError(f"{corpus.name} is not an online corpus: nothing to download (embedded corpora ship with the package)")
    if workers < 1:
        raise ChibiError(f"--workers must be >= 1, got {workers}")
    indices = shard_indices(corpus, num_shards)
    urls = {i: corpus.online.url(i, base_url) for i in indices}  # validates base_url up front
    out_dir = corpus.data_dir(home)
    out_dir.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    bar = tqdm(total=len(indices), unit="shard", desc=f"{corpus.name}", disable=not progress, dynamic_ncols=True)
    got = [0]
    lock = threading.Lock()
    stop = threading.Event()  # set on Ctrl-C: running downloads stop at their next chunk, .part files stay

    def on_bytes(n: int) -> None:
        if stop.is_set():
            raise _Stopped()
        with lock:
            got[0] += n
            bar.set_postfix_str(f"{got[0] / 1e6:.1f} MB fetched", refresh=False)

    def one(i: int) -> Path:
        return download_file(
            urls[i], corpus.shard_path(home, i), validate=validate_parquet, retries=retries, backoff=backoff,
            timeout=timeout, on_bytes=on_bytes, log=(lambda msg: bar.write(msg)) if progress else None,
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
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    if failed:
        lines = "\n".join(f"  shard {i}: {msg}" for i, msg in sorted(failed.items()))
        raise ChibiError(f"{len(failed)} of {len(indices)} shards of {corpus.name} failed:\n{lines}")
    return sorted(done)
