"""Training batches: BOS-aligned best-fit pretraining rows and conversation rows, with exact resume.

Both loaders yield `(inputs, targets)`, CPU int64 tensors of shape (B, T), cut from rows of T+1
tokens (inputs = row[:-1], targets = row[1:]); targets are -1 where nothing is learned.

Exact resume. A state dict never stores tokens. It stores the read cursor and, for every item that
sits in a packing buffer, a reference (epoch, position, index) plus its length; `load_state_dict`
re-reads and re-tokenizes (or re-renders) exactly those items and checks that their lengths still
match. Given the same corpus, tokenizer and settings, the batches after a resume are identical to
those of an uninterrupted run. Ties in best-fit packing are broken by that reference, so the
order is a pure function of the data, never of dict or heap internals.

Distributed: rank r of W reads units r, r+W, r+2W, ... of one fixed global order (a unit is a
(shard, group) pair for pretraining, one conversation for the conversation loader), so the ranks'
streams are disjoint and together cover the data once per epoch. Every rank keeps its own state.
"""

from __future__ import annotations

import bisect
import hashlib
import json

from chibichat.common import ChibiError

STATE_VERSION = 1

# Sorts after every reference tuple: bisect with (space, _AFTER) finds the last key of length <= space.
_AFTER = (float("inf"),)


def _check_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ChibiError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_rank(rt) -> tuple[int, int]:
    rank, world = getattr(rt, "rank", None), getattr(rt, "world_size", None)
    if not isinstance(world, int) or world < 1 or not isinstance(rank, int) or not 0 <= rank < world:
        raise ChibiError(f"bad runtime rank/world_size {rank}/{world}: rank must be in [0, world_size)")
    return rank, world


def _digest(obj) -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class _BestFitBuffer:
    """Token sequences kept sorted by (length, reference), for best-fit packing.

    A sorted list + bisect makes "the longest item that fits in `space`" O(log n) to find; removal is
    a memmove of a few thousand pointers, far cheaper than scanning the buffer in Python per pick.
    """

    def __init__(self):
        self._keys: list[tuple[int, tuple]] = []
        self._items: dict[tuple, object] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, ref: tuple, length: int, item) -> None:
        bisect.insort(self._keys, (length, ref))
        self._items[ref] = item

    def pop_best_fit(self, space: int):
        """The longest item of length <= space, or None. Ties go to the earliest reference (oldest first)."""
        i = bisect.bisect_right(self._keys, (space, _AFTER)) - 1
        if i < 0:
            return None
        return self._pop(bisect.bisect_left(self._keys, (self._keys[i][0],)))

    def pop_shortest(self):
        return self._pop(0)

    def _pop(self, i: int):
        _, ref = self._keys.pop(i)
        return self._items.pop(ref)

    def refs(self) -> list[tuple[tuple, int]]:
        return [(ref, length) for length, ref in self._keys]


def _check_state(d, kind: str, fingerprint: dict) -> None:
    """Reject a state saved by another kind of loader or under other settings, naming the difference."""
    if not isinstance(d, dict) or d.get("kind") != kind or d.get("version") != STATE_VERSION:
        got = d.get("kind") if isinstance(d, dict) else type(d).__name__
        raise ChibiError(
            f"loader state is not a version-{STATE_VERSION} {kind} loader state (got {got!r}); "
            "resume from a checkpoint written by this stage, or start fresh"
        )
    saved = d.get("fingerprint")
    if not isinstance(saved, dict):
        raise ChibiError(f"{kind} loader state has no fingerprint; the checkpoint is corrupt, start fresh")
    diff = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in fingerprint.items() if saved.get(k) != v]
    if diff:
        fix = ("resume with the same corpus/data, tokenizer, seq_len, buffer size and number of ranks, or start fresh")
        if "data" in fingerprint and saved.get("data") != fingerprint["data"]:
            fix = ("the training data changed since the checkpoint (a conversation edited, added, removed or moved); "
                   "restore the data it was trained on, or start without --resume")
        raise ChibiError(f"{kind} loader state was saved under other settings ({'; '.join(diff)}); {fix}")


