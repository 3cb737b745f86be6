"""Tests of mtl_jax.data.text (vocabulary, padding) and per-token task specs."""

import numpy as np
import pytest

from mtl_jax import tasks as tasks_lib
from mtl_jax.data import text

SENTENCES = [["The", "cat", "sat"], ["the", "dog", "sat", "down"],
             ["A", "cat", "the"]]


def test_vocab_order_and_ids():
  # Counts (lowercased): the 3, cat 2, sat 2, a 1, dog 1, down 1.
  vocab = text.build_vocab(SENTENCES)
  assert vocab.tokens == ("<pad>", "<unk>", "the", "cat", "sat", "a", "dog",
                          "down")
  assert len(vocab) == 8
  np.testing.assert_array_equal(vocab.encode(["THE", "Dog", "down"]),
                                [2, 6, 7])
  assert vocab.encode(["cat"]).dtype == np.int32
  assert vocab.decode([2, 3, 0]) == ["the", "cat", "<pad>"]


def test_vocab_is_independent_of_data_order():
  a = text.build_vocab(SENTENCES)
  b = text.build_vocab([list(reversed(s)) for s in reversed(SENTENCES)])
  assert a == b


def test_max_size_min_count_and_case():
  assert text.build_vocab(SENTENCES, max_size=4).tokens == (
      "<pad>", "<unk>", "the", "cat")
  assert text.build_vocab(SENTENCES, min_count=2).tokens == (
      "<pad>", "<unk>", "the", "cat", "sat")
  cased = text.build_vocab(SENTENCES, lowercase=False, min_count=2)
  # "The" and "the" are distinct: the 2, cat 2, sat 2 (alphabetical ties).
  assert cased.tokens == ("<pad>", "<unk>", "cat", "sat", "the")
  np.testing.assert_array_equal(cased.encode(["The", "the"]), [1, 4])
  with pytest.raises(ValueError, match="max_size"):
    text.build_vocab(SENTENCES, max_size=1)
  with pytest.raises(ValueError, match="min_count"):
    text.build_vocab(SENTENCES, min_count=0)


def test_unknown_and_special_tokens():
  vocab = text.build_vocab(SENTENCES + [["<pad>", "<unk>"]])
  # The special strings are not counted as tokens...
  assert vocab.tokens.count("<pad>") == 1 and vocab.tokens.count("<unk>") == 1
  # ...and "<pad>" in text never becomes padding.
  np.testing.assert_array_equal(
      vocab.encode(["zebra", "<pad>", "<unk>", "cat"]), [1, 1, 1, 3])
  assert vocab.encode([]).shape == (0,)
  with pytest.raises(ValueError, match="str or bytes"):
    vocab.encode([3])


def test_bytes_and_numpy_tokens():
  as_bytes = [np.array([t.encode("utf-8") for t in s]) for s in SENTENCES]
  as_str = [np.array(s) for s in SENTENCES]
  vocab = text.build_vocab(as_bytes)
  assert vocab == text.build_vocab(as_str) == text.build_vocab(SENTENCES)
  np.testing.assert_array_equal(vocab.encode(as_bytes[1]), [2, 6, 4, 7])
  np.testing.assert_array_equal(vocab.encode(as_str[1]), [2, 6, 4, 7])
  utf8 = text.build_vocab([[b"caf\xc3\xa9", "Caf\u00e9"]])
  assert utf8.tokens == ("<pad>", "<unk>", "caf\u00e9")


def test_json_round_trip(tmp_path):
  vocab = text.build_vocab(SENTENCES + [["Caf\u00e9"]], lowercase=False)
  path = tmp_path / "vocab.json"
  path.write_text(vocab.to_json(), encoding="utf-8")
  restored = text.Vocab.from_json(path.read_text(encoding="utf-8"))
  assert restored == vocab and restored.lowercase is False
  np.testing.assert_array_equal(restored.encode(["The", "Caf\u00e9", "x"]),
                                vocab.encode(["The", "Caf\u00e9", "x"]))
  with pytest.raises(ValueError, match="tokens"):
    text.Vocab.from_json('{"lowercase": true}')
  with pytest.raises(ValueError, match="must start with"):
    text.Vocab(tokens=("a", "b"))


def test_pad_sequences_pads_and_truncates():
  seqs = [np.array([5, 6, 7]), np.array([8]), np.array([], np.int32),
          np.array([1, 2, 3, 4, 9])]
  padded, mask = text.pad_sequences(seqs, 4, np.int32)
  np.testing.assert_array_equal(padded, [[5, 6, 7, 0], [8, 0, 0, 0],
                                         [0, 0, 0, 0], [1, 2, 3, 4]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0],
                                       [0, 0, 0, 0], [1, 1, 1, 1]])
  assert padded.dtype == np.int32 and mask.dtype == np.float32

  padded, mask = text.pad_sequences([np.ones((1, 2))], 2, np.float32)
  np.testing.assert_array_equal(padded, [[[1, 1], [0, 0]]])
  np.testing.assert_array_equal(mask, [[1, 0]])
  assert text.pad_sequences([], 3)[0].shape == (0, 3)
  with pytest.raises(ValueError, match="length"):
    text.pad_sequences(seqs, 0)


def test_per_token_task_spec_and_batch_validation():
  L, B = 4, 2
  task = tasks_lib.classification_task("pos", 5, positions=(L,))
  assert task.output_shape == (L, 5) and task.label_shape == (L,)
  assert tasks_lib.classification_task("c", 5).output_shape == (5,)
  tasks = tasks_lib.TaskSet([task])
  tokens, mask = text.pad_sequences([np.array([3, 4]), np.array([5, 6, 7])], L)
  labels, _ = text.pad_sequences([np.array([1, 4]), np.array([0, 2, 3])], L)
  batch = {"inputs": tokens, "labels": {"pos": labels},
           "masks": {"pos": mask}}
  tasks.validate_batch(batch)  # [B, L] labels and masks are accepted.
  tasks.validate_batch(dict(batch, masks={"pos": np.ones(B, np.float32)}))
  too_long = np.zeros((B, L + 1), np.int32)
  with pytest.raises(ValueError, match=r"'pos'.*label shape \(2, 5\).*\(2, 4\)"):
    tasks.validate_batch(dict(batch, labels={"pos": too_long}))
  with pytest.raises(ValueError, match="positions"):
    tasks_lib.classification_task("pos", 5, positions=(0,))
