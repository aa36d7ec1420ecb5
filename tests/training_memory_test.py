"""training_memory: the puppeteer's share of a training step, and the out-of-memory advice."""
import pytest
import tensorflow as tf

from official.puppet_cnn import training_memory as tm
from official.puppet_cnn.config_definitions import PuppetCNNConfig

PAPER = PuppetCNNConfig(stage_channels=(64, 128, 256, 512), max_depth=8)


def test_the_papers_state_is_its_table_5_count():
  # Table 5 at C = 512: "Total Params" 2.63 M = G's 0.27 M + the C x C x 9 state (2.36 M).
  assert tm.state_bytes(PAPER) == 512 * 512 * 9 * 4
  assert abs(tm.state_bytes(PAPER) / 4 / 1e6 - 2.36) < 0.005
  assert tm.state_bytes(PAPER.replace(state_channels=256)) == 256 * 256 * 9 * 4


@pytest.mark.parametrize("execution, bins, batch, want", [
    ("per_sample", 0, 64, 64),   # exact H: one trajectory per image
    ("per_sample", 16, 64, 64),  # binned, but still integrated per image
    ("gathered", 16, 64, 16),    # every bin, whatever the batch
    ("gathered", 16, 4, 16),
    ("bucketed", 16, 64, 16),    # at most the bins present in the batch
    ("bucketed", 16, 4, 4),
])
def test_trajectories_per_execution(execution, bins, batch, want):
  config = PAPER.replace(execution=execution, complexity_bins=bins)
  assert tm.generator_trajectories(config, batch) == want
  # 4 stages x 8 steps of 9.4 MB per trajectory: 302 MB.
  assert tm.trajectory_bytes(config, batch) == want * 4 * 8 * 9_437_184


@pytest.mark.parametrize("integrator, evals", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_a_multi_stage_integrator_keeps_a_state_per_evaluation(integrator, evals):
  config = PAPER.replace(integrator=integrator, execution="bucketed", complexity_bins=16)
  # 16 bins x 4 stages x 8 steps x `evals` evaluations of G x 9.4 MB.
  assert tm.trajectory_bytes(config, 64) == 16 * 4 * 8 * evals * 9_437_184
  text = tm.describe(config, 64)
  kept = "a 9.4 MB state-sized tensor" if evals == 1 else f"{evals} 9.4 MB state-sized tensors"
  assert f"keeps {kept} per step" in text and f"{16 * 32 * evals * 9.437184e-3:.1f} GB" in text
  advice = tm.out_of_memory_message("puppet_cnn", config, 64, False, RuntimeError("OOM"))
  assert ("--integrator=euler" in advice) == (evals > 1)


def test_out_of_memory_is_recognized_from_tensorflow_and_xla_alike():
  assert tm.is_out_of_memory(tf.errors.ResourceExhaustedError(
      None, None, "Out of memory while trying to allocate 93.03GiB."))
  assert tm.is_out_of_memory(RuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 99.24GiB with allocator"))
  assert not tm.is_out_of_memory(ValueError("shapes (3,) and (4,) do not match"))
  assert not tm.is_out_of_memory(tf.errors.InvalidArgumentError(None, None, "bad"))


def test_advice_for_the_papers_exact_h():
  error = tf.errors.ResourceExhaustedError(
      None, None, "Out of memory while trying to allocate 93.03GiB. [Op:__inference_x]")
  text = tm.out_of_memory_message("puppet_cnn", PAPER, 64, True, error)
  assert "allocate 93.03GiB" in text and "--execution=per_sample" in text
  assert "exact H (--complexity_bins=0)" in text and "--jit_compile" in text
  # 64 trajectories x 32 states x 9.44 MB = 19.3 GB.
  assert ("up to 64 puppeteer trajectories of 32 steps and keeps a 9.4 MB state-sized tensor "
          "per step for the backward pass: up to 19.3 GB") in text
  assert "--complexity_bins=16 --execution=bucketed --nojit_compile" in text
  assert "--complexity_bins=16 --execution=gathered" in text
  assert "a smaller --batch_size" in text


def test_advice_follows_the_execution():
  error = RuntimeError("RESOURCE_EXHAUSTED: Out of memory")
  bucketed = tm.out_of_memory_message(
      "puppet_cnn", PAPER.replace(execution="bucketed", complexity_bins=16), 64, False, error)
  assert "16 puppeteer trajectories" in bucketed and "4.8 GB" in bucketed
  assert "--batch_grouping=complexity_bin" in bucketed
  assert "--execution=bucketed --nojit_compile" not in bucketed
  gathered = tm.out_of_memory_message(
      "puppet_cnn", PAPER.replace(execution="gathered", complexity_bins=16), 64, True, error)
  assert "--execution=bucketed --nojit_compile" in gathered
  baseline = tm.out_of_memory_message("resnet", PAPER, 64, True, error)
  assert "--model=resnet" in baseline and "puppeteer" not in baseline
  assert "a smaller --batch_size" in baseline
