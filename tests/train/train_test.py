"""The training binary's flags: flagfiles resolve to valid configs, bad flags are refused."""
import glob
import os
import subprocess
import sys

import pytest
from absl import app
from absl import flags
from absl.testing import flagsaver

from official.puppet_cnn import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = flags.FLAGS


def _config(*argv):
  with flagsaver.flagsaver():
    FLAGS.unparse_flags()
    FLAGS(["train"] + list(argv))
    return train.config_from_flags()


@pytest.mark.parametrize("flagfile", sorted(glob.glob(os.path.join(REPO, "configs", "*.flags"))))
def test_every_flagfile_resolves(flagfile):
  config = _config(f"--flagfile={flagfile}")
  assert config.train.model == "puppet_cnn"
  assert config.data.batch_size == 64


def test_cifar10_flagfile_is_the_papers_protocol():
  config = _config(f"--flagfile={REPO}/configs/cifar10.flags")
  assert (config.data.dataset, config.data.train_subset, config.data.val_fraction) == (
      "cifar10", 10000, 0.2)
  assert not config.data.augment and config.data.batch_size == 64
  assert config.train.epochs == 800
  assert config.model.channels == (64, 128, 256, 512) and config.model.kernel_size == 3
  # G runs once per complexity bin present in a batch (the per-sample loss with 16 bins),
  # which XLA cannot compile: the paper's exact H needed 93-99 GiB at batch 64 under XLA.
  assert (config.model.execution, config.model.complexity_bins) == ("bucketed", 16)
  assert config.model.complexity_bin_floor == 0.0 and not config.train.jit_compile
  assert config.data.batch_grouping == "none"  # the paper's shuffled batches
  # The literal exact H stays one override away.
  exact = _config(f"--flagfile={REPO}/configs/cifar10.flags", "--complexity_bins=0",
                  "--execution=per_sample", "--jit_compile")
  assert exact.model.complexity_bins == 0 and exact.model.execution == "per_sample"
  assert exact.train.jit_compile


def test_xla_flagfile_is_the_same_protocol_compiled():
  """configs/cifar10_xla.flags differs from configs/cifar10.flags only in how G runs
  (gathered under XLA instead of bucketed without it) and where the run is written."""
  paper = _config(f"--flagfile={REPO}/configs/cifar10.flags").to_dict()
  xla = _config(f"--flagfile={REPO}/configs/cifar10_xla.flags").to_dict()
  assert xla["model"]["execution"] == "gathered" and xla["train"]["jit_compile"]
  for config in (paper, xla):
    del config["model"]["execution"], config["train"]["jit_compile"]
  assert paper == xla


def test_bucketed_execution_runs_without_xla():
  assert not _config("--model_dir=/tmp/x", "--complexity_bins=16",
                     "--execution=bucketed").train.jit_compile
  assert _config("--model_dir=/tmp/x").train.jit_compile
  assert _config("--model_dir=/tmp/x", "--complexity_bins=16",
                 "--execution=gathered").train.jit_compile
  with pytest.raises(ValueError, match="--execution=bucketed cannot be XLA-compiled"):
    _config("--model_dir=/tmp/x", "--complexity_bins=16", "--execution=bucketed",
            "--jit_compile")
  # Baselines ignore the puppet's execution.
  assert _config("--model_dir=/tmp/x", "--model=resnet", "--complexity_bins=16",
                 "--execution=bucketed", "--jit_compile").train.jit_compile


def test_cifar100_and_mini_imagenet_protocols():
  c100 = _config(f"--flagfile={REPO}/configs/cifar100.flags")
  assert c100.data.dataset == "cifar100" and c100.data.train_subset is None
  assert c100.data.val_fraction == 0.2  # 50,000 -> 40,000 / 10,000
  mini = _config(f"--flagfile={REPO}/configs/mini_imagenet.flags")
  for config in (c100, mini):  # the same execution as configs/cifar10.flags
    assert (config.model.execution, config.model.complexity_bins) == ("bucketed", 16)
    assert not config.train.jit_compile and config.model.channels == (64, 128, 256, 512)
  assert (mini.data.dataset, mini.data.image_size) == ("image_folder", 64)
  assert (mini.data.val_fraction, mini.data.test_fraction) == (0.1, 0.1)
  assert mini.model.pixel_mean == (0.485, 0.456, 0.406)


def test_flags_override_the_flagfile():
  config = _config(f"--flagfile={REPO}/configs/cifar10.flags", "--epochs=3",
                   "--stage_channels=8,16", "--model=puppet_resnet", "--nodepth_adaptation",
                   "--fixed_depth=2", "--integrator=rk4")
  assert config.train.epochs == 3 and config.train.model == "puppet_resnet"
  assert config.model.channels == (8, 16) and config.model.depth_when_fixed == 2
  assert not config.model.depth_adaptation and config.model.integrator == "rk4"


