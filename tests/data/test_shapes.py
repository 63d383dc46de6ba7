"""The shapes world: determinism, disjoint splits, held-out combos, rendering, and every question,
caption and pair statement checked against the scene by an independent reader of the text."""

import itertools
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smolvlm.data import shapes
from smolvlm.data.shapes import (
    PALETTE,
    PLURALS,
    QUESTION_TYPES,
    YES_NO_TYPES,
    Scene,
    ShapesWorld,
    WorldConfig,
    caption_candidates,
    captions,
    export,
    make_pair,
    make_scene,
    read_questions_jsonl,
    render,
    split_of,
)
from smolvlm.errors import SmolVLMError

CFG = WorldConfig()
WORLD = ShapesWorld(CFG, seed=0)
BIG = WorldConfig(image_size=128, colors=tuple(PALETTE), shapes=("circle", "square", "triangle", "diamond",
                                                                 "star", "cross"), max_objects=6)
NUMBERS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                       "nine", "ten", "eleven", "twelve", "thirteen", "fourteen"))}
SINGULAR = {p: s for s, p in PLURALS.items()}


# ---------------------------------------------------------------------------------------------
# an independent reader of the generated text


def match(objs, phrase: str, cfg: WorldConfig) -> list:
    """The objects a noun phrase ("large red object", "circle", "leftmost object", "squares") names."""
    words = phrase.split()
    if words[-1] in ("objects", "object"):
        attrs, shape = words[:-1], None
    else:
        attrs, shape = words[:-1], SINGULAR.get(words[-1], words[-1])
        assert shape in cfg.shapes, phrase
    if attrs in (["leftmost"], ["rightmost"]):
        sign = 1 if attrs == ["leftmost"] else -1
        best = min(objs, key=lambda o: sign * o.x)
        others = [o for o in objs if o is not best]
        assert others and all(sign * (o.x - best.x) >= cfg.margin_px for o in others), f"{phrase}: not clear"
        return [best]
    out = []
    for o in objs:
        ok = shape is None or o.shape == shape
        for a in attrs:
            assert a in cfg.colors or a in cfg.size_names, phrase
            ok = ok and a in (o.color, o.size)
        if ok:
            out.append(o)
    return out


def the(objs, phrase, cfg):
    found = match(objs, phrase, cfg)
    assert len(found) == 1, f"'the {phrase}' names {len(found)} objects"
    return found[0]


def yn(b: bool) -> str:
    return "yes" if b else "no"


def check_answer(scene: Scene, question: str, cfg: WorldConfig) -> str:
    """The answer to a question, worked out from the scene; fails on an ambiguous question."""
    objs, m, half = scene.objects, cfg.margin_px, scene.image_size / 2
    if g := re.fullmatch(r"What color is the (.+)\?", question):
        return the(objs, g[1], cfg).color
    if g := re.fullmatch(r"What shape is the (.+)\?", question):
        return the(objs, g[1], cfg).shape
    if g := re.fullmatch(r"How many (.+) are there\?", question):
        return str(len(match(objs, g[1], cfg)))
    if g := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        return yn(any(o.color == g[1] and o.shape == g[2] for o in objs))
    if g := re.fullmatch(r"Is the (.+) in the (left or the right|top or the bottom) half of the image\?", question):
        o = the(objs, g[1], cfg)
        c = o.x + 0.5 if g[2].startswith("left") else o.y + 0.5
        assert abs(c - half) >= m, question
        if g[2].startswith("left"):
            return "left" if c < half else "right"
        return "top" if c < half else "bottom"
    if g := re.fullmatch(r"Is the (.+?) (to the left or to the right of|above or below) the (.+)\?", question):
        a, b = the(objs, g[1], cfg), the(objs, g[3], cfg)
        assert a is not b
        d = b.x - a.x if g[2].startswith("to the") else b.y - a.y
        assert abs(d) >= m, f"{question}: too close to call"
        if g[2].startswith("to the"):
            return "left" if d > 0 else "right"
        return "above" if d > 0 else "below"
    if g := re.fullmatch(r"Is the (.+) in the (left|right|top|bottom) half of the image\?", question):
        o = the(objs, g[1], cfg)
        c = o.x + 0.5 if g[2] in ("left", "right") else o.y + 0.5
        assert abs(c - half) >= m, question
        return yn((c < half) == (g[2] in ("left", "top")))
    if g := re.fullmatch(r"Is the (.+?) (to the left of|to the right of|above|below) the (.+)\?", question):
        a, b = the(objs, g[1], cfg), the(objs, g[3], cfg)
        assert a is not b
        d = b.x - a.x if g[2].startswith("to the") else b.y - a.y
        assert abs(d) >= m, f"{question}: too close to call"
        return yn((d > 0) == (g[2] in ("to the left of", "above")))
    if g := re.fullmatch(r"Are there more (.+) than (.+)\?", question):
        na, nb = len(match(objs, g[1], cfg)), len(match(objs, g[2], cfg))
        assert na != nb, f"{question}: equal counts"
        return yn(na > nb)
    raise AssertionError(f"unknown question form: {question}")


