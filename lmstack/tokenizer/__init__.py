"""Tokenizers for every model lmstack loads: tokenizer.json, model folders and GGUF files.

``Tokenizer.load(path)`` is the entry point; ``tok.decoder()`` streams text deltas during
generation; ``tok.apply_chat_template(messages)`` renders a conversation.
"""

from lmstack.tokenizer.chat import DEFAULT_CHATML_TEMPLATE
from lmstack.tokenizer.stream import IncrementalDecoder
from lmstack.tokenizer.tokenizer import Tokenizer

__all__ = ["DEFAULT_CHATML_TEMPLATE", "IncrementalDecoder", "Tokenizer"]
