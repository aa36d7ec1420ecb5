"""Tests for official.puppet_cnn.data.image_folder."""

import os

import numpy as np
from PIL import Image
import pytest

from official.puppet_cnn.data import image_folder
from official.puppet_cnn.data.errors import DataError


def _save(path, array_or_image, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = (array_or_image if isinstance(array_or_image, Image.Image)
         else Image.fromarray(array_or_image))
  img.save(path, **kwargs)
  return path


def _constant(w, h, color, mode="RGB"):
  return Image.new(mode, (w, h), color)


@pytest.fixture
def tree(tmp_path):
  """Three classes (created out of name order) with mixed formats/sizes."""
  root = tmp_path / "root"
  # Class "zebra" (label 2): a wide RGB PNG and an upper-case .JPG.
  _save(str(root / "zebra" / "b.png"), _constant(50, 40, (255, 0, 0)))
  _save(str(root / "zebra" / "a.JPG"), _constant(30, 60, (0, 0, 255)),
        quality=95)
  # Class "ant" (label 0): grayscale JPEG, RGBA PNG, palette GIF.
  _save(str(root / "ant" / "gray.jpeg"), _constant(20, 30, 128, "L"),
        quality=95)
  _save(str(root / "ant" / "rgba.png"), _constant(16, 16, (10, 20, 30, 77),
                                                  "RGBA"))
  _save(str(root / "ant" / "pal.gif"),
        _constant(40, 40, (0, 255, 0)).convert("P"))
  # Class "mole" (label 1): BMP and WebP (lossless), plus ignored files.
  _save(str(root / "mole" / "x.bmp"), _constant(9, 12, (1, 2, 3)))
  _save(str(root / "mole" / "y.webp"), _constant(64, 64, (200, 100, 50)),
        lossless=True)
  (root / "mole" / "notes.txt").write_text("not an image")
  _save(str(root / "mole" / ".hidden.png"), _constant(8, 8, (9, 9, 9)))
  (root / ".git").mkdir()
  (root / "README").write_text("a file next to the class folders")
  return root


def test_tree_shapes_labels_and_order(tree):
  data = image_folder.load_image_folder(str(tree), image_size=8,
                                        num_workers=2)
  assert data.class_names == ("ant", "mole", "zebra")
  assert data.images.shape == (7, 8, 8, 3)
  assert data.images.dtype == np.uint8
  assert data.labels.dtype == np.int64
  names = [os.path.relpath(p, str(tree)) for p in data.paths]
  assert names == ["ant/gray.jpeg", "ant/pal.gif", "ant/rgba.png",
                   "mole/x.bmp", "mole/y.webp", "zebra/a.JPG", "zebra/b.png"]
  np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 1, 2, 2])


def test_constant_colors_survive_resize_and_crop(tree):
  images = image_folder.load_image_folder(str(tree), image_size=8).images
  exact = {1: (0, 255, 0), 2: (10, 20, 30), 3: (1, 2, 3), 4: (200, 100, 50),
           6: (255, 0, 0)}
  for i, color in exact.items():
    np.testing.assert_array_equal(images[i], np.broadcast_to(color, (8, 8, 3)),
                                  err_msg=f"image {i}")
  # JPEGs are lossy: gray 128 replicated to RGB, and pure blue.
  assert np.abs(images[0].astype(int) - 128).max() <= 2
  assert np.abs(images[5].astype(int) - (0, 0, 255)).max() <= 3


def test_center_crop_of_wide_image_without_resize(tmp_path):
  # 64x32 (w x h): columns 0-15 red, 16-47 green, 48-63 blue. The shorter side
  # is already 32, so the center crop is columns 16..47: all green.
  array = np.zeros((32, 64, 3), np.uint8)
  array[:, :16, 0] = 255
  array[:, 16:48, 1] = 255
  array[:, 48:, 2] = 255
  path = _save(str(tmp_path / "c" / "wide.png"), array)
  out = image_folder.load_image(path, image_size=32)
  np.testing.assert_array_equal(out, np.broadcast_to((0, 255, 0), (32, 32, 3)))


