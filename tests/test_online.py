"""The online stages (grpo, online_var): their math against NumPy float64, the rollout's layout, the on-device gold
reward, what one GRPO step does, the sampling policy kept straight over several updates, 8 devices = 1, and resume
after SIGKILL = an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import ROOT, tiny_config
from var_jax import config as config_lib
from var_jax import losses
from var_jax import model as model_lib
from var_jax import objectives
from var_jax import online
from var_jax import sharding as sharding_lib
from var_jax import train as train_lib
from var_jax.data import synthetic
from var_jax.data import tokenize


# ----------------------------------------------------------------------------------------------------------------
# NumPy float64 references, written from the papers' formulas.


def np_advantages(r, valid, eps=1e-4):
  out = np.zeros_like(r, np.float64)
  for i in range(r.shape[0]):
    x = r[i][valid[i]].astype(np.float64)
    if len(x):
      std = x.std(ddof=1) if len(x) > 1 else 0.0
      out[i][valid[i]] = (x - x.mean()) / (std + eps)
  return out


def np_grpo_terms(logp, old, ref, adv, mask, eps, beta, valid):
  out = np.zeros(adv.shape, np.float64)
  for i in np.ndindex(adv.shape):
    if not valid[i]:
      continue
    total, n = 0.0, 0
    for t in range(logp.shape[-1]):
      if not mask[i + (t,)]:
        continue
      rho = np.exp(logp[i + (t,)] - old[i + (t,)])
      a = adv[i]
      d = ref[i + (t,)] - logp[i + (t,)]
      total += min(rho * a, np.clip(rho, 1 - eps, 1 + eps) * a) - beta * (np.exp(d) - d - 1)
      n += 1
    out[i] = -total / max(n, 1)
  return out


def np_online_var_weights(r, lam, valid, ref=None, sample=None):
  s = r.astype(np.float64) / lam
  if ref is not None:
    s = s + ref - sample
  out = np.zeros_like(s)
  for i in range(s.shape[0]):
    x = s[i][valid[i]]
    if len(x):
      e = np.exp(x - x.max())
      out[i][valid[i]] = e / e.sum()
  return out


def test_group_advantages_match_numpy():
  rng = np.random.default_rng(0)
  r = rng.normal(size=(5, 6))
  valid = rng.random((5, 6)) > 0.2
  valid[0] = True
  r[1] = 0.7  # All equal: no signal.
  valid[2] = False  # No valid response.
  got = np.asarray(losses.group_advantages(jnp.asarray(r, jnp.float32), jnp.asarray(valid)))
  np.testing.assert_allclose(got, np_advantages(r, valid), rtol=1e-4, atol=1e-4)
  assert np.all(got[1] == 0) and np.all(got[2] == 0)


@pytest.mark.parametrize("beta", [0.0, 0.04, 0.5])
def test_grpo_terms_match_numpy_and_clip(beta):
  rng = np.random.default_rng(1)
  shape = (3, 4, 7)
  old = rng.normal(-2, 0.5, shape)
  logp = old + rng.normal(0, 0.4, shape)  # Ratios in and out of [0.8, 1.2].
  ref = old + rng.normal(0, 0.3, shape)
  mask = rng.random(shape) > 0.3
  adv = rng.normal(size=shape[:2])
  valid = rng.random(shape[:2]) > 0.2
  f = lambda lp: losses.grpo_terms(lp, jnp.asarray(old, jnp.float32), jnp.asarray(ref, jnp.float32),  # noqa: E731
                                   jnp.asarray(adv, jnp.float32), jnp.asarray(mask), clip_eps=0.2, kl_coef=beta,
                                   valid=jnp.asarray(valid))
  got = np.asarray(f(jnp.asarray(logp, jnp.float32)))
  np.testing.assert_allclose(got, np_grpo_terms(logp, old, ref, adv, mask, 0.2, beta, valid), rtol=2e-5, atol=2e-5)
  # Gradient: d/d logp_t of the per-token objective, by the chain rule on the NumPy formula.
  grad = np.asarray(jax.grad(lambda lp: f(lp).sum())(jnp.asarray(logp, jnp.float32)))
  rho = np.exp(logp - old)
  a = adv[..., None]
  unclipped = (rho * a <= np.clip(rho, 0.8, 1.2) * a) | ((rho > 0.8) & (rho < 1.2))
  d_surrogate = np.where(unclipped, rho * a, 0.0)
  d_kl = 1.0 - np.exp(ref - logp)  # d/dlogp of exp(d) - d - 1, d = ref - logp.
  n = np.maximum(mask.sum(-1, keepdims=True), 1)
  want = np.where(mask & valid[..., None], -(d_surrogate - beta * d_kl) / n, 0.0)
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)


def test_k3_is_an_unbiased_nonnegative_kl_estimate():
  rng = np.random.default_rng(2)
  p = np.array([0.5, 0.3, 0.2])
  q = np.array([0.2, 0.3, 0.5])
  y = rng.choice(3, size=200_000, p=p)  # Samples of pi_theta = p.
  k3 = np.asarray(losses.k3_kl(jnp.log(jnp.asarray(p[y])), jnp.log(jnp.asarray(q[y]))))
  assert k3.min() >= 0
  assert abs(k3.mean() - np.sum(p * np.log(p / q))) < 0.01


@pytest.mark.parametrize("from_policy", [False, True])
def test_online_var_weights_match_numpy(from_policy):
  rng = np.random.default_rng(3)
  r = rng.normal(size=(4, 6))
  valid = rng.random((4, 6)) > 0.25
  valid[3] = False
  ref, sample = (rng.normal(-20, 5, (4, 6)), rng.normal(-20, 5, (4, 6))) if from_policy else (None, None)
  j = lambda x: None if x is None else jnp.asarray(x, jnp.float32)  # noqa: E731
  got = np.asarray(losses.online_var_weights(j(r), 0.3, jnp.asarray(valid), ref_logp=j(ref), sample_logp=j(sample)))
  np.testing.assert_allclose(got, np_online_var_weights(r, 0.3, valid, ref, sample), rtol=1e-5, atol=1e-6)
  assert np.all(got[3] == 0)
  with pytest.raises(ValueError, match="both ref_logp and sample_logp"):
    losses.online_var_weights(j(r), 0.3, jnp.asarray(valid), ref_logp=j(r))


@pytest.mark.parametrize("sampler", ["reference", "policy"])
def test_online_var_weights_reweight_samples_to_the_tilted_target(sampler):
  """The derivation in docs/math.md (Online): self-normalised weights turn samples of q into samples of
  pi* ∝ pi_ref exp(r / lambda), for q = pi_ref (reference cancels) and for q = another policy."""
  rng = np.random.default_rng(4)
  pi_ref = np.array([0.4, 0.3, 0.2, 0.1])
  reward = np.array([0.0, 0.5, 1.0, 0.2])
  lam = 0.5
  target = pi_ref * np.exp(reward / lam)
  target /= target.sum()
  q = pi_ref if sampler == "reference" else np.array([0.1, 0.2, 0.3, 0.4])
  y = rng.choice(4, size=(1, 400_000), p=q)
  logs = {} if sampler == "reference" else {"ref_logp": jnp.log(jnp.asarray(pi_ref[y], jnp.float32)),
                                            "sample_logp": jnp.log(jnp.asarray(q[y], jnp.float32))}
  w = np.asarray(losses.online_var_weights(jnp.asarray(reward[y], jnp.float32), lam, jnp.ones(y.shape, bool), **logs))
  estimate = np.bincount(y[0], weights=w[0].astype(np.float64), minlength=4)
  np.testing.assert_allclose(estimate, target, atol=0.01)


# ----------------------------------------------------------------------------------------------------------------
# The rollout: gold reward on device, the training rows' layout.


def _tok():
  return tokenize.Tokenizer(synthetic.build_tokenizer(), max_prompt_len=16, max_response_len=12)


def test_gold_rewards_on_device_equal_the_python_gold_reward():
  tok = _tok()
  rng = np.random.default_rng(5)
  records = synthetic.preference_records(40, seed=1, k=2)
  table = online.prompt_table(records, tok, gold=True, bucket=8)
  vocab = len(synthetic.VOCAB)
  n = 11
  response = rng.integers(0, vocab, size=(len(table.tokens), n)).astype(np.int32)
  for i in range(0, len(response), 3):  # Some near-correct answers, so the reward takes many values.
    answer = table.target[i, :table.target_len[i]]
    response[i, :len(answer)] = answer
    response[i, len(answer)] = tok.eos_id
  counts = rng.integers(1, n + 1, size=len(response)).astype(np.int32)
  ignore = tok.tok.convert_tokens_to_ids(list(synthetic.SPECIAL))
  got = np.asarray(online.gold_rewards(jnp.asarray(response), jnp.asarray(counts), jnp.asarray(table.target),
                                       jnp.asarray(table.target_len), jnp.asarray(ignore)))
  prompts = list({tok.render(r.prompt): r.prompt for r in records}.values())
  want = [synthetic.gold_reward(p, tok.tok.convert_ids_to_tokens(response[i, :counts[i]].tolist()))
          for i, p in enumerate(prompts)]
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert len(set(np.round(want, 3))) > 5


@pytest.mark.slow
def test_rollout_rows_score_responses_as_the_unpadded_sequence():
  cfg = model_lib.get_config("tiny", vocab_size=len(synthetic.VOCAB), dtype="float32")
  model = model_lib.Decoder(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(6)
  prompts = [rng.integers(4, 19, size=n).astype(np.int32) for n in (3, 7, 5)]
  tokens, lengths, _ = __import__("var_jax.sampling").sampling.left_pad(prompts, 3, 8, 0)
  response = rng.integers(4, 19, size=(3, 5)).astype(np.int32)
  counts = np.array([5, 2, 4], np.int32)
  rows, last = online.rollout_sequences(jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(response),
                                        jnp.asarray(counts))
  hidden = model(rows["inputs"], rows["positions"], rows["segment_ids"])
  got = np.asarray(model.sequence_logprobs(hidden, rows["targets"], rows["loss_mask"]))
  for i, p in enumerate(prompts):
    seq = np.concatenate([p, response[i, :counts[i]]])[None]
    logits = model.logits(model(jnp.asarray(seq), *model_lib.default_inputs(seq)))[0]
    logp = jax.nn.log_softmax(logits, -1)
    want = sum(float(logp[len(p) - 1 + t, seq[0, len(p) + t]]) for t in range(counts[i]))
    np.testing.assert_allclose(got[i], want, rtol=1e-5)
    assert int(last[i]) == 8 + counts[i] - 1 and int(rows["inputs"][i, last[i]]) == response[i, counts[i] - 1]


# ----------------------------------------------------------------------------------------------------------------
# One iteration on the embedded task.


def _setup(stage, **overrides):
  cfg = tiny_config(**{"reward.source": "gold", "online.prompts_per_step": 2, "online.group": 8,
                       "online.max_new_tokens": 12, "optim.warmup_steps": 0, **overrides})
  tok = _tok()
  table = online.prompt_table(synthetic.preference_records(16, seed=0, k=2), tok, gold=True, bucket=8)
  mesh = sharding_lib.make_mesh(-1, 1, 1)
  mcfg = model_lib.get_config("tiny", vocab_size=len(synthetic.VOCAB), dtype="float32")
  policy = model_lib.Decoder(mcfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
  objective = objectives.build(stage, cfg)
  tx, schedule = train_lib.make_optimizer(cfg[stage].lr, 100, cfg.optim)
  put = lambda x: jnp.asarray(x)  # noqa: E731
  device_table = {k: put(v) for k, v in vars(table).items() if v is not None}
  ignore = jnp.asarray(tok.tok.convert_tokens_to_ids(list(synthetic.SPECIAL)))
  iteration = online.make_iteration(objective, cfg, graphdef, rest, tx, schedule, mesh,
                                    num_prompts=len(table.tokens), eos_id=tok.eos_id, pad_id=tok.pad_id,
                                    ignore_ids=ignore)
  state = {"train": train_lib.init_train_state(params, tx), "rng": jax.random.key_data(jax.random.key(1)),
           "sampled_tokens": jnp.zeros(())}
  return cfg, tok, device_table, ignore, mesh, graphdef, rest, params, iteration, state, objective, tx, schedule


@pytest.mark.slow
def test_one_grpo_step_raises_the_log_prob_of_the_best_sampled_response():
  cfg, tok, table, ignore, mesh, graphdef, rest, params, _, _, objective, tx, schedule = _setup(
      "grpo", **{"grpo.lr": 3e-3, "online.prompts_per_step": 1, "online.group": 16})
  merge = lambda p: nnx.merge(graphdef, p, rest)  # noqa: E731
  raised = 0
  for seed in range(3):
    idx = jnp.asarray([seed])
    batch = online.sample_rollout(merge(params), merge(params), None, table, idx, jax.random.key(seed), cfg,
                                  eos_id=tok.eos_id, pad_id=tok.pad_id, ignore_ids=ignore, mesh=mesh)
    reward = np.asarray(batch["reward"][0])
    assert reward.max() > reward.min(), reward  # The group carries a signal.
    step = train_lib.make_train_step(objective, graphdef, rest, tx, schedule)
    new_state, metrics = jax.jit(step)(train_lib.init_train_state(params, tx), batch)
    assert float(metrics["grpo/clip_fraction"]) == 0.0  # First update: the sampler is the policy, ratio 1.
    logp = lambda p: np.asarray(objectives.sequence_outputs(merge(p), batch)[0][0])  # noqa: E731
    best = int(np.argmax(reward))
    raised += logp(new_state["params"])[best] > logp(params)[best]
  assert raised == 3


def test_several_updates_per_rollout_keep_the_sampling_policy_fixed():
  """With mu = 3 updates per rollout, the rollout is sampled and scored by the parameters as they were at the start
  of the iteration, and the updates are exactly three train steps on that one batch."""
  cfg, tok, table, ignore, mesh, graphdef, rest, params, iteration, state, objective, tx, schedule = _setup(
      "grpo", **{"online.updates_per_rollout": 3, "grpo.lr": 3e-3})
  new_state, metrics = jax.jit(iteration)(state, table, params, None)
  merge = lambda p: nnx.merge(graphdef, p, rest)  # noqa: E731
  key = jax.random.split(jax.random.wrap_key_data(state["rng"]))[1]
  idx = online.iteration_prompts(jax.random.key(cfg.seed), 0, len(table["tokens"]), 2)
  batch = online.sample_rollout(merge(params), merge(params), None, table, idx, key, cfg, eos_id=tok.eos_id,
                                pad_id=tok.pad_id, ignore_ids=ignore, mesh=mesh)
  step = jax.jit(train_lib.make_train_step(objective, graphdef, rest, tx, schedule))
  manual = train_lib.init_train_state(params, tx)
  for _ in range(3):
    manual, last = step(manual, batch)
  assert int(new_state["train"]["step"]) == 3
  for a, b in zip(jax.tree.leaves(new_state["train"]["params"]), jax.tree.leaves(manual["params"])):
    # Equal up to float rounding (the scanned updates are one fused program); Adam's first steps divide by tiny
    # second moments, so a few entries differ by ~1e-5.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)
  np.testing.assert_allclose(float(metrics["reward"]), float(last["reward"]), rtol=1e-6)
  assert float(new_state["sampled_tokens"]) == float(jnp.sum(batch["loss_mask"]))


def test_online_var_sampler_is_refreshed_every_n_rollouts():
  cfg, _, table, _, _, _, _, params, iteration, state, *_ = _setup(
      "online_var", **{"online_var.sample_from": "policy", "online_var.refresh_every": 2, "online_var.lr": 3e-3})
  state["sampler"] = jax.tree.map(jnp.copy, params)
  run = jax.jit(iteration)
  one, _ = run(state, table, params, None)
  for a, b in zip(jax.tree.leaves(one["sampler"]), jax.tree.leaves(params)):  # Not yet refreshed.
    np.testing.assert_array_equal(a, b)
  two, _ = run(one, table, params, None)
  for a, b in zip(jax.tree.leaves(two["sampler"]), jax.tree.leaves(two["train"]["params"])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(two["sampler"]), jax.tree.leaves(params)))


@pytest.mark.parametrize("field,value,message", [
    ("online.group", 1, "GRPO's advantages"),
    ("reward.source", "dataset", "online stages reward new samples"),
    ("grpo.clip_eps", 0.0, "clip_eps must be > 0"),
    ("online.prompts_per_step", 3, "must divide over the 2"),
])
def test_online_config_errors_name_the_field(field, value, message):
  cfg = tiny_config(**{"stages": "sft,grpo", field: value, "mesh.data": 2})
  with pytest.raises(ValueError, match=message):
    config_lib.validate(cfg, 2)


# ----------------------------------------------------------------------------------------------------------------
# The stages from the command line: eval reports them, 8 devices = 1, SIGKILL + resume = uninterrupted.

_ONLINE = ["--config.reward.source=gold", "--config.online.prompts_per_step=8", "--config.online.group=4",
           "--config.checkpoint.async_save=False", "--config.log_every=2", "--config.eval_every=0",
           "--config.data.num_sft=256", "--config.data.num_pairs=64", "--config.data.groups_per_batch=8", "--config.data.num_eval=32",
           "--config.eval.num_prompts=8", "--config.eval.max_new_tokens=6"]


def _run(workdir, *overrides, devices=1, check=True):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  cmd = [sys.executable, "-m", "var_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}", *_ONLINE,
         *overrides]
  return subprocess.run(cmd, cwd=ROOT, env=env, check=check, capture_output=True, text=True, timeout=600)


def _params(workdir, stage):
  """A finished stage's parameters on this process's first device (they may have been saved from 8 devices)."""
  ocp = __import__("orbax.checkpoint").checkpoint
  path = os.path.abspath(os.path.join(workdir, stage, "params"))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path).item_metadata
    return ckptr.restore(path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta))


@pytest.fixture(scope="module")
def reference_workdir(tmp_path_factory):
  """A finished sft stage (the reference) that the tests below copy."""
  workdir = str(tmp_path_factory.mktemp("online") / "ref")
  _run(workdir, "--config.stages=sft", "--config.sft.steps=30")
  return workdir


def _copy(src, dst):
  subprocess.run(["cp", "-r", src, dst], check=True)
  return dst


@pytest.mark.slow
def test_online_stages_on_8_devices_equal_one_device_and_eval_reports_them(reference_workdir, tmp_path):
  steps = ["--config.stages=sft,grpo,online_var,eval", "--config.sft.steps=30", "--config.grpo.steps=4",
           "--config.online_var.steps=4", "--config.online_var.refresh_every=2"]
  one = _copy(reference_workdir, str(tmp_path / "one"))
  eight = _copy(reference_workdir, str(tmp_path / "eight"))
  _run(one, *steps)
  _run(eight, *steps, devices=8)
  for stage in ("grpo", "online_var"):
    for a, b in zip(jax.tree.leaves(_params(one, stage)), jax.tree.leaves(_params(eight, stage))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    lines = [json.loads(l) for l in open(os.path.join(one, stage, "logs", "metrics.jsonl"))]
    lines8 = [json.loads(l) for l in open(os.path.join(eight, stage, "logs", "metrics.jsonl"))]
    logs, logs8 = ([l for l in x if "reward" in l] for x in (lines, lines8))
    assert [l["reward"] for l in logs] == pytest.approx([l["reward"] for l in logs8], rel=1e-5)
    assert [l["sampled_tokens"] for l in logs] == [l["sampled_tokens"] for l in logs8]
    # The shared loop logs throughput as for offline stages, and evaluates the policy on held-out prompts at the end.
    assert all(l["tokens_per_s"] > 0 and l["mfu"] > 0 for l in logs)
    held_out, held_out8 = ([l for l in x if "eval/reward" in l] for x in (lines, lines8))
    assert [l["step"] for l in held_out] == [4]
    assert held_out[0]["eval/reward"] == pytest.approx(held_out8[0]["eval/reward"], rel=1e-5)
    assert held_out[0]["eval/kl_to_ref_per_token"] >= 0
  results = json.load(open(os.path.join(one, "eval", "results.json")))
  assert {"grpo", "online_var"} <= set(results["policies"])


@pytest.mark.slow
def test_online_resume_after_sigkill_equals_an_uninterrupted_run(reference_workdir, tmp_path):
  steps = ["--config.stages=sft,grpo", "--config.sft.steps=30", "--config.grpo.steps=60",
           "--config.checkpoint.every=4", "--config.online.updates_per_rollout=2"]
  straight = _copy(reference_workdir, str(tmp_path / "straight"))
  _run(straight, *steps)
  killed = _copy(reference_workdir, str(tmp_path / "killed"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  cmd = [sys.executable, "-m", "var_jax.main", "--config=configs/tiny.py", f"--workdir={killed}", *_ONLINE, *steps]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  ckpt = os.path.join(killed, "grpo", "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt) and any(x.isdigit() and int(x) >= 8 for x in os.listdir(ckpt)):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.01)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL, err[-2000:]
  assert not os.path.exists(os.path.join(killed, "grpo", "DONE.json"))
  resumed = _run(killed, *steps)
  assert "[grpo] resumed from step" in resumed.stderr
  for a, b in zip(jax.tree.leaves(_params(straight, "grpo")), jax.tree.leaves(_params(killed, "grpo"))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_online_stage_on_two_processes_equals_one_process(reference_workdir, tmp_path, run_jax_processes):
  """Two real JAX processes (gloo) run the same iterations as one: every process holds the whole prompt table, the
  rollout's rows are split over the processes' devices, and the result is the same policy."""
  steps = ["--config.stages=sft,grpo", "--config.sft.steps=30", "--config.grpo.steps=4"]
  one = _copy(reference_workdir, str(tmp_path / "one"))
  two = _copy(reference_workdir, str(tmp_path / "two"))
  _run(one, *steps)
  run_jax_processes(lambda i, port: ["-m", "var_jax.main", "--config=configs/tiny.py", f"--workdir={two}", *_ONLINE,
                                     *steps, f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                                     f"--process_id={i}"])
  logs = [[l for l in map(json.loads, open(os.path.join(w, "grpo", "logs", "metrics.jsonl"))) if "reward" in l]
          for w in (one, two)]
  assert [l["reward"] for l in logs[0]] == pytest.approx([l["reward"] for l in logs[1]], rel=1e-5)
  for a, b in zip(jax.tree.leaves(_params(one, "grpo")), jax.tree.leaves(_params(two, "grpo"))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
