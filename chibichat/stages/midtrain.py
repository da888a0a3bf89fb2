"""`chibichat midtrain`: teach a base model the chat format, tool calls and multiple-choice answers.

nanochat's older recipe: conversations from a task mixture are rendered with the chat template and
streamed like pretraining text (`--mode stream`: concatenated and cut into rows of seq_len + 1, so
no token is padding), and the loss is on every token, not only the assistant's. The model thereby
learns what the special tokens mean and where a turn ends, before SFT narrows the loss to the
assistant's tokens. Runs from `--from base` by default and writes checkpoints under
home/checkpoints/mid/<tag>/ with metrics.jsonl and summary.json (same machinery as `sft`, `--soup K`
included: K runs from the base, their weights averaged).
"""

from __future__ import annotations

# mmlu-dev (shipped MMLU dev+validation) teaches the multiple-choice answer format offline; arithmetic-multi
# gives the two-step problems RL later trains on a partial start (never solved => no reward signal).
# identity twice (EN): the name question was the skill that swung most between seeds (0.35-0.75 after SFT);
# two passes steadied it (docs/benchmarks.md, "identity twice").
# describe: simple sentences and two-line stories about a named topic, the only chat data whose answer is
# free prose about what the user asked (docs/benchmarks.md, "simple sentences about a named topic").
# spelling and letter-count twice: finding and copying the asked word in a new wording was the largest error;
# two passes raised the EN mean after SFT from 0.587 to 0.615 over four seeds (spelling 0.55 -> 0.73, letter
# count 0.43 -> 0.48), and the JA quickstart from 0.493 to 0.536 (one run; docs/benchmarks.md, "word tasks twice"
# and "the seed spread of the default mixture").
# zero-division: 200 calls that fail, the error as the tool's output, then "there is no answer": the only data
# where a tool output is an error, so the model learns to read one instead of continuing it with noise.
MID_MIX_EN = ("chitchat=0.5,chatterbot=1,identity=2,arithmetic=2,arithmetic-multi=1,spelling=2,letter-count=2,"
              "mmlu-dev=1,describe=1,zero-division=1")
MID_MIX_JA = ("chatterbot-ja=1,identity-ja=1,arithmetic-ja=2,arithmetic-multi-ja=1,spelling-ja=2,letter-count-ja=2,"
              "describe-ja=1,zero-division-ja=1")


def register(sub):
    from chibichat.stages.sft import add_conversation_args

    p = sub.add_parser(
        "midtrain", help="midtraining: chat format, tool calls and MC answers, streamed like pretraining",
        description=__doc__.split("\n\n")[0] + " Conversations are streamed like pretraining text (--mode "
                    "stream) and the loss covers every token.")
    add_conversation_args(p, default_from="base", steps=80, batch=8, lr_frac=1.0, mode="stream", mix_en=MID_MIX_EN,
                          mix_ja=MID_MIX_JA)
    p.set_defaults(func=run)


def run(args) -> int:
    from chibichat.stages.sft import run_stage_or_soup

    return run_stage_or_soup(args, command="midtrain", stage="mid", train_all_tokens=True, mix_en=MID_MIX_EN,
                             mix_ja=MID_MIX_JA)
