"""Tests for mtl_jax.data.mixture."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from mtl_jax import tasks as tasks_lib
from mtl_jax.data import mixture
from mtl_jax.data import sources

NUM_CLASSES = 5
# Every source's ids start at its own offset, so a batch row's `id` input names
# both its source and its row: id = offset + source row.
OFFSETS = {"A": 0, "B": 1000, "C": 2000, "U": 3000}


def _tasks(*names):
  names = names or ("a", "b")
  made = {"a": tasks_lib.classification_task("a", NUM_CLASSES),
          "b": tasks_lib.regression_task("b"),
          "c": tasks_lib.classification_task("c", 3)}
  return tasks_lib.TaskSet([made[n] for n in names])


def _source(name, n, offset=None):
  """Rows with an `id`, a float input `x` and labels for tasks a and b."""
  offset = OFFSETS[name] if offset is None else offset
  ids = offset + np.arange(n, dtype=np.int64)
  return sources.ArraySource(name, {
      "id": ids,
      "x": np.stack([ids * 0.5, -ids * 1.0], axis=1).astype(np.float32),
      "ya": (ids % (NUM_CLASSES - 1) + 1).astype(np.int64),  # never 0
      "yb": ids.astype(np.float64) + 0.25,  # never 0
  })


def _converter(labels=("a", "b")):
  def convert(raw):
    n = len(raw["id"])
    out = {"inputs": {"id": raw["id"], "x": raw["x"]}, "labels": {},
           "masks": {}}
    for t in labels:
      out["labels"][t] = raw["y" + t]
      out["masks"][t] = np.ones(n, np.float32)
    return out
  return convert


def _component(name, n, labels=("a", "b"), **kwargs):
  return mixture.Component(name, _source(name, n), _converter(labels),
                           **kwargs)


def _abu(n_a=40, n_b=30, n_u=50):
  """A labels a, B labels b, U is an unlabelled pool."""
  return [_component("A", n_a, ("a",)), _component("B", n_b, ("b",)),
          _component("U", n_u, ())]


def _assert_same(x, y):
  xs, x_def = jax.tree_util.tree_flatten(x)
  ys, y_def = jax.tree_util.tree_flatten(y)
  assert x_def == y_def
  for u, v in zip(xs, ys):
    assert u.dtype == v.dtype
    np.testing.assert_array_equal(u, v)


def _concat(batches):
  return jax.tree.map(lambda *xs: np.concatenate(xs), *batches)


def _take(it, n):
  return [next(it) for _ in range(n)]


# --------------------------------------------------------------------------
# 1. mixing_rates.


def _close(got, want):
  assert list(got) == list(want)  # same names, same order
  np.testing.assert_allclose([got[k] for k in want], list(want.values()),
                             rtol=1e-12, atol=0)


def test_mixing_rates_closed_forms():
  sizes = {"x": 100, "y": 400}
  _close(mixture.mixing_rates(sizes), {"x": 0.2, "y": 0.8})
  _close(mixture.mixing_rates(sizes, "proportional"), {"x": 0.2, "y": 0.8})
  _close(mixture.mixing_rates(sizes, "uniform"), {"x": 0.5, "y": 0.5})
  # T=2: sqrt(100) : sqrt(400) = 10 : 20.
  _close(mixture.mixing_rates(sizes, "temperature", temperature=2.0),
         {"x": 1 / 3, "y": 2 / 3})
  # T=1 is proportional; a huge T is nearly uniform.
  _close(mixture.mixing_rates(sizes, "temperature", temperature=1.0),
         {"x": 0.2, "y": 0.8})
  huge = mixture.mixing_rates(sizes, "temperature", temperature=1e9)
  np.testing.assert_allclose(list(huge.values()), [0.5, 0.5], atol=1e-8)
  # Three components, keys in the order of `sizes`.
  _close(mixture.mixing_rates({"q": 1, "p": 8, "r": 27}, "temperature",
                              temperature=3.0),
         {"q": 1 / 6, "p": 2 / 6, "r": 3 / 6})


def test_mixing_rates_size_cap():
  sizes = {"x": 100, "y": 400, "z": 50}
  _close(mixture.mixing_rates(sizes, "proportional", size_cap=200),
         {"x": 100 / 350, "y": 200 / 350, "z": 50 / 350})
  _close(mixture.mixing_rates(sizes, "temperature", temperature=2.0,
                              size_cap=100),
         {"x": 10 / (20 + math.sqrt(50)), "y": 10 / (20 + math.sqrt(50)),
          "z": math.sqrt(50) / (20 + math.sqrt(50))})
  _close(mixture.mixing_rates(sizes, "uniform", size_cap=10),
         {"x": 1 / 3, "y": 1 / 3, "z": 1 / 3})


def test_mixing_rates_explicit_is_normalised():
  sizes = {"x": 100, "y": 400, "z": 7}
  _close(mixture.mixing_rates(sizes, "explicit",
                              rates={"z": 1.0, "x": 2.0, "y": 5.0}),
         {"x": 0.25, "y": 0.625, "z": 0.125})
  _close(mixture.mixing_rates(sizes, "explicit",
                              rates={"x": 0.0, "y": 3.0, "z": 1.0}),
         {"x": 0.0, "y": 0.75, "z": 0.25})
  got = mixture.mixing_rates(sizes, "explicit",
                             rates={"x": 0.1, "y": 0.7, "z": 0.2})
  assert math.isclose(sum(got.values()), 1.0, rel_tol=1e-15)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="softmax"), r"unknown mixing method 'softmax'.*temperature"),
    (dict(method="explicit", rates={"x": 1.0}), r"missing \['y'\]"),
    (dict(method="explicit"), r"missing \['x', 'y'\]"),
    (dict(method="explicit", rates={"x": 1.0, "y": 1.0, "w": 1.0}),
     r"unknown \['w'\]"),
    (dict(method="explicit", rates={"x": 1.0, "y": -0.5}), r">= 0.*-0\.5"),
    (dict(method="explicit", rates={"x": 1.0, "y": float("nan")}),
     r"finite"),
    (dict(method="explicit", rates={"x": 0.0, "y": 0.0}), r"not all 0"),
    (dict(method="temperature", temperature=0.0),
     r"temperature must be > 0, got 0\.0"),
    (dict(method="temperature", temperature=-1.0),
     r"temperature must be > 0, got -1\.0"),
    (dict(method="proportional", size_cap=0), r"size_cap must be >= 1"),
])
def test_mixing_rates_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mixture.mixing_rates({"x": 100, "y": 400}, **kwargs)


def test_mixing_rates_error_for_no_or_empty_components():
  with pytest.raises(ValueError, match="at least one component"):
    mixture.mixing_rates({})
  with pytest.raises(ValueError, match="not all 0"):
    mixture.mixing_rates({"x": 0, "y": 0})


# --------------------------------------------------------------------------
# 2. Rates are honoured.

RATES = {"A": 0.5, "B": 0.3, "C": 0.2}


def _rate_mixture(composition, batch_size=64, seed=0):
  comps = [_component("A", 50, ("a",)), _component("B", 30, ("b",)),
           _component("C", 20, ("a", "b"))]
  return mixture.Mixture(comps, _tasks(), batch_size=batch_size, seed=seed,
                         rates=RATES, composition=composition)


def _plan_counts(mix, steps):
  state = mix.initial_state()
  counts = []
  for _ in range(steps):
    comp, rows, next_state = mix.plan(state)
    assert comp.shape == rows.shape == (mix.batch_size,)
    counts.append(np.bincount(comp, minlength=len(mix.components)))
    np.testing.assert_array_equal(counts[-1], mix.counts(state["step"]))
    # The positions advance by exactly the counts.
    for i, c in enumerate(mix.components):
      assert (next_state["positions"][c.name] ==
              state["positions"][c.name] + counts[-1][i])
    state = next_state
  assert state["step"] == steps
  return np.array(counts)


def test_sampled_composition_honours_rates():
  steps, b = 400, 64
  counts = _plan_counts(_rate_mixture("sampled", b), steps)
  assert np.all(counts.sum(axis=1) == b)
  total = steps * b
  for i, p in enumerate(RATES.values()):
    sd = math.sqrt(total * p * (1 - p))
    assert abs(counts[:, i].sum() - total * p) < 4 * sd, (i, counts[:, i].sum())
    # Counts vary from batch to batch (multinomial, not fixed): the per-batch
    # variance is near the multinomial's B p (1 - p).
    var = counts[:, i].var()
    assert 0.6 * b * p * (1 - p) < var < 1.5 * b * p * (1 - p), (i, var)


def test_fixed_composition_honours_rates():
  steps, b = 400, 64
  counts = _plan_counts(_rate_mixture("fixed", b), steps)
  assert np.all(counts.sum(axis=1) == b)
  for i, p in enumerate(RATES.values()):
    expected = b * p
    assert set(counts[:, i]) <= {math.floor(expected), math.ceil(expected)}
    assert abs(counts[:, i].mean() - expected) < 0.01 * b, (i, expected)
  # 64 * 0.5 = 32 is an integer: exactly 32 every time. 19.2 and 12.8 are not:
  # both neighbours occur.
  assert set(counts[:, 0]) == {32}
  assert set(counts[:, 1]) == {19, 20}
  assert set(counts[:, 2]) == {12, 13}


def test_zero_rate_component_is_never_drawn():
  comps = [_component("A", 10, ("a",)), _component("B", 10, ("b",)),
           _component("U", 10, ())]
  for composition in mixture.COMPOSITIONS:
    mix = mixture.Mixture(comps, _tasks(), batch_size=16, seed=1,
                          rates={"A": 1.0, "B": 1.0, "U": 0.0},
                          composition=composition)
    counts = _plan_counts(mix, 50)
    assert counts[:, 2].sum() == 0
    assert counts[:, 0].sum() > 0 and counts[:, 1].sum() > 0


def test_default_rates_are_proportional():
  mix = mixture.Mixture(_abu(40, 30, 50), _tasks(), batch_size=8, seed=0)
  assert mix.rates == pytest.approx({"A": 40 / 120, "B": 30 / 120,
                                     "U": 50 / 120}, rel=1e-12)


# --------------------------------------------------------------------------
# 3. Determinism.


def _mixture(seed=0, batch_size=16, comps=None, **kwargs):
  return mixture.Mixture(_abu() if comps is None else comps, _tasks(),
                         batch_size=batch_size, seed=seed, **kwargs)


def test_same_seed_same_batches_other_seed_other_batches():
  for composition in mixture.COMPOSITIONS:
    first = _take(_mixture(5, composition=composition).iterator(), 20)
    second = _take(_mixture(5, composition=composition).iterator(), 20)
    for x, y in zip(first, second):
      _assert_same(x, y)
    other = _take(_mixture(6, composition=composition).iterator(), 20)
    ids = np.stack([b["inputs"]["id"] for b in first])
    other_ids = np.stack([b["inputs"]["id"] for b in other])
    assert ids.shape == other_ids.shape == (20, 16)
    # Almost every batch differs, not just one.
    assert np.sum(np.any(ids != other_ids, axis=1)) >= 18


def test_batch_is_a_pure_function_of_the_state():
  mix = _mixture(3)
  state = mix.initial_state()
  for _ in range(4):
    state = mix.batch(state)[1]
  before = json.dumps(state, sort_keys=True)
  one, next_one = mix.batch(state)
  two, next_two = mix.batch(state)
  _assert_same(one, two)
  assert next_one == next_two
  assert json.dumps(state, sort_keys=True) == before  # not mutated


# --------------------------------------------------------------------------
# 4. Exact resume.


@pytest.mark.parametrize("composition", mixture.COMPOSITIONS)
def test_resume_is_exact(composition):
  reference = _mixture(3, composition=composition).iterator()
  _take(reference, 7)
  state = reference.get_state()
  assert state["step"] == 7
  assert sum(state["positions"].values()) == 7 * 16
  state = json.loads(json.dumps(state))
  expected = _take(reference, 10)
  resumed = _mixture(3, composition=composition).iterator(state)
  got = _take(resumed, 10)
  for x, y in zip(expected, got):
    _assert_same(x, y)
  assert resumed.get_state() == reference.get_state()
  # The resumed iterator does not start over: its batches differ from the
  # first ones.
  start = _take(_mixture(3, composition=composition).iterator(), 1)[0]
  assert np.any(start["inputs"]["id"] != got[0]["inputs"]["id"])


@pytest.mark.parametrize("composition", mixture.COMPOSITIONS)
def test_state_at_a_step_is_the_uninterrupted_iterators(composition):
  it = _mixture(3, composition=composition).iterator()
  _take(it, 9)
  assert _mixture(3, composition=composition).state_at(9) == it.get_state()
  assert _mixture(3).state_at(0) == _mixture(3).initial_state()


def test_resume_on_a_different_number_of_hosts():
  reference = _mixture(4).iterator()
  _take(reference, 5)
  state = json.loads(json.dumps(reference.get_state()))
  expected = _take(reference, 3)
  hosts = [_mixture(4, num_host_shards=2, host_index=h).iterator(state)
           for h in range(2)]
  for step in range(3):
    _assert_same(expected[step], _concat([next(it) for it in hosts]))


def test_set_state_rejects_another_mixture():
  state = json.loads(json.dumps(_mixture(3).iterator().get_state()))
  with pytest.raises(ValueError, match=r"differs.*'seed': \(3, 4\)"):
    _mixture(4).iterator(state)
  with pytest.raises(ValueError, match=r"differs.*'batch_size': \(16, 32\)"):
    _mixture(3, batch_size=32).iterator(state)
  with pytest.raises(ValueError, match=r"differs.*'composition'"):
    _mixture(3, composition="fixed").iterator(state)
  with pytest.raises(ValueError, match=r"differs.*'components'"):
    _mixture(3, comps=_abu(41, 30, 50)).iterator(state)
  with pytest.raises(ValueError, match=r"differs.*'rates'"):
    _mixture(3, rates={"A": 1, "B": 1, "U": 1}).iterator(state)
  with pytest.raises(ValueError, match="not a mixture iterator state"):
    _mixture(3).iterator({"step": 0, "positions": {}})
  it = _mixture(3).iterator()
  it.set_state(state)  # its own state is fine
  assert it.get_state()["step"] == 0


# --------------------------------------------------------------------------
# 5. Epoch coverage.


def _ids(batch):
  return batch["inputs"]["id"]


def test_single_component_epochs_visit_every_row_once():
  n, b = 48, 16
  mix = mixture.Mixture([_component("A", n, ("a",))], _tasks("a"),
                        batch_size=b, seed=2, composition="fixed")
  it = mix.iterator()
  epochs = []
  for _ in range(3):
    batches = [np.sort(_ids(x)) for x in _take(it, n // b)]
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)),
                                  np.arange(n))
    epochs.append(np.stack(batches))
  # Each epoch is a fresh permutation: its batches hold other rows.
  assert np.any(epochs[0] != epochs[1]) and np.any(epochs[1] != epochs[2])


def test_epochs_walk_a_components_indices():
  # A subset of the source's rows, one of them listed twice.
  indices = np.array([3, 9, 9, 0, 7, 5, 11, 2])
  comp = _component("A", 12, ("a",), indices=indices)
  mix = mixture.Mixture([comp], _tasks("a"), batch_size=4, seed=0,
                        composition="fixed")
  it = mix.iterator()
  for _ in range(3):
    ids = np.concatenate([_ids(x) for x in _take(it, 2)])
    np.testing.assert_array_equal(np.sort(ids), np.sort(indices))


def test_two_components_aligned_epochs_are_permutations():
  # Fixed composition, counts 4 and 12 per batch: both epochs end after 5.
  a = _component("A", 40, ("a",), indices=np.arange(1, 40, 2))  # 20 rows
  b = _component("B", 60, ("b",))
  mix = mixture.Mixture([a, b], _tasks(), batch_size=16, seed=9,
                        rates={"A": 0.25, "B": 0.75}, composition="fixed")
  state = mix.initial_state()
  for _ in range(3):
    drawn = {0: [], 1: []}
    for _ in range(5):
      comp, rows, state = mix.plan(state)
      for i in (0, 1):
        drawn[i].append(rows[comp == i])
    np.testing.assert_array_equal(np.sort(np.concatenate(drawn[0])),
                                  np.arange(1, 40, 2))
    np.testing.assert_array_equal(np.sort(np.concatenate(drawn[1])),
                                  np.arange(60))


def test_two_components_first_draws_are_permutations():
  # Sampled composition: epoch ends fall inside batches. The draws of the
  # batches that end before a component's first epoch is complete are distinct,
  # and the draws up to the batch that completes it hold the first epoch (every
  # index once) plus the start of the second (some indices a second time).
  a = _component("A", 40, ("a",), indices=np.arange(0, 40, 2))  # 20 rows
  b = _component("B", 33, ("b",))
  mix = mixture.Mixture([a, b], _tasks(), batch_size=8, seed=4,
                        rates={"A": 0.4, "B": 0.6})
  state = mix.initial_state()
  drawn = {0: [], 1: []}
  done = set()
  for _ in range(100):
    comp, rows, state = mix.plan(state)
    for i, c in enumerate(mix.components):
      if i in done:
        continue
      drawn[i].extend(rows[comp == i].tolist())
      n = c.num_rows
      if len(drawn[i]) < n:
        assert len(set(drawn[i])) == len(drawn[i])
        assert set(drawn[i]) <= set(c.indices.tolist())
      else:
        values, counts = np.unique(drawn[i], return_counts=True)
        np.testing.assert_array_equal(values, np.sort(c.indices))
        assert set(counts) <= {1, 2}
        assert np.sum(counts == 2) == len(drawn[i]) - n < n
        done.add(i)
    if len(done) == 2:
      break
  assert done == {0, 1}


def test_component_order_does_not_depend_on_other_components():
  # A's rows per batch, with fixed composition and A alone at rate 1, are the
  # same whatever other (zero-rate) components the mixture has.
  a = _component("A", 24, ("a",))
  alone = mixture.Mixture([a], _tasks("a"), batch_size=8, seed=1,
                          composition="fixed")
  with_more = mixture.Mixture(
      [_component("U", 10, ()), a, _component("B", 10, ("a",))], _tasks("a"),
      batch_size=8, seed=1, composition="fixed",
      rates={"U": 0.0, "A": 1.0, "B": 0.0})
  s1, s2 = alone.initial_state(), with_more.initial_state()
  for _ in range(7):
    (c1, r1, s1), (c2, r2, s2) = alone.plan(s1), with_more.plan(s2)
    assert np.all(c1 == 0) and np.all(c2 == 1)
    np.testing.assert_array_equal(np.sort(r1), np.sort(r2))


# --------------------------------------------------------------------------
# 6. Host shards.


@pytest.mark.parametrize("composition", mixture.COMPOSITIONS)
def test_host_shards_partition_the_global_batch(composition):
  hosts = 4
  single = _mixture(11, composition=composition)
  global_it = single.iterator()
  host_its = [_mixture(11, composition=composition, num_host_shards=hosts,
                       host_index=h).iterator() for h in range(hosts)]
  assert host_its[0].mixture.per_host_batch_size == 4
  state = single.initial_state()
  for _ in range(6):
    expected = next(global_it)
    comp, rows, state = single.plan(state)
    parts = [next(it) for it in host_its]
    for h, part in enumerate(parts):
      slots = slice(4 * h, 4 * (h + 1))
      assert part["inputs"]["id"].shape == (4,)
      _assert_same(part, jax.tree.map(lambda x, s=slots: x[s], expected))
      want_ids = np.array([OFFSETS[single.components[c].name] + r
                           for c, r in zip(comp[slots], rows[slots])])
      np.testing.assert_array_equal(part["inputs"]["id"], want_ids)
    _assert_same(_concat(parts), expected)
  # Hosts share one state.
  states = [it.get_state() for it in host_its]
  assert all(s == global_it.get_state() for s in states)


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=10, num_host_shards=4), r"10 is not divisible by.*4"),
    (dict(num_host_shards=4, host_index=4), r"host_index must be in \[0, 4\)"),
    (dict(num_host_shards=0), r"num_host_shards must be >= 1"),
    (dict(batch_size=0), r"batch_size must be >= 1"),
    (dict(seed=-1), r"seed must be a non-negative"),
    (dict(composition="stratified"), r"unknown composition 'stratified'"),
])
def test_mixture_argument_errors(kwargs, match):
  kwargs = {"batch_size": 16, "seed": 0, **kwargs}
  with pytest.raises(ValueError, match=match):
    mixture.Mixture(_abu(), _tasks(), **kwargs)


# --------------------------------------------------------------------------
# 7. Masks and labels match the source.


def _check_rows(batch):
  """Asserts every row's masks, labels and inputs match the source of its id."""
  ids = batch["inputs"]["id"]
  from_a = ids < OFFSETS["B"]
  from_b = (ids >= OFFSETS["B"]) & (ids < OFFSETS["C"])
  from_u = ids >= OFFSETS["U"]
  assert np.all(from_a | from_b | from_u)
  assert batch["masks"]["a"].dtype == batch["masks"]["b"].dtype == np.float32
  assert batch["labels"]["a"].dtype == np.int32
  assert batch["labels"]["b"].dtype == np.float32
  np.testing.assert_array_equal(batch["masks"]["a"], from_a.astype(np.float32))
  np.testing.assert_array_equal(batch["masks"]["b"], from_b.astype(np.float32))
  np.testing.assert_array_equal(batch["labels"]["a"],
                                np.where(from_a, ids % 4 + 1, 0))
  np.testing.assert_array_equal(batch["labels"]["b"],
                                np.where(from_b, ids + 0.25, 0.0))
  np.testing.assert_array_equal(
      batch["inputs"]["x"], np.stack([ids * 0.5, -ids * 1.0], axis=1))
  return from_a.sum(), from_b.sum(), from_u.sum()


