"""What `experiments.train.run` does with an experiment, without the loop's
files: for tests that train a catalog config under mock data and inspect
every step."""

import jax

from experiments import train
from mtl_jax.training import evaluate as evaluate_lib


def train_and_evaluate(exp, seed: int, num_steps: int):
  """Trains `exp` for `num_steps` from `seed`, validating every batch.

  Returns:
    `(history, final eval metrics, iterator)`: `history` lists each step's
    `(host metrics, host batch)`; the iterator is past the last batch.
  """
  par = exp.parallel
  data_state = exp.train_mixture.initial_state()
  sample, _ = exp.train_mixture.batch(data_state)
  state = par.put_state(train.initial_state(exp, sample["inputs"], seed))
  step = train.compile_train_step(exp, state)
  iterator = exp.train_mixture.iterator(data_state)
  history = []
  for _ in range(num_steps):
    batch = next(iterator)
    exp.tasks.validate_batch(batch)
    state, metrics = step(state, par.put_batch(batch))
    history.append((jax.device_get(par.to_host(metrics)), batch))
  evaluate = evaluate_lib.make_evaluate(exp.model.apply, exp.tasks,
                                        exp.eval_stream, parallel=par,
                                        params_like=state.params)
  return history, evaluate(state.params), iterator
