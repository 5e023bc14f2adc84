"""var_jax.sampling: the KV-cache sampler `generate` against the full-forward `generate_reference`, EOS, seeds,
top-k/top-p/temperature filtering, one trace per shape, and parameters on a mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from var_jax import model as M
from var_jax import sampling
from var_jax import sharding

VOCAB = 97
PAD = 0


@pytest.fixture(scope="module")
def model():
  return M.Decoder(M.get_config("tiny", vocab_size=VOCAB), rngs=nnx.Rngs(0))


def _prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  # Token ids include PAD: prompts may contain the pad token, the sampler must mask by length, not by value.
  return [rng.integers(0, VOCAB, n).astype(np.int32) for n in lengths]


# ------------------------------------------------------------------------------------------------ filter_logits


def test_top_k_keeps_exactly_k():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 50)), jnp.float32)
  for k in (1, 5, 49):
    out = np.asarray(sampling.filter_logits(logits, 1.0, k, 1.0))
    kept = np.isfinite(out)
    assert (kept.sum(-1) == k).all()
    # The kept ones are the k largest, unchanged.
    top = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
    assert np.take_along_axis(kept, top, axis=-1).all()
    np.testing.assert_array_equal(out[kept], np.asarray(logits)[kept])
  # Ties: still exactly k, and k >= V keeps everything.
  tied = jnp.zeros((2, 10))
  assert (np.isfinite(np.asarray(sampling.filter_logits(tied, 1.0, 3, 1.0))).sum(-1) == 3).all()
  assert np.isfinite(np.asarray(sampling.filter_logits(tied, 1.0, 10, 1.0))).all()


def test_top_p_keeps_smallest_prefix_reaching_p():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(4, 30)) * 2
  for p in (0.05, 0.3, 0.7, 0.95):
    out = np.asarray(sampling.filter_logits(jnp.asarray(logits, jnp.float32), 1.0, 0, p))
    for row, kept in zip(logits, np.isfinite(out)):
      probs = np.exp(row - row.max())
      probs /= probs.sum()
      order = np.argsort(-probs)
      need = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # first prefix with mass >= p
      assert set(np.flatnonzero(kept)) == set(order[:need])
  # p so small that only the argmax survives.
  out = np.asarray(sampling.filter_logits(jnp.asarray(logits, jnp.float32), 1.0, 0, 1e-6))
  assert (np.isfinite(out).sum(-1) == 1).all() and (np.argmax(out, -1) == np.argmax(logits, -1)).all()


def test_temperature_scales_logits_and_composes_with_top_k():
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(2, 20)), jnp.float32)
  np.testing.assert_allclose(np.asarray(sampling.filter_logits(logits, 0.5, 0, 1.0)), np.asarray(logits) / 0.5,
                             rtol=1e-6)
  out = np.asarray(sampling.filter_logits(logits, 2.0, 4, 1.0))
  kept = np.isfinite(out)
  np.testing.assert_allclose(out[kept], np.asarray(logits)[kept] / 2.0, rtol=1e-6)


@pytest.mark.parametrize("partitionable", [True, False])
def test_sampled_row_does_not_depend_on_padding_rows(partitionable):
  """A row's draw depends on the key and its own logits only: the first rows of a batch padded with more rows (as
  `generate` pads a batch to the mesh's batch shards) sample what the batch alone samples, whatever the global
  jax_threefry_partitionable flag (its old, unpartitionable draw depends on the batch size)."""
  logits = jnp.asarray(np.random.default_rng(4).normal(size=(8, 50)), jnp.float32)
  key = jax.random.key(7)
  with jax.threefry_partitionable(partitionable):
    small = sampling.choose_tokens(logits[:3], key, 1.0, 0, 1.0)
    padded = sampling.choose_tokens(logits, key, 1.0, 0, 1.0)
    jitted = jax.jit(lambda x: sampling.choose_tokens(x, key, 1.0, 5, 0.9))
    small_filtered, padded_filtered = jitted(logits[:3]), jitted(logits)
  np.testing.assert_array_equal(small, padded[:3])
  np.testing.assert_array_equal(small_filtered, padded_filtered[:3])


def test_padded_batch_rounds_up_to_the_row_shards():
  mesh = AbstractMesh((2, 3, 4), sharding.MESH_AXES)  # 6 batch shards; the tensor axis does not split rows.
  assert sampling.row_shards(mesh) == 6 and sampling.row_shards(None) == 1
  assert [sampling.padded_batch(n, mesh) for n in (1, 6, 7, 12)] == [6, 6, 12, 12]
  assert sampling.padded_batch(5, None) == 5


# ------------------------------------------------------------------------------------------------ generate
# Every test uses these shapes where it can (batches of 3, prompts in the 8- or 16-slot bucket, 8 new tokens), so
# the whole file compiles a handful of loops; eos_id / pad_id are traced and never recompile.
KW = dict(max_new_tokens=8, pad_id=PAD, batch_size=3, bucket=8)


def test_greedy_matches_full_forward_reference(model):
  """Token for token over several batches (7 prompts, batch_size 3 -> a last batch with 2 filler rows), uneven
  prompt lengths, two prompt buckets (8 and 16 slots) in one call, and prompts containing the pad id."""
  prompts = _prompts([1, 5, 8, 3, 7, 2, 11])
  got = sampling.generate(model, prompts, eos_id=-1, **KW)
  want = sampling.generate_reference(model, prompts, eos_id=-1, **KW)
  assert len(got) == len(prompts)
  for g, w in zip(got, want):
    assert g.dtype == np.int32 and len(g) == 8
    np.testing.assert_array_equal(g, w)
  # Rows do not depend on their batch mates: the same prompts in another order give the same rows.
  order = [6, 2, 0, 4, 1, 5, 3]
  for i, g in zip(order, sampling.generate(model, [prompts[i] for i in order], eos_id=-1, **KW)):
    np.testing.assert_array_equal(g, want[i])


def test_eos_stops_a_row(model):
  prompts = _prompts([4, 6, 11], seed=5)
  free = sampling.generate(model, prompts, eos_id=-1, **KW)
  eos = int(free[1][3])  # the token row 1 emits greedily at step 3
  got = sampling.generate(model, prompts, eos_id=eos, **KW)
  want = sampling.generate_reference(model, prompts, eos_id=eos, **KW)
  for f, g, w in zip(free, got, want):
    np.testing.assert_array_equal(g, w)
    hits = np.flatnonzero(f == eos)
    stop = hits[0] + 1 if len(hits) else len(f)  # up to and including the first EOS, nothing after it
    np.testing.assert_array_equal(g, f[:stop])
  assert len(got[1]) <= 4 and got[1][-1] == eos


def test_all_rows_stop_early(model):
  """If every row's first token is EOS, each row returns just [EOS] (the while_loop exits after the prefill)."""
  prompts = _prompts([3], seed=6) * 3
  eos = int(sampling.generate(model, prompts, eos_id=-1, **KW)[0][0])
  got = sampling.generate(model, prompts, eos_id=eos, **KW)
  assert [g.tolist() for g in got] == [[eos]] * 3


