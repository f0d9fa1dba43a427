"""Built-in corpora: ``code``, ``prose`` and ``arithmetic``, as text before tokenizing.

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
"""

from __future__ import annotations

import ast
import gc
import sysconfig
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from ...errors import UserError
from .text import Text, cap_documents, check_cap, check_fraction, check_seed

__all__ = ["BUILTIN_SOURCES", "DEFAULT_MAX_BYTES", "DEFAULT_ARITHMETIC_PROBLEMS", "ARITHMETIC_OPERATORS",
           "ARITHMETIC_HELDOUT_FRACTION", "code_text", "prose_text", "arithmetic_corpus", "arithmetic_problems",
           "clear_cache"]

BUILTIN_SOURCES = ("code", "prose", "arithmetic")
DEFAULT_MAX_BYTES = 4_000_000
"""Cap on the built-in text corpora (bytes): large enough for small models, fast to load."""
DEFAULT_ARITHMETIC_PROBLEMS = 200_000
"""Training problems in the built-in arithmetic corpus (about 1.9 MB)."""
ARITHMETIC_OPERATORS = ("+", "-", "*")
ARITHMETIC_HELDOUT_FRACTION = 0.05
"""Share of all possible arithmetic problems reserved for validation and evaluation."""

_SKIPPED_STDLIB_DIRS = frozenset({"test", "tests", "idlelib", "turtledemo", "site-packages", "pydoc_data"})
_MIN_DOCSTRING_CHARS = 40
# Fixed, so that which arithmetic problems are held out never depends on a run's seed:
# a corpus and the evaluation problems of any seed agree on it.
_ARITHMETIC_HOLDOUT_SEED = 1_000_003


# --------------------------------------------------------------------------- code and prose


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
    return tuple(cap_documents(documents(), max_bytes))


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

    return tuple(cap_documents(documents(), max_bytes))


def code_text(max_bytes: int | None, name: str = "code") -> Text:
    """Python standard-library source, at most ``max_bytes`` (default 4 MB)."""
    cap = check_cap(max_bytes, DEFAULT_MAX_BYTES)
    return Text(name, f"Python standard library source ({_stdlib_root()})", _code_documents(cap))


def prose_text(max_bytes: int | None, name: str = "prose") -> Text:
    """Docstrings and pydoc topics of the Python installation, at most ``max_bytes`` (default 4 MB)."""
    cap = check_cap(max_bytes, DEFAULT_MAX_BYTES)
    return Text(name, f"Python documentation ({_stdlib_root()})", _prose_documents(cap))


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


def arithmetic_corpus(*, n_train: int = DEFAULT_ARITHMETIC_PROBLEMS, max_operand: int = 99,
                      val_fraction: float = 0.05, seed: int = 0, name: str = "arithmetic") -> Text:
    """Generated problems ``a<op>b=c``: ``n_train`` training lines from the training problems,
    ``val_fraction`` of all lines (at least one) from the held-out problems."""
    max_operand, seed = _check_operand(max_operand), check_seed(seed)
    val_fraction = check_fraction(val_fraction)
    if isinstance(n_train, bool) or int(n_train) != n_train or n_train < 1:
        raise UserError(f"n_train must be a positive number of problems, got {n_train!r}")
    n_val = max(1, round(n_train * val_fraction / (1 - val_fraction))) if val_fraction else 0
    train = _arithmetic_text(int(n_train), max_operand, seed, False)
    val = [_arithmetic_text(n_val, max_operand, seed, True)] if n_val else []
    origin = f"generated arithmetic (seed={seed}, n_train={n_train}, max_operand={max_operand})"
    return Text(name, origin, [train], val)


def arithmetic_problems(n: int, seed: int = 0, *, max_operand: int = 99,
                        split: str = "val") -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs such as ``("37+58=", "95")`` for exact-match evaluation.

    ``split="val"`` draws from the held-out problems (never in the training corpus),
    ``split="train"`` from the training problems. Problems do not repeat until the pool
    is used up.
    """
    max_operand, seed = _check_operand(max_operand), check_seed(seed)
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


def clear_cache() -> None:
    """Forget the corpora kept in this process (they are rebuilt, identically, on next use)."""
    for cached in (_stdlib_files, _code_documents, _prose_documents, _arithmetic_pools, _arithmetic_text):
        cached.cache_clear()
