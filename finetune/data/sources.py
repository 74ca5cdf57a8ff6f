"""Where images and their labels come from: folder layouts, label specs, the stratified split.

Layouts (``--data``):

- ``ROOT/train/<class>/...`` + ``ROOT/{val,valid,validation,test}/<class>/...`` (the first that exists);
  ``ROOT/train`` alone is split like a single folder;
- ``ROOT/<class>/...``: one folder of class subfolders, split by ``--val-split`` (stratified, seeded);
- with ``--labels``, files anywhere under ROOT (or under ROOT/train and ROOT/val) labelled by name:
  ``prefix:Not=NotSing,=Sing`` (longest matching prefix of the file name wins; the empty prefix is the fallback),
  ``regex:^([a-z]+)_`` (``re.search`` on the file name; the first group, or the whole match without groups), or
  ``csv:FILE`` (rows ``path,label``, paths relative to ROOT; a first row whose path is not an image file is a
  header; FILE is looked up as given, then inside ROOT). Files no rule labels are left out, with one warning.

Class folders are searched recursively; hidden files and folders are ignored; class names are sorted (torchvision's
``find_classes`` order) whatever the source, and index ``i`` of that list is label ``i``.
"""

from __future__ import annotations

import csv
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data.images import IMG_EXTENSIONS, is_image_file, walk_images
from finetune.errors import DataError, option, shown

log = logging.getLogger("finetune")

VAL_NAMES = ("val", "valid", "validation", "test")
LABEL_SPECS = "prefix:PFX=LABEL,...  regex:PATTERN  csv:FILE"

Item = tuple[Path, str]  # (image path, class name)


@dataclass
class Found:
    """What a layout yields before reading any image."""

    train: list[Item]
    val: list[Item] | None  # None: no val folder, split train
    description: str
    train_dir: Path
    val_dir: Path | None = None
    unlabeled: list[str] = field(default_factory=list)  # images no --labels rule names
    missing: list[str] = field(default_factory=list)  # files a CSV lists that do not exist


# ------------------------------------------------------------------------------------------------- label rules

def parse_labels(spec: str, root: Path) -> tuple[str, Callable[[str], str | None] | Path]:
    """``(kind, rule)``: for prefix/regex a function file name -> label or None; for csv the CSV path."""
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in ("prefix", "regex", "csv") or not arg:
        raise DataError(f"unknown --labels spec '{spec}'; use {LABEL_SPECS}")
    if kind == "prefix":
        return kind, prefix_rule(arg)
    if kind == "regex":
        return kind, regex_rule(arg)
    path = Path(arg).expanduser()
    if not path.is_file() and (root / arg).is_file():
        path = root / arg
    if not path.is_file():
        raise DataError(f"label file '{arg}' not found (looked in the current folder and in '{root}')")
    return kind, path


def prefix_rule(arg: str) -> Callable[[str], str | None]:
    """``"Not=NotSing,=Sing"`` -> name -> label; the longest matching prefix wins, ``""`` matches everything."""
    rules: dict[str, str] = {}
    for part in arg.split(","):
        prefix, eq, label = part.partition("=")
        if not eq or not label.strip():
            raise DataError(f"bad prefix rule '{part}' in --labels prefix:{arg}; write PREFIX=LABEL, e.g. "
                            "prefix:Not=NotSing,=Sing (an empty PREFIX is the fallback)")
        if prefix in rules:
            raise DataError(f"prefix '{prefix}' appears twice in --labels prefix:{arg}")
        rules[prefix] = label.strip()
    ordered = sorted(rules.items(), key=lambda kv: -len(kv[0]))

    def rule(name: str) -> str | None:
        return next((label for prefix, label in ordered if name.startswith(prefix)), None)

    return rule


