"""VQA accuracy against the official evaluation (GT-Vision-Lab/VQA vqaEval.py, master), case by case.

Every case states, beside it, the value the official code gives, worked out by hand from that code:
the answers and the prediction get \\n/\\t -> space and strip(); if the answers are then all the same
string nothing else happens; otherwise all of them and the prediction get processPunctuation then
processDigitArticle; each answer is left out in turn and min(1, matches among the others / 3) is
averaged. The same cases go through `smolvlm score vqa` end to end."""

import json

import pytest

from smolvlm.cli.main import main
from smolvlm.errors import SmolVLMError
from smolvlm.eval.vqa_metric import (
    evaluate_vqa,
    normalize_answer,
    official_round,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
)

# (prediction, human answers, official accuracy)
# ---- the answers agree (after \n/\t -> space and strip): no normalisation at all, on either side
SAME = {
    "same: exact": ("yes", ["yes"] * 10, 1.0),  # each leave-one-out has 9 matches -> min(1, 9/3) = 1
    "same: case kept": ("Yes", ["yes"] * 10, 0.0),  # "Yes" != "yes": no lower-casing here
    "same: period kept": ("yes.", ["yes"] * 10, 0.0),  # no processPunctuation here
    "same: no number map": ("two", ["2"] * 10, 0.0),  # no processDigitArticle here
    "same: articles kept": ("a dog", ["a dog"] * 10, 1.0),  # "a dog" == "a dog" (neither side drops "a")
    "same: strip": ("  yes\n", ["yes"] * 10, 1.0),  # "\n" -> " ", strip() -> "yes"
    "same: tab": ("red\twhite", ["red white"] * 10, 1.0),  # "\t" -> " " -> "red white"
    "same: no split/join": ("red  white", ["red white"] * 10, 0.0),  # the two spaces stay
    # the answers are stripped before the "all the same?" test: these ten are all "yes" -> no normalisation
    "same: after strip": ("Yes", ["yes", " yes", "yes\n", "\tyes"] + ["yes"] * 6, 0.0),
}
# ---- the answers differ: all of them and the prediction are normalised
MIXED = {
    "mixed: lower": ("Yes", ["yes"] * 9 + ["no"], 1.0),  # "yes"; out a yes: 8 -> 1, out "no": 9 -> 1
    "mixed: lower, 2 matches": ("YES", ["Yes"] * 2 + ["no"] * 8, 0.6),  # (2 x 1/3 + 8 x 2/3) / 10
    "mixed: answers mapped too": ("2", ["two"] * 9 + ["3"], 1.0),  # the answers "two" -> "2" as well
    "mixed: prediction mapped": ("two", ["2"] * 9 + ["3"], 1.0),  # "two" -> "2"
    "mixed: none -> 0": ("none", ["0"] * 2 + ["1"] * 8, 0.6),  # "0": (2 x 1/3 + 8 x 2/3) / 10
    "mixed: nothing above ten": ("eleven", ["11"] * 9 + ["eleven"], 0.3),  # 1 match: (0 + 9 x 1/3) / 10
    "mixed: map then drop articles": ("a one", ["1"] * 9 + ["2"], 1.0),  # "a" dropped, "one" -> "1"
    "mixed: articles on both sides": ("a dog", ["the dog"] * 9 + ["cat"], 1.0),  # both -> "dog"
    "mixed: contraction": ("dont know", ["don't know"] * 3 + ["no"] * 7, 0.9),  # "dont" -> "don't": 3 x 2/3 + 7
    "mixed: answer period": ("yes", ["yes."] * 9 + ["no"], 1.0),  # the answers "yes." -> "yes"
    "mixed: comma -> space": ("red,blue", ["red blue"] * 3 + ["red"] * 7, 0.9),  # (3 x 2/3 + 7 x 1) / 10
    # "-" has a space next to it somewhere in the original text -> every "-" is deleted
    "mixed: deleted next to a space": ("left-hand - side", ["lefthand side"] * 9 + ["x"], 1.0),
    "mixed: digit comma": ("1,000", ["1000"] * 9 + ["100"], 1.0),  # "\d,\d" -> every mark deleted
    # a comma between digits anywhere deletes every mark, "-" included: "1000 redblue" (4 matches -> 1)
    "mixed: digit comma deletes all": ("1,000 red-blue", ["1000 redblue"] * 4 + ["no"] * 6, 1.0),
    "mixed: period quirk": ("5.", ["5"] * 9 + ["6"], 1.0),  # "(?!<=\d)" is a look-ahead: "5." -> "5"
    "mixed: decimal point kept": ("3.5", ["3.5"] * 9 + ["35"], 1.0),  # a "." before a digit stays
    "mixed: 32 periods at most": ("yes" + "." * 33, ["yes"] * 9 + ["no"], 0.0),  # count=re.UNICODE=32: "yes."
    "mixed: colon kept": ("5:30", ["5 30"] * 9 + ["6"], 0.0),  # ":" is not in the list
    "mixed: apostrophe kept": ("it's", ["it s"] * 9 + ["no"], 0.0),  # "'" is not in the list
    # py2 (the official script is Python 2): lower() maps each character alone, \d is ASCII only
    "py2: no final sigma": ("ΟΔΟΣ", ["οδοσ"] * 9 + ["x"], 1.0),  # py2 "οδοσ" (Python 3 gives "οδος")
    "py2: dotted I": ("İ", ["i"] * 9 + ["x"], 1.0),  # py2 u"\u0130".lower() == "i"
    "py2: ASCII digits": ("١,٢", ["١ ٢"] * 9 + ["x"], 1.0),  # not "\d,\d" there: "," -> " "
}
# ---- leave-one-out: "dog" against m "dog" and 10 - m "cat" (m = 0 and 10 agree: no normalisation)
# out a dog: m - 1 matches, out a cat: m matches -> (m x min(1, (m-1)/3) + (10-m) x min(1, m/3)) / 10
LEAVE_ONE_OUT = {f"m={m}": ("dog", ["dog"] * m + ["cat"] * (10 - m), acc)
                 for m, acc in enumerate([0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])}
