"""The training data: example index -> conversation -> tokens + labels. Every example is a pure function of the
config and its index, so any step's batch can be rebuilt exactly when a run resumes."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path

import torch

from smolvlm.data.conversations import Conversation, collate, qa_conversation, tokenize_conversation
from smolvlm.errors import SmolVLMError
from smolvlm.train.config import DataSpec, TrainConfig


class ShapesTrainingData:
    """Example i is a pure function of (world config, seed, i): a random training scene with fresh
    questions (or a caption), so any step's batch can be rebuilt exactly when resuming."""

    def __init__(self, spec: DataSpec, batch_size: int):
        from smolvlm.data.shapes import ShapesWorld, WorldConfig

        try:
            world_cfg = WorldConfig(**spec.world)
        except TypeError as e:
            raise SmolVLMError(f"data.world: {e}; see smolvlm.data.shapes.WorldConfig for the fields") from None
        self.world = ShapesWorld(world_cfg, spec.seed)
        self.spec = spec
        self.batch_size = batch_size
        # one world per curriculum level (most objects per scene); the last is the full world
        levels = range(world_cfg.min_objects, world_cfg.max_objects + 1)
        self.levels = [dataclasses.replace(world_cfg, max_objects=k) for k in levels]
        looking = tuple(t for t in ("color", "shape", "count") if t in world_cfg.question_types)
        self.first_half = [dataclasses.replace(c, question_types=looking or world_cfg.question_types)
                           for c in self.levels]
        unknown = set(spec.tasks) - {"vqa", "caption", "pairs"}
        if unknown:
            raise SmolVLMError(f"data.tasks names unknown shapes tasks {sorted(unknown)}; use vqa, caption, pairs")
        odd = sorted(set(spec.question_weights) - set(world_cfg.question_types))
        if odd:
            raise SmolVLMError(f"data.question_weights names {odd}, which the world does not ask; its question types "
                               f"are {', '.join(world_cfg.question_types)}")
        bad = {t: w for t, w in spec.question_weights.items() if isinstance(w, bool) or not isinstance(w, (int, float))
               or w <= 0}
        if bad:
            raise SmolVLMError(f"data.question_weights must map question types to numbers > 0 (to drop a type, leave "
                               f"it out of data.world.question_types), got {bad}")
        self.tasks = [t for t, w in spec.tasks.items() if w > 0]
        self.weights = [spec.tasks[t] for t in self.tasks]
        if not self.tasks or spec.train_scenes < 1:
            raise SmolVLMError("the dataset is empty: give data.tasks a positive weight and data.train_scenes >= 1")

    def conversation(self, i: int) -> Conversation:
        from smolvlm.data.shapes import CAPTION_PROMPTS, PAIR_PROMPT, captions

        ex = self.draw(i)
        if ex.task == "pairs":
            left, right, statement, label = ex.pair
            conv = qa_conversation([self.world.render(left), self.world.render(right)],
                                   [(PAIR_PROMPT.format(statement), "yes" if label else "no")], ex.task)
            conv.caption = ex.caption_rng.choice(captions(left))
            return conv
        image = self.world.render(ex.scene)
        if ex.task == "caption":
            conv = qa_conversation([image], [(ex.rng.choice(CAPTION_PROMPTS), ex.rng.choice(captions(ex.scene)))],
                                   ex.task)
        else:
            conv = qa_conversation([image], [(q.question, q.answer) for q in ex.questions], ex.task)
            conv.independent_turns = self.spec.independent_turns
        conv.caption = ex.caption_rng.choice(captions(ex.scene))
        return conv

    def draw(self, i: int) -> ShapesExample:
        """Example i before any image is rendered: its task, scene (or pair) and questions, and the generators
        that pick the rest (prompts, captions)."""
        from smolvlm.data.shapes import make_pair, make_scene, questions, stable_seed

        rng = random.Random(stable_seed("train-example", self.spec.seed, i))
        # the contrastive loss's caption draws from its own generator, so the examples stay as they were
        caption_rng = random.Random(stable_seed("train-caption", self.spec.seed, i))
        task = rng.choices(self.tasks, weights=self.weights)[0]
        if task == "pairs":
            pair = make_pair(self.world.cfg, "train", rng.randrange(self.spec.train_scenes), self.spec.seed)
            return ShapesExample(task, rng, caption_rng, pair=pair)
        world_cfg = self.world.cfg
        step = i // self.batch_size
        if step < self.spec.curriculum_steps:
            level = step * len(self.levels) // self.spec.curriculum_steps
            world_cfg = (self.first_half if 2 * step < self.spec.curriculum_steps else self.levels)[level]
        # a scene that supports none of the world's question types (e.g. only color questions, and no object
        # can be named alone) is drawn again
        for _ in range(100):
            scene = make_scene(world_cfg, "train", rng.randrange(self.spec.train_scenes), self.spec.seed)
            if task == "caption":
                return ShapesExample(task, rng, caption_rng, scene=scene)
            qs = questions(scene, rng, self.spec.questions_per_image, world_cfg, scheduled=False,
                           type_weights=self.spec.question_weights)
            if qs:
                return ShapesExample(task, rng, caption_rng, scene=scene, questions=qs)
        raise SmolVLMError("the shapes world's scenes support none of its question_types; add question types "
                           "or change the world")

    def training_questions(self, n_examples: int) -> Iterator:
        """The questions (smolvlm.data.shapes.Question) of n_examples examples after the curriculum: what the
        trained model is asked, in the mix it is asked it, without rendering a single image."""
        start = self.spec.curriculum_steps * self.batch_size
        for i in range(start, start + n_examples):
            yield from self.draw(i).questions


