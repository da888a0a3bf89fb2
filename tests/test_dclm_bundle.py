"""The DCLM CORE bundle loader (`eval base --core full`), served from 127.0.0.1 as a zip in nanochat's
layout built from tests/fixtures/dclm_bundle, scored with a fake model whose choices are known exactly."""

import argparse
import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from chibichat.common import ChibiError, Home
from chibichat.eval import core as C
from chibichat.tasks import dclm

BUNDLE = Path(__file__).parent / "fixtures" / "dclm_bundle" / "eval_bundle"


def bundle_zip(edit=None) -> bytes:
    """The fixture folder as eval_bundle.zip (top folder eval_bundle/, like the real one); `edit` maps a
    relative path to replacement text (None deletes the member)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(BUNDLE.rglob("*")):
            if f.is_file():
                rel = f.relative_to(BUNDLE).as_posix()
                text = (edit or {}).get(rel, f.read_text(encoding="utf-8"))
                if text is not None:
                    z.writestr(f"eval_bundle/{rel}", text)
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.hits.append(self.path)
        self.server.auth.append((self.path, self.headers.get("Authorization")))
        body = self.server.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        body = body if body is not None else b""
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.hits, srv.auth, srv.files = [], [], {"/eval_bundle.zip": bundle_zip()}
    srv.url = f"http://127.0.0.1:{srv.server_port}"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _args(url, **kw):
    d = dict(core="full", core_bundle_url=url, core_tasks=None, core_items=None, eval_batch_size=4)
    d.update(kw)
    return argparse.Namespace(**d)


def _oracle():
    """tests/test_eval_core.py's fake scorer: every token of a continuation costs len(continuation) +
    len(the item's own context), so multiple choice picks the shortest choice and schema the shortest
    context option; language modeling is right iff the continuation's last word is a number."""
    from test_eval_core import FakeScorer

    return FakeScorer(lambda ctx, cont: float(len(cont) + len(ctx.split("\n\n")[-1])),
                      lm_ok=lambda ctx, cont: cont.split()[-1].isdigit())


# Hand-computed from the fixture files (see the comments on each line):
#   mc_plain     shortest choice = gold for items 1, 3, 4 (item 2 picks "ten")   acc 3/4, baseline .25 -> 2/3
#   mc_colon     "no" is always picked: right for items 2 and 4                   acc 1/2, baseline .50 -> 0
#   schema_plain shortest option = gold for items 1 and 4                         acc 1/2, baseline .50 -> 0
#   schema_shots shortest option is gold everywhere                               acc 1,   baseline .50 -> 1
#   lm_plain     "4" and "12" are numbers, "seven" and "end" are not              acc 1/2, baseline 0   -> 1/2
#   lm_qa        "1776" and "8" yes, "Paris" no                                   acc 2/3, baseline 0   -> 2/3
EXPECTED = {"mc_plain": (0.75, 2 / 3), "mc_colon": (0.5, 0.0), "schema_plain": (0.5, 0.0),
            "schema_shots": (1.0, 1.0), "lm_plain": (0.5, 0.5), "lm_qa": (2 / 3, 2 / 3)}


def test_bundle_downloads_once_and_converts_items(server, tmp_path):
    home = Home(tmp_path / "home")
    path = dclm.fetch_bundle(home, server.url + "/eval_bundle.zip")
    assert path == home.data_dir / "core" / "eval_bundle.zip"
    dclm.fetch_bundle(home, server.url + "/eval_bundle.zip")
    assert server.hits == ["/eval_bundle.zip"]  # cached: the second call downloads nothing
    tasks = {t.name: t for t in dclm.load_bundle(path)}
    assert list(tasks) == ["mc_plain", "mc_colon", "schema_plain", "schema_shots", "lm_plain", "lm_qa"]
    assert [tasks[n].num_fewshot for n in tasks] == [2, 0, 0, 1, 0, 1]  # first entry of num_fewshot
    assert [tasks[n].random_baseline for n in tasks] == [0.25, 0.5, 0.5, 0.5, 0.0, 0.0]
    assert tasks["mc_colon"][0] == {"type": "multiple_choice", "context": "Question: Is fire hot?\nAnswer: ",
                                    "continuations": ["yes", "no"], "gold": 0}
    assert tasks["mc_plain"][1]["context"] == "Two plus two is "  # default delimiter: one space
    assert tasks["schema_shots"][2] == {"type": "schema", "contexts": ["Jo ", "The heavy truck "],
                                        "continuation": "carried the load.", "gold": 0}
    assert tasks["lm_plain"][0] == {"type": "language_modeling", "context": "One, two, three, ", "continuation": "4"}
    assert tasks["lm_qa"][1]["context"] == "Q: What is the capital of France?\nA:" and len(tasks["lm_plain"]) == 4
    # the scored text is exactly DCLM's: query + delimiter + choice, few-shot demos separated by a blank line
    texts = C.item_texts(tasks["mc_plain"], 0)
    shots = [tasks["mc_plain"][j] for j in tasks["mc_plain"].fewshot_indices(0)]
    prefix = "".join(s["context"] + s["continuations"][s["gold"]] + "\n\n" for s in shots)
    assert [c + x for c, x in texts] == [prefix + "The sky is " + c for c in ["blue", "green grass", "a big red", "loud noise"]]


def _other_bundle() -> bytes:
    """A valid bundle unlike the fixture's: mc_plain's random baseline is 20% instead of 25%."""
    meta = (BUNDLE / "eval_meta_data.csv").read_text(encoding="utf-8")
    assert meta.count(",25,") == 1
    return bundle_zip({"eval_meta_data.csv": meta.replace(",25,", ",20,")})


def test_a_bundle_from_another_url_is_downloaded_used_and_recorded(server, tmp_path, capsys):
    """--core-bundle-url changed after the first download: the new URL's bundle is fetched (saying so), used and
    recorded; the cached one is replaced only by a complete, valid one."""
    home = Home(tmp_path / "home")
    first, second = server.url + "/eval_bundle.zip", server.url + "/mirror/eval_bundle.zip"
    server.files["/mirror/eval_bundle.zip"] = other = _other_bundle()
    path = dclm.fetch_bundle(home, first)
    record = path.with_name("eval_bundle.source.json")
    sha = hashlib.sha256(server.files["/eval_bundle.zip"]).hexdigest()
    assert json.loads(record.read_text(encoding="utf-8")) == {"url": first, "sha256": sha}
    assert dclm.fetch_bundle(home, first) == path and server.hits == ["/eval_bundle.zip"]  # same URL: cached
    assert capsys.readouterr().err == ""

    assert dclm.fetch_bundle(home, second) == path
    assert server.hits == ["/eval_bundle.zip", "/mirror/eval_bundle.zip"]
    assert capsys.readouterr().err == f"the cached CORE bundle {path} came from {first}: downloading {second}\n"
    assert path.read_bytes() == other
    assert {t.name: t.random_baseline for t in dclm.load_bundle(path)}["mc_plain"] == 0.2
    assert json.loads(record.read_text(encoding="utf-8")) == {"url": second,
                                                              "sha256": hashlib.sha256(other).hexdigest()}
    dclm.fetch_bundle(home, second)
    assert len(server.hits) == 2 and capsys.readouterr().err == ""  # now cached for the new URL

    # A URL that fails: the cached bundle and its record stay as they were.
    with pytest.raises(ChibiError, match="nope.zip answered HTTP 404"):
        dclm.fetch_bundle(home, server.url + "/nope.zip")
    assert path.read_bytes() == other and json.loads(record.read_text(encoding="utf-8"))["url"] == second
    # A zip the record does not describe (an update stopped before its rename) is not taken for the URL's.
    record.write_text(json.dumps({"url": second, "sha256": "0" * 64}), encoding="utf-8")
    capsys.readouterr()
    dclm.fetch_bundle(home, second)
    assert server.hits[-1] == "/mirror/eval_bundle.zip" and len(server.hits) == 4
    assert capsys.readouterr().err == (f"the cached CORE bundle {path} is not the file its record "
                                       f"eval_bundle.source.json describes: downloading {second}\n")
    assert sorted(f.name for f in path.parent.iterdir() if not f.name.startswith(".")) == [
        "eval_bundle.source.json", "eval_bundle.zip"]


def test_a_cache_without_a_record_is_kept_for_the_default_url_only(server, tmp_path, monkeypatch, capsys):
    """A zip cached before records were kept: the default URL uses it with no request, another URL fetches."""
    monkeypatch.setattr(dclm, "BUNDLE_URL", server.url + "/eval_bundle.zip")  # the default, served here
    home = Home(tmp_path / "home")
    path = home.data_dir / "core" / "eval_bundle.zip"
    path.parent.mkdir(parents=True)
    path.write_bytes(old := _other_bundle())
    assert dclm.fetch_bundle(home, dclm.BUNDLE_URL) == path
    assert server.hits == [] and path.read_bytes() == old and capsys.readouterr().err == ""
    assert not path.with_name("eval_bundle.source.json").exists()
    mirror = server.url + "/mirror/eval_bundle.zip"
    server.files["/mirror/eval_bundle.zip"] = server.files["/eval_bundle.zip"]
    dclm.fetch_bundle(home, mirror)
    assert server.hits == ["/mirror/eval_bundle.zip"] and path.read_bytes() == server.files["/eval_bundle.zip"]
    assert capsys.readouterr().err == (f"the cached CORE bundle {path} has no record of the URL it came from "
                                       f"(eval_bundle.source.json): downloading {mirror}\n")


def test_the_bundle_download_sends_no_hub_token(server, tmp_path, monkeypatch):
    """HF_TOKEN is for the Hugging Face endpoint: not sent to the bundle's server, even when it is the endpoint."""
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("CHIBICHAT_HF_ENDPOINT", server.url)
    dclm.fetch_bundle(Home(tmp_path / "home"), server.url + "/eval_bundle.zip")
    assert server.auth == [("/eval_bundle.zip", None)]


def test_bundle_delimiter_is_context_and_only_the_answer_is_scored(server, tmp_path):
    # DCLM scores the choice (" yes"), not the "\nAnswer:" every choice shares: scoring it too weighs short and
    # long choices unequally in the mean loss, and asks an LM item to reproduce the delimiter greedily.
    from test_eval_core import CharTok

    path = dclm.fetch_bundle(Home(tmp_path / "home"), server.url + "/eval_bundle.zip")
    tasks = {t.name: t for t in dclm.load_bundle(path)}
    tok = CharTok()

    def scored(name, i):
        return [tok.decode(ids[start:]) for ids, start in C.item_requests(tok, tasks[name], i)]

    assert C.item_texts(tasks["mc_colon"], 0) == [("Question: Is fire hot?\nAnswer:", " yes"),
                                                  ("Question: Is fire hot?\nAnswer:", " no")]
    assert scored("mc_colon", 0) == [" yes", " no"]
    assert scored("mc_plain", 1) == [" four", " five", " a lot", " ten"]
    assert scored("schema_shots", 2) == [" carried the load.", " carried the load."]
    assert scored("lm_plain", 0) == [" 4"]
    assert scored("lm_qa", 1) == [" Paris"]


def test_full_bundle_scores_match_hand_computed_centered_accuracy(server, home):
    from test_eval_core import CharTok

    tasks, complete, items = C.core_tasks(_args(server.url + "/eval_bundle.zip"), Home(home))
    assert complete and items == 0 and len(tasks) == 6
    out = C.evaluate_core(_oracle(), CharTok(), tasks, full_bundle=complete)
    assert [s["name"] for s in out["tasks"]] == list(EXPECTED)
    for s in out["tasks"]:
        assert (s["accuracy"], s["centered"]) == pytest.approx(EXPECTED[s["name"]]), s["name"]
    assert out["label"] == "CORE" and out["score"] == pytest.approx(17 / 36)  # (2/3 + 0 + 0 + 1 + 1/2 + 2/3) / 6
    # a subset of the bundle is a different test: same arithmetic, CORE-lite label
    part = C.evaluate_core(_oracle(), CharTok(), tasks[:2], full_bundle=False)
    assert part["label"] == "CORE-lite" and part["score"] == pytest.approx((2 / 3 + 0) / 2)


def test_label_is_core_only_for_every_task_and_item(server, home):
    url = server.url + "/eval_bundle.zip"
    _, complete, _ = C.core_tasks(_args(url), Home(home))
    assert complete
    tasks, complete, items = C.core_tasks(_args(url, core_items=2), Home(home))
    assert not complete and items == 2 and [len(t) for t in tasks] == [2] * 6
    tasks, complete, _ = C.core_tasks(_args(url, core_tasks="lm_qa,mc_plain"), Home(home))
    assert not complete and [t.name for t in tasks] == ["lm_qa", "mc_plain"]
    with pytest.raises(ChibiError, match="not in the DCLM bundle"):
        C.core_tasks(_args(url, core_tasks="hellaswag"), Home(home))
    # lite never downloads and is never labelled CORE
    tasks, complete, items = C.core_tasks(_args(None, core="lite", core_tasks="core-copa"), Home(home))
    assert not complete and items == C.CORE_ITEMS_LITE and tasks[0].name == "core-copa"
    assert server.hits == ["/eval_bundle.zip"]


def test_yaml_subset_parser_agrees_with_pyyaml():
    yaml = pytest.importorskip("yaml")
    text = (BUNDLE / "core.yaml").read_text(encoding="utf-8")
    assert dclm.parse_core_yaml(text) == yaml.safe_load(text)["icl_tasks"]
    with pytest.raises(ChibiError, match="lists no icl_tasks"):
        dclm.parse_core_yaml("other: 1\n")
    with pytest.raises(ChibiError, match="line 3"):
        dclm.parse_core_yaml("icl_tasks:\n- label: a\n  num_fewshot: [1, 2\n")


def test_yaml_comments_after_values_are_comments():
    """DCLM's task files end lines with comments (`continuation_delimiter: "\\nAnswer: " # this separates ...`);
    a '#' inside quotes or within a plain word is text."""
    text = ("icl_tasks:  # the tasks\n-\n  label: arc_easy # ok\n  dataset_uri: world_knowledge/arc_easy.jsonl # ADD YOUR"
            " OWN DATASET URI\n  num_fewshot: [10] # K\n  icl_task_type: multiple_choice\n  continuation_delimiter: "
            "\"\\nAnswer: \" # this separates questions from answers\n- label: c#1\n  dataset_uri: \"a # b.jsonl\"\n"
            "  num_fewshot: [0]\n  icl_task_type: schema\n  continuation_delimiter: 'it''s # ' # c\n")
    want = [{"label": "arc_easy", "dataset_uri": "world_knowledge/arc_easy.jsonl", "num_fewshot": [10],
             "icl_task_type": "multiple_choice", "continuation_delimiter": "\nAnswer: "},
            {"label": "c#1", "dataset_uri": "a # b.jsonl", "num_fewshot": [0], "icl_task_type": "schema",
             "continuation_delimiter": "it's # "}]
    assert dclm.parse_core_yaml(text) == want


@pytest.mark.parametrize("edit, message", [
    ({"eval_meta_data.csv": "Eval Task,Random baseline\nmc_plain,25\n"}, "no row for task 'mc_colon'"),
    ({"eval_meta_data.csv": "Task,Baseline\nmc_plain,25\n"}, "'Eval Task' and 'Random baseline'"),
    ({"eval_data/world_knowledge/lm_qa.jsonl": None}, "lacks eval_bundle/eval_data/world_knowledge/lm_qa.jsonl"),
    ({"eval_data/world_knowledge/mc_plain.jsonl": '{"query": "x", "gold": 0}\n'}, "lacks \\['choices'\\]"),
    ({"eval_data/world_knowledge/mc_plain.jsonl": "not json\n"}, "mc_plain.jsonl line 1 is not JSON"),
    ({"core.yaml": "icl_tasks:\n- label: mc_plain\n  dataset_uri: world_knowledge/mc_plain.jsonl\n"
                   "  num_fewshot: [2]\n  icl_task_type: ranking\n"}, "icl_task_type 'ranking'"),
])
def test_bad_bundles_fail_by_name(tmp_path, edit, message):
    p = tmp_path / "eval_bundle.zip"
    p.write_bytes(bundle_zip(edit))
    with pytest.raises(ChibiError, match=message):
        dclm.load_bundle(p)


def test_missing_bundle_url_and_bad_url(server, tmp_path):
    with pytest.raises(ChibiError) as e:
        dclm.fetch_bundle(Home(tmp_path / "h"), server.url + "/nope.zip")
    assert str(e.value) == (f"{server.url}/nope.zip answered HTTP 404 Not Found; check the URL / --core-bundle-url "
                            "or $CHIBICHAT_CORE_BUNDLE_URL")
    with pytest.raises(ChibiError) as e:
        dclm.fetch_bundle(Home(tmp_path / "h"), "ftp://example.invalid/eval_bundle.zip")
    assert str(e.value) == ("the CORE bundle URL (--core-bundle-url or $CHIBICHAT_CORE_BUNDLE_URL) must be an "
                            "http(s) URL, got 'ftp://example.invalid/eval_bundle.zip'")