# ---- answers as the official dicts: the official leaves out every dict *equal* to the current one
DICTS = {
    # no answer_id: the 4 equal "dog" dicts are left out together: dogs 0 matches, cats 4 -> 6/10
    "dicts: equal dicts out together": ("dog", [{"answer": "dog"}] * 4 + [{"answer": "cat"}] * 6, 0.6),
    # equal once normalised ("dog", "dog", "dog"): dogs 0 matches, cats 3 -> 7/10 (0.9 with answer_ids)
    "dicts: equal after normalisation": ("dog", [{"answer": "dog"}, {"answer": "Dog."}, {"answer": "dog!"}]
                                         + [{"answer": "cat"}] * 7, 0.7),
    # distinct answer_ids (the VQA files): one left out at a time, 4 matches -> 1
    "dicts: answer_ids": ("dog", [{"answer": a, "answer_id": i + 1} for i, a in enumerate(["dog"] * 4 + ["cat"] * 6)],
                          1.0),
}
CASES = {**SAME, **MIXED, **LEAVE_ONE_OUT, **DICTS}


@pytest.mark.parametrize("name", CASES)
def test_official_accuracy_of_each_case(name):
    prediction, answers, official = CASES[name]
    assert vqa_accuracy(prediction, answers) == pytest.approx(official, abs=1e-12)


