"""`chibichat speedrun`: one command, start to finish.

tokenizer -> pretrain -> base eval -> midtrain -> chat + skills evals -> SFT -> chat + skills evals -> RL ->
chat + skills evals -> report, then it tells the user how to talk to the model. `--minutes M` splits a
wall-clock budget over the four training stages (budget_flags), each taking its share of what the stages
before it left (carried_minutes).

Each step runs as its own `python -m chibichat <stage> ...` process (under torchrun when several GPUs are
visible; forked from this process where that is safe, run_step), so a crash or Ctrl-C in one stage cannot
corrupt the orchestrator's view, and every step is exactly what a user could type by hand (they are printed
before they run).

Resumability comes from the artifacts: a step is done when its completion marker exists (each stage writes
its summary.json atomically and last). A training step that was interrupted has checkpoints but no summary, so
it is re-run with --resume; where the stage refuses that resume (another --dtype, --fp8 or process count would
make it another run: train/loop.py), the error names the --force that restarts it. `--force STAGE` deletes that
step's outputs and redoes it, and with it every step that reads what it wrote (Step.needs, transitively: forcing
`rl` redoes RL's evaluations too, which would otherwise describe the model it replaced); all of them are deleted
before anything runs, so a forced step that fails leaves none of the old outputs after it to be skipped as done
by the next run.

A finished step is skipped only when it ran with the flags this command gives it: report/speedrun-steps.json
records each step's flags (step_flags) with the sha256 of the marker they produced, and a step whose recorded
flags differ (another --dtype, --fp8, --minutes, --device, --no-budget, ...) is refused up front, naming the
flags and the --force that redoes it (and, for a stage flag the speedrun derives, the speedrun option that
sets it: derived_flag_hints). A marker the record does not describe (the stage was run by hand, or
by a speedrun before the record existed) is reused with a note that its flags were not checked.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from chibichat.common import (DTYPE_CHOICES, ChibiError, Home, add_fp8_arg, add_home_arg, add_memory_args,
                              atomic_write_json, check_home, cpu_has_fast_bf16, read_json, sha256_file)
from chibichat.sandbox import add_allow_weak_arg, check_sandbox
from chibichat.stages.midtrain import MID_MIX_JA
from chibichat.stages.sft import SFT_MIX_JA
from chibichat.tasks.registry import CPU_RL_TASKS


# The training stages that take --compile (fixed-shape training batches); RL's sampled batches vary in length.
COMPILABLE = ("pretrain", "midtrain", "sft")


@dataclass(frozen=True)
class Preset:
    """Everything that differs between hardware classes. Flags are passed verbatim to the stages."""

    name: str
    description: str
    expected_minutes: float
    depth: int
    tokenizer: list[str]
    pretrain: list[str]
    eval_base: list[str]
    midtrain: list[str]
    sft: list[str]
    rl: list[str]
    eval_chat: list[str]
    gpu: bool = False
    eval_skills: tuple = ()  # flags of `eval skills`, run after every chat stage's eval
    online: bool = False
    rl_task: tuple[str, str] = CPU_RL_TASKS  # RL's --task (en, ja) on the CPU presets (tasks/registry.py)
    tokenizer_ja: list[str] | None = None  # the tokenizer's flags for --lang ja, where they differ from `tokenizer`
    # (midtraining, SFT) --mix for --lang ja, where it differs from the stages' default for a Japanese
    # tokenizer (the English tasks and the Japanese ones)
    chat_mix_ja: tuple[str, str] | None = None
    # (midtraining, SFT) --lr-frac for --lang ja, where it differs from the stages' defaults (1.0, 0.5); each
    # multiplies its source's rates
    chat_lr_ja: tuple[float, float] | None = None
    # The training stages together (start-ups included) take about this long, whatever the CPU: the step
    # counts above are what a fast CPU finishes in it, and a slower one stops each stage earlier
    # (budget_flags, headroom 1; carried_minutes).
    max_minutes: float | None = None
    # How a time budget (max_minutes or --minutes) splits over the training stages, by stage name; None:
    # by the steps' default weights (their share of the expected time).
    minute_shares: dict | None = None
    # Prefix of the checkpoint tag (d<depth>[-layers]), so two CPU presets of the same depth never share
    # checkpoints in one home (the tokenizer, sized the same, is shared).
    tag_prefix: str = ""
    # The training stages whose forward is torch.compiled unless the speedrun says --no-compile (compile_stages):
    # those long enough for faster steps to repay the compile (~20-35 s cold on 2 CPU cores, a few seconds from a
    # warm inductor cache; an averaged run after the first reuses the first one's graph).
    compiled: tuple[str, ...] = ()
    # The depth a CPU preset trains where its stages compute in fp32 (a CPU without native bf16 kernels, or
    # --dtype float32): there a step is several times slower and a smaller model learns more in the same
    # minutes (for_machine). None: `depth` everywhere.
    depth_fp32: int | None = None
    # The English tokenizer's flags there (for_machine); None: `tokenizer` everywhere.
    tokenizer_fp32: list[str] | None = None


@dataclass(frozen=True)
class GpuRecipe:
    """The sizes of one GPU preset; every other flag of the recipe is the same for all depths."""

    depth: int
    vocab: int
    total_batch: int  # pretraining tokens per optimizer step, the same on any number of GPUs
    description: str


# nanochat's batches by depth: 2^19 tokens for d10-16, 2^20 for d18-26 (the Power Lines rule in
# train/scaling.py gives the same). Shard counts follow from the horizon (recipe_figures).
GPU_RECIPES = {
    "d12": GpuRecipe(12, 32768, 2 ** 19, "d12, 32K vocab: the one-GPU run (fits a 24 GB card)"),
    "d20": GpuRecipe(20, 65536, 2 ** 20, "d20, the $100 nanochat-class run on 8xH100"),
    "d26": GpuRecipe(26, 65536, 2 ** 20, "d26, GPT-2-class CORE on 8xH100"),
}

# ----------------------------------------------------------------------------------------------
# The GPU recipe: every stage's data and length, and what it costs

# Online task data, downloaded before training (tasks/online.py, tasks/evalsets.py): first the full test sets
# the chat evaluations score (`eval chat --test-sets online`; present before training, so every training stage
# checks its data disjoint from them), then the training sets.
ONLINE_TEST_SETS = ("arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval")  # = evalsets.ONLINE_TEST_SETS
ONLINE_TASKS = (*ONLINE_TEST_SETS, "smoltalk", "mmlu-aux", "gsm8k-train", "arc-easy-train", "arc-challenge-train")
# Midtraining, one pass over nanochat's mixture: SmolTalk ~460K chats, MMLU auxiliary-train ~100K, GSM8K train
# with its calculator annotations as tool calls, identity; spelling and letter counting are our generated sets
# of 2,000 items (nanochat's 200K + 80K spelling rows would repeat them 40-100 times, so 5 passes each).
MID_MIX = {"en": "smoltalk=1,mmlu-aux=1,gsm8k-train=1,identity=2,spelling=5,letter-count=5",
           # No Japanese instruction corpus has a loader here (llm-jp/magpie-sft-v1.0, Ego/jpflan and
           # izumi-lab/llm-japanese-dataset exist online): the Japanese chat data are the shipped and generated
           # sets, next to the English online ones the Japanese tokenizer also covers.
           "ja": "smoltalk=1,mmlu-aux=1,gsm8k-train=1,chatterbot-ja=2,identity-ja=2,arithmetic-ja=2,"
                 "arithmetic-multi-ja=1,spelling-ja=5,letter-count-ja=5"}
# SFT, nanochat's older recipe: ARC-Easy/Challenge train, GSM8K train, SmolTalk's first ~10K chats
# (0.022 of an epoch), identity, a few hundred spelling items.
SFT_MIX = {"en": "arc-easy-train=1,arc-challenge-train=1,gsm8k-train=1,smoltalk=0.022,identity=1,spelling=0.15,"
                 "letter-count=0.15",
           "ja": "arc-easy-train=1,arc-challenge-train=1,gsm8k-train=1,smoltalk=0.022,chatterbot-ja=1,identity-ja=1,"
                 "arithmetic-ja=0.5,spelling-ja=0.15,letter-count-ja=0.15"}
# Counted for the estimate: mean tokens per conversation and rows per pass (nanochat's mixture sizes).
MID_ROWS, SFT_ROWS, CONV_TOKENS = 848_000, 23_000, 450
RECIPE_GPUS = 8  # the per-step batches below are for 8 GPUs; fewer GPUs accumulate gradients to the same batch
CHAT_ROWS = 32  # rows of 2,048 tokens per GPU per micro-batch in midtraining (x 8 GPUs = 524,288 tokens)
SFT_CONVS = 4  # padded conversations per GPU per micro-batch in SFT (x 8 = 32 per step)
RL_PROMPTS = 2  # GSM8K questions per GPU per micro-batch in RL (x 8 = 16 per step, 16 samples each)
CHARS_PER_TOKEN = {"en": 4.8, "ja": 1.6}  # assumed for a 32-65K BPE vocabulary on that corpus
CHARS_PER_SHARD = {"en": 250e6, "ja": 250e6}  # FineWeb-EDU reshard: ~250M; ABEJA-CC-JA-edu assumed alike
SCALES = ("full", "toy")
# What the Japanese GPU presets lack next to the English recipe (printed with the plan).
JA_MISSING = (
    "  Japanese presets: what is missing next to the English recipe:",
    "  - chat data: no Japanese instruction corpus has a loader (llm-jp/magpie-sft-v1.0, Ego/jpflan exist online);"
    " midtraining and SFT use the English online sets plus the shipped and generated Japanese ones",
    "  - RL: no Japanese verifiable-reward set; RL trains on GSM8K train (English)",
    "  - chat evaluation: no Japanese full test set; eval chat scores the English full test sets and the generated"
    " Japanese test splits (spelling-ja, arithmetic-ja, letter-count-ja)",
    "  - base evaluation: CORE is the English DCLM bundle; JGLUE (JCommonsenseQA, JNLI, JSTS, JSQuAD dev sets) is"
    " not in the plan: after it, run `chibichat eval jglue --from rl --jglue-dir DIR` on JGLUE's dev files",
)


@dataclass(frozen=True)
class HardwareClass:
    name: str
    gpus: int
    peak_bf16: float  # dense bf16 FLOP/s of one GPU (datasheet)
    mfu: float  # assumed model FLOP utilisation of the training FLOPs
    usd_per_gpu_hour: float  # assumed rental price
    memory_gb: int


HARDWARE = (
    HardwareClass("8xH100", 8, 989e12, 0.40, 3.00, 80),
    HardwareClass("1xH100", 1, 989e12, 0.40, 3.00, 80),
    HardwareClass("1x24GB (RTX 4090)", 1, 165e12, 0.30, 0.50, 24),
)


@dataclass
class RecipeFigures:
    """The sizes a GPU preset derives from its model: computed from the model's own FLOP count."""

    params: int
    scaling_params: int
    flops_per_token: float  # 6 x matmul params + attention (GPT.flops_per_token)
    pretrain_tokens: int
    pretrain_steps: int
    shards: int
    mid_steps: int
    sft_steps: int
    rl_steps: int
    stage_flops: dict  # stage -> FLOPs

    @property
    def total_flops(self) -> float:
        return sum(self.stage_flops.values())


