"""SmolLM2-135M-Instruct on the whole HH-RLHF harmless-base file: the GPU-sized version of configs/smollm2.py.

    python -m var_jax.main --config=configs/smollm2_gpu.py --workdir=workdir/smollm2_hh_gpu

Every held-out prompt is evaluated (12.5% of the file, ~290 prompts), with longer prompts and responses, larger
normalizer groups and ~2 epochs per stage; bfloat16 compute, float32 master weights. Measured on one H100 (see
the README for the time); on 2 CPU cores use configs/smollm2.py.
"""
from configs import smollm2


def get_config():
  c = smollm2.get_config()
  c.data.max_records = 0                # The whole file.
  c.data.max_prompt_len = 256
  c.data.max_response_len = 128
  c.data.group_size = 8
  c.data.block_size = 8
  c.data.groups_per_batch = 4           # 32 prompts, 64 sequences per step.
  c.model.dtype = "bfloat16"
  c.model.remat = "none"
  c.model.attention_impl = "cudnn"      # Fused flash attention (NVIDIA GPU); "xla" elsewhere.
  c.sft.steps = 120
  c.reward.steps = 200
  c.var.steps = 120
  c.dpo.steps = 120
  c.chosen.steps = 120
  c.optim.warmup_steps = 10
  c.checkpoint.every = 1000
  c.log_every = 20
  c.eval.num_prompts = 512              # More than held out: all held-out prompts.
  c.eval.max_new_tokens = 128
  c.eval.batch_size = 64
  return c
