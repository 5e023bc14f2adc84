"""var_jax.lora: adapters at init leave the model unchanged; merging equals the unmerged forward; an adapter's
gradient is the chain rule through the frozen weight's (NumPy float64); a LoRA train step moves only the adapters and
keeps optimizer state for them alone; adapters written in PEFT's layout load in peft with var_jax's logits; the main
job runs every kind of training stage with LoRA and exports merged and PEFT models."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tests.helpers import tiny_config
from var_jax import artifacts
from var_jax import config as config_lib
from var_jax import export
from var_jax import hf_io
from var_jax import lora
from var_jax import model as model_lib
from var_jax import objectives
from var_jax import sharding as sharding_lib
from var_jax import stages
from var_jax import train as train_lib

MCFG = model_lib.get_config("tiny", vocab_size=97, attention_bias=True, model_type="qwen2")
LORA = ml_collections.ConfigDict({"rank": 3, "alpha": 6.0, "targets": "all"})


def _mesh():
  return sharding_lib.make_mesh(data=1, devices=jax.devices()[:1])


def _model(reward: bool = False, seed: int = 0):
  cls = model_lib.RewardModel if reward else model_lib.Decoder
  model, _ = sharding_lib.create_sharded_model(lambda: cls(MCFG, rngs=nnx.Rngs(seed)), _mesh(),
                                               sharding_lib.DEFAULT_RULES)
  return model


def _inputs(batch=3, length=9, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, MCFG.vocab_size)
  positions, segment_ids = model_lib.default_inputs(tokens)
  return tokens, positions, segment_ids


def _perturb_b(model, scale=0.05):
  """Non-zero B factors (as after training), so the adapters change the output."""
  layers = model.backbone.layers if isinstance(model, model_lib.RewardModel) else model.layers
  for i, name in enumerate(lora.TARGETS):
    b = getattr(layers, f"{name}_lora_b")
    b[...] = scale * jax.random.normal(jax.random.key(100 + i), b[...].shape)


@pytest.mark.parametrize("reward", [False, True])
def test_adapters_at_init_leave_the_forward_unchanged_and_merge_keeps_it(reward):
  model = _model(reward)
  tokens, positions, segment_ids = _inputs()
  run = (lambda m: m.score_sequences(tokens, positions, segment_ids)) if reward else (
      lambda m: m.logits(m(tokens, positions, segment_ids)))
  before = np.asarray(run(model))
  lora.attach(model, LORA, _mesh(), sharding_lib.DEFAULT_RULES, seed=1)
  assert lora.has_adapters(model)
  np.testing.assert_array_equal(np.asarray(run(model)), before)  # B = 0: exactly the same numbers.
  _perturb_b(model)
  adapted = np.asarray(run(model))
  assert np.abs(adapted - before).max() > 1e-2  # The adapters now matter...
  lora.merge(model)
  assert not lora.has_adapters(model)
  np.testing.assert_allclose(np.asarray(run(model)), adapted, atol=2e-5, rtol=1e-5)  # ...and merging keeps them.


def test_adapter_gradients_are_the_chain_rule_through_the_frozen_weights():
  """At B = 0: dL/dB = scale * A^T dL/dW and dL/dA = 0 (float64 NumPy from the full model's gradient), for the
  trained objective's loss as training computes it (`train.make_loss_and_grads`)."""
  cfg = tiny_config()
  objective = objectives.build("sft", cfg)
  model = _model()
  tokens, positions, segment_ids = _inputs(batch=4, length=10)
  batch = {"inputs": tokens[None], "targets": jnp.roll(tokens, -1, axis=1)[None], "positions": positions[None],
           "segment_ids": segment_ids[None], "loss_mask": (segment_ids > 0).astype(jnp.float32)[None],
           "valid": jnp.ones((1, 4), bool)}
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  _, full_grads, *_ = train_lib.make_loss_and_grads(objective, graphdef, rest, 1)(params, batch)
  lora.attach(model, LORA, _mesh(), sharding_lib.DEFAULT_RULES, seed=2)
  graphdef, adapters, frozen, rest = nnx.split(model, lora.trainable(model), nnx.Param, ...)
  _, grads, *_ = train_lib.make_loss_and_grads(objective, graphdef, rest, 1)(adapters, batch, frozen)
  scale = LORA.alpha / LORA.rank
  for name, n_in in model_lib.LORA_INPUT_AXES.items():
    a = np.asarray(adapters["layers"][f"{name}_lora_a"][...], np.float64)       # [L, *in, r]
    dw = np.asarray(full_grads["layers"][name][...], np.float64)               # [L, *in, *out]
    want = scale * np.stack([np.tensordot(a[l], dw[l], axes=(list(range(n_in)), list(range(n_in))))
                             for l in range(a.shape[0])])                     # [L, r, *out]
    got = np.asarray(grads["layers"][f"{name}_lora_b"][...], np.float64)
    assert np.abs(want).max() > 1e-6, name
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7 * np.abs(want).max(), err_msg=name)
    np.testing.assert_array_equal(np.asarray(grads["layers"][f"{name}_lora_a"][...]), 0.0)


