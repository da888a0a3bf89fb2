"""Loaders: BOS-aligned best-fit pretraining rows and conversation rows, masks, exact resume, ranks."""

from __future__ import annotations

import json
import random

import pytest
import torch

from chibichat.common import ChibiError, Runtime
from chibichat.data.loader import ConversationLoader, PretrainLoader
from chibichat.render import render_conversation
from chibichat.tokenizer import SPECIAL_TOKENS

# ----------------------------------------------------------------------------------------------
# Small fakes that follow the corpus and tokenizer contracts (docs/architecture.md)


class ByteTokenizer:
    """One id per UTF-8 byte; the specials follow at 256.. (as in the real tokenizer's layout)."""

    hash = "byte-tokenizer"

    def __init__(self):
        self._specials = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.bos_id = self._specials["<|bos|>"]
        self.vocab_size = 256 + len(SPECIAL_TOKENS)

    def special_id(self, name):
        return self._specials[name]

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_batch(self, texts, num_threads=4):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class FakeShard:
    def __init__(self, name, groups):
        self.name = name
        self._groups = groups

    def num_groups(self):
        return len(self._groups)

    def read_group(self, i):
        return list(self._groups[i])


class FakeCorpus:
    def __init__(self, name, shards):
        self.name = name
        self._shards = shards

    def shards(self, split, home):
        return self._shards


def rt(rank=0, world_size=1):
    return Runtime(device=torch.device("cpu"), compute_dtype=torch.float32, rank=rank, world_size=world_size)


def make_corpus(n_shards=3, groups=4, docs=5, seed=0, max_len=40):
    """Documents 'd<shard>.<group>.<doc>|' + letters of random length: each one recognisable in a row."""
    rng = random.Random(seed)
    shards = []
    for s in range(n_shards):
        gs = []
        for g in range(groups):
            gs.append([f"d{s}.{g}.{d}|" + "".join(rng.choice("abcdefgh") for _ in range(rng.randint(0, max_len))) for d in range(docs)])
        shards.append(FakeShard(f"shard{s}", gs))
    return FakeCorpus("fake", shards)


def all_docs(corpus):
    return [doc for sh in corpus._shards for g in range(sh.num_groups()) for doc in sh.read_group(g)]


def rows_of(batch):
    """Rebuild full rows of T+1 tokens from (inputs, targets); asserts the shift relation first."""
    x, y = batch
    assert x.dtype == torch.long and y.dtype == torch.long and x.shape == y.shape
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    return torch.cat([x, y[:, -1:]], dim=1)


def split_at_bos(row, bos):
    """A row's documents: maximal runs that start at a BOS."""
    row = row.tolist()
    assert row[0] == bos
    starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
    return [row[a:b] for a, b in zip(starts, starts[1:])]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ----------------------------------------------------------------------------------------------
# Pretraining


def test_pretrain_rows_bos_aligned_no_padding_docs_intact_except_cropped_tail():
    tok = ByteTokenizer()
    corpus = make_corpus()
    full = {tuple([tok.bos_id] + tok.encode(d)) for d in all_docs(corpus)}
    loader = PretrainLoader(corpus, "train", None, tok, batch_size=3, seq_len=31, rt=rt(), buffer_docs=8)
    cropped_rows = 0
    for batch in take(loader, 6):
        x, y = batch
        assert x.shape == (3, 31)
        for row in rows_of(batch):
            docs = split_at_bos(row, tok.bos_id)
            assert sum(len(d) for d in docs) == 32  # exactly full: no padding anywhere
            for d in docs[:-1]:
                assert tuple(d) in full  # every document but the last is whole
            last = tuple(docs[-1])
            if last not in full:  # the last may be a cropped prefix of a document
                cropped_rows += 1
                assert any(f[: len(last)] == last for f in full)
    assert cropped_rows > 0  # docs up to 44 tokens in rows of 32: cropping must have happened
    s = loader.stats
    assert s["rows_served"] == 18 and s["tokens_served"] == 18 * 31
    assert 0 < s["crop_fraction"] < 1
    assert s["tokens_cropped"] > 0


