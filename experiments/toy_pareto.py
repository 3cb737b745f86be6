r"""The two-objective toy problem of CAGrad (Liu et al. 2021) and Nash-MTL.

Each method optimises x in R^2 from the five starting points of the CAGrad paper
with Adam, combining the two task gradients with a gradient aggregator (or a
loss weighting), and we count how many runs end on the Pareto set. The Pareto
set is found numerically: the non-dominated points of a dense grid, and a run
reaches it when its final loss vector lies within `--tolerance` of that front.

  python -m experiments.toy_pareto --out=runs/toy
  python -m experiments.toy_pareto --methods=mean,mgda,cagrad --steps=20000
  python -m experiments.toy_pareto --methods=famo --famo_gamma=0 \
      --famo_min_losses=-21,-21 --out=runs/toy_famo_official

The weightings run with their library defaults, except FAMO's three settings,
which have flags: the last command uses those of FAMO's official toy script
(github.com/Cranial-XIX/FAMO, `experiments/toy/run.sh` and `trainer.py`):
`gamma = 0` and the losses' lower bounds `min_losses = -21` (the toy's losses
reach -20, and FAMO takes the log of `L - min_losses`). See `mtl_jax/weighting/
famo.py` for why the defaults stall on the upper plateau.

Writes `<out>/toy_pareto.png` (one panel per method in x = (x1, x2) space:
the trajectories from the five starts over the contours of the mean loss
(f1 + f2) / 2, the Pareto set in black, a legend below the panels) and
`<out>/toy_pareto.json` (per method: final points, losses, and how many runs
reached the Pareto set), and ends by printing the table of runs on the Pareto
set and the paths of the two files.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax import aggregation
from mtl_jax import weighting

_METHODS = flags.DEFINE_list(
    "methods", None, "Aggregators and/or weightings to run (default: every "
    "aggregator plus the uncertainty, dwa, gls, imtl_l and famo weightings).")
_STEPS = flags.DEFINE_integer("steps", 100_000, "Adam steps per run (paper: "
                             "100k).")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate (paper: "
                         "1e-3).")
_TOLERANCE = flags.DEFINE_float(
    "tolerance", 0.05, "A run reaches the Pareto set if its final (f1, f2) is "
    "within this distance of the numerically computed front.")
_OUT = flags.DEFINE_string("out", "runs/toy_pareto", "Output directory.")
_FAMO_GAMMA = flags.DEFINE_float(
    "famo_gamma", 1e-3, "FAMO's weight decay on its task logits (library "
    "default 1e-3; FAMO's official toy: 0).")
_FAMO_MIN_LOSSES = flags.DEFINE_list(
    "famo_min_losses", None, "FAMO's lower bound of each loss, e.g. -21,-21 "
    "as FAMO's official toy (default: zeros, the library default).")
_FAMO_LR = flags.DEFINE_float(
    "famo_learning_rate", 0.025, "Adam learning rate of FAMO's task logits "
    "(library default and FAMO's official toy: 0.025).")

# The starting points of the CAGrad toy experiment.
INITS = np.array([[-8.5, 7.5], [-8.5, -5.0], [9.0, 9.0], [-7.5, -0.5],
                  [9.0, -1.0]], np.float32)
_LOWER = 5e-6
DEFAULT_WEIGHTINGS = ("uncertainty", "dwa", "gls", "imtl_l", "famo")
JSON_FILE = "toy_pareto.json"
PNG_FILE = "toy_pareto.png"


def toy_losses(x: jax.Array) -> jax.Array:
  """The two objectives `[2]` at `x [2]` (the CAGrad toy, verbatim)."""
  x1, x2 = x[0], x[1]
  f1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7) - jnp.tanh(-x2)), _LOWER)) + 6
  f2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3) + jnp.tanh(-x2) + 2),
                           _LOWER)) + 6
  c1 = jnp.maximum(jnp.tanh(x2 * 0.5), 0)
  f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  c2 = jnp.maximum(jnp.tanh(-x2 * 0.5), 0)
  return jnp.stack([f1 * c1 + f1_sq * c2, f2 * c1 + f2_sq * c2])


def pareto_front(n: int = 1500, lim: float = 10.0
                 ) -> tuple[np.ndarray, np.ndarray]:
  """The non-dominated points of an `n x n` grid over [-lim, lim]^2.

  Returns:
    `(losses [M, 2], xs [M, 2])`: the Pareto front in loss space and the Pareto
    set in x space, sorted by f1.
  """
  xs = np.linspace(-lim, lim, n, dtype=np.float32)
  grid = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
  f = np.asarray(jax.jit(jax.vmap(toy_losses))(grid))  # [n*n, 2]
  order = np.lexsort((f[:, 1], f[:, 0]))  # by f1, then f2
  f, grid = f[order], grid[order]
  # Non-dominated: strictly better f2 than every point with smaller f1.
  keep = f[:, 1] < np.minimum.accumulate(np.concatenate([[np.inf], f[:-1, 1]]))
  return f[keep], grid[keep]


def distance_to_front(points: np.ndarray, front: np.ndarray) -> np.ndarray:
  """Euclidean distance of each loss vector `[R, 2]` to the front `[M, 2]`."""
  d = np.linalg.norm(points[:, None, :] - front[None, :, :], axis=-1)
  return d.min(axis=1)


def _direction_fn(name: str, weighting_kwargs: dict[str, Any] | None = None
                  ) -> tuple[Callable, Callable, Callable | None]:
  """`(init(), update(G, losses, state, rng) -> (direction, state), post)`.

  `post(new_losses, state) -> state` is the weighting's `post_update` (None
  for aggregators and weightings without one); `weighting_kwargs` are the
  weighting's hyperparameters.
  """
  counts = jnp.ones(2)
  if name in aggregation.AGGREGATORS:
    agg = aggregation.get_aggregator(name)

    def update(g, losses, state, rng):
      return agg.update(g, state, losses=losses, counts=counts, rng=rng)

    return (lambda: agg.init(2)), update, None
  if name in weighting.WEIGHTINGS:
    w = weighting.get_weighting(name, **dict(weighting_kwargs or {}))

    def update_w(g, losses, state, rng):
      weights, state = w.update(losses, counts, state, rng=rng,
                                grad_norms=jnp.linalg.norm(g, axis=1))
      return weights @ g, state

    post = None
    if w.post_update is not None:
      post = lambda new_losses, state: w.post_update(new_losses, counts, state)
    return (lambda: w.init(2)), update_w, post
  raise ValueError(f"unknown method {name!r}; valid: aggregators "
                   f"{sorted(aggregation.AGGREGATORS)} or weightings "
                   f"{sorted(weighting.WEIGHTINGS)}")


def run_method(name: str, inits: np.ndarray, steps: int, learning_rate: float,
               record_every: int = 100,
               weighting_kwargs: dict[str, Any] | None = None
               ) -> dict[str, Any]:
  """Optimises every starting point with `name`; returns trajectories.

  Args:
    name: an aggregator or a weighting.
    inits: `[R, 2]` starting points.
    steps: Adam steps per run (a multiple of `record_every`).
    learning_rate: Adam's learning rate on x.
    record_every: the trajectories keep one point per this many steps.
    weighting_kwargs: hyperparameters of the weighting `name`.

  Returns:
    `{"trajectories": [R, T, 2], "final": [R, 2], "final_losses": [R, 2]}`.
  """
  init_state, update, weighting_post = _direction_fn(name, weighting_kwargs)
  tx = optax.adam(learning_rate)

  def one_run(x0, key):
    def body(carry, t):
      x, opt_state, state = carry
      losses, vjp = jax.vjp(toy_losses, x)
      g = jax.vmap(vjp)(jnp.eye(2))[0]  # [2 tasks, 2 dims]
      d, state = update(g, losses, state, jax.random.fold_in(key, t))
      upd, opt_state = tx.update(d, opt_state, x)
      x = optax.apply_updates(x, upd)
      if weighting_post is not None:
        state = weighting_post(toy_losses(x), state)
      return (x, opt_state, state), x

    def chunk(carry, t0):
      carry, xs = jax.lax.scan(body, carry, t0 + jnp.arange(record_every))
      return carry, xs[-1]

    carry = (x0, tx.init(x0), init_state())
    (x, _, _), traj = jax.lax.scan(
        chunk, carry, jnp.arange(0, steps, record_every))
    return x, traj

  keys = jax.random.split(jax.random.PRNGKey(0), len(inits))
  final, traj = jax.jit(jax.vmap(one_run))(jnp.asarray(inits), keys)
  traj = np.concatenate([inits[:, None], np.asarray(traj)], axis=1)
  final = np.asarray(final)
  return {"trajectories": traj, "final": final,
          "final_losses": np.asarray(jax.vmap(toy_losses)(final))}


def output_files(out: str) -> tuple[str, str]:
  """`(json_path, png_path)` that `run` writes under `out`."""
  return os.path.join(out, JSON_FILE), os.path.join(out, PNG_FILE)


def plot(results: dict[str, dict], front_x: np.ndarray, path: str
         ) -> dict[str, Any]:
  """Trajectories per method over the contours of the mean loss.

  Returns:
    `{"axis_labels": (x label, y label), "legend": [entries]}` of the figure
    written to `path` (the same labels on every panel).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.lines as mlines  # pylint: disable=g-import-not-at-top
  import matplotlib.patches as mpatches  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  xs = np.linspace(-10, 10, 300, dtype=np.float32)
  grid = np.stack(np.meshgrid(xs, xs), -1)
  f = np.asarray(jax.jit(jax.vmap(jax.vmap(toy_losses)))(grid)).mean(-1)
  n = len(results)
  ncols = min(n, 5)
  nrows = -(-n // ncols)
  legend_cols = 8 if ncols >= 4 else 4 if ncols >= 2 else 2
  strip = 0.25 + 0.2 * -(-8 // legend_cols)  # inches below the panels
  fig, axes = plt.subplots(nrows, ncols,
                           figsize=(3.2 * ncols, 3.2 * nrows + strip),
                           squeeze=False)
  colors = plt.cm.tab10(np.arange(len(INITS)))
  for ax, (name, r) in zip(axes.ravel(), results.items()):
    ax.contourf(xs, xs, f, levels=20, cmap="Greys", alpha=0.6)
    ax.plot(front_x[:, 0], front_x[:, 1], "k-", lw=2.5, alpha=0.8)
    for i, t in enumerate(r["trajectories"]):
      ax.plot(t[:, 0], t[:, 1], color=colors[i], lw=1.2)
      ax.plot(*t[0], "o", color=colors[i], ms=4)
      ax.plot(*t[-1], "*", color=colors[i], ms=8, mec="k", mew=0.5)
    ax.set_title(f"{name}: {r['reached']}/{len(INITS)} on Pareto set",
                 fontsize=9)
    ax.set(xlim=(-10, 10), ylim=(-10, 10), xticks=[-10, 0, 10],
           yticks=[-10, 0, 10])
    ax.set_xlabel("x1", fontsize=8, labelpad=1)
    ax.set_ylabel("x2", fontsize=8, labelpad=1)
    ax.tick_params(labelsize=7)
  for ax in axes.ravel()[n:]:
    ax.axis("off")
  handles = [mlines.Line2D([], [], color=colors[i], marker="o", ms=4, lw=1.2,
                           label=f"start ({x1:g}, {x2:g})")
             for i, (x1, x2) in enumerate(INITS)]
  handles += [
      mlines.Line2D([], [], color="grey", marker="*", ms=8, mec="k", mew=0.5,
                    ls="none", label="end of a run"),
      mlines.Line2D([], [], color="k", lw=2.5, alpha=0.8, label="Pareto set"),
      mpatches.Patch(color="grey", alpha=0.6,
                     label="mean loss (f1 + f2) / 2 (darker: higher)")]
  legend = fig.legend(handles=handles, loc="lower center", ncol=legend_cols,
                      fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, strip / (3.2 * nrows + strip), 1, 1))
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return {"axis_labels": (axes[0, 0].get_xlabel(), axes[0, 0].get_ylabel()),
          "legend": [t.get_text() for t in legend.get_texts()]}


def run(methods: list[str], steps: int, learning_rate: float,
        tolerance: float, out: str,
        weighting_kwargs: dict[str, dict[str, Any]] | None = None
        ) -> dict[str, dict]:
  """Runs every method from every start; writes the JSON summary and the PNG.

  Args:
    methods: aggregators and/or weightings.
    steps: Adam steps per run.
    learning_rate: Adam's learning rate on x.
    tolerance: the distance to the front that counts as reaching it.
    out: the output directory.
    weighting_kwargs: `{name: hyperparameters}` for weightings in `methods`
      (library defaults for the others).

  Returns:
    The per-method summary written to `<out>/toy_pareto.json`.
  """
  weighting_kwargs = weighting_kwargs or {}
  for name in methods:  # fail before any work on a typo
    _direction_fn(name, weighting_kwargs.get(name))
  os.makedirs(out, exist_ok=True)
  front, front_x = pareto_front()
  results, summary = {}, {}
  start = time.perf_counter()
  for i, name in enumerate(methods):
    t0 = time.perf_counter()
    r = run_method(name, INITS, steps, learning_rate,
                   weighting_kwargs=weighting_kwargs.get(name))
    dist = distance_to_front(r["final_losses"], front)
    r["reached"] = int(np.sum(dist < tolerance))
    results[name] = r
    summary[name] = {"reached": r["reached"], "runs": len(INITS),
                     "hyperparameters": weighting_kwargs.get(name, {}),
                     "final_x": r["final"].round(3).tolist(),
                     "final_losses": r["final_losses"].round(4).tolist(),
                     "distance_to_front": dist.round(4).tolist()}
    elapsed = time.perf_counter() - start
    logging.info("[%d/%d] %-12s %d/%d runs on the Pareto set (%.1fs, ETA %.0fs)",
                 i + 1, len(methods), name, r["reached"], len(INITS),
                 time.perf_counter() - t0,
                 elapsed / (i + 1) * (len(methods) - i - 1))
  json_path, png_path = output_files(out)
  with open(json_path, "w") as f:
    json.dump({"steps": steps, "learning_rate": learning_rate,
               "tolerance": tolerance, "methods": summary}, f, indent=1)
  plot(results, front_x, png_path)
  return summary


def report(summary: dict[str, dict], out: str) -> str:
  """What `main` prints: runs on the Pareto set per method, then the files."""
  json_path, png_path = output_files(out)
  lines = ["method        on Pareto set"]
  lines += [f"{name:<13} {s['reached']}/{s['runs']}"
            for name, s in summary.items()]
  lines += [f"wrote {json_path} (per method: final points, losses, runs on "
            "the Pareto set)",
            f"wrote {png_path} (trajectories over the mean loss, Pareto set "
            "in black)"]
  return "\n".join(lines)


def main(argv):
  del argv
  methods = _METHODS.value or (sorted(aggregation.AGGREGATORS) +
                               list(DEFAULT_WEIGHTINGS))
  famo_kwargs = {"gamma": _FAMO_GAMMA.value,
                 "learning_rate": _FAMO_LR.value}
  if _FAMO_MIN_LOSSES.value:
    famo_kwargs["min_losses"] = [float(v) for v in _FAMO_MIN_LOSSES.value]
  summary = run(methods, _STEPS.value, _LR.value, _TOLERANCE.value, _OUT.value,
                weighting_kwargs={"famo": famo_kwargs})
  print(report(summary, _OUT.value))


if __name__ == "__main__":
  app.run(main)
