"""The ablation study's variants, training arguments and table."""
import json

import pytest

from official.puppet_cnn import ablations
from tests.train.train_test import REPO
from tests.train.train_test import _config

BASE = f"{REPO}/configs/cifar10_ablation.flags"


def test_every_variant_is_a_valid_training_config():
  for variant in ablations.VARIANTS:
    argv = ablations.train_argv(variant, BASE, "/tmp/x")
    config = _config(*argv)
    assert config.model.channels[0] == 8 and config.train.epochs == 4, variant.name
  by_name = {v.name: v for v in ablations.VARIANTS}
  assert _config(*ablations.train_argv(by_name["paper_init"], BASE,
                                       "/tmp/x")).model.init == "paper"


def test_select_and_argument_order():
  assert [v.name for v in ablations.select(["all"])] == list(ablations.VARIANT_NAMES)
  assert [v.name for v in ablations.select(["width_sampled", "baseline"])] == [
      "baseline", "width_sampled"]
  with pytest.raises(ValueError, match="unknown variants"):
    ablations.select(["nope"])
  variant = ablations.Variant("v", "q", ("--init=paper",))
  assert ablations.train_argv(variant, "base.flags", "d", ["--epochs=1"]) == [
      "--flagfile=base.flags", "--init=paper", "--epochs=1", "--model_dir=d"]


def test_table_from_hand_written_runs(tmp_path):
  for name, top1 in (("baseline", 0.30), ("paper_init", 0.2125)):
    run = tmp_path / name
    run.mkdir()
    (run / "results.json").write_text(json.dumps({
        "top1": top1, "top5": 0.8, "mean_depth": 6.0, "macs_at_mean_depth": 2.5e6,
        "parameter_breakdown": {"total_stored": 4794}}))
    (run / "training_state.json").write_text(json.dumps({"train_seconds": 120.4,
                                                         "epochs_done": 4}))
  variants = ablations.select(["baseline", "paper_init"])
  rows = [ablations.collect(v, str(tmp_path / v.name)) for v in variants]
  text = ablations.markdown(rows, "# T")
  assert "| 30.00% | 80.00% | - | 6.00 | 4,794 | 120 s | 2.50 |" in text
  assert "| `--init=paper` | 21.25% | 80.00% | -8.75 pt | 6.00 |" in text
  missing = ablations.collect(ablations.select(["midpoint"])[0], str(tmp_path / "none"))
  assert missing["top1"] is None and "| - | - |" in ablations.markdown([missing], "# T")
