r"""Benchmarks the compiled train step and the input pipeline.

Builds a hard-sharing model (MLP on flat inputs, or the CNN on
multi_digits-shaped `[B, 12, 16, 1]` images) with K classification heads and a
synthetic batch, compiles the train step of every method, and times it:

  python -m experiments.benchmark --model=mlp --input_dim=784 \
      --hidden=512,512,256 --num_tasks=4 --batch_size=256 --steps=30
  python -m experiments.benchmark --rep_grad --methods=ew,mgda,imtl_g
  python -m experiments.benchmark --num_tasks=1,2,4,8,16,32,40 \
      --methods=ew,mgda,pcgrad --chunk_size=4 --out=runs/bench
  python -m experiments.benchmark --model=cnn --batch_size=128
  python -m experiments.benchmark --pipeline --methods= --data_dir=data/tfds
  python -m experiments.benchmark --solvers --num_tasks=4,16 --solver_spread=1e8
  python -m experiments.benchmark --pretext --model=cnn --batch_size=128 \
      --head_hidden=128 --methods=ew,upgrad --out=runs/bench_pretext

Methods: `baseline` (a hand-written JAX/optax step of the same MLP, no
framework: the floor for equal weighting), `ew` (equal weighting, one backward
pass), every aggregator of `mtl_jax.aggregation.AGGREGATORS` (equal weights,
per-task gradients; with `--rep_grad` w.r.t. the shared representation, for
the aggregators valid there) and every weighting of
`mtl_jax.weighting.WEIGHTINGS` (no aggregator; `gradnorm` takes per-task
gradient norms).

Measurement: each step is compiled ahead of time (`compile_s`), run
`--warmup` times, then timed one call at a time with `block_until_ready` on its
outputs. The methods of one setting are timed in `--rounds` interleaved rounds
(each round runs every method for `steps / rounds` steps, in a rotated order),
so that load from other processes spreads over all methods and the ratios of
one run are comparable; the settings of a `--num_tasks` sweep join the same
rounds (`--interleave_settings`), so that step times are comparable across K
too. `ms_per_step` is the median over the timed steps.

Prints one JSON line per (method, setting) with `method`, `model`,
`num_tasks`, `batch_size`, `rep_grad`, `chunk_size`, `jacobian` (how an
aggregator got its per-task gradients: "factored", "full" or "rep_grad";
null for the others), `ms_per_step` (median),
`ms_q25`/`ms_q75`, `compile_s`, `peak_bytes` (the device's peak memory when the
backend reports it, else null: XLA CPU does not), the compiled step's
`temp_bytes`/`argument_bytes`/`output_bytes` (XLA's memory analysis, available
on CPU too), `ms_per_task` and `ratio_to_ew` / `ratio_to_baseline` against
the same setting. A sweep over K also prints one `{"scaling": ...}` line per
method (`scaling_summary`: the log-log slope of step time against K, overall
and between neighbouring K).
`--pipeline` adds rows for the multi_digits input pipeline (`examples_per_s`
of the mixture iterator, with and without the `Prefetcher`) and for the
default train step it feeds (the CNN of experiments/configs/multi_digits.py,
batch 128). `--out=DIR` writes `DIR/benchmark.jsonl`, `DIR/scaling.json` (for
a sweep) and `DIR/step_time_vs_tasks.png`. `--solvers` times the K x K
part of each Gram-based method alone (`benchmark_solvers`: `us_per_call` of
its jitted `from_gram`, rows named `solver/<method>`).

`--pretext` times the train step of `--num_tasks` supervised tasks (the first
K of the list) plus each set of `--pretext_sets` (P self-supervised tasks on
V views of `--image_shape` inputs, the inputs view included; default
`DEFAULT_PRETEXT_SETS`), for each of `--methods` (default `ew,upgrad`), all
in one interleaved pool. Each row has `pretexts` (the set), `num_pretext`,
`num_views`, `views`, `num_tasks` (K + P) and `ratio_to_supervised`: its
step time over the same method's step without pretext tasks (exactly 1.0 for
that one). One `{"pretext_fit": ...}` line per method gives the
least-squares `ratio ~ intercept + per_view (V - 1) + per_task P`. `--out`
writes `benchmark.jsonl`, `pretext.json` (rows and fits) and
`pretext_step_time.png`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax import aggregation
from mtl_jax import pretext as pretext_lib
from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting as weighting_lib
from mtl_jax.models import build
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib

# The benchmark's own flag registry: its flag names (--methods, --steps, --out)
# are also defined by other experiment scripts, which tests import into the
# same process; absl's global registry would refuse the duplicates.
FLAGS = flags.FlagValues()

_F = dict(flag_values=FLAGS)
_MODEL = flags.DEFINE_enum("model", "mlp", ["mlp", "cnn"], "Shared trunk.",
                           **_F)
_INPUT_DIM = flags.DEFINE_integer("input_dim", 784, "MLP input size.", **_F)
_HIDDEN = flags.DEFINE_list("hidden", ["512", "512", "256"], "MLP hidden "
                            "sizes (the last is the feature size).", **_F)
_IMAGE_SHAPE = flags.DEFINE_list("image_shape", ["12", "16", "1"], "CNN input "
                                 "shape (default: multi_digits).", **_F)
_CHANNELS = flags.DEFINE_list("channels", ["32", "64", "64"], "CNN channels "
                              "(default: the experiment's).", **_F)
_STRIDES = flags.DEFINE_list("strides", ["1", "2", "1"], "CNN strides.", **_F)
_FEATURE_SIZE = flags.DEFINE_integer("feature_size", 256, "CNN feature size.",
                                     **_F)
_HEAD_HIDDEN = flags.DEFINE_list("head_hidden", [], "Hidden sizes of each "
                                 "task head.", **_F)
_NUM_TASKS = flags.DEFINE_list("num_tasks", ["4"], "Numbers of tasks K (a "
                               "list: a scaling sweep).", **_F)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classes per task.",
                                    **_F)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Batch size.", **_F)
_METHODS = flags.DEFINE_list(
    "methods", None, "Methods to time (default: baseline for the MLP, ew, "
    "every aggregator and gradnorm).", **_F)
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per method and "
                              "setting.", **_F)
_ROUNDS = flags.DEFINE_integer("rounds", 10, "Interleaved rounds the timed "
                               "steps are split into.", **_F)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.",
                               **_F)
_REP_GRAD = flags.DEFINE_bool(
    "rep_grad", False, "Aggregate gradients w.r.t. the shared representation "
    "(aggregators that do not support it are skipped).", **_F)
_CHUNK_SIZE = flags.DEFINE_integer(
    "chunk_size", 0, "Map the per-task VJP over chunks of this many tasks, "
    "and bound the factored Gram products and GradDrop's rows to the same "
    "memory (0: all tasks in one vmap; < 0 is rejected).", **_F)
_JACOBIAN = flags.DEFINE_list(
    "jacobian", ["auto"], "How Gram-based aggregators get per-task gradients "
    "(make_train_step's `jacobian`): auto (factored where cheaper, no [K, P] "
    "matrix), factored (every dense layer) or full; a list times every "
    "aggregator in each mode, the later ones as '<method>@<mode>'.", **_F)
_INTERLEAVE_SETTINGS = flags.DEFINE_bool(
    "interleave_settings", True, "Time all settings of a --num_tasks sweep in "
    "one interleaved pool (step times comparable across K); off: one setting "
    "after the other, each compiled, timed and freed before the next.", **_F)
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Adam step size.",
                                    **_F)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the params and the batch.",
                             **_F)
_PIPELINE = flags.DEFINE_bool(
    "pipeline", False, "Also measure the multi_digits input pipeline against "
    "the default train step.", **_F)
_DATA_DIR = flags.DEFINE_string("data_dir", "data/tfds", "TFDS data directory "
                                "of multi_digits (prepared if missing).", **_F)
_DATA_CONFIG = flags.DEFINE_string("data_config", "default", "multi_digits "
                                   "builder config.", **_F)
_PIPELINE_BATCHES = flags.DEFINE_integer(
    "pipeline_batches", 200, "Batches read per pipeline timing.", **_F)
_SOLVERS = flags.DEFINE_bool(
    "solvers", False, "Instead of train steps, time the K x K part alone: "
    "each Gram-based method's `from_gram` on random Gram matrices (median "
    "microseconds per call), for every K of --num_tasks.", **_F)
_SOLVER_SPREAD = flags.DEFINE_float(
    "solver_spread", 1.0, "With --solvers: ratio of the largest to the "
    "smallest gradient norm in the random Gram matrices.", **_F)
_PRETEXT = flags.DEFINE_bool(
    "pretext", False, "Instead of the method sweep, time the train step of "
    "--num_tasks supervised tasks plus each set of --pretext_sets (pretext "
    "tasks on views of the --image_shape inputs), as a ratio to the "
    "supervised-only step of the same method.", **_F)
_PRETEXT_SETS = flags.DEFINE_list(
    "pretext_sets", None, "With --pretext: the sets of pretext tasks to time, "
    "each '+'-joined pretext names (mtl_jax.pretext.PRETEXTS), 'name*n' for "
    "n tasks on that pretext's one view, 'none' for none (always timed, the "
    "reference). Default: the grid of DEFAULT_PRETEXT_SETS.", **_F)
_OUT = flags.DEFINE_string("out", None, "Directory for benchmark.jsonl and "
                           "step_time_vs_tasks.png.", **_F)

BASELINE = "baseline"
EW = "ew"
DEFAULT_WEIGHTINGS = ("gradnorm",)


def valid_methods() -> tuple[str, ...]:
  return ((BASELINE, EW) + tuple(sorted(aggregation.AGGREGATORS)) +
          tuple(sorted(set(weighting_lib.WEIGHTINGS) - {"equal", "static"})))


def default_methods(model: str) -> list[str]:
  return (([BASELINE] if model == "mlp" else []) + [EW] +
          sorted(aggregation.AGGREGATORS) + list(DEFAULT_WEIGHTINGS))


def check_methods(methods: Sequence[str], model: str) -> None:
  """Raises ValueError for an unknown method, before anything compiles."""
  unknown = [m for m in methods if m not in valid_methods()]
  if unknown:
    raise ValueError(f"unknown method(s) {unknown}; valid: "
                     f"{', '.join(valid_methods())}")
  if BASELINE in methods and model != "mlp":
    raise ValueError("method 'baseline' (the hand-written step) exists for "
                     "--model=mlp only")


# --------------------------------------------------------------------------
# Models, batches and steps.


def make_tasks(num_tasks: int, num_classes: int) -> tasks_lib.TaskSet:
  return tasks_lib.TaskSet([tasks_lib.classification_task(f"t{k}", num_classes)
                            for k in range(num_tasks)])


def make_trunk(model: str, *, hidden: Sequence[int] = (),
               channels: Sequence[int] = (), strides: Sequence[int] = (),
               feature_size: int = 256):
  if model == "mlp":
    return build.make_trunk("mlp", hidden_sizes=tuple(hidden))
  return build.make_trunk("cnn", channels=tuple(channels),
                          strides=tuple(strides), feature_size=feature_size)


def synthetic_batch(tasks: tasks_lib.TaskSet, input_shape: Sequence[int],
                    batch_size: int, seed: int) -> dict[str, Any]:
  """A batch of random inputs, with every example labelled for every task."""
  rng = np.random.default_rng(seed)
  labels = {t.name: rng.integers(0, t.num_classes, batch_size).astype(np.int32)
            for t in tasks}
  return {"inputs": rng.standard_normal((batch_size, *input_shape),
                                        dtype=np.float32),
          "labels": labels,
          "masks": {t.name: np.ones(batch_size, np.float32) for t in tasks}}


def make_method(method: str, *, rep_grad: bool
                ) -> tuple[weighting_lib.Weighting,
                           aggregation.Aggregator | None, bool]:
  """`(weighting, aggregator, rep_grad)` of a framework method name."""
  if method == EW:
    return weighting_lib.get_weighting("equal"), None, False
  if method in aggregation.AGGREGATORS:
    agg = aggregation.get_aggregator(method)
    return (weighting_lib.get_weighting("equal"), agg,
            rep_grad and agg.rep_grad_ok)
  return weighting_lib.get_weighting(method), None, False


class Compiled:
  """One method's compiled step and its live state (the state is donated)."""

  def __init__(self, fn: Callable, state: Any, args: tuple, compile_s: float,
               memory: dict[str, int | None]):
    self.fn, self.state, self.args = fn, state, args
    self.compile_s, self.memory = compile_s, memory
    self.times: list[float] = []

  def run(self) -> float:
    start = time.perf_counter()
    self.state, out = self.fn(self.state, *self.args)
    jax.block_until_ready((self.state, out))
    return time.perf_counter() - start


