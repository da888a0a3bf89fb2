"""`chibichat export hf` / `chibichat import hf` against the real transformers, offline.

Tiny random models (dense with GQA, and the iberis hybrid) and a small tokenizer trained here; every
claim of the export is checked by running transformers on the folder: logits, tokenizer ids, the
chat template, greedy generation, and the round trip back into chibichat.
"""

import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from chibichat.cli import main  # noqa: E402
from chibichat.common import ChibiError, Home  # noqa: E402
from chibichat.render import render_conversation, render_for_completion  # noqa: E402
from chibichat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERNS, Tokenizer, shipped_samples, train_tokenizer  # noqa: E402

TOL = 1e-4

CONV = {"messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 12*7? 日本語でも答えて。"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute: "},
        {"type": "python", "text": "12*7"},
        {"type": "python_output", "text": "84"},
        {"type": "text", "text": " It is 84 (八十四)."},
    ]},
    {"role": "user", "content": "Thanks!\n```python\ndef f(x):\n    return x ** 2\n```"},
    {"role": "assistant", "content": "You're welcome."},
]}


def random_texts(n=150, seed=0):
    """Strings mixing every character class the split patterns care about."""
    alphabet = ("abcxyzABCXYZ' " "0123456789" ",.;:!?()[]{}<>|#@$%^&*-_=+/\\\"`~" "  \t\n\r\n\n"
                "éüßøñ" "日本語漢字々〆" "ひらがなです" "カタカナー" "。、「」！？" "😀🚀" "ΑΒΓαβγ" "АБВабв")
    rng = random.Random(seed)
    return [{f"random {i}": "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120)))}
            for i in range(n)]


@pytest.fixture(autouse=True, scope="module")
def few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    # ja split: the harder regex (Unicode scripts, nested negated classes) for the HF engine
    return train_tokenizer(list(shipped_samples().values()), 700, split="ja")


def make_home(root, tok, layers, windows=None, seed=0):
    """A home with `tok`, a base checkpoint (corpus recorded), an sft checkpoint on top of it and an eval summary."""
    from chibichat.model.gpt import GPT, GPTConfig
    from chibichat.train.checkpoint import save_checkpoint

    home = Home.resolve(root)
    tok.save(home.tokenizer_dir)
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=64, n_layer=4, n_embd=64, n_head=4, n_kv_head=2,
                    layers=layers, windows=windows)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.25)
    meta = {"model_config": cfg.to_dict(), "tokenizer": {"vocab_size": tok.vocab_size, "hash": tok.hash}}
    base = save_checkpoint(home.checkpoints_dir("base", "d4"), 10, model, None,
                           {**meta, "stage": "base", "corpus": "embedded-en"})
    (base.parent / "summary.json").write_text(json.dumps({"steps": 10, "final_val_bpb": 2.5}))
    save_checkpoint(home.checkpoints_dir("sft", "d4"), 3, model, None,
                    {**meta, "stage": "sft", "source": {"checkpoint": str(base), "step": 10}})
    home.eval_dir("sft", "d4").mkdir(parents=True)
    (home.eval_dir("sft", "d4") / "summary.json").write_text(json.dumps(
        {"chatcore": 0.1234, "arc_easy": 0.31, "chat_eval": {"stage": "sft", "tag": "d4", "step": 3}}))
    return home, model


def export(home, out, *extra):
    return main(["export", "hf", "--home", str(home.root), "--from", "sft", "--out", str(out), *extra])


@pytest.fixture(scope="module", params=["dense", "iberis"])
def exported(request, tmp_path_factory, tok):
    root = tmp_path_factory.mktemp(request.param)
    home, model = make_home(root / "home", tok, request.param)
    out = root / "hf"
    assert export(home, out) == 0
    iberis = request.param == "iberis"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=iberis).eval()
    htok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=iberis)
    return {"home": home, "model": model.eval(), "out": out, "hf": hf, "htok": htok, "iberis": iberis, "root": root}


# ----------------------------------------------------------------------------------------------
# Export


