"""The training system: objectives, exact accumulation, compile-once, the tiny pipeline end to end, resume after
SIGKILL, SIGTERM save, NaN stop, config validation."""
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

from var_jax import artifacts
from var_jax import config as config_lib
from var_jax import losses
from var_jax import model as model_lib
from var_jax import objectives
from var_jax import scoring
from var_jax import sharding as sharding_lib
from var_jax import stages
from var_jax import train as train_lib
from var_jax.data import pipeline as data_pipeline
from var_jax.data import synthetic
from var_jax.data import tokenize

from tests.helpers import ROOT, TEST_SIZE, tiny_config

def _var_batch(seed=0, groups=4):
  """A synthetic-task batch with random cross-context scores gathered in."""
  tok = tokenize.Tokenizer(synthetic.build_tokenizer(), max_prompt_len=16, max_response_len=12)
  records = synthetic.preference_records(64, seed=seed)
  pcfg = data_pipeline.PipelineConfig(block_size=8, group_size=4, groups_per_batch=groups, k_max=2, seed=seed,
                                      bucket=8, max_len=28)
  pipe, _ = data_pipeline.build_pipeline(records, tok, pcfg, shard_index=0, shard_count=1)
  rng = np.random.default_rng(seed)
  nb = len(pipe.blocks)
  scores = {"ref_logp": rng.normal(-20, 5, (nb, 8, 16)).astype(np.float32),
            "ref_ntok": rng.integers(2, 9, (nb, 16)).astype(np.float32),
            "reward": rng.normal(0, 1, (nb, 8, 16)).astype(np.float32)}
  return next(stages.with_scores(pipe, scores).iterator()), len(tok.tok)


