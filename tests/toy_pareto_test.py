"""Tests of the two-objective toy problem of experiments/toy_pareto.py."""

import json
import os

import jax.numpy as jnp
import numpy as np

from experiments import toy_pareto


def test_toy_losses_match_hand_computation():
  # At x = (0, -8): tanh(x2/2) < 0, so only the quadratic parts count, scaled
  # by c2 = tanh(4): f1 = tanh(4) * ((0 + 7)^2 / 10 - 20), same for f2.
  f = toy_pareto.toy_losses(jnp.array([0.0, -8.0]))
  np.testing.assert_allclose(f, [np.tanh(4.0) * (4.9 - 20)] * 2, rtol=1e-6)
  # At x = (-7, 8): c2 = 0, f1 = log|0.5*0 - tanh(-8)| + 6 = log(tanh 8) + 6.
  f = toy_pareto.toy_losses(jnp.array([-7.0, 8.0]))
  c1 = np.tanh(4.0)
  np.testing.assert_allclose(f[0], c1 * (np.log(np.tanh(8.0)) + 6), rtol=1e-5)


def test_pareto_front_is_non_dominated_and_spans_the_segment():
  front, xs = toy_pareto.pareto_front(n=400)
  # Sorted by f1 with f2 strictly decreasing: no point dominates another.
  assert np.all(np.diff(front[:, 0]) >= 0) and np.all(np.diff(front[:, 1]) < 0)
  # The Pareto set is the bottom segment between the two quadratic minima.
  assert xs[:, 0].min() < -6.5 and xs[:, 0].max() > 6.5
  assert np.all(xs[:, 1] < -7)


def test_mgda_reaches_the_front_and_main_writes_outputs(tmp_path):
  front, _ = toy_pareto.pareto_front(n=400)
  r = toy_pareto.run_method("mgda", toy_pareto.INITS[1:2], steps=3000,
                            learning_rate=0.01)
  assert toy_pareto.distance_to_front(r["final_losses"], front)[0] < 0.1
  assert r["trajectories"].shape == (1, 31, 2)  # start + one point per 100
  famo_kwargs = {"gamma": 0.0, "min_losses": [-21.0, -21.0]}
  toy_pareto.run(["mean", "famo"], steps=200, learning_rate=1e-3,
                 tolerance=0.05, out=str(tmp_path),
                 weighting_kwargs={"famo": famo_kwargs})
  with open(tmp_path / "toy_pareto.json") as f:
    summary = json.load(f)
  assert set(summary["methods"]) == {"mean", "famo"}
  assert summary["methods"]["mean"]["runs"] == 5
  assert summary["methods"]["famo"]["hyperparameters"] == famo_kwargs
  assert os.path.getsize(tmp_path / "toy_pareto.png") > 10_000
  # What main prints ends with the paths of the two files it wrote.
  lines = toy_pareto.report(summary["methods"], str(tmp_path)).splitlines()
  reached = {m: summary["methods"][m]["reached"] for m in ("mean", "famo")}
  assert lines[1:3] == [f"mean          {reached['mean']}/5",
                        f"famo          {reached['famo']}/5"]
  assert lines[3].startswith(f"wrote {tmp_path / 'toy_pareto.json'} ")
  assert lines[4].startswith(f"wrote {tmp_path / 'toy_pareto.png'} ")


def test_plot_labels_axes_and_has_a_legend(tmp_path):
  # Two panels of made-up straight trajectories: only the figure is checked.
  traj = np.linspace(toy_pareto.INITS, np.zeros_like(toy_pareto.INITS), 3,
                     axis=1)
  results = {m: {"trajectories": traj, "reached": 1} for m in ("a", "b")}
  front_x = np.array([[-7.0, -8.4], [7.0, -8.4]])
  info = toy_pareto.plot(results, front_x, str(tmp_path / "p.png"))
  assert info["axis_labels"] == ("x1", "x2")
  assert info["legend"] == [
      "start (-8.5, 7.5)", "start (-8.5, -5)", "start (9, 9)",
      "start (-7.5, -0.5)", "start (9, -1)", "end of a run", "Pareto set",
      "mean loss (f1 + f2) / 2 (darker: higher)"]
  assert os.path.getsize(tmp_path / "p.png") > 10_000


def test_famo_leaves_the_plateau_only_without_logit_decay():
  # The two starts on the upper plateau, 30k steps (see famo.py's docstring).
  front, _ = toy_pareto.pareto_front(n=400)
  inits = toy_pareto.INITS[[0, 2]]

  def final(**kwargs):
    r = toy_pareto.run_method("famo", inits, steps=30_000, learning_rate=1e-3,
                              weighting_kwargs=kwargs)
    return r["final"], toy_pareto.distance_to_front(r["final_losses"], front)

  # Library default gamma = 1e-3: both stall on the plateau (x2 > 2.5 where
  # the Pareto set is at x2 = -8.4), more than 20 from the front.
  x, dist = final()
  assert np.all(x[:, 1] > 2.5) and np.all(dist > 20), (x, dist)
  # The official toy's settings: both reach the middle of the Pareto set.
  x, dist = final(gamma=0.0, min_losses=[-21.0, -21.0])
  assert np.all(dist < 0.05), dist
  np.testing.assert_allclose(x[:, 1], -8.35, atol=0.05)
  assert np.all(np.abs(x[:, 0]) < 0.5), x
  # gamma = 0 alone also reaches it, at the two single-task minima (+-7, -8.43)
  # since the logits freeze once both losses are below min_losses = 0.
  x, dist = final(gamma=0.0)
  assert np.all(dist < 0.05), dist
  np.testing.assert_allclose(x, [[-7.0, -8.43], [7.0, -8.43]], atol=0.02)
