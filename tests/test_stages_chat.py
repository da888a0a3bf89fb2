"""The chat stages (midtrain, sft, rl) and their hand-offs, on a tiny model built here."""

import json

import pytest
import torch

from chibichat.cli import main
from chibichat.common import ChibiError, Home, Runtime

SEQ = 160


def _texts():
    from chibichat.tasks.registry import get_task

    out = []
    for name in ("chitchat", "chatterbot", "arithmetic", "spelling", "identity", "letter-count"):
        t = get_task(name)
        for i in range(min(len(t), 300)):
            for m in t[i]["messages"]:
                c = m["content"]
                out.append(c if isinstance(c, str) else " ".join(p["text"] for p in c))
    return out


def make_base(root, vocab=512, seed=0):
    """A tokenizer and an untrained tiny base checkpoint (with optimizer groups, as pretraining saves)."""
    from chibichat.model.gpt import GPT, GPTConfig
    from chibichat.tokenizer import train_tokenizer
    from chibichat.train.checkpoint import save_checkpoint
    from chibichat.train.optim import build_optimizer

    home = Home.resolve(root)
    tok = train_tokenizer(_texts(), vocab_size=vocab)
    tok.save(home.tokenizer_dir)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, seq_len=SEQ, n_layer=2, n_embd=32, n_head=2, n_kv_head=2))
    opt = build_optimizer(model.param_groups(), matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004,
                          other_lr=0.02, compute_dtype=torch.float32)
    meta = {"model_config": model.config.to_dict(), "tokenizer": {"hash": tok.hash, "vocab_size": tok.vocab_size},
            "corpus": "embedded-en"}
    save_checkpoint(home.checkpoints_dir("base", "d2"), 5, model, opt, meta)
    return home, tok


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("chat") / "home")


FAST = ["--device", "cpu", "--dtype", "float32", "--device-batch-size", "2", "--val-items", "4",
        "--val-batches", "1", "--no-samples"]


def run_cli(*argv):
    rc = main([str(a) for a in argv])
    assert rc == 0, argv
    return rc


def cpu_rt():
    return Runtime(device=torch.device("cpu"), compute_dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# midtrain -> sft


def test_midtrain_then_sft_end_to_end(base):
    home, tok = base
    run_cli("midtrain", "--home", home.root, "--num-steps", 2, "--tag", "e2e", "--from-tag", "d2", *FAST)
    mid = json.loads((home.checkpoints_dir("mid", "e2e") / "summary.json").read_text())
    assert mid["steps"] == 2 and mid["mode"] == "stream" and mid["loss_on"] == "all tokens"
    assert mid["source"].endswith("base/d2/step_000005")

    run_cli("sft", "--home", home.root, "--from", "mid", "--from-tag", "e2e", "--num-steps", 2, *FAST,
            "--mix", "chitchat=0.05,arithmetic=0.1")
    s = json.loads((home.checkpoints_dir("sft", "e2e") / "summary.json").read_text())  # tag inherited
    assert s["steps"] == 2 and s["loss_on"] == "assistant tokens (mask 1)" and s["mode"] == "pack"
    assert set(s["mixture"]) == {"chitchat", "arithmetic"}
    # per-task render counts; long chitchat conversations in a 96-token context must show up as shortened
    assert set(s["render_counts"]) <= {"chitchat", "arithmetic"}
    assert s["render_counts"]["chitchat"]["shortened"] + s["render_counts"]["chitchat"]["dropped"] > 0
    assert s["over_length"]["shortened"] == sum(c["shortened"] for c in s["render_counts"].values())
    lines = (home.checkpoints_dir("sft", "e2e") / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines if "loss" in json.loads(l)] == [1, 2]
    assert any("val_loss" in json.loads(l) for l in lines)


def test_sft_resume_continues_the_run(base):
    home, _ = base
    common = ["sft", "--home", home.root, "--from", "base", "--from-tag", "d2", "--tag", "res", *FAST,
              "--mix", "arithmetic=0.1", "--save-every", 1]
    run_cli(*common, "--num-steps", 2)
    run_cli(*common, "--num-steps", 3, "--resume")
    s = json.loads((home.checkpoints_dir("sft", "res") / "summary.json").read_text())
    assert s["steps"] == 3
    with pytest.raises(ChibiError, match="already holds checkpoints"):
        from chibichat.stages import sft

        args = _parse(common + ["--num-steps", "3"])
        sft.run(args)


def _parse(argv):
    from chibichat.cli import build_parser

    return build_parser().parse_args([str(a) for a in argv])


def test_stage_refuses_a_checkpoint_of_another_tokenizer(tmp_path):
    home, tok = make_base(tmp_path / "h", vocab=512)
    from chibichat.tokenizer import train_tokenizer

    other = train_tokenizer(_texts()[:2000], vocab_size=480)
    other.save(home.tokenizer_dir)
    rc = main(["sft", "--home", str(home.root), "--from", "base", "--num-steps", "1", *FAST])
    assert rc == 2  # ChibiError, printed without a traceback
    with pytest.raises(ChibiError, match="trained with tokenizer"):
        from chibichat.stages import sft

        sft.run(_parse(["sft", "--home", home.root, "--from", "base", "--num-steps", 1, *FAST]))


def test_mix_flag_errors():
    from chibichat.stages.sft import parse_mix

    assert parse_mix("chitchat=1, spelling=0.5,identity") == [("chitchat", 1.0), ("spelling", 0.5), ("identity", 1.0)]
    with pytest.raises(ChibiError, match="^--mix names 'gsm8k', an evaluation-only task"):
        parse_mix("chitchat=1,gsm8k=1")
    with pytest.raises(ChibiError, match="^unknown task 'a'"):
        parse_mix("a=1")
    with pytest.raises(ChibiError, match="not a number"):
        parse_mix("chitchat=x")
    with pytest.raises(ChibiError, match="> 0"):
        parse_mix("chitchat=0")
    with pytest.raises(ChibiError, match="names no task"):
        parse_mix(" , ")
    from chibichat.stages.sft import default_mix

    class Tok:
        def __init__(self, split):
            self.split = split

    assert default_mix(Tok("gpt4"), "a=1", "b=1") == "a=1"
    assert default_mix(Tok("ja"), "a=1", "b=1") == default_mix(Tok("ja-script"), "a=1", "b=1") == "a=1,b=1"


# ----------------------------------------------------------------------------------------------
# Hand-offs: masks survive packing, loss per supervised token, stop token


def test_sft_loss_covers_exactly_the_mask1_tokens(base):
    from chibichat.data.loader import ConversationLoader
    from chibichat.model.gpt import GPT, GPTConfig
    from chibichat.render import render_conversation
    from chibichat.stages.sft import token_loss_sum
    from chibichat.tasks.registry import get_task

    home, tok = base
    convs = [("arithmetic", get_task("arithmetic")[i]) for i in range(6)]
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, seq_len=SEQ, n_layer=1, n_embd=32, n_head=2, n_kv_head=2))
    loader = ConversationLoader(convs, tok, 3, SEQ, cpu_rt(), mode="pack", epochs=1)
    x, y = next(loader)
    # every supervised token of every packed conversation is a target, and nothing else is
    rendered = [render_conversation(tok, c, SEQ + 1) for _, c in convs]
    want = sum(sum(r.mask[1:]) for r in rendered)
    packed_targets = 0
    for xb, yb in [(x, y)] + [b for b in loader]:
        packed_targets += int((yb >= 0).sum())
        for row_x, row_y in zip(xb.tolist(), yb.tolist()):
            for t, target in enumerate(row_y):
                if target >= 0:
                    assert target != tok.bos_id
    assert packed_targets == want

    # the stage's loss equals cross-entropy over the mask-1 positions computed from full logits,
    # and the gradient w.r.t. the logits vanishes at every mask-0 position
    loss_sum, n = token_loss_sum(model, (x, y))
    logits = model(x).detach().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1,
                                           reduction="sum")
    assert n == int((y >= 0).sum())
    assert loss_sum.item() == pytest.approx(ce.item(), rel=1e-4)
    ce.backward()
    assert logits.grad[y < 0].abs().max() == 0
    assert logits.grad[y >= 0].abs().sum() > 0


def test_grad_accum_averages_per_supervised_token(base, tmp_path):
    """One step of batch 2 equals one step of 2 micro-batches of 1 row (rows of unequal target
    counts): only true when the loss is a per-token mean over the whole step."""
    import shutil

    home, _ = base
    h2 = tmp_path / "copy"
    shutil.copytree(home.root, h2)
    common = ["sft", "--home", h2, "--from", "base", "--from-tag", "d2", "--num-steps", 1, "--device", "cpu",
              "--dtype", "float32", "--val-items", "4", "--val-batches", "1", "--mix", "chitchat=0.02,arithmetic=0.02",
              "--mode", "pad", "--warmdown-frac", "0"]
    run_cli(*common, "--tag", "one", "--device-batch-size", 2, "--grad-accum", 1)
    run_cli(*common, "--tag", "two", "--device-batch-size", 1, "--grad-accum", 2)
    # the memory flags reach the stage and change what is stored, never the numbers
    run_cli(*common, "--tag", "rec", "--device-batch-size", 2, "--grad-accum", 1, "--recompute", "block", "--trim-heap")
    from safetensors.torch import load_file

    a = load_file(str(Home.resolve(h2).checkpoints_dir("sft", "one") / "step_000001" / "model.safetensors"))
    b = load_file(str(Home.resolve(h2).checkpoints_dir("sft", "two") / "step_000001" / "model.safetensors"))
    base_w = load_file(str(Home.resolve(h2).checkpoints_dir("base", "d2") / "step_000005" / "model.safetensors"))
    assert any(not torch.equal(a[k], base_w[k]) for k in a)  # the step did change the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    rec = load_file(str(Home.resolve(h2).checkpoints_dir("sft", "rec") / "step_000001" / "model.safetensors"))
    assert all(torch.equal(a[k], rec[k]) for k in a)
    meta = json.loads((Home.resolve(h2).checkpoints_dir("sft", "rec") / "step_000001" / "meta.json").read_text())
    assert meta["flags"]["recompute"] == "block" and meta["flags"]["trim_heap"] is True  # recorded with the run