def test_beyond_the_paper_flags():
  config = _config("--model_dir=/tmp/x", "--train_widths=0.5,1.0", "--depth_refinements=2",
                   "--epochs=9", "--complexity_bins=16", "--execution=bucketed",
                   "--complexity_bin_floor=4", "--depth_scale=2", "--init=learned_additive",
                   "--bucketed_inference=per_bin", "--generator_remat", "--generator_loop",
                   "--generator_rank=32", "--nofused_batch_norm", "--state_channels=256",
                   "--nonarrow_kernels")
  assert config.model.train_widths == (0.5, 1.0) and config.model.depth_scale == 2.0
  assert config.model.generator_remat and config.model.generator_loop
  assert config.model.generator_rank == 32 and config.model.state_channels == 256
  assert not _config("--model_dir=/tmp/x").model.generator_loop
  assert not config.model.fused_batch_norm
  assert _config("--model_dir=/tmp/x").model.fused_batch_norm
  assert not config.model.narrow_kernels and _config("--model_dir=/tmp/x").model.narrow_kernels
  assert config.model.bucketed_inference == "per_bin"
  assert config.model.execution == "bucketed" and config.model.complexity_bins == 16
  assert config.model.complexity_bin_floor == 4.0
  assert _config("--model_dir=/tmp/x").model.complexity_bin_floor == 0.0
  gathered = _config("--model_dir=/tmp/x", "--complexity_bins=8", "--execution=gathered",
                     "--per_sample_conv=im2col", "--generator_depthwise=shifted",
                     "--gathered_kernels=upfront")
  assert (gathered.model.execution, gathered.model.complexity_bins) == ("gathered", 8)
  assert gathered.model.gathered_kernels == "upfront"
  assert _config("--model_dir=/tmp/x").model.gathered_kernels == "per_layer"
  assert gathered.model.per_sample_conv == "im2col"
  assert gathered.model.generator_depthwise == "shifted"
  assert _config("--model_dir=/tmp/x").model.generator_depthwise == "auto"
  assert _config("--model_dir=/tmp/x").model.per_sample_conv == "grouped"
  grouped = _config("--model_dir=/tmp/x", "--complexity_bins=16", "--execution=bucketed",
                    "--batch_grouping=complexity_bin")
  assert grouped.data.batch_grouping == "complexity_bin"
  assert _config("--model_dir=/tmp/x").data.batch_grouping == "none"
  assert config.train.depth_refinements == 2 and config.train.refinement_interval == 3
  assert config.model.init == "learned_additive"
  assert _config("--model_dir=/tmp/x", "--generator_matmul_dtype=bfloat16"
                 ).model.generator_matmul_dtype == "bfloat16"
  assert _config("--model_dir=/tmp/x").model.generator_matmul_dtype == "float32"


def test_export_kernel_cache_compute_dtype_is_checked():
  from official.puppet_cnn import train_lib  # pylint: disable=import-outside-toplevel
  bucketed = _config("--model_dir=/tmp/x", "--complexity_bins=16", "--execution=bucketed")
  train_lib.check_export_kernel_cache(bucketed, "bfloat16", "all", "bfloat16")
  with pytest.raises(ValueError, match="needs --export_kernel_cache"):
    train_lib.check_export_kernel_cache(bucketed, None, "all", "bfloat16")
  per_bin = _config("--model_dir=/tmp/x", "--complexity_bins=16", "--execution=bucketed",
                    "--bucketed_inference=per_bin")
  with pytest.raises(ValueError, match="bucketed_inference=loop"):
    train_lib.check_export_kernel_cache(per_bin, "int8", "all", "bfloat16")
  with pytest.raises(ValueError, match="must be one of"):
    train_lib.check_export_kernel_cache(bucketed, "int8", "all", "int8")


@pytest.mark.parametrize("argv, match", [
    (["--train_widths=0.5,0.75"], "include 1.0"),
    (["--depth_refinements=2", "--epochs=2"], "needs more than"),
    (["--execution=bucketed"], "complexity_bins"),
    (["--execution=gathered"], "execution='gathered' needs complexity_bins"),
    (["--depth_scale=-1"], "depth_scale"),
    (["--model=lenet"], "--model must be one of"),
    (["--epochs=0"], "--epochs"),
    (["--min_depth=5", "--max_depth=3"], "min_depth"),
    (["--val_fraction=1.5"], "val_fraction"),
    (["--stage_channels=8,0"], "stage_channels"),
    (["--batch_grouping=complexity_bin"], "needs --complexity_bins > 0"),
    (["--batch_grouping=complexity_bin", "--complexity_bins=16", "--model=resnet"],
     "has none"),
])
def test_impossible_flags_are_refused(argv, match):
  with pytest.raises((ValueError, TypeError), match=match):
    _config("--model_dir=/tmp/x", *argv)


