"""The training data (smolvlm.train.data): a shapes world or a LLaVA JSON file that cannot give examples fails
with one line naming the key or record."""

import json

import pytest
from train_harness import losses

from smolvlm.errors import SmolVLMError
from smolvlm.train import resolve_config, train


def test_shapes_data_errors(tmp_path):
    with pytest.raises(SmolVLMError, match="data.world"):
        train(resolve_config("test-tiny", None, ["data.world={colour: red}"]), tmp_path / "w", progress=False)
    with pytest.raises(SmolVLMError, match=r"data.question_weights names \['colour'\], which the world does not ask"):
        train(resolve_config("test-tiny", None, ["data.question_weights={colour: 2}"]), tmp_path / "q1",
              progress=False)
    with pytest.raises(SmolVLMError, match="data.question_weights must map question types to numbers > 0"):
        train(resolve_config("test-tiny", None, ["data.question_weights={color: 0}"]), tmp_path / "q2",
              progress=False)


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


def test_training_questions_are_the_questions_the_model_is_trained_on():
    """The answer prior (the demo's blind baseline) counts training_questions: they must be the very turns of the
    training conversations after the curriculum, drawn without rendering."""
    from smolvlm.train import ShapesTrainingData

    cfg = resolve_config("shapes-tiny", None, ["data.curriculum_steps=3"])
    data = ShapesTrainingData(cfg.data, cfg.batch_size)
    start = 3 * cfg.batch_size
    turns = []
    for i in range(start, start + 40):
        conv = data.conversation(i)
        if conv.task == "vqa":
            texts = [m["content"] if isinstance(m["content"], str) else
                     "".join(p["text"] for p in m["content"] if p.get("type") == "text") for m in conv.messages]
            turns += list(zip(texts[0::2], texts[1::2], strict=True))
    drawn = [(q.question, q.answer) for q in data.training_questions(40)]
    assert len(drawn) > 100 and drawn == turns
