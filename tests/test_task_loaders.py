"""Online task loaders (hub parquet export, JGLUE official files) against a local HTTP server."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from chibichat.common import ChibiError, Home
from chibichat.tasks import get_task

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"


class _Handler(BaseHTTPRequestHandler):
    """Serves the hub listing API, the parquet files it lists, and JGLUE raw files; `fail` (path -> HTTP
    codes) answers a path with those codes first, one per request. `auth` records (path, Authorization header
    or None) per request; a listing names its files on `files_base` (another server) where it is set."""

    def do_GET(self):
        srv = self.server
        srv.hits.append(self.path)
        srv.auth.append((self.path, self.headers.get("Authorization")))
        if srv.fail.get(self.path):
            return self._send(srv.fail[self.path].pop(0), b'{"error": "failing on purpose"}')
        parts = self.path.strip("/").split("/")
        if parts[:2] == ["api", "datasets"] and len(parts) == 7 and parts[4] == "parquet":
            repo, subset, split = f"{parts[2]}/{parts[3]}", parts[5], parts[6]
            f = FIXTURES / "hub" / repo.replace("/", "--") / subset / f"{split}.parquet"
            if not f.exists():
                return self._send(404, b'{"error": "not found"}')
            url = f"{srv.files_base or f'http://127.0.0.1:{srv.server_port}'}/files/{repo}/{subset}/{split}/0.parquet"
            return self._send(200, json.dumps([url]).encode())
        if parts[0] == "files":
            repo, subset, split = f"{parts[1]}/{parts[2]}", parts[3], parts[4]
            f = FIXTURES / "hub" / repo.replace("/", "--") / subset / f"{split}.parquet"
            data = srv.corrupt.get(self.path) or (f.read_bytes() if f.exists() else None)
            return self._send(200, data) if data else self._send(404, b"")
        if parts[0] in ("jglue", "badjglue"):
            root = FIXTURES / "jglue" if parts[0] == "jglue" else type(self).jglue_root
            f = root / "/".join(parts[1:])
            return self._send(200, f.read_bytes()) if f.exists() else self._send(404, b"")
        self._send(404, b"")

    def _send(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _start():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.hits, srv.corrupt, srv.fail, srv.auth, srv.files_base = [], {}, {}, [], None
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture
def server(monkeypatch):
    srv = _start()
    base = f"http://127.0.0.1:{srv.server_port}"
    monkeypatch.setenv("CHIBICHAT_HF_ENDPOINT", base)
    monkeypatch.setenv("CHIBICHAT_JGLUE_BASE", base + "/jglue")
    monkeypatch.setattr("chibichat.tasks.hub.BACKOFF_S", 0.0)  # retries without sleeping
    monkeypatch.setattr("chibichat.tasks.hub.RETRIES", 2)
    yield srv
    srv.shutdown()
    srv.server_close()


def test_arc_online_converts_labels_and_caches(server, home):
    t = get_task("arc-easy", source="online", home=Home(home), split="train")
    assert t.kind == "categorical" and len(t) == 3
    assert [t[i]["answer"] for i in range(3)] == ["B", "A", "B"]  # "2" of labels 1-4 is the 2nd choice
    assert t[1]["letters"] == ["A", "B", "C"] and "- salt=A" in t[1]["messages"][0]["content"]
    assert not t.eval_only  # an online train split is training data
    cache = home / "data" / "tasks" / "allenai--ai2_arc" / "ARC-Easy" / "train"
    assert (cache / "0000.parquet").exists()
    man = json.loads((cache / "manifest.json").read_text())
    assert man["files"][0]["url"].endswith("/0.parquet") and len(man["files"][0]["sha256"]) == 64
    n = len(server.hits)
    again = get_task("arc-easy", source="online", home=Home(home), split="train")
    assert len(server.hits) == n and again[0] == t[0]  # served from the cache


def test_mmlu_and_aux(server, home):
    t = get_task("mmlu", source="online", home=Home(home), split="test")
    assert t.eval_only
    assert len(t) == 2 and t[0]["answer"] == "B" and t[1]["subject"] == "astronomy"
    aux = get_task("mmlu-aux", home=Home(home))
    assert len(aux) == 2 and aux[0]["answer"] == "A" and aux[1]["answer"] == "D"
    assert aux[1]["messages"][1]["content"] == "D"


def test_gsm8k_train_online_has_tool_calls(server, home):
    t = get_task("gsm8k", source="online", home=Home(home), split="train")
    assert len(t) == 2
    parts = t[0]["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text", "python", "python_output", "text"]
    assert parts[1]["text"] == "3*4" and parts[2]["text"] == "12" and parts[-1]["text"].endswith("#### 10")
    assert t[1]["answer"] == "2000" and t.evaluate(t[1], "so #### 2,000")
    alias = get_task("gsm8k-train", home=Home(home))
    assert alias.name == "gsm8k-train" and not alias.eval_only and alias[0] == t[0]
    arc = get_task("arc-easy-train", home=Home(home))
    assert arc.name == "arc-easy-train" and len(arc) == 3 and not arc.eval_only


def test_humaneval_online_runs_in_sandbox(server, home):
    t = get_task("humaneval", source="online", home=Home(home), split="test")
    assert len(t) == 1 and t[0]["entry_point"] == "add"
    assert t.evaluate(t[0], "    return a + b\n") and not t.evaluate(t[0], "    return a - b\n")


def test_eval_task_picks_the_full_online_test_sets(server, home):
    """`eval chat --test-sets online`: every task of ONLINE_TEST_SETS is its full test split (the fixtures'
    test.parquet files), downloaded into the home; generated tasks score their test split either way."""
    from chibichat.tasks.evalsets import ONLINE_TEST_SETS, cached_online_test_sets
    from chibichat.tasks.registry import eval_task

    h = Home(home)
    sizes = {n: len(eval_task(n, h, "online")) for n in ONLINE_TEST_SETS}
    assert sizes == {"arc-easy": 2, "arc-challenge": 2, "mmlu": 2, "gsm8k": 2, "humaneval": 1}
    assert cached_online_test_sets(h) == list(ONLINE_TEST_SETS)
    assert "Which force pulls objects toward Earth?" in eval_task("arc-challenge", h, "online")[0]["messages"][0]["content"]
    assert [hit for hit in server.hits if hit.startswith("/api/")] == [
        "/api/datasets/allenai/ai2_arc/parquet/ARC-Easy/test", "/api/datasets/allenai/ai2_arc/parquet/ARC-Challenge/test",
        "/api/datasets/cais/mmlu/parquet/all/test", "/api/datasets/openai/gsm8k/parquet/main/test",
        "/api/datasets/openai/openai_humaneval/parquet/openai_humaneval/test"]  # once each: then the cache
    assert len(eval_task("mmlu", h)) == 600  # shipped is the default
    assert eval_task("spelling", h, "online").split == eval_task("spelling", h).split == "test"
    with pytest.raises(ChibiError, match="^--test-sets 'full': choose one of shipped, online$"):
        eval_task("mmlu", h, "full")
    with pytest.raises(ChibiError, match="online test set of 'mmlu' is read from a home's task cache"):
        eval_task("mmlu", None, "online")


def test_smoltalk(server, home):
    t = get_task("smoltalk", home=Home(home), split="train")
    assert t.kind == "conversation" and len(t) == 50
    assert [m["role"] for m in t[1]["messages"]] == ["system", "user", "assistant", "user", "assistant"]


def test_online_errors(server, home):
    with pytest.raises(ChibiError, match="HTTP 404"):
        get_task("arc-easy", source="online", home=Home(home), split="nonexistent")
    with pytest.raises(ChibiError, match="home= and split="):
        get_task("arc-easy", source="online")
    with pytest.raises(ChibiError, match="source"):
        get_task("mmlu", source="ftp")
    with pytest.raises(ChibiError, match="shipped subset"):
        get_task("gsm8k", split="train")
    assert not (home / "data" / "tasks" / "allenai--ai2_arc" / "ARC-Easy" / "nonexistent").exists()


def test_corrupt_download_is_reported(server, home):
    server.corrupt["/files/openai/gsm8k/main/train/0.parquet"] = b"this is not parquet"
    with pytest.raises(ChibiError, match="not a valid parquet"):
        get_task("gsm8k", source="online", home=Home(home), split="train")
    cache = home / "data" / "tasks" / "openai--gsm8k" / "main" / "train"
    assert not (cache / "0000.parquet").exists() and not (cache / "manifest.json").exists()
    assert server.hits.count("/files/openai/gsm8k/main/train/0.parquet") == 2  # retried once
    del server.corrupt["/files/openai/gsm8k/main/train/0.parquet"]
    assert len(get_task("gsm8k", source="online", home=Home(home), split="train")) == 2  # recovers


def test_unreachable_endpoint(home, monkeypatch):
    monkeypatch.setenv("CHIBICHAT_HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    monkeypatch.setattr("chibichat.tasks.hub.BACKOFF_S", 0.0)
    monkeypatch.setattr("chibichat.tasks.hub.RETRIES", 2)
    with pytest.raises(ChibiError, match=r"^could not fetch the parquet listing of .* after 2 attempts \(ConnectionError: "):
        get_task("smoltalk", home=Home(home))


def test_the_listing_is_retried_and_its_errors_worded_by_status(server, home, no_hf_token):
    """A busy hub (429/5xx) is asked again, as file downloads are; the error names what the status means."""
    listing = "/api/datasets/openai/gsm8k/parquet/main/train"
    url = f"http://127.0.0.1:{server.server_port}{listing}"
    what = "the parquet listing of openai/gsm8k [main/train]"
    server.fail[listing] = [503]
    assert len(get_task("gsm8k", source="online", home=Home(home), split="train")) == 2
    assert server.hits.count(listing) == 2
    listing, what = "/api/datasets/openai/gsm8k/parquet/main/test", "the parquet listing of openai/gsm8k [main/test]"
    url = f"http://127.0.0.1:{server.server_port}{listing}"
    for codes, message in [
        ([429, 500], f"fetching {what} from {url} failed with HTTP 500 after 2 attempts: the server is busy or down; "
                     "try again later (or set $CHIBICHAT_HF_ENDPOINT to a mirror)"),
        ([403], f"fetching {what} from {url} failed with HTTP 403: the dataset is private or gated and no Hugging "
                "Face token was sent; set HF_TOKEN (or run `hf auth login`) to a token with access to the dataset, or "
                "use the shipped offline task data or a mirror ($CHIBICHAT_HF_ENDPOINT)"),
        ([404], f"fetching {what} from {url} failed with HTTP 404; check the dataset, subset and split names (or "
                "$CHIBICHAT_HF_ENDPOINT)"),
    ]:
        server.fail[listing], before = list(codes), server.hits.count(listing)
        with pytest.raises(ChibiError) as e:
            get_task("gsm8k", source="online", home=Home(home), split="test")
        assert str(e.value) == message
        assert server.hits.count(listing) - before == len(codes)  # 4xx other than 408/429: asked once


def test_a_listed_file_that_fails_names_the_endpoint_setting(server, home):
    """`data tasks` has no --base-url: a file's error names $CHIBICHAT_HF_ENDPOINT, the setting that picks the hub."""
    path = "/files/openai/gsm8k/main/train/0.parquet"
    url = f"http://127.0.0.1:{server.server_port}{path}"
    for codes, message in [
        ([404], f"{url} answered HTTP 404 Not Found; check the URL / $CHIBICHAT_HF_ENDPOINT"),
        ([500, 500], f"could not download {url} after 2 attempts (last error: HTTP 500); check the network or "
                     "$CHIBICHAT_HF_ENDPOINT and re-run the same command: it resumes partial files"),
    ]:
        server.fail[path] = codes
        with pytest.raises(ChibiError) as e:
            get_task("gsm8k", source="online", home=Home(home), split="train")
        assert str(e.value) == message


