"""EvalOptions: how a task is evaluated (its data, how the model runs, how the run folder is treated).

`smolvlm eval` builds one from its arguments (smolvlm.eval.cli); `smolvlm ablate` and `smolvlm demo` build
their own and call smolvlm.eval.runner directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalOptions:
    # the data
    data: str | None = None  # the benchmark's files; a shapes task: an export folder, or None to generate
    images: str | None = None  # folder of the images (None: DATA/images, else DATA's folder)
    split: str | None = None  # Karpathy split / Flickr30k Entities split list (None: test)
    limit: int | None = None  # the first N examples (None: all; shapes tasks: tasks.SHAPES_DEFAULT_LIMIT)
    seed: int = 0  # shapes world seed for generated data
    world: dict = field(default_factory=dict)  # shapes WorldConfig fields for generated data ({}: the default)
    # the model
    dtype: str = "auto"
    quantize: str | None = None  # "int8" / "int4": weight-only quantization of the decoder at load
    threads: int = 0  # torch threads, set when a runner function loads the model (0: torch's choice)
    batch_size: int = 16  # prompts per batch
    max_new_tokens: int | None = None  # None: predict.MAX_NEW_TOKENS of the task's kind
    # scoring
    meteor: bool = False  # also METEOR for captions (Java + pycocoevalcap)
    retrieval_scoring: str = "auto"  # "auto", "logprob" or "contrastive"
    # the run folder and the terminal
    fresh: bool = False  # discard the predictions already in the run folder
    progress: bool = True  # a progress bar on stderr