def test_masks_and_labels_match_the_source():
  mix = _mixture(0, batch_size=32)
  state = mix.initial_state()
  seen = np.zeros(3, np.int64)
  for _ in range(30):
    comp, _, _ = mix.plan(state)
    batch, state = mix.batch(state)
    seen += _check_rows(batch)
    # The id-derived source agrees with plan's component of every slot.
    ids = batch["inputs"]["id"]
    np.testing.assert_array_equal(comp, np.searchsorted(
        [OFFSETS["B"], OFFSETS["U"]], ids, side="right"))
  assert np.all(seen > 100)


def test_label_keep_zeroes_masks_and_labels():
  keep = np.zeros(40, bool)
  keep[::3] = True
  comps = [_component("A", 40, ("a",), label_keep={"a": keep}),
           _component("B", 30, ("b",))]
  mix = mixture.Mixture(comps, _tasks(), batch_size=32, seed=0)
  it = mix.iterator()
  for batch in _take(it, 10):
    ids = batch["inputs"]["id"]
    kept = (ids < OFFSETS["B"]) & keep[np.minimum(ids, 39)]
    np.testing.assert_array_equal(batch["masks"]["a"], kept)
    np.testing.assert_array_equal(batch["labels"]["a"],
                                  np.where(kept, ids % 4 + 1, 0))


