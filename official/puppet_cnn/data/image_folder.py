"""Loads a class-per-folder image tree (e.g. mini-ImageNet) into memory.

Layout: `root/<class_name>/<image>.{png,jpg,jpeg,bmp,gif,webp}` (extensions
matched case-insensitively; hidden files and folders, i.e. names starting with
'.', and files with other extensions are ignored; only direct children of a
class folder are read). Classes are sorted by folder name and numbered
0..C-1; files within a class are sorted by name, so the output order is
deterministic.

Every image is decoded with PIL, EXIF-rotated, converted to RGB (grayscale is
replicated, alpha is dropped, palettes are expanded; GIF/WebP: first frame),
its shorter side resized to `resize_size` (default `image_size`) with
bilinear, antialiased resampling, and center-cropped to a square of
`image_size`. Everything is held in memory as one uint8 array: mini-ImageNet
(60,000 images) at 64x64 needs 737 MB. Progress is logged with absl every
`log_every` files.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import List, NamedTuple, Optional, Sequence, Tuple

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageOps

from official.puppet_cnn.data.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class ImageFolderData(NamedTuple):
  """Decoded contents of an image folder.

  Attributes:
    images: uint8 array (N, image_size, image_size, 3), RGB in [0, 255].
    labels: int64 array (N,), index into `class_names`.
    class_names: the class folder names, sorted; label i is class_names[i].
    paths: the N source files, in the same order as `images`.
  """
  images: np.ndarray
  labels: np.ndarray
  class_names: Tuple[str, ...]
  paths: Tuple[str, ...]


def _visible(name: str) -> bool:
  return not name.startswith(".")


def list_image_folder(
    root: str,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> Tuple[Tuple[str, ...], List[Tuple[str, int]]]:
  """Lists class names and `(path, label)` pairs without decoding anything.

  Raises:
    DataError: `root` is missing or not a directory, has no class folders, or
      a class folder has no images.
  """
  root = os.path.abspath(os.path.expanduser(os.fspath(root)))
  exts = tuple(e.lower() for e in extensions)
  if not os.path.exists(root):
    raise DataError(
        f"image folder does not exist: {root} (expected "
        f"{root}/<class_name>/<image>{{{','.join(exts)}}}).")
  if not os.path.isdir(root):
    raise DataError(f"image folder root is not a directory: {root}")
  try:
    entries = sorted(os.listdir(root))
  except OSError as e:
    raise DataError(f"cannot list image folder {root}: {e}") from None
  class_names = tuple(
      n for n in entries if _visible(n) and os.path.isdir(os.path.join(root, n)))
  if not class_names:
    raise DataError(
        f"no class subfolders in image folder {root} (expected "
        f"{root}/<class_name>/<image>{{{','.join(exts)}}}).")
  files = []
  for label, name in enumerate(class_names):
    folder = os.path.join(root, name)
    try:
      names = sorted(os.listdir(folder))
    except OSError as e:
      raise DataError(f"cannot list class folder {folder}: {e}") from None
    images = [os.path.join(folder, n) for n in names
              if _visible(n) and n.lower().endswith(exts)
              and os.path.isfile(os.path.join(folder, n))]
    if not images:
      raise DataError(
          f"class folder {folder} has no images (expected files ending in "
          f"{', '.join(exts)}).")
    files.extend((p, label) for p in images)
  return class_names, files


def _check_sizes(image_size: int, resize_size: Optional[int]) -> None:
  if int(image_size) != image_size or image_size <= 0:
    raise ValueError(f"image_size must be a positive int, got {image_size}.")
  if resize_size is not None and resize_size < image_size:
    raise ValueError(f"resize_size ({resize_size}) must be >= image_size "
                     f"({image_size}).")


def load_image(path: str, image_size: int,
               resize_size: Optional[int] = None) -> np.ndarray:
  """Decodes one image to uint8 (image_size, image_size, 3).

  The shorter side is resized to `resize_size` (default `image_size`),
  keeping the aspect ratio, then the center `image_size` square is cropped
  (offset `(side - image_size) // 2`).

  Raises:
    DataError: the file cannot be read or decoded (names the file).
  """
  resize_size = image_size if resize_size is None else resize_size
  try:
    with Image.open(path) as img:
      img.load()
      img = ImageOps.exif_transpose(img)
      img = img.convert("RGB")
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"cannot decode image {path} ({type(e).__name__}: {e}); "
                    "expected a readable PNG/JPEG/BMP/GIF/WebP file.") from None
  w, h = img.size
  if w <= 0 or h <= 0:
    raise DataError(f"image {path} is empty ({w}x{h}).")
  scale = resize_size / min(w, h)
  new_w = max(resize_size, int(round(w * scale)))
  new_h = max(resize_size, int(round(h * scale)))
  if (new_w, new_h) != (w, h):
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
  left = (new_w - image_size) // 2
  top = (new_h - image_size) // 2
  img = img.crop((left, top, left + image_size, top + image_size))
  return np.asarray(img, dtype=np.uint8)


def load_image_folder(
    root: str,
    image_size: int,
    resize_size: Optional[int] = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    num_workers: Optional[int] = None,
    log_every: int = 5000,
) -> ImageFolderData:
  """Reads every image under `root/<class_name>/` into one uint8 array.

  Args:
    root: the folder that holds one subfolder per class.
    image_size: side of the square output images.
    resize_size: the shorter side is first resized to this (default
      `image_size`), then the center `image_size` square is cropped.
    extensions: accepted file extensions (lower case, with the dot).
    num_workers: decoding threads (default: min(8, CPU count)); the output
      order does not depend on it.
    log_every: log progress every this many images.

  Returns:
    An `ImageFolderData`.

  Raises:
    ValueError: bad `image_size` / `resize_size`.
    DataError: missing root, no class folders, an empty class folder, or an
      unreadable image (the message names the path).
  """
  _check_sizes(image_size, resize_size)
  class_names, files = list_image_folder(root, extensions)
  paths = tuple(p for p, _ in files)
  labels = np.array([label for _, label in files], np.int64)
  logging.info("Image folder %s: %d images of %d classes.", root, len(paths),
               len(class_names))
  images = load_images(paths, image_size, resize_size, num_workers, log_every)
  return ImageFolderData(images, labels, class_names, paths)


def load_images(
    paths: Sequence[str],
    image_size: int,
    resize_size: Optional[int] = None,
    num_workers: Optional[int] = None,
    log_every: int = 5000,
) -> np.ndarray:
  """Decodes `paths` (with `load_image`) into one uint8 NHWC array, in order.

  Decoding runs on `num_workers` threads (default min(8, CPU count)); the
  output order is the order of `paths`. Progress is logged every `log_every`
  images.

  Raises:
    DataError: an image cannot be decoded (the first such file is named).
  """
  _check_sizes(image_size, resize_size)
  n = len(paths)
  images = np.empty((n, image_size, image_size, 3), np.uint8)
  if not n:
    return images
  workers = num_workers or min(8, os.cpu_count() or 1)
  logging.info("Decoding %d images at %dx%d with %d threads ...", n,
               image_size, image_size, workers)
  start = time.time()
  decode = lambda p: load_image(p, image_size, resize_size)
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
  try:
    for i, image in enumerate(pool.map(decode, paths)):
      images[i] = image
      if (i + 1) % log_every == 0 or i + 1 == n:
        logging.info("  %d/%d images (%.0f%%, %.1fs)", i + 1, n,
                     100.0 * (i + 1) / n, time.time() - start)
  finally:
    # On an error, do not wait for the rest of the tree to be decoded.
    pool.shutdown(wait=True, cancel_futures=True)
  return images
