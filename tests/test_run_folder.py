"""Run folders (smolvlm.run_folder): claiming a folder under the trainer's policy (an existing run only with
--resume, a foreign non-empty folder refused) and the evaluation's (a same run continues, --fresh discards), and
JSON-lines logs that a kill cut mid-line."""

import json

import pytest

from smolvlm.errors import SmolVLMError
from smolvlm.run_folder import JsonlLog, claim, first_difference

RUN = {"config": {"seed": 0, "optim": {"lr": 0.003}, "threads": 2}, "preset": "p"}


def train_policy(resume: bool) -> dict:
    """The trainer's policy in the words of train.run_dir.prepare_run_dir (threads may change on a resume)."""
    return {"same": lambda r: {k: v for k, v in r["config"].items() if k != "threads"},
            "existing": None if resume else "{folder} already holds a training run",
            "different": "{folder} holds a different run ({difference})",
            "unreadable": "{folder} holds an unreadable run.json",
            "foreign": "{folder} is not empty and holds no smolvlm run"}


def eval_policy(fresh: bool) -> dict:
    """The evaluation's policy in the words of eval.run_folder.RunFolder."""
    return {"discard": ("predictions.jsonl", "run.json") if fresh else (),
            "different": "{folder} holds predictions of a different run ({run_json})"}


def with_config(**changes) -> dict:
    return {**RUN, "config": {**RUN["config"], **changes}}


def test_a_new_folder_is_created_and_records_the_run(tmp_path):
    for i, policy in enumerate((train_policy(resume=False), eval_policy(fresh=False))):
        folder = tmp_path / str(i) / "run"  # parents are created too
        assert claim(folder, RUN, **policy) is False
        assert json.loads((folder / "run.json").read_text()) == RUN


def test_the_same_run_continues_only_where_the_policy_allows(tmp_path):
    claim(tmp_path, RUN, **train_policy(resume=False))
    with pytest.raises(SmolVLMError, match="already holds a training run"):
        claim(tmp_path, RUN, **train_policy(resume=False))
    # a resume may change what `same` leaves out; run.json keeps the record it was claimed with
    assert claim(tmp_path, with_config(threads=8), **train_policy(resume=True)) is True
    assert json.loads((tmp_path / "run.json").read_text())["config"]["threads"] == 2
    assert claim(tmp_path, RUN, **eval_policy(fresh=False)) is True


def test_a_different_run_is_refused_naming_the_first_difference(tmp_path):
    claim(tmp_path, RUN, **train_policy(resume=False))
    with pytest.raises(SmolVLMError, match=r"holds a different run \(optim.lr: 0.003 there, 0.001 now\)"):
        claim(tmp_path, with_config(optim={"lr": 0.001}), **train_policy(resume=True))
    with pytest.raises(SmolVLMError, match=r"holds predictions of a different run \(.*run.json\)"):
        claim(tmp_path, with_config(seed=5), **eval_policy(fresh=False))
    assert json.loads((tmp_path / "run.json").read_text()) == RUN  # a refusal leaves the folder as it was


def test_fresh_discards_the_named_files_and_claims_the_folder_anew(tmp_path):
    claim(tmp_path, RUN, **eval_policy(fresh=False))
    (tmp_path / "predictions.jsonl").write_text('{"id": 1}\n')
    (tmp_path / "notes.txt").write_text("mine")
    other = with_config(seed=5)
    assert claim(tmp_path, other, **eval_policy(fresh=True)) is False
    assert json.loads((tmp_path / "run.json").read_text()) == other
    assert not (tmp_path / "predictions.jsonl").exists() and (tmp_path / "notes.txt").read_text() == "mine"


def test_a_non_empty_folder_without_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SmolVLMError, match="not empty and holds no smolvlm run"):
        claim(tmp_path, RUN, **train_policy(resume=True))
    assert not (tmp_path / "run.json").exists()
    assert claim(tmp_path, RUN, **eval_policy(fresh=False)) is False  # the evaluation's policy takes it
    assert (tmp_path / "run.json").is_file()


def test_a_kills_leftover_temporary_file_does_not_make_a_folder_foreign(tmp_path):
    (tmp_path / ".run.json.abc123.tmp").write_text("{")  # what files.atomic_path leaves when killed mid-write
    assert claim(tmp_path, RUN, **train_policy(resume=False)) is False
    assert (tmp_path / "run.json").is_file()