def test_a_listed_file_that_wants_a_token_says_how_to_give_one(server, home, monkeypatch, no_hf_token):
    """A 401/403 on a file of a gated dataset names HF_TOKEN, and whether a token was sent (it was once named
    as a wrong URL)."""
    from chibichat.data.corpora import HF_AUTH_FIX

    path = "/files/openai/gsm8k/main/train/0.parquet"
    url = f"http://127.0.0.1:{server.server_port}{path}"
    for token, code, sent in [(None, 401, "got no token"), ("hf_x", 403, "refused the token sent")]:
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        server.fail[path] = [code]
        with pytest.raises(ChibiError) as e:
            get_task("gsm8k", source="online", home=Home(home), split="train")
        reason = {401: "Unauthorized", 403: "Forbidden"}[code]
        assert str(e.value) == f"{url} answered HTTP {code} {reason}: it {sent}; {HF_AUTH_FIX}"
        assert "hf_x" not in str(e.value)


def test_each_failed_listing_attempt_is_printed_with_the_wait(server, home, capsys, monkeypatch):
    """A dropping network is not silent: one line per failed attempt, as download_file logs them, naming what
    is fetched and the wait before the next attempt (the one slept)."""
    import time

    monkeypatch.setattr("chibichat.tasks.hub.RETRIES", 3)
    listing, what = "/api/datasets/openai/gsm8k/parquet/main/train", "the parquet listing of openai/gsm8k [main/train]"
    server.fail[listing] = [503, 429]
    assert len(get_task("gsm8k", source="online", home=Home(home), split="train")) == 2
    assert capsys.readouterr().err == (f"{what}: attempt 1/3 failed (HTTP 503); trying again in 0 s\n"
                                       f"{what}: attempt 2/3 failed (HTTP 429); trying again in 0 s\n")
    slept = []
    monkeypatch.setattr("chibichat.tasks.hub.BACKOFF_S", 0.5)
    monkeypatch.setattr(time, "sleep", slept.append)
    listing, what = "/api/datasets/openai/gsm8k/parquet/main/test", "the parquet listing of openai/gsm8k [main/test]"
    server.fail[listing] = [500, 500, 500]
    with pytest.raises(ChibiError, match="failed with HTTP 500 after 3 attempts"):
        get_task("gsm8k", source="online", home=Home(home), split="test")
    assert capsys.readouterr().err == (f"{what}: attempt 1/3 failed (HTTP 500); trying again in 0.5 s\n"
                                       f"{what}: attempt 2/3 failed (HTTP 500); trying again in 1 s\n"
                                       f"{what}: attempt 3/3 failed (HTTP 500)\n")
    assert slept == [0.5, 1.0]