# --------------------------------------------------------------------------
# 8. Label fractions.


def test_label_fraction_masks_exact_counts():
  n = 101
  masks = mixture.label_fraction_masks(
      n, {"a": 0.3, "b": 0.5, "c": 0.0, "d": 1.0, "e": 0.29}, seed=0)
  assert list(masks) == ["a", "b", "c", "d", "e"]
  for mask in masks.values():
    assert mask.dtype == np.float32 and mask.shape == (n,)
    assert set(np.unique(mask)) <= {0.0, 1.0}
  # round(30.3) = 30, round(50.5) = 50 (half to even), round(29.29) = 29.
  assert [int(m.sum()) for m in masks.values()] == [30, 50, 0, 101, 29]
  assert mixture.label_fraction_masks(7, {"a": 0.5}, 0)["a"].sum() == 4  # 3.5
  assert mixture.label_fraction_masks(5, {"a": 0.5}, 0)["a"].sum() == 2  # 2.5
  assert mixture.label_fraction_masks(0, {"a": 0.5}, 0)["a"].shape == (0,)


def test_label_fraction_masks_deterministic_and_independent():
  fractions = {"a": 0.3, "b": 0.3}
  first = mixture.label_fraction_masks(200, fractions, seed=3)
  _assert_same(first, mixture.label_fraction_masks(200, fractions, seed=3))
  other_seed = mixture.label_fraction_masks(200, fractions, seed=4)
  assert np.any(first["a"] != other_seed["a"])
  # Different tasks get different subsets.
  assert np.any(first["a"] != first["b"])
  # A task's subset ignores the other tasks.
  _assert_same(first["a"],
               mixture.label_fraction_masks(200, {"a": 0.3}, seed=3)["a"])
  _assert_same(first["a"], mixture.label_fraction_masks(
      200, {"z": 0.9, "b": 1.0, "a": 0.3}, seed=3)["a"])


