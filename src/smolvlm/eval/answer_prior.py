"""The blind baseline: answer a question without its image, with the answer that question most often has in the
training data. Counted per exact question text; a text the training data never asks gets its question type's most
common answer (the VQA paper's "per Q-type prior", Antol et al. 2015, made per question). For questions drawn as the
training ones are, no answerer that does not see the image is right more often on average, up to the sampling
of the counts. Questions drawn otherwise (held-out colour-shape pairs) can move the answers away from the
training ones, and there a trained text-only model may do a little better.

    prior = AnswerPrior.fit(questions)       # objects with .question, .qtype, .answer (smolvlm.data.shapes.Question)
    prior.answer("How many red objects are there?", "count")  # -> "2"
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from smolvlm.errors import SmolVLMError


@dataclass
class AnswerPrior:
    by_text: dict[str, Counter]  # question text -> answer counts
    by_type: dict[str, Counter]  # question type -> answer counts
    overall: Counter  # every answer (a question of an unknown type, never asked in training)

    @classmethod
    def fit(cls, questions: Iterable) -> AnswerPrior:
        by_text: dict[str, Counter] = defaultdict(Counter)
        by_type: dict[str, Counter] = defaultdict(Counter)
        overall: Counter = Counter()
        for q in questions:
            by_text[q.question][q.answer] += 1
            by_type[q.qtype][q.answer] += 1
            overall[q.answer] += 1
        if not overall:
            raise SmolVLMError("the training data asks no questions, so there is no answer prior to take; "
                               "give data.tasks a vqa weight")
        return cls(dict(by_text), dict(by_type), overall)

    @property
    def questions(self) -> int:
        """How many training questions were counted."""
        return sum(self.overall.values())

    def answer(self, question: str, qtype: str | None = None) -> str:
        counts = self.by_text.get(question) or self.by_type.get(qtype) or self.overall
        # ties go to the answer counted first: the same answer every time for the same training data
        return counts.most_common(1)[0][0]