def test_engine_stops_on_the_token_the_renderer_ends_turns_with(base):
    from chibichat.engine import Engine
    from chibichat.model.gpt import GPT, GPTConfig
    from chibichat.render import render_conversation, render_for_completion

    home, tok = base
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    r = render_conversation(tok, conv, SEQ + 1)
    end = tok.special_id("<|assistant_end|>")
    assert r.ids[-1] == end and r.mask[-1] == 1  # the model is trained to emit it
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, seq_len=SEQ, n_layer=1, n_embd=32, n_head=2, n_kv_head=2))
    eng = Engine(model, tok, cpu_rt())
    assert end in eng.stop_ids

    hello = tok.encode("hello")
    real_forward = model.forward

    def scripted(idx, state=None, **options):  # a model that says "hello" then ends its turn
        logits = real_forward(idx, state=state, **options)
        k = int(state.pos[0]) - len(prompt)
        want = (hello + [end])[min(k, len(hello))]
        out = torch.full_like(logits, -1e4)
        out[..., want] = 1e4
        return out

    prompt = render_for_completion(tok, conv, SEQ)
    model.forward = scripted
    s = eng.generate([prompt], max_tokens=20, temperature=0.0)[0][0]
    assert s.finish_reason == "stop" and s.tokens == hello + [end] and s.text == "hello"


# ----------------------------------------------------------------------------------------------
# RL


def test_group_advantages_and_rows_by_hand():
    from chibichat.stages.rl import group_advantages, sample_rows

    assert group_advantages([[1, 0, 0, 1], [1, 1, 1]]) == [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0]]
    # prompt 1 2 3, completion 4 5 6 7 with 5 forced by a tool: targets are the sampled tokens only
    x, y, w = sample_rows([1, 2, 3], [4, 5, 6, 7], [0, 1, 0, 0], 0.5, pad_id=0, width=10)
    assert x == [1, 2, 3, 4, 5, 6, 7, 0, 0, 0]
    assert y == [-1, -1, 4, -1, 6, 7, -1, -1, -1, -1]
    assert w == [0, 0, 0.5, 0, 0.5, 0.5, 0, 0, 0, 0]
    with pytest.raises(ChibiError, match="exceeds the row"):
        sample_rows([1] * 8, [2] * 4, [0] * 4, 1.0, 0, width=10)
    # a flag per token, never zipped short; and a prompt to predict the first completion token from
    with pytest.raises(ChibiError, match="has 3 tokens but 2 forced flags"):
        sample_rows([1], [5, 6, 7], [0, 1], 1.0, 0, 8)
    with pytest.raises(ChibiError, match="needs a non-empty prompt"):
        sample_rows([], [5, 6, 7], [0, 0, 0], 1.0, 0, 8)


def test_flat_groups_are_dropped_and_reward_windows_by_hand():
    from chibichat.stages.rl import group_advantages, informative_groups, reward_windows

    adv = group_advantages([[1, 1, 1], [0, 1, 0], [0, 0, 0], [0.5, 0.25, 0.25]])
    assert informative_groups(adv) == [1, 3]
    assert informative_groups(group_advantages([[1, 1], [0, 0]])) == [0]  # all flat: one zero-weight group
    # equal rewards whose float mean is not exactly the reward are flat too (0.1 * 3 / 3 != 0.1)
    assert group_advantages([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7]]) == [[0.0] * 3, [0.0] * 3]
    assert informative_groups(group_advantages([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7], [0.1, 0.7, 0.1]])) == [2]
    assert reward_windows([0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 0.0]) == pytest.approx([0.1, 0.5, 0.9, 1.0, 0.5])
    assert reward_windows([0.25, 0.75]) == [0.25, 0.75]  # fewer batches than windows: one per batch
    from chibichat.stages.rl import windows_label

    # ... so they are named as steps, not fifths (3 values were printed "by fifths of the run")
    assert windows_label([0.25, 0.75]) == "step" and windows_label([0.1] * 5) == "fifths of the run"
    assert reward_windows([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0], windows=3) == pytest.approx([0.5, 2 / 3, 1.0])  # slices 2, 3, 2
    with pytest.raises(ChibiError, match="no reward"):
        reward_windows([])


def _tiny(vocab, seed=0, seq=SEQ):
    from chibichat.model.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, seq_len=seq, n_layer=1, n_embd=32, n_head=2, n_kv_head=2))


def test_pg_loss_is_minus_logp_times_advantage_and_moves_probability():
    from chibichat.stages.rl import pg_loss_sum, sample_rows

    model = _tiny(64)
    prompt = [1, 2, 3]
    good, bad = [10, 11, 12], [20, 21, 22]
    rows = [sample_rows(prompt, good, [0, 0, 0], 0.5, 0, 8), sample_rows(prompt, bad, [0, 0, 0], -0.5, 0, 8)]
    x, y, w = (torch.tensor([r[k] for r in rows], dtype=torch.float32 if k == 2 else torch.long) for k in range(3))
    loss, n = pg_loss_sum(model, (x, y, w))
    logp = torch.log_softmax(model(x), -1)
    manual = -sum(logp[b, t, y[b, t]] * w[b, t] for b in range(2) for t in range(8) if y[b, t] >= 0)
    assert n == 6 and loss.item() == pytest.approx(manual.item(), rel=1e-4, abs=1e-5)

    def seq_logp():
        with torch.no_grad():
            lp = torch.log_softmax(model(x), -1)
        return [sum(lp[b, t, y[b, t]].item() for t in range(8) if y[b, t] >= 0) for b in range(2)]

    before = seq_logp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    (loss / n).backward()
    opt.step()
    after = seq_logp()
    assert after[0] > before[0] and after[1] < before[1]  # rewarded sample up, penalised one down


