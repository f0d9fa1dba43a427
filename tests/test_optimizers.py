"""The optimizer registry: one table of names for the settings check, the builder and the
CLI, so that a new optimizer is one entry."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sharpscope import optim
from sharpscope.cli import build_parser
from sharpscope.errors import UserError
from sharpscope.training.config import OptimConfig
from sharpscope.training.optimizers import OPTIMIZER_REGISTRY, OptimizerSpec, build_optimizer, plain_optimizer

EVERY_OPTIMIZER_READS = {"name", "lr", "weight_decay", "grad_clip"}
CLASSES = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "sam": optim.SAM,
           "functional-sam": optim.FunctionalSAM, "angle-sam": optim.AngleSAM, "nexus": optim.Nexus}


def train_args(*extra: str):
    return build_parser().parse_args(["train", "--out", "run", *extra])


def test_the_cli_offers_the_registry():
    for name in OPTIMIZER_REGISTRY:
        assert train_args("--optimizer", name).optimizer == name
    with pytest.raises(SystemExit):
        train_args("--optimizer", "lion")


def test_every_setting_belongs_to_an_optimizer():
    fields = {f.name for f in dataclasses.fields(OptimConfig)}
    declared = {key for spec in OPTIMIZER_REGISTRY.values() for key in spec.fields}
    assert declared == fields - EVERY_OPTIMIZER_READS


@pytest.mark.parametrize("name", list(OPTIMIZER_REGISTRY))
def test_each_entry_builds_its_class_without_decay_on_vectors(name):
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(OptimConfig(name=name, weight_decay=0.2), model)
    assert type(optimizer) is CLASSES[name]
    assert isinstance(plain_optimizer(optimizer), torch.optim.AdamW) == (name != "sgd")
    assert [(len(g["params"]), g["weight_decay"]) for g in optimizer.param_groups] == [(1, 0.2), (1, 0.0)]


@pytest.mark.parametrize("settings, expected", [
    ({"name": "lion"}, "unknown optimizer 'lion'; choose one of adamw, sgd, sam, functional-sam, angle-sam, nexus"),
    ({"name": "sam", "base": "lion"}, "unknown base optimizer 'lion'; choose adamw or sgd"),
    ({"name": "adamw", "betas": [0.9]}, "optim.betas needs two numbers"),
    ({"name": "sam", "rho": -1.0}, "optim settings for sam: rho must be"),
    ({"name": "nexus", "pseudo_grad": "median"}, "optim settings for nexus: pseudo_grad must be"),
])
def test_bad_settings_are_user_errors(settings, expected):
    with pytest.raises(UserError, match=expected):
        build_optimizer(OptimConfig(**settings), torch.nn.Linear(3, 2))


def test_a_new_optimizer_is_one_entry(monkeypatch):
    spec = OptimizerSpec(lambda groups, cfg, model: torch.optim.Adam(groups, lr=cfg.lr), fields=())
    monkeypatch.setitem(OPTIMIZER_REGISTRY, "adam", spec)
    assert train_args("--optimizer", "adam").optimizer == "adam"
    assert type(build_optimizer(OptimConfig(name="adam"), torch.nn.Linear(3, 2))) is torch.optim.Adam
