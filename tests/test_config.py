import dataclasses

import pytest

from finetune import config
from finetune.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


def test_every_shipped_recipe_loads():
    names = config.recipe_names()
    assert "default" in names
    for n in names:
        r = config.load_recipe(n)
        assert r.name == n and r.description


def test_default_recipe_values():
    r = config.load_recipe("default")
    assert (r.model.name, r.model.weights, r.data.path, r.optimizer.name, r.optimizer.lr) == \
        ("smallcnn", "none", "sample", "sgd", 0.02)


def test_unknown_key_names_path_and_line(tmp_path):
    p = write(tmp_path, "model:\n  name: resnet18\ntrain:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as e:
        config.load_recipe(p)
    assert str(e.value) == (f"recipe '{p}', line 4: unknown key 'train.epoch' (did you mean 'epochs'?); valid keys "
                            "in train: epochs, batch_size, accumulate, clip_grad, label_smoothing, class_weights, "
                            "seed, device, precision, channels_last, compile, early_stop, cache_features, "
                            "fast_inference, autotune, tensorboard, report, graph, save_every_steps, sync_bn, monitor, "
                            "monitor_mode, save_top_k, ema, ema_decay, mixup, cutmix, log_every, dist_timeout, "
                            "strategy, checkpoint_format")


def test_wrong_type_and_bad_value(tmp_path):
    p = write(tmp_path, "train:\n  epochs: three\n")
    with pytest.raises(ConfigError, match=r"line 2: train.epochs must be an integer, got 'three'$"):
        config.load_recipe(p)
    p = write(tmp_path, "optimizer:\n  name: adamm\n")
    with pytest.raises(ConfigError, match=r"optimizer.name must be one of sgd, adam, adamw, rmsprop, got 'adamm' "
                                          r"\(did you mean 'adam'"):
        config.load_recipe(p)
    p = write(tmp_path, "optimizer:\n  lr: 0\n")
    with pytest.raises(ConfigError, match=r"line 2: optimizer.lr must be greater than 0, got 0.0$"):
        config.load_recipe(p)


def test_bad_yaml_names_the_line(tmp_path):
    p = write(tmp_path, "model:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"^recipe '{p}', line 3: invalid YAML"):
        config.load_recipe(p)


def test_overrides_validate():
    r = config.apply_overrides(config.load_recipe("default"), {"train.epochs": 2, "optimizer.lr": None})
    assert r.train.epochs == 2 and r.optimizer.lr == 0.02
    with pytest.raises(ConfigError, match="^train.batch_size must be greater than 0, got 0$"):
        config.apply_overrides(r, {"train.batch_size": 0})


def test_unknown_recipe():
    with pytest.raises(ConfigError, match=r"^unknown recipe 'defualt' \(did you mean 'default'\?\); available: "):
        config.load_recipe("defualt")


# ---------------------------------------------------------------- the field types are the one source of the rules


def test_choices_and_ranges_come_from_the_field_types():
    from finetune.data.transforms import AUGMENTS
    from finetune.speedups.feature_cache import MODES
    from finetune.training.freeze import BN_POLICIES
    from finetune.training.optim import OPTIMIZERS

    assert config.choices("optimizer.name") == OPTIMIZERS == ("sgd", "adam", "adamw", "rmsprop")
    assert config.choices("freeze.bn") == BN_POLICIES == ("frozen", "eval", "train")
    assert config.choices("train.cache_features") == MODES == ("auto", "on", "off")
    assert config.choices("data.augment") == AUGMENTS == ("none", "light", "strong")
    assert not hasattr(config, "CHOICES") and not hasattr(config, "POSITIVE")


@pytest.mark.parametrize("key,value,message", [
    ("train.batch_size", 0, "train.batch_size must be greater than 0, got 0"),
    ("optimizer.weight_decay", -1.0, "optimizer.weight_decay must not be negative, got -1.0"),
    ("data.val_split", 1.0, "data.val_split must be in [0, 1), got 1.0"),
    ("train.label_smoothing", 1.0, "train.label_smoothing must be below 1"),
    ("optimizer.name", "adamm", "optimizer.name must be one of sgd, adam, adamw, rmsprop, got 'adamm' "
                                "(did you mean 'adam', 'adamw'?)"),
])
def test_config_errors_carry_the_key_path(key, value, message):
    with pytest.raises(ConfigError) as e:
        config.apply_overrides(config.Recipe(), {key: value})
    assert str(e.value) == message and e.value.key == key


def test_a_recipe_built_in_python_is_validated_by_train(tmp_path):
    from finetune.run.runner import train

    r = config.Recipe()
    r.train.epochs = 0
    with pytest.raises(ConfigError, match="^train.epochs must be greater than 0, got 0$"):
        train(r, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_every_flag_maps_to_a_recipe_key_and_back():
    from finetune.cli import options

    flags = options.flag_map()
    assert flags["train.batch_size"] == "--batch-size" and flags["train.compile"] == "--compile"
    assert flags["freeze.backbone"] == "--freeze-backbone" and flags["freeze.schedule"] == "--unfreeze"
    for key in flags:  # each names a real recipe field
        section, name = key.split(".")
        assert name in {f.name for f in dataclasses.fields(getattr(config.Recipe(), section))}, key
    assert len(set(flags.values())) == len(flags) - 1  # --unfreeze sets two keys; every other flag one


def test_yaml_1_1_spellings_of_numbers_and_words(tmp_path):
    """PyYAML reads ``1e-3`` (no dot) as a string and unquoted ``off``/``on`` as booleans: both mean what they say."""
    p = write(tmp_path, "optimizer:\n  lr: 1e-3\n  weight_decay: 5E-4\ndata:\n  cache: off\ntrain:\n"
                        "  cache_features: on\n")
    r = config.load_recipe(p)
    assert (r.optimizer.lr, r.optimizer.weight_decay, r.data.cache, r.train.cache_features) == \
        (0.001, 0.0005, "off", "on")
    with pytest.raises(ConfigError, match=r"line 2: optimizer.lr must be a number or 'auto', got '1e-3x'"):
        config.load_recipe(write(tmp_path, "optimizer:\n  lr: 1e-3x\n"))
    with pytest.raises(ConfigError, match=r"line 2: data.augment must be one of none, light, strong, got 'False'"):
        config.load_recipe(write(tmp_path, "data:\n  augment: off\n"))