def test_folder_is_the_native_type_or_self_contained_remote_code(exported):
    out, hf = exported["out"], exported["hf"]
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "README.md"} <= names
    config = json.loads((out / "config.json").read_text())
    if exported["iberis"]:
        assert config["model_type"] == "chibichat_iberis" and config["mixer_pattern"] == "SASA"
        assert type(hf).__name__ == "ChibiIberisForCausalLM"
        code = (out / "modeling_chibichat_iberis.py").read_text()
        assert "import chibichat" not in code and "from chibichat" not in code
    else:
        assert config["model_type"] == "nanochat" and not any(n.endswith(".py") for n in names)
        assert isinstance(hf, transformers.NanoChatForCausalLM)
        assert config["num_key_value_heads"] == 2  # GQA carried over


def test_logits_equal_on_a_batch_of_prompts(exported, tok):
    model, hf = exported["model"], exported["hf"]
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, tok.vocab_size, (3, 48), generator=g)
    chat = torch.tensor([render_for_completion(tok, CONV, 64)])
    for ids in (batch, chat):
        with torch.no_grad():
            diff = (model(ids) - hf(ids).logits).abs().max().item()
        assert diff <= TOL, diff


def test_tokenizer_gives_identical_ids(exported, tok):
    htok = exported["htok"]
    texts = dict(shipped_samples())
    texts["mixed"] = "Hello, world! It's 2026.\n\tdef f(x): return x**2  # コメント\n東京は日本の首都です。"
    for t in random_texts():
        texts.update(t)
    for kind, text in texts.items():
        ids = htok(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text), kind
        assert htok.decode(ids) == tok.decode(ids), kind
    assert htok("hi")["input_ids"] == [tok.bos_id] + tok.encode("hi")  # documents start with BOS
    for name in SPECIAL_TOKENS:
        assert htok.convert_tokens_to_ids(name) == tok.special_id(name)
        assert htok(name, add_special_tokens=False)["input_ids"] == [tok.special_id(name)]
    assert htok.bos_token_id == tok.bos_id and htok.eos_token_id == tok.special_id("<|assistant_end|>")


@pytest.mark.parametrize("split", sorted(SPLIT_PATTERNS))
def test_every_split_pattern_converts(split):
    """Each of our split regexes means the same in tiktoken's engine and in HF's (Oniguruma)."""
    from chibichat.export.hf_tokenizer import build_hf_tokenizer, check_same_ids

    ours = train_tokenizer(list(shipped_samples().values()), 1200, split=split)
    texts = {}
    for t in random_texts(300, seed=7):
        texts.update(t)
    check_same_ids(ours, build_hf_tokenizer(ours), {**shipped_samples(), **texts})


def test_chat_template_renders_like_our_renderer(exported, tok):
    htok = exported["htok"]
    full = htok.apply_chat_template(CONV["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert full == render_conversation(tok, CONV, 10_000).ids
    prompt = htok.apply_chat_template(CONV["messages"][:-1], tokenize=True, add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
    assert prompt == render_for_completion(tok, CONV, 10_000)


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "user", "content": "say <|assistant_end|> now"}], "special-token string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}], "merge adjacent text parts"),
    ([{"role": "assistant", "content": "hi"}], "was expected"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "type must be"),
])
def test_chat_template_refuses_what_it_cannot_render_identically(exported, messages, needle):
    with pytest.raises(Exception, match=needle):
        exported["htok"].apply_chat_template(messages, tokenize=False)


def test_greedy_generate_equals_chibichat_chat(exported, tok, capsys):
    from chibichat.common import Runtime
    from chibichat.engine import Engine

    model, hf, home = exported["model"], exported["hf"], exported["home"]
    n = 24
    prompt = render_for_completion(tok, {"messages": [{"role": "user", "content": "Tell me a story."}]}, 64)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
    rt = Runtime(device=torch.device("cpu"), compute_dtype=torch.float32)
    ours = Engine(model, tok, rt).generate([prompt], max_tokens=n, temperature=0, tools=False)[0][0]
    assert ours.tokens == theirs
    if exported["iberis"]:  # the remote code's cache path gives the same tokens as full recomputation
        again = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, use_cache=False)
        assert again[0, len(prompt):].tolist() == theirs
    capsys.readouterr()
    rc = main(["chat", "--home", str(home.root), "--device", "cpu", "--dtype", "float32", "--from", "sft",
               "-p", "Tell me a story.", "--temperature", "0", "--tools", "none", "--max-tokens", str(n)])
    assert rc == 0
    stops = {tok.special_id("<|assistant_end|>"), tok.bos_id}
    body = theirs[:-1] if theirs and theirs[-1] in stops else theirs
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(body)


