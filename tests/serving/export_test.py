"""Tests for official/puppet_cnn/serving/export.py: TF Serving layout, signatures, fresh loads."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from official.puppet_cnn import PuppetClassifier
from official.puppet_cnn.serving import export
from tests.serving import tiny_models

SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


def _clean_env():
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return env


@pytest.fixture(scope="module")
def models():
  return {"puppet": tiny_models.tiny_puppet(), "resnet": tiny_models.tiny_resnet()}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
  root = tmp_path_factory.mktemp("exports")
  return {name: export.export_saved_model(model, str(root), name, float_signature=True)
          for name, model in models.items()}


@pytest.fixture(scope="module")
def keras_reference(models):
  x = tiny_models.images()
  details = models["puppet"](x, training=False, return_details=True)
  return {"images": x,
          "puppet_probabilities": tiny_models.softmax(details["logits"]),
          "puppet_depth": np.asarray(details["depth"]),
          "puppet_complexity": np.asarray(details["complexity"]),
          "resnet_probabilities": tiny_models.softmax(models["resnet"](x, training=False))}


@pytest.fixture(scope="module")
def fresh_process(exported, keras_reference, tmp_path_factory):
  """Loads both SavedModels in a new interpreter that cannot import this repository."""
  work = tmp_path_factory.mktemp("fresh")
  np.save(work / "images.npy", keras_reference["images"])
  script = textwrap.dedent("""
      import json, sys
      import numpy as np
      import tensorflow as tf
      try:
        import official  # must NOT be importable: the SavedModel has to stand alone
        repo_importable = True
      except ImportError:
        repo_importable = False
      images = np.load("images.npy")
      paths = json.loads(sys.argv[1])
      for name, path in paths.items():
        fn = tf.saved_model.load(path).signatures["serving_default"]
        out = fn(images=tf.constant(images))
        np.savez(name + ".npz", **{k: v.numpy() for k, v in out.items()})
      json.dump({"repo_importable": repo_importable}, open("status.json", "w"))
      """)
  proc = subprocess.run([sys.executable, "-c", script, json.dumps(exported)], cwd=work,
                        env=_clean_env(), capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  status = json.loads((work / "status.json").read_text())
  return {"status": status,
          **{name: dict(np.load(work / f"{name}.npz")) for name in exported}}


# ----------------------------------------------------------------------------- layout
def test_layout_versions_and_no_overwrite(models, tmp_path):
  model = models["resnet"]
  first = export.export_saved_model(model, str(tmp_path), "clf")
  assert first == str(tmp_path / "clf" / "1")
  assert (tmp_path / "clf" / "1" / "saved_model.pb").is_file()
  assert (tmp_path / "clf" / "1" / "variables" / "variables.index").is_file()
  assert (tmp_path / "clf" / "1" / "assets.extra" / "model_info.json").is_file()
  assert list(tf.saved_model.load(first).signatures) == ["serving_default"]  # float: opt-in
  assert export.export_saved_model(model, str(tmp_path), "clf") == str(tmp_path / "clf" / "2")
  assert export.export_saved_model(model, str(tmp_path), "clf", version=7).endswith("clf/7")
  assert export.export_saved_model(model, str(tmp_path), "clf").endswith("clf/8")
  before = (tmp_path / "clf" / "2" / "saved_model.pb").stat().st_mtime_ns
  with pytest.raises(FileExistsError, match="version 2 of model 'clf' already exists"):
    export.export_saved_model(model, str(tmp_path), "clf", version=2)
  assert (tmp_path / "clf" / "2" / "saved_model.pb").stat().st_mtime_ns == before
  # Nothing half-written is left behind (staging folders are renamed or removed).
  assert sorted(os.listdir(tmp_path / "clf")) == ["1", "2", "7", "8"]


def test_next_version_ignores_non_numeric_folders(tmp_path):
  base = tmp_path / "m"
  assert export.next_version(str(base)) == 1
  for name in ("3", "10", "tmp", "11a", ".export-12-x"):
    (base / name).mkdir(parents=True)
  (base / "12").write_text("a file, not a version")
  assert export.next_version(str(base)) == 11


@pytest.mark.parametrize("kwargs, message", [
    ({"model_name": "../escape"}, "model_name must be a plain folder name"),
    ({"model_name": ""}, "model_name must be a plain folder name"),
    ({"version": -1}, "version must be a non-negative integer"),
    ({"version": "3"}, "version must be a non-negative integer"),
    ({"top_k": 0}, "top_k must be a positive integer"),
    ({"class_names": ["a", "b"]}, "got 2 class names for a model with 5 classes"),
])
def test_bad_arguments(models, tmp_path, kwargs, message):
  args = dict(model_name="m", **kwargs) if "model_name" not in kwargs else dict(kwargs)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    export.export_saved_model(models["resnet"], str(tmp_path), **args)
  assert not (tmp_path / "m").exists() or not os.listdir(tmp_path / "m")


def test_model_info(models, tmp_path):
  names = ["cat", "dog", "eel", "fox", "gnu"]
  path = export.export_saved_model(models["puppet"], str(tmp_path), "pc", class_names=names)
  info = export.read_model_info(path)
  assert info["class_names"] == names
  assert info["num_classes"] == 5 and info["input_shape"] == [16, 16, 3]
  assert info["version"] == 1 and info["model_name"] == "pc"
  assert info["dtype_policy"] == "float32"
  # By hand: G = 3x3 depthwise (72) + bias (8) + 8x8 pointwise (64) + bias (8) + 4 x 8 BN = 184,
  # + 2 x 8 x 5 = 80 for its moving statistics kept per step (6 rows: 2 stages x 3 steps);
  # initial state rank 16: 16 x (8 + 9 + 8) = 400; puppet BNs 4 x (4 + 2x4 + 8 + 2x8) = 144;
  # head 8 x 5 + 5 = 45.
  assert info["parameter_breakdown"]["total_stored"] == 184 + 80 + 400 + 144 + 45
  assert info["parameter_breakdown"]["paper_param_size_mb"] == pytest.approx(4 * 264 / 1e6)
  assert set(info["signatures"]["serving_default"]["outputs"]) == {
      "probabilities", "top_k_classes", "top_k_probabilities", "depth", "complexity"}
  resnet = export.read_model_info(export.export_saved_model(models["resnet"], str(tmp_path),
                                                            "rn"))
  assert "depth" not in resnet["signatures"]["serving_default"]["outputs"]


# ----------------------------------------------------------------------------- signatures
def test_signature_shapes_and_dtypes(exported):
  for name, outputs in (("puppet", {"probabilities", "top_k_classes", "top_k_probabilities",
                                    "depth", "complexity"}),
                        ("resnet", {"probabilities", "top_k_classes", "top_k_probabilities"})):
    fn = tf.saved_model.load(exported[name]).signatures["serving_default"]
    args, kwargs = fn.structured_input_signature
    assert not args and list(kwargs) == ["images"]
    assert kwargs["images"].dtype == tf.uint8
    assert kwargs["images"].shape.as_list() == [None, 16, 16, 3]
    assert set(fn.structured_outputs) == outputs
    specs = fn.structured_outputs
    assert specs["probabilities"].dtype == tf.float32
    assert specs["probabilities"].shape.as_list() == [None, 5]
    assert specs["top_k_classes"].dtype == tf.int32
    if name == "puppet":
      assert specs["depth"].dtype == tf.int32 and specs["depth"].shape.as_list() == [None]
      assert specs["complexity"].dtype == tf.float32


def test_exported_matches_keras_and_nothing_is_frozen(exported, keras_reference):
  fn = tf.saved_model.load(exported["puppet"]).signatures["serving_default"]
  x = keras_reference["images"]
  out = {k: v.numpy() for k, v in fn(images=tf.constant(x)).items()}
  np.testing.assert_allclose(out["probabilities"], keras_reference["puppet_probabilities"],
                             atol=1e-5)
  np.testing.assert_array_equal(out["depth"], keras_reference["puppet_depth"])
  for index, depth in tiny_models.EXPECTED_DEPTH.items():
    assert out["depth"][index] == depth
  # The constant image and the noise get different depths AND different predictions.
  assert np.abs(out["probabilities"][0] - out["probabilities"][1]).max() > 1e-3
  # Each image alone gets what it gets in the batch: depth and kernels are per sample, and
  # decided at run time (calling the constant image first must not fix the noise's depth).
  for i in (0, 1, 2):
    alone = fn(images=tf.constant(x[i:i + 1]))
    assert int(alone["depth"][0]) == out["depth"][i]
    np.testing.assert_allclose(alone["probabilities"][0], out["probabilities"][i], atol=1e-5)
  # Two noise images share the max depth but have their own complexity, so their own kernels.
  assert out["depth"][1] == out["depth"][3]
  assert out["complexity"][1] != out["complexity"][3]
  assert np.abs(out["probabilities"][1] - out["probabilities"][3]).max() > 1e-4
  # top-k is the sorted probabilities.
  order = np.argsort(-out["probabilities"], axis=1, kind="stable")
  np.testing.assert_array_equal(out["top_k_classes"], order)
  np.testing.assert_allclose(out["top_k_probabilities"],
                             np.take_along_axis(out["probabilities"], order, 1), atol=1e-7)


def test_traced_for_inference_and_not_xla_compiled(exported, keras_reference):
  path = exported["puppet"]
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  functions = proto.meta_graphs[0].graph_def.library.function
  assert functions and not [f.signature.name for f in functions
                            if "_XlaMustCompile" in f.attr and f.attr["_XlaMustCompile"].b]
  # Inference mode: serving reads the batch-norm moving statistics, never updates them (the
  # tiny model's BN momentum is 0, so a training-mode trace would overwrite them at once).
  loaded = tf.saved_model.load(path)
  before = [v.numpy().copy() for v in loaded.model_variables]
  loaded.signatures["serving_default"](images=tf.constant(keras_reference["images"]))
  for old, new in zip(before, loaded.model_variables):
    np.testing.assert_array_equal(old, new.numpy())


def test_float_signature(exported, keras_reference):
  loaded = tf.saved_model.load(exported["puppet"])
  x = keras_reference["images"]
  out = loaded.signatures["float_images"](images=tf.constant(x.astype(np.float32)))
  np.testing.assert_allclose(out["probabilities"], keras_reference["puppet_probabilities"],
                             atol=1e-5)
  with pytest.raises(tf.errors.InvalidArgumentError, match="raw pixels in"):
    loaded.signatures["float_images"](images=tf.constant(np.full((1, 16, 16, 3), 300.0,
                                                                 np.float32)))


def test_baseline_export_matches_keras(exported, keras_reference):
  fn = tf.saved_model.load(exported["resnet"]).signatures["serving_default"]
  out = fn(images=tf.constant(keras_reference["images"]))
  np.testing.assert_allclose(out["probabilities"], keras_reference["resnet_probabilities"],
                             atol=1e-5)


def test_top_k_is_clipped_to_the_classes(models, tmp_path):
  path = export.export_saved_model(models["resnet"], str(tmp_path), "rn", top_k=50)
  fn = tf.saved_model.load(path).signatures["serving_default"]
  assert fn.structured_outputs["top_k_classes"].shape.as_list() == [None, 5]
  assert export.read_model_info(path)["top_k"] == 5


# ----------------------------------------------------------------------------- fresh process
def test_fresh_process_load_matches_keras(fresh_process, keras_reference):
  assert fresh_process["status"]["repo_importable"] is False
  puppet = fresh_process["puppet"]
  np.testing.assert_allclose(puppet["probabilities"], keras_reference["puppet_probabilities"],
                             atol=1e-5)
  np.testing.assert_array_equal(puppet["depth"], keras_reference["puppet_depth"])
  np.testing.assert_allclose(puppet["complexity"], keras_reference["puppet_complexity"],
                             atol=1e-5)
  np.testing.assert_allclose(fresh_process["resnet"]["probabilities"],
                             keras_reference["resnet_probabilities"], atol=1e-5)
  assert "depth" not in fresh_process["resnet"]


# ----------------------------------------------------------------------------- saved_model_cli
@pytest.mark.skipif(not os.path.exists(SAVED_MODEL_CLI) and not shutil.which("saved_model_cli"),
                    reason="saved_model_cli not installed")
def test_saved_model_cli_show_and_run(exported, keras_reference, tmp_path):
  cli = SAVED_MODEL_CLI if os.path.exists(SAVED_MODEL_CLI) else shutil.which("saved_model_cli")
  show = subprocess.run([cli, "show", "--dir", exported["puppet"], "--all"], cwd=tmp_path,
                        env=_clean_env(), capture_output=True, text=True, timeout=300,
                        check=False)
  assert show.returncode == 0, show.stderr[-3000:]
  block = show.stdout.split("signature_def['serving_default']:")[1].split("signature_def[")[0]
  images = block.split("inputs['images'] tensor_info:")[1].split("The given SavedModel")[0]
  assert "dtype: DT_UINT8" in images and "shape: (-1, 16, 16, 3)" in images
  for name in ("probabilities", "top_k_classes", "top_k_probabilities", "depth", "complexity"):
    assert f"outputs['{name}']" in block
  x = keras_reference["images"]
  np.save(tmp_path / "x.npy", x)
  run = subprocess.run([cli, "run", "--dir", exported["puppet"], "--tag_set", "serve",
                        "--signature_def", "serving_default", "--inputs",
                        f"images={tmp_path / 'x.npy'}", "--outdir", str(tmp_path / "out")],
                       cwd=tmp_path, env=_clean_env(), capture_output=True, text=True,
                       timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  np.testing.assert_allclose(np.load(tmp_path / "out" / "probabilities.npy"),
                             keras_reference["puppet_probabilities"], atol=1e-5)
  np.testing.assert_array_equal(np.load(tmp_path / "out" / "depth.npy"),
                                keras_reference["puppet_depth"])


# ------------------------------------------------------------------------ kernel cache
@pytest.fixture(scope="module")
def bucketed():
  """The tiny puppet with bucketed execution (16 bins), and its generating-path outputs."""
  model = tiny_models.tiny_puppet(complexity_bins=16, execution="bucketed")
  x = tiny_models.images()
  return model, x, tiny_models.softmax(model(x, training=False))


def test_export_with_a_bfloat16_compute_cache(bucketed, tmp_path):
  """kernel_cache_compute_dtype='bfloat16': the SavedModel serves what the Keras model with
  the same cache computes in a graph (bfloat16 features), close to the float32 cache's
  probabilities but not equal; the model info says so."""
  model, x, generated = bucketed
  path = export.export_saved_model(model, str(tmp_path), "bf16", kernel_cache="bfloat16",
                                   kernel_cache_compute_dtype="bfloat16")
  assert export.read_model_info(path)["kernel_cache"]["compute_dtype"] == "bfloat16"
  assert model.kernel_cache_info()["bins"] == ()
  out = tf.saved_model.load(path).signatures["serving_default"](
      images=tf.constant(x))["probabilities"].numpy()
  model.cache_kernels(dtype="bfloat16", fallback=False, compute_dtype="bfloat16")
  want = tiny_models.softmax(tf.function(lambda t: model(t, training=False))(tf.constant(x)))
  np.testing.assert_allclose(out, want, atol=1e-5)
  assert 0 < np.abs(out - generated).max() < 5e-2
  model.clear_kernel_cache()
  with pytest.raises(ValueError, match="needs kernel_cache"):
    export.export_saved_model(model, str(tmp_path), "bad", kernel_cache_compute_dtype="bfloat16")


def test_export_of_a_mixed_bfloat16_model_serves_its_bfloat16_convolutions(models, tmp_path):
  """A PuppetClassifier under 'mixed_bfloat16' exports as it computes: the SavedModel serves
  the Keras model's probabilities (bfloat16 convolutions), not the float32 model's with
  the same weights; the model info names the policy."""
  float32 = models["puppet"]
  mixed = PuppetClassifier(float32.config, dtype="mixed_bfloat16")
  mixed.build()
  mixed.set_weights(float32.get_weights())
  x = tiny_models.images()
  path = export.export_saved_model(mixed, str(tmp_path), "mixed")
  assert export.read_model_info(path)["dtype_policy"] == "mixed_bfloat16"
  out = tf.saved_model.load(path).signatures["serving_default"](
      images=tf.constant(x))["probabilities"].numpy()
  want = tiny_models.softmax(tf.function(lambda t: mixed(t, training=False))(tf.constant(x)))
  np.testing.assert_allclose(out, want, atol=1e-5)
  assert 0 < np.abs(out - tiny_models.softmax(float32(x, training=False))).max() < 5e-2


def test_kernel_cache_export_computes_in_the_models_dtype_by_default(bucketed, tmp_path):
  """kernel_cache_compute_dtype=None: a float32 model's cache serves float32 convolutions, a
  mixed_bfloat16 model's bfloat16 ones, as each model computes."""
  model, _, _ = bucketed
  mixed = PuppetClassifier(model.config, dtype="mixed_bfloat16")
  mixed.build()
  mixed.set_weights(model.get_weights())
  for m, want in ((model, "float32"), (mixed, "bfloat16")):
    path = export.export_saved_model(m, str(tmp_path), want, kernel_cache="int8")
    assert export.read_model_info(path)["kernel_cache"]["compute_dtype"] == want


