"""Token vocabularies and padding for sequence (per-token) tasks; pure NumPy.

Id conventions shared with `mtl_jax.models.text`: id `PAD_ID = 0` is padding
(the tagger zeroes it out) and `UNK_ID = 1` is any token not in the vocabulary;
real tokens follow, most frequent first. Tokens may be `str` or `bytes` (TFDS
yields NumPy arrays of either); bytes are decoded as UTF-8.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any, Iterable, Sequence

import numpy as np

PAD = "<pad>"
UNK = "<unk>"
PAD_ID = 0
UNK_ID = 1
SPECIAL_TOKENS = (PAD, UNK)


def _to_str(token: Any) -> str:
  """A token as a Python `str` (bytes decoded as UTF-8)."""
  if isinstance(token, (bytes, np.bytes_)):
    return bytes(token).decode("utf-8")
  if isinstance(token, (str, np.str_)):
    return str(token)
  raise ValueError(f"tokens must be str or bytes, got {type(token).__name__} "
                   f"{token!r}")


@dataclasses.dataclass(frozen=True)
class Vocab:
  """A token <-> id mapping; id 0 is padding, id 1 unknown.

  Attributes:
    tokens: the token of each id; `tokens[:2] == ("<pad>", "<unk>")`.
    lowercase: whether tokens are lowercased before lookup (as when built).
  """

  tokens: tuple[str, ...]
  lowercase: bool = True
  _index: dict[str, int] = dataclasses.field(
      init=False, repr=False, compare=False)

  def __post_init__(self):
    tokens = tuple(self.tokens)
    if tokens[:2] != SPECIAL_TOKENS:
      raise ValueError(f"Vocab: tokens must start with {SPECIAL_TOKENS} (ids "
                       f"{PAD_ID} and {UNK_ID}), got {tokens[:2]}")
    index = {t: i for i, t in enumerate(tokens)}
    if len(index) != len(tokens):
      dupes = sorted({t for t in tokens if tokens.count(t) > 1})
      raise ValueError(f"Vocab: duplicate tokens {dupes[:10]}")
    object.__setattr__(self, "tokens", tokens)
    object.__setattr__(self, "_index", index)

  def __len__(self) -> int:
    return len(self.tokens)

  def normalize(self, token: Any) -> str:
    """The lookup form of a token: decoded to `str`, lowercased if configured."""
    token = _to_str(token)
    return token.lower() if self.lowercase else token

  def encode(self, tokens: Iterable[Any]) -> np.ndarray:
    """Maps tokens to ids.

    A token not in the vocabulary, and the literal text "<pad>" (which must not
    become padding), map to `UNK_ID`.

    Args:
      tokens: a sequence of `str` or `bytes` tokens (a list or a 1-D array).

    Returns:
      `[len(tokens)]` int32 ids.

    Raises:
      ValueError: if a token is neither `str` nor `bytes`.
    """
    ids = [self._index.get(self.normalize(t), UNK_ID) for t in tokens]
    ids = [UNK_ID if i == PAD_ID else i for i in ids]
    return np.asarray(ids, dtype=np.int32).reshape(-1)

  def decode(self, ids: Iterable[int]) -> list[str]:
    """Maps ids back to tokens (padding included as "<pad>").

    Raises:
      ValueError: if an id is outside `[0, len(self))`.
    """
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if not 0 <= i < len(self.tokens):
        raise ValueError(f"Vocab.decode: id {i} out of range [0, {len(self)})")
      out.append(self.tokens[i])
    return out

  def to_json(self) -> str:
    """The vocabulary as a JSON string (for saving into a workdir)."""
    return json.dumps({"tokens": list(self.tokens),
                       "lowercase": self.lowercase}, ensure_ascii=False)

  @classmethod
  def from_json(cls, text: str) -> "Vocab":
    """Reads a vocabulary written by `to_json`.

    Raises:
      ValueError: if the JSON is not a `{"tokens": [...], "lowercase": bool}`
        object or the tokens are not a valid vocabulary.
    """
    data = json.loads(text)
    if (not isinstance(data, dict) or not isinstance(data.get("tokens"), list)
        or not isinstance(data.get("lowercase"), bool)):
      raise ValueError("Vocab.from_json: expected a JSON object with 'tokens' "
                       "(a list of strings) and 'lowercase' (a bool)")
    return cls(tokens=tuple(data["tokens"]), lowercase=data["lowercase"])


def build_vocab(token_lists: Iterable[Sequence[Any]], *,
                max_size: int | None = None, min_count: int = 1,
                lowercase: bool = True) -> Vocab:
  """Builds a vocabulary from tokenised sentences.

  Ids are 0 = "<pad>", 1 = "<unk>", then the tokens seen at least `min_count`
  times by descending count, ties broken alphabetically, so the result depends
  only on the counts (not on the order of the data). The special strings
  themselves are not counted as tokens.

  Args:
    token_lists: sentences, each a sequence (list or 1-D array) of `str` or
      `bytes` tokens.
    max_size: the largest vocabulary size, the two special ids INCLUDED (so
      it bounds the tagger's `vocab_size`); None for no limit.
    min_count: tokens seen fewer times map to "<unk>".
    lowercase: lowercase tokens before counting (and in `Vocab.encode`).

  Returns:
    The `Vocab`.

  Raises:
    ValueError: if `max_size < 2`, `min_count < 1`, or a token is neither
      `str` nor `bytes`.
  """
  if max_size is not None and max_size < len(SPECIAL_TOKENS):
    raise ValueError(f"build_vocab: max_size must be None or >= "
                     f"{len(SPECIAL_TOKENS)} (the special tokens "
                     f"{SPECIAL_TOKENS} included), got {max_size}")
  if min_count < 1:
    raise ValueError(f"build_vocab: min_count must be >= 1, got {min_count}")
  counts: collections.Counter[str] = collections.Counter()
  for tokens in token_lists:
    for token in tokens:
      token = _to_str(token)
      counts[token.lower() if lowercase else token] += 1
  for special in SPECIAL_TOKENS:
    counts.pop(special, None)
  kept = sorted((t for t, c in counts.items() if c >= min_count),
                key=lambda t: (-counts[t], t))
  if max_size is not None:
    kept = kept[:max_size - len(SPECIAL_TOKENS)]
  return Vocab(tokens=SPECIAL_TOKENS + tuple(kept), lowercase=lowercase)


def pad_sequences(sequences: Sequence[Any], length: int,
                  dtype: Any = np.int32) -> tuple[np.ndarray, np.ndarray]:
  """Truncates or zero-pads each sequence to `length` and stacks them.

  Args:
    sequences: N arrays `[T_i, *E]` (token ids, per-token labels, ...); the
      trailing shape `E` must agree.
    length: the padded length L (>= 1); longer sequences keep their first L.
    dtype: dtype of the padded array.

  Returns:
    `(padded [N, L, *E] of dtype, mask [N, L] float32)`, with zeros at padding
    positions and the mask 1.0 on real positions.

  Raises:
    ValueError: if `length < 1`, a sequence is a scalar, or trailing shapes
      disagree.
  """
  if length < 1:
    raise ValueError(f"pad_sequences: length must be >= 1, got {length}")
  arrays = [np.asarray(s) for s in sequences]
  trailing = {a.shape[1:] for a in arrays if a.ndim >= 1}
  if any(a.ndim == 0 for a in arrays):
    raise ValueError("pad_sequences: every sequence needs a length axis; got a "
                     "scalar")
  if len(trailing) > 1:
    raise ValueError(f"pad_sequences: sequences disagree on their per-position "
                     f"shape: {sorted(trailing)}")
  extra = trailing.pop() if trailing else ()
  padded = np.zeros((len(arrays), length) + extra, dtype=dtype)  # [N, L, *E]
  mask = np.zeros((len(arrays), length), dtype=np.float32)  # [N, L]
  for i, a in enumerate(arrays):
    n = min(len(a), length)
    padded[i, :n] = a[:n]
    mask[i, :n] = 1.0
  return padded, mask