def test_hidden_states_are_what_nanochat_reports(exported, tok):
    """output_hidden_states=True: each layer's input, then the final normed output (transformers' NanoChat);
    the remote code returned None for them. Attention weights it cannot give are refused, not left empty."""
    hf = exported["hf"]
    ids = torch.randint(0, tok.vocab_size, (2, 12), generator=torch.Generator().manual_seed(6))
    seen = []
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.append((a[0], out[0] if isinstance(out, tuple) else out)))
             for layer in hf.model.layers]
    try:
        with torch.no_grad():
            out = hf(ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    hs = out.hidden_states
    assert len(hs) == len(hf.model.layers) + 1
    assert torch.equal(hs[0], seen[0][0]) and all(torch.equal(hs[k], seen[k - 1][1]) for k in range(1, len(seen)))
    cap = hf.config.final_logit_softcapping
    with torch.no_grad():
        assert torch.allclose(cap * torch.tanh(hf.lm_head(hs[-1]) / cap), out.logits, atol=1e-5)
    if exported["iberis"]:
        with torch.no_grad():
            assert torch.equal(hf(ids, return_dict=False)[0], out.logits)
            with pytest.raises(ValueError, match="^ChibiIberisForCausalLM computes attention with "
                                                 "scaled_dot_product_attention and returns no attention weights; "
                                                 "drop output_attentions$"):
                hf(ids, output_attentions=True)


def test_model_card_carries_metrics_data_and_licences(exported):
    card = (exported["out"] / "README.md").read_text()
    assert "0.1234" in card and "chatcore" in card  # eval summary
    assert "2.5" in card  # base run's final val bpb
    from chibichat.data.corpora import get_corpus

    assert "embedded-en" in card and get_corpus("embedded-en").licence in card
    assert "CC BY-SA 4.0" in card  # shipped task data notice
    assert ("trust_remote_code=True" in card) == exported["iberis"]


def test_model_card_metrics_are_the_exported_steps_only(tmp_path):
    from chibichat.export.card import _metric_rows

    home = Home.resolve(tmp_path / "home")
    home.eval_dir("base", "d4").mkdir(parents=True)
    (home.eval_dir("base", "d4") / "summary.json").write_text(json.dumps(
        {"val_bpb": 0.777, "base_eval": {"step": 2}, "jglue_eval": {"step": 2}}))
    m = {"stage": "base", "checkpoint_dir": str(home.checkpoints_dir("base", "d4") / "step_000001"), "step": 1}
    assert _metric_rows(home, [m]) == [
        "| base/d4 | evaluation | not recorded for this step (1); the home's summary holds base_eval of step 2, "
        "jglue_eval of step 2 |"]
    assert _metric_rows(home, [{**m, "step": 2}]) == ["| base/d4 | evaluation | val_bpb: 0.777 |"]
    # one evaluation of another step: the flat keys cannot be told apart, so none is shown
    (home.eval_dir("base", "d4") / "summary.json").write_text(json.dumps(
        {"val_bpb": 0.777, "base_eval": {"step": 2}, "jglue_eval": {"step": 1}}))
    assert "0.777" not in _metric_rows(home, [{**m, "step": 2}])[0]


# ----------------------------------------------------------------------------------------------
# Import


def test_round_trip_reproduces_logits_exactly(exported, tok):
    from chibichat.train.checkpoint import load_model

    home2 = Home.resolve(exported["root"] / "home2")
    assert main(["import", "hf", str(exported["out"]), "--home", str(home2.root), "--tag", "back"]) == 0
    tok2 = Tokenizer.load(home2.tokenizer_dir)
    assert tok2.hash == tok.hash
    model2, meta = load_model(home2, "sft", "back", tokenizer=tok2)
    assert meta["imported_from"] == str(exported["out"])
    ids = torch.randint(0, tok.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model2(ids), exported["model"](ids))
    # the same home refuses a second import under that tag; the exporting home takes it (same tokenizer)
    from chibichat.export.importer import import_hf

    with pytest.raises(ChibiError, match="already holds checkpoints"):
        import_hf(str(exported["out"]), home2, "sft", "back")
    sdir, _ = import_hf(str(exported["out"]), exported["home"], "rl", "again")
    model3, _ = load_model(exported["home"], "rl", "again", tokenizer=tok)
    with torch.no_grad():
        assert torch.equal(model3(ids), exported["model"](ids))


def test_a_failed_overwrite_import_keeps_the_old_checkpoints(exported, tmp_path, monkeypatch):
    from chibichat.export.importer import import_hf
    from chibichat.train import checkpoint

    home = Home.resolve(tmp_path / "home")
    first, _ = import_hf(str(exported["out"]), home, "sft", "x")
    tag_dir = first.parent
    (tag_dir / "summary.json").write_text("{}")
    meta_before = (first / "meta.json").read_text()

    def full_disk(*args, **kwargs):
        raise ChibiError("disk full")

    monkeypatch.setattr(checkpoint, "save_checkpoint", full_disk)
    with pytest.raises(ChibiError) as e:
        import_hf(str(exported["out"]), home, "sft", "x", overwrite=True)
    assert str(e.value) == f"the import into {tag_dir} failed and its old checkpoints were kept as they were: disk full"
    assert sorted(p.name for p in tag_dir.parent.iterdir()) == ["x"]  # no staging directory left behind
    assert sorted(p.name for p in tag_dir.iterdir()) == ["step_000000", "summary.json"]
    assert (first / "meta.json").read_text() == meta_before
    monkeypatch.undo()
    # a successful overwrite replaces the whole tag: the old run's files go with it
    sdir, _ = import_hf(str(exported["out"]), home, "sft", "x", overwrite=True)
    assert sdir == first and sorted(p.name for p in tag_dir.iterdir()) == ["step_000000"]


def test_a_failed_overwrite_import_names_the_tag_folder_not_the_temporary_one(exported, tmp_path, monkeypatch):
    """A full disk while the new tag directory is written beside the old one: the cause names the step under the
    tag's folder (the one the user knows), not under the temporary directory it was written in (gone by then),
    and says nothing of checkpoints surviving there (the old ones survive, as the message says)."""
    import errno
    import os
    import re

    from chibichat.export.importer import import_hf

    home = Home.resolve(tmp_path / "home")
    first, _ = import_hf(str(exported["out"]), home, "sft", "x")
    tag_dir = first.parent
    real, tmps = os.fsync, []

    def fsync(fd):  # ENOSPC for the files of the new tag directory's step
        m = re.search(r"/sft/(\.tmp-x-[^/]+)/\.tmp-step_000000-[^/]+/", os.readlink(f"/proc/self/fd/{fd}"))
        if m:
            tmps.append(tag_dir.parent / m.group(1))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(ChibiError) as e:
        import_hf(str(exported["out"]), home, "sft", "x", overwrite=True)
    assert str(e.value) == (
        f"the import into {tag_dir} failed and its old checkpoints were kept as they were: saving step 0 failed, "
        f"nothing of it was kept: cannot write {first}: No space left on device (errno 28); free some space on that "
        f"disk or pass another --home")
    assert tmps and not tmps[0].exists() and sorted(p.name for p in tag_dir.parent.iterdir()) == ["x"]


def published_tokenizer(kind, folder):
    """tokenizer.json the ways published nanochat checkpoints get one, without chibichat code:
    "tiktoken": transformers' own tiktoken converter (how the hub's karpathy/nanochat-d32 got its file);
    "bpe-trainer": trained by HF tokenizers' BpeTrainer (nanochat's HuggingFaceTokenizer), specials appended."""
    import tokenizers as tk

    from chibichat.tokenizer import GPT4_PATTERN, JA_PATTERN

    texts = list(shipped_samples().values())
    if kind == "tiktoken":
        # what transformers.integrations.tiktoken.convert_tiktoken_to_fast does, minus its blobfile dependency
        from transformers.convert_slow_tokenizer import TikTokenConverter

        ours = train_tokenizer(texts, 520, split="gpt4")
        ours.save(folder / "tiktoken")  # tokenizer.tiktoken is the tiktoken BPE file format
        n = ours.vocab_size - 9
        t = TikTokenConverter(vocab_file=str(folder / "tiktoken" / "tokenizer.tiktoken"), pattern=GPT4_PATTERN,
                              extra_special_tokens={s: n + k for k, s in enumerate(SPECIAL_TOKENS)}).converted()
        t.save(str(folder / "tokenizer.json"))
        return t
    t = tk.Tokenizer(tk.models.BPE(ignore_merges=True))
    t.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(JA_PATTERN), behavior="isolated"),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=500, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=False, special_tokens=[])
    t.train_from_iterator(texts, trainer)
    t.add_special_tokens(SPECIAL_TOKENS)
    t.save(str(folder / "tokenizer.json"))
    return t


