"""The trainer: configs, exact resume after a kill, DDP under torchrun equals one process, LoRA and
distillation learn and their artifacts reload, and bad input fails clearly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smolvlm.data.conversations import IGNORE
from smolvlm.errors import SmolVLMError
from smolvlm.io import load
from smolvlm.train import (
    StepBatches,
    TrainConfig,
    branch_attention_mask,
    build_data,
    checkpoint_paths,
    from_dict,
    prepare_run_dir,
    read_metrics,
    resolve_config,
    resume_config,
    token_losses,
    train,
)

SMOLVLM = [sys.executable, "-m", "smolvlm.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(*args, check=True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([*SMOLVLM, *args], capture_output=True, text=True, env=ENV, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"smolvlm {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return p


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out)]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished test-tiny run (fp32, 12 steps) whose model the LoRA and distillation tests start from."""
    out = tmp_path_factory.mktemp("base") / "run"
    cfg = resolve_config("test-tiny", None, ["bf16=false", "stages.0.steps=12", "threads=1"])
    train(cfg, out, progress=False)
    return out


def test_loss_falls_and_model_loads(base_run):
    ls = losses(base_run)
    assert len(ls) == 12
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3 - 1.0
    model, processor = load(base_run / "model")
    assert model.has_vision and processor.image_seq_len == model.cfg.image_seq_len
    assert (base_run / "loss.png").stat().st_size > 1000
    ckpts = checkpoint_paths(base_run)
    assert [s for s, _ in ckpts] == [8, 12]  # every 4 steps, the last 2 kept


def test_config_errors(tmp_path):
    with pytest.raises(SmolVLMError, match="unknown config key 'optim.lr'"):
        resolve_config("test-tiny", None, ["optim.lr=1e-3"])
    with pytest.raises(SmolVLMError, match="'batch_size' must be an integer"):
        resolve_config("test-tiny", None, ["batch_size=big"])
    with pytest.raises(SmolVLMError, match="unknown preset"):
        resolve_config("nope", None, [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  text:\n    hidden_sise: 64\n")
    with pytest.raises(SmolVLMError, match="unknown config key 'model.text.hidden_sise'"):
        resolve_config("test-tiny", str(bad), [])
    bad.write_text("stages:\n  - {name: a, steps: 2.5}\n")
    with pytest.raises(SmolVLMError, match=r"'stages\[0\].steps' must be an integer"):
        resolve_config("test-tiny", str(bad), [])
    bad.write_text("stages: [{name: a, steps: 2, train: [vision, wings]}]\n")
    with pytest.raises(SmolVLMError, match="wings"):
        resolve_config("test-tiny", str(bad), [])
    with pytest.raises(SmolVLMError, match="data.world"):
        train(resolve_config("test-tiny", None, ["data.world={colour: red}"]), tmp_path / "w", progress=False)
    with pytest.raises(SmolVLMError, match=r"data.question_weights names \['colour'\], which the world does not ask"):
        train(resolve_config("test-tiny", None, ["data.question_weights={colour: 2}"]), tmp_path / "q1",
              progress=False)
    with pytest.raises(SmolVLMError, match="data.question_weights must map question types to numbers > 0"):
        train(resolve_config("test-tiny", None, ["data.question_weights={color: 0}"]), tmp_path / "q2",
              progress=False)
    # the CLI turns these into one line and exit code 2
    p = run_cli("train", "--preset", "test-tiny", "--out", str(tmp_path / "x"), "optim.lr=1", check=False)
    assert p.returncode == 2 and "unknown config key 'optim.lr'" in p.stderr and "Traceback" not in p.stderr


def test_cli_lists_every_preset_without_importing_torch():
    from smolvlm.cli.train import TRAIN_PRESETS
    from smolvlm.train import PRESETS

    assert set(TRAIN_PRESETS) == set(PRESETS)
    # building the parser (every `smolvlm` command, `--help`, `score`) must not pay torch's import
    code = "import sys, smolvlm.cli.main as c; c.make_parser(); print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert p.stdout.strip() == "False", p.stderr


def test_yaml_config_and_overrides_round_trip(tmp_path):
    cfg = resolve_config("test-tiny", None, ["optim.lr_decoder=0.01", "data.tasks={vqa: 1, caption: 0.5}"])
    assert cfg.optim.lr_decoder == 0.01 and cfg.data.tasks == {"vqa": 1, "caption": 0.5}
    p = run_cli("train", "--preset", "test-tiny", "--out", str(tmp_path / "x"), "--print-config", "seed=3")
    f = tmp_path / "c.yaml"
    f.write_text(p.stdout)
    again = resolve_config(None, str(f), [])
    assert again == resolve_config("test-tiny", None, ["seed=3"])
    assert isinstance(from_dict(TrainConfig, {}), TrainConfig)


def test_run_dir_guards(tmp_path, base_run):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SmolVLMError, match="not empty and holds no smolvlm run"):
        train(resolve_config("test-tiny", None, []), other, progress=False)
    with pytest.raises(SmolVLMError, match="already holds a training run"):
        train(resolve_config("test-tiny", None, ["bf16=false", "stages.0.steps=12", "threads=1"]), base_run,
              progress=False)
    with pytest.raises(SmolVLMError, match=r"holds a different run \(seed: 0 there, 5 now\)"):
        train(resolve_config("test-tiny", None, ["bf16=false", "stages.0.steps=12", "threads=1", "seed=5"]),
              base_run, resume=True, progress=False)


def test_llava_dataset_errors(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    data = tmp_path / "data.json"
    records = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                    {"from": "gpt", "value": "red"}]},
               {"image": "missing.png", "conversations": [{"from": "human", "value": "Color?"},
                                                          {"from": "gpt", "value": "blue"}]}]
    data.write_text(json.dumps(records))
    over = ["data.source=llava", f"data.path={data}", "stages.0.steps=2"]
    with pytest.raises(SmolVLMError, match="record 1 names image .*missing.png, which does not exist"):
        train(resolve_config("test-tiny", None, over), tmp_path / "r1", progress=False)
    data.write_text("[]")
    with pytest.raises(SmolVLMError, match="holds no conversations"):
        train(resolve_config("test-tiny", None, over), tmp_path / "r2", progress=False)
    data.write_text(json.dumps(records[:1]))
    result = train(resolve_config("test-tiny", None, over), tmp_path / "r3", progress=False)
    assert result.model_dir is not None and len(losses(tmp_path / "r3")) == 2


