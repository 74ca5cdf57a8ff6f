"""``build_data``: from a DataCfg and the backbone's data config to datasets, classes and the eval transform.

Steps: resolve the path -> discover files and labels (:mod:`.sources`) -> read every file once (the cache fill,
or a header check without the cache) and skip unreadable ones with one warning each -> split -> check classes ->
datasets. Nothing is written anywhere, least of all into the data folder.

Decoded-image cache (``data.cache``): ``auto`` keeps the decoded images in RAM when their estimated size (image
headers of up to 64 evenly spaced files, at the pre-crop size) fits ``data.cache_gb`` (default 2 GB = 2e9 bytes,
for train and val together), else on disk (:mod:`.diskcache`) when the disk has room (the estimate x 1.1 + 1 GB),
else reads the files every epoch; ``on`` is ``auto`` that fails instead of reading files; ``ram``, ``disk`` and
``off`` force one. The cache fill decodes with ``min(8, cores)`` threads (PIL and torch's resize release the GIL),
at most ``READ_CHUNK`` files in flight.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from finetune.config import DataCfg
# the torch-free path rules (also what the pre-run check uses): re-exported here
from finetune.config.preflight import CIFAR, check_root, resolve_data_path  # noqa: F401
from finetune.data import cifar, shards, sources
from finetune.data.datasets import ImageDataset, TensorImageDataset, decode
from finetune.data.images import IMG_EXTENSIONS, image_size
from finetune.data.loader import usable_cpus
from finetune.data.transforms import check_augment, eval_transform, train_transform, transform_config
from finetune.errors import DataError
from finetune.data.diskcache import free_bytes

log = logging.getLogger("finetune")

_CIFAR = CIFAR
READ_CHUNK = 256
STRICT_HINT = "(--strict; remove the file, or drop --strict to skip it)"


@dataclass
class DataBundle:
    """Everything training needs from the data. ``transform`` is the eval transform config (store it)."""

    train: Dataset
    val: Dataset | None
    class_names: list[str]
    transform: dict
    skipped: list[str] = field(default_factory=list)  # files skipped as unreadable (or listed but missing)
    source: str = ""
    cached: bool = False  # the decoded-image cache holds the images
    cache_kind: str = "off"  # ram | disk | off
    unlabeled: list[str] = field(default_factory=list)  # images no --labels rule named (left out)


# ------------------------------------------------------------------------------------------------- reading

def estimate_bytes(paths: Sequence[Path], tf: dict, probe: int = 64) -> int:
    """Decoded size of ``paths`` at the pre-crop size, extrapolated from up to ``probe`` image headers."""
    if not paths:
        return 0
    step = max(1, len(paths) // probe)
    sizes = []
    for p in list(paths)[::step][:probe]:
        try:
            w, h = image_size(p)
        except DataError:
            continue
        r = int(tf["resize"])
        if min(w, h) > r:
            w, h = (r, int(r * h / w)) if w < h else (int(r * w / h), r)
        sizes.append(3 * w * h)
    return int(sum(sizes) / len(sizes) * len(paths)) if sizes else 0


def cache_mode(cfg: DataCfg, paths: Sequence[Path], tf: dict, scratch: Path | None = None) -> str:
    """``ram``, ``disk`` or ``off`` for ``data.cache`` (see the module docstring)."""
    if cfg.cache in ("off", "ram", "disk"):
        return cfg.cache
    need = estimate_bytes(paths, tf)
    if need <= cfg.cache_gb * 1e9:
        return "ram"

    folder = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else scratch or Path(tempfile.gettempdir())
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = free_bytes(folder)
    if need * 1.1 + 1e9 <= free:
        log.info("decoded images would take about %.1f GB > data.cache_gb %.1f: caching them on disk in '%s'",
                 need / 1e9, cfg.cache_gb, folder)
        return "disk"
    if cfg.cache == "on":
        raise DataError(f"data.cache on: the decoded images need about {need / 1e9:.1f} GB, more than data.cache_gb "
                        f"{cfg.cache_gb:g} and more than the {free / 1e9:.1f} GB free in '{folder}'; pass "
                        "--cache-dir on a larger disk, or data.cache: auto/off")
    log.info("decoded images would take about %.1f GB: more than data.cache_gb %.1f and the free disk space in "
             "'%s': reading files every epoch", need / 1e9, cfg.cache_gb, folder)
    return "off"


def read_all(paths: Sequence[Path], fn: Callable[[Path], Any]) -> tuple[dict[Path, Any], dict[Path, str]]:
    """Apply ``fn`` to every path with a thread pool; ``(results, {path: reason})`` for the unreadable ones."""

    def one(p: Path):
        try:
            return p, fn(p), None
        except DataError as e:
            return p, None, str(e).split("': ", 1)[-1]

    ok: dict[Path, Any] = {}
    bad: dict[Path, str] = {}
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=min(8, usable_cpus())) as pool:
        for start in range(0, len(paths), READ_CHUNK):  # bounded: pool.map submits everything it is given
            for p, value, reason in pool.map(one, paths[start:start + READ_CHUNK]):
                if reason is None:
                    ok[p] = value
                else:
                    bad[p] = reason
    return ok, bad


def report_bad(bad: dict[Path, str], strict: bool) -> list[str]:
    """One warning line per unreadable file (sorted), or the first one as an error with ``strict``."""
    for p in sorted(bad):
        if strict:
            raise DataError(f"cannot read image '{p}': {bad[p]} {STRICT_HINT}")
        log.warning("skipping unreadable image '%s': %s", p, bad[p])
    return [str(p) for p in sorted(bad)]


# ------------------------------------------------------------------------------------------------- checks

def check_classes(train: list[sources.Item], val: list[sources.Item] | None, found: sources.Found,
                  where: str) -> list[str]:
    """Sorted class names; errors for no images, fewer than 2 classes, or val classes that train lacks."""
    if not train:
        exts = ", ".join(IMG_EXTENSIONS)
        raise DataError(f"no images found in '{where}' (looked for {exts}); pass a folder of class "
                        f"subfolders, or --labels ({sources.LABEL_SPECS}) for one folder of files")
    classes = sorted({c for _, c in train})
    if len(classes) < 2:
        raise DataError(f"found 1 class in '{found.train_dir}' ('{classes[0]}'); a classifier needs at least 2: "
                        "add a subfolder per class, or name classes with --labels")
    extra = sorted({c for _, c in val or []} - set(classes))
    if extra:
        names = ", ".join(f"'{c}'" for c in extra)
        raise DataError(f"val data '{found.val_dir or where}' has classes that train lacks: {names}; add them to "
                        f"'{found.train_dir}' or remove them from val")
    return classes


# ------------------------------------------------------------------------------------------------- builders

@dataclass
class Selection:
    """The images of a folder as training splits them: after the unreadable files are dropped, before any
    transform. Train and eval both come here, so eval of a run's checkpoint sees exactly the run's val images."""

    found: sources.Found
    train: list[sources.Item]
    val: list[sources.Item] | None  # None: no val folder and no split
    read: dict[Path, Any]  # what ``read`` returned per readable file (decoded images, or their sizes)
    skipped: list[str]  # unreadable (or listed-but-missing) files, one warning each
    split_note: str = ""


def select_items(root: Path, labels: str | None, *, val_split: float, seed: int, strict: bool,
                 read: Callable[[Path], Any] = image_size, found: sources.Found | None = None,
                 allow_outside: bool = False) -> Selection:
    """Discover ``root``'s images and labels (:func:`sources.find`), read each file once with ``read`` (the cache
    fill, or a header check), drop the unreadable ones (one warning each; an error with ``strict`` or when none is
    readable), then split a layout without a val folder by ``val_split`` (stratified, seeded)."""
    found = found or sources.find(root, labels, allow_outside)
    skipped = report_bad({Path(m): "listed in the label file, not found" for m in found.missing}, strict)
    items = found.train + (found.val or [])
    if not items:
        check_classes([], None, found, str(root))
    paths = [p for p, _ in items]
    done, bad = read_all(paths, read)
    if bad and len(bad) == len(paths) and not strict:  # one error, not a warning per file and then an error
        first = min(bad)
        raise DataError(f"no readable images in '{root}': all {len(bad)} image files failed to load (e.g. "
                        f"'{first}': {bad[first]}); check that the files are images and not truncated")
    skipped += report_bad(bad, strict)
    train = sources.unique([it for it in found.train if it[0] not in bad])
    val = sources.unique([it for it in found.val if it[0] not in bad]) if found.val is not None else None
    note = ""
    if val is None and val_split > 0:
        train, val = sources.stratified_split(train, val_split, seed)
        note = f", val = {val_split:g} of each class (seed {seed})"
    if val:
        train = sources.disjoint(train, val)  # one file (by inode) is never in both
    return Selection(found, train, val, done, skipped, note)


def build_data(cfg: DataCfg, model_data_cfg: dict, *, seed: int = 0, download: bool = False,
               scratch: Path | None = None, listing_only: bool = False) -> DataBundle:
    """Datasets, class names and the eval transform config for ``cfg`` and a backbone's ``data_cfg``.

    ``seed`` fixes the train/val split of a folder without a val folder (and nothing else: loader order and
    augmentation take their own seed in :func:`make_loader`). ``download`` lets CIFAR download when missing.
    ``scratch``: where a disk cache that is not kept (no ``data.cache_dir``) goes: the run directory.
    ``listing_only``: the caller expects every feature from the store: the images are listed and their headers
    checked, none is decoded or cached (``data.cache`` is not applied).
    """
    check_augment(cfg.augment)
    tf = transform_config(cfg, model_data_cfg)
    train_tf, eval_tf = train_transform(tf, cfg.augment), eval_transform(tf)
    if shards.is_shard_spec(cfg.path):  # 'train-{000..099}.tar': streamed
        train, val, names, source = shards.build_shard_data(cfg, tf, train_tf, eval_tf)
        return DataBundle(train, val, names, tf, source=source)
    spec = resolve_data_path(cfg.path)
    if isinstance(spec, str):
        return cifar_bundle(spec, tf, train_tf, eval_tf, download=download)
    root = check_root(spec, cfg.path)
    found = sources.find(root, cfg.labels, cfg.allow_outside)
    mode = "off" if listing_only else cache_mode(cfg, [p for p, _ in found.train + (found.val or [])], tf, scratch)
    read: Callable[[Path], Any] = {"ram": lambda p: decode(p, tf), "off": image_size}.get(mode)  # type: ignore
    store = None
    if mode == "disk":
        from finetune.data.diskcache import open_store

        store = open_store([p for p, _ in found.train + (found.val or [])], tf, cache_dir=cfg.cache_dir,
                           scratch=scratch, read_all=read_all)
        read = store.lookup
    sel = select_items(root, cfg.labels, val_split=cfg.val_split, seed=seed, strict=cfg.strict, read=read,
                       found=found, allow_outside=cfg.allow_outside)
    train, val = sel.train, sel.val
    classes = check_classes(train, val, sel.found, str(root))
    if val is not None and not val:
        log.warning("no validation images in '%s'; training without validation", sel.found.val_dir or root)
        val = None
    index = {c: i for i, c in enumerate(classes)}

    def dataset(its: list[sources.Item], transform) -> ImageDataset:
        cache = (store.images([p for p, _ in its]) if store is not None
                 else [sel.read[p] for p, _ in its] if mode == "ram" else None)
        return ImageDataset([(p, index[c]) for p, c in its], classes, tf, transform, cache=cache,
                            strict=cfg.strict)

    return DataBundle(dataset(train, train_tf), dataset(val, eval_tf) if val is not None else None, classes, tf,
                      skipped=sel.skipped, source=sel.found.description + sel.split_note, cached=mode != "off",
                      cache_kind=mode,
                      unlabeled=sel.found.unlabeled)


def cifar_bundle(spec: str, tf: dict, train_tf, eval_tf, *, download: bool = False) -> DataBundle:
    name, root = _CIFAR.match(spec).groups()  # type: ignore[union-attr]
    data = cifar.load(name, Path(root).expanduser(), do_download=download)
    classes = data["classes"]
    train = TensorImageDataset(*data["train"], classes, train_tf)
    val = TensorImageDataset(*data["test"], classes, eval_tf)
    return DataBundle(train, val, classes, tf, source=f"{cifar.LAYOUT[name]['title']} in {root} (val = test set)",
                      cached=True, cache_kind="ram")


def build_eval_dataset(path: str, split: str, class_names: list[str], tf: dict, strict: bool = False,
                       labels: str | None = None, val_split: float = 0.0, seed: int = 0,
                       allow_outside: bool = False) -> Dataset:
    """The ``split`` (``val``, ``train`` or ``test``: ROOT/test) of ``path`` with the eval transform ``tf``,
    labelled by ``class_names``.

    ``val`` is ROOT's val folder (val, valid, validation or test) or CIFAR's test set; ``train`` is ROOT/train.
    A folder without train/ is evaluated whole, unless ``val_split`` > 0: then ``split`` is that part of the same
    stratified split training made with ``val_split`` and ``seed`` (so eval reproduces the recorded val accuracy).
    Classes the checkpoint doesn't know are an error; classes of the
    checkpoint that the data lacks are fine (they just get no samples).
    """
    if split not in ("val", "train", "test"):
        raise DataError(f"unknown split '{split}'; use val, train or test")
    if shards.is_shard_spec(path):  # evaluated whole
        return shards.eval_shards(path, class_names, tf, eval_transform(tf), strict)
    spec = resolve_data_path(path)
    if isinstance(spec, str):
        name, root = _CIFAR.match(spec).groups()  # type: ignore[union-attr]
        data = cifar.load(name, Path(root).expanduser())
        images, targets = data["train" if split == "train" else "test"]
        _check_known(data["classes"], class_names, spec)
        remap = [class_names.index(c) for c in data["classes"]]
        return TensorImageDataset(images, [remap[t] for t in targets], class_names, eval_transform(tf))
    root = check_root(spec, path)
    if split == "test":  # a test/ folder next to val/: evaluated only when asked for, whole
        tests = [root / n for n in ("test", "testing") if (root / n).is_dir()]
        if not tests:
            raise DataError(f"'{root}' has no test folder; --split test takes ROOT/test/<class>/...")
        root, val_split = tests[0], 0.0
    sel = select_items(root, labels, val_split=val_split if split != "test" else 0.0, seed=seed, strict=strict,
                       allow_outside=allow_outside)
    if split == "val" and sel.val is None and sel.found.train_dir != root:
        raise DataError(f"'{root}' has no val folder ({', '.join(sources.VAL_NAMES)}); pass --split train, "
                        "or a folder of class subfolders to evaluate it whole")
    items = sel.val if split == "val" and sel.val is not None else sel.train
    folder = sel.found.val_dir if split == "val" and sel.found.val_dir else sel.found.train_dir
    if not items:
        raise DataError(f"no images found in '{folder}'")
    _check_known(sorted({c for _, c in items}), class_names, str(folder))
    index = {c: i for i, c in enumerate(class_names)}
    return ImageDataset([(p, index[c]) for p, c in items], class_names, tf, eval_transform(tf), strict=strict)


def _check_known(found: list[str], class_names: list[str], where: str) -> None:
    unknown = [c for c in found if c not in class_names]
    if unknown:
        raise DataError(f"'{where}' has classes the checkpoint was not trained on: "
                        f"{', '.join(repr(c) for c in unknown)}; its classes are {', '.join(class_names)}")
