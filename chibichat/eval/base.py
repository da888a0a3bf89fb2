"""Base-model evaluation: val bpb on a fixed slice of a corpus's val split, and greedy samples.

Used by `chibichat pretrain` (periodic eval and samples) and `chibichat eval base` (a saved
checkpoint), so both report the same number for the same model and settings.

The val slice is fixed: a fresh PretrainLoader over the val split, read from its start as one
reader, the first `steps` micro-batches. Its packing settings (seq_len, rows, split_long_docs) come
from the caller. The loader reads one pass (epochs=1): a val split whose documents run out before
the slice is packed is an error rather than rows repeated from a second pass over the same text,
and a split that holds enough is never refused for what the loader merely read ahead. The slice
does not depend on the number of ranks: under torchrun rank r scores micro-batches r, r+W, r+2W,
... of it, and evaluate_bpb puts the per-micro-batch sums back in slice order, so W ranks report
exactly the number one process does.
"""

from __future__ import annotations

import dataclasses

import torch

from chibichat.common import ChibiError, Runtime
from chibichat.eval.bpb import evaluate_bpb

# Fixed prompts (nanochat-style factual/arithmetic probes), per corpus language.
SAMPLE_PROMPTS = {
    "en": ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
           "The opposite of hot is", "The planets of the solar system are:", "My favorite color is",
           "If 5*x + 3 = 13, then x is"],
    "ja": ["日本の首都は", "富士山の高さは", "昨日が金曜日なら、明日は", "暑いの反対は", "太陽系の惑星は", "私の好きな色は",
           "5*x + 3 = 13 ならば x は"],
}
# The val loader's best-fit buffer: part of the slice's definition (another size packs other rows and
# changes every val bpb), kept at one document group.
VAL_BUFFER_DOCS = 16


def eval_steps(eval_tokens: int, device_batch: int, seq_len: int) -> int:
    """Micro-batches of the val slice that cover `eval_tokens` (rounded down to whole micro-batches),
    all ranks together: the slice is the same for any number of ranks."""
    unit = device_batch * seq_len
    if eval_tokens < unit:
        raise ChibiError(f"--eval-tokens {eval_tokens} is less than one val micro-batch ({device_batch} rows x "
                         f"{seq_len} tokens = {unit}); raise it or lower --device-batch")
    return eval_tokens // unit


def val_batches(corpus, home, tokenizer, rt: Runtime, device_batch: int, seq_len: int, steps: int,
                split_long_docs: bool) -> list:
    """This rank's share of the fixed val slice of `steps` micro-batches: CPU (inputs, targets) batches
    r, r+W, r+2W, ... of it for rank r of W (the order evaluate_bpb expects). Every rank packs the
    whole slice as a single reader would, so the slice is the same for any W."""
    from chibichat.data.loader import PretrainLoader

    one_reader = dataclasses.replace(rt, rank=0, local_rank=0, world_size=1)
    loader = PretrainLoader(corpus, "val", home, tokenizer, device_batch, seq_len, one_reader,
                            buffer_docs=VAL_BUFFER_DOCS, split_long_docs=split_long_docs, epochs=1)
    out = []
    for i in range(steps):
        try:
            batch = next(loader)
        except StopIteration:
            raise ChibiError(f"the val split of {corpus.name} ran out after about {loader.stats['tokens_served']:,} "
                             f"tokens, short of the {steps * device_batch * seq_len:,} asked for; lower --eval-tokens "
                             f"(or use a corpus with a larger val split)") from None
        if i % rt.world_size == rt.rank:
            out.append(batch)
    return out


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_tokens: int) -> str:
    """Greedy continuation of one prompt, BOS-prefixed, never past the model's context."""
    cfg = model.config
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    if len(ids) >= cfg.seq_len:
        raise ChibiError(f"sample prompt of {len(ids)} tokens does not fit the context ({cfg.seq_len})")
    budget = min(max_tokens, cfg.seq_len - len(ids))
    device = next(model.parameters()).device
    state = model.new_state(1, len(ids) + budget)
    logits = model(torch.tensor([ids], device=device), state=state)[:, -1]
    out: list[int] = []
    for _ in range(budget):
        nxt = int(logits.argmax(-1))
        if nxt == tokenizer.bos_id:
            break
        out.append(nxt)
        logits = model(torch.tensor([[nxt]], device=device), state=state)[:, -1]
    return prompt + tokenizer.decode(out)


def samples(model, tokenizer, lang: str, max_tokens: int) -> list[str]:
    prompts = SAMPLE_PROMPTS["ja" if lang == "ja" else "en"]
    return [greedy(model, tokenizer, p, max_tokens) for p in prompts]


def evaluate_base(model, tokenizer, batches: list, rt: Runtime) -> dict:
    """val bpb/loss of `model` on precomputed val batches (see val_batches)."""
    return evaluate_bpb(model, batches, tokenizer.token_bytes(), rt)
