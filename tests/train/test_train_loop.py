"""The training loop (smolvlm.train.loop): a short run's loss falls and leaves a loadable model, checkpoints and
a loss plot; a blind run trains a text-only model; the schedule of a time-budgeted run."""

from train_harness import losses

from smolvlm.io import load
from smolvlm.train import Stage, budget_plan, checkpoint_paths, resolve_config, stage_at, train
from smolvlm.train.distributed import Dist
from smolvlm.train.loop import UNPLANNED, Budget, check_budget, make_schedule


def test_loss_falls_and_model_loads(base_run):
    ls = losses(base_run)
    assert len(ls) == 12
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3 - 1.0
    model, processor = load(base_run / "model")
    assert model.has_vision and processor.image_seq_len == model.cfg.image_seq_len
    assert (base_run / "loss.png").stat().st_size > 1000
    ckpts = checkpoint_paths(base_run)
    assert [s for s, _ in ckpts] == [8, 12]  # every 4 steps, the last 2 kept


def test_blind_model_is_text_only(tmp_path):
    cfg = resolve_config("test-tiny", None, ["model.blind=true", "stages.0.train=[decoder]", "stages.0.steps=3"])
    r = train(cfg, tmp_path / "blind", progress=False)
    model, processor = load(r.model_dir)
    assert not model.has_vision
    # the seeing model's vocabulary: <end_of_utterance> is one token that stops generation
    assert processor.end_of_utterance_id == 49279 and model.cfg.text.vocab_size == 49280
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi?"}]}])
    assert text == "<|im_start|>User: Hi?<end_of_utterance>\nAssistant:"


def test_schedule_of_stages_and_time_budgets():
    stages = [Stage(name="a", steps=30, warmup_steps=5), Stage(name="b", steps=10, warmup_steps=2)]
    assert [stage_at(stages, s) for s in (0, 29, 30, 39, 40)] == [(0, 0), (0, 29), (1, 0), (1, 9), (1, 10)]
    # 12 steps done at 0.5 s each, 44 s left: 12 + 88 = 100 steps in the stages' proportions (3:1)
    assert [s.steps for s in budget_plan(stages, 12, 0.5, 44.0)] == [75, 25]
    assert [s.steps for s in budget_plan(stages, 0, 0.5, 0.0)] == [6, 3]  # never shorter than warmup + 1
    # budget_may_extend=false (the demo): the budget shortens the stages but never lengthens them
    assert [s.steps for s in budget_plan(stages, 12, 0.5, 44.0, may_extend=False)] == [30, 10]
    assert [s.steps for s in budget_plan(stages, 12, 0.5, 8.0, may_extend=False)] == [21, 7]
    # a re-plan keeps the stages already finished and shares what is left among the rest, never ending before now
    plan = [Stage(name="a", steps=75, warmup_steps=5), Stage(name="b", steps=25, warmup_steps=2)]
    assert [s.steps for s in budget_plan(stages, 80, 0.5, 5.0, current=plan)] == [75, 15]
    assert [s.steps for s in budget_plan(stages, 80, 0.5, 0.0, current=plan)] == [75, 5]  # time is up: ends now
    assert [s.steps for s in budget_plan(stages, 50, 0.5, 10.0, current=plan)] == [52, 18]

    cfg = resolve_config("test-tiny", None, ["stages.0.steps=30"])
    plain = make_schedule(cfg, None, max_steps=None)
    assert plain.total == plain.length == 30 and not plain.planned
    assert make_schedule(cfg, None, max_steps=7).total == 7  # --max-steps pauses the run there
    budgeted = resolve_config("test-tiny", None, ["stages.0.steps=30", "max_minutes=1"])
    # until its plan is made, a budgeted run stays in its first stage and ends by the clock
    first = make_schedule(budgeted, None, max_steps=None)
    assert first.total == UNPLANNED and first.stages[0].steps == UNPLANNED and not first.planned
    capped = make_schedule(resolve_config("test-tiny", None, ["stages.0.steps=30", "max_minutes=1",
                                                              "budget_may_extend=false"]), None, max_steps=None)
    assert capped.total == capped.length == 30 and not capped.planned
    resumed = make_schedule(budgeted, {"planned_steps": [55]}, max_steps=None)
    assert resumed.planned and resumed.total == 55 and resumed.stages[0].steps == 55


def test_a_budgeted_run_whose_steps_slow_down_shortens_its_plan_and_ends_by_it():
    """Steps at 0.2 s while the plan is made, then 0.3 s (the demo's curriculum, then full-length sequences): the
    re-plans shrink the schedule so it ends by its own length, learning rate decayed, within the budget."""
    cfg = resolve_config("test-tiny", None, ["stages.0.steps=1800", "max_minutes=6", "budget_may_extend=false"])
    schedule = make_schedule(cfg, None, max_steps=None)
    budget, seconds, done = Budget(cfg.max_minutes * 60), 0.0, 0
    while done < schedule.total:
        done += 1
        seconds += 0.2 if done <= 300 else 0.3
        check_budget(budget, schedule, cfg, Dist(), done, seconds, None)
        if done == 20:
            assert schedule.total == 1800  # planned on 0.2 s steps: the configured 1800 fit (360 s at 0.2 s)
    assert not budget.spent and schedule.total == schedule.length == done
    assert 1250 < done < 1300 and seconds <= 360  # 300 at 0.2 s and the rest at 0.3 s fill the 6 minutes


def test_a_finished_run_shuts_its_data_worker_down_itself(tmp_path):
    """train() shuts its data worker down before it returns, whatever keeps its frame alive: a loader left to the
    garbage collector is copied into the next run's forked worker, which prints "AssertionError: can only test a
    child process" when it collects it."""
    import gc
    import multiprocessing

    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    gc.collect()
    gc.disable()  # as between two collections: only reference counts free anything
    try:
        train(resolve_config("test-tiny", None, ["workers=1", "stages.0.steps=3"]), tmp_path / "r", progress=False)
        alive = [o for o in gc.get_objects() if type(o) is _MultiProcessingDataLoaderIter]
        assert not alive and not multiprocessing.active_children()
    finally:
        gc.enable()