def test_a_tokenizer_with_a_pattern_of_its_own_imports_as_custom(tmp_path):
    """GPT-2's ByteLevel(use_regex=true) pattern is none of chibichat's splits: its split is "custom", not
    a split name whose pattern it does not use, and it saves and loads under that name."""
    import tokenizers as tk

    from chibichat.export.hf_tokenizer import GPT2_PATTERN, tokenizer_from_hf

    t = tk.Tokenizer(tk.models.BPE(ignore_merges=True))
    t.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    t.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=400, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=False, special_tokens=[])
    t.train_from_iterator(list(shipped_samples().values()), trainer)
    t.add_special_tokens(SPECIAL_TOKENS)
    t.save(str(tmp_path / "tokenizer.json"))
    tok = tokenizer_from_hf(tmp_path / "tokenizer.json")
    assert (tok.split, tok.pattern) == ("custom", GPT2_PATTERN)
    tok.save(tmp_path / "saved")
    back = Tokenizer.load(tmp_path / "saved")
    assert (back.split, back.pattern, back.hash) == ("custom", GPT2_PATTERN, tok.hash)
    with pytest.raises(ChibiError, match="^a tokenizer with split 'custom' needs its pattern$"):
        Tokenizer([bytes([b]) for b in range(256)], split="custom")