def test_pretrain_best_fit_order_and_crop_by_hand():
    """Lengths incl. BOS: a 6, b 4, c 9, d 3, e 12; rows of 10; one group read at a time.

    row 1: longest that fits 10 is c (9) -> space 1 -> nothing fits -> crop the shortest (d) to 1.
    row 2: longest that fits is a (6) -> space 4 -> b (4) fits exactly.
    row 3: only e (12) is left: cropped to 10. row 4: the next epoch starts like row 1.
    """
    tok = ByteTokenizer()
    docs = ["aaaaa", "bbb", "cccccccc", "dd", "eeeeeeeeeee"]
    corpus = FakeCorpus("hand", [FakeShard("s", [docs])])
    loader = PretrainLoader(corpus, "train", None, tok, batch_size=1, seq_len=9, rt=rt(), buffer_docs=1)
    a, b, c, d, e = ([tok.bos_id] + tok.encode(t) for t in docs)
    assert rows_of(next(loader))[0].tolist() == c + d[:1]
    assert loader.stats["tokens_cropped"] == 2
    assert loader.stats["crop_fraction"] == pytest.approx(2 / 12)
    assert rows_of(next(loader))[0].tolist() == a + b
    assert rows_of(next(loader))[0].tolist() == e[:10]
    assert loader.stats["epoch"] == 0
    assert rows_of(next(loader))[0].tolist() == c + d[:1]
    assert loader.stats["epoch"] == 1
    assert loader.stats["crop_fraction"] == pytest.approx(6 / 46)


def test_pretrain_one_epoch_stops_where_the_pass_runs_out_by_hand():
    """epochs=1 on the docs above (a 6, b 4, c 9, d 3, e 12; rows of 10) with a buffer of 16, more
    than the split holds: the looping loader pulls four passes into it at its first read and its
    row 2 repeats row 1 from pass 2; epochs=1 packs row 2 from what is left of pass 1. Batch 2 needs
    a fourth row, which only pass 2 holds: StopIteration, and its row (e) is not counted as served."""
    tok = ByteTokenizer()
    docs = ["aaaaa", "bbb", "cccccccc", "dd", "eeeeeeeeeee"]
    corpus = FakeCorpus("hand", [FakeShard("s", [docs])])
    a, b, c, d, e = ([tok.bos_id] + tok.encode(t) for t in docs)
    looping = PretrainLoader(corpus, "train", None, tok, 2, 9, rt(), buffer_docs=16)
    assert rows_of(next(looping)).tolist() == [c + d[:1], c + d[:1]] and looping.stats["epoch"] == 3
    once = PretrainLoader(corpus, "train", None, tok, 2, 9, rt(), buffer_docs=16, epochs=1)
    assert rows_of(next(once)).tolist() == [c + d[:1], a + b]
    for _ in range(2):  # spent for good
        with pytest.raises(StopIteration):
            next(once)
    assert once.stats["epoch"] == 0 and once.stats["rows_served"] == 2 and once.stats["tokens_served"] == 18
    assert once.stats["buffered_docs"] == 0 and once.stats["tokens_cropped"] == 2  # d's tail: e's row was not served
    with pytest.raises(ChibiError, match="^epochs must be an integer >= 1, got 0$"):
        PretrainLoader(corpus, "train", None, tok, 2, 9, rt(), epochs=0)


def test_pretrain_split_long_docs_by_hand():
    """T=9. "a"*20 becomes pieces [BOS a*9] [BOS a*9] [BOS a*2]; "bb" stays [BOS b b]. Rows of 10:
    the two full pieces fill rows 1 and 2 (ties: oldest first); row 3 packs the short ones, refills
    (epoch 1) and crops the shortest, the last [BOS b b], to its BOS."""
    tok = ByteTokenizer()
    corpus = FakeCorpus("hand", [FakeShard("s", [["a" * 20, "bb"]])])
    loader = PretrainLoader(corpus, "train", None, tok, 1, 9, rt(), buffer_docs=1, split_long_docs=True)
    B, a, b = tok.bos_id, ord("a"), ord("b")
    assert rows_of(next(loader))[0].tolist() == [B] + [a] * 9
    assert rows_of(next(loader))[0].tolist() == [B] + [a] * 9
    assert rows_of(next(loader))[0].tolist() == [B, a, a, B, b, b, B, a, a, B]
    assert loader.stats["tokens_cropped"] == 2 and loader.stats["epoch"] == 1


