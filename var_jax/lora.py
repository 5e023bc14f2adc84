"""LoRA (Hu et al. 2021): train low-rank adapters on top of frozen weights, for every training stage but the judge.

`attach` adds, to each targeted projection W of every layer (q, k, v, o, gate, up, down; `config.lora.targets`), two
factors as `model.LoRAParam`s: A [L, *in, r] drawn as PEFT draws it (uniform in +-1/sqrt(fan_in)) and B [L, r, *out]
at zero, so the model computes exactly what it did before. The layer adds (alpha / r) (x A) B to x W
(`model.project`: through the rank, so W never gets a gradient). The train step differentiates only the adapters
(`trainable`; a reward model's score head too, which starts untrained) and takes the frozen weights as an input, so
the optimizer state and the checkpoints hold adapters only, and the online stages use the frozen weights with the
adapters at zero as their reference instead of a second copy of the model (`zero_like`).

After training, `adapters` gives the trained factors (saved beside the stage's model, and written in PEFT's layout
by `peft_files`), and `merge` folds them into W (W + (alpha / r) A B, computed in float32) and removes them, so the
stage's model, what eval and export read, is a plain Decoder.
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from var_jax import model as model_lib
from var_jax import sharding as sharding_lib

TARGETS = tuple(model_lib.LORA_INPUT_AXES)  # Config names of the projections LoRA can adapt.
# The HF module each target is, for PEFT's target_modules and tensor names.
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def parse_targets(text: str) -> tuple[str, ...]:
  """'q,v' -> ('q', 'v'); 'all' -> every target; ValueError naming config.lora.targets for an unknown name."""
  names = TARGETS if text.strip() == "all" else tuple(n.strip() for n in text.split(",") if n.strip())
  unknown = [n for n in names if n not in TARGETS]
  if unknown or not names:
    raise ValueError(f"config.lora.targets={text!r}: {unknown or 'no names'}; choose from {', '.join(TARGETS)} "
                     "(comma-separated) or 'all'")
  return names


def _layers(model: nnx.Module) -> model_lib.DecoderLayers:
  return model.backbone.layers if isinstance(model, model_lib.RewardModel) else model.layers


def has_adapters(model: nnx.Module) -> bool:
  return bool(nnx.state(model, model_lib.LoRAParam))


def attach(model: nnx.Module, lora_cfg, mesh, rules, seed: int) -> None:
  """Adds zero-effect adapters of rank lora_cfg.rank to the targeted projections of `model` (a Decoder or a
  RewardModel), each created on its shards: A takes W's input axes' sharding, B its output axes'."""
  layers = _layers(model)
  if has_adapters(model):
    raise ValueError("the model already has LoRA adapters")
  rank, key = int(lora_cfg.rank), jax.random.key(seed)
  for i, name in enumerate(parse_targets(lora_cfg.targets)):
    w = getattr(layers, name)
    n_in = model_lib.LORA_INPUT_AXES[name]
    axes = tuple(w.get_metadata()["out_sharding"])
    shape = w[...].shape
    a_shape, a_axes = shape[:1 + n_in] + (rank,), axes[:1 + n_in] + (None,)
    b_shape, b_axes = shape[:1] + (rank,) + shape[1 + n_in:], axes[:1] + (None,) + axes[1 + n_in:]
    bound = 1.0 / math.sqrt(math.prod(shape[1:1 + n_in]))
    shard = lambda names, shp: jax.sharding.NamedSharding(  # noqa: E731
        mesh, sharding_lib.logical_to_spec(names, shp, mesh, rules))
    a = jax.jit(lambda k, s=a_shape: jax.random.uniform(k, s, jnp.float32, -bound, bound),
                out_shardings=shard(a_axes, a_shape))(jax.random.fold_in(key, i))
    b = jax.jit(lambda s=b_shape: jnp.zeros(s, jnp.float32), out_shardings=shard(b_axes, b_shape))()
    setattr(layers, f"{name}_lora_a", model_lib.LoRAParam(a, out_sharding=a_axes, eager_sharding=False))
    setattr(layers, f"{name}_lora_b", model_lib.LoRAParam(b, out_sharding=b_axes, eager_sharding=False))
  layers.lora_scale = float(lora_cfg.alpha) / rank