def test_label_fraction_masks_nested():
  fractions = np.linspace(0, 1, 11)
  masks = [mixture.label_fraction_masks(97, {"a": f}, seed=1)["a"]
           for f in fractions]
  for small, large in zip(masks, masks[1:]):
    assert np.all(small <= large)
    assert large.sum() > small.sum()


@pytest.mark.parametrize("kwargs,match", [
    (dict(fractions={"a": -0.1}), r"task 'a' must be in \[0, 1\], got -0\.1"),
    (dict(fractions={"ok": 0.5, "a": 1.5}), r"task 'a' must be in \[0, 1\]"),
    (dict(fractions={"a": float("nan")}), r"task 'a' must be in \[0, 1\]"),
    (dict(num_examples=-1), r"num_examples must be >= 0"),
    (dict(seed=-2), r"seed must be a non-negative"),
])
def test_label_fraction_masks_errors(kwargs, match):
  kwargs = {"num_examples": 10, "fractions": {"a": 0.5}, "seed": 0, **kwargs}
  with pytest.raises(ValueError, match=match):
    mixture.label_fraction_masks(**kwargs)


def test_unlabelled_indices():
  got = mixture.unlabelled_indices({"a": np.array([1, 0, 0, 1, 0.0]),
                                    "b": np.array([0, 0, 1, 1, 0.0])})
  assert got.dtype == np.int64
  np.testing.assert_array_equal(got, [1, 4])
  np.testing.assert_array_equal(
      mixture.unlabelled_indices({"a": np.ones(3)}), np.zeros(0))
  with pytest.raises(ValueError, match="at least one task mask"):
    mixture.unlabelled_indices({})
  with pytest.raises(ValueError, match="different lengths"):
    mixture.unlabelled_indices({"a": np.ones(3), "b": np.ones(4)})