def _variable_bytes(path):
  """Bytes of every variable in a SavedModel's checkpoint, by its dtype."""
  reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
  dtypes = reader.get_variable_to_dtype_map()
  return sum(int(np.prod(shape)) * dtypes[name].size
             for name, shape in reader.get_variable_to_shape_map().items())


def _largest_graph_constant(path):
  """Elements of the largest Const tensor in a SavedModel's graph and function library."""
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  graph = proto.meta_graphs[0].graph_def
  nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
  sizes = [int(np.prod([d.size for d in n.attr["value"].tensor.tensor_shape.dim]))
           for n in nodes if n.op == "Const"]
  return max(sizes)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_export_with_kernel_cache_serves_the_cached_kernels(bucketed, dtype, tmp_path):
  model, x, generated = bucketed
  plain = export.export_saved_model(model, str(tmp_path), "plain")
  path = export.export_saved_model(model, str(tmp_path), "cached", kernel_cache=dtype)
  assert model.kernel_cache_info()["bins"] == ()  # the model is left as it was: no cache
  # What the export must serve: the Keras model with the same cache.
  model.cache_kernels(dtype=dtype, fallback=False)
  cache = model.kernel_cache_info()
  assert cache["dtype"] == dtype and cache["bins"] == tuple(range(16)) and cache["valid"]
  info = export.read_model_info(path)
  assert info["kernel_cache"] == {"bins": list(range(16)), "dtype": dtype,
                                  "bytes": cache["bytes"], "fallback": False,
                                  "compute_dtype": "float32"}
  assert export.read_model_info(plain)["kernel_cache"] is None
  # The cache is stored with the variables (not as graph constants): the checkpoint grows
  # by its bytes (plus the weight snapshot it is checked against), the graph does not.
  assert _variable_bytes(path) - _variable_bytes(plain) >= cache["bytes"]
  largest = max(int(np.prod(v.shape)) for v in model._kernel_cache.tensors())  # pylint: disable=protected-access
  assert _largest_graph_constant(path) < largest, (_largest_graph_constant(path), largest)
  loaded = tf.saved_model.load(path)
  fn = loaded.signatures["serving_default"]
  out = fn(images=tf.constant(x))["probabilities"].numpy()
  want = tiny_models.softmax(model(x, training=False))  # the Keras model with the same cache
  np.testing.assert_allclose(out, want, atol=1e-5)
  if dtype == "float32":  # the exact path: the generating model's probabilities
    np.testing.assert_allclose(out, generated, atol=1e-5)
  else:  # quantized: close to them, not equal
    assert 0 < np.abs(out - generated).max() < 5e-2
  # The served outputs come from the stored kernels: zeroing them changes the answer.
  # (The cache's tensors: the kernels first, a transition and a table per stage and bin.)
  kernels = loaded.kernel_cache_variables[:2 * len(tiny_models.TINY_PUPPET["stage_channels"])
                                          * 16]
  assert all(v.shape.rank >= 4 for v in kernels)
  for v in kernels:
    v.assign(tf.zeros_like(v))
  changed = fn(images=tf.constant(x))["probabilities"].numpy()
  assert np.abs(changed - out).max() > 1e-3
  # Exported without the generating fallback: a smaller graph than the same cache with it.
  model.cache_kernels(dtype=dtype)
  with_fallback = export.export_saved_model(model, str(tmp_path), "fallback")
  assert export.read_model_info(with_fallback)["kernel_cache"]["fallback"] is True
  size = lambda p: os.path.getsize(os.path.join(p, "saved_model.pb"))  # pylint: disable=unnecessary-lambda-assignment
  assert size(path) < 0.8 * size(with_fallback), (size(path), size(with_fallback))
  model.clear_kernel_cache()


