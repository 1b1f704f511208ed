"""Data: prompt files and loader, precomputed text-embedding store, rollout archive."""
from kvpo_megatron.data.embedding_store import EmbeddingStore
from kvpo_megatron.data.prompts import (
    DataError,
    PromptDataset,
    PromptLoader,
    PromptRecord,
    PromptSample,
    read_prompt_file,
    unique_prompts,
)
from kvpo_megatron.data.rollout_archive import ArchiveReader, RolloutArchive, read_archive

__all__ = [
    "ArchiveReader", "DataError", "EmbeddingStore", "PromptDataset", "PromptLoader", "PromptRecord", "PromptSample",
    "RolloutArchive", "read_archive", "read_prompt_file", "unique_prompts",
]