def test_a_lora_train_step_moves_only_the_adapters_with_optimizer_state_for_them_alone():
  cfg = tiny_config()
  model = _model()
  lora.attach(model, ml_collections.ConfigDict({"rank": 2, "alpha": 4.0, "targets": "q,v"}), _mesh(),
              sharding_lib.DEFAULT_RULES, seed=3)
  graphdef, adapters, frozen, rest = nnx.split(model, lora.trainable(model), nnx.Param, ...)
  assert sorted(k for k in adapters["layers"]) == ["q_lora_a", "q_lora_b", "v_lora_a", "v_lora_b"]
  tx, schedule = train_lib.make_optimizer(1e-2, 10, cfg.optim)
  step = jax.jit(train_lib.make_train_step(objectives.build("sft", cfg), graphdef, rest, tx, schedule))
  tokens, positions, segment_ids = _inputs(batch=4, length=10)
  batch = {"inputs": tokens[None], "targets": jnp.roll(tokens, -1, axis=1)[None], "positions": positions[None],
           "segment_ids": segment_ids[None], "loss_mask": (segment_ids > 0).astype(jnp.float32)[None],
           "valid": jnp.ones((1, 4), bool)}
  state = train_lib.init_train_state(adapters, tx)
  adapter_size = sum(x.size for x in jax.tree.leaves(adapters))
  moment_sizes = sorted({x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim})
  assert max(moment_sizes) <= max(x.size for x in jax.tree.leaves(adapters))
  assert sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim) == 2 * adapter_size  # Adam's 2 moments.
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch, frozen)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  assert np.abs(np.asarray(state["params"]["layers"]["q_lora_b"][...])).max() > 0
  # The frozen weights are an input, untouched: the model rebuilt from them and zero adapters is the original.
  base = nnx.merge(graphdef, lora.zero_like(state["params"]), frozen, rest)
  fresh = _model()
  np.testing.assert_array_equal(np.asarray(base.logits(base(tokens, positions, segment_ids))),
                                np.asarray(fresh.logits(fresh(tokens, positions, segment_ids))))


def test_config_refuses_bad_lora_settings():
  for field, value, words in (("rank", -1, "lora.rank"), ("targets", "q,attn", "attn"),
                              ("targets", "", "lora.targets")):
    cfg = tiny_config(**{f"lora.{field}": value})
    with pytest.raises(ValueError, match=words):
      config_lib.validate(cfg)
  with pytest.raises(ValueError, match="lora.alpha"):
    config_lib.validate(tiny_config(**{"lora.rank": 4, "lora.alpha": 0.0}))


