"""PuppetCNNConfig / ComplexityConfig: presets, resolution, validation, round trip."""
import pytest

from official.puppet_cnn.config_definitions import ComplexityConfig
from official.puppet_cnn.config_definitions import PUPPET_PRESETS
from official.puppet_cnn.config_definitions import PuppetCNNConfig


def test_defaults_are_the_papers_puppet():
  c = PuppetCNNConfig()
  assert c.channels == (64, 128, 256, 512) and c.block == "plain" and c.kernel_size == 3
  assert c.pools == (True, True, True, False) and c.state_width == 512
  assert c.max_depth == 8 and c.depth_when_fixed == 8


def test_presets_resolve_and_follow_replace():
  c = PuppetCNNConfig(puppet="alexnet")
  assert c.channels == PUPPET_PRESETS["alexnet"]["stage_channels"]
  assert c.pools == (True, True, False, False, True)
  r = c.replace(puppet="resnet")  # derived values follow the new preset
  assert r.block == "residual" and r.channels == (64, 128, 256, 512)
  custom = PuppetCNNConfig(stage_channels=(8, 16, 32, 64, 128))  # 5 stages, vgg preset has 4
  assert custom.pools == (True, True, True, True, False) and custom.state_width == 128


def test_dict_round_trip_including_nested_complexity():
  c = PuppetCNNConfig(stage_channels=(4, 8), complexity=ComplexityConfig(bins=64))
  d = c.to_dict()
  assert d["complexity"]["bins"] == 64
  assert PuppetCNNConfig.from_dict(d) == c
  assert PuppetCNNConfig.from_saved_dict(d) == c


def test_saved_config_without_generator_norm_reads_as_the_one_set_it_had():
  """A model or run saved before `generator_norm` existed kept one set of G's moving
  statistics; its config loads as 'batch', while a new config defaults to per step."""
  d = PuppetCNNConfig(stage_channels=(4, 8)).to_dict()
  assert d["generator_norm"] == "batch_per_step"
  del d["generator_norm"]
  assert PuppetCNNConfig.from_saved_dict(d).generator_norm == "batch"
  assert PuppetCNNConfig.from_dict(d).generator_norm == "batch_per_step"


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel_size=2), "kernel_size"),
    (dict(state_channels=-1), "state_channels"),
    (dict(init="zeros"), "init"),
    (dict(fixed_depth=9), "fixed_depth"),
    (dict(pixel_mean=(0.5,)), "pixel_mean"),
    (dict(input_shape=(32, 32)), "input_shape"),
    (dict(head_dropout=1.0), "head_dropout"),
    (dict(block_type="dense"), "block_type"),
    (dict(generator_rank=512), "generator_rank"),  # the full 512 x 512 matrix is rank 0
    (dict(generator_rank=-1), "generator_rank"),
    (dict(generator_rank=True), "generator_rank"),
    (dict(stage_channels=(8, 16), generator_rank=16), "generator_rank"),
    (dict(bucketed_inference="unrolled"), "bucketed_inference"),
])
def test_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    PuppetCNNConfig(**kwargs)


def test_complexity_validation():
  with pytest.raises(ValueError, match="pixel_weight"):
    ComplexityConfig(pixel_weight=1.5)
  with pytest.raises(ValueError, match="log_base"):
    ComplexityConfig(log_base=1.0)
