"""Tests of the DSelect-k gate and model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.models import dselect_k, heads, trunks

TASKS = {"left": (10,), "sum": (), "dense": (2, 3)}
SHAPES = {"left": (4, 10), "sum": (4,), "dense": (4, 2, 3)}
X = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 5))  # flattened: 15


def random_params(model, x=X, seed=2, scale=0.1):
  """Random normal params in the model's tree (NumPy: no per-shape compiles).

  The scale keeps most gate logits inside the smooth step's cubic region
  (|z| < gamma / 2), where the gate has a gradient.
  """
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: scale * rng.standard_normal(s.shape).astype(np.float32), shapes)


def max_abs(tree):
  return max(float(np.abs(np.asarray(l)).max()) for l in jax.tree.leaves(tree))


def np_smooth_step(t, gamma):
  """The closed form, written independently of the library."""
  t = np.asarray(t, np.float64)
  cubic = -2 / gamma ** 3 * t ** 3 + 3 / (2 * gamma) * t + 0.5
  return np.where(t <= -gamma / 2, 0.0, np.where(t >= gamma / 2, 1.0, cubic))


def np_selector(z, num_experts, gamma):
  """r_i = prod_j S(z_j) or 1 - S(z_j) by bit j of i (MSB first), by hand."""
  s = np_smooth_step(z, gamma)
  m = len(z)
  r = []
  for i in range(num_experts):
    bits = [(i >> (m - 1 - j)) & 1 for j in range(m)]
    r.append(np.prod([s[j] if b else 1 - s[j] for j, b in enumerate(bits)]))
  return np.array(r)


@pytest.mark.parametrize("gamma", [1.0, 0.5, 3.0])
def test_smooth_step_closed_form_and_c1(gamma):
  t = np.linspace(-gamma, gamma, 41, dtype=np.float32)
  np.testing.assert_allclose(dselect_k.smooth_step(jnp.asarray(t), gamma),
                             np_smooth_step(t, gamma), atol=1e-6)
  np.testing.assert_array_equal(
      dselect_k.smooth_step(jnp.asarray([-gamma, -gamma / 2]), gamma), [0, 0])
  np.testing.assert_array_equal(
      dselect_k.smooth_step(jnp.asarray([gamma / 2, gamma]), gamma), [1, 1])
  assert float(dselect_k.smooth_step(0.0, gamma)) == 0.5
  # C1: the cubic meets 0 and 1 with zero slope. S'(t) = -6 t^2 / gamma^3 +
  # 3 / (2 gamma), which is 3 / (2 gamma) at 0 and 6 d / gamma^2 + O(d^2) at
  # a distance d inside either boundary; outside, S' = 0.
  grad = jax.vmap(jax.grad(lambda u: dselect_k.smooth_step(u, gamma)))
  np.testing.assert_allclose(grad(jnp.zeros(1)), [1.5 / gamma], rtol=1e-6)
  d = 1e-3 * gamma
  inside = jnp.asarray([-gamma / 2 + d, gamma / 2 - d])
  np.testing.assert_allclose(grad(inside), 6 * d / gamma ** 2 * np.ones(2),
                             rtol=1e-2)
  outside = jnp.asarray([-gamma / 2 - d, gamma / 2 + d, -gamma / 2, gamma / 2])
  np.testing.assert_array_equal(grad(outside), np.zeros(4))
  # Values are continuous across the boundaries too.
  np.testing.assert_allclose(dselect_k.smooth_step(inside, gamma),
                             [0, 1], atol=1e-5)


def test_binary_codes():
  np.testing.assert_array_equal(dselect_k.binary_codes(4),
                                [[0, 0], [0, 1], [1, 0], [1, 1]])
  np.testing.assert_array_equal(dselect_k.binary_codes(3),
                                [[0, 0], [0, 1], [1, 0]])
  assert dselect_k.binary_codes(5).shape == (5, 3)
  np.testing.assert_array_equal(dselect_k.binary_codes(5)[4], [1, 0, 0])
  assert [dselect_k.num_binary(e) for e in (2, 3, 4, 5, 8, 9)] == [
      1, 2, 2, 3, 3, 4]


@pytest.mark.parametrize("num_experts", [2, 4, 8])
def test_selectors_are_distributions(num_experts):
  m = dselect_k.num_binary(num_experts)
  z = 0.4 * jax.random.normal(jax.random.PRNGKey(0), (6, 3, m))  # [B, k, m]
  r = dselect_k.single_expert_selectors(z, num_experts, 1.0)
  assert r.shape == (6, 3, num_experts)
  assert float(r.min()) >= 0
  np.testing.assert_allclose(r.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(r[2, 1], np_selector(z[2, 1], num_experts, 1.0),
                             rtol=1e-5)


def test_selectors_with_unreachable_codes():
  # E = 3 uses codes 00, 01, 10; the weight of code 11 is lost.
  z = np.array([0.2, -0.1], np.float32)
  r = dselect_k.single_expert_selectors(jnp.asarray(z), 3, 1.0)
  s0, s1 = np_smooth_step(z, 1.0)
  np.testing.assert_allclose(
      r, [(1 - s0) * (1 - s1), (1 - s0) * s1, s0 * (1 - s1)], rtol=1e-5)
  np.testing.assert_allclose(r.sum(), 1 - s0 * s1, rtol=1e-5)


def saturated_gate(gate_params, selected, selector_logits, gamma=1.0):
  """Example-conditioned gate params that ignore x: selector i's bit logits
  are +-gamma (outside the cubic region) on the code of `selected[i]`."""
  m = gate_params["z_logits"]["bias"].shape[0] // len(selected)
  codes = dselect_k.binary_codes(2 ** m)[np.asarray(selected)]  # [k, m]
  return {
      "z_logits": {"kernel": jnp.zeros_like(gate_params["z_logits"]["kernel"]),
                   "bias": jnp.asarray(gamma * (2.0 * codes - 1).reshape(-1),
                                       jnp.float32)},
      "w_logits": {"kernel": jnp.zeros_like(gate_params["w_logits"]["kernel"]),
                   "bias": jnp.asarray(selector_logits, jnp.float32)}}


def test_saturated_gate_selects_exactly_k_experts():
  model = dselect_k.DSelectKModel(TASKS, num_experts=8, num_nonzeros=3,
                                  expert_hidden_sizes=(5,))
  params = random_params(model)
  selected, logits = [5, 2, 6], [0.3, -0.2, 1.0]
  params["tasks"]["left"]["gate"] = saturated_gate(
      params["tasks"]["left"]["gate"], selected, logits)
  out, state = model.apply({"params": params}, X, mutable=["intermediates"])
  (w,) = state["intermediates"]["tasks"]["left"]["gate"]["weights"]
  expected = np.zeros(8)
  expected[selected] = np.exp(logits) / np.exp(logits).sum()
  np.testing.assert_allclose(w, np.tile(expected, (4, 1)), atol=1e-7)
  assert (np.asarray(w) > 0).sum(-1).tolist() == [3] * 4
  # The head reads sum_i softmax(alpha)_i f_{e_i}(x), by hand.
  flat = X.reshape(4, -1)
  mixture = sum(
      expected[e] * trunks.MLP(hidden_sizes=(5,)).apply(
          {"params": params["shared"]["experts"][f"expert_{e}"]}, flat)
      for e in selected)
  np.testing.assert_allclose(
      out["left"], heads.Head(output_shape=(10,)).apply(
          {"params": params["tasks"]["left"]["head"]}, mixture),
      rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_experts, example_conditioned", [
    (4, True), (4, False), (3, True)])
def test_gate_weights_and_init(num_experts, example_conditioned):
  gate = dselect_k.DSelectKGate(num_experts, num_nonzeros=2, gamma=2.0,
                                entropy_weight=0.1,
                                example_conditioned=example_conditioned)
  x = X.reshape(4, -1)
  variables = gate.init(jax.random.PRNGKey(3), x)
  # Nothing is sown at init (the train state carries params only).
  assert set(variables) == {"params"}
  p = variables["params"]
  m = dselect_k.num_binary(num_experts)
  if example_conditioned:
    assert p["z_logits"]["kernel"].shape == (15, 2 * m)
    assert p["w_logits"]["kernel"].shape == (15, 2)
  else:
    assert p["z_logits"].shape == (2, m) and p["w_logits"].shape == (2,)
  # The paper code's init: z ~ U(-gamma/100, gamma/100), w ~ U(-0.05, 0.05).
  z_leaves = jax.tree.leaves(p["z_logits"])
  assert max_abs(z_leaves) <= 2.0 / 100 and max_abs(z_leaves) > 0
  assert max_abs(p["w_logits"]) <= 0.05
  w, state = gate.apply(variables, x, mutable=["intermediates"])
  (r,) = state["intermediates"]["selector_outputs"]
  assert w.shape == (4, num_experts) and r.shape == (4, 2, num_experts)
  assert float(w.min()) >= 0 and float(r.min()) >= 0
  # Near-zero logits: every smooth step starts near 1/2, every code near 2^-m.
  np.testing.assert_allclose(r, 2.0 ** -m, atol=0.1)
  if num_experts == 2 ** m:
    np.testing.assert_allclose(r.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  else:
    assert float(w.sum(-1).max()) < 1.0


def params_static(z, alpha):
  """Task-only gate params from `z [k, m]` and `alpha [k]`."""
  return {"z_logits": jnp.asarray(z), "w_logits": jnp.asarray(alpha)}


def test_entropy_and_reachability_by_hand():
  gamma, weight = 1.0, 0.3
  z = np.array([[0.1, -0.3], [0.25, 0.0]], np.float32)  # [k=2, m=2]
  alpha = np.array([0.5, -0.5], np.float32)
  for num_experts in (4, 3):
    gate = dselect_k.DSelectKGate(num_experts, num_nonzeros=2, gamma=gamma,
                                  entropy_weight=weight,
                                  example_conditioned=False)
    w, state = gate.apply({"params": params_static(z, alpha)}, X.reshape(4, -1),
                          mutable=["aux_losses"])
    r = np.stack([np_selector(zi, num_experts, gamma) for zi in z])  # [k, E]
    sw = np.exp(alpha) / np.exp(alpha).sum()
    np.testing.assert_allclose(w, np.tile(sw @ r, (4, 1)), rtol=1e-5)
    entropy = -np.sum(r * np.log(r + 1e-6))
    aux = state["aux_losses"]
    np.testing.assert_allclose(aux["entropy"][0], weight * entropy, rtol=1e-5)
    if num_experts == 4:
      assert set(aux) == {"entropy"}
    else:
      np.testing.assert_allclose(aux["reachability"][0],
                                 np.sum(1 / r.sum(-1) - 1), rtol=1e-5)
      assert float(aux["reachability"][0]) > 0

  # Per-example gates: the batch mean of each example's entropy. With a zero
  # kernel every example has the static gate's logits, so the same value.
  gate = dselect_k.DSelectKGate(4, num_nonzeros=2, gamma=gamma,
                                entropy_weight=weight)
  params = {"z_logits": {"kernel": jnp.zeros((15, 4)),
                         "bias": jnp.asarray(z.reshape(-1))},
            "w_logits": {"kernel": jnp.zeros((15, 2)),
                         "bias": jnp.asarray(alpha)}}
  _, state = gate.apply({"params": params}, X.reshape(4, -1),
                        mutable=["aux_losses"])
  r = np.stack([np_selector(zi, 4, gamma) for zi in z])
  np.testing.assert_allclose(state["aux_losses"]["entropy"][0],
                             weight * -np.sum(r * np.log(r + 1e-6)), rtol=1e-5)

  # Off by default: nothing is sown for a power-of-2 E.
  gate = dselect_k.DSelectKGate(4, num_nonzeros=2, example_conditioned=False)
  _, state = gate.apply({"params": params_static(z, alpha)}, X.reshape(4, -1),
                        mutable=["aux_losses"])
  assert not jax.tree.leaves(state)


@pytest.mark.parametrize("num_experts, example_conditioned", [
    (4, True), (3, False)])
def test_model_shapes_split_gradients_and_isolation(num_experts,
                                                    example_conditioned):
  model = dselect_k.DSelectKModel(
      TASKS, num_experts=num_experts, num_nonzeros=2, entropy_weight=0.1,
      example_conditioned=example_conditioned, expert_hidden_sizes=(6, 5),
      head_hidden_sizes=(4,))
  params = random_params(model)
  assert set(params) == {"shared", "tasks"}
  assert set(params["tasks"]) == set(TASKS)
  assert set(params["shared"]["experts"]) == {
      f"expert_{e}" for e in range(num_experts)}
  for t in TASKS:
    assert set(params["tasks"][t]) == {"gate", "head"}

  out, state = model.apply({"params": params}, X, mutable=["aux_losses"])
  assert {k: v.shape for k, v in out.items()} == SHAPES
  # One entropy (and with E = 3 one reachability) loss per task's gate.
  names = {"entropy"} | ({"reachability"} if num_experts == 3 else set())
  for t in TASKS:
    assert set(state["aux_losses"]["tasks"][t]["gate"]) == names

  # Every parameter learns from the outputs plus the sown aux losses.
  def loss(p):
    o, s = model.apply({"params": p}, X, mutable=["aux_losses"])
    return (sum(jnp.sum(jnp.sin(v) + v ** 2) for v in o.values()) +
            sum(jax.tree.leaves(s)))
  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert max_abs(g) > 0, jax.tree_util.keystr(path)

  # A task's gate and head see only that task's output.
  g = jax.jit(jax.grad(
      lambda p: jnp.sum(model.apply({"params": p}, X)["left"])))(params)
  assert max_abs(g["tasks"]["left"]["gate"]) > 0
  for other in ("sum", "dense"):
    assert max_abs(g["tasks"][other]) == 0, other


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=1), "num_experts must be an integer >= 2"),
    (dict(num_experts=4, num_nonzeros=5), r"num_nonzeros \(5\) must be <="),
    (dict(num_nonzeros=0), "num_nonzeros must be"),
    (dict(gamma=0.0), "gamma must be > 0"),
    (dict(entropy_weight=-1.0), "entropy_weight must be >= 0"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    dselect_k.DSelectKModel(TASKS, **kwargs).init(jax.random.PRNGKey(0), X)
