"""`smolvlm score` on files people already have, and `smolvlm eval` end to end: every benchmark format
runs and resumes with a tiny random model, and models whose answer is fixed by hand get the exact
accuracy that answer earns on each fixture (so a broken scorer or prediction path shows)."""

import copy
import json
import shutil

import pytest
import torch

from conftest import FIXTURES
from smolvlm.cli.main import main

CAPTIONS = FIXTURES / "caption-metrics"
V = FIXTURES / "vision-formats"
FAST = ["--limit", "2", "--max-new-tokens", "3", "--batch-size", "4", "--threads", "1", "--no-progress", "--json"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------- score
def test_score_captions_dict_and_coco_formats(capsys, tmp_path):
    code, out, _ = run(capsys, "score", "captions", "--refs", CAPTIONS / "refs.json",
                       "--preds", CAPTIONS / "good_captions.json", "--json", "--no-meteor")
    scores = json.loads(out)
    assert code == 0 and f"{scores['CIDEr']:.4f}" == "0.5637" and f"{scores['BLEU-2']:.4f}" == "0.4899"
    assert set(scores) >= {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}

    refs = json.loads((CAPTIONS / "refs.json").read_text())
    preds = json.loads((CAPTIONS / "bad_captions.json").read_text())
    ids = {"image1": 391895, "image2": 522418}
    coco = {"images": [{"id": i} for i in ids.values()] + [{"id": 7}],
            "annotations": [{"id": n, "image_id": ids[k], "caption": c} for k in refs for n, c in enumerate(refs[k])]
            + [{"id": 99, "image_id": 7, "caption": "an image nobody captioned"}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": ids[k], "caption": c} for k, c in preds.items()]))
    code, out, err = run(capsys, "score", "captions", "--refs", tmp_path / "ann.json", "--preds",
                         tmp_path / "res.json", "--no-meteor")
    assert code == 0 and "CIDEr    0.2790" in out and "ROUGE-L  0.3121" in out
    assert "scored the 2 images" in err  # COCOEvalCap scores the images of the results file


def test_score_captions_bad_input(capsys, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = run(capsys, "score", "captions", "--refs", CAPTIONS / "refs.json", "--preds", tmp_path / "bad.json")
    assert code == 2 and "not valid JSON (line 1" in err
    (tmp_path / "one.json").write_text('{"image1": "a cat"}')
    code, _, err = run(capsys, "score", "captions", "--refs", CAPTIONS / "refs.json", "--preds", tmp_path / "one.json")
    assert code == 2 and "1 id(s) without a candidate (e.g. 'image2')" in err
    (tmp_path / "three.json").write_text('{"image1": "a", "image2": "b", "image3": "c"}')
    code, _, err = run(capsys, "score", "captions", "--refs", CAPTIONS / "refs.json", "--preds",
                       tmp_path / "three.json")
    assert code == 2 and "not in the references" in err
    (tmp_path / "latin1.json").write_bytes('{"image1": "caf\xe9", "image2": "x"}'.encode("latin-1"))
    code, _, err = run(capsys, "score", "captions", "--refs", CAPTIONS / "refs.json", "--preds",
                       tmp_path / "latin1.json")
    assert code == 2 and "not valid UTF-8" in err
    (tmp_path / "empty.json").write_text('{"image1": "", "image2": "a dog"}')
    code, out, err = run(capsys, "score", "captions", "--refs", CAPTIONS / "refs.json", "--preds",
                         tmp_path / "empty.json", "--no-meteor", "--json")
    assert code == 0 and "1 empty candidate" in err and json.loads(out)["warnings"]


def test_score_vqa(capsys, tmp_path):
    ann = json.loads((V / "vqav2/annotations.json").read_text())["annotations"]
    results = [{"question_id": a["question_id"], "answer": a["answers"][0]["answer"]} for a in ann]
    results[2]["answer"] = "something else entirely"
    (tmp_path / "res.json").write_text(json.dumps(results))
    args = ["score", "vqa", "--questions", V / "vqav2/questions.json", "--annotations", V / "vqav2/annotations.json",
            "--results", tmp_path / "res.json"]
    code, out, _ = run(capsys, *args, "--json")
    data = json.loads(out)
    assert code == 0 and set(data["per_question"]) == {str(a["question_id"]) for a in ann}
    assert data["per_question"][str(ann[2]["question_id"])] == 0.0
    assert data["overall"] == pytest.approx(sum(data["per_question"].values()) / 3)
    code, out, _ = run(capsys, *args)
    assert code == 0 and out.splitlines()[1].startswith("overall")
    (tmp_path / "short.json").write_text(json.dumps(results[:2]))
    code, _, err = run(capsys, *args[:-1], tmp_path / "short.json")
    assert code == 2 and "1 question(s) without a prediction" in err


# -------------------------------------------------------------------------------------------- eval
@pytest.fixture(scope="module")
def model_dir(tiny_hf_checkpoint):
    return tiny_hf_checkpoint[0]


def fixed_answer_checkpoint(folder, tiny_hf_checkpoint, hf_text_tokenizer, answer: str):
    """The tiny checkpoint rewired so that, whatever the images and question, greedy decoding says `answer`
    then <end_of_utterance>. Every block's output projections are zeroed, so the last hidden state is the
    last token's embedding and the model is a bigram table: token k of the answer gets the basis vector
    e_(k+1) as its embedding (every other token e_0), and lm_head maps e_0 to the answer's first token and
    e_(k+1) to the token after token k."""
    base, hf_model = tiny_hf_checkpoint
    chain = hf_text_tokenizer.encode(answer, add_special_tokens=False) + [49279]  # ... <end_of_utterance>
    assert len(set(chain)) == len(chain) < hf_model.config.text_config.hidden_size
    model = copy.deepcopy(hf_model)
    text = model.model.text_model
    with torch.no_grad():
        for layer in text.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        text.norm.weight.fill_(1.0)
        embed, head = text.embed_tokens.weight, model.lm_head.weight  # (V, D) each
        embed.zero_()
        embed[:, 0] = 1.0
        head.zero_()
        head[chain[0], 0] = 10.0  # RMSNorm scales e_k to sqrt(D) e_k: a logit margin of 80 survives bf16
        for k, tok in enumerate(chain[:-1]):
            embed[tok] = 0.0
            embed[tok, k + 1] = 1.0
            head[chain[k + 1], k + 1] = 10.0
    shutil.copytree(base, folder)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def says(tmp_path_factory, tiny_hf_checkpoint, hf_text_tokenizer):
    """answer -> a checkpoint folder that answers it to everything."""
    made = {}

    def make(answer: str):
        if answer not in made:
            made[answer] = fixed_answer_checkpoint(tmp_path_factory.mktemp("says") / answer, tiny_hf_checkpoint,
                                                   hf_text_tokenizer, answer)
        return made[answer]

    return make


def predictions(run_dir) -> list[str]:
    return [json.loads(line)["prediction"] for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


def test_eval_vqav2_accuracy_of_a_known_answer(capsys, tmp_path, says):
    """VQAv2's fixture: humans answered net (7 of 10, orange once), pitcher (9 of 10), orange (10 of 10).
    "orange" scores per question mean_i min(1, matches among the other 9 / 3): 9/10 x 1/3 = 0.3, 0, 1."""
    code, out, err = run(capsys, "eval", "--model", says("orange"), "--task", "vqav2", "--data", V / "vqav2",
                         "--images", V / "images/vqav2", "--out", tmp_path / "run", *FAST[2:])
    assert code == 0, err
    result = json.loads(out)
    assert predictions(tmp_path / "run") == ["orange"] * 3
    assert result["examples"] == 3 and result["accuracy"] == pytest.approx((0.3 + 0 + 1) / 3)
    assert result["official"]["overall"] == 43.33
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(result["accuracy"])


@pytest.mark.parametrize("answer, task, data, images, accuracy, unparsed", [
    ("yes", "nlvr2", "nlvr2/tiny-dev.json", "nlvr2", 4 / 8, 0),  # 4 of the 8 statements are true
    ("No.", "nlvr2", "nlvr2/tiny-dev.json", "nlvr2", 4 / 8, 0),  # "No." normalizes to no = False
    ("orange", "nlvr2", "nlvr2/tiny-dev.json", "nlvr2", 0.0, 8),  # not a yes/no answer: wrong and unparsed
    ("yes", "gqa", "gqa/question_dir", "gqa", 1 / 2, None),  # answers: picture, yes
    ("picture", "gqa", "gqa/question_dir", "gqa", 1 / 2, None),
    ("orange", "gqa", "gqa/question_dir", "gqa", 0.0, None),
])
def test_eval_accuracy_of_a_known_answer(capsys, tmp_path, says, answer, task, data, images, accuracy, unparsed):
    code, out, err = run(capsys, "eval", "--model", says(answer), "--task", task, "--data", V / data,
                         "--images", V / "images" / images, "--out", tmp_path / "run", *FAST[2:])
    assert code == 0, err
    result = json.loads(out)
    assert predictions(tmp_path / "run") == [answer] * result["examples"]
    assert result["accuracy"] == pytest.approx(accuracy)
    if unparsed is not None:
        assert result["unparsed_answers"] == unparsed


def test_eval_shapes_vqa_accuracy_of_a_known_answer(capsys, tmp_path, says):
    """The generated shapes questions: "yes" is right exactly on the exist questions whose answer is yes."""
    from smolvlm.data.shapes import ShapesWorld, WorldConfig

    world = {"question_types": ["exist", "count"]}
    code, out, err = run(capsys, "eval", "--model", says("yes"), "--task", "shapes-vqa", "--world", json.dumps(world),
                         "--out", tmp_path / "run", "--limit", "16", *FAST[2:])
    assert code == 0, err
    result = json.loads(out)
    questions = [q for item in ShapesWorld(WorldConfig.from_dict(world), seed=0).vqa("test", 4, questions_per_image=4)
                 for q in item.questions]
    exist_yes = [q.answer == "yes" for q in questions if q.qtype == "exist"]
    assert len(questions) == 16 and 0 < sum(exist_yes) < len(exist_yes)  # a figure a stuck scorer cannot give
    assert result["accuracy"] == pytest.approx(sum(exist_yes) / 16)
    assert result["per_answer_type"] == pytest.approx({"exist": sum(exist_yes) / len(exist_yes), "count": 0.0})


@pytest.mark.parametrize("task, data, images, keys", [
    ("vqav2", "vqav2", "vqav2", {"accuracy", "official"}),
    ("gqa", "gqa/questions.json", "gqa", {"accuracy"}),
    ("gqa", "gqa/question_dir", "gqa", {"accuracy"}),
    ("nlvr2", "nlvr2/tiny-dev.json", "nlvr2", {"accuracy", "unparsed_answers"}),
    ("flickr30k-retrieval", "flickr30k", "flickr30k", {"image_to_text_R@1", "text_to_image_R@10"}),
])
def test_eval_on_each_format(capsys, tmp_path, model_dir, task, data, images, keys):
    code, out, err = run(capsys, "eval", "--model", model_dir, "--task", task, "--data", V / data,
                         "--images", V / "images" / images, "--out", tmp_path / "run", *FAST)
    assert code == 0, err
    result = json.loads(out)
    assert keys <= set(result) and result["unreadable_images"] == 0 and result["examples"] in (1, 2)
    assert (tmp_path / "run/metrics.json").is_file()
    assert len((tmp_path / "run/predictions.jsonl").read_text().splitlines()) == result["examples"]


def test_eval_coco_captions_and_karpathy(capsys, tmp_path, model_dir):
    refs = json.loads((CAPTIONS / "refs.json").read_text())
    coco = {"images": [{"id": 1, "file_name": "image1.jpg"}, {"id": 2, "file_name": "image2.jpg"}],
            "annotations": [{"id": n, "image_id": 1 + k, "caption": c}
                            for k, key in enumerate(refs) for n, c in enumerate(refs[key])]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    code, out, err = run(capsys, "eval", "--model", model_dir, "--task", "coco-captions", "--data",
                         tmp_path / "captions_val2014.json", "--images", CAPTIONS / "images", "--out", tmp_path / "a",
                         *FAST)
    assert code == 0, err
    assert {"BLEU-4", "ROUGE-L", "CIDEr"} <= set(json.loads(out))
    karpathy = {"images": [{"filename": f"{i}.jpg", "split": "test", "sentences": [{"raw": f"caption {i}"}] * 5}
                           for i in (4945942737, 6338542128)]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    code, out, err = run(capsys, "eval", "--model", model_dir, "--task", "flickr30k-retrieval", "--data",
                         tmp_path / "dataset_flickr30k.json", "--images", V / "images/flickr30k", "--out",
                         tmp_path / "b", *FAST)
    assert code == 0, err
    assert json.loads(out)["captions"] == 10


def test_eval_unreadable_image_resume_and_other_run(capsys, tmp_path, model_dir):
    images = tmp_path / "images"
    shutil.copytree(V / "images/nlvr2", images)
    (images / "dev-850-0-img1.png").write_bytes(b"not a png")  # the first example's right image
    args = ["eval", "--model", model_dir, "--task", "nlvr2", "--data", V / "nlvr2/tiny-dev.json", "--images", images,
            "--out", tmp_path / "run", *FAST[:-1]]
    code, out, err = run(capsys, *args, "--limit", "3")
    assert code == 0, err
    assert "unreadable_images        1" in out and "dev-850-0-img1.png" in err
    # resume: the first 3 are cached, only the 4th is new
    code, out, _ = run(capsys, *args, "--limit", "3")
    assert code == 0
    timing = (tmp_path / "run/timing.jsonl").read_text().splitlines()
    assert len(timing) == 1  # the second run had nothing to do
    preds = (tmp_path / "run/predictions.jsonl").read_text().splitlines()
    (tmp_path / "run/predictions.jsonl").write_text("\n".join(preds[:2]) + "\n" + preds[2][:10])  # killed mid-line
    code, _, _ = run(capsys, *args, "--limit", "3")
    assert code == 0 and len((tmp_path / "run/predictions.jsonl").read_text().splitlines()) == 3
    code, _, err = run(capsys, *args[:-1], "--limit", "4")  # other settings, same folder
    assert code == 2 and "different run" in err


def test_eval_suite_shapes(capsys, tmp_path, model_dir):
    code, out, err = run(capsys, "eval", "--suite", "shapes", "--model", model_dir, "--limit", "2",
                         "--max-new-tokens", "2", "--out", tmp_path / "suite", "--threads", "1", "--no-progress")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == ("| model | params | VQA acc | caption CIDEr | R@1 (i→t / t→i) | GQA-style acc "
                        "| NLVR2-style acc |")
    assert lines[2].startswith(f"| {model_dir.name} | 6.41M |")
    assert "| model | task | samples/s | peak memory MB |" in out
    suite = json.loads((tmp_path / "suite/suite.json").read_text())
    tasks = suite["models"][0]["tasks"]
    assert set(tasks) == {"shapes-vqa", "shapes-captions", "shapes-retrieval", "shapes-gqa", "shapes-nlvr2"}
    assert tasks["shapes-retrieval"]["captions"] == 10  # 2 images x 5 captions
    assert all(t["efficiency"]["peak_memory_mb"] > 0 for t in tasks.values())
    assert (tmp_path / "suite/suite.md").read_text() == out


def test_eval_shapes_on_a_chosen_world(capsys, tmp_path, model_dir):
    """--world: the shapes world a model was trained on (e.g. the demo's five question types)."""
    world = '{"question_types": ["count", "exist"], "relation_axes": ["horizontal"]}'
    code, out, err = run(capsys, "eval", "--task", "shapes-vqa", "--model", model_dir, "--world", world,
                         "--out", tmp_path / "w", *FAST[:1], "8", *FAST[2:])
    assert code == 0, err
    metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert metrics["examples"] == 8 and set(metrics["per_answer_type"]) <= {"count", "exist"}, metrics
    # the predictions of one world are not resumed as another's
    code, out, err = run(capsys, "eval", "--task", "shapes-vqa", "--model", model_dir, "--world",
                         '{"question_types": ["color"]}', "--out", tmp_path / "w", *FAST[:1], "8", *FAST[2:])
    assert code == 2 and "holds predictions of a different run" in err
    code, out, err = run(capsys, "eval", "--task", "shapes-vqa", "--model", model_dir, "--world", "[1, 2]",
                         "--out", tmp_path / "bad", *FAST)
    assert code == 2 and "--world must be a JSON object" in err
    code, out, err = run(capsys, "eval", "--task", "shapes-vqa", "--model", model_dir, "--world", "{nope",
                         "--out", tmp_path / "bad", *FAST)
    assert code == 2 and "--world is not valid JSON" in err
