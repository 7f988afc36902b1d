"""Chat templates: render a list of messages into the prompt string a model was trained on.

Templates are Jinja2, run in an immutable sandbox with the same environment Hugging Face
transformers gives them (``trim_blocks``, ``lstrip_blocks``, loop controls, a ``tojson``
filter that keeps non-ASCII text, ``raise_exception``, ``strftime_now``, and the
``{% generation %}`` block, which only marks assistant text and renders its body), so a
model's own template renders byte-identical prompts here and there.

Deliberately left out: the assistant-token mask that ``{% generation %}`` can produce in
transformers (training code builds its own loss masks) and multimodal content parts.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from lmstack.errors import LMStackError

# ChatML (as used by Qwen, SmolLM and others): each turn is
# <|im_start|>{role}\n{content}<|im_end|>\n, and the generation prompt opens an assistant turn.
DEFAULT_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check that ``messages`` is a list of {"role": str, "content": str} dicts.

    An assistant message that carries ``tool_calls`` may have ``content`` None. Extra keys
    (``name``, ``tool_call_id``...) pass through to the template.
    """
    if not isinstance(messages, (list, tuple)):
        raise LMStackError(
            f"chat messages: got {type(messages).__name__}, expected a list of "
            '{"role": str, "content": str} dicts'
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LMStackError(
                f"chat message {i}: got {type(m).__name__} {m!r:.80}, expected a dict with "
                '"role" and "content" strings'
            )
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise LMStackError(f"chat message {i}: 'role' is {role!r}, expected a non-empty string "
                               "such as 'system', 'user' or 'assistant'")
        content = m.get("content")
        if content is None and m.get("tool_calls"):
            continue
        if not isinstance(content, str):
            raise LMStackError(f"chat message {i} ({role}): 'content' is {type(content).__name__} "
                               f"{content!r:.80}, expected a string")
    return list(messages)


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str) -> Any:
    """Compile a chat template in a sandboxed Jinja2 environment (cached by source text)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}``: renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise LMStackError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None


def render_chat(template: str, messages: Any, *, add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None, **variables: Any) -> str:
    """Render ``messages`` with ``template``; ``variables`` (bos_token, eos_token, ...) are
    visible to the template as globals."""
    import jinja2

    messages = validate_messages(messages)
    compiled = compile_template(template)
    try:
        return compiled.render(messages=messages, tools=tools,
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        raise LMStackError(f"chat template refused the conversation: {e}") from None
