"""Tests for sharpscope.config (typed dataclass configs from TOML and dotted overrides)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import pytest
from hypothesis import given, settings, strategies as st

from sharpscope.config import from_dict, load_config, parse_overrides, to_dict
from sharpscope.errors import UserError

PROPS = settings(max_examples=50, deadline=None)


@dataclass
class Noise:
    sigma: float = 0.03
    seed: int = 42
    enabled: bool = True


@dataclass
class Inner:
    depth: int = 2
    noise: Noise = field(default_factory=Noise)


@dataclass
class Cfg:
    name: str = "study"
    steps: int = 100
    lr: float = 1e-3
    verbose: bool = False
    tags: list[str] = field(default_factory=lambda: ["x"])
    sizes: tuple[int, ...] = (1, 2)
    levels: list[float] = field(default_factory=list)
    limit: Optional[float] = None
    inner: Inner = field(default_factory=Inner)


def write(tmp_path, text, name="cfg.toml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# --------------------------------------------------------------------------- loading

def test_defaults_without_file_or_overrides():
    assert load_config(Cfg) == Cfg()


def test_toml_file_nested_tables(tmp_path):
    p = write(tmp_path, """
name = "scales"
steps = 2000
tags = ["a", "b"]
sizes = [3, 4, 5]

[inner]
depth = 4