def test_the_hub_token_goes_to_the_endpoint_only(server, home, no_hf_token, monkeypatch):
    """HF_TOKEN (gated datasets, private mirrors) goes with the listing and the files on the endpoint; never to a
    file the listing names on another server, nor to JGLUE's server (here the endpoint's own host and port)."""
    h = Home(home)
    get_task("gsm8k", source="online", home=h, split="train")
    assert server.auth == [("/api/datasets/openai/gsm8k/parquet/main/train", None),
                           ("/files/openai/gsm8k/main/train/0.parquet", None)]  # no token: no header
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    server.auth.clear()
    get_task("gsm8k", source="online", home=h, split="test")
    get_task("jnli", home=h)
    assert server.auth == [("/api/datasets/openai/gsm8k/parquet/main/test", "Bearer hf_secret"),
                           ("/files/openai/gsm8k/main/test/0.parquet", "Bearer hf_secret"),
                           ("/jglue/jnli-v1.3/valid-v1.3.json", None)]
    other = _start()  # the listing names its files on another port
    try:
        server.files_base, server.auth = f"http://127.0.0.1:{other.server_port}", []
        assert len(get_task("arc-easy", source="online", home=h, split="test")) == 2
        assert server.auth == [("/api/datasets/allenai/ai2_arc/parquet/ARC-Easy/test", "Bearer hf_secret")]
        assert other.auth == [("/files/allenai/ai2_arc/ARC-Easy/test/0.parquet", None)]
    finally:
        other.shutdown()
        other.server_close()
    # a token without access: the error says so, and does not show it
    listing = "/api/datasets/cais/mmlu/parquet/all/test"
    server.fail[listing] = [401]
    with pytest.raises(ChibiError) as e:
        get_task("mmlu", source="online", home=h, split="test")
    assert str(e.value) == (
        f"fetching the parquet listing of cais/mmlu [all/test] from http://127.0.0.1:{server.server_port}{listing} "
        "failed with HTTP 401: the dataset is private or gated and the Hugging Face token sent (HF_TOKEN, else the "
        "`hf auth login` one) has no access to it; set HF_TOKEN (or run `hf auth login`) to a token with access to "
        "the dataset, or use the shipped offline task data or a mirror ($CHIBICHAT_HF_ENDPOINT)")


