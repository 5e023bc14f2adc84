"""configs/hha.py's data and schedule with a Llama-family policy of 1B, 8B or 70B parameters, for `var_jax.plan`:

    /work/tpuvenv/bin/python -m var_jax.plan --config=configs/plan_llama.py:1b --topology=v5e-64
    /work/tpuvenv/bin/python -m var_jax.plan --config=configs/plan_llama.py:8b --topology=v5e-64
    /work/tpuvenv/bin/python -m var_jax.plan --config=configs/plan_llama.py:70b --topology=v5p-128

Shapes only (var_jax.model.PRESETS, random init): a real run sets model.path to the checkpoint. Each size's mesh
is pure FSDP over the slice's 64 chips (parameters, gradients and AdamW moments sharded 64 ways) with one
normalizer group (8 prompts x 2 responses x 512 tokens) per chip and full rematerialisation; the README shows what
the plan reports for them.
"""
from configs import hha

# size -> (model preset, data.groups_per_batch, mesh.fsdp)
SIZES = {
    "1b": ("llama-3.2-1b", 64, 64),
    "8b": ("llama-3.1-8b", 64, 64),
    "70b": ("llama-3.1-70b", 64, 64),
}


def get_config(size: str = "8b"):
  size = size.lower()  # "8B", as the README writes it, or "8b".
  if size not in SIZES:
    raise ValueError(f"configs/plan_llama.py:{size}: sizes are {sorted(SIZES)}")
  preset, groups, fsdp = SIZES[size]
  c = hha.get_config()
  c.stages = "sft,reward,score,var,dpo,eval"  # chosen's step is sft's.
  c.model.path = ""
  c.model.preset = preset
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.groups_per_batch = groups
  c.online.prompts_per_step = groups
  c.mesh.data = 1
  c.mesh.fsdp = fsdp
  c.mesh.tensor = 1
  return c
