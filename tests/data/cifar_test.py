"""Tests for official.puppet_cnn.data.cifar."""

import os
import pickle
import sys
import tarfile
import types

import numpy as np
import pytest

from official.puppet_cnn.data import cifar
from official.puppet_cnn.data.errors import DataError
from tests.data import fake_data


@pytest.fixture(scope="module")
def fake10():
  return fake_data.make_cifar10_batches(num_per_batch=4)


@pytest.fixture
def archive_dir(tmp_path, fake10):
  payloads = fake10[0]
  fake_data.write_tar(str(tmp_path / "cifar-10-python.tar.gz"),
                      fake_data.cifar10_archive_files(payloads))
  return tmp_path


def _assert_equal_to_fake(result, fake):
  _, x_train, y_train, x_test, y_test = fake
  got_x_train, got_y_train, got_x_test, got_y_test = result
  assert got_x_train.shape == (20, 32, 32, 3)
  assert got_x_test.shape == (4, 32, 32, 3)
  assert got_x_train.dtype == np.uint8 and got_x_test.dtype == np.uint8
  assert got_y_train.dtype == np.int64 and got_y_test.dtype == np.int64
  np.testing.assert_array_equal(got_x_train, x_train)
  np.testing.assert_array_equal(got_y_train, y_train)
  np.testing.assert_array_equal(got_x_test, x_test)
  np.testing.assert_array_equal(got_y_test, y_test)


def test_archive_dir_round_trip_and_chw_to_hwc(archive_dir, fake10):
  result = cifar.load_cifar("cifar10", str(archive_dir))
  _assert_equal_to_fake(result, fake10)
  image = result[0][0]
  # Only three non-zero pixels, each in its own channel and place.
  assert np.count_nonzero(image) == 3
  assert image[3, 5, 0] == 200 and image[3, 5, 1] == 0 and image[3, 5, 2] == 0
  assert image[7, 1, 1] == 100
  assert image[31, 30, 2] == 50


def test_archive_file_itself(archive_dir, fake10):
  path = str(archive_dir / "cifar-10-python.tar.gz")
  assert cifar.locate_cifar("cifar10", path).kind == "archive"
  _assert_equal_to_fake(cifar.load_cifar("cifar10", path), fake10)


def test_archive_with_any_name_and_uncompressed_tar(tmp_path, fake10):
  path = fake_data.write_tar(str(tmp_path / "my_copy.tar"),
                             fake_data.cifar10_archive_files(fake10[0]),
                             mode="w")
  _assert_equal_to_fake(cifar.load_cifar("cifar10", path), fake10)


def test_extracted_folder_parent_and_itself(tmp_path, fake10):
  folder = fake_data.write_folder(str(tmp_path / "cifar-10-batches-py"),
                                  fake10[0])
  source = cifar.locate_cifar("cifar10", str(tmp_path))
  assert source == cifar.CifarSource("folder", folder)
  _assert_equal_to_fake(cifar.load_cifar("cifar10", str(tmp_path)), fake10)
  _assert_equal_to_fake(cifar.load_cifar("cifar10", folder), fake10)


def test_folder_preferred_over_archive(archive_dir, fake10):
  fake_data.write_folder(str(archive_dir / "cifar-10-batches-py"), fake10[0])
  assert cifar.locate_cifar("cifar10", str(archive_dir)).kind == "folder"


def test_str_keys_and_protocol_5_pickles(tmp_path, fake10):
  payloads = {m: pickle.dumps(
      {k.decode(): v for k, v in pickle.loads(p, encoding="bytes").items()},
      protocol=5) for m, p in fake10[0].items()}
  folder = fake_data.write_folder(str(tmp_path / "x"), payloads)
  _assert_equal_to_fake(cifar.load_cifar("cifar10", folder), fake10)


def test_env_var_is_default_data_dir(monkeypatch, archive_dir, fake10):
  monkeypatch.setenv(cifar.DATA_DIR_ENV_VAR, str(archive_dir))
  _assert_equal_to_fake(cifar.load_cifar("cifar10"), fake10)