def hf_trained_folder(root, kind="bpe-trainer", dtype=torch.float32, vocab_pad=64):
    """A 'published' NanoChat folder made with transformers + tokenizers alone: a vocabulary padded to a
    multiple of 64, transformers' default rms_norm_eps (1e-6), weights in `dtype`."""
    folder = root / "published"
    folder.mkdir()
    t = published_tokenizer(kind, folder)
    V = t.get_vocab_size()
    padded = (V + vocab_pad - 1) // vocab_pad * vocab_pad
    cfg = transformers.NanoChatConfig(vocab_size=padded, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                      bos_token_id=V - 9, eos_token_id=V - 5, pad_token_id=V - 9)
    torch.manual_seed(3)
    model = transformers.NanoChatForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.25)
    model.to(dtype).save_pretrained(folder)
    # reloaded in fp32 (casting the module itself would also round its RoPE inv_freq buffer)
    reloaded = transformers.NanoChatForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return folder, reloaded.eval(), t, V


@pytest.mark.parametrize("kind, dtype", [("tiktoken", torch.bfloat16), ("bpe-trainer", torch.float32)])
def test_import_a_transformers_made_nanochat_folder(tmp_path, capsys, kind, dtype):
    from chibichat.train.checkpoint import load_model

    folder, hf, t, V = hf_trained_folder(tmp_path, kind, dtype)
    home = Home.resolve(tmp_path / "home")
    assert main(["import", "hf", str(folder), "--home", str(home.root), "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"dropped {hf.config.vocab_size - V} padding rows" in out and "rms_norm_eps" in out
    assert "verify: max |logit difference|" in out
    tok = Tokenizer.load(home.tokenizer_dir)
    assert tok.vocab_size == V
    for text in [*shipped_samples().values(), *(next(iter(d.values())) for d in random_texts(50))]:
        assert tok.encode(text) == t.encode(text, add_special_tokens=False).ids
    model, meta = load_model(home, "sft", "published", tokenizer=tok)
    assert meta["import"]["vocab_padding_dropped"] == hf.config.vocab_size - V
    assert meta["import"]["source_dtype"] == str(dtype).replace("torch.", "")
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits[..., :V]).abs().max().item()
    assert diff <= TOL, diff  # eps 1e-6 (transformers) vs float32 eps (ours): far below the tolerance
    # and chat works on it
    assert main(["chat", "--home", str(home.root), "--device", "cpu", "--dtype", "float32", "--tag", "published",
                 "-p", "hello", "--temperature", "0", "--max-tokens", "5"]) == 0


# ----------------------------------------------------------------------------------------------
# Refusals


def test_export_refusals(tmp_path, tok, capsys):
    home, _ = make_home(tmp_path / "home", tok, "dense", windows=[16, 0, 16, 0])
    assert export(home, tmp_path / "x") == 2
    assert "sliding-window" in capsys.readouterr().err
    home2, _ = make_home(tmp_path / "home2", tok, "dense")
    (tmp_path / "taken").mkdir()
    assert export(home2, tmp_path / "taken") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert export(home2, tmp_path / "taken", "--overwrite") == 0
    # replacing --out whole must never take the home (its tokenizer and checkpoints) with it
    assert export(home2, home2.root, "--overwrite") == 2
    assert (f"--out {home2.root} is the artifact home {home2.root.resolve()}; the export folder replaces --out whole, "
            "so it must not overlap the home's tokenizer and checkpoints: choose a folder outside the home"
            in capsys.readouterr().err)
    assert (home2.tokenizer_dir / "tokenizer.json").is_file() and (home2.root / "checkpoints").is_dir()
    assert export(home2, home2.root / "hf") == 2
    assert f"--out {home2.root / 'hf'} is inside the artifact home" in capsys.readouterr().err
    assert main(["export"]) == 2


def test_import_refusals(tmp_path, tok, capsys):
    from chibichat.export.importer import import_hf

    folder, _, _, _ = hf_trained_folder(tmp_path)
    home = Home.resolve(tmp_path / "home")
    tok.save(home.tokenizer_dir)  # a home that already has another tokenizer
    with pytest.raises(ChibiError, match="already has a different tokenizer"):
        import_hf(str(folder), home, "sft", None)
    fresh = Home.resolve(tmp_path / "fresh")
    config = json.loads((folder / "config.json").read_text())
    for key, value, needle in [("hidden_act", "silu", "hidden_act"), ("attention_bias", True, "biases"),
                               ("model_type", "llama", "model_type"), ("rms_norm_eps", 0.1, "rms_norm_eps"),
                               ("sliding_window", 128, "sliding_window"), ("tie_word_embeddings", True, "tied"),
                               # a value of the wrong type: named, not a raw ValueError
                               ("num_hidden_layers", "4", "config.json's 'num_hidden_layers' must be an integer, got '4'"),
                               ("final_logit_softcapping", "15", "'final_logit_softcapping' must be a number, got '15'"),
                               ("rope_parameters", {"rope_type": "default", "rope_theta": "big"},
                                "rope_theta must be a number, got 'big'")]:
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ChibiError, match=needle):
            import_hf(str(folder), fresh, "sft", None)
    (folder / "config.json").write_text(json.dumps(config))
    tj = json.loads((folder / "tokenizer.json").read_text())
    for edit, needle in [(lambda d: d["added_tokens"].pop(), "nine chibichat/nanochat specials"),
                         (lambda d: d.update(normalizer={"type": "NFC"}), "normalizer"),
                         (lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "not a byte-level BPE pre-tokenizer")]:
        broken = json.loads(json.dumps(tj))
        edit(broken)
        (folder / "tokenizer.json").write_text(json.dumps(broken))
        with pytest.raises(ChibiError, match=needle):
            import_hf(str(folder), fresh, "sft", None)
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ChibiError, match="pickle"):
        import_hf(str(folder), fresh, "sft", None)
    with pytest.raises(ChibiError, match="neither a local folder nor a hub repo id"):
        import_hf("no such folder!", fresh, "sft", None)
    # a relative path that does not exist is named as such, never sent to the hub as a repo id
    from pathlib import Path

    with pytest.raises(ChibiError) as e:
        import_hf("./no-such-hf", fresh, "sft", None)
    assert str(e.value) == ("'./no-such-hf' is neither a local folder nor a hub repo id (owner/name): no folder "
                            f"{Path('no-such-hf').absolute()} exists; check the path")