def test_peft_loads_the_adapters_with_var_jax_logits(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  model = _model()
  base_dir = hf_io.save_pretrained(model, str(tmp_path / "base"), dtype="float32")
  lora.attach(model, LORA, _mesh(), sharding_lib.DEFAULT_RULES, seed=4)
  _perturb_b(model)
  adapter_dir = lora.peft_files(lora.adapters(model), str(tmp_path / "adapters"), alpha=LORA.alpha)
  config = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
  assert config["r"] == LORA.rank and sorted(config["target_modules"]) == sorted(
      ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
  hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
  tokens, positions, segment_ids = _inputs(batch=2, length=7)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
  ours = np.asarray(model.logits(model(tokens, positions, segment_ids)))
  base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
  with torch.no_grad():
    unadapted = base(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
  assert np.abs(unadapted - ours).max() > 1e-2  # The comparison would catch adapters peft did not apply.
  np.testing.assert_allclose(theirs, ours, atol=5e-5, rtol=1e-5)


@pytest.mark.slow
def test_main_job_trains_every_kind_of_stage_with_lora_and_exports_merged_and_peft(tmp_path):
  """sft, reward, var and grpo with LoRA through the pipeline: adapters saved, checkpoints hold adapters only, the
  saved model has them merged (its export loads in transformers), and --peft writes them for peft."""
  transformers = pytest.importorskip("transformers")
  cfg = tiny_config(**{"stages": "sft,reward,score,var,grpo", "lora.rank": 4, "lora.alpha": 8.0, "sft.steps": 6,
                       "reward.steps": 4, "var.steps": 4, "grpo.steps": 2, "var.lr": 1e-2})
  workdir = str(tmp_path / "run")
  stages.run_pipeline(cfg, workdir)
  for stage in ("sft", "reward", "var", "grpo"):
    saved = artifacts.load_adapters(workdir, stage)
    assert float(saved["lora_scale"]) == 2.0 and "q_lora_a" in saved and "down_lora_b" in saved
  assert np.abs(artifacts.load_adapters(workdir, "var")["q_lora_b"]).max() > 0  # It trained.
  ctx = stages.Context(cfg, workdir, sharding_lib.make_mesh(), sharding_lib.parse_rules(cfg.mesh.rules))
  var, sft = ctx.load("var"), ctx.load("sft")
  assert not lora.has_adapters(var)
  assert np.abs(np.asarray(var.layers.q[...]) - np.asarray(sft.layers.q[...])).max() > 0  # Merged into q.
  np.testing.assert_array_equal(np.asarray(var.embed[...]), np.asarray(sft.embed[...]))  # Not a target: frozen.
  merged = export.export(cfg, workdir, "var", str(tmp_path / "var_merged"), dtype="float32")
  assert transformers.AutoModelForCausalLM.from_pretrained(merged) is not None
  adapters_dir = export.export(cfg, workdir, "var", str(tmp_path / "var_peft"), peft=True)
  assert sorted(os.listdir(adapters_dir)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
  with pytest.raises(ValueError, match="reward model"):
    export.export(cfg, workdir, "reward", str(tmp_path / "reward_peft"), peft=True)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_train_lora_with_fsdp_and_save_the_adapters_they_merged(tmp_path, run_jax_processes):
  """var with LoRA on two real processes, parameters (and adapters) sharded over both (fsdp = 2): the adapters are
  gathered from both processes into adapters.npz, and the saved model is the reference plus scale * A B of them."""
  from tests.helpers import TEST_SIZE  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  stages.run_pipeline(tiny_config(stages="sft,reward,score"), workdir)
  flags = [f"--config.{k}={v}" for k, v in TEST_SIZE.items()] + [
      "--config.stages=var", "--config.lora.rank=4", "--config.lora.targets=q,down", "--config.var.lr=0.01",
      "--config.mesh.data=1", "--config.mesh.fsdp=2"]
  run_jax_processes(lambda i, port: ["-m", "var_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}", *flags,
                                     f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"])
  saved = artifacts.load_adapters(workdir, "var")
  assert sorted(saved) == ["down_lora_a", "down_lora_b", "lora_scale", "q_lora_a", "q_lora_b"]
  assert np.abs(saved["q_lora_b"]).max() > 0
  cfg = tiny_config(**{"stages": "var", "lora.rank": 4, "lora.targets": "q,down"})
  ctx = stages.Context(cfg, workdir, sharding_lib.make_mesh(), sharding_lib.parse_rules(cfg.mesh.rules))
  var, sft = ctx.load("var"), ctx.load("sft")
  for name in ("q", "down"):
    a, b = saved[f"{name}_lora_a"].astype(np.float64), saved[f"{name}_lora_b"].astype(np.float64)
    n_in = model_lib.LORA_INPUT_AXES[name]
    delta = np.stack([np.tensordot(a[l], b[l], axes=1) for l in range(a.shape[0])])
    want = np.asarray(getattr(sft.layers, name)[...], np.float64) + float(saved["lora_scale"]) * delta
    assert delta.shape[1:1 + n_in] == a.shape[1:1 + n_in]
    np.testing.assert_allclose(np.asarray(getattr(var.layers, name)[...]), want, atol=1e-5, err_msg=name)
  np.testing.assert_array_equal(np.asarray(var.layers.k[...]), np.asarray(sft.layers.k[...]))  # Not a target.
