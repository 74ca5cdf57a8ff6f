"""One data path for train and eval (issue 12): the layout, the bad-file filter and the split are computed by one
function, so `eval` of a run's checkpoint on the run's data sees exactly the run's val images."""


from finetune import api, config
from finetune.data import build_data, build_eval_dataset
from finetune.run.runner import train
from helpers import tiny_tree


def _recipe(data, **over):
    base = {"data.path": str(data), "train.epochs": 1, "train.batch_size": 16, "train.precision": "fp32",
            "train.tensorboard": False, "data.augment": "none", "data.val_split": 0.5}
    return config.apply_overrides(config.load_recipe("default"), {**base, **over})


def test_eval_sees_the_val_images_training_saw_when_a_file_is_unreadable(tmp_path):
    """Training drops unreadable files before the split; eval used to split first, so one bad file in a class
    shifted that class's val set (other images, another count)."""
    data = tiny_tree(tmp_path / "d", per_class=7)
    (data / "a" / "a_000.png").write_bytes(b"not a png")  # sorted first: it shifts every index of class a
    res = train(_recipe(data), out=tmp_path / "run")
    ev = api.evaluate_checkpoint(tmp_path / "run" / "best.pt")
    bundle = build_data(_recipe(data).data, {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                             "interpolation": "bilinear", "crop_pct": 1.0}, seed=0)
    val_files = sorted(str(p) for p, _ in bundle.val.samples)
    ds = build_eval_dataset(str(data), "val", res.class_names, bundle.transform, val_split=0.5, seed=0)
    assert sorted(str(p) for p, _ in ds.samples) == val_files
    assert ev["n"] == len(val_files) == 11  # a: 6 readable -> 3 val; b, c: 7 -> round(3.5) = 4 each
    assert ev["accuracy"] == res.best_val_acc


def test_eval_of_a_train_only_layout_uses_the_runs_split(tmp_path):
    """ROOT/train without a val folder: training split train/ by val_split, and eval evaluates that split (it
    used to refuse: no val folder)."""
    tiny_tree(tmp_path / "d" / "train", per_class=6)
    res = train(_recipe(tmp_path / "d"), out=tmp_path / "run")
    ev = api.evaluate_checkpoint(tmp_path / "run" / "best.pt")
    assert ev["n"] == 9 and ev["accuracy"] == res.best_val_acc
