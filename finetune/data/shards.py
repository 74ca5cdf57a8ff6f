"""Streaming WebDataset-style ``.tar`` shards: ``--data 'shards/train-{000..099}.tar'``.

A shard is a plain (uncompressed) tar whose samples are consecutive members sharing a key (the member path up to
the first dot of its file name): ``key.jpg`` (or png, webp, ...: any image extension) plus ``key.cls`` (an integer
label) or ``key.txt`` (a class name). Classes: the sorted names of the ``.txt`` labels, or ``0 .. max`` for ``.cls``.

- **Training** streams: :class:`ShardStream` is an IterableDataset that reads its shards front to back with the
  stdlib ``tarfile`` and never holds more than a shuffle buffer of encoded samples (``SHUFFLE_BUFFER``) per
  DataLoader worker. Epoch ``e`` shuffles the shard list with ``(seed, e)``, gives rank ``r`` of ``R`` the shards
  ``order[r::R]`` and worker ``w`` of ``W`` its rank's ``[w::W]``, and each worker shuffles its samples through the
  buffer with ``(seed, e, r, w)``; a sample's augmentation is seeded by ``(seed, e, shard, position)``. Each sample
  is seen once per epoch (one process); under DDP every rank stops after the smallest rank's batch count (DDP needs
  equal step counts), so a few samples of a bigger rank wait for the next epoch, as with DistributedSampler's
  drop_last. The order depends on (seed, epoch, world size, workers): the same command gives the same batches.
- **Resume**: exact at epoch boundaries, and mid-epoch too (``--save-every-steps``): the loader replays the epoch's
  order and drops the batches already trained (they are read and decoded again, not trained: that costs time in
  proportion to the part skipped). Keep the number of processes and ``data.workers`` to keep the order.
- **Validation**: ``--val-data PATTERN`` (``data.val_path``), else the last shard of the list is held out (with a
  single shard there is no val set). Val shards are read by member offset (:class:`TarImageDataset`, a map-style
  dataset): evaluation, reports and ``finetune eval`` see the same images in the same order, one read per image.
- **Making shards**: ``write_shards(ROOT, "OUT/train-%03d.tar", per_shard=1000)`` writes an image folder
  (``ROOT/<class>/...``) as shards with ``.txt`` labels (the README shows it; any WebDataset writer works too).
"""

from __future__ import annotations

import io
import logging
import math
import random
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from finetune.data.datasets import ImageDataset, to_precrop
from finetune.data.images import is_image_file, load_image_bytes
from finetune.config.preflight import expand, is_shard_spec, shard_paths  # noqa: F401 - torch-free, re-exported
from finetune.errors import DataError
from finetune.errors import ConfigError, how_to_set, option
from finetune.data.images import walk_images

log = logging.getLogger("finetune")
SHUFFLE_BUFFER = 1000  # encoded samples per worker (WebDataset's usual size): ~100 MB of JPEGs at 256 px
# ------------------------------------------------------------------------------------------------- scanning

@dataclass
class Sample:
    shard: int
    name: str  # the image member's name
    offset: int  # of its data in the tar file
    size: int
    label: str  # the .txt class name or the .cls integer, as text
    kind: str  # "txt" or "cls"


def _key(name: str) -> tuple[str, str]:
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def iter_samples(tar: tarfile.TarFile, shard: int, path: Path, read_image: bool) -> Iterator[tuple[Sample, bytes]]:
    """The complete samples of an open tar, in order; the image bytes when ``read_image`` (else b"")."""
    group: dict[str, tarfile.TarInfo] = {}
    key = None
    for m in tar:
        tar.members = []  # tarfile remembers every member it has seen: forget them (memory stays flat)
        if not m.isfile():
            continue
        k, ext = _key(m.name)
        if k != key and group:
            yield from _complete(tar, group, shard, path, read_image)
            group = {}
        key = k
        group[ext] = m
    if group:
        yield from _complete(tar, group, shard, path, read_image)


def _complete(tar, group: dict, shard: int, path: Path, read_image: bool):
    image = next((m for e, m in group.items() if is_image_file("x." + e)), None)
    kind = "txt" if "txt" in group else "cls" if "cls" in group else None
    if image is None or kind is None:
        log.warning("shard '%s': sample '%s' has no %s; skipped", path, _key(next(iter(group.values())).name)[0],
                    "image" if image is None else ".cls or .txt label")
        return
    label = tar.extractfile(group[kind]).read().decode("utf-8", "replace").strip()
    data = tar.extractfile(image).read() if read_image else b""
    yield Sample(shard, image.name, image.offset_data, image.size, label, kind), data


