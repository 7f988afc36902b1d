"""Constrained decoding for the engine: JSON schemas and Lark grammars through llguidance.

``GrammarCompiler(tokenizer)`` wraps our tokenizer for llguidance once (it reads the
``tokenizers`` JSON, so byte-level BPE, added and special tokens all map exactly).
``compiler.json_schema(schema)`` checks a schema and returns a ``Grammar``; a keyword or
format llguidance cannot enforce is an ``UnsupportedError`` that names it (never silently
dropped: llguidance's ``lenient`` mode stays off). Each request gets its own matcher:
before a token is drawn, ``mask_logits`` sets every token the grammar forbids to -inf;
after, ``consume`` advances the parser. The engine masks a whole step at once with
``BatchMasks``, computing the masks while the forward runs.

JSON is generated compact (``,`` and ``:`` without spaces): whitespace is the one place a
weak model can loop forever inside a valid document. The last 64 checked schemas
are kept (a schema is compiled once, not per request). Deliberately left out: regex-only
constraints.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np
import torch

from lmstack.errors import UnsupportedError

_JSON_OPTIONS = {"whitespace_flexible": False, "lenient": False}


class Grammar:
    """A checked llguidance grammar for one tokenizer; ``matcher()`` starts a fresh parse."""

    def __init__(self, lltok: Any, grammar: str, description: str):
        self.lltok, self.grammar, self.description = lltok, grammar, description

    def matcher(self) -> "GrammarMatcher":
        return GrammarMatcher(self)


class GrammarMatcher:
    def __init__(self, grammar: Grammar):
        import llguidance

        self._m = llguidance.LLMatcher(grammar.lltok, grammar.grammar, log_level=0)
        self.n_vocab = grammar.lltok.vocab_size
        self.eos = list(grammar.lltok.eos_tokens)
        if self._m.is_error():
            raise UnsupportedError(f"grammar: {self._m.get_error()}")

    def allowed(self) -> torch.Tensor:
        """Bool mask ``(n_vocab,)`` of the tokens the grammar allows next."""
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.n_vocab].astype(bool)
        return torch.from_numpy(allowed)

    def mask_logits(self, row: torch.Tensor) -> torch.Tensor:
        """Logits ``(1, V)`` with every forbidden token at -inf (ids past the tokenizer too)."""
        allowed = self.allowed()
        if self._m.is_error() or not bool(allowed.any()):
            allowed = torch.zeros(self.n_vocab, dtype=torch.bool)
            allowed[self.eos] = True  # the parse cannot continue: end the sequence
        full = torch.zeros(row.shape[-1], dtype=torch.bool)
        n = min(self.n_vocab, row.shape[-1])
        full[:n] = allowed[:n].to(row.device)
        return row.masked_fill(~full.to(row.device), float("-inf"))

    def consume(self, token_id: int) -> bool:
        return self._m.consume_token(int(token_id))

    def is_stopped(self) -> bool:
        return self._m.is_stopped()

    def is_accepting(self) -> bool:
        return self._m.is_accepting()


class BatchMasks:
    """The grammar masks of one step's rows, computed while the model's forward runs.

    ``start(matchers)`` hands the rows to llguidance's executor (its own threads, without
    the GIL) from one helper thread and returns at once; ``apply(logits)`` waits for the
    bitmask and masks all rows in one tensor op. A row whose parse cannot continue allows
    only its end-of-sequence tokens.
    """

    _SHIFTS = torch.arange(32, dtype=torch.int32)

    def __init__(self):
        import concurrent.futures

        import llguidance

        self._executor = llguidance.LLExecutor()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lmstack-grammar")

    def start(self, matchers: list[GrammarMatcher]):
        n_words = (max(m.n_vocab for m in matchers) + 31) // 32
        bitmask = torch.zeros(len(matchers), n_words, dtype=torch.int32)  # (n, ceil(V/32)), bit j of word w: token 32w+j
        rows = [(m._m, i) for i, m in enumerate(matchers)]

        def work() -> torch.Tensor:
            self._executor.unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), n_words * 4, len(rows))
            return bitmask

        return _Pending(self._pool.submit(work), matchers)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class _Pending:
    def __init__(self, future, matchers: list[GrammarMatcher]):
        self.future, self.matchers = future, matchers

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (n, V) with every token the rows' grammars forbid at -inf."""
        bitmask = self.future.result()
        n, V = logits.shape
        allowed = ((bitmask[:, :, None] >> BatchMasks._SHIFTS) & 1).bool().reshape(n, -1)  # (n, 32 * n_words)
        if allowed.shape[1] < V:
            allowed = torch.cat([allowed, allowed.new_zeros(n, V - allowed.shape[1])], 1)
        allowed = allowed[:, :V]
        for i in torch.nonzero(~allowed.any(1)).flatten().tolist():  # the parse cannot continue: end it
            allowed[i, self.matchers[i].eos] = True
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