def test_max_new_tokens_respected(model):
  prompts = _prompts([2, 8, 5], seed=7)
  for n in (0, 1, 8):
    got = sampling.generate(model, prompts, eos_id=-1, **{**KW, "max_new_tokens": n})
    assert [len(g) for g in got] == [n] * 3
  assert sampling.generate(model, [], eos_id=-1, **KW) == []
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    sampling.generate(model, [prompts[0], np.zeros((0,), np.int32)], eos_id=-1, **KW)


def test_seeded_sampling(model):
  prompts = _prompts([3, 6, 4, 5], seed=8)
  kw = dict(KW, eos_id=-1, temperature=1.0)
  a = sampling.generate(model, prompts, seed=1, **kw)
  b = sampling.generate(model, prompts, seed=1, **kw)
  c = sampling.generate(model, prompts, seed=2, **kw)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  # Rows of one batch draw independently (the near-uniform random model would make equal rows a coincidence).
  same_prompt = sampling.generate(model, [prompts[0]] * 3, seed=1, **kw)
  assert not np.array_equal(same_prompt[0], same_prompt[1])


def test_top_k_1_is_greedy(model):
  prompts = _prompts([3, 8, 5, 7], seed=9)
  greedy = sampling.generate(model, prompts, eos_id=-1, **KW)
  for seed in (0, 3):
    top1 = sampling.generate(model, prompts, eos_id=-1, temperature=1.0, top_k=1, seed=seed, **KW)
    assert all(np.array_equal(x, y) for x, y in zip(greedy, top1))


