"""Exact-match accuracy for GQA and NLVR2.

Normalization (:func:`normalize_short_answer`), applied to predictions and to GQA's gold answers:
lower-case, strip surrounding whitespace, remove one trailing period, strip again
(``" Yes. "`` -> ``"yes"``). Nothing else is touched (no article or number-word handling — GQA's
own evaluation compares answers as they are; this only forgives a model's capital letter or full
stop).

NLVR2 (:func:`nlvr2_accuracy`): labels are booleans (the dataset's ``"True"``/``"False"``); a
prediction may be a bool or a string whose normalized form is ``true``/``false`` (``yes``/``no``
are accepted too, for answers to "Is the statement true?"). Any other prediction counts as wrong
and is counted in ``unparsed``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

from smolvlm.errors import SmolVLMError

__all__ = ["AccuracyResult", "gqa_accuracy", "normalize_short_answer", "nlvr2_accuracy", "parse_bool_answer"]


def normalize_short_answer(text: str) -> str:
    """Lower-case, strip, drop one trailing period, strip again."""
    text = text.lower().strip()
    if text.endswith("."):
        text = text[:-1].strip()
    return text


_TRUE = {"true", "yes"}
_FALSE = {"false", "no"}


def parse_bool_answer(prediction) -> bool | None:
    """A bool from a prediction (``True``/``"true"``/``"Yes."``...), or None if it is not one."""
    if isinstance(prediction, bool):
        return prediction
    if isinstance(prediction, str):
        norm = normalize_short_answer(prediction)
        if norm in _TRUE:
            return True
        if norm in _FALSE:
            return False
    return None


@dataclass
class AccuracyResult:
    """Overall accuracy in 0..1, 1.0/0.0 per id, and how many predictions could not be read."""

    overall: float
    per_question: dict[Hashable, float]
    unparsed: int = 0
    unparsed_ids: list = field(default_factory=list)


def _check_ids(predictions: Mapping, gold: Mapping, what: str) -> None:
    if not gold:
        raise SmolVLMError(f"there are no {what} to score")
    missing = [k for k in gold if k not in predictions]
    extra = [k for k in predictions if k not in gold]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} without a prediction (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} predictions for unknown ids (e.g. {extra[:3]})")
        raise SmolVLMError(f"predictions and {what} do not match: " + "; ".join(parts)
                           + "; give exactly one prediction per id")


def gqa_accuracy(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, str]) -> AccuracyResult:
    """Exact-match accuracy after :func:`normalize_short_answer` on both sides."""
    _check_ids(predictions, answers, "GQA questions")
    per = {}
    for qid, gold in answers.items():
        pred = predictions[qid]
        if not isinstance(pred, str):
            raise SmolVLMError(f"the prediction for GQA question {qid} must be a string, not {type(pred).__name__}")
        per[qid] = 1.0 if normalize_short_answer(pred) == normalize_short_answer(gold) else 0.0
    return AccuracyResult(overall=sum(per.values()) / len(per), per_question=per)


def nlvr2_accuracy(predictions: Mapping[Hashable, object], labels: Mapping[Hashable, bool]) -> AccuracyResult:
    """Accuracy of true/false predictions against NLVR2 labels (see the module docstring)."""
    _check_ids(predictions, labels, "NLVR2 examples")
    per = {}
    unparsed = []
    for ident, label in labels.items():
        if not isinstance(label, bool):
            raise SmolVLMError(f"the NLVR2 label of {ident} must be a bool, not {label!r}")
        pred = parse_bool_answer(predictions[ident])
        if pred is None:
            unparsed.append(ident)
        per[ident] = 1.0 if pred is label else 0.0
    return AccuracyResult(overall=sum(per.values()) / len(per), per_question=per, unparsed=len(unparsed),
                          unparsed_ids=unparsed)