[inner.noise]
sigma = 0.1
enabled = false
""")
    cfg = load_config(Cfg, p)
    assert cfg.name == "scales"
    assert cfg.steps == 2000
    assert cfg.tags == ["a", "b"]
    assert cfg.sizes == (3, 4, 5)
    assert cfg.inner.depth == 4
    assert cfg.inner.noise == Noise(sigma=0.1, seed=42, enabled=False)
    assert cfg.lr == 1e-3  # untouched default


def test_overrides_win_over_file_and_merge_tables(tmp_path):
    p = write(tmp_path, "steps = 10\n[inner.noise]\nsigma = 0.1\nseed = 7\n")
    cfg = load_config(Cfg, p, ["inner.noise.sigma=0.25", "steps=20", "inner.depth=9"])
    assert cfg.steps == 20
    assert cfg.inner.depth == 9
    assert cfg.inner.noise.sigma == 0.25
    assert cfg.inner.noise.seed == 7  # sibling key from the file survives the override


def test_overrides_alone():
    cfg = load_config(Cfg, None, ["name = run A ", "inner.noise.enabled=off"])
    assert cfg.name == "run A"
    assert cfg.inner.noise.enabled is False


# --------------------------------------------------------------------------- unknown keys

@pytest.mark.parametrize("override, dotted", [
    ("stepz=3", "stepz"),
    ("inner.dept=3", "inner.dept"),
    ("inner.noise.sigmaa=0.1", "inner.noise.sigmaa"),
])
def test_unknown_override_key_names_dotted_key(override, dotted):
    with pytest.raises(UserError) as err:
        load_config(Cfg, None, [override])
    assert f"'{dotted}'" in str(err.value)


def test_unknown_toml_key_names_dotted_key(tmp_path):
    p = write(tmp_path, "[inner.noise]\nsgima = 0.1\n")
    with pytest.raises(UserError, match=r"'inner\.noise\.sgima'"):
        load_config(Cfg, p)


def test_scalar_given_for_a_table_is_user_error():
    with pytest.raises(UserError, match="inner"):
        load_config(Cfg, None, ["inner=3"])


# --------------------------------------------------------------------------- coercion

@pytest.mark.parametrize("override, attr, expected", [
    ("steps=7", "steps", 7),
    ("steps=1e3", "steps", 1000),
    ("steps=-2", "steps", -2),
    ("lr=3e-4", "lr", 3e-4),
    ("lr=2", "lr", 2.0),
    ("verbose=true", "verbose", True),
    ("verbose=YES", "verbose", True),
    ("verbose=1", "verbose", True),
    ("verbose=on", "verbose", True),
    ("verbose=false", "verbose", False),
    ("verbose=0", "verbose", False),
    ("verbose=No", "verbose", False),
    ("tags=a,b", "tags", ["a", "b"]),
    ("tags= a , b ,", "tags", ["a", "b"]),
    ("sizes=4,5,6", "sizes", (4, 5, 6)),
    ("levels=0.5,1e-2", "levels", [0.5, 0.01]),
    ("limit=2.5", "limit", 2.5),
    ("limit=none", "limit", None),
    ("name=42", "name", "42"),
])
def test_override_coercion(override, attr, expected):
    cfg = load_config(Cfg, None, [override])
    got = getattr(cfg, attr)
    assert got == expected
    assert type(got) is type(expected)


def test_toml_values_coerced_to_field_types(tmp_path):
    p = write(tmp_path, "lr = 1\nsteps = 3.0\nlevels = [1, 2]\nsizes = [7]\n")
    cfg = load_config(Cfg, p)
    assert cfg.lr == 1.0 and type(cfg.lr) is float
    assert cfg.steps == 3 and type(cfg.steps) is int
    assert cfg.levels == [1.0, 2.0] and all(type(v) is float for v in cfg.levels)
    assert cfg.sizes == (7,)


@pytest.mark.parametrize("override, needle", [
    ("steps=2.5", "integer"),
    ("steps=ten", "integer"),
    ("lr=fast", "number"),
    ("verbose=maybe", "true or false"),
    ("sizes=1,x", "sizes[1]"),
    ("inner.noise.seed=0.5", "inner.noise.seed"),
])
def test_bad_values_are_user_errors(override, needle):
    with pytest.raises(UserError) as err:
        load_config(Cfg, None, [override])
    assert needle in str(err.value)


def test_non_integer_exponent_string_is_rejected_for_int():
    with pytest.raises(UserError):
        load_config(Cfg, None, ["steps=2.5e0"])


@pytest.mark.parametrize("line", ["steps = true", "lr = false"])
def test_toml_bool_for_number_is_user_error(tmp_path, line):
    p = write(tmp_path, line + "\n")
    with pytest.raises(UserError):
        load_config(Cfg, p)


def test_toml_non_integer_for_int_is_user_error(tmp_path):
    p = write(tmp_path, "steps = 2.5\n")
    with pytest.raises(UserError, match="'steps'"):
        load_config(Cfg, p)


def test_toml_wrong_type_for_list_is_user_error(tmp_path):
    p = write(tmp_path, "levels = 3\n")
    with pytest.raises(UserError, match="'levels'"):
        load_config(Cfg, p)


@PROPS
@given(st.integers(-10 ** 12, 10 ** 12))
def test_int_override_round_trips(i):
    assert load_config(Cfg, None, [f"steps={i}"]).steps == i


@PROPS
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_override_round_trips(x):
    assert load_config(Cfg, None, [f"lr={x!r}"]).lr == x


@PROPS
@given(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), max_size=5))
def test_list_override_round_trips(items):
    assert load_config(Cfg, None, ["tags=" + ",".join(items)]).tags == items


# --------------------------------------------------------------------------- files and syntax

def test_bad_toml_is_user_error(tmp_path):
    p = write(tmp_path, "steps = = 3\n[inner\n")
    with pytest.raises(UserError, match="not valid TOML") as err:
        load_config(Cfg, p)
    assert str(p) in str(err.value)


def test_non_utf8_toml_is_user_error(tmp_path):
    p = tmp_path / "cfg.toml"
    p.write_bytes(b'name = "\xff"\n')
    with pytest.raises(UserError):
        load_config(Cfg, p)


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(Cfg, tmp_path / "nope.toml")
    with pytest.raises(UserError):
        load_config(Cfg, tmp_path)  # a directory is not a config file


@pytest.mark.parametrize("items", [["steps"], ["inner..depth=3"], [".x=1"]])
def test_malformed_overrides_are_user_errors(items):
    with pytest.raises(UserError):
        parse_overrides(items)


def test_conflicting_overrides_are_user_errors():
    with pytest.raises(UserError):
        parse_overrides(["inner=3", "inner.depth=4"])


def test_parse_overrides_nests_and_keeps_equals_in_value():
    assert parse_overrides(["a.b=1", "a.c=x=y", "d=2"]) == {"a": {"b": "1", "c": "x=y"}, "d": "2"}


def test_to_dict_round_trip():
    cfg = load_config(Cfg, None, ["sizes=9,8", "inner.noise.sigma=0.5", "limit=1.5"])
    d = to_dict(cfg)
    assert d["sizes"] == [9, 8]  # JSON-ready
    assert d["inner"]["noise"]["sigma"] == 0.5
    assert from_dict(Cfg, d) == cfg
    assert dataclasses.asdict(from_dict(Cfg, d)) == dataclasses.asdict(cfg)
