"""The "shapes world": a procedural, seeded dataset of colored shapes on a plain background, with
ground-truth captions, one-word VQA questions, NLVR2-style image pairs and caption-retrieval
candidates, so the whole VLM pipeline (train, evaluate, serve) runs offline on a CPU.

Determinism: a scene is a pure function of (config, seed, split, index). Each scene gets its own
`random.Random` seeded with a blake2b hash of those values (never Python's salted `hash()`), so
scene 17 of the test split is the same in every process and can be made without making 0..16.

Splits
  train, val, test  show only the allowed (color, shape) combos. They are disjoint by construction:
                    besides having their own seed streams, a scene's split is a hash of its content
                    (shapes, colors, sizes, pixel positions) and each split redraws until it gets a
                    scene of its own, so no image can ever be in two splits.
  compositional     every scene holds at least one held-out combo (by default one per color, e.g. a
                    red circle), which the other splits never show; its questions are about those
                    objects whenever the question type allows it.

Questions (6 types, one-word answers, unambiguous by construction)
  color     "What color is the large circle?"          -> a color name; only of an object the phrase
            picks out alone ("the circle", "the small object", "the leftmost object", ...)
  shape     "What shape is the red object?"            -> "circle" / "square" / ...
  count     "How many red objects are there?"          -> a digit "0".."9" (also "objects", "circles",
            "small objects")
  exist     "Is there a blue triangle?"                -> "yes" / "no"
  relation  "Is the circle to the left of the red square?", "... above ...", "Is the circle in the
            left half of the image?"                   -> "yes" / "no"; positions are only compared
            when at least `relation_margin` of the image apart, so the answer is visible
  compare   "Are there more circles than squares?"     -> "yes" / "no"; the counts always differ

Balancing, so a text-only ("blind") model stays near chance: question types and yes/no answers follow
a schedule keyed on the scene index (exact balance over consecutive scenes, see `questions`); within
a type a template family is drawn ("how many red objects" vs "how many objects"), then the answer
(uniform over the answers the scene supports, or the scheduled yes/no), then a question with that
answer. Every yes/no fact can be asked in a true and a false form, so no question text leans to
either answer. The default held-out combos leave every color and every shape the same number of
allowed combos, so training scenes favor no color or shape either.
"""

import hashlib
import itertools
import json
import math
import os
import random
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from smolvlm.errors import SmolVLMError
from smolvlm.files import atomic_path, atomic_write_json

try:  # only for a progress bar in `export`
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

# Colors chosen to stay distinct from each other (and from the dark background) at 64 px.
PALETTE = {
    "red": (220, 45, 45),
    "green": (50, 180, 70),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 70, 215),
    "orange": (245, 135, 25),
    "white": (235, 235, 235),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURALS = {s: s + ("es" if s.endswith(("s", "x")) else "s") for s in SHAPES}
SPLITS = ("train", "val", "test", "compositional")
QUESTION_TYPES = ("color", "shape", "count", "exist", "relation", "compare")
YES_NO_TYPES = ("exist", "relation", "compare")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
                "eighteen")
# Share of scene space (by content hash) owned by each non-compositional split. Train gets most of
# it so its redraw loop is cheap (1.7 draws per scene; 5 for val and test).
SPLIT_BUCKETS = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}
FILES = ("questions", "captions", "scenes", "pairs")
# How the shapes trainer asks for a caption (the first is the evaluation prompt) and about an image pair.
CAPTION_PROMPTS = ("Describe this image.", "What is in this image?", "Caption this picture.")
CAPTION_PROMPT = CAPTION_PROMPTS[0]
PAIR_PROMPT = "Is this statement about the two images true? {}"