def recipe_figures(recipe: GpuRecipe, lang: str, layers: str) -> RecipeFigures:
    """Params, horizon and FLOPs of a GPU preset. The model is built on the meta device (no memory), so
    the count is the one training reports, SLC2 layers included."""
    import torch

    from chibichat.model.gpt import GPT, GPTConfig, layer_pattern
    from chibichat.train.scaling import Overrides, derive_plan, derive_shape

    o = Overrides(total_batch=recipe.total_batch, device_batch=1)
    shape = derive_shape(recipe.depth, o)
    pattern = layer_pattern(layers, recipe.depth)
    cfg = GPTConfig(vocab_size=recipe.vocab, seq_len=shape.seq_len, n_layer=recipe.depth, n_embd=shape.width,
                    n_head=shape.heads, n_kv_head=shape.kv_heads, layers=pattern, windows=[0] * recipe.depth)
    with torch.device("meta"):
        model = GPT(cfg)
    groups = model.param_groups()
    scaling = sum(p.numel() for g in ("matrix", "head", "other") for p in groups[g])
    plan = derive_plan(shape, o, vocab_size=recipe.vocab, scaling_params=scaling, device_type="cuda", world_size=1)
    fpt = model.flops_per_token()
    tokens = plan.num_steps * plan.total_batch
    shards = math.ceil(1.1 * tokens * CHARS_PER_TOKEN[lang] / CHARS_PER_SHARD[lang])
    seq = shape.seq_len
    mid_steps = math.ceil(MID_ROWS * CONV_TOKENS / (CHAT_ROWS * RECIPE_GPUS * seq))
    sft_steps = math.ceil(SFT_ROWS / (SFT_CONVS * RECIPE_GPUS))
    rl_steps = 7473 // (RL_PROMPTS * RECIPE_GPUS)  # one pass over GSM8K train
    # RL: each step samples 16 x 16 completions of <= 256 tokens after a ~200-token prompt (a forward pass,
    # 2 FLOPs per param-token, charged at the full prompt+completion length) and trains on them (6 per token).
    rl_tokens = rl_steps * RL_PROMPTS * RECIPE_GPUS * 16 * (200 + 256)
    stage_flops = {
        "pretrain": fpt * tokens,
        "midtrain": fpt * mid_steps * CHAT_ROWS * RECIPE_GPUS * seq,
        "sft": fpt * sft_steps * SFT_CONVS * RECIPE_GPUS * seq,  # padded rows: the pad tokens are computed too
        "rl": fpt * rl_tokens * (1 + 2 / 6),
    }
    return RecipeFigures(model.num_params(), scaling, fpt, tokens, plan.num_steps, shards, mid_steps, sft_steps,
                         rl_steps, stage_flops)


def estimate_lines(fig: RecipeFigures) -> list[str]:
    """Expected training time and cost per hardware class: FLOPs / (GPUs x bf16 peak x assumed MFU).
    Evaluation and data loading are not counted (a few percent of a full run)."""
    out = [f"  model: {fig.params:,} params ({fig.scaling_params:,} scaling), {fig.flops_per_token:.3e} FLOPs/token "
           f"(6 x matmul params + attention); pretraining {fig.pretrain_tokens / 1e9:.2f}B tokens in "
           f"{fig.pretrain_steps:,} steps",
           "  training FLOPs: " + ", ".join(f"{k} {v:.2e}" for k, v in fig.stage_flops.items())
           + f"; total {fig.total_flops:.2e}"]
    for hw in HARDWARE:
        hours = fig.total_flops / (hw.gpus * hw.peak_bf16 * hw.mfu) / 3600
        out.append(f"  {hw.name:<18} ~{hours:,.1f} h, ~${hours * hw.gpus * hw.usd_per_gpu_hour:,.0f}  "
                   f"[{hw.gpus} x {hw.peak_bf16 / 1e12:.0f} TFLOP/s bf16 peak x {hw.mfu:.0%} assumed MFU, "
                   f"${hw.usd_per_gpu_hour:.2f}/GPU-hour assumed]")
    return out


# Toy scale: the flags whose values are sizes, and the values that shrink a GPU preset to seconds on CPU.
# Only these are rewritten (or, for a size whose full value is "everything", added); stages, tasks,
# mixtures and every other flag stay as in the full recipe.
TOY_SIZES = {
    "data download": {"-n": "1"},
    "tokenizer train": {"--vocab-size": "512", "--max-chars": "200000"},
    # a 512-token context so GSM8K and chat prompts fit at a 512-token vocabulary (~2 chars per token)
    "pretrain": {"--depth": "2", "--seq-len": "512", "--total-batch": "1024", "--num-steps": "2", "--eval-every": "2",
                 "--eval-tokens": "1024", "--save-every": "2", "--sample-every": "0"},
    "eval base": {"--eval-tokens": "1024"},  # --core-items stays 0: every item of the (stand-in) bundle
    "midtrain": {"--num-steps": "2", "--device-batch-size": "2", "--grad-accum": "1", "--eval-every": "2",
                 "--val-batches": "1", "--val-items": "4", "--save-every": "2"},
    "sft": {"--num-steps": "2", "--device-batch-size": "2", "--grad-accum": "1", "--eval-every": "2",
            "--val-batches": "1", "--val-items": "4", "--save-every": "2"},
    "rl": {"--num-steps": "2", "--prompts-per-step": "1", "--grad-accum": "1", "--num-samples": "4",
           "--max-new-tokens": "8", "--passk-items": "2", "--passk-k": "2", "--save-every": "0"},
    "eval chat": {"--max-new-tokens": "8", "--max-items": "2"},
    "eval skills": {"--max-new-tokens": "8", "--max-per-skill": "1"},
}


def scale_argv(argv: list[str], scale: str) -> list[str]:
    """argv with its size flags set to `scale`'s values (full: unchanged)."""
    if scale == "full":
        return list(argv)
    if scale not in SCALES:
        raise ChibiError(f"--scale {scale!r}: choose one of {', '.join(SCALES)}")
    key = " ".join(argv[:2]) if argv[0] in ("data", "tokenizer", "eval") else argv[0]
    sizes = TOY_SIZES.get(key, {})
    out = list(argv)
    for flag, value in sizes.items():
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def gpu_world(world_size: int, source: str = "the visible GPUs, CUDA_VISIBLE_DEVICES") -> int:
    """Gradient accumulation that keeps the 8-GPU batch on `world_size` GPUs (which must divide 8); `source`
    names where the count came from, for the error."""
    if world_size < 1 or RECIPE_GPUS % world_size:
        raise ChibiError(f"the GPU presets' batches are sized for 8 GPUs and accumulate gradients on fewer; "
                         f"{world_size} GPUs do not divide 8 (the count is {source}): use 1, 2, 4 or 8")
    return RECIPE_GPUS // world_size


