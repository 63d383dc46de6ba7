"""VQA accuracy exactly as the official evaluation: GT-Vision-Lab/VQA
``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` as it stands on master (the version whose human
answers go through the same normalisation as the prediction, and whose per-type accuracies average
each question's leave-one-out mean). That script is Python 2; where Python 2 and 3 differ on the
operations it uses, the Python 2 result is reproduced (marked "py2" below).

Per question (:func:`vqa_accuracy`), in the official order:

1. every human answer and the prediction: ``\\n`` and ``\\t`` become spaces, then ``strip()``;
2. if the (stripped) human answers are all the same string, **nothing else happens to any string**:
   the prediction is compared as it is, case and punctuation included;
3. otherwise every human answer and the prediction go through :func:`process_punctuation` and then
   :func:`process_digit_article`;
4. for each human answer, the others are the answers *different from it* (the official code compares
   the answer dicts, so identical dicts are left out together; VQA's dicts differ by ``answer_id``,
   and plain strings here count as different by position); acc = min(1, (others equal to the
   prediction) / 3); the question's accuracy is the mean of these values.

Aggregates (:func:`evaluate_vqa`): overall, per answer type and per question type are means of the
per-question accuracies in the order the questions are given (the official order is that of the
annotations file). The official report rounds ``100 * sum / count`` to 2 decimals with Python 2's
``round`` (ties away from zero: 12.125 -> 12.13, where Python 3 gives 12.12);
:meth:`VQAResult.official` does the same.

Not reproduced: characters whose Unicode properties changed between Python 2.7's Unicode 5.2 and
this Python's (e.g. U+180E was whitespace for ``split``/``strip`` then).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal

from smolvlm.errors import SmolVLMError

__all__ = ["VQAResult", "evaluate_vqa", "normalize_answer", "process_digit_article", "process_punctuation",
           "official_round", "vqa_accuracy", "CONTRACTIONS", "MANUAL_MAP", "ARTICLES", "PUNCTUATION"]

#: Number words mapped to digits (the official ``manualMap``; nothing above ten).
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(["a", "an", "the"])
#: The characters handled by process_punctuation, in the official order (no ``'``, ``:``, ``*``, ``.``).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")

# The official contractions table: an apostrophe-less spelling -> the spelling with apostrophes.
# (Keys with capitals, e.g. "Im", can never match since the text is lower-cased first; kept as is.)
_CONTRACTION_PAIRS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've|
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't|
havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's|Id've I'd've|
I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|
mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|
shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't|
shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've|
somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd|
someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's|somethingd something'd|
somethingd've something'd've|something'dve something'd've|somethingll something'll|thats that's|
thered there'd|thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd|
theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|wasnt wasn't|
wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're|whats what's|
whatve what've|whens when's|whered where'd|wheres where's|whereve where've|whod who'd|whod've who'd've|
who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|whyre why're|whys why's|wont won't|
wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|
y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|
you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS = dict(pair.split(" ") for pair in _CONTRACTION_PAIRS.replace("\n", "").split("|"))

# \d is ASCII-only (py2: these byte-string patterns carry no re.UNICODE flag when the official code
# compiles them, so "٣,٤" is not a comma between digits there).
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)", re.ASCII)
# sic: "(?!<=\d)" is a look-ahead for the two characters "<=" plus a digit, always true before a ".",
# so every "." not followed by a digit goes ("5." -> "5"), whatever precedes it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
# sic: the official call is periodStrip.sub("", text, re.UNICODE), which passes re.UNICODE (32) as `count`.
_OFFICIAL_SUB_COUNT = 32


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: for each character of :data:`PUNCTUATION` in order, delete
    every occurrence if the *original* text has it next to a space or has a comma between two digits
    anywhere (so "1,000 red-blue" -> "1000 redblue"), otherwise turn every occurrence into a space;
    then remove the periods not followed by a digit (the first 32 of them)."""
    out = text
    comma_between_digits = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or comma_between_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_OFFICIAL_SUB_COUNT)


