"""var_jax.export: a policy and the reward model trained on the embedded task, exported as HF checkpoints, load in
transformers with var_jax's logits, greedy generations, tokenizer ids and reward scores; float32, bfloat16 and
sharded exports; unfinished stages, stages without a model, other settings and non-empty targets are refused."""
import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers import ROOT, TEST_SIZE, tiny_config
from var_jax import artifacts
from var_jax import export
from var_jax import hf_io
from var_jax import sampling
from var_jax import scoring
from var_jax import sharding as sharding_lib
from var_jax import stages
from var_jax.data import tokenize

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STAGES = "sft,reward,score,var"
# Enough SFT that greedy generations depend on the prompt and end in EOS (6 steps only ever generate EOS).
OVERRIDES = {"stages": STAGES, "sft.steps": 150}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(cfg, workdir, ctx, tmp dir) of the embedded task trained at test size through var (about a minute on 2 CPU
  cores: the tests using it are marked slow)."""
  tmp = tmp_path_factory.mktemp("export")
  cfg = tiny_config(**OVERRIDES)
  workdir = str(tmp / "run")
  stages.run_pipeline(cfg, workdir)
  ctx = stages.Context(cfg, workdir, sharding_lib.make_mesh(), sharding_lib.parse_rules(cfg.mesh.rules))
  return cfg, workdir, ctx, tmp


@pytest.fixture(scope="module")
def var_f32(run):
  cfg, workdir, _, tmp = run
  return export.export(cfg, workdir, "var", str(tmp / "var_f32"), dtype="float32")


def _real_sequences(ctx, n=6):
  """Held-out prompts followed by their first response: (prompt ids, response ids) pairs as the pipeline has them."""
  records = ctx.task.eval_records[:n]
  prompts, _ = ctx.task.tok.encode_prompts([r.prompt for r in records])
  responses, _ = ctx.task.tok.encode_responses([r.responses[0] for r in records])
  return list(zip(prompts, responses))


def _right_padded(pairs, pad_id):
  """tokens, positions, mask [B, T] of the concatenated pairs, right-padded."""
  seqs = [np.concatenate([p, r]) for p, r in pairs]
  width = max(map(len, seqs))
  tokens = np.full((len(seqs), width), pad_id, np.int32)
  mask = np.zeros((len(seqs), width), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)], mask[i, :len(s)] = s, 1
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return tokens, positions, mask


@nnx.jit
def _logits(model, tokens, positions, segment_ids):
  return model.logits(model(tokens, positions, segment_ids))


def _hf_logits(model, tokens, positions, mask):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()


def _logit_error(ctx, out):
  """(max |HF - var_jax| logit difference over real tokens, max |logit|, HF dtype) of the var policy on held-out
  pairs, the export loaded as a user would (transformers' default dtype: the checkpoint's)."""
  hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens, positions, mask = _right_padded(_real_sequences(ctx), ctx.task.tok.pad_id)
  ours = np.asarray(_logits(ctx.load("var"), tokens, positions, mask))
  theirs = _hf_logits(hf, tokens, positions, mask)
  real = mask.astype(bool)
  return float(np.abs(ours[real] - theirs[real]).max()), float(np.abs(ours[real]).max()), hf.dtype


@pytest.mark.slow
def test_float32_export_has_var_jax_logits(run, var_f32):
  _, _, ctx, _ = run
  assert sorted(os.listdir(var_f32)) == ["README.md", "chat_template.jinja", "config.json", "model.safetensors",
                                         "tokenizer.json", "tokenizer_config.json"]
  config = json.load(open(os.path.join(var_f32, "config.json")))
  tok = ctx.task.tok
  assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
  assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (tok.bos_id, tok.eos_id,
                                                                                      tok.pad_id)
  err, scale, dtype = _logit_error(ctx, var_f32)
  assert dtype == torch.float32 and scale > 1.0  # Logits large enough that the tolerance means something.
  assert err < 2e-5, f"max abs logit difference {err}"  # Same float32 weights, other op order: measured ~3e-6.


@pytest.mark.slow
def test_transformers_greedy_generation_equals_var_jax(run, var_f32):
  _, _, ctx, _ = run
  tok = ctx.task.tok
  prompts = [p for p, _ in _real_sequences(ctx, n=4)]
  ours = sampling.generate(ctx.load("var"), prompts, max_new_tokens=12, eos_id=tok.eos_id, pad_id=tok.pad_id,
                           temperature=0.0)
  assert len({tuple(g) for g in ours}) > 1 and max(map(len, ours)) > 2  # Prompt-dependent, more than EOS.
  hf = transformers.AutoModelForCausalLM.from_pretrained(var_f32).eval()
  for p, want in zip(prompts, ours):
    with torch.no_grad():
      ids = torch.tensor(p[None], dtype=torch.long)
      got = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)[0, len(p):]
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.slow
def test_exported_tokenizer_encodes_like_the_project(run, var_f32):
  _, _, ctx, _ = run
  ours = ctx.task.tok
  theirs = transformers.AutoTokenizer.from_pretrained(var_f32)
  assert theirs.chat_template == ours.tok.chat_template and theirs.chat_template
  assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
  records = ctx.task.eval_records[:16]
  messages = [r.prompt for r in records]
  texts = [ours.render(m) for m in messages]
  assert theirs(texts)["input_ids"] == ours.tok(texts)["input_ids"]
  # The project's conventions (chat template, BOS, EOS, truncation) give the same ids on the exported tokenizer.
  again = tokenize.Tokenizer(theirs, max_prompt_len=ours.max_prompt_len, max_response_len=ours.max_response_len)
  for a, b in zip(again.encode_prompts(messages)[0], ours.encode_prompts(messages)[0]):
    np.testing.assert_array_equal(a, b)
  responses = [r.responses[0] for r in records]
  for a, b in zip(again.encode_responses(responses)[0], ours.encode_responses(responses)[0]):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_bfloat16_sharded_export_loads_and_is_close(run):
  cfg, workdir, ctx, tmp = run
  out = export.export(cfg, workdir, "var", str(tmp / "var_bf16"), dtype="bfloat16", max_shard_size="100KB")
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 1 and files == sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
  # var_jax reads the shards back as exactly the bfloat16-rounded parameters.
  back = hf_io.from_pretrained(out)
  model = ctx.load("var")
  for (path, a), b in zip(jax.tree.leaves_with_path(nnx.state(model, nnx.Param)),
                          jax.tree.leaves(nnx.state(back, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a).astype(hf_io.np_dtype("bfloat16")), np.asarray(b), err_msg=str(path))
  err, scale, dtype = _logit_error(ctx, out)
  assert dtype == torch.bfloat16  # Runs in bfloat16 too, against var_jax's float32: measured 0.4% of max |logit|.
  assert err < 0.02 * scale, f"max abs logit difference {err} (max |logit| {scale})"


@pytest.mark.slow
def test_reward_model_export_scores_like_var_jax(run):
  """Through the command line: `python -m var_jax.export --stage=reward` loads as a one-label sequence classifier."""
  cfg, workdir, ctx, tmp = run
  out = str(tmp / "rm")
  flags = [f"--config.{k}={v}" for k, v in {**TEST_SIZE, **OVERRIDES}.items()]
  subprocess.run([sys.executable, "-m", "var_jax.export", f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
                  "--stage=reward", f"--out={out}", *flags], cwd=ROOT, check=True, timeout=300)
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert hf.config.num_labels == 1
  pairs = _real_sequences(ctx)
  ours = scoring.score_pairs(ctx.load("reward", reward=True), pairs, pad_id=ctx.task.tok.pad_id, bucket=8,
                             reward=True)
  tokens, _, mask = _right_padded(pairs, ctx.task.tok.pad_id)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).logits[:, 0]
  assert np.ptp(ours) > 1e-3  # Distinct scores, so equality is not trivially true.
  np.testing.assert_allclose(theirs.numpy(), ours, atol=2e-5)


@pytest.mark.slow
def test_refuses_unfinished_stages_other_settings_and_non_empty_targets(run, var_f32):
  cfg, workdir, _, tmp = run
  with pytest.raises(ValueError, match=re.escape(f"stage 'dpo' is not finished in workdir {workdir}")):
    export.export(cfg, workdir, "dpo", str(tmp / "dpo"))
  with pytest.raises(ValueError, match="stage 'score' trains no model"):
    export.export(cfg, workdir, "score", str(tmp / "score"))
  with pytest.raises(ValueError, match="different settings"):
    export.export(tiny_config(**OVERRIDES, **{"var.lam": 0.5}), workdir, "var", str(tmp / "other"))
  before = sorted(os.listdir(var_f32)), os.path.getmtime(os.path.join(var_f32, "model.safetensors"))
  time.sleep(0.01)
  with pytest.raises(FileExistsError, match="exists and is not empty"):
    export.export(cfg, workdir, "var", var_f32)
  assert (sorted(os.listdir(var_f32)), os.path.getmtime(os.path.join(var_f32, "model.safetensors"))) == before
  assert not os.path.exists(tmp / "dpo") and not os.path.exists(tmp / "score") and not os.path.exists(tmp / "other")


def test_shard_sizes_and_names():
  assert [hf_io.size_in_bytes(x) for x in (5, "100KB", "2GiB", " 1.5 mb ")] == [5, 10**5, 2**31, 1_500_000]
  for bad in ("lots", "-1GB", 0):
    with pytest.raises(ValueError, match="max_shard_size"):
      hf_io.size_in_bytes(bad)
  tensors = {k: np.zeros(n, np.float32) for k, n in (("model.norm.weight", 20), ("model.layers.10.a", 10),
                                                      ("model.layers.2.a", 30), ("model.embed_tokens.weight", 50))}
  assert set(hf_io.shard_names(tensors, 10**6).values()) == {"model.safetensors"}
  # Tensors of 40 to 200 bytes under a 200-byte limit: embeddings alone, layers in numeric order, then the norm.
  assert hf_io.shard_names(tensors, 200) == {
      "model.embed_tokens.weight": "model-00001-of-00003.safetensors",
      "model.layers.2.a": "model-00002-of-00003.safetensors", "model.layers.10.a": "model-00002-of-00003.safetensors",
      "model.norm.weight": "model-00003-of-00003.safetensors"}


def test_refuses_a_stage_that_did_not_run_or_trains_no_model(tmp_path):
  cfg = tiny_config()
  with pytest.raises(ValueError, match=re.escape(f"stage 'var' is not finished in workdir {tmp_path}")):
    export.export(cfg, str(tmp_path), "var", str(tmp_path / "out"))
  with pytest.raises(ValueError, match="stage 'eval' trains no model to export; exportable stages: "):
    export.export(cfg, str(tmp_path), "eval", str(tmp_path / "out"))
  with pytest.raises(ValueError, match="unknown stage 'nope'"):
    export.export(cfg, str(tmp_path), "nope", str(tmp_path / "out"))
  assert export.exportable_stages() == ("sft", "reward", "var", "dpo", "chosen", "ipo", "grpo", "online_var", "judge")
  assert export.is_reward_stage("reward") and export.is_reward_stage("judge") and not export.is_reward_stage("var")
  assert os.listdir(tmp_path) == []


def test_model_card_names_the_method_settings_diagnostics_and_eval(tmp_path):
  cfg = tiny_config(**{"var.lam": 0.3})
  workdir = tmp_path / "run"
  for stage, results in (("var", {"diagnostics": {"ess_group": 4.5, "swap_sensitivity": 0.61}}),
                         ("eval", {"policies": ["sft", "var"]})):
    (workdir / stage).mkdir(parents=True)
    (workdir / stage / "DONE.json").write_text(json.dumps({"stage": stage, "results": results}))
  row = {"gold_reward": 0.5, "gold_pref_vs_ref": 0.6, "gold_pref_vs_ref_lo": 0.5, "gold_pref_vs_ref_hi": 0.7,
         "kl_to_ref": 1.25, "length": 6.0}
  artifacts.write_eval_results(str(workdir), {"policies": {"sft": {"gold_reward": 0.4, "length": 6.0}, "var": row},
                                              "num_prompts": 32, "prompts": "test"}, "| table |\n")
  card = export.model_card(cfg, str(workdir), "var")
  assert card.startswith("---\nlibrary_name: transformers\n") and "tags: [var_jax, alignment, var]" in card
  assert "VAR (Variational Alignment with Re-weighting" in card and "lam=0.3" in card
  assert "ess_group 4.5, swap_sensitivity 0.61" in card and "32 held-out test prompts" in card
  assert [line.split() for line in card.splitlines() if line.startswith("var ")] == [
      ["var", "0.5000", "0.600", "[0.500,", "0.700]", "1.250", "6.0"]]


def _safetensors_dtypes(directory) -> set[str]:
  """The tensor dtypes in the headers of a directory's safetensors files (an 8-byte length, then JSON)."""
  dtypes = set()
  for name in os.listdir(directory):
    if name.endswith(".safetensors"):
      with open(os.path.join(directory, name), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
      dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
  return dtypes


def test_bfloat16_model_saves_exports_and_loads_back_exactly(tmp_path):
  """model.param_dtype=bfloat16: a stage's saved params restore as bfloat16 (artifacts), the export writes bfloat16
  safetensors by default, and model.path pointing at it loads the same bfloat16 values (model_source)."""
  cfg = tiny_config(**{"model.param_dtype": "bfloat16", "stages": "sft"})
  workdir = str(tmp_path / "run")
  ctx = stages.Context(cfg, workdir, sharding_lib.make_mesh(), sharding_lib.parse_rules(cfg.mesh.rules))
  model = stages.new_model(cfg, ctx.mcfg, ctx.mesh, ctx.rules)
  artifacts.save_model(model, workdir, "sft")
  artifacts.mark_done(cfg, workdir, "sft")
  want = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert {x.dtype for x in want} == {np.dtype(hf_io.np_dtype("bfloat16"))}

  def assert_same(other):
    got = jax.tree.leaves(nnx.state(other, nnx.Param))
    assert len(got) == len(want)
    for a, b in zip(want, got):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  assert_same(ctx.load("sft"))
  out = export.export(cfg, workdir, "sft", str(tmp_path / "sft_bf16"))
  assert _safetensors_dtypes(out) == {"BF16"}
  assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
  pretrained = tiny_config(**{"model.param_dtype": "bfloat16", "model.path": out})
  assert_same(stages.new_model(pretrained, stages.model_config(pretrained, ctx.task.tok), ctx.mesh, ctx.rules))
