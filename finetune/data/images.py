"""Finding and reading image files: every decode in the toolkit goes through :func:`load_image`.

- Image files are recognised by extension (torchvision's ``IMG_EXTENSIONS``, case-insensitive). Hidden files
  (``.name``, e.g. macOS ``._photo.jpg`` resource forks, a classic "corrupt image") are never listed.
- Every image becomes 8-bit RGB: grayscale, palette (transparency honoured), CMYK, YCbCr and 1-bit convert the
  usual way; alpha is dropped (torchvision's ``pil_loader`` habit, what pretrained weights saw); 16-bit and 32-bit
  integer images are scaled down by 256 (not clipped to white); float images in [0, 1] are scaled by 255. The
  EXIF orientation of phone photos is applied.
- ``load_image(path, min_side=S)`` lets a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's
  ``draft``) when the result still has a shorter side of at least S: decoding a 12-megapixel JPEG and resizing it to
  256 px took 20 ms instead of 117 ms on this project's 2-core machine.
- A file that cannot be read raises :class:`DataError` naming it and the reason, in one line.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from finetune.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")  # torchvision's


def is_image_file(path: str | Path) -> bool:
    """True for a non-hidden file name with an image extension."""
    name = Path(path).name
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def walk_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively (skipping hidden folders), sorted.

    Directory symlinks are followed (torchvision's ``ImageFolder`` habit: a class folder kept on another disk),
    except one that points to a folder holding it (``loop -> .``, a link to ``/``: a loop, skipped with a
    warning); each real directory is listed once (by device and inode), so no image is found twice."""
    import logging

    found: list[Path] = []
    root = os.path.realpath(folder)
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # reached again through another link
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        here = os.path.realpath(dirpath)
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if d.startswith("."):
                continue
            if os.path.islink(full):
                target = os.path.realpath(full)
                if any(p == target or p.startswith(target.rstrip(os.sep) + os.sep) for p in (root, here)):
                    logging.getLogger("finetune").warning(
                        "not following directory symlink '%s': it points to '%s', which holds it (a loop)",
                        full, target)
                    continue
            keep.append(d)
        dirnames[:] = keep
        found.extend(Path(dirpath) / f for f in filenames if is_image_file(f))
    return sorted(found)


def list_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files and folders -> image files. Folders are searched recursively; a file named explicitly is kept
    whatever its extension. Order: as given, each folder's images sorted; duplicates removed."""
    return list(named_images(paths))


def named_images(paths: Iterable[str | Path]) -> dict[Path, str]:
    """:func:`list_images` with a display name for each file: relative to the folder it was found in (``bee/1.jpg``
    for ``val/bee/1.jpg`` under ``val``), or the path as given for a file named explicitly."""
    out: dict[Path, str] = {}
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            for f in walk_images(path):
                out.setdefault(f, str(f.relative_to(path)))
        elif path.is_file():
            out.setdefault(path, str(p))
        else:
            raise DataError(f"'{p}' does not exist; pass image files or folders of images")
    return out


