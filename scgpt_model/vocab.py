"""Gene vocabulary: ordered tokens, special tokens first, saved as ``vocab.json``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from scgpt_model.schema import PAD_ID, SPECIAL_TOKENS

GeneKey = Literal["feature_id", "feature_name"]  # Ensembl id (default) or gene symbol


class VocabError(ValueError):
    """A vocabulary file or gene list that cannot be used; the message names the fix."""


class GeneVocab:
    """An ordered token list. Ids are positions; special tokens take ids 0..N_SPECIAL-1.

    ``key`` says what gene tokens are: Ensembl ids (``feature_id``, stable across Census
    releases) or symbols (``feature_name``, what the official scGPT checkpoints use).
    """

    def __init__(self, tokens: Sequence[str], key: GeneKey = "feature_id") -> None:
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise VocabError(
                f"a vocabulary must start with the special tokens {list(SPECIAL_TOKENS)}; "
                f"got {tokens[: len(SPECIAL_TOKENS)]}. Build it with GeneVocab.from_genes()."
            )
        if len(set(tokens)) != len(tokens):
            dup = sorted({t for t in tokens if tokens.count(t) > 1})[:5]
            raise VocabError(f"duplicate tokens in vocabulary: {dup}; gene keys must be unique")
        if key not in ("feature_id", "feature_name"):
            raise VocabError(f"vocabulary key must be 'feature_id' or 'feature_name', got {key!r}")
        self.tokens: list[str] = tokens
        self.key: GeneKey = key
        self._index = {t: i for i, t in enumerate(tokens)}

    # construction -------------------------------------------------------------------------
    @classmethod
    def from_genes(cls, genes: Iterable[str], key: GeneKey = "feature_id") -> GeneVocab:
        """Special tokens, then the genes in the order given (duplicates dropped)."""
        seen: dict[str, None] = {}
        for g in genes:
            g = str(g)
            if g in SPECIAL_TOKENS:
                raise VocabError(f"gene name {g!r} collides with a special token")
            seen.setdefault(g, None)
        return cls([*SPECIAL_TOKENS, *seen], key=key)

    # lookup -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._index

    def __getitem__(self, token: str) -> int:
        return self._index[token]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocab) and self.tokens == other.tokens and self.key == other.key

    def __repr__(self) -> str:
        return f"GeneVocab({len(self)} tokens, key={self.key!r}, hash={self.hash()[:12]})"

    @property
    def genes(self) -> list[str]:
        return self.tokens[len(SPECIAL_TOKENS):]

    def encode(self, genes: Sequence[str], missing: int = -1) -> np.ndarray:
        """Map gene keys to ids (int32); genes not in the vocabulary get ``missing``."""
        get = self._index.get
        return np.fromiter((get(str(g), missing) for g in genes), dtype=np.int32, count=len(genes))

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[int(i)] for i in ids]

    @property
    def pad_id(self) -> int:
        return PAD_ID

    # identity -----------------------------------------------------------------------------
    def hash(self) -> str:
        """sha256 over the key kind and the ordered tokens: equal hashes mean equal ids."""
        h = hashlib.sha256()
        h.update(self.key.encode())
        for t in self.tokens:
            h.update(b"\x00")
            h.update(t.encode())
        return h.hexdigest()

    # persistence --------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": "scgpt-census-vocab/1", "key": self.key, "tokens": self.tokens}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / "vocab.json"
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> GeneVocab:
        """Load our ``vocab.json`` or the official scGPT one (a ``{token: id}`` mapping)."""
        path = Path(path)
        if path.is_dir():
            path = path / "vocab.json"
        if not path.exists():
            raise VocabError(f"vocabulary file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VocabError(f"vocabulary file {path} is not valid JSON ({e}); "
                             "pass a vocab.json written by `ingest census` or an official scGPT vocab.json") from e
        if isinstance(data, dict) and "tokens" in data:
            return cls(data["tokens"], key=data.get("key", "feature_id"))
        if isinstance(data, dict) and data and all(isinstance(v, int) for v in data.values()):
            return cls.from_token_to_id(data)
        raise VocabError(f"vocabulary file {path} has an unknown layout; expected "
                         "{'tokens': [...]} or an official scGPT {token: id} mapping")

    @classmethod
    def from_token_to_id(cls, mapping: dict[str, int], key: GeneKey = "feature_name") -> GeneVocab:
        """Convert the official layout ({token: id}, keys not in id order, symbols).

        Official ids are not kept: our special tokens must come first, so genes are re-ordered
        by their official id after the specials. ``scgpt_model.checkpoint`` re-orders the
        embedding rows to match when it imports an official checkpoint.
        """
        ordered = sorted(mapping, key=mapping.__getitem__)
        genes = [t for t in ordered if t not in SPECIAL_TOKENS and not (t.startswith("<") and t.endswith(">"))]
        return cls.from_genes(genes, key=key)