def _tiny_model(vocab):
  return model_lib.Decoder(model_lib.get_config("tiny", vocab_size=vocab), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("normalizer", losses.NORMALIZERS)
@pytest.mark.parametrize("reduction", losses.REDUCTIONS)
def test_var_objective_equals_per_group_losses(normalizer, reduction):
  batch, vocab = _var_batch()
  cfg = tiny_config(**{"var.normalizer": normalizer, "var.reduction": reduction, "var.lam": 0.7})
  model = _tiny_model(vocab)
  jb = jax.tree.map(jnp.asarray, batch)
  objective = objectives.build("var", cfg)
  const = objective.prepare(jb)
  logp, ntok = objectives.sequence_outputs(model, jb)
  got = objectives.numerator(objective, logp, const) / const["denominator"]
  # Reference: the public loss functions, group by group, then combined as ../shared/docs/var-math.md says.
  num, den_prompts, den_tokens = 0.0, 0, 0.0
  for g in range(batch["inputs"].shape[0]):
    w = losses.var_weights(batch["ref_logp"][g], batch["reward_matrix"][g], batch["owner"][g], 0.7, normalizer,
                           valid=batch["valid"][g])
    num += float(-jnp.sum(w * logp[g]))
    den_prompts += len(set(batch["owner"][g][batch["valid"][g]].tolist()))
    den_tokens += float(jnp.sum(w * ntok[g]))
  want = num / (den_prompts if reduction == "prompt_mean" else den_tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("k", [2, 4])
def test_pair_slots_are_best_and_worst_valid_response(k):
  """Pair objectives (dpo, ipo, reward) train on each prompt's best vs worst response: chosen vs rejected for K=2."""
  tok = tokenize.Tokenizer(synthetic.build_tokenizer(), max_prompt_len=16, max_response_len=12)
  records = synthetic.preference_records(32, seed=1, k=k)
  pcfg = data_pipeline.PipelineConfig(block_size=8, group_size=4, groups_per_batch=2, k_max=k, seed=0, bucket=8,
                                      max_len=28)
  pipe, _ = data_pipeline.build_pipeline(records, tok, pcfg, shard_index=0, shard_count=1)
  batch = next(pipe.iterator())
  batch["valid"][0, :k - 1] = False  # Prompt 0 of group 0 keeps one response: no pair.
  best, worst, pair_valid = map(np.asarray, objectives.pair_slots(jax.tree.map(jnp.asarray, batch)))
  for g in range(batch["owner"].shape[0]):
    for p in range(best.shape[1]):
      slots = [n for n in range(p * k, (p + 1) * k) if batch["valid"][g, n]]
      assert pair_valid[g, p] == (len(slots) >= 2)
      if len(slots) >= 2:
        ranks = {n: batch["rank"][g, n] for n in slots}
        assert best[g, p] == min(slots, key=ranks.get) and worst[g, p] == max(slots, key=ranks.get)
        if k == 2:
          assert batch["is_chosen"][g, best[g, p]] and not batch["is_chosen"][g, worst[g, p]]
  assert not pair_valid[0, 0]


def _objective_setup(stage, groups=4):
  """(objective, graphdef, params, rest, device batch) of `stage` on a batch of `groups` groups (a rollout's fields
  added for the online objectives)."""
  batch, vocab = _var_batch(groups=groups)
  cfg = tiny_config()
  objective = objectives.build(stage, cfg)
  mcfg = model_lib.get_config("tiny", vocab_size=vocab)
  model = (model_lib.RewardModel(mcfg, rngs=nnx.Rngs(0)) if objective.reward_model else _tiny_model(vocab))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if objective.online:  # A rollout's fields: rewards and the sampler's and reference's per-token log-probs.
    rng = np.random.default_rng(0)
    mask = batch["loss_mask"].astype(np.float32)
    batch = {**batch, "reward": rng.random(batch["valid"].shape).astype(np.float32),
             "sample_logp": (-rng.random(mask.shape) * mask).astype(np.float32),
             "ref_logp": (-rng.random(mask.shape) * mask).astype(np.float32)}
  return objective, graphdef, params, rest, jax.tree.map(jnp.asarray, batch)


@pytest.mark.parametrize("stage", sorted(objectives.OBJECTIVES))
def test_gradient_accumulation_is_exact(stage):
  objective, graphdef, params, rest, jb = _objective_setup(stage)
  one = train_lib.make_loss_and_grads(objective, graphdef, rest, 1)(params, jb)
  four = train_lib.make_loss_and_grads(objective, graphdef, rest, 4)(params, jb)
  np.testing.assert_allclose(one[0], four[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one[1]), jax.tree.leaves(four[1])):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  # Per-sequence outputs come back in batch order (atol: float32 sums of another batch shape round differently).
  np.testing.assert_allclose(one[2], four[2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("stage", sorted(objectives.OBJECTIVES))
def test_fused_training_path_equals_the_eval_path(stage):
  """Training differentiates `forward_numerator` (for fused-head objectives, the head's gradient computed in the
  forward pass); eval computes `numerator` of `outputs_of`. Same loss, outputs and gradients, per objective."""
  objective, graphdef, params, rest, jb = _objective_setup(stage, groups=2)
  const = objective.prepare(jb)

  def fused(p):
    num, outputs, _ = objectives.forward_numerator(objective, nnx.merge(graphdef, p, rest), jb, const)
    return num, outputs

  def unfused(p):
    outputs, _ = objectives.outputs_of(objective, nnx.merge(graphdef, p, rest), jb)
    return objectives.numerator(objective, outputs, const), outputs

  (num_f, out_f), grads_f = jax.value_and_grad(fused, has_aux=True)(params)
  (num_u, out_u), grads_u = jax.value_and_grad(unfused, has_aux=True)(params)
  assert np.isfinite(float(num_f)) and float(num_f) != 0.0
  np.testing.assert_allclose(num_f, num_u, rtol=1e-5)
  np.testing.assert_allclose(out_f, out_u, rtol=1e-5, atol=1e-6)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_u))
  for a, b in zip(jax.tree.leaves(grads_f), jax.tree.leaves(grads_u)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)


def test_train_step_compiles_once_per_shape_bucket():
  cfg = tiny_config()
  tok = tokenize.Tokenizer(synthetic.build_tokenizer(), max_prompt_len=16, max_response_len=12)
  pipe = stages.make_pipeline(cfg, synthetic.sft_records(256), tok, k_max=1, train=True, min_responses=1)
  model = _tiny_model(len(tok.tok))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx, schedule = train_lib.make_optimizer(1e-3, 20, cfg.optim)
  traces = []

  def step(state, batch):
    traces.append(batch["inputs"].shape)
    return train_lib.make_train_step(objectives.build("sft", cfg), graphdef, rest, tx, schedule)(state, batch)

  step = jax.jit(step)
  state = train_lib.init_train_state(params, tx)
  it = pipe.iterator()
  shapes = []
  for _ in range(12):
    batch = next(it)
    shapes.append(batch["inputs"].shape)
    state, _ = step(state, jax.tree.map(jnp.asarray, batch))
  assert len(traces) == len(set(shapes)), (traces, shapes)
  assert len(set(shapes)) <= 3  # Bucketed lengths: a handful of shapes, not one per batch.


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_and_rerun_skips(tmp_path):
  # Every stage but the judge, which needs data of its own (tests/test_judge.py).
  cfg = tiny_config(stages=",".join(s for s in config_lib.STAGES if s != "judge"))
  workdir = str(tmp_path / "run")
  stages.run_pipeline(cfg, workdir)
  for stage in config_lib.stage_list(cfg):
    assert os.path.exists(os.path.join(workdir, stage, "DONE.json")), stage
  results = json.load(open(os.path.join(workdir, "eval", "results.json")))
  assert set(results["policies"]) == {"sft", "var", "dpo", "chosen", "ipo", "grpo", "online_var"}
  var_done = json.load(open(os.path.join(workdir, "var", "DONE.json")))["results"]  # Weights checked before training.
  assert var_done["lam"] == cfg.var.lam and "swap_sensitivity" in var_done["diagnostics"]
  for row in results["policies"].values():
    assert 0.0 <= row["gold_reward"] <= 1.0 and np.isfinite(row["rm_reward"])
  lines = [json.loads(l) for l in open(os.path.join(workdir, "var", "logs", "metrics.jsonl"))]
  train_lines = [l for l in lines if "loss" in l]
  assert train_lines[-1]["step"] == 6 and np.isfinite(train_lines[-1]["loss"]) and "var/ess" in train_lines[-1]
  assert any("eval/loss" in l for l in lines)  # The held-out evaluation at the end of the stage.
  # The cost record: every stage (and the setup) with its wall time, compile time, tokens and FLOPs.
  spent = artifacts.load_cost(workdir)
  assert set(spent["stages"]) == {"setup", *config_lib.stage_list(cfg)}
  for stage, c in spent["stages"].items():
    assert 0 <= c["compile_s"] <= c["wall_s"], stage
    assert (c["tokens"] > 0 and c["model_flops"] > 0) == (stage != "setup"), stage
  total = spent["total"]
  assert total["wall_s"] == pytest.approx(sum(c["wall_s"] for c in spent["stages"].values()))
  assert sum(c["share"] for c in spent["stages"].values()) == pytest.approx(1.0)
  task = stages.load_task(cfg)  # var's tokens: the real tokens of the 6 batches it trained on.
  it = stages.make_pipeline(cfg, task.pref_records, task.tok, k_max=2, train=True).iterator()
  assert spent["stages"]["var"]["tokens"] == sum(int((next(it)["segment_ids"] > 0).sum()) for _ in range(6))
  before = os.path.getmtime(os.path.join(workdir, "var", "DONE.json"))
  stages.run_pipeline(cfg, workdir)  # Everything complete: nothing reruns.
  assert os.path.getmtime(os.path.join(workdir, "var", "DONE.json")) == before
  assert artifacts.load_cost(workdir) == spent  # Nothing ran, so nothing was re-measured.
  # Settings of how, not what (attention blocking, remat) leave finished stages valid.
  stages.run_pipeline(tiny_config(**{"model.attention_block": 0, "model.remat": "full"}), workdir)
  assert os.path.getmtime(os.path.join(workdir, "var", "DONE.json")) == before
  changed = tiny_config(**{"var.lam": 0.5})
  with pytest.raises(ValueError, match="completed with different settings.*var"):
    stages.run_pipeline(changed, workdir)


def _main_cmd(workdir, *overrides):
  return [sys.executable, "-m", "var_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
          "--config.stages=sft", "--config.data.num_sft=512", "--config.data.groups_per_batch=2",
          "--config.log_every=5", "--config.eval_every=0", "--config.checkpoint.async_save=False", *overrides]


def _final_params(workdir):
  path = os.path.join(workdir, "sft", "params")
  with __import__("orbax.checkpoint").checkpoint.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(path))


def _saved_steps(workdir):
  d = os.path.join(workdir, "sft", "checkpoints")
  return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _run_until_checkpoint(cmd, workdir, min_step, sig):
  # SIGHUP at its default in the child: a suite started under nohup (a CI runner may be) would pass it on ignored,
  # and var_jax rightly keeps an ignored SIGHUP ignored.
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if any(s >= min_step for s in _saved_steps(workdir)):
      proc.send_signal(sig)
      break
    time.sleep(0.05)
  _, err = proc.communicate(timeout=240)
  return proc.returncode, err


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
  steps = ["--config.sft.steps=60", "--config.checkpoint.every=10"]
  straight = str(tmp_path / "straight")
  subprocess.run(_main_cmd(straight, *steps), cwd=ROOT, check=True, capture_output=True, timeout=300)
  killed = str(tmp_path / "killed")
  code, err = _run_until_checkpoint(_main_cmd(killed, *steps), killed, 20, signal.SIGKILL)
  assert code == -signal.SIGKILL, err[-2000:]
  assert not os.path.exists(os.path.join(killed, "sft", "DONE.json"))
  subprocess.run(_main_cmd(killed, *steps), cwd=ROOT, check=True, capture_output=True, timeout=300)
  a, b = _final_params(straight), _final_params(killed)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigterm_saves_and_exits_then_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  cmd = _main_cmd(workdir, "--config.sft.steps=400", "--config.checkpoint.every=10")
  code, err = _run_until_checkpoint(cmd, workdir, 10, signal.SIGTERM)
  assert code == 143, err[-2000:]
  assert "SIGTERM: saved step" in err
  last = _saved_steps(workdir)[-1]
  assert last % 10 != 0 or last > 10  # The preemption save happened at the step SIGTERM arrived.
  lines = [json.loads(l) for l in open(os.path.join(workdir, "sft", "logs", "metrics.jsonl"))]
  assert lines and lines[-1]["step"] <= last
  # The checkpoint keeps the training seconds so far (and their compile part) beside the data position, so elapsed_s
  # and compile_s (what the race reads) go on counting after the resume instead of restarting.
  with open(os.path.join(workdir, "sft", "checkpoints", str(last), "data", "metadata")) as f:
    saved = json.load(f)
  assert set(saved) == {"feed", "elapsed_s", "compile_s"} and saved["elapsed_s"] >= lines[-1]["elapsed_s"]
  assert 0 < saved["compile_s"] < saved["elapsed_s"]
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
  resumed = [json.loads(l) for l in open(os.path.join(workdir, "sft", "logs", "metrics.jsonl"))][len(lines):]
  resumed = [l for l in resumed if "elapsed_s" in l]
  assert resumed[0]["step"] > last and resumed[0]["elapsed_s"] > saved["elapsed_s"]
  assert resumed[0]["compile_s"] >= saved["compile_s"]  # The resumed run's compile adds to the first's.


def test_sighup_ignored_by_nohup_stays_ignored():
  """Under nohup (SIGHUP inherited as ignored) the run goes on when the shell goes; otherwise SIGHUP becomes SIGTERM."""
  previous = signal.getsignal(signal.SIGHUP)
  try:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with train_lib.PreemptionCheck(every=1):
      assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    with train_lib.PreemptionCheck(every=1):
      assert callable(signal.getsignal(signal.SIGHUP))
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # Restored on exit.
  finally:
    signal.signal(signal.SIGHUP, previous)


@pytest.mark.slow
def test_sighup_saves_and_exits_like_sigterm(tmp_path):
  """A dropped SSH session sends SIGHUP: the run saves the step it reached and exits, as on a preemption."""
  workdir = str(tmp_path / "run")
  code, err = _run_until_checkpoint(_main_cmd(workdir, "--config.sft.steps=400", "--config.checkpoint.every=10"),
                                    workdir, 10, signal.SIGHUP)
  assert code == 143, err[-2000:]
  assert "SIGTERM: saved step" in err and not os.path.exists(os.path.join(workdir, "sft", "DONE.json"))


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  cmd = _main_cmd(workdir, "--config.sft.steps=30", "--config.checkpoint.every=1", "--config.sft.lr=1e30",
                  "--config.optim.warmup_steps=0", "--config.optim.clip_norm=0")
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "became non-finite at step" in proc.stderr
  bad = int(proc.stderr.split("non-finite at step ")[1].split()[0])
  saved = _saved_steps(workdir)
  assert saved and max(saved) <= bad  # Nothing after the bad step was written.
  ocp = __import__("orbax.checkpoint").checkpoint
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(os.path.join(workdir, "sft", "checkpoints", str(max(saved)), "state"))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored["params"]))


