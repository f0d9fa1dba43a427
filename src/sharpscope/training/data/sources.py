"""Token sources: a spec's text, split and tokenized, or a ``.bin`` file's tokens.

Everything the trainer reads is a *source*: a :class:`TokenSource` holding a name, a
``train`` and a ``val`` array of uint16 tokens. :func:`load_source` turns a spec (see
:mod:`.specs`) into one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ...errors import UserError
from .specs import resolve_spec
from .text import Text, check_fraction, cut_point, split_text
from .tokenizers import ByteTokenizer

__all__ = ["TokenSource", "load_source", "load_sources", "check_vocab"]


@dataclass(frozen=True, repr=False, eq=False)
class TokenSource:
    """One named body of data, already tokenized and split."""

    name: str
    """Key in mixtures and in metric names (``eval/<name>``)."""
    train: np.ndarray
    """Training tokens, uint16 (a read-only array or a memory map)."""
    val: np.ndarray
    """Validation tokens, uint16; disjoint from ``train``."""
    origin: str = ""
    """Where the data came from (a path, or how it was generated), for messages."""
    tokenizer: str = "bytes"
    """Name of the tokenizer that made the tokens ("pretokenized" for ``.bin`` files)."""
    tokens_per_byte: float | None = 1.0
    """Tokens per UTF-8 byte of the source's text (both splits), for bits per byte; None when
    unknown (``.bin`` files). 1.0 for the byte tokenizer."""
    val_tokens_per_byte: float | None = None
    """The same for the validation split alone (None when it is empty or for ``.bin`` files):
    the exact factor for validation losses. A tokenizer trained on the training split
    compresses validation text slightly less (about 3% more tokens per byte for BPE)."""

    def max_token(self) -> int:
        """Largest token id in either split (-1 when both are empty)."""
        ends = [int(a.max()) for a in (self.train, self.val) if len(a)]
        return max(ends, default=-1)

    def __repr__(self) -> str:
        return (f"TokenSource(name={self.name!r}, train={len(self.train)} tokens, "
                f"val={len(self.val)} tokens, origin={self.origin!r})")


def _read_only(a: np.ndarray) -> np.ndarray:
    # Corpora are cached and shared between callers; a stray in-place edit must fail loudly.
    if isinstance(a, np.memmap):
        return a
    a = a.view()
    a.flags.writeable = False
    return a


def _encode_documents(documents: Sequence[bytes], tokenizer) -> tuple[np.ndarray, int]:
    """The documents' tokens, concatenated, and the number of UTF-8 bytes they encode."""
    if isinstance(tokenizer, ByteTokenizer):
        joined = b"".join(documents)
        return tokenizer.encode_bytes(joined), len(joined)
    texts = [d.decode("utf-8", errors="replace") for d in documents]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    encode_batch = getattr(tokenizer, "encode_batch", None)
    pieces = encode_batch(texts) if callable(encode_batch) else [tokenizer.encode(t) for t in texts]
    pieces = [np.asarray(p) for p in pieces]
    for piece in pieces:
        if piece.size and (piece.min() < 0 or piece.max() >= 2 ** 16):
            raise UserError(f"tokenizer {getattr(tokenizer, 'name', tokenizer)!r} produced ids outside "
                            f"0..65535; sharpscope stores tokens as uint16")
    tokens = np.concatenate(pieces).astype(np.uint16) if pieces else np.zeros(0, np.uint16)
    return tokens, n_bytes


def _text_source(text: Text, *, tokenizer, val_fraction: float) -> TokenSource:
    """Split ``text`` and encode both splits with ``tokenizer``."""
    tokenizer = tokenizer or ByteTokenizer()
    train_docs, val_docs = split_text(text, val_fraction, char_boundary=not isinstance(tokenizer, ByteTokenizer))
    train, train_bytes = _encode_documents(train_docs, tokenizer)
    val, val_bytes = _encode_documents(val_docs, tokenizer)
    if len(train) + len(val) == 0:
        raise UserError(f"data source '{text.origin}' is empty; give it some text")
    return TokenSource(name=text.name, train=_read_only(train), val=_read_only(val), origin=text.origin,
                       tokenizer=getattr(tokenizer, "name", type(tokenizer).__name__),
                       tokens_per_byte=(len(train) + len(val)) / (train_bytes + val_bytes),
                       val_tokens_per_byte=len(val) / val_bytes if val_bytes else None)


