"""Serving layouts of a trained draft and conversions between them (see eagle3.py, store.py)."""

from draft_trainer.formats.store import convert_dir, read_draft, to_sglang, to_speculators

__all__ = ["convert_dir", "read_draft", "to_sglang", "to_speculators"]