def test_export_with_the_cache_of_some_bins_serves_the_others_from_the_nearest(bucketed,
                                                                             tmp_path):
  model, x, generated = bucketed
  own = model(x, training=False, return_details=True)
  bins = sorted(set(own["complexity_bin"].numpy().tolist()))
  assert len(bins) >= 2
  keep = bins[-1:]  # one bin: every image is served by it
  path = export.export_saved_model(model, str(tmp_path), "some", kernel_cache="float32",
                                   kernel_cache_bins=keep)
  assert model.kernel_cache_info()["bins"] == ()
  info = export.read_model_info(path)["kernel_cache"]
  assert info["bins"] == keep and info["fallback"] == "nearest"
  full = export.export_saved_model(model, str(tmp_path), "all", kernel_cache="float32")
  assert _variable_bytes(path) < _variable_bytes(full)
  out = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(x))
  # Every image ran at the kept bin's depth; the images of that bin get exactly the
  # generating model's probabilities, the others differ (they ran as another bin).
  depths = model.bin_table()[2]
  np.testing.assert_array_equal(out["depth"].numpy(), np.full(len(x), depths[keep[0]]))
  same = own["complexity_bin"].numpy() == keep[0]
  probabilities = out["probabilities"].numpy()
  np.testing.assert_allclose(probabilities[same], generated[same], atol=1e-5)
  assert np.abs(probabilities[~same] - generated[~same]).max() > 1e-4
  with pytest.raises(ValueError, match="kernel_cache_bins needs kernel_cache"):
    export.export_saved_model(model, str(tmp_path), "x", kernel_cache_bins=keep)


