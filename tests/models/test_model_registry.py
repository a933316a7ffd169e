"""Registry API and config validation: names, field errors, YAML list -> tuple coercion."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from leantrain.errors import ConfigError
from leantrain.models import (
    build_model,
    list_models,
    load_tokenizer,
    make_model_config,
    model_config_class,
    register_model,
)
from leantrain.models.mlp import MLPConfig


def test_list_models_has_every_model_with_a_description():
    models = list_models()
    assert {"mlp", "cnn", "resnet20", "lstm", "tinygpt", "minilm", "smollm2-135m"} <= set(models)
    assert all(isinstance(d, str) and d for d in models.values())


@pytest.mark.parametrize("name", sorted(list_models()))
def test_every_config_field_has_help_and_a_valid_default(name):
    config_cls = model_config_class(name)
    for f in dataclasses.fields(config_cls):
        assert f.metadata.get("help"), f"{config_cls.__name__}.{f.name} has no help"
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    config_cls()  # defaults pass validation


def test_unknown_model_lists_valid_names_on_one_line():
    with pytest.raises(ConfigError) as err:
        model_config_class("resnet18")
    message = str(err.value)
    assert "resnet18" in message and "resnet20" in message and "tinygpt" in message and "\n" not in message
    with pytest.raises(ConfigError):
        build_model("nope")


def test_unknown_kwarg_names_the_key_and_the_valid_fields():
    with pytest.raises(ConfigError) as err:
        make_model_config("mlp", hiden_sizes=(8,))
    message = str(err.value)
    assert "hiden_sizes" in message
    for name in ("input_shape", "num_classes", "hidden_sizes", "dropout"):
        assert name in message


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("mlp", {"dropout": 1.5}, ["MLPConfig.dropout", "1.5", "[0, 1)"]),
        ("mlp", {"hidden_sizes": (8, 0)}, ["hidden_sizes", "(8, 0)", ">= 1"]),
        ("cnn", {"input_shape": (1, 3, 3)}, ["input_shape", "(1, 3, 3)", ">= 4"]),
        ("tinygpt", {"n_embd": 30, "n_head": 4}, ["n_embd", "30", "multiple of n_head=4"]),
        ("tinygpt", {"block_size": 0}, ["block_size", "0", ">= 1"]),
        ("lstm", {"pad_token_id": 50, "vocab_size": 50}, ["pad_token_id", "50", "[0, 50)"]),
        ("resnet20", {"depth": 21}, ["depth", "21", "6n+2"]),
        ("smollm2-135m", {"dtype": "int8"}, ["dtype", "'int8'", "float32"]),
    ],
)
def test_out_of_range_values_name_field_value_and_range(name, kwargs, expected):
    with pytest.raises(ConfigError) as err:
        make_model_config(name, **kwargs)
    for part in expected:
        assert part in str(err.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"num_classes": "ten"}, "num_classes"), ({"hidden_sizes": 64}, "hidden_sizes"), ({"dropout": True}, "dropout")],
)
def test_wrong_types_are_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=rf"MLPConfig\.{field}(\[0\])? must be"):
        make_model_config("mlp", **kwargs)


def test_command_line_strings_are_parsed():
    config = make_model_config("mlp", num_classes="7", hidden_sizes="[8, 4]", dropout="0.25")
    assert (config.num_classes, config.hidden_sizes, config.dropout) == (7, (8, 4), 0.25)


def test_yaml_values_are_coerced():
    config = make_model_config("mlp", input_shape=[1, 8, 8], hidden_sizes=[16, 8], dropout=0, num_classes=np.int64(4))
    assert config.input_shape == (1, 8, 8) and config.hidden_sizes == (16, 8)
    assert isinstance(config.dropout, float) and type(config.num_classes) is int
    assert isinstance(config, MLPConfig)


def test_build_model_applies_overrides():
    model = build_model("mlp", input_shape=[12], num_classes=3, hidden_sizes=[])
    assert model(torch.randn(2, 12)).shape == (2, 3)
    assert sum(p.numel() for p in model.parameters()) == 12 * 3 + 3  # logistic regression


def test_load_tokenizer_rejects_models_without_one():
    with pytest.raises(ConfigError, match="minilm"):
        load_tokenizer("mlp")


def test_register_model_rejects_a_name_clash():
    with pytest.raises(ValueError, match="already registered"):

        @register_model("mlp", MLPConfig, "clash")
        def build_other(config):
            return torch.nn.Identity()

    assert list_models()["mlp"] != "clash"