def test_split_by_label_fraction():
  n, seed = 60, 7
  fractions = {"a": 0.25, "b": 0.5, "zzz": 0.3}  # zzz: not labelled, ignored
  comp = _component("A", n, ("a", "b"))
  labelled, unlabelled = mixture.split_by_label_fraction(comp, fractions, seed)
  masks = mixture.label_fraction_masks(n, {"a": 0.25, "b": 0.5}, seed)
  assert set(labelled.label_keep) == {"a", "b"}
  for t, count in (("a", 15), ("b", 30)):
    np.testing.assert_array_equal(labelled.label_keep[t], masks[t] > 0)
    assert labelled.label_keep[t][labelled.indices].sum() == count
  assert labelled.name == "A"
  assert unlabelled.name == "A/unlabelled"
  np.testing.assert_array_equal(unlabelled.indices,
                                mixture.unlabelled_indices(masks))
  # Unlabelled rows keep no label; labelled rows keep at least one.
  keep_any = labelled.label_keep["a"] | labelled.label_keep["b"]
  assert not np.any(keep_any[unlabelled.indices])
  assert np.all(keep_any[labelled.indices])
  # Together they partition the rows.
  both = np.concatenate([labelled.indices, unlabelled.indices])
  np.testing.assert_array_equal(np.sort(both), np.arange(n))
  assert 0 < unlabelled.num_rows < n
  # The unlabelled component gives the same inputs and no labels.
  part = unlabelled.convert(unlabelled.source.read(unlabelled.indices[:3]))
  assert part["labels"] == {} and part["masks"] == {}
  np.testing.assert_array_equal(part["inputs"]["id"], unlabelled.indices[:3])
  assert mixture.labelled_tasks(unlabelled) == ()
  assert mixture.labelled_tasks(labelled) == ("a", "b")


