"""Level 4: raw documents -> clean, deduplicated, decontaminated, tokenized shards.

``prepare(PrepareConfig)`` runs the whole pipeline (``lmstack data prepare``); ``TokenShards``
reads its output for training. The steps are usable on their own: ``read_source``,
``clean_text``, ``apply_filters``, ``MinHasher``/``LSHIndex``, ``EvalNgrams``.
"""

from lmstack.data.clean import CleanConfig, clean_text
from lmstack.data.decontam import DecontamConfig, EvalNgrams, load_eval_ngrams
from lmstack.data.dedup import DedupConfig, ExactIndex, LSHIndex, MinHasher
from lmstack.data.document import Document
from lmstack.data.filters import QualityConfig, apply_filters
from lmstack.data.pipeline import PrepareConfig, prepare
from lmstack.data.readers import ReadStats, SourceConfig, read_source
from lmstack.data.shards import TokenShards, read_meta

__all__ = ["CleanConfig", "DecontamConfig", "DedupConfig", "Document", "EvalNgrams", "ExactIndex",
           "LSHIndex", "MinHasher", "PrepareConfig", "QualityConfig", "ReadStats", "SourceConfig",
           "TokenShards", "apply_filters", "clean_text", "load_eval_ngrams", "prepare", "read_meta",
           "read_source"]
