"""`chibichat chat`: talk to a trained model in the terminal (streaming REPL), or one-shot with -p.

The history is re-rendered for every reply with the model's context minus the reply budget as the
limit; when it no longer fits, the oldest exchanges are dropped from the history with a notice
(upstream crashed there). The system prompt is never dropped. Notices and errors go
to stderr, so stdout carries only the model's words (one-shot output is script-friendly).

Ctrl-C during a reply stops that reply and returns to the prompt; the stopped exchange (the message
and the partial reply) is left out of the history, which holds only whole exchanges. Ctrl-C at the
prompt, or during a one-shot -p reply, ends the command as usual.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from chibichat.common import ChibiError, add_home_arg, add_model_args, add_runtime_args
from chibichat.sandbox import add_allow_weak_arg, check_sandbox
from chibichat.render import reply_budget

SEED_RANGE = (-(2**63), 2**64 - 1)  # the seeds torch's generator takes (a negative one as its two's complement)

HELP_TEXT = """commands:
  /clear        forget the conversation (the system prompt stays)
  /temp X       sampling temperature (0 = greedy)
  /topk K       top-k sampling (0 = off)
  /help         this text
  /quit         leave (Ctrl-D works too)"""


def add_sampling_args(p, temperature: float = 0.6, top_k: int = 50) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default: {temperature})")
    p.add_argument("--top-k", type=int, default=top_k, help=f"0 = off (default: {top_k})")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: off)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="reply budget in tokens (default: min(256, context/2)); the history gets the rest")  # fmt: skip
    p.add_argument("--tools", default="calculator", choices=("none", "calculator", "python"),
                   help="tool the model may call: calculator (default), python (sandboxed subprocess), none")  # fmt: skip


def register(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a trained model in the terminal (streaming; -p for one shot)",
        description="Interactive chat with a checkpoint. Type /help inside for commands.",
    )
    add_home_arg(p)
    add_runtime_args(p)
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("-p", "--prompt", default=None, help="one-shot: answer this message, print the reply, exit")
    add_allow_weak_arg(p)
    p.add_argument("--system", default=None, help="system prompt (kept when old turns are dropped)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: a new one per reply)")
    p.set_defaults(func=run, decodes_only=True)  # cli.main: common.passive_thread_waits


def load_engine(args):
    """Tokenizer + checkpoint -> (Engine, meta), weights stored in the compute dtype for speed."""
    from chibichat.common import Home, init_runtime
    from chibichat.engine import Engine, prepare_for_inference
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.checkpoint import load_model

    home = Home.resolve(args.home)
    rt = init_runtime(args.device, args.dtype)
    tok = Tokenizer.load(home.tokenizer_dir)
    model, meta = load_model(home, args.source, args.tag, args.step, rt, tokenizer=tok)
    prepare_for_inference(model)
    return Engine(model, tok, rt), meta


@dataclass
class ChatSession:
    engine: object
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    tools: str | None
    system: str | None = None
    seed: int | None = None
    history: list = field(default_factory=list)  # user/assistant messages (assistant content as parts)
    replies: int = 0

    def reply(self, text: str, out, err) -> str:
        """Stream the reply to `text` into `out`; returns the reply text. Drops old turns if needed."""
        from chibichat.render import render_prompt

        bad = next((i for i, c in enumerate(text) if "\udc80" <= c <= "\udcff"), None)
        if bad is not None:  # Python's stand-in for an input byte it could not decode (run() reads stdin so)
            raise ChibiError(
                f"the message has a byte (0x{ord(text[bad]) - 0xDC00:02X} at character {bad}) that is not text in "
                "the terminal's encoding; set the terminal and the locale to the same encoding (e.g. UTF-8)"
            )
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages.append({"role": "user", "content": text})
        tok = self.engine.tokenizer
        limit = self.engine.seq_len - self.max_tokens
        try:
            prompt = render_prompt(tok, {"messages": messages}, max_len=limit)  # ChibiError if `text` alone is too long
        except ChibiError as e:  # the reply's share of the context is the user's setting: say so
            raise ChibiError(f"{e}, or lower --max-tokens ({self.max_tokens} of the {self.engine.seq_len}-token "
                             "context are kept for the reply)") from None
        if prompt.dropped_turns:
            self.history = self.history[prompt.dropped_turns :]
            err.write(
                f"[context full: dropped the {prompt.dropped_turns} oldest messages to fit the model's "
                f"{self.engine.seq_len}-token context]\n"
            )
            err.flush()
        # wrapped into torch's range: --seed near its top still gives every later reply a valid seed
        seed = (self.seed + self.replies) % 2**64 if self.seed is not None else int.from_bytes(os.urandom(4), "little")
        result: dict = {}
        pieces = []
        for piece in self.engine.stream(prompt.ids, max_tokens=self.max_tokens, temperature=self.temperature,
                                        top_k=self.top_k, top_p=self.top_p, seed=seed, tools=self.tools,
                                        result=result):  # fmt: skip
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        if result["finish_reason"] == "length":
            err.write(f"[reply cut at --max-tokens {self.max_tokens}]\n")
        self.history.append({"role": "user", "content": text})
        self.history.append({"role": "assistant", "content": self.engine.to_parts(result["tokens"]) or ""})
        self.replies += 1
        return "".join(pieces)

    def command(self, line: str, out) -> bool:
        """Handle a /command; returns False when the REPL should end."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        try:
            if name in ("/quit", "/exit"):
                return False
            if name == "/clear":
                self.history.clear()
                out.write("[conversation cleared]\n")
            elif name == "/temp":
                value = float(arg)
                if not 0 <= value <= 100:
                    raise ValueError
                self.temperature = value
                out.write(f"[temperature {value:g}]\n")
            elif name == "/topk":
                k = int(arg)
                if k < 0:
                    raise ValueError
                self.top_k = k or None
                out.write(f"[top-k {k or 'off'}]\n")
            elif name == "/help":
                out.write(HELP_TEXT + "\n")
            else:
                out.write(f"[unknown command {name}; /help lists them]\n")
        except ValueError:
            out.write(f"[{name} needs a number: /temp 0.7 (0..100), /topk 50 (0 = off)]\n")
        return True