def scan(paths: Sequence[Path], keep_samples: bool) -> tuple[list[int], list[str], list[Sample]]:
    """Per shard, the sample count; all labels (text, in order); the samples themselves when ``keep_samples``
    (val: offsets for random access). Reads headers and label members only."""
    counts, labels, samples = [], [], []
    for i, p in enumerate(paths):
        n = 0
        try:
            with tarfile.open(p, "r:") as tar:
                for s, _ in iter_samples(tar, i, p, read_image=False):
                    n += 1
                    labels.append((s.label, s.kind))
                    if keep_samples:
                        samples.append(s)
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"cannot read shard '{p}': {e}; shards are uncompressed tar files") from None
        counts.append(n)
    kinds = {k for _, k in labels}
    if len(kinds) > 1:
        raise DataError(f"shards of '{paths[0]}' mix .cls and .txt labels; use one kind")
    return counts, [t for t, _ in labels], samples


def class_index(labels: Sequence[str], where: str) -> tuple[list[str], dict[str, int]]:
    """Class names and text label -> index: sorted names for .txt, ``0..max`` for integer .cls labels."""
    if labels and all(re.fullmatch(r"-?\d+", t) for t in labels):
        ints = sorted({int(t) for t in labels})
        if ints[0] < 0:
            raise DataError(f"'{where}': .cls labels must be 0 or more, found {ints[0]}")
        names = [str(i) for i in range(ints[-1] + 1)]
        return names, {t: int(t) for t in set(labels)}
    names = sorted(set(labels))
    return names, {c: i for i, c in enumerate(names)}


# ------------------------------------------------------------------------------------------------- datasets

def decode_bytes(data: bytes, name: str, tf: dict) -> torch.Tensor:
    """:func:`finetune.data.datasets.decode` for an image in memory: the same uint8 CHW tensor."""
    from torchvision.transforms.v2 import functional as F

    return to_precrop(F.pil_to_tensor(load_image_bytes(data, name, min_side=int(tf["resize"]))), tf)


class TarImageDataset(ImageDataset):
    """Map-style: tar members read by offset (uncompressed shards). ``samples`` name them ``SHARD/MEMBER``."""

    def __init__(self, shards: Sequence[Path], samples: Sequence[Sample], targets: Sequence[int], class_names,
                 tf: dict, transform, strict: bool = False):
        super().__init__([(Path(shards[s.shard]) / s.name, t) for s, t in zip(samples, targets)], class_names, tf,
                         transform, strict=strict)
        self.shards = [str(p) for p in shards]
        self.where = np.array([(s.shard, s.offset, s.size) for s in samples], dtype=np.int64).reshape(-1, 3)

    def raw(self, index: int) -> torch.Tensor:
        shard, offset, size = (int(v) for v in self.where[index])
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        return decode_bytes(data, str(self.samples[index][0]), self.tf)


def sample_seed(seed: int, epoch: int, shard: int, pos: int) -> int:
    return (((seed * 1_000_003 + epoch) * 1_000_033 + shard) * 1_000_037 + pos) % 2**62