def test_cached_export_runs_in_the_session_loader(bucketed, tmp_path):
  """TF Serving's TF1-style loader restores the cache variables (saved_model_cli run)."""
  model, x, generated = bucketed
  path = export.export_saved_model(model, str(tmp_path), "cached", kernel_cache="int8")
  with model.temporary_kernel_cache(dtype="int8", fallback=False):
    want = tiny_models.softmax(model(x, training=False))
  cli = SAVED_MODEL_CLI if os.path.exists(SAVED_MODEL_CLI) else shutil.which("saved_model_cli")
  np.save(tmp_path / "x.npy", x)
  run = subprocess.run([cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def",
                        "serving_default", "--inputs", f"images={tmp_path / 'x.npy'}",
                        "--outdir", str(tmp_path / "out")], cwd=tmp_path, env=_clean_env(),
                       capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  np.testing.assert_allclose(np.load(tmp_path / "out" / "probabilities.npy"), want, atol=1e-5)
  assert np.abs(np.load(tmp_path / "out" / "probabilities.npy") - generated).max() > 0


def test_gathered_export_serves_its_kernel_table(tmp_path):
  """A gathered model exported with a float16 kernel table: the SavedModel serves the
  per-sample model's probabilities (the generating path, to float16 rounding) from the
  stored table, which zeroing changes; the model is left without a table; int8 is refused."""
  model = tiny_models.tiny_puppet(complexity_bins=8, execution="gathered")
  reference = PuppetClassifier(config=model.config.replace(execution="per_sample"))
  x = tiny_models.images()
  reference(x[:1])
  reference.set_weights(model.get_weights())
  want = tiny_models.softmax(reference(x, training=False))
  path = export.export_saved_model(model, str(tmp_path), "gathered", kernel_cache="float16")
  assert model.kernel_cache_info()["bins"] == ()
  info = export.read_model_info(path)["kernel_cache"]
  assert info["dtype"] == "float16" and info["bins"] == list(range(8)) and info["fallback"]
  loaded = tf.saved_model.load(path)
  fn = loaded.signatures["serving_default"]
  out = fn(images=tf.constant(x))["probabilities"].numpy()
  assert np.abs(out - want).max() < 2e-3, np.abs(out - want).max()
  stages = len(tiny_models.TINY_PUPPET["stage_channels"])
  for v in loaded.kernel_cache_variables[:2 * stages]:  # the table: 2 tensors per stage
    assert v.shape[0] == 8 and v.dtype == tf.float16
    v.assign(tf.zeros_like(v))
  assert np.abs(fn(images=tf.constant(x))["probabilities"].numpy() - out).max() > 1e-3
  with pytest.raises(ValueError, match="kernel_cache='int8' needs execution='bucketed'"):
    export.export_saved_model(model, str(tmp_path), "g8", kernel_cache="int8")


@pytest.mark.parametrize("loop", [False, True])
def test_per_step_generator_statistics_export(loop, tmp_path):
  """generator_norm='batch_per_step': the SavedModel reads each step's row of G's moving
  statistics (in the generator loop, by the loop's step index) as Keras does; moving the last
  repeated row of each stage changes what it serves."""
  model = tiny_models.tiny_puppet(generator_norm="batch_per_step", generator_loop=loop)
  g = model.puppeteer
  rows = np.random.default_rng(1).normal(scale=0.3, size=tuple(g.moving_mean.shape))
  g.moving_mean.assign(rows.astype(np.float32))
  x = tiny_models.images()
  want = tiny_models.softmax(model(x, training=False))
  path = export.export_saved_model(model, str(tmp_path), "per_step")
  fn = tf.saved_model.load(path).signatures["serving_default"]
  out = fn(images=tf.constant(x))["probabilities"].numpy()
  assert np.abs(out - want).max() < 1e-5, np.abs(out - want).max()
  last = [s * g.statistics_rows // 2 + 2 for s in range(2)]  # (transition, step 0, step 1)
  rows[last] += 2.0
  g.moving_mean.assign(rows.astype(np.float32))
  moved = tiny_models.softmax(model(x, training=False))
  assert np.abs(moved - want).max() > 1e-4
  path = export.export_saved_model(model, str(tmp_path), "per_step_moved")
  out = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(x))
  assert np.abs(out["probabilities"].numpy() - moved).max() < 1e-5


def test_kernel_cache_errors(bucketed, models, tmp_path):
  with pytest.raises(ValueError, match="needs a Puppet-CNN with execution='bucketed'"):
    export.export_saved_model(models["puppet"], str(tmp_path), "p", kernel_cache="int8")
  with pytest.raises(ValueError, match="needs a Puppet-CNN with execution='bucketed'"):
    export.export_saved_model(models["resnet"], str(tmp_path), "r", kernel_cache="int8")
  model, x, generated = bucketed
  with pytest.raises(ValueError, match="kernel_cache must be None or one of"):
    export.export_saved_model(model, str(tmp_path), "b", kernel_cache="int4")
  # The model's own cache survives an export that caches for itself, also a failed one.
  model.cache_kernels(bins=[0, 1], dtype="float16")
  path = export.export_saved_model(model, str(tmp_path), "own", kernel_cache="int8")
  assert export.read_model_info(path)["kernel_cache"]["dtype"] == "int8"
  with pytest.raises(FileExistsError):
    export.export_saved_model(model, str(tmp_path), "own", version=1, kernel_cache="int8")
  own = model.kernel_cache_info()
  assert own["bins"] == (0, 1) and own["dtype"] == "float16" and own["fallback"] is True
  np.testing.assert_allclose(tiny_models.softmax(model(x, training=False)), generated,
                             atol=2e-3)  # bins 0-1 from the float16 cache, the rest generated
  model.cache_kernels()
  head = model.head.bias
  saved = head.numpy()
  head.assign(saved + 1.0)  # the head is not an input of the kernels: still valid
  assert model.kernel_cache_info()["valid"]
  head.assign(saved)
  beta = [w for w in model.puppet.weights if w.path.endswith("beta")][0]
  old = beta.numpy()
  beta.assign(old + 0.5)
  try:
    with pytest.raises(ValueError, match="kernel cache is stale"):
      export.export_saved_model(model, str(tmp_path), "b")
    assert not os.path.exists(tmp_path / "b")
  finally:
    beta.assign(old)
    model.clear_kernel_cache()
