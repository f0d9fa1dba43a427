"""What a data-source spec names, resolved to text (or to a ``.bin`` file of tokens).

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
                 dataset already in the local cache (see :mod:`.hf_datasets`), e.g. ``hf:data/c.jsonl``
``name:spec``    any of the above under a name of your choosing, e.g. ``notes:~/notes``
===============  ==========================================================================

A built-in name wins over a file of the same name in the working directory (write
``./code`` for the file). A source's name defaults to the file's stem, the folder's name,
or for ``train.bin`` its folder's name (nanoGPT keeps ``data/<dataset>/train.bin``).
The built-in corpora are described in :mod:`.corpora`.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import UserError
from .corpora import BUILTIN_SOURCES, arithmetic_corpus, code_text, prose_text
from .hf_datasets import HF_PREFIX, hf_text
from .text import Text, cap_documents, check_cap, safe_name, split_text

__all__ = ["resolve_spec", "training_texts"]

_USER_TEXT_SUFFIXES = (".txt", ".md", ".py")
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


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
    return safe_name(base)


def _parse_spec(spec: str) -> tuple[str | None, str]:
    """Split ``name:spec`` unless the whole spec names a built-in, a dataset or an existing path."""
    if spec in BUILTIN_SOURCES or spec.startswith(HF_PREFIX) or Path(spec).expanduser().exists():
        return None, spec
    head, sep, rest = spec.partition(":")
    if sep and rest and _NAME_PATTERN.fullmatch(head) and not (len(head) == 1 and rest[:1] in "\\/"):
        return head, rest
    return None, spec


def resolve_spec(spec: str, *, val_fraction: float, max_bytes: int | None, seed: int) -> Text | tuple[str, Path]:
    """The text behind a spec, or ``(name, path)`` for a pre-tokenized ``.bin`` file."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"data source must be a non-empty string, got {spec!r}")
    name, target = _parse_spec(spec.strip())
    if target == "code":
        return code_text(max_bytes, name or "code")
    if target == "prose":
        return prose_text(max_bytes, name or "prose")
    if target == "arithmetic":
        return arithmetic_corpus(val_fraction=val_fraction, seed=seed, name=name or "arithmetic")
    if target.startswith(HF_PREFIX):
        return hf_text(target, name, max_bytes=max_bytes)
    path = Path(target).expanduser()
    if not path.exists():
        raise UserError(f"data source '{target}' is neither a built-in corpus "
                        f"({', '.join(BUILTIN_SOURCES)}) nor an existing file or folder; check the path")
    cap = check_cap(max_bytes, None)
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
            documents = cap_documents(documents, cap)
        if not any(documents):
            raise UserError(f"folder {path} holds only empty text files; give it some text")
        return Text(name, str(path), documents)
    if path.suffix.lower() == ".bin":
        return name, path
    data = path.read_bytes()
    return Text(name, str(path), [data[:cap] if cap is not None else data])


def training_texts(spec: str, *, max_bytes: int | None, val_fraction: float, seed: int) -> list[str]:
    """The training-split documents of a text source, as strings (for training a tokenizer)."""
    text = resolve_spec(spec, val_fraction=val_fraction, max_bytes=max_bytes, seed=seed)
    if not isinstance(text, Text):
        raise UserError(f"data source '{text[1]}' is pre-tokenized (.bin), so a tokenizer cannot be trained on "
                        f"it; train on text sources, or use the tokens as they are without a 'bpe' tokenizer")
    train_docs, _ = split_text(text, val_fraction, char_boundary=True)
    return [d.decode("utf-8", errors="replace") for d in train_docs]
