"""Hugging Face interop: HF config <-> ModelConfig, safetensors checkpoints <-> var_jax models, GGUF import.

    keymap          HF config <-> ModelConfig and the per-parameter HF name / shape / layout map (`param_specs`).
    safetensors_io  HF safetensors checkpoints: `from_pretrained` (local directory or hub id, each process reading
                    only its devices' slices), `load_params` (+ `whole_tensor_reader`), `hf_tensors`,
                    `save_pretrained` (+ `check_target`, `size_in_bytes`, `shard_names`).
    gguf_io         llama.cpp GGUF import: `from_gguf`, `gguf_config`, `gguf_tokenizer`, `unpermute_qk`.

The public names of all three are re-exported here (`from var_jax import hf_io; hf_io.from_pretrained(...)`).
"""
from var_jax.hf_io.gguf_io import from_gguf, gguf_config, gguf_tokenizer, smollm2_gguf_path, unpermute_qk
from var_jax.hf_io.keymap import (ParamSpec, config_from_hf, config_to_hf, hf_architecture, np_dtype, param_specs,
                                  path_tuple)
from var_jax.hf_io.safetensors_io import (check_target, from_pretrained, hf_tensors, load_params, save_pretrained,
                                          shard_names, size_in_bytes, whole_tensor_reader)

__all__ = [
    'ParamSpec', 'check_target', 'config_from_hf', 'config_to_hf', 'from_gguf', 'from_pretrained', 'gguf_config',
    'gguf_tokenizer', 'hf_architecture', 'hf_tensors', 'load_params', 'np_dtype', 'param_specs', 'path_tuple',
    'save_pretrained', 'shard_names', 'size_in_bytes', 'smollm2_gguf_path', 'unpermute_qk', 'whole_tensor_reader',
]