def _corrupt_state(kind: str, e: Exception) -> ChibiError:
    return ChibiError(f"{kind} loader state is corrupt ({type(e).__name__}: {e}); the checkpoint is damaged, start fresh")


# ==============================================================================================
# Pretraining


class PretrainLoader:
    """BOS-aligned best-fit-crop packing of a corpus split into (B, T) batches, forever (epochs loop).

    Every document is tokenized with BOS prepended and kept in a buffer of at least `buffer_docs`
    documents. A row of T+1 tokens is filled by repeatedly taking the longest buffered document that
    still fits; when none fits, the shortest one is cropped to fill the row exactly and its tail is
    discarded. So every row starts with BOS at a document boundary and holds no padding; the price
    is the cropped tails, reported as `stats["crop_fraction"]` (tokens discarded / tokens taken).

    split_long_docs: a document longer than a row can only ever be cropped, so with plain cropping
    its tail beyond T+1 tokens is never trained on, in any epoch. On a small corpus that is looped
    many times (the embedded ones: ~44% of tokens lost at T=512) that is a large, permanent loss.
    With split_long_docs=True such a document is cut into pieces of T tokens, each behind its own
    BOS (a piece fills a row exactly), so only short documents are ever cropped. The price: rows
    that start with BOS followed by mid-document text.

    epochs=None loops forever; epochs=N never reads beyond the Nth pass and raises StopIteration at
    the first batch whose rows need more documents than those N passes hold (that batch is not
    served; the loader stays spent). So no row holds a document of pass N+1, and every row served
    before epochs=None would read pass N+1 is the same as that loader's.
    """

    def __init__(self, corpus, split, home, tokenizer, batch_size: int, seq_len: int, rt,
                 buffer_docs: int = 1000, tokenizer_threads: int = 4, split_long_docs: bool = False,
                 repeat_every: int = 0, epochs: int | None = None):
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.buffer_docs = _check_int("buffer_docs", buffer_docs, 1)
        self.tokenizer_threads = _check_int("tokenizer_threads", tokenizer_threads, 1)
        self.rank, self.world_size = _check_rank(rt)
        self.tokenizer = tokenizer
        self.row_len = seq_len + 1
        self.split_long_docs = bool(split_long_docs)
        self.repeat_every = _check_int("repeat_every", repeat_every, 0)
        self.epochs = None if epochs is None else _check_int("epochs", epochs, 1)
        self._shards = corpus.shards(split, home)
        everything = [(s, g) for s, shard in enumerate(self._shards) for g in range(shard.num_groups())]
        where = f"corpus {corpus.name!r} split {split!r}"
        if not everything:
            raise ChibiError(f"{where} has no document groups; check it with `chibichat data list` or pick another corpus")
        # Fixed global order, strided over ranks: disjoint per-rank streams that together cover it all.
        self.units = everything[self.rank :: self.world_size]
        if not self.units:
            raise ChibiError(
                f"{where} has {len(everything)} document groups but {self.world_size} ranks, so rank {self.rank} "
                f"gets none; run with at most {len(everything)} ranks or use a larger corpus"
            )
        self._where = where
        self._fingerprint = {
            "corpus": corpus.name,
            "split": split,
            "units": _digest([[s.name for s in self._shards], everything]),
            "tokenizer": getattr(tokenizer, "hash", None),
            "seq_len": seq_len,
            "buffer_docs": buffer_docs,
            "split_long_docs": self.split_long_docs,
            "repeat_every": self.repeat_every,
            "epochs": self.epochs,
            "rank": self.rank,
            "world_size": self.world_size,
        }
        self._reset()

    def _reset(self) -> None:
        self._epoch = 0
        self._next_unit = 0  # position in self.units of the next group to read (== len: epoch done)
        self._buffer = _BestFitBuffer()
        self._docs_read = 0
        self._tokens_read = 0
        self._tokens_packed = 0  # tokens placed in rows
        self._tokens_cropped = 0  # tokens of cropped tails, never trained on
        self._rows = 0

    # -- reading ---------------------------------------------------------------------------------

    def _pieces(self, ids: list[int]) -> list[list[int]]:
        """A document's buffer entries: itself behind BOS, or (split_long_docs) pieces of T tokens."""
        bos = self.tokenizer.bos_id
        if not self.split_long_docs or len(ids) < self.row_len:
            return [[bos, *ids]]
        T = self.seq_len
        return [[bos, *ids[k : k + T]] for k in range(0, len(ids), T)]

    def _read(self, unit_pos: int) -> list[str]:
        s, g = self.units[unit_pos]
        return self._shards[s].read_group(g)

    def _tokenize(self, docs: list[str]) -> list[list[list[int]]]:
        """Per document, its list of buffer entries (see _pieces)."""
        return [self._pieces(ids) for ids in self.tokenizer.encode_batch(docs, num_threads=self.tokenizer_threads)]

    def _refill(self) -> None:
        """Read whole groups until the buffer holds at least buffer_docs documents, or (epochs=N) until
        the Nth pass is read to its end."""
        empty_reads = 0
        while len(self._buffer) < self.buffer_docs:
            if self._next_unit == len(self.units):  # wrap lazily: `epoch` is that of the last group read
                if self.epochs is not None and self._epoch + 1 >= self.epochs:
                    return
                self._epoch, self._next_unit = self._epoch + 1, 0
            epoch, pos = self._epoch, self._next_unit
            docs = self._tokenize(self._read(pos))
            for d, pieces in enumerate(docs):
                for k, ids in enumerate(pieces):
                    self._buffer.add((epoch, pos, d, k), len(ids), ids)
                    self._tokens_read += len(ids)
            self._docs_read += len(docs)
            self._next_unit += 1
            empty_reads = 0 if docs else empty_reads + 1
            if empty_reads >= len(self.units):
                raise ChibiError(
                    f"{self._where}: the {len(self.units)} document groups of rank {self.rank} hold no documents; "
                    "use a corpus with text in it"
                )

    def _fill_row(self, out: list[int]) -> None:
        copy = self.repeat_every and self._rows % self.repeat_every == self.repeat_every - 1
        start = len(out)
        space = (self.row_len + 1) // 2 if copy else self.row_len  # the first half is the longer one
        while space:
            if len(self._buffer) < self.buffer_docs:
                self._refill()
            if not self._buffer:  # only with epochs=N: its last pass is used up, the row cannot be filled
                raise StopIteration
            doc = self._buffer.pop_best_fit(space)
            if doc is None:  # nothing fits: crop the shortest so the row ends exactly full
                doc = self._buffer.pop_shortest()
                out += doc[:space]
                self._tokens_cropped += len(doc) - space
                self._tokens_packed += space
                space = 0
            else:
                out += doc
                self._tokens_packed += len(doc)
                space -= len(doc)
        if copy:
            half = out[start:]
            out += half[: self.row_len - len(half)]
        self._rows += 1

    # -- iteration -------------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self):
        import torch

        flat: list[int] = []
        counts = self._tokens_packed, self._tokens_cropped, self._rows
        try:
            for _ in range(self.batch_size):
                self._fill_row(flat)
        except StopIteration:  # epochs=N used up: the rows of a batch not served are not counted
            self._tokens_packed, self._tokens_cropped, self._rows = counts
            raise
        rows = torch.tensor(flat, dtype=torch.long).view(self.batch_size, self.row_len)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    @property
    def stats(self) -> dict:
        taken = self._tokens_packed + self._tokens_cropped
        return {
            "epoch": self._epoch,
            "docs_read": self._docs_read,
            "tokens_read": self._tokens_read,
            "rows_served": self._rows,
            "tokens_served": self._rows * self.seq_len,  # target tokens: what the model trains on
            "tokens_cropped": self._tokens_cropped,
            "crop_fraction": self._tokens_cropped / taken if taken else 0.0,
            "buffered_docs": len(self._buffer),
        }

    # -- exact resume ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "kind": "pretrain",
            "version": STATE_VERSION,
            "fingerprint": dict(self._fingerprint),
            "epoch": self._epoch,
            "next_unit": self._next_unit,
            # [epoch, unit position, doc index in the group, piece index, length incl. BOS]; re-read on load
            "buffer": [[*ref, length] for ref, length in self._buffer.refs()],
            "counters": {
                "docs_read": self._docs_read,
                "tokens_read": self._tokens_read,
                "tokens_packed": self._tokens_packed,
                "tokens_cropped": self._tokens_cropped,
                "rows": self._rows,
            },
        }

    def load_state_dict(self, d: dict) -> None:
        _check_state(d, "pretrain", self._fingerprint)
        try:
            epoch, next_unit, counters = int(d["epoch"]), int(d["next_unit"]), d["counters"]
            refs = [(int(e), int(u), int(i), int(k), int(n)) for e, u, i, k, n in d["buffer"]]
            counts = {k: int(counters[k]) for k in ("docs_read", "tokens_read", "tokens_packed", "tokens_cropped", "rows")}
        except (KeyError, TypeError, ValueError) as e:
            raise _corrupt_state("pretrain", e) from None
        if not 0 <= next_unit <= len(self.units) or any(not 0 <= r[1] < len(self.units) for r in refs):
            raise ChibiError("pretrain loader state points past this rank's document groups; the corpus changed, start fresh")
        buffer = _BestFitBuffer()
        by_unit: dict[int, list[tuple[int, int, int, int, int]]] = {}
        for ref in refs:
            by_unit.setdefault(ref[1], []).append(ref)
        for u, unit_refs in sorted(by_unit.items()):  # in read order: each .jsonl/.txt shard is loaded once (DocCache)
            docs = self._read(u)
            wanted = sorted({r[2] for r in unit_refs})
            if wanted[0] < 0 or wanted[-1] >= len(docs):
                raise ChibiError(
                    f"pretrain loader state refers to document {wanted[-1]} of a group with {len(docs)}; "
                    "the corpus changed, start fresh"
                )
            pieces = dict(zip(wanted, self._tokenize([docs[i] for i in wanted])))
            for e, _, i, k, n in unit_refs:
                ids = pieces[i][k] if 0 <= k < len(pieces[i]) else []
                if len(ids) != n:
                    raise ChibiError(
                        f"pretrain loader state: document {i} (piece {k}) of group {self.units[u]} now has {len(ids)} "
                        f"tokens, saved {n}; the corpus or tokenizer changed since the checkpoint, start fresh"
                    )
                buffer.add((e, u, i, k), n, ids)
        self._epoch, self._next_unit, self._buffer = epoch, next_unit, buffer
        self._docs_read, self._tokens_read = counts["docs_read"], counts["tokens_read"]
        self._tokens_packed, self._tokens_cropped, self._rows = counts["tokens_packed"], counts["tokens_cropped"], counts["rows"]


