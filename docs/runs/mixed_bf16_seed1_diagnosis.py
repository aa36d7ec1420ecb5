# The seed-1 outlier of docs/benchmarks_mixed_precision.md ("Accuracy"): the mixed_bfloat16 run
# evaluated on the first 2,000 CIFAR-10 test images with bfloat16 and float32 inference, at
# its best and last checkpoints, and both runs' last weights with every batch norm re-estimated
# on 2,048 training images. Output: docs/runs/mixed_bf16_seed1_diagnosis.txt.
#   PYTHONPATH=. python docs/runs/mixed_bf16_seed1_diagnosis.py
import sys, numpy as np, keras
from official.puppet_cnn import sweeps
from official.puppet_cnn import PuppetClassifier
run = "runs/ablations_bf16_e12_seed1/mixed_bf16"
model, splits = sweeps.load_run(run, "/work/shared/data", 2000)
print("loaded policy", model.precision_policy)
def acc(m):
  c = t = 0
  for x, y in splits.test:
    p = m.predict(np.asarray(x), verbose=0).argmax(1); c += int((p == np.asarray(y)).sum()); t += len(p)
  return c / t
for which in ["best", "latest"]:
  if which == "latest":
    model.load_weights(run + "/checkpoints/latest.weights.h5")
  f32 = PuppetClassifier(model.config, dtype="float32"); f32.build(); f32.set_weights(model.get_weights())
  # training-mode BN statistics from a batch (what the training accuracy sees)
  print(which, "mixed inference %.4f" % acc(model), "float32 inference %.4f" % acc(f32))
cal = sweeps.calibration_images(splits, 2048)
for name in ["baseline", "mixed_bf16"]:
  run = f"runs/ablations_bf16_e12_seed1/{name}"
  m, _ = sweeps.load_run(run, "/work/shared/data", 2000)
  m.load_weights(run + "/checkpoints/latest.weights.h5")
  raw = acc(m)
  m.recalibrate_batch_norm(cal, generator=True)
  print(name, "latest as trained %.4f, every BN re-estimated %.4f" % (raw, acc(m)))
