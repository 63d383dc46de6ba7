"""The evaluation metrics against published official scores, the official code's rules and the
official scorers themselves (pycocoevalcap + Java, when installed)."""

import json
import random
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FIXTURES
from smolvlm.errors import SmolVLMError
from smolvlm.eval.accuracy import gqa_accuracy, nlvr2_accuracy, normalize_short_answer
from smolvlm.eval.caption_metrics import bleu, cider_d, cider_d_tokenized, lcs_length, rouge_l, score_captions
from smolvlm.eval.ptb_tokenizer import PUNCTUATIONS, tokenize_captions
from smolvlm.eval.retrieval import retrieval_recall

CAPTIONS = FIXTURES / "caption-metrics"
# Published in the fixture's README (pycocoevalcap with the Java PTB tokenizer).
PUBLISHED = {
    "good_captions.json": {"BLEU-1": 0.6667, "BLEU-2": 0.4899, "BLEU-3": 0.3469, "BLEU-4": 0.0000,
                           "METEOR": 0.3444, "ROUGE-L": 0.4280, "CIDEr": 0.5637},
    "bad_captions.json": {"BLEU-1": 0.4815, "BLEU-2": 0.2404, "BLEU-3": 0.1359, "BLEU-4": 0.0000,
                          "METEOR": 0.1861, "ROUGE-L": 0.3121, "CIDEr": 0.2790},
}
needs_official = pytest.mark.usefixtures("official_scorer")  # Java + pycocoevalcap; a failure under CI if missing


# ------------------------------------------------------------------------------------------ captions
@pytest.mark.parametrize("cands", sorted(PUBLISHED))
def test_published_caption_scores(cands):
    refs = json.loads((CAPTIONS / "refs.json").read_text())
    preds = json.loads((CAPTIONS / cands).read_text())
    result = score_captions(refs, preds, with_meteor=False)
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert f"{result.scores[name]:.4f}" == f"{PUBLISHED[cands][name]:.4f}", name
    assert "METEOR" not in result.scores and result.unavailable["METEOR"] == "not requested"
    assert cider_d(refs, preds) == result.scores["CIDEr"]


@needs_official
def test_published_meteor_with_the_java_scorer():
    refs = json.loads((CAPTIONS / "refs.json").read_text())
    preds = json.loads((CAPTIONS / "good_captions.json").read_text())
    assert f"{score_captions(refs, preds).scores['METEOR']:.4f}" == "0.3444"


@pytest.mark.parametrize("caption, tokens", [
    ("A dog's toy, isn't it?", "a dog 's toy is n't it"),
    ("Two (2) men cannot play.", "two -lrb- 2 -rrb- men can not play"),  # PTB escapes survive the filter
    ("The U.S. flag... and Mr. Smith's 1,000.50 dollars!", "the u.s. flag and mr. smith 's 1,000.50 dollars"),
    ("a 3-year-old at 5:30 p.m. - \"hello\"", "a 3-year-old at 5:30 p.m. hello"),
    ("o'clock ma'am rock'n'roll", "o'clock ma'am rock 'n' roll"),
    ("x a.k.a.i.e.!", "x a.k.a.i.e."),  # JFlex takes the longest match, not the first alternative
    ("x a. <b> y", "x a <b> y"),  # an acronym before SGML gets its period split off
    ("½file.jpg", "1/2 file.jpg"),
    ("कुत्ता ① ﬁ", "कुत्ता ① ﬁ"),  # Indic vowel signs join the word; circled digits are tokens
    ("", ""),
])
def test_ptb_tokenization(caption, tokens):
    assert tokenize_captions([caption]) == [tokens]


def _tricky_captions(n: int, seed: int) -> list[str]:
    pieces = ["a", "A", "The", "dog's", "dogs'", "don't", "can't", "cannot", "gonna", "I'm", "o'clock", "'90s",
              "Mr.", "St.", "U.S.", "etc.", "e.g.", "a.m.", "1,000", "3.5", "5:30", "12/25/2020", "1/2", "½", "$5",
              "£3", "10%", "#1", "@user", "www.example.com", "x-ray", "3-year-old", "(", ")", "[", "]", "{", "}",
              "\"", "'", "`", "“", "”", "’", "--", "-", "—", "...", "…", ",", ";", ":", "!", "?", ".", "&", "&amp;",
              "<b>", "*", "/", "café", "日本", "AT&T", "Ph.D.", "file.jpg", ":)", "\t", "  ", "\u00a0"]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(pieces) for _ in range(rng.randint(1, 10))]
        out.append("".join(w + rng.choice([" ", " ", ""]) for w in words) + rng.choice(["", ".", " ."]))
    return out


@needs_official
def test_ptb_tokenization_matches_the_java_tokenizer(tmp_path):
    """The official step: Stanford PTBTokenizer 3.4.1 over all captions at once, then the filter."""
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    jar = ptb.os.path.join(ptb.os.path.dirname(ptb.__file__), ptb.STANFORD_CORENLP_3_4_1_JAR)
    caps = _tricky_captions(1500, seed=7)
    (tmp_path / "caps.txt").write_bytes("\n".join(caps).encode())
    out = subprocess.run(["java", "-Dfile.encoding=UTF-8", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
                          "-preserveLines", "-lowerCase", str(tmp_path / "caps.txt")], capture_output=True,
                         check=True).stdout.decode()
    java = [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)
            for line in out.split("\n")[:len(caps)]]
    ours = tokenize_captions(caps)
    assert [(c, o, j) for c, o, j in zip(caps, ours, java, strict=True) if o != j] == []