class _VowelTask:
    """A generative toy task: reward = fraction of the completion's characters that are vowels."""

    name, kind = "vowels", "generative"

    def __init__(self, n=64):
        self.items = [{"messages": [{"role": "user", "content": f"say vowels {i}"}]} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def shuffled(self, seed):
        return self

    def evaluate(self, item, text):
        return sum(c in "aeiou" for c in text) / max(len(text), 1)


def test_rollouts_are_seeded_per_batch_and_resume_exactly(base):
    from chibichat.engine import Engine
    from chibichat.stages.rl import RolloutBatches

    _, tok = base
    model = _tiny(tok.vocab_size)
    eng = Engine(model, tok, cpu_rt())
    mk = lambda: RolloutBatches(eng, tok, _VowelTask(), cpu_rt(), prompts=2, samples=3, max_tokens=6,
                                temperature=1.0, top_k=None, seed=3)
    a = mk()
    first = next(a)
    state = a.state_dict()
    second = next(a)
    b = mk()
    b.load_state_dict(json.loads(json.dumps(state)))
    again = next(b)
    for t1, t2 in zip(second[:3], again[:3]):
        assert torch.equal(t1, t2)
    assert second[3] == again[3]
    assert not torch.equal(first[0][:, :4], second[0][:, :4]) or not torch.equal(first[1], second[1])
    x, y, w, share = first
    assert share == (2, 2) or share[1] == 2  # (groups with a signal, groups drawn)
    assert x.shape[0] == 6 and y.shape == x.shape == w.shape
    # each prompt's 3 advantages sum to zero; weights sit exactly on the target positions
    per_row = [float(w[r][y[r] >= 0][0]) if (y[r] >= 0).any() else 0.0 for r in range(6)]
    assert sum(per_row[:3]) == pytest.approx(0, abs=1e-6) and sum(per_row[3:]) == pytest.approx(0, abs=1e-6)
    assert bool(((w != 0) <= (y >= 0)).all())
    assert len(a.history) == 2 and 0 <= a.history[0]["reward"] <= 1


def test_rollouts_refuse_fewer_prompts_than_ranks_on_every_rank(base):
    """2 ranks and 1 training prompt: every rank stops with the same error naming the cause (before, the rank
    left without a prompt said "lower --max-new-tokens" while the other waited in the pass@k gather)."""
    from types import SimpleNamespace

    from chibichat.stages.rl import RolloutBatches

    _, tok = base
    for rank in (0, 1):
        with pytest.raises(ChibiError) as e:
            RolloutBatches(SimpleNamespace(seq_len=1 << 20), tok, _VowelTask(1), SimpleNamespace(rank=rank, world_size=2),
                           prompts=2, samples=2, max_tokens=8, temperature=1.0, top_k=None, seed=1)
        assert str(e.value) == ("task 'vowels' has 1 training prompt(s) for 2 ranks, and every rank samples prompts "
                                "of its own; use more prompts (--train-items for a generated task) or run with at "
                                "most 1 rank(s)")


class _HalfFlatTask(_VowelTask):
    """Item 0 always earns 1 (a flat group: nothing to learn); the others earn the vowel fraction."""

    def evaluate(self, item, text):
        return 1.0 if item is self.items[0] else super().evaluate(item, text)


def test_rollouts_leave_out_groups_with_equal_rewards(base):
    from chibichat.engine import Engine
    from chibichat.stages.rl import RolloutBatches, signal_share

    _, tok = base
    eng = Engine(_tiny(tok.vocab_size), tok, cpu_rt())
    src = RolloutBatches(eng, tok, _HalfFlatTask(2), cpu_rt(), prompts=2, samples=3, max_tokens=6,
                         temperature=1.0, top_k=None, seed=3)
    batch = next(src)
    x, y, w = batch[:3]
    assert x.shape[0] == 3  # only the second prompt's group of 3 samples is trained on
    assert src.history[0]["groups_used"] == 0.5
    # ... and the step's learning rate is halved: one of the two groups carries a signal
    assert signal_share(batch) == (1, 2)
    # its own mean reward still counts the flat group: (1 + mean vowel share of the other group) / 2
    assert 0.5 <= src.history[0]["reward"] <= 1.0


@pytest.mark.slow
def test_rl_raises_the_reward_of_a_toy_task(base, tmp_path):
    """The whole RL path (engine rollouts, advantages, loss, shared loop) raises a verifiable reward."""
    from chibichat.engine import Engine
    from chibichat.stages.rl import RolloutBatches, pg_loss_sum
    from chibichat.train.loop import LoopConfig, train
    from chibichat.train.optim import build_optimizer

    _, tok = base
    model = _tiny(tok.vocab_size, seed=2)
    rt = cpu_rt()
    src = RolloutBatches(Engine(model, tok, rt), tok, _VowelTask(), rt, prompts=4, samples=8, max_tokens=4,
                         temperature=1.0, top_k=None, seed=0)
    opt = build_optimizer(model.param_groups(), matrix_lr=0.05, embedding_lr=0.05, unembedding_lr=0.05,
                          other_lr=0.05, compute_dtype=torch.float32)
    # as the rl stage does: once every sample of a step earns the same reward (the task solved, as on some
    # machines by step 13) the step has no advantage to learn from and is skipped, not an error
    cfg = LoopConfig(tag_dir=tmp_path / "rl", num_steps=16, momentum_warmup_steps=0, warmdown_frac=0.0,
                     skip_empty_steps=True)
    train(model, opt, src, pg_loss_sum, rt, cfg, meta={"model_config": model.config.to_dict()})
    r = [h["reward"] for h in src.history]
    # measured: 0.20 -> ~0.5 over 16 steps; chance level is ~0.2
    assert sum(r[-4:]) / 4 > sum(r[:4]) / 4 + 0.1, r


def test_rl_stage_end_to_end(base, capsys):
    home, _ = base
    run_cli("rl", "--home", home.root, "--from", "base", "--from-tag", "d2", "--tag", "rl1", "--device", "cpu",
            "--dtype", "float32", "--num-steps", 2, "--prompts-per-step", 2, "--num-samples", 2,
            "--max-new-tokens", 8, "--passk-items", 2, "--passk-k", 2, "--task", "spelling")
    d = home.checkpoints_dir("rl", "rl1")
    s = json.loads((d / "summary.json").read_text())
    assert s["steps"] == 2 and len(s["reward_curve"]) == 2 and s["task"] == "spelling"
    assert "rl: reward by step " in capsys.readouterr().out  # two steps: not "by fifths of the run"
    from chibichat.stages.report import build_report

    assert "| mean reward by step |" in build_report(home, "rl1").read_text()
    assert s["reward_windows"] == s["reward_curve"] and s["reward_last"] == s["reward_curve"][-1]
    assert 0.0 <= s["groups_used"] <= 1.0
    assert set(s["pass_at_k_before"]) == {"pass@1", "pass@2", "n", "skipped_too_long"}
    assert s["pass_at_k_after"]["n"] == 2
    rewards = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rewards if "reward" in r] == [1, 2]
    with pytest.raises(ChibiError, match="^--task names 'gsm8k', an evaluation-only task"):
        from chibichat.stages import rl

        rl.run(_parse(["rl", "--home", home.root, "--from", "base", "--task", "gsm8k"]))


def test_rl_resume_refusals_come_before_the_pass_at_k_evaluation(base, monkeypatch):
    """A resume that would be refused (other sampling, another schedule) says so before RL spends minutes on
    its pass@k evaluation, not after it."""
    from chibichat.stages import rl

    home, _ = base
    common = ["rl", "--home", home.root, "--from", "base", "--from-tag", "d2", "--tag", "rlr", "--device", "cpu",
              "--dtype", "float32", "--prompts-per-step", 2, "--num-samples", 2, "--max-new-tokens", 8,
              "--passk-items", 2, "--passk-k", 2, "--task", "spelling", "--save-every", 1]
    run_cli(*common, "--num-steps", 2)
    (home.checkpoints_dir("rl", "rlr") / "summary.json").unlink()  # as if killed after its last save

    def no_eval(*a, **k):
        raise AssertionError("pass@k evaluated before the resume was checked")

    monkeypatch.setattr(rl, "pass_at_k_eval", no_eval)
    with pytest.raises(ChibiError, match=r"^--resume: the saved RL run sampled another prompt stream \(temperature: "
                                         r"saved 1.0, now 0.7\)"):
        rl.run(_parse([*common, "--num-steps", 2, "--resume", "--temperature", 0.7]))
    with pytest.raises(ChibiError, match=r"^--resume: .*warmdown"):
        rl.run(_parse([*common, "--num-steps", 2, "--resume", "--warmdown-frac", 0.9]))
    with pytest.raises(AssertionError, match="pass@k evaluated before"):  # the same flags: on to the evaluation
        rl.run(_parse([*common, "--num-steps", 2, "--resume"]))


def test_rl_on_several_generated_tasks_takes_them_in_turn(base, tmp_path):
    """`--task a,b`: the prompts of both tasks in turn, pass@k on both test splits, each reply scored by the
    checker of the task its prompt came from; lists that cannot work are refused before a model loads."""
    from chibichat.stages import rl
    from chibichat.tasks.base import TaskUnion
    from chibichat.tasks.registry import get_task

    home, _ = base
    args = _parse(["rl", "--home", home.root, "--from", "base", "--task", "arithmetic,spelling", "--train-items", 5,
                   "--passk-items", 3, "--seed", 1])
    task, eval_task = rl._tasks(args, home)
    assert isinstance(task, TaskUnion) and task.name == "arithmetic,spelling" and len(task) == 10
    assert [task[i]["source_task"] for i in range(4)] == ["arithmetic", "spelling", "arithmetic", "spelling"]
    arith, spell = get_task("arithmetic", split="train", size=5, seed=1), get_task("spelling", split="train", size=5, seed=1)
    assert {k: v for k, v in task[2].items() if k != "source_task"} == arith[1]
    assert [eval_task[i]["key"] for i in range(6)] == [t[j]["key"] for j in range(3) for t in (
        get_task("arithmetic", split="test", size=3), get_task("spelling", split="test", size=3))]
    # each item goes to its own task's checker: a spelling answer is right for the spelling item only
    it = task[1]
    reply = f"{it['answer']}"
    assert task.evaluate(it, reply) is True and spell.evaluate(spell[0], reply) is True
    assert not task.evaluate(task[0], reply)
    with pytest.raises(ChibiError, match="^task union 'arithmetic,spelling': the item comes from 'gsm8k', not one"):
        task.evaluate({**it, "source_task": "gsm8k"}, reply)

    # Under torchrun each rank takes every W-th prompt of the shuffled union: with two tasks in turn and two
    # ranks, each rank still sees both tasks (the shuffle comes first), and the ranks together see every prompt once.
    from types import SimpleNamespace

    from chibichat.tokenizer import Tokenizer

    tok = Tokenizer.load(home.tokenizer_dir)
    big = TaskUnion([get_task("arithmetic", split="train", size=40, seed=1),
                     get_task("spelling", split="train", size=40, seed=1)])
    strides = [rl.RolloutBatches(SimpleNamespace(seq_len=1 << 20), tok, big, SimpleNamespace(rank=r, world_size=2),
                                 prompts=2, samples=2, max_tokens=8, temperature=1.0, top_k=None, seed=1).items
               for r in (0, 1)]
    keys = [[(it["source_task"], it["key"]) for it, _ in items] for items in strides]
    assert all({t for t, _ in k} == {"arithmetic", "spelling"} for k in keys)
    assert sorted(keys[0] + keys[1]) == sorted((big[i]["source_task"], big[i]["key"]) for i in range(80))

    run_cli("rl", "--home", home.root, "--from", "base", "--from-tag", "d2", "--tag", "rl2", "--device", "cpu",
            "--dtype", "float32", "--num-steps", 1, "--prompts-per-step", 2, "--num-samples", 2, "--max-new-tokens", 8,
            "--passk-items", 2, "--passk-k", 2, "--task", "arithmetic,spelling")
    s = json.loads((home.checkpoints_dir("rl", "rl2") / "summary.json").read_text())
    assert s["task"] == s["eval_task"] == "arithmetic,spelling" and s["pass_at_k_after"]["n"] == 2

    def refused(task, *more):
        with pytest.raises(ChibiError) as e:
            rl.run(_parse(["rl", "--home", home.root, "--from", "base", "--task", task, *more]))
        return str(e.value)

    assert refused("arithmetic,spelling", "--eval-task", "gsm8k") == (
        "--task arithmetic,spelling lists 2 tasks; their held-out prompts are their own test splits, so drop "
        "--eval-task, or name the one task it goes with (e.g. --task gsm8k-train --eval-task gsm8k)")
    # the default --task is a list too: --eval-task alone is refused with the same fix
    with pytest.raises(ChibiError, match=r"^--task arithmetic,arithmetic-multi \(the default\) lists 2 tasks"):
        rl.run(_parse(["rl", "--home", home.root, "--from", "base", "--eval-task", "gsm8k"]))
    assert refused("arithmetic,,spelling").startswith("--task 'arithmetic,,spelling' has an empty name")
    assert refused("spelling,spelling") == "--task 'spelling,spelling' names a task twice"
    assert refused("arithmetic,gsm8k").startswith("--task names 'gsm8k', an evaluation-only task")
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": "What is 2 plus 2?", "answer": "4", "match": "numeric"}) + "\n")
    assert refused(f"arithmetic,file:{qa}") == (
        f"--task lists several tasks, so each must be a generated one with its own test split; file:{qa} is not. "
        "Give that task alone with --eval-task")
    with pytest.raises(ChibiError, match="^a task union needs at least two tasks"):
        TaskUnion([arith])
    with pytest.raises(ChibiError, match=r"^a task union lists a task twice: \['arithmetic', 'arithmetic'\]"):
        TaskUnion([arith, arith])
    with pytest.raises(ChibiError, match=r"^a task union takes generative tasks .*identity: conversation"):
        TaskUnion([arith, get_task("identity")])


