"""Our tiktoken-run byte-level BPE <-> a Hugging Face `tokenizers` tokenizer.json, and the chat template.

Equivalence. tiktoken splits text with the pattern, then within each chunk repeatedly merges the
adjacent pair whose concatenation has the lowest rank (a chunk that is itself a token is taken whole).
The HF side reproduces this with: Split(pattern, isolated) -> ByteLevel (bytes shown as printable
characters, no second regex) -> BPE whose merges are, for every learned token in rank order, each way
of cutting it into two older tokens (so a merge's priority is the rank of what it makes), with
`ignore_merges` for the whole-chunk shortcut. The nine specials are added tokens at the same ids.

The conversion is checked, not assumed: `check_same_ids` encodes the shipped tokenizer-eval samples
(English, code, maths, Japanese) with both and raises on the first difference, and the exporter runs
it before writing anything (the tests add random mixed-script text). One theoretical gap remains:
when two different cuts of the same token are mergeable side by side in one chunk, tiktoken takes
the leftmost and HF the cut listed first; no test text has hit it.
"""

from __future__ import annotations

import json
from pathlib import Path

from chibichat.common import ChibiError
from chibichat.tokenizer import CUSTOM_SPLIT, SPECIAL_TOKENS, SPLIT_PATTERNS, Tokenizer

# GPT-2's own pattern: what a ByteLevel pre-tokenizer with use_regex=true applies (for imports).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

HF_EXTRA = "install the Hugging Face extra: pip install 'chibichat[hf]'"


def need(module: str):
    """Import an optional dependency or raise a ChibiError saying how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ChibiError(f"{module} is not installed; {HF_EXTRA}") from None


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by the ByteLevel pre-tokenizer.

    Bytes that are visible Latin-1 characters stand for themselves; the other 68 (controls, space,
    soft hyphen, ...) are given the code points 256, 257, ... in byte order.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _token_str(token: bytes, table: dict[int, str]) -> str:
    return "".join(table[b] for b in token)


def ranks_of(tok: Tokenizer) -> list[bytes]:
    """Token bytes by id for the ordinary (non-special) ids."""
    return [tok.id_to_bytes(i) for i in range(tok.vocab_size - len(SPECIAL_TOKENS))]


def merges_from_ranks(ranks: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Every cut of every learned token into two tokens of lower rank, ordered by the token's rank
    (then by the pieces' ranks, which only orders cuts of the same token)."""
    rank = {t: i for i, t in enumerate(ranks)}
    merges = []
    for r, token in enumerate(ranks):
        if len(token) < 2:
            continue
        cuts = []
        for i in range(1, len(token)):
            a, b = token[:i], token[i:]
            ra, rb = rank.get(a), rank.get(b)
            if ra is not None and rb is not None and ra < r and rb < r:
                cuts.append((ra, rb, a, b))
        if not cuts:
            raise ChibiError(
                f"token {r} ({token!r}) cannot be made from two earlier tokens, so no BPE merge list reproduces "
                "this tokenizer; it is not a byte-pair vocabulary (retrain it with `chibichat tokenizer train`)"
            )
        merges += [(a, b) for _, _, a, b in sorted(cuts)]
    return merges


def build_hf_tokenizer(tok: Tokenizer):
    """A `tokenizers.Tokenizer` giving the same ids as `tok` (checked by check_same_ids)."""
    tk = need("tokenizers")
    table = byte_to_unicode()
    ranks = ranks_of(tok)
    vocab = {_token_str(t, table): i for i, t in enumerate(ranks)}
    merges = [(_token_str(a, table), _token_str(b, table)) for a, b in merges_from_ranks(ranks)]
    model = tk.models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False)
    hf = tk.Tokenizer(model)
    hf.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(tok.pattern), behavior="isolated", invert=False),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    hf.decoder = tk.decoders.ByteLevel()
    hf.add_special_tokens([tk.AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    for name in SPECIAL_TOKENS:
        if hf.token_to_id(name) != tok.special_id(name):
            raise ChibiError(f"special token {name} got id {hf.token_to_id(name)} in the HF tokenizer, expected "
                             f"{tok.special_id(name)}: the vocabulary has a gap; retrain the tokenizer")
    # `tokenizer(text)` (add_special_tokens=True) starts with BOS, as every document does in our training
    # rows; add_special_tokens=False gives exactly Tokenizer.encode.
    bos = "<|bos|>"
    hf.post_processor = tk.processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, tok.bos_id)]
    )
    return hf


def check_same_ids(tok: Tokenizer, hf, texts: dict[str, str]) -> None:
    """Raise ChibiError at the first text whose ids differ between `tok` and the HF tokenizer `hf`."""
    for kind, text in texts.items():
        ours = tok.encode(text)
        theirs = hf.encode(text, add_special_tokens=False).ids
        if ours != theirs:
            i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise ChibiError(
                f"the HF tokenizer does not reproduce ours on {kind} text: ids differ at position {i} "
                f"(ours {ours[i:i + 5]}, HF {theirs[i:i + 5]}). The split pattern {tok.pattern!r} may use regex "
                "syntax that the HF regex engine (Oniguruma) reads differently; this tokenizer cannot be exported"
            )
    for name in SPECIAL_TOKENS:
        if hf.encode(name, add_special_tokens=False).ids != [tok.special_id(name)]:
            raise ChibiError(f"the HF tokenizer does not map {name} to id {tok.special_id(name)}")