def regex_rule(pattern: str) -> Callable[[str], str | None]:
    """``"^([a-z]+)_"`` -> name -> the first group (the whole match when the pattern has no group)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise DataError(f"bad regular expression in --labels regex:{pattern}: {e}") from None

    def rule(name: str) -> str | None:
        m = rx.search(name)
        if not m:
            return None
        label = m.group(1) if rx.groups else m.group(0)
        return label or None

    return rule


def read_csv(path: Path, root: Path, allow_outside: bool = False) -> tuple[list[Item], list[str]]:
    """Rows ``path,label`` -> items, plus the listed files that do not exist (relative names).

    Paths are relative to ``root`` and must stay inside it (``../x``, ``/etc/...`` are an error naming the first,
    checked before any file is opened), unless ``allow_outside``. The check is on the path as written: a symlink
    inside the root is followed, as in the folder layouts."""
    import os

    items: list[Item] = []
    missing: list[str] = []
    outside: list[tuple[int, str]] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and not rows[0][0].strip().lower().endswith(IMG_EXTENSIONS):
        rows = rows[1:]  # header
    for n, row in enumerate(rows, 1):
        if len(row) < 2 or not row[1].strip():
            cols = sum(1 for c in row if c.strip())  # the row's content is not echoed: it may be any file's line
            raise DataError(f"label file '{path}': row {n} has {cols} column{'s' if cols != 1 else ''}; each row "
                            "needs 'path,label' (its content is not shown)")
        rel, label = row[0].strip(), row[1].strip()
        p = root / rel
        if not allow_outside and (os.path.isabs(rel) or os.path.normpath(rel).split(os.sep)[0] == os.pardir):
            outside.append((n, rel))
            continue
        if p.is_file():
            items.append((p, label))
        else:
            missing.append(rel)
    if outside:
        n, rel = outside[0]
        raise DataError(f"label file '{path}': {len(outside)} row{'s' if len(outside) > 1 else ''} point outside the "
                        f"data folder '{root}' (row {n}: '{shown(rel)}'); paths are relative to it; pass "
                        "--allow-outside (data.allow_outside: true) if that is intended")
    return items, missing


# ------------------------------------------------------------------------------------------------- layouts

def split_dirs(root: Path) -> tuple[Path | None, Path | None]:
    """``(ROOT/train, ROOT/<val name>)`` when ROOT/train exists, else ``(None, None)``."""
    train = root / "train"
    if not train.is_dir():
        return None, None
    val = next((root / n for n in VAL_NAMES if (root / n).is_dir()), None)
    return train, val


def class_folders(folder: Path) -> list[Item]:
    """Items of ``folder/<class>/**``; empty class folders are reported and left out."""
    items: list[Item] = []
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = [f for f in folder.iterdir() if f.is_file() and is_image_file(f)]
    if not classes:
        if loose:
            raise DataError(f"'{folder}' holds images but no class subfolders; put each class in its own "
                            f"subfolder, or label files by name with --labels ({LABEL_SPECS})")
        return []
    if loose:
        log.warning("%d images directly in '%s' are in no class folder; ignored", len(loose), folder)
    for name in classes:
        files = walk_images(folder / name)
        if not files:
            log.warning("class folder '%s' has no images; ignored", folder / name)
        items.extend((p, name) for p in files)
    return items


def labelled_files(folder: Path, rule: Callable[[str], str | None]) -> tuple[list[Item], list[str]]:
    items: list[Item] = []
    unlabeled: list[str] = []
    for p in walk_images(folder):
        label = rule(p.name)
        if label is None:
            unlabeled.append(str(p))
        else:
            items.append((p, label))
    return items, unlabeled


def find(root: Path, labels: str | None, allow_outside: bool = False) -> Found:
    """Discover the images and labels of ``root`` (an existing folder) per the layout rules above."""
    train_dir, val_dir = split_dirs(root)
    if labels:
        kind, rule = parse_labels(labels, root)
        if kind == "csv":
            items, missing = read_csv(rule, root, allow_outside)  # type: ignore[arg-type]
            return Found(items, None, f"{root} (labels from {rule})", root,
                         missing=[str(root / m) for m in missing])
        assert callable(rule)
        if train_dir is not None:
            train, un1 = labelled_files(train_dir, rule)
            val, un2 = labelled_files(val_dir, rule) if val_dir else (None, [])
            found = Found(train, val, f"{root} ({kind} labels, {train_dir.name}/"
                          f"{'+' + val_dir.name + '/' if val_dir else ''})", train_dir, val_dir, un1 + un2)
        else:
            train, un = labelled_files(root, rule)
            found = Found(train, None, f"{root} ({kind} labels)", root, unlabeled=un)
        if found.unlabeled:
            log.warning("%d images match no %s rule and are left out (first: '%s')",
                        len(found.unlabeled), option("data.labels"), found.unlabeled[0])
        return found
    if train_dir is not None:
        val = class_folders(val_dir) if val_dir else None
        desc = f"{root} (ImageFolder {train_dir.name}/{'+' + val_dir.name + '/' if val_dir else ''})"
        return Found(class_folders(train_dir), val, desc, train_dir, val_dir)
    return Found(class_folders(root), None, f"{root} (class folders)", root)


# ------------------------------------------------------------------------------------------------- split

def _file_key(p: Path) -> tuple[int, int] | str:
    try:
        st = p.stat()
    except OSError:
        return str(p)
    return st.st_dev, st.st_ino


def unique(items: list[Item]) -> list[Item]:
    """``items`` without a second name for one file (a symlink, a hard link: same device and inode); first wins."""
    seen: set = set()
    out = []
    for it in items:
        k = _file_key(it[0])
        if k not in seen:
            seen.add(k)
            out.append(it)
    return out


def disjoint(train: list[Item], val: list[Item]) -> list[Item]:
    """``train`` without the files that are also in ``val`` under any name (they would inflate val accuracy); one
    warning when there are some."""
    in_val = {_file_key(p) for p, _ in val}
    both = [it for it in train if _file_key(it[0]) in in_val]
    if both:
        log.warning("%d files are in both train and val (the same file under two names: a symlink, a hard link or a "
                    "duplicate path; first: '%s'); they are used for val only", len(both), both[0][0])
        drop = {id(it) for it in both}
        train = [it for it in train if id(it) not in drop]
    return train


def stratified_split(items: list[Item], val_split: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Per class: sort by path, shuffle with ``random.Random(f"{seed}:{class}")``, move ``round(n * val_split)``
    to val (at least 1 when the class has 2+ images, never all of them). The same files give the same split on
    every run and machine, and one class's files never change another class's split."""
    by_class: dict[str, list[Path]] = {}
    for p, c in items:
        by_class.setdefault(c, []).append(p)
    train: list[Item] = []
    val: list[Item] = []
    for c, paths in by_class.items():
        paths = sorted(paths)
        n = len(paths)
        n_val = 0
        if val_split > 0 and n >= 2:
            n_val = min(n - 1, max(1, round(n * val_split)))
        order = list(range(n))
        random.Random(f"{seed}:{c}").shuffle(order)
        chosen = set(order[:n_val])
        train.extend((p, c) for i, p in enumerate(paths) if i not in chosen)
        val.extend((p, c) for i, p in enumerate(paths) if i in chosen)
    key = lambda it: (it[1], str(it[0]))  # noqa: E731
    return sorted(train, key=key), sorted(val, key=key)