def test_pretrain_split_long_docs_keeps_tails_and_crops_less():
    tok = ByteTokenizer()
    corpus = make_corpus(max_len=90)  # docs up to ~100 tokens, rows of 24
    pieces = set()
    for doc in all_docs(corpus):
        ids = tok.encode(doc)
        pieces |= {tuple([tok.bos_id] + ids[k : k + 23]) for k in range(0, len(ids), 23)} if len(ids) > 23 else {tuple([tok.bos_id] + ids)}
    fractions = {}
    for split in (False, True):
        loader = PretrainLoader(corpus, "train", None, tok, 4, 23, rt(), buffer_docs=16, split_long_docs=split)
        for batch in take(loader, 20):
            for row in rows_of(batch):
                segs = split_at_bos(row, tok.bos_id)
                if split:  # every piece whole but the row's last, which may be a cropped prefix
                    assert all(tuple(sg) in pieces for sg in segs[:-1])
                    assert any(p[: len(segs[-1])] == tuple(segs[-1]) for p in pieces)
        fractions[split] = loader.stats["crop_fraction"]
    assert fractions[True] < fractions[False] / 2


@pytest.mark.parametrize("split_long_docs", [False, True])
def test_pretrain_state_is_small_json_and_resume_is_exact_across_epochs(split_long_docs):
    tok = ByteTokenizer()
    corpus = make_corpus()  # 60 docs of ~25 tokens: one epoch is ~47 rows of 32
    make = lambda: PretrainLoader(corpus, "train", None, tok, batch_size=4, seq_len=31, rt=rt(), buffer_docs=10,
                                  split_long_docs=split_long_docs)
    for k in (0, 3, 11, 13):  # 11..13 batches of 4 rows straddle the first epoch boundary
        ref = make()
        take(ref, k)
        state = json.loads(json.dumps(ref.state_dict()))  # must survive a JSON round trip
        assert all(isinstance(e, list) and len(e) == 5 for e in state["buffer"])
        expected = take(ref, 6)
        resumed = make()
        resumed.load_state_dict(state)
        assert_same_batches(take(resumed, 6), expected)
        assert resumed.stats == ref.stats
    assert ref.stats["epoch"] >= 1


def test_pretrain_copy_rows_repeat_their_first_half_by_hand():
    """repeat_every=2, T=9 (rows of 10, h=ceil(10/2)=5): rows 2, 4, ... pack 5 tokens and repeat them; the others are
    the usual best-fit rows. Docs (incl. BOS): a 6, b 4, c 9, d 3, e 12."""
    tok = ByteTokenizer()
    docs = ["aaaaa", "bbb", "cccccccc", "dd", "eeeeeeeeeee"]
    corpus = FakeCorpus("hand", [FakeShard("s", [docs])])
    loader = PretrainLoader(corpus, "train", None, tok, 1, 9, rt(), buffer_docs=1, repeat_every=2)
    a, b, c, d, e = ([tok.bos_id] + tok.encode(t) for t in docs)
    assert rows_of(next(loader))[0].tolist() == c + d[:1]           # an ordinary row
    half = b + a[:1]                                                 # 5 tokens: b (4), then a cropped to 1
    assert rows_of(next(loader))[0].tolist() == half + half          # the copy row
    assert rows_of(next(loader))[0].tolist() == e[:10]
    half = b + d[:1]                                                 # next epoch: b, then d cropped to 1
    assert rows_of(next(loader))[0].tolist() == half + half
    assert loader.stats["rows_served"] == 4


@pytest.mark.parametrize("seq_len", [31, 32])  # rows of 32 and 33 tokens: halves of 16+16 and 17+16
def test_pretrain_copy_rows_have_the_row_length_for_odd_and_even_rows(seq_len):
    tok = ByteTokenizer()
    loader = PretrainLoader(make_corpus(), "train", None, tok, 4, seq_len, rt(), buffer_docs=10, repeat_every=2)
    h = (seq_len + 2) // 2
    for batch in take(loader, 5):
        for i, row in enumerate(rows_of(batch)):
            assert row.numel() == seq_len + 1
            assert torch.equal(row[h:], row[:seq_len + 1 - h]) is (i % 2 == 1)