def check_flags(args) -> None:
    """The sampling flags' ranges, checked before the model loads (a typo costs no load time)."""
    if args.top_k < 0:
        raise ChibiError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if not 0 <= args.temperature <= 100:
        raise ChibiError(f"--temperature must be in [0, 100], got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ChibiError(f"--top-p must be in (0, 1], got {args.top_p}")
    seed = getattr(args, "seed", None)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ChibiError(f"--seed must be in [-2**63, 2**64 - 1] (the seeds torch takes), got {seed}")


def make_session(args, engine) -> ChatSession:
    check_flags(args)
    seed = getattr(args, "seed", None)
    max_tokens = reply_budget(engine.seq_len, args.max_tokens)
    _check_room(engine, args.system, max_tokens)
    return ChatSession(
        engine=engine,
        max_tokens=max_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        tools=None if args.tools == "none" else args.tools,
        system=args.system,
        seed=seed,
    )


def _check_room(engine, system: str | None, max_tokens: int) -> None:
    """Refuse settings that leave no room for a message (else every message would fail, with an error that
    could only say "shorten the message"): the chat template (and --system) must leave a token of the
    prompt's share of the context."""
    from chibichat.render import render_prompt

    limit = engine.seq_len - max_tokens
    messages = [{"role": "system", "content": system}] if system else []
    conv = {"messages": messages + [{"role": "user", "content": ""}]}
    need = len(render_prompt(engine.tokenizer, conv, max_len=sys.maxsize).ids)  # with the chat template
    if need < limit:
        return
    if system:
        raise ChibiError(
            f"--system takes {need} tokens of the {limit} left after --max-tokens {max_tokens} (context "
            f"{engine.seq_len}), leaving none for a message; shorten it or lower --max-tokens"
        )
    raise ChibiError(
        f"--max-tokens {max_tokens} leaves the conversation {limit} of the {engine.seq_len}-token context, but "
        f"the chat template alone takes {need}; lower --max-tokens to at most {engine.seq_len - need - 1}"
    )


def run(args: argparse.Namespace) -> int:
    if args.tools == "python":
        check_sandbox(args.allow_weak_sandbox, "chat --tools python")
    check_flags(args)
    if args.prompt is not None and not args.prompt.strip():
        raise ChibiError("-p needs a non-empty message")
    out, err, inp = sys.stdout, sys.stderr, sys.stdin
    if args.prompt is None and inp is None:  # started with stdin closed (e.g. `0<&-`)
        raise ChibiError("chat has no standard input to read messages from; pass a message with -p or run it "
                         "with stdin open")
    engine, meta = load_engine(args)
    session = make_session(args, engine)
    if args.prompt is not None:
        session.reply(args.prompt, out, err)
        return 0
    interactive = inp.isatty()
    if hasattr(inp, "reconfigure"):  # an undecodable byte (a terminal in another encoding) is refused, not a crash
        inp.reconfigure(errors="surrogateescape")
    err.write(f"chibichat chat: {args.source} checkpoint {meta['checkpoint_dir']} (context {engine.seq_len} tokens). "
              "/help for commands, /quit or Ctrl-D to leave.\n")  # fmt: skip
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = inp.readline()
        if not line:  # EOF (Ctrl-D): end the "you> " line, so the shell's prompt starts on its own
            if interactive:
                out.write("\n")
            break
        line = line.rstrip("\r\n")  # a piped file with Windows line ends: "\r" is no part of the message
        if not line.strip():
            continue
        if line.startswith("/"):
            if not session.command(line, out):
                break
            out.flush()
            continue
        if interactive:
            out.write("assistant> ")
        try:
            session.reply(line, out, err)
        except ChibiError as e:  # e.g. a message longer than the context: say so, keep the session
            err.write(f"[error: {e}]\n")
            err.flush()
        except KeyboardInterrupt:  # Ctrl-C stops this reply only (see the module docstring)
            out.write("\n")
            out.flush()
            err.write("[reply stopped; this exchange is not kept in the history]\n")
            err.flush()
    return 0
