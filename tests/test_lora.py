"""LoRA adapters (chibichat/model/lora.py), their checkpoints and the --lora flag of the chat stages."""

import json

import pytest
import torch

from chibichat.common import ChibiError
from chibichat.model.gpt import GPT, GPTConfig
from chibichat.model.lora import LoRAConfig, apply_lora, count_parameters, has_lora, lora_parameters, merge_lora


def tiny(layers="AS", seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_embd=32, n_head=2, n_kv_head=2, layers=layers))
    with torch.no_grad():  # every weight random (a fresh model's head and output projections are zero)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    return model


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]])


def test_rank_r_trains_only_the_adapters():
    model = tiny()
    base_logits = model(IDS).detach()
    total = model.num_params()
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    # per weight r*(in+out): attention q,k,v,o 4x(32+32); SLC2 x,b,o 3x(32+32) + alpha (2x32) + A (16x32);
    # MLP fc/proj 2x(32+128) in each of the 2 layers
    expect = 4 * (4 * 64 + (3 * 64 + 34 + 48) + 2 * 2 * 160)
    counts = count_parameters(model)
    assert counts == {"trainable": expect, "adapter": expect, "frozen": total}
    assert torch.equal(model(IDS), base_logits)  # B starts at zero: a fresh adapter changes nothing
    model(IDS, IDS).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith(("lora_A", "lora_B")) for n in grads)
    assert sum(p.numel() for n, p in model.named_parameters() if n in grads) == expect


def test_targets_select_weights_and_refuse_what_is_absent():
    model = tiny(layers="AA")
    apply_lora(model, LoRAConfig(rank=2, alpha=2.0, targets=("mlp",)))
    assert count_parameters(model)["adapter"] == 2 * 2 * 2 * 160
    with pytest.raises(ChibiError, match="selects no weight in this model"):
        apply_lora(tiny(layers="AA"), LoRAConfig(rank=2, alpha=2.0, targets=("slc2",)))
    with pytest.raises(ChibiError, match="--lora-targets 'attn,ffn': each must be one of attn,mlp,slc2"):
        LoRAConfig(rank=2, alpha=2.0, targets=("attn", "ffn"))


def test_a_rank_above_the_model_width_is_refused():
    model = tiny()
    with pytest.raises(ChibiError) as e:
        apply_lora(model, LoRAConfig(rank=33, alpha=33.0))
    assert str(e.value) == ("--lora 33 is larger than the model's width (32): B @ A of a weight 32 wide has rank at most "
                            "32, so such an adapter holds more parameters than the weight it adapts and learns nothing "
                            "more; use a rank <= 32 (LoRA ranks are usually 4-64), or fine-tune all weights without --lora")
    assert not has_lora(model) and all(p.requires_grad for p in model.parameters())  # left as it was
    apply_lora(model, LoRAConfig(rank=32, alpha=32.0))  # the width itself is allowed


@pytest.mark.parametrize("layers", ["AS", "SA"])
def test_merge_gives_the_adapted_logits(layers):
    model = tiny(layers)
    apply_lora(model, LoRAConfig(rank=4, alpha=4.0))
    randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        on = model(IDS)
        assert not torch.allclose(on, tiny(layers)(IDS), atol=1e-3)  # the adapters do change the model
        state = model.new_state(1, 16)
        stepped = torch.cat([model(IDS[:, i:i + 1], state=state) for i in range(IDS.shape[1])], dim=1)
    assert torch.allclose(stepped, on, atol=1e-5)  # token-by-token decoding sees the adapted weights too
    assert merge_lora(model) == 4 + 5 + 2 * 2  # weights merged: attention q/k/v/o, SLC2 x/b/alpha/A/o, 2 MLPs
    assert not has_lora(model) and all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.allclose(model(IDS), on, atol=1e-5)
    assert set(model.state_dict()) == set(tiny(layers).state_dict())  # plain names again


def test_rank_dropout_only_in_training():
    model = tiny()
    apply_lora(model, LoRAConfig(rank=8, alpha=8.0, dropout=0.5))
    randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        a, b = model(IDS), model(IDS)
    model.train()
    torch.manual_seed(0)
    c = model(IDS).detach()  # a training forward drops rank components
    with torch.no_grad():
        d = model(IDS)  # a no-grad read in train mode (e.g. RL's Decoder weight copy) does not
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-4) and torch.equal(a, d)