def _reason(e: BaseException, path: Path) -> str:
    """A short reason for a failed read, without repeating the path."""
    if isinstance(e, UnidentifiedImageError):
        return "empty file" if _size(path) == 0 else "not an image (unknown format)"
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, Image.DecompressionBombError):  # PIL's limit: 2 x Image.MAX_IMAGE_PIXELS (~179 megapixels)
        m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(e))
        return (f"image too large ({int(m.group(1)):,} pixels; the limit is {int(m.group(2)):,}), a possible "
                f"decompression bomb; if you trust the file, raise PIL's limit with {PIXELS_ENV}=N (pixels; 0: "
                "none) or downscale the image" if m else "image too large")
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return msg.replace(f"'{path}'", "").replace(str(path), "").strip(" :") or type(e).__name__


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (see the module docstring for the rules)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I"):  # I, I;16, I;16B, ...: 16-bit data (PNG/TIFF); scale, don't clip
        a = np.asarray(im).astype(np.int64)
        return Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        a = a * 255.0 if a.size and float(np.nanmax(a)) <= 1.0 else a
        return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def load_image(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Open, fully decode and convert one image to RGB; :class:`DataError` naming the file when it can't.

    ``min_side``: the caller only needs a shorter side of this many pixels (JPEGs may decode smaller, see above).
    """
    path = Path(path)
    try:
        return open_rgb(path, min_side)
    except NotADirectoryError:  # SHARD.tar/MEMBER: how tar-shard val sets name their images (reports, pictures)
        return load_image_bytes(_tar_member(path), str(path), min_side)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image '{path}': {_reason(e, path)}") from None


def load_image_bytes(data: bytes, name: str, min_side: int | None = None) -> Image.Image:
    """:func:`load_image` for an image held in memory (a member of a tar shard); ``name`` for the error."""
    import io

    try:
        return open_rgb(io.BytesIO(data), min_side, name=name)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        why = "empty file" if not data else _reason(e, Path(name))
        raise DataError(f"cannot read image '{name}': {why}") from None


def _tar_member(path: Path) -> bytes:
    import tarfile

    for parent in path.parents:
        if parent.suffix == ".tar" and parent.is_file():
            try:
                with tarfile.open(parent, "r:") as tar:
                    f = tar.extractfile(path.relative_to(parent).as_posix())
                    if f is not None:
                        return f.read()
            except (tarfile.TarError, KeyError, OSError):
                break
    raise DataError(f"cannot read image '{path}': file not found")


def _pixel_limit() -> None:
    """``FINETUNE_MAX_IMAGE_PIXELS=N``: PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``; it warns above N
    pixels and refuses above 2N). Read when this module is imported (DataLoader workers inherit it)."""
    v = os.environ.get(PIXELS_ENV, "").strip()
    if v:
        try:
            Image.MAX_IMAGE_PIXELS = int(float(v)) if float(v) > 0 else None
        except (ValueError, OverflowError):
            logging.getLogger("finetune").warning("ignoring %s='%s': not a number of pixels (e.g. 300000000; 0: no "
                                                  "limit)", PIXELS_ENV, v)


PIXELS_ENV = "FINETUNE_MAX_IMAGE_PIXELS"
_pixel_limit()
_warned: set[str] = set()


@contextlib.contextmanager
def _bomb_warning(name) -> Iterator[None]:
    """PIL's ``DecompressionBombWarning`` (an image over ``Image.MAX_IMAGE_PIXELS``, under twice that) as the
    toolkit's own one-line warning naming the file (once per file and process); other PIL warnings (palette/EXIF
    chatter) are dropped: the result is what matters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning) and str(name) not in _warned:
            _warned.add(str(name))
            m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(w.message))
            size = f" ({int(m.group(1)):,} pixels; PIL's limit is {int(m.group(2)):,})" if m else ""
            logging.getLogger("finetune").warning(
                "image '%s' is very large%s: a possible decompression bomb; it is read anyway (set %s=N to "
                "change the limit)", name, size, PIXELS_ENV)


def open_rgb(src, min_side: int | None = None, name=None) -> Image.Image:
    """Decode ``src`` (a path or a binary file object) to RGB, with draft scaling and EXIF orientation."""
    with _bomb_warning(src if name is None else name):
        with Image.open(src) as im:
            if min_side and im.format == "JPEG" and min(im.size) >= 2 * min_side:
                w, h = im.size
                short = min(w, h)
                im.draft(None, (math.ceil(w * min_side / short), math.ceil(h * min_side / short)))
            im.load()
            if im.getexif().get(0x0112, 1) != 1:
                im = ImageOps.exif_transpose(im)
            return to_rgb(im)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header only; :class:`DataError` for an empty or non-image file."""
    path = Path(path)
    try:
        with _bomb_warning(path), Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image '{path}': {_reason(e, path)}") from None
