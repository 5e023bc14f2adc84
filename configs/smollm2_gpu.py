"""SmolLM2-135M-Instruct on HH-RLHF harmless-base under the evaluation protocol of docs/math.md, sized for one GPU.

    python -m launch.tune --config=configs/smollm2_gpu.py --dir=workdir/results/smollm2_hh --metric=judge_reward \
        --space=var:var.lam=0.5,2 --space=dpo:dpo.lr=3e-6,1e-5 --space=chosen:chosen.lr=3e-6,1e-5 \
        --beside=var:var.paper=True,var.lam=1.0 --seeds=0,1,2

The file's first `data.max_records` pairs are the policies' data: a quarter of their prompts (whole first-user-turn
families) is held out and halved into validation prompts (tuning) and test prompts (the table). The held-out judge
is a reward model from the base model trained on the rest of the file, every pair whose first user turn the
policies' data has dropped; its pairwise accuracy on judge pairs it never saw goes into the eval results. Every
policy samples 2 responses per prompt at temperature 1 (and answers once greedily: the greedy_* columns), and win
rates carry bootstrap 95% intervals over prompts.
On 2 CPU cores use --config.model.dtype=float32 --config.model.attention_impl=xla (and expect hours).
"""
from configs import smollm2


def get_config():
  c = smollm2.get_config()
  c.data.max_records = 1024             # The policies' pairs; the judge gets the 1,219 of the rest that share no
                                        # first user turn with them (1,098 to train on, 121 held out).
  c.data.eval_fraction = 0.25           # ~256 held-out prompts: ...
  c.data.validation_fraction = 0.5      # ... half for tuning, half for the test table.
  c.data.max_prompt_len = 128           # Most recent tokens of the dialogue.
  c.data.max_response_len = 128         # Cuts 4% of HH responses (logged), no EOS target on those.
  c.data.group_size = 4                 # B = 4 prompts (8 candidates) per VAR normalizer group.
  c.data.block_size = 4
  c.data.groups_per_batch = 4           # 16 prompts, 32 sequences per step.
  c.model.dtype = "bfloat16"
  c.model.remat = "none"
  c.model.attention_impl = "cudnn"      # Fused flash attention (NVIDIA GPU); "xla" elsewhere.
  c.sft.steps = 80                      # ~1.7 epochs of the ~770 training prompts per stage.
  c.reward.steps = 80
  c.var.steps = 80
  c.dpo.steps = 80
  c.chosen.steps = 80
  c.judge.source = c.data.source        # Same file; overlapping first user turns are dropped.
  c.judge.steps = 128                   # ~1.8 epochs of the judge's ~1,150 training pairs.
  c.judge.lr = 3e-5
  c.judge.heldout_fraction = 0.1
  c.optim.warmup_steps = 10
  c.checkpoint.every = 1000             # Only the final save.
  c.log_every = 24
  c.eval_every = 0
  c.eval_batches = 1
  c.eval.num_prompts = 256              # Every prompt of the split.
  c.eval.samples_per_prompt = 2
  c.eval.temperature = 1.0              # Samples, so kl_to_ref is an unbiased KL estimate; ...
  c.eval.greedy = True                  # ... and one greedy answer per prompt beside them (greedy_* columns).
  c.eval.max_new_tokens = 128
  c.eval.batch_size = 128
  return c