def test_cifar100_fine_and_coarse(tmp_path):
  rng = np.random.default_rng(1)
  files, expected = {}, {}
  for member, n in (("train", 6), ("test", 3)):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    fine = rng.integers(0, 100, n)
    coarse = rng.integers(0, 20, n)
    files[f"cifar-100-python/{member}"] = fake_data.cifar_batch_bytes(
        data, fine, label_key=b"fine_labels",
        extra={b"coarse_labels": [int(c) for c in coarse]})
    expected[member] = (data, fine, coarse)
  files["cifar-100-python/meta"] = pickle.dumps({b"x": 1}, protocol=2)
  fake_data.write_tar(str(tmp_path / "cifar-100-python.tar.gz"), files)
  x_train, y_fine, x_test, _ = cifar.load_cifar("cifar100", str(tmp_path))
  _, y_coarse, _, y_test_coarse = cifar.load_cifar(
      "cifar100", str(tmp_path), label_mode="coarse")
  data, fine, coarse = expected["train"]
  np.testing.assert_array_equal(x_train[:, 2, 4, 1], data[:, 1024 + 2 * 32 + 4])
  np.testing.assert_array_equal(y_fine, fine)
  np.testing.assert_array_equal(y_coarse, coarse)
  np.testing.assert_array_equal(y_test_coarse, expected["test"][2])
  assert x_test.shape == (3, 32, 32, 3)


def test_class_names():
  assert len(cifar.cifar_class_names("cifar10")) == 10
  assert len(set(cifar.cifar_class_names("cifar100"))) == 100
  assert list(cifar.CIFAR100_FINE_CLASS_NAMES) == sorted(
      cifar.CIFAR100_FINE_CLASS_NAMES)
  assert len(set(cifar.cifar_class_names("cifar100", "coarse"))) == 20
  with pytest.raises(ValueError):
    cifar.cifar_class_names("cifar10", "coarse")
  with pytest.raises(ValueError):
    cifar.load_cifar("mnist", "/nonexistent")


# ---------------------------------------------------------------------------
# Errors: one DataError naming the path.


def test_missing_dir(tmp_path):
  path = str(tmp_path / "nope")
  with pytest.raises(DataError, match="does not exist") as e:
    cifar.load_cifar("cifar10", path)
  assert path in str(e.value)


def test_empty_dir_lists_what_was_looked_for(tmp_path):
  with pytest.raises(DataError) as e:
    cifar.load_cifar("cifar10", str(tmp_path))
  msg = str(e.value)
  assert f"no CIFAR-10 data under {tmp_path}" in msg
  assert os.path.join(str(tmp_path), "cifar-10-python.tar.gz") in msg
  assert os.path.join(str(tmp_path), "cifar-10-batches-py",
                      "data_batch_1") in msg


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_archive(tmp_path, archive_dir, keep):
  whole = (archive_dir / "cifar-10-python.tar.gz").read_bytes()
  path = tmp_path / "cut.tar.gz"
  path.write_bytes(whole[:int(len(whole) * keep)])
  with pytest.raises(DataError, match="corrupt or truncated") as e:
    cifar.load_cifar("cifar10", str(path))
  assert str(path) in str(e.value)


def test_garbage_archive(tmp_path):
  path = tmp_path / "cifar-10-python.tar.gz"
  path.write_bytes(b"this is not a tarball at all" * 100)
  with pytest.raises(DataError) as e:
    cifar.load_cifar("cifar10", str(tmp_path))
  assert str(path) in str(e.value)


def test_archive_missing_member(tmp_path, fake10):
  files = fake_data.cifar10_archive_files(fake10[0])
  del files["cifar-10-batches-py/test_batch"]
  path = fake_data.write_tar(str(tmp_path / "a.tar.gz"), files)
  with pytest.raises(DataError, match="lacks cifar-10-batches-py/test_batch"):
    cifar.load_cifar("cifar10", path)