def read_sequence(text: str, cfg: WorldConfig) -> list[tuple[str, str, str]]:
    body = re.fullmatch(r"From left to right: (.+)\.", text)[1]
    items = re.split(r", | and ", body)
    out = []
    for it in items:
        art, size, color, shape = it.split()
        assert art in ("a", "an") and size in cfg.size_names and color in cfg.colors and shape in cfg.shapes
        out.append((size, color, shape))
    return out


def sequence_is_true(scene: Scene, seq, cfg: WorldConfig) -> bool:
    """Some left-to-right reading of the scene (ties within the margin either way) gives `seq`."""
    objs = scene.objects
    if len(seq) != len(objs):
        return False
    for perm in itertools.permutations(objs):
        if [(o.size, o.color, o.shape) for o in perm] != list(seq):
            continue
        if all(perm[j].x - perm[i].x > -cfg.margin_px for i in range(len(perm)) for j in range(i + 1, len(perm))):
            return True
    return False


def check_statement(left: Scene, right: Scene, text: str, cfg: WorldConfig) -> bool:
    L, R = left.objects, right.objects
    if g := re.fullmatch(r"The (left|right) image has more (\w+) than the (left|right) image\.", text):
        a, b = (L, R) if g[1] == "left" else (R, L)
        assert g[1] != g[3]
        return len(match(a, g[2], cfg)) > len(match(b, g[2], cfg))
    if g := re.fullmatch(r"Both images contain an? (.+)\.", text):
        return bool(match(L, g[1], cfg)) and bool(match(R, g[1], cfg))
    if g := re.fullmatch(r"There are exactly (\w+) objects in total\.", text):
        return NUMBERS[g[1]] == len(L) + len(R)
    if g := re.fullmatch(r"Exactly one image contains an? (.+)\.", text):
        return bool(match(L, g[1], cfg)) != bool(match(R, g[1], cfg))
    raise AssertionError(f"unknown statement form: {text}")


# ---------------------------------------------------------------------------------------------
# scenes


def test_scene_is_a_pure_function_of_seed_split_index():
    a, b = make_scene(CFG, "train", 7, seed=3), make_scene(CFG, "train", 7, seed=3)
    assert a == b and a.objects
    assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
    assert make_scene(CFG, "test", 7, seed=3) != a
    assert make_scene(CFG, "train", 7, seed=4) != a
    assert make_scene(CFG, "train", 8, seed=3) != a
    assert WORLD.questions(a) == WORLD.questions(make_scene(CFG, "train", 7, seed=3))