def _compile(step: Callable, state: Any, *args: Any) -> Compiled:
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, *args).compile()
  compile_s = time.perf_counter() - start
  return Compiled(compiled, state, args, compile_s, memory_analysis(compiled))


def memory_analysis(compiled: Any) -> dict[str, int | None]:
  """XLA's static buffer sizes of a compiled step (None where unavailable)."""
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError, AttributeError):
    m = None
  get = lambda name: None if m is None else int(getattr(m, name, 0) or 0)
  return {"temp_bytes": get("temp_size_in_bytes"),
          "argument_bytes": get("argument_size_in_bytes"),
          "output_bytes": get("output_size_in_bytes")}


def compile_framework_step(model: Any, tasks: tasks_lib.TaskSet, method: str,
                           batch: dict[str, Any], *, rep_grad: bool,
                           chunk_size: int | None, learning_rate: float,
                           seed: int, jacobian: str = "auto"
                           ) -> tuple[Compiled, bool]:
  """The library's train step of `method`; returns it and its rep_grad."""
  weighting, agg, rep = make_method(method, rep_grad=rep_grad)
  tx = optax.adam(learning_rate)
  params = state_lib.init_params(model, batch["inputs"][:1],
                                 jax.random.PRNGKey(seed))
  state = state_lib.create_train_state(params, tx, weighting, len(tasks),
                                       jax.random.PRNGKey(seed + 1), agg)
  step = step_lib.make_train_step(
      model.apply, tasks, tx, weighting, aggregator=agg, rep_grad=rep,
      chunk_size=chunk_size if agg is not None or weighting.needs else None,
      jacobian=jacobian, encode_decode=True)  # a hard-sharing model
  batch = jax.device_put(batch)
  return _compile(step, state, batch), rep


