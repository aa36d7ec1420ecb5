"""Serving Puppet-CNN and the baselines: TF Serving export, REST requests, size accounting.

* `export.export_saved_model`: the TF Serving SavedModel layout and signatures.
* `rest.predict_rest`: TF Serving's REST predict API, in-process, on a SavedModel.
* `model_loading.load_keras_model`: a trained `.keras` model from a file or checkpoint folder.
* `model_size`, `macs`, `compression`, `size_report`: what `tools/compare_sizes.py` reports.
"""
