"""Tests for the sharpscope.training.data package (tokenizers, corpora, user data, datasets, batch sampler)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from sharpscope.errors import UserError
from sharpscope.training.data import (
    ARITHMETIC_OPERATORS,
    TOKENIZER_FILE,
    BatchSampler,
    BPETokenizer,
    ByteTokenizer,
    TokenSource,
    arithmetic_problems,
    bits_per_byte,
    check_vocab,
    clear_cache,
    load_source,
    load_sources,
    make_tokenizer,
    validation_batches,
)
from sharpscope.training.data import tokenizers as tokenizers_module

PROPS = settings(max_examples=100, deadline=None)
# Small caps keep the built-in corpora quick to build; the defaults are exercised by the
# benchmarks, and the code paths are the same.
CODE_BYTES, PROSE_BYTES = 300_000, 300_000
LINE = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)")
TOK = ByteTokenizer()


def text_of(tokens) -> bytes:
    return np.asarray(tokens, dtype=np.uint8).tobytes()


def answer(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


@pytest.fixture(scope="module")
def code():
    return load_source("code", max_bytes=CODE_BYTES)


@pytest.fixture(scope="module")
def prose():
    return load_source("prose", max_bytes=PROSE_BYTES)


@pytest.fixture(scope="module")
def arithmetic():
    return load_source("arithmetic")


@pytest.fixture(scope="module")
def builtins(code, prose, arithmetic):
    return {"code": code, "prose": prose, "arithmetic": arithmetic}


# --------------------------------------------------------------------------- tokenizer


@PROPS
@given(st.text())
def test_byte_tokenizer_round_trips_text(text):
    ids = TOK.encode(text)
    assert ids.dtype == np.uint16
    assert len(ids) == len(text.encode("utf-8"))
    assert TOK.decode(ids) == text
    assert TOK.decode(torch.from_numpy(ids.astype(np.int64))) == text
    assert TOK.decode(ids.tolist()) == text


@PROPS
@given(st.binary())
def test_byte_tokenizer_decodes_any_bytes(data):
    ids = np.frombuffer(data, dtype=np.uint8)
    assert TOK.decode(ids) == data.decode("utf-8", errors="replace")


def test_byte_tokenizer_constants_and_range():
    assert (TOK.vocab_size, TOK.name) == (256, "bytes")
    assert TOK.encode("é").tolist() == [0xC3, 0xA9]
    with pytest.raises(ValueError):
        TOK.decode([256])


# --------------------------------------------------------------------------- built-in corpora


@pytest.mark.parametrize("name", ["code", "prose", "arithmetic"])
def test_builtin_source_loads(builtins, name):
    source = builtins[name]
    assert isinstance(source, TokenSource) and source.name == name
    assert source.train.dtype == source.val.dtype == np.uint16
    assert len(source.train) > 10_000 and len(source.val) > 500
    assert source.tokens_per_byte == 1.0 and source.tokenizer == "bytes"
    # About 5% for validation (text cuts move to a document start, within a quarter).
    assert 0.05 * 0.7 < len(source.val) / (len(source.train) + len(source.val)) < 0.05 * 1.3
    assert not source.train.flags.writeable  # cached corpora are shared, so read-only


@pytest.mark.parametrize("name,cap", [("code", CODE_BYTES), ("prose", PROSE_BYTES)])
def test_text_corpora_respect_cap(builtins, name, cap):
    source = builtins[name]
    assert len(source.train) + len(source.val) == cap


@pytest.mark.parametrize("name,kwargs", [("code", {"max_bytes": CODE_BYTES}),
                                         ("prose", {"max_bytes": PROSE_BYTES}),
                                         ("arithmetic", {"seed": 0})])
def test_builtin_source_is_deterministic(builtins, name, kwargs):
    clear_cache()  # rebuild from the files, not from the in-process cache
    again = load_source(name, **kwargs)
    np.testing.assert_array_equal(again.train, builtins[name].train)
    np.testing.assert_array_equal(again.val, builtins[name].val)


def _digest(sources) -> str:
    h = hashlib.sha256()
    for s in sources:
        h.update(np.ascontiguousarray(s.train).tobytes())
        h.update(np.ascontiguousarray(s.val).tobytes())
    return h.hexdigest()


def test_builtin_sources_are_the_same_in_another_process(builtins, code_text):
    # Guards against anything that varies between processes (hash seeds, listing order), and
    # for the BPE trainer, whose hash maps are seeded per process: ties in pair counts must
    # not depend on it. One subprocess for both, as starting one costs seconds.
    bpe_line = (
        "import importlib.util\n"
        "if importlib.util.find_spec('tokenizers'):\n"
        "    from sharpscope.training.data import BPETokenizer\n"
        "    text = np.asarray(load_source('code', max_bytes=%d).train, np.uint8).tobytes()\n"
        "    text = text.decode('utf-8', errors='replace')[:%d]\n"
        "    print(BPETokenizer.train([text], %d).fingerprint)\n"
    ) % (CODE_BYTES, BPE_TRAIN_CHARS, BPE_VOCAB)
    script = (
        "import hashlib, numpy as np\n"
        "from sharpscope.training.data import load_source\n"
        "h = hashlib.sha256()\n"
        f"for spec, cap in (('code', {CODE_BYTES}), ('prose', {PROSE_BYTES}), ('arithmetic', None)):\n"
        "    s = load_source(spec, max_bytes=cap)\n"
        "    h.update(np.ascontiguousarray(s.train).tobytes()); h.update(np.ascontiguousarray(s.val).tobytes())\n"
        "print(h.hexdigest())\n"
    ) + bpe_line
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""})
    lines = out.stdout.split()
    assert lines[0] == _digest([builtins["code"], builtins["prose"], builtins["arithmetic"]])
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return
    assert lines[1] == BPETokenizer.train([code_text], BPE_VOCAB).fingerprint


def test_code_is_python_source_split_between_files(code):
    train, val = text_of(code.train).decode(), text_of(code.val).decode()
    headers = re.compile(r"^# ---- (\S+\.py) ----$", re.M)
    train_files, val_files = set(headers.findall(train)), set(headers.findall(val))
    assert len(train_files) > 5 and val_files
    assert train_files.isdisjoint(val_files)
    assert val.startswith("# ---- ")  # the cut falls on a file boundary
    assert "def " in train and "import " in train


def test_prose_is_english_and_val_is_not_in_train(prose):
    train, val = text_of(prose.train), text_of(prose.val)
    words = re.findall(rb"[a-z]+", train.lower())
    common = sum(w in (b"the", b"of", b"a", b"is", b"to", b"and") for w in words)
    assert common / len(words) > 0.1
    for start in range(0, len(val) - 256, max(1, (len(val) - 256) // 8)):
        assert val[start:start + 256] not in train


def test_prose_ignores_ordinary_code():
    # Docstrings come from parsing, so code bodies never leak in.
    prose = load_source("prose", max_bytes=PROSE_BYTES)
    text = text_of(prose.train).decode("utf-8", errors="replace")
    assert "def __init__(self" not in text


def test_arithmetic_lines_are_all_correct(arithmetic):
    for split in (arithmetic.train, arithmetic.val):
        lines = text_of(split).decode("ascii").splitlines()
        assert len(lines) > 100
        ops = set()
        for line in lines:
            m = LINE.fullmatch(line)
            assert m, line
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert 0 <= a <= 99 and 0 <= b <= 99
            assert answer(a, op, b) == c, line
            ops.add(op)
        assert ops == set(ARITHMETIC_OPERATORS)


def test_arithmetic_val_problems_never_appear_in_train(arithmetic):
    train = set(text_of(arithmetic.train).decode().splitlines())
    val = set(text_of(arithmetic.val).decode().splitlines())
    assert train.isdisjoint(val)


def test_arithmetic_seed_changes_the_stream_not_the_held_out_set(arithmetic):
    other = load_source("arithmetic", seed=1)
    assert not np.array_equal(other.train[:1000], arithmetic.train[:1000])
    val0 = set(text_of(arithmetic.val).decode().splitlines())
    train1 = set(text_of(other.train).decode().splitlines())
    assert val0.isdisjoint(train1)


def test_arithmetic_problems_are_right_and_held_out(arithmetic):
    problems = arithmetic_problems(300, seed=3)
    assert len(problems) == 300 and len(set(problems)) == 300  # no repeats within the pool
    for prompt, ans in problems:
        m = LINE.fullmatch(prompt + ans)
        assert m and prompt.endswith("=")
        assert answer(int(m[1]), m[2], int(m[3])) == int(ans)
    assert problems == arithmetic_problems(300, seed=3)
    assert problems != arithmetic_problems(300, seed=4)
    train_lines = set(text_of(arithmetic.train).decode().splitlines())
    assert not any(p + a in train_lines for p, a in problems)
    seen = [p + a for p, a in arithmetic_problems(200, seed=0, split="train")]
    assert sum(line in train_lines for line in seen) > 150
    assert len(arithmetic_problems(5000, seed=0)) == 5000  # beyond the pool: it repeats


# --------------------------------------------------------------------------- user data


def test_text_file_loads(tmp_path):
    path = tmp_path / "story.txt"
    text = "Once upon a time, naïve café owners sold tea. " * 200
    path.write_text(text, encoding="utf-8")
    source = load_source(str(path), block_size=64)
    assert source.name == "story" and source.origin == str(path)
    assert text_of(np.concatenate([source.train, source.val])).decode() == text
    assert len(source.val) == round(0.05 * len(text.encode()))


def test_folder_loads_text_files_sorted_recursively(tmp_path):
    (tmp_path / "b.md").write_text("B" * 300)
    (tmp_path / "a.txt").write_text("A" * 300)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.py").write_text("C" * 300)
    (tmp_path / "skip.csv").write_text("X" * 300)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD.txt").write_text("Z" * 300)
    source = load_source(str(tmp_path), val_fraction=0.3)
    text = text_of(np.concatenate([source.train, source.val])).decode()
    assert text == "A" * 300 + "\n\n" + "B" * 300 + "\n\n" + "C" * 300
    # 30% asks for 271 tokens; the last file's start (300 tokens before the end) is near enough.
    assert text_of(source.val).decode() == "C" * 300
    assert source.name == tmp_path.name


def test_bin_file_loads_with_and_without_val(tmp_path):
    tokens = (np.arange(5000) % 300).astype(np.uint16)
    (tmp_path / "train.bin").write_bytes(tokens.tobytes())
    alone = load_source(str(tmp_path / "train.bin"))
    np.testing.assert_array_equal(np.concatenate([alone.train, alone.val]), tokens)
    assert len(alone.val) == 250 and alone.tokens_per_byte is None
    assert alone.name == tmp_path.name

    val = (np.arange(700) % 300).astype(np.uint16)
    val.tofile(tmp_path / "val.bin")
    paired = load_source(f"mydata:{tmp_path / 'train.bin'}")
    assert paired.name == "mydata"
    np.testing.assert_array_equal(paired.train, tokens)
    np.testing.assert_array_equal(paired.val, val)
    with pytest.raises(UserError, match="vocab"):
        check_vocab({"mydata": paired}, 256)
    check_vocab({"mydata": paired}, 300)


def test_named_spec_for_builtin_and_duplicates(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello world " * 100)
    sources = load_sources(["arithmetic", f"mine:{path}"])
    assert list(sources) == ["arithmetic", "mine"]
    assert load_source("maths:arithmetic").name == "maths"
    with pytest.raises(UserError, match="two data sources"):
        load_sources([str(path), str(path)])


@pytest.mark.parametrize("case", ["missing", "empty", "short", "odd_bin", "empty_bin", "empty_folder"])
def test_user_errors_name_the_path(tmp_path, case):
    if case == "missing":
        path = tmp_path / "nowhere.txt"
    elif case == "empty":
        path = tmp_path / "empty.txt"
        path.write_bytes(b"")
    elif case == "short":
        path = tmp_path / "short.txt"
        path.write_text("too short")
    elif case == "odd_bin":
        path = tmp_path / "train.bin"
        path.write_bytes(b"\x01\x00\x02")
    elif case == "empty_bin":
        path = tmp_path / "tokens.bin"
        path.write_bytes(b"")
    else:
        path = tmp_path / "nothing_here"
        path.mkdir()
        (path / "data.csv").write_text("1,2,3")
    with pytest.raises(UserError) as err:
        load_source(str(path), block_size=64)
    message = str(err.value)
    assert str(path) in message and "\n" not in message


def test_bad_val_fraction_is_refused():
    with pytest.raises(UserError, match="val_fraction"):
        load_source("arithmetic", val_fraction=1.0)


# --------------------------------------------------------------------------- sampler


@pytest.fixture(scope="module")
def mixture(code, arithmetic):
    return {"code": code, "arithmetic": arithmetic}


def contains_window(source_tokens: np.ndarray, row) -> bool:
    return text_of(row.numpy()) in text_of(source_tokens)


def test_batches_are_shifted_windows_of_the_named_source(mixture):
    sampler = BatchSampler(mixture, batch_size=8, block_size=32, seed=1)
    x, y = sampler.batch_at(5)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.long
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[:, 1:], y[:, :-1])
    for name, xr, yr in zip(sampler.rows_per_source(5), x, y):
        assert contains_window(mixture[name].train, torch.cat([xr, yr[-1:]]))


def test_sampler_is_deterministic_and_seeded(mixture):
    a = BatchSampler(mixture, batch_size=4, block_size=16, seed=7)
    b = BatchSampler(dict(reversed(list(mixture.items()))), batch_size=4, block_size=16, seed=7)
    c = BatchSampler(mixture, batch_size=4, block_size=16, seed=8)
    for k in range(5):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.batch_at(0)[0], c.batch_at(0)[0])


def test_batch_at_equals_kth_next_batch_and_does_not_move(mixture):
    sampler = BatchSampler(mixture, batch_size=4, block_size=16, seed=2)
    expected = [sampler.batch_at(k) for k in range(6)]
    assert sampler.position == 0
    for k in range(6):
        x, y = sampler.next_batch()
        assert torch.equal(x, expected[k][0]) and torch.equal(y, expected[k][1])
    assert sampler.state_dict() == {"position": 6}


def test_state_round_trip_resumes_exactly(mixture):
    first = BatchSampler(mixture, batch_size=4, block_size=16, seed=3)
    for _ in range(3):
        first.next_batch()
    state = first.state_dict()
    rest = [first.next_batch() for _ in range(4)]
    resumed = BatchSampler(mixture, batch_size=4, block_size=16, seed=3)
    resumed.load_state_dict(state)
    for x, y in rest:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)
    with pytest.raises(UserError, match="position"):
        resumed.load_state_dict({"step": 3})


def test_mixture_weights_are_respected(mixture):
    sampler = BatchSampler(mixture, batch_size=16, block_size=32, weights={"code": 0.8, "arithmetic": 0.2})
    names = [n for k in range(200) for n in sampler.rows_per_source(k)]
    assert abs(names.count("code") / len(names) - 0.8) < 0.05
    # The labels tell the truth: arithmetic rows hold only digits, operators and newlines.
    x, _ = sampler.batch_at(0)
    for name, row in zip(sampler.rows_per_source(0), x):
        only_arithmetic = set(text_of(row.numpy())) <= set(b"0123456789+-*=\n")
        assert only_arithmetic == (name == "arithmetic")


def test_zero_weight_excludes_a_source(mixture):
    sampler = BatchSampler(mixture, batch_size=16, block_size=8, weights={"code": 0, "arithmetic": 1})
    assert all(n == "arithmetic" for k in range(50) for n in sampler.rows_per_source(k))
    x, _ = sampler.source_batch("code", 0)  # still there for per-source evaluation
    assert contains_window(mixture["code"].train, x[0])


@pytest.mark.parametrize("weights,match", [
    ({"code": -1, "arithmetic": 1}, "finite number"),
    ({"code": 0, "arithmetic": 0}, "all source weights are zero"),
    ({"code": 1, "arithmetic": 1, "maths": 1}, "unknown source"),
    ({"code": 1}, "no weight"),
    ({"code": float("nan"), "arithmetic": 1}, "finite number"),
])
def test_bad_weights_are_refused(mixture, weights, match):
    with pytest.raises(UserError, match=match):
        BatchSampler(mixture, batch_size=2, block_size=8, weights=weights)


def test_short_source_is_refused(tmp_path, arithmetic):
    path = tmp_path / "tiny.txt"
    path.write_text("x" * 200)
    tiny = load_source(str(path))
    with pytest.raises(UserError, match="tiny") as err:
        BatchSampler({"tiny": tiny, "arithmetic": arithmetic}, batch_size=2, block_size=190)
    assert str(path) in str(err.value)


def test_source_batch_is_from_one_source_and_stable(mixture, prose):
    sampler = BatchSampler(mixture, batch_size=6, block_size=24, seed=4)
    x, y = sampler.source_batch("arithmetic", 3)
    assert all(contains_window(mixture["arithmetic"].train, r) for r in x)
    assert torch.equal(x[:, 1:], y[:, :-1])
    bigger = BatchSampler({**mixture, "prose": prose}, batch_size=6, block_size=24, seed=4)
    assert torch.equal(bigger.source_batch("arithmetic", 3)[0], x)
    assert not torch.equal(sampler.source_batch("arithmetic", 4)[0], x)
    with pytest.raises(UserError, match="unknown data source"):
        sampler.source_batch("maths", 0)


def test_val_split_sampler_draws_from_val(arithmetic):
    sampler = BatchSampler({"arithmetic": arithmetic}, batch_size=4, block_size=24, split="val")
    x, _ = sampler.next_batch()
    assert all(contains_window(arithmetic.val, r) for r in x)


# --------------------------------------------------------------------------- validation batches


def test_validation_batches_are_fixed_and_from_val(mixture):
    first = validation_batches(mixture, batch_size=4, block_size=32, n_batches=3, seed=0)
    again = validation_batches(mixture, batch_size=4, block_size=32, n_batches=3, seed=0)
    assert list(first) == list(mixture)
    train_lines = set(text_of(mixture["arithmetic"].train).decode().splitlines())
    for name, batches in first.items():
        assert len(batches) == 3
        for (x, y), (x2, y2) in zip(batches, again[name]):
            assert x.shape == (4, 32) and torch.equal(x, x2) and torch.equal(y, y2)
            assert torch.equal(x[:, 1:], y[:, :-1])
            assert all(contains_window(mixture[name].val, r) for r in x)
    # Held-out arithmetic: every complete line in a validation window is unseen in training.
    for x, _ in first["arithmetic"]:
        for row in x:
            complete = text_of(row.numpy()).decode().split("\n")[1:-1]
            assert complete and not any(line in train_lines for line in complete)
    # Stratified: windows spread across the split, in order.
    starts = [text_of(mixture["code"].val).find(text_of(r.numpy())) for x, _ in first["code"] for r in x]
    assert starts == sorted(starts) and starts[-1] > len(mixture["code"].val) // 2


def test_validation_batches_refuse_short_val(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("y" * 400)
    with pytest.raises(UserError, match="val tokens"):
        validation_batches({"small": load_source(str(path))}, batch_size=2, block_size=32, n_batches=1)


# --------------------------------------------------------------------------- bits per byte


def test_bits_per_byte():
    assert bits_per_byte(math.log(2)) == pytest.approx(1.0)
    assert bits_per_byte(2.0) == pytest.approx(2.0 / math.log(2))
    assert bits_per_byte(3.0, tokens_per_byte=0.25) == pytest.approx(0.75 / math.log(2))
    with pytest.raises(ValueError):
        bits_per_byte(1.0, tokens_per_byte=0)


# --------------------------------------------------------------------------- BPE tokenizer

BPE_TRAIN_CHARS = 200_000  # a slice of the code corpus: enough for 512 tokens, trained in ~0.1 s
BPE_VOCAB = 512
UNICODE_SAMPLE = "naïve café — 日本語 🎉 Ünïcödé\r\n\tx = {'ß': 1}\x00\u200b end  "
# Text shaped like the training data (so merges apply), mixed with arbitrary characters.
CODEISH = st.text(alphabet=st.one_of(st.sampled_from(list("def self return ():.,=_\n\t    éß日🎉")),
                                     st.characters()), max_size=200)


@pytest.fixture(scope="module")
def code_text(code) -> str:
    return text_of(code.train).decode("utf-8", errors="replace")[:BPE_TRAIN_CHARS]


@pytest.fixture(scope="module")
def bpe(code_text):
    pytest.importorskip("tokenizers")
    return BPETokenizer.train([code_text], BPE_VOCAB)


@pytest.fixture(scope="module")
def bpe_code(bpe):
    return load_source("code", max_bytes=CODE_BYTES, tokenizer=bpe)


@PROPS
@given(st.one_of(st.text(), CODEISH))
@example("a\ud800b\udfff")
def test_bpe_round_trips_text(bpe, text):
    # UTF-8 cannot encode lone surrogates; both tokenizers read each as U+FFFD.
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
        expected = "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)
        assert bpe.decode(bpe.encode(text)) == expected
        assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == expected
        text = expected
    ids = bpe.encode(text)
    assert ids.dtype == np.uint16
    assert len(ids) == 0 or int(ids.max()) < bpe.vocab_size
    assert bpe.decode(ids) == text
    assert bpe.decode(torch.from_numpy(ids.astype(np.int64))) == text
    assert bpe.encode_batch([text, text])[1].tolist() == ids.tolist()


def test_bpe_round_trips_known_text(bpe, code_text):
    for text in (UNICODE_SAMPLE, code_text[:20_000], "", " ", "\n\n\n"):
        assert bpe.decode(bpe.encode(text)) == text
    assert bpe.vocab_size == BPE_VOCAB and bpe.name == "bpe"
    with pytest.raises(ValueError):
        bpe.decode([BPE_VOCAB])


def test_bpe_long_texts_encode_in_chunks_to_the_same_tokens(bpe, code_text, monkeypatch):
    # Long texts are cut at newlines and encoded in parallel; the tokens must not change.
    monkeypatch.setattr(tokenizers_module, "_ENCODE_CHUNK_CHARS", 2048)
    text = code_text[:30_000] + "\n\n  \n" + UNICODE_SAMPLE * 200 + "\nx\ny\n" + "1+2=3\n" * 3000
    assert len(bpe._chunks(text)) > 10 and "".join(bpe._chunks(text)) == text
    whole = bpe._tokenizer.encode(text, add_special_tokens=False).ids
    assert bpe.encode(text).tolist() == whole
    assert [a.tolist() for a in bpe.encode_batch([text, "short", text[:1000]])] == \
        [whole, bpe.encode("short").tolist(), bpe.encode(text[:1000]).tolist()]


def test_bpe_is_deterministic(bpe, code_text):
    again = BPETokenizer.train([code_text], BPE_VOCAB)
    assert again.fingerprint == bpe.fingerprint
    assert again._tokenizer.get_vocab() == bpe._tokenizer.get_vocab()
    sample = code_text[-5_000:] + UNICODE_SAMPLE
    np.testing.assert_array_equal(again.encode(sample), bpe.encode(sample))


def test_bpe_save_and_load_round_trip(bpe, code_text, tmp_path):
    file = bpe.save(tmp_path / "run" / TOKENIZER_FILE)
    assert file == tmp_path / "run" / TOKENIZER_FILE
    assert [p.name for p in file.parent.iterdir()] == [TOKENIZER_FILE]  # no temporary file left
    assert bpe.save(tmp_path / "run") == file  # a folder means the tokenizer.json inside it
    sample = code_text[:10_000] + UNICODE_SAMPLE
    for loaded in (BPETokenizer.from_file(file), BPETokenizer.from_file(tmp_path / "run")):
        assert loaded.vocab_size == bpe.vocab_size and loaded.fingerprint == bpe.fingerprint
        np.testing.assert_array_equal(loaded.encode(sample), bpe.encode(sample))
        assert loaded.decode(bpe.encode(sample)) == sample
    with pytest.raises(UserError, match="no tokenizer file"):
        BPETokenizer.from_file(tmp_path / "elsewhere.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="broken.json"):
        BPETokenizer.from_file(tmp_path / "broken.json")


def test_bpe_source_compresses_and_keeps_the_split(bpe, bpe_code, code):
    assert bpe_code.tokenizer == "bpe" and bpe_code.name == "code"
    assert bpe_code.train.dtype == bpe_code.val.dtype == np.uint16
    assert bpe_code.max_token() < BPE_VOCAB
    # The split is made on the text, so both tokenizers see the same training and validation text.
    assert bpe.decode(bpe_code.train) == text_of(code.train).decode("utf-8", errors="replace")
    assert bpe.decode(bpe_code.val) == text_of(code.val).decode("utf-8", errors="replace")
    n_bytes = len(code.train) + len(code.val)  # byte tokens: one per byte
    assert bpe_code.tokens_per_byte == pytest.approx((len(bpe_code.train) + len(bpe_code.val)) / n_bytes, rel=1e-4)
    assert bpe_code.val_tokens_per_byte == pytest.approx(len(bpe_code.val) / len(code.val), rel=1e-3)
    assert bpe_code.tokens_per_byte < 0.6
    assert code.tokens_per_byte == code.val_tokens_per_byte == 1.0
    # Bits per byte is a property of the text, whatever the tokenizer: the same total
    # code length in nats gives the same value.
    nats = 1000.0
    assert bits_per_byte(nats / (len(bpe_code.train) + len(bpe_code.val)), bpe_code.tokens_per_byte) == \
        pytest.approx(bits_per_byte(nats / n_bytes, 1.0), rel=1e-3)
    with pytest.raises(UserError, match="vocab"):
        check_vocab({"code": bpe_code}, 256)
    check_vocab({"code": bpe_code}, BPE_VOCAB)


def test_builtin_cache_does_not_mix_tokenizers(bpe, bpe_code, code):
    # Corpora are cached as text, so each tokenizer encodes it afresh.
    byte_again = load_source("code", max_bytes=CODE_BYTES)
    bpe_again = load_source("code", max_bytes=CODE_BYTES, tokenizer=bpe)
    np.testing.assert_array_equal(byte_again.train, code.train)
    np.testing.assert_array_equal(bpe_again.train, bpe_code.train)
    assert len(bpe_again.train) < 0.6 * len(byte_again.train)
    assert byte_again.tokenizer == "bytes" and bpe_again.tokenizer == "bpe"


def test_bpe_sources_of_every_kind(bpe, tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(UNICODE_SAMPLE * 300, encoding="utf-8")
    tokens = (np.arange(3000) % 300).astype(np.uint16)
    (tmp_path / "tokens.bin").write_bytes(tokens.tobytes())
    sources = load_sources(["arithmetic", str(path), str(tmp_path / "tokens.bin")], tokenizer=bpe)
    story = sources["story"]
    assert story.tokenizer == "bpe" and story.max_token() < BPE_VOCAB
    assert bpe.decode(story.train) + bpe.decode(story.val) == UNICODE_SAMPLE * 300  # cut at a character boundary
    assert sources["arithmetic"].tokenizer == "bpe"
    assert LINE.fullmatch(bpe.decode(sources["arithmetic"].val).splitlines()[0])
    pretokenized = sources["tokens"]  # .bin files keep their tokens
    assert pretokenized.tokenizer == "pretokenized" and pretokenized.tokens_per_byte is None
    np.testing.assert_array_equal(np.concatenate([pretokenized.train, pretokenized.val]), tokens)


def test_bpe_vocabulary_limits(code_text):
    tokenizers = pytest.importorskip("tokenizers")
    with pytest.raises(UserError, match="65536"):
        BPETokenizer.train([code_text], 70_000)
    with pytest.raises(UserError, match="vocab_size"):
        BPETokenizer.train([code_text], 100)
    with pytest.raises(UserError, match="smaller vocab_size"):
        BPETokenizer.train(["tiny text"], 1000)
    with pytest.raises(UserError, match="no text"):
        BPETokenizer.train([], 300)
    # A (loaded) tokenizer beyond uint16 refuses to encode rather than wrap ids around.
    vocab = {f"t{i}": i for i in range(70_000)}
    big = BPETokenizer(tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [])))
    with pytest.raises(UserError, match="uint16"):
        big.encode("t1")


# --------------------------------------------------------------------------- make_tokenizer


def test_make_tokenizer_trains_saves_then_loads(tmp_path):
    pytest.importorskip("tokenizers")
    file = tmp_path / "run" / TOKENIZER_FILE
    made = make_tokenizer("bpe", vocab_size=300, train_specs=["code"], max_bytes=50_000, path=file)
    assert isinstance(made, BPETokenizer) and made.vocab_size == 300 and file.is_file()
    assert sorted(p.name for p in file.parent.iterdir()) == [TOKENIZER_FILE]
    loaded = make_tokenizer("bpe", vocab_size=300, path=file)  # no sources needed to load
    assert loaded.fingerprint == made.fingerprint
    assert make_tokenizer("bpe", vocab_size=300, path=file.parent).fingerprint == made.fingerprint
    with pytest.raises(UserError, match="300 tokens"):
        make_tokenizer("bpe", vocab_size=512, path=file)
    unsaved = make_tokenizer("bpe", vocab_size=300, train_specs="code", max_bytes=50_000)
    assert unsaved.fingerprint == made.fingerprint
    # A path without .json is a folder (a run's folder), created if need be.
    in_folder = make_tokenizer("bpe", vocab_size=300, train_specs="code", max_bytes=50_000, path=tmp_path / "r2")
    assert (tmp_path / "r2" / TOKENIZER_FILE).is_file()
    assert BPETokenizer.from_file(tmp_path / "r2").fingerprint == in_folder.fingerprint == made.fingerprint


def test_make_tokenizer_trains_on_the_training_split_only(tmp_path, code_text):
    pytest.importorskip("tokenizers")
    # The last 5% of this file (the validation split) holds all the "qz", which training never sees.
    path = tmp_path / "corpus.txt"
    path.write_text(code_text[:40_000] + "\n" + "qz" * 500, encoding="utf-8")
    held_out = make_tokenizer("bpe", vocab_size=300, train_specs=[str(path)])
    assert len(held_out.encode("qz")) == 2
    everything = make_tokenizer("bpe", vocab_size=300, train_specs=[str(path)], val_fraction=0)
    assert len(everything.encode("qz")) == 1


def test_make_tokenizer_refusals(tmp_path):
    assert isinstance(make_tokenizer("bytes"), ByteTokenizer)
    with pytest.raises(UserError, match="bytes, bpe"):
        make_tokenizer("wordpiece")
    pytest.importorskip("tokenizers")
    (tmp_path / "train.bin").write_bytes(np.arange(1000, dtype=np.uint16).tobytes())
    with pytest.raises(UserError, match="pre-tokenized"):
        make_tokenizer("bpe", vocab_size=300, train_specs=["code", str(tmp_path / "train.bin")], max_bytes=50_000)
    with pytest.raises(UserError, match="train_specs"):
        make_tokenizer("bpe", vocab_size=300, path=tmp_path / "absent" / TOKENIZER_FILE)
    assert not (tmp_path / "absent").exists()
    with pytest.raises(UserError, match="vocab_size"):
        make_tokenizer("bpe", vocab_size=2 ** 16 + 1, train_specs=["code"])


# --------------------------------------------------------------------------- Hugging Face datasets


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _rows(n, prefix="doc"):
    return [{"text": f"{prefix} {i}: naïve café 日本 " + "word " * (i % 7), "title": f"title {i}", "n": i}
            for i in range(n)]


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_hf_jsonl_loads_the_text_field(tmp_path, offline):
    datasets = pytest.importorskip("datasets")
    rows = _rows(300)
    path = tmp_path / "corpus.jsonl"
    _write_jsonl(path, rows)
    cache = sorted(Path(datasets.config.HF_DATASETS_CACHE).rglob("*")) \
        if Path(datasets.config.HF_DATASETS_CACHE).exists() else []
    source = load_source(f"hf:{path}", block_size=32)
    assert source.name == "corpus" and source.tokenizer == "bytes" and source.tokens_per_byte == 1.0
    expected = "".join(r["text"] + "\n\n" for r in rows)
    assert text_of(np.concatenate([source.train, source.val])).decode() == expected
    val = text_of(source.val).decode()
    assert val.startswith("doc ") and 0.035 < len(source.val) / len(expected.encode()) < 0.065
    # Nothing left beside the data, nor in the user's datasets cache.
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.jsonl"]
    after = Path(datasets.config.HF_DATASETS_CACHE)
    assert (sorted(after.rglob("*")) if after.exists() else []) == cache

    titles = load_source(f"titles:hf:{path}?field=title", val_fraction=0.1)
    assert titles.name == "titles"
    assert text_of(np.concatenate([titles.train, titles.val])).decode() == "".join(
        r["title"] + "\n\n" for r in rows)


def test_hf_uses_a_validation_split_and_any_tokenizer(tmp_path, offline, bpe):
    pytest.importorskip("datasets")
    folder = tmp_path / "mycorpus"
    train_rows, val_rows = _rows(200), _rows(20, prefix="held out")
    _write_jsonl(folder / "train.jsonl", train_rows)
    _write_jsonl(folder / "validation.jsonl", val_rows)
    source = load_source(f"hf:{folder}", tokenizer=bpe)
    assert source.name == "mycorpus" and source.tokenizer == "bpe"
    assert bpe.decode(source.train) == "".join(r["text"] + "\n\n" for r in train_rows)
    assert bpe.decode(source.val) == "".join(r["text"] + "\n\n" for r in val_rows)
    n_bytes = sum(len((r["text"] + "\n\n").encode()) for r in train_rows + val_rows)
    assert source.tokens_per_byte == pytest.approx((len(source.train) + len(source.val)) / n_bytes)
    # A single file of the folder, by its file name, takes the folder's name.
    assert load_source(f"hf:{folder / 'train.jsonl'}").name == "mycorpus"
    # Tokenizers train on the training split, and the .txt format gives a row per line.
    made = make_tokenizer("bpe", vocab_size=270, train_specs=[f"hf:{folder}"])
    assert made.vocab_size == 270
    (tmp_path / "notes.txt").write_text("line one\n\nline three\n" * 50, encoding="utf-8")
    notes = load_source(f"hf:{tmp_path / 'notes.txt'}", val_fraction=0)
    assert text_of(notes.train).decode() == "line one\n\nline three\n" * 50


@pytest.mark.parametrize("case", ["missing_field", "missing_file", "not_text", "bad_option", "no_split",
                                  "not_cached"])
def test_hf_errors_are_one_line_and_name_the_problem(tmp_path, offline, case):
    pytest.importorskip("datasets")
    path = tmp_path / "corpus.jsonl"
    _write_jsonl(path, _rows(50))
    spec, named = {
        "missing_field": (f"hf:{path}?field=body", "'body'"),
        "missing_file": (f"hf:{tmp_path / 'nowhere.jsonl'}", str(tmp_path / "nowhere.jsonl")),
        "not_text": (f"hf:{path}?field=n", "'n'"),
        "bad_option": (f"hf:{path}?colum=text", "'colum'"),
        "no_split": (f"hf:{path}?split=test", "'test'"),
        "not_cached": ("hf:nobody-xyz/no-such-dataset", "local Hugging Face cache"),
    }[case]
    with pytest.raises(UserError) as err:
        load_source(spec)
    message = str(err.value)
    assert named in message and "\n" not in message


def test_hf_without_datasets_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "corpus.jsonl"
    _write_jsonl(path, _rows(5))
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(UserError, match=re.escape("pip install 'sharpscope[hf]'")):
        load_source(f"hf:{path}")