def test_kill_and_resume_continue_the_same_loss_curve(tmp_path):
    over = ["bf16=false", "stages.0.steps=10", "checkpoint_every=3", "threads=1"]
    straight = tmp_path / "straight"
    run_cli("train", "--preset", "test-tiny", "--out", str(straight), "--no-progress", *over)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*SMOLVLM, "train", "--preset", "test-tiny", "--out", str(killed), "--no-progress",
                             "checkpoint_every=3", *over[:2], "threads=1"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(s >= 3 for s, _ in checkpoint_paths(killed)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [s for s, _ in checkpoint_paths(killed)]
    assert done and max(done) < 10, "the run should have been killed mid-way"
    for _, path in checkpoint_paths(killed):  # whatever survived the kill is whole
        torch.load(path, weights_only=False)
    # no preset, no overrides: the run continues with the config it recorded
    run_cli("train", "--out", str(killed), "--resume", "--no-progress")
    assert losses(killed) == losses(straight)
    assert [r["step"] for r in read_metrics(killed)] == list(range(1, 11))
    a, _ = load(straight / "model")
    b, _ = load(killed / "model")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k


def test_resume_starts_from_the_recorded_config(tmp_path):
    cfg = resolve_config("test-tiny", None, ["optim.lr_decoder=3e-3", "stages.0.steps=7"])
    prepare_run_dir(tmp_path, cfg, resume=False, preset="test-tiny")
    assert resume_config(tmp_path / "none", "test-tiny", None, []) is None
    back = resume_config(tmp_path, "test-tiny", None, ["threads=1", "checkpoint_every=2"])
    assert back.optim.lr_decoder == 3e-3 and back.stages[0].steps == 7 and back.threads == 1
    prepare_run_dir(tmp_path, back, resume=True)  # how it runs may change
    with pytest.raises(SmolVLMError, match="started from preset 'test-tiny', not from 'shapes-tiny'"):
        resume_config(tmp_path, "shapes-tiny", None, [])
    with pytest.raises(SmolVLMError, match=r"holds a different run \(optim.lr_decoder: 0.003 there, 0.001 now\)"):
        prepare_run_dir(tmp_path, resume_config(tmp_path, None, None, ["optim.lr_decoder=1e-3"]), resume=True)
    (tmp_path / "run.json").write_text("{")
    with pytest.raises(SmolVLMError, match="unreadable run.json"):
        resume_config(tmp_path, None, None, [])


def test_torchrun_two_processes_match_one(tmp_path):
    over = ["bf16=false", "stages.0.steps=4", "batch_size=4", "threads=1"]
    one = tmp_path / "one"
    run_cli("train", "--preset", "test-tiny", "--out", str(one), "--no-progress", "grad_accum=2", *over)
    two = tmp_path / "two"
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "smolvlm.cli",
         "train", "--preset", "test-tiny", "--out", str(two), "--no-progress", *over],
        capture_output=True, text=True, env=ENV, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert losses(one) == pytest.approx(losses(two), rel=1e-5, abs=1e-6)
    assert len(losses(two)) == 4


def cross_entropy_on(model, steps, cfg, n_steps: int = 10) -> float:
    total = tokens = 0
    with torch.no_grad():
        for s in range(n_steps):
            for batch in steps[s]:
                embeds = model.encode_images(batch["pixel_values"], batch.get("pixel_attention_mask"))
                _, ce, n = token_losses(model, batch, None, cfg.distill, False, embeds)
                total, tokens = total + float(ce), tokens + n
    return total / tokens


