"""CLIP tokenisation through transformers' `CLIPTokenizer`, read from a local folder.

A converted CLIP folder holds the tokenizer files (those of its transformers source,
or OpenAI's BPE vocabulary shipped in `mmovseg_jax/assets/clip_bpe`). Nothing is
fetched from a hub.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

BUNDLED_BPE = Path(__file__).resolve().parent.parent / "assets" / "clip_bpe"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_files(folder: str | os.PathLike) -> list[Path]:
    """The tokenizer files present in `folder`."""
    return [Path(folder) / n for n in TOKENIZER_FILES if (Path(folder) / n).is_file()]


class Tokenizer:
    """Turns strings into (N, context_length) int32 token ids: start token, BPE ids, end
    token, padded with the end token (the text tower pools at the first end token)."""

    def __init__(self, folder: str | os.PathLike = BUNDLED_BPE, context_length: int = 77):
        from transformers import CLIPTokenizer

        folder = Path(folder)
        if not tokenizer_files(folder):
            raise FileNotFoundError(f"{folder}: no CLIP tokenizer files ({', '.join(TOKENIZER_FILES[:2])})")
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        self.context_length = context_length

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        encoded = self.tokenizer(list(texts), padding="max_length", max_length=self.context_length,
                                 truncation=True, return_tensors="np")
        return encoded["input_ids"].astype(np.int32)


def load(folder: str | os.PathLike, context_length: int = 77) -> Tokenizer:
    """The tokenizer stored in a converted CLIP folder (or any CLIPTokenizer folder)."""
    return Tokenizer(folder, context_length)
