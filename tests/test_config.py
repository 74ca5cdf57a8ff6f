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
                            "in train: epochs, batch_size, accumulate, clip_grad, label_smoothing, seed, device, "
                            "precision, channels_last, compile, early_stop, cache_features, tensorboard, report, "
                            "graph, save_every_steps, sync_bn")


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