@pytest.mark.parametrize("k", [0, 5])
def test_pretrain_copy_rows_resume_exactly_and_are_part_of_the_fingerprint(k):
    tok = ByteTokenizer()
    corpus = make_corpus()
    make = lambda every: PretrainLoader(corpus, "train", None, tok, batch_size=3, seq_len=31, rt=rt(),
                                        buffer_docs=10, repeat_every=every)
    ref = make(3)
    take(ref, k)
    state = json.loads(json.dumps(ref.state_dict()))
    expected = take(ref, 4)
    resumed = make(3)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 4), expected)
    # every 3rd row (by the rank's row count) is a copy row, and only those
    rows = [r for batch in expected for r in rows_of(batch)]
    for i, row in enumerate(rows):
        is_copy = (3 * k + i) % 3 == 2
        assert torch.equal(row[16:], row[:16]) is is_copy, i
    with pytest.raises(ChibiError, match="repeat_every"):
        make(0).load_state_dict(state)
    with pytest.raises(ChibiError, match="repeat_every must be an integer >= 0"):
        make(-1)


def test_pretrain_two_ranks_disjoint_and_cover_every_group():
    tok = ByteTokenizer()
    corpus = make_corpus(n_shards=3, groups=3)  # 9 units: rank 0 gets 5, rank 1 gets 4
    loaders = [PretrainLoader(corpus, "train", None, tok, 2, 31, rt(r, 2), buffer_docs=4) for r in range(2)]
    u0, u1 = set(loaders[0].units), set(loaders[1].units)
    assert not u0 & u1 and len(u0 | u1) == 9
    for r, loader in enumerate(loaders):
        mine = {f"d{s}.{g}." for s, g in loader.units}
        for batch in take(loader, 5):
            for row in rows_of(batch):
                for d in split_at_bos(row, tok.bos_id):
                    text = tok.decode(d)
                    if "|" in text:  # the doc's name survived any crop: it must be one of this rank's
                        assert text[: text.index(".", 3) + 1] in mine
    # per-rank exact resume too
    ref = PretrainLoader(corpus, "train", None, tok, 2, 31, rt(1, 2), buffer_docs=4)
    take(ref, 4)
    state = ref.state_dict()
    again = PretrainLoader(corpus, "train", None, tok, 2, 31, rt(1, 2), buffer_docs=4)
    again.load_state_dict(state)
    assert_same_batches(take(again, 5), take(ref, 5))


def test_pretrain_bad_inputs_raise_chibierror():
    tok = ByteTokenizer()
    corpus = make_corpus(n_shards=1, groups=2)
    with pytest.raises(ChibiError, match="ranks"):
        PretrainLoader(corpus, "train", None, tok, 1, 8, rt(2, 3))
    with pytest.raises(ChibiError, match="no document groups"):
        PretrainLoader(FakeCorpus("empty", []), "train", None, tok, 1, 8, rt())
    with pytest.raises(ChibiError, match="batch_size"):
        PretrainLoader(corpus, "train", None, tok, 0, 8, rt())
    with pytest.raises(ChibiError, match="seq_len"):
        PretrainLoader(corpus, "train", None, tok, 1, "8", rt())
    hollow = FakeCorpus("hollow", [FakeShard("s", [[], []])])
    with pytest.raises(ChibiError, match="hold no documents"):
        next(PretrainLoader(hollow, "train", None, tok, 1, 8, rt()))


def test_pretrain_state_mismatch_and_corruption_raise_chibierror():
    tok = ByteTokenizer()
    corpus = make_corpus()
    a = PretrainLoader(corpus, "train", None, tok, 2, 31, rt(), buffer_docs=8)
    take(a, 2)
    state = a.state_dict()
    with pytest.raises(ChibiError, match="seq_len"):
        PretrainLoader(corpus, "train", None, tok, 2, 15, rt(), buffer_docs=8).load_state_dict(state)
    with pytest.raises(ChibiError, match="world_size"):
        PretrainLoader(corpus, "train", None, tok, 2, 31, rt(0, 2), buffer_docs=8).load_state_dict(state)
    with pytest.raises(ChibiError, match="pretrain loader state"):
        PretrainLoader(corpus, "train", None, tok, 2, 31, rt(), buffer_docs=8).load_state_dict({"kind": "conversation"})
    broken = json.loads(json.dumps(state))
    broken["buffer"][0] = ["x"]
    with pytest.raises(ChibiError, match="corrupt"):
        PretrainLoader(corpus, "train", None, tok, 2, 31, rt(), buffer_docs=8).load_state_dict(broken)
    # same names and group counts, but a document's text changed: the length check catches it
    edited = make_corpus()
    s, g = a.units[state["buffer"][0][1]]
    d = state["buffer"][0][2]  # [epoch, unit, doc, piece, length]
    edited._shards[s]._groups[g][d] += "more"
    with pytest.raises(ChibiError, match="changed"):
        PretrainLoader(edited, "train", None, tok, 2, 31, rt(), buffer_docs=8).load_state_dict(state)


