"""The benchmark readers on real files in their original formats (tests/fixtures/vision-formats)."""

import json

import pytest

from conftest import FIXTURES
from smolvlm.errors import SmolVLMError
from smolvlm.eval import readers

V = FIXTURES / "vision-formats"
IMAGES = V / "images"


def test_vqav2():
    exs = readers.read_vqav2(V / "vqav2/questions.json", V / "vqav2/annotations.json", IMAGES / "vqav2")
    assert [e.question_id for e in exs] == [458752000, 458752001, 458752002]
    assert all(len(e.answers) == 10 for e in exs) and exs[0].answers[0] == "net"
    assert exs[0].image_path.name == "COCO_train2014_000000458752.jpg" and not readers.missing_images(exs)
    without_answers = readers.read_vqav2(V / "vqav2/questions.json", images_dir=IMAGES / "vqav2")
    assert without_answers[0].answers == []


def test_gqa_file_and_shards():
    one = readers.read_gqa(V / "gqa/questions.json", IMAGES / "gqa")
    assert one[0].question == "What is hanging above the chalkboard?" and one[0].answer
    assert not readers.missing_images(one)
    shards = readers.read_gqa(V / "gqa/question_dir", IMAGES / "gqa")
    assert len(shards) == 2 and not readers.missing_images(shards)


def test_nlvr2_two_images_per_statement():
    exs = readers.read_nlvr2(V / "nlvr2/tiny-dev.json", IMAGES / "nlvr2")
    assert len(exs) == 8 and exs[0].identifier == "dev-850-0-0" and exs[0].label is False
    assert exs[0].left_image.name == "dev-850-0-img0.png" and exs[0].right_image.name == "dev-850-0-img1.png"
    assert not readers.missing_images(exs)


def test_flickr30k_entities():
    exs = readers.read_flickr30k_entities(V / "flickr30k/sentences", V / "flickr30k/test.txt", IMAGES / "flickr30k")
    assert [e.image_id for e in exs] == [6338542128, 4945942737, 1, 2, 3]
    assert all(len(e.captions) == 5 for e in exs) and not readers.missing_images(exs)
    assert exs[2].captions[0] == ("A girl with brown hair sits on the edge of a cement area overlooking water .")
    assert "[/EN#" not in " ".join(c for e in exs for c in e.captions)


def test_visual_entailment_and_vgqa():
    ve = readers.read_visual_entailment(V / "visual_entailment/sample_pairs.jsonl", IMAGES / "visual_entailment")
    assert ve and all(e.label in ("entailment", "neutral", "contradiction") for e in ve)
    assert not readers.missing_images(ve)
    vg = readers.read_vgqa(V / "vgqa/question_answers.json", IMAGES / "vgqa")
    assert vg and not readers.missing_images(vg)


def test_coco_captions_and_karpathy(tmp_path):
    refs = json.loads((FIXTURES / "caption-metrics/refs.json").read_text())
    coco = {"images": [{"id": 1, "file_name": "image1.jpg"}, {"id": 2, "file_name": "image2.jpg"}],
            "annotations": [{"id": i, "image_id": 1 + k, "caption": c}
                            for k, key in enumerate(refs) for i, c in enumerate(refs[key])]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    exs = readers.read_coco_captions(tmp_path / "captions_val2014.json", FIXTURES / "caption-metrics/images")
    assert [e.captions for e in exs] == list(refs.values()) and not readers.missing_images(exs)
    karpathy = {"images": [{"filename": "4945942737.jpg", "split": "test", "imgid": 0,
                            "sentences": [{"raw": "A girl sits by the water.", "tokens": []}]},
                           {"filename": "1016887272.jpg", "split": "train", "imgid": 1,
                            "sentences": [{"raw": "People walk.", "tokens": []}]}], "dataset": "flickr30k"}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    test = readers.read_karpathy(tmp_path / "dataset_flickr30k.json", IMAGES / "flickr30k", split="test")
    assert [(e.image_id, e.captions) for e in test] == [(4945942737, ["A girl sits by the water."])]
    assert not readers.missing_images(test)


def test_bad_files(tmp_path):
    (tmp_path / "broken.json").write_text('{"questions": [')
    with pytest.raises(SmolVLMError, match="not valid JSON"):
        readers.read_vqav2(tmp_path / "broken.json")
    (tmp_path / "latin1.json").write_bytes('{"questions": ["caf\xe9"]}'.encode("latin-1"))
    with pytest.raises(SmolVLMError, match="not valid UTF-8"):
        readers.read_vqav2(tmp_path / "latin1.json")
    with pytest.raises(SmolVLMError, match="does not exist"):
        readers.read_gqa(tmp_path / "missing.json")
    (tmp_path / "dup.json").write_text('{"1": {"imageId": "a", "question": "q"}, '
                                         '"1": {"imageId": "b", "question": "r"}}')
    with pytest.raises(SmolVLMError, match="more than once"):
        readers.read_gqa(tmp_path / "dup.json")
    (tmp_path / "nl.jsonl").write_text('{"identifier": "dev-1-0-0", "sentence": "s", "label": "Maybe"}\n')
    with pytest.raises(SmolVLMError, match="labels are True or False"):
        readers.read_nlvr2(tmp_path / "nl.jsonl")
    ex = readers.read_nlvr2(V / "nlvr2/tiny-dev.json", tmp_path)[0]  # wrong image folder: reported, not fatal
    assert ex.image_missing