def test_an_unreadable_run_json(tmp_path):
    for text in ("{", "[1]", '{"preset": "p"}', '{"config": [1]}', "\xff"):
        (tmp_path / "run.json").write_bytes(text.encode("latin-1"))
        with pytest.raises(SmolVLMError, match="holds an unreadable run.json"):
            claim(tmp_path, RUN, **train_policy(resume=True))
    # without an `unreadable` message it counts as a different run, named in `difference`
    with pytest.raises(SmolVLMError, match=r"\(.*run.json is unreadable\)"):
        claim(tmp_path, RUN, different="{folder} holds a different run ({difference})")
    with pytest.raises(SmolVLMError, match="holds predictions of a different run"):
        claim(tmp_path, RUN, **eval_policy(fresh=False))


def test_a_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("")
    for policy in (train_policy(resume=False), eval_policy(fresh=False)):
        with pytest.raises(SmolVLMError, match=r"cannot create .*file.run \(.*\); pass a writable --out"):
            claim(tmp_path / "file" / "run", RUN, **policy)


def test_first_difference():
    there, now = {"a": 1, "b": {"c": [1], "d": 2}}, {"a": 1, "b": {"c": [1], "d": 3}}
    assert first_difference(there, now) == "b.d: 2 there, 3 now"
    assert first_difference({"a": 1}, {"a": 1, "z": "new"}) == "z: None there, 'new' now"
    assert first_difference({"x": 1}, "other") == ": {'x': 1} there, 'other' now"


def write_rows(path, rows, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_a_cut_tail_is_dropped_and_appends_start_on_a_fresh_line(tmp_path):
    path = tmp_path / "log.jsonl"
    write_rows(path, [{"id": 1}, {"id": 2}], tail='{"id": 3, "predic')  # killed mid-line
    log = JsonlLog(path)
    assert log.read() == [{"id": 1}, {"id": 2}]
    assert log.open() == [{"id": 1}, {"id": 2}]
    log.append({"id": 3}, {"id": 4})
    log.close()
    assert path.read_text().splitlines() == [json.dumps({"id": i}) for i in range(1, 5)]


def test_a_whole_last_row_without_its_newline_is_kept_and_ended(tmp_path):
    path = tmp_path / "log.jsonl"
    write_rows(path, [{"id": 1}], tail='{"id": 2}')
    log = JsonlLog(path)
    assert log.open() == [{"id": 1}, {"id": 2}]
    log.append({"id": 3})
    log.close()
    assert JsonlLog(path).read() == [{"id": 1}, {"id": 2}, {"id": 3}]


@pytest.mark.parametrize("bad", ["", "not json", "[1, 2]", "7", '{"id": "\xff"}'])
def test_a_line_that_is_not_a_whole_object_ends_the_good_part(tmp_path, bad):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"id": 1}\n' + bad.encode("latin-1") + b'\n{"id": 3}\n')
    log = JsonlLog(path)
    assert log.read() == [{"id": 1}]
    assert log.cut() == [{"id": 1}]
    assert path.read_bytes() == b'{"id": 1}\n'


def test_cut_back_to_the_rows_a_predicate_keeps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_rows(path, [{"step": s} for s in (1, 2, 3, 4, 2)], tail='{"step": 5')
    log = JsonlLog(path)
    assert log.open(keep=lambda r: r["step"] <= 2) == [{"step": 1}, {"step": 2}, {"step": 2}]
    log.append({"step": 3})
    log.close()
    assert [r["step"] for r in JsonlLog(path).read()] == [1, 2, 2, 3]
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]  # the atomic rewrite left no temp file


def test_a_missing_log_reads_empty_and_is_created_on_open(tmp_path):
    log = JsonlLog(tmp_path / "log.jsonl")
    assert log.read() == [] and log.cut() == []
    assert not (tmp_path / "log.jsonl").exists()
    log.open()
    log.close()
    assert (tmp_path / "log.jsonl").read_text() == ""


@pytest.mark.parametrize("fsync", [True, False])
def test_appends_are_flushed_and_forced_to_disk_when_asked(tmp_path, monkeypatch, fsync):
    synced = []
    monkeypatch.setattr("smolvlm.run_folder.os.fsync", synced.append)
    log = JsonlLog(tmp_path / "log.jsonl", fsync=fsync)
    log.open()
    log.append({"id": 1}, {"id": 2})
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 2  # flushed: visible before close
    assert len(synced) == (1 if fsync else 0)
    log.close()