@pytest.mark.parametrize("field,value,message", [
    ("var.lam", 0.0, "config.var.lam = 0.0: lambda must be > 0"),
    ("var.normalizer", "global", "config.var.normalizer = 'global'"),
    ("data.block_size", 12, "must be a multiple of data.group_size=8"),
    ("data.source", "", "config.data.source"),
    ("stages", "sft,rl", "unknown stage 'rl'"),
    ("optim.grad_accum", 3, "must divide data.groups_per_batch"),
    ("model.remat", "everything", "config.model.remat = 'everything': must be one of"),
    ("ipo.tau", 0.0, "config.ipo.tau = 0.0: must be > 0"),
    ("var.target_ess", 40.0, "config.var.target_ess = 40.0: must be 0 (off) or in (0, 16]"),
    ("var.ref_weight", -1.0, "config.var.ref_weight = -1.0: alpha must be"),
    ("data.truncation", "cut", "config.data.truncation = 'cut': must be one of"),
    ("score.steps", -1, "config.score.steps = -1: must be >= 0"),
    ("eval.max_new_tokens", 0, "config.eval.max_new_tokens = 0: must be >= 1"),
    ("score.steps", 3, "config.score.steps = 3: var.steps=6 would read blocks"),
])
def test_config_validation_names_the_field(field, value, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_lib.validate(tiny_config(**{field: value}), num_devices=1)


@pytest.mark.parametrize("field", sorted(config_lib.CHOICES))
def test_every_choice_the_code_accepts_passes_validation(field):
  """The sets of choices are defined once, by the code that uses them: none is rejected at the config boundary."""
  for value in config_lib.CHOICES[field]:
    cfg = tiny_config(**{field: value})
    if field == "model.attention_impl" and value == "cudnn":
      cfg.model.dtype = "bfloat16"
    if field == "eval.prompts" and value == "validation":
      cfg.data.validation_fraction = 0.5
    if field == "wandb.mode" and value != "disabled":
      continue  # Needs the optional wandb package; tests/test_metrics_writer.py covers it.
    config_lib.validate(cfg)


def test_mesh_that_does_not_fit_is_rejected_before_compiling():
  with pytest.raises(ValueError, match="must equal the 8 devices"):
    config_lib.validate(tiny_config(**{"mesh.data": 3}), num_devices=8)
  with pytest.raises(ValueError, match="data.groups_per_batch"):
    config_lib.validate(tiny_config(**{"data.groups_per_batch": 2}), num_devices=8)


def test_unknown_override_fails_naming_the_field():
  proc = subprocess.run([sys.executable, "-m", "var_jax.main", "--config=configs/tiny.py", "--config.var.lamb=1"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "lamb" in proc.stderr


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_var_stage_matches_one_process(tmp_path, run_jax_processes):
  import shutil  # pylint: disable=g-import-not-at-top
  upstream = str(tmp_path / "upstream")
  stages.run_pipeline(tiny_config(stages="sft,reward,score"), upstream)
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  shutil.copytree(upstream, one)
  shutil.copytree(upstream, two)
  # One process, fed the same global batches the two processes form together: each process loads its own
  # blocks (per-host sharding), so the reference concatenates shard 0's and shard 1's local batches.
  cfg = tiny_config(stages="var")
  mesh = sharding_lib.make_mesh()
  ctx = stages.Context(cfg, one, mesh, sharding_lib.DEFAULT_RULES)
  scores = artifacts.load_scores(one, "train")
  shards = [stages.with_scores(stages.make_pipeline(cfg, ctx.task.pref_records, ctx.task.tok, k_max=2, train=True,
                                                    shard_index=i, shard_count=2), scores) for i in range(2)]

  class Concatenated:
    def __init__(self):
      self.its = [s.iterator() for s in shards]

    def __next__(self):
      parts = [next(it) for it in self.its]
      return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
      return {"shards": [it.get_state() for it in self.its]}

  policy = ctx.load("sft")
  train_lib.train("var", objectives.build("var", cfg), cfg, cfg.var, policy, lambda state: Concatenated(), None,
                  os.path.join(one, "var"), mesh)
  artifacts.save_model(policy, one, "var")
  flags = [f"--config.{k}={v}" for k, v in TEST_SIZE.items()] + ["--config.stages=var"]
  run_jax_processes(lambda i, port: ["-m", "var_jax.main", "--config=configs/tiny.py", f"--workdir={two}", *flags,
                                     f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"])

  def losses_of(workdir):
    with open(os.path.join(workdir, "var", "logs", "metrics.jsonl")) as f:
      return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]

  a, b = losses_of(one), losses_of(two)
  assert [s for s, _ in a] == [s for s, _ in b] == [3, 6]
  np.testing.assert_allclose([l for _, l in a], [l for _, l in b], rtol=1e-4)
  ocp = __import__("orbax.checkpoint").checkpoint
  with ocp.StandardCheckpointer() as ckptr:
    pa = ckptr.restore(os.path.join(one, "var", "params"))
    pb = ckptr.restore(os.path.join(two, "var", "params"), pa)  # Saved on a 2-process mesh: restore onto ours.
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(x, y, atol=2e-5)


@pytest.mark.slow
def test_score_stage_prefix_shared_equals_pairwise():
  cfg = tiny_config()
  tok = tokenize.Tokenizer(synthetic.build_tokenizer(), max_prompt_len=16, max_response_len=12)
  pipe = stages.make_pipeline(cfg, synthetic.preference_records(36), tok, k_max=2, train=False)  # 4.5 blocks of 8.
  model = _tiny_model(len(tok.tok))
  gold = lambda b, p, m: float(b + p + m)  # noqa: E731  (any reward function: only the layout matters here)
  shared = scoring.score_blocks(pipe, model, reward_fn=gold, prefix_shared=True)
  pairwise = scoring.score_blocks(pipe, model, reward_fn=gold, prefix_shared=False)
  for key in ("ref_logp", "ref_ntok", "reward"):
    np.testing.assert_array_equal(np.isnan(shared[key]), np.isnan(pairwise[key]))
    np.testing.assert_allclose(shared[key], pairwise[key], rtol=2e-5, atol=2e-5)
  assert np.isnan(shared["ref_logp"]).any()  # The padded last block's dummy prompts stay NaN.
  # ref_ntok counts the targets training sums for each response: the batch's own loss mask.
  batch = stages.with_scores(pipe, shared).dataset()[0]
  np.testing.assert_array_equal(batch["ref_ntok"][batch["valid"]], batch["loss_mask"].sum(-1)[batch["valid"]])
  # A reward model is prefix-shared too: the same [G, G*K] rewards, the same NaN layout.
  rm = model_lib.RewardModel(model_lib.get_config("tiny", vocab_size=len(tok.tok)), rngs=nnx.Rngs(1))
  rm.score[...] = np.full(rm.score[...].shape, 0.1, np.float32)
  rewards = [scoring.score_blocks(pipe, None, rm, prefix_shared=flag)["reward"] for flag in (True, False)]
  np.testing.assert_array_equal(np.isnan(rewards[0]), np.isnan(shared["ref_logp"]))
  np.testing.assert_allclose(rewards[0], rewards[1], rtol=2e-5, atol=2e-5)
  assert np.nanstd(rewards[1]) > 1e-3  # Rewards that differ between pairs, so a misread position would show.


def _present_pairs(cfg, split_records):
  """[num_blocks, G, G*K] bool: the (prompt, response) pairs of every scoring block that exist."""
  task = stages.load_task(cfg)
  pipe = stages.make_pipeline(cfg, split_records(task), task.tok, k_max=cfg.data.max_responses, train=True)
  g, k = config_lib.block_size(cfg), cfg.data.max_responses
  present = np.zeros((len(pipe.blocks), g, g * k), bool)
  for block in pipe.scoring_blocks():
    prompts = np.array([p is not None for p in block["prompt_ids"]])
    present[block["block_index"]] = prompts[:, None] & block["response_valid"][None, :]
  return present


@pytest.mark.slow
def test_score_stage_computes_exactly_the_pairs_the_run_reads(tmp_path):
  """Blocks default to the normalizer group (G = B = 8), so the cross_context VAR run's score stage computes each
  group's B x B*K matrix, every entry of which training reads; a run of dpo alone gets its pairs' own-context
  reference log-probs (B*K per group, 1/B of that) and no reward; a later var in that workdir is refused by name; a
  sweep's larger block (score.pairs=block, data.block_size=16) scores every pair of its blocks, twice a run's."""
  upstream = str(tmp_path / "upstream")
  stages.run_pipeline(tiny_config(stages="sft,reward"), upstream)
  runs = {"var": {"stages": "sft,reward,score,var"}, "dpo": {"stages": "sft,reward,score,dpo"},
          "sweep": {"stages": "sft,reward,score", "score.pairs": "block", "data.block_size": 16}}
  scored, read = {}, {}
  for name, overrides in runs.items():
    workdir = str(tmp_path / name)
    subprocess.run(["cp", "-r", upstream, workdir], check=True)
    cfg = tiny_config(**overrides)
    mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    # The score stage alone, under each run's config (what it computes depends on the stages the config names).
    stages.run_score(stages.Context(cfg, workdir, mesh, sharding_lib.parse_rules(cfg.mesh.rules)), "score")
    scores = artifacts.load_scores(workdir, "train")
    scored[name] = (np.isfinite(scores["ref_logp"]), np.isfinite(scores["reward"]))
    present = _present_pairs(cfg, lambda t: t.pref_records)
    own = np.arange(present.shape[2])[None, None, :] // cfg.data.max_responses == np.arange(present.shape[1])[:, None]
    read[name] = present if name != "dpo" else present & own
    np.testing.assert_array_equal(scored[name][0], read[name])  # Exactly the pairs read, each once.
    np.testing.assert_array_equal(scored[name][1], read[name] if name != "dpo" else np.zeros_like(present))
  g, k = 8, 2
  blocks = len(scored["var"][0])
  assert scored["var"][0].sum() == blocks * g * g * k  # Full blocks: B x B*K per group.
  assert scored["dpo"][0].sum() * g == scored["var"][0].sum()
  assert scored["sweep"][0].sum() == 2 * scored["var"][0].sum()  # 16 x 32 per block of 16: twice B = 8's.
  assert artifacts.done_results(str(tmp_path / "dpo"), "score")["coverage"] == {"cross_context": False,
                                                                                  "rewards": False}
  late = tiny_config(stages="var")
  mesh = sharding_lib.make_mesh(late.mesh.data, late.mesh.fsdp, late.mesh.tensor)
  with pytest.raises(ValueError, match="var .* reads responses scored under the other prompts .* and rewards"):
    stages.run_policy(stages.Context(late, str(tmp_path / "dpo"), mesh, sharding_lib.parse_rules(late.mesh.rules)),
                      "var")


@pytest.mark.slow
def test_score_steps_scores_the_blocks_training_draws(tmp_path):
  # 6 steps of 2 groups draw part of the 128 pairs' blocks: only those are scored, and var trains on them; a dpo run
  # of more steps would read unscored blocks and is refused by name, before any training.
  short = {"score.steps": 2, "var.steps": 2, "dpo.steps": 2}
  cfg = tiny_config(stages="sft,reward,score,var", **short)
  workdir = str(tmp_path / "run")
  stages.run_pipeline(cfg, workdir)
  train, held_out = artifacts.load_scores(workdir, "train"), artifacts.load_scores(workdir, "eval")
  task = stages.load_task(cfg)
  scored = np.flatnonzero(np.isfinite(train["ref_ntok"]).any(-1))
  np.testing.assert_array_equal(scored, stages.make_pipeline(cfg, task.pref_records, task.tok, k_max=2,
                                                             train=True).blocks_read(2))
  assert 0 < len(scored) < len(train["ref_ntok"]) and np.isfinite(held_out["ref_ntok"]).any()
  assert os.path.exists(os.path.join(workdir, "var", "DONE.json"))
  longer = tiny_config(stages="dpo", **{**short, "dpo.steps": 40})
  with pytest.raises(ValueError, match="score.steps.*dpo.steps=40 would read blocks"):
    config_lib.validate(longer)
  with pytest.raises(ValueError, match="dpo: .* train blocks its 40 batches read have no scores"):
    mesh = sharding_lib.make_mesh(longer.mesh.data, longer.mesh.fsdp, longer.mesh.tensor)
    stages.run_policy(stages.Context(longer, workdir, mesh, sharding_lib.parse_rules(longer.mesh.rules)), "dpo")


# ----------------------------------------------------------------------------------------------------------------
# A damaged newest checkpoint: moved aside, the previous step restored.


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _largest_file(directory):
  files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damaged", ["state/_METADATA", "data/metadata", "largest array file"])
def test_restore_newest_skips_a_damaged_step(tmp_path, damaged):
  from var_jax import checkpoints  # pylint: disable=g-import-not-at-top
  ocp = __import__("orbax.checkpoint").checkpoint
  cfg = tiny_config(**{"checkpoint.keep": 3, "checkpoint.async_save": False})
  directory = str(tmp_path / "checkpoints")
  state = lambda step: {"step": jnp.int32(step), "w": jnp.full((64, 1024), float(step))}  # noqa: E731
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(0))
  mngr = train_lib.checkpoint_manager(directory, cfg)
  for step in (1, 2, 3):
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state(step)),
                                            data=ocp.args.JsonSave({"pos": step})))
  mngr.wait_until_finished()
  mngr.close()
  _truncate(_largest_file(os.path.join(directory, "3")) if damaged == "largest array file"
            else os.path.join(directory, "3", damaged))
  mngr = train_lib.checkpoint_manager(directory, cfg)
  restored = checkpoints.restore_newest(mngr, abstract, "sft")
  assert int(restored["state"]["step"]) == 2 and restored["data"] == {"pos": 2}
  np.testing.assert_array_equal(restored["state"]["w"], 2.0)
  (aside,) = [d for d in os.listdir(directory) if d.startswith("3.corrupt-")]
  assert mngr.all_steps() == [1, 2] and not os.path.exists(os.path.join(directory, "3"))
  # Saving step 3 again and then beyond checkpoint.keep deletes old steps, never the damaged one set aside.
  for step in (3, 4):
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state(step)),
                                            data=ocp.args.JsonSave({"pos": step})))
  mngr.wait_until_finished()
  assert sorted(mngr.all_steps()) == [2, 3, 4] and os.path.isdir(os.path.join(directory, aside))
  mngr.close()


