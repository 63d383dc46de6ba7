"""Chat templates: the Jinja2 sandbox transformers renders them in (same filters, `generation` tag, errors) and
the one builder of chat messages every command uses."""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The chat template of the released SmolVLM-256M-Instruct, used when a checkpoint brings none.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# ---------------------------------------------------------------------------------------------
# chat templates


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; we render it as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: no HTML escaping, unlike jinja's
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """The jinja environment transformers renders chat templates with."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def build_messages(prompt: str, n_images: int) -> list[dict]:
    """One user turn: the images, then the text (SmolVLM's layout). Text-only prompts stay plain
    strings so that text-only chat templates (e.g. SmolLM2's ChatML) render them too."""
    if n_images == 0:
        return [{"role": "user", "content": prompt}]
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}]


def plain_value(value: Any) -> Any:
    """Only JSON-like data reaches the template (image objects in content parts become a placeholder)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    return f"<{type(value).__name__}>"


def template_reads_parts(template: str) -> bool:
    """Does the template walk content parts (`x['type']`), like SmolVLM's, or print content as a string?"""
    return re.search(r"""\[\s*['"]type['"]\s*\]|\.type\b""", template) is not None