def stable_seed(*parts) -> int:
    """A 64-bit seed from any printable values, the same in every process and on every machine."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 64
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    # (name, width as a fraction of the image side): 10 px and 18 px at 64 px, clearly different.
    sizes: tuple[tuple[str, float], ...] = (("small", 0.16), ("large", 0.28))
    min_objects: int = 1
    max_objects: int = 5
    # (color, shape) combos seen only in the compositional split. None: one per color, cycling through
    # the shapes (red circle, green square, blue triangle, yellow circle, purple square, orange
    # triangle), so every color and every shape keeps the same number of allowed combos. () = none.
    held_out: tuple[tuple[str, str], ...] | None = None
    background: tuple[int, int, int] = (24, 24, 28)
    antialias: int = 4  # draw at this multiple of image_size, then downsample (LANCZOS); 1 = off
    texture: bool = False  # seeded per-pixel noise over the whole image; off = flat colors
    texture_strength: int = 20  # max noise, in 0..255 color levels
    min_gap: float = 0.03  # empty space between object boxes, as a fraction of the image side
    relation_margin: float = 0.1  # "left of" / "leftmost" need centers this far apart (fraction)
    question_types: tuple[str, ...] = QUESTION_TYPES
    # relation questions along these axes: "horizontal" (left of / right of, left / right half), "vertical"
    # (above / below, top / bottom half)
    relation_axes: tuple[str, ...] = ("horizontal", "vertical")
    # "yes-no": "Is the cup to the left of the plate?" -> yes / no, whose answer is the XOR of the object's side
    # and the word asked (no first-order signal on balanced data: a small model trained for minutes stays at
    # chance on it). "choice": as GQA asks, "Is the cup to the left or to the right of the plate?" -> left /
    # right (above / below, top / bottom): learned in 300 steps on one-object scenes (docs/training.md)
    relation_form: str = "yes-no"
    place_tries: int = 100  # rejection-sampling cap per object before the scene is drawn again

    def __post_init__(self):
        # Accept lists (e.g. from JSON) but store tuples, so the config stays hashable.
        fix = object.__setattr__
        fix(self, "colors", tuple(self.colors))
        fix(self, "shapes", tuple(self.shapes))
        fix(self, "sizes", tuple((str(n), float(f)) for n, f in self.sizes))
        fix(self, "background", tuple(self.background))
        fix(self, "question_types", tuple(self.question_types))
        fix(self, "relation_axes", tuple(self.relation_axes))
        if self.held_out is None:
            auto = [(c, self.shapes[i % len(self.shapes)]) for i, c in enumerate(self.colors)]
            fix(self, "held_out", tuple(auto) if len(self.shapes) > 1 else ())
        else:
            fix(self, "held_out", tuple((str(c), str(s)) for c, s in self.held_out))
        self.check()

    def check(self) -> None:
        if not 16 <= self.image_size <= 1024:
            raise SmolVLMError(f"image_size must be in 16..1024 pixels, got {self.image_size}")
        bad = [c for c in self.colors if c not in PALETTE]
        if bad or len(set(self.colors)) < 2 or len(set(self.colors)) != len(self.colors):
            raise SmolVLMError(f"colors must be 2 or more distinct names from {', '.join(PALETTE)}; "
                               f"got {list(self.colors)}")
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad or not self.shapes or len(set(self.shapes)) != len(self.shapes):
            raise SmolVLMError(f"shapes must be distinct names from {', '.join(SHAPES)}; got {list(self.shapes)}")
        names = [n for n, _ in self.sizes]
        if not names or len(set(names)) != len(names) or any(not 0.04 <= f <= 0.5 for _, f in self.sizes):
            raise SmolVLMError(f"sizes must be distinct (name, fraction) pairs with fractions in 0.04..0.5; "
                               f"got {list(self.sizes)}")
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            raise SmolVLMError(f"need 1 <= min_objects <= max_objects <= 9, got {self.min_objects}.."
                               f"{self.max_objects}")
        bad = [hc for hc in self.held_out if hc[0] not in self.colors or hc[1] not in self.shapes]
        if bad:
            raise SmolVLMError(f"held-out combos {bad} use a color or shape not in the config; "
                               f"pick them from colors {list(self.colors)} and shapes {list(self.shapes)}")
        left_colors = {c for c, _ in self.allowed_combos}
        left_shapes = {s for _, s in self.allowed_combos}
        if left_colors != set(self.colors) or left_shapes != set(self.shapes):
            raise SmolVLMError("the held-out combos leave some color or shape with no allowed combo; "
                               "hold out fewer combos so every color and shape still appears in training")
        if self.relation_form not in ("choice", "yes-no"):
            raise SmolVLMError(f"relation_form must be 'choice' or 'yes-no', got {self.relation_form!r}")
        if not self.relation_axes or set(self.relation_axes) - {"horizontal", "vertical"}:
            raise SmolVLMError(f"relation_axes must be taken from horizontal, vertical; got {list(self.relation_axes)}")
        bad = [t for t in self.question_types if t not in QUESTION_TYPES]
        if bad or not self.question_types:
            raise SmolVLMError(f"question_types must be taken from {', '.join(QUESTION_TYPES)}; "
                               f"got {list(self.question_types)}")
        if self.antialias < 1 or self.place_tries < 1 or not 0 <= self.texture_strength <= 128:
            raise SmolVLMError(f"antialias ({self.antialias}) and place_tries ({self.place_tries}) must be >= 1 "
                               f"and texture_strength ({self.texture_strength}) in 0..128; fix those fields")
        if len(self.background) != 3 or not all(0 <= v <= 255 for v in self.background):
            raise SmolVLMError(f"background must be an (r, g, b) triple of 0..255, got {self.background}")
        if not 0 <= self.min_gap < 0.2 or not 0 <= self.relation_margin < 0.5:
            raise SmolVLMError(f"min_gap ({self.min_gap}) must be in [0, 0.2) and relation_margin "
                               f"({self.relation_margin}) in [0, 0.5); both are fractions of the image side")

    @cached_property
    def size_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.sizes)

    def size_px(self, name: str) -> float:
        return dict(self.sizes)[name] * self.image_size

    @cached_property
    def combos(self) -> tuple[tuple[str, str], ...]:
        return tuple((c, s) for c in self.colors for s in self.shapes)

    @cached_property
    def allowed_combos(self) -> tuple[tuple[str, str], ...]:
        held = set(self.held_out)
        return tuple(cs for cs in self.combos if cs not in held)

    @property
    def margin_px(self) -> float:
        return self.relation_margin * self.image_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WorldConfig":
        try:
            return cls(**d)
        except TypeError as e:
            raise SmolVLMError(f"bad shapes-world config ({e}); use the fields of WorldConfig") from e


# ---------------------------------------------------------------------------------------------
# scenes


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: int  # center column (pixel index)
    y: int  # center row
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels; pixel i spans [i, i + 1)

    @property
    def combo(self) -> tuple[str, str]:
        return (self.color, self.shape)


@dataclass(frozen=True)
class Scene:
    split: str
    index: int
    seed: int
    image_size: int
    objects: tuple[SceneObject, ...]  # left to right (by x, then y)
    cfg: WorldConfig = field(default_factory=WorldConfig, repr=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.index:06d}"

    def fingerprint(self) -> tuple:
        """What the image is made of; equal fingerprints <=> equal pictures."""
        return tuple(sorted((o.shape, o.color, o.size, o.x, o.y) for o in self.objects))

    def is_held_out(self, o: SceneObject) -> bool:
        return o.combo in self.cfg.held_out

    def to_dict(self) -> dict:
        return {"id": self.id, "split": self.split, "index": self.index, "seed": self.seed,
                "image_size": self.image_size,
                "objects": [dict(shape=o.shape, color=o.color, size=o.size, x=o.x, y=o.y, bbox=list(o.bbox),
                                 held_out=self.is_held_out(o)) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict, cfg: WorldConfig | None = None) -> "Scene":
        objs = tuple(SceneObject(o["shape"], o["color"], o["size"], int(o["x"]), int(o["y"]),
                                 tuple(float(v) for v in o["bbox"])) for o in d["objects"])
        return cls(d["split"], int(d["index"]), int(d["seed"]), int(d["image_size"]), objs, cfg or WorldConfig())


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise SmolVLMError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def split_of(fingerprint: tuple) -> str:
    """The non-compositional split a scene's content belongs to."""
    u = stable_seed("split", *fingerprint) / 2**64
    return next(name for name, (lo, hi) in SPLIT_BUCKETS.items() if lo <= u < hi)


