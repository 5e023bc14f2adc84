"""Learning-rate schedules: linear warmup, then a decay (config.optim.schedule is one of SCHEDULES)."""
import optax

SCHEDULES = ("cosine", "linear", "constant")  # config.optim.schedule


def learning_rate_schedule(peak_lr: float, total_steps: int, optim_cfg) -> optax.Schedule:
  """Linear warmup to peak_lr, then cosine / linear decay to end_lr_frac * peak_lr (or constant)."""
  warmup = min(optim_cfg.warmup_steps, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  end = peak_lr * optim_cfg.end_lr_frac
  if optim_cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=optim_cfg.end_lr_frac)
  elif optim_cfg.schedule == "linear":
    decay = optax.linear_schedule(peak_lr, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak_lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, warmup), decay], [warmup])