def test_adapter_checkpoint_saves_alone_and_reloads_to_equal_logits(tmp_path):
    from chibichat.common import Home
    from chibichat.train.checkpoint import ADAPTER_FILE, load_model, save_checkpoint

    home = Home.resolve(tmp_path / "home")
    base = tiny()
    meta = {"model_config": base.config.to_dict(), "tokenizer": {"hash": "h", "vocab_size": 64}}
    base_dir = save_checkpoint(home.checkpoints_dir("base", "d2"), 3, base, None, meta)
    apply_lora(base, LoRAConfig(rank=4, alpha=4.0, targets=("attn", "mlp")))
    randomize_adapters(base)
    base.eval()
    with torch.no_grad():
        on = base(IDS)
    lora_meta = {**meta, "lora": {**LoRAConfig(4, 4.0, 0.0, ("attn", "mlp")).to_dict(), "base": "base/d2/step_000003"}}
    sdir = save_checkpoint(home.checkpoints_dir("sft", "d2"), 7, base, None, lora_meta)
    assert (sdir / ADAPTER_FILE).is_file() and not (sdir / "model.safetensors").exists()
    assert (sdir / ADAPTER_FILE).stat().st_size < (base_dir / "model.safetensors").stat().st_size / 4
    model, m = load_model(home, "sft")
    assert not has_lora(model) and m["lora"]["rank"] == 4
    with torch.no_grad():
        assert torch.allclose(model(IDS), on, atol=1e-5)
    # the adapter sits on the base it was trained on: a base replaced since (other settings or tokenizer, the
    # same tensor shapes) is refused, not loaded under the adapter's settings
    base_meta = json.loads((base_dir / "meta.json").read_text())
    (base_dir / "meta.json").write_text(json.dumps({**base_meta, "tokenizer": {"hash": "other", "vocab_size": 64},
                                                    "model_config": {**base_meta["model_config"], "rope_base": 500.0}}))
    with pytest.raises(ChibiError) as e:
        load_model(home, "sft")
    assert str(e.value) == (
        f"the adapter in {sdir} was trained on {home.root / 'checkpoints' / 'base/d2/step_000003'}, which now holds "
        "another model (rope_base 10000.0 -> 500.0; tokenizer h (vocab 64) -> other (vocab 64)): that base was "
        "replaced after the adapter was trained. Restore the checkpoint the adapter was trained on, or train the "
        "adapter again on this one")
    # the adapter sits on its base: a missing base is named
    (base_dir / "meta.json").unlink()
    with pytest.raises(ChibiError, match=r"sits on .*base/d2/step_000003, which is missing"):
        load_model(home, "sft")


