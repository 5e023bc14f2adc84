"""GPU-only paths (cuDNN fused attention) against the XLA path; skipped where JAX has no GPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from var_jax import model as M

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs an NVIDIA GPU')]


def _rows(b, t, seed=0):
  """Segment ids of b rows of length t: full, right-padded, left-padded and packed (two segments) rows."""
  segs = np.ones((b, t), np.int32)
  segs[1, t - t // 3:] = 0
  segs[2, :t // 4] = 0
  segs[3, t // 2:] = 2
  segs[3, -3:] = 0
  pos = np.zeros((b, t), np.int32)
  for i in range(b):
    for s in np.unique(segs[i][segs[i] > 0]):
      idx = np.nonzero(segs[i] == s)[0]
      pos[i, idx] = np.arange(len(idx))
  return jnp.asarray(pos), jnp.asarray(segs)


def test_cudnn_attention_equals_xla():
  b, t, hq, hkv, dh = 4, 256, 8, 2, 64
  kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(kq, (b, t, hq, dh), jnp.bfloat16)
  k = jax.random.normal(kk, (b, t, hkv, dh), jnp.bfloat16)
  v = jax.random.normal(kv, (b, t, hkv, dh), jnp.bfloat16)
  pos, segs = _rows(b, t)
  mask = M.attention_mask(pos, segs, pos, segs)
  g = jax.random.normal(kg, (b, t, hq, dh), jnp.float32) * (segs > 0)[:, :, None, None]

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * g)

  ref = lambda q, k, v: M.attention(q, k, v, mask)  # noqa: E731
  fused = lambda q, k, v: M.cudnn_attention(q, k, v, mask)  # noqa: E731
  real = (segs > 0)[:, :, None, None]
  out_ref, out = ref(q, k, v).astype(jnp.float32), fused(q, k, v).astype(jnp.float32)
  np.testing.assert_allclose(np.where(real, out, 0), np.where(real, out_ref, 0), atol=2e-2, rtol=2e-2)
  assert np.all(np.asarray(out)[~np.asarray(real)[..., 0, 0]] == 0)  # Padding queries are zero, not NaN.
  grads_ref = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k, v)
  grads = jax.grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2))(q, k, v)
  for a, r in zip(grads, grads_ref):
    a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, r, atol=5e-2 * np.abs(r).max(), rtol=0)


def test_decoder_cudnn_equals_xla():
  cfg = M.get_config('tiny', vocab_size=512, hidden_size=256, num_heads=4, num_kv_heads=2, num_layers=2,
                     dtype='bfloat16')
  model = M.Decoder(cfg, rngs=nnx.Rngs(0))
  fused = M.Decoder(M.get_config('tiny', vocab_size=512, hidden_size=256, num_heads=4, num_kv_heads=2,
                                 num_layers=2, dtype='bfloat16', attention_impl='cudnn'), rngs=nnx.Rngs(0))
  b, t = 4, 128
  pos, segs = _rows(b, t)
  tokens = jax.random.randint(jax.random.key(1), (b, t), 1, 512) * (segs > 0)
  a = model(tokens, pos, segs).astype(jnp.float32)
  f = fused(tokens, pos, segs).astype(jnp.float32)
  real = np.asarray(segs > 0)
  assert np.all(np.isfinite(np.asarray(f)))
  np.testing.assert_allclose(np.asarray(f)[real], np.asarray(a)[real], atol=5e-2, rtol=5e-2)