def _local_corpus(tmp_path, n_files=3, docs_per_file=40):
    """A local:/folder corpus of .jsonl files (the last is val), English and Japanese text."""
    from chibichat.data.corpora import get_corpus

    rng = random.Random(1)
    words = ["the", "loader", "packs", "documents", "into", "rows", "日本語", "の", "文書", "です", "42", "tokens"]
    folder = tmp_path / "corpus"
    folder.mkdir()
    texts = []
    for f in range(n_files):
        lines = []
        for d in range(docs_per_file):
            text = f"doc {f}-{d}: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))
            texts.append(text)
            lines.append(json.dumps({"text": text}, ensure_ascii=False))
        (folder / f"part{f}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return get_corpus(f"local:{folder}"), texts


def test_pretrain_with_real_tokenizer_and_local_corpus_resumes_exactly(tmp_path):
    from chibichat.tokenizer import train_tokenizer

    corpus, texts = _local_corpus(tmp_path)
    tok = train_tokenizer(texts, vocab_size=300)
    make = lambda: PretrainLoader(corpus, "train", None, tok, batch_size=4, seq_len=63, rt=rt(), buffer_docs=50)
    ref = make()
    first = take(ref, 3)  # epoch 0; the 8 batches after the save cross into epoch 1
    for batch in first:
        for row in rows_of(batch):
            assert row[0].item() == tok.bos_id
            assert tok.decode(row[1:12].tolist()).startswith("doc ")
    state = json.loads(json.dumps(ref.state_dict()))
    expected = take(ref, 8)
    resumed = make()
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 8), expected)
    assert ref.stats["epoch"] >= 1


def test_pretrain_loader_holds_one_local_file_in_memory(tmp_path):
    """Counting a split's groups does not keep its .jsonl files in memory: at most the shard being read is,
    during reading and a resume alike, and the batches match those of a run that never let a file go."""
    corpus, texts = _local_corpus(tmp_path, n_files=4, docs_per_file=40)  # 3 train files + 1 val
    make = lambda: PretrainLoader(corpus, "train", None, ByteTokenizer(), batch_size=2, seq_len=63, rt=rt(),
                                  buffer_docs=8)
    loader = make()
    assert len(loader._shards) == 3 and sum(s.loaded for s in loader._shards) <= 1
    held_in_turn = []
    while loader.stats["epoch"] < 1:
        next(loader)
        (held,) = [s.name for s in loader._shards if s.loaded]
        if not held_in_turn or held_in_turn[-1] != held:
            held_in_turn.append(held)
    assert held_in_turn == ["part0.jsonl", "part1.jsonl", "part2.jsonl", "part0.jsonl"]  # the 2nd epoch began
    state = loader.state_dict()
    expected = take(loader, 4)
    resumed = make()
    resumed.load_state_dict(state)
    assert sum(s.loaded for s in resumed._shards) == 1
    assert_same_batches(take(resumed, 4), expected)
    docs = [d for s in make()._shards for g in range(s.num_groups()) for d in s.read_group(g)]
    assert docs == texts[:120]


# ----------------------------------------------------------------------------------------------
# Conversations


