"""`chibichat bench copy`: the induction probe's rows, its losses and its refusals."""

import json
import shutil

import pytest
import torch

from chibichat.bench import copy as C
from chibichat.cli import main
from chibichat.common import ChibiError
from chibichat.train.checkpoint import load_model

from test_stages_chat import SEQ, make_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("copy") / "home")


@pytest.mark.parametrize("text, why", [
    ("d4", "write STAGE/TAG, e.g. --model base/d4"),
    ("base/", "write STAGE/TAG"),
    ("base/a/b", "write STAGE/TAG"),
    ("pre/d4", "unknown stage 'pre'; stages: base, mid, sft, rl, dpo"),
])
def test_bad_model_names_are_refused(text, why):
    with pytest.raises(ChibiError) as e:
        C.parse_model(text)
    assert str(e.value).startswith(f"--model {text!r}: ") and why in str(e.value)
    assert C.parse_model("sft/d4-s0") == ("sft", "d4-s0")


def test_a_checkpoint_given_twice_is_refused(tmp_path, capsys):
    """It was loaded and probed twice, for two identical rows of the table."""
    assert main(["bench", "copy", "--home", str(tmp_path), "--model", "base/d4", "--model", "sft/d4", "--model",
                 "base/d4"]) == 2
    assert capsys.readouterr().err.strip() == ("chibichat bench: error: --model base/d4 is given more than once; give "
                                               "each checkpoint once")


def test_half_rows_repeat_their_first_half_and_random_rows_avoid_specials():
    pieces = C.random_pieces(5, 7, 100, seed=3)
    assert pieces == C.random_pieces(5, 7, 100, seed=3) != C.random_pieces(5, 7, 100, seed=4)
    assert all(len(p) == 7 and all(0 <= t < 100 for t in p) for p in pieces)
    rows = C.probe_rows(pieces, bos=511)
    assert all(r == [511, *p, *p] for r, p in zip(rows, pieces))


def test_span_rows_repeat_a_span_at_distances_that_vary():
    pieces = C.random_pieces(40, 16, 100, seed=1)
    rows, spans = C.span_rows(pieces, bos=511, seed=0)
    assert (rows, spans) == C.span_rows(pieces, bos=511, seed=0)
    for row, (a, b, n), p in zip(rows, spans, pieces):
        assert len(row) == 17 and row[0] == 511 and 2 <= n <= 8 and b == 17 - n  # pieces of 2H = 16: S from 2 to 8
        assert row[1:b] == p[:16 - n] and row[b:] == row[a:a + n]
    assert len({b - a for a, b, _ in spans}) > 8  # the distance back to the original varies
    assert C.half_spans(C.probe_rows(pieces[:2], 511)) == [(1, 17, 16)] * 2


def test_copy_losses_score_exactly_the_copyable_targets(base):
    """Against cross-entropy computed from the logits: for half rows targets 1..H-1 and H+1..2H-1 of x[:, 1:];
    for span rows a..a+n-2 and b..b+n-2."""
    home, tok = base
    model, _ = load_model(home, "base", "d2")
    rows = C.probe_rows(C.random_pieces(3, 6, min(tok.special_ids), seed=0), tok.bos_id)
    first, repeat = C.copy_losses(model, rows, C.half_spans(rows), "cpu", batch=2)
    x = torch.tensor(rows)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none")
    assert first == pytest.approx(ce[:, 1:6].mean().item(), rel=1e-5)
    assert repeat == pytest.approx(ce[:, 7:12].mean().item(), rel=1e-5)
    rows, spans = C.span_rows(C.random_pieces(3, 12, min(tok.special_ids), seed=0), tok.bos_id, seed=2)
    first, repeat = C.copy_losses(model, rows, spans, "cpu", batch=2)
    x = torch.tensor(rows)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none")
    assert first == pytest.approx(torch.cat([ce[k, a:a + n - 1] for k, (a, _, n) in enumerate(spans)]).mean().item(),
                                  rel=1e-5)
    assert repeat == pytest.approx(torch.cat([ce[k, b:b + n - 1] for k, (_, b, n) in enumerate(spans)]).mean().item(),
                                   rel=1e-5)