def test_split_by_label_fraction_unnamed_tasks_keep_all_labels():
  comp = _component("A", 50, ("a", "b"))
  labelled, unlabelled = mixture.split_by_label_fraction(comp, {"a": 0.1}, 0)
  assert labelled.label_keep["a"].sum() == 5
  assert labelled.label_keep["b"].all()
  assert labelled.num_rows == 50 and unlabelled.num_rows == 0


def test_split_by_label_fraction_of_a_subset():
  rows = np.arange(0, 80, 2)
  comp = _component("A", 80, ("a",), indices=rows)
  labelled, unlabelled = mixture.split_by_label_fraction(comp, {"a": 0.5}, 1)
  keep = mixture.label_fraction_masks(80, {"a": 0.5}, 1)["a"] > 0
  np.testing.assert_array_equal(labelled.indices, rows[keep[rows]])
  np.testing.assert_array_equal(unlabelled.indices, rows[~keep[rows]])
  with pytest.raises(ValueError, match=r"task 'a' must be in \[0, 1\]"):
    mixture.split_by_label_fraction(comp, {"a": 1.5}, 1)


def test_split_by_label_fraction_respects_existing_label_keep():
  n = 60
  prior = np.arange(n) % 3 == 0
  comp = _component("A", n, ("a", "b"), label_keep={"a": prior})
  labelled, unlabelled = mixture.split_by_label_fraction(
      comp, {"a": 0.5, "b": 0.0}, 2)
  chosen = mixture.label_fraction_masks(n, {"a": 0.5}, 2)["a"] > 0
  np.testing.assert_array_equal(labelled.label_keep["a"], prior & chosen)
  assert not labelled.label_keep["b"].any()
  np.testing.assert_array_equal(labelled.indices,
                                np.flatnonzero(prior & chosen))
  np.testing.assert_array_equal(unlabelled.indices,
                                np.flatnonzero(~(prior & chosen)))


# --------------------------------------------------------------------------
# 9. Label fractions in the stream.


def test_label_fractions_are_honoured_in_the_stream():
  n, fractions = 60, {"a": 0.25, "b": 0.5}
  labelled, unlabelled = mixture.split_by_label_fraction(
      _component("A", n, ("a", "b")), fractions, seed=5)
  n_l = labelled.num_rows
  for composition in mixture.COMPOSITIONS:
    # Batch = epoch: with one component, every batch is one whole epoch.
    mix = mixture.Mixture([labelled], _tasks(), batch_size=n_l, seed=2,
                          composition=composition)
    for batch in _take(mix.iterator(), 3):
      assert batch["masks"]["a"].sum() == 15  # round(0.25 * 60)
      assert batch["masks"]["b"].sum() == 30  # round(0.5 * 60)
      ids = batch["inputs"]["id"]
      np.testing.assert_array_equal(batch["masks"]["a"],
                                    labelled.label_keep["a"][ids])
      assert np.all(batch["labels"]["a"][batch["masks"]["a"] == 0] == 0)
      assert np.all(batch["labels"]["b"][batch["masks"]["b"] == 0] == 0)
  # An epoch in smaller batches, with the unlabelled rows mixed in at rate 0.
  mix = mixture.Mixture([labelled, unlabelled], _tasks(), batch_size=1,
                        seed=0, rates={"A": 1.0, "A/unlabelled": 0.0})
  epoch = _concat(_take(mix.iterator(), n_l))
  assert epoch["masks"]["a"].sum() == 15
  assert epoch["masks"]["b"].sum() == 30


# --------------------------------------------------------------------------
# 10. Validation errors.


def _with_convert(name, n, convert):
  return mixture.Component(name, _source(name, n), convert)


def test_input_spec_mismatch_names_the_source():
  def wider(raw):
    out = _converter(("b",))(raw)
    out["inputs"]["x"] = np.concatenate([raw["x"], raw["x"][:, :1]], axis=1)
    return out

  def float64(raw):
    out = _converter(("b",))(raw)
    out["inputs"]["x"] = raw["x"].astype(np.float64)
    return out

  a = _component("A", 10, ("a",))
  for convert in (wider, float64):
    with pytest.raises(ValueError, match=r"source 'B'.*'inputs'.*from source "
                       r"'A'"):
      mixture.Mixture([a, _with_convert("B", 10, convert)], _tasks(),
                      batch_size=4, seed=0)


