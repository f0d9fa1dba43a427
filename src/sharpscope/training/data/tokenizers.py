"""Tokenizers: bytes, and byte-level BPE trained on a run's own text.

:func:`make_tokenizer` gives ``"bytes"`` (:class:`ByteTokenizer`: a token per UTF-8
byte, vocabulary 256) or ``"bpe"`` (:class:`BPETokenizer`: byte-level BPE from the
``tokenizers`` library, trained on the training split of the run's own sources, saved
as a ``tokenizer.json`` and reloaded from it). Neither has special tokens: documents are
separated by text (a blank line) under both. Text sources are encoded with the
tokenizer given to :func:`~.sources.load_source`; ``.bin`` files keep their tokens.
``tokens_per_byte`` is the number of tokens over the number of UTF-8 bytes of the
source's text (1.0 for bytes), so that :func:`bits_per_byte` compares models across
tokenizers; ``val_tokens_per_byte`` is the same for the validation split alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np
import torch

from ...errors import UserError
from .specs import training_texts
from .text import check_fraction

__all__ = ["Tokenizer", "ByteTokenizer", "BPETokenizer", "TOKENIZER_KINDS", "TOKENIZER_FILE", "MAX_VOCAB_SIZE",
           "make_tokenizer", "bits_per_byte"]

BYTE_ALPHABET = 256
MAX_VOCAB_SIZE = 2 ** 16
"""Largest vocabulary whose token ids fit the uint16 arrays that hold tokens."""
TOKENIZER_FILE = "tokenizer.json"
"""File name of a saved BPE tokenizer (the ``tokenizers`` library's format)."""
_ENCODE_CHUNK_CHARS = 1 << 16
_CHUNK_BREAK = re.compile(r"(?<=\S\n)(?=\S)")


class Tokenizer(Protocol):
    """What :func:`load_source` needs from a tokenizer.

    A tokenizer may also offer ``encode_batch(texts) -> list[np.ndarray]``, which
    :func:`load_source` then uses to encode a corpus's documents in one call.
    """

    name: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _encodable(text: str) -> str:
    """``text`` with lone surrogates (which JSON escapes such as "\\ud800" can produce, and which
    UTF-8 cannot encode) replaced by U+FFFD, the same in every tokenizer."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text)


def _ids_array(ids) -> np.ndarray:
    """Token ids (list, array or tensor, any shape) as a flat int64 array."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids, dtype=np.int64).reshape(-1)


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no training, nothing unknown, lossless."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return self.encode_bytes(_encodable(text).encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        ids_N = _ids_array(ids)
        if ids_N.size and (ids_N.min() < 0 or ids_N.max() > 255):
            raise ValueError(f"byte tokens lie in 0..255; got values from {ids_N.min()} to {ids_N.max()}")
        return ids_N.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError("the 'bpe' tokenizer needs the Hugging Face tokenizers package: "
                        "pip install tokenizers (or pip install 'sharpscope[hf]')") from None
    return tokenizers


def _check_bpe_vocab(vocab_size) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise UserError(f"vocab_size must be a whole number, got {vocab_size!r}")
    if not BYTE_ALPHABET <= vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(f"a BPE vocab_size must lie in {BYTE_ALPHABET}..{MAX_VOCAB_SIZE} (the 256 bytes, plus "
                        f"merges, as token ids that fit uint16), got {vocab_size}")
    return int(vocab_size)


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o644)  # mkstemp makes the file private; a tokenizer is not a secret
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _tokenizer_file(path) -> Path:
    """An existing file; a folder (existing, or a new path without ``.json``) means the tokenizer.json in it."""
    path = Path(path).expanduser()
    if path.is_file() or (not path.is_dir() and path.suffix.lower() == ".json"):
        return path
    return path / TOKENIZER_FILE