@needs_official
def test_scorers_equal_pycocoevalcap_bit_for_bit():
    import contextlib
    import io

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(60)]
    refs = {i: [" ".join(rng.choices(vocab, k=rng.randint(1, 14))) for _ in range(rng.randint(1, 5))]
            for i in range(200)}
    cands = {i: " ".join(rng.choices(vocab, k=rng.randint(1, 14))) for i in range(200)}
    res = {i: [c] for i, c in cands.items()}
    with contextlib.redirect_stdout(io.StringIO()):
        official_bleu = Bleu(4).compute_score(refs, res)
    assert bleu(refs, cands) == official_bleu
    score, per = cider_d_tokenized(refs, cands)
    official = Cider().compute_score(refs, res)
    assert score == official[0] and per == list(official[1])
    score, per = rouge_l(refs, cands)
    official = Rouge().compute_score(refs, res)
    assert score == official[0] and per == list(official[1])


def _lcs_dp(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from("abcd"), max_size=30), st.lists(st.sampled_from("abcd"), max_size=30))
def test_bit_parallel_lcs_equals_dynamic_programming(a, b):
    assert lcs_length(a, b) == _lcs_dp(a, b)


def test_cider_idf_is_over_the_evaluated_references():
    # the same image and candidate score differently in a different corpus: idf is corpus level
    alone = cider_d({"a": ["a red circle"]}, {"a": "a red circle"})
    assert alone == 0.0  # one image: log(1) - log(1) = 0 for every n-gram
    two = cider_d({"a": ["a red circle"], "b": ["a blue square"]}, {"a": "a red circle", "b": "a blue square"})
    # unigrams, bigrams, trigrams match exactly (cosine 1); a 3-word caption has no 4-grams (0): 10 * 3/4
    assert two == pytest.approx(7.5)


def test_bad_caption_input():
    refs = {"1": ["a dog"], "2": ["a cat"]}
    with pytest.raises(SmolVLMError, match="without a candidate"):
        score_captions(refs, {"1": "a dog"})
    with pytest.raises(SmolVLMError, match="not in the references"):
        score_captions(refs, {"1": "a dog", "2": "a cat", "3": "x"})
    with pytest.raises(SmolVLMError, match="must be one caption"):
        score_captions(refs, {"1": "a dog", "2": ["a cat"]})
    with pytest.raises(SmolVLMError, match="non-empty list"):
        score_captions({"1": "a dog"}, {"1": "a dog"})
    result = score_captions(refs, {"1": "a dog", "2": "  ..."}, with_meteor=False)
    assert result.per_image["CIDEr"]["2"] == 0.0 and "1 empty candidate" in result.warnings[0]


# ----------------------------------------------------------------------------------- other accuracies
def test_gqa_and_nlvr2_accuracy():
    assert normalize_short_answer(" Yes. ") == "yes"
    res = gqa_accuracy({"a": "Chalkboard.", "b": "the table"}, {"a": "chalkboard", "b": "table"})
    assert res.overall == 0.5 and res.per_question == {"a": 1.0, "b": 0.0}
    res = nlvr2_accuracy({"x": "yes", "y": "False.", "z": "maybe"}, {"x": True, "y": False, "z": False})
    assert res.overall == pytest.approx(2 / 3) and res.unparsed == 1 and res.unparsed_ids == ["z"]
    with pytest.raises(SmolVLMError, match="do not match"):
        gqa_accuracy({"a": "x"}, {"a": "x", "b": "y"})


# ----------------------------------------------------------------------------------------- retrieval
def test_retrieval_recall_conventions():
    # 2 images x 4 captions (0, 1 -> image 0; 2, 3 -> image 1)
    sim = np.array([[0.1, 0.9, 0.8, 0.0],
                    [0.5, 0.4, 0.3, 0.2]])
    rec = retrieval_recall(sim, [0, 0, 1, 1], ks=(1, 2))
    # image 0: its caption 1 ranks first -> hit at 1; image 1: best own caption (2) ranks 3rd
    assert rec["i2t"] == {1: 0.5, 2: 0.5}
    # captions: 0 -> image 1 first (miss at 1); 1 -> image 0 (hit); 2 -> image 0 first (miss); 3 -> image 1 (hit)
    assert rec["t2i"] == {1: 0.5, 2: 1.0}
    tie = retrieval_recall(np.zeros((3, 3)), [0, 1, 2], ks=(1,))  # ties go to the lower index
    assert tie == {"i2t": {1: 1 / 3}, "t2i": {1: 1 / 3}}
    with pytest.raises(SmolVLMError, match="NaN"):
        retrieval_recall(np.array([[np.nan]]), [0])
    with pytest.raises(SmolVLMError, match="has no caption"):
        retrieval_recall(np.zeros((2, 2)), [0, 0])
