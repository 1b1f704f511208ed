"""Encode every distinct prompt of a prompt file once into a chunked zarr embedding store (tensorstore).

    python tools/precompute_text_embeddings.py PROMPTS --out STORE --path models_t5_umt5-xxl-enc-bf16.pth \
        [--tokenizer spiece.model] [--device cuda] [--batch-size 16] [--dtype bfloat16]

Re-running with the same PROMPTS and --out resumes where it stopped (prompts already written are skipped).
Training then uses ``text_encoder: {kind: store, store: STORE, prompts: PROMPTS}``, so the ~11 GB encoder never
sits next to the DiT; a store that does not match the prompt file is refused (hash mismatch).
``--encoder hash`` writes the weight-free hash embeddings (tests, tiny runs).
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from kvpo_megatron.cli import exit_code
from kvpo_megatron.conditioning.text_encoder import HashTextEncoder
from kvpo_megatron.data.embedding_store import EmbeddingStore
from kvpo_megatron.data.prompts import read_prompt_file, unique_prompts
from kvpo_megatron.dtypes import DTYPES, torch_dtype
from kvpo_megatron.errors import ConfigError

logger = logging.getLogger("precompute_text_embeddings")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", help="prompt file (.txt one per line, or .jsonl multi-prompt)")
    p.add_argument("--out", required=True, help="store directory (created, or resumed if it exists)")
    p.add_argument("--encoder", choices=["umt5", "hash"], default="umt5")
    p.add_argument("--path", help="umT5 weights: Wan's .pth or a Hugging Face folder")
    p.add_argument("--tokenizer", help="spiece.model (default: next to --path)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--text-dim", type=int, default=None, help="hash encoder width (umt5: read from the weights)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                   help="encoder weight dtype and store dtype")
    p.add_argument("--seed", type=int, default=0, help="hash encoder seed")
    p.add_argument("--overwrite", action="store_true", help="delete an existing store at --out first")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def build_encoder(args: argparse.Namespace):
    if args.encoder == "hash":
        return HashTextEncoder(text_len=args.text_len, text_dim=args.text_dim or 4096, seed=args.seed), \
            f"hash(seed={args.seed})"
    from kvpo_megatron.conditioning.umt5 import UMT5TextEncoder

    if not args.path:
        raise ConfigError("--path is required for --encoder umt5 (Wan's umT5 .pth or a Hugging Face folder)")
    enc = UMT5TextEncoder.from_pretrained(args.path, tokenizer=args.tokenizer, text_len=args.text_len,
                                          device=args.device, dtype=torch_dtype(args.dtype), batch_size=args.batch_size)
    return enc, f"umt5({args.path})"


def _runs(indices: list[int], size: int) -> list[tuple[int, int]]:
    """Split sorted indices into contiguous runs of at most ``size``."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i and out[-1][1] - out[-1][0] < size:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def run(args: argparse.Namespace) -> EmbeddingStore:
    prompts = unique_prompts(read_prompt_file(args.prompts))
    encoder, desc = build_encoder(args)
    store = EmbeddingStore.create_or_resume(args.out, prompts, text_len=encoder.text_len, text_dim=encoder.text_dim,
                                            dtype=args.dtype, encoder=desc, overwrite=args.overwrite)
    todo = store.missing()
    logger.info("%d prompts, %d already in %s, %d to encode", len(prompts), len(prompts) - len(todo), args.out,
                len(todo))
    from tqdm import tqdm

    with tqdm(total=len(todo), disable=args.no_progress, desc="encoding", unit="prompt") as bar:
        for start, end in _runs(todo, args.batch_size):
            emb, lengths = encoder.encode(prompts[start:end])
            store.write(start, emb, lengths)
            bar.update(end - start)
    return store


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return exit_code(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