def jacobian_used(agg: aggregation.Aggregator, mode: str, rep_grad: bool
                  ) -> str:
  """What the train step does for an aggregator: "rep_grad", "factored" or
  "full" (make_train_step's rule)."""
  if rep_grad:
    return "rep_grad"
  factorable = agg.from_gram is not None or agg.columnwise
  return "factored" if mode != "full" and factorable else "full"


def init_baseline_params(input_dim: int, hidden: Sequence[int],
                         num_tasks: int, num_classes: int, seed: int) -> dict:
  """Params of the hand-written MLP with K linear heads (lecun-normal init)."""
  keys = iter(jax.random.split(jax.random.PRNGKey(seed),
                              len(hidden) + num_tasks))
  init = jax.nn.initializers.lecun_normal()
  sizes = [input_dim, *hidden]
  trunk = [(init(next(keys), (i, o)), jnp.zeros((o,)))
           for i, o in zip(sizes[:-1], sizes[1:])]
  heads = [(init(next(keys), (sizes[-1], num_classes)),
            jnp.zeros((num_classes,))) for _ in range(num_tasks)]
  return {"trunk": trunk, "heads": heads}


def make_baseline_step(tx: optax.GradientTransformation) -> Callable:
  """A plain JAX/optax train step: the sum of the K mean cross-entropies."""

  def loss_fn(params, x, labels):  # x [B, D], labels [K, B]
    h = x.reshape(x.shape[0], -1)
    for w, b in params["trunk"]:
      h = jax.nn.relu(h @ w + b)
    loss = 0.0
    for k, (w, b) in enumerate(params["heads"]):
      loss += optax.softmax_cross_entropy_with_integer_labels(
          h @ w + b, labels[k]).mean()
    return loss

  def step(state, x, labels):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, x, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return step


def compile_baseline_step(tasks: tasks_lib.TaskSet, batch: dict[str, Any], *,
                          input_dim: int, hidden: Sequence[int],
                          learning_rate: float, seed: int) -> Compiled:
  tx = optax.adam(learning_rate)
  params = init_baseline_params(input_dim, hidden, len(tasks),
                                tasks[0].num_classes, seed)
  labels = jnp.stack([batch["labels"][name] for name in tasks.names])  # [K, B]
  x = jax.device_put(batch["inputs"])
  return _compile(make_baseline_step(tx), (params, tx.init(params)), x, labels)


# --------------------------------------------------------------------------
# Timing.


def time_interleaved(compiled: dict[str, Compiled], *, steps: int, rounds: int,
                     warmup: int) -> None:
  """Fills each `Compiled.times`: `steps` timed calls over `rounds` rounds."""
  for c in compiled.values():
    for _ in range(warmup):
      c.run()
  names = list(compiled)
  rounds = max(1, min(rounds, steps))
  per_round = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
  for r, n in enumerate(per_round):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:  # rotate who goes first
      compiled[name].times.extend(compiled[name].run() for _ in range(n))


