"""Running a model over a task's examples: greedy answers and captions in left-padded batches, retrieval scores
per image (caption log-probabilities, or the contrastive head's cosines), appended to the run folder as they are
made so that a stopped run resumes. Images are read as every command reads them (smolvlm.processing.open_image)."""

from __future__ import annotations

import sys
import time

from smolvlm.errors import SmolVLMError
from smolvlm.eval.options import EvalOptions
from smolvlm.eval.run_folder import RunFolder

# Answer length limits by task kind when EvalOptions.max_new_tokens is not given.
MAX_NEW_TOKENS = {"qa": 16, "caption": 48}


def _open_image(image):
    """A PIL image from a path (read as every command reads images: processing.open_image, EXIF orientation applied;
    the processor puts transparency on white) or a PIL image; None and the reason when it cannot be read."""
    from PIL import Image

    from smolvlm.processing import open_image

    if isinstance(image, Image.Image):
        return image, None
    try:
        return open_image(image), None
    except SmolVLMError as e:
        return None, str(e)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def _messages(n_images: int, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def generate_answers(model, processor, prompts: list[str], images: list[list], max_new_tokens: int) -> list[str]:
    """Greedy answers, one per prompt, in one left-padded batch (images: one list per prompt; a
    text-only model gets the prompts without images)."""
    from smolvlm.generation import SamplingParams, generate_batch

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    if model.has_vision:
        texts = [processor.apply_chat_template(_messages(len(ims), p), add_generation_prompt=True)
                 for p, ims in zip(prompts, images, strict=True)]
        inputs = processor(texts, images=images)
    else:
        texts = [processor.apply_chat_template(_messages(0, p), add_generation_prompt=True) for p in prompts]
        inputs = processor(texts)
    return [r.text.strip() for r in generate_batch(model, processor, inputs, params)]


def run_generation(model, processor, run: RunFolder, examples: list, kind: str, opts: EvalOptions,
                   desc: str) -> tuple[int, float]:
    """Answer (or caption) every example not yet in `run`; returns (examples done now, seconds)."""
    import torch

    from smolvlm.data.shapes import CAPTION_PROMPT

    todo = [ex for ex in examples if str(ex.id) not in run.done]
    max_new = opts.max_new_tokens or MAX_NEW_TOKENS["qa" if kind == "qa" else "caption"]
    t0 = time.perf_counter()
    bar = _progress(len(examples), desc, opts.progress)
    bar.update(len(examples) - len(todo))
    with torch.inference_mode():
        for start in range(0, len(todo), opts.batch_size):
            chunk = todo[start:start + opts.batch_size]
            rows, ready = [], []
            for ex in chunk:
                paths = ex.images if kind == "qa" else [ex.image]
                opened, errors = [], []
                if model.has_vision:
                    for p in paths:
                        im, err = _open_image(p)
                        opened.append(im)
                        if err:
                            errors.append(err)
                if errors:
                    rows.append({"id": ex.id, "prediction": "", "error": "; ".join(errors)})
                else:
                    ready.append((ex, opened))
            if ready:
                prompts = [ex.prompt if kind == "qa" else CAPTION_PROMPT for ex, _ in ready]
                answers = generate_answers(model, processor, prompts, [ims for _, ims in ready], max_new)
                rows += [{"id": ex.id, "prediction": a} for (ex, _), a in zip(ready, answers, strict=True)]
            run.add(rows)
            bar.update(len(chunk))
    bar.close()
    return len(todo), time.perf_counter() - t0


def caption_logprobs(model, processor, image, captions: list[str], batch_size: int) -> list[float]:
    """Mean log-probability per token of each caption as the answer to CAPTION_PROMPT about `image`."""
    import torch

    from smolvlm.data.shapes import CAPTION_PROMPT

    prefix_text = processor.apply_chat_template(_messages(1, CAPTION_PROMPT), add_generation_prompt=True)
    inputs = processor(prefix_text, images=[[image]])
    prefix = inputs["input_ids"][0].tolist()
    embeds = model.encode_images(inputs["pixel_values"], inputs.get("pixel_attention_mask"))
    sep = _answer_separator(processor)
    out = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        conts = [processor.tokenizer.encode(sep + c, add_special_tokens=False).ids or [processor.pad_token_id or 0]
                 for c in chunk]
        length = len(prefix) + max(len(c) for c in conts)
        ids = torch.full((len(chunk), length), processor.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, c in enumerate(conts):
            ids[i, :len(prefix) + len(c)] = torch.tensor(prefix + c)
            mask[i, :len(prefix) + len(c)] = 1
        h = model.hidden_states(ids, image_embeds=embeds.repeat(len(chunk), 1, 1), attention_mask=mask)
        for i, c in enumerate(conts):
            # the logits at position t predict token t + 1
            logits = model.lm_head(h[i, len(prefix) - 1:len(prefix) - 1 + len(c)]).float()
            lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(c)[:, None])
            out.append(float(lp.mean()))
    return out


def _answer_separator(processor) -> str:
    """What the chat template puts between the generation prompt and the assistant's text (e.g. a
    space after SmolVLM's "Assistant:", nothing after ChatML's "assistant\\n")."""
    marker = "\u2063caption\u2063"
    gen = processor.apply_chat_template(_messages(0, "x"), add_generation_prompt=True)
    full = processor.apply_chat_template(_messages(0, "x") + [
        {"role": "assistant", "content": [{"type": "text", "text": marker}]}], add_generation_prompt=False)
    if full.startswith(gen) and marker in full[len(gen):]:
        return full[len(gen):full.index(marker, len(gen))]
    return ""


def caption_embeddings(model, processor, captions: list[str], batch_size: int):
    """The contrastive head's embeddings of the captions (C, D), as training computes them."""
    import torch

    out = []
    for start in range(0, len(captions), batch_size):
        inputs = processor(captions[start:start + batch_size], padding_side="right")
        out.append(model.text_embedding(inputs["input_ids"], inputs["attention_mask"]).float())
    return torch.cat(out)


def image_embedding(model, processor, image):
    """The contrastive head's embedding (D,) of one image, placed in the caption prompt as in training."""
    from smolvlm.data.shapes import CAPTION_PROMPT

    text = processor.apply_chat_template(_messages(1, CAPTION_PROMPT), add_generation_prompt=True)
    inputs = processor(text, images=[[image]])
    embeds = model.encode_images(inputs["pixel_values"], inputs.get("pixel_attention_mask"))
    return model.image_embedding(inputs["input_ids"], embeds)[0].float()


def retrieval_scoring(model, mode: str) -> str:
    """What ranks the captions for this model: mode (EvalOptions.retrieval_scoring) with "auto" resolved."""
    if mode == "contrastive" and not model.has_contrastive:
        raise SmolVLMError("--retrieval-scoring contrastive needs a model with a contrastive head (trained with "
                           "contrastive_weight > 0 or a 'contrastive' stage); use logprob")
    if mode == "auto":
        return "contrastive" if model.has_contrastive else "logprob"
    return mode


def run_retrieval(model, processor, run: RunFolder, examples: list, opts: EvalOptions,
                  desc: str) -> tuple[int, float]:
    """One row per image: the scores of every caption of every image (cached per image)."""
    import torch

    captions = [c for ex in examples for c in ex.refs]
    todo = [ex for ex in examples if str(ex.id) not in run.done]
    t0 = time.perf_counter()
    bar = _progress(len(examples), desc, opts.progress)
    bar.update(len(examples) - len(todo))
    contrastive = retrieval_scoring(model, opts.retrieval_scoring) == "contrastive"
    with torch.inference_mode():
        texts = caption_embeddings(model, processor, captions, opts.batch_size) if contrastive and todo else None
        for ex in todo:
            im, err = _open_image(ex.image)
            if err:
                run.add([{"id": ex.id, "scores": None, "error": err}])
            elif contrastive:
                run.add([{"id": ex.id, "scores": (texts @ image_embedding(model, processor, im)).tolist()}])
            else:
                run.add([{"id": ex.id, "scores": caption_logprobs(model, processor, im, captions, opts.batch_size)}])
            bar.update(1)
    bar.close()
    return len(todo) * len(captions), time.perf_counter() - t0