def test_smoltalk_rejects_malformed_conversation():
    from chibichat.tasks.online import check_messages

    with pytest.raises(ChibiError, match="end with an assistant"):
        check_messages([{"role": "user", "content": "hi"}], "row 0")
    with pytest.raises(ChibiError, match="message 1"):
        check_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "row 0")


# ---------------------------------------------------------------------------------------- JGLUE

def test_jglue_download_layout_and_tasks(server, home):
    h = Home(home)
    jc = get_task("jcommonsenseqa", home=h)
    assert jc.eval_only  # the dev set
    assert jc.kind == "categorical" and jc.lang == "ja" and len(jc) == 2
    assert jc[0]["answer"] == "C" and jc[0]["letters"] == list("ABCDE") and "- マザーボード=C" in jc[0]["messages"][0]["content"]
    # official layout, so the base-model JGLUE evaluator finds the same files
    assert (home / "data" / "tasks" / "jglue" / "jcommonsenseqa-v1.3" / "valid-v1.3.json").exists()

    nli = get_task("jnli", home=h)
    assert [nli[i]["answer"] for i in range(3)] == ["C", "A", "B"]
    assert nli[0]["choices"] == ["含意", "矛盾", "中立"]

    sts = get_task("jsts", home=h)
    assert sts[1]["score"] == 4.2 and sts[1]["messages"][1]["content"] == "4.2"
    assert sts.evaluate(sts[1], "４") and not sts.evaluate(sts[1], "2.0") and not sts.evaluate(sts[1], "わからない")

    qa = get_task("jsquad", home=h)
    assert len(qa) == 2 and qa[1]["answers"] == ["1400万人", "約1400万人"]
    assert qa.evaluate(qa[0], "東京都") and qa.evaluate(qa[1], "約1400万人。") and not qa.evaluate(qa[0], "大阪")
    assert not qa.evaluate(qa[1], "約１４００万人")  # JGLUE's exact match does not fold full-width digits


