"""The paper's setting: Helpful-and-Harmless Assistant (Anthropic HH-RLHF) with a pretrained Llama/Qwen2 policy.

    python -m var_jax.main --config=configs/hha.py --workdir=gs://BUCKET/var/hha
    # local files instead of the hub (e.g. the shared harmless-base test split):
    python -m var_jax.main --config=configs/hha.py --config.data.source=../shared/data/hh_rlhf/harmless-base_test.jsonl.gz

Pipeline: sft on chosen responses -> Bradley-Terry reward model from the SFT backbone -> cross-context scoring
-> VAR (and the DPO baseline) -> eval (greedy, 128 new tokens, as A-LoL/the paper's HHA evaluation).
Sizes are for a TPU pod slice or a multi-GPU host (see launch/README.md); sweep lambda and group_size (a sweep over
group_size scores blocks of --config.data.block_size=64 once for every B dividing it; a single run scores its own
groups of 8, 1/8 of that).
"""
from var_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.source = "Anthropic/hh-rlhf"   # Hub id (needs network) or a local .jsonl[.gz] with chosen/rejected.
  c.data.data_dir = ""                  # "" = all HH subsets; e.g. "harmless-base" or "helpful-base".
  c.data.format = "hh"
  c.data.split = "train"
  c.data.eval_source = "Anthropic/hh-rlhf"
  c.data.eval_split = "test"
  c.data.skip_invalid = True            # HH has a few empty responses: skip and count them.
  c.data.max_prompt_len = 384
  c.data.max_response_len = 128
  c.data.max_responses = 2
  c.data.group_size = 8                 # B: the paper's best in-batch size.
  c.data.block_size = 0                 # G = B: the score stage computes only the groups training reads; a sweep
                                        # over B <= 64 sets --config.data.block_size=64 (8x the scoring of B = 8).
  c.data.groups_per_batch = 16          # 128 prompts / 256 sequences per step (divide over data x fsdp).
  c.data.bucket = 128
  c.model.path = "Qwen/Qwen2.5-0.5B-Instruct"   # Any Llama/Qwen2-family HF id or local directory.
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  # The mesh fits itself (config.resolve_mesh): data takes as many devices as split the 16 groups evenly, tensor
  # the rest. 1, 2, 4, 8, 16 devices: all data-parallel (6 GPUs would give data 2 x tensor 3, which divides none of
  # Qwen2.5-0.5B's heads, MLP width or vocabulary, so nothing splits: use 4 or 8); v5e-64 and v5p-128 (64 chips,
  # 16 hosts): data 16 x tensor 4. v5e-256 (64 hosts of 4 chips): data 16 x tensor 16, each tensor group over 4
  # hosts (on ICI) that read the same data; groups_per_batch a multiple of 64 would keep them within a host.
  c.mesh.data = -1
  c.mesh.fsdp = 1                       # Raise (e.g. to the chips per host) for models that need FSDP.
  c.mesh.tensor = -1
  c.sft.on = "chosen"
  c.sft.steps = 2000
  c.sft.lr = 1e-5
  c.reward.source = "train"             # Or an HF *ForSequenceClassification id / dir with a 1-label head.
  c.reward.steps = 2000
  c.reward.lr = 1e-5
  c.var.steps = 2000
  c.var.lr = 1e-6
  c.var.lam = 1.0                       # The KL coefficient, in reward standard deviations; sweep it (launch.sweep).
  # Per-token log pi_ref and standardised rewards: summed log-probs of whole responses would decide the weights
  # alone on real data (docs/math.md). --config.var.paper=True gives the paper's formula; report both.
  c.var.length_normalize = True
  c.var.standardize_rewards = True
  c.var.normalizer = "cross_context"
  c.dpo.steps = 2000
  c.dpo.lr = 1e-6
  c.dpo.beta = 0.1
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.0
  c.checkpoint.every = 500
  c.log_every = 20
  c.eval_every = 500
  c.eval.num_prompts = 512
  c.eval.max_new_tokens = 128
  c.eval.temperature = 0.0
  c.eval.batch_size = 64
  return c
