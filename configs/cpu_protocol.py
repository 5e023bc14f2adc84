"""The real-data evaluation protocol cut down for 2 CPU cores: what configs/smollm2_alpaca.py and
configs/smollm2_hh.py share, so their two CPU-sized runs train, judge and evaluate alike."""


def cut_down(c):
  """Shrinks a protocol config (configs/smollm2_gpu.py, configs/smollm2_alpaca_gpu.py) in place and returns it: a
  dozen steps of 4 prompts per policy stage, a 24-step judge, 64 eval prompts with 2 samples of at most 96 tokens."""
  c.model.dtype = "float32"
  c.model.attention_impl = "xla"
  c.data.bucket = 32
  c.data.group_size = 2                 # B = 2 prompts (4 candidates) per VAR normalizer group: cross-context scoring
  c.data.block_size = 2                 # costs G*G*K pairs per block, so G = 2 halves the score stage of G = 4.
  c.data.groups_per_batch = 2           # 4 prompts, 8 sequences per step.
  c.sft.steps = 12
  c.sft.lr = 3e-5
  c.reward.steps = 20
  c.reward.lr = 1e-4
  c.var.steps = 12
  c.var.lr = 3e-5
  c.dpo.steps = 12
  c.chosen.steps = 12
  c.score.steps = 12                    # Score only the blocks 12 steps draw (a few dozen of the training blocks).
  c.judge.steps = 24
  c.judge.lr = 1e-4
  c.optim.warmup_steps = 2
  c.log_every = 4
  c.eval.max_new_tokens = 96
  c.eval.num_prompts = 64               # Of the validation / test prompts; 2 samples each, ...
  c.eval.greedy = False                 # ... and no greedy answers: eval is most of the run's time on 2 cores.
  c.eval.batch_size = 64
  return c