def test_restore_newest_moves_nothing_when_no_step_restores(tmp_path):
  from var_jax import checkpoints  # pylint: disable=g-import-not-at-top
  ocp = __import__("orbax.checkpoint").checkpoint
  cfg = tiny_config(**{"checkpoint.async_save": False})
  directory = str(tmp_path / "checkpoints")
  mngr = train_lib.checkpoint_manager(directory, cfg)
  for step in (1, 2):
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.zeros(4)}),
                                            data=ocp.args.JsonSave({})))
  mngr.close()
  # A changed model (another shape), not damage: every step fails, nothing may be moved.
  abstract = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=jnp.zeros(8).sharding)}
  mngr = train_lib.checkpoint_manager(directory, cfg)
  with pytest.raises(RuntimeError, match=r"\[sft\] no checkpoint in .*checkpoints restores \(step 2: .*; step 1: "):
    checkpoints.restore_newest(mngr, abstract, "sft")
  assert sorted(os.listdir(directory)) == ["1", "2"]
  assert checkpoints.restore_newest(train_lib.checkpoint_manager(str(tmp_path / "empty"), cfg), abstract,
                                    "sft") is None


@pytest.mark.slow
def test_rerun_after_damaged_newest_checkpoint_resumes_from_the_previous_step(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  cfg = tiny_config(stages="sft", **{"checkpoint.keep": 3, "checkpoint.async_save": False})
  stages.run_pipeline(cfg, workdir)  # sft.steps=6, checkpoint.every=3: steps 3 and 6.
  # What a crash right after the step-6 save leaves, with a file of step 6 cut short.
  ckpt = os.path.join(workdir, "sft", "checkpoints")
  os.remove(os.path.join(workdir, "sft", "DONE.json"))
  __import__("shutil").rmtree(os.path.join(workdir, "sft", "params"))
  _truncate(os.path.join(ckpt, "6", "state", "_METADATA"))
  with caplog.at_level("WARNING"):
    stages.run_pipeline(cfg, workdir)
  assert os.path.exists(os.path.join(workdir, "sft", "DONE.json"))
  text = caplog.text
  assert f"checkpoint step 6 in {ckpt} does not restore" in text and "fell back to checkpoint step 3" in text
  (aside,) = [d for d in os.listdir(ckpt) if d.startswith("6.corrupt-")]
  assert os.path.getsize(os.path.join(ckpt, aside, "state", "_METADATA")) > 0  # Moved as it was, not deleted.
  assert _saved_steps(workdir) == [3, 6]  # Step 6 trained again and saved anew.
  with open(os.path.join(workdir, "sft", "logs", "metrics.jsonl")) as f:
    logged = [r["step"] for r in map(json.loads, f) if "loss" in r]
  assert logged == [3, 6, 6]  # First run: 3, 6; the rerun resumed at 3 and logged only 6 (from scratch: 3 again).


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_fall_back_to_the_same_step_when_only_one_cannot_read(tmp_path, run_jax_processes):
  """Step 2's array data of process 1 is cut short: process 1's read fails, process 0's succeeds; both must agree
  on step 1 (orbax's restore barrier, which process 1 never reaches, is joined by it so the collectives stay paired)."""
  out = str(tmp_path / "out.json")
  logs = run_jax_processes(lambda i, port: [os.path.join(ROOT, "tests", "checkpoint_worker.py"),
                                            str(tmp_path / "ckpt"), out, str(port), str(i)], timeout=180)
  assert "checkpoint step 2 in" in logs[1] and "Encountered error while reading" in logs[1]
  assert "restored on this process but failed on another" in logs[0]
  results = [json.load(open(f"{out}.{i}")) for i in range(2)]
  for i, r in enumerate(results):
    assert r["data"] == {"s": 1} and r["steps"] == [1] and r["local"][0][0] == 10 + i
    assert r["listing"][0] == "1" and len(r["listing"]) == 2 and r["listing"][1].startswith("2.corrupt-")