# Presets. CPU presets use only the data the package ships; GPU presets use the real online corpora.
PRESETS: dict[str, Preset] = {
    "micro": Preset(
        name="micro",
        description="smoke run for tests/CI: every stage at toy size, ~1-2 minutes on 2 CPU cores",
        expected_minutes=2,
        depth=2,
        tokenizer=["--vocab-size", "1024", "--max-chars", "300000"],
        pretrain=["--seq-len", "128", "--device-batch", "8", "--total-batch", "1024",
                  "--num-steps", "24", "--eval-every", "12", "--eval-tokens", "4096", "--save-every", "12",
                  "--sample-every", "0"],
        eval_base=["--eval-tokens", "4096", "--core-items", "12", "--sample-tokens", "8"],
        midtrain=["--num-steps", "6", "--device-batch-size", "8", "--eval-every", "3", "--val-batches", "1", "--no-samples"],
        sft=["--num-steps", "6", "--device-batch-size", "8", "--eval-every", "3", "--val-batches", "1", "--no-samples"],
        # Letter counting: the micro model gets a sample right only now and then (its python call or a guess
        # of a small count), and RL learns only from groups where some sample scored, so the step draws many
        # groups (64 in all) to make a run where every group is flat and RL changes nothing very unlikely
        # (figures in docs/benchmarks.md). Two-step arithmetic never scored at this size.
        rl=["--num-steps", "4", "--prompts-per-step", "16", "--num-samples", "16", "--max-new-tokens", "24",
            "--train-items", "64", "--passk-items", "4"],
        eval_chat=["--max-items", "4", "--max-new-tokens", "24"],
        rl_task=("letter-count", "letter-count-ja"),
        eval_skills=("--max-new-tokens", "24", "--max-per-skill", "2"),
    ),
    "cpu": Preset(
        name="cpu",
        description="the offline default: embedded data, ~15 minutes on 2 CPU cores",
        expected_minutes=15,
        depth=4,
        # 4,096 tokens: of 2,048 / 4,096 / 8,192, the held-out skills after SFT peak here (0.56 / 0.61 / 0.52 over
        # four seeds; 8,192 has the best bpb but its rarer word tokens are no longer copied into tool calls;
        # Japanese: 0.51 at 4,096 against 0.40 at 8,192; docs/benchmarks.md, "vocabulary size").
        tokenizer=["--vocab-size", "4096", "--max-chars", "2000000"],
        # Japanese at 1,024 tokens: held-out skills JA after SFT (four runs averaged) 0.562 / 0.638 / 0.683 / 0.367 at
        # 4,096 / 2,048 / 1,024 / 512: with fewer multi-character tokens the words' characters are in the context to
        # copy (character counting 0.27 -> 0.80); at 512 even common kanji are bytes and the model falls apart
        # (docs/benchmarks.md, "Japanese vocabulary").
        tokenizer_ja=["--vocab-size", "1024", "--max-chars", "2000000"],
        # Japanese chat stages on the Japanese tasks alone: with the English tasks beside them (the stages'
        # default) half of each step went to text the model was not pretrained on, in a 1,024-token Japanese
        # vocabulary, and is not asked in; alone they scored 0.650 against 0.606 over eight seeds (identity
        # 0.62 -> 0.78, refusal 0.64 -> 0.80; docs/benchmarks.md, "Japanese chat stages without the English tasks").
        chat_mix_ja=(MID_MIX_JA, SFT_MIX_JA),
        # Japanese chat stages at lower rates (midtraining at half the base's, SFT at a quarter of its default):
        # four averaged runs per stage scored 0.730 against 0.711 over two seeds, higher on both, and read simple
        # Japanese better (simple-text bpb 2.79 against 2.90); single runs 0.662 against 0.615 over four. In
        # English the same rates cost the canned answers (identity 0.82 -> 0.73, refusal 0.93 -> 0.77, skills
        # 0.699 against 0.704 over three seeds), so English keeps the defaults (docs/benchmarks.md, sessions 34-35).
        chat_lr_ja=(0.5, 0.25),
        # The cap is about what a fast phase of the 2-core AMX machine fits in pretraining's share of the budget
        # in Japanese (4.4 min at ~0.22 s per 4,096-token step in its 1,024-token vocabulary, compiled, after a ~35 s
        # compile); English (~0.27 s per step) and iberis (0.25-0.28 s) fit ~850-900 there, and a slower machine's
        # fit stops earlier. (At a cap of 850 the Japanese and iberis runs left 50-65 s of the share unused.)
        # Every 4th row a copy row (--repeat-rows): without them the model never learns to copy a word from
        # the prompt into a tool call or an answer (docs/benchmarks.md, "copy rows"). What the base model learns
        # is a head that looks that fixed distance back; rows repeating a span from a random distance taught no
        # copying at d3 either and scored lower after SFT (0.450 against 0.514-0.550; session 44).
        # The LR falls over the last 60% of the steps (the pretrain default, nanochat's, is 20%) and the Muon
        # matrices decay by 0.1: at 700 steps val bpb 1.526 against 1.553 with the defaults, the two measured
        # apart at -0.015 and -0.010; 0.8 and 1.0 of the run were no better than 0.6, a higher or lower matrix
        # LR, a larger embedding LR, weight decay 0.2 and half the batch for twice the steps were worse. The
        # chat stages kept their skills (0.650 against 0.615 over four seeds), but the English SFT model reads
        # simple prose a little worse than before, the weight decay's doing (docs/benchmarks.md, sessions 33-34).
        pretrain=["--seq-len", "256", "--device-batch", "16", "--total-batch", "4096",
                  "--num-steps", "1000", "--eval-every", "500", "--eval-tokens", "32768", "--save-every", "500",
                  "--repeat-rows", "4", "--warmdown-frac", "0.6", "--weight-decay", "0.1"],
        eval_base=["--eval-tokens", "32768", "--core-items", "40"],
        # Chat format, calculator calls and identity come from midtraining + SFT on the shipped/generated mix.
        # SFT's steps are where the held-out skills are learnt: more of them raised `eval skills` the most
        # per minute (docs/benchmarks.md, "SFT steps against the held-out skills").
        # Four midtraining runs from the base (seeds 0-3) and their weights averaged: SFT (four runs averaged)
        # from the averaged midtraining scored 0.686 and 0.669 for two sets of four, against 0.640 from single
        # midtrainings (docs/benchmarks.md, "averaging midtraining runs").
        # English at the stages' default learning rates; Japanese lower (chat_lr_ja, above).
        midtrain=["--num-steps", "250", "--eval-every", "125", "--soup", "4"],
        # Four SFT runs from the midtrained model (seeds 0-3) and their weights averaged: the average scored
        # 0.034 above its members' mean on the held-out skills in all four of four midtrainings (0.640 against
        # 0.606), where one run's seed alone moves the score by up to 0.1 (docs/benchmarks.md, "averaging SFT
        # runs").
        sft=["--num-steps", "300", "--eval-every", "150", "--soup", "4"],
        # RL is the most expensive step per update on CPU (sampling) and moved the held-out skills least,
        # so it gets a short run: the stage still shows its reward curve and pass@k before/after.
        rl=["--num-steps", "15"],
        # Reply budgets that hold every reply the chat data teaches (tests/test_reply_budgets.py): the 64 set
        # before cut 84% of the Japanese letter-count replies (up to 84 tokens in the 1,024-token vocabulary)
        # before their answer (docs/benchmarks.md, session 27). RL and eval skills take their default (128, half
        # the context); eval chat 96, as its GSM8K and HumanEval replies run on to the budget: 128 took its
        # 40 items per task 2.8x as long as 64.
        eval_chat=["--max-items", "40", "--max-new-tokens", "96"],
        # An AVX2-only CPU computes in fp32 at ~1/4 of the AMX machine's tokens per second; the cap keeps the
        # quickstart a quickstart there, with fewer steps (and a smaller model: depth_fp32). Shares of the 13
        # minutes, start-ups included: pretraining ~4.4, midtraining ~3.5 (4 x 250 steps), SFT ~4.6 (4 x 300
        # steps), RL ~0.5 (15 steps); time a stage leaves unused goes to the stages after it. The evaluations
        # take ~0.7 minutes more on a 2-core machine.
        max_minutes=13,
        minute_shares={"pretrain": 0.34, "midtrain": 0.27, "sft": 0.35, "rl": 0.04},
        # Compiled, once the forward was one graph: d4 pretraining steps 0.70x eager's time, midtraining and SFT
        # ~0.78x, for a cold compile of ~35 s (pretraining) and ~20 s (the chat stages' one shape; the averaged
        # runs after the first reuse its graph): ~190 more pretraining steps in its share, and all four
        # midtraining runs in theirs (eager, the first run's 59 s left room for three; docs/benchmarks.md,
        # session 36).
        compiled=COMPILABLE,
        # Where the stages compute in fp32 (an AVX2-only CPU: ~3,900 tok/s for d4 against ~15,800 in bf16 on AMX),
        # d4 saw 246 pretraining steps and its chat stages stopped short of their step counts; d3 fitted 407 steps
        # (val bpb 1.655 against 1.716) and reached both chat stages' counts, and its SFT model scored 0.538 and
        # 0.514 (two runs) on the held-out skills against 0.436; Japanese 0.662 against 0.486 (docs/benchmarks.md,
        # session 43).
        depth_fp32=3,
        # And a 2,048-token English vocabulary there: at d3 on the AVX2 CPU, 4,096 tokens left the word tasks
        # dead (spelling 0.07, letter count 0.13 over three runs: the model wrote another word into the call),
        # 2,048 brought them to 0.53-0.60 and 0.60-0.80 and 3-6 of 8 open prompts on topic (none at 4,096), with
        # canned answers that swing more (refusal 0.40-0.70 against 0.80-0.90): 0.583, 0.700 and 0.633 after SFT in three
        # runs against 0.514-0.550 in three (docs/benchmarks.md, session 44). Japanese keeps its 1,024.
        tokenizer_fp32=["--vocab-size", "2048", "--max-chars", "2000000"],
    ),
    "cpu-hour": Preset(
        name="cpu-hour",
        description="the longer offline run: embedded data, d5 for 3-4x the quickstart's tokens, ~60 minutes on 2 CPU cores",
        expected_minutes=60,
        depth=5,
        tokenizer=["--vocab-size", "4096", "--max-chars", "2000000"],  # the cpu preset's: one home shares it
        tokenizer_ja=["--vocab-size", "1024", "--max-chars", "2000000"],
        # No chat_mix_ja: at d5 with 400 midtraining and 600 SFT steps the English tasks beside the Japanese ones
        # help (0.731 against 0.692 for the Japanese tasks alone, three seeds each), where at the quickstart's d4
        # they cost 0.044 (docs/benchmarks.md, "cpu-hour in Japanese: the English tasks stay").
        # The hour goes where the quickstart's measurements say skills come from, not into pretraining alone:
        # d4 pretrained 4.5x longer reached val bpb 1.41 against 1.55 but not better skills (0.648 against 0.669),
        # while averaged midtraining and SFT runs did raise them (docs/benchmarks.md, "cpu-hour" and "averaging").
        # So: d5 (width 320, ~1.35x d4's time per step on 2 cores) for 3.4x the quickstart's tokens, then both
        # soups: 0.81 after SFT. (d5 at the quickstart's own steps scored level with d4, 0.649 against 0.652 over
        # four seeds: the wider model pays with the longer run, not alone; docs/benchmarks.md, session 25.)
        # Compiled (`compiled`): d5's pretraining steps ran 1.28-1.37x faster on 2 AMX cores for a ~35-50 s compile
        # (docs/benchmarks.md, session 29); since the compiled forward is one graph they take 0.66-0.69x eager's
        # time (~0.39 s per step in a fast phase), and midtraining's 0.78-0.80x (session 36). Compiled, the chat stages
        # reached their caps in 7m58s and 10m52s of their then 10.4 and 18.1 minutes and the run ended 7 minutes
        # early, so pretraining takes those minutes (share 0.51 -> 0.60): the cap is 5,000 steps, what a fast
        # machine fits in the stage's ~33 minutes; a slower one's fit stops earlier.
        pretrain=["--seq-len", "256", "--device-batch", "16", "--total-batch", "4096",
                  "--num-steps", "5000", "--eval-every", "1250", "--eval-tokens", "65536", "--save-every", "1250",
                  "--repeat-rows", "4"],
        eval_base=["--eval-tokens", "65536", "--core-items", "100"],
        midtrain=["--num-steps", "400", "--eval-every", "200", "--soup", "4"],
        # SFT stops at two passes over the shipped SFT mixture (~300 steps a pass): from one d4 midtrained
        # model, 4 passes overfit it (val loss 1.98, held-out skills 0.26), 2 passes scored best (1.64, 0.345;
        # docs/benchmarks.md, "cpu-hour: SFT passes").
        sft=["--num-steps", "600", "--eval-every", "300", "--soup", "4"],
        # 15 RL steps, as in the quickstart: from this preset's SFT models (four RL seeds each), held-out
        # skills after 15 / 40 steps were 0.795 / 0.792 (EN, SFT 0.795) and 0.754 / 0.743 (JA, SFT 0.779);
        # SFT has nearly solved the RL prompts, so longer RL has little to learn and unlearns some
        # one-step problems (docs/benchmarks.md, "RL steps scaled by their signal").
        rl=["--num-steps", "15"],
        eval_chat=["--max-items", "100", "--max-new-tokens", "96"],  # reply budgets as in `cpu`
        # Midtraining's and SFT's shares (9.35 and 11.55 minutes; midtraining's leftover goes to SFT) leave 6-17%
        # over what the compiled stages took on the AMX machine; where four runs no longer fit, fewer full-length
        # runs are averaged. Eager, on the 2-core EPYC (docs/benchmarks.md, "cpu-hour with d5 and both soups"),
        # midtraining took ~0.35 s/step, 4 x 400 steps in ~10 minutes: without a C++ compiler it averages three runs
        # there. RL: 15 steps in ~0.3 of its 1.1 minutes.
        max_minutes=55,  # (54 for the loops before their start-ups counted)
        minute_shares={"pretrain": 0.60, "midtrain": 0.17, "sft": 0.21, "rl": 0.02},
        tag_prefix="hour-",
        compiled=COMPILABLE,
    ),
    # GPU presets: the full recipe (gpu_stage_flags); these fields hold only what the CPU presets need. Their
    # pretraining, midtraining and SFT are compiled (nanochat compiles the first two): hours of steps repay a
    # compile of about a minute.
    **{name: Preset(name=name, description="GPU: " + r.description, expected_minutes=0, depth=r.depth, tokenizer=[],
                    pretrain=[], eval_base=[], midtrain=[], sft=[], rl=[], eval_chat=[], gpu=True, online=True,
                    compiled=COMPILABLE)
       for name, r in GPU_RECIPES.items()},
}


