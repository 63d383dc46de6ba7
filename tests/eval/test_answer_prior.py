"""The answer prior (smolvlm.eval.answer_prior), the demo's blind baseline: each question's most common training
answer, its type's for a question never asked, and no text-only answerer right more often on the questions it
was counted on."""

from collections import Counter, namedtuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smolvlm.errors import SmolVLMError
from smolvlm.eval.answer_prior import AnswerPrior

Q = namedtuple("Q", "question qtype answer")


def test_the_most_common_answer_per_question_then_per_type_then_overall():
    prior = AnswerPrior.fit([Q("How many?", "count", "2"), Q("How many?", "count", "3"), Q("How many?", "count", "3"),
                             Q("How many red?", "count", "1"), Q("Is it red?", "exist", "no")])
    assert prior.questions == 5
    assert prior.answer("How many?", "count") == "3"
    assert prior.answer("How many red?", "count") == "1"
    assert prior.answer("How many blue?", "count") == "3"  # never asked: the type's most common
    assert prior.answer("What?", "unknown") == "3"  # an unknown type: the most common of all
    assert prior.answer("Is it blue?", "exist") == "no"


def test_no_questions_is_a_clear_error():
    with pytest.raises(SmolVLMError, match="asks no questions"):
        AnswerPrior.fit([])


texts = st.sampled_from(["a?", "b?", "c?", "d?"])
answers = st.sampled_from(["yes", "no", "1", "2", "red"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(texts, answers), min_size=1, max_size=60),
       st.dictionaries(texts, answers))
def test_no_text_only_answerer_beats_the_prior_on_its_own_questions(pairs, other):
    """Any other map from question text to answer is right at most as often on the counted questions."""
    qs = [Q(t, "t", a) for t, a in pairs]
    prior = AnswerPrior.fit(qs)
    ours = sum(prior.answer(q.question, q.qtype) == q.answer for q in qs)
    fallback = Counter(a for _, a in pairs).most_common(1)[0][0]
    theirs = sum(other.get(q.question, fallback) == q.answer for q in qs)
    assert ours >= theirs
