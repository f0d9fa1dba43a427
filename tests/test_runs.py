"""Tests for sharpscope.runs (the on-disk run format)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sharpscope import runs
from sharpscope.errors import UserError
from sharpscope.runs import (CONFIG_FILE, METRICS_FILE, RunWriter, atomic_write_text, find_runs, metrics_line,
                             read_run, read_study, write_run)

PROPS = settings(max_examples=50, deadline=None)

CONFIG = {"name": "10M", "n_params": 10_000_000, "source": "simulated", "group": "scales", "seed": 42,
          "nested": {"lr": 3e-4, "tags": ["a", "b"]}}


def visible(rows):
    """Rows as logged: the reader may attach private bookkeeping keys (NUL-prefixed) to each row."""
    return [{k: v for k, v in r.items() if not k.startswith("\0")} for r in rows]


def rows_for(n=5):
    return [{"step": i, "t": i / (n - 1), "tokens": 1000 * i, "lr": 1e-3, "sharpness/critical": 1.0 + i}
            for i in range(n)]


# --------------------------------------------------------------------------- round trip

def test_write_read_round_trip(tmp_path):
    rows = rows_for()
    rows[1]["sharpness/critical"] = float("nan")
    rows[2]["sharpness/critical"] = float("inf")
    rows[3]["sharpness/critical"] = -np.inf
    rows[4]["train/loss"] = np.float32(2.5)
    rows[4]["eval/acc/piqa"] = np.int64(1)
    out = write_run(tmp_path / "run", CONFIG, rows)
    assert out == tmp_path / "run"

    # strict JSON on disk: non-finite values written as null
    lines = (out / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 5
    parsed = [json.loads(line) for line in lines]
    assert parsed[1]["sharpness/critical"] is None
    assert parsed[2]["sharpness/critical"] is None
    assert parsed[3]["sharpness/critical"] is None
    assert "NaN" not in (out / METRICS_FILE).read_text() and "Infinity" not in (out / METRICS_FILE).read_text()

    run = read_run(out)
    assert run.config == CONFIG
    assert visible(run.metrics) == parsed
    assert run.name == "10M"
    assert run.n_params == 1e7
    assert run.group == "scales"
    assert run.model == "10M"
    assert {"step", "t", "tokens", "lr", "sharpness/critical", "train/loss", "eval/acc/piqa"} == run.keys()

    t, v = run.series("sharpness/critical")
    np.testing.assert_allclose(t, [0, 0.25, 0.5, 0.75, 1.0])
    assert v[0] == 1.0 and v[4] == 5.0
    assert np.isnan(v[1]) and np.isnan(v[2]) and np.isnan(v[3])
    t, v = run.series("train/loss")
    np.testing.assert_array_equal(t, [1.0])
    np.testing.assert_array_equal(v, [2.5])
    assert run.last("train/loss") == 2.5
    assert math.isnan(run.last("never/logged"))
    assert run.series("never/logged")[0].size == 0


def test_non_finite_config_values_become_null(tmp_path):
    cfg = dict(CONFIG, extra=float("nan"), arr=[1.0, float("inf")])
    write_run(tmp_path / "r", cfg, [])
    on_disk = json.loads((tmp_path / "r" / CONFIG_FILE).read_text())
    assert on_disk["extra"] is None
    assert on_disk["arr"] == [1.0, None]


def test_series_without_t_uses_step_fraction(tmp_path):
    rows = [{"step": s, "x": float(s)} for s in (0, 50, 100, 200)]
    run = read_run(write_run(tmp_path / "r", CONFIG, rows))
    t, v = run.series("x")
    np.testing.assert_allclose(t, [0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(v, [0, 50, 100, 200])


def test_run_defaults_for_optional_keys(tmp_path):
    cfg = {"n_params": 5, "source": "measured"}
    run = read_run(write_run(tmp_path / "myrun", cfg, []))
    assert run.name == "myrun"
    assert run.model == "myrun"
    assert run.group == "scales"
    assert run.metrics == []


finite_or_not = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10 ** 6, 10 ** 6),
                          st.none(), st.text(max_size=5), st.booleans())


@PROPS
@given(st.lists(st.dictionaries(st.sampled_from(["a", "b/c", "eval/acc/x"]), finite_or_not, max_size=3),
                max_size=6))
def test_metrics_round_trip_property(tmp_path_factory, extras):
    rows = [dict(e, step=i) for i, e in enumerate(extras)]
    path = tmp_path_factory.mktemp("prop") / "run"
    run = read_run(write_run(path, CONFIG, rows))
    assert len(run.metrics) == len(rows)
    for got, want in zip(visible(run.metrics), rows):
        assert got.keys() == want.keys()
        for k, w in want.items():
            if isinstance(w, float) and not math.isfinite(w):
                assert got[k] is None
            else:
                assert got[k] == w and type(got[k]) is type(w)


def test_copying_a_run_writes_only_logged_keys(tmp_path):
    src = read_run(write_run(tmp_path / "a", CONFIG, rows_for(3)))
    write_run(tmp_path / "b", src.config, src.metrics)
    text = (tmp_path / "b" / METRICS_FILE).read_text()
    assert "\\u0000" not in text
    assert [json.loads(line) for line in text.splitlines()] == rows_for(3)


# --------------------------------------------------------------------------- atomic writes

def test_atomic_write_replaces_content(tmp_path):
    p = tmp_path / "sub" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert os.listdir(p.parent) == ["f.txt"]


@pytest.mark.parametrize("target, exc", [("replace", OSError), ("fsync", OSError), ("replace", KeyboardInterrupt)])
def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch, target, exc):
    p = tmp_path / "metrics.jsonl"
    p.write_text("old\n")

    def boom(*a, **k):
        raise exc("simulated failure")

    monkeypatch.setattr(runs.os, target, boom)
    with pytest.raises(exc):
        atomic_write_text(p, "new content that must not appear\n")
    monkeypatch.undo()
    assert p.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_atomic_write_failure_during_write_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "config.json"
    p.write_text("{}")
    real_fdopen = os.fdopen

    class Exploding:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            self.fh.write(text[: len(text) // 2])
            raise OSError("disk full")

    monkeypatch.setattr(runs.os, "fdopen", lambda fd, *a, **k: Exploding(real_fdopen(fd, *a, **k)))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(p, '{"n_params": 1}')
    monkeypatch.undo()
    assert p.read_text() == "{}"
    assert os.listdir(tmp_path) == ["config.json"]


def test_write_run_with_bad_config_writes_nothing(tmp_path):
    with pytest.raises(UserError):
        write_run(tmp_path / "r", {"source": "simulated"}, rows_for())
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- malformed input

def _make_run(path: Path, metrics_text: str, config=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config or CONFIG))
    (path / METRICS_FILE).write_text(metrics_text)
    return path


def test_malformed_line_names_file_and_line(tmp_path):
    p = _make_run(tmp_path / "r", '{"step": 0}\n{"step": 1}\n{"step": 2,\n{"step": 3}\n')
    with pytest.raises(UserError) as err:
        read_run(p)
    msg = str(err.value)
    assert str(p / METRICS_FILE) in msg
    assert ":3:" in msg


def test_line_numbers_count_blank_lines(tmp_path):
    p = _make_run(tmp_path / "r", '{"step": 0}\n\n{"step": 1}\nnot json\n')
    with pytest.raises(UserError, match=":4:"):
        read_run(p)


def test_line_without_step_names_file_and_line(tmp_path):
    p = _make_run(tmp_path / "r", '{"step": 0}\n{"t": 0.5, "x": 1}\n')
    with pytest.raises(UserError) as err:
        read_run(p)
    assert str(p / METRICS_FILE) in str(err.value)
    assert ":2:" in str(err.value)
    assert "step" in str(err.value)


def test_non_object_line_is_rejected(tmp_path):
    p = _make_run(tmp_path / "r", '{"step": 0}\n[1, 2]\n')
    with pytest.raises(UserError, match=":2:"):
        read_run(p)


@pytest.mark.parametrize("line, key", [
    ('{"step": "3"}', "step"),
    ('{"step": null}', "step"),
    ('{"step": true}', "step"),
    ('{"step": 1, "t": "half"}', "t"),
    ('{"step": 1, "t": [0.5]}', "t"),
])
def test_non_numeric_step_or_t_is_rejected(tmp_path, line, key):
    p = _make_run(tmp_path / "r", '{"step": 0}\n' + line + "\n")
    with pytest.raises(UserError) as err:
        read_run(p)
    assert f"{p / METRICS_FILE}:2:" in str(err.value)
    assert f"'{key}'" in str(err.value)


def test_null_t_falls_back_to_step(tmp_path):
    p = _make_run(tmp_path / "r", '{"step": 0, "t": null, "x": 1}\n{"step": 4, "x": 2}\n')
    t, v = read_run(p).series("x")
    np.testing.assert_array_equal(t, [0.0, 1.0])
    np.testing.assert_array_equal(v, [1.0, 2.0])


@pytest.mark.parametrize("value", ['"1.5"', "true", "[1]", '{"a": 1}'])
def test_non_numeric_metric_value_is_rejected_by_series(tmp_path, value):
    p = _make_run(tmp_path / "r", '{"step": 0, "x": 1}\n\n{"step": 1, "x": ' + value + "}\n")
    run = read_run(p)
    assert run.series("other")[0].size == 0  # other keys still readable
    with pytest.raises(UserError) as err:
        run.series("x")
    assert f"{p / METRICS_FILE}:3:" in str(err.value)
    assert "'x'" in str(err.value)


def test_non_utf8_metrics_is_user_error(tmp_path):
    p = _make_run(tmp_path / "r", "")
    (p / METRICS_FILE).write_bytes(b'{"step": 0}\n{"step": 1, "x": "\xff"}\n')
    with pytest.raises(UserError):
        read_run(p)


def test_non_utf8_config_is_user_error(tmp_path):
    p = _make_run(tmp_path / "r", "")
    (p / CONFIG_FILE).write_bytes(b'{"n_params": 1, "source": "simulated", "name": "\xff"}')
    with pytest.raises(UserError):
        read_run(p)


def test_missing_metrics_file_reads_as_empty(tmp_path):
    p = tmp_path / "r"
    p.mkdir()
    (p / CONFIG_FILE).write_text(json.dumps(CONFIG))
    assert read_run(p).metrics == []


def test_missing_config_is_user_error(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / METRICS_FILE).write_text('{"step": 0}\n')
    with pytest.raises(UserError, match="no config.json"):
        read_run(tmp_path / "r")


def test_invalid_config_json_is_user_error(tmp_path):
    p = tmp_path / "r"
    p.mkdir()
    (p / CONFIG_FILE).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_run(p)
    (p / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        read_run(p)


@pytest.mark.parametrize("cfg, needle", [
    ({"source": "simulated"}, "missing"),
    ({"n_params": None, "source": "simulated"}, "missing"),
    ({"n_params": 0, "source": "simulated"}, "positive"),
    ({"n_params": -3.5, "source": "simulated"}, "positive"),
    ({"n_params": "10M", "source": "simulated"}, "positive"),
    ({"n_params": True, "source": "simulated"}, "positive"),
    ({"n_params": 10, "source": "real"}, "source"),
    ({"n_params": 10}, "source"),
])
def test_bad_config_is_user_error(tmp_path, cfg, needle):
    p = _make_run(tmp_path / "r", "", config=cfg)
    with pytest.raises(UserError, match=needle) as err:
        read_run(p)
    assert str(p / CONFIG_FILE) in str(err.value)
    with pytest.raises(UserError, match=needle):
        write_run(tmp_path / "w", cfg, [])
    with pytest.raises(UserError, match=needle):
        RunWriter(tmp_path / "rw", cfg)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_n_params_is_user_error(tmp_path, bad):
    with pytest.raises(UserError, match="positive"):
        write_run(tmp_path / "w", {"n_params": bad, "source": "measured"}, [])


# --------------------------------------------------------------------------- streaming writer

def test_run_writer_appends_and_resumes(tmp_path):
    p = tmp_path / "run"
    with RunWriter(p, CONFIG) as w:
        for row in rows_for(3):
            w.log(row)
        # each line is flushed at once: readable while the writer is open
        assert len(read_run(p).metrics) == 3
    with RunWriter(p, CONFIG) as w:  # a resumed process appends
        w.log({"step": 3, "x": float("nan")})
    run = read_run(p)
    assert [r["step"] for r in run.metrics] == [0, 1, 2, 3]
    assert run.metrics[3]["x"] is None
    assert run.config == CONFIG


def test_run_writer_truncate_after(tmp_path):
    p = tmp_path / "run"
    w = RunWriter(p, CONFIG)
    for row in rows_for(6):
        w.log(row)
    w.truncate_after(2)
    assert [r["step"] for r in read_run(p).metrics] == [0, 1, 2]
    w.log({"step": 3, "x": 1.0})
    w.close()
    assert [r["step"] for r in read_run(p).metrics] == [0, 1, 2, 3]
    assert (p / METRICS_FILE).read_text().count("\n") == 4


def test_run_writer_truncate_after_drops_a_line_cut_by_a_kill(tmp_path):
    p = tmp_path / "run"
    w = RunWriter(p, CONFIG)
    for row in rows_for(3):
        w.log(row)
    w.close()
    with open(p / METRICS_FILE, "a", encoding="utf-8") as fh:
        fh.write('{"step": 3, "x": 1.')  # the write a SIGKILL interrupted
    w = RunWriter(p, CONFIG)
    w.truncate_after(5)
    w.log({"step": 3, "x": 2.0})
    w.close()
    assert [r["step"] for r in read_run(p).metrics] == [0, 1, 2, 3]
    assert read_run(p).metrics[-1]["x"] == 2.0


def test_run_writer_requires_step(tmp_path):
    with RunWriter(tmp_path / "run", CONFIG) as w:
        with pytest.raises(ValueError):
            w.log({"t": 0.1})
    assert read_run(tmp_path / "run").metrics == []


def test_metrics_line_is_compact_strict_json():
    line = metrics_line({"step": np.int64(3), "v": np.float64("nan"), "w": [np.float32(1.5), float("-inf")]})
    assert "\n" not in line
    assert json.loads(line) == {"step": 3, "v": None, "w": [1.5, None]}


# --------------------------------------------------------------------------- studies

def test_find_runs_skips_checkpoints(tmp_path):
    study = tmp_path / "study"
    for rel in ("scales/10M", "scales/7B", "schedules/cosine/1.3B"):
        write_run(study / rel, CONFIG, rows_for(2))
    # a checkpoint that happens to carry a config.json is not a run
    write_run(study / "scales/10M/checkpoints/step_100", CONFIG, rows_for(2))
    write_run(study / "scales/7B/checkpoints/last/inner", CONFIG, rows_for(2))
    found = find_runs(study)
    assert found == sorted([study / "scales/10M", study / "scales/7B", study / "schedules/cosine/1.3B"])
    assert [r.path for r in read_study(study)] == found


def test_find_runs_inside_a_directory_named_checkpoints(tmp_path):
    study = tmp_path / "checkpoints" / "study"
    write_run(study / "a", CONFIG, [])
    assert find_runs(study) == [study / "a"]


def test_study_may_be_a_single_run(tmp_path):
    write_run(tmp_path / "one", CONFIG, rows_for(2))
    assert find_runs(tmp_path / "one") == [tmp_path / "one"]


def test_read_study_empty_or_missing_is_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no runs"):
        read_study(tmp_path / "empty")
    with pytest.raises(UserError, match="not found"):
        read_study(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError):
        find_runs(tmp_path / "file")
