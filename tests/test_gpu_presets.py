"""The GPU presets as plans (every step parsed by its own stage's parser), their FLOP-count estimates,
the toy scale knob, `--device-batch auto`'s selection, and `data tasks` against a stand-in hub."""

import math

import pytest

from chibichat.cli import build_parser, main
from chibichat.common import ChibiError, Home
from chibichat.stages import speedrun
from chibichat.stages.speedrun import GPU_RECIPES, PRESETS, TOY_SIZES, plan

LANGS = ("en", "ja")
LAYERS = ("dense", "iberis")


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def _flag(argv, name):
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("layers", LAYERS)
def test_every_step_of_every_preset_parses(tmp_path, parser, preset, lang, layers):
    for scale in ("full", "toy") if PRESETS[preset].gpu else ("full",):
        steps = plan(Home(tmp_path), PRESETS[preset], lang, layers, "cuda", world_size=8, scale=scale)
        for step in steps:
            args = parser.parse_args(step.argv)  # argparse exits (SystemExit) on a flag it does not take
            assert callable(args.func), step.name
        if PRESETS[preset].gpu:
            names = [s.name for s in steps]
            assert names[:2] == ["download", "download-tasks"] and names[-2:] == ["eval-rl", "skills-rl"]


def test_dry_run_prints_the_plan_and_the_estimate(tmp_path, capsys):
    assert main(["speedrun", "--preset", "d20", "--dry-run", "--home", str(tmp_path), "--nproc-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "560,988,160 params" in out  # nanochat's d20 count (65,536 vocab)
    for hw in ("8xH100", "1xH100", "1x24GB (RTX 4090)"):
        assert hw in out
    assert "--task gsm8k-train --eval-task gsm8k" in out
    for stage in ("pretrain", "midtrain", "sft"):  # compiled, as nanochat's pretraining and midtraining are
        assert next(ln for ln in out.splitlines() if f" chibichat {stage} " in ln).split().count("--compile") == 1
    assert next(ln for ln in out.splitlines() if " chibichat rl " in ln).split().count("--compile") == 0
    assert main(["speedrun", "--preset", "d20", "--dry-run", "--home", str(tmp_path), "--nproc-per-node", "8",
                 "--no-compile"]) == 0
    assert "--compile" not in capsys.readouterr().out
    assert not (tmp_path / "checkpoints").exists()  # nothing ran
    assert "Japanese presets" not in out
    assert main(["speedrun", "--preset", "d12", "--lang", "ja", "--dry-run", "--home", str(tmp_path)]) == 0
    assert "\n".join(speedrun.JA_MISSING) in capsys.readouterr().out


def test_readme_shows_the_dry_run_as_it_prints(tmp_path, capsys):
    """The README's GPU section quotes `speedrun --preset d20 --dry-run` on 8 GPUs: every quoted line is a line
    of the real output ("..." stands for lines left out), in order."""
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("`--dry-run` on 8 GPUs begins:\n\n```\n", 1)[1].split("```", 1)[0]
    quoted = [ln for ln in block.splitlines() if ln != "..."]
    home = tmp_path / "big-disk"
    assert main(["speedrun", "--preset", "d20", "--dry-run", "--nproc-per-node", "8", "--home", str(home)]) == 0
    out = capsys.readouterr().out.replace(str(home), "/big/disk").splitlines()
    at = [out.index(ln) for ln in quoted]  # ValueError names a quoted line the output lacks
    assert at == sorted(at) and len(quoted) > 10



def test_readme_states_the_gpu_presets_hours():
    """The README's preset table gives each GPU preset's training hours on 8xH100: the plan's own estimate."""
    from pathlib import Path

    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8").split())
    hw = speedrun.HARDWARE[0]
    assert hw.name == "8xH100"
    hours = [speedrun.recipe_figures(GPU_RECIPES[n], "en", "dense").total_flops / (hw.gpus * hw.peak_bf16 * hw.mfu)
             / 3600 for n in ("d12", "d20", "d26")]
    quoted = " / ".join(f"~{h:.1f} h" if h < 10 else f"~{h:.0f} h" for h in hours)
    assert f"training {quoted} on 8xH100 (from the FLOP count at an assumed {hw.mfu:.0%} MFU" in readme

def test_gpu_recipe_names_the_data_of_every_stage(tmp_path):
    steps = {s.name: s.argv for s in plan(Home(tmp_path), PRESETS["d20"], "en", "dense", "cuda", world_size=8)}
    assert steps["download"][:4] == ["data", "download", "fineweb-edu", "-n"]
    assert steps["download-tasks"][:3] == ["data", "tasks", "arc-easy,arc-challenge,mmlu,gsm8k,humaneval,"
                                                            "smoltalk,mmlu-aux,gsm8k-train,arc-easy-train,arc-challenge-train"]
    assert _flag(steps["midtrain"], "--mix").startswith("smoltalk=1,mmlu-aux=1,gsm8k-train=1,identity=2")
    sft_mix = _flag(steps["sft"], "--mix")
    assert sft_mix.startswith("arc-easy-train=1,arc-challenge-train=1,gsm8k-train=1,smoltalk=0.022")
    assert _flag(steps["rl"], "--task") == "gsm8k-train" and _flag(steps["rl"], "--eval-task") == "gsm8k"
    assert _flag(steps["eval-base"], "--core") == "full" and _flag(steps["eval-base"], "--core-items") == "0"
    for ev in ("eval-mid", "eval-sft", "eval-rl"):  # every item of the full test set of every ChatCORE task
        assert "--max-items" not in steps[ev] and "--tasks" not in steps[ev]
        assert _flag(steps[ev], "--test-sets") == "online"
    assert _flag(steps["pretrain"], "--device-batch") == "auto"
    assert _flag(steps["pretrain"], "--total-batch") == str(2 ** 20)
    ja = {s.name: s.argv for s in plan(Home(tmp_path), PRESETS["d12"], "ja", "iberis", "cuda")}
    assert ja["download"][2] == "abeja-ja" and "chatterbot-ja=2" in _flag(ja["midtrain"], "--mix")
    assert "spelling-ja" in _flag(ja["eval-rl"], "--tasks") and "gsm8k" in _flag(ja["eval-rl"], "--tasks")
    assert ja["pretrain"][ja["pretrain"].index("--layers") + 1] == "iberis"


def test_fewer_gpus_keep_the_batch_by_accumulating(tmp_path):
    for world, accum in ((8, "1"), (4, "2"), (1, "8")):
        steps = {s.name: s.argv for s in plan(Home(tmp_path), PRESETS["d12"], "en", "dense", "cuda", world_size=world)}
        for stage in ("midtrain", "sft", "rl"):
            assert _flag(steps[stage], "--grad-accum") == accum, (world, stage)
    with pytest.raises(ChibiError, match="3 GPUs do not divide 8"):
        plan(Home(tmp_path), PRESETS["d12"], "en", "dense", "cuda", world_size=3)


def test_toy_scale_rewrites_only_sizes(tmp_path):
    full = plan(Home(tmp_path), PRESETS["d20"], "ja", "iberis", "cpu", world_size=2)
    toy = plan(Home(tmp_path), PRESETS["d20"], "ja", "iberis", "cpu", world_size=2, scale="toy")
    assert [s.name for s in full] == [s.name for s in toy]
    size_flags = {f for sizes in TOY_SIZES.values() for f in sizes} | {"--tag", "--from-tag"}

    def masked(argv):
        out, skip = [], False
        for a in argv:
            if skip:
                skip = False
                continue
            if a in size_flags:
                skip = True
                continue
            out.append(a)
        return out

    for f, t in zip(full, toy):
        assert masked(f.argv) == masked(t.argv), f.name
    tp = {s.name: s.argv for s in toy}
    assert _flag(tp["pretrain"], "--depth") == "2" and _flag(tp["pretrain"], "--tag") == "toy-d20-iberis"
    assert _flag(tp["eval-sft"], "--max-items") == "2"
    with pytest.raises(ChibiError, match="already CPU-sized"):
        plan(Home(tmp_path), PRESETS["cpu"], "en", "dense", "cpu", scale="toy")


def test_recipe_figures_are_the_models_flop_count():
    import torch

    from chibichat.model.gpt import GPT, GPTConfig

    fig = speedrun.recipe_figures(GPU_RECIPES["d12"], "en", "dense")
    cfg = GPTConfig(vocab_size=32768, seq_len=2048, n_layer=12, n_embd=768, n_head=12, n_kv_head=12,
                    layers="dense", windows=[0] * 12)
    with torch.device("meta"):
        m = GPT(cfg)
    assert fig.params == m.num_params()
    # 6 x (params - embedding) + 12 x heads x head_dim x seq per attention layer
    assert fig.flops_per_token == 6 * (m.num_params() - 32768 * 768) + 12 * 12 * 12 * 64 * 2048
    assert fig.pretrain_tokens == fig.pretrain_steps * 2 ** 19
    assert abs(fig.pretrain_tokens - 20 * fig.scaling_params) <= 2 ** 18  # 20 tokens per scaling param
    assert fig.stage_flops["pretrain"] == fig.flops_per_token * fig.pretrain_tokens
    assert fig.shards == math.ceil(1.1 * fig.pretrain_tokens * 4.8 / 250e6)
    lines = speedrun.estimate_lines(fig)
    h100x8 = fig.total_flops / (8 * 989e12 * 0.40) / 3600
    assert f"~{h100x8:,.1f} h" in lines[2] and "8xH100" in lines[2]
    iberis = speedrun.recipe_figures(GPU_RECIPES["d12"], "en", "iberis")
    assert iberis.flops_per_token < fig.flops_per_token  # SLC2 layers charged without attention


def test_steps_run_in_a_fork_with_their_exit_status(tmp_path, capfd):
    """speedrun's launcher for a distributed step is torchrun's own main in a forked child (no second
    import of torch; without CUDA its workers are forks too): the workers run the step's argv, and a failed
    worker is the step's failure."""
    import os

    step = speedrun.Step("x", "x", [], tmp_path / "marker", [], distributed=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    assert speedrun.run_step(step, ["data", "--help"], 2, env) == 0
    out = capfd.readouterr().out
    assert out.count("usage: chibichat data") == 2  # one per worker
    assert speedrun.run_step(step, ["no-such-stage"], 2, env) == 1
    err = capfd.readouterr().err
    assert "invalid choice: 'no-such-stage'" in err and "torchrun: ChildFailedError" in err
    # a step on one process (no CUDA here): `chibichat <argv>` in a fork, with its exit status and environment
    one = speedrun.Step("y", "y", [], tmp_path / "marker", [])
    assert speedrun.run_step(one, ["data", "tasks", "identity", "--home", str(tmp_path)], 1,
                             dict(env, CHIBICHAT_HOME=str(tmp_path))) == 2
    assert "'identity' ships with the package or is generated; nothing to download" in capfd.readouterr().err


# ---- --device-batch auto


def test_device_batch_candidates_divide_the_step():
    from chibichat.train.batchprobe import candidates

    assert candidates(2 ** 20, 2048, 8) == [64, 32, 16, 8, 4, 2, 1]
    assert candidates(2 ** 19, 2048, 1) == [256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert candidates(3 * 2048, 2048, 1) == [1]  # 3 rows: only 1 is a power of two dividing it
    with pytest.raises(ChibiError, match="not a multiple of seq_len 2048 x world_size 2"):
        candidates(2048, 2048, 2)


def test_device_batch_probe_picks_the_largest_that_fits():
    from chibichat.train.batchprobe import pick, within_budget

    total = 24 * 2 ** 30  # a 24 GB card
    state = 2 * 2 ** 30
    per_row = 700 * 2 ** 20  # measured-like peak of one 2048-token row
    tried = []

    def fits(d):
        tried.append(d)
        return within_budget(d * per_row + 3 * 2 ** 30, state, total)

    assert pick([64, 32, 16, 8, 4, 2, 1], fits) == 16  # 16 x 0.7 + 3 + 2 = 16.2 GB <= 21.6; 32 does not fit
    assert tried == [64, 32, 16]
    with pytest.raises(ChibiError, match=r"not even 1 row\(s\) per device fit.*tried \[4, 2, 1\]"):
        pick([4, 2, 1], lambda d: False)
    assert within_budget(90, 0, 100) and not within_budget(91, 0, 100)  # 10% margin


def test_device_batch_auto_on_cpu_is_the_cpu_rule():
    import torch

    from chibichat.train.batchprobe import auto_device_batch

    rows, how = auto_device_batch(None, 2 ** 15, 256, 1, torch.device("cpu"))
    assert rows == 64 and "no memory probe" in how  # 64 x 256 = 2^14 tokens
    assert auto_device_batch(None, 512, 64, 2, torch.device("cpu"))[0] == 4


def test_device_batch_flag(parser):
    assert parser.parse_args(["pretrain", "--device-batch", "auto"]).device_batch == "auto"
    assert parser.parse_args(["pretrain", "--device-batch", "8"]).device_batch == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "--device-batch", "lots"])


# ---- data tasks


def test_data_tasks_downloads_and_verifies(server, home, capsys):
    assert main(["data", "tasks", "smoltalk,gsm8k-train", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "smoltalk:" in out and "gsm8k-train:" in out and "verified 2 cached file(s)" in out
    hits = len(server.hits)
    assert main(["data", "tasks", "smoltalk,gsm8k-train", "--home", str(home)]) == 0
    assert len(server.hits) == hits  # resumed from the cache: no request
    f = next((home / "data" / "tasks").rglob("0000.parquet"))
    f.write_bytes(f.read_bytes()[:-1] + b"\x00")
    assert main(["data", "tasks", "smoltalk", "--home", str(home)]) == 2
    assert "does not match the sha256" in capsys.readouterr().err


def test_data_tasks_downloads_the_full_test_sets(server, home, capsys):
    assert main(["data", "tasks", "mmlu,gsm8k", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "mmlu: 2 items (categorical; the full test set of eval chat --test-sets online)" in out
    assert "gsm8k: 2 items (generative; the full test set of eval chat --test-sets online)" in out
    assert "verified 2 cached file(s)" in out
    assert (home / "data" / "tasks" / "cais--mmlu" / "all" / "test" / "manifest.json").is_file()


def test_data_tasks_refuses_what_does_not_download(home, capsys):
    assert main(["data", "tasks", "identity", "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert "'identity' ships with the package or is generated; nothing to download" in err
    assert "full test sets: arc-easy, arc-challenge, mmlu, gsm8k, humaneval" in err
    assert main(["data", "tasks", "nope", "--home", str(home)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_rl_eval_task_gsm8k_is_the_shipped_test_subset(home):
    from chibichat.tasks.registry import home_option

    assert home_option("gsm8k", Home(home)) == {}
    assert home_option("gsm8k-train", Home(home)) == {"home": Home(home)}


from tests.test_task_loaders import server  # noqa: E402,F401  (the stand-in hub fixture)


# ---- the exact GPU plan, toy-sized, under torchrun against a stand-in hub


def _corpus_parquet(lang: str, split: str, chars: int) -> bytes:
    """A shard in the online layout ({"text"} or {"content"} column) from the shipped corpus's text."""
    import io
    import json as _json
    import lzma

    import pyarrow as pa
    import pyarrow.parquet as pq

    from chibichat.data.corpora import assets_dir, get_corpus

    folder = assets_dir() / f"embedded-{lang}"
    texts, n = [], 0
    for f in sorted(folder.glob(f"{split}-*.jsonl.xz")):
        for line in lzma.open(f, "rt", encoding="utf-8"):
            texts.append(_json.loads(line)["text"])
            n += len(texts[-1])
            if n >= chars:
                break
        if n >= chars:
            break
    column = get_corpus("fineweb-edu" if lang == "en" else "abeja-ja").online.column
    buf = io.BytesIO()
    pq.write_table(pa.table({column: texts}), buf, row_group_size=32)
    return buf.getvalue()


@pytest.fixture
def stand_in_hub(monkeypatch):
    """127.0.0.1 serving corpus shards (resolve/main layout), the hub's parquet listing API + task files
    (tests/fixtures/tasks/hub: the training splits and the full test splits the chat evaluations score) and
    the DCLM bundle zip."""
    import json as _json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import unquote

    from chibichat.data.corpora import get_corpus
    from tests.test_dclm_bundle import bundle_zip
    from tests.test_task_loaders import FIXTURES

    files = {"/eval_bundle.zip": bundle_zip()}
    # SmolTalk as a web-scale set can be: its first chat asks a question of GSM8K's test split, which the
    # GPU recipes' midtraining and SFT leave out (--drop-eval-overlap) and count
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    smoltalk = FIXTURES / "hub" / "HuggingFaceTB--smol-smoltalk" / "default" / "train.parquet"
    test_q = pq.read_table(FIXTURES / "hub" / "openai--gsm8k" / "main" / "test.parquet").column("question")[0].as_py()
    rows = [{"messages": [{"content": test_q, "role": "user"}, {"content": "30 pages.", "role": "assistant"}],
             "source": "leaked"}] + pq.read_table(smoltalk).to_pylist()
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    smoltalk_bytes = buf.getvalue()
    for name, lang in (("fineweb-edu", "en"), ("abeja-ja", "ja")):
        src = get_corpus(name).online
        files[f"/datasets/{src.repo}/resolve/main/{src.path.format(i=0)}"] = _corpus_parquet(lang, "train", 400_000)
        files[f"/datasets/{src.repo}/resolve/main/{src.path.format(i=src.val_shard)}"] = _corpus_parquet(lang, "val", 60_000)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = unquote(self.path)
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "datasets"] and len(parts) == 7:
                repo, subset, split = f"{parts[2]}/{parts[3]}", parts[5], parts[6]
                self._send(200, _json.dumps([f"{base}/files/{repo}/{subset}/{split}.parquet"]).encode())
                return
            if parts[0] == "files":
                f = FIXTURES / "hub" / f"{parts[1]}--{parts[2]}" / parts[3] / parts[4]
                if f == smoltalk:
                    self._send(200, smoltalk_bytes)
                    return
                self._send(200, f.read_bytes()) if f.exists() else self._send(404, b"")
                return
            self._send(200, files[path]) if path in files else self._send(404, b"")

        def _send(self, code, body):
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    base = f"http://127.0.0.1:{srv.server_port}"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield {"CHIBICHAT_HF_ENDPOINT": base, "CHIBICHAT_CORE_BUNDLE_URL": base + "/eval_bundle.zip"}
    srv.shutdown()
    srv.server_close()


# The plans the end-to-end test runs: English dense, and Japanese with SLC2 layers (d12, d20 and d26 differ
# only in the sizes --scale toy replaces).
E2E_PLANS = (("d12", "en", "dense"), ("d20", "ja", "iberis"))


@pytest.mark.slow
def test_gpu_plans_run_end_to_end_under_torchrun(tmp_path, stand_in_hub):
    """Both plans at once, so that one run's single-process steps overlap the other's two ranks. On this
    CUDA-less machine speedrun forks every step's processes (torchrun's launcher and workers included,
    speedrun.run_step) instead of starting interpreters that import torch again; torchrun with fresh
    worker interpreters is what tests/test_distributed_stages.py runs."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **stand_in_hub)
    runs = []
    for preset, lang, layers in E2E_PLANS:
        home = tmp_path / f"home-{preset}-{lang}-{layers}"
        cmd = [sys.executable, "-m", "chibichat", "speedrun", "--preset", preset, "--lang", lang, "--layers", layers,
               "--scale", "toy", "--nproc-per-node", "2", "--device", "cpu", "--home", str(home)]
        log = open(tmp_path / f"{home.name}.log", "w+")
        runs.append((preset, lang, layers, home, log, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
    try:
        for *_, p in runs:
            p.wait(timeout=900)
    finally:
        for *_, p in runs:
            if p.poll() is None:
                p.kill()
    for preset, lang, layers, home, log, p in runs:
        log.seek(0)
        out = log.read()
        log.close()
        assert p.returncode == 0, f"{preset} {lang} {layers}:\n" + out[-6000:]
        check_gpu_plan_run(home, preset, lang, layers)


def check_gpu_plan_run(home, preset, lang, layers):
    """Every stage in the report card with its figures, and each stage ran on the recipe's data."""
    import json

    tag = "toy-" + preset + ("" if layers == "dense" else f"-{layers}")
    report = (home / "report" / "report.md").read_text()
    for section in ["## Summary", "## Tokenizer", f"## BASE: pretraining ({tag})", "### BASE evaluation",
                    f"## MID: midtraining ({tag})", "### MID evaluation", f"## SFT: supervised fine-tuning ({tag})",
                    "### SFT evaluation", f"## RL: reinforcement learning ({tag})", "### RL evaluation"]:
        assert section in report, section
    assert "not run" not in report
    steps = sorted((home / "checkpoints" / "base" / tag).glob("step_*"))
    assert json.loads((steps[-1] / "meta.json").read_text())["flags"]["compile"] is True  # compiled, on 2 ranks
    for stage in ("mid", "sft"):
        last = sorted((home / "checkpoints" / stage / tag).glob("step_*"))[-1]
        assert json.loads((last / "meta.json").read_text())["flags"]["compile"] is True
    base = json.loads((home / "eval" / "base" / tag / "summary.json").read_text())
    assert base["core_label"] == "CORE" and base["core_unscored_tasks"] == [] and base["val_bpb"] > 0  # full CORE
    rl = json.loads((home / "checkpoints" / "rl" / tag / "summary.json").read_text())
    # (a toy model never solves GSM8K, so its RL step has no reward to follow: the micro speedrun's
    # end-to-end test is the one that asserts RL moves the weights)
    assert rl["task"] == "gsm8k-train" and rl["eval_task"] == "gsm8k" and rl["steps"] == 2
    assert rl["pass_at_k_before"]["n"] == rl["pass_at_k_after"]["n"] == 2
    mid = json.loads((home / "checkpoints" / "mid" / tag / "summary.json").read_text())
    assert set(mid["mixture"]) >= {"smoltalk", "mmlu-aux", "gsm8k-train"}
    for stage in ("mid", "sft"):  # the stand-in SmolTalk's chat that asks a GSM8K test question
        s = json.loads((home / "checkpoints" / stage / tag / "summary.json").read_text())
        assert s["dropped_eval_overlap"] == {"smoltalk": {"gsm8k": 1}}, stage
    for stage in ("mid", "sft", "rl"):  # the full test sets (the stand-in hub's), 2 items each at toy scale
        ev = json.loads((home / "eval" / stage / tag / "summary.json").read_text())
        assert ev["chat_eval"]["test_sets"] == "online" and "chatcore" in ev  # ja scores its own tasks besides
        assert ev["chatcore_tasks"] == ["arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval", "spelling"]
        assert [ev[f"{k}_n"] for k in ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spelling")] == \
            [2, 2, 2, 2, 1, 2]


# ---- scripts/gpu_check.sh


def test_gpu_check_script_plans_commands_the_cli_accepts(tmp_path, parser):
    import os
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    for mode in ([], ["--cpu"]):
        env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
        p = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh"), "--dry-run", *mode], env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        steps = [ln for ln in p.stdout.splitlines() if ln.startswith("== ") and "(limit" in ln]
        names = [ln.split()[1] for ln in steps]
        want = ["bench-train-d12", "bench-train-d20", "bench-infer", "speedrun"]
        assert names == (["gpu-tests", "doctor"] + want if not mode else want), names
        for ln in steps:
            argv = shlex.split(ln.split("): ", 1)[1])
            if "chibichat" in argv:  # every chibichat command in the script parses
                parser.parse_args(argv[argv.index("chibichat") + 1:])
        gpu = "--device cuda" if not mode else "--device cpu"
        assert all(gpu in ln for ln in steps if " bench " in ln or " speedrun " in ln)
        assert not (tmp_path / "out" / "speedrun-home").exists()  # dry run: nothing ran
        if not mode:
            assert "--compile on --fp8 off,on" in p.stdout and "--depth 20 --width 1280" in p.stdout
