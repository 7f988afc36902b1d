"""Inference: sampling, the generation loop, and the ``LLM`` entry point."""

from lmstack.infer.generate import TokenEvent, beam_search, generate_ids, stream_generate
from lmstack.infer.llm import LLM
from lmstack.infer.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "TokenEvent", "beam_search", "generate_ids", "stream_generate"]