def test_class_label_out_of_range_names_source_and_task():
  def bad(raw):
    out = _converter(("a",))(raw)
    out["labels"]["a"] = np.full(len(raw["id"]), NUM_CLASSES)
    return out

  with pytest.raises(ValueError, match=r"source 'B'.*task 'a'.*out of range"):
    mixture.Mixture([_component("A", 10, ("a", "b")),
                     _with_convert("B", 10, bad)], _tasks(), batch_size=4,
                    seed=0)

  # A bad label beyond the rows checked at construction is caught when read.
  def late(raw):
    out = _converter(("a", "b"))(raw)
    out["labels"]["a"] = np.where(raw["id"] == 1005, -1, raw["ya"])
    return out

  mix = mixture.Mixture([_with_convert("B", 10, late)], _tasks(),
                        batch_size=10, seed=0, composition="fixed")
  with pytest.raises(ValueError, match=r"source 'B'.*task 'a'.*-1"):
    next(mix.iterator())


def test_unknown_task_labels_name_the_source():
  with pytest.raises(ValueError,
                     match=r"source 'B'.*unknown task\(s\) \['b'\]"):
    mixture.Mixture([_component("A", 10, ("a",)),
                     _component("B", 10, ("a", "b"))], _tasks("a"),
                    batch_size=4, seed=0)


def test_task_labelled_by_no_component():
  with pytest.raises(ValueError, match=r"\['c'\] are labelled by no component"
                     r".*A: \['a'\].*U: none"):
    mixture.Mixture([_component("A", 10, ("a",)), _component("B", 10, ("b",)),
                     _component("U", 10, ())], _tasks("a", "b", "c"),
                    batch_size=4, seed=0)


def test_convert_must_return_inputs_labels_masks():
  def missing_masks(raw):
    out = _converter(("a",))(raw)
    del out["masks"]
    return out

  def extra_key(raw):
    return {**_converter(("a",))(raw), "weights": None}

  def mismatched(raw):
    out = _converter(("a", "b"))(raw)
    del out["masks"]["b"]
    return out

  for convert, match in (
      (missing_masks, r"source 'A'.*convert must return.*\['inputs', "
       r"'labels'\]"),
      (extra_key, r"source 'A'.*convert must return"),
      (lambda raw: raw["x"], r"source 'A'.*convert must return"),
      (mismatched, r"source 'A'.*labels are given for \['a', 'b'\] but masks "
       r"for \['a'\]")):
    with pytest.raises(ValueError, match=match):
      mixture.Mixture([_with_convert("A", 10, convert)], _tasks(),
                      batch_size=4, seed=0)


def test_component_set_errors():
  with pytest.raises(ValueError, match=r"unique, got \['A', 'B', 'A'\]"):
    mixture.Mixture([_component("A", 10), _component("B", 10),
                     _component("A", 10)], _tasks(), batch_size=4, seed=0)
  empty = _component("U", 10, (), indices=np.zeros(0, np.int64))
  with pytest.raises(ValueError, match=r"\['U'\] have a positive rate but no "
                     "rows"):
    mixture.Mixture([_component("A", 10), empty], _tasks(), batch_size=4,
                    seed=0, rates={"A": 0.5, "U": 0.5})
  # At rate 0 (and by default, proportional to 0 rows) an empty one is fine.
  mix = mixture.Mixture([_component("A", 10), empty], _tasks(), batch_size=4,
                        seed=0)
  assert mix.rates == {"A": 1.0, "U": 0.0}
  with pytest.raises(ValueError, match="every component is empty"):
    mixture.Mixture([empty], _tasks(), batch_size=4, seed=0)
  with pytest.raises(ValueError, match="at least one component"):
    mixture.Mixture([], _tasks(), batch_size=4, seed=0)
  with pytest.raises(ValueError, match="non-empty name"):
    mixture.Component("", _source("A", 10), _converter())


def test_label_keep_errors():
  with pytest.raises(ValueError, match=r"'A'.*label_keep\['a'\] has shape "
                     r"\(9,\), expected \(10,\)"):
    _component("A", 10, ("a",), label_keep={"a": np.ones(9)})
  with pytest.raises(ValueError, match=r"'A'.*label_keep names unknown "
                     r"task\(s\) \['q'\]"):
    mixture.Mixture([_component("A", 10, label_keep={"q": np.ones(10)})],
                    _tasks(), batch_size=4, seed=0)
  with pytest.raises(ValueError, match=r"source 'A'.*label_keep names "
                     r"task\(s\) \['b'\].*does not label"):
    mixture.Mixture([_component("A", 10, ("a",), label_keep={"b": np.ones(10)}),
                     _component("B", 10)], _tasks(), batch_size=4, seed=0)


