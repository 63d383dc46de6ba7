"""The losses (smolvlm.train.losses): distillation pulls a student towards its own teacher, and a teacher that
cannot be distilled from fails with one line."""

import pytest
import torch

from smolvlm.data.conversations import IGNORE
from smolvlm.errors import SmolVLMError
from smolvlm.io import load
from smolvlm.train import StepBatches, branch_attention_mask, build_data, resolve_config, train


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


def test_a_pass_over_real_tokens_only_equals_the_padded_pass():
    """hidden_states(real_tokens=...) runs the decoder's norms, projections and MLP on the real tokens only
    (models.decoder.RealTokens): the hidden states at real tokens and every parameter's gradient are the
    padded pass's, zeros at the padding."""
    from smolvlm.train import build_train_model

    cfg = resolve_config("test-tiny", None, ["data.questions_per_image=3"])
    model, processor = build_train_model(cfg.model, 0)
    batch = StepBatches(build_data(cfg.data, 0, cfg.batch_size), processor, cfg, 0, 1)[0][0]
    real = batch["attention_mask"].bool()
    assert not real.all(), "the batch needs padding for this test"
    attn = branch_attention_mask(batch["branch_ids"])
    out = {}
    for name, tokens in (("padded", None), ("real", real)):
        model.zero_grad()
        h = model.hidden_states(batch["input_ids"], batch["pixel_values"], batch["pixel_attention_mask"],
                                position_ids=batch["position_ids"], attn_mask=attn, real_tokens=tokens)
        (h[real] ** 2).sum().backward()
        out[name] = (h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (h_pad, g_pad), (h_real, g_real) = out["padded"], out["real"]
    torch.testing.assert_close(h_real[real], h_pad[real], atol=1e-5, rtol=1e-5)
    assert h_real[~real].eq(0).all()
    assert g_real.keys() == g_pad.keys() and any("text_model" in n for n in g_real)
    for n in g_pad:
        torch.testing.assert_close(g_real[n], g_pad[n], atol=1e-4, rtol=1e-4, msg=n)
