"""VQA accuracy exactly as the official evaluation (GT-Vision-Lab/VQA ``vqaEval.py``, current version,
i.e. after the fix that made the per-question-type / per-answer-type accuracies use each question's
averaged accuracy instead of the last leave-one-out value).

Per question (``vqa_accuracy``):

1. the predicted answer: ``\\n`` and ``\\t`` become spaces, then ``strip()``, then
   :func:`process_punctuation`, then :func:`process_digit_article`;
2. the human answers are left untouched when all of them are identical; otherwise each one goes
   through :func:`process_punctuation` only (never through the digit/article step);
3. for each of the N human answers (N = 10 in VQA), leave it out and count the other answers equal
   to the processed prediction: acc_i = min(1, matches_i / 3); the question's accuracy is the mean of
   the N values (sum in order, divided by N).

Answer processing rules (:func:`process_punctuation`): for each character of
``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` (in that order): if the *original* text contains the
character followed by a space or preceded by a space, or contains a comma between two digits
(``\\d,\\d``), every occurrence is deleted; otherwise every occurrence becomes a space. Then every
``.`` not followed by a digit is removed — at most 32 of them, because the official code passes
``re.UNICODE`` (= 32) where ``re.sub`` expects ``count``. ``'``, ``:`` and ``*`` are not in the
list and stay. :func:`process_digit_article`: lower-case, split on whitespace, map number words
``none``/``zero``..``ten`` to digits (``none`` -> ``0``), drop the articles ``a an the``, expand the
official contractions table (``dont`` -> ``don't``...), join with single spaces.

Aggregates (:func:`evaluate_vqa`): overall = mean of the per-question accuracies; per answer type /
per question type = mean over the questions of that type. The official report prints
``round(100 * sum / count, 2)``; :class:`VQAResult` keeps the unrounded values in 0..1 and
:meth:`VQAResult.official` gives the rounded percentages the way the official code computes them.

One deliberate difference: the official code leaves out "the items different from this answer
dict" (dict equality), so two identical answer dicts would be left out together; VQA's answer dicts
all differ (``answer_id`` 1..10), and here answers are plain strings left out one position at a time.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from smolvlm.errors import SmolVLMError

__all__ = ["VQAResult", "evaluate_vqa", "normalize_answer", "process_digit_article", "process_punctuation",
           "vqa_accuracy", "CONTRACTIONS", "MANUAL_MAP", "ARTICLES", "PUNCTUATION"]

#: Number words mapped to digits (the official ``manualMap``).
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(["a", "an", "the"])
#: The characters handled by process_punctuation, in the official order.
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

_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a look-ahead, always true before "."
_OFFICIAL_SUB_COUNT = 32  # the official call is periodStrip.sub("", text, re.UNICODE): count=32


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation`` (see the module docstring)."""
    out = text
    comma_between_digits = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or comma_between_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_OFFICIAL_SUB_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words to digits, no articles,
    contractions restored."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official evaluation compares it."""
    return process_digit_article(process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official accuracy (0..1) of one predicted answer against the human answers."""
    if isinstance(answers, str) or not answers:
        raise SmolVLMError("a VQA question needs a non-empty list of human answers to score a prediction")
    pred = normalize_answer(prediction)
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    total = sum(1 for a in gts if a == pred)
    accs = []
    for a in gts:
        matches = total - (1 if a == pred else 0)  # the others, with this answer left out
        accs.append(min(1, float(matches) / 3))
    return float(sum(accs)) / len(accs)


@dataclass
class VQAResult:
    """Unrounded accuracies in 0..1: ``overall``, by answer type, by question type, by question id,
    plus the number of questions of each type (needed to reproduce the official rounding)."""

    overall: float
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]
    per_question: dict[Hashable, float]
    _sums: dict = field(default_factory=dict, repr=False)

    def official(self, digits: int = 2) -> dict:
        """The official ``accuracy`` dict: percentages rounded as ``round(100 * sum / count, 2)``."""
        overall_sum, count = self._sums["overall"]
        return {
            "overall": round(100 * float(overall_sum) / count, digits),
            "perQuestionType": {t: round(100 * float(s) / c, digits) for t, (s, c) in self._sums["qtype"].items()},
            "perAnswerType": {t: round(100 * float(s) / c, digits) for t, (s, c) in self._sums["atype"].items()},
        }


def evaluate_vqa(predictions: Mapping[Hashable, str], questions: Iterable) -> VQAResult:
    """Score `predictions` (question id -> answer) on `questions`: objects with ``question_id``,
    ``answers`` (list of strings), ``answer_type`` and ``question_type`` attributes, or dicts in the
    official annotation format (``answers`` as ``[{"answer": ...}, ...]``). Every question must have
    a prediction and every prediction a question (as the official evaluation asserts)."""
    items = []
    for q in questions:
        if isinstance(q, Mapping):
            answers = [a["answer"] if isinstance(a, Mapping) else a for a in q.get("answers", [])]
            items.append((q["question_id"], answers, q.get("answer_type"), q.get("question_type")))
        else:
            items.append((q.question_id, list(q.answers), q.answer_type, q.question_type))
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
        acc = vqa_accuracy(pred, answers)
        per_question[qid] = acc
        acc_sum += acc
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