@dataclass
class Step:
    name: str  # what --force names
    title: str
    argv: list[str]  # arguments after `chibichat`
    marker: Path  # exists <=> step done
    outputs: list[Path]  # deleted by --force
    resumable_dir: Path | None = None  # checkpoints here + no marker => pass --resume
    distributed: bool = False  # run under torchrun when several GPUs are visible
    weight: float = 1.0  # share of the expected time, for the ETA
    speedrun_marks_done: bool = False  # the step writes no marker of its own; speedrun writes `marker`
    # steps whose outputs this one reads: forcing one of them redoes this one. No step names the download
    # steps: a forced download fetches the same verified shards, so nothing trained on them goes stale.
    needs: tuple[str, ...] = ()
    # steps whose marker this one rewrites (eval skills merges its figures into eval chat's summary.json):
    # their record is hashed again when this one finishes, or their flags would go unchecked from then on
    rewrites: tuple[str, ...] = ()


def forced_steps(steps: list[Step], force: list[str]) -> list[str]:
    """The steps `--force` redoes, in plan order: those named, and every step that needs one of them
    (transitively; `needs` only names earlier steps, so one pass in order closes the set)."""
    redo: list[str] = []
    for step in steps:
        if step.name in force or any(n in redo for n in step.needs):
            redo.append(step.name)
    return redo


def register(sub) -> None:
    p = sub.add_parser(
        "speedrun",
        help="run the whole pipeline: tokenizer -> pretrain -> mid -> SFT -> RL with evals and a report",
        description=(
            "Run every stage in order into one home directory, then write the report card. "
            "Re-running skips finished stages and resumes an interrupted one from its last checkpoint. "
            "Presets: " + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())
        ),
    )
    add_home_arg(p)
    p.add_argument("--preset", default="auto", choices=["auto", *PRESETS], help="hardware preset (auto: cpu without a GPU, d20 with GPUs)")
    p.add_argument("--lang", default="en", choices=["en", "ja"], help="language of corpus, tokenizer split, chat data and evals")
    p.add_argument("--layers", default="dense", help="layer layout: dense | iberis | explicit pattern like ASSA")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo STAGE even if finished, and every step that reads its output (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and what would be skipped, run nothing")
    p.add_argument("--device", default="auto", help="passed to every stage")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="compute dtype, passed to every stage (default: auto)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training forward of pretraining, midtraining and SFT (their --compile; "
                        "default: the preset's choice, on for cpu and cpu-hour where a C++ compiler is found, and "
                        "for the GPU presets)")
    p.add_argument("--scale", default="full", choices=SCALES,
                   help="full: the preset as named; toy: a GPU preset's exact plan (stages, tasks, mixtures, flags) "
                        "with only its sizes shrunk to seconds on a CPU (the size flags in TOY_SIZES), for tests")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes for the distributed steps, under torchrun (default: every visible GPU; 1 on CPU)")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget of the four training stages together, start-ups included: each "
                        "fits its step count to its share of what the stages before it left (tokenizer and "
                        "evals come on top)")
    p.add_argument("--no-budget", action="store_true",
                   help="run the preset's step counts however long they take (a preset with a time cap, like "
                        "cpu, otherwise stops each training stage early on a slow machine)")
    # precision and memory flags of the training stages, passed to pretrain, midtrain, sft and rl
    add_fp8_arg(p)
    add_memory_args(p)
    add_allow_weak_arg(p)  # checked once up front; the acceptance reaches the stages through the environment
    p.set_defaults(func=run)


def runs_code(step: Step) -> bool:
    """Whether the step executes model-written code: an eval chat whose tasks (default: ChatCORE) include
    one that runs its completions, i.e. HumanEval."""
    from chibichat.tasks.evalsets import CHATCORE_TASKS
    from chibichat.tasks.registry import get_task

    if step.argv[:2] != ["eval", "chat"]:
        return False
    names = step.argv[step.argv.index("--tasks") + 1].split(",") if "--tasks" in step.argv else CHATCORE_TASKS
    return any(get_task(n).runs_code for n in names)


def compile_stages(choice: bool | None, preset: Preset, device: str, dry_run: bool = False) -> tuple[str, ...]:
    """The training stages run with --compile: all that take it (COMPILABLE) with `choice` True (speedrun
    --compile), none with False (--no-compile), else the preset's (Preset.compiled). A preset's compile on a CPU
    with no C++ compiler (cpp_compiler) falls back to eager with a note saying so and how to fix it; an
    asked-for --compile there is refused."""
    from chibichat.common import check_cpu_compile, cpp_compiler, cpp_compiler_name, eprint

    stages = {True: COMPILABLE, False: (), None: preset.compiled}[choice]
    if stages and device.startswith("cpu"):
        if choice:
            check_cpu_compile(device)
        elif cpp_compiler() is None:
            name, default = cpp_compiler_name()
            eprint(f"note: preset {preset.name} compiles {', '.join(stages)} (torch.compile, ~1.3-1.5x faster steps), "
                   f"but {name!r}, the C++ compiler torch.compile needs on the CPU ($CXX, else {default}), is not on "
                   "PATH: they " + ("would run" if dry_run else "run") + f" eager. Install {default} (or set CXX) "
                   "for the compiled steps, or pass --no-compile to plan them eager without this note")
            return ()
    return stages


def training_flags(args) -> list[str]:
    """The speedrun's --fp8 / --recompute / --trim-heap as flags for every training stage (none when default)."""
    out = ["--fp8"] if args.fp8 else []
    if args.recompute != "none":
        out += ["--recompute", args.recompute]
    return out + (["--trim-heap"] if args.trim_heap else [])


def chat_stage_flags(preset: Preset, lang: str) -> tuple[list[str], list[str]]:
    """(midtrain flags, sft flags) of a preset for `lang`: its own, and with --lang ja its Japanese mixtures and
    learning rates where it has them (chat_mix_ja, chat_lr_ja). `bench skills --preset` starts its arms from these."""
    mid, sft = list(preset.midtrain), list(preset.sft)
    if lang == "ja" and preset.chat_mix_ja is not None:
        mid, sft = [*mid, "--mix", preset.chat_mix_ja[0]], [*sft, "--mix", preset.chat_mix_ja[1]]
    if lang == "ja" and preset.chat_lr_ja is not None:
        mid, sft = [*mid, "--lr-frac", str(preset.chat_lr_ja[0])], [*sft, "--lr-frac", str(preset.chat_lr_ja[1])]
    return mid, sft


def pick_preset(name: str) -> Preset:
    if name != "auto":
        return PRESETS[name]
    import torch

    return PRESETS["d20"] if torch.cuda.is_available() else PRESETS["cpu"]


def gpu_stage_flags(recipe: GpuRecipe, fig: RecipeFigures, lang: str, world_size: int) -> dict[str, list[str]]:
    """Each stage's flags in the full GPU recipe (before --scale). `world_size`: GPUs the run uses; the
    micro-batch per GPU is fixed and fewer GPUs accumulate more micro-batches, so every optimizer step
    sees the 8-GPU batch (pretraining does the same from --total-batch)."""
    accum = str(gpu_world(world_size))
    return {
        "tokenizer": ["--vocab-size", str(recipe.vocab), "--max-chars", "2000000000"],
        # --device-batch auto: the largest per-GPU batch that fits, probed on the card (train/batchprobe.py)
        "pretrain": ["--depth", str(recipe.depth), "--seq-len", "2048", "--total-batch", str(recipe.total_batch),
                     "--device-batch", "auto", "--num-steps", str(fig.pretrain_steps), "--eval-every", "250",
                     "--eval-tokens", str(20 * 2 ** 19), "--save-every", "1000", "--sample-every", "2000"],
        # full CORE (the DCLM bundle, every item) and bpb on nanochat's 20 x 2^19 val tokens
        "eval_base": ["--eval-tokens", str(20 * 2 ** 19), "--core", "full", "--core-items", "0"],
        # nanochat: LR x 1.0, constant to 80% then linear to 0; eval every 150 steps. SmolTalk and MMLU's
        # auxiliary train are large collections of other datasets: an item among them that asks a test
        # question is left out and counted (summary.json) rather than stopping a run hours after pretraining.
        "midtrain": ["--mix", MID_MIX[lang], "--num-steps", str(fig.mid_steps), "--device-batch-size", str(CHAT_ROWS),
                     "--grad-accum", accum, "--lr-frac", "1.0", "--warmdown-frac", "0.2", "--eval-every", "150",
                     "--val-batches", "16", "--val-items", "500", "--save-every", "200", "--drop-eval-overlap"],
        # nanochat's older SFT: padded single conversations, 32 per step, LR x 0.02 decayed linearly to 0
        "sft": ["--mix", SFT_MIX[lang], "--mode", "pad", "--num-steps", str(fig.sft_steps), "--device-batch-size",
                str(SFT_CONVS), "--grad-accum", accum, "--lr-frac", "0.02", "--warmdown-frac", "1.0",
                "--eval-every", "100", "--val-batches", "16", "--val-items", "100", "--save-every", "200",
                "--drop-eval-overlap"],
        # nanochat's RL: 16 GSM8K train questions x 16 samples at T 1.0, top-k 50, <= 256 new tokens, LR x 0.05
        # decayed to 0 over one pass; pass@1..8 on 400 held-out GSM8K test questions (the shipped test subset)
        "rl": ["--task", "gsm8k-train", "--eval-task", "gsm8k", "--prompts-per-step", str(RL_PROMPTS),
               "--grad-accum", accum, "--num-samples", "16", "--max-new-tokens", "256", "--temperature", "1.0",
               "--top-k", "50", "--lr-frac", "0.05", "--warmdown-frac", "1.0", "--num-steps", str(fig.rl_steps),
               "--passk-items", "400", "--passk-k", "8", "--save-every", "60"],
        # every item of the full test sets of every ChatCORE task, greedy, up to 512 new tokens
        "eval_chat": ["--test-sets", "online", "--max-new-tokens", "512"],
    }


def soup_dirs(home: Home, stage: str, tag: str, flags: list[str]) -> list[Path]:
    """The member runs' checkpoint folders of a `midtrain/sft --soup K` step (none without --soup): outputs of
    the step, so `--force` removes them too."""
    from chibichat.stages.sft import soup_members

    if "--soup" not in flags:
        return []
    k = int(flags[flags.index("--soup") + 1])
    return [home.checkpoints_dir(stage, mtag) for mtag, _ in soup_members(tag, 0, k)] if k > 1 else []