class ShardStream(IterableDataset):
    """Training samples streamed from shards (see the module docstring); yields whole batches ``(x, y)``."""

    streaming = True

    def __init__(self, shards: Sequence[Path], counts: Sequence[int], targets: np.ndarray, class_names, tf: dict,
                 transform, index: dict[str, int], strict: bool = False):
        self.shards, self.counts = [str(p) for p in shards], list(counts)
        self.targets = targets  # int32, shard order (for counts per class; the stream reads the labels itself)
        self.class_names, self.tf, self.transform, self.index, self.strict = list(class_names), tf, transform, \
            index, strict
        self.samples = None
        self.cached = False
        self.epoch, self.seed, self.batch_size, self.shuffle = 0, 0, 1, True
        self.replicas, self.rank, self.drop_single = 1, 0, True

    def __len__(self) -> int:
        return sum(self.counts)

    def with_transform(self, transform) -> ShardStream:
        import copy

        other = copy.copy(self)
        other.transform = transform
        return other

    def order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def worker_shards(self, epoch: int, rank: int, worker: int, workers: int) -> list[int]:
        return self.order(epoch)[rank::self.replicas][worker::workers]

    def batches(self, epoch: int, rank: int, workers: int) -> int:
        """Batches rank ``rank`` yields in ``epoch`` with ``workers`` DataLoader workers (each batches its own)."""
        total = 0
        for w in range(max(workers, 1)):
            n = sum(self.counts[s] for s in self.worker_shards(epoch, rank, w, max(workers, 1)))
            total += n // self.batch_size + (n % self.batch_size > (1 if self.drop_single else 0))
        return total

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{wid}")
        xs, ys = [], []
        for shard, pos, data, label in _buffered(self._raw(self.worker_shards(self.epoch, self.rank, wid, nw)),
                                                 SHUFFLE_BUFFER if self.shuffle else 0, rng):
            img = self._decode(shard, data)
            if img is None:
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, self.epoch, shard, pos))
                xs.append(self.transform(img))
            ys.append(label)
            if len(xs) == self.batch_size:
                yield torch.stack(xs), torch.tensor(ys)
                xs, ys = [], []
        if xs and not (self.drop_single and len(xs) == 1):  # BatchNorm cannot train on a batch of one
            yield torch.stack(xs), torch.tensor(ys)

    def _raw(self, shards: list[int]) -> Iterator[tuple[int, int, tuple[str, bytes], int]]:
        for i in shards:
            path = self.shards[i]
            with tarfile.open(path, "r:") as tar:
                for pos, (s, data) in enumerate(iter_samples(tar, i, Path(path), read_image=True)):
                    yield i, pos, (f"{path}/{s.name}", data), self.index[s.label]

    def _decode(self, shard: int, data: tuple[str, bytes]) -> torch.Tensor | None:
        name, raw = data
        try:
            return decode_bytes(raw, name, self.tf)
        except DataError as e:
            if self.strict:
                raise DataError(f"{e} (--strict; remove it from the shard, or drop --strict to skip it)") from None
            log.warning("skipping unreadable image '%s'", name)
            return None