def _apart(a: tuple, b: tuple, gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place(cfg: WorldConfig, rng: random.Random, placed: list, color: str, shape: str, size: str):
    s, half = cfg.image_size, cfg.size_px(size) / 2
    lo = math.ceil(half)
    hi = s - 1 - lo  # keeps the whole box inside the image
    for _ in range(cfg.place_tries):
        x, y = rng.randint(lo, hi), rng.randint(lo, hi)
        box = (x + 0.5 - half, y + 0.5 - half, x + 0.5 + half, y + 0.5 + half)
        if all(_apart(box, o.bbox, cfg.min_gap * s) for o in placed):
            return SceneObject(shape, color, size, x, y, tuple(round(v, 3) for v in box))
    return None


def _draw_objects(cfg: WorldConfig, split: str, rng: random.Random) -> tuple[SceneObject, ...]:
    # Combos are drawn uniformly (not color first), so every allowed combo is equally likely and a
    # question like "Is there a red square?" is as often "yes" as any other.
    pool = cfg.combos if split == "compositional" else cfg.allowed_combos
    for _ in range(50):  # a fresh draw when the objects do not fit
        n = rng.randint(cfg.min_objects, cfg.max_objects)
        kinds = [rng.choice(pool) for _ in range(n)]
        if split == "compositional":
            kinds[0] = rng.choice(cfg.held_out)  # positions are random, so which one does not matter
        placed = []
        for color, shape in kinds:
            o = _place(cfg, rng, placed, color, shape, rng.choice(cfg.size_names))
            if o is None:
                break
            placed.append(o)
        else:
            return tuple(placed)
    raise SmolVLMError(f"could not fit {cfg.max_objects} objects into a {cfg.image_size} px image; "
                       f"lower max_objects, the sizes or min_gap")


def make_scene(cfg: WorldConfig | None, split: str, index: int, seed: int = 0) -> Scene:
    """Scene `index` of `split`, a pure function of (cfg, split, index, seed)."""
    cfg = cfg or WorldConfig()
    _check_split(split)
    if split == "compositional" and not cfg.held_out:
        raise SmolVLMError("the compositional split needs held-out combos; set WorldConfig.held_out")
    if index < 0:
        raise SmolVLMError(f"scene index must be >= 0, got {index}")
    rng = random.Random(stable_seed("scene", seed, split, index))
    for _ in range(1000):
        objs = tuple(sorted(_draw_objects(cfg, split, rng), key=lambda o: (o.x, o.y)))
        scene = Scene(split, index, seed, cfg.image_size, objs, cfg)
        if split == "compositional" or split_of(scene.fingerprint()) == split:
            return scene
    raise SmolVLMError(f"could not draw a {split} scene; the config allows too few distinct scenes")


# ---------------------------------------------------------------------------------------------
# rendering


def _draw(d: ImageDraw.ImageDraw, o: SceneObject, k: int, fill: tuple) -> None:
    x0, y0, x1, y1 = (v * k for v in o.bbox)
    cx, cy, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if o.shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fill)
    elif o.shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=fill)
    elif o.shape == "triangle":
        d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif o.shape == "diamond":
        d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif o.shape == "star":
        pts = []
        for i in range(10):
            r = h if i % 2 == 0 else 0.45 * h
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        d.polygon(pts, fill=fill)
    elif o.shape == "cross":
        t = 0.34 * h
        d.rectangle([cx - t, y0, cx + t, y1], fill=fill)
        d.rectangle([x0, cy - t, x1, cy + t], fill=fill)
    else:
        raise SmolVLMError(f"unknown shape {o.shape!r}; choose one of {', '.join(SHAPES)}")


