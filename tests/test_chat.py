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
    assert rc == 0 and ("the message is too long for the model's context: it needs 204 tokens but only 56 are "
                        "available; shorten the message, or lower --max-tokens (8 of the 64-token context are kept "
                        "for the reply)") in err
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


class FakeEngine:
    """What the chat uses of an Engine, scripted: each reply streams "part" then "done"; `interrupt` lists
    the replies (0-based) that Ctrl-C stops after their first piece. Records every prompt and seed."""

    seq_len = 64

    def __init__(self, interrupt=()):
        from chibichat.tokenizer import Tokenizer

        self.tokenizer = Tokenizer([bytes([i]) for i in range(256)], split="gpt4")
        self.interrupt, self.prompts, self.seeds = set(interrupt), [], []

    def stream(self, prompt, result, seed, **kw):
        n = len(self.prompts)
        self.prompts.append(self.tokenizer.decode(prompt))
        self.seeds.append(seed)
        yield "part"
        if n in self.interrupt:
            raise KeyboardInterrupt
        yield "done"
        result.update(finish_reason="stop", tokens=self.tokenizer.encode(f"reply{n}"))

    def to_parts(self, tokens):
        return [{"type": "text", "text": self.tokenizer.decode(tokens)}]


def fake_cli(monkeypatch, capsys, engine, args, stdin):
    import chibichat.stages.chat as chat

    monkeypatch.setattr(chat, "load_engine", lambda a: (engine, {"checkpoint_dir": "fake"}))
    return cli(BASE + args, capsys, stdin, monkeypatch)


def test_ctrl_c_stops_the_reply_not_the_session(monkeypatch, capsys):
    engine = FakeEngine(interrupt=[0])
    rc, out, err = fake_cli(monkeypatch, capsys, engine, ["--max-tokens", "8"], "first\nsecond\n")
    assert rc == 0 and out == "part\npartdone\n"
    assert "[reply stopped; this exchange is not kept in the history]" in err
    # the stopped exchange is not in the next prompt; a whole one is
    assert "first" not in engine.prompts[1] and "second" in engine.prompts[1]
    engine = FakeEngine()
    fake_cli(monkeypatch, capsys, engine, ["--max-tokens", "8"], "first\nsecond\n")
    assert "first" in engine.prompts[1] and "reply0" in engine.prompts[1]


def test_seed_range_and_wrap(monkeypatch, capsys):
    engine = FakeEngine()
    rc, _, err = fake_cli(monkeypatch, capsys, engine, ["--max-tokens", "8", "--seed", str(2**64 - 1)], "a\nb\n")
    assert rc == 0 and engine.seeds == [2**64 - 1, 0], err  # torch refuses 2**64: the second reply crashed
    for bad in (2**64, -(2**63) - 1):
        rc, _, err = fake_cli(monkeypatch, capsys, FakeEngine(), ["--seed", str(bad), "-p", "hi"], None)
        assert rc == 2 and f"--seed must be in [-2**63, 2**64 - 1] (the seeds torch takes), got {bad}" in err


def test_system_prompt_that_leaves_no_room_is_refused_at_start(monkeypatch, capsys):
    # context 64 - reply 8 = 56 for the prompt; <|bos|> <|user_start|> 60 x "\n\n" <|user_end|> <|assistant_start|>
    rc, _, err = fake_cli(monkeypatch, capsys, FakeEngine(), ["--max-tokens", "8", "--system", "x" * 60], "hi\n")
    assert rc == 2 and ("--system takes 66 tokens of the 56 left after --max-tokens 8 (context 64), leaving none "
                        "for a message; shorten it or lower --max-tokens") in err
    engine = FakeEngine()
    rc, out, _ = fake_cli(monkeypatch, capsys, engine, ["--max-tokens", "8", "--system", "x" * 40], "hi\n")
    assert rc == 0 and out == "partdone\n" and engine.prompts[0].count("x") == 40



def test_max_tokens_that_leaves_no_room_for_a_message_is_refused_at_start(monkeypatch, capsys):
    # <|bos|> <|user_start|> <|user_end|> <|assistant_start|>: 4 of the 64 tokens before any message
    for max_tokens, limit in ((63, 1), (60, 4)):  # each message failed: "max_len must be ...", "shorten the message"
        rc, _, err = fake_cli(monkeypatch, capsys, FakeEngine(), ["--max-tokens", str(max_tokens), "-p", "h"], None)
        assert rc == 2 and (f"--max-tokens {max_tokens} leaves the conversation {limit} of the 64-token context, but "
                            "the chat template alone takes 4; lower --max-tokens to at most 59") in err
    rc, out, _ = fake_cli(monkeypatch, capsys, FakeEngine(), ["--max-tokens", "59", "-p", "h"], None)
    assert rc == 0 and out == "partdone\n"


def test_undecodable_input_bytes_are_refused_not_a_crash(monkeypatch, capsys):
    """A byte the input's encoding cannot decode (a terminal in another encoding) crashed the REPL's readline with
    UnicodeDecodeError; now that message is refused and the session goes on."""
    msg = ("the message has a byte (0xFF at character 2) that is not text in the terminal's encoding; set the "
           "terminal and the locale to the same encoding (e.g. UTF-8)")
    engine = FakeEngine()
    stdin = io.TextIOWrapper(io.BytesIO(b"ab\xff\nhi\n"), encoding="utf-8")  # errors="strict", like a UTF-8 locale
    import chibichat.stages.chat as chat

    monkeypatch.setattr(chat, "load_engine", lambda a: (engine, {"checkpoint_dir": "fake"}))
    monkeypatch.setattr(sys, "stdin", stdin)
    rc = main(BASE + ["--max-tokens", "8"])
    out, err = capsys.readouterr()
    assert rc == 0 and f"[error: {msg}]" in err and out == "partdone\n"
    assert engine.prompts == ["<|bos|><|user_start|>hi<|user_end|><|assistant_start|>"]
    rc, _, err = fake_cli(monkeypatch, capsys, FakeEngine(), ["-p", "ab\udcff"], None)  # argv: decoded the same way
    assert rc == 2 and msg in err


def test_bad_flags_and_a_closed_stdin_are_refused_before_the_model_loads(monkeypatch, capsys):
    import chibichat.stages.chat as chat

    def no_load(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(chat, "load_engine", no_load)
    for flags, msg in ((["--top-k", "-1"], "--top-k must be >= 0 (0 = off), got -1"),
                       (["--temperature", "101"], "--temperature must be in [0, 100], got 101.0"),
                       (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0")):
        rc, _, err = cli(BASE + flags + ["-p", "hi"], capsys)
        assert rc == 2 and msg in err, err
    rc, _, err = cli(BASE + ["-p", " "], capsys)
    assert rc == 2 and "-p needs a non-empty message" in err
    monkeypatch.setattr(sys, "stdin", None)  # started with stdin closed: isatty() on None crashed
    assert main(BASE) == 2
    assert ("chat has no standard input to read messages from; pass a message with -p or run it with stdin open"
            in capsys.readouterr().err)


def test_windows_line_ends_are_not_part_of_the_message(monkeypatch, capsys):
    engine = FakeEngine()
    rc, out, _ = fake_cli(monkeypatch, capsys, engine, ["--max-tokens", "8"], "hello\r\nthere\r\n")
    assert rc == 0 and out == "partdone\npartdone\n"
    assert engine.prompts[0] == "<|bos|><|user_start|>hello<|user_end|><|assistant_start|>"
    assert "\r" not in engine.prompts[1]
