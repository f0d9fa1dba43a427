"""Hugging Face datasets as text sources: ``hf:TARGET[?key=value&key=value...]``.

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
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qsl

from ...errors import UserError
from .text import Text, cap_documents, check_cap, safe_name

__all__ = ["HF_PREFIX", "HF_OPTIONS", "hf_text"]

HF_PREFIX = "hf:"
HF_OPTIONS = ("split", "val", "field", "config")
"""Options of an ``hf:`` spec, written ``hf:TARGET?split=train&field=text``."""
_HF_BUILDERS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".txt": "text", ".text": "text",
                ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
_HF_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_SPLIT_FILE_STEMS = frozenset({"train", "training", "validation", "valid", "val", "dev", "test", "data"})


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
    return safe_name(base)


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


def hf_text(spec: str, name: str | None, *, max_bytes: int | None) -> Text:
    """A Hugging Face dataset (local file, folder, ``save_to_disk`` folder, or cached Hub dataset)."""
    target, options = _parse_hf(spec)
    cap = check_cap(max_bytes, None)
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
            return cap_documents(documents, cap) if cap is not None else list(documents)

        train_docs = read(split)
        val_docs = read(val_split) if val_split is not None else None
        loaded = splits = None  # release the memory-mapped Arrow files before the cache goes
    return Text(name or _hf_default_name(target, path if path.exists() else None), spec, train_docs, val_docs)
