"""`chibichat chat`: one-shot and REPL against a tiny random checkpoint saved with the checkpoint module."""

import io
import sys

import pytest
import torch

from chibichat.cli import main


def make_home(root, layers="AS", seq_len=64, stage="sft", seed=0):
    """A home with a byte-level tokenizer and one random-weight checkpoint of `stage`."""
    from chibichat.common import Home
    from chibichat.model.gpt import GPT, GPTConfig
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.checkpoint import save_checkpoint

    home = Home.resolve(root)
    tok = Tokenizer([bytes([i]) for i in range(256)], split="gpt4")
    tok.save(home.tokenizer_dir)
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=seq_len, n_layer=len(layers), n_embd=32, n_head=4,
                    n_kv_head=4, layers=layers)  # fmt: skip
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        # a strong bias towards printable ASCII so replies are readable and rarely stop at once
        model.lm_head[ord("a") : ord("z") + 1] += 0.5
    meta = {"model_config": cfg.to_dict(), "tokenizer": {"vocab_size": tok.vocab_size, "hash": tok.hash}}
    save_checkpoint(home.checkpoints_dir(stage, "d2"), 1, model, None, meta)
    return home


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chat_home(tmp_path_factory):
    return make_home(tmp_path_factory.mktemp("chat") / "home")


def cli(args, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


BASE = ["chat", "--device", "cpu", "--dtype", "float32"]


def test_one_shot_prints_reply_and_is_reproducible(chat_home, capsys):
    args = BASE + ["--home", str(chat_home.root), "-p", "hello", "--max-tokens", "12", "--seed", "1"]
    rc, out, err = cli(args, capsys)
    assert rc == 0 and out.endswith("\n") and len(out) > 1
    rc2, out2, _ = cli(args, capsys)
    assert out2 == out  # same seed, same reply
    rc3, out3, _ = cli(args + ["--temperature", "0"], capsys)
    rc4, out4, _ = cli(args[:-2] + ["--seed", "9", "--temperature", "0"], capsys)
    assert out3 == out4  # greedy ignores the seed


def test_repl_commands_and_history_trimming(chat_home, capsys, monkeypatch):
    # context 64 - reply 8 = 56 prompt tokens; each byte is a token, so the third message overflows
    lines = ["/help", "/temp 0", "/topk 5", "/topk x", "/bogus", "a" * 20, "b" * 20, "c" * 20, "/clear", "hi", "/quit",
             "never read"]  # fmt: skip
    rc, out, err = cli(BASE + ["--home", str(chat_home.root), "--max-tokens", "8"], capsys, "\n".join(lines) + "\n",
                       monkeypatch)  # fmt: skip
    assert rc == 0
    assert "/clear" in out and "[temperature 0]" in out and "[top-k 5]" in out
    assert "needs a number" in out and "unknown command /bogus" in out
    assert "[conversation cleared]" in out
    assert "dropped the 2 oldest messages" in err


def test_repl_reports_too_long_message_and_continues(chat_home, capsys, monkeypatch):
    rc, out, err = cli(BASE + ["--home", str(chat_home.root), "--max-tokens", "8", "--temperature", "0"], capsys,
                       "x" * 200 + "\nhi\n", monkeypatch)  # fmt: skip
    assert rc == 0 and "too long for the model's context" in err
    assert out.strip()  # "hi" still got a reply


def test_errors(chat_home, tmp_path, capsys):
    home = ["--home", str(chat_home.root)]
    rc, _, err = cli(BASE + home + ["-p", "hi", "--max-tokens", "64"], capsys)
    assert rc == 2 and "--max-tokens 64" in err
    rc, _, err = cli(BASE + home + ["-p", "hi", "--from", "rl"], capsys)
    assert rc == 2 and "no rl checkpoint" in err
    rc, _, err = cli(BASE + ["--home", str(tmp_path), "-p", "hi"], capsys)
    assert rc == 2 and "tokenizer" in err
    rc, _, err = cli(BASE + home + ["-p", "hi", "--top-k", "-1"], capsys)
    assert rc == 2 and "--top-k" in err
    rc, _, err = cli(BASE + home + ["-p", "  "], capsys)
    assert rc == 2