def test_jglue_files_match_the_evaluator(server, home):
    jglue_eval = pytest.importorskip("chibichat.eval.jglue")
    from chibichat.tasks.jglue import fetch_jglue, jglue_dir

    for t in ("jcommonsenseqa", "jnli", "jsts", "jsquad"):
        fetch_jglue(Home(home), t)
    found = jglue_eval.find_files(jglue_dir(Home(home)))
    assert sorted(found) == ["jcommonsenseqa", "jnli", "jsquad", "jsts"]


def test_jglue_parsers_reject_bad_records(tmp_path):
    from chibichat.tasks.jglue import read_records

    p = tmp_path / "x.json"
    p.write_text('{"q_id": 1, "question": "q", "choice0": "a", "choice1": "b", "choice2": "c", "choice3": "d", '
                 '"choice4": "e", "label": 7}\n', encoding="utf-8")
    with pytest.raises(ChibiError, match="label 7"):
        read_records("jcommonsenseqa", p)
    p.write_text('{"sentence1": "a", "sentence2": "b", "label": "yes"}\n', encoding="utf-8")
    with pytest.raises(ChibiError, match="not one of"):
        read_records("jnli", p)
    p.write_text('{"sentence1": "a", "sentence2": "b", "label": 7.5}\n', encoding="utf-8")
    with pytest.raises(ChibiError, match="0-5"):
        read_records("jsts", p)
    p.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ChibiError, match="line 1"):
        read_records("jsts", p)
    p.write_text('{"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q", '
                 '"answers": [], "is_impossible": false}]}]}]}', encoding="utf-8")
    with pytest.raises(ChibiError, match="no answer"):
        read_records("jsquad", p)


def test_jglue_corrupt_download_never_lands(server, home, tmp_path, monkeypatch):
    from chibichat.tasks.jglue import fetch_jglue, jglue_dir

    bad = tmp_path / "jglue" / "jnli-v1.3"
    bad.mkdir(parents=True)
    (bad / "valid-v1.3.json").write_text("<html>rate limited</html>\n", encoding="utf-8")
    monkeypatch.setattr(_Handler, "jglue_root", tmp_path / "jglue", raising=False)
    monkeypatch.setenv("CHIBICHAT_JGLUE_BASE", f"http://127.0.0.1:{server.server_port}/badjglue")
    with pytest.raises(ChibiError, match="could not download") as e:
        fetch_jglue(Home(home), "jnli")
    assert str(e.value).endswith("; check the network or $CHIBICHAT_JGLUE_BASE and re-run the same command: it "
                                 "resumes partial files")
    assert not (jglue_dir(Home(home)) / "jnli-v1.3" / "valid-v1.3.json").exists()


def test_jglue_bad_arguments(home):
    from chibichat.tasks.jglue import fetch_jglue

    with pytest.raises(ChibiError, match="test sets are not distributed"):
        fetch_jglue(Home(home), "jnli", "test")
    with pytest.raises(ChibiError, match="unknown JGLUE task"):
        fetch_jglue(Home(home), "marc-ja")
