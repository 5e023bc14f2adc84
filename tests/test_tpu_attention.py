"""The 'splash' attention path (Pallas TPU splash-attention kernel) against the XLA attention, on CPU in Pallas
interpret mode: forward and gradients, causal, padded and packed rows, grouped-query heads, and the whole decoder."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from var_jax import model as model_lib

B, T, HQ, HKV, DH = 2, 160, 4, 2, 32  # T is not a multiple of the 128-lane block: the kernel input is padded.


def _rows(kind: str):
  """positions, segment_ids [B, T] int32 of `kind`: 'causal' (one full segment), 'padded' (right and left padding),
  'packed' (several segments per row, positions restarting in each, padding after)."""
  seg = np.ones((B, T), np.int32)
  if kind == "padded":
    seg[0, 100:] = 0
    seg[1, :37] = 0
  elif kind == "packed":
    seg[0, 50:] = 2
    seg[0, 130:] = 3
    seg[1, 20:] = 2
    seg[1, 150:] = 0
  pos = np.zeros((B, T), np.int32)
  for b in range(B):
    start = 0
    for t in range(1, T):
      if seg[b, t] != seg[b, t - 1]:
        start = t
      pos[b, t] = t - start
  return jnp.asarray(pos), jnp.asarray(seg)


def _qkv(seed: int = 0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, T, HQ, DH)).astype(np.float32)
  k = rng.normal(size=(B, T, HKV, DH)).astype(np.float32)
  v = rng.normal(size=(B, T, HKV, DH)).astype(np.float32)
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _xla(q, k, v, pos, seg):
  return model_lib.attention(q, k, v, model_lib.attention_mask(pos, seg, pos, seg))


def _splash(q, k, v, pos, seg):
  del pos
  return model_lib.splash_attention(q, k, v, seg, block=128, interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["causal", "padded", "packed"])
def test_forward_and_gradients_match_xla_attention(kind):
  pos, seg = _rows(kind)
  q, k, v = _qkv()
  real = (seg > 0)[:, :, None, None]
  cot = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, HQ, DH)).astype(np.float32))

  def loss(fn):  # Padding queries' outputs are never read by the model: only real rows carry a cotangent.
    return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v, pos, seg), 0.0) * cot)

  out, ref = _splash(q, k, v, pos, seg), _xla(q, k, v, pos, seg)
  np.testing.assert_allclose(np.where(real, out, 0.0), np.where(real, ref, 0.0), atol=2e-5, rtol=2e-5)
  assert not np.any(np.where(real, 0.0, out)), "padding queries must come out zero"
  grads = jax.grad(loss(_splash), argnums=(0, 1, 2))(q, k, v)
  grads_ref = jax.grad(loss(_xla), argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", grads, grads_ref):
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4, err_msg=f"d{name} ({kind})")


def test_gqa_grouping_is_the_models():
  """Query head h reads KV head h // (Hq / Hkv): moving one KV head's values changes exactly its query heads."""
  pos, seg = _rows("causal")
  q, k, v = _qkv(2)
  base = _splash(q, k, v, pos, seg)
  moved = _splash(q, k, v.at[:, :, 1].add(1.0), pos, seg)
  changed = np.abs(np.asarray(moved - base)).max(axis=(0, 1, 3)) > 1e-3
  np.testing.assert_array_equal(changed, [False, False, True, True])


@pytest.mark.slow
def test_decoder_with_splash_matches_xla():
  """The whole decoder (GQA, RoPE, scanned layers, remat) with attention_impl='splash' equals 'xla' on packed rows,
  hidden states and parameter gradients of a log-prob loss."""
  pos, seg = _rows("packed")
  cfg = model_lib.get_config("tiny", head_dim=32, remat="full")
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
  mask = (seg > 0).astype(jnp.float32)

  def run(impl):
    model = model_lib.Decoder(model_lib.get_config("tiny", head_dim=32, remat="full", attention_impl=impl),
                              rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(params):
      m = nnx.merge(graphdef, params)
      hidden = m(tokens, pos, seg)
      return jnp.sum(m.target_logprobs(hidden, jnp.roll(tokens, -1, axis=1)) * mask), hidden

    (value, hidden), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, hidden, grads

  v_s, h_s, g_s = run("splash")
  v_x, h_x, g_x = run("xla")
  real = np.asarray(seg > 0)[:, :, None]
  np.testing.assert_allclose(np.where(real, h_s, 0), np.where(real, h_x, 0), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(v_s, v_x, rtol=1e-5)
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(g_s), jax.tree_util.tree_leaves_with_path(g_x)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-3, err_msg=jax.tree_util.keystr(path))


def test_splash_is_a_config_choice():
  assert "splash" in model_lib.ATTENTION_IMPLS
  with pytest.raises(ValueError, match="attention_impl"):
    model_lib.ModelConfig(attention_impl="flash")


def test_prefills_into_an_empty_cache_run_the_kernel():
  """The score stage's prefix-shared pass and the sampler prefill their prompts into an empty KV cache: that is
  self-attention, so with attention_impl='splash' it runs the kernel (a Pallas call in the program, which the old
  cache path never had) and gives the XLA numbers."""
  from var_jax import sampling
  from var_jax import scoring
  rng = np.random.default_rng(4)
  prompts = [rng.integers(3, 200, n).astype(np.int32) for n in (9, 30, 17)]
  responses = [rng.integers(3, 200, n).astype(np.int32) for n in (5, 12, 8, 3)]

  def run(impl):
    cfg = model_lib.get_config("tiny", head_dim=32, attention_impl=impl, vocab_size=256)
    model = model_lib.Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    p_ids, p_len = scoring._pad_rows(prompts, 32, 0)  # pylint: disable=protected-access
    r_ids, r_len = scoring._pad_rows(responses, 32, 0)  # pylint: disable=protected-access
    score_jaxpr = str(jax.make_jaxpr(scoring._prefix_shared_scores)(  # pylint: disable=protected-access
        graphdef, state, *map(jnp.asarray, (p_ids, p_len, r_ids, r_len))))
    scores = scoring.prefix_shared_scores(model, prompts, responses, bucket=32)
    ids = sampling.generate(model, prompts, max_new_tokens=6, eos_id=1, pad_id=0, batch_size=4)
    return "pallas_call" in score_jaxpr, scores, ids

  kernel_s, scores_s, ids_s = run("splash")
  kernel_x, scores_x, ids_x = run("xla")
  assert kernel_s and not kernel_x
  np.testing.assert_allclose(scores_s, scores_x, rtol=1e-5, atol=1e-4)
  for a, b in zip(ids_s, ids_x):
    np.testing.assert_array_equal(a, b)
