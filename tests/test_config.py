import pytest
import yaml

from leantrain.config import from_dict, list_recipes, resolve, to_dict
from leantrain.errors import ConfigError


@pytest.mark.parametrize("recipe", sorted(list_recipes()))
def test_shipped_recipes_resolve_and_round_trip(recipe):
    cfg = resolve(recipe)
    assert cfg.name == recipe
    assert from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg


def test_overrides_dotted_leaf_and_model_options():
    cfg = resolve("cnn-fashion-mnist", ["optim.lr=0.02", "epochs=1", "model.channels=[16, 32]", "weight_decay=5e-5"])
    assert cfg.optim.lr == 0.02
    assert cfg.train.epochs == 1
    assert cfg.model.options["channels"] == [16, 32]
    assert cfg.optim.weight_decay == 5e-5  # "5e-5" is a string to YAML 1.1; the float field parses it
    assert resolve("cnn-fashion-mnist", ["train.max_steps=null"]).train.max_steps is None
    assert resolve("cnn-fashion-mnist", ["betas=[0.8, 0.9]"]).optim.betas == (0.8, 0.9)


def test_recipe_from_a_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("data: {dataset: digits}\nmodel: {name: mlp, hidden_sizes: [32]}\n")
    cfg = resolve(str(path))
    assert (cfg.name, cfg.data.dataset, cfg.model.options) == ("mine", "digits", {"hidden_sizes": [32]})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean: optim.lr,"),
        (["lr=-1"], "optim.lr = -1.0 is out of range (must be > 0.0)"),
        (["lr=fast"], "optim.lr must be a number, got 'fast'"),
        (["val_fraction=1.5"], "data.val_fraction = 1.5 is out of range (must be >= 0.0 and < 1.0)"),
        (["optim.name=lion"], "optim.name = 'lion' is not one of: sgd, adamw, adam, sam, lwsam, asyncsam, mlbfgs"),
        (["data.dataset=cifar10"], "unknown dataset 'cifar10'; valid names: digits, mnist5k"),
        (["model.name=vgg"], "unknown model 'vgg'; valid models: cnn"),
        (["model.hidden=0"], "CNNConfig.hidden=0 is invalid; accepted: integers >= 1"),
        (["model.widthh=3"], "unknown config key 'model.widthh'; did you mean: model.hidden"),
        (["data.tokenizer=gpt2"], "data.tokenizer='gpt2' is not a pretrained tokenizer; use minilm, smollm2-135m"),
        (["epochs"], "override 'epochs' must look like key=value"),
        (["betas=[0.9]"], "optim.betas must have 2 items, got 1"),
    ],
)
def test_bad_overrides_name_the_key_and_the_choices(overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve("cnn-fashion-mnist", overrides)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "recipe, overrides, message",
    [
        ("paca-minilm-tweets", ["finetune.r=0"], r"PacaConfig.r=0; accepted: an int >= 1"),
        (
            "gem-minilm-tweets",
            ["finetune.density=2"],
            r"GemConfig.density=2 is invalid; accepted: a float in \(0, 1\]",
        ),
        ("lora-minilm-tweets", ["finetune.rank=4"], "unknown config key 'finetune.rank'"),
        ("quickstart", ["finetune.method=dora"], "finetune.method = .dora. is not one of: full, lora, gem, paca"),
        ("quickstart", ["finetune.r=4"], "unknown config key 'finetune.r'"),
    ],
)
def test_bad_finetune_settings(recipe, overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve(recipe, overrides)


def test_finetune_options_override_and_round_trip():
    cfg = resolve("paca-minilm-tweets", ["r=32", "finetune.paca_alpha=64"])
    assert (cfg.finetune.method, cfg.finetune.options["r"], cfg.finetune.options["paca_alpha"]) == ("paca", 32, 64)
    assert from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg


def test_unknown_recipe_and_section_keys():
    with pytest.raises(ConfigError, match="unknown recipe 'quickstrat' \\(did you mean 'quickstart'\\?\\)"):
        resolve("quickstrat")
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        from_dict({"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match="unknown field\\(s\\) 'widthh' for model 'cnn'; valid fields: input_shape"):
        from_dict({"model": {"name": "cnn", "widthh": 3}})
    with pytest.raises(ConfigError, match="unknown config key 'optimizer'"):
        from_dict({"optimizer": {"lr": 3}})


def test_sam_settings_validate():
    cfg = resolve("sam-resnet20-fashion-mnist", ["rho=0.1", "adaptive=true"])
    assert (cfg.optim.name, cfg.optim.base, cfg.optim.rho, cfg.optim.adaptive) == ("sam", "sgd", 0.1, True)
    with pytest.raises(ConfigError, match=r"optim.rho = 0.0 is out of range \(must be > 0.0\)"):
        resolve("sam-resnet20-fashion-mnist", ["rho=0"])


def test_method_options_given_as_text_get_their_field_type():
    """`finetune.density=1e-2` is the string "1e-2" to YAML 1.1; it used to reach GemConfig as text and fail."""
    cfg = resolve("gem-minilm-tweets", ["finetune.density=1e-2", "finetune.head_warmup_lr=5e-4"])
    assert cfg.finetune.options["density"] == 0.01 and cfg.finetune.options["head_warmup_lr"] == 5e-4
    assert resolve("lora-minilm-tweets", ["finetune.lora_dropout=1e-1"]).finetune.options["lora_dropout"] == 0.1
