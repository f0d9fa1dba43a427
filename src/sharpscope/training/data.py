"""Training data: a byte tokenizer, offline corpora, user data, and a resumable batch sampler.

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
    Text corpora put the last ``val_fraction`` (5%) of tokens into validation, moving the
    cut to the nearest document start when one lies within a quarter of the validation
    size, so that no document straddles the split. A single file has no inner documents
    and is cut exactly. Because the built-in documents are in a path-hash order, the
    validation documents are a spread sample of the library, not its alphabetical tail.

Sampling
    :class:`BatchSampler` makes batch ``k`` a pure function of ``(seed, k)``: resuming needs
    only the position, and any batch can be recomputed (``batch_at``). Each row picks its
    source by the mixture weights and a uniform start offset. :func:`validation_batches`
    draws fixed windows from the validation split, one per stratum of the split, so a few
    batches cover it evenly.
"""

from __future__ import annotations

import ast
import gc
import math
import re
import sysconfig
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

import numpy as np
import torch

from ..errors import UserError

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
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
    """What :func:`load_source` needs from a tokenizer."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no training, nothing unknown, lossless."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids_N.size and (ids_N.min() < 0 or ids_N.max() > 255):
            raise ValueError(f"byte tokens lie in 0..255; got values from {ids_N.min()} to {ids_N.max()}")
        return ids_N.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


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
    """Tokens per byte of text, for bits per byte; None when unknown (``.bin`` files)."""

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


def _split_at_document(tokens: np.ndarray, doc_starts: np.ndarray, val_fraction: float):
    """Split off the last ``val_fraction`` of tokens, at a document start when one is near."""
    n = len(tokens)
    if val_fraction == 0 or n < 2:
        return tokens, tokens[n:]
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    target = n - n_val
    starts = doc_starts[(doc_starts > 0) & (doc_starts < n)]
    near = starts[np.abs(starts - target) <= n_val // 4]
    cut = int(near[np.argmin(np.abs(near - target))]) if len(near) else target
    return tokens[:cut], tokens[cut:]


def _tokenize_documents(documents: Sequence[bytes], tokenizer) -> tuple[np.ndarray, np.ndarray, float]:
    """Concatenated tokens, the token offset of each document, and tokens per byte."""
    n_bytes = sum(len(d) for d in documents)
    if isinstance(tokenizer, ByteTokenizer):
        joined = b"".join(documents)
        tokens = tokenizer.encode_bytes(joined)
        lengths = [len(d) for d in documents]
    else:
        pieces = [np.asarray(tokenizer.encode(d.decode("utf-8", errors="replace"))) for d in documents]
        for piece in pieces:
            if piece.size and (piece.min() < 0 or piece.max() >= 2 ** 16):
                raise UserError(f"tokenizer {getattr(tokenizer, 'name', tokenizer)!r} produced ids outside "
                                f"0..65535; sharpscope stores tokens as uint16")
        tokens = np.concatenate(pieces).astype(np.uint16) if pieces else np.zeros(0, np.uint16)
        lengths = [len(p) for p in pieces]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if lengths else np.zeros(0, np.int64)
    tokens_per_byte = len(tokens) / n_bytes if n_bytes else None
    return tokens, starts, tokens_per_byte


def _text_source(name: str, documents: Sequence[bytes], *, origin: str, tokenizer, val_fraction: float) -> TokenSource:
    tokens, starts, tokens_per_byte = _tokenize_documents(documents, tokenizer)
    if len(tokens) == 0:
        raise UserError(f"data source '{origin}' is empty; give it some text")
    train, val = _split_at_document(tokens, starts, val_fraction)
    return TokenSource(name=name, train=_read_only(train), val=_read_only(val), origin=origin,
                       tokenizer=getattr(tokenizer, "name", type(tokenizer).__name__),
                       tokens_per_byte=tokens_per_byte)


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


def load_code(*, max_bytes: int | None = None, val_fraction: float = 0.05, tokenizer=None,
              name: str = "code") -> TokenSource:
    """Python standard-library source, at most ``max_bytes`` (default 4 MB)."""
    cap = _check_cap(max_bytes, DEFAULT_MAX_BYTES)
    return _text_source(name, _code_documents(cap), origin=f"Python standard library source ({_stdlib_root()})",
                        tokenizer=tokenizer or ByteTokenizer(), val_fraction=_check_fraction(val_fraction))


def load_prose(*, max_bytes: int | None = None, val_fraction: float = 0.05, tokenizer=None,
               name: str = "prose") -> TokenSource:
    """Docstrings and pydoc topics of the Python installation, at most ``max_bytes`` (default 4 MB)."""
    cap = _check_cap(max_bytes, DEFAULT_MAX_BYTES)
    return _text_source(name, _prose_documents(cap), origin=f"Python documentation ({_stdlib_root()})",
                        tokenizer=tokenizer or ByteTokenizer(), val_fraction=_check_fraction(val_fraction))


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


def load_arithmetic(*, n_train: int = DEFAULT_ARITHMETIC_PROBLEMS, max_operand: int = 99,
                    val_fraction: float = 0.05, seed: int = 0, tokenizer=None,
                    name: str = "arithmetic") -> TokenSource:
    """Generated problems ``a<op>b=c``: ``n_train`` training lines from the training problems,
    ``val_fraction`` of all lines (at least one) from the held-out problems."""
    max_operand, seed = _check_operand(max_operand), _check_seed(seed)
    val_fraction = _check_fraction(val_fraction)
    if isinstance(n_train, bool) or int(n_train) != n_train or n_train < 1:
        raise UserError(f"n_train must be a positive number of problems, got {n_train!r}")
    n_val = max(1, round(n_train * val_fraction / (1 - val_fraction))) if val_fraction else 0
    tokenizer = tokenizer or ByteTokenizer()
    train, _, tpb = _tokenize_documents([_arithmetic_text(int(n_train), max_operand, seed, False)], tokenizer)
    val = (_tokenize_documents([_arithmetic_text(n_val, max_operand, seed, True)], tokenizer)[0]
           if n_val else train[:0])
    origin = f"generated arithmetic (seed={seed}, n_train={n_train}, max_operand={max_operand})"
    return TokenSource(name=name, train=_read_only(train), val=_read_only(val), origin=origin,
                       tokenizer=getattr(tokenizer, "name", type(tokenizer).__name__), tokens_per_byte=tpb)


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


def _parse_spec(spec: str) -> tuple[str | None, str]:
    """Split ``name:spec`` unless the whole spec names a built-in or an existing path."""
    if spec in BUILTIN_SOURCES or Path(spec).expanduser().exists():
        return None, spec
    head, sep, rest = spec.partition(":")
    if sep and rest and _NAME_PATTERN.fullmatch(head) and not (len(head) == 1 and rest[:1] in "\\/"):
        return head, rest
    return None, spec


def load_source(spec: str, *, tokenizer=None, val_fraction: float = 0.05, max_bytes: int | None = None,
                seed: int = 0, block_size: int | None = None) -> TokenSource:
    """Load one data source (see the module docstring for the specs).

    ``max_bytes`` caps text (built-in text corpora default to 4 MB; user text is uncapped);
    it does not apply to ``.bin`` files or ``arithmetic``, which is sized by its problem
    count. ``seed`` drives the generated ``arithmetic`` corpus; text is seed-free.
    ``block_size``, when given, requires at least ``block_size + 1`` tokens in the training
    split (and in the validation split, unless ``val_fraction`` is 0), so a too-short
    source fails here, naming itself, instead of in the sampler.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"data source must be a non-empty string, got {spec!r}")
    val_fraction = _check_fraction(val_fraction)
    tokenizer = tokenizer or ByteTokenizer()
    name, target = _parse_spec(spec.strip())
    if target == "code":
        source = load_code(max_bytes=max_bytes, val_fraction=val_fraction, tokenizer=tokenizer, name=name or "code")
    elif target == "prose":
        source = load_prose(max_bytes=max_bytes, val_fraction=val_fraction, tokenizer=tokenizer, name=name or "prose")
    elif target == "arithmetic":
        source = load_arithmetic(val_fraction=val_fraction, seed=seed, tokenizer=tokenizer,
                                 name=name or "arithmetic")
    else:
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
            source = _text_source(name, documents, origin=str(path), tokenizer=tokenizer, val_fraction=val_fraction)
        elif path.suffix.lower() == ".bin":
            source = _load_bin(name, path, val_fraction)
        else:
            data = path.read_bytes()
            if cap is not None:
                data = data[:cap]
            source = _text_source(name, [data], origin=str(path), tokenizer=tokenizer, val_fraction=val_fraction)
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