def render(scene: Scene, cfg: WorldConfig | None = None) -> Image.Image:
    """The scene as an RGB image of image_size x image_size."""
    cfg = cfg or scene.cfg
    if cfg.image_size != scene.image_size:
        raise SmolVLMError(f"the scene is {scene.image_size} px but the config says {cfg.image_size} px; "
                           f"render with the config the scene was made with")
    s, k = scene.image_size, cfg.antialias
    # Draw big and shrink: smooth edges, so small shapes still read as circle / square / triangle.
    img = Image.new("RGB", (s * k, s * k), cfg.background)
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        if o.color not in PALETTE:
            raise SmolVLMError(f"unknown color {o.color!r}; choose one of {', '.join(PALETTE)}")
        _draw(d, o, k, PALETTE[o.color])
    if k > 1:
        img = img.resize((s, s), Image.Resampling.LANCZOS)
    if cfg.texture and cfg.texture_strength > 0:
        noise = np.random.default_rng(stable_seed("texture", *scene.fingerprint()))
        a = np.asarray(img, dtype=np.int16)
        a = a + noise.integers(-cfg.texture_strength, cfg.texture_strength + 1, size=a.shape, dtype=np.int16)
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
    return img


# ---------------------------------------------------------------------------------------------
# questions


@dataclass(frozen=True)
class Question:
    question: str
    answer: str  # one word: a color, a shape, "yes"/"no" or a digit
    qtype: str
    held_out: bool = False  # about (or counting) an object with a held-out combo


def _count(objs, color=None, shape=None, size=None) -> int:
    return sum((color is None or o.color == color) and (shape is None or o.shape == shape)
               and (size is None or o.size == size) for o in objs)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def descriptions(objs, margin: float) -> list[list[tuple[str, str]]]:
    """For each object, the noun phrases (without "the") that pick it out alone, with the
    attributes each phrase uses: [("circle", "shape"), ("large red object", "size color"), ...]."""
    out = []
    for i, o in enumerate(objs):
        others = [p for j, p in enumerate(objs) if j != i]
        d = []
        if _count(objs, shape=o.shape) == 1:
            d.append((o.shape, "shape"))
        if _count(objs, color=o.color) == 1:
            d.append((f"{o.color} object", "color"))
        if _count(objs, color=o.color, shape=o.shape) == 1:
            d.append((f"{o.color} {o.shape}", "color shape"))
        if _count(objs, size=o.size) == 1:
            d.append((f"{o.size} object", "size"))
        if _count(objs, size=o.size, shape=o.shape) == 1:
            d.append((f"{o.size} {o.shape}", "size shape"))
        if _count(objs, size=o.size, color=o.color) == 1:
            d.append((f"{o.size} {o.color} object", "size color"))
        if others and all(o.x <= p.x - margin for p in others):
            d.append(("leftmost object", "position"))
        if others and all(o.x >= p.x + margin for p in others):
            d.append(("rightmost object", "position"))
        out.append(d)
    return out


