"""Packing (var_jax/data/packing.py): every token kept once, the same loss and gradients as padded batches through
the training step, fixed shapes, resumable batches, config errors, and a packed run of the main program."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from var_jax import config as config_lib
from var_jax import model as model_lib
from var_jax import objectives
from var_jax import stages
from var_jax import train as train_lib
from var_jax.data import packing
from var_jax.data import pipeline as data_pipeline
from var_jax.data import synthetic
from var_jax.data import tokenize

from tests.helpers import ROOT, TEST_SIZE, program_env, tiny_config

MAX_LEN = 28  # max_prompt_len 16 + max_response_len 12.


def _pipelines(pack_len, block_size=8, group_size=4, groups=4, k=2, seed=0, records=64):
  """(padded pipeline, packed pipeline) of the same synthetic preference records and settings."""
  tok = tokenize.Tokenizer(synthetic.build_tokenizer(), max_prompt_len=16, max_response_len=12)
  recs = synthetic.preference_records(records, seed=seed, k=k)
  out = []
  for p in (0, pack_len):
    pcfg = data_pipeline.PipelineConfig(block_size=block_size, group_size=group_size, groups_per_batch=groups,
                                        k_max=k, seed=seed, bucket=8, max_len=MAX_LEN, pack_len=p)
    out.append(data_pipeline.build_pipeline(recs, tok, pcfg, shard_index=0, shard_count=1)[0])
  return out[0], out[1], len(tok.tok)


def _scores(pipe, seed=0):
  """Random block-level scores of the shape the score stage writes."""
  rng = np.random.default_rng(seed)
  nb, g = len(pipe.blocks), pipe.config.block_size
  n = g * pipe.k_max
  return {"ref_logp": rng.normal(-20, 5, (nb, g, n)).astype(np.float32),
          "ref_ntok": rng.integers(2, 9, (nb, n)).astype(np.float32),
          "reward": rng.normal(0, 1, (nb, g, n)).astype(np.float32)}


@pytest.mark.parametrize("pack_len", [MAX_LEN, 64])
@pytest.mark.parametrize("block_size", [4, 8])
def test_packing_keeps_every_token_exactly_once(pack_len, block_size):
  padded_pipe, packed_pipe, _ = _pipelines(pack_len, block_size=block_size)
  for index in range(3):
    padded, packed = padded_pipe.batch(index), packed_pipe.dataset()[index]
    g, n, _ = padded["inputs"].shape
    assert packed["inputs"].shape == (g, packed_pipe.rows, pack_len)
    assert packed_pipe.rows < n or pack_len == MAX_LEN  # Synthetic sequences are 10..23 tokens: some never pair.
    for key in padded:  # Per-sequence and per-group arrays are the padded batch's.
      if key not in packing.PACKED_KEYS:
        np.testing.assert_array_equal(packed[key], padded[key], err_msg=key)
    for gi in range(g):
      seq, seg = packed["sequence"][gi], packed["segment_ids"][gi]
      np.testing.assert_array_equal(seq >= 0, seg > 0)  # Real tokens are exactly those of a sequence.
      for j in range(n):
        length = int((padded["segment_ids"][gi, j] > 0).sum())
        where = seq == j
        assert where.sum() == length  # Every token once, nothing else.
        if not length:
          continue
        r = np.nonzero(where.any(1))[0]
        assert len(r) == 1 and len(np.unique(seg[r[0]][where[r[0]]])) == 1  # One row, one segment of it.
        for key in ("inputs", "targets", "loss_mask", "positions"):
          np.testing.assert_array_equal(packed[key][gi][where], padded[key][gi, j, :length], err_msg=key)
      # Segments increase along a row and every segment is one sequence.
      for r in range(packed_pipe.rows):
        ids = seg[r][seg[r] > 0]
        assert np.all(np.diff(ids) >= 0) and len(np.unique(seq[r][seg[r] > 0])) == len(np.unique(ids))


def test_rows_per_group_is_the_most_any_group_needs():
  """G = B: R is exact (some group needs all R rows); G > B: a bound every group of every epoch fits."""
  padded_pipe, packed_pipe, _ = _pipelines(MAX_LEN, block_size=4)
  used = [int((packed_pipe.dataset()[i]["segment_ids"] > 0).any(-1).sum(-1).max()) for i in range(8)]
  assert max(used) <= packed_pipe.rows
  blocks = packed_pipe.block_lengths
  exact = max(packing.first_fit(b, packing.pack_order(b, np.arange(len(b))), MAX_LEN)[2] for b in blocks)
  assert packed_pipe.rows == exact
  _, wide, _ = _pipelines(MAX_LEN, block_size=8, group_size=4)
  for i in range(3 * wide.batches_per_epoch):  # Three epochs of re-drawn groups: every one fits (or pack raises).
    wide.dataset()[i]
  with pytest.raises(ValueError, match="packed rows"):
    packing.pack_batch(padded_pipe.batch(0), MAX_LEN, 1, padded_pipe.pad_id)


def test_packed_batches_are_a_pure_function_of_the_index():
  _, packed_pipe, _ = _pipelines(MAX_LEN)
  it = packed_pipe.iterator()
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = next(it)
  got = next(packed_pipe.iterator(state=state))
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _model(objective, vocab):
  mcfg = model_lib.get_config("tiny", vocab_size=vocab)
  cls = model_lib.RewardModel if objective.reward_model else model_lib.Decoder
  return cls(mcfg, rngs=nnx.Rngs(0))


OFFLINE = sorted(name for name, o in objectives.OBJECTIVES.items() if not o.online)


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("stage", OFFLINE)
def test_packed_loss_and_gradients_equal_padded(stage, accum):
  """The training step's loss, gradients and per-sequence outputs (train.make_loss_and_grads), and the eval step's
  metrics, on a packed batch equal those of the same batch padded, to float32 noise."""
  padded_pipe, packed_pipe, vocab = _pipelines(64)
  objective = objectives.build(stage, tiny_config())
  if objective.needs_scores:
    padded_pipe = stages.with_scores(padded_pipe, _scores(padded_pipe))
    packed_pipe = stages.with_scores(packed_pipe, _scores(packed_pipe))
  graphdef, params, rest = nnx.split(_model(objective, vocab), nnx.Param, ...)
  padded = jax.tree.map(jnp.asarray, padded_pipe.dataset()[1])
  packed = jax.tree.map(jnp.asarray, packed_pipe.dataset()[1])
  assert int(packed["segment_ids"].max()) >= 3  # Rows shared by sequences, which must not see each other.
  step = jax.jit(train_lib.make_loss_and_grads(objective, graphdef, rest, accum))
  loss_u, grads_u, out_u, ntok_u, _ = step(params, padded)
  loss_p, grads_p, out_p, ntok_p, _ = step(params, packed)
  assert np.isfinite(float(loss_u)) and float(loss_u) != 0.0
  np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5)
  np.testing.assert_array_equal(ntok_p, ntok_u)
  valid = np.asarray(padded["valid"])  # A reward model's output on an empty slot is read anywhere (and unused).
  np.testing.assert_allclose(np.where(valid, out_p, 0), np.where(valid, out_u, 0), rtol=1e-5, atol=1e-5)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_u))
  assert scale > 0
  for a, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_u)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)
  evaluate = jax.jit(train_lib.make_eval_step(objective, graphdef, rest))
  m_u, m_p = evaluate(params, padded), evaluate(params, packed)
  assert set(m_u) == set(m_p)
  for k in m_u:
    np.testing.assert_allclose(m_p[k], m_u[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("overrides, message", [
    ({"data.packing": True, "data.pack_len": 20}, "config.data.pack_len = 20: must be 0"),
    ({"data.packing": True, "stages": "sft,grpo"}, "config.data.packing = True: the grpo stage"),
    ({"data.packing": True, "stages": "sft,online_var"}, "config.data.packing = True: the online_var stage"),
])
def test_packing_config_errors_name_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate(tiny_config(**overrides), num_devices=1)


def test_pack_len_shorter_than_a_sequence_is_rejected():
  with pytest.raises(ValueError, match="pack_len=20 < max_len=28"):
    _pipelines(20)


def test_packing_is_how_not_what():
  """A stage finished without packing stays valid with it (the same batches, the same loss)."""
  from var_jax import artifacts  # pylint: disable=g-import-not-at-top
  cfg = tiny_config()
  assert artifacts.fingerprint(cfg, "chosen") == artifacts.fingerprint(
      tiny_config(**{"data.packing": True, "data.pack_len": 64}), "chosen")
  assert config_lib.pack_len(cfg) == 0 and config_lib.pack_len(tiny_config(**{"data.packing": True})) == MAX_LEN


@pytest.mark.slow
def test_packed_run_of_the_main_program(tmp_path):
  """`python -m var_jax.main --config=configs/tiny.py --config.data.packing=True` (sft, chosen at test size) trains
  on exactly the real tokens of the padded batches, with finite losses."""
  workdir = str(tmp_path / "run")
  sizes = {k: v for k, v in TEST_SIZE.items() if k.split(".")[0] in ("data", "sft", "chosen", "optim", "checkpoint")
           or k in ("log_every", "eval_every", "eval_batches")}
  cmd = [sys.executable, "-m", "var_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
         "--config.stages=sft,chosen", "--config.data.packing=True", "--config.checkpoint.async_save=False",
         *(f"--config.{k}={v}" for k, v in sizes.items())]
  proc = subprocess.run(cmd, cwd=ROOT, env=program_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  cfg = tiny_config(stages="sft,chosen")
  task = stages.load_task(cfg)
  for stage, records, k in (("sft", task.sft_records, 1), ("chosen", task.pref_records, 2)):
    lines = [json.loads(line) for line in open(os.path.join(workdir, stage, "logs", "metrics.jsonl"))]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == cfg[stage].steps // cfg.log_every and np.all(np.isfinite(losses)), stage
    it = stages.make_pipeline(cfg, records, task.tok, k_max=k, train=True, min_responses=k).iterator()
    real = sum(int((next(it)["segment_ids"] > 0).sum()) for _ in range(cfg[stage].steps))
    spent = json.load(open(os.path.join(workdir, "cost.json")))["stages"][stage]["tokens"]
    assert spent == real, stage