def plan(home: Home, preset: Preset, lang: str, layers: str, device: str, dtype: str = "auto",
         train: list[str] = (), compiled: tuple[str, ...] = (), world_size: int = 1, scale: str = "full",
         minutes: float | None = None, budget: bool = True) -> list[Step]:
    """The steps of a speedrun. `train`: extra flags for every training stage (training_flags);
    `compiled`: the training stages that get --compile (compile_stages); `world_size`: processes the distributed
    steps run on (GPU presets keep their batch on any count by gradient accumulation); `scale`: "toy"
    shrinks a GPU preset's sizes and nothing else (TOY_SIZES); `minutes`: spend that many minutes learning
    (budget_flags with BUDGET_HEADROOM); otherwise, unless `budget` is False, the preset's max_minutes caps
    the training loops (budget_flags with headroom 1: the step counts stay as they are where they fit)."""
    if scale != "full" and not preset.gpu:
        raise ChibiError(f"--scale {scale} shrinks a GPU preset; preset {preset.name} is already CPU-sized")
    if minutes is not None and not budget:
        raise ChibiError(f"--minutes {minutes:g} sets a time budget and --no-budget asks for none: pass one of them")
    tag = preset.tag_prefix + f"d{preset.depth}" + ("" if layers == "dense" else f"-{layers}")
    corpus = {("en", False): "embedded-en", ("ja", False): "embedded-ja",
              ("en", True): "fineweb-edu", ("ja", True): "abeja-ja"}[(lang, preset.online)]
    # Offline RL trains on one- and two-step problems in turn (two-step alone unlearned the one-step ones).
    rl_task = ["--task", preset.rl_task[0] if lang == "en" else preset.rl_task[1]]
    flags = {k: getattr(preset, k) for k in ("tokenizer", "pretrain", "eval_base", "midtrain", "sft", "rl", "eval_chat")}
    flags["pretrain"] = ["--depth", str(preset.depth), *flags["pretrain"]]  # one source: the tag says the same
    flags["tokenizer"] = tokenizer_flags(preset, lang)
    ja_alone = lang == "ja" and preset.chat_mix_ja is not None  # no English MC data (mmlu-dev) then
    flags["midtrain"], flags["sft"] = chat_stage_flags(preset, lang)
    shards = 0
    if preset.gpu:
        recipe = GPU_RECIPES[preset.name]
        fig = recipe_figures(recipe, lang, layers)
        flags, rl_task, shards = gpu_stage_flags(recipe, fig, lang, world_size), [], fig.shards
        if scale != "full":
            tag = scale + "-" + tag
    split = ["--split", "ja"] if lang == "ja" else []
    # Chat evals: the ChatCORE set in English; Japanese adds nothing online (JGLUE is `chibichat eval jglue`
    # with its dev files), so it scores the generated JA tasks, and the GPU presets the English set too.
    ja_tasks = "spelling-ja,arithmetic-ja,letter-count-ja"
    chat_tasks = [] if lang == "en" else ["--tasks", ja_tasks if not preset.gpu else
                                          "arc-easy,arc-challenge,mmlu,gsm8k,humaneval,spelling," + ja_tasks]
    common = ["--home", str(home.root)]
    dev = ["--device", device] + (["--dtype", dtype] if dtype != "auto" else [])
    train = list(train)
    comp = {name: ["--compile"] if name in compiled else [] for name in COMPILABLE}
    ck = home.checkpoints_dir
    ev = home.eval_dir
    sc = (lambda argv: scale_argv(argv, scale)) if preset.gpu else list
    steps = []
    if preset.online:
        n = sc(["data", "download", corpus, "-n", str(shards)])[4]
        steps.append(Step(
            "download", f"download {n} shards of {corpus}",
            ["data", "download", corpus, "-n", n, *common],
            home.data_dir / corpus / f".speedrun-{n}-shards.done", [], weight=0.05,
            speedrun_marks_done=True))
        steps.append(Step(
            "download-tasks", "download and verify the full test sets and the online training sets",
            ["data", "tasks", ",".join(ONLINE_TASKS), *common],
            home.data_dir / "tasks" / ".speedrun-tasks.done", [], weight=0.01, speedrun_marks_done=True))
    # --soup: the runs' folders are the step's outputs too, and the step runs on one process
    mid_members, members = soup_dirs(home, "mid", tag, flags["midtrain"]), soup_dirs(home, "sft", tag, flags["sft"])
    steps += [
        Step("tokenizer", "train the tokenizer",
             sc(["tokenizer", "train", "--corpus", corpus, *split, *common, *flags["tokenizer"]]),
             home.tokenizer_dir / "tokenizer.json", [home.tokenizer_dir], weight=0.02),
        Step("tokenizer-eval", "evaluate the tokenizer",
             ["tokenizer", "eval", "--corpus", corpus, *common],
             home.tokenizer_dir / "eval.json", [home.tokenizer_dir / "eval.json"], weight=0.01, needs=("tokenizer",)),
        Step("pretrain", "pretrain the base model",
             sc(["pretrain", "--corpus", corpus, "--layers", layers, "--tag", tag, *common, *dev, *train, *comp["pretrain"],
                 *flags["pretrain"]]),
             ck("base", tag) / "summary.json", [ck("base", tag)], resumable_dir=ck("base", tag), distributed=True, weight=0.5,
             needs=("tokenizer",)),
        Step("eval-base", "evaluate the base model (bpb, CORE)",
             sc(["eval", "base", "--from", "base", "--tag", tag, *common, *dev, *flags["eval_base"]]),
             ev("base", tag) / "summary.json", [ev("base", tag)], distributed=True, weight=0.04, needs=("pretrain",)),
        Step("midtrain", "midtrain: chat format, tools" + ("" if ja_alone else ", multiple choice"),
             sc(["midtrain", "--from", "base", "--from-tag", tag, "--tag", tag, *common, *dev, *train, *comp["midtrain"],
                 *flags["midtrain"]]),
             ck("mid", tag) / "summary.json", [ck("mid", tag), *mid_members], resumable_dir=ck("mid", tag),
             distributed=not mid_members, weight=0.1, needs=("pretrain",)),
        Step("eval-mid", "evaluate the midtrained model",
             sc(["eval", "chat", "--from", "mid", "--tag", tag, *chat_tasks, *common, *dev, *flags["eval_chat"]]),
             ev("mid", tag) / "summary.json", [ev("mid", tag)], distributed=True, weight=0.04, needs=("midtrain",)),
        skills_step(home, "mid", tag, lang, common + dev, preset),
        Step("sft", "supervised fine-tuning",
             sc(["sft", "--from", "mid", "--from-tag", tag, "--tag", tag, *common, *dev, *train, *comp["sft"], *flags["sft"]]),
             ck("sft", tag) / "summary.json", [ck("sft", tag), *members],
             resumable_dir=ck("sft", tag), distributed=not members, weight=0.1, needs=("midtrain",)),
        Step("eval-sft", "evaluate the SFT model",
             sc(["eval", "chat", "--from", "sft", "--tag", tag, *chat_tasks, *common, *dev, *flags["eval_chat"]]),
             ev("sft", tag) / "summary.json", [ev("sft", tag)], distributed=True, weight=0.04, needs=("sft",)),
        skills_step(home, "sft", tag, lang, common + dev, preset),
        Step("rl", "reinforcement learning on verifiable rewards",
             sc(["rl", "--from", "sft", "--from-tag", tag, "--tag", tag, *rl_task, *common, *dev, *train, *flags["rl"]]),
             ck("rl", tag) / "summary.json", [ck("rl", tag)], resumable_dir=ck("rl", tag), distributed=True, weight=0.1,
             needs=("sft",)),
        Step("eval-rl", "evaluate the RL model",
             sc(["eval", "chat", "--from", "rl", "--tag", tag, *chat_tasks, *common, *dev, *flags["eval_chat"]]),
             ev("rl", tag) / "summary.json", [ev("rl", tag)], distributed=True, weight=0.04, needs=("rl",)),
        skills_step(home, "rl", tag, lang, common + dev, preset),
    ]
    for step in steps:
        if step.name.startswith("skills-"):
            step.argv = sc(step.argv)
    total = budget_minutes(preset, minutes, budget)
    if total is not None:
        budget_flags(steps, total, BUDGET_HEADROOM if minutes is not None else 1, preset.minute_shares)
    return steps


def budget_minutes(preset: Preset, minutes: float | None, budget: bool) -> float | None:
    """The training steps' time budget of a plan: --minutes, else (unless --no-budget) the preset's cap."""
    if minutes is not None:
        return minutes
    return preset.max_minutes if budget and preset.max_minutes else None


TRAINING_STEPS = ("pretrain", "midtrain", "sft", "rl")
TRAINING_STEP_OF = {"base": "pretrain", "mid": "midtrain", "sft": "sft", "rl": "rl"}  # checkpoint stage -> its step
BUDGET_HEADROOM = 4  # with --minutes, a stage may take up to this many times its preset's --num-steps


def budget_flags(steps: list[Step], minutes: float, headroom: int, shares: dict | None = None) -> None:
    """Give each training step its share of `minutes` (budget_weights) as --minutes, and raise its
    --num-steps cap `headroom`-fold: with BUDGET_HEADROOM a machine faster than the one the preset was sized
    on spends its minutes learning instead of stopping at the preset's count; with 1 the minutes only cut a
    slow machine's run short. These are the planned minutes; a run gives each step its share of what the
    steps before it left (carried_minutes)."""
    if not (minutes > 0 and minutes < float("inf")):
        raise ChibiError(f"--minutes must be a positive number, got {minutes}")
    weight = budget_weights(steps, shares)
    total = sum(weight.values())
    for s in steps:
        if s.name not in weight:
            continue
        s.argv += ["--minutes", f"{minutes * weight[s.name] / total:.4g}"]
        if "--num-steps" in s.argv:
            i = _value_index(s.argv, "--num-steps")
            s.argv[i] = str(headroom * int(s.argv[i]))


def budget_weights(steps: list[Step], shares: dict | None) -> dict[str, float]:
    """Each training step's weight in the time budget, by step name, in plan order: `shares[name]`, else
    the step's weight (its share of the expected time)."""
    return {s.name: (shares[s.name] if shares else s.weight) for s in steps if s.name in TRAINING_STEPS}


MIN_CARRIED = 0.5  # a training step gets at least this fraction of its planned minutes, whatever overran before it