def test_incomplete_folder(tmp_path, fake10):
  payloads = dict(fake10[0])
  del payloads["data_batch_3"]
  folder = fake_data.write_folder(str(tmp_path / "cifar-10-batches-py"),
                                  payloads)
  with pytest.raises(DataError, match="missing data_batch_3") as e:
    cifar.load_cifar("cifar10", str(tmp_path))
  assert folder in str(e.value)


def test_wrong_keys(tmp_path, fake10):
  payloads = dict(fake10[0])
  payloads["data_batch_2"] = pickle.dumps(
      {b"pixels": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]},
      protocol=2)
  path = fake_data.write_tar(str(tmp_path / "a.tar.gz"),
                             fake_data.cifar10_archive_files(payloads))
  with pytest.raises(DataError, match="expected 'data' and 'labels'") as e:
    cifar.load_cifar("cifar10", path)
  assert f"{path}::cifar-10-batches-py/data_batch_2" in str(e.value)


def test_corrupt_pickle(tmp_path, fake10):
  payloads = dict(fake10[0])
  payloads["test_batch"] = payloads["test_batch"][:1000]
  folder = fake_data.write_folder(str(tmp_path / "f"), payloads)
  with pytest.raises(DataError, match="cannot unpickle") as e:
    cifar.load_cifar("cifar10", folder)
  assert os.path.join(folder, "test_batch") in str(e.value)


class _Evil:

  def __reduce__(self):
    return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path, fake10):
  payloads = dict(fake10[0])
  payloads["data_batch_1"] = pickle.dumps(
      {b"data": _Evil(), b"labels": [0]}, protocol=2)
  folder = fake_data.write_folder(str(tmp_path / "f"), payloads)
  with pytest.raises(DataError, match="refusing to load global"):
    cifar.load_cifar("cifar10", folder)


@pytest.mark.parametrize("data,labels,match", [
    (np.zeros((2, 100), np.uint8), [0, 1], "expected \\(N, 3072\\)"),
    (np.zeros((2, 3072), np.uint8), [0, 10], "expected \\[0, 9\\]"),
    (np.zeros((2, 3072), np.uint8), [0], "1 labels for 2 images"),
    (np.full((2, 3072), 300, np.int32), [0, 1], "uint8"),
])
def test_malformed_batch(tmp_path, fake10, data, labels, match):
  payloads = dict(fake10[0])
  payloads["data_batch_4"] = fake_data.cifar_batch_bytes(data, labels)
  folder = fake_data.write_folder(str(tmp_path / "f"), payloads)
  with pytest.raises(DataError, match=match) as e:
    cifar.load_cifar("cifar10", folder)
  assert os.path.join(folder, "data_batch_4") in str(e.value)


def test_offline_without_data_dir(monkeypatch):
  monkeypatch.delenv(cifar.DATA_DIR_ENV_VAR, raising=False)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)

  def offline(spec, label_mode):
    raise OSError("URL fetch failure: no network")

  monkeypatch.setattr(cifar, "_load_from_keras", offline)
  with pytest.raises(DataError) as e:
    cifar.load_cifar("cifar10")
  msg = str(e.value)
  assert "--data_dir" in msg and "PUPPET_CNN_DATA_DIR" in msg
  assert "cifar-10-python.tar.gz" in msg and "no network" in msg


@pytest.mark.parametrize("online", [True, False])
def test_tfds_fallback_downloads_only_when_online(monkeypatch, online):
  monkeypatch.delenv(cifar.DATA_DIR_ENV_VAR, raising=False)
  monkeypatch.setattr(cifar, "_can_resolve", lambda host: online)
  calls = []

  def fake_load(name, split, batch_size, download):
    calls.append((name, split, batch_size, download))
    n = 6 if split == "train" else 2
    return {"image": np.full((n, 32, 32, 3), 7, np.uint8),
            "label": np.arange(n) % 10, "coarse_label": np.zeros(n)}

  monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(
      load=fake_load, as_numpy=lambda d: d))
  monkeypatch.setattr(cifar, "_load_from_keras", None)  # Must not be reached.
  x_train, y_train, x_test, y_test = cifar.load_cifar("cifar10")
  assert calls == [("cifar10", "train", -1, online),
                   ("cifar10", "test", -1, online)]
  assert x_train.shape == (6, 32, 32, 3) and x_test.shape == (2, 32, 32, 3)
  assert y_train.dtype == np.int64 and y_test.tolist() == [0, 1]


