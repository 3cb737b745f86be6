"""Tests of the Tagger trunk and per-token tasks through the hard-sharing model."""

import functools

import jax
import numpy as np
import optax
import pytest

from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting
from mtl_jax.data import text as text_data
from mtl_jax.models import build, heads, text
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib

B, L, V = 3, 6, 11
TASKS = tasks_lib.TaskSet([
    tasks_lib.classification_task("pos", 5, positions=(L,)),
    tasks_lib.classification_task("ner", 3, positions=(L,), weight=0.5),
])
# Lengths 6, 4, 2: row 0 is full, rows 1 and 2 end in padding.
IDS = np.array([[3, 4, 5, 6, 7, 8],
                [2, 9, 10, 4, 0, 0],
                [5, 5, 0, 0, 0, 0]], np.int32)


def _tagger(**kwargs):
  return build.make_trunk("tagger", vocab_size=V, embed_dim=8, num_layers=2,
                          kernel_size=3, feature_size=7, **kwargs)


def _apply(module):
  """A jitted `module.apply` (one compile instead of many eager ops)."""
  return jax.jit(module.apply, static_argnames="train")


@functools.lru_cache(maxsize=None)
def _tagger_apply(dropout_rate=0.0):
  """A jitted `Tagger.apply`, shared by the tests (compiles once per shape)."""
  return _apply(_tagger(dropout_rate=dropout_rate))


@pytest.fixture(scope="module")
def tagger_params():
  # Away from the zero init (LayerNorm and conv biases), so that any leak
  # through padding positions would show.
  params = jax.jit(_tagger().init)(jax.random.PRNGKey(0), IDS)["params"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return jax.tree.unflatten(treedef, [
      l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def test_tagger_output_shape_and_zero_padding(tagger_params):
  assert "features" in tagger_params
  out = _tagger_apply()({"params": tagger_params}, IDS)
  assert out.shape == (B, L, 7)
  np.testing.assert_array_equal(out[IDS == 0], 0.0)
  assert build.make_trunk("tagger", vocab_size=V).feature_size == 128
  assert text.PAD_ID == text_data.PAD_ID == 0
  with pytest.raises(ValueError, match=r"token ids \[B, L\]"):
    _tagger().init(jax.random.PRNGKey(0), IDS.astype(np.float32))


@pytest.mark.parametrize("dropout_rate", [0.0, 0.3])
def test_padding_content_does_not_influence_real_tokens(tagger_params,
                                                        dropout_rate):
  # Padding is id 0, so "what is at a padded position" is the padding
  # embedding: set it to large values and the real tokens must not notice.
  apply = _tagger_apply(dropout_rate)
  rngs = {"dropout": jax.random.PRNGKey(2)}
  train = bool(dropout_rate)
  base = apply({"params": tagger_params}, IDS, train=train, rngs=rngs)
  emb = tagger_params["Embed_0"]["embedding"]
  loud = dict(tagger_params, Embed_0={"embedding": emb.at[0].set(100.0)})
  other = apply({"params": loud}, IDS, train=train, rngs=rngs)
  real = IDS != 0
  np.testing.assert_allclose(other[real], base[real], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(other[~real], 0.0)


def test_padding_length_does_not_influence_real_tokens(tagger_params):
  # The same real tokens with a longer padding tail give the same features:
  # real tokens next to padding (rows 1 and 2) see nothing of it.
  apply = _tagger_apply()
  base = apply({"params": tagger_params}, IDS)
  longer = np.concatenate([IDS, np.zeros((B, 4), np.int32)], axis=1)
  out = apply({"params": tagger_params}, longer)
  np.testing.assert_allclose(out[:, :L], base, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[:, L:], 0.0)
  # Truncating row 0 to its first 2 tokens changes its features (neighbours
  # matter), but rows 1 and 2 are untouched: no leak across the batch either.
  cut = IDS.copy()
  cut[0, 2:] = 0
  out = apply({"params": tagger_params}, cut)
  np.testing.assert_allclose(out[1:], base[1:], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out[0, 1], base[0, 1])


def test_head_position_wise():
  features = jax.random.normal(jax.random.PRNGKey(0), (B, L, 4))
  head = heads.Head(output_shape=(L, 5), hidden_sizes=(3,))
  params = jax.jit(head.init)(jax.random.PRNGKey(1), features)["params"]
  assert params["Dense_1"]["kernel"].shape == (3, 5)  # shared over positions
  out = _apply(head)({"params": params}, features)
  assert out.shape == (B, L, 5)
  # Each position's output is the same head applied to that position alone.
  alone = _apply(heads.Head(output_shape=(1, 5), hidden_sizes=(3,)))(
      {"params": params}, features[:, 2:3])
  np.testing.assert_allclose(out[:, 2:3], alone, rtol=1e-6)
  with pytest.raises(ValueError, match=r"does not start with"):
    heads.Head(output_shape=(L + 1, 5)).init(jax.random.PRNGKey(1), features)
  with pytest.raises(ValueError, match=r"does not start with"):
    heads.Head(output_shape=(5,)).init(jax.random.PRNGKey(1), features)


def _model():
  return build.make_hard_sharing_model(TASKS, _tagger(), head_hidden_sizes=(4,))


def test_hard_sharing_model_gives_per_token_logits():
  model = _model()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), IDS)["params"]
  assert set(params) == {"shared", "tasks"}
  out = _apply(model)({"params": params}, IDS)
  assert {k: v.shape for k, v in out.items()} == {"pos": (B, L, 5),
                                                  "ner": (B, L, 3)}
  assert build.last_shared_layer("hard_sharing") == ("features",)
  assert "features" in params["shared"]


def _masked_ce(logits, labels, mask):
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]  # [B, L]
  return (nll * mask).sum() / mask.sum(), mask.sum()


def test_train_step_loss_is_masked_mean_over_labelled_tokens():
  model, tx = _model(), optax.sgd(0.1)
  rng = np.random.default_rng(0)
  token_mask = (IDS != 0).astype(np.float32)  # [B, L]
  ner_mask = token_mask * np.array([[1], [0], [1]], np.float32)  # row 1 absent
  batch = {"inputs": IDS,
           "labels": {"pos": rng.integers(0, 5, (B, L)).astype(np.int32),
                      "ner": rng.integers(0, 3, (B, L)).astype(np.int32)},
           "masks": {"pos": token_mask, "ner": ner_mask}}
  TASKS.validate_batch(batch)
  weights = weighting.static(list(TASKS.static_weights))
  params = state_lib.init_params(model, np.zeros((1, L), np.int32),
                                 jax.random.PRNGKey(0))
  state = state_lib.create_train_state(params, tx, weights, len(TASKS),
                                       jax.random.PRNGKey(1))
  step = jax.jit(step_lib.make_train_step(model.apply, TASKS, tx, weights))
  new_state, metrics = step(state, batch)

  out = _apply(model)({"params": params}, IDS)
  l_pos, n_pos = _masked_ce(out["pos"], batch["labels"]["pos"], token_mask)
  l_ner, n_ner = _masked_ce(out["ner"], batch["labels"]["ner"], ner_mask)
  assert (n_pos, n_ner) == (12.0, 8.0)
  assert float(metrics["pos/count"]) == 12.0
  assert float(metrics["ner/count"]) == 8.0
  np.testing.assert_allclose(metrics["pos/loss"], l_pos, rtol=1e-5)
  np.testing.assert_allclose(metrics["ner/loss"], l_ner, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], l_pos + 0.5 * l_ner, rtol=1e-5)
  assert int(new_state.step) == 1
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params,
                         new_state.params)
  assert all(jax.tree.leaves(changed["shared"]))