def test_scenes_do_not_depend_on_python_hash_seed():
    code = ("from smolvlm.data.shapes import *; s = make_scene(WorldConfig(), 'val', 5, 1); "
            "print(s.fingerprint(), ShapesWorld(WorldConfig(), 1).questions(s), caption_candidates(s))")
    mine = make_scene(CFG, "val", 5, 1)
    expected = f"{mine.fingerprint()} {ShapesWorld(CFG, 1).questions(mine)} {caption_candidates(mine)}"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_objects_are_inside_and_apart():
    gap = CFG.min_gap * CFG.image_size
    for s in WORLD.scenes("train", 300):
        assert CFG.min_objects <= len(s.objects) <= CFG.max_objects
        for i, a in enumerate(s.objects):
            x0, y0, x1, y1 = a.bbox
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert x0 < a.x + 0.5 < x1 and y0 < a.y + 0.5 < y1
            for b in s.objects[i + 1:]:
                assert (a.bbox[2] + gap <= b.bbox[0] + 1e-6 or b.bbox[2] + gap <= a.bbox[0] + 1e-6
                        or a.bbox[3] + gap <= b.bbox[1] + 1e-6 or b.bbox[3] + gap <= a.bbox[1] + 1e-6)


def test_splits_are_disjoint():
    seen = {}
    for split in ("train", "val", "test"):
        for s in WORLD.scenes(split, 300):
            fp = s.fingerprint()
            assert split_of(fp) == split  # the content decides the split
            assert seen.setdefault(fp, split) == split, "the same scene in two splits"


def test_held_out_combos_only_in_compositional_split():
    held = set(CFG.held_out)
    assert len(held) == len(CFG.colors)  # one per color by default
    # Balanced: every color and shape keeps the same number of allowed combos.
    assert len({sum(c == col for c, _ in CFG.allowed_combos) for col in CFG.colors}) == 1
    assert len({sum(s == sh for _, s in CFG.allowed_combos) for sh in CFG.shapes}) == 1
    for split, n in (("train", 2000), ("val", 300), ("test", 300)):
        for s in WORLD.scenes(split, n):
            assert not any(o.combo in held for o in s.objects)
    shown = Counter()
    for s in WORLD.scenes("compositional", 500):
        combos = [o.combo for o in s.objects]
        assert any(c in held for c in combos)
        shown.update(c for c in combos if c in held)
    assert set(shown) == held


# ---------------------------------------------------------------------------------------------
# rendering


@pytest.mark.parametrize("cfg", [CFG, WorldConfig(image_size=32), BIG])
def test_render_shows_each_object_in_its_color(cfg):
    world = ShapesWorld(cfg, seed=1)
    for s in world.scenes("train", 12):
        img = world.render(s)
        assert img.mode == "RGB" and img.size == (cfg.image_size, cfg.image_size)
        a = np.asarray(img).astype(int)
        for o in s.objects:
            assert np.abs(a[o.y, o.x] - PALETTE[o.color]).max() <= 40, (o, a[o.y, o.x])
        assert np.abs(a[0, 0] - cfg.background).max() <= 4  # objects never reach the corner


def test_dataset_iterators():
    items = list(WORLD.vqa("train", 3, questions_per_image=5, start=10))
    assert [it.scene.index for it in items] == [10, 11, 12]
    assert all(it.image.size == (64, 64) and len(it.questions) == 5 for it in items)
    cap = next(WORLD.captioning("val", 1))
    assert cap.captions == captions(cap.scene) and cap.candidates[0] == cap.captions[0]


def test_texture_is_optional_and_seeded():
    tex = WorldConfig(texture=True)
    s = make_scene(tex, "train", 0)
    a, b = np.asarray(render(s)), np.asarray(render(s))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(render(make_scene(CFG, "train", 0))))


# ---------------------------------------------------------------------------------------------
# questions


CHOICE_RELATIONS = WorldConfig(relation_form="choice")


@pytest.mark.parametrize("cfg,split", [(CFG, "train"), (CFG, "compositional"), (BIG, "val"),
                                       (CHOICE_RELATIONS, "train")])