# ----------------------------------------------------------------------------------------------
# --push and hub import, against a local stand-in for the hub's HTTP API: uploads (create repo,
# validate-yaml, preupload, commit) land in state["files"], which downloads (revision, tree, resolve) serve.


@pytest.fixture
def fake_hub():
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import hashlib

    state = {"created": [], "files": {}, "auth": set(), "downloads": []}
    sha = "1" * 40

    class Hub(BaseHTTPRequestHandler):
        def _get(self, head):
            path = self.path.split("?")[0]
            files = state["files"]
            if path.startswith("/api/models/") and "/revision/" in path:
                repo = path[len("/api/models/"):].split("/revision/")[0]
                return self._reply({"id": repo, "sha": sha, "siblings": [{"rfilename": f} for f in files]})
            if path.startswith("/api/models/") and "/tree/" in path:
                return self._reply([{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                    for f, b in files.items()])
            if "/resolve/" in path and path.split("/resolve/")[1].split("/", 1)[1] in files:
                name = path.split("/resolve/")[1].split("/", 1)[1]
                state["downloads"].append(name)
                body = files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", f'"{hashlib.sha1(body).hexdigest()}"')
                self.send_header("X-Repo-Commit", sha)
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                return
            self._reply({"error": "unknown"}, 404)

        def do_GET(self):
            self._get(head=False)

        def do_HEAD(self):
            self._get(head=True)

        def _reply(self, obj, code=200):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state["auth"].add(self.headers.get("Authorization"))
            base = f"http://127.0.0.1:{self.server.server_port}"
            if self.path == "/api/repos/create":
                req = json.loads(body)
                state["created"].append(f"{req['organization']}/{req['name']}")
                self._reply({"url": f"{base}/{req['organization']}/{req['name']}"})
            elif self.path == "/api/validate-yaml":  # the client checks the card's front matter first
                state["card_yaml"] = json.loads(body)["content"]
                self._reply({})
            elif "/preupload/" in self.path:  # every file inline ("regular"), no LFS round trip
                self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in json.loads(body)["files"]]})
            elif "/commit/" in self.path:
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        state["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                self._reply({"commitUrl": f"{base}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})
            else:
                self._reply({"error": "unknown"}, 404)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_port}"
    yield state
    server.shutdown()