def test_export_kernel_cache_flag():
  from official.puppet_cnn import train_lib  # pylint: disable=import-outside-toplevel
  from official.puppet_cnn.modeling.puppet_classifier import CACHE_DTYPES  # pylint: disable=import-outside-toplevel
  assert tuple(FLAGS["export_kernel_cache"].parser.enum_values) == ("none",) + CACHE_DTYPES
  assert tuple(FLAGS["export_kernel_cache_bins"].parser.enum_values) == (
      train_lib.EXPORT_CACHE_BINS)
  assert FLAGS["export_kernel_cache_bins"].default == "all"
  bucketed = _config("--model_dir=/tmp/x", "--complexity_bins=16", "--execution=bucketed")
  train_lib.check_export_kernel_cache(bucketed, "int8")
  train_lib.check_export_kernel_cache(bucketed, "int8", "train")
  train_lib.check_export_kernel_cache(_config("--model_dir=/tmp/x"), None)
  with pytest.raises(ValueError, match="needs a Puppet-CNN model with --execution=bucketed"):
    train_lib.check_export_kernel_cache(_config("--model_dir=/tmp/x"), "int8")
  gathered = _config("--model_dir=/tmp/x", "--complexity_bins=8", "--execution=gathered")
  train_lib.check_export_kernel_cache(gathered, "float16", "train")
  with pytest.raises(ValueError, match="int8 needs --execution=bucketed"):
    train_lib.check_export_kernel_cache(gathered, "int8")
  with pytest.raises(ValueError, match="needs a Puppet-CNN model"):
    train_lib.check_export_kernel_cache(_config("--model_dir=/tmp/x", "--model=resnet"),
                                        "float32")
  with pytest.raises(ValueError, match="must be one of"):
    train_lib.check_export_kernel_cache(bucketed, "int4")


def test_binary_reports_bad_flags_as_usage_errors(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  binary = [sys.executable, "-m", "official.puppet_cnn.train"]
  # Three independent runs of the binary, started together (each spends most of its time
  # importing TensorFlow, one CPU core each).
  procs = [subprocess.Popen(binary + argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for argv in ([f"--model_dir={tmp_path}", "--model=lenet"],
                        [f"--model_dir={tmp_path}", "--export_kernel_cache=int8"],
                        [])]
  (bad_model, no_export_dir, no_model_dir) = [(p, p.communicate(timeout=300)[1])
                                              for p in procs]
  proc, stderr = bad_model
  assert proc.returncode != 0
  assert "--model must be one of" in stderr and "Traceback" not in stderr
  proc, stderr = no_export_dir
  assert proc.returncode != 0 and "Traceback" not in stderr
  assert "--export_kernel_cache needs --export_dir" in stderr
  proc, stderr = no_model_dir
  assert proc.returncode != 0 and "model_dir" in stderr


def test_missing_data_names_the_path(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  empty = tmp_path / "nodata"
  empty.mkdir()
  proc = subprocess.run([sys.executable, "-m", "official.puppet_cnn.train",
                         f"--model_dir={tmp_path}/run", f"--data_dir={empty}", "--epochs=1"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and str(empty) in proc.stderr
  assert "Traceback" not in proc.stderr


def test_dtype_policy_flag_and_the_older_mixed_precision_flag():
  assert _config("--model_dir=/tmp/x").train.dtype_policy == "float32"
  assert _config("--model_dir=/tmp/x", "--dtype_policy=mixed_bfloat16"
                 ).train.dtype_policy == "mixed_bfloat16"
  assert _config("--model_dir=/tmp/x", "--mixed_precision").train.dtype_policy == "mixed_float16"
  with pytest.raises(ValueError, match="cannot be combined"):
    _config("--model_dir=/tmp/x", "--mixed_precision", "--dtype_policy=mixed_bfloat16")
  with pytest.raises(flags.IllegalFlagValueError):
    _config("--model_dir=/tmp/x", "--dtype_policy=bfloat16")


def test_paper_flagfile_trains_evaluates_and_exports(tmp_path):
  """configs/cifar10.flags end to end (its execution, bins, XLA setting and export), with a
  tiny puppet and 64 images per split in place of the paper's sizes."""
  from official.puppet_cnn import train_lib  # pylint: disable=import-outside-toplevel
  from tests.data import fake_data  # pylint: disable=import-outside-toplevel
  data_dir = fake_data.real_cifar10_folder()
  if data_dir is None:
    pytest.skip("real CIFAR-10 not found")
  config = _config(f"--flagfile={REPO}/configs/cifar10.flags", f"--data_dir={data_dir}",
                   f"--model_dir={tmp_path}/run", "--stage_channels=4,8", "--max_depth=3",
                   "--limit=64", "--epochs=1", "--batch_size=32", "--verbose=0")
  results = train_lib.run(config, "train_and_eval", str(tmp_path / "run"),
                          export_dir=str(tmp_path / "export"))
  assert results["num_test_images"] == 64 and 0.0 <= results["top1"] <= 1.0
  import json  # pylint: disable=import-outside-toplevel
  with open(tmp_path / "run" / "config.json") as f:
    saved = json.load(f)
  assert saved["model"]["execution"] == "bucketed" and not saved["train"]["jit_compile"]
  assert os.path.isfile(tmp_path / "export" / "puppet_cnn" / "1" / "saved_model.pb")
