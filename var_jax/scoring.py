"""The scoring stage: per scoring block, the G x (G*K) cross-context matrices VAR's normalizers need.

For block b with prompts x_0..x_{G-1} and responses y_0..y_{G*K-1}:
  ref_logp[b, p, m] = log pi_ref(y_m | x_p)   (summed over response tokens)
  ref_ntok[b, m]    = |y_m|
  reward[b, p, m]   = r(x_p, y_m)
log pi_ref and r are kept apart so every lambda reuses them; a sweep over B <= G reuses them too. Entries of
missing prompts / responses are NaN (never read: the pipeline's `valid` masks them).
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.data import pipeline as data_pipeline


def _policy_scores(graphdef, state, batch):
  model = nnx.merge(graphdef, state)
  hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  token_logp = model.target_logprobs(hidden, batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(token_logp * mask, axis=-1), mask.sum(-1)


def _reward_scores(graphdef, state, batch):
  model = nnx.merge(graphdef, state)
  last = jnp.maximum(batch["segment_ids"].astype(jnp.int32).sum(-1) - 1, 0)
  return model(batch["inputs"], batch["positions"], batch["segment_ids"], last).astype(jnp.float32)


_policy_scores_jit = jax.jit(_policy_scores)
_reward_scores_jit = jax.jit(_reward_scores)


def _in_chunks(fn, graphdef, state, seqs: dict, rows: int, chunk: int):
  """Applies fn to `chunk` rows at a time (the last chunk padded so one shape compiles); numpy results."""
  outs = []
  for start in range(0, rows, chunk):
    part = {k: v[start:start + chunk] for k, v in seqs.items()}
    real = part["inputs"].shape[0]
    if real < chunk:
      part = {k: np.concatenate([v, np.repeat(v[-1:], chunk - real, axis=0)]) for k, v in part.items()}
    result = jax.device_get(fn(graphdef, state, {k: jnp.asarray(v) for k, v in part.items()}))
    outs.append(jax.tree.map(lambda x: np.asarray(x)[:real], result))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def score_blocks(pipe: data_pipeline.PreferencePipeline, ref_model: Optional[nnx.Module],
                 reward_model: Optional[nnx.Module] = None,
                 reward_fn: Optional[Callable[[int, int, int], float]] = None,
                 own_rewards_only: bool = False, chunk: int = 256) -> dict:
  """Scores every block of this process's share of `pipe` (naive: each (prompt, response) pair concatenated).

  Args:
    pipe: the pipeline whose `blocks` define the scoring blocks.
    ref_model: the frozen reference policy (None: ref_logp is 0, for include_ref_logp=False runs).
    reward_model: a RewardModel scoring (prompt, response) sequences, or None.
    reward_fn: (block, prompt slot, response slot) -> reward, used when reward_model is None (the synthetic
      task's gold reward, or the dataset's own rewards).
    own_rewards_only: rewards exist only for each response under its own prompt (dataset-provided rewards):
      cross-context reward entries stay NaN, so only the "per_prompt" and "batch" normalizers can use them.
    chunk: sequences per forward pass.
  Returns:
    {"ref_logp": [num_blocks, G, G*K], "ref_ntok": [num_blocks, G*K], "reward": [num_blocks, G, G*K]} float32;
    blocks of other processes are NaN.
  """
  g, k = pipe.config.block_size, pipe.k_max
  num_blocks = len(pipe.blocks)
  out = {"ref_logp": np.full((num_blocks, g, g * k), np.nan, np.float32),
         "ref_ntok": np.full((num_blocks, g * k), np.nan, np.float32),
         "reward": np.full((num_blocks, g, g * k), np.nan, np.float32)}
  ref_split = nnx.split(ref_model) if ref_model is not None else None
  rm_split = nnx.split(reward_model) if reward_model is not None else None
  for block in pipe.scoring_blocks():
    b = block["block_index"]
    pairs = data_pipeline.cross_pairs(block)
    present = np.array([p is not None for p in pairs]).reshape(g, g * k)
    longest = max(len(p) + len(r) for p, r in filter(None, pairs))
    length = data_pipeline.bucket_length(longest, pipe.config.bucket, pipe.max_len)
    seqs = data_pipeline.build_sequences(pairs, length, pipe.pad_id)
    rows = len(pairs)
    if ref_split is not None:
      logp, ntok = _in_chunks(_policy_scores_jit, *ref_split, seqs, rows, chunk)
      out["ref_logp"][b] = np.where(present, logp.reshape(g, g * k), np.nan)
    else:
      out["ref_logp"][b] = np.where(present, 0.0, np.nan)
      ntok = seqs["loss_mask"].sum(-1)
    own = np.arange(g * k) // k
    ntok = ntok.reshape(g, g * k)
    out["ref_ntok"][b] = np.where(block["response_valid"], ntok[own, np.arange(g * k)], np.nan)
    if rm_split is not None:
      reward = _in_chunks(_reward_scores_jit, *rm_split, seqs, rows, chunk).reshape(g, g * k)
    else:
      reward = np.full((g, g * k), np.nan, np.float32)
      for p in range(g):
        for m in range(g * k):
          if present[p, m] and (not own_rewards_only or own[m] == p):
            reward[p, m] = reward_fn(b, p, m)
    out["reward"][b] = np.where(present, reward, np.nan)
  return out
