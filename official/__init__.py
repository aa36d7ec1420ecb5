"""Namespace package, laid out like the TensorFlow Model Garden's `official/`."""
