"""Online task data from the Hugging Face hub's parquet export, cached under home/data/tasks/.

The hub lists the parquet files of every (subset, split) of a dataset at
    {endpoint}/api/datasets/{repo}/parquet/{subset}/{split}   ->  JSON list of file URLs
The endpoint is $CHIBICHAT_HF_ENDPOINT, else $HF_ENDPOINT, else https://huggingface.co (the same setting the
online corpora use), so tests and mirrors can point it at another server. The Hugging Face token (HF_TOKEN, else
the `hf auth login` one: data.corpora.hf_token) goes with the listing and with the files it lists on the endpoint
itself, never to another host. Files land in
    home/data/tasks/{owner}--{name}/{subset}/{split}/0000.parquet ...  + manifest.json
each file complete before it gets its name and the manifest written last, so a folder with a
manifest is always complete; later calls read the cache without touching the network.
"""

from __future__ import annotations

import json
from pathlib import Path

from chibichat.common import ChibiError, Home, atomic_write_json, eprint, read_json, sha256_file

TIMEOUT_S = 60
RETRIES = 5
BACKOFF_S = 1.0  # seconds before the 2nd attempt, doubling after (tests set 0)


def cache_dir(home: Home, repo: str, subset: str, split: str) -> Path:
    return home.data_dir / "tasks" / repo.replace("/", "--") / subset / split


def listing_url(endpoint: str, repo: str, subset: str, split: str) -> str:
    return f"{endpoint}/api/datasets/{repo}/parquet/{subset}/{split}"


def _get(url: str, what: str, headers: dict[str, str] | None = None):
    """A small JSON listing (not a file download: files go through data.download.download_file). Network
    errors and 5xx/408/429 answers are retried RETRIES times, waiting BACKOFF_S doubling, as downloads are,
    each failed attempt printed to stderr as download_file logs them. `headers`: the hub token, if any."""
    import time

    import requests

    from chibichat.data.download import RETRY_STATUS_4XX

    for attempt in range(RETRIES):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            r = requests.get(url, headers=headers, timeout=TIMEOUT_S)
        except requests.RequestException as e:
            last = f"{type(e).__name__}: {e}"
        else:
            if r.status_code == 200:
                return r
            last = f"HTTP {r.status_code}"
            if r.status_code in (401, 403):
                sent = ("the Hugging Face token sent (HF_TOKEN, else the `hf auth login` one) has no access to it"
                        if "Authorization" in (headers or {}) else "no Hugging Face token was sent")
                raise ChibiError(f"fetching {what} from {url} failed with HTTP {r.status_code}: the dataset is "
                                 f"private or gated and {sent}; set HF_TOKEN (or run `hf auth login`) to a token "
                                 "with access to the dataset, or use the shipped offline task data or a mirror "
                                 "($CHIBICHAT_HF_ENDPOINT)")
            if r.status_code < 500 and r.status_code not in RETRY_STATUS_4XX:
                raise ChibiError(f"fetching {what} from {url} failed with HTTP {r.status_code}; check the dataset, "
                                 "subset and split names (or $CHIBICHAT_HF_ENDPOINT)")
        retry = f"; trying again in {BACKOFF_S * 2 ** attempt:g} s" if attempt + 1 < RETRIES else ""
        eprint(f"{what}: attempt {attempt + 1}/{RETRIES} failed ({last}){retry}")
    if last.startswith("HTTP"):
        raise ChibiError(f"fetching {what} from {url} failed with {last} after {RETRIES} attempts: the server is busy "
                         "or down; try again later (or set $CHIBICHAT_HF_ENDPOINT to a mirror)")
    raise ChibiError(f"could not fetch {what} from {url} after {RETRIES} attempts ({last}). Check the network or "
                     "$CHIBICHAT_HF_ENDPOINT, or use the shipped offline task data")


def fetch_split(home: Home, repo: str, subset: str, split: str, endpoint: str | None = None) -> list[Path]:
    """Local parquet files of (repo, subset, split), downloading them once.

    Files are fetched with chibichat.data.download.download_file (resumable, retried, validated as
    parquet, renamed into place only when complete); manifest.json is written last, so its presence
    marks a complete split and later calls read the cache without touching the network.
    """
    from chibichat.data.corpora import HF_AUTH_FIX, HF_ENDPOINT_ENV, hf_auth_headers, hf_endpoint, hf_token
    from chibichat.data.download import download_file, validate_parquet

    final = cache_dir(home, repo, subset, split)
    manifest = final / "manifest.json"
    if manifest.exists():
        files = [final / f["file"] for f in read_json(manifest, f"task cache manifest of {repo}")["files"]]
        missing = [p for p in files if not p.exists()]
        if missing:
            raise ChibiError(f"task cache {final} lacks {missing[0].name}; delete the folder to re-download it")
        return files
    base = hf_endpoint(endpoint)
    what = f"{repo} [{subset}/{split}]"
    token = hf_token()
    listing = listing_url(base, repo, subset, split)
    r = _get(listing, f"the parquet listing of {what}", hf_auth_headers(listing, base, token))
    try:
        urls = r.json()
    except json.JSONDecodeError:
        raise ChibiError(f"the parquet listing of {what} is not JSON; is $CHIBICHAT_HF_ENDPOINT a hub?") from None
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise ChibiError(f"the hub lists no parquet files for {what}; check the subset and split names")
    entries = []
    for k, url in enumerate(urls):
        dest = final / f"{k:04d}.parquet"
        download_file(url, dest, validate=validate_parquet, retries=RETRIES, backoff=BACKOFF_S, timeout=TIMEOUT_S,
                      where=f"${HF_ENDPOINT_ENV}", headers=hf_auth_headers(url, base, token), auth=HF_AUTH_FIX)
        entries.append({"file": dest.name, "url": url, "sha256": sha256_file(dest)})
    atomic_write_json(manifest, {"repo": repo, "subset": subset, "split": split, "files": entries})
    return [final / e["file"] for e in entries]


def read_rows(files: list[Path], what: str) -> list[dict]:
    """All rows of the parquet files, in order, as dicts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for path in files:
        try:
            rows += pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise ChibiError(f"{what}: {path} is not a readable parquet file ({e}); delete {path.parent} "
                             "to re-download it") from None
    if not rows:
        raise ChibiError(f"{what} has no rows; delete its cache folder and check the split name")
    return rows


def hub_rows(home: Home, repo: str, subset: str, split: str, columns: tuple[str, ...]) -> list[dict]:
    """Rows of a hub split, checked to carry the expected columns."""
    what = f"{repo} [{subset}/{split}]"
    rows = read_rows(fetch_split(home, repo, subset, split), what)
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ChibiError(f"{what} lacks column(s) {missing} (has {sorted(rows[0])}); the dataset format changed?")
    return rows