def peak_device_bytes() -> int | None:
  """The device's peak memory in use, where the backend reports it."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats:
    return None
  return int(stats.get("peak_bytes_in_use", 0)) or None


def summarize(times: Sequence[float]) -> dict[str, float]:
  ms = np.asarray(times) * 1e3
  return {"ms_per_step": round(float(np.median(ms)), 3),
          "ms_q25": round(float(np.percentile(ms, 25)), 3),
          "ms_q75": round(float(np.percentile(ms, 75)), 3)}


class Setting:
  """One setting's compiled steps (method name -> `Compiled`) and what the
  rows report about them."""

  def __init__(self, num_tasks: int, model_name: str, batch_size: int,
               chunk_size: int | None):
    self.num_tasks, self.model_name = num_tasks, model_name
    self.batch_size, self.chunk_size = batch_size, chunk_size
    self.compiled: dict[str, Compiled] = {}
    self.reps: dict[str, bool] = {}
    self.modes: dict[str, str | None] = {}

  def rows(self, peak: int | None) -> list[dict[str, Any]]:
    """One row per method, with ratios to `ew`/`baseline` of this setting."""
    rows = []
    for method, c in self.compiled.items():
      stats = summarize(c.times)
      rows.append({"method": method, "model": self.model_name,
                   "num_tasks": self.num_tasks, "batch_size": self.batch_size,
                   "rep_grad": self.reps[method],
                   "chunk_size": self.chunk_size,
                   "jacobian": self.modes.get(method), **stats,
                   "ms_per_task": round(stats["ms_per_step"] /
                                        self.num_tasks, 3),
                   "timed_steps": len(c.times),
                   "compile_s": round(c.compile_s, 3), "peak_bytes": peak,
                   **c.memory, "backend": jax.default_backend()})
    ms = {r["method"]: r["ms_per_step"] for r in rows}
    for r in rows:
      for ref in (EW, BASELINE):
        if ref in ms:
          r[f"ratio_to_{ref}"] = round(r["ms_per_step"] / ms[ref], 3)
    return rows


def compile_setting(methods: Sequence[str], *, model_name: str,
                    num_tasks: int, num_classes: int, batch_size: int,
                    input_shape: Sequence[int], hidden: Sequence[int],
                    channels: Sequence[int], strides: Sequence[int],
                    feature_size: int, head_hidden: Sequence[int],
                    rep_grad: bool, chunk_size: int | None,
                    learning_rate: float, seed: int,
                    jacobian: Sequence[str] = ("auto",)) -> Setting:
  """Compiles every method at one setting (nothing is timed yet).

  Aggregators are compiled once per `jacobian` mode; the first mode's steps
  are named after the method, the others `<method>@<mode>`.
  """
  tasks = make_tasks(num_tasks, num_classes)
  model = build.make_hard_sharing_model(
      tasks, make_trunk(model_name, hidden=hidden, channels=channels,
                        strides=strides, feature_size=feature_size),
      head_hidden_sizes=tuple(head_hidden))
  batch = synthetic_batch(tasks, input_shape, batch_size, seed)
  setting = Setting(num_tasks, model_name, batch_size, chunk_size)
  for method in methods:
    if method == BASELINE:
      if head_hidden:
        raise ValueError("the hand-written baseline has linear heads; drop "
                         "--head_hidden or the 'baseline' method")
      setting.compiled[method] = compile_baseline_step(
          tasks, batch, input_dim=int(np.prod(input_shape)), hidden=hidden,
          learning_rate=learning_rate, seed=seed)
      setting.reps[method] = False
      continue
    if (rep_grad and method in aggregation.AGGREGATORS and
        not aggregation.get_aggregator(method).rep_grad_ok):
      print(f"# skipping {method}: not valid with --rep_grad", flush=True)
      continue
    agg = (aggregation.get_aggregator(method)
           if method in aggregation.AGGREGATORS else None)
    for i, mode in enumerate(jacobian if agg is not None else ("auto",)):
      name = method if i == 0 else f"{method}@{mode}"
      setting.compiled[name], setting.reps[name] = compile_framework_step(
          model, tasks, method, batch, rep_grad=rep_grad,
          chunk_size=chunk_size, learning_rate=learning_rate, seed=seed,
          jacobian=mode)
      setting.modes[name] = (jacobian_used(agg, mode, setting.reps[name])
                             if agg is not None else None)
  return setting


def time_settings(settings: Sequence[Setting], *, steps: int, rounds: int,
                  warmup: int) -> list[dict[str, Any]]:
  """Times the steps of all `settings` in one interleaved pool; the rows.

  Interleaving across settings too (not only across the methods of one)
  puts load from other processes on every K alike, so that the step times of
  a scaling sweep are comparable with each other, not only their ratios to
  `ew`.
  """
  pool = {(i, name): c for i, s in enumerate(settings)
          for name, c in s.compiled.items()}
  time_interleaved(pool, steps=steps, rounds=rounds, warmup=warmup)
  peak = peak_device_bytes()
  return [r for s in settings for r in s.rows(peak)]


def benchmark_setting(methods: Sequence[str], *, steps: int, rounds: int,
                      warmup: int, **kwargs: Any) -> list[dict[str, Any]]:
  """Compiles and times every method at one setting; returns the rows
  (`compile_setting`'s arguments)."""
  return time_settings([compile_setting(methods, **kwargs)], steps=steps,
                       rounds=rounds, warmup=warmup)


def scaling_summary(rows: Sequence[dict[str, Any]]
                    ) -> list[dict[str, Any]]:
  """How each method's step time grows with the number of tasks K.

  For every method (and rep_grad) timed at two or more K: `exponent`, the
  least-squares slope of log(ms) against log(K) (1: linear; below 1:
  sublinear), and `local_exponents`, the slope between each pair of
  neighbouring K (`"K1-K2": log(ms2/ms1) / log(K2/K1)`), whose maximum
  (`max_local_exponent`) shows the steepest step of the sweep.
  """
  series: dict[tuple[str, bool], dict[int, float]] = {}
  for r in rows:
    if "ms_per_step" in r and "num_tasks" in r and r["model"] != (
        "multi_digits"):
      series.setdefault((r["method"], bool(r["rep_grad"])), {})[
          r["num_tasks"]] = r["ms_per_step"]
  out = []
  for (method, rep), points in series.items():
    ks = sorted(points)
    if len(ks) < 2:
      continue
    x = np.log(np.asarray(ks, np.float64))
    y = np.log(np.asarray([points[k] for k in ks], np.float64))
    exponent = float(np.polyfit(x, y, 1)[0])
    local = {f"{a}-{b}": round(float(np.log(points[b] / points[a]) /
                                     np.log(b / a)), 3)
             for a, b in zip(ks[:-1], ks[1:])}
    out.append({"method": method, "rep_grad": rep, "num_tasks_swept": ks,
                "exponent": round(exponent, 3),
                "max_local_exponent": max(local.values()),
                "local_exponents": local,
                "growth": round(points[ks[-1]] / points[ks[0]], 3),
                "tasks_ratio": round(ks[-1] / ks[0], 3)})
  return out


# --------------------------------------------------------------------------
# Input pipeline.


def default_train_config():
  from experiments.configs import multi_digits as md_config  # pylint: disable=g-import-not-at-top
  return md_config.get_config()


def build_mixture(data_dir: str, builder_config: str, batch_size: int,
                  config: Any):
  """The training mixture of the default experiment, built by the library
  calls experiments/train.py makes."""
  from mtl_jax.data import build as data_build  # pylint: disable=g-import-not-at-top
  d = config.data
  dataset = data_build.load_dataset(
      "multi_digits", data_dir=data_dir,
      options={**dict(d.options), "builder_config": builder_config})
  tasks = data_build.select_tasks(
      dataset.tasks, [n.strip() for n in config.tasks.split(",") if n.strip()],
      dict(config.task_weights))
  data = data_build.build_data(
      dataset, tasks, batch_size=batch_size,
      eval_batch_size=config.eval_batch_size, seed=config.seed,
      label_fractions=dict(d.label_fractions), label_seed=d.label_seed,
      drop_unlabelled=d.drop_unlabelled, mixing_method=d.mixture.method,
      temperature=d.mixture.temperature, rates=dict(d.mixture.rates),
      size_cap=d.mixture.size_cap, composition=d.mixture.composition)
  return data.train_mixture, tasks


def _examples_per_s(iterator, num_batches: int, batch_size: int) -> float:
  jax.block_until_ready(next(iterator))  # start-up (thread, first batch)
  start = time.perf_counter()
  for _ in range(num_batches):
    jax.block_until_ready(next(iterator))
  return num_batches * batch_size / (time.perf_counter() - start)


def benchmark_pipeline(*, data_dir: str, builder_config: str,
                       num_batches: int, steps: int, rounds: int, warmup: int,
                       seed: int) -> list[dict[str, Any]]:
  """Examples/s of the multi_digits mixture against the default train step."""
  from mtl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = default_train_config()
  batch_size = config.batch_size
  mix, tasks = build_mixture(data_dir, builder_config, batch_size, config)
  common = {"model": "multi_digits", "num_tasks": len(tasks),
            "batch_size": batch_size, "backend": jax.default_backend()}
  rows = []
  rate = _examples_per_s(mix.iterator(), num_batches, batch_size)
  rows.append({"method": "pipeline/mixture", **common,
               "examples_per_s": round(rate, 1)})
  with pipeline.Prefetcher(mix.iterator(), size=config.data.prefetch,
                           transform=jax.device_put) as it:
    rate = _examples_per_s(it, num_batches, batch_size)
  rows.append({"method": "pipeline/prefetch+device_put", **common,
               "examples_per_s": round(rate, 1)})

  # The default train step: CNN hard sharing, static weights, Adam.
  m = config.model
  tasks = tasks_lib.TaskSet([dataclasses.replace(
      t, weight=float(config.task_weights.get(t.name, 1.0))) for t in tasks])
  model = build.make_hard_sharing_model(
      tasks, build.make_trunk("cnn", channels=tuple(m.channels),
                              strides=tuple(m.strides),
                              feature_size=m.feature_size,
                              dropout_rate=m.dropout_rate),
      head_hidden_sizes=tuple(m.head_hidden_sizes))
  batch, _ = mix.batch(mix.initial_state())
  weighting = weighting_lib.get_weighting("static",
                                          weights=tasks.static_weights)
  tx = optax.adam(config.optimizer.learning_rate)
  params = state_lib.init_params(model, batch["inputs"][:1],
                                 jax.random.PRNGKey(seed))
  state = state_lib.create_train_state(params, tx, weighting, len(tasks),
                                       jax.random.PRNGKey(seed + 1))
  step = step_lib.make_train_step(model.apply, tasks, tx, weighting)
  compiled = {"train_step/default": _compile(step, state,
                                             jax.device_put(batch))}
  time_interleaved(compiled, steps=steps, rounds=rounds, warmup=warmup)
  c = compiled["train_step/default"]
  stats = summarize(c.times)
  step_rate = batch_size / (stats["ms_per_step"] / 1e3)
  rows.append({"method": "train_step/default", **common, **stats,
               "compile_s": round(c.compile_s, 3), "peak_bytes":
               peak_device_bytes(), **c.memory,
               "examples_per_s": round(step_rate, 1)})
  for r in rows[:2]:
    r["ratio_to_train_step"] = round(r["examples_per_s"] / step_rate, 2)
  return rows


# --------------------------------------------------------------------------
# Pretext tasks: step time against the number of views.

SUPERVISED_ONLY = "none"
# Hyperparameters of the pretexts that --pretext_sets names, where the
# defaults would not run on multi_digits' 12 x 16 x 1 images (a quarter turn
# of a non-square image changes its shape).
PRETEXT_OPTIONS: dict[str, dict[str, Any]] = {
    "grid_mask": {"grid": (2, 2)},
    "rotate": {"half_turns_only": True},
}
# P pretext tasks on V views (the supervised tasks' inputs view included):
# P grows at fixed V (V=1: P=0..3 identity tasks on the inputs; V=2: P=1..3
# tasks on one grid_mask view; V=3: P=2, 3, 4, 6), and V grows at fixed P=3
# (V=1, 2, 3, 4).
DEFAULT_PRETEXT_SETS = (
    SUPERVISED_ONLY, "reconstruct", "reconstruct*2", "reconstruct*3",
    "grid_mask", "grid_mask*2", "grid_mask*3", "grid_mask+denoise",
    "grid_mask*2+denoise", "grid_mask*2+denoise*2", "grid_mask*3+denoise*3",
    "grid_mask+denoise+super_resolve")


def parse_pretext_set(spec: str) -> list[tuple[str, int]]:
  """`"grid_mask*2+denoise"` -> `[("grid_mask", 2), ("denoise", 1)]`.

  Raises:
    ValueError: an unknown pretext, a count below 1, or a pretext named
      twice (write `name*n`: its tasks share one view).
  """
  spec = spec.strip()
  if spec == SUPERVISED_ONLY:
    return []
  out: list[tuple[str, int]] = []
  for token in spec.split("+"):
    name, _, count = token.strip().partition("*")
    if name not in pretext_lib.PRETEXTS:
      raise ValueError(f"--pretext_sets {spec!r}: unknown pretext {name!r}; "
                       f"valid: {', '.join(pretext_lib.pretext_names())}")
    try:
      n = int(count) if count else 1
    except ValueError:
      n = 0
    if n < 1:
      raise ValueError(f"--pretext_sets {spec!r}: {token!r} needs a count "
                       ">= 1 ('name*n')")
    if name in dict(out):
      raise ValueError(f"--pretext_sets {spec!r}: {name!r} is named twice; "
                       f"write '{name}*n' for n tasks on its view")
    out.append((name, n))
  return out


def pretext_tasks(spec: str, input_shape: Sequence[int]
                  ) -> list[tasks_lib.Task]:
  """The pretext tasks of one `--pretext_sets` entry.

  The n tasks of `name*n` read one view, named after the pretext (an
  identity pretext, `reconstruct`, reads the supervised tasks' "inputs"
  view), so a set has one view per corrupting pretext plus the inputs.
  Every second image-target task of a view takes the L1 loss, as a second
  objective on the same view would in use (each task has its own head
  either way, so XLA cannot merge them).
  """
  tasks = []
  for name, n in parse_pretext_set(spec):
    pretext = pretext_lib.get_pretext(name, **PRETEXT_OPTIONS.get(name, {}))
    image_target = pretext.loss != "softmax_ce"
    for i in range(n):
      tasks.append(pretext_lib.pretext_task(
          name if i == 0 else f"{name}_{i + 1}", pretext, input_shape,
          view=None if pretext.view_id == tasks_lib.IDENTITY_VIEW else name,
          loss=("l1" if i % 2 else "mse") if image_target else None))
  return tasks


def compile_pretext_sets(methods: Sequence[str], sets: Sequence[str], *,
                         model_name: str, num_tasks: int, num_classes: int,
                         batch_size: int, input_shape: Sequence[int],
                         hidden: Sequence[int], channels: Sequence[int],
                         strides: Sequence[int], feature_size: int,
                         head_hidden: Sequence[int], jacobian: str,
                         chunk_size: int | None, learning_rate: float,
                         seed: int
                         ) -> tuple[dict[tuple[str, str], Compiled],
                                    dict[str, dict[str, Any]]]:
  """Compiles every method's step for every pretext set (nothing is timed).

  Returns:
    `{(set, method): Compiled}` and `{set: what its rows report}`. Every
    set shares the supervised tasks, the trunk and one synthetic batch (the
    pretext tasks' labels are made in the step).
  """
  supervised = list(make_tasks(num_tasks, num_classes))
  batch = synthetic_batch(tasks_lib.TaskSet(supervised), input_shape,
                          batch_size, seed)
  compiled, info = {}, {}
  for spec in sets:
    pretexts = pretext_tasks(spec, input_shape)
    tasks = tasks_lib.TaskSet(supervised + pretexts)
    model = build.make_hard_sharing_model(
        tasks, make_trunk(model_name, hidden=hidden, channels=channels,
                          strides=strides, feature_size=feature_size),
        head_hidden_sizes=tuple(head_hidden))
    info[spec] = {"pretexts": spec, "num_pretext": len(pretexts),
                  "num_views": len(tasks.view_names),
                  "views": list(tasks.view_names),
                  "num_supervised": num_tasks, "num_tasks": len(tasks)}
    for method in methods:
      compiled[spec, method], _ = compile_framework_step(
          model, tasks, method, batch, rep_grad=False, chunk_size=chunk_size,
          learning_rate=learning_rate, seed=seed, jacobian=jacobian)
  return compiled, info


def pretext_fit(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per method, the least-squares fit `ratio ~ c + a (V - 1) + b P` of the
  ratios to the supervised-only step: `per_view` (a) is the cost of one more
  view, `per_task` (b) that of one more task on an existing view, both as
  fractions of the supervised-only step."""
  out = []
  for method in dict.fromkeys(r["method"] for r in rows):
    rs = [r for r in rows if r["method"] == method]
    x = np.asarray([[1.0, r["num_views"] - 1, r["num_pretext"]] for r in rs])
    y = np.asarray([r["ratio_to_supervised"] for r in rs])
    if len(rs) < 3 or np.linalg.matrix_rank(x) < 3:
      continue  # a grid without both V and P varying fits no slopes
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    residual = y - x @ coef
    out.append({"method": method, "intercept": round(float(coef[0]), 3),
                "per_view": round(float(coef[1]), 3),
                "per_task": round(float(coef[2]), 3),
                "max_abs_residual": round(float(np.abs(residual).max()), 3),
                "points": len(rs)})
  return out


def benchmark_pretext(methods: Sequence[str], sets: Sequence[str], *,
                      steps: int, rounds: int, warmup: int, **kwargs: Any
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Times the train step of each method with each set of pretext tasks.

  All (set, method) steps are compiled first and timed in one interleaved
  pool, so that each row's `ratio_to_supervised` (its step time over the
  same method's step without pretext tasks) compares steps timed under the
  same load. `compile_pretext_sets`'s arguments.

  Returns:
    The rows (sets in order, methods within a set) and `pretext_fit`.
  """
  sets = list(dict.fromkeys([SUPERVISED_ONLY, *sets]))  # the reference first
  compiled, info = compile_pretext_sets(methods, sets, **kwargs)
  time_interleaved(compiled, steps=steps, rounds=rounds, warmup=warmup)
  rows = []
  for (spec, method), c in compiled.items():
    rows.append({"method": method, "model": kwargs["model_name"],
                 **info[spec], "batch_size": kwargs["batch_size"],
                 "jacobian": (jacobian_used(aggregation.get_aggregator(
                     method), kwargs["jacobian"], False)
                              if method in aggregation.AGGREGATORS else None),
                 **summarize(c.times), "timed_steps": len(c.times),
                 "compile_s": round(c.compile_s, 3), **c.memory,
                 "backend": jax.default_backend()})
  ref = {r["method"]: r["ms_per_step"] for r in rows
         if r["pretexts"] == SUPERVISED_ONLY}
  for r in rows:
    r["ratio_to_supervised"] = round(r["ms_per_step"] / ref[r["method"]], 3)
    if EW in ref:
      r["ratio_to_ew"] = round(r["ms_per_step"] / ref[EW], 3)
  return rows, pretext_fit(rows)


def plot_pretext(rows: Sequence[dict[str, Any]], path: str) -> None:
  """Per method: the ratio to the supervised-only step against the number of
  views V (one line per number of pretext tasks P) and against P (one line
  per V)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  methods = list(dict.fromkeys(r["method"] for r in rows))
  fig, axes = plt.subplots(len(methods), 2, squeeze=False,
                           figsize=(10, 3.6 * len(methods)))
  top = max((r["ratio_to_supervised"] for r in rows), default=1.0)
  for (ax_v, ax_p), method in zip(axes, methods):
    rs = [r for r in rows if r["method"] == method]
    for ax, x_key, line_key, x_label, letter in (
        (ax_v, "num_views", "num_pretext", "views V (inputs included)", "P"),
        (ax_p, "num_pretext", "num_views", "pretext tasks P", "V")):
      lines: dict[int, list[tuple[int, float]]] = {}
      for r in rs:
        lines.setdefault(r[line_key], []).append(
            (r[x_key], r["ratio_to_supervised"]))
      for value, points in sorted(lines.items()):
        x, y = zip(*sorted(points))
        ax.plot(x, y, marker="o", label=f"{letter}={value}")
      ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
      ax.set_xlabel(x_label)
      ax.set_ylabel("step time / supervised-only")
      ax.set_ylim(0, top * 1.1)
      ax.xaxis.get_major_locator().set_params(integer=True)
      ax.set_title(f"{method}, K={rs[0]['num_supervised']} supervised, "
                   f"batch {rs[0]['batch_size']}, {jax.default_backend()}",
                   fontsize=9)
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def random_grams(num_tasks: int, spread: float, count: int, seed: int
                 ) -> list[jax.Array]:
  """`count` float32 Gram matrices of `[K, 64]` gradients with a shared
  component (conflicting pairs, non-trivial solver supports) and row norms
  log-uniform over `spread`, normalised to a largest diagonal of 1."""
  rng = np.random.default_rng(seed)
  grams = []
  for _ in range(count):
    g = rng.normal(size=(num_tasks, 64))
    g = g + rng.normal() * rng.normal(size=(1, 64))
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    g = g * spread ** rng.uniform(size=(num_tasks, 1))
    m = g @ g.T
    grams.append(jnp.asarray(m / np.max(np.diag(m)), jnp.float32))
  return grams


def benchmark_solvers(methods: Sequence[str], ks: Sequence[int], *,
                      spread: float, rounds: int, calls: int, seed: int
                      ) -> list[dict[str, Any]]:
  """Median microseconds per jitted `from_gram` call of each Gram method.

  The methods are timed in interleaved rounds over the same 16 matrices per
  K (as the train steps are), so their ratios in one run are comparable.
  """
  rows = []
  for k in ks:
    grams = random_grams(k, spread, 16, seed)
    fns = {}
    for name in methods:
      if name not in aggregation.AGGREGATORS:
        continue  # ew, baseline and the weightings have no K x K part
      agg = aggregation.get_aggregator(name)
      if agg.from_gram is None:
        continue
      state = agg.init(k)
      ones = jnp.ones((k,), jnp.float32)
      fn = jax.jit(lambda m, st, agg=agg, ones=ones: agg.from_gram(
          m, jnp.float32(1.0), st, losses=ones, counts=ones,
          rng=jax.random.key(0))[0])
      jax.block_until_ready(fn(grams[0], state))
      fns[name] = (fn, state, [])
    for r in range(rounds):
      names = list(fns)
      for name in names[r % len(names):] + names[:r % len(names)]:
        fn, state, times = fns[name]
        start = time.perf_counter()
        for i in range(calls):
          out = fn(grams[i % len(grams)], state)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls * 1e6)
    for name, (_, _, times) in fns.items():
      rows.append({"method": f"solver/{name}", "num_tasks": k,
                   "spread": spread, "us_per_call": round(float(
                       np.median(times)), 2), "backend": jax.default_backend()})
  return rows


# --------------------------------------------------------------------------
# Output.


def plot_scaling(rows: Sequence[dict[str, Any]], path: str) -> None:
  """Step time against the number of tasks, one line per method."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  series: dict[str, list[tuple[int, float]]] = {}
  for r in rows:
    if "num_tasks" in r and "ms_per_step" in r and not r["method"].startswith(
        "train_step/"):
      label = r["method"] + (" (rep_grad)" if r.get("rep_grad") else "")
      series.setdefault(label, []).append((r["num_tasks"], r["ms_per_step"]))
  for label, points in sorted(series.items()):
    k, ms = zip(*sorted(points))
    ax.plot(k, ms, marker="o", label=label,
            linestyle="--" if label.startswith((EW, BASELINE)) else "-")
  # A line proportional to K through the slowest method's smallest K: a
  # method that grows linearly runs parallel to it.
  slowest = max(series.values(), key=lambda p: max(ms for _, ms in p),
                default=None)
  if slowest and len(slowest) > 1:
    k0, ms0 = min(slowest)
    ks = sorted(k for k, _ in slowest)
    ax.plot(ks, [ms0 * k / k0 for k in ks], color="gray", linestyle=":",
            label="proportional to K")
  ax.set_xlabel("number of tasks K")
  ax.set_ylabel("ms per step (median)")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ks = sorted({r["num_tasks"] for r in rows if "num_tasks" in r})
  if ks:
    ax.set_xticks(ks, [str(k) for k in ks])
  r0 = rows[0] if rows else {}
  ax.set_title(f"{r0.get('model', '')} train step, batch "
               f"{r0.get('batch_size', '')}, {jax.default_backend()}")
  ax.grid(True, which="both", alpha=0.3)
  if series:
    ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _ints(values: Sequence[str]) -> tuple[int, ...]:
  return tuple(int(v) for v in values if str(v).strip())


def run() -> list[dict[str, Any]]:
  """Runs the benchmark the flags describe; prints and returns the rows."""
  model = _MODEL.value
  methods = ([m for m in _METHODS.value if m.strip()]
             if _METHODS.value is not None else default_methods(model))
  check_methods(methods, model)
  modes = [m.strip() for m in _JACOBIAN.value if m.strip()]
  bad = [m for m in modes if m not in step_lib.JACOBIAN_MODES] or (
      [] if modes else ["(none)"])
  if bad:
    raise ValueError(f"unknown --jacobian mode(s) {bad}; valid: "
                     f"{', '.join(step_lib.JACOBIAN_MODES)}")
  input_shape = ((_INPUT_DIM.value,) if model == "mlp"
                 else _ints(_IMAGE_SHAPE.value))

  def setting(k: int) -> Setting:
    return compile_setting(
        methods, model_name=model, num_tasks=k,
        num_classes=_NUM_CLASSES.value, batch_size=_BATCH_SIZE.value,
        input_shape=input_shape, hidden=_ints(_HIDDEN.value),
        channels=_ints(_CHANNELS.value), strides=_ints(_STRIDES.value),
        feature_size=_FEATURE_SIZE.value,
        head_hidden=_ints(_HEAD_HIDDEN.value), rep_grad=_REP_GRAD.value,
        chunk_size=_CHUNK_SIZE.value or None,
        learning_rate=_LEARNING_RATE.value, seed=_SEED.value, jacobian=modes)

  if _PRETEXT.value:
    return run_pretext(methods if _METHODS.value is not None
                       else [EW, "upgrad"], modes[0])
  if _SOLVERS.value:
    rows = benchmark_solvers(methods, _ints(_NUM_TASKS.value),
                             spread=_SOLVER_SPREAD.value,
                             rounds=_ROUNDS.value, calls=max(_STEPS.value, 1),
                             seed=_SEED.value)
    for r in rows:
      print(json.dumps(r), flush=True)
    _write_rows(rows, [])
    return rows
  ks = _ints(_NUM_TASKS.value) if methods else ()
  if _INTERLEAVE_SETTINGS.value:
    groups = iter([[setting(k) for k in ks]] if ks else [])
  else:  # compiled one at a time: the previous one is freed first
    groups = ([setting(k)] for k in ks)
  rows: list[dict[str, Any]] = []
  for group in groups:
    for r in time_settings(group, steps=_STEPS.value, rounds=_ROUNDS.value,
                           warmup=_WARMUP.value):
      print(json.dumps(r), flush=True)
      rows.append(r)
    del group  # its compiled steps and states, before the next compiles
  summary = scaling_summary(rows)
  for r in summary:
    print(json.dumps({"scaling": r}), flush=True)
  if _PIPELINE.value:
    for r in benchmark_pipeline(
        data_dir=_DATA_DIR.value, builder_config=_DATA_CONFIG.value,
        num_batches=_PIPELINE_BATCHES.value, steps=_STEPS.value,
        rounds=_ROUNDS.value, warmup=_WARMUP.value, seed=_SEED.value):
      print(json.dumps(r), flush=True)
      rows.append(r)
  _write_rows(rows, summary)
  if _OUT.value:
    plot_scaling(rows, os.path.join(_OUT.value, "step_time_vs_tasks.png"))
  return rows


def run_pretext(methods: Sequence[str], jacobian: str
                ) -> list[dict[str, Any]]:
  """The --pretext mode: prints the rows and the fit lines, writes
  `--out`'s benchmark.jsonl, pretext.json and pretext_step_time.png."""
  if BASELINE in methods:
    raise ValueError("method 'baseline' (the hand-written step) has no "
                     "pretext tasks; drop it with --pretext")
  if not methods:
    raise ValueError("--pretext needs at least one method")
  if _REP_GRAD.value:
    raise ValueError("--pretext times the default (parameter-gradient) "
                     "paths; drop --rep_grad")
  sets = ([s.strip() for s in _PRETEXT_SETS.value if s.strip()]
          if _PRETEXT_SETS.value is not None else DEFAULT_PRETEXT_SETS)
  image_shape = _ints(_IMAGE_SHAPE.value)
  for spec in sets:  # a bad set fails before anything compiles
    pretext_tasks(spec, image_shape)
  k = (_ints(_NUM_TASKS.value) or (4,))[0]  # the first K of a list
  rows, fit = benchmark_pretext(
      methods, sets, steps=_STEPS.value, rounds=_ROUNDS.value,
      warmup=_WARMUP.value, model_name=_MODEL.value, num_tasks=k,
      num_classes=_NUM_CLASSES.value, batch_size=_BATCH_SIZE.value,
      input_shape=image_shape, hidden=_ints(_HIDDEN.value),
      channels=_ints(_CHANNELS.value), strides=_ints(_STRIDES.value),
      feature_size=_FEATURE_SIZE.value,
      head_hidden=_ints(_HEAD_HIDDEN.value), jacobian=jacobian,
      chunk_size=_CHUNK_SIZE.value or None,
      learning_rate=_LEARNING_RATE.value, seed=_SEED.value)
  for r in rows:
    print(json.dumps(r), flush=True)
  for r in fit:
    print(json.dumps({"pretext_fit": r}), flush=True)
  _write_rows(rows, [])
  if _OUT.value:
    with open(os.path.join(_OUT.value, "pretext.json"), "w") as f:
      json.dump({"rows": rows, "fit": fit}, f, indent=1)
    plot_pretext(rows, os.path.join(_OUT.value, "pretext_step_time.png"))
  return rows


def _write_rows(rows: Sequence[dict[str, Any]],
                summary: Sequence[dict[str, Any]]) -> None:
  """`--out`'s benchmark.jsonl (and scaling.json for a sweep)."""
  if not _OUT.value:
    return
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "benchmark.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  if summary:
    with open(os.path.join(_OUT.value, "scaling.json"), "w") as f:
      json.dump(summary, f, indent=1)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """Parses `argv` into the benchmark's flags (absl's own into absl's).

  Returns:
    The positional arguments (`argv[0]` first).
  """
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    print(__doc__)
    print(FLAGS.get_help())
    raise SystemExit(0)
  # The benchmark's flags first: absl's global registry may also know
  # --methods, --steps or --out (another script imported into the process).
  FLAGS.unparse_flags()
  rest = FLAGS(list(argv), known_only=True)
  return flags.FLAGS(rest)  # absl's own (logging, ...); rejects the unknown


def main(argv: Sequence[str]) -> None:
  """Runs the benchmark; `argv` is what `parse_flags` left (as in `app.run`).

  Returns None: `app.run` exits with what `main` returns (a list would print
  to stderr and exit with status 1). `run()` returns the rows.
  """
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run()


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