def test_mask_shape_must_agree_across_sources():
  def per_token(dense):
    def convert(raw):
      n = len(raw["id"])
      mask = np.ones((n, 3) if dense else (n,), np.float32)
      return {"inputs": {"id": raw["id"], "x": raw["x"]},
              "labels": {"c": np.ones((n, 3), np.int64)}, "masks": {"c": mask}}
    return convert

  tasks = tasks_lib.TaskSet([tasks_lib.classification_task("c", 3,
                                                           positions=(3,))])
  mix = mixture.Mixture([_with_convert("A", 10, per_token(False)),
                         _with_convert("B", 10, per_token(False))], tasks,
                        batch_size=4, seed=0)
  assert next(mix.iterator())["masks"]["c"].shape == (4,)
  with pytest.raises(ValueError, match=r"source 'B'.*task 'c'.*mask shape "
                     r"\(3,\), but another source gives \(\)"):
    mixture.Mixture([_with_convert("A", 10, per_token(False)),
                     _with_convert("B", 10, per_token(True))], tasks,
                    batch_size=4, seed=0)


# --------------------------------------------------------------------------
# 11. EvalStream.


def _eval_components():
  return [_component("A", 10, ("a",)),
          _component("B", 12, ("b",), indices=np.array([6, 0, 3, 11, 2, 9,
                                                          1])),
          _component("U", 5, ())]


def test_eval_stream_covers_every_row_once():
  stream = mixture.EvalStream(_eval_components(), _tasks(), batch_size=8)
  assert stream.num_examples == 22
  assert len(stream) == 3
  batches = list(stream)
  assert len(batches) == 3
  for batch in batches:
    assert batch["inputs"]["id"].shape == (8,)
  whole = _concat(batches)
  want = np.concatenate([np.arange(10), 1000 + np.array([6, 0, 3, 11, 2, 9, 1]),
                         3000 + np.arange(5)])
  np.testing.assert_array_equal(whole["inputs"]["id"][:22], want)
  _check_rows(jax.tree.map(lambda x: x[:22], whole))
  assert whole["masks"]["a"].sum() == 10
  assert whole["masks"]["b"].sum() == 7
  # The last batch: 6 real rows, then 2 padding rows of zeros with mask 0.
  pad = jax.tree.map(lambda x: x[22:], whole)
  for leaf in jax.tree.leaves(pad):
    assert leaf.shape[0] == 2
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


def test_eval_stream_host_shards_and_repeat():
  comps = _eval_components()
  single = list(mixture.EvalStream(comps, _tasks(), batch_size=8))
  for hosts in (2, 4):
    streams = [mixture.EvalStream(comps, _tasks(), batch_size=8,
                                  num_host_shards=hosts, host_index=h)
               for h in range(hosts)]
    per_host = [list(s) for s in streams]
    assert [len(p) for p in per_host] == [3] * hosts
    for step in range(3):
      for h in range(hosts):
        k = 8 // hosts
        _assert_same(per_host[h][step],
                     jax.tree.map(lambda x, h=h, k=k: x[h * k:(h + 1) * k],
                                  single[step]))
      _assert_same(_concat([p[step] for p in per_host]), single[step])
    # Iterating again gives the same batches.
    again = list(streams[-1])
    for x, y in zip(per_host[-1], again):
      _assert_same(x, y)
  # The last host of 4 gets only padding in the last batch.
  last = list(mixture.EvalStream(comps, _tasks(), batch_size=8,
                                 num_host_shards=4, host_index=3))[-1]
  assert last["masks"]["a"].sum() == last["masks"]["b"].sum() == 0


# --------------------------------------------------------------------------
# 12. restrict.


def test_restrict_drops_other_tasks():
  keep = np.arange(20) % 2 == 0
  comp = _component("A", 20, ("a", "b"),
                    label_keep={"a": keep, "b": np.ones(20)})
  for unrestricted in (comp, _component("A", 20, ("a", "b"))):
    with pytest.raises(ValueError, match=r"'A'.*unknown task\(s\) \['b'\]"):
      mixture.Mixture([unrestricted], _tasks("a"), batch_size=4, seed=0)
  restricted = mixture.restrict(comp, ["a", "c"])
  assert restricted.name == "A"
  assert set(restricted.label_keep) == {"a"}
  np.testing.assert_array_equal(restricted.indices, comp.indices)
  assert mixture.labelled_tasks(restricted) == ("a",)
  part = restricted.convert(restricted.source.read(np.array([1, 2])))
  assert set(part["labels"]) == set(part["masks"]) == {"a"}
  mix = mixture.Mixture([restricted], _tasks("a"), batch_size=20, seed=0,
                        composition="fixed")
  batch = next(mix.iterator())
  assert set(batch["labels"]) == set(batch["masks"]) == {"a"}
  ids = batch["inputs"]["id"]
  np.testing.assert_array_equal(batch["masks"]["a"], keep[ids])
  # The original component is unchanged.
  assert set(comp.label_keep) == {"a", "b"}
  assert set(comp.convert(comp.source.read(np.array([1])))["labels"]) == {
      "a", "b"}


def test_batch_slots_are_shuffled():
  mix = _mixture(0, batch_size=32)
  state = mix.initial_state()
  unsorted = 0
  for _ in range(20):
    comp, rows, state = mix.plan(state)
    unsorted += np.any(np.diff(comp) < 0)
  assert unsorted == 20


def test_nan_in_inputs_names_the_source_when_its_batch_is_read():
  tasks = tasks_lib.TaskSet([tasks_lib.regression_task("y")])
  x = np.zeros((20, 3), np.float32)
  x[13, 1] = np.nan  # not among the rows checked at construction
  arrays = {"inputs": x, "labels": {"y": np.zeros(20, np.float32)},
            "masks": {"y": np.ones(20, np.float32)}}
  mix = mixture.Mixture([mixture.array_component("scans", arrays)], tasks,
                        batch_size=20, seed=0)
  with pytest.raises(ValueError, match=r"source 'scans'.*NaN or Inf"):
    next(mix.iterator())