def test_lora_stage_learns_and_adapters_reload(tmp_path, base_run):
    from smolvlm.lora import load_adapters

    out = tmp_path / "lora"
    cfg = resolve_config("test-tiny", None, [
        f"model.init={base_run / 'model'}", "bf16=false", "threads=1", "stages.0.steps=10",
        "stages.0.train=[lora]", "optim.lr_lora=0.01", "lora.rank=4", "data.seed=1",
    ])
    train(cfg, out, progress=False)
    assert json.loads((out / "adapters" / "adapter_config.json").read_text())["r"] == 4
    merged, processor = load(out / "model")
    base, _ = load(base_run / "model")
    # the adapters lower the loss on the batches they were trained on (measured on those fixed batches: the
    # running loss's batch-to-batch spread is larger than what 10 adapter steps on a 12-step base can learn)
    steps = StepBatches(build_data(cfg.data, cfg.seed, cfg.batch_size), processor, cfg, 0, 1)
    assert cross_entropy_on(merged, steps, cfg) < cross_entropy_on(base, steps, cfg) - 1e-3
    with_adapters = load_adapters(base, out / "adapters").eval()
    ids = processor("<|im_start|>User: How many objects are there?<end_of_utterance>\nAssistant:")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(with_adapters(ids), merged(ids), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(load(base_run / "model")[0](ids), merged(ids), atol=1e-4)


def kl_to_teacher(student, teacher, steps, n_steps: int) -> float:
    """Mean KL(teacher || student) per answer token at temperature 1 over fixed batches, computed here
    rather than by the trainer's KD loss, so a KD loss that lost the teacher cannot hide it."""
    total = tokens = 0.0
    with torch.no_grad():
        for s in range(n_steps):
            for batch in steps[s]:
                where = batch["labels"][:, 1:] != IGNORE  # (B, T-1): positions that predict an answer token
                attn = branch_attention_mask(batch["branch_ids"]) if "branch_ids" in batch else None
                logp = []
                for model in (teacher, student):
                    h = model.hidden_states(batch["input_ids"], batch.get("pixel_values"),
                                            batch.get("pixel_attention_mask"), position_ids=batch.get("position_ids"),
                                            attn_mask=attn)[:, :-1][where]  # (N, D)
                    logp.append(torch.log_softmax(model.lm_head(h).float(), -1))  # (N, V)
                t, st = logp
                total += float((t.exp() * (t - st)).sum())
                tokens += int(where.sum())
    return total / tokens


def test_distillation_pulls_the_student_to_its_teacher(tmp_path, base_run):
    """Same seed, same batches, same steps, so the students differ only by what their KD loss reads:
    a student distilled from teacher A ends nearer A (KL(A || student) on those batches) than the one
    trained on the labels alone, and nearer A than one distilled from another teacher B (and vice versa).
    Only the logit KD term links a student to its teacher here (hidden_weight=0), so a KD loss that
    ignores the teacher (or reads a fixed target instead) makes the two distilled students equal."""
    common = ["bf16=false", "threads=1", "stages.0.steps=8", "seed=1"]
    other_teacher = tmp_path / "teacher-b"
    train(resolve_config("test-tiny", None, ["bf16=false", "stages.0.steps=12", "threads=1", "seed=2"]),
          other_teacher, progress=False)
    teachers = {"A": base_run / "model", "B": other_teacher / "model"}
    cfgs = {"plain": resolve_config("test-tiny", None, common)}
    for name, path in teachers.items():
        cfgs[name] = resolve_config("test-tiny", None, [*common, f"distill.teacher={path}", "distill.alpha=0.9",
                                                        "distill.hidden_weight=0"])
    students = {}
    for name, cfg in cfgs.items():
        train(cfg, tmp_path / name, progress=False)
        students[name], processor = load(tmp_path / name / "model")
    cfg = cfgs["plain"]
    steps = StepBatches(build_data(cfg.data, cfg.seed, cfg.batch_size), processor, cfg, 0, 1)
    kl = {(t, s): kl_to_teacher(students[s], load(path)[0], steps, 8)
          for t, path in teachers.items() for s in ("plain", "A", "B")}
    assert kl["A", "A"] < 0.75 * kl["A", "plain"], f"{kl}"
    assert kl["A", "A"] < 0.75 * kl["A", "B"] and kl["B", "B"] < 0.75 * kl["B", "A"], f"{kl}"
    assert students["A"].has_vision


def test_distillation_errors(tmp_path, base_run):
    bad = resolve_config("test-tiny", None, [f"distill.teacher={base_run / 'model'}", "distill.hidden_weight=1",
                                             "model.text.hidden_size=32", "model.text.head_dim=8"])
    with pytest.raises(SmolVLMError, match="equal hidden sizes"):
        train(bad, tmp_path / "bad", progress=False)


def test_blind_model_is_text_only(tmp_path):
    cfg = resolve_config("test-tiny", None, ["model.blind=true", "stages.0.train=[decoder]", "stages.0.steps=3"])
    r = train(cfg, tmp_path / "blind", progress=False)
    model, processor = load(r.model_dir)
    assert not model.has_vision
    # the seeing model's vocabulary: <end_of_utterance> is one token that stops generation
    assert processor.end_of_utterance_id == 49279 and model.cfg.text.vocab_size == 49280
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi?"}]}])
    assert text == "<|im_start|>User: Hi?<end_of_utterance>\nAssistant:"