def test_online_fallback_result_is_validated(monkeypatch):
  monkeypatch.delenv(cifar.DATA_DIR_ENV_VAR, raising=False)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  x = np.zeros((5, 32, 32, 3), np.uint8)
  monkeypatch.setattr(cifar, "_load_from_keras", lambda spec, mode: (
      x, np.arange(5), x, np.arange(5)))
  out = cifar.load_cifar("cifar10")
  assert out[0].shape == (5, 32, 32, 3)
  monkeypatch.setattr(cifar, "_load_from_keras", lambda spec, mode: (
      x[:0], np.arange(0), x, np.arange(5)))
  with pytest.raises(DataError, match="x_train is empty"):
    cifar.load_cifar("cifar10")


# ---------------------------------------------------------------------------
# The real archive.


@pytest.fixture(scope="module")
def real10():
  data_dir = fake_data.real_cifar10_dir()
  if data_dir is None:
    pytest.skip("real CIFAR-10 not found: set PUPPET_CNN_DATA_DIR or put "
                "cifar-10-python.tar.gz in <repo>/../shared/data")
  return data_dir, cifar.load_cifar("cifar10", data_dir)


def _channel_stats(x):
  """Per-channel mean and std of uint8 NHWC images, in exact integer sums."""
  pixels = x.reshape(-1, 3)
  n = pixels.shape[0]
  total = pixels.sum(0, dtype=np.int64)
  squares = np.square(pixels, dtype=np.uint16).sum(0, dtype=np.int64)
  mean = total / n
  return mean, np.sqrt(squares / n - mean**2)


def test_real_cifar10_counts_and_statistics(real10):
  _, (x_train, y_train, x_test, y_test) = real10
  assert x_train.shape == (50000, 32, 32, 3)
  assert x_test.shape == (10000, 32, 32, 3)
  assert x_train.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(y_train, minlength=10), [5000] * 10)
  np.testing.assert_array_equal(np.bincount(y_test, minlength=10), [1000] * 10)
  mean, std = _channel_stats(x_train)
  # The well-known CIFAR-10 statistics (channel order R, G, B).
  np.testing.assert_allclose(mean, np.array([0.4914, 0.4822, 0.4465]) * 255,
                             atol=0.5)
  np.testing.assert_allclose(std, np.array([0.2470, 0.2435, 0.2616]) * 255,
                             atol=0.5)
  np.testing.assert_allclose(_channel_stats(x_test)[0],
                             np.array([0.4942, 0.4851, 0.4504]) * 255, atol=0.5)


def test_real_class_names_match_batches_meta(real10):
  data_dir, _ = real10
  source = cifar.locate_cifar("cifar10", data_dir)
  if source.kind == "archive":
    with tarfile.open(source.path) as tar:
      raw = tar.extractfile("cifar-10-batches-py/batches.meta").read()
  else:
    with open(os.path.join(source.path, "batches.meta"), "rb") as f:
      raw = f.read()
  meta = pickle.loads(raw, encoding="bytes")  # Trusted local test file.
  names = tuple(n.decode() for n in meta[b"label_names"])
  assert names == cifar.cifar_class_names("cifar10")


def test_real_archive_truncated(real10, tmp_path):
  source = cifar.locate_cifar("cifar10", real10[0])
  if source.kind != "archive":
    pytest.skip("real data is an extracted folder")
  with open(source.path, "rb") as f:
    head = f.read(5_000_000)
  path = tmp_path / "cifar-10-python.tar.gz"
  path.write_bytes(head)
  with pytest.raises(DataError, match="corrupt or truncated") as e:
    cifar.load_cifar("cifar10", str(tmp_path))
  assert str(path) in str(e.value)