def _forward_logprobs(model, prompt, response) -> float:
  """log pi(response | prompt) from one full forward pass over prompt + response, log-softmax in float64 NumPy."""
  ids = np.concatenate([prompt, response])[None].astype(np.int32)
  hidden = model(jnp.asarray(ids), jnp.arange(ids.shape[1])[None], jnp.ones_like(jnp.asarray(ids)))
  logits = np.asarray(model.logits(hidden)[0], np.float64)[len(prompt) - 1:-1]  # Row j predicts response token j.
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return float(logp[np.arange(len(response)), response].sum())


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(temperature=0.0), dict(temperature=0.7, top_k=5, seed=3)])
def test_generated_logprobs_are_the_models_own(model, options):
  """The summed log-probs `generate` returns are log pi(y|x) under the unscaled model (whatever the temperature or
  filter), equal to a full forward pass over prompt + response: for rows stopped by EOS, rows that ran to
  max_new_tokens, and the filler rows of a short last batch (7 prompts in batches of 3)."""
  prompts = _prompts([1, 5, 8, 3, 7, 2, 11], seed=13)
  eos = int(sampling.generate(model, prompts, eos_id=-1, **KW, **options)[2][2])  # Row 2 stops at step 2.
  got, logp = sampling.generate(model, prompts, eos_id=eos, with_logprobs=True, **KW, **options)
  assert logp.shape == (7,) and logp.dtype == np.float32
  assert any(len(g) < 8 for g in got) and any(len(g) == 8 for g in got)
  want = [_forward_logprobs(model, p, g) for p, g in zip(prompts, got)]
  np.testing.assert_allclose(logp, want, rtol=1e-4, atol=1e-4)
  assert all(np.array_equal(a, b) for a, b in zip(got, sampling.generate(model, prompts, eos_id=eos, **KW, **options)))
  # A row whose first token is EOS: that token's log-prob alone. No prompts, or no new tokens: nothing, 0.
  first = int(sampling.generate(model, prompts[:1], eos_id=-1, **KW, **options)[0][0])
  (alone,), (logp_alone,) = sampling.generate(model, prompts[:1], eos_id=first, with_logprobs=True, **KW, **options)
  assert alone.tolist() == [first]
  np.testing.assert_allclose(logp_alone, _forward_logprobs(model, prompts[0], alone), rtol=1e-4, atol=1e-4)
  assert sampling.generate(model, [], eos_id=eos, with_logprobs=True, **KW)[0] == []
  ids, none = sampling.generate(model, prompts[:2], eos_id=eos, with_logprobs=True, **{**KW, "max_new_tokens": 0})
  assert [len(i) for i in ids] == [0, 0] and none.tolist() == [0.0, 0.0]


def test_one_trace_per_shape(model, monkeypatch):
  """Batches of one (batch, prompt bucket, max_new_tokens) shape reuse one compiled loop."""
  traces = []
  inner = sampling.prefill_and_decode

  def counting(*args, **kwargs):
    traces.append(args[1].shape)  # runs once per trace, never per call of the compiled function
    return inner(*args, **kwargs)

  monkeypatch.setattr(sampling, "prefill_and_decode", counting)
  kw = dict(KW, batch_size=2, max_new_tokens=5)  # a shape no other test compiles
  # Three batches, all in the 8-slot bucket (the last one with a filler row): one trace.
  sampling.generate(model, _prompts([3, 8, 1, 5, 2], seed=10), eos_id=-1, **kw)
  assert traces == [(2, 8)]
  # New prompts, another EOS id, another model instance of the same config, another seed: no new trace.
  other = M.Decoder(M.get_config("tiny", vocab_size=VOCAB), rngs=nnx.Rngs(1))
  sampling.generate(other, _prompts([6, 4, 7, 7], seed=11), eos_id=3, seed=5, **kw)
  assert traces == [(2, 8)]
  # A longer prompt bucket is a new shape.
  sampling.generate(model, _prompts([12, 2], seed=12), eos_id=-1, **kw)
  assert traces == [(2, 8), (2, 16)]


def test_parameters_on_a_mesh(model):
  """The sampler runs on parameters placed with the training shardings (here a 1-device mesh) and gives the same
  greedy tokens as the unsharded model."""
  cfg = M.get_config("tiny", vocab_size=VOCAB)
  mesh = sharding.make_mesh()
  sharded, _ = sharding.create_sharded_model(lambda: M.Decoder(cfg, rngs=nnx.Rngs(0)), mesh)
  assert sampling.params_mesh(nnx.state(sharded)) == mesh and sampling.params_mesh(nnx.state(model)) is None
  prompts = _prompts([4, 8, 2], seed=13)
  for g, w in zip(sampling.generate(sharded, prompts, eos_id=-1, **KW), sampling.generate(model, prompts, eos_id=-1,
                                                                                          **KW)):
    np.testing.assert_array_equal(g, w)