def test_every_answer_is_right_unambiguous_and_one_word(cfg, split):
    world = ShapesWorld(cfg, seed=2)
    for s in world.scenes(split, 150):
        qs = world.questions(s, 6)
        assert len({q.question for q in qs}) == len(qs)
        for q in qs:
            assert q.qtype in QUESTION_TYPES and re.fullmatch(r"[a-z0-9]+", q.answer), q
            assert check_answer(s, q.question, cfg) == q.answer, (s, q)


def _sample(split: str, n_scenes: int, seed: int = 0):
    world = ShapesWorld(CFG, seed)
    return [q for s in world.scenes(split, n_scenes) for q in world.questions(s, 4)]


def test_types_and_answers_are_balanced():
    qs = _sample("train", 500)
    assert len(qs) == 2000
    by_type = defaultdict(list)
    for q in qs:
        by_type[q.qtype].append(q.answer)
    assert set(by_type) == set(QUESTION_TYPES)
    for t, answers in by_type.items():
        share = len(answers) / len(qs)
        assert 0.12 <= share <= 0.28, (t, share)
        top = Counter(answers).most_common(1)[0][1] / len(answers)
        if t in YES_NO_TYPES:
            assert 0.45 <= answers.count("yes") / len(answers) <= 0.55, t
        else:
            assert top <= 0.4, (t, Counter(answers))


def test_blind_baseline_is_weak():
    """A text-only model: the most frequent training answer for each question text (or for the
    question type, for texts never seen in training)."""
    train, test = _sample("train", 600), _sample("test", 300)
    by_text, by_type = defaultdict(Counter), defaultdict(Counter)
    for q in train:
        by_text[q.question][q.answer] += 1
        by_type[q.qtype][q.answer] += 1
    hits = [(by_text.get(q.question) or by_type[q.qtype]).most_common(1)[0][0] == q.answer for q in test]
    acc = sum(hits) / len(hits)
    print(f"blind baseline accuracy: {acc:.3f} on {len(hits)} test questions")
    assert acc < 0.5


def test_compositional_questions_are_about_held_out_objects():
    qs = _sample("compositional", 200)
    assert sum(q.held_out for q in qs) / len(qs) > 0.9
    assert not any(q.held_out for q in _sample("train", 100))


# ---------------------------------------------------------------------------------------------
# captions, retrieval candidates, pairs


def test_captions_describe_the_scene():
    rng = random.Random(0)
    for s in WORLD.scenes("val", 100):
        caps = captions(s)
        assert len(set(caps)) == len(caps) >= 3
        assert sequence_is_true(s, read_sequence(caps[0], CFG), CFG)
        assert shapes.caption(s, rng) in caps
        for c in caps[1:]:  # grouped forms: count the objects they mention
            body = re.sub(r"^(There (is|are) \w+ objects?: |\w+ shapes?: |A picture of )", "", c)
            n = sum(1 if p.split()[0].lower() in ("a", "an") else NUMBERS[p.split()[0].lower()]
                    for p in re.split(r", | and ", body.rstrip(".")))
            assert n == len(s.objects), c


def test_caption_candidates_are_hard_and_false():
    kinds = Counter()
    for s in WORLD.scenes("test", 100):
        cands = caption_candidates(s, n_negatives=7)
        assert cands[0] == captions(s)[0] and len(set(cands)) == len(cands) >= 2
        truth = read_sequence(cands[0], CFG)
        for c in cands[1:]:
            seq = read_sequence(c, CFG)
            assert not sequence_is_true(s, seq, CFG), c
            changed = [i for i, (a, b) in enumerate(zip(seq, truth, strict=True)) if a != b]
            assert len(changed) in (1, 2)  # one attribute changed, or two neighbours swapped
            kinds[len(changed)] += 1
            for _size, col, sh in seq:
                assert (col, sh) not in CFG.held_out
    assert kinds[1] and kinds[2]


