"""Small datasets shipped with lmstack for the fine-tuning quickstart (see docs/train.md)."""