def carried_minutes(weights: dict[str, float], name: str, minutes: float, spent_s: dict[str, float]) -> float:
    """The --minutes training step `name` runs with: its weight's share of what the training steps before it
    left of the budget `minutes`, so that time one stage leaves unused (a stage that reached its step cap,
    or averaged runs of which only whole ones fit) goes to the stages after it, and time one overran (the
    machine slowed after the last fit of the step count, a stage's start-up) is taken from them: the
    training steps together take about `minutes`, start-ups included, on a fast or a slow machine.

    `spent_s`: wall seconds of the finished training steps (report/timing.json); a step before `name`
    without a time (finished by hand) counts as having spent its planned share. The result depends only on
    these, so an interrupted step resumed later gets the minutes it started with (the loop refuses another
    --minutes on --resume). At least MIN_CARRIED of the planned share: a stage is shortened, never
    starved, by the overruns before it."""
    names = list(weights)
    total = sum(weights.values())
    i = names.index(name)
    planned = {n: minutes * 60 * weights[n] / total for n in names}
    left = minutes * 60 - sum(spent_s.get(n, planned[n]) for n in names[:i])
    share = weights[name] / sum(weights[n] for n in names[i:])
    return max(left * share, MIN_CARRIED * planned[name]) / 60


def _value_index(argv: list[str], flag: str) -> int:
    """The index of the value after the last `flag` in argv."""
    return len(argv) - argv[::-1].index(flag)


def set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """A copy of argv with the value after its last `flag` replaced."""
    i = _value_index(argv, flag)
    return argv[:i] + [value] + argv[i + 1:]


def skills_step(home: Home, stage: str, tag: str, lang: str, flags: list[str], preset: Preset) -> Step:
    """`eval skills` of one chat stage; done when its per-item file (written last) exists."""
    from chibichat.eval.skills import summary_prefix

    out = home.eval_dir(stage, tag) / summary_prefix(lang)
    return Step(f"skills-{stage}", f"held-out skills prompts on the {stage} model",
                ["eval", "skills", "--from", stage, "--tag", tag, "--lang", lang, *flags, *preset.eval_skills],
                out.with_suffix(".jsonl"), [out.with_suffix(".jsonl"), out.with_suffix(".csv")], weight=0.02,
                # eval-<stage> owns the folder these files are written to: forcing it deletes them too
                needs=(TRAINING_STEP_OF[stage], f"eval-{stage}"), rewrites=(f"eval-{stage}",))


def _has_checkpoint(d: Path | None) -> bool:
    return bool(d and d.is_dir() and any(p.name.startswith("step_") for p in d.iterdir()))


def process_count(nproc: int | None) -> int:
    """Processes of the distributed steps: --nproc-per-node, else every visible GPU (1 without CUDA)."""
    if nproc is not None:
        if nproc < 1:
            raise ChibiError(f"--nproc-per-node must be >= 1, got {nproc}")
        return nproc
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def _launcher(step: Step, nproc: int) -> list[str]:
    """`python -m chibichat` or, for a distributed step on several processes, torchrun over them."""
    if step.distributed and nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", *_torchrun_args(nproc), "-m", "chibichat"]
    return [sys.executable, "-m", "chibichat"]


def _torchrun_args(nproc: int) -> list[str]:
    return ["--standalone", f"--nproc_per_node={nproc}"]


def run_step(step: Step, argv: list[str], nproc: int, env: dict) -> int:
    """Run one step in a process of its own; its exit status.

    Each step's process would otherwise spend seconds of CPU importing torch before it does anything, as
    much as a toy-sized step's whole work. So on Linux the process is a fork of this one with torch
    imported already (fork_start), where that is safe:
    - a distributed step on several processes: torchrun's launcher (torch.distributed.run.main, what the
      `torchrun` command runs), which does no tensor work; with CUDA present it starts its workers as
      fresh interpreters (`python -m chibichat argv`) exactly as the printed command line would; without
      CUDA it forks them too (_torchrun_main);
    - any other step: `python -m chibichat argv` in the fork, only on a machine without CUDA (a CUDA driver
      that this process has touched cannot be used in a fork).
    Elsewhere the command runs as a subprocess."""
    if sys.platform == "linux":
        import torch

        no_cuda = not torch.cuda.is_available()
        if step.distributed and nproc > 1:
            return fork_start(env, lambda: _torchrun_main([*_torchrun_args(nproc), "-m", "chibichat", *argv], no_cuda))
        if no_cuda:
            return fork_start(env, lambda: _chibichat_main(argv))
    with _terminate_raises(), subprocess.Popen(_launcher(step, nproc) + argv, env=env) as proc:
        def status(block: bool) -> int | None:
            if hasattr(os, "waitid"):
                return _exit_status(proc.pid, block)  # (reaped by the Popen's exit, or the waits below)
            return proc.wait() if block else proc.poll()  # (no waitid: macOS, Windows)

        try:
            return status(block=True)
        except KeyboardInterrupt:  # as in fork_start
            _after_interrupt(lambda: status(block=False), proc.terminate)
            proc.wait()
            raise
        except BaseException:  # as in fork_start: the step stops (torchrun stops its workers) before we go
            proc.terminate()
            proc.wait()
            raise


def _exit_status(pid: int, block: bool) -> int | None:
    """The exit status of child process `pid` once it has ended (as os.waitstatus_to_exitcode gives it: -N for
    signal N), else None (block=False). The child is left for the caller to reap: a Ctrl-C whose KeyboardInterrupt
    is raised only after the wait returned (the signal landed on another thread of this process) then still finds
    its status."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG))
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


STOP_GRACE_S = 10.0  # after Ctrl-C, how long a step's process gets to stop by itself before it is terminated
INTERRUPTED_EXIT = 130  # cli.main's exit status once it has said "interrupted" (a KeyboardInterrupt)


def _after_interrupt(poll, terminate) -> None:
    """Ctrl-C while a step runs: it reached the step's process too (the terminal signals the whole foreground
    process group), which stops and says "interrupted" itself. Wait up to STOP_GRACE_S for that (then, or at a
    second Ctrl-C or a SIGTERM, `terminate()` it; the caller reaps it), and where the step said it (its exit
    status is INTERRUPTED_EXIT) end the speedrun with that status without saying it a second time; otherwise
    return, and the caller re-raises the KeyboardInterrupt for cli.main to say it. `poll()`: the step's exit
    status, None while it runs."""
    deadline = time.monotonic() + STOP_GRACE_S
    try:
        while (code := poll()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
    except BaseException:
        terminate()
        raise
    if code is None:
        terminate()
    elif code == INTERRUPTED_EXIT:
        raise SystemExit(INTERRUPTED_EXIT) from None


@contextlib.contextmanager
def _terminate_raises():
    """While a step's process runs, SIGTERM to this one (`kill PID`, a scheduler) raises SystemExit(143) here, so
    that the caller stops the step with it: by default this process would end at once and leave the step running,
    orphaned, to write into the home beside the next run's."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _chibichat_main(argv: list[str]) -> int:
    """`python -m chibichat argv`, in this process (a fork): the package's __main__ raises SystemExit with
    the exit status."""
    import runpy

    sys.argv = ["chibichat", *argv]
    runpy.run_module("chibichat", run_name="__main__", alter_sys=True)
    return 0