# ==============================================================================================
# Conversations

CONVERSATION_MODES = ("pad", "pack", "stream")


class ConversationLoader:
    """Rows of rendered conversations for midtraining and SFT, as (B, T) inputs and targets.

    Modes:
      pad     one conversation per row, the rest of the row padded with BOS.
      pack    best-fit-pad: whole conversations packed into a row, the longest that still fits first;
              when none fits, the remainder is padded with BOS. A conversation is never cropped.
      stream  conversations concatenated into one token stream and cut into rows (midtraining):
              row k+1 starts with the last token of row k, so every token is a target exactly once.
    Targets are -1 at padding and wherever the render mask is 0; with train_all_tokens=True every
    real token is a target (only padding is -1).

    Every conversation is rendered with max_len = T+1, so each one fits in an empty row: nothing can
    clog the packing buffer. Over-length conversations follow the renderer's `overflow` policy
    ("shorten" drops whole earlier turns, "drop" drops the conversation); `render_stats` counts
    ok/shortened/dropped per task over this rank's first epoch (sum over ranks for a report).
    A row without a single target is never emitted. It can only arise in stream mode (a window that
    stops just short of a conversation's supervised tokens, or the last few tokens of the data); it is
    skipped and counted in stats["rows_without_targets"]. Skipping it loses no supervised token,
    because every token is the target of exactly one row.

    `source` is indexable: len(source) and source[i] -> (task_name, conversation), e.g. a Mixture.
    epochs=None loops forever; epochs=N stops with StopIteration after N passes (the last batch
    may have fewer than B rows). Ranks stop at different batches: the caller must agree when to stop.
    """

    def __init__(self, source, tokenizer, batch_size: int, seq_len: int, rt, mode: str = "pack",
                 overflow: str = "shorten", epochs: int | None = None, buffer_size: int = 100,
                 train_all_tokens: bool = False):
        from chibichat.render import OVERFLOW_POLICIES, RenderStats, render_conversation

        if mode not in CONVERSATION_MODES:
            raise ChibiError(f"conversation loader mode {mode!r} is not one of {CONVERSATION_MODES}")
        if overflow not in OVERFLOW_POLICIES:
            raise ChibiError(f"overflow policy {overflow!r} is not one of {OVERFLOW_POLICIES}")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.buffer_size = _check_int("buffer_size", buffer_size, 1)
        self.epochs = None if epochs is None else _check_int("epochs", epochs, 1)
        self.rank, self.world_size = _check_rank(rt)
        self.mode, self.overflow, self.train_all_tokens = mode, overflow, bool(train_all_tokens)
        self.tokenizer, self.source = tokenizer, source
        self.row_len = seq_len + 1
        self._render_fn, self._stats_cls = render_conversation, RenderStats
        try:
            n = len(source)
            source.__getitem__
        except (TypeError, AttributeError):
            raise ChibiError(
                f"conversation source must support len() and indexing (a Mixture or a list of "
                f"(task_name, conversation)), got {type(source).__name__}"
            ) from None
        if n == 0:
            raise ChibiError("conversation source is empty; check the task mixture")
        self._positions = range(self.rank, n, self.world_size)
        if len(self._positions) == 0:
            raise ChibiError(
                f"conversation source has {n} items but {self.world_size} ranks, so rank {self.rank} gets none; "
                f"run with at most {n} ranks"
            )
        self._fingerprint = {
            "items": n,
            "mode": mode,
            "seq_len": seq_len,
            "overflow": overflow,
            "train_all_tokens": self.train_all_tokens,
            "buffer_size": buffer_size if mode == "pack" else None,
            "tokenizer": getattr(tokenizer, "hash", None),
            "rank": self.rank,
            "world_size": self.world_size,
        }
        self._data_digest = None  # see _data_fingerprint
        self._reset()

    def _data_fingerprint(self) -> str:
        """SHA-256 over every conversation this rank reads (task name and contents, in order), so that a resume
        on edited, added, removed or reordered data is refused. Computed once, at the first save or load: a run
        that never checkpoints does not read its data twice."""
        if self._data_digest is None:
            h = hashlib.sha256()
            for i in self._positions:
                h.update(json.dumps(self.source[i], sort_keys=True, ensure_ascii=False, default=repr).encode("utf-8"))
                h.update(b"\n")  # JSON text holds no raw newline: items never run together
            self._data_digest = h.hexdigest()[:16]
        return self._data_digest

    def _reset(self) -> None:
        self._epoch = 0
        self._next = 0  # index into this rank's positions of the next item to render (== len: epoch done)
        self._buffer = _BestFitBuffer()  # pack mode
        self._cur = None  # stream mode: (ref, ids, mask) of the conversation being cut into rows
        self._cur_off = 0  # ... and how many of its tokens are consumed
        self.render_stats = self._stats_cls()
        self._counters = dict.fromkeys(
            ("conversations", "rows", "tokens", "targets", "pad_tokens", "rows_without_targets"), 0
        )

    # -- reading ---------------------------------------------------------------------------------

    def _render(self, k: int):
        """Render this rank's k-th item: (task, ids, mask, status), with the loss mask already applied."""
        i = self._positions[k]
        item = self.source[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ChibiError(f"conversation source item {i} must be a (task_name, conversation) pair, got {item!r:.80}")
        task, conv = item
        try:
            r = self._render_fn(self.tokenizer, conv, self.row_len, self.overflow)
        except ChibiError as e:
            raise ChibiError(f"conversation {i} (task {task!r}): {e}") from None
        if len(r.ids) != len(r.mask) or len(r.ids) > self.row_len:
            raise ChibiError(
                f"conversation {i} (task {task!r}) rendered to {len(r.ids)} ids / {len(r.mask)} mask values for rows "
                f"of {self.row_len}: the renderer broke its max_len contract"
            )
        mask = [1] * len(r.ids) if self.train_all_tokens else r.mask
        return task, r.ids, mask, r.status

    def _fetch(self):
        """The next conversation that was not dropped, as (ref, ids, mask); None after the last epoch."""
        dropped_in_a_row = 0
        while True:
            if self._next == len(self._positions):
                if self.epochs is not None and self._epoch + 1 >= self.epochs:
                    return None
                self._epoch, self._next = self._epoch + 1, 0
            ref = (self._epoch, self._next)
            self._next += 1
            task, ids, mask, status = self._render(ref[1])
            if ref[0] == 0:  # count each conversation once: the counts describe the data, not the epochs
                self.render_stats.add(task, status)
            if status != "dropped":
                return ref, ids, mask
            dropped_in_a_row += 1
            if dropped_in_a_row >= len(self._positions):
                # under "shorten" a conversation is dropped only when its final exchange alone is too long
                fix = ("use a longer seq_len or overflow='shorten'" if self.overflow == "drop" else
                       "even their final exchange alone does not fit (overflow='shorten' keeps it whole); use a "
                       "longer seq_len or shorter conversations")
                raise ChibiError(
                    f"all {len(self._positions)} conversations of rank {self.rank} are longer than the rows of "
                    f"{self.row_len} tokens and were dropped; {fix}"
                )

    def _pad(self, ids: list[int], mask: list[int]):
        pad = self.row_len - len(ids)
        self._counters["pad_tokens"] += pad
        return ids + [self.tokenizer.bos_id] * pad, mask + [0] * pad

    def _row_pad(self):
        got = self._fetch()
        if got is None:
            return None
        self._counters["conversations"] += 1
        return self._pad(list(got[1]), list(got[2]))

    def _row_pack(self):
        ids: list[int] = []
        mask: list[int] = []
        while len(ids) < self.row_len:
            while len(self._buffer) < self.buffer_size:
                got = self._fetch()
                if got is None:
                    break
                ref, c_ids, c_mask = got
                self._buffer.add(ref, len(c_ids), (c_ids, c_mask))
            item = self._buffer.pop_best_fit(self.row_len - len(ids))
            if item is None:
                break
            ids += item[0]
            mask += item[1]
            self._counters["conversations"] += 1
        return self._pad(ids, mask) if ids else None

    def _row_stream(self):
        ids: list[int] = []
        mask: list[int] = []
        while len(ids) < self.row_len:
            if self._cur is None or self._cur_off == len(self._cur[1]):
                got = self._fetch()
                if got is None:
                    break
                self._cur, self._cur_off = got, 0
                self._counters["conversations"] += 1
            _, c_ids, c_mask = self._cur
            end = min(len(c_ids), self._cur_off + self.row_len - len(ids))
            ids += c_ids[self._cur_off : end]
            mask += c_mask[self._cur_off : end]
            self._cur_off = end
        if len(ids) == self.row_len:
            self._cur_off -= 1  # the row's last token is the next row's first input
        elif len(ids) <= 1:  # the end of the data; a lone carried-over token has nothing to predict
            return None
        return self._pad(ids, mask)

    # -- iteration -------------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self):
        import torch

        next_row = {"pad": self._row_pad, "pack": self._row_pack, "stream": self._row_stream}[self.mode]
        rows_ids, rows_mask = [], []
        while len(rows_ids) < self.batch_size:
            row = next_row()
            if row is None:
                break
            ids, mask = row
            n_targets = sum(mask) - mask[0]
            if n_targets == 0:
                self._counters["rows_without_targets"] += 1
                continue
            self._counters["targets"] += n_targets
            rows_ids.append(ids)
            rows_mask.append(mask)
        if not rows_ids:
            raise StopIteration
        self._counters["rows"] += len(rows_ids)
        self._counters["tokens"] += len(rows_ids) * self.seq_len
        x = torch.tensor(rows_ids, dtype=torch.long)
        m = torch.tensor(rows_mask, dtype=torch.bool)
        targets = torch.where(m[:, 1:], x[:, 1:], torch.full_like(x[:, 1:], -1))
        return x[:, :-1].contiguous(), targets

    @property
    def stats(self) -> dict:
        """Counters of this rank. `progress` is the read cursor's share of the planned epochs (None when
        looping forever); in pack mode the cursor runs up to buffer_size conversations ahead."""
        n = len(self._positions)
        at = self._epoch + self._next / n
        return {
            "epoch": self._epoch,
            **self._counters,
            "progress": min(1.0, at / self.epochs) if self.epochs else None,
            "render": self.render_stats.as_dict(),
        }

    # -- exact resume ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        stream = None
        if self._cur is not None:
            (e, k), ids, _ = self._cur
            stream = [e, k, len(ids), self._cur_off]
        return {
            "kind": "conversation",
            "version": STATE_VERSION,
            "fingerprint": {**self._fingerprint, "data": self._data_fingerprint()},
            "epoch": self._epoch,
            "next": self._next,
            # [epoch, item index on this rank, length]; conversations are re-rendered on load
            "buffer": [[*ref, length] for ref, length in self._buffer.refs()],
            "stream": stream,
            "counters": dict(self._counters),
            "render_counts": self.render_stats.as_dict(),
        }

    def _rerender(self, e: int, k: int, n: int):
        if not 0 <= k < len(self._positions):
            raise ChibiError("conversation loader state points past this rank's items; the data changed, start fresh")
        task, ids, mask, status = self._render(k)
        if status == "dropped" or len(ids) != n:
            raise ChibiError(
                f"conversation loader state: item {self._positions[k]} (task {task!r}) now renders to {len(ids)} "
                f"tokens ({status}), saved {n}; the data or tokenizer changed since the checkpoint, start fresh"
            )
        return (e, k), ids, mask

    def load_state_dict(self, d: dict) -> None:
        _check_state(d, "conversation", {**self._fingerprint, "data": self._data_fingerprint()})
        try:
            epoch, nxt = int(d["epoch"]), int(d["next"])
            refs = [(int(e), int(k), int(n)) for e, k, n in d["buffer"]]
            stream = None if d["stream"] is None else [int(v) for v in d["stream"]]
            counters = {k: int(d["counters"][k]) for k in self._counters}
            render_counts = {
                str(task): {s: int(c[s]) for s in ("ok", "shortened", "dropped")} for task, c in d["render_counts"].items()
            }
            if stream is not None and len(stream) != 4:
                raise ValueError(f"stream cursor {stream}")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _corrupt_state("conversation", e) from None
        if not 0 <= nxt <= len(self._positions):
            raise ChibiError("conversation loader state points past this rank's items; the data changed, start fresh")
        buffer = _BestFitBuffer()
        for e, k, n in refs:
            ref, ids, mask = self._rerender(e, k, n)
            buffer.add(ref, n, (ids, mask))
        cur, off = None, 0
        if stream is not None:
            e, k, n, off = stream
            cur = self._rerender(e, k, n)
            if not 0 <= off <= n:
                raise ChibiError("conversation loader state has a stream offset outside its conversation; start fresh")
        self._epoch, self._next, self._buffer, self._cur, self._cur_off = epoch, nxt, buffer, cur, off
        self._counters = counters
        self.render_stats = self._stats_cls(counts=render_counts)