def _candidates(scene: Scene, qtype: str, cfg: WorldConfig) -> dict[str, list[Question]]:
    """Every question of one type this scene answers unambiguously, by template family."""
    objs, margin, half = scene.objects, cfg.margin_px, scene.image_size / 2
    held = [scene.is_held_out(o) for o in objs]
    fams: dict[str, list[Question]] = {}

    def add(family: str, text: str, answer: str, h: bool) -> None:
        fams.setdefault(family, []).append(Question(text, answer, qtype, h))

    if qtype in ("color", "shape", "relation"):
        descs = descriptions(objs, margin)
    if qtype == "color":
        for o, ds, h in zip(objs, descs, held, strict=True):
            for p, uses in ds:
                if "color" not in uses:
                    add("color", f"What color is the {p}?", o.color, h)
    elif qtype == "shape":
        for o, ds, h in zip(objs, descs, held, strict=True):
            for p, uses in ds:
                if "shape" not in uses:
                    add("shape", f"What shape is the {p}?", o.shape, h)
    elif qtype == "count":
        groups = [("total", "objects", {})]
        groups += [("color", f"{c} objects", {"color": c}) for c in cfg.colors]
        groups += [("shape", PLURALS[s], {"shape": s}) for s in cfg.shapes]
        groups += [("size", f"{z} objects", {"size": z}) for z in cfg.size_names]
        for family, words, kw in groups:
            hit = [h for o, h in zip(objs, held, strict=True) if _count([o], **kw)]
            add(family, f"How many {words} are there?", str(len(hit)), any(hit))
    elif qtype == "exist":
        present = {o.combo for o in objs}
        askable = cfg.combos if scene.split == "compositional" else cfg.allowed_combos
        for c, s in askable:
            add("exist", f"Is there {_article(c)} {c} {s}?", _yn((c, s) in present), (c, s) in cfg.held_out)
    elif qtype == "relation":
        # Positions count only when at least `margin` apart (object to object, or from the middle).
        pos = [[p for p, uses in ds if "position" not in uses] for ds in descs]
        axes = [axis for axis in RELATION_WORDS if axis in cfg.relation_axes]
        for (i, a), (j, b) in itertools.product(enumerate(objs), repeat=2):
            for da, db, axis in itertools.product(pos[i], pos[j], axes):
                family, coord = RELATION_WORDS[axis][0], RELATION_WORDS[axis][1]
                if getattr(b, coord) - getattr(a, coord) >= margin:  # a is clearly left of / above b
                    for text, answer in _pair_questions(axis, da, db, cfg.relation_form):
                        add(family, text, answer, held[i] or held[j])
        for i, a in enumerate(objs):  # relative to the image itself: works with a single object too
            for d, axis in itertools.product(pos[i], axes):
                c = getattr(a, RELATION_WORDS[axis][1]) + 0.5
                if abs(c - half) >= margin:
                    for text, answer in _half_questions(axis, d, c < half, cfg.relation_form):
                        add("half", text, answer, held[i])
    elif qtype == "compare":
        groups = [("shape", [(PLURALS[s], {"shape": s}) for s in cfg.shapes]),
                  ("color", [(f"{c} objects", {"color": c}) for c in cfg.colors]),
                  ("size", [(f"{z} objects", {"size": z}) for z in cfg.size_names])]
        for family, words in groups:
            for wa, ka in words:
                for wb, kb in words:
                    na, nb = _count(objs, **ka), _count(objs, **kb)
                    if wa == wb or na == nb:  # equal counts are never asked: "more" must be visible
                        continue
                    h = any(h for o, h in zip(objs, held, strict=True) if _count([o], **ka) or _count([o], **kb))
                    add(family, f"Are there more {wa} than {wb}?", _yn(na > nb), h)
    if scene.split == "compositional" and any(q.held_out for v in fams.values() for q in v):
        # Test the unseen combos whenever the type allows it.
        fams = {f: [q for q in v if q.held_out] for f, v in fams.items()}
    return {f: v for f, v in fams.items() if v}


# per relation axis: question family, coordinate, "a is clearly before b" and "after", the sides' names as
# answers, the image's halves
RELATION_WORDS = {
    "horizontal": ("x", "x", "to the left of", "to the right of", ("left", "right"), ("left", "right")),
    "vertical": ("y", "y", "above", "below", ("above", "below"), ("top", "bottom")),
}


def _yn(b: bool) -> str:
    return "yes" if b else "no"


def _pair_questions(axis: str, da: str, db: str, form: str) -> list[tuple[str, str]]:
    """(question, answer) about the object `da` names lying clearly before (left of / above) the one `db`
    names. yes-no: the fact in a true and a false form each way, so no question text leans to yes or no;
    choice: the side, asked both ways round, so no text leans to a side."""
    _, _, before, after, (first, second), _ = RELATION_WORDS[axis]
    if form == "choice":
        both = f"{before.removesuffix(' of')} or {after}"  # "to the left or to the right of", "above or below"
        return [(f"Is the {da} {both} the {db}?", first), (f"Is the {db} {both} the {da}?", second)]
    return [(f"Is the {da} {before} the {db}?", "yes"), (f"Is the {db} {before} the {da}?", "no"),
            (f"Is the {da} {after} the {db}?", "no"), (f"Is the {db} {after} the {da}?", "yes")]


def _half_questions(axis: str, d: str, in_first_half: bool, form: str) -> list[tuple[str, str]]:
    """(question, answer) about which half of the image (left / top first) the object `d` names is in."""
    first, second = RELATION_WORDS[axis][5]
    if form == "choice":
        return [(f"Is the {d} in the {first} or the {second} half of the image?", first if in_first_half else second)]
    return [(f"Is the {d} in the {first} half of the image?", _yn(in_first_half)),
            (f"Is the {d} in the {second} half of the image?", _yn(not in_first_half))]


def _pick_balanced(fams: dict[str, list[Question]], rng: random.Random, want: str | None = None) -> Question:
    # Family first ("how many red objects" vs "how many objects"), then the answer (`want` if the
    # family has it, else uniform), then a question with that answer: flattens each type's answer
    # distribution and each question text's.
    if want is not None and any(q.answer == want for v in fams.values() for q in v):
        fams = {f: v for f, v in fams.items() if any(q.answer == want for q in v)}
    cands = fams[rng.choice(sorted(fams))]
    by_answer: dict[str, list[Question]] = {}
    for q in cands:
        by_answer.setdefault(q.answer, []).append(q)
    answer = want if want in by_answer else rng.choice(sorted(by_answer))
    return rng.choice(by_answer[answer])


