"""The training config (smolvlm.train.config, presets): presets, YAML files and KEY=VALUE overrides resolve to
one TrainConfig, and a wrong key or value fails with one line naming it."""

import subprocess
import sys

import pytest
from train_harness import ENV, run_cli

from smolvlm.errors import SmolVLMError
from smolvlm.train import TrainConfig, from_dict, resolve_config


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


def test_workers_auto_follows_the_training_dtype():
    cfg = resolve_config("shapes-tiny", None, [])
    assert cfg.workers == "auto"
    # float32 training makes the next batches in a worker process; bf16 training in its own process
    assert resolve_config("shapes-tiny", None, ["bf16=false"]).data_workers == 1
    assert resolve_config("shapes-tiny", None, ["bf16=true"]).data_workers == 0
    assert resolve_config("shapes-tiny", None, ["bf16=true", "workers=2"]).data_workers == 2
    for bad in ("many", "-1"):
        with pytest.raises(SmolVLMError, match="'workers' must be a whole number >= 0 or auto"):
            resolve_config("shapes-tiny", None, [f"workers={bad}"])
    with pytest.raises(SmolVLMError, match="'workers' must be an integer"):
        resolve_config("shapes-tiny", None, ["workers=true"])