def test_score_vqa_gives_the_official_value_of_every_case(capsys, tmp_path):
    """`smolvlm score vqa` on official-format files made of all the cases: per question, the unrounded
    accuracy and the official evalQA (round(100 * acc, 2)) equal the hand-worked official values."""
    questions, annotations, results, expected = [], [], [], {}
    for qid, (name, (prediction, answers, official)) in enumerate(CASES.items(), start=1):
        dicts = [a if isinstance(a, dict) else {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                 for i, a in enumerate(answers)]
        questions.append({"question_id": qid, "image_id": 1, "question": name})
        annotations.append({"question_id": qid, "image_id": 1, "question_type": "none of the above",
                            "answer_type": "other", "answers": dicts, "multiple_choice_answer": ""})
        results.append({"question_id": qid, "answer": prediction})
        expected[str(qid)] = official
    files = {"q.json": {"questions": questions}, "a.json": {"annotations": annotations}, "r.json": results}
    for fname, data in files.items():
        (tmp_path / fname).write_text(json.dumps(data))
    code = main(["score", "vqa", "--questions", str(tmp_path / "q.json"), "--annotations", str(tmp_path / "a.json"),
                 "--results", str(tmp_path / "r.json"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["per_question"] == pytest.approx(expected, abs=1e-12)
    assert out["official"]["evalQA"] == {k: round(100 * v, 2) for k, v in expected.items()}  # no ties here


@pytest.mark.parametrize("raw, normalized", [
    ("Two", "2"), ("none", "0"), ("ten dogs", "10 dogs"), ("eleven", "eleven"),  # number words up to ten
    ("A dog", "dog"), ("the an a", ""), ("a one", "1"),  # articles, dropped after the number map
    ("dont", "don't"), ("isnt it", "isn't it"), ("somebody'd", "somebodyd"),  # the table, quirks included
    ("Im", "im"),  # the table's capitalised keys never match (the text is lower-cased first)
    ("yes.", "yes"), ("3.5", "3.5"), ("Mr. T.", "mr t"), ("5.", "5"),  # periods go unless a digit follows
    ("red,blue", "red blue"), ("red, blue", "red blue"),  # "," becomes a space, or is deleted next to one
    ("1,000", "1000"), ("1,000 red-blue", "1000 redblue"),  # a digit comma deletes every punctuation mark
    ("black/white", "black white"), ("black / white", "black white"),
    ("left-hand", "left hand"), ("red-blue -x", "redblue x"),  # the space test looks at the whole text...
    ("red-blue;-x", "red blue x"),  # ...as given: ";" -> " " does not put a space next to "-" for that test
    ("it's 5:30", "it's 5:30"),  # ' and : are not in the official list
    ("  yes\n", "yes"), ("no\tway", "no way"),
])
def test_answer_normalization(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_the_two_steps_apart():
    assert process_punctuation("." * 40) == "." * 8  # periodStrip.sub("", text, re.UNICODE): count = 32
    # each mark is decided on its own: " (" -> "(" deleted; ")" has no space beside it -> " "
    assert process_punctuation("A (b)") == "A b "
    assert process_digit_article("The  Two   DOGS") == "2 dogs"


def test_per_type_aggregates_and_the_official_rounding():
    qs = [{"question_id": 1, "answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},
          {"question_id": 2, "answers": ["2"] * 2 + ["3"] * 8, "answer_type": "number", "question_type": "how many"},
          # "dog" is the last answer: its own leave-one-out gives 0, the mean 0.3 (per-type uses the mean)
          {"question_id": 3, "answers": ["cat"] * 9 + ["dog"], "answer_type": "other", "question_type": "what"},
          {"question_id": 4, "answers": ["red"] * 10, "answer_type": "other", "question_type": "what"}]
    res = evaluate_vqa({1: "yes", 2: "two", 3: "dog", 4: "blue"}, qs)
    # 1: agreeing, equal -> 1; 2: "two" -> "2", 2 matches -> 0.6; 3: 1 match -> 0.3; 4: 0
    assert res.per_question == pytest.approx({1: 1.0, 2: 0.6, 3: 0.3, 4: 0.0}, abs=1e-12)
    assert res.overall == pytest.approx(1.9 / 4)
    assert res.per_answer_type == pytest.approx({"yes/no": 1.0, "number": 0.6, "other": 0.15})
    assert res.per_question_type == pytest.approx({"is the": 1.0, "how many": 0.6, "what": 0.15})
    # round(100 * 1.9 / 4, 2) = 47.5; "other": round(100 * 0.3 / 2, 2) = 15.0
    official = res.official()
    assert official == {"overall": 47.5, "perAnswerType": {"yes/no": 100.0, "number": 60.0, "other": 15.0},
                        "perQuestionType": {"is the": 100.0, "how many": 60.0, "what": 15.0}}
    assert res.official_per_question() == {1: 100.0, 2: 60.0, 3: 30.0, 4: 0.0}
    # two decimals: 100 * (1 + 0.6 + 0) / 3 = 53.333... -> 53.33
    assert evaluate_vqa({1: "yes", 2: "two", 4: "blue"}, [qs[0], qs[1], qs[3]]).official()["overall"] == 53.33


def test_official_rounding_is_python2s():
    # 97 right out of 800: 100 * 97.0 / 800 = 12.125 exactly; py2 round -> 12.13 (Python 3's round: 12.12)
    qs = [{"question_id": i, "answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is"}
          for i in range(800)]
    res = evaluate_vqa({i: "yes" if i < 97 else "no" for i in range(800)}, qs)
    assert 100 * res.overall == 12.125 and res.official()["overall"] == 12.13
    assert res.official()["perAnswerType"]["yes/no"] == 12.13
    assert official_round(0.125) == 0.13 and official_round(-0.125) == -0.13
    assert official_round(2.675) == 2.67  # the double is 2.67499999...: not a tie


def test_bad_input_is_a_clear_error():
    qs = [{"question_id": 1, "answers": ["yes"] * 10}, {"question_id": 2, "answers": ["no"] * 10}]
    with pytest.raises(SmolVLMError, match="1 question.s. without a prediction"):
        evaluate_vqa({1: "yes"}, qs)
    with pytest.raises(SmolVLMError, match="unknown question ids"):
        evaluate_vqa({1: "yes", 2: "no", 3: "x"}, qs)
    with pytest.raises(SmolVLMError, match="must be a string"):
        evaluate_vqa({1: "yes", 2: 2}, qs)
    with pytest.raises(SmolVLMError, match="no human answers"):
        evaluate_vqa({1: "yes"}, [{"question_id": 1, "answers": []}])
    with pytest.raises(SmolVLMError, match="question 1: a human answer must be a string"):
        evaluate_vqa({1: "yes"}, [{"question_id": 1, "answers": [{"answer_id": 1}]}])
    with pytest.raises(SmolVLMError, match="non-empty list"):
        vqa_accuracy("yes", "yes")