def _py2_lower(text: str) -> str:
    # py2 unicode.lower() maps each character on its own: no final-sigma rule ("ΟΣ" -> "οσ", not "ος")
    # and U+0130 -> "i" (Python 3 gives "i" + U+0307).
    if text.isascii():
        return text.lower()
    return "".join("i" if c == "\u0130" else c.lower() for c in text)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, split on whitespace, number words to digits,
    then drop the articles (so "a one" -> "1"), then restore the contractions, joined by single spaces."""
    words = [MANUAL_MAP.get(w, w) for w in _py2_lower(text).split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    """The step every answer and prediction gets, normalised or not."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """An answer as the official evaluation compares it when the human answers disagree."""
    return process_digit_article(process_punctuation(_clean(answer)))


def _answer_text(answer) -> str:
    text = answer.get("answer") if isinstance(answer, Mapping) else answer
    if not isinstance(text, str):
        raise SmolVLMError(f"a human answer must be a string or an {{\"answer\": string}} object, not {answer!r}")
    return text


def vqa_accuracy(prediction: str, answers: Sequence) -> float:
    """The official accuracy (0..1) of one predicted answer against the human answers: strings (all
    distinct for the leave-one-out, as VQA's answers with their ``answer_id``), or the official answer
    dicts (``{"answer": ..., "answer_id": ...}``; dicts equal after normalisation are left out together)."""
    if isinstance(answers, str | Mapping) or not answers:
        raise SmolVLMError("a VQA question needs a non-empty list of human answers to score a prediction")
    if not isinstance(prediction, str):
        raise SmolVLMError(f"a predicted answer must be a string, not {type(prediction).__name__}")
    gts = [_clean(_answer_text(a)) for a in answers]
    pred = _clean(prediction)
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    n = len(gts)
    hits = [a == pred for a in gts]
    # keys[i] == keys[j] exactly when the official code's answer dicts i and j compare equal (it
    # replaces each dict's "answer" by the processed text before comparing).
    if all(isinstance(a, Mapping) for a in answers):
        ids = [a.get("answer_id") for a in answers]
        if all(isinstance(i, Hashable) and i is not None for i in ids) and len(set(ids)) == n:
            keys = list(range(n))  # distinct answer_ids: every dict differs (the VQA files)
        else:
            keys = [{**a, "answer": g} for a, g in zip(answers, gts, strict=True)]
    else:
        keys = list(range(n))
    total = 0.0
    for i in range(n):
        matches = sum(1 for j in range(n) if hits[j] and keys[j] != keys[i])
        # Added one by one as the official sum() does (Python >= 3.12's sum() of floats compensates).
        total += min(1.0, matches / 3)
    return total / n


def official_round(x: float, digits: int = 2) -> float:
    """py2 ``round``: the exact binary value rounded to `digits` decimals, ties away from zero."""
    return float(Decimal(x).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


@dataclass
class VQAResult:
    """Unrounded accuracies in 0..1: ``overall``, by answer type, by question type, by question id,
    plus the sums and counts behind them (needed to reproduce the official rounding)."""

    overall: float
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]
    per_question: dict[Hashable, float]
    _sums: dict = field(default_factory=dict, repr=False)

    def official(self, digits: int = 2) -> dict:
        """The official ``accuracy`` dict: percentages computed as ``round(100 * sum / count, 2)``
        (py2 rounding)."""
        overall_sum, count = self._sums["overall"]
        return {
            "overall": official_round(100 * overall_sum / count, digits),
            "perQuestionType": {t: official_round(100 * s / c, digits) for t, (s, c) in self._sums["qtype"].items()},
            "perAnswerType": {t: official_round(100 * s / c, digits) for t, (s, c) in self._sums["atype"].items()},
        }

    def official_per_question(self, digits: int = 2) -> dict:
        """The official ``evalQA``: each question's accuracy as ``round(100 * acc, 2)``."""
        return {qid: official_round(100 * acc, digits) for qid, acc in self.per_question.items()}


def _question_fields(q) -> tuple:
    if isinstance(q, Mapping):
        if "question_id" not in q:
            raise SmolVLMError("every VQA annotation needs a question_id")
        answers = q.get("answers")
        if not isinstance(answers, list):
            raise SmolVLMError(f"question {q['question_id']}: 'answers' must be a list of human answers")
        return q["question_id"], answers, q.get("answer_type"), q.get("question_type")
    return q.question_id, list(q.answers), q.answer_type, q.question_type


def evaluate_vqa(predictions: Mapping[Hashable, str], questions: Iterable) -> VQAResult:
    """Score `predictions` (question id -> answer) on `questions`: the official annotations (dicts with
    ``question_id``, ``answers`` as ``[{"answer": ..., "answer_id": ...}, ...]`` or strings,
    ``answer_type``, ``question_type``) or objects with those attributes (answers as strings). Every
    question must have a prediction and every prediction a question (as the official evaluation needs)."""
    items = [_question_fields(q) for q in questions]
    ids = [i[0] for i in items]
    if len(set(ids)) != len(ids):
        raise SmolVLMError("the annotations list some question ids more than once; each question must appear once")
    missing = [i for i in ids if i not in predictions]
    known = set(ids)
    extra = [i for i in predictions if i not in known]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} question(s) without a prediction (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} prediction(s) for unknown question ids (e.g. {extra[:3]})")
        raise SmolVLMError("the results do not match the questions: " + "; ".join(parts)
                           + "; give exactly one answer per annotated question")
    if not items:
        raise SmolVLMError("there are no questions to score")
    per_question: dict[Hashable, float] = {}
    qtype: dict[str, list] = {}
    atype: dict[str, list] = {}
    acc_sum = 0.0
    for qid, answers, answer_type, question_type in items:
        pred = predictions[qid]
        if not isinstance(pred, str):
            raise SmolVLMError(f"the answer for question {qid} must be a string, not {type(pred).__name__}")
        if not answers:
            raise SmolVLMError(f"question {qid} has no human answers to score against (a test split?)")
        try:
            acc = vqa_accuracy(pred, answers)
        except SmolVLMError as exc:
            raise SmolVLMError(f"question {qid}: {exc}") from None
        per_question[qid] = acc
        acc_sum += acc  # one by one, in order, like the official sum(accQA)
        for table, key in ((qtype, question_type), (atype, answer_type)):
            entry = table.setdefault(key, [0.0, 0])
            entry[0] += acc
            entry[1] += 1
    n = len(items)
    return VQAResult(
        overall=acc_sum / n,
        per_answer_type={t: s / c for t, (s, c) in atype.items()},
        per_question_type={t: s / c for t, (s, c) in qtype.items()},
        per_question=per_question,
        _sums={"overall": (acc_sum, n), "qtype": {t: tuple(v) for t, v in qtype.items()},
               "atype": {t: tuple(v) for t, v in atype.items()}},
    )