def test_push_uploads_the_whole_folder(tmp_path, tok, fake_hub, monkeypatch, capsys):
    import huggingface_hub

    home, _ = make_home(tmp_path / "home", tok, "dense")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake_hub["url"])
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    out = tmp_path / "hf"
    assert export(home, out, "--push", "me/tiny-chat") == 0
    assert "pushed to" in capsys.readouterr().out
    assert fake_hub["created"] == ["me/tiny-chat"]
    assert fake_hub["auth"] == {"Bearer hf_test_token"}
    assert fake_hub["files"] == {p.name: p.read_bytes() for p in out.iterdir()}
    assert 'from_pretrained("me/tiny-chat")' in fake_hub["files"]["README.md"].decode()
    assert fake_hub["card_yaml"].startswith("---\nlibrary_name: transformers")
    with pytest.raises(ChibiError, match="owner/name"):
        from chibichat.export.hf import push_folder
        push_folder(out, "not a repo id")


def test_left_padded_batch_generates_like_each_prompt_alone(exported, tok):
    hf, htok = exported["hf"], exported["htok"]
    convs = [[{"role": "user", "content": "Hi"}],
             [{"role": "user", "content": "Tell me about 東京 and 12 numbers, please."}]]
    htok.padding_side = "left"
    batch = htok.apply_chat_template(convs, add_generation_prompt=True, padding=True, return_tensors="pt",
                                     return_dict=True)
    assert batch["attention_mask"].min() == 0  # really padded
    out = hf.generate(**batch, max_new_tokens=12, do_sample=False, eos_token_id=[], pad_token_id=tok.bos_id)
    T = batch["input_ids"].shape[1]
    for row, conv in enumerate(convs):
        alone = torch.tensor([render_for_completion(tok, {"messages": conv}, 64)])
        # explicit mask: with no stop tokens, generate would take every BOS (= pad) for padding
        want = hf.generate(alone, attention_mask=torch.ones_like(alone), max_new_tokens=12, do_sample=False,
                           eos_token_id=[], pad_token_id=tok.bos_id)[0, alone.shape[1]:]
        assert out[row, T:].tolist() == want.tolist()