@dataclasses.dataclass
class ShapesExample:
    """One training example of the shapes world, drawn but not rendered (ShapesTrainingData.draw)."""

    task: str  # vqa, caption or pairs
    rng: random.Random  # where the example's remaining choices come from (caption prompt, caption)
    caption_rng: random.Random  # the contrastive loss's caption
    scene: object = None  # smolvlm.data.shapes.Scene (vqa, caption)
    questions: list = dataclasses.field(default_factory=list)  # vqa: smolvlm.data.shapes.Question
    pair: tuple | None = None  # pairs: (left scene, right scene, statement, label)


class ConversationList:
    """A finite list of conversations (e.g. LLaVA JSON), visited in a fresh seeded order each epoch."""

    def __init__(self, conversations: list[Conversation], seed: int):
        if not conversations:
            raise SmolVLMError("the dataset is empty: no conversations to train on")
        self.items = conversations
        self.seed = seed
        self._order: dict[int, list[int]] = {}

    def conversation(self, i: int) -> Conversation:
        epoch, k = divmod(i, len(self.items))
        if epoch not in self._order:
            order = list(range(len(self.items)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order = {epoch: order}
        return self.items[self._order[epoch][k]]


def build_data(spec: DataSpec, seed: int, batch_size: int):
    if spec.source == "shapes":
        return ShapesTrainingData(spec, batch_size)
    from smolvlm.data.conversations import read_llava_json

    convs = read_llava_json(spec.path, spec.image_root or None)
    for k, conv in enumerate(convs):
        for im in conv.images:
            if isinstance(im, (str, Path)) and not Path(im).is_file():
                raise SmolVLMError(f"{spec.path}: record {k} names image {im}, which does not exist; fix the path "
                                   "or set data.image_root to the folder the paths are relative to")
    return ConversationList(convs, seed)


def drop_images(conv: Conversation) -> Conversation:
    """The same conversation without its images (for the blind, text-only baseline)."""
    messages = []
    for m in conv.messages:
        content = m["content"]
        if isinstance(content, list):
            content = [p for p in content if p.get("type") != "image"]
        messages.append({**m, "content": content})
    return Conversation(messages, [], conv.task)


class StepBatches(torch.utils.data.Dataset):
    """Item s = this process's micro-batches of optimizer step s (built in a worker process)."""

    def __init__(self, data, processor, cfg: TrainConfig, rank: int, world: int):
        self.data, self.processor, self.cfg = data, processor, cfg
        self.rank, self.world = rank, world

    def example(self, i: int) -> dict:
        conv = self.data.conversation(i)
        if self.cfg.model.blind:
            conv = drop_images(conv)
        return {**tokenize_conversation(conv, self.processor, self.cfg.data.max_tokens), "caption": conv.caption}

    def __getitem__(self, step: int) -> list[dict]:
        b = self.cfg.batch_size
        mine = list(range(step * b, (step + 1) * b))[self.rank::self.world]  # this process's share
        chunks = [mine[k::self.cfg.grad_accum] for k in range(self.cfg.grad_accum)]
        pad = self.processor.pad_token_id if self.processor.pad_token_id is not None else 0
        out = []
        for chunk in chunks:
            if not chunk:
                continue
            examples = [self.example(i) for i in chunk]
            batch = collate(examples, pad)
            batch["n_tokens"] = int(batch["attention_mask"].sum())
            if self.cfg.contrastive:
                captions = self.processor([e["caption"] for e in examples], padding_side="right")
                batch["caption_ids"], batch["caption_mask"] = captions["input_ids"], captions["attention_mask"]
            out.append(batch)
        return out


def step_loader(dataset: StepBatches, start: int, end: int, workers: int):
    """Batches of steps start, start+1, ..., end-1; the worker prepares the next steps during compute."""
    sampler = range(start, end)
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers,
                                       prefetch_factor=4 if workers else None, persistent_workers=False)
