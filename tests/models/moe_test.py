"""Tests of the mixture-of-experts models: MMoE, CGC and PLE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.models import hard_sharing, heads, moe, trunks

TASKS = {"left": (10,), "sum": (), "dense": (2, 3)}
SHAPES = {"left": (4, 10), "sum": (4,), "dense": (4, 2, 3)}
X = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 5))  # flattened: 15
SIZES = (6, 5)  # expert hidden sizes: output D = 5


def random_params(model, x=X, seed=2, scale=0.3):
  """Random normal params in the model's param tree.

  Built with NumPy from `jax.eval_shape(model.init, ...)`: real inits compile
  one random kernel per leaf shape, which would dominate the tests' run time,
  and the gradient checks need non-zero biases anyway (symmetry breaking).
  """
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: scale * rng.standard_normal(s.shape).astype(np.float32), shapes)


def max_abs(tree):
  """Largest |entry| over all leaves of `tree` (NumPy: no per-shape compile)."""
  return max(float(np.abs(np.asarray(l)).max()) for l in jax.tree.leaves(tree))


def apply(model, params, x=X, **kwargs):
  return model.apply({"params": params}, x, **kwargs)


def expert(params, x, sizes=SIZES):
  """One expert (a trunks.MLP) applied by hand to flattened inputs."""
  return trunks.MLP(hidden_sizes=sizes).apply(
      {"params": params}, x.reshape(x.shape[0], -1))


def head(params, h, output_shape):
  return heads.Head(output_shape=output_shape).apply({"params": params}, h)


def one_hot_gate(gate_params, index, scale=50.0):
  """Gate params whose softmax puts weight ~1 (1 - 1e-20) on `index`."""
  return {"kernel": jnp.zeros_like(gate_params["kernel"]),
          "bias": scale * jax.nn.one_hot(index, gate_params["bias"].shape[0])}


MODELS = {
    "mmoe": lambda: moe.MMoEModel(TASKS, num_experts=3,
                                  expert_hidden_sizes=SIZES,
                                  head_hidden_sizes=(4,)),
    "mmoe_convnet": lambda: moe.MMoEModel(
        TASKS, num_experts=2, expert_hidden_sizes=(5,),
        input_trunk=trunks.ConvNet(channels=(2,), strides=(2,),
                                   feature_size=7)),
    "cgc": lambda: moe.CGCModel(TASKS, num_shared_experts=2,
                                num_task_experts=2, expert_hidden_sizes=SIZES),
    "cgc_no_task_experts": lambda: moe.CGCModel(
        TASKS, num_shared_experts=2, num_task_experts=0,
        expert_hidden_sizes=(5,)),
    "ple_3_levels": lambda: moe.PLEModel(
        TASKS, num_levels=3, num_shared_experts=2, num_task_experts=1,
        expert_hidden_sizes=(5,), input_trunk=trunks.MLP(hidden_sizes=(8,))),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shapes_split_gradients_and_softmax_gates(name):
  model = MODELS[name]()
  x = X[..., None] if name == "mmoe_convnet" else X  # [B, H, W, C] for convs
  params = random_params(model, x)
  assert set(params) == {"shared", "tasks"}
  assert set(params["tasks"]) == set(TASKS)
  if name in ("mmoe_convnet", "ple_3_levels"):
    assert "trunk" in params["shared"]

  out, state = apply(model, params, x, mutable=["intermediates"])
  assert {k: v.shape for k, v in out.items()} == SHAPES
  # Every gate is a softmax: non-negative, one per example.
  gates = jax.tree.leaves(state["intermediates"])
  expected_gates = {"mmoe": 3, "mmoe_convnet": 3, "cgc": 3,
                    "cgc_no_task_experts": 3, "ple_3_levels": 3 * 3 + 2}[name]
  assert len(gates) == expected_gates
  for w in gates:
    assert w.shape[0] == 4 and float(w.min()) >= 0
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)

  # Every parameter learns from a loss that touches all outputs.
  def loss(p):
    o = model.apply({"params": p}, x)
    return sum(jnp.sum(jnp.sin(v) + v ** 2) for v in o.values())
  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert max_abs(g) > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", ["mmoe", "cgc"])
def test_task_params_only_see_their_task(name):
  model = MODELS[name]()
  params = random_params(model)
  g = jax.jit(jax.grad(
      lambda p: jnp.sum(model.apply({"params": p}, X)["left"])))(params)
  for leaf in jax.tree.leaves([g["tasks"]["left"], g["shared"]]):
    assert max_abs(leaf) > 0
  for other in ("sum", "dense"):
    assert max_abs(g["tasks"][other]) == 0, other


def test_ple_cross_task_paths():
  # Two levels: another task's level-0 experts feed the shared gate of level 0,
  # hence every task; its head, level-1 experts and gates, and level-0 gate
  # (which only feeds its own level-1 experts) do not reach "left".
  model = moe.PLEModel(TASKS, num_levels=2, num_shared_experts=2,
                       num_task_experts=2, expert_hidden_sizes=(5,))
  params = random_params(model)
  g = jax.jit(jax.grad(
      lambda p: jnp.sum(model.apply({"params": p}, X)["left"])))(params)
  assert max_abs(g["shared"]["level_0"]["gate"]) > 0
  for other in ("sum", "dense"):
    t = g["tasks"][other]
    assert max_abs(t["level_0"]["experts"]) > 0
    assert max_abs(t["level_0"]["gate"]) == 0
    assert max_abs(t["level_1"]) == 0
    assert max_abs(t["head"]) == 0


@pytest.mark.parametrize("selected", [0, 2])
def test_mmoe_forced_gate_selects_one_expert(selected):
  model = moe.MMoEModel(TASKS, num_experts=3, expert_hidden_sizes=SIZES)
  params = random_params(model)
  params["tasks"]["left"]["gate"] = one_hot_gate(
      params["tasks"]["left"]["gate"], selected)
  out, state = apply(model, params, mutable=["intermediates"])
  (w,) = state["intermediates"]["tasks"]["left"]["gate_weights"]
  np.testing.assert_allclose(w, jax.nn.one_hot([selected] * 4, 3), atol=1e-6)
  # Head input = the selected expert's output, so (head is affine):
  f = expert(params["shared"]["experts"][f"expert_{selected}"], X)  # [B, 5]
  np.testing.assert_allclose(
      out["left"], head(params["tasks"]["left"]["head"], f, (10,)),
      rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("selected, group, index", [
    (1, "tasks", 1),   # candidates [own 0, own 1, shared 0, shared 1]
    (3, "shared", 1),
])
def test_cgc_forced_gate_selects_own_or_shared_expert(selected, group, index):
  model = moe.CGCModel(TASKS, num_shared_experts=2, num_task_experts=2,
                       expert_hidden_sizes=SIZES)
  params = random_params(model)
  params["tasks"]["sum"]["gate"] = one_hot_gate(
      params["tasks"]["sum"]["gate"], selected)
  out = apply(model, params)
  experts = (params["tasks"]["sum"] if group == "tasks" else
             params["shared"])["experts"]
  f = expert(experts[f"expert_{index}"], X)
  np.testing.assert_allclose(
      out["sum"], head(params["tasks"]["sum"]["head"], f, ()),
      rtol=1e-5, atol=1e-5)


def test_mmoe_with_one_expert_is_hard_sharing():
  model = moe.MMoEModel(TASKS, num_experts=1, expert_hidden_sizes=SIZES,
                        head_hidden_sizes=(4,))
  params = random_params(model)
  hard = hard_sharing.HardSharingModel(
      trunk=trunks.MLP(hidden_sizes=SIZES),
      heads={t: heads.Head(output_shape=s, hidden_sizes=(4,))
             for t, s in TASKS.items()})
  hard_params = {"shared": params["shared"]["experts"]["expert_0"],
                 "tasks": {t: params["tasks"][t]["head"] for t in TASKS}}
  out = apply(model, params)
  expected = apply(hard, hard_params)
  for t in TASKS:
    np.testing.assert_allclose(out[t], expected[t], rtol=1e-6, atol=1e-6)


def test_ple_with_one_level_is_cgc():
  kwargs = dict(num_shared_experts=2, num_task_experts=3,
                expert_hidden_sizes=SIZES, head_hidden_sizes=(4,))
  ple = moe.PLEModel(TASKS, num_levels=1,
                     input_trunk=trunks.MLP(hidden_sizes=(8,)), **kwargs)
  cgc = moe.CGCModel(TASKS, input_trunk=trunks.MLP(hidden_sizes=(8,)),
                     **kwargs)
  p = random_params(ple)
  assert set(p["shared"]) == {"trunk", "level_0"}  # no shared gate
  cgc_params = {
      "shared": {"trunk": p["shared"]["trunk"],
                 "experts": p["shared"]["level_0"]["experts"]},
      "tasks": {t: {**p["tasks"][t]["level_0"], "head": p["tasks"][t]["head"]}
                for t in TASKS}}
  # The mapped tree is exactly CGC's own layout.
  assert (jax.tree.structure(cgc_params) ==
          jax.tree.structure(random_params(cgc)))
  out, expected = apply(ple, p), apply(cgc, cgc_params)
  for t in TASKS:
    np.testing.assert_allclose(out[t], expected[t], rtol=1e-6, atol=1e-6)


def test_ple_two_levels_routing_by_hand():
  # Force every gate to one candidate and follow one path by hand:
  #   level 0: shared gate picks task "sum"'s expert 0 (candidates [left 0,
  #   left 1, sum 0, sum 1, dense 0, dense 1, shared 0, shared 1] -> 2);
  #   level 1: "left"'s gate picks shared expert 1 ([left 0, left 1, shared 0,
  #   shared 1] -> 3). So left = head(S^1_1(T^0_{sum,0}(x))).
  model = moe.PLEModel(TASKS, num_levels=2, num_shared_experts=2,
                       num_task_experts=2, expert_hidden_sizes=(5,))
  p = random_params(model)
  sg = p["shared"]["level_0"]["gate"]
  p["shared"]["level_0"]["gate"] = one_hot_gate(sg, 2)
  lg = p["tasks"]["left"]["level_1"]["gate"]
  p["tasks"]["left"]["level_1"]["gate"] = one_hot_gate(lg, 3)
  h_shared = expert(p["tasks"]["sum"]["level_0"]["experts"]["expert_0"], X,
                    (5,))
  h_left = expert(p["shared"]["level_1"]["experts"]["expert_1"], h_shared,
                  (5,))
  out = apply(model, p)
  np.testing.assert_allclose(
      out["left"], head(p["tasks"]["left"]["head"], h_left, (10,)),
      rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
  model = moe.MMoEModel(TASKS, num_experts=2, expert_hidden_sizes=(16,),
                        dropout_rate=0.5)
  variables = model.init(jax.random.PRNGKey(1), X)
  # Gate weights are not sown at init: the train state carries params only.
  assert set(variables) == {"params"}
  params = variables["params"]
  a = apply(model, params)
  b = apply(model, params, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
  np.testing.assert_array_equal(a["left"], apply(model, params)["left"])
  assert max_abs(a["left"] - b["left"]) > 1e-3


@pytest.mark.parametrize("make, match", [
    (lambda: moe.MMoEModel({}), "tasks_output_shapes is empty"),
    (lambda: moe.MMoEModel(TASKS, num_experts=0), "num_experts must be"),
    (lambda: moe.MMoEModel(TASKS, expert_hidden_sizes=()),
     "expert_hidden_sizes must be"),
    (lambda: moe.CGCModel(TASKS, num_shared_experts=0),
     "num_shared_experts must be"),
    (lambda: moe.CGCModel(TASKS, num_task_experts=-1),
     "num_task_experts must be"),
    (lambda: moe.PLEModel(TASKS, num_levels=0), "num_levels must be"),
    (lambda: moe.PLEModel({"a/b": ()}), "invalid task name"),
])
def test_bad_arguments_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make().init(jax.random.PRNGKey(0), X)
