"""Keeping evaluation data out of training: by the task's own flag, and by content.

Two checks, both run by every training stage that takes task names (midtrain/SFT `--mix`, `rl --task`):

1. `refuse_eval_only(names, flag)` while the arguments are checked, before any model, tokenizer or
   data is loaded: a name whose registry spec says `eval_only` (what the built task's own flag is under
   the default options, the only ones a flag can name) is refused. `refuse_eval_only_task` repeats the
   check on the built task's own `eval_only`.
2. `check_disjoint(train_tasks, eval_tasks)` where the training data is assembled: no training item may
   have the prompt of an evaluation item. Items are compared by `prompt_key`, a SHA-256 of the
   normalised prompt text (the user turns of a chat item, the context of a CORE item; Unicode NFKC,
   case-folded, whitespace runs collapsed to one space), never by task name, so a differently named
   copy of an evaluation set, or `rl --task X --eval-task X`, is caught as well.
   `reported_eval_sets(home)` lists what the chat evaluations report against: the ChatCORE tasks as
   `eval chat` builds them by default (the shipped subsets), the full online test sets (`eval chat --test-sets
   online`) and the JGLUE dev sets already downloaded into the home, and the held-out splits of the generated
   tasks it can score. Downloads are never started here: a recipe that scores the online test sets downloads
   them before training (`chibichat data tasks`, the GPU presets' first steps), so training is checked
   against them.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Iterable, Sequence

from chibichat.common import ChibiError

_SPACE = re.compile(r"\s+")


def refuse_eval_only(names: Iterable[str], flag: str) -> None:
    """ChibiError for the first unknown or evaluation-only task name given to a training flag. The user's
    own files (`file:PATH`) are training data by definition; their items still meet `check_disjoint`."""
    from chibichat.tasks.local import is_file_task
    from chibichat.tasks.registry import get_spec, specs

    table = specs()
    for name in names:
        if is_file_task(name):
            continue
        spec = get_spec(name)
        if spec.eval_only:
            alt = f"{name}-train"
            hint = f" (its training split is {alt!r})" if alt in table else ""
            raise ChibiError(f"{flag} names {name!r}, an evaluation-only task ({spec.description}); training on "
                             f"it would contaminate the scores reported on it. Remove it from {flag}{hint}")


def refuse_eval_only_task(task, flag: str) -> None:
    """The same refusal by a built task's own `eval_only` flag (it may depend on options)."""
    if getattr(task, "eval_only", False):
        raise ChibiError(f"{flag} names {task.name!r}, an evaluation-only task ({task.description or task.kind}); "
                         f"training on it would contaminate the scores reported on it. Remove it from {flag}")


def prompt_text(item: dict) -> str:
    """The text an item asks: its user turns (joined by newlines) or, for a CORE item, its context."""
    messages = item.get("messages")
    if messages:
        parts = []
        for m in messages:
            if m.get("role") != "user":
                continue
            c = m.get("content")
            parts.append(c if isinstance(c, str) else " ".join(str(p.get("text", "")) for p in c or ()))
        return "\n".join(parts)
    if "context" in item:
        return str(item["context"])
    if "contexts" in item:
        return "\n".join(map(str, item["contexts"]))
    raise ChibiError(f"an item with fields {sorted(item)} has neither messages nor a context to compare")


def normalise(text: str) -> str:
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def prompt_key(item: dict) -> str:
    return hashlib.sha256(normalise(prompt_text(item)).encode("utf-8")).hexdigest()