class GrammarCompiler:
    """Turns JSON schemas and Lark grammars into ``Grammar`` s for one tokenizer."""

    def __init__(self, tokenizer):
        try:
            import llguidance
        except ImportError:
            raise UnsupportedError("constrained decoding needs llguidance: pip install 'llguidance>=1.0'") from None
        self._llg = llguidance
        self.tokenizer = tokenizer
        self.lltok = llguidance.LLTokenizer(tokenizer.hf.to_str(), n_vocab=tokenizer.vocab_size,
                                            eos_token=sorted(tokenizer.stop_token_ids))
        self._schemas: dict[str, Grammar] = {}  # the last 64 checked schemas

    def _check(self, grammar: str, field: str, description: str) -> Grammar:
        is_error, messages = self._llg.LLMatcher.validate_grammar_with_warnings(grammar, self.lltok)
        if is_error:
            raise UnsupportedError(f"{field}: cannot be enforced by constrained decoding: {messages[0]}")
        return Grammar(self.lltok, grammar, description)

    def json_schema(self, schema: Any, field: str = "json_schema") -> Grammar:
        """A grammar for JSON documents that validate against ``schema`` (a dict or bool)."""
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            raise UnsupportedError(f"{field}: got {type(schema).__name__}, expected a JSON schema object")
        key = json.dumps(schema, sort_keys=True)
        if key in self._schemas:  # checked already: clients tend to send the same schema again and again
            return self._schemas[key]
        try:
            grammar = self._llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise UnsupportedError(f"{field}: not a valid JSON schema ({e})") from None
        checked = self._check(grammar, field, "json_schema")
        if len(self._schemas) >= 64:
            self._schemas.pop(next(iter(self._schemas)))
        self._schemas[key] = checked
        return checked

    def json_object(self) -> Grammar:
        return self.json_schema({"type": "object"}, "response_format")

    def lark(self, text: str, field: str = "grammar") -> Grammar:
        return self._check(self._llg.LLMatcher.grammar_from_lark(text), field, "lark")

    def tool_calls(self, tools: list[dict], required: bool, field: str = "tools",
                   open_tag: str = "<tool_call>", close_tag: str = "</tool_call>") -> Optional[Grammar]:
        """Output that is a tool call (``open_tag`` {"name", "arguments"} ``close_tag``), or,
        unless ``required``, plain text that does not start with ``open_tag``'s first char."""
        variants = []
        for i, t in enumerate(tools):
            fn = t["function"]
            params = fn.get("parameters") or {"type": "object"}
            variants.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                             "required": ["name", "arguments"], "additionalProperties": False})
            self.json_schema(params, f"{field}[{i}].function.parameters")  # names the bad tool
        call = variants[0] if len(variants) == 1 else {"anyOf": variants}
        schema_json = json.dumps(call, separators=(",", ":"))
        opts = json.dumps({"whitespace_flexible": False})
        call_rule = f'{json.dumps(open_tag)} call {json.dumps(close_tag)}'
        call_def = f'call: %json{{"x-guidance": {opts}, "anyOf": [{schema_json}]}}'
        if required:
            lark = f"start: {call_rule}\n{call_def}\n"
        else:
            first = open_tag[0]
            lark = (f"start: TEXT | {call_rule}\n{call_def}\n"
                    f"TEXT: /[^{_escape_class(first)}][\\s\\S]*/\n")
        return self._check(self._llg.LLMatcher.grammar_from_lark(lark), field, "tools")


def _escape_class(ch: str) -> str:
    return "\\" + ch if ch in "\\]^-[" else ch