def _torchrun_main(args: list[str], fork_workers: bool) -> int:
    """`torchrun args` (its main). `fork_workers` (no CUDA here): the same launch with the workers forked from
    this process (torchrun's --start-method fork, which applies to a function entrypoint) running
    `python -m chibichat` in-process, instead of starting fresh interpreters that import torch again."""
    from torch.distributed.run import main

    try:
        if not fork_workers:
            main(args)
            return 0
        import uuid

        from torch.distributed.launcher.api import elastic_launch
        from torch.distributed.run import config_from_args, parse_args

        targs = parse_args(["--start-method", "fork", *args])
        module = targs.training_script_args
        if targs.standalone:  # what torchrun's run() does for --standalone
            targs.rdzv_backend, targs.rdzv_endpoint, targs.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
        config, _, _ = config_from_args(targs)
        elastic_launch(config=config, entrypoint=_forked_worker)(module)
    except Exception as e:  # a failed worker (ChildFailedError), already reported by torchrun
        print(f"torchrun: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def _forked_worker(argv: list[str]) -> None:
    """One torchrun worker, forked: `python -m chibichat argv`; a non-zero exit status ends the process with
    it (torchrun's failure), a zero one returns (torchrun waits for every worker's return value)."""
    try:
        _chibichat_main(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            raise


def fork_start(env: dict, entry) -> int:
    """entry() in a forked child with `env` as its environment and line-buffered output (what
    PYTHONUNBUFFERED gives a fresh interpreter); the child's exit status."""
    import signal

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # never returns into the orchestrator's code
        code = 1
        try:
            os.environ.clear()
            os.environ.update(env)
            if hasattr(sys.stdout, "reconfigure"):
                sys.stdout.reconfigure(line_buffering=True)
            code = entry()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    with _terminate_raises():
        try:
            try:
                return _exit_status(pid, block=True)
            except KeyboardInterrupt:  # Ctrl-C reaches the child too: it stops (and stops its workers) before we go
                _after_interrupt(lambda: _exit_status(pid, block=False), lambda: os.kill(pid, signal.SIGTERM))
                raise
            except BaseException:  # SIGTERM to this process alone: stop the child before we go
                os.kill(pid, signal.SIGTERM)
                raise
        finally:
            os.waitpid(pid, 0)  # reaped only now (_exit_status)


def check_done_tokenizer(home: Home, step: Step) -> None:
    """A home's finished tokenizer is reused, so it must be the one this plan trains: another preset or --lang
    (English 4,096 tokens, Japanese 1,024 in the CPU presets; the same size in micro and the GPU presets, where
    only the split and the corpus tell them apart) in the same home would otherwise pretrain on a tokenizer its
    plan does not name. Size, split (a plan without --split gets `tokenizer train`'s --split auto for its
    corpus) and training corpus are compared; ChibiError naming both and the fix."""
    from chibichat.data.corpora import get_corpus
    from chibichat.stages.tokenizer import resolve_split

    if step.name != "tokenizer" or not step.marker.exists():
        return
    meta = read_json(step.marker, "tokenizer")
    argv = step.argv
    corpus = argv[argv.index("--corpus") + 1]
    split = argv[argv.index("--split") + 1] if "--split" in argv else resolve_split("auto", get_corpus(corpus).lang)
    want = {"vocab_size": int(argv[argv.index("--vocab-size") + 1]), "split": split, "corpus": corpus}
    training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    have = {"vocab_size": meta.get("vocab_size"), "split": meta.get("split"), "corpus": training.get("corpus")}
    if want != have:
        raise ChibiError(f"{home.tokenizer_dir} holds a {have['vocab_size']}-token tokenizer (split {have['split']}, "
                         f"corpus {have['corpus'] or 'not recorded'}), but this plan trains {want['vocab_size']} "
                         f"tokens (split {want['split']}, corpus {want['corpus']}): use another --home for this "
                         "preset and language, or pass --force tokenizer to train it anew (the home's checkpoints "
                         "then no longer load)")


# Flags left out when a finished step's flags are compared with the plan's, with how many values each takes:
# where the files are (--home: a moved home is the same run), how the step was started (--resume), and the
# memory settings that give the same numbers (--recompute recomputes the same activations, --trim-heap only
# returns freed memory; add_memory_args), and --compile (the same forward, compiled: tests/test_compile_train.py).
UNCOMPARED_FLAGS = {"--home": 1, "--resume": 0, "--recompute": 1, "--trim-heap": 0, "--compile": 0}


def step_flags(argv: list[str], device: str) -> list[str]:
    """The part of a step's argv that decides its result, as recorded and compared: argv without
    UNCOMPARED_FLAGS, and `--device auto` as the device it resolves to here (`device`), so `--device cpu` on a
    machine without CUDA is the same run as the default. The default dtype (no --dtype in the argv) is not
    resolved: what it picks depends on the card, which the orchestrator does not probe, so it differs from
    any --dtype given."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in UNCOMPARED_FLAGS:
            i += 1 + UNCOMPARED_FLAGS[argv[i]]
            continue
        if argv[i] == "--device" and i + 1 < len(argv) and argv[i + 1] == "auto":
            out += ["--device", device]
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _is_flag(token: str) -> bool:
    if not token.startswith("-"):
        return False
    try:
        float(token)
        return False
    except ValueError:
        return True


def _parse_flags(argv: list[str]) -> tuple[list[str], dict[str, str | None]]:
    """(positional words, {flag: value, or None for a switch}); a repeated flag keeps its last value, as
    argparse does."""
    words, flags, i = [], {}, 0
    while i < len(argv):
        if _is_flag(argv[i]):
            has_value = i + 1 < len(argv) and not _is_flag(argv[i + 1])
            flags[argv[i]] = argv[i + 1] if has_value else None
            i += 2 if has_value else 1
        else:
            words.append(argv[i])
            i += 1
    return words, flags


def flag_changes(old: list[str], new: list[str]) -> list[str]:
    """How `new` differs from `old`, one "--flag old -> new" per flag ("not given" where absent, "set" for a
    switch)."""
    (old_words, old_flags), (new_words, new_flags) = _parse_flags(old), _parse_flags(new)
    out = [f"{' '.join(old_words)} -> {' '.join(new_words)}"] if old_words != new_words else []
    for flag in [*new_flags, *(f for f in old_flags if f not in new_flags)]:
        if old_flags.get(flag, "") != new_flags.get(flag, ""):
            def show(flags):
                return "not given" if flag not in flags else "set" if flags[flag] is None else flags[flag]
            out.append(f"{flag} {show(old_flags)} -> {show(new_flags)}")
    return out


def step_record_path(home: Home) -> Path:
    return home.report_dir / "speedrun-steps.json"


def read_step_records(home: Home) -> dict:
    """{marker path relative to the home: {"flags": step_flags, "marker_sha256": ...}} of the steps this home's
    speedruns finished."""
    path = step_record_path(home)
    records = read_json(path, "speedrun step record") if path.exists() else {"steps": {}}
    if not isinstance(records, dict) or not isinstance(records.get("steps"), dict):
        raise ChibiError(f"speedrun step record {path} has no \"steps\" object; delete it (finished steps are "
                         "then reused without checking their flags)")
    return records["steps"]


def _record_key(home: Home, step: Step) -> str:
    return step.marker.relative_to(home.root).as_posix()


def recorded_flags(home: Home, step: Step, records: dict) -> list[str] | None:
    """The flags a finished step ran with, when this home's record describes its marker (the same bytes: a
    marker rewritten by hand since is another run); None otherwise."""
    rec = records.get(_record_key(home, step))
    if not isinstance(rec, dict) or rec.get("marker_sha256") != sha256_file(step.marker):
        return None
    return rec.get("flags")


def check_done_flags(home: Home, steps: list[Step], redo: list[str], records: dict, device: str) -> None:
    """Refuse a plan whose finished steps ran with other flags than it gives them: skipping them would report
    a model the command did not ask for. ChibiError listing each step's changed flags and the --force options
    that redo them (the fewest: forcing a step redoes the steps that read its output)."""
    stale, hints = [], []
    for step in steps:
        if step.name in redo or not step.marker.exists():
            continue
        old = recorded_flags(home, step, records)
        new = step_flags(step.argv, device)
        if old is not None and old != new:
            stale.append((step, flag_changes(old, new)))
            hints += [h for h in derived_flag_hints(old, new) if h not in hints]
    if not stale:
        return
    roots: list[str] = []
    for step, _ in stale:
        if step.name not in forced_steps(steps, roots):
            roots.append(step.name)
    lines = "\n".join(f"  {step.name}: {', '.join(changes)}" for step, changes in stale)
    raise ChibiError(f"finished steps in {home.root} ran with other flags than this command gives them:\n{lines}\n"
                     "re-run with the flags they ran with" + (f" ({'; '.join(hints)})" if hints else "")
                     + ", or pass " + " ".join(f"--force {r}" for r in roots)
                     + " to redo them (with every step that reads their output)")


def derived_flag_hints(old: list[str], new: list[str]) -> list[str]:
    """For the stage flags that differ between a finished step's recorded flags `old` and `new` and that the
    speedrun derives rather than takes (so "re-run with the flags they ran with" names no speedrun option),
    the speedrun option that gives them their old values."""
    (_, was), (_, now) = _parse_flags(old), _parse_flags(new)
    changed = {f for f in {*was, *now} if was.get(f, "") != now.get(f, "")}
    hints = []
    if "--grad-accum" in changed:  # gpu_stage_flags: RECIPE_GPUS // processes
        accum = was.get("--grad-accum")
        if accum is not None and accum.isdigit() and int(accum) >= 1 and RECIPE_GPUS % int(accum) == 0:
            n = RECIPE_GPUS // int(accum)
            hints.append(f"the speedrun sets --grad-accum from the number of processes: they ran on {n}, so pass "
                         f"--nproc-per-node {n}")
        else:
            hints.append("the speedrun sets --grad-accum from the number of processes: pass the --nproc-per-node "
                         "they ran with")
    if "--minutes" in changed:  # budget_flags: --minutes, and with it the --num-steps headroom
        hints.append("the speedrun sets the training steps' --minutes and --num-steps from its time budget: pass "
                     "the --minutes (or --no-budget) they ran with")
    return hints


def resolved_device(device: str) -> str:
    """--device as the stages resolve it (common.init_runtime): auto is cuda where torch sees a GPU, else cpu.
    ChibiError for a device torch does not know or a CUDA device without CUDA, before any step runs."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ChibiError(f"--device {device!r} is not a device torch knows; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ChibiError(f"--device {device} was asked for but torch sees no CUDA GPU; use --device cpu (or auto)")
    return device


def check_processes(nproc_arg: int | None, nproc: int, device: str, dry_run: bool) -> None:
    """--nproc-per-node on CUDA is one process per GPU: more than torch sees would fail in the first
    distributed step, after the tokenizer had trained, so a run refuses up front. A dry run prints the plan
    anyway (it is how a plan for a bigger machine is read on a smaller one), saying a run here would refuse.
    (On CPU the processes are gloo ranks: any count.)"""
    import torch

    if nproc_arg is None or not device.startswith("cuda"):
        return
    visible = torch.cuda.device_count()
    if nproc > visible:
        problem = (f"--nproc-per-node {nproc} starts one process per GPU, but torch sees {visible} GPU(s) "
                   "(CUDA_VISIBLE_DEVICES): pass at most that many")
        if not dry_run:
            raise ChibiError(problem)
        print(f"note: a run on this machine would refuse: {problem}")


def check_layers(layers: str, preset: Preset, scale: str) -> None:
    """--layers must fit the depth the plan pretrains (a toy-scale GPU preset's too), checked before the
    tokenizer trains rather than when pretraining starts."""
    from chibichat.model.gpt import layer_pattern

    depths = [preset.depth] + ([int(TOY_SIZES["pretrain"]["--depth"])] if preset.gpu and scale != "full" else [])
    for depth in depths:
        try:
            layer_pattern(layers, depth)
        except ChibiError as e:
            raise ChibiError(f"--layers {layers!r} (preset {preset.name}, depth {depth}): {e}") from None


def plan_tag(steps: list[Step]) -> str:
    """The checkpoint tag of a plan (every stage's --tag is pretraining's)."""
    argv = next(s.argv for s in steps if s.name == "pretrain")
    return argv[argv.index("--tag") + 1]


def read_timing(home: Home) -> dict:
    """report/timing.json: {"runs": {tag: {"stages": {step: seconds}, "wall_s": total, "budget_s": {training step:
    seconds it was given}, "partial_s": {step: seconds of an attempt that stopped part way}}}} ("budget_s" only with a
    time budget; "partial_s" only while a step is unfinished: a resume adds them to its time). Timings are kept
    per checkpoint tag, so the report of one run never shows another's. A file from before the tags keeps its
    figures under "untagged" (no run can claim them)."""
    path = home.report_dir / "timing.json"
    timing = read_json(path, "speedrun timing") if path.exists() else {"runs": {}}
    if isinstance(timing, dict) and "runs" not in timing:
        timing = {"runs": {}, "untagged": timing}
    if not isinstance(timing, dict) or not isinstance(timing["runs"], dict):
        raise ChibiError(f"speedrun timing {path} has no \"runs\" object; delete it (the report then shows the "
                         "stages' own times, and a time budget counts the finished training steps as having spent "
                         "their planned share)")
    return timing


def invalidate(home: Home, steps: list[Step], redo: list[str], records: dict, times: dict) -> None:
    """Delete the outputs and markers of every step in `redo` before anything runs: a forced step that then
    fails (or is stopped) must leave no old output after it that the next run would skip as done. Every marker
    goes first: a deletion stopped part way (Ctrl-C, a kill, an error) must not leave a marker beside outputs
    it no longer describes. `times`: this tag's timing ({"stages": {step: s}, "budget_s": {step: s}}), whose
    entries for those steps go too (their interrupted attempts' seconds, "partial_s", included)."""
    forced = [step for step in steps if step.name in redo]
    for step in forced:
        step.marker.unlink(missing_ok=True)
        records.pop(_record_key(home, step), None)
        times["stages"].pop(step.name, None)
        times.get("budget_s", {}).pop(step.name, None)
        times.get("partial_s", {}).pop(step.name, None)
    for step in forced:
        for out in step.outputs:
            if out.is_dir():
                shutil.rmtree(out)
            elif out.exists():
                out.unlink()


def for_machine(preset: Preset, device: str, dtype: str, lang: str = "en") -> Preset:
    """The preset as this machine runs it: a CPU preset with `depth_fp32` trains that depth, and in English
    with `tokenizer_fp32` that tokenizer, where its stages compute in fp32 on the CPU (`device` as
    resolved_device gives it; `dtype` the --dtype flag, auto as common.default_compute_dtype resolves it: fp32
    on a CPU without native bf16 kernels)."""
    from chibichat.common import eprint

    if preset.depth_fp32 is None or device != "cpu":
        return preset
    if dtype == "float32" or (dtype == "auto" and not cpu_has_fast_bf16()):
        why = "--dtype float32" if dtype == "float32" else "this CPU has no native bf16 kernels"
        tok = preset.tokenizer_fp32 if lang == "en" and preset.tokenizer_fp32 is not None else None
        vocab = lambda flags: f" with a {vocab_size(flags):,}-token vocabulary" if tok else ""
        eprint(f"note: preset {preset.name} trains d{preset.depth_fp32}{vocab(tok)} instead of "
               f"d{preset.depth}{vocab(preset.tokenizer)} here: its stages compute in fp32 ({why}), "
               "several times slower per step, and the smaller model learns more in the same minutes")
        return replace(preset, depth=preset.depth_fp32, tokenizer=tok or preset.tokenizer)
    return preset


def run(args) -> int:
    home = Home.resolve(args.home)
    check_home(home)
    device = resolved_device(args.device)
    preset = for_machine(pick_preset(args.preset), device, args.dtype, args.lang)
    check_layers(args.layers, preset, args.scale)
    nproc = process_count(args.nproc_per_node)
    check_processes(args.nproc_per_node, nproc, device, args.dry_run)
    if preset.gpu:
        gpu_world(nproc, "the visible GPUs, CUDA_VISIBLE_DEVICES" if args.nproc_per_node is None else
                  f"--nproc-per-node {nproc}")
    steps = plan(home, preset, args.lang, args.layers, args.device, args.dtype, training_flags(args),
                 compile_stages(args.compile, preset, device, args.dry_run), world_size=nproc,
                 scale=args.scale, minutes=args.minutes, budget=not args.no_budget)
    names = {s.name for s in steps}
    for f in args.force:
        if f not in names:
            raise ChibiError(f"--force {f!r} is not a speedrun stage; choose from: {', '.join(s.name for s in steps)}")
    redo = forced_steps(steps, args.force)
    if "tokenizer" not in redo:
        check_done_tokenizer(home, next(s for s in steps if s.name == "tokenizer"))
    records = read_step_records(home)
    check_done_flags(home, steps, redo, records, device)
    if any(runs_code(s) for s in steps):  # a dry run refuses as the run would, before the plan is printed
        check_sandbox(args.allow_weak_sandbox, "speedrun (eval chat runs HumanEval completions)")

    print(f"chibichat speedrun: preset {preset.name} ({preset.description}); lang {args.lang}; layers {args.layers}")
    print(f"home: {home.root}")
    if preset.gpu:
        fig = recipe_figures(GPU_RECIPES[preset.name], args.lang, args.layers)
        print(f"expected time and cost of the full recipe ({len(steps)} steps on {nproc} process(es)"
              f"{', run at toy scale' if args.scale != 'full' else ''}):")
        print("\n".join(estimate_lines(fig)))
        if args.lang == "ja":
            print("\n".join(JA_MISSING))
    tag = plan_tag(steps)
    timing_path = home.report_dir / "timing.json"
    timing = read_timing(home)
    times = timing["runs"].setdefault(tag, {"stages": {}})
    if redo and not args.dry_run:
        invalidate(home, steps, redo, records, times)
        atomic_write_json(step_record_path(home), {"steps": records})
        times["wall_s"] = round(sum(times["stages"].values()), 1)
        atomic_write_json(timing_path, timing)
    # The planned --minutes of the training steps (what the record holds) become, as each starts, its share
    # of what the training steps before it left of the budget (carried_minutes).
    budget = budget_minutes(preset, args.minutes, not args.no_budget)
    weights = budget_weights(steps, preset.minute_shares)
    # The ETA: this run's seconds per unit of weight of the steps it ran, times the weight of those still to run
    # (the steps it skips took none of its time).
    left_weight = sum(s.weight for s in steps)
    t_start = time.time()
    done_weight = 0.0
    for i, step in enumerate(steps, 1):
        prefix = f"[{i}/{len(steps)}] {step.name}"
        if step.name in redo and args.dry_run and step.marker.exists():
            why = "named by --force" if step.name in args.force else "reads the output of a forced step"
            print(f"{prefix}: would be redone ({why}): its outputs deleted first")
        if step.marker.exists() and step.name not in redo:
            checked = "" if recorded_flags(home, step, records) is not None else \
                " (not finished by a speedrun of this home's record: its flags are not checked)"
            print(f"{prefix}: done already ({step.marker.relative_to(home.root)}){checked}, skipping")
            left_weight -= step.weight
            continue
        argv = list(step.argv)
        # the rewritten markers whose record matches now: hashed again once this step has rewritten them
        rewritten = [s for s in steps if s.name in step.rewrites and s.marker.exists()
                     and recorded_flags(home, s, records) is not None]
        given_s = None
        if budget is not None and step.name in weights:
            given_s = 60 * carried_minutes(weights, step.name, budget, times["stages"])
            argv = set_flag(argv, "--minutes", f"{given_s / 60:.4g}")
        resumed = _has_checkpoint(step.resumable_dir) and step.name not in redo  # (a dry run deletes nothing)
        if resumed:
            argv.append("--resume")
            print(f"{prefix}: interrupted earlier, resuming from its last checkpoint")
        elapsed = time.time() - t_start
        eta = ""
        if done_weight > 0 and elapsed > 5:
            eta = f", ETA ~{(elapsed / done_weight) * left_weight / 60:.1f} min"
        how = f" (torchrun over {nproc} processes)" if step.distributed and nproc > 1 else ""
        print(f"{prefix}: {step.title}{how}{eta}\n  $ chibichat {shlex.join(argv)}", flush=True)
        if args.dry_run:
            continue
        # A resumed step goes on with the work of its interrupted attempt, so its time is that attempt's seconds
        # (partial_s, recorded when it stopped) plus this one's; a step started anew discards both.
        stopped_s = times.get("partial_s", {}).pop(step.name, 0.0)
        carried_s = stopped_s if resumed else 0.0
        if times.get("partial_s") == {}:
            del times["partial_s"]
        t0 = time.time()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        rc = None
        try:
            rc = run_step(step, argv, nproc, env)
        finally:
            if rc != 0:  # failed, or stopped by Ctrl-C / SIGTERM: recorded for the attempt that resumes it
                times.setdefault("partial_s", {})[step.name] = round(carried_s + time.time() - t0, 1)
                atomic_write_json(timing_path, timing)
        if rc != 0 and resumed:  # the stage may refuse to resume (another --dtype, --fp8, process count, ...)
            raise ChibiError(
                f"stage {step.name} failed resuming its interrupted run (exit {rc}); fix the error above and re-run "
                f"the same speedrun command (finished stages are skipped and {step.name} resumes where it can), or "
                f"pass --force {step.name} to start it anew (with every step that reads its output)")
        if rc != 0:
            raise ChibiError(
                f"stage {step.name} failed (exit {rc}); fix the error above and re-run the same speedrun "
                f"command: finished stages are skipped and {step.name} resumes where it can"
            )
        if step.speedrun_marks_done:
            atomic_write_json(step.marker, {"done": True, "argv": argv})
        if not step.marker.exists():
            raise ChibiError(f"stage {step.name} exited 0 but did not write {step.marker}; this is a bug in that stage")
        records[_record_key(home, step)] = {"flags": step_flags(step.argv, device),
                                            "marker_sha256": sha256_file(step.marker)}
        for s in rewritten:
            records[_record_key(home, s)]["marker_sha256"] = sha256_file(s.marker)
        atomic_write_json(step_record_path(home), {"steps": records})
        times["stages"][step.name] = round(carried_s + time.time() - t0, 1)
        if given_s is not None:
            times.setdefault("budget_s", {})[step.name] = round(given_s, 1)
        times["wall_s"] = round(sum(times["stages"].values()), 1)
        atomic_write_json(timing_path, timing)
        done_weight += step.weight
        left_weight -= step.weight

    if args.dry_run:
        return 0
    from chibichat.stages.report import build_report

    path = build_report(home, tag, wall_s=times.get("wall_s"))
    print(f"\nreport: {path}")
    summary = path.read_text(encoding="utf-8").split("## Summary", 1)[-1].split("\n## ", 1)[0]
    print("## Summary" + summary)
    home_flag = "" if args.home is None else f" --home {shlex.quote(str(home.root))}"
    print("\n".join(closing_lines(preset, args.lang, args.layers, home_flag, str(home.root))))
    return 0


def vocab_size(flags: list[str]) -> int:
    """The --vocab-size of a preset's `tokenizer train` flags."""
    return int(flags[flags.index("--vocab-size") + 1])


def tokenizer_flags(preset: Preset, lang: str) -> list[str]:
    """The `tokenizer train` flags a CPU preset's plan gives for `lang`."""
    return preset.tokenizer_ja if lang == "ja" and preset.tokenizer_ja is not None else preset.tokenizer


def closing_lines(preset: Preset, lang: str, layers: str, home_flag: str, home_root: str = "") -> list[str]:
    """What a finished speedrun tells the user to do next: talk to the model, and after the quickstart, the
    longer preset that makes a stronger one in the same home (its own checkpoints, the same tokenizer), or in a
    home of its own (`home_root`-hour) where the quickstart trained another tokenizer (for_machine)."""
    lines = ["Talk to your model:",
             f"  chibichat chat{home_flag}                 # streaming REPL (or -p 'question' for one shot)",
             f"  chibichat serve{home_flag}                # web page + OpenAI-compatible API on http://127.0.0.1:8000"]
    if preset.name == "cpu":
        same = (" --lang ja" if lang == "ja" else "") + ("" if layers == "dense" else f" --layers {layers}")
        hour = PRESETS["cpu-hour"]
        mine, its = tokenizer_flags(preset, lang), tokenizer_flags(hour, lang)
        if mine == its:
            lines += [f"A stronger model in ~{hour.expected_minutes} minutes more on 2 cores (a wider model, more "
                      "steps; chat and serve then pick it):",
                      f"  chibichat speedrun --preset cpu-hour{same}{home_flag}"]
        else:
            other = f" --home {shlex.quote(home_root + '-hour')}"
            lines += [f"A stronger model in ~{hour.expected_minutes} minutes more on 2 cores (a wider model, more "
                      f"steps), in a home of its own: it trains a {vocab_size(its):,}-token tokenizer, this run trained "
                      f"{vocab_size(mine):,} (chat and serve then take{other}):",
                      f"  chibichat speedrun --preset cpu-hour{same}{other}"]
    return lines
