"""COCO caption metrics exactly as pycocoevalcap computes them: BLEU-1..4, ROUGE-L, CIDEr-D, and
METEOR through the official Java scorer when it is installed.

:func:`score_captions` is the whole evaluation (validation, PTB tokenization of references and
candidates as two batches, every metric). The scorers take already-tokenized text, like the
pycocoevalcap classes, and reproduce their arithmetic step for step so that the results match to
the last printed decimal:

* **BLEU** (``bleu``): n-gram counts from ``str.split()``; a candidate n-gram is clipped by its
  largest count in any one reference; corpus-level: the clipped matches and candidate n-grams are
  summed over all images, the reference length of each image is the *closest* reference length
  (ties go to the shorter one), BLEU-n = (prod_k (correct_k + 1e-15) / (guess_k + 1e-9))^(1/n)
  times the brevity penalty exp(1 - r/c) when c < r, with c, r computed as
  (testlen + 1e-15) / (reflen + 1e-9). Per-image scores use the same formula per image.
* **ROUGE-L** (``rouge_l``): tokens from ``str.split(" ")`` (so an empty caption is one empty token);
  per image, the longest common subsequence with each reference gives precision lcs/|cand| and
  recall lcs/|ref|; the maxima over references (taken separately) give
  F = (1 + 1.2^2) P R / (R + 1.2^2 P), 0 if either is 0; mean over images.
* **CIDEr-D** (``cider_d_tokenized``; :func:`cider_d` tokenizes first): tf-idf vectors of 1..4-grams,
  document frequency = number of images
  whose references contain the n-gram (counted over the evaluated references only),
  idf = log(#images) - log(max(1, df)); for each reference the cosine per n-gram order, with the
  candidate weights clipped by the reference weights (min(c, r) * r), times the Gaussian length
  penalty exp(-(Δ^2) / (2 * 6^2)); mean over n, mean over references, times 10; mean over images.
  Δ is the difference of the *bigram* counts of candidate and reference (pycocoevalcap's length
  variable counts 2-grams), i.e. max(0, len-1) for each side.
* **METEOR** (``meteor``): only through pycocoevalcap's ``Meteor`` (Java, ``meteor-1.5.jar``); when
  it cannot run, the score is ``None`` with the reason — never approximated.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from smolvlm.errors import SmolVLMError
from smolvlm.eval.ptb_tokenizer import tokenize_captions

__all__ = ["CaptionScores", "bleu", "cider_d", "cider_d_tokenized", "meteor", "rouge_l", "score_captions",
           "METRIC_NAMES"]

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
_TINY = 1e-15  # pycocoevalcap: "so that if guess is 0 still return 0"
_SMALL = 1e-9


def _ngram_counts(words: list[str], n: int) -> dict[tuple[str, ...], int]:
    """Counts of the 1..n-grams of `words`, inserted by order then position (as pycocoevalcap's
    precook), which fixes the summation order of the CIDEr dot products."""
    counts: dict[tuple[str, ...], int] = {}
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            g = tuple(words[i:i + k])
            counts[g] = counts.get(g, 0) + 1
    return counts


def _ngram_counts_by_order(words: list[str], n: int) -> list[dict[str, int]]:
    """For k = 1..n, the counts of the k-grams of `words` in order of first appearance, keyed by the
    words joined with spaces (tokens never contain whitespace, so the keys are unique, and strings
    cache their hash: tuples, pycocoevalcap's keys, rehash on every lookup)."""
    out = []
    for k in range(1, n + 1):
        counts: dict[str, int] = {}
        for i in range(len(words) - k + 1):
            g = " ".join(words[i:i + k])
            counts[g] = counts.get(g, 0) + 1
        out.append(counts)
    return out


def _check_pairs(refs: Mapping, cands: Mapping) -> list:
    if refs.keys() != cands.keys():
        raise SmolVLMError("references and candidates must have the same ids; use score_captions to get the "
                           "differences reported")
    return list(refs.keys())


# --------------------------------------------------------------------------------------------- BLEU
def bleu(refs: Mapping[Hashable, Sequence[str]], cands: Mapping[Hashable, str], n: int = 4
         ) -> tuple[list[float], list[list[float]]]:
    """pycocoevalcap's ``Bleu(n).compute_score`` on tokenized text: ([BLEU-1..n corpus scores],
    [[per-image BLEU-k for each image] for k in 1..n])."""
    keys = _check_pairs(refs, cands)
    total_correct = [0] * n
    total_guess = [0] * n
    total_testlen = 0
    total_reflen = 0
    per_image: list[list[float]] = [[] for _ in range(n)]
    for key in keys:
        reflens = []
        maxcounts: dict[tuple[str, ...], int] = {}
        for ref in refs[key]:
            words = ref.split()
            reflens.append(len(words))
            for g, c in _ngram_counts(words, n).items():
                if c > maxcounts.get(g, 0):
                    maxcounts[g] = c
        words = cands[key].split()
        testlen = len(words)
        reflen = min((abs(rl - testlen), rl) for rl in reflens)[1]  # "closest", ties to the shorter
        guess = [max(0, testlen - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for g, c in _ngram_counts(words, n).items():
            correct[len(g) - 1] += min(maxcounts.get(g, 0), c)
        total_testlen += testlen
        total_reflen += reflen
        score = 1.0
        for k in range(n):
            total_correct[k] += correct[k]
            total_guess[k] += guess[k]
            score *= (float(correct[k]) + _TINY) / (float(guess[k]) + _SMALL)
            per_image[k].append(score ** (1.0 / (k + 1)))
        ratio = (testlen + _TINY) / (reflen + _SMALL)
        if ratio < 1:
            for k in range(n):
                per_image[k][-1] *= math.exp(1 - 1 / ratio)
    scores = []
    score = 1.0
    for k in range(n):
        score *= float(total_correct[k] + _TINY) / (total_guess[k] + _SMALL)
        scores.append(score ** (1.0 / (k + 1)))
    ratio = (total_testlen + _TINY) / (total_reflen + _SMALL)
    if ratio < 1:
        for k in range(n):
            scores[k] *= math.exp(1 - 1 / ratio)
    return scores, per_image


# ------------------------------------------------------------------------------------------ ROUGE-L
def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (bit-parallel, exact)."""
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return 0
    masks: dict[str, int] = {}
    for i, tok in enumerate(b):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << m) - 1
    v = full
    for tok in a:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return m - v.bit_count()


def rouge_l(refs: Mapping[Hashable, Sequence[str]], cands: Mapping[Hashable, str], beta: float = 1.2
            ) -> tuple[float, list[float]]:
    """pycocoevalcap's ``Rouge().compute_score`` on tokenized text: (mean, per-image scores)."""
    keys = _check_pairs(refs, cands)
    scores = []
    for key in keys:
        cand = cands[key].split(" ")
        prec, rec = [], []
        for ref in refs[key]:
            toks = ref.split(" ")
            lcs = lcs_length(toks, cand)
            prec.append(lcs / float(len(cand)))
            rec.append(lcs / float(len(toks)))
        p, r = max(prec), max(rec)
        if p != 0 and r != 0:
            scores.append(((1 + beta ** 2) * p * r) / float(r + beta ** 2 * p))
        else:
            scores.append(0.0)
    return float(np.mean(np.array(scores))), scores


# ------------------------------------------------------------------------------------------ CIDEr-D
def cider_d_tokenized(refs: Mapping[Hashable, Sequence[str]], cands: Mapping[Hashable, str], n: int = 4,
                      sigma: float = 6.0) -> tuple[float, list[float]]:
    """pycocoevalcap's ``Cider().compute_score`` (CIDEr-D) on tokenized text: (mean, per-image).

    The arithmetic is the official one in the same order, with plain Python floats where the official
    code has numpy float64 scalars (the same IEEE operations); the idf logarithms come from ``np.log``
    as in the official code, computed once per distinct document frequency."""
    keys = _check_pairs(refs, cands)
    crefs = [[_ngram_counts_by_order(r.split(), n) for r in refs[key]] for key in keys]
    ctest = [_ngram_counts_by_order(cands[key].split(), n) for key in keys]
    df: dict[str, float] = {}
    for image_refs in crefs:
        for g in {g for counts in image_refs for order in counts for g in order}:
            df[g] = df.get(g, 0.0) + 1.0
    ref_len = float(np.log(float(len(crefs))))
    # idf = ref_len - np.log(max(1, df)), once per n-gram; an n-gram no reference has gets
    # ref_len - np.log(1.0) = ref_len (np.log(1.0) is exactly 0.0)
    log_of_df = {d: float(np.log(max(1.0, d))) for d in set(df.values())}
    idf = {g: ref_len - log_of_df[d] for g, d in df.items()}
    penalty_den = 2 * sigma ** 2

    def to_vec(counts):
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        for k in range(n):
            vk = vec[k]
            acc = 0.0
            for g, tf in counts[k].items():
                w = float(tf) * idf.get(g, ref_len)
                vk[g] = w
                acc += pow(w, 2)
            norm[k] = math.sqrt(acc)
        length = sum(counts[1].values()) if n > 1 else 0  # pycocoevalcap's "length" counts bigrams
        return vec, norm, length

    scores = []
    for test, image_refs in zip(ctest, crefs, strict=True):
        vec, norm, length = to_vec(test)
        score = [0.0] * n
        for ref in image_refs:
            vref, nref, lref = to_vec(ref)
            delta = float(length - lref)
            penalty = np.e ** (-(delta ** 2) / penalty_den)
            for k in range(n):
                rk = vref[k]
                val = 0.0
                for g, w in vec[k].items():
                    r = rk.get(g, 0.0)
                    val += min(w, r) * r
                if norm[k] != 0 and nref[k] != 0:
                    val /= norm[k] * nref[k]
                score[k] += val * penalty
        score_avg = float(np.mean(np.array(score)))
        score_avg /= len(image_refs)
        score_avg *= 10.0
        scores.append(score_avg)
    return float(np.mean(np.array(scores))), scores


# ------------------------------------------------------------------------------------------- METEOR
def meteor(refs: Mapping[Hashable, Sequence[str]], cands: Mapping[Hashable, str], timeout: float = 900.0
           ) -> tuple[float | None, list[float] | None, str | None]:
    """METEOR 1.5 through pycocoevalcap's official Java scorer: (score, per-image, None), or
    (None, None, reason) when the scorer or Java is not available or fails. Never approximated."""
    import shutil

    keys = _check_pairs(refs, cands)
    if shutil.which("java") is None:
        return None, None, "Java is not installed (METEOR needs the official Java scorer)"
    try:
        from pycocoevalcap.meteor.meteor import Meteor  # the optional extra `meteor`
    except Exception as exc:  # noqa: BLE001 - any import problem means "unavailable"
        return None, None, f"pycocoevalcap is not importable ({type(exc).__name__}); pip install pycocoevalcap"
    gts = {i: list(refs[k]) for i, k in enumerate(keys)}
    res = {i: [cands[k]] for i, k in enumerate(keys)}
    outcome: dict = {}

    def run():
        try:
            scorer = Meteor()
            outcome["scorer"] = scorer
            outcome["result"] = scorer.compute_score(gts, res)
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        proc = getattr(outcome.get("scorer"), "meteor_p", None)
        if proc is not None:
            proc.kill()
        return None, None, f"the METEOR scorer did not finish within {timeout:.0f} s"
    if "error" in outcome:
        exc = outcome["error"]
        return None, None, f"the METEOR scorer failed: {type(exc).__name__}: {exc}"
    score, per_image = outcome["result"]
    return float(score), [float(x) for x in per_image], None


# ------------------------------------------------------------------------------------------ scoring
@dataclass
class CaptionScores:
    """Corpus scores by metric name (``BLEU-1``..``BLEU-4``, ``ROUGE-L``, ``CIDEr`` and ``METEOR``
    when it ran), per-image scores by metric and id, and what was noticed on the way."""

    scores: dict[str, float]
    per_image: dict[str, dict[Hashable, float]]
    unavailable: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    num_images: int = 0


def _prepare(refs, cands, tokenize: bool):
    """Validate the two sides and tokenize them like pycocoevalcap: (ids, refs, cands, warnings)."""
    if not isinstance(refs, Mapping) or not isinstance(cands, Mapping):
        raise SmolVLMError("references must map ids to lists of captions and candidates ids to captions")
    if not refs:
        raise SmolVLMError("there are no references to score against; give at least one image")
    missing = [k for k in refs if k not in cands]
    extra = [k for k in cands if k not in refs]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} id(s) without a candidate (e.g. {_show(missing)})")
        if extra:
            parts.append(f"{len(extra)} candidate id(s) not in the references (e.g. {_show(extra)})")
        raise SmolVLMError("references and candidates do not cover the same images: " + "; ".join(parts)
                           + "; give exactly one candidate per reference image")
    keys = list(refs)
    for k in keys:
        rs = refs[k]
        if isinstance(rs, str) or not isinstance(rs, Sequence) or not rs:
            raise SmolVLMError(f"the references of id {k!r} must be a non-empty list of captions")
        if not all(isinstance(r, str) for r in rs):
            raise SmolVLMError(f"the references of id {k!r} must all be strings")
        if not isinstance(cands[k], str):
            raise SmolVLMError(f"the candidate of id {k!r} must be one caption (a string), "
                               f"not {type(cands[k]).__name__}")
    flat_refs = [r for k in keys for r in refs[k]]
    flat_cands = [cands[k] for k in keys]
    if tokenize:
        tok_refs_flat = tokenize_captions(flat_refs)
        tok_cands_flat = tokenize_captions(flat_cands)
    else:
        tok_refs_flat, tok_cands_flat = list(flat_refs), list(flat_cands)
    tok_refs: dict[Hashable, list[str]] = {}
    pos = 0
    for k in keys:
        tok_refs[k] = tok_refs_flat[pos:pos + len(refs[k])]
        pos += len(refs[k])
    tok_cands = dict(zip(keys, tok_cands_flat, strict=True))

    warnings = []
    empty_cands = [k for k in keys if not tok_cands[k].split()]
    if empty_cands:
        warnings.append(f"{len(empty_cands)} empty candidate caption(s) (after tokenization), scored as they are "
                        f"(nothing matches): e.g. {_show(empty_cands)}")
    empty_refs = sum(1 for k in keys for r in tok_refs[k] if not r.split())
    if empty_refs:
        warnings.append(f"{empty_refs} empty reference caption(s) (after tokenization), kept as the official "
                        "scorer keeps them")

    return keys, tok_refs, tok_cands, warnings


def cider_d(refs: Mapping[Hashable, Sequence[str]], preds: Mapping[Hashable, str]) -> float:
    """CIDEr-D of raw captions exactly as pycocoevalcap's ``Cider`` after its PTB tokenization (the
    corpus score: mean over images, x10). `refs` maps ids to reference captions, `preds` the same ids
    to one caption each; mismatched ids raise SmolVLMError."""
    _, tok_refs, tok_cands, _ = _prepare(refs, preds, tokenize=True)
    return cider_d_tokenized(tok_refs, tok_cands)[0]


def score_captions(refs: Mapping[Hashable, Sequence[str]], cands: Mapping[Hashable, str], *,
                   tokenize: bool = True, with_meteor: bool = True) -> CaptionScores:
    """Score candidate captions against references like pycocoevalcap's ``COCOEvalCap``.

    `refs` maps each id to its reference captions, `cands` each id to one candidate caption; the ids
    must be the same (the official scorer asserts it). With `tokenize`, both sides go through the
    PTB tokenization (references as one batch, candidates as another, in the order of `refs`).
    An empty candidate is scored as it is (it matches nothing: 0 for that image) and counted in
    ``warnings``; so are empty references (they are kept, as the official scorer keeps them)."""
    keys, tok_refs, tok_cands, warnings = _prepare(refs, cands, tokenize)
    scores: dict[str, float] = {}
    per_image: dict[str, dict[Hashable, float]] = {}
    b, b_img = bleu(tok_refs, tok_cands)
    for k in range(4):
        scores[f"BLEU-{k + 1}"] = b[k]
        per_image[f"BLEU-{k + 1}"] = dict(zip(keys, b_img[k], strict=True))
    unavailable = {}
    if with_meteor:
        m, m_img, why = meteor(tok_refs, tok_cands)
        if m is None:
            unavailable["METEOR"] = why
        else:
            scores["METEOR"] = m
            per_image["METEOR"] = dict(zip(keys, m_img, strict=True))
    else:
        unavailable["METEOR"] = "not requested"
    r, r_img = rouge_l(tok_refs, tok_cands)
    scores["ROUGE-L"] = r
    per_image["ROUGE-L"] = dict(zip(keys, r_img, strict=True))
    c, c_img = cider_d_tokenized(tok_refs, tok_cands)
    scores["CIDEr"] = c
    per_image["CIDEr"] = dict(zip(keys, c_img, strict=True))
    return CaptionScores(scores=scores, per_image=per_image, unavailable=unavailable, warnings=warnings,
                         num_images=len(keys))


def _show(ids: list, k: int = 3) -> str:
    return ", ".join(repr(i) for i in ids[:k]) + (", ..." if len(ids) > k else "")
