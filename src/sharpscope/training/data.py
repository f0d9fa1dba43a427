"""Training data: tokenizers, offline corpora, user data, and a resumable batch sampler.

Everything here is a *source*: a :class:`TokenSource` holding a name, a ``train`` and a
``val`` array of uint16 tokens. :func:`load_source` turns a spec into one:

===============  ==========================================================================
spec             what it loads
===============  ==========================================================================
``code``         Python source of the installed standard library (capped, 4 MB by default)
``prose``        English from the installed Python documentation (capped, 4 MB by default)
``arithmetic``   generated problems such as ``37+58=95`` with exact answers
a text file      its bytes (any extension other than ``.bin``)
a folder         every ``*.txt``, ``*.md`` and ``*.py`` file under it, sorted, recursively
``*.bin``        pre-tokenized uint16 tokens (the nanoGPT format); ``train.bin`` uses a
                 sibling ``val.bin`` as its validation split when there is one
``hf:DATASET``    a Hugging Face ``datasets`` dataset: a local data file or folder, or a
                 dataset already in the local cache (see below), e.g. ``hf:data/c.jsonl``
``name:spec``    any of the above under a name of your choosing, e.g. ``notes:~/notes``
===============  ==========================================================================

A built-in name wins over a file of the same name in the working directory (write
``./code`` for the file). A source's name defaults to the file's stem, the folder's name,
or for ``train.bin`` its folder's name (nanoGPT keeps ``data/<dataset>/train.bin``).

Why built-in corpora come from the Python installation
    The studies need several *distinct* kinds of data (the Nexus optimizer and per-source
    sharpness compare sources such as prose, code and math) on machines with no network.
    Every machine that runs sharpscope has a Python standard library: its source is real
    code, its docstrings and the ``pydoc`` topic pages are real English prose, and neither
    needs a download or a licence check beyond Python's own.

``code``
    Top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]`` and the ``*.py`` files
    of its packages one level down, skipping ``test``, ``tests``, ``idlelib``,
    ``turtledemo``, ``site-packages`` and ``pydoc_data`` (the last is generated
    documentation, which belongs to ``prose``). Each file is one document, headed by a line
    ``# ---- relative/path.py ----``. The library holds about 10 MB of such code; the cap
    (4 MB) keeps loading to a fraction of a second and the corpus in memory small. Under a
    cap, an alphabetical prefix would be mostly ``asyncio`` to ``encodings``, so the
    documents are ordered by a CRC-32 of their relative path instead: a fixed, seed-free
    shuffle in which a file's place depends only on its own path. The selection is thus
    spread over the whole library, and the same on every run of the same Python.

``prose``
    Docstrings of modules, classes and functions, read by *parsing* the same files with
    :mod:`ast` (never importing them: importing runs code and can fail or print), plus the
    values of ``pydoc_data.topics.topics`` (the language reference pages) when importable.
    A file's docstrings form one document, each topic page another, ordered by CRC-32 of
    their key as for ``code``. Docstrings shorter than 40 characters ("Return self.")
    carry little language and are dropped; repeated docstrings are kept once. About 2 MB,
    so the 4 MB cap rarely binds; parsing the whole library takes a second or two, so
    corpora are cached in the process (:func:`clear_cache` empties the cache).

``arithmetic``
    Lines ``a+b=c``, ``a-b=c`` and ``a*b=c`` with operands 0 to 99; subtraction puts the
    larger operand first, so every answer is a non-negative integer. Exact answers make
    accuracy measurable by greedy decoding (:func:`arithmetic_problems`). A fixed 5% of all
    possible problems, chosen once by a constant seed, is *held out*: validation lines and
    evaluation problems come only from it and training lines never do, so validation loss
    and exact-match accuracy measure generalisation rather than recall. The operator is
    drawn uniformly, then a problem uniformly within that operator. 200,000 training
    problems (about 1.9 MB) by default; validation holds ``val_fraction`` of the total.
    Training and validation streams come from ``default_rng([seed, 0])`` and
    ``default_rng([seed, 1])``.

Splits
    Text corpora put the last ``val_fraction`` (5%) of their text into validation, moving
    the cut to the nearest document start when one lies within a quarter of the validation
    size, so that no document straddles the split. A single file has no inner documents
    and is cut exactly (for tokenizers other than bytes, at a character boundary). Because
    the built-in documents are in a path-hash order, the validation documents are a spread
    sample of the library, not its alphabetical tail. The cut is made on the text *before*
    tokenizing, so every tokenizer sees the same training and validation text and a BPE
    tokenizer trained on the training split has never seen the validation text.

Tokenizers
    :func:`make_tokenizer` gives ``"bytes"`` (:class:`ByteTokenizer`: a token per UTF-8
    byte, vocabulary 256) or ``"bpe"`` (:class:`BPETokenizer`: byte-level BPE from the
    ``tokenizers`` library, trained on the training split of the run's own sources, saved
    as a ``tokenizer.json`` and reloaded from it). Neither has special tokens: documents are
    separated by text (a blank line) under both. Text sources are encoded with the
    tokenizer given to :func:`load_source`; ``.bin`` files keep their tokens.
    ``tokens_per_byte`` is the number of tokens over the number of UTF-8 bytes of the
    source's text (1.0 for bytes), so that :func:`bits_per_byte` compares models across
    tokenizers; ``val_tokens_per_byte`` is the same for the validation split alone.

Hugging Face datasets: ``hf:TARGET[?key=value&key=value...]``
    ``TARGET`` is a data file (``.json``/``.jsonl``/``.ndjson``, ``.csv``/``.tsv``,
    ``.parquet``, ``.arrow``, ``.txt``; optionally ``.gz``, ``.bz2``, ``.xz`` or
    ``.zst``), a folder of such files (``datasets`` picks the format and reads splits
    from file names such as ``train.jsonl`` and ``validation.jsonl``), a folder written by
    ``save_to_disk``, or the id of a Hub dataset (``name`` or ``owner/name``) that is
    already in the local Hugging Face cache. The options, all optional:

    ``field=text``   the column holding the text (rows where it is null are skipped)
    ``split=train``  the split to train on
    ``val=NAME``     the split to validate on; by default ``validation`` when the dataset
                     has one, otherwise the last ``val_fraction`` is cut off as for text
    ``config=NAME``  the dataset's configuration (Hub datasets with several)

    For example ``hf:data/corpus.jsonl?field=body`` or
    ``wiki:hf:wikitext?config=wikitext-2-raw-v1``. Each row is one document, followed by a
    blank line; ``.txt`` files give a row per line, followed by a newline, which rebuilds
    the file. ``max_bytes`` caps the training split and, separately, a validation split.
    Nothing is ever downloaded: loading runs in ``datasets``' offline mode, local files are
    converted in a temporary cache that is deleted once their text is read (so nothing is
    left beside the data or in the user's cache), and Hub datasets are read from the
    user's cache. ``datasets`` is imported only for an ``hf:`` spec (``pip install
    'sharpscope[hf]'``). The source's default name is the file's stem (its folder's name
    for ``train.jsonl`` and the like), the folder's name, or the Hub id's last part.

Sampling
    :class:`BatchSampler` makes batch ``k`` a pure function of ``(seed, k)``: resuming needs
    only the position, and any batch can be recomputed (``batch_at``). Each row picks its
    source by the mixture weights and a uniform start offset. :func:`validation_batches`
    draws fixed windows from the validation split, one per stratum of the split, so a few
    batches cover it evenly.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import hashlib
import math
import os
import re
import sysconfig
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Protocol, Sequence
from urllib.parse import parse_qsl

import numpy as np
import torch

from ..errors import UserError

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "TOKENIZER_KINDS",
    "TOKENIZER_FILE",
    "MAX_VOCAB_SIZE",
    "make_tokenizer",
    "HF_OPTIONS",
    "TokenSource",
    "BUILTIN_SOURCES",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_ARITHMETIC_PROBLEMS",
    "ARITHMETIC_OPERATORS",
    "ARITHMETIC_HELDOUT_FRACTION",
    "load_source",
    "load_sources",
    "load_code",
    "load_prose",
    "load_arithmetic",
    "arithmetic_problems",
    "check_vocab",
    "BatchSampler",
    "validation_batches",
    "bits_per_byte",
    "clear_cache",
]

BUILTIN_SOURCES = ("code", "prose", "arithmetic")
DEFAULT_MAX_BYTES = 4_000_000
"""Cap on the built-in text corpora (bytes): large enough for small models, fast to load."""
DEFAULT_ARITHMETIC_PROBLEMS = 200_000
"""Training problems in the built-in arithmetic corpus (about 1.9 MB)."""
ARITHMETIC_OPERATORS = ("+", "-", "*")
ARITHMETIC_HELDOUT_FRACTION = 0.05
"""Share of all possible arithmetic problems reserved for validation and evaluation."""

BYTE_ALPHABET = 256
MAX_VOCAB_SIZE = 2 ** 16
"""Largest vocabulary whose token ids fit the uint16 arrays that hold tokens."""
TOKENIZER_FILE = "tokenizer.json"
"""File name of a saved BPE tokenizer (the ``tokenizers`` library's format)."""
HF_PREFIX = "hf:"
HF_OPTIONS = ("split", "val", "field", "config")
"""Options of an ``hf:`` spec, written ``hf:TARGET?split=train&field=text``."""
_HF_BUILDERS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".txt": "text", ".text": "text",
                ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
_HF_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_ENCODE_CHUNK_CHARS = 1 << 16
_CHUNK_BREAK = re.compile(r"(?<=\S\n)(?=\S)")
_SPLIT_FILE_STEMS = frozenset({"train", "training", "validation", "valid", "val", "dev", "test", "data"})

_SKIPPED_STDLIB_DIRS = frozenset({"test", "tests", "idlelib", "turtledemo", "site-packages", "pydoc_data"})
_USER_TEXT_SUFFIXES = (".txt", ".md", ".py")
_MIN_DOCSTRING_CHARS = 40
# Fixed, so that which arithmetic problems are held out never depends on a run's seed:
# a corpus and the evaluation problems of any seed agree on it.
_ARITHMETIC_HOLDOUT_SEED = 1_000_003
# Separate random streams for the sampler's kinds of draws, so that they never coincide.
_MIXTURE_STREAM, _SOURCE_STREAM, _VALIDATION_STREAM = 0, 1, 2
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


# --------------------------------------------------------------------------- tokenizer


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
    val_fraction = _check_fraction(val_fraction)
    texts: list[str] = []
    for spec in train_specs:
        texts.extend(_training_texts(spec, max_bytes=max_bytes, val_fraction=val_fraction, seed=seed))
    tokenizer = BPETokenizer.train(texts, vocab_size)
    if file is not None:
        tokenizer.save(file)
    return tokenizer


# --------------------------------------------------------------------------- sources


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


@dataclass(frozen=True, eq=False)
class _Text:
    """A text source before tokenization: its documents, as UTF-8 bytes."""

    name: str
    origin: str
    documents: Sequence[bytes]
    val_documents: Sequence[bytes] | None = None
    """A validation split of its own (arithmetic, a dataset's validation split); else one is cut."""


def _cut_point(n: int, doc_starts: np.ndarray, val_fraction: float) -> int:
    """Where the last ``val_fraction`` of ``n`` units begins: at a document start when one is near."""
    if val_fraction == 0 or n < 2:
        return n
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    target = n - n_val
    starts = np.asarray(doc_starts, dtype=np.int64)
    starts = starts[(starts > 0) & (starts < n)]
    near = starts[np.abs(starts - target) <= n_val // 4]
    return int(near[np.argmin(np.abs(near - target))]) if len(near) else target


def _split_at_document(tokens: np.ndarray, doc_starts: np.ndarray, val_fraction: float):
    """Split off the last ``val_fraction`` of tokens, at a document start when one is near."""
    cut = _cut_point(len(tokens), doc_starts, val_fraction)
    return tokens[:cut], tokens[cut:]


def _split_text(text: _Text, val_fraction: float, *, char_boundary: bool) -> tuple[list[bytes], list[bytes]]:
    """Training and validation documents. The cut is made on the text, before tokenizing,
    so that every tokenizer sees the same training and validation text.

    ``char_boundary`` moves a cut that falls inside a UTF-8 character back to its start
    (needed by tokenizers that decode the text; the byte tokenizer takes the bytes as they are).
    """
    if text.val_documents is not None:
        return [d for d in text.documents if d], [d for d in text.val_documents if d]
    docs = [d for d in text.documents if d]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if docs else lengths
    n = int(lengths.sum())
    cut = _cut_point(n, starts, val_fraction)
    if cut >= n:
        return docs, []
    i = int(np.searchsorted(starts, cut, side="right")) - 1
    doc, offset = docs[i], cut - int(starts[i])
    if char_boundary:
        while offset > 0 and doc[offset] & 0xC0 == 0x80:  # a continuation byte
            offset -= 1
    head, tail = doc[:offset], doc[offset:]
    return docs[:i] + ([head] if head else []), [tail] + docs[i + 1:]


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


def _text_source(text: _Text, *, tokenizer, val_fraction: float) -> TokenSource:
    """Split ``text`` and encode both splits with ``tokenizer``."""
    tokenizer = tokenizer or ByteTokenizer()
    train_docs, val_docs = _split_text(text, val_fraction, char_boundary=not isinstance(tokenizer, ByteTokenizer))
    train, train_bytes = _encode_documents(train_docs, tokenizer)
    val, val_bytes = _encode_documents(val_docs, tokenizer)
    if len(train) + len(val) == 0:
        raise UserError(f"data source '{text.origin}' is empty; give it some text")
    return TokenSource(name=text.name, train=_read_only(train), val=_read_only(val), origin=text.origin,
                       tokenizer=getattr(tokenizer, "name", type(tokenizer).__name__),
                       tokens_per_byte=(len(train) + len(val)) / (train_bytes + val_bytes),
                       val_tokens_per_byte=len(val) / val_bytes if val_bytes else None)


def _cap_documents(documents: Iterable[bytes], max_bytes: int) -> list[bytes]:
    """Documents in order until ``max_bytes``; the last one is cut to fill the cap exactly."""
    kept, total = [], 0
    for doc in documents:
        room = max_bytes - total
        if room <= 0:
            break
        kept.append(doc[:room])
        total += len(kept[-1])
    return kept


# --------------------------------------------------------------------------- built-in corpora


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _hash_order(key: str) -> tuple[int, str]:
    # CRC-32, unlike hash(), is the same in every process (no PYTHONHASHSEED).
    return zlib.crc32(key.encode("utf-8")), key


@lru_cache(maxsize=1)
def _stdlib_files() -> tuple[tuple[str, Path], ...]:
    """(relative path, path) of the library's Python files, in path-hash order."""
    root = _stdlib_root()
    files = [p for p in root.glob("*.py") if p.is_file()]
    if root.is_dir():
        for package in root.iterdir():
            if (package.is_dir() and package.name not in _SKIPPED_STDLIB_DIRS
                    and (package / "__init__.py").is_file()):
                files.extend(p for p in package.glob("*.py") if p.is_file())
    named = sorted((p.relative_to(root).as_posix(), p) for p in files)
    if not named:
        raise UserError(f"no Python standard library sources under {root} (this Python ships "
                        f"compiled files only); use your own data instead of 'code' or 'prose'")
    return tuple(sorted(named, key=lambda item: _hash_order(item[0])))


@lru_cache(maxsize=4)
def _code_documents(max_bytes: int) -> tuple[bytes, ...]:
    def documents():
        for rel, path in _stdlib_files():
            body = path.read_bytes()
            if not body.endswith(b"\n"):
                body += b"\n"
            yield f"# ---- {rel} ----\n".encode() + body + b"\n"
    return tuple(_cap_documents(documents(), max_bytes))


def _docstrings(tree: ast.AST) -> list[str]:
    """Docstrings of a module and its classes and functions, in source order."""
    found: list[str] = []

    def visit(node):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                found.append(doc)
        # Docstrings live only on statements, so walking statement lists (not expressions,
        # as ast.walk would) finds them all in a fraction of the time.
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            for child in getattr(node, field, None) or ():
                if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                    visit(child)

    visit(tree)
    return found


def _parse_quickly(path: Path) -> ast.Module:
    # Building an AST allocates many objects, which keeps triggering the cyclic garbage
    # collector for nothing (a tree holds no cycles and is freed by reference counting);
    # pausing it halves the time to parse the library.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(path.read_bytes(), filename=str(path))
    finally:
        if was_enabled:
            gc.enable()


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return {}
    return {k: v for k, v in topics.items() if isinstance(v, str)}


@lru_cache(maxsize=4)
def _prose_documents(max_bytes: int) -> tuple[bytes, ...]:
    topics = _pydoc_topics()
    keyed = [(f"topic:{k}", k) for k in topics] + [(rel, path) for rel, path in _stdlib_files()]
    keyed.sort(key=lambda item: _hash_order(item[0]))
    seen: set[str] = set()

    def documents():
        # Lazy, so that a small cap parses only the files it needs.
        for key, what in keyed:
            if key.startswith("topic:"):
                texts = [topics[what].strip()]
            else:
                try:
                    tree = _parse_quickly(what)
                except (SyntaxError, ValueError):
                    continue  # a file this Python cannot parse has no docstrings for us
                texts = []
                for doc in _docstrings(tree):
                    if len(doc) >= _MIN_DOCSTRING_CHARS and doc not in seen:
                        seen.add(doc)
                        texts.append(doc)
            if texts:
                yield ("\n\n".join(texts) + "\n\n").encode("utf-8")

    return tuple(_cap_documents(documents(), max_bytes))


def _check_fraction(val_fraction: float) -> float:
    val_fraction = float(val_fraction)
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return val_fraction


def _check_cap(max_bytes, default: int | None) -> int | None:
    if max_bytes is None:
        return default
    if isinstance(max_bytes, bool) or int(max_bytes) != max_bytes or max_bytes < 1:
        raise UserError(f"max_bytes must be a positive whole number of bytes, got {max_bytes!r}")
    return int(max_bytes)


def _code_text(max_bytes: int | None, name: str = "code") -> _Text:
    cap = _check_cap(max_bytes, DEFAULT_MAX_BYTES)
    return _Text(name, f"Python standard library source ({_stdlib_root()})", _code_documents(cap))


def _prose_text(max_bytes: int | None, name: str = "prose") -> _Text:
    cap = _check_cap(max_bytes, DEFAULT_MAX_BYTES)
    return _Text(name, f"Python documentation ({_stdlib_root()})", _prose_documents(cap))


def load_code(*, max_bytes: int | None = None, val_fraction: float = 0.05, tokenizer=None,
              name: str = "code") -> TokenSource:
    """Python standard-library source, at most ``max_bytes`` (default 4 MB)."""
    return _text_source(_code_text(max_bytes, name), tokenizer=tokenizer, val_fraction=_check_fraction(val_fraction))


def load_prose(*, max_bytes: int | None = None, val_fraction: float = 0.05, tokenizer=None,
               name: str = "prose") -> TokenSource:
    """Docstrings and pydoc topics of the Python installation, at most ``max_bytes`` (default 4 MB)."""
    return _text_source(_prose_text(max_bytes, name), tokenizer=tokenizer, val_fraction=_check_fraction(val_fraction))


# --------------------------------------------------------------------------- arithmetic


def _apply(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b if op == "+" else a - b if op == "-" else a * b


@lru_cache(maxsize=8)
def _arithmetic_pools(max_operand: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Per operator, the (a, b) pairs of training problems and of held-out problems."""
    pools = []
    for op in ARITHMETIC_OPERATORS:
        a, b = np.meshgrid(np.arange(max_operand + 1), np.arange(max_operand + 1), indexing="ij")
        pairs = np.stack([a.ravel(), b.ravel()], axis=1)
        if op == "-":
            pairs = pairs[pairs[:, 0] >= pairs[:, 1]]  # non-negative answers only
        rng = np.random.default_rng([_ARITHMETIC_HOLDOUT_SEED, ord(op), max_operand])
        order = rng.permutation(len(pairs))
        n_held = max(1, round(ARITHMETIC_HELDOUT_FRACTION * len(pairs)))
        held, train = pairs[np.sort(order[:n_held])], pairs[np.sort(order[n_held:])]
        held.flags.writeable = train.flags.writeable = False
        pools.append((train, held))
    return tuple(pools)


def _check_operand(max_operand) -> int:
    if isinstance(max_operand, bool) or int(max_operand) != max_operand or max_operand < 1:
        raise UserError(f"max_operand must be a whole number of at least 1, got {max_operand!r}")
    return int(max_operand)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _draw_problems(rng: np.random.Generator, n: int, max_operand: int, heldout: bool):
    pools = _arithmetic_pools(max_operand)
    op_N = rng.integers(0, len(ARITHMETIC_OPERATORS), size=n)
    a_N, b_N = np.empty(n, np.int64), np.empty(n, np.int64)
    for j, (train, held) in enumerate(pools):
        pool = held if heldout else train
        rows = np.flatnonzero(op_N == j)
        pick = pool[rng.integers(0, len(pool), size=len(rows))]
        a_N[rows], b_N[rows] = pick[:, 0], pick[:, 1]
    return op_N, a_N, b_N


def _format_problems(op_N, a_N, b_N) -> bytes:
    answer_N = np.empty_like(a_N)
    for j, op in enumerate(ARITHMETIC_OPERATORS):
        rows = op_N == j
        answer_N[rows] = _apply(op, a_N[rows], b_N[rows])
    ops = [ARITHMETIC_OPERATORS[j] for j in op_N.tolist()]
    return "".join(f"{a}{o}{b}={c}\n" for a, o, b, c in
                   zip(a_N.tolist(), ops, b_N.tolist(), answer_N.tolist())).encode("ascii")


@lru_cache(maxsize=8)
def _arithmetic_text(n: int, max_operand: int, seed: int, heldout: bool) -> bytes:
    rng = np.random.default_rng([seed, 1 if heldout else 0])
    return _format_problems(*_draw_problems(rng, n, max_operand, heldout))


def _arithmetic_corpus(*, n_train: int = DEFAULT_ARITHMETIC_PROBLEMS, max_operand: int = 99,
                      val_fraction: float = 0.05, seed: int = 0, name: str = "arithmetic") -> _Text:
    max_operand, seed = _check_operand(max_operand), _check_seed(seed)
    val_fraction = _check_fraction(val_fraction)
    if isinstance(n_train, bool) or int(n_train) != n_train or n_train < 1:
        raise UserError(f"n_train must be a positive number of problems, got {n_train!r}")
    n_val = max(1, round(n_train * val_fraction / (1 - val_fraction))) if val_fraction else 0
    train = _arithmetic_text(int(n_train), max_operand, seed, False)
    val = [_arithmetic_text(n_val, max_operand, seed, True)] if n_val else []
    origin = f"generated arithmetic (seed={seed}, n_train={n_train}, max_operand={max_operand})"
    return _Text(name, origin, [train], val)


def load_arithmetic(*, n_train: int = DEFAULT_ARITHMETIC_PROBLEMS, max_operand: int = 99,
                    val_fraction: float = 0.05, seed: int = 0, tokenizer=None,
                    name: str = "arithmetic") -> TokenSource:
    """Generated problems ``a<op>b=c``: ``n_train`` training lines from the training problems,
    ``val_fraction`` of all lines (at least one) from the held-out problems."""
    corpus = _arithmetic_corpus(n_train=n_train, max_operand=max_operand, val_fraction=val_fraction, seed=seed,
                                name=name)
    return _text_source(corpus, tokenizer=tokenizer, val_fraction=val_fraction)


def arithmetic_problems(n: int, seed: int = 0, *, max_operand: int = 99,
                        split: str = "val") -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs such as ``("37+58=", "95")`` for exact-match evaluation.

    ``split="val"`` draws from the held-out problems (never in the training corpus),
    ``split="train"`` from the training problems. Problems do not repeat until the pool
    is used up.
    """
    max_operand, seed = _check_operand(max_operand), _check_seed(seed)
    if split not in ("train", "val"):
        raise UserError(f"split must be 'train' or 'val', got {split!r}")
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise UserError(f"n must be a non-negative number of problems, got {n!r}")
    pools = _arithmetic_pools(max_operand)
    which = 1 if split == "val" else 0
    op_P = np.concatenate([np.full(len(p[which]), j) for j, p in enumerate(pools)])
    pairs_Px2 = np.concatenate([p[which] for p in pools])
    rng = np.random.default_rng([seed, 2])
    order = np.concatenate([rng.permutation(len(op_P)) for _ in range(-(-int(n) // len(op_P)))] or [[]])
    order = order[: int(n)].astype(np.int64)
    lines = _format_problems(op_P[order], pairs_Px2[order, 0], pairs_Px2[order, 1]).decode("ascii")
    problems = []
    for line in lines.splitlines():
        prompt, answer = line.split("=")
        problems.append((prompt + "=", answer))
    return problems


# --------------------------------------------------------------------------- user data


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
        train, val = _split_at_document(tokens, np.zeros(0, np.int64), val_fraction)
        origin = str(path)
    return TokenSource(name=name, train=train, val=val, origin=origin, tokenizer="pretokenized",
                       tokens_per_byte=None)


def _folder_documents(folder: Path) -> list[Path]:
    files = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        # Hidden folders (.git, .venv) hold tooling, not the user's data.
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in _USER_TEXT_SUFFIXES and path.is_file():
            files.append((rel.as_posix(), path))
    return [path for _, path in sorted(files)]


def _default_name(path: Path) -> str:
    path = path.resolve()
    if path.name in ("train.bin", "val.bin") and path.parent.name:
        base = path.parent.name  # nanoGPT keeps data/<dataset>/train.bin
    else:
        base = path.name if path.is_dir() else path.stem
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", base).lstrip(".") or "data"


# --------------------------------------------------------------------------- Hugging Face datasets


def _parse_hf(spec: str) -> tuple[str, dict[str, str]]:
    """``hf:TARGET?key=value&...`` as the target and its options."""
    target, _, query = spec[len(HF_PREFIX):].partition("?")
    target = target.strip()
    if not target:
        raise UserError(f"data source '{spec}' names no dataset; write hf:PATH_OR_NAME, e.g. hf:data/corpus.jsonl")
    options: dict[str, str] = {}
    if query:
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise UserError(f"data source '{spec}': cannot read the options after '?'; write them as "
                            f"key=value joined by '&', e.g. ?field=text&split=train") from None
        for key, value in pairs:
            if key not in HF_OPTIONS:
                raise UserError(f"data source '{spec}': unknown option '{key}'; the options are "
                                f"{', '.join(HF_OPTIONS)}")
            if key in options:
                raise UserError(f"data source '{spec}': option '{key}' is given twice")
            if not value:
                raise UserError(f"data source '{spec}': option '{key}' has no value")
            options[key] = value
    return target, options


def _data_file_format(path: Path) -> tuple[str | None, dict]:
    """The ``datasets`` builder (and its arguments) for a data file, by extension."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _HF_COMPRESSIONS:
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    return _HF_BUILDERS.get(ext), ({"sep": "\t"} if ext == ".tsv" else {})


def _looks_like_path(target: str) -> bool:
    # A Hub id is "name" or "owner/name"; anything else is meant as a file or folder.
    return (target.startswith((".", "~", "/", "\\")) or "\\" in target or target.count("/") > 1
            or Path(target).is_absolute() or _data_file_format(Path(target))[0] is not None)


def _import_datasets(spec: str):
    try:
        import datasets
    except ImportError:
        raise UserError(f"data source '{spec}' needs the Hugging Face datasets package: "
                        f"pip install 'sharpscope[hf]'") from None
    return datasets


@contextlib.contextmanager
def _hf_offline_and_quiet(datasets):
    """Offline mode (no Hub requests at all), no progress bars, only errors logged; all restored after."""
    import huggingface_hub.constants as hub_constants

    saved_offline = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    saved_verbosity = datasets.logging.get_verbosity()
    bars_were_disabled = datasets.are_progress_bars_disabled()
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    datasets.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # datasets warns when an environment variable decides instead
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved_offline
        datasets.logging.set_verbosity(saved_verbosity)
        if not bars_were_disabled:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                datasets.enable_progress_bars()


def _hf_default_name(target: str, path: Path | None) -> str:
    if path is None:
        base = target.rstrip("/").rsplit("/", 1)[-1]  # owner/name -> name
    else:
        path = path.resolve()
        base = path.name
        if path.is_file():
            base = base.split(".", 1)[0] or base
            if base.lower() in _SPLIT_FILE_STEMS and path.parent.name:
                base = path.parent.name  # data/<dataset>/train.jsonl
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", base).lstrip(".") or "data"


def _hf_documents(dataset, field: str, spec: str, separator: bytes) -> Iterator[bytes]:
    """The ``field`` of each row, UTF-8 encoded and followed by ``separator``; lazily, in order."""
    if field not in dataset.column_names:
        raise UserError(f"data source '{spec}' has no field '{field}'; its fields are "
                        f"{', '.join(dataset.column_names) or 'none'} (choose one with ?field=NAME)")
    keep_empty = separator == b"\n"  # rows are lines: an empty one is a paragraph break
    for batch in dataset.select_columns([field]).iter(batch_size=1024):
        for value in batch[field]:
            if value is None:
                continue
            if not isinstance(value, str):
                raise UserError(f"field '{field}' of data source '{spec}' holds {type(value).__name__} values, "
                                f"not text; choose a text field with ?field=NAME")
            if value or keep_empty:
                yield value.encode("utf-8") + separator


def _hf_text(spec: str, name: str | None, *, max_bytes: int | None) -> _Text:
    """A Hugging Face dataset (local file, folder, ``save_to_disk`` folder, or cached Hub dataset)."""
    target, options = _parse_hf(spec)
    cap = _check_cap(max_bytes, None)
    path = Path(target).expanduser()
    if not path.exists() and _looks_like_path(target):
        raise UserError(f"data source '{spec}': no such file or folder {path}")
    datasets = _import_datasets(spec)
    field, split = options.get("field", "text"), options.get("split", "train")
    config = options.get("config")
    # Local data is converted to Arrow in a temporary cache, deleted once the text is read,
    # so nothing is left in the user's cache or beside the data. Hub datasets are read from
    # the user's Hugging Face cache, where an earlier download put them.
    with _hf_offline_and_quiet(datasets), \
            tempfile.TemporaryDirectory(prefix="sharpscope-hf-", ignore_cleanup_errors=True) as cache:
        try:
            if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
                loaded = datasets.load_from_disk(str(path))
            elif path.is_dir():
                loaded = datasets.load_dataset(str(path), config, cache_dir=cache)
            elif path.is_file():
                builder, kwargs = _data_file_format(path)
                if builder is None:
                    raise UserError(f"data source '{spec}': {path} is not a data file datasets can read; use "
                                    f"{', '.join(sorted(_HF_BUILDERS))} (optionally compressed)")
                loaded = datasets.load_dataset(builder, config, data_files={"train": str(path)}, cache_dir=cache,
                                               **kwargs)
            else:
                loaded = datasets.load_dataset(target, config)
        except UserError:
            raise
        except ConnectionError as err:  # offline, and not in the cache
            raise UserError(f"data source '{spec}': '{target}' is neither an existing file or folder nor a "
                            f"dataset in the local Hugging Face cache (sharpscope works offline and downloads "
                            f"nothing; download it first, or point at its files)") from err
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise UserError(f"data source '{spec}' could not be loaded: {type(err).__name__}: {first}") from err
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        if split not in splits:
            raise UserError(f"data source '{spec}' has no split '{split}'; its splits are {', '.join(splits)}")
        val_split = options.get("val") or ("validation" if "validation" in splits and split != "validation"
                                           else None)
        if val_split is not None and val_split not in splits:
            raise UserError(f"data source '{spec}' has no split '{val_split}'; its splits are "
                            f"{', '.join(splits)}")
        if val_split == split:
            raise UserError(f"data source '{spec}': the validation split must differ from the training split")
        # The text builder makes one row per line; other formats one row per document.
        separator = b"\n" if splits[split].info.builder_name == "text" else b"\n\n"

        def read(which: str) -> list[bytes]:
            documents = _hf_documents(splits[which], field, spec, separator)
            return _cap_documents(documents, cap) if cap is not None else list(documents)

        train_docs = read(split)
        val_docs = read(val_split) if val_split is not None else None
        loaded = splits = None  # release the memory-mapped Arrow files before the cache goes
    return _Text(name or _hf_default_name(target, path if path.exists() else None), spec, train_docs, val_docs)


def _parse_spec(spec: str) -> tuple[str | None, str]:
    """Split ``name:spec`` unless the whole spec names a built-in, a dataset or an existing path."""
    if spec in BUILTIN_SOURCES or spec.startswith(HF_PREFIX) or Path(spec).expanduser().exists():
        return None, spec
    head, sep, rest = spec.partition(":")
    if sep and rest and _NAME_PATTERN.fullmatch(head) and not (len(head) == 1 and rest[:1] in "\\/"):
        return head, rest
    return None, spec


def _resolve(spec: str, *, val_fraction: float, max_bytes: int | None, seed: int) -> _Text | tuple[str, Path]:
    """The text behind a spec, or ``(name, path)`` for a pre-tokenized ``.bin`` file."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"data source must be a non-empty string, got {spec!r}")
    name, target = _parse_spec(spec.strip())
    if target == "code":
        return _code_text(max_bytes, name or "code")
    if target == "prose":
        return _prose_text(max_bytes, name or "prose")
    if target == "arithmetic":
        return _arithmetic_corpus(val_fraction=val_fraction, seed=seed, name=name or "arithmetic")
    if target.startswith(HF_PREFIX):
        return _hf_text(target, name, max_bytes=max_bytes)
    path = Path(target).expanduser()
    if not path.exists():
        raise UserError(f"data source '{target}' is neither a built-in corpus "
                        f"({', '.join(BUILTIN_SOURCES)}) nor an existing file or folder; check the path")
    cap = _check_cap(max_bytes, None)
    name = name or _default_name(path)
    if path.is_dir():
        files = _folder_documents(path)
        if not files:
            raise UserError(f"folder {path} has no {', '.join('*' + s for s in _USER_TEXT_SUFFIXES)} "
                            f"files; point at a folder of text or at a file")
        documents = [p.read_bytes() for p in files]
        # A blank line between files, so one file's end does not run into the next's start.
        documents = [d if i == len(documents) - 1 else d + b"\n\n" for i, d in enumerate(documents)]
        if cap is not None:
            documents = _cap_documents(documents, cap)
        if not any(documents):
            raise UserError(f"folder {path} holds only empty text files; give it some text")
        return _Text(name, str(path), documents)
    if path.suffix.lower() == ".bin":
        return name, path
    data = path.read_bytes()
    return _Text(name, str(path), [data[:cap] if cap is not None else data])


def _training_texts(spec: str, *, max_bytes: int | None, val_fraction: float, seed: int) -> list[str]:
    """The training-split documents of a text source, as strings (for training a tokenizer)."""
    text = _resolve(spec, val_fraction=val_fraction, max_bytes=max_bytes, seed=seed)
    if not isinstance(text, _Text):
        raise UserError(f"data source '{text[1]}' is pre-tokenized (.bin), so a tokenizer cannot be trained on "
                        f"it; train on text sources, or use the tokens as they are without a 'bpe' tokenizer")
    train_docs, _ = _split_text(text, val_fraction, char_boundary=True)
    return [d.decode("utf-8", errors="replace") for d in train_docs]


def load_source(spec: str, *, tokenizer=None, val_fraction: float = 0.05, max_bytes: int | None = None,
                seed: int = 0, block_size: int | None = None) -> TokenSource:
    """Load one data source (see the module docstring for the specs).

    Text is encoded with ``tokenizer`` (default: :class:`ByteTokenizer`); ``.bin`` files
    keep their tokens whatever the tokenizer. ``max_bytes`` caps text (built-in text
    corpora default to 4 MB; user text is uncapped); it does not apply to ``.bin`` files or
    ``arithmetic``, which is sized by its problem count. ``seed`` drives the generated
    ``arithmetic`` corpus; text is seed-free. ``block_size``, when given, requires at least
    ``block_size + 1`` tokens in the training split (and in the validation split, unless
    ``val_fraction`` is 0), so a too-short source fails here, naming itself, instead of in
    the sampler.
    """
    val_fraction = _check_fraction(val_fraction)
    resolved = _resolve(spec, val_fraction=val_fraction, max_bytes=max_bytes, seed=seed)
    if isinstance(resolved, _Text):
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


def clear_cache() -> None:
    """Forget the corpora kept in this process (they are rebuilt, identically, on next use)."""
    for cached in (_stdlib_files, _code_documents, _prose_documents, _arithmetic_pools, _arithmetic_text):
        cached.cache_clear()


# --------------------------------------------------------------------------- sampling


def _check_positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _check_index(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"batch index must be a non-negative integer, got {k!r}")
    return int(k)


def _windows(tokens_per_row: Sequence[np.ndarray], offsets: Sequence[int], block_size: int):
    """Rows of ``block_size + 1`` tokens split into inputs and next-token targets."""
    rows_BxT1 = np.empty((len(offsets), block_size + 1), dtype=np.int64)
    for i, (tokens, offset) in enumerate(zip(tokens_per_row, offsets)):
        rows_BxT1[i] = tokens[offset: offset + block_size + 1]
    x_BxT = torch.from_numpy(np.ascontiguousarray(rows_BxT1[:, :-1]))
    y_BxT = torch.from_numpy(np.ascontiguousarray(rows_BxT1[:, 1:]))
    return x_BxT, y_BxT


def _check_sources(sources: Mapping[str, TokenSource], block_size: int, split: str) -> None:
    if not sources:
        raise UserError("no data sources given; name at least one")
    for name, source in sources.items():
        if not isinstance(source, TokenSource):
            raise TypeError(f"source '{name}' is a {type(source).__name__}, not a TokenSource")
        n = len(getattr(source, split))
        if n < block_size + 1:
            raise UserError(f"data source '{name}' ({source.origin}) has {n} {split} tokens, fewer than "
                            f"block_size + 1 = {block_size + 1}; use more data or a smaller block_size")


class BatchSampler:
    """Deterministic, resumable batches from a weighted mixture of sources.

    Batch ``k`` depends only on ``(seed, k)`` and the sources: row ``i`` takes its source
    with probability proportional to its weight and a start offset uniform over the
    positions that leave ``block_size + 1`` tokens. Names are used in sorted order, so
    the dict order of ``sources`` and ``weights`` does not matter. Batches are global: in
    data-parallel training each rank computes batch ``k`` and keeps its own rows.
    """

    def __init__(self, sources: Mapping[str, TokenSource], *, batch_size: int, block_size: int,
                 weights: Mapping[str, float] | None = None, seed: int = 0, split: str = "train"):
        if split not in ("train", "val"):
            raise UserError(f"split must be 'train' or 'val', got {split!r}")
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.block_size = _check_positive_int(block_size, "block_size")
        self.seed = _check_seed(seed)
        self.split = split
        _check_sources(sources, self.block_size, split)
        self.sources = dict(sources)
        self.names = sorted(self.sources)
        self._tokens = [getattr(self.sources[n], split) for n in self.names]
        self._lengths = np.array([len(t) for t in self._tokens], dtype=np.int64)
        self.probabilities = self._probabilities(weights)
        self._active = np.array([i for i, n in enumerate(self.names) if self.probabilities[n] > 0])
        self._active_p = np.array([self.probabilities[self.names[i]] for i in self._active])
        self.position = 0

    def _probabilities(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        if weights is None:
            return {n: 1 / len(self.names) for n in self.names}
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise UserError(f"weights name unknown source(s) {', '.join(unknown)}; "
                            f"the sources are {', '.join(self.names)}")
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise UserError(f"weights give no weight to source(s) {', '.join(missing)}; "
                            f"give every source a weight (0 leaves it out)")
        values = {}
        for n in self.names:
            w = weights[n]
            if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(w) or w < 0:
                raise UserError(f"weight of source '{n}' must be a finite number >= 0, got {w!r}")
            values[n] = float(w)
        total = sum(values.values())
        if total <= 0:
            raise UserError("all source weights are zero; give at least one source a positive weight")
        return {n: w / total for n, w in values.items()}

    # -- one batch

    def _plan(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, _MIXTURE_STREAM, k])
        source_B = rng.choice(self._active, size=self.batch_size, p=self._active_p)
        offset_B = rng.integers(0, self._lengths[source_B] - self.block_size)
        return source_B, offset_B

    def batch_at(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``k`` as ``(x_BxT, y_BxT)`` int64 tensors, ``y`` being ``x`` one token on."""
        source_B, offset_B = self._plan(_check_index(k))
        return _windows([self._tokens[s] for s in source_B], offset_B.tolist(), self.block_size)

    def rows_per_source(self, k: int) -> list[str]:
        """Source name of each row of batch ``k``, for per-source losses."""
        source_B, _ = self._plan(_check_index(k))
        return [self.names[s] for s in source_B]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at the current position; then move on by one."""
        batch = self.batch_at(self.position)
        self.position += 1
        return batch

    def source_batch(self, name: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``k`` drawn from source ``name`` alone (whatever its weight).

        Its own random stream, keyed by the name's CRC-32, so adding or removing other
        sources leaves it unchanged.
        """
        if name not in self.sources:
            raise UserError(f"unknown data source '{name}'; the sources are {', '.join(self.names)}")
        k = _check_index(k)
        i = self.names.index(name)
        rng = np.random.default_rng([self.seed, _SOURCE_STREAM, zlib.crc32(name.encode("utf-8")), k])
        offset_B = rng.integers(0, self._lengths[i] - self.block_size, size=self.batch_size)
        return _windows([self._tokens[i]] * self.batch_size, offset_B.tolist(), self.block_size)

    # -- resuming

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        position = state.get("position") if isinstance(state, Mapping) else None
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or position < 0:
            raise UserError(f"sampler state needs a non-negative integer 'position', got {state!r}")
        self.position = int(position)

    def __repr__(self) -> str:
        mix = ", ".join(f"{n}={p:.3g}" for n, p in self.probabilities.items())
        return (f"BatchSampler({mix}; batch_size={self.batch_size}, block_size={self.block_size}, "
                f"seed={self.seed}, split={self.split!r}, position={self.position})")


def validation_batches(sources: Mapping[str, TokenSource], *, batch_size: int, block_size: int,
                       n_batches: int, seed: int = 0) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Fixed evaluation batches per source, from the validation split.

    The ``n_batches * batch_size`` windows of a source are stratified: the span of start
    offsets is cut into that many equal strata and each window starts at a random point
    of its own stratum. A few batches thus cover the whole split evenly (lower variance
    than independent draws), and the same seed gives the same windows.
    """
    batch_size = _check_positive_int(batch_size, "batch_size")
    block_size = _check_positive_int(block_size, "block_size")
    n_batches = _check_positive_int(n_batches, "n_batches")
    seed = _check_seed(seed)
    _check_sources(sources, block_size, "val")
    out = {}
    n_rows = n_batches * batch_size
    for name, source in sources.items():
        span = len(source.val) - block_size  # number of valid start offsets
        rng = np.random.default_rng([seed, _VALIDATION_STREAM, zlib.crc32(name.encode("utf-8"))])
        lower_R = np.arange(n_rows) * span / n_rows
        offset_R = np.minimum(np.floor(lower_R + rng.random(n_rows) * span / n_rows), span - 1).astype(np.int64)
        out[name] = [
            _windows([source.val] * batch_size, offset_R[j * batch_size:(j + 1) * batch_size].tolist(), block_size)
            for j in range(n_batches)
        ]
    return out


def bits_per_byte(loss_nats_per_token: float, tokens_per_byte: float = 1.0) -> float:
    """Cross-entropy in bits per byte of text: nats/token x tokens/byte / ln 2.

    Comparable across tokenizers, unlike loss per token; for the byte tokenizer
    (one token per byte) it is the loss divided by ln 2.
    """
    if not tokens_per_byte > 0:
        raise ValueError(f"tokens_per_byte must be positive, got {tokens_per_byte}")
    return float(loss_nats_per_token) * float(tokens_per_byte) / math.log(2)