# ----------------------------------------------------------------------------------------------
# Evaluations of real (tiny) checkpoints through the CLI


def test_eval_chat_cli_writes_items_and_summary(base, capsys):
    home, _ = base
    run_cli("sft", "--home", home.root, "--from", "base", "--from-tag", "d2", "--tag", "ev", "--num-steps", 1,
            *FAST, "--mix", "arithmetic=0.05")
    run_cli("eval", "chat", "--home", home.root, "--from", "sft", "--tag", "ev", "--device", "cpu", "--dtype",
            "float32", "--tasks", "arc-easy,spelling", "--max-items", 3, "--max-new-tokens", 8)
    out = home.eval_dir("sft", "ev")
    s = json.loads((out / "summary.json").read_text())
    assert s["arc_easy_n"] + s["arc_easy_skipped_too_long"] == 3 and s["spelling_n"] == 3
    assert "chatcore_partial" in s and "spelling" in s["chatcore_tasks"]  # not the full ChatCORE set
    rows = [json.loads(l) for l in (out / "chat_spelling.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["n_samples"] == 1 for r in rows)
    assert (out / "chat_arc_easy.csv").read_text().startswith("task,index,status")
    assert s["chat_eval"]["max_items"] == 3 and s["chat_eval"]["top_k"] == 50 and s["chat_eval"]["seed"] is None
    # a later eval of the same checkpoint with the same settings on your own file adds to the record;
    # ChatCORE is left as it was
    qa = home.root / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": "What is 2 plus 2?", "answer": "4", "match": "numeric"}) + "\n")
    run_cli("eval", "chat", "--home", home.root, "--from", "sft", "--tag", "ev", "--device", "cpu", "--dtype",
            "float32", "--tasks", f"file:{qa}", "--max-items", 3, "--max-new-tokens", 8)
    s2 = json.loads((out / "summary.json").read_text())
    assert [t["task"] for t in s2["chat_eval"]["tasks"]] == ["arc-easy", "spelling", f"file:{qa}"]
    assert (s2["chatcore_partial"], s2["chatcore_tasks"]) == (s["chatcore_partial"], s["chatcore_tasks"])
    from chibichat.eval.chat import summary_key

    assert s2[f"{summary_key(f'file:{qa}')}_n"] == 1
    # one task again: it replaces its own entry, and ChatCORE is recomputed over the record (same items,
    # same greedy replies: the same value)
    run_cli("eval", "chat", "--home", home.root, "--from", "sft", "--tag", "ev", "--device", "cpu", "--dtype",
            "float32", "--tasks", "spelling", "--max-items", 3, "--max-new-tokens", 8)
    s3 = json.loads((out / "summary.json").read_text())
    assert [t["task"] for t in s3["chat_eval"]["tasks"]] == ["arc-easy", f"file:{qa}", "spelling"]
    assert s3["chatcore_partial"] == pytest.approx(s["chatcore_partial"])
    assert sorted(s3["chatcore_tasks"]) == sorted(s["chatcore_tasks"])
    # each task keeps the settings it was scored under
    assert all(t["settings"]["max_items"] == 3 for t in s3["chat_eval"]["tasks"])
    # your own file scored with other settings (the README's walkthrough: the defaults, not the speedrun's) keeps
    # the record's ChatCORE tasks, each with its own settings
    capsys.readouterr()
    run_cli("eval", "chat", "--home", home.root, "--from", "sft", "--tag", "ev", "--device", "cpu", "--dtype",
            "float32", "--tasks", f"file:{qa}", "--max-items", 5, "--max-new-tokens", 8)
    assert "dropped" not in capsys.readouterr().out
    s6 = json.loads((out / "summary.json").read_text())
    assert [(t["task"], t["settings"]["max_items"]) for t in s6["chat_eval"]["tasks"]] == [
        ("arc-easy", 3), ("spelling", 3), (f"file:{qa}", 5)]
    assert s6["chatcore_partial"] == pytest.approx(s["chatcore_partial"])
    # ChatCORE tasks scored on other test sets (as if arc-easy and spelling had been scored --test-sets online)
    # are a different test: a ChatCORE task scored now drops them, and the run says so; your file keeps its score
    online = json.loads((out / "summary.json").read_text())
    for t in online["chat_eval"]["tasks"]:
        t["settings"]["test_sets"] = "online"
    (out / "summary.json").write_text(json.dumps(online))
    run_cli("eval", "chat", "--home", home.root, "--from", "sft", "--tag", "ev", "--device", "cpu", "--dtype",
            "float32", "--tasks", "spelling", "--max-items", 3, "--max-new-tokens", 8)
    assert ("dropped the earlier scores of arc-easy from the record, with their per-item files: ChatCORE averages its "
            "tasks under one setting, and they were scored with other settings (test_sets 'online', now "
            "'shipped')") in capsys.readouterr().out
    s5 = json.loads((out / "summary.json").read_text())
    assert [t["task"] for t in s5["chat_eval"]["tasks"]] == [f"file:{qa}", "spelling"]
    assert s5["chatcore_tasks"] == ["spelling"] and not any(k.startswith("arc_easy") for k in s5)
    assert s5["chat_eval"]["tasks"][0]["settings"]["test_sets"] == "online"  # as its entry said
    assert sorted(p.name for p in out.iterdir()) == ["chat_file_qa.csv", "chat_file_qa.jsonl", "chat_spelling.csv",
                                                      "chat_spelling.jsonl", "summary.json"]
    # a record from before the settings were kept per task: its tasks take the record's settings
    legacy = json.loads((out / "summary.json").read_text())
    for t in legacy["chat_eval"]["tasks"]:
        del t["settings"]
    legacy["chat_eval"]["max_items"] = 7
    (out / "summary.json").write_text(json.dumps(legacy))
    run_cli("eval", "chat", "--home", home.root, "--from", "sft", "--tag", "ev", "--device", "cpu", "--dtype",
            "float32", "--tasks", "arc-easy", "--max-items", 3, "--max-new-tokens", 8)
    assert "dropped the earlier scores of spelling" in capsys.readouterr().out  # max_items 7, now 3
    s7 = json.loads((out / "summary.json").read_text())
    assert [(t["task"], t["settings"]["max_items"]) for t in s7["chat_eval"]["tasks"]] == [
        (f"file:{qa}", 7), ("arc-easy", 3)]
    # scores of another step of the stage (trained again since) are dropped, never left beside new ones
    s3["chat_eval"]["step"] = -1
    s3["chatcore"] = 0.9  # as if the earlier step had had the full ChatCORE set
    (out / "summary.json").write_text(json.dumps(s3))
    run_cli("eval", "chat", "--home", home.root, "--from", "sft", "--tag", "ev", "--device", "cpu", "--dtype",
            "float32", "--tasks", "arc-easy", "--max-items", 3)
    s4 = json.loads((out / "summary.json").read_text())
    assert [t["task"] for t in s4["chat_eval"]["tasks"]] == ["arc-easy"]
    assert "chatcore" not in s4 and s4["chatcore_tasks"] == ["arc-easy"]
    assert not any(k.startswith(("spelling", summary_key(f"file:{qa}"))) for k in s4)
    assert s4["arc_easy_n"] + s4["arc_easy_skipped_too_long"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["chat_arc_easy.csv", "chat_arc_easy.jsonl", "summary.json"]


def test_eval_chat_seed_chooses_the_samples(base):
    """--seed: at --temperature > 0 item i samples with seed + i, so a run repeats with its seed and another
    seed draws other replies; the seed is a record setting (scores of another seed are another test)."""
    home, _ = base
    run_cli("sft", "--home", home.root, "--from", "base", "--from-tag", "d2", "--tag", "sd", "--num-steps", 1,
            *FAST, "--mix", "arithmetic=0.05")
    out = home.eval_dir("sft", "sd")

    def completions(seed):
        run_cli("eval", "chat", "--home", home.root, "--from", "sft", "--tag", "sd", "--device", "cpu", "--dtype",
                "float32", "--tasks", "spelling", "--max-items", 4, "--max-new-tokens", 12, "--temperature", 1.0,
                "--seed", seed)
        assert json.loads((out / "summary.json").read_text())["chat_eval"]["seed"] == seed
        return [json.loads(l)["completion"] for l in (out / "chat_spelling.jsonl").read_text().splitlines()]

    first = completions(3)
    assert completions(3) == first and completions(4) != first


def test_core_on_shipped_tasks_with_a_real_model(base, tmp_path):
    import argparse

    from chibichat.eval.core import run_core
    from chibichat.train.checkpoint import load_model

    home, tok = base
    model, _ = load_model(home, "base", "d2", None, cpu_rt(), tokenizer=tok)
    args = argparse.Namespace(core_tasks="core-copa,core-lambada", core_items=4, eval_batch_size=4)
    out = run_core(model, tok, cpu_rt(), tmp_path, args)
    assert out["core_label"] == "CORE-lite" and {t["name"] for t in out["core_tasks"]} == {"core-copa", "core-lambada"}
    scored = [t for t in out["core_tasks"] if t["n_scored"]]
    assert out["core"] == pytest.approx(sum(t["centered"] for t in scored) / len(scored))
    assert all(t["n_scored"] + t["n_skipped_too_long"] == 4 for t in out["core_tasks"])
    assert len((tmp_path / "core.jsonl").read_text().splitlines()) == 8


def test_eval_jglue_cli(base, tmp_path):
    from test_eval_core import _write_jglue

    home, _ = base
    _write_jglue(tmp_path / "jglue")
    run_cli("eval", "jglue", "--home", home.root, "--from", "base", "--tag", "d2", "--device", "cpu", "--dtype",
            "float32", "--jglue-dir", tmp_path / "jglue", "--shots", 1, "--jsquad-shots", 0, "--jsquad-max-tokens", 4)
    s = json.loads((home.eval_dir("base", "d2") / "summary.json").read_text())
    for k in ("jcommonsenseqa", "jnli", "jsts_pearson", "jsts_spearman", "jsquad_em", "jsquad_f1"):
        assert k in s
    assert s["jcommonsenseqa_n"] + s["jcommonsenseqa_skipped_too_long"] == 5
    assert 0.0 <= s["jsquad_f1"] <= 1.0
    rc = main(["eval", "jglue", "--home", str(home.root), "--from", "base", "--jglue-dir", str(tmp_path / "nope")])
    assert rc == 2


def test_eval_jglue_rerun_keeps_earlier_tasks_only_for_the_same_test(base, tmp_path, capsys):
    import os
    import shutil

    from test_eval_core import _write_jglue

    home, _ = base
    out = home.eval_dir("base", "d2")
    shutil.rmtree(out, ignore_errors=True)  # the keys and files below are exactly this test's
    _write_jglue(tmp_path / "jglue")
    common = ["eval", "jglue", "--home", home.root, "--from", "base", "--tag", "d2", "--device", "cpu", "--dtype",
              "float32", "--jglue-dir", tmp_path / "jglue", "--jsquad-shots", 0, "--jsquad-max-tokens", 4]
    keys = {"jcommonsenseqa": {"jcommonsenseqa", "jcommonsenseqa_centered", "jcommonsenseqa_n",
                               "jcommonsenseqa_skipped_too_long"},
            "jnli": {"jnli", "jnli_centered", "jnli_n", "jnli_skipped_too_long"},
            "jsts": {"jsts_pearson", "jsts_spearman", "jsts_n", "jsts_skipped_too_long"},
            "jsquad": {"jsquad_em", "jsquad_f1", "jsquad_n", "jsquad_skipped_too_long"}}

    def state():
        """summary.json, its keys, the files of the eval dir, the tasks the record lists."""
        s = json.loads((out / "summary.json").read_text())
        return s, set(s) - {"jglue_eval"}, sorted(p.name for p in out.iterdir()), list(s["jglue_eval"]["files"])

    def expect(s, *tasks):
        """The keys and files of exactly these tasks (a task whose items did not fit, or whose similarities were
        all one, has its note too)."""
        notes = {f"{t}_note" for t in tasks} & set(s)
        return (set().union(*(keys[t] for t in tasks)) | notes,
                sorted([f"{t}.{e}" for t in tasks for e in ("csv", "jsonl")] + ["summary.json"]))

    run_cli(*common, "--shots", 1)
    s1, k1, f1, listed = state()
    assert (k1, f1) == expect(s1, *keys) and listed == list(keys)
    # (a) fewer tasks, same checkpoint and settings: the others are kept, with their files, and the record
    # lists them
    run_cli(*common, "--shots", 1, "--tasks", "jnli")
    s2, k2, f2, listed = state()
    assert (k2, f2, listed) == (k1, f1, ["jcommonsenseqa", "jsts", "jsquad", "jnli"])
    assert {k: s2[k] for k in k1} == {k: s1[k] for k in k1}  # the same model: jnli scores the same
    assert s2["jglue_eval"]["step"] == 5 and s2["jglue_eval"]["shots"] == 1
    # (b) other settings (--shots 2): another test; the earlier tasks go, keys and files, and the run says so
    capsys.readouterr()
    run_cli(*common, "--shots", 2, "--tasks", "jnli")
    assert ("dropped the earlier scores of jcommonsenseqa, jsts, jsquad from the record, with their per-item "
            "files: they were scored with other settings (shots 1, now 2)") in capsys.readouterr().out
    s3, k3, f3, listed = state()
    assert (k3, f3, listed) == (*expect(s3, "jnli"), ["jnli"])
    # (b) another checkpoint: the same step trained again (its meta.json rewritten) is another test too
    run_cli(*common, "--shots", 2, "--tasks", "jsquad,jsts")
    assert state()[3] == ["jnli", "jsquad", "jsts"]
    meta = home.checkpoints_dir("base", "d2") / "step_000005" / "meta.json"
    st = meta.stat()
    os.utime(meta, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    capsys.readouterr()
    run_cli(*common, "--shots", 2, "--tasks", "jsts")
    said = capsys.readouterr().out
    assert "dropped the earlier scores of jnli, jsquad from the record" in said and "checkpoint_mtime_ns" in said
    s4, k4, f4, listed = state()
    assert (k4, f4, listed) == (*expect(s4, "jsts"), ["jsts"])
    # JGLUE scores no record lists (an older chibichat's) go too, whatever the settings
    s = json.loads((out / "summary.json").read_text())
    s["jglue_eval"]["files"] = {}
    (out / "summary.json").write_text(json.dumps(s))
    capsys.readouterr()
    run_cli(*common, "--shots", 2, "--tasks", "jnli")
    assert ("dropped the scores of jsts, which no jglue_eval record lists, with their per-item files"
            in capsys.readouterr().out)
    s5, k5, f5, listed = state()
    assert (k5, f5, listed) == (*expect(s5, "jnli"), ["jnli"])


def test_eval_base_cli_adds_core_lite(base):
    home, _ = base
    run_cli("eval", "base", "--home", home.root, "--from", "base", "--tag", "d2", "--device", "cpu", "--dtype",
            "float32", "--eval-tokens", 320, "--device-batch", 2, "--sample-tokens", 2, "--core-tasks", "core-copa,core-winogrande",
            "--core-items", 5)
    s = json.loads((home.eval_dir("base", "d2") / "summary.json").read_text())
    assert "val_bpb" in s and s["core_label"] == "CORE-lite" and s["core_items_per_task"] == 5
    assert {t["name"] for t in s["core_tasks"]} == {"core-copa", "core-winogrande"}
    assert s["core"] == pytest.approx(sum(t["centered"] for t in s["core_tasks"]) / 2)
    assert len((home.eval_dir("base", "d2") / "core.jsonl").read_text().splitlines()) == 10
    # a later run replaces every earlier CORE key: another task set leaves no stale core_<task>,
    # --no-core leaves none at all beside the new val bpb
    again = ["eval", "base", "--home", home.root, "--from", "base", "--tag", "d2", "--device", "cpu", "--dtype",
             "float32", "--eval-tokens", 320, "--device-batch", 2, "--sample-tokens", 2]
    run_cli(*again, "--core-tasks", "core-copa", "--core-items", 3)
    s = json.loads((home.eval_dir("base", "d2") / "summary.json").read_text())
    assert "core_winogrande" not in s and s["core"] == s["core_copa"] and s["core_items_per_task"] == 3
    before = {p.name for p in home.eval_dir("base", "d2").iterdir()}
    run_cli(*again, "--no-core")
    s = json.loads((home.eval_dir("base", "d2") / "summary.json").read_text())
    assert "val_bpb" in s and [k for k in s if k == "core" or k.startswith("core_")] == []
    # and the per-item files of those scores go with them
    assert {"core.csv", "core.jsonl"} <= before
    assert {p.name for p in home.eval_dir("base", "d2").iterdir()} == before - {"core.csv", "core.jsonl"}


def test_eval_base_cli_core_full_uses_the_dclm_bundle(base, tmp_path):
    """`eval base --core full`: the bundle from a local server, scored with the real model, labelled CORE."""
    import threading
    from http.server import ThreadingHTTPServer

    from test_dclm_bundle import _Handler, bundle_zip

    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.hits, srv.auth, srv.files = [], [], {"/b.zip": bundle_zip()}
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    home, _ = base
    try:
        run_cli("eval", "base", "--home", home.root, "--from", "base", "--tag", "d2", "--device", "cpu", "--dtype",
                "float32", "--eval-tokens", 320, "--device-batch", 2, "--sample-tokens", 2, "--core", "full",
                "--core-bundle-url", f"http://127.0.0.1:{srv.server_port}/b.zip")
    finally:
        srv.shutdown()
        srv.server_close()
    s = json.loads((home.eval_dir("base", "d2") / "summary.json").read_text())
    assert s["core_label"] == "CORE" and s["core_source"] == "dclm-bundle" and s["core_items_per_task"] == "all"
    names = ["mc_plain", "mc_colon", "schema_plain", "schema_shots", "lm_plain", "lm_qa"]
    assert [t["name"] for t in s["core_tasks"]] == names and all(f"core_{n}" in s for n in names)
    assert s["core"] == pytest.approx(sum(s[f"core_{n}"] for n in names) / 6)
    assert (home.root / "data" / "core" / "eval_bundle.zip").exists()


class _ConstTask(_VowelTask):
    """Every sample earns 1: every group is flat, no learning signal."""

    def evaluate(self, item, text):
        return 1.0


def test_an_all_flat_rl_step_leaves_weights_and_optimizer_bitwise_unchanged(base, tmp_path):
    import time

    from chibichat.engine import Engine
    from chibichat.stages.rl import RolloutBatches, pg_loss_sum, sample_rows
    from chibichat.train.loop import LoopConfig, _train_step, train
    from chibichat.train.optim import build_optimizer

    _, tok = base
    rt = cpu_rt()
    model = _tiny(tok.vocab_size, seed=1)
    opt = build_optimizer(model.param_groups(), matrix_lr=0.05, embedding_lr=0.05, unembedding_lr=0.05,
                          other_lr=0.05, compute_dtype=torch.float32)
    rows = [sample_rows([1, 2, 3], [10, 11], [0, 0], 0.5, 0, 8), sample_rows([1, 2, 3], [20, 21], [0, 0], -0.5, 0, 8)]
    signal = tuple(torch.tensor([r[k] for r in rows], dtype=torch.float32 if k == 2 else torch.long) for k in range(3))
    cfg = LoopConfig(tag_dir=tmp_path / "x", num_steps=4, momentum_warmup_steps=0, warmdown_frac=0.0,
                     skip_empty_steps=True)
    _train_step(model, opt, iter([signal]), pg_loss_sum, lambda b: int((b[1] >= 0).sum()), rt, cfg, 0, 4, time.perf_counter)

    def snapshot():
        opt_state = [t.clone() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
        return [p.detach().clone() for p in model.parameters()], opt_state

    w0, s0 = snapshot()
    assert any(bool(t.abs().sum() > 0) for t in s0)  # the first step left momentum behind
    # Control: zero advantages on real targets give a zero gradient, yet momentum still moves the weights.
    zero_adv = (signal[0], signal[1], torch.zeros_like(signal[2]))
    _train_step(model, opt, iter([zero_adv]), pg_loss_sum, lambda b: int((b[1] >= 0).sum()), rt, cfg, 1, 4, time.perf_counter)
    assert any(not torch.equal(a, p) for a, p in zip(w0, model.parameters()))
    w1, s1 = snapshot()

    # A rollout micro-batch whose groups are all flat carries no targets, and the step is skipped.
    src = RolloutBatches(Engine(model, tok, rt), tok, _ConstTask(4), rt, prompts=2, samples=3, max_tokens=4,
                         temperature=1.0, top_k=None, seed=0)
    dt, loss, n = _train_step(model, opt, src, pg_loss_sum, lambda b: int((b[1] >= 0).sum()), rt, cfg, 2, 4, time.perf_counter)
    assert (loss, n) == (None, 0) and src.history[-1]["groups_used"] == 0.0
    w2, s2 = snapshot()
    assert all(torch.equal(a, b) for a, b in zip(w1, w2)) and all(torch.equal(a, b) for a, b in zip(s1, s2))
    # Without skip_empty_steps such a step is an error, never a silent no-op.
    cfg_strict = LoopConfig(tag_dir=tmp_path / "y", num_steps=4, momentum_warmup_steps=0, warmdown_frac=0.0)
    with pytest.raises(ChibiError, match="hold no target tokens"):
        _train_step(model, opt, src, pg_loss_sum, lambda b: int((b[1] >= 0).sum()), rt, cfg_strict, 3, 4, time.perf_counter)

    # Through the loop: both steps skipped, logged and counted; the weights end where they began.
    cfg = LoopConfig(tag_dir=tmp_path / "rl", num_steps=2, momentum_warmup_steps=0, warmdown_frac=0.0,
                     skip_empty_steps=True)
    res = train(model, opt, src, pg_loss_sum, rt, cfg, meta={"model_config": model.config.to_dict()})
    assert res.skipped_steps == 2 and all(torch.equal(a, p) for a, p in zip(w2, model.parameters()))
    logged = [json.loads(l) for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r.get("skipped")] == [1, 2] and not any("loss" in r for r in logged)


def test_rl_resume_refuses_another_prompt_stream(base):
    from chibichat.engine import Engine
    from chibichat.stages.rl import RolloutBatches

    _, tok = base
    eng = Engine(_tiny(tok.vocab_size), tok, cpu_rt())
    def mk(task, seed=3, prompts=2, samples=2, max_tokens=4, temperature=1.0, top_k=None):
        return RolloutBatches(eng, tok, task, cpu_rt(), prompts=prompts, samples=samples, max_tokens=max_tokens,
                              temperature=temperature, top_k=top_k, seed=seed)

    a = mk(_VowelTask(8))
    next(a)
    state = json.loads(json.dumps(a.state_dict()))
    mk(_VowelTask(8)).load_state_dict(state)  # same stream: accepted

    class Other(_VowelTask):
        name = "other"

    with pytest.raises(ChibiError) as e:
        mk(Other(8)).load_state_dict(state)
    assert str(e.value) == (
        "--resume: the saved RL run sampled another prompt stream (task: saved 'vowels', now 'other'); resume with "
        "the same --task, --train-items, --seed, --prompts-per-step, --num-samples, --max-new-tokens, --temperature, "
        "--top-k and number of ranks, or start a new --tag")
    with pytest.raises(ChibiError, match=r"^--resume: the saved RL run sampled another prompt stream \(items: saved 8, "
                                         r"now 6; prompts: saved '[0-9a-f]+', now '[0-9a-f]+'\)"):
        mk(_VowelTask(6)).load_state_dict(state)
    with pytest.raises(ChibiError, match=r"\(prompts_per_step: saved 2, now 4\)"):
        mk(_VowelTask(8), prompts=4).load_state_dict(state)
    # the sampling too: another number of samples, length, temperature or top-k draws other rollouts
    with pytest.raises(ChibiError, match=r"\(num_samples: saved 2, now 3; max_new_tokens: saved 4, now 5; "
                                         r"temperature: saved 1.0, now 0.7; top_k: saved None, now 5\)"):
        mk(_VowelTask(8), samples=3, max_tokens=5, temperature=0.7, top_k=5).load_state_dict(state)
    with pytest.raises(ChibiError, match="has no fingerprint of its prompt stream"):
        mk(_VowelTask(8)).load_state_dict({"cursor": 2, "batches": 1, "history": []})
    # an item edited anywhere (here the third one's answer: its prompt is the same) is another stream
    edited = _VowelTask(8)
    edited.items[2] = {**edited.items[2], "answer": "changed"}
    with pytest.raises(ChibiError, match=r"^--resume: the saved RL run sampled another prompt stream \(prompts: saved "):
        mk(edited).load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# sft --soup: K runs from one source, their weights averaged


def test_sft_soup_averages_its_members_and_reuses_finished_ones(base, capsys):
    from safetensors.torch import load_file

    from chibichat.stages.report import chat_stage_section, collect
    from chibichat.train.checkpoint import load_model

    home, _ = base
    common = ["sft", "--home", home.root, "--from", "base", "--from-tag", "d2", "--tag", "sp", *FAST,
              "--mix", "arithmetic=0.1", "--num-steps", 2, "--seed", 5]
    run_cli(*common, "--soup", 3)
    members = [home.checkpoints_dir("sft", f"sp-soup{i}") for i in range(3)]
    sums = [json.loads((d / "summary.json").read_text()) for d in members]
    assert [s["tag"] for s in sums] == ["sp-soup0", "sp-soup1", "sp-soup2"]
    seeds = [json.loads((d / "step_000002" / "meta.json").read_text())["flags"]["seed"] for d in members]
    assert seeds == [5, 6, 7]
    weights = [load_file(str(d / "step_000002" / "model.safetensors")) for d in members]
    assert not torch.equal(weights[0]["wte"], weights[1]["wte"])  # the seeds made different runs
    soup = load_file(str(home.checkpoints_dir("sft", "sp") / "step_000002" / "model.safetensors"))
    for k in soup:
        expect = (weights[0][k].double() + weights[1][k].double() + weights[2][k].double()) / 3
        torch.testing.assert_close(soup[k], expect.float(), rtol=0, atol=1e-7)
    s = json.loads((home.checkpoints_dir("sft", "sp") / "summary.json").read_text())
    assert s["soup"]["members"] == ["sp-soup0", "sp-soup1", "sp-soup2"] and s["soup"]["seeds"] == [5, 6, 7]
    assert s["soup"]["member_val_loss"] == [m["val_loss"] for m in sums]
    assert s["steps"] == 6 and s["tokens"] == sum(m["tokens"] for m in sums)
    # the recorded val loss is the average's own, on the first member's validation items
    from chibichat.stages.sft import build_mixtures, parse_mix, val_loss_fn

    model, meta = load_model(home, "sft", "sp", rt=cpu_rt())
    assert meta["soup"]["members"] == s["soup"]["members"]
    args = _parse(common)
    _, val_mix, _, _ = build_mixtures(parse_mix("arithmetic=0.1"), 4, 5, home)
    assert val_loss_fn(val_mix, base[1], args, cpu_rt(), False, "pack")(model, 2)["val_loss"] == pytest.approx(
        s["val_loss"], rel=1e-6)
    # the next stage trains from the average, with the learning rates its runs trained with
    run_cli("sft", "--home", home.root, "--from", "sft", "--from-tag", "sp", "--tag", "sp-next", *FAST,
            "--mix", "arithmetic=0.1", "--num-steps", 1)
    nxt = json.loads((home.checkpoints_dir("sft", "sp-next") / "step_000001" / "meta.json").read_text())
    assert nxt["lrs"] == {g: v * 0.5 for g, v in meta["lrs"].items()}  # sft's --lr-frac 0.5
    assert nxt["source"]["checkpoint"].endswith("sft/sp/step_000002")
    # the report card says what the checkpoint is
    st = next(x for x in collect(home, "sp") if x.stage == "sft")
    assert "average of 3 runs (seeds 5, 6, 7" in chat_stage_section(st, set())

    # a finished member is reused, an interrupted one resumed: remove the average and one member's summary
    import shutil

    shutil.rmtree(home.checkpoints_dir("sft", "sp"))
    (members[2] / "summary.json").unlink()
    capsys.readouterr()
    run_cli(*common, "--soup", 3)
    out = capsys.readouterr().out
    assert "sp-soup0 (seed 5) is done already, not trained again" in out
    assert "sp-soup1 (seed 6) is done already, not trained again" in out
    assert "run sp-soup2 (seed 7) resumed" in out
    again = load_file(str(home.checkpoints_dir("sft", "sp") / "step_000002" / "model.safetensors"))
    assert all(torch.equal(again[k], soup[k]) for k in soup)


@pytest.mark.parametrize("sec_per_step, compile_s, startup, minutes, want_minutes, want_runs", [
    (0.1, 0, 7.0, 4, [2.0, 203 / 3 / 60, 83 / 60, 129 / 60], 4),  # a fast machine: 37 s a run, all four fit at full length
    # 2x slower: a full run takes half the budget, so two runs (the second at 282 of 300 steps), not four halves
    (0.8, 0, 7.0, 8, [4.0, 226 / 60], 2),
    # compiled: the first run's first step takes 30 s more (67 s in all), the later runs reuse its graph (37 s):
    # four fit, where the first run's 67 s alone would have counted three
    (0.1, 30, 7.0, 4, [2.0, 173 / 3 / 60, 68 / 60, 99 / 60], 4),
    # 4x slower: the first run reaches 150 of 300 steps in its half; no full run fits the rest, but a second run
    # as long as the first does (141 steps), and two runs cut short alike are averaged
    (1.6, 0, 7.0, 8, [4.0, 226 / 60], 2),
    # a budget small beside the start-up: the first run's 37 steps and 30 s of start-up leave 31 s, under 3/4 of
    # its 89 s, so the stage keeps the first run alone rather than average it with a much shorter one
    (1.6, 0, 30.0, 2, [1.0], 1),
])
def test_soup_minutes_cover_start_ups_and_train_fewer_runs_of_full_length(base, monkeypatch, capsys, sec_per_step,
                                                                          compile_s, startup, minutes, want_minutes,
                                                                          want_runs):
    """--minutes with --soup K is the whole stage's: the first run may take half of it; the others share
    what is left, less the start-up (data, model, evaluations, saves) the runs took beyond their loops; and
    where K runs would not all reach their step count, fewer runs of full length are averaged, each costing
    what the first one took less its compile."""
    import types

    from chibichat.stages import sft
    from chibichat.train import checkpoint

    home, _ = base
    now, given, tag = [1000.0], [], f"sb{int(sec_per_step * 10)}c{compile_s}s{int(startup)}"
    cap = 300

    def member(margs, **kind):  # loops that keep their budgets at sec_per_step, start-ups of 7 s
        steps = min(cap, int(margs.minutes * 60 / sec_per_step + 1e-9))
        first = compile_s if not given else 0  # the compile: the first run's first step
        given.append(margs.minutes)
        now[0] += startup + steps * sec_per_step + first
        fit = {"num_steps": steps, "cap": cap, "capped": steps == cap, "sec_per_step": sec_per_step}
        mdir = home.checkpoints_dir("sft", margs.tag)
        mdir.mkdir(parents=True)
        (mdir / "metrics.jsonl").write_text(json.dumps({"step": 0, "val_loss": 3.0}) + "\n"
                                            + json.dumps({"step": 1, "loss": 3.0, "dt_s": sec_per_step + first}) + "\n")
        (mdir / "summary.json").write_text(json.dumps({"minutes_fit": fit}))

    class Averaging(Exception):
        pass

    averaged = []

    def averaging(home, stage, mtag, step=None):  # the average looks up its runs: stop there
        averaged.append(mtag)
        if len(averaged) == want_runs:
            raise Averaging

    monkeypatch.setattr(sft, "time", types.SimpleNamespace(time=lambda: now[0]))
    monkeypatch.setattr(sft, "run_conversation_stage", member)
    monkeypatch.setattr(checkpoint, "resolve_checkpoint", averaging)
    with pytest.raises(Averaging):
        sft.run(_parse(["sft", "--home", home.root, "--from", "base", "--from-tag", "d2", "--tag", tag, *FAST,
                        "--mix", "arithmetic=0.1", "--num-steps", cap, "--soup", "4", "--minutes", minutes]
                       + (["--compile"] if compile_s else [])))
    assert given == pytest.approx(want_minutes) and len(given) == want_runs
    assert averaged == [f"{tag}-soup{i}" for i in range(want_runs)]  # the runs trained, and only those
    assert now[0] - 1000.0 <= minutes * 60
    out = capsys.readouterr().out
    if want_runs == 1:
        assert (f"sft --soup: {tag}-soup0 took 89 s for 37 of 300 steps; no other run of full length, nor one 75% as "
                "long as this one, fits the rest of --minutes 2: the stage keeps this run alone (a much shorter run "
                "would pull the average down)") in out
    elif want_runs < 4:
        assert (f"1 more run(s) about as long as this one or longer fit the rest of --minutes {minutes}, not 3 "
                "shortened ones: averaging 2 runs") in out
    assert sft.member_minutes(1.0, 59.0, 2, 7.0) == sft.MIN_MEMBER_S / 60  # an overrun budget: the fewest steps


def test_soup_keeps_its_first_run_alone_where_no_other_full_run_fits(base, monkeypatch, capsys):
    """Where the rest of --minutes fits no run of full length (fewer_full_runs: 0), the stage's checkpoint is the
    first run's weights, unaveraged, and the stage and its report card say so."""
    from safetensors.torch import load_file

    from chibichat.stages import sft
    from chibichat.stages.report import chat_stage_section, collect

    home, _ = base
    monkeypatch.setattr(sft, "fewer_full_runs", lambda *a, **k: 0)
    run_cli("sft", "--home", home.root, "--from", "base", "--from-tag", "d2", "--tag", "one", *FAST,
            "--mix", "arithmetic=0.1", "--num-steps", 2, "--soup", 3, "--minutes", 1)
    out = capsys.readouterr().out
    assert "no other run of full length, nor one 75% as long as this one, fits the rest of --minutes 1" in out
    assert "sft --soup: kept its one run one-soup0 -> " in out
    assert not home.checkpoints_dir("sft", "one-soup1").exists()
    kept = load_file(str(home.checkpoints_dir("sft", "one") / "step_000002" / "model.safetensors"))
    first = load_file(str(home.checkpoints_dir("sft", "one-soup0") / "step_000002" / "model.safetensors"))
    assert kept.keys() == first.keys() and all(torch.equal(kept[k], first[k]) for k in kept)
    s = json.loads((home.checkpoints_dir("sft", "one") / "summary.json").read_text())
    assert s["soup"]["members"] == ["one-soup0"] and s["soup"]["seeds"] == [0]
    st = next(x for x in collect(home, "one") if x.stage == "sft")
    assert "one run (seed 0): no other run of full length fitted the stage's minutes" in chat_stage_section(st, set())


def test_sft_soup_refusals(base):
    from chibichat.stages import sft

    home, _ = base
    common = ["sft", "--home", str(home.root), "--from", "base", "--from-tag", "d2", "--tag", "sr", *FAST,
              "--mix", "arithmetic=0.1", "--num-steps", "1"]
    cases = [(["--soup", "0"], "--soup 0: give the number of runs to average, 1 or more (1 = no averaging)"),
             (["--soup", "2", "--lora", "4"], "--soup averages full weights and --lora trains adapters; drop one"),
             (["--soup", "2", "--save-every", "1"], "--soup keeps each member's final checkpoint only; drop --save-every")]
    for extra, msg in cases:
        with pytest.raises(ChibiError) as e:
            sft.run(_parse(common + extra))
        assert msg in str(e.value)
    # a finished member trained with other flags is not silently reused
    run_cli(*common, "--soup", "2")
    import shutil

    shutil.rmtree(home.checkpoints_dir("sft", "sr"))
    with pytest.raises(ChibiError) as e:
        sft.run(_parse(common[:-1] + ["2", "--soup", "2"]))
    assert "was trained with num_steps=1, this run asks 2; pass --overwrite to train the members again" in str(e.value)
    # ... nor one of another seed (the soup would record seeds it did not average) or fp8 setting
    for extra, msg in [(["--seed", "3"], "sr-soup0 was trained with seed=0, this run asks 3; pass --overwrite"),
                       (["--fp8"], "sr-soup0 was trained with fp8=False, this run asks True; pass --overwrite")]:
        with pytest.raises(ChibiError) as e:
            sft.run(_parse(common + ["--soup", "2", *extra]))
        assert msg in str(e.value)
    run_cli(*common, "--soup", "2")  # the members' own flags: reused, and averaged again
    with pytest.raises(ChibiError) as e:  # the finished average is not replaced without --overwrite
        sft.run(_parse(common + ["--soup", "2"]))
    assert "already holds a finished run; pass --overwrite" in str(e.value)


def test_sft_soup_failed_save_keeps_the_old_average(base, monkeypatch):
    """A full disk while the new average is written: the tag's earlier average is left file for file, and
    the message says so and how to average again, naming the files under the tag's folder (the one the user
    knows), not under the temporary directory they were written in."""
    import errno
    import os
    import re

    from chibichat.stages import sft

    home, _ = base
    common = ["sft", "--home", str(home.root), "--from", "base", "--from-tag", "d2", "--tag", "sf", *FAST,
              "--mix", "arithmetic=0.1", "--num-steps", "1", "--soup", "2"]
    run_cli(*common)
    tag = home.checkpoints_dir("sft", "sf")
    (tag / "summary.json").unlink()  # an unfinished average: --resume averages the finished runs again

    def files():
        return {str(p.relative_to(tag)): p.read_bytes() for p in sorted(tag.rglob("*")) if p.is_file()}

    before = files()
    assert list(before) == ["step_000001/meta.json", "step_000001/model.safetensors"]
    real, tmps = os.fsync, []

    def fsync(fd):  # ENOSPC for the files of the new average's step (written wherever the tag's files go)
        m = re.search(r"/sft/(?:(\.tmp-sf-[^/]+)|sf)/\.tmp-step_000001-[^/]+/", os.readlink(f"/proc/self/fd/{fd}"))
        if m:
            tmps.append(tag.parent / (m.group(1) or "sf"))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(ChibiError) as e:
        sft.run(_parse(common + ["--resume"]))
    new = tmps[0]
    assert str(e.value) == (
        f"sft --soup: the average of the 2 runs was not saved to {tag}: its earlier, unfinished average "
        f"{tag / 'step_000001'} is intact; the runs are kept: run the command again with --resume to average them. "
        f"The cause: saving step 1 failed, nothing of it was kept: cannot write {tag / 'step_000001'}: No space left "
        f"on device (errno 28); free some space on that disk or pass another --home")
    assert new != tag and files() == before and not new.exists()  # the temporary directory is gone and unnamed
    monkeypatch.setattr(os, "fsync", real)
    run_cli(*common, "--resume")
    assert list(files()) == ["step_000001/meta.json", "step_000001/model.safetensors", "summary.json"]


def test_midtrain_soup_averages_runs_from_the_base_and_sft_trains_from_the_average(base, capsys):
    from safetensors.torch import load_file

    from chibichat.stages import midtrain
    from chibichat.stages.report import chat_stage_section, collect
    from chibichat.stages.sft import build_mixtures, parse_mix, val_loss_fn
    from chibichat.train.checkpoint import load_model

    home, tok = base
    common = ["midtrain", "--home", home.root, "--from", "base", "--from-tag", "d2", "--tag", "ms", *FAST,
              "--mix", "arithmetic=0.1", "--num-steps", 2, "--seed", 3]
    capsys.readouterr()
    run_cli(*common, "--soup", 2)
    out = capsys.readouterr().out
    assert "midtrain --soup: run ms-soup0 (seed 3)" in out and "midtrain --soup: run ms-soup1 (seed 4)" in out
    assert "midtrain --soup: averaged 2 runs -> " in out
    members = [home.checkpoints_dir("mid", f"ms-soup{i}") for i in range(2)]
    weights = [load_file(str(d / "step_000002" / "model.safetensors")) for d in members]
    soup = load_file(str(home.checkpoints_dir("mid", "ms") / "step_000002" / "model.safetensors"))
    for k in soup:
        torch.testing.assert_close(soup[k], ((weights[0][k].double() + weights[1][k].double()) / 2).float(),
                                   rtol=0, atol=1e-7)
    s = json.loads((home.checkpoints_dir("mid", "ms") / "summary.json").read_text())
    assert s["stage"] == "mid" and s["soup"]["seeds"] == [3, 4] and s["loss_on"] == "all tokens"
    # the average's val loss is midtraining's (every token scored), on the first member's validation items
    model, meta = load_model(home, "mid", "ms", rt=cpu_rt())
    _, val_mix, _, _ = build_mixtures(parse_mix("arithmetic=0.1"), 4, 3, home)
    args = _parse(common)
    assert val_loss_fn(val_mix, tok, args, cpu_rt(), True, "stream")(model, 2)["val_loss"] == pytest.approx(
        s["val_loss"], rel=1e-6)
    st = next(x for x in collect(home, "ms") if x.stage == "mid")
    assert "average of 2 runs (seeds 3, 4" in chat_stage_section(st, set())
    # SFT from the averaged midtraining: the members' learning rates x sft's --lr-frac 0.5
    run_cli("sft", "--home", home.root, "--from", "mid", "--from-tag", "ms", "--tag", "ms-sft", *FAST,
            "--mix", "arithmetic=0.1", "--num-steps", 1)
    nxt = json.loads((home.checkpoints_dir("sft", "ms-sft") / "step_000001" / "meta.json").read_text())
    assert nxt["lrs"] == {g: v * 0.5 for g, v in meta["lrs"].items()}
    assert nxt["source"]["checkpoint"].endswith("mid/ms/step_000002")
    # the refusals are sft's
    with pytest.raises(ChibiError, match="--soup 0: give the number of runs to average"):
        midtrain.run(_parse(common + ["--soup", "0"]))


def test_average_weights_refuses_one_checkpoint_and_mismatched_shapes(tmp_path):
    from chibichat.model.gpt import GPT, GPTConfig
    from chibichat.train.checkpoint import average_weights, save_checkpoint

    def ck(name, width):
        model = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_embd=width, n_head=2, n_kv_head=2))
        return save_checkpoint(tmp_path / name, 1, model, None, {"model_config": model.config.to_dict()})

    a, b = ck("a", 32), ck("b", 64)
    with pytest.raises(ChibiError, match="averaging weights needs at least 2 checkpoints, got 1"):
        average_weights([a])
    with pytest.raises(ChibiError, match="hold different tensors or shapes"):
        average_weights([a, b])


@pytest.mark.slow  # inductor compiles the forward and backward: ~20-40 s a stage
@pytest.mark.parametrize("stage, source", [("midtrain", "base"), ("sft", "base")])
def test_compiled_conversation_stage_trains_as_the_eager_one(base, stage, source):
    """--compile on midtrain / sft compiles the training forward only: the same seed gives the same losses
    step by step and the same held-out loss (within inductor's reordered-reduction rounding) as eager."""
    from torch._dynamo.utils import counters

    home, _ = base
    torch._dynamo.reset()
    runs, graphs = {}, {}
    for name, flags in (("eager", []), ("comp", ["--compile"])):
        counters.clear()
        tag = f"c36-{stage}-{name}"
        run_cli(stage, "--home", home.root, "--from", source, "--from-tag", "d2", "--tag", tag, "--num-steps", 3,
                "--mix", "arithmetic=0.1,spelling=0.1", "--eval-every", 0, *FAST, *flags)
        rows = [json.loads(l) for l in (home.checkpoints_dir(stage.replace("midtrain", "mid"), tag)
                                        / "metrics.jsonl").read_text().splitlines()]
        runs[name] = ([r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r])
        graphs[name] = counters["stats"]["unique_graphs"]
    assert graphs["eager"] == 0 and graphs["comp"] >= 1  # the flag really compiles (and only with it)
    (el, ev), (cl, cv) = runs["eager"], runs["comp"]
    assert len(el) == 3 and el[-1] < el[0]  # three real steps that train
    assert cl == pytest.approx(el, rel=1e-4) and cv == pytest.approx(ev, rel=1e-4)
    assert len(ev) == 2 and ev[-1] != ev[0]  # validated before and after the steps


def test_compiled_conversation_stage_without_a_cpp_compiler_is_refused_before_loading(base, monkeypatch, capsys):
    home, _ = base
    monkeypatch.setenv("CXX", "no-such-cxx-36")
    for stage in ("midtrain", "sft"):
        assert main([stage, "--home", str(home.root), "--from", "base", "--from-tag", "d2", "--tag", "nocxx",
                     "--num-steps", "2", "--compile", *FAST]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"chibichat {stage}: error: --compile on the CPU needs a C++ compiler") and \
            "'no-such-cxx-36' is not on PATH" in err and "or drop --compile (the same training, eager)" in err
        assert not home.checkpoints_dir(stage.replace("midtrain", "mid"), "nocxx").exists()


@pytest.mark.slow  # inductor compiles: ~20-40 s
def test_compiled_soup_compiles_every_member_and_averages_as_the_eager_one(base, capsys):
    """sft --soup 3 --compile: each member builds its model again and compiles it in the same process (the
    cpu-hour preset's chat stages), reusing the first member's graph, and the average matches the eager soup's
    (inductor's rounding)."""
    from torch._dynamo.utils import counters

    home, _ = base
    torch._dynamo.reset()
    val = {}
    for name, flags in (("eager", []), ("comp", ["--compile"])):
        counters.clear()
        run_cli("sft", "--home", home.root, "--from", "base", "--from-tag", "d2", "--tag", f"c36-soup-{name}",
                "--num-steps", 2, "--mix", "arithmetic=0.1", "--soup", 3, *FAST, *flags)
        s = json.loads((home.checkpoints_dir("sft", f"c36-soup-{name}") / "summary.json").read_text())
        val[name] = [*s["soup"]["member_val_loss"], s["val_loss"]]
        # one graph for all three members (the module's weights are the graph's inputs: a member's new model
        # is no new graph), none without --compile
        assert counters["stats"]["unique_graphs"] == (0 if name == "eager" else 1), name
    assert val["comp"] == pytest.approx(val["eager"], rel=1e-4)
