"""Tests for official/puppet_cnn/serving/rest.py: TF Serving REST predict bodies."""

import ast
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from official.puppet_cnn.serving import export
from official.puppet_cnn.serving import rest
from tests.serving import tiny_models

OUTPUTS = {"probabilities", "top_k_classes", "top_k_probabilities", "depth", "complexity"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  model = tiny_models.tiny_puppet()
  root = tmp_path_factory.mktemp("rest")
  path = export.export_saved_model(model, str(root), "pc", float_signature=True)
  x = tiny_models.images()
  details = model(x, training=False, return_details=True)
  return {"model": model, "root": str(root), "path": path, "loaded": tf.saved_model.load(path),
          "images": x, "probabilities": tiny_models.softmax(details["logits"]),
          "depth": np.asarray(details["depth"])}


def _check_rows(predictions, served):
  assert len(predictions) == len(served["images"])
  for i, row in enumerate(predictions):
    assert set(row) == OUTPUTS
    np.testing.assert_allclose(row["probabilities"], served["probabilities"][i], atol=1e-5)
    assert row["depth"] == served["depth"][i]
    assert isinstance(row["depth"], int) and isinstance(row["probabilities"][0], float)
    assert len(row["top_k_classes"]) == 5


def test_row_format_bare_instances(served):
  body = {"instances": served["images"].tolist()}
  response = rest.predict_rest(served["loaded"], body)
  assert list(response) == ["predictions"]
  _check_rows(response["predictions"], served)
  assert [r["depth"] for r in response["predictions"]][:2] == [1, tiny_models.MAX_DEPTH]
  json.dumps(response)  # JSON-ready, as the server's answer


def test_row_format_named_instances_and_json_text(served):
  body = json.dumps({"signature_name": "serving_default",
                     "instances": [{"images": img} for img in served["images"].tolist()]})
  _check_rows(rest.predict_rest(served["loaded"], body)["predictions"], served)


def test_columnar_format(served):
  for inputs in (served["images"].tolist(), {"images": served["images"].tolist()}):
    response = rest.predict_rest(served["loaded"], {"inputs": inputs})
    assert list(response) == ["outputs"]
    outputs = response["outputs"]
    assert set(outputs) == OUTPUTS
    np.testing.assert_allclose(outputs["probabilities"], served["probabilities"], atol=1e-5)
    assert outputs["depth"] == served["depth"].tolist()


def test_path_uses_the_highest_version_like_the_server(served, tmp_path):
  model = tiny_models.tiny_puppet()
  export.export_saved_model(model, str(tmp_path), "pc")                     # version 1
  model.head.bias.assign(model.head.bias.numpy() + np.arange(5, dtype=np.float32))
  export.export_saved_model(model, str(tmp_path), "pc", version=3)          # version 3
  x = served["images"][:2]
  want = tiny_models.softmax(model(x, training=False))
  response = rest.predict_rest(str(tmp_path / "pc"), {"instances": x.tolist()})
  got = [p["probabilities"] for p in response["predictions"]]
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert rest.resolve_saved_model_dir(str(tmp_path / "pc")) == str(tmp_path / "pc" / "3")
  with pytest.raises(ValueError, match="no SavedModel"):
    rest.predict_rest(str(tmp_path), {"instances": x.tolist()})


def test_float_signature_and_model_errors(served):
  x = served["images"][:2].astype(float)
  response = rest.predict_rest(served["loaded"], {"signature_name": "float_images",
                                                  "instances": x.tolist()})
  np.testing.assert_allclose([p["probabilities"] for p in response["predictions"]],
                             served["probabilities"][:2], atol=1e-5)
  x[0, 0, 0, 0] = 300.0
  with pytest.raises(ValueError, match=r"model rejected the request.*\[0, 255\]"):
    rest.predict_rest(served["loaded"], {"signature_name": "float_images",
                                         "instances": x.tolist()})


def _image(value=0, shape=tiny_models.SHAPE):
  return np.full(shape, value, np.int64).tolist()


@pytest.mark.parametrize("body, message", [
    ({}, "exactly one of 'instances'.*it has neither"),
    ({"instances": [_image()], "inputs": [_image()]}, "not both"),
    ({"instances": []}, "'instances' is empty"),
    ({"instances": _image()[0][0][0]}, "must be a list"),
    ({"instance": [_image()]}, "unknown request keys"),
    ({"inputs": None}, "'inputs' is null"),
    ({"inputs": []}, "the batch is empty"),
    ({"instances": [np.full(tiny_models.SHAPE, 12.5).tolist()]}, "floating-point numbers"),
    ({"instances": [np.full(tiny_models.SHAPE, 3.0).tolist()]}, "floating-point numbers"),
    ({"instances": [_image(300)]}, r"values must be in \[0, 255\]; got min 300, max 300"),
    ({"instances": [_image(-1)]}, r"values must be in \[0, 255\]"),
    ({"instances": [np.full(tiny_models.SHAPE, "7").tolist()]}, "got strings"),
    ({"instances": [np.full(tiny_models.SHAPE, True).tolist()]}, "booleans"),
    ({"instances": [np.full(tiny_models.SHAPE, None).tolist()]}, "non-numeric"),
    ({"instances": [_image(shape=(8, 8, 3))]},
     "needs instances of shape 16 x 16 x 3, got 8 x 8 x 3"),
    ({"instances": [_image(shape=(16, 16, 1))]}, "got 16 x 16 x 1"),
    ({"instances": [_image(shape=(16, 16))]}, "each instance has rank 2"),
    ({"instances": [[_image()]]}, "each instance has rank 4"),
    ({"instances": [_image(), _image(shape=(8, 8, 3))]}, "ragged"),
    ({"instances": [{"image": _image()}]}, r"signature needs exactly \['images'\]"),
    ({"instances": [{"images": _image()}, _image()]}, "mixes named"),
    ({"instances": [{"b64": "AAAA"}]}, "base64"),
    ({"inputs": {"pixels": [_image()]}}, r"needs exactly \['images'\]"),
    ({"signature_name": "predict", "instances": [_image()]}, "unknown signature_name 'predict'"),
    ("{not json", "not valid JSON"),
    ([_image()], "must be a JSON object"),
])
def test_bad_requests_raise_clear_value_errors(served, body, message):
  with pytest.raises(ValueError, match=message):
    rest.predict_rest(served["loaded"], body)


def test_rest_does_not_import_the_model_code():
  """The server never has the model's Python code; neither may its stand-in."""
  path = os.path.join(os.path.dirname(rest.__file__), "rest.py")
  tree = ast.parse(open(path, encoding="utf-8").read())
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      imported |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      imported.add((node.module or "").split(".")[0])
  assert imported <= {"__future__", "json", "os", "re", "typing", "numpy", "tensorflow"}, imported