def find_overlaps(train_tasks: Sequence, eval_tasks: Sequence) -> dict[tuple[int, str], list[tuple[int, str]]]:
    """{(position of the training task in `train_tasks`, evaluation set name): [(item index, prompt text)]}
    for every training item whose prompt key equals an evaluation item's (empty when disjoint)."""
    seen: dict[str, str] = {}
    for ev in eval_tasks:
        for i in range(len(ev)):
            seen.setdefault(prompt_key(ev[i]), ev.name)
    shared: dict[tuple[int, str], list[tuple[int, str]]] = {}
    if not seen:
        return shared
    for k, tr in enumerate(train_tasks):
        for i in range(len(tr)):
            item = tr[i]
            hit = seen.get(prompt_key(item))
            if hit is not None:
                shared.setdefault((k, hit), []).append((i, prompt_text(item)))
    return shared


def drop_overlaps(train_tasks: Sequence, eval_tasks: Sequence) -> tuple[list, dict[str, dict[str, int]]]:
    """(the training tasks without their items that share a prompt with an evaluation item, {training task:
    {evaluation set: items dropped}}). A task with no such item is returned as it was; one left with no
    item at all is an error naming it (nothing of it would train)."""
    from chibichat.tasks.base import TaskView

    shared = find_overlaps(train_tasks, eval_tasks)
    bad: dict[int, set[int]] = {}
    report: dict[str, dict[str, int]] = {}
    for (k, ev_name), rows in shared.items():
        bad.setdefault(k, set()).update(i for i, _ in rows)
        per = report.setdefault(train_tasks[k].name, {})
        per[ev_name] = per.get(ev_name, 0) + len(rows)
    out = []
    for k, tr in enumerate(train_tasks):
        if k not in bad:
            out.append(tr)
            continue
        keep = [i for i in range(len(tr)) if i not in bad[k]]
        if not keep:
            raise ChibiError(f"every item of training task {tr.name!r} shares its prompt with an evaluation set "
                             f"({', '.join(sorted(report[tr.name]))}); remove it from --mix")
        out.append(TaskView(tr, keep))
    return out, report


def check_disjoint(train_tasks: Sequence, eval_tasks: Sequence, fix: str) -> None:
    """ChibiError if any training item's prompt key equals an evaluation item's; the message names the
    pair of tasks, how many items they share, one example, and `fix` (what the user should change)."""
    shared = {(train_tasks[k].name, ev): rows for (k, ev), rows in find_overlaps(train_tasks, eval_tasks).items()}
    if shared:
        (tr_name, ev_name), rows = next(iter(shared.items()))
        i, text = rows[0]
        snippet = normalise(text)[:80]
        others = "" if len(shared) == 1 else f" ({len(shared) - 1} other pair(s) of tasks overlap too)"
        raise ChibiError(
            f"training task {tr_name!r} shares {len(rows)} item(s) with evaluation set {ev_name!r} (same prompt "
            f"after NFKC, case folding and whitespace collapsing; e.g. its item {i}: {snippet!r}){others}; training "
            f"on them would inflate {ev_name}'s score. {fix}")


def reported_eval_sets(home=None, generated: Iterable[str] = ()) -> list:
    """The evaluation sets the chat evaluations report against: the ChatCORE tasks as `eval chat` builds
    them by default, the test splits of the named generated tasks that it can score (not conversation-only
    ones such as identity, whose few questions recur in both splits by design), and the full online test sets
    and JGLUE dev sets present in `home` (never downloaded here)."""
    from chibichat.tasks.evalsets import CHATCORE_TASKS, cached_online_test_sets
    from chibichat.tasks.registry import eval_task, get_task

    out = [eval_task(n) for n in CHATCORE_TASKS]
    if home is not None:
        out += [eval_task(n, home, "online") for n in cached_online_test_sets(home)]
    have = {t.name for t in out}
    for name in generated:
        if name not in have:
            test = get_task(name, split="test")
            if test.kind in ("categorical", "generative"):  # what `eval chat` can score
                out.append(test)
            have.add(name)
    if home is not None:
        from chibichat.tasks.jglue import TASKS, jglue_dir, jglue_task, relative_path

        for t in TASKS:
            if (jglue_dir(home) / relative_path(t, "valid")).exists():
                out.append(jglue_task(t, home, "valid"))
    return out
