"""The embedded default: the synthetic sort/reverse task, a small model trained from scratch, the full pipeline.

    python -m var_jax.main --config=configs/tiny.py

sft (imitates a noisy demonstrator) -> reward (Bradley-Terry on gold-ordered pairs) -> score -> var and dpo
-> eval (gold reward, reward-model reward, win rates, KL). No network; minutes on 2 CPU cores.
"""
from var_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.source = "synthetic"
  c.data.max_prompt_len = 16
  c.data.max_response_len = 12
  c.data.max_responses = 2
  c.data.group_size = 8
  c.data.block_size = 0            # Score exactly the groups training reads (G = B); a sweep over B sets a G.
  c.data.groups_per_batch = 4
  c.data.bucket = 8
  c.data.num_sft = 4000
  c.data.num_pairs = 2000
  c.data.num_eval = 128
  c.model.preset = "tiny"
  c.model.vocab_size = 0           # The task's tokenizer size.
  c.sft.steps = 400
  c.sft.lr = 3e-3
  c.reward.steps = 200
  c.reward.lr = 1e-3
  c.var.steps = 200
  c.var.lr = 3e-4
  c.var.lam = 0.1
  c.dpo.steps = 200
  c.dpo.lr = 3e-4
  c.dpo.beta = 0.1
  c.chosen.steps = 200
  c.chosen.lr = 3e-4
  c.checkpoint.every = 100
  c.log_every = 50
  c.eval_every = 100
  c.eval.num_prompts = 128
  c.eval.max_new_tokens = 12
  c.eval.temperature = 1.0         # Samples, so kl_to_ref is an unbiased KL estimate.
  return c