def test_import_from_the_hub_by_repo_id(tmp_path, tok, fake_hub, monkeypatch):
    """Push an export, then `chibichat import hf owner/name` in a fresh process pointed at the hub by
    HF_ENDPOINT (as a user would): config, tokenizer and safetensors are downloaded, a pickle is not."""
    import os
    import subprocess
    import sys

    import huggingface_hub

    from chibichat.train.checkpoint import load_model

    home, model = make_home(tmp_path / "home", tok, "iberis")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake_hub["url"])
    assert export(home, tmp_path / "hf", "--push", "me/tiny-chat") == 0
    fake_hub["files"]["pytorch_model.bin"] = b"not for us"
    env = {**os.environ, "HF_ENDPOINT": fake_hub["url"], "HF_HUB_CACHE": str(tmp_path / "cache"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "CHIBICHAT_HOME": str(tmp_path / "home2")}
    env.pop("HF_HUB_OFFLINE", None)
    run = subprocess.run([sys.executable, "-m", "chibichat", "import", "hf", "me/tiny-chat"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "pytorch_model.bin" not in fake_hub["downloads"] and "model.safetensors" in fake_hub["downloads"]
    home2 = Home.resolve(tmp_path / "home2")
    model2, meta = load_model(home2, "sft", "tiny-chat", tokenizer=Tokenizer.load(home2.tokenizer_dir))
    assert meta["imported_from"] == f"{fake_hub['url']}/me/tiny-chat"
    ids = torch.randint(0, tok.vocab_size, (2, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model2(ids), model.eval()(ids))


def test_export_refuses_a_config_field_it_does_not_know(tok):
    from chibichat.export.hf import check_exportable
    from chibichat.model.gpt import GPTConfig

    class Future(GPTConfig):  # a GPTConfig that grew a field the exporter has not learnt
        def to_dict(self):
            return {**super().to_dict(), "value_embeddings": True}

    cfg = Future(vocab_size=tok.vocab_size, seq_len=16, n_layer=1, n_embd=32, n_head=2, n_kv_head=2)
    with pytest.raises(ChibiError, match="value_embeddings"):
        check_exportable(cfg)
    check_exportable(GPTConfig(vocab_size=tok.vocab_size, seq_len=16, n_layer=1, n_embd=32, n_head=2, n_kv_head=2))


def test_peft_adapter_folder_honours_the_umask(tmp_path):
    """The PEFT folder of a LoRA export gets the modes a plain mkdir/open would (safetensors writes 0600)."""
    import os

    from chibichat.export.hf import write_peft_folder

    tensors = {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 4)}
    for umask, dmode, fmode in ((0o022, 0o755, 0o644), (0o027, 0o750, 0o640)):
        old = os.umask(umask)
        try:
            out = write_peft_folder(tensors, {"peft_type": "LORA"}, tmp_path / f"adapter{umask:o}")
        finally:
            os.umask(old)
        assert out.stat().st_mode & 0o777 == dmode
        assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {
            "adapter_model.safetensors": fmode, "adapter_config.json": fmode}