def test_cli_compares_checkpoints_and_writes_the_report(base, capsys):
    home, tok = base
    shutil.copytree(home.checkpoints_dir("base", "d2"), home.checkpoints_dir("base", "twin"), dirs_exist_ok=True)
    assert main(["bench", "copy", "--home", str(home.root), "--model", "base/d2", "--model", "base/twin", "--rows", "4",
                 "--half", "8", "--device", "cpu", "--dtype", "float32", "--name", "t"]) == 0
    out = capsys.readouterr().out
    assert "| base/d2 | 5 | embedded-en |" in out and "| base/twin | 5 | embedded-en |" in out
    rep = json.loads((home.report_dir / "bench-t.json").read_text())
    assert (rep["rows"], rep["half"]) == (4, 8)
    a, b = rep["results"]
    assert all(a[k] == b[k] for k in C.KINDS)  # the same weights score the same rows alike
    model, _ = load_model(home, "base", "d2")
    rows = C.probe_rows(C.random_pieces(4, 8, min(tok.special_ids), seed=0), tok.bos_id)
    first, repeat = C.copy_losses(model, rows, C.half_spans(rows), "cpu")
    assert a["random"]["first"] == pytest.approx(first, rel=1e-5)
    assert a["random"]["gain"] == pytest.approx(first - repeat, rel=1e-4, abs=1e-6)
    rows, spans = C.span_rows(C.random_pieces(4, 16, min(tok.special_ids), seed=1), tok.bos_id, seed=0)
    first, repeat = C.copy_losses(model, rows, spans, "cpu")
    assert a["random_span"] == pytest.approx({"first": first, "repeat": repeat, "gain": first - repeat}, rel=1e-4)
    md = (home.report_dir / "bench-t.md").read_text()
    assert md.startswith("`chibichat bench copy`: rows of 17 tokens; half: BOS + 8 tokens + the same 8 again; span: "
                         "BOS + 16 - S tokens + S of them from a random place, S from 2 to 8; 4 rows of each kind.")
    assert "| model | step | text corpus | text: half gain | text: span gain | random: half gain |" in md


def _refused(capsys, argv) -> str:
    assert main(["bench", "copy", *argv]) == 2
    return capsys.readouterr().err


def test_cli_refuses_a_half_beyond_the_context_and_a_checkpoint_without_corpus(base, capsys):
    home, _ = base
    h = ["--home", str(home.root), "--device", "cpu", "--dtype", "float32"]
    assert (f"chibichat bench: error: --half {SEQ}: a row needs 2 x {SEQ} = {2 * SEQ} positions but the smallest context "
            f"among the models is {SEQ}; use --half {SEQ // 2} or less") in _refused(capsys, [*h, "--model", "base/d2",
                                                                                          "--half", str(SEQ)])
    assert "--half must be >= 2 (a first token and one to copy), got 1" in _refused(
        capsys, [*h, "--model", "base/d2", "--half", "1"])
    assert "--model 'd2': write STAGE/TAG" in _refused(capsys, [*h, "--model", "d2"])
    assert "--name '../x' must be lower-case letters, digits and '-' (it names the report files)" in _refused(
        capsys, [*h, "--model", "base/d2", "--name", "../x"])
    sdir = home.checkpoints_dir("sft", "x")
    shutil.copytree(home.checkpoints_dir("base", "d2"), sdir, dirs_exist_ok=True)
    for meta_path in sdir.glob("step_*/meta.json"):
        meta = json.loads(meta_path.read_text())
        del meta["corpus"]
        meta_path.write_text(json.dumps(meta))
    assert ("--model 'sft/x': its checkpoint does not say which corpus it was trained on; name one with --corpus"
            in _refused(capsys, [*h, "--model", "sft/x", "--rows", "2", "--half", "4"]))
    assert main(["bench", "copy", *h, "--model", "sft/x", "--rows", "2", "--half", "4", "--corpus", "embedded-en",
                 "--name", "x"]) == 0
    assert json.loads((home.report_dir / "bench-x.json").read_text())["results"][0]["corpus"] == "embedded-en"