def trainable(model: nnx.Module):
  """The nnx filter of what a train step differentiates: every nnx.Param, or with adapters only them (and a reward
  model's score head)."""
  if not has_adapters(model):
    return nnx.Param
  if isinstance(model, model_lib.RewardModel):
    return nnx.Any(model_lib.LoRAParam, nnx.PathContains("score"))
  return model_lib.LoRAParam


def split(model: nnx.Module):
  """(graphdef, params, frozen, rest) of `model`: the parameters a train step differentiates (`trainable`), the other
  parameters, which a LoRA step reads but does not train (None without adapters: params are all of them), and the
  non-parameter state; `train.merge_model` puts them back together."""
  graphdef, params, frozen, rest = nnx.split(model, trainable(model), nnx.Param, ...)
  return graphdef, params, frozen if has_adapters(model) else None, rest


def zero_like(params):
  """The adapters `params` (nnx.State of LoRAParams) at zero: with them the model computes its frozen weights."""
  return jax.tree.map(jnp.zeros_like, params)


def _on_host(x: jax.Array) -> np.ndarray:
  """The whole array on this host; one sharded over several processes' devices is gathered (every process must call
  this, as every process runs the stage)."""
  return np.asarray(jax.device_get(x) if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


def adapters(model: nnx.Module) -> dict[str, np.ndarray]:
  """{'<name>_lora_a' / '<name>_lora_b': host array} of the model's adapters, and 'lora_scale' (alpha / r)."""
  layers = _layers(model)
  out = {f"{n}_lora_{ab}": _on_host(getattr(layers, f"{n}_lora_{ab}")[...])
         for n in TARGETS for ab in "ab" if hasattr(layers, f"{n}_lora_{ab}")}
  out["lora_scale"] = np.asarray(layers.lora_scale, np.float32)
  return out


def merge(model: nnx.Module) -> None:
  """Folds the adapters into their weights (W + scale * A B in float32, cast back to W's dtype, on W's shards) and
  removes them: the model then computes what it computed with them, without them."""
  layers = _layers(model)
  for name in TARGETS:
    if not hasattr(layers, f"{name}_lora_a"):
      continue
    w = getattr(layers, name)
    a, b = getattr(layers, f"{name}_lora_a")[...], getattr(layers, f"{name}_lora_b")[...]

    def fold(w, a, b):  # Per layer: A [*in, r] . B [r, *out] = [*in, *out], W's layout.
      delta = jax.vmap(lambda a1, b1: jnp.tensordot(a1, b1, axes=1))(a.astype(jnp.float32), b.astype(jnp.float32))
      return (w.astype(jnp.float32) + layers.lora_scale * delta).astype(w.dtype)

    w[...] = jax.jit(fold, out_shardings=w[...].sharding)(w[...], a, b)
    delattr(layers, f"{name}_lora_a")
    delattr(layers, f"{name}_lora_b")
  layers.lora_scale = 0.0


def peft_files(saved: dict[str, np.ndarray], out: str, *, alpha: float, base_model: str = "") -> str:
  """Writes adapters (as `adapters` returns them) as PEFT's LoRA layout for a causal LM: adapter_model.safetensors
  (base_model.model.model.layers.{i}.<module>.lora_A.weight [r, in], lora_B.weight [out, r]) and
  adapter_config.json. Returns `out`. Loadable with peft.PeftModel.from_pretrained(<base>, out)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  names = sorted({k.rsplit("_lora_", 1)[0] for k in saved if "_lora_" in k}, key=TARGETS.index)
  if not names:
    raise ValueError("no LoRA adapters to write")
  tensors, rank = {}, None
  for name in names:
    a, b = saved[f"{name}_lora_a"].astype(np.float32), saved[f"{name}_lora_b"].astype(np.float32)
    rank = a.shape[-1]
    for i in range(a.shape[0]):
      prefix = f"base_model.model.model.layers.{i}.{HF_MODULES[name]}"
      tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T)  # [r, in]
      tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T)  # [out, r]
  os.makedirs(out, exist_ok=True)
  save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank), "lora_alpha": float(alpha),
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "target_modules": [HF_MODULES[n].split(".")[-1] for n in names], "base_model_name_or_path": base_model}
  with open(os.path.join(out, "adapter_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  return out
