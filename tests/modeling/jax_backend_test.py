"""The model's layers under KERAS_BACKEND=jax, in a subprocess with its own interpreter.

The interpreter is $PUPPET_CNN_JAX_PYTHON when set (CI: .venv-jax/bin/python, created by
.ci/run from requirements-jax.txt; relative paths are from the repository root), else
.venv-jax/bin/python in the repository, else ../venv-jax/bin/python beside it. The test is
skipped, with the reason, when there is none or `import jax` fails in it.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _jax_python():
  if os.environ.get("PUPPET_CNN_JAX_PYTHON"):
    candidates = [os.environ["PUPPET_CNN_JAX_PYTHON"]]  # explicit: nothing else is tried
  else:
    candidates = [os.path.join(ROOT, ".venv-jax", "bin", "python"),
                  os.path.join(os.path.dirname(ROOT), "venv-jax", "bin", "python")]
  tried = []
  for path in candidates:
    path = path if os.path.isabs(path) else os.path.join(ROOT, path)
    tried.append(path)
    if os.path.exists(path):
      return path, tried
  return None, tried


SCRIPT = r'''
import json
import numpy as np
import jax
import jax.numpy as jnp
import keras
from keras import ops
assert keras.backend.backend() == "jax", keras.backend.backend()
from official.puppet_cnn import PuppetClassifier
from official.puppet_cnn.modeling import backend_ops
from official.puppet_cnn.modeling import complexity as cx
from tests.modeling import reference

out = {"jax": jax.__version__, "keras": keras.__version__}
rng = np.random.default_rng(0)
# Fixed weights: the bfloat16 checks below compare rounding errors against bounds, and with
# unseeded weights those errors vary from run to run (G's at up to 6% of the largest
# gradient, against 5% that held for the weights the bound was set with).
keras.utils.set_random_seed(0)

# 1. Per-sample conv (keras.ops.conv with the batch folded into groups, and im2col) against the
#    float64 loop of tests/modeling/reference.py, for K = 1, 3, 5, eagerly and under jax.jit.
errors = []
for k in (1, 3, 5):
  x = rng.normal(size=(3, 6, 5, 4)).astype(np.float32)
  kernels = rng.normal(size=(3, k, k, 4, 3)).astype(np.float32)
  want = np.stack([reference.conv2d_same(x[b], kernels[b]) for b in range(3)])
  for method in ("grouped", "im2col"):
    conv = lambda a, b, method=method: backend_ops.per_sample_conv2d(a, b, method)
    for fn in (conv, jax.jit(conv)):
      got = np.asarray(fn(x, kernels))
      errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
out["conv_rel_err"] = max(errors)

# 2. Its gradients (both methods) against those of a per-sample loop of ordinary convs.
x = rng.normal(size=(3, 6, 5, 4)).astype(np.float32)
kernels = rng.normal(size=(3, 3, 3, 4, 3)).astype(np.float32)
w = rng.normal(size=(3, 6, 5, 3)).astype(np.float32)
folded = lambda a, k: jnp.sum(backend_ops.per_sample_conv2d(a, k) * w)
loop = lambda a, k: jnp.sum(jnp.concatenate(
    [ops.conv(a[b:b + 1], k[b], padding="same") for b in range(3)]) * w)
im2col = lambda a, k: jnp.sum(backend_ops.per_sample_conv2d(a, k, "im2col") * w)
g1 = jax.grad(folded, argnums=(0, 1))(x, kernels)
g2 = jax.grad(loop, argnums=(0, 1))(x, kernels)
g1c = jax.grad(im2col, argnums=(0, 1))(x, kernels)
out["conv_grad_err"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()
                                 / np.abs(np.asarray(b)).max())
                           for a, b in zip(list(g1) + list(g1c), list(g2) + list(g2)))

# 2b. G's depthwise conv ('auto' is the shifted copies under JAX) against the float64 loop,
#     and its gradients against keras.ops.depthwise_conv's.
x = rng.normal(size=(2, 7, 5, 4)).astype(np.float32)
dwk = rng.normal(size=(3, 3, 4, 1)).astype(np.float32)
want = np.stack([reference.depthwise_same(x[n], dwk) for n in range(2)])
got = np.asarray(jax.jit(backend_ops.depthwise_conv_same)(x, dwk))
out["depthwise_rel_err"] = float(np.abs(got - want).max() / np.abs(want).max())
wd = rng.normal(size=(2, 7, 5, 4)).astype(np.float32)
gd1 = jax.grad(lambda a, k: jnp.sum(backend_ops.depthwise_conv_same(a, k) * wd),
               argnums=(0, 1))(x, dwk)
gd2 = jax.grad(lambda a, k: jnp.sum(backend_ops.depthwise_conv_same(a, k, "conv") * wd),
               argnums=(0, 1))(x, dwk)
out["depthwise_grad_err"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()
                                      / np.abs(np.asarray(b)).max()) for a, b in zip(gd1, gd2))

# 3. The bounded loop (fori_loop here) is differentiable: d/dv of v * 1.5^min(n, bound).
def looped(v, n):
  def body(i, x):
    return i + 1, jnp.where(i < n, x * 1.5, x)
  _, y = backend_ops.bounded_while_loop(lambda i, x: i < n, body, (0, v), maximum_iterations=4)
  return y
out["loop_grad"] = float(jax.grad(looped)(2.0, 3))  # 1.5 ** 3

# 4. A small PuppetClassifier: one compiled forward + backward (a stateless call under
#    jax.jit(jax.value_and_grad)), then a few SGD steps with it.
tiny = dict(stage_channels=(4, 8), max_depth=3, num_classes=5, input_shape=(16, 16, 3))
# The reference differentiates G by autodiff (the default, 'auto', would use the reversible
# backward, which 6a' checks against this one).
model = PuppetClassifier(**tiny, generator_backward="autodiff")
model.build()
images = rng.integers(0, 256, (6, 16, 16, 3)).astype(np.float32)
images[0] = 90.0
labels = np.arange(6) % 5
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
trainable = [v.value for v in model.trainable_variables]
non_trainable = [v.value for v in model.non_trainable_variables]

def loss_of(trainable):
  details, _ = model.stateless_call(trainable, non_trainable, images, training=True,
                                    return_details=True)
  return loss_fn(labels, details["logits"]), details

step = jax.jit(jax.value_and_grad(loss_of, has_aux=True))
(loss, details), grads = step(trainable)
h = np.asarray(cx.image_complexity(images))
want_depth = np.clip(np.floor(1 / np.tanh(1 / np.maximum(h, 1e-6))), 1, 3)
out["depth_ok"] = bool(np.array_equal(np.asarray(details["depth"]), want_depth))
out["logits_finite"] = bool(np.all(np.isfinite(np.asarray(details["logits"]))))
paths = [v.path for v in model.trainable_variables]
out["grads_finite"] = bool(all(np.all(np.isfinite(np.asarray(g))) for g in grads))
out["puppeteer_grads_nonzero"] = bool(all(
    float(jnp.abs(g).max()) > 0 for p, g in zip(paths, grads)
    if p.startswith("puppet_cnn/puppeteer/") and "bias" not in p))

# 5. A few SGD steps lower the loss.
t0_loss, t0_grads = loss, grads  # at the initial weights: the reference of 6 below
losses = [float(loss)]
for _ in range(4):
  trainable = [t - 0.05 * g for t, g in zip(trainable, grads)]
  (loss, _), grads = step(trainable)
  losses.append(float(loss))
out["losses"] = losses

# 6. Training options that change how the gradient is computed, not its value: a model with
#    the same weights gives the same loss and gradients under jax.jit as the autodiff
#    reference above (at the initial weights, step in 4).
#    remat: jax.checkpoint under keras.remat. loop: a TensorFlow-graph option, so under JAX
#    the steps run unrolled. reversible (6a'): a jax.custom_gradient through
#    keras.ops.custom_gradient that undoes the Euler steps (6a-rk4: RK4's); also what the
#    default 'auto' trains with.
l1, g1 = t0_loss, t0_grads
# Relative to the largest gradient entry of the model: biases that feed a batch norm have
# gradients that are zero up to rounding (~1e-8), so a per-tensor ratio would compare noise.
scale = max(float(np.abs(np.asarray(a)).max()) for a in g1)

def same_as_reference(name, **kwargs):
  other = PuppetClassifier(**tiny, **kwargs)
  other.build()
  other.set_weights(model.get_weights())
  other_non_trainable = [v.value for v in other.non_trainable_variables]
  def other_loss(trainable):
    details, _ = other.stateless_call(trainable, other_non_trainable, images, training=True,
                                      return_details=True)
    return loss_fn(labels, details["logits"])
  loss, grads = jax.jit(jax.value_and_grad(other_loss))(
      [v.value for v in other.trainable_variables])
  out[name + "_loss_err"] = abs(float(l1) - float(loss))
  out[name + "_grad_err"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                                for a, b in zip(g1, grads)) / scale

same_as_reference("remat", generator_remat=True, generator_backward="autodiff")
same_as_reference("loop", generator_remat=True, generator_loop=True)
same_as_reference("reversible", generator_backward="reversible")
# 6a-rk4. The reversible backward of an RK4 trajectory (four stages per step, undone
#       together) against autodiff, on the puppeteer alone under jax.jit (a cheaper compile
#       than the model's): same loss and gradients of a loss of every generated kernel.
from official.puppet_cnn.modeling.puppeteer_ode import PuppeteerODE
rk_h, rk_dl = np.array([3.0, 6.0, 7.0], "float32"), np.array([0.5, 0.3, 0.2], "float32")
rk_depth, rk_w = np.array([1, 2, 3], "int32"), np.array([1.0, 2.0, 1.0], "float32")

def rk4_puppeteer(backward):
  keras.utils.set_random_seed(1)
  layer = PuppeteerODE((4, 8), max_depth=3, state_channels=8, integrator="rk4",
                       backward=backward)
  layer.build()
  fixed = [v.value for v in layer.non_trainable_variables]
  def kernel_loss(weights):
    kernels, _ = layer.stateless_call(weights, fixed, rk_h, rk_dl, rk_depth, training=True,
                                      state_weight=rk_w, stack_repeated=False)
    return sum(jnp.sum(jnp.sin(k * (i + 1.0))) for i, k in enumerate(
        [t for t, _ in kernels] + [k for _, rep in kernels for k in rep]))
  return jax.jit(jax.value_and_grad(kernel_loss))([v.value for v in layer.trainable_variables])

(rk_la, rk_ga), (rk_lr, rk_gr) = rk4_puppeteer("autodiff"), rk4_puppeteer("reversible")
rk_scale = max(float(jnp.abs(g).max()) for g in rk_ga)
out["rk4_loss_err"] = abs(float(rk_la) - float(rk_lr)) / abs(float(rk_la))
out["rk4_grad_err"] = max(float(jnp.abs(a - b).max()) for a, b in zip(rk_ga, rk_gr)) / rk_scale
# 6a''. generator_matmul_dtype='bfloat16' (reversible, as 'auto' trains it) under jax.jit: G's
#      products rounded to bfloat16 move the loss (the option is in effect), but only by
#      bfloat16's precision.
same_as_reference("bf16", generator_matmul_dtype="bfloat16")
out["bf16_loss"] = float(l1)
# 6a+. A mixed_bfloat16 dtype policy (the puppet's convolutions in bfloat16) under jax.jit:
#      the same, for the convolutions' rounding.
same_as_reference("mixed_bf16", dtype="mixed_bfloat16", generator_backward="autodiff")

# 6b. generator_rank (G's pointwise matrix as two factors): one compiled forward + backward;
#     both factors get gradients.
low = PuppetClassifier(**tiny, generator_rank=2)
low.build()
low_non_trainable = [v.value for v in low.non_trainable_variables]
def low_loss(trainable):
  logits, _ = low.stateless_call(trainable, low_non_trainable, images, training=True)
  return loss_fn(labels, logits)
l3, g3 = jax.jit(jax.value_and_grad(low_loss))([v.value for v in low.trainable_variables])
low_grads = {v.path: float(jnp.abs(g).max()) for v, g in zip(low.trainable_variables, g3)}
out["lowrank_loss_finite"] = bool(np.isfinite(float(l3)))
out["lowrank_factor_grads"] = [low_grads[k] for k in sorted(low_grads)
                               if k.split("/")[-1] in ("pointwise_down", "pointwise_up")]

# 6c. execution='gathered' (one state per bin, kernels gathered per sample) under jax.jit:
#     the loss and gradients of the per-sample model with the same bins and weights.
pair = [PuppetClassifier(**tiny, complexity_bins=4, execution=e)
        for e in ("per_sample", "gathered")]
for m in pair:
  m.build()
pair[1].set_weights(pair[0].get_weights())
def pair_loss(m):
  ntv = [v.value for v in m.non_trainable_variables]
  def loss(trainable):
    logits, _ = m.stateless_call(trainable, ntv, images, training=True)
    return loss_fn(labels, logits)
  return jax.jit(jax.value_and_grad(loss))([v.value for v in m.trainable_variables])
(l4, g4), (l5, g5) = [pair_loss(m) for m in pair]
out["gathered_loss_err"] = abs(float(l4) - float(l5))
scale = max(float(np.abs(np.asarray(a)).max()) for a in g4)
out["gathered_grad_err"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                               for a, b in zip(g4, g5)) / scale

# 6d. The gathered model's kernel table (cache_kernels): jitted inference (stateless_call, as
#     tools/jax_benchmark.py runs it) gives the per-sample model's logits, and after a weight
#     change (a stale table) the logits of the changed weights, not the table's.
seen = []  # the table is built by the puppeteer under jax.jit (backend_ops.compiled_call)
backend_ops.compiled_call(pair[1].puppeteer,
                          lambda a: seen.append(isinstance(a, jax.core.Tracer)) or a, images)
out["compiled_call_traced"] = seen == [True]
pair[1].cache_kernels()
def infer(m):
  return jax.jit(lambda tv, ntv, x: m.stateless_call(tv, ntv, x, training=False)[0])
tv = [v.value for v in pair[1].trainable_variables]
ntv = [v.value for v in pair[1].non_trainable_variables]
want = np.asarray(pair[0](images, training=False))
out["table_err"] = float(np.abs(np.asarray(infer(pair[1])(tv, ntv, images)) - want).max()
                         / np.abs(want).max())
tv = [t * 1.1 if "puppeteer" in v.path else t for t, v in zip(tv, pair[1].trainable_variables)]
want_changed = np.asarray(infer(pair[0])(tv, ntv, images))
out["stale_table_err"] = float(
    np.abs(np.asarray(infer(pair[1])(tv, ntv, images)) - want_changed).max()
    / np.abs(want_changed).max())
out["stale_table_moves"] = float(np.abs(want_changed - want).max() / np.abs(want).max())

# 7. Bucketed execution says clearly that it needs TensorFlow.
bucketed = PuppetClassifier(**tiny, complexity_bins=8, execution="bucketed")
try:
  bucketed(images)
  out["bucketed_error"] = None
except NotImplementedError as e:
  out["bucketed_error"] = str(e)
print("RESULT " + json.dumps(out))
'''


def test_model_runs_and_trains_under_jax():
  python, tried = _jax_python()
  if python is None:
    pytest.skip(f"no JAX interpreter (set PUPPET_CNN_JAX_PYTHON; tried {tried})")
  env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="3")
  # Most of the script's time is XLA compiling the model's forward + backward three times;
  # without LLVM's expensive optimizations that takes about half as long (the same HLO, so
  # the same values up to rounding). An XLA_FLAGS of the caller's is kept as is.
  env.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                 "--xla_llvm_disable_expensive_passes=true")
  probe = subprocess.run([python, "-c", "import jax"], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
  if probe.returncode != 0:
    pytest.skip(f"`import jax` fails in {python}: {probe.stderr.strip().splitlines()[-1:]}")
  proc = subprocess.run([python, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=600, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-5000:])
  out = json.loads(lines[-1][len("RESULT "):])
  assert out["conv_rel_err"] < 1e-5, out
  assert out["conv_grad_err"] < 1e-4, out
  assert out["depthwise_rel_err"] < 1e-5 and out["depthwise_grad_err"] < 1e-5, out
  assert abs(out["loop_grad"] - 1.5 ** 3) < 1e-5, out
  assert out["depth_ok"] and out["logits_finite"], out
  assert out["grads_finite"] and out["puppeteer_grads_nonzero"], out
  losses = out["losses"]
  assert all(abs(l) < float("inf") for l in losses) and losses[-1] < losses[0], out
  assert out["remat_loss_err"] < 1e-5 and out["remat_grad_err"] < 1e-4, out
  assert out["loop_loss_err"] < 1e-5 and out["loop_grad_err"] < 1e-4, out
  assert out["reversible_loss_err"] < 1e-5 and out["reversible_grad_err"] < 1e-4, out
  assert out["rk4_loss_err"] < 1e-6 and out["rk4_grad_err"] < 1e-4, out
  assert 0 < out["bf16_loss_err"] < 1e-2 * abs(out["bf16_loss"]), out
  assert out["bf16_grad_err"] < 5e-2, out
  assert 0 < out["mixed_bf16_loss_err"] < 2e-2 * abs(out["bf16_loss"]), out
  assert out["mixed_bf16_grad_err"] < 1e-1, out
  assert out["gathered_loss_err"] < 1e-5 and out["gathered_grad_err"] < 1e-4, out
  assert out["table_err"] < 1e-4 and out["stale_table_err"] < 1e-4, out
  assert out["stale_table_moves"] > 1e-3 and out["compiled_call_traced"], out
  assert out["lowrank_loss_finite"], out
  assert len(out["lowrank_factor_grads"]) == 2 and min(out["lowrank_factor_grads"]) > 0, out
  assert out["bucketed_error"] and "TensorFlow" in out["bucketed_error"], out
  print(f"jax {out['jax']}: losses {losses}", file=sys.stderr)