def test_center_crop_of_tall_image_after_resize(tmp_path):
  # 40x80 (w x h): rows 0-19 red, 20-59 green, 60-79 blue. Resized to 20x40,
  # then rows 10..29 are cropped: green, except bilinear blending at the edges.
  array = np.zeros((80, 40, 3), np.uint8)
  array[:20, :, 0] = 255
  array[20:60, :, 1] = 255
  array[60:, :, 2] = 255
  path = _save(str(tmp_path / "c" / "tall.png"), array)
  out = image_folder.load_image(path, image_size=20)
  assert out.shape == (20, 20, 3)
  np.testing.assert_array_equal(out[2:-2],
                                np.broadcast_to((0, 255, 0), (16, 20, 3)))
  # Red bleeds only into the top rows, blue only into the bottom rows.
  assert out[:10, :, 2].max() == 0 and out[10:, :, 0].max() == 0


def test_resize_size_larger_than_image_size(tmp_path):
  array = np.zeros((28, 28, 3), np.uint8)
  array[:, :, 0] = 255
  array[10:18, 10:18] = (0, 0, 255)  # 8x8 blue square in the center.
  path = _save(str(tmp_path / "c" / "sq.png"), array)
  out = image_folder.load_image(path, image_size=8, resize_size=28)
  np.testing.assert_array_equal(out[2:6, 2:6],
                                np.broadcast_to((0, 0, 255), (4, 4, 3)))
  with pytest.raises(ValueError):
    image_folder.load_image_folder(str(tmp_path), image_size=8, resize_size=4)


def test_missing_root(tmp_path):
  path = str(tmp_path / "missing")
  with pytest.raises(DataError, match="does not exist") as e:
    image_folder.load_image_folder(path, 8)
  assert path in str(e.value)


def test_no_class_folders(tmp_path):
  _save(str(tmp_path / "loose.png"), _constant(4, 4, (0, 0, 0)))
  with pytest.raises(DataError, match="no class subfolders") as e:
    image_folder.load_image_folder(str(tmp_path), 8)
  assert str(tmp_path) in str(e.value)


def test_class_folder_without_images(tmp_path):
  _save(str(tmp_path / "a" / "ok.png"), _constant(4, 4, (0, 0, 0)))
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "readme.txt").write_text("x")
  with pytest.raises(DataError, match="has no images") as e:
    image_folder.load_image_folder(str(tmp_path), 8)
  assert str(tmp_path / "b") in str(e.value)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_image_names_the_file(tmp_path, kind):
  for i in range(20):
    _save(str(tmp_path / "a" / f"ok{i:02d}.png"),
          _constant(8, 8, (i, 0, 0)))
  good = (tmp_path / "a" / "ok00.png").read_bytes()
  bad = tmp_path / "a" / "ok10_bad.png"
  if kind == "garbage":
    bad.write_bytes(b"\x00not a png at all" * 10)
  else:
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    _save(str(bad), noisy)
    bad.write_bytes(bad.read_bytes()[:len(good) // 2 + 200])
  with pytest.raises(DataError, match="cannot decode image") as e:
    image_folder.load_image_folder(str(tmp_path), 8, num_workers=3)
  assert str(bad) in str(e.value)


def test_list_image_folder_does_not_decode(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "broken.png").write_bytes(b"not decoded when listing")
  names, files = image_folder.list_image_folder(str(tmp_path))
  assert names == ("a",)
  assert files == [(str(tmp_path / "a" / "broken.png"), 0)]


def test_progress_is_logged(tree, monkeypatch):
  messages = []
  monkeypatch.setattr(image_folder.logging, "info",
                      lambda msg, *args: messages.append(msg % args))
  image_folder.load_image_folder(str(tree), 8, log_every=3)
  progress = [m for m in messages if "images (" in m]
  assert [m.split()[0] for m in progress] == ["3/7", "6/7", "7/7"]