def test_pairs_are_correct_and_balanced():
    labels = []
    for i in range(300):
        left, right, statement, label = make_pair(CFG, "train", i, seed=0)
        assert left == make_scene(CFG, "train", 2 * i) and right == make_scene(CFG, "train", 2 * i + 1)
        assert check_statement(left, right, statement, CFG) == label, statement
        labels.append(label)
    assert 0.45 <= sum(labels) / len(labels) <= 0.55
    item = next(WORLD.pairs("val", 1))
    assert item.left_image.size == (64, 64) and isinstance(item.label, bool)


# ---------------------------------------------------------------------------------------------
# export and reading back


def test_export_writes_the_documented_files(tmp_path):
    folder = export(tmp_path, "val", 6, CFG, seed=0, questions_per_image=3, progress=False)
    assert folder == tmp_path / "val"
    assert sorted(p.name for p in folder.iterdir()) == ["captions.jsonl", "images", "pairs.jsonl",
                                                        "questions.jsonl", "scenes.jsonl", "world.json"]
    assert sorted(p.name for p in (folder / "images").iterdir()) == [f"{i:06d}.png" for i in range(6)]

    lines = [json.loads(x) for x in (folder / "questions.jsonl").read_text().splitlines()]
    assert len(lines) == 18
    assert all(set(d) == {"image", "question", "answer", "type", "held_out"} for d in lines)
    records = read_questions_jsonl(folder / "questions.jsonl")
    assert [(r.question, r.answer, r.qtype) for r in records] == [(d["question"], d["answer"], d["type"])
                                                                 for d in lines]
    assert records[0].image == folder / "images" / "000000.png" and records[0].image.is_file()

    scenes = [json.loads(x) for x in (folder / "scenes.jsonl").read_text().splitlines()]
    for i, d in enumerate(scenes):
        scene = Scene.from_dict(d, CFG)
        assert scene == make_scene(CFG, "val", i) and d["image"] == f"images/{i:06d}.png"
        qs = [d2 for d2 in lines if d2["image"] == d["image"]]
        assert [q["question"] for q in qs] == [q.question for q in WORLD.questions(scene, 3)]
        with Image.open(folder / d["image"]) as im:
            assert np.array_equal(np.asarray(im), np.asarray(render(scene)))

    caps = [json.loads(x) for x in (folder / "captions.jsonl").read_text().splitlines()]
    assert len(caps) == 6 and all(set(d) == {"image", "captions", "candidates"} for d in caps)
    pairs = [json.loads(x) for x in (folder / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 3 and all(set(d) == {"left", "right", "statement", "label"} for d in pairs)
    assert all((folder / d["left"]).is_file() and (folder / d["right"]).is_file() for d in pairs)
    meta = json.loads((folder / "world.json").read_text())
    assert WorldConfig.from_dict(meta["config"]) == CFG and meta["counts"]["questions"] == 18


def test_interrupted_export_leaves_no_half_written_jsonl(tmp_path, monkeypatch):
    folder = export(tmp_path, "train", 3, CFG, questions_per_image=2, progress=False)
    before = {p.name: p.read_bytes() for p in folder.glob("*.jsonl")}
    calls = {"n": 0}
    real = shapes.render

    def flaky(scene, cfg=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("disk on fire")
        return real(scene, cfg)

    monkeypatch.setattr(shapes, "render", flaky)
    with pytest.raises(RuntimeError):
        export(tmp_path, "train", 8, CFG, questions_per_image=2, progress=False)
    assert {p.name: p.read_bytes() for p in folder.glob("*.jsonl")} == before  # the old, complete files
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        export(tmp_path / "fresh", "test", 8, CFG, progress=False)
    assert not list((tmp_path / "fresh" / "test").glob("*.jsonl"))
    assert not [p for p in (tmp_path / "fresh").rglob("*") if p.name.endswith(".tmp")]


def test_reader_errors_are_clear(tmp_path):
    with pytest.raises(SmolVLMError, match="does not exist"):
        read_questions_jsonl(tmp_path / "nope.jsonl")
    bad = tmp_path / "questions.jsonl"
    bad.write_text('{"image": "a.png", "question": "q?", "answer": "yes", "type": "exist"}\n{not json\n')
    with pytest.raises(SmolVLMError, match="line 2 is not valid JSON"):
        read_questions_jsonl(bad, check_images=False)
    bad.write_text('{"image": "a.png", "question": "q?"}\n')
    with pytest.raises(SmolVLMError, match="line 1 needs string fields"):
        read_questions_jsonl(bad, check_images=False)
    bad.write_text('{"image": "a.png", "question": "q?", "answer": "yes", "type": "exist"}\n')
    with pytest.raises(SmolVLMError, match="missing"):
        read_questions_jsonl(bad)
    assert read_questions_jsonl(bad, check_images=False)[0].image == Path(tmp_path / "a.png")
    bad.write_text("\n")
    with pytest.raises(SmolVLMError, match="no questions"):
        read_questions_jsonl(bad)


def test_bad_config_and_arguments_raise_clear_errors():
    with pytest.raises(SmolVLMError, match="colors"):
        WorldConfig(colors=("red", "mauve"))
    with pytest.raises(SmolVLMError, match="shapes"):
        WorldConfig(shapes=("circle", "blob"))
    with pytest.raises(SmolVLMError, match="held-out"):
        WorldConfig(held_out=(("red", "star"),))
    with pytest.raises(SmolVLMError, match="no allowed combo"):
        WorldConfig(held_out=tuple(("red", s) for s in ("circle", "square", "triangle")))
    with pytest.raises(SmolVLMError, match="image_size"):
        WorldConfig(image_size=8)
    with pytest.raises(SmolVLMError, match="unknown split"):
        make_scene(CFG, "training", 0)
    with pytest.raises(SmolVLMError, match="held-out combos"):
        make_scene(WorldConfig(held_out=()), "compositional", 0)
    with pytest.raises(SmolVLMError, match="could not fit"):
        make_scene(WorldConfig(image_size=32, sizes=(("huge", 0.5),), max_objects=9, min_objects=9), "train", 0)
    with pytest.raises(SmolVLMError, match="px"):
        render(make_scene(CFG, "train", 0), WorldConfig(image_size=32))


def test_training_turns_do_not_reveal_each_other():
    """Unscheduled questions (the training conversations): a turn's type and yes/no answer cannot be
    read off the earlier turns, as they could under the evaluation schedule (types cycle, yes/no
    alternates)."""
    def stats(scheduled: bool) -> tuple[float, float]:
        same_type = flipped = pairs = yn_pairs = 0
        for i, s in enumerate(WORLD.scenes("train", 300)):
            qs = shapes.questions(s, random.Random(i), 8, CFG, scheduled=scheduled)
            for a, b in itertools.combinations(qs, 2):
                pairs += 1
                same_type += a.qtype == b.qtype
                if a.qtype == b.qtype and a.qtype in YES_NO_TYPES:
                    yn_pairs += 1
                    flipped += a.answer != b.answer
        return same_type / pairs, flipped / yn_pairs

    same, flipped = stats(scheduled=False)
    assert 0.12 <= same <= 0.22 and 0.4 <= flipped <= 0.6, (same, flipped)  # 1/6 and 1/2: no pattern
    same, flipped = stats(scheduled=True)
    assert flipped > 0.9  # the schedule's alternation, which training must not see
    qs = [q for i, s in enumerate(WORLD.scenes("train", 300))
          for q in shapes.questions(s, random.Random(i), 4, CFG, scheduled=False)]
    for t in YES_NO_TYPES:
        answers = [q.answer for q in qs if q.qtype == t]
        assert 0.4 <= answers.count("yes") / len(answers) <= 0.6, t


def test_type_weights_shift_the_training_mix_only():
    """type_weights (DataSpec.question_weights) draws a type more often in training turns, keeps the yes/no
    balance, and leaves the evaluation schedule as it is."""
    def mix(scheduled: bool, weights) -> Counter:
        return Counter(q.qtype for i, s in enumerate(WORLD.scenes("train", 300))
                       for q in shapes.questions(s, random.Random(i), 6, CFG, scheduled=scheduled,
                                                 type_weights=weights))

    plain, heavy = mix(False, None), mix(False, {"count": 3.0})
    assert heavy["count"] / sum(heavy.values()) > 2 * plain["count"] / sum(plain.values())
    assert mix(True, {"count": 3.0}) == mix(True, None)
    qs = [q for i, s in enumerate(WORLD.scenes("train", 300))
          for q in shapes.questions(s, random.Random(i), 6, CFG, scheduled=False, type_weights={"exist": 3.0})]
    answers = [q.answer for q in qs if q.qtype == "exist"]
    assert 0.4 <= answers.count("yes") / len(answers) <= 0.6


def test_relation_forms_yes_no_by_default_choice_on_request():
    """Relations are asked with a yes / no answer (balanced) unless relation_form is 'choice', where the
    answer is the side, as GQA asks them: the same facts either way."""
    sides = {"left", "right", "above", "below", "top", "bottom"}
    for form, answers in (("yes-no", {"yes", "no"}), ("choice", sides)):
        world = ShapesWorld(WorldConfig(question_types=("relation",), relation_form=form), seed=3)
        got = Counter(q.answer for s in world.scenes("train", 400) for q in world.questions(s, 4))
        assert set(got) == answers, got
        if form == "yes-no":
            assert 0.45 <= got["yes"] / sum(got.values()) <= 0.55
        else:  # left as often as right, above as often as below, top as often as bottom
            for a, b in (("left", "right"), ("above", "below"), ("top", "bottom")):
                assert 0.7 <= got[a] / got[b] <= 1.4, got
    assert WorldConfig().relation_form == "yes-no"
    with pytest.raises(SmolVLMError, match="relation_form"):
        WorldConfig(relation_form="maybe")


def test_relation_axes_limit_relation_questions():
    cfg = WorldConfig(question_types=("relation",), relation_axes=("horizontal",))
    world = ShapesWorld(cfg, seed=1)
    texts = [q.question for s in world.scenes("train", 60) for q in world.questions(s, 4)]
    assert texts and all(("left" in t or "right" in t) for t in texts)
    assert not any(w in t for t in texts for w in ("above", "below", "top", "bottom"))
    with pytest.raises(SmolVLMError, match="relation_axes"):
        WorldConfig(relation_axes=("diagonal",))


def test_the_demo_world_is_not_made_easy():
    """The issue's floor for the demo's world: >= 6 colors, >= 3 shapes, 1..5 objects per scene, and the
    five question types (left/right relations among them), roughly balanced on the test split."""
    from smolvlm.train import PRESETS

    cfg = WorldConfig(**PRESETS["shapes-tiny"]().data.world)
    assert len(cfg.colors) >= 6 and len(cfg.shapes) >= 3 and (cfg.min_objects, cfg.max_objects) == (1, 5)
    assert {"color", "shape", "count", "exist", "relation"} <= set(cfg.question_types)
    assert "horizontal" in cfg.relation_axes
    world = ShapesWorld(cfg, seed=0)
    scenes = list(world.scenes("test", 300))
    assert Counter(len(s.objects) for s in scenes).keys() == {1, 2, 3, 4, 5}
    types = Counter(q.qtype for s in scenes for q in world.questions(s, 4))
    assert set(types) == set(cfg.question_types)
    shares = [n / sum(types.values()) for n in types.values()]
    assert max(shares) - min(shares) < 0.05, types