class BPETokenizer:
    """Byte-level BPE (as GPT-2's), trained on our own text with the ``tokenizers`` library.

    Text is cut into pieces by the GPT-2 pattern (words with their leading space, digits,
    punctuation, whitespace runs) over its UTF-8 bytes, and merges learnt by
    :meth:`train` join frequent byte pairs inside a piece. The 256 bytes are always in the
    vocabulary, so any text encodes (nothing is unknown) and ``decode(encode(t)) == t``
    exactly. There are no special tokens: documents are separated by text (a blank line),
    as for the byte tokenizer, so a corpus reads the same under both tokenizers.

    Training is deterministic: the same text and ``vocab_size`` give the same vocabulary,
    merges and ``tokenizer.json``, in any process (:attr:`fingerprint` tells them apart).
    """

    name = "bpe"

    def __init__(self, tokenizer):
        tk = _import_tokenizers()
        if not isinstance(tokenizer, tk.Tokenizer) or not isinstance(tokenizer.model, tk.models.BPE):
            raise TypeError(f"BPETokenizer wraps a tokenizers.Tokenizer with a BPE model, got {tokenizer!r}")
        self._tokenizer = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        # Long texts can be cut into chunks, encoded in parallel, with the very same tokens,
        # when pieces never cross the cut points; true of the GPT-2 pattern with nothing added.
        pre = tokenizer.pre_tokenizer
        self._chunkable = (tokenizer.normalizer is None and isinstance(pre, tk.pre_tokenizers.ByteLevel)
                           and not pre.add_prefix_space and pre.use_regex
                           and tokenizer.get_vocab_size(with_added_tokens=False) == self.vocab_size)

    # -- making one

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Learn ``vocab_size - 256`` merges from ``texts`` (an iterable of documents).

        Refuses (UserError) a text too small to yield ``vocab_size`` tokens, so that a
        trained tokenizer always has exactly the vocabulary asked for.
        """
        vocab_size = _check_bpe_vocab(vocab_size)
        tk = _import_tokenizers()
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        if isinstance(texts, str):
            texts = [texts]
        n_chars = 0

        def checked():
            nonlocal n_chars
            for text in texts:
                if not isinstance(text, str):
                    raise TypeError(f"BPETokenizer.train takes strings, got a {type(text).__name__}")
                n_chars += len(text)
                yield text

        tokenizer.train_from_iterator(checked(), trainer)
        if n_chars == 0:
            raise UserError("no text to train the BPE tokenizer on; give it some data")
        learnt = tokenizer.get_vocab_size(with_added_tokens=True)
        if learnt < vocab_size:
            raise UserError(f"the training text ({n_chars} characters) yields only {learnt} BPE tokens of the "
                            f"{vocab_size} asked for; use more text or a smaller vocab_size")
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path) -> "BPETokenizer":
        """Load a ``tokenizer.json`` (or the one inside a folder) written by :meth:`save`."""
        tk = _import_tokenizers()
        file = _tokenizer_file(path)
        if not file.is_file():
            raise UserError(f"no tokenizer file at {file}; train one (make_tokenizer) or check the path")
        try:
            tokenizer = tk.Tokenizer.from_file(str(file))
        except Exception as err:  # the Rust side raises plain Exceptions
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{file} is not a readable tokenizer.json ({first})") from err
        if not isinstance(tokenizer.model, tk.models.BPE):
            raise UserError(f"{file} holds a {type(tokenizer.model).__name__} tokenizer, not BPE")
        return cls(tokenizer)

    def save(self, path) -> Path:
        """Write the tokenizer (atomically) to ``path``: a ``.json`` file, or a folder to hold
        ``tokenizer.json`` (created when missing). Returns the file written."""
        file = _tokenizer_file(path)
        _write_atomically(file, self._tokenizer.to_str(pretty=True))
        return file

    # -- using one

    def _check_fits(self) -> None:
        if self.vocab_size > MAX_VOCAB_SIZE:
            raise UserError(f"this BPE tokenizer has {self.vocab_size} tokens, but sharpscope stores token ids "
                            f"as uint16 (at most {MAX_VOCAB_SIZE} tokens); use a tokenizer with a smaller vocabulary")

    def _chunks(self, text: str) -> list[str]:
        """``text`` cut after newlines that follow a non-space and precede one; the GPT-2
        pattern ends a piece there whatever comes next, so the tokens do not change."""
        if not self._chunkable or len(text) <= 2 * _ENCODE_CHUNK_CHARS:
            return [text]
        chunks, start = [], 0
        while len(text) - start > 2 * _ENCODE_CHUNK_CHARS:
            found = _CHUNK_BREAK.search(text, start + _ENCODE_CHUNK_CHARS)
            if found is None:
                break
            chunks.append(text[start:found.start()])
            start = found.start()
        chunks.append(text[start:])
        return chunks

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode many documents at once (in parallel); one uint16 array per document."""
        self._check_fits()
        chunked = [self._chunks(_encodable(t)) for t in texts]
        flat = [c for chunks in chunked for c in chunks]
        encodings = iter(self._tokenizer.encode_batch_fast(flat, add_special_tokens=False))
        out = []
        for chunks in chunked:
            ids = [next(encodings).ids for _ in chunks]
            out.append(np.asarray(ids[0] if len(ids) == 1 else [i for part in ids for i in part], dtype=np.uint16))
        return out

    def decode(self, ids) -> str:
        ids_N = _ids_array(ids)
        if ids_N.size and (ids_N.min() < 0 or ids_N.max() >= self.vocab_size):
            raise ValueError(f"token ids lie in 0..{self.vocab_size - 1}; got values from {ids_N.min()} "
                             f"to {ids_N.max()}")
        return self._tokenizer.decode(ids_N.tolist(), skip_special_tokens=False)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the serialized tokenizer: equal exactly when vocabulary and merges are."""
        return hashlib.sha256(self._tokenizer.to_str().encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


TOKENIZER_KINDS = ("bytes", "bpe")


def make_tokenizer(kind: str, *, vocab_size: int = 1024, train_specs: Sequence[str] = (),
                   max_bytes: int | None = None, path: Path | None = None, val_fraction: float = 0.05,
                   seed: int = 0) -> Tokenizer:
    """The tokenizer named ``kind``: ``"bytes"`` or ``"bpe"``.

    For ``"bpe"``: ``path`` is a ``.json`` file or a folder (such as a run's folder) for
    ``tokenizer.json``. When that file exists, it is loaded, and must have exactly
    ``vocab_size`` tokens. Otherwise a tokenizer is trained
    on the *training split* of the sources ``train_specs`` (the same specs, ``max_bytes``,
    ``val_fraction`` and ``seed`` as given to :func:`load_sources`, so it never sees
    validation text) and, when ``path`` is given, saved there atomically. ``vocab_size`` is
    ignored for ``"bytes"`` (always 256).
    """
    if kind == "bytes":
        return ByteTokenizer()
    if kind != "bpe":
        raise UserError(f"unknown tokenizer {kind!r}; choose one of {', '.join(TOKENIZER_KINDS)}")
    vocab_size = _check_bpe_vocab(vocab_size)
    file = _tokenizer_file(path) if path is not None else None
    if file is not None and file.exists():
        tokenizer = BPETokenizer.from_file(file)
        if tokenizer.vocab_size != vocab_size:
            raise UserError(f"the tokenizer at {file} has {tokenizer.vocab_size} tokens, not the {vocab_size} "
                            f"asked for; set vocab_size={tokenizer.vocab_size}, or delete the file to train anew")
        return tokenizer
    if isinstance(train_specs, str):
        train_specs = [train_specs]
    if not train_specs:
        raise UserError("a 'bpe' tokenizer needs text to train on; give the data sources (train_specs)")
    val_fraction = check_fraction(val_fraction)
    texts: list[str] = []
    for spec in train_specs:
        texts.extend(training_texts(spec, max_bytes=max_bytes, val_fraction=val_fraction, seed=seed))
    tokenizer = BPETokenizer.train(texts, vocab_size)
    if file is not None:
        tokenizer.save(file)
    return tokenizer


def bits_per_byte(loss_nats_per_token: float, tokens_per_byte: float = 1.0) -> float:
    """Cross-entropy in bits per byte of text: nats/token x tokens/byte / ln 2.

    Comparable across tokenizers, unlike loss per token; for the byte tokenizer
    (one token per byte) it is the loss divided by ln 2.
    """
    if not tokens_per_byte > 0:
        raise ValueError(f"tokens_per_byte must be positive, got {tokens_per_byte}")
    return float(loss_nats_per_token) * float(tokens_per_byte) / math.log(2)