def make_conversations(n=30, seed=0):
    """Conversations whose turns are recognisable ('q<i>.<t>|', 'a<i>.<t>|'), some with tool calls, some
    longer than a row of 128 byte tokens (multi-turn ones can be shortened, single-turn ones cannot)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        msgs = [] if i % 5 else [{"role": "system", "content": f"sys{i}"}]
        for t in range(rng.randint(1, 3)):
            q = f"q{i}.{t}|" + "x" * rng.randint(0, 20) + ("z" * 120 if i % 7 == 3 and t == 0 else "")
            a = f"a{i}.{t}|" + "y" * rng.randint(1, 20)
            if t % 2:
                a = [{"type": "text", "text": a}, {"type": "python", "text": "1+1"},
                     {"type": "python_output", "text": "2"}, {"type": "text", "text": "ok"}]
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        items.append(("alpha" if i % 2 else "beta", {"messages": msgs}))
    return items


def expected_renders(tok, items, row_len, overflow="shorten"):
    return [render_conversation(tok, conv, row_len, overflow) for _, conv in items]


def parse_packed_row(inputs, renders, bos, row_len):
    """Explain a pad/pack row (its T inputs) as whole rendered conversations + trailing BOS padding.

    Returns (indices of the conversations in order, the expected full row of T+1 tokens, its mask)."""
    row = inputs.tolist()
    found, tokens, mask = [], [], []
    while len(tokens) < len(row):
        p = len(tokens)
        match = next(
            (j for j, r in enumerate(renders)
             if r.ids and p + len(r.ids) <= row_len and row[p : p + len(r.ids)] == r.ids[: len(row) - p]),
            None,
        )
        if match is None:  # the rest must be padding, and a row is never all padding
            assert p > 0 and all(t == bos for t in row[p:]), "row holds something that is not a whole conversation"
            break
        found.append(match)
        tokens += renders[match].ids
        mask += renders[match].mask
    pad = row_len - len(tokens)
    return found, tokens + [bos] * pad, mask + [0] * pad


def expected_targets(tokens, mask):
    return [t if m else -1 for t, m in zip(tokens[1:], mask[1:])]


def drain(loader):
    return list(loader)


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_conversation_rows_hold_whole_conversations_and_masks_survive(mode):
    tok = ByteTokenizer()
    items = make_conversations()
    renders = expected_renders(tok, items, 128)
    loader = ConversationLoader(items, tok, batch_size=4, seq_len=127, rt=rt(), mode=mode, epochs=1, buffer_size=8)
    seen, multi = [], 0
    for x, y in drain(loader):
        assert x.shape[1] == 127 and 1 <= x.shape[0] <= 4
        for i in range(x.shape[0]):
            found, tokens, mask = parse_packed_row(x[i], renders, tok.bos_id, 128)
            assert x[i].tolist() == tokens[:-1]
            assert y[i].tolist() == expected_targets(tokens, mask)  # -1 exactly at mask-0 and padding
            if mode == "pad":
                assert len(found) == 1
            multi += len(found) > 1
            seen += found
    assert (multi > 0) == (mode == "pack")  # packing really puts several conversations in a row
    kept = [j for j, r in enumerate(renders) if r.status != "dropped"]
    assert sorted(seen) == kept  # every kept conversation exactly once, none cropped, dropped ones absent
    assert len(kept) < len(items)  # the fixture really has over-length conversations
    counts = {}
    for (task, _), r in zip(items, renders):
        counts.setdefault(task, {"ok": 0, "shortened": 0, "dropped": 0})[r.status] += 1
    assert loader.render_stats.as_dict() == counts
    assert counts["alpha"]["shortened"] + counts["beta"]["shortened"] > 0
    assert loader.stats["conversations"] == len(kept) and loader.stats["progress"] == 1.0


@pytest.mark.parametrize("train_all", [False, True])
def test_conversation_stream_is_the_concatenation_with_masked_targets(train_all):
    tok = ByteTokenizer()
    items = make_conversations()
    renders = expected_renders(tok, items, 64)
    loader = ConversationLoader(items, tok, 3, 63, rt(), mode="stream", epochs=1, train_all_tokens=train_all)
    stream_ids = [t for r in renders for t in r.ids]
    stream_mask = [m for r in renders for m in ([1] * len(r.ids) if train_all else r.mask)]
    batches = drain(loader)
    rows = [(x[i], y[i]) for x, y in batches for i in range(x.shape[0])]
    pos = 0  # row k covers stream[k*63 : k*63 + 64]: consecutive rows share one token
    for x, y in rows:
        tokens = stream_ids[pos : pos + 64]
        mask = stream_mask[pos : pos + 64]
        pad = 64 - len(tokens)
        tokens, mask = tokens + [tok.bos_id] * pad, mask + [0] * pad
        assert x.tolist() == tokens[:-1]
        assert y.tolist() == expected_targets(tokens, mask)
        pos += 63
    assert pos >= len(stream_ids) - 1  # the whole stream was served, the last row padded
    assert loader.stats["rows_without_targets"] == 0
    assert loader.stats["targets"] == sum(stream_mask) - stream_mask[0]  # every supervised token once


def test_conversation_overflow_drop_is_counted_and_never_served():
    tok = ByteTokenizer()
    items = make_conversations()
    renders = expected_renders(tok, items, 128, overflow="drop")
    loader = ConversationLoader(items, tok, 4, 127, rt(), mode="pack", overflow="drop", epochs=1)
    seen = []
    for x, y in drain(loader):
        for i in range(x.shape[0]):
            seen += parse_packed_row(x[i], renders, tok.bos_id, 128)[0]
    dropped = [j for j, r in enumerate(renders) if r.status == "dropped"]
    assert dropped and not set(dropped) & set(seen)
    counts = loader.render_stats.as_dict()
    assert sum(c["dropped"] for c in counts.values()) == len(dropped)
    assert sum(c["shortened"] for c in counts.values()) == 0


@pytest.mark.parametrize("mode", ["pad", "pack", "stream"])
def test_conversation_resume_is_exact_across_epochs(mode):
    tok = ByteTokenizer()
    items = make_conversations(n=12)
    make = lambda: ConversationLoader(items, tok, 3, 127, rt(), mode=mode, buffer_size=5)
    for k in (0, 2, 5):  # a dozen conversations: 5 batches of 3 rows cross an epoch boundary
        ref = make()
        take(ref, k)
        state = json.loads(json.dumps(ref.state_dict()))
        expected = take(ref, 6)
        resumed = make()
        resumed.load_state_dict(state)
        assert_same_batches(take(resumed, 6), expected)
        assert resumed.stats == ref.stats
    assert ref.stats["epoch"] >= 1


def test_conversation_finite_epochs_and_two_disjoint_ranks():
    tok = ByteTokenizer()
    items = make_conversations(n=20)
    renders = expected_renders(tok, items, 128)
    kept = [j for j, r in enumerate(renders) if r.status != "dropped"]
    per_rank = []
    for r in range(2):
        loader = ConversationLoader(items, tok, 4, 127, rt(r, 2), mode="pad", epochs=2)
        seen = [parse_packed_row(x[i], renders, tok.bos_id, 128)[0][0] for x, _ in drain(loader) for i in range(x.shape[0])]
        assert sorted(seen) == sorted([j for j in kept if j % 2 == r] * 2)  # each of its items twice, then stop
        with pytest.raises(StopIteration):
            next(loader)
        per_rank.append(set(seen))
    assert not per_rank[0] & per_rank[1] and per_rank[0] | per_rank[1] == set(kept)


def test_stream_rows_without_a_target_are_counted_not_emitted():
    """Rows of 32. A renders to exactly 32 tokens, so row 2 starts at A's last token and its targets
    are B's first 31 tokens; B (32 tokens, empty answer) supervises only its final <|assistant_end|>,
    which falls in row 3. Row 2 has nothing to learn: it is skipped and counted, and no supervised
    token is lost by skipping it."""
    tok = ByteTokenizer()
    a = {"messages": [{"role": "user", "content": "q" * 10}, {"role": "assistant", "content": "a" * 17}]}
    b = {"messages": [{"role": "user", "content": "q" * 27}, {"role": "assistant", "content": ""}]}
    items = [("t", a), ("t", b)]
    ra, rb = expected_renders(tok, items, 32)
    assert len(ra.ids) == len(rb.ids) == 32 and sum(rb.mask) == 1
    loader = ConversationLoader(items, tok, 4, 31, rt(), mode="stream", epochs=1)
    (x, y), = drain(loader)
    assert x.shape[0] == 2 and ((y != -1).sum(dim=1) > 0).all()
    assert loader.stats["rows_without_targets"] == 1
    assert loader.stats["targets"] == sum(ra.mask) + sum(rb.mask)


def test_conversation_bad_inputs_raise_chibierror():
    tok = ByteTokenizer()
    items = make_conversations(n=4)
    with pytest.raises(ChibiError, match="mode"):
        ConversationLoader(items, tok, 2, 127, rt(), mode="crop")
    with pytest.raises(ChibiError, match="overflow"):
        ConversationLoader(items, tok, 2, 127, rt(), overflow="truncate")
    with pytest.raises(ChibiError, match="empty"):
        ConversationLoader([], tok, 2, 127, rt())
    with pytest.raises(ChibiError, match="len"):
        ConversationLoader((it for it in items), tok, 2, 127, rt())
    with pytest.raises(ChibiError, match="rank 5 gets none"):
        ConversationLoader(items, tok, 2, 127, rt(5, 6))
    with pytest.raises(ChibiError, match="epochs"):
        ConversationLoader(items, tok, 2, 127, rt(), epochs=0)
    with pytest.raises(ChibiError, match="item 0 must be"):
        next(ConversationLoader([items[0][1]], tok, 2, 127, rt()))
    bad = [("t", {"messages": [{"role": "assistant", "content": "hi"}]})]
    with pytest.raises(ChibiError, match="conversation 0"):
        next(ConversationLoader(bad, tok, 2, 127, rt()))
    with pytest.raises(ChibiError) as e:
        next(ConversationLoader(items, tok, 2, 8, rt(), overflow="drop"))
    assert str(e.value).endswith("tokens and were dropped; use a longer seq_len or overflow='shorten'")
    with pytest.raises(ChibiError) as e:  # already shortening: the advice is not to shorten
        next(ConversationLoader(items, tok, 2, 8, rt(), overflow="shorten"))
    assert str(e.value).endswith("were dropped; even their final exchange alone does not fit (overflow='shorten' "
                                 "keeps it whole); use a longer seq_len or shorter conversations")
    a = ConversationLoader(items, tok, 2, 127, rt(), mode="pack")
    next(a)
    with pytest.raises(ChibiError, match="mode"):
        ConversationLoader(items, tok, 2, 127, rt(), mode="pad").load_state_dict(a.state_dict())
    with pytest.raises(ChibiError, match="conversation loader state"):
        ConversationLoader(items, tok, 2, 127, rt(), mode="pack").load_state_dict({"kind": "pretrain"})
    reordered = items[::-1]
    with pytest.raises(ChibiError, match="data: saved"):
        ConversationLoader(reordered, tok, 2, 127, rt(), mode="pack").load_state_dict(a.state_dict())
    broken = a.state_dict()
    broken["counters"] = None
    with pytest.raises(ChibiError, match="corrupt"):
        ConversationLoader(items, tok, 2, 127, rt(), mode="pack").load_state_dict(broken)


def test_conversation_resume_on_data_changed_anywhere_is_refused():
    tok = ByteTokenizer()
    items = make_conversations(n=30)
    a = ConversationLoader(items, tok, 2, 127, rt(), mode="pack", buffer_size=4)
    next(a)
    state = a.state_dict()
    ConversationLoader(list(items), tok, 2, 127, rt(), mode="pack", buffer_size=4).load_state_dict(state)
    edited = list(items)
    task, conv = edited[17]  # a middle item, not among the three the fingerprint used to sample (0, 15, 29)
    edited[17] = (task, {"messages": [*conv["messages"][:-1], {"role": "assistant", "content": "changed"}]})
    with pytest.raises(ChibiError, match=r"\(data: saved '\w+', now '\w+'\); the training data changed since the "
                                         r"checkpoint \(a conversation edited, added, removed or moved\); restore the "
                                         r"data it was trained on, or start without --resume"):
        ConversationLoader(edited, tok, 2, 127, rt(), mode="pack", buffer_size=4).load_state_dict(state)


def test_conversation_loader_with_real_tokenizer_and_task_mixture():
    """The hand-off the SFT stage relies on: a Mixture of real tasks, the real tokenizer and renderer."""
    from chibichat.tasks.base import Mixture
    from chibichat.tasks.identity import Identity
    from chibichat.tasks.spelling import Spelling
    from chibichat.tokenizer import train_tokenizer

    mix = Mixture([Identity(size=16), Spelling(size=16, lang="ja")], seed=3)
    items = [mix[i] for i in range(len(mix))]
    texts = [m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
             for _, c in items for m in c["messages"]]  # spelling replies are parts (a tool call)
    tok = train_tokenizer(texts, vocab_size=300)
    renders = expected_renders(tok, items, 96)
    make = lambda: ConversationLoader(mix, tok, 4, 95, rt(), mode="pack", epochs=2, buffer_size=6)
    loader = make()
    seen = []
    batches = drain(loader)
    for x, y in batches:
        for i in range(x.shape[0]):
            found, tokens, mask = parse_packed_row(x[i], renders, tok.bos_id, 96)
            assert y[i].tolist() == expected_targets(tokens, mask)
            seen += [tuple(renders[j].ids) for j in found]  # generated tasks may repeat a conversation
    kept = [tuple(r.ids) for r in renders if r.status != "dropped"]
    assert sorted(seen) == sorted(kept * 2)
    assert set(loader.render_stats.as_dict()) == {"identity", "spelling-ja"}
    resumed = make()
    ref = make()
    take(ref, 3)
    resumed.load_state_dict(json.loads(json.dumps(ref.state_dict())))
    assert_same_batches(drain(resumed), batches[3:])
