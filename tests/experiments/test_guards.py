"""The divergence guard, alone and in the trainer: stop or skip, never save a non-finite state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax import data
from experiments import train
from experiments.checkpoints import Checkpoints
from experiments.guards import Diverged, DivergenceGuard, all_finite

from .test_train import final_params, smoke_config


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_all_finite_looks_at_every_floating_leaf_and_only_those(bad):
  tree = {"w": jnp.ones((2, 3)), "count": jnp.int32(7), "half": jnp.zeros(2, jnp.bfloat16)}
  assert bool(all_finite(tree))
  assert bool(all_finite({"count": jnp.int32(-1)})) and bool(all_finite({}))
  assert not bool(all_finite({**tree, "half": jnp.array([0.0, bad], jnp.bfloat16)}))
  assert not bool(jax.jit(all_finite)({**tree, "w": tree["w"].at[1, 2].set(bad)}))


def test_stop_names_the_first_non_finite_step():
  guard = DivergenceGuard("stop")
  for step, finite in enumerate([True, True, False, False], 1):
    guard.record(step, jnp.bool_(finite))
  with pytest.raises(Diverged, match="Diverged at step 3: "):
    guard.check()


def test_skip_counts_and_stops_after_too_many_in_a_row():
  guard = DivergenceGuard("skip", max_consecutive_skips=3)
  for step, finite in enumerate([False, True, False, False], 1):
    guard.record(step, jnp.bool_(finite))
  guard.check()
  assert guard.skipped_steps == [1, 3, 4]
  guard.record(5, jnp.bool_(False))
  with pytest.raises(Diverged, match="Diverged at step 5: 3 steps in a row"):
    guard.check()


def test_unknown_action_is_named():
  with pytest.raises(ValueError, match="config.on_nonfinite must be one of"):
    DivergenceGuard("ignore")


def poison_step(monkeypatch, step):
  """Makes the training batch of step ``step`` (from 1) hold a NaN pixel."""
  train_batches = data.train_batches

  def poisoned(*args, start_step=0, **kwargs):
    for index, batch in enumerate(train_batches(*args, start_step=start_step, **kwargs),
                                  start_step + 1):
      if index == step:
        batch = dict(batch, image=batch["image"].copy())
        batch["image"][0, 0, 0, 0] = np.nan
      yield batch

  monkeypatch.setattr(data, "train_batches", poisoned)


def test_diverged_run_stops_naming_the_step_and_keeps_its_finite_checkpoints(
    tmp_path, monkeypatch):
  poison_step(monkeypatch, 5)
  config = smoke_config(num_train_steps=8, checkpoint_every_steps=1, keep_checkpoints=2,
                        log_every_steps=8, eval_every_steps=8)
  with pytest.raises(Diverged, match="Diverged at step 5: the training loss"):
    train.train_and_evaluate(config, tmp_path)
  # Checkpoints 3 and 4 were kept; no later (non-finite) one rotated them away.
  assert Checkpoints(tmp_path / "checkpoints").all_steps() == [3, 4]
  step, params = final_params(tmp_path)
  assert step == 4 and all(np.isfinite(p).all() for p in params.values())


def test_skipped_step_leaves_the_state_unchanged(monkeypatch):
  poison_step(monkeypatch, 3)
  config = smoke_config(on_nonfinite="skip")
  source = data.load_source("mnist", "train", source="synthetic", num_examples=320, seed=0)
  batches = data.train_batches("mnist", source, global_batch_size=32, seed=0, augment=False)
  trainer = train.Trainer(config, train.make_mesh(0), 4, 10)
  states, flags = [], []
  for _ in range(4):
    trainer.state, metrics = trainer.train_step(trainer.state, trainer.to_global(next(batches)))
    states.append(jax.device_get(trainer.state))
    flags.append(bool(metrics["finite"]))
  assert flags == [True, True, False, True]
  two, three, four = (jax.tree.leaves(state) for state in states[1:])
  for before, after in zip(two, three, strict=True):
    np.testing.assert_array_equal(before, after)  # Step 3's update is not applied...
  assert any(not np.array_equal(a, b) for a, b in zip(three, four))  # ... and step 4's is.
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(states[3])
             if np.issubdtype(np.asarray(x).dtype, np.floating))