def tokenizer_files(tok: Tokenizer, seq_len: int) -> dict[str, str]:
    """File name -> text for tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja."""
    from chibichat.tokenizer import shipped_samples

    hf = build_hf_tokenizer(tok)
    check_same_ids(tok, hf, shipped_samples())
    specials = {"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|bos|>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "additional_special_tokens": [s for s in SPECIAL_TOKENS if s not in ("<|bos|>", "<|assistant_end|>")],
        "model_max_length": seq_len,
        "clean_up_tokenization_spaces": False,
        "chibichat": {"split": tok.split, "hash": tok.hash},
    }
    return {
        "tokenizer.json": hf.to_str(pretty=True) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2) + "\n",
        "chat_template.jinja": chat_template(),
    }


# ----------------------------------------------------------------------------------------------
# Chat template: render.render_conversation / render_prompt in Jinja.


def chat_template() -> str:
    """A Jinja chat template that yields, after tokenization, exactly render.py's ids.

    Two cases the renderer handles that the template cannot reproduce are refused with an error
    instead of rendering differently: text containing a special-token string (HF would turn it into
    the control token, our encoder keeps it as plain bytes), and two adjacent "text" parts in one
    assistant turn (we encode them separately, HF would encode their concatenation).
    Over-length shortening is not done here: the caller truncates, as usual in transformers.
    """
    specials = ", ".join(json.dumps(s) for s in SPECIAL_TOKENS)
    return (
        "{#- chibichat chat format: <|bos|> then <|user_start|>..<|user_end|><|assistant_start|>..<|assistant_end|> "
        "per exchange; a system message is merged into the first user message after a blank line. Assistant "
        "content is a string or a list of parts {type: text|python|python_output, text}. -#}\n"
        "{%- set specials = [" + specials + "] -%}\n"
        "{%- macro check(text, where) -%}\n"
        "  {%- if text is not string -%}{{ raise_exception(where ~ ': content must be a string') }}{%- endif -%}\n"
        "  {%- for s in specials -%}{%- if s in text -%}"
        "{{ raise_exception(where ~ ' contains the special-token string ' ~ s ~ ', which the tokenizer would read "
        "as a control token; remove it') }}{%- endif -%}{%- endfor -%}\n"
        "{%- endmacro -%}\n"
        "{%- if messages | length == 0 -%}{{ raise_exception('the conversation has no messages') }}{%- endif -%}\n"
        "{%- if messages[0]['role'] == 'system' -%}\n"
        "  {{- check(messages[0]['content'], 'message 0 (system)') -}}\n"
        "  {%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}{%- set offset = 1 -%}\n"
        "{%- else -%}\n"
        "  {%- set system = none -%}{%- set turns = messages -%}{%- set offset = 0 -%}\n"
        "{%- endif -%}\n"
        "{%- if turns | length == 0 -%}{{ raise_exception('the conversation needs at least one user message') }}"
        "{%- endif -%}\n"
        "{{- '<|bos|>' -}}\n"
        "{%- for m in turns -%}\n"
        "  {%- set where = 'message ' ~ (loop.index0 + offset) -%}\n"
        "  {%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}\n"
        "  {%- if m['role'] != expected -%}{{ raise_exception(where ~ ' has role ' ~ m['role'] ~ ' but ' ~ expected "
        "~ ' was expected: after an optional system message roles alternate user, assistant, ...') }}{%- endif -%}\n"
        "  {%- if expected == 'user' -%}\n"
        "    {{- check(m['content'], where ~ ' (user)') -}}\n"
        "    {%- if loop.first and system is not none -%}{%- set text = system ~ '\\n\\n' ~ m['content'] -%}"
        "{%- else -%}{%- set text = m['content'] -%}{%- endif -%}\n"
        "    {{- '<|user_start|>' ~ text ~ '<|user_end|>' -}}\n"
        "  {%- else -%}\n"
        "    {{- '<|assistant_start|>' -}}\n"
        "    {%- if m['content'] is string -%}\n"
        "      {{- check(m['content'], where ~ ' (assistant)') -}}{{- m['content'] -}}\n"
        "    {%- else -%}\n"
        "      {%- set ns = namespace(prev='') -%}\n"
        "      {%- for part in m['content'] -%}\n"
        "        {%- set pwhere = where ~ ' (assistant) part ' ~ loop.index0 -%}\n"
        "        {{- check(part['text'], pwhere) -}}\n"
        "        {%- if part['type'] == 'text' -%}\n"
        "          {%- if ns.prev == 'text' -%}{{ raise_exception(pwhere ~ ' follows another text part; merge adjacent "
        "text parts into one') }}{%- endif -%}\n"
        "          {{- part['text'] -}}\n"
        "        {%- elif part['type'] == 'python' -%}{{- '<|python_start|>' ~ part['text'] ~ '<|python_end|>' -}}\n"
        "        {%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' ~ part['text'] ~ '<|output_end|>' -}}\n"
        "        {%- else -%}{{ raise_exception(pwhere ~ ': type must be text, python or python_output') }}\n"
        "        {%- endif -%}\n"
        "        {%- set ns.prev = part['type'] -%}\n"
        "      {%- endfor -%}\n"
        "    {%- endif -%}\n"
        "    {{- '<|assistant_end|>' -}}\n"
        "  {%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "  {%- if turns[-1]['role'] != 'user' -%}{{ raise_exception('add_generation_prompt needs the conversation to "
        "end with a user message') }}{%- endif -%}\n"
        "  {{- '<|assistant_start|>' -}}\n"
        "{%- endif -%}\n"
    )


# ----------------------------------------------------------------------------------------------
# Import: tokenizer.json -> our Tokenizer


def _pattern_of(pre: dict | None, where: Path) -> str:
    """The split regex of a byte-level pre-tokenizer, or a ChibiError naming what is unsupported."""
    unsupported = (
        f"{where}: pre_tokenizer {json.dumps(pre)[:200]} is not a byte-level BPE pre-tokenizer chibichat can run; "
        "supported: Sequence[Split(Regex, isolated), ByteLevel(use_regex=false)] or ByteLevel(use_regex=true), "
        "without a prefix space"
    )
    if not isinstance(pre, dict):
        raise ChibiError(unsupported)
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return GPT2_PATTERN
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        raise ChibiError(unsupported)
    split, byte_level = steps
    if (split.get("type") != "Split" or not isinstance(split.get("pattern"), dict) or "Regex" not in split["pattern"]
            or split.get("behavior") != "Isolated" or split.get("invert")):
        raise ChibiError(unsupported)
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True) or byte_level.get("add_prefix_space"):
        raise ChibiError(unsupported)
    return split["pattern"]["Regex"]


def tokenizer_from_hf(path: str | Path) -> Tokenizer:
    """Our Tokenizer from an HF byte-level BPE tokenizer.json whose specials are our nine at the top ids.

    Raises ChibiError when the file is not that kind of tokenizer, and when the rebuilt tokenizer does
    not give the same ids as the original on the shipped samples (e.g. merge priorities that do not
    follow token ids, which tiktoken-style ranks cannot express).
    """
    from chibichat.tokenizer import shipped_samples

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChibiError(f"no tokenizer.json in {path.parent}: a NanoChat-format folder must carry one") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ChibiError(f"{path} is not valid JSON ({e})") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ChibiError(f"{path}: model type {model.get('type')!r} is not a byte-level BPE; it cannot be imported")
    if data.get("normalizer"):
        raise ChibiError(f"{path}: has a normalizer ({data['normalizer'].get('type')}); chibichat tokenizers have none")
    pattern = _pattern_of(data.get("pre_tokenizer"), path)
    unbyte = {c: b for b, c in byte_to_unicode().items()}
    vocab = model["vocab"]
    n = len(vocab)
    ranks: list[bytes | None] = [None] * n
    for text, i in vocab.items():
        if not isinstance(i, int) or not 0 <= i < n or ranks[i] is not None:
            raise ChibiError(f"{path}: vocabulary ids are not 0..{n - 1} without gaps (id {i!r} for {text!r})")
        try:
            ranks[i] = bytes(unbyte[c] for c in text)
        except KeyError:
            raise ChibiError(f"{path}: token {text!r} is not written in ByteLevel characters") from None
    if sorted(ranks[:256]) != [bytes([b]) for b in range(256)]:
        raise ChibiError(f"{path}: ids 0..255 must be the 256 single bytes (byte-level BPE); this vocabulary is laid "
                         "out differently and cannot be run by chibichat's tokenizer")
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    expected = {name: n + k for k, name in enumerate(SPECIAL_TOKENS)}
    if {k: added.get(k) for k in SPECIAL_TOKENS} != expected or len(added) != len(SPECIAL_TOKENS):
        raise ChibiError(
            f"{path}: added tokens {added} are not the nine chibichat/nanochat specials at ids {n}..{n + 8} "
            f"({SPECIAL_TOKENS}); a tokenizer with other control tokens cannot be imported"
        )
    split = next((name for name, p in SPLIT_PATTERNS.items() if p == pattern), CUSTOM_SPLIT)
    try:
        tok = Tokenizer(ranks, split=split, pattern=pattern)
    except ChibiError as e:
        raise ChibiError(f"{path}: {e}") from None
    original = need("tokenizers").Tokenizer.from_file(str(path))
    check_same_ids(tok, original, shipped_samples())
    return tok