def questions(scene: Scene, rng: random.Random, n: int = 4, cfg: WorldConfig | None = None,
              scheduled: bool = True, type_weights: dict[str, float] | None = None) -> list[Question]:
    """Up to `n` distinct questions about the scene (fewer only if it supports fewer).

    scheduled (evaluation sets): types and yes/no answers follow a schedule keyed on the scene index
    rather than coin flips, so they are balanced exactly over consecutive scenes, not just on average:
    scene i asks slots i*n .. i*n+n-1 of an endless cycle through the question types (a type the scene
    cannot support, e.g. relation with one object, passes the slot to the next type), and each yes/no
    type alternates between "yes" and "no" from one occurrence to the next. `rng` picks the rest.

    scheduled=False (training conversations, where one image's questions are turns of one sequence):
    each turn draws its type and its yes/no answer from `rng`. Under the schedule, a turn's type and
    answer follow from the earlier turns' (the type cycle repeats, yes/no alternates), a text-only
    shortcut a model learns instead of looking at the image. type_weights (question type -> relative weight,
    unscheduled only) draws the types unevenly, e.g. more of a type that is learned slowly."""
    cfg = cfg or scene.cfg
    types = cfg.question_types
    T = len(types)
    offset = stable_seed("types", scene.seed, scene.split) % T  # another seed, another phase
    pools: dict[str, dict[str, list[Question]]] = {}
    out, asked = [], set()
    for slot in range(scene.index * n + offset, scene.index * n + offset + n):
        if not scheduled and type_weights:
            slot = rng.choices(range(T), [type_weights.get(t, 1.0) for t in types])[0] + T * rng.randrange(2)
        elif not scheduled:
            slot = rng.randrange(T * 2)  # type and yes/no phase at random
        for k in range(T):
            t = types[(slot + k) % T]
            if t not in pools:
                pools[t] = _candidates(scene, t, cfg)
            fams = {f: [q for q in v if q.question not in asked] for f, v in pools[t].items()}
            fams = {f: v for f, v in fams.items() if v}
            if fams:
                break
        else:
            break  # the scene supports no further question
        # (relations asked as a choice have no yes / no: _pick_balanced then balances their sides instead)
        want = ("yes", "no")[((slot + k) // T + types.index(t)) % 2] if t in YES_NO_TYPES else None
        q = _pick_balanced(fams, rng, want)
        asked.add(q.question)
        out.append(q)
    return out


# ---------------------------------------------------------------------------------------------
# captions and retrieval candidates


def _phrase(count: int, size: str, color: str, shape: str) -> str:
    if count == 1:
        return f"{_article(size)} {size} {color} {shape}"
    return f"{NUMBER_WORDS[count]} {size} {color} {PLURALS[shape]}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _sequence_caption(triples: list[tuple[str, str, str]]) -> str:
    return "From left to right: " + _join([_phrase(1, *t) for t in triples]) + "."


def _triples(scene: Scene) -> list[tuple[str, str, str]]:
    return [(o.size, o.color, o.shape) for o in sorted(scene.objects, key=lambda o: (o.x, o.y))]


def captions(scene: Scene) -> list[str]:
    """All caption phrasings of the scene; the first is the ground truth used for retrieval.
    Objects are listed left to right; identical objects are counted ("two large red circles")."""
    triples = _triples(scene)
    groups: dict[tuple, int] = {}  # insertion order = left to right by first appearance
    for t in triples:
        groups[t] = groups.get(t, 0) + 1
    listed = _join([_phrase(k, *t) for t, k in groups.items()])
    n = len(triples)
    num = NUMBER_WORDS[n]
    return [
        _sequence_caption(triples),
        listed[0].upper() + listed[1:] + ".",
        f"There is one object: {listed}." if n == 1 else f"There are {num} objects: {listed}.",
        f"{num.capitalize()} shape{'s' if n > 1 else ''}: {listed}.",
        f"A picture of {listed}.",
    ]


def caption(scene: Scene, rng: random.Random) -> str:
    return rng.choice(captions(scene))


def ground_truth_caption(scene: Scene) -> str:
    return captions(scene)[0]


def caption_candidates(scene: Scene, n_negatives: int = 7, rng: random.Random | None = None,
                       cfg: WorldConfig | None = None) -> list[str]:
    """[ground-truth caption, hard negatives...] for caption-likelihood retrieval (the true one is
    always first). Each negative is the true caption with one object's color, shape or size changed,
    or two neighbours swapped; all are false for the scene. Kinds are interleaved so a short list
    still mixes them."""
    cfg = cfg or scene.cfg
    rng = rng or random.Random(stable_seed("candidates", scene.seed, scene.split, scene.index))
    triples = _triples(scene)
    true = _sequence_caption(triples)
    askable = set(cfg.combos if scene.split == "compositional" else cfg.allowed_combos)
    kinds: dict[str, list[str]] = {"color": [], "shape": [], "size": [], "order": []}
    for i, (z, c, s) in enumerate(triples):
        def changed(t, i=i):
            return _sequence_caption(triples[:i] + [t] + triples[i + 1:])
        kinds["color"] += [changed((z, c2, s)) for c2 in cfg.colors if c2 != c and (c2, s) in askable]
        kinds["shape"] += [changed((z, c, s2)) for s2 in cfg.shapes if s2 != s and (c, s2) in askable]
        kinds["size"] += [changed((z2, c, s)) for z2 in cfg.size_names if z2 != z]
    xs = sorted(o.x for o in scene.objects)
    # A swap is false only if the order is clear: every neighbour at least the margin apart.
    if all(b - a >= cfg.margin_px for a, b in zip(xs, xs[1:], strict=False)):
        for i in range(len(triples) - 1):
            if triples[i] != triples[i + 1]:
                sw = triples[:i] + [triples[i + 1], triples[i]] + triples[i + 2:]
                kinds["order"].append(_sequence_caption(sw))
    for v in kinds.values():
        rng.shuffle(v)
    out, seen = [true], {true}
    while len(out) < n_negatives + 1 and any(kinds.values()):
        for v in kinds.values():
            if v and len(out) < n_negatives + 1:
                c = v.pop()
                if c not in seen:
                    seen.add(c)
                    out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# NLVR2-style pairs


def _pair_statements(left: Scene, right: Scene, cfg: WorldConfig) -> dict[str, list[tuple[str, bool]]]:
    L, R = left.objects, right.objects
    fam: dict[str, list[tuple[str, bool]]] = {"more": [], "both": [], "total": [], "one": []}
    for s in cfg.shapes:
        fam["more"].append((f"The left image has more {PLURALS[s]} than the right image.",
                            _count(L, shape=s) > _count(R, shape=s)))
        fam["more"].append((f"The right image has more {PLURALS[s]} than the left image.",
                            _count(R, shape=s) > _count(L, shape=s)))
        fam["both"].append((f"Both images contain {_article(s)} {s}.",
                            _count(L, shape=s) > 0 and _count(R, shape=s) > 0))
    fam["more"].append(("The left image has more objects than the right image.", len(L) > len(R)))
    for c in cfg.colors:
        fam["both"].append((f"Both images contain {_article(c)} {c} object.",
                            _count(L, color=c) > 0 and _count(R, color=c) > 0))
    total = len(L) + len(R)
    # False totals stay near the truth, so the number alone does not give the label away.
    for k in range(max(2 * cfg.min_objects, total - 2), min(2 * cfg.max_objects, total + 2) + 1):
        fam["total"].append((f"There are exactly {NUMBER_WORDS[k]} objects in total.", k == total))
    askable = cfg.combos if left.split == "compositional" else cfg.allowed_combos
    for c, s in askable:
        a, b = _count(L, color=c, shape=s) > 0, _count(R, color=c, shape=s) > 0
        fam["one"].append((f"Exactly one image contains {_article(c)} {c} {s}.", a != b))
    return fam


def make_pair(cfg: WorldConfig | None, split: str, index: int, seed: int = 0) -> tuple[Scene, Scene, str, bool]:
    """(left scene, right scene, statement, label). The scenes are scenes 2*index and 2*index + 1 of
    the split (so an export's pairs reuse its images); the label is drawn first (50/50), then a
    statement family, then a statement with that truth value."""
    cfg = cfg or WorldConfig()
    left, right = make_scene(cfg, split, 2 * index, seed), make_scene(cfg, split, 2 * index + 1, seed)
    rng = random.Random(stable_seed("pair", seed, split, index))
    label = rng.random() < 0.5
    fams = _pair_statements(left, right, cfg)
    names = sorted(fams)
    rng.shuffle(names)
    for name in names:
        options = [text for text, truth in fams[name] if truth == label]
        if options:
            return left, right, rng.choice(options), label
    raise AssertionError("unreachable: the 'total' family always has a true and a false statement")


# ---------------------------------------------------------------------------------------------
# dataset API


@dataclass
class VQAItem:
    scene: Scene
    image: Image.Image
    questions: list[Question]


@dataclass
class CaptionItem:
    scene: Scene
    image: Image.Image
    captions: list[str]  # all phrasings; [0] is the ground truth
    candidates: list[str]  # [ground truth, hard negatives...] for retrieval


@dataclass
class PairItem:
    left: Scene
    right: Scene
    left_image: Image.Image
    right_image: Image.Image
    statement: str
    label: bool


class ShapesWorld:
    """One world = one config and one seed; every split and every item is reproducible from them."""

    def __init__(self, cfg: WorldConfig | None = None, seed: int = 0):
        self.cfg = cfg or WorldConfig()
        self.seed = seed

    def scene(self, split: str, index: int) -> Scene:
        return make_scene(self.cfg, split, index, self.seed)

    def render(self, scene: Scene) -> Image.Image:
        return render(scene, self.cfg)

    def questions(self, scene: Scene, n: int = 4) -> list[Question]:
        rng = random.Random(stable_seed("questions", self.seed, scene.split, scene.index))
        return questions(scene, rng, n, self.cfg)

    def scenes(self, split: str, n: int, start: int = 0) -> Iterator[Scene]:
        for i in range(start, start + n):
            yield self.scene(split, i)

    def vqa(self, split: str, n: int, questions_per_image: int = 4, start: int = 0) -> Iterator[VQAItem]:
        for scene in self.scenes(split, n, start):
            yield VQAItem(scene, self.render(scene), self.questions(scene, questions_per_image))

    def captioning(self, split: str, n: int, start: int = 0) -> Iterator[CaptionItem]:
        for scene in self.scenes(split, n, start):
            yield CaptionItem(scene, self.render(scene), captions(scene), caption_candidates(scene))

    def pairs(self, split: str, n: int, start: int = 0) -> Iterator[PairItem]:
        for i in range(start, start + n):
            left, right, statement, label = make_pair(self.cfg, split, i, self.seed)
            yield PairItem(left, right, self.render(left), self.render(right), statement, label)

    def export(self, out_dir: str | Path, split: str, n: int, questions_per_image: int = 4,
               progress: bool = True) -> Path:
        return export(out_dir, split, n, self.cfg, self.seed, questions_per_image=questions_per_image,
                      progress=progress)


# ---------------------------------------------------------------------------------------------
# export / read


def _save_png(img: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def export(out_dir: str | Path, split: str, n: int, cfg: WorldConfig | None = None, seed: int = 0, *,
           questions_per_image: int = 4, progress: bool = True) -> Path:
    """Write `n` scenes of `split` to out_dir/<split>/ and return that folder:
      images/<id>.png   the rendered scenes (id = zero-padded index, e.g. 000001)
      questions.jsonl   {"image": "images/000001.png", "question", "answer", "type", "held_out"}
      captions.jsonl    {"image", "captions": [ground truth, other phrasings...],
                         "candidates": [ground truth, hard negatives...]}
      scenes.jsonl      Scene.to_dict() plus "image": the full ground truth
      pairs.jsonl       {"left", "right", "statement", "label"} for n // 2 pairs of these images
      world.json        the config, seed and counts, to make the same data again
    The jsonl files are written to temporary files and renamed into place at the end, so an
    interrupted export leaves the previous files (or none), never half-written ones."""
    cfg = cfg or WorldConfig()
    _check_split(split)
    if n < 0 or questions_per_image < 0:
        raise SmolVLMError(f"n and questions_per_image must be >= 0, got {n} and {questions_per_image}")
    world = ShapesWorld(cfg, seed)
    folder = Path(out_dir) / split
    try:
        (folder / "images").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SmolVLMError(f"cannot create {folder / 'images'} ({e}); pass a writable out_dir") from e
    tmps = {}
    counts = dict.fromkeys(FILES, 0)

    def write(kind: str, record: dict) -> None:
        tmps[kind].write(json.dumps(record) + "\n")
        counts[kind] += 1

    try:
        for kind in FILES:
            tmps[kind] = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=folder, prefix=f".{kind}.",
                                                     suffix=".tmp", delete=False)
        steps = range(n)
        if tqdm is not None and progress:
            steps = tqdm(steps, desc=f"shapes {split}", unit="img")
        for i in steps:
            scene = world.scene(split, i)
            image = f"images/{scene.id}.png"
            _save_png(world.render(scene), folder / image)
            for q in world.questions(scene, questions_per_image):
                write("questions", {"image": image, "question": q.question, "answer": q.answer, "type": q.qtype,
                                    "held_out": q.held_out})
            write("captions", {"image": image, "captions": captions(scene), "candidates": caption_candidates(scene)})
            write("scenes", {"image": image, **scene.to_dict()})
        for i in range(n // 2):
            left, right, statement, label = make_pair(cfg, split, i, seed)
            write("pairs", {"left": f"images/{left.id}.png", "right": f"images/{right.id}.png",
                            "statement": statement, "label": label})
        for kind, f in tmps.items():
            f.close()
            os.replace(f.name, folder / f"{kind}.jsonl")
    except BaseException:
        for f in tmps.values():
            f.close()
            Path(f.name).unlink(missing_ok=True)
        raise
    meta = {"split": split, "n": n, "seed": seed, "questions_per_image": questions_per_image,
            "counts": counts, "config": cfg.to_dict()}
    atomic_write_json(folder / "world.json", meta)
    return folder


@dataclass(frozen=True)
class VQARecord:
    image: Path  # resolved against the folder of the jsonl file
    question: str
    answer: str
    qtype: str


def read_questions_jsonl(path: str | Path, check_images: bool = True) -> list[VQARecord]:
    """Read an exported questions.jsonl (or any file with the same schema)."""
    path = Path(path)
    if not path.is_file():
        raise SmolVLMError(f"{path} does not exist or is not a file; pass the questions.jsonl written by "
                           f"`export` (out_dir/<split>/questions.jsonl)")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise SmolVLMError(f"{path} line {lineno} is not valid JSON ({e.msg}); re-export the file") from e
            keys = ("image", "question", "answer", "type")
            if not isinstance(d, dict) or any(not isinstance(d.get(k), str) for k in keys):
                raise SmolVLMError(f"{path} line {lineno} needs string fields {', '.join(keys)}; "
                                   f"re-export the file or fix that line")
            image = path.parent / d["image"]
            if check_images and not image.is_file():
                raise SmolVLMError(f"{path} line {lineno}: image {image} is missing; re-export the split")
            records.append(VQARecord(image, d["question"], d["answer"], d["type"]))
    if not records:
        raise SmolVLMError(f"{path} holds no questions; export with n >= 1 and questions_per_image >= 1")
    return records