def _buffered(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """WebDataset's shuffle buffer: keep ``size`` items, emit a random one as each new one arrives."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for it in items:
        if len(buf) < size:
            buf.append(it)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = it
    rng.shuffle(buf)
    yield from buf


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class ShardLoader:
    """The DataLoader of a :class:`ShardStream`: ``len()`` is this epoch's batch count (equal on every rank),
    ``sampler.set_epoch(e, start)`` picks the epoch (and the samples already trained, skipped on the next pass)."""

    skips = True

    def __init__(self, stream: ShardStream, batch_size: int, workers: int, device: str = "cpu"):
        self.dataset, self.batch_size, self.workers = stream, int(batch_size), int(workers)
        self.sampler = self
        self.epoch, self.skip = 0, 0
        self.loader = DataLoader(stream, batch_size=None, num_workers=self.workers,
                                 pin_memory=str(device).startswith("cuda"),
                                 worker_init_fn=_worker_init if self.workers else None)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(start) // self.batch_size

    def __len__(self) -> int:
        s = self.dataset
        return min(s.batches(self.epoch, r, self.workers) for r in range(s.replicas))

    def __iter__(self):
        n, skip = len(self), self.skip
        self.dataset.epoch = self.epoch  # pickled into the workers when the iteration starts
        self.epoch, self.skip = self.epoch + 1, 0
        for i, batch in enumerate(self.loader):
            if i >= n:
                break
            if i >= skip:
                yield batch


def make_stream_loader(ds: ShardStream, batch_size: int, *, shuffle: bool, seed: int, device: str, workers: int,
                       num_replicas: int, rank: int) -> ShardLoader:
    ds = ds.with_transform(ds.transform)
    ds.batch_size, ds.shuffle, ds.seed = int(batch_size), shuffle, int(seed)
    ds.replicas, ds.rank, ds.drop_single = int(num_replicas), int(rank), shuffle
    if len(ds.shards) < max(workers, 1) * ds.replicas:
        log.warning("%d shards for %d processes x %d loader workers: some read nothing; use more, smaller shards",
                    len(ds.shards), ds.replicas, max(workers, 1))
    return ShardLoader(ds, batch_size, workers, device)


# ------------------------------------------------------------------------------------------------- building

def build_shard_data(cfg, tf: dict, train_tf, eval_tf) -> tuple[ShardStream, TarImageDataset | None, list[str], str]:
    """``(train stream, map-style val set or None, class names, description)`` of ``cfg.path`` (a shard pattern)."""
    paths = shard_paths(cfg.path)
    val_paths = shard_paths(cfg.val_path) if cfg.val_path else paths[-1:] if len(paths) > 1 else []
    if not cfg.val_path and val_paths:
        paths = paths[:-1]
    counts, labels, _ = scan(paths, keep_samples=False)
    _, vlabels, vsamples = scan(val_paths, keep_samples=True) if val_paths else ([], [], [])
    if sum(counts) == 0:
        raise DataError(f"no samples found in the shards of '{cfg.path}' (a sample is key.jpg/png/... plus "
                        "key.cls or key.txt)")
    names, index = class_index(labels, cfg.path)
    if len(names) < 2:
        raise DataError(f"the shards of '{cfg.path}' hold 1 class ('{names[0]}'); a classifier needs at least 2")
    extra = sorted(set(vlabels) - set(index))
    if extra:
        raise DataError(f"val shards have classes that the training shards lack: {', '.join(extra[:5])}")
    targets = np.array([index[t] for t in labels], dtype=np.int32)
    train = ShardStream(paths, counts, targets, names, tf, train_tf, index, strict=cfg.strict)
    val = (TarImageDataset(val_paths, vsamples, [index[t] for t in vlabels], names, tf, eval_tf, cfg.strict)
           if vsamples else None)
    if val is None:
        log.warning("no validation shards for '%s'; training without validation (%s)", cfg.path,
                    how_to_set("data.val_path"))
    where = f"val = {option('data.val_path') if cfg.val_path else 'the last shard'}" if val is not None else "no val"
    source = f"{len(paths)} tar shards, {sum(counts)} samples, streamed ({where})"
    return train, val, names, source


def check_recipe(cfg):
    """A recipe on shards: the frozen-feature cache indexes images, which a stream cannot do: turn ``auto`` off,
    refuse ``on``. Returns the recipe."""

    if not is_shard_spec(cfg.data.path):
        return cfg
    if cfg.train.cache_features == "on":
        raise ConfigError("--cache-features on needs indexed images; tar shards are streamed: use "
                          "--cache-features off (or an image folder)")
    if getattr(cfg.data, "sampler", "random") != "random":
        raise ConfigError("data.sampler balanced draws images by index; tar shards are streamed: use --sampler "
                          "random (or train.class_weights auto for imbalanced classes)")
    cfg.train.cache_features = "off"
    return cfg


def write_shards(root: Path, pattern: str, per_shard: int = 1000) -> list[Path]:
    """Write the images of ``root`` (``root/<class>/...``, recursively) as shards ``pattern % i`` with ``.txt``
    class names, in a shuffled order (seed 0) so each shard mixes the classes."""

    root = Path(root)
    items = [(p, p.relative_to(root).parts[0]) for p in walk_images(root) if len(p.relative_to(root).parts) > 1]
    if not items:
        raise DataError(f"no images in class folders under '{root}' (root/<class>/image.jpg)")
    random.Random(0).shuffle(items)
    out = []
    for k in range(math.ceil(len(items) / per_shard)):
        path = Path(pattern % k)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as tar:
            for j, (p, cls) in enumerate(items[k * per_shard:(k + 1) * per_shard]):
                key = f"{k:05d}_{j:06d}"
                tar.add(str(p), arcname=f"{key}{p.suffix.lower()}")
                _add_bytes(tar, f"{key}.txt", cls.encode())
        out.append(path)
    return out


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def eval_shards(pattern: str, class_names: list[str], tf: dict, transform, strict: bool = False) -> TarImageDataset:
    """Every sample of the shards of ``pattern``, labelled by a checkpoint's ``class_names`` (``finetune eval``)."""
    paths = shard_paths(pattern)
    _, labels, samples = scan(paths, keep_samples=True)
    if not samples:
        raise DataError(f"no samples found in the shards of '{pattern}'")
    index = {c: i for i, c in enumerate(class_names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(f"'{pattern}' has classes the checkpoint was not trained on: "
                        f"{', '.join(repr(c) for c in unknown[:5])}; its classes are {', '.join(class_names)}")
    return TarImageDataset(paths, samples, [index[t] for t in labels], class_names, tf, transform, strict)