def test_an_adapter_refuses_a_base_retrained_with_the_same_settings(tmp_path):
    """The stage meta records the SHA-256 of the base's weights file; a base trained again in the same place (same
    tag, step, config and tokenizer, other weights) is refused on load. An adapter saved before the fingerprint
    was recorded still loads."""
    import argparse
    import hashlib
    from types import SimpleNamespace

    from chibichat.common import Home
    from chibichat.train.checkpoint import load_model, save_checkpoint
    from chibichat.train.finetune import stage_meta

    home = Home.resolve(tmp_path / "home")
    base = tiny()
    meta = {"model_config": base.config.to_dict(), "tokenizer": {"hash": "h", "vocab_size": 64}}
    base_dir = save_checkpoint(home.checkpoints_dir("base", "d2"), 3, base, None, meta)
    args = argparse.Namespace(lora=4, lora_alpha=None, lora_dropout=None, lora_targets="attn,mlp", lora_lr=None,
                              fp8=False)
    tok = SimpleNamespace(hash="h", vocab_size=64)
    lora_meta = stage_meta(base, tok, args, {"checkpoint_dir": str(base_dir), "step": 3}, "sft")
    old_sha = hashlib.sha256((base_dir / "model.safetensors").read_bytes()).hexdigest()
    assert lora_meta["lora"] == {"rank": 4, "alpha": 4.0, "dropout": 0.0, "targets": ["attn", "mlp"],
                                 "base": "base/d2/step_000003", "base_sha256": old_sha}
    apply_lora(base, LoRAConfig(rank=4, alpha=4.0, targets=("attn", "mlp")))
    randomize_adapters(base)
    sdir = save_checkpoint(home.checkpoints_dir("sft", "d2"), 7, base, None, lora_meta)
    load_model(home, "sft")  # the base it was trained on
    save_checkpoint(home.checkpoints_dir("base", "d2"), 3, tiny(seed=5), None, meta)  # trained again, same settings
    new_sha = hashlib.sha256((base_dir / "model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(ChibiError) as e:
        load_model(home, "sft")
    assert str(e.value) == (
        f"the adapter in {sdir} was trained on {home.root / 'checkpoints' / 'base/d2/step_000003'}, which now holds "
        f"another model (model.safetensors sha256 {old_sha[:12]} -> {new_sha[:12]}: the same settings, other "
        "weights): that base was replaced after the adapter was trained. Restore the checkpoint the adapter was "
        "trained on, or train the adapter again on this one")
    saved = json.loads((sdir / "meta.json").read_text())
    del saved["lora"]["base_sha256"]  # as an adapter saved before the fingerprint was recorded
    (sdir / "meta.json").write_text(json.dumps(saved))
    assert not has_lora(load_model(home, "sft")[0])


def test_merge_keeps_the_old_checkpoint_when_saving_fails_and_never_writes_over_the_adapter(tmp_path, monkeypatch):
    from test_stages_chat import _parse, make_base

    import chibichat.train.checkpoint as ckpt
    from chibichat.stages.lora import run_merge

    home, tok = make_base(tmp_path / "home")
    model, meta = ckpt.load_model(home, "base")
    apply_lora(model, LoRAConfig(rank=4, alpha=4.0, targets=("attn", "mlp")))
    randomize_adapters(model)
    lora_meta = {"model_config": meta["model_config"], "tokenizer": meta["tokenizer"],
                 "lora": {**LoRAConfig(4, 4.0, 0.0, ("attn", "mlp")).to_dict(), "base": "base/d2/step_000005"}}
    sdir = ckpt.save_checkpoint(home.checkpoints_dir("sft", "lo"), 5, model, None, lora_meta)
    merge = ["lora", "merge", "--home", home.root, "--from", "sft", "--tag", "lo"]
    run_merge(_parse(merge))
    target = home.checkpoints_dir("sft", "lo-merged") / "step_000005"
    before = {f.name: f.read_bytes() for f in target.iterdir()}

    def fail(*args, **kwargs):
        raise ChibiError("disk full")

    monkeypatch.setattr(ckpt, "save_checkpoint", fail)
    with pytest.raises(ChibiError, match="disk full"):
        run_merge(_parse([*merge, "--overwrite"]))
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before  # the old merged checkpoint is intact
    monkeypatch.undo()
    adapter = {f.name: f.read_bytes() for f in sdir.iterdir()}
    with pytest.raises(ChibiError, match=r"--to-tag 'lo' would write the merged model over .*sft/lo/step_000005, "
                                         r"the adapter itself; choose another --to-tag"):
        run_merge(_parse([*merge, "--to-tag", "lo", "--overwrite"]))
    assert {f.name: f.read_bytes() for f in sdir.iterdir()} == adapter


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_sft_lora_end_to_end_resume_and_merge(tmp_path):
    from test_stages_chat import FAST, make_base, run_cli

    from chibichat.train.checkpoint import ADAPTER_FILE, load_model, read_meta, save_checkpoint, weights_sha256

    home, tok = make_base(tmp_path / "home")
    model, meta = load_model(home, "base")  # its zero head would pass no gradient to the blocks' adapters
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.1)
    keep = {k: meta[k] for k in ("model_config", "tokenizer")}
    save_checkpoint(home.checkpoints_dir("base", "rand"), 5, model, None, keep)
    common = ["sft", "--home", home.root, "--from", "base", "--from-tag", "rand", "--tag", "lo", *FAST, "--mix", "arithmetic=0.1",
              "--lora", 4, "--lora-targets", "attn,mlp", "--save-every", 1]
    run_cli(*common, "--num-steps", 2)
    run_cli(*common, "--num-steps", 3, "--resume")
    tag_dir = home.checkpoints_dir("sft", "lo")
    sdir = tag_dir / "step_000003"
    assert (sdir / ADAPTER_FILE).is_file() and not (sdir / "model.safetensors").exists()
    meta = read_meta(sdir)
    assert meta["lora"] == {"rank": 4, "alpha": 4.0, "dropout": 0.0, "targets": ["attn", "mlp"],
                            "base": "base/rand/step_000005",
                            "base_sha256": weights_sha256(home.checkpoints_dir("base", "rand") / "step_000005")}
    summary = json.loads((tag_dir / "summary.json").read_text())
    first_val = json.loads((tag_dir / "metrics.jsonl").read_text().splitlines()[0])["val_loss"]
    assert summary["steps"] == 3 and summary["val_loss"] < first_val - 0.005  # the adapters learn
    base, _ = load_model(home, "base", "rand")
    tuned, _ = load_model(home, "sft", "lo")
    assert torch.equal(base.wte, tuned.wte) and torch.equal(base.lm_head, tuned.lm_head)  # frozen
    assert not torch.equal(base.blocks[0].mixer.w_q, tuned.blocks[0].mixer.w_q)  # adapted
    run_cli("chat", "--home", home.root, "--from", "sft", "--tag", "lo", "--device", "cpu", "-p", "Hi",
            "--max-tokens", 4, "--system", "You are Kiku.")  # chat loads the adapter on its base
    run_cli("lora", "merge", "--home", home.root, "--from", "sft", "--tag", "lo")
    merged, mmeta = load_model(home, "sft", "lo-merged")
    assert (home.checkpoints_dir("sft", "lo-merged") / "step_000003" / "model.safetensors").is_file()
    assert "lora" not in mmeta and mmeta["merged_from"]["lora"]["rank"] == 4
    # the merged folder is finished like a stage's: summary.json, the adapter run's figures and their source
    msum = json.loads((home.checkpoints_dir("sft", "lo-merged") / "summary.json").read_text())
    assert msum == {**summary, "tag": "lo-merged", "merged_from": mmeta["merged_from"],
                    "checkpoint": str(home.checkpoints_dir("sft", "lo-merged") / "step_000003")}
    x = torch.tensor([[tok.bos_id, 5, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(merged(x), tuned(x), atol=1e-5)
    from chibichat.stages.lora import run_info, run_merge
    from test_stages_chat import _parse

    merged_dir = home.checkpoints_dir("sft", "lo-merged") / "step_000003"
    with pytest.raises(ChibiError) as e:
        run_merge(_parse(["lora", "merge", "--home", home.root, "--from", "sft", "--tag", "lo-merged"]))
    assert str(e.value) == (f"{merged_dir} holds full weights, not a LoRA adapter; nothing to merge: pass --tag of "
                            "an adapter checkpoint (sft: lo)")
    with pytest.raises(ChibiError) as e:  # without --tag: the newest, here the merged one
        run_info(_parse(["lora", "info", "--home", home.root, "--from", "sft"]))
    assert str(e.value) == (f"{merged_dir} holds full weights, not a LoRA adapter; nothing to describe: pass --tag "
                            "of an adapter checkpoint (sft: lo)")


@pytest.mark.slow
@pytest.mark.parametrize("layers", ["dense", "iberis"])
def test_hf_export_writes_a_peft_adapter_that_peft_loads_with_equal_logits(tmp_path, layers):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from test_export_hf import make_home

    from chibichat.cli import main
    from chibichat.tokenizer import shipped_samples, train_tokenizer
    from chibichat.train.checkpoint import load_model, save_checkpoint

    tok = train_tokenizer(list(shipped_samples().values()), 700, split="gpt4")
    home, model = make_home(tmp_path / "home", tok, layers)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    randomize_adapters(model)
    meta = {"model_config": model.config.to_dict(), "tokenizer": {"vocab_size": tok.vocab_size, "hash": tok.hash},
            "stage": "sft", "lora": {**LoRAConfig(4, 8.0).to_dict(), "base": "base/d4/step_000010"}}
    save_checkpoint(home.checkpoints_dir("sft", "lo"), 2, model, None, meta)
    iberis = layers == "iberis"
    assert main(["export", "hf", "--home", str(home.root), "--from", "base", "--out", str(tmp_path / "base")]) == 0
    assert main(["export", "hf", "--home", str(home.root), "--from", "sft", "--tag", "lo",
                 "--out", str(tmp_path / "tuned")]) == 0
    cfg = json.loads((tmp_path / "tuned" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["peft_type"] == "LORA"
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", trust_remote_code=iberis)
    with_adapter = peft.PeftModel.from_pretrained(base_hf, tmp_path / "tuned" / "adapter").eval()
    merged_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned", trust_remote_code=iberis).eval()
    ours, _ = load_model(home, "sft", "lo")
    x = torch.tensor([[tok.bos_id, *tok.encode("Hello there, friend.")]])
    with torch.no_grad():
        want = ours(x)
        assert not torch.allclose(want, load_model(home, "base")[0](x), atol=1e-3)
        assert torch.allclose(with_adapter(x).logits, want, atol=1e-4)
        assert torch.allclose(merged_hf(x).logits, want, atol=1e-4)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_rl_with_lora_on_a_verifiable_file_task(tmp_path):
    from test_stages_chat import make_base, run_cli

    from chibichat.train.checkpoint import ADAPTER_FILE, load_model, read_meta

    home, _ = make_base(tmp_path / "home")
    rows = [{"prompt": f"What is {a} plus {b}?", "answer": a + b, "match": "numeric"} for a in range(6) for b in range(6)]
    train, test = tmp_path / "qa.jsonl", tmp_path / "qa-test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:30]), encoding="utf-8")
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[30:]), encoding="utf-8")
    run_cli("rl", "--home", home.root, "--from", "base", "--tag", "rlo", "--device", "cpu", "--dtype", "float32",
            "--num-steps", 2, "--prompts-per-step", 2, "--num-samples", 2, "--max-new-tokens", 6, "--passk-items", 2,
            "--passk-k", 2, "--task", f"file:{train}", "--eval-task", f"file:{test}", "--lora", 2)
    d = home.checkpoints_dir("rl", "rlo")
    s = json.loads((d / "summary.json").read_text())
    assert s["steps"] == 2 and s["task"] == f"file:{train}" and s["pass_at_k_after"]["n"] == 2
    assert (d / "step_000002" / ADAPTER_FILE).is_file() and read_meta(d / "step_000002")["lora"]["rank"] == 2
    model, _ = load_model(home, "rl", "rlo")
    assert not has_lora(model)


def test_lora_flags_without_lora_are_refused():
    from test_stages_chat import _parse

    from chibichat.train.finetune import lora_config

    assert lora_config(_parse(["sft", "--lora", "4"])) == LoRAConfig(4, 4.0, 0.0, ("attn", "mlp", "slc2"))
    assert lora_config(_parse(["sft"])) is None
    with pytest.raises(ChibiError, match="--lora-targets, --lora-lr only apply with --lora RANK"):
        lora_config(_parse(["sft", "--lora-targets", "mlp", "--lora-lr", "0.01"]))
    with pytest.raises(ChibiError, match="--lora with --fp8 is not supported"):
        lora_config(_parse(["dpo", "--data", "prefs-language", "--lora", "4", "--fp8"]))
    with pytest.raises(ChibiError, match=r"^--lora-targets has an empty entry in 'attn,,mlp': remove the extra comma$"):
        lora_config(_parse(["sft", "--lora", "4", "--lora-targets", "attn,,mlp"]))


def test_lora_targets_fit_the_model():
    """The default targets are the kinds the model has (a dense model: attn,mlp, as `lora info` then shows); a
    target given that selects nothing in it is refused (slc2 on a dense model was dropped without a word)."""
    from test_stages_chat import _parse

    from chibichat.train.finetune import lora_config

    assert lora_config(_parse(["sft", "--lora", "4"]), tiny("AA")).targets == ("attn", "mlp")
    assert lora_config(_parse(["sft", "--lora", "4"]), tiny("AS")).targets == ("attn", "mlp", "slc2")
    assert lora_config(_parse(["sft", "--lora", "4", "--lora-targets", "slc2,mlp"]), tiny("AS")).targets == \
        ("slc2", "mlp")
    with pytest.raises(ChibiError) as e:
        lora_config(_parse(["sft", "--lora", "4", "--lora-targets", "attn,slc2"]), tiny("AA"))
    assert str(e.value) == ("--lora-targets attn,slc2: slc2 selects no weight in this model (layers 'A': attn needs "
                            "A layers, slc2 needs S layers); drop slc2")
