"""The optimizer's arithmetic in float32 over parameters stored in any dtype (config.model.param_dtype).

Two optax wrappers around the run's optimizer (train.make_optimizer), both harmless on float32 parameters:

  in_float32(inner)           gradients and parameters are cast to float32 before `inner` sees them, so its state
                              (AdamW's moments) is float32 whatever the parameters' dtype; its float32 updates are
                              added to the stored parameters and rounded to their dtype. With bfloat16 parameters
                              (8 significant bits) an update smaller than half a parameter's spacing (about
                              |p| / 512) rounds away: small learning rates stop training.
  with_master_weights(inner)  the state also keeps a float32 master copy of the parameters (`MasterWeightsState`);
                              `inner`'s updates are applied to the master, and the stored parameters are its
                              rounding, so small updates accumulate in the master until they show. Costs 4 bytes per
                              parameter more; the copy is checkpointed with the optimizer state and sharded like the
                              parameters (sharding.opt_state_shardings finds it as a copy of the parameter tree).

Apply either's updates with `apply_updates(params, updates, opt_state)`, which takes the master's rounding when
the state has one (exact, whatever the distance between the old and the new value).
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def _float32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` on float32 casts of the gradients and parameters; returns float32 updates."""

  def init(params):
    return inner.init(_float32(params))

  def update(grads, state, params=None):
    return inner.update(_float32(grads), state, None if params is None else _float32(params))

  return optax.GradientTransformation(init, update)


class MasterWeightsState(NamedTuple):
  """master: float32 copy of the parameter tree (the values training accumulates); inner: the wrapped state."""
  master: Any
  inner: Any


def with_master_weights(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` run on a float32 master copy kept in the state; the updates move each parameter to the rounding of
  its master (use `apply_updates` for that rounding exactly)."""

  def init(params):
    master = _float32(params)
    return MasterWeightsState(master=master, inner=inner.init(master))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("with_master_weights needs the parameters in update (their dtype is the rounding's)")
    updates, inner_state = inner.update(_float32(grads), state.inner, state.master)
    master = optax.apply_updates(state.master, updates)
    # Returned for plain optax.apply_updates: float32 differences, exact unless the values are far apart.
    to_master = jax.tree.map(lambda m, p: m.astype(p.dtype).astype(jnp.float32) - p.astype(jnp.float32),
                             master, params)
    return to_master, MasterWeightsState(master=master, inner=inner_state)

  return optax.GradientTransformation(init, update)


def apply_updates(params, updates, opt_state):
  """The new parameters: the master's rounding to each parameter's dtype when `opt_state` is a MasterWeightsState
  (already updated by the same `tx.update`), else `optax.apply_updates(params, updates)`."""
  if isinstance(opt_state, MasterWeightsState):
    return jax.tree.map(lambda m, p: m.astype(p.dtype), opt_state.master, params)
  return optax.apply_updates(params, updates)
