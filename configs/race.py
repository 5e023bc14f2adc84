"""The race (launch/race.py): offline VAR, online VAR, GRPO and DPO from one reference on the embedded task.

    python -m launch.race --config=configs/race.py --seeds=0,1,2 --out=race

Every method is rewarded by the task's gold reward (offline VAR and DPO through the score stage's cached gold rewards
of the preference pairs; GRPO and online VAR on their own samples), trains for the same number of optimizer steps at
its own learning rate (chosen on validation prompts with the same number of trials), and saves a checkpoint every `checkpoint.every` steps, which the race evaluates.
"""
from configs import tiny


def get_config():
  c = tiny.get_config()
  c.stages = "sft,reward,score,var,dpo,grpo,online_var"
  c.reward.source = "gold"
  steps = 300
  for stage in ("var", "dpo", "grpo", "online_var"):
    c[stage].steps = steps
  # Learning rates: launch.race chooses each racer's on the validation prompts (--lr_grid); these are used with
  # --lr_grid= (empty).
  c.var.lr = c.dpo.lr = c.grpo.lr = c.online_var.lr = 3e-4
  c.online.prompts_per_step = 8    # 8 prompts x 8 samples per rollout, one update each.
  c.online.group = 8
  c.online_var.lam = 0.1           # As var.lam.
  c.checkpoint.every = 30          # The race's evaluation points (and the log interval, so elapsed_s is read there).
  c.checkpoint.keep = steps // 30 + 1
  c.log_every = 30
  c.eval_every = 0
  c.data.num_eval = 256
  c.data.validation_fraction = 0.5  # Half the held-out prompts choose each racer's learning rate (--lr_grid).
  c.eval.num_prompts = 128         # Held-out prompts per evaluation, 2 samples each at temperature 1.
  c.eval.samples_per_prompt = 2
  return c