def _read_bin(path: Path) -> np.memmap:
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"token file {path} is empty; write uint16 tokens into it")
    if size % 2:
        raise UserError(f"token file {path} has an odd size ({size} bytes), so it does not hold uint16 "
                        f"tokens; write it with numpy as np.uint16")
    return np.memmap(path, dtype=np.uint16, mode="r")


def _load_bin(name: str, path: Path, val_fraction: float) -> TokenSource:
    tokens = _read_bin(path)
    sibling = path.with_name("val.bin")
    if path.name == "train.bin" and sibling.is_file():
        train, val, origin = tokens, _read_bin(sibling), f"{path} + {sibling}"
    else:
        cut = cut_point(len(tokens), np.zeros(0, np.int64), val_fraction)
        train, val = tokens[:cut], tokens[cut:]
        origin = str(path)
    return TokenSource(name=name, train=train, val=val, origin=origin, tokenizer="pretokenized",
                       tokens_per_byte=None)


def load_source(spec: str, *, tokenizer=None, val_fraction: float = 0.05, max_bytes: int | None = None,
                seed: int = 0, block_size: int | None = None) -> TokenSource:
    """Load one data source (see :mod:`.specs` for the specs).

    Text is encoded with ``tokenizer`` (default: :class:`ByteTokenizer`); ``.bin`` files
    keep their tokens whatever the tokenizer. ``max_bytes`` caps text (built-in text
    corpora default to 4 MB; user text is uncapped); it does not apply to ``.bin`` files or
    ``arithmetic``, which is sized by its problem count. ``seed`` drives the generated
    ``arithmetic`` corpus; text is seed-free. ``block_size``, when given, requires at least
    ``block_size + 1`` tokens in the training split (and in the validation split, unless
    ``val_fraction`` is 0), so a too-short source fails here, naming itself, instead of in
    the sampler.
    """
    val_fraction = check_fraction(val_fraction)
    resolved = resolve_spec(spec, val_fraction=val_fraction, max_bytes=max_bytes, seed=seed)
    if isinstance(resolved, Text):
        source = _text_source(resolved, tokenizer=tokenizer, val_fraction=val_fraction)
    else:
        source = _load_bin(*resolved, val_fraction)
    if block_size is not None:
        splits = [("training", source.train)]
        if val_fraction > 0 or source.tokenizer == "pretokenized":
            splits.append(("validation", source.val))
        for label, tokens in splits:
            if len(tokens) < block_size + 1:
                raise UserError(f"data source '{source.origin}' has {len(tokens)} {label} tokens, fewer than "
                                f"block_size + 1 = {block_size + 1}; use more data or a smaller block_size")
    return source


def load_sources(specs: Sequence[str] | str, **kwargs) -> dict[str, TokenSource]:
    """Load several sources into a dict by name; two sources with one name are refused."""
    if isinstance(specs, str):
        specs = [specs]
    sources: dict[str, TokenSource] = {}
    for spec in specs:
        source = load_source(spec, **kwargs)
        if source.name in sources:
            raise UserError(f"two data sources are named '{source.name}'; rename one with name:path")
        sources[source.name] = source
    if not sources:
        raise UserError("no data sources given; name at least one (e.g. 'prose')")
    return sources


def check_vocab(sources: Mapping[str, TokenSource], vocab_size: int) -> None:
    """Refuse sources whose token ids do not fit a model's vocabulary."""
    for name, source in sources.items():
        top = source.max_token()
        if top >= vocab_size:
            raise UserError(f"data source '{name}' ({source.origin}) has token id {top}, but the model's "
                            f"vocabulary holds {vocab_size}; set the model's vocab_size to at least {top + 1}")
