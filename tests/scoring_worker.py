"""Subprocess body of tests/test_scoring_mesh.py, and the data and models both sides score.

    python tests/scoring_worker.py meshes OUT.npz
        (with XLA_FLAGS=--xla_force_host_platform_device_count=8) score_blocks on one device without a mesh (the
        reference), then with the models sharded on meshes data=8, fsdp=8 and data=2 x fsdp=2 x tensor=2, and a
        block with response loss masks; saves every score matrix and the PartitionSpecs of the scoring programs'
        inputs (and of those var_jax.plan compiles).
    python tests/scoring_worker.py multiprocess OUT_PREFIX PORT PROCESS_ID
        one of two processes (2 CPU devices each, gloo collectives) scoring its own blocks with the models sharded
        over both on an fsdp=4 mesh; saves its matrices to OUT_PREFIX<PROCESS_ID>.npz.

The results (not pass/fail) go to the .npz files so the test itself does the comparing.
"""
import json
import os
import sys

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from var_jax import model as model_lib  # noqa: E402
from var_jax import scoring  # noqa: E402
from var_jax import sharding  # noqa: E402
from var_jax.data import formats  # noqa: E402
from var_jax.data import pipeline as data_pipeline  # noqa: E402
from var_jax.data import synthetic  # noqa: E402
from var_jax.data import tokenize  # noqa: E402

from tests.helpers import use_suite_cache  # noqa: E402

use_suite_cache()

MESHES = {"data8": (8, 1, 1), "fsdp8": (1, 8, 1), "2x2x2": (2, 2, 2)}
G, K, BUCKET = 4, 2, 8
# Variants of score_blocks: (prefix_shared, own_only). Each scores with the reference and the reward model.
VARIANTS = {"prefix": (True, False), "concat": (False, False), "own": (False, True)}
# The blocks the multi-process run scores: process 0 owns rows 0, 2, 4 and process 1 rows 1, 3, 5, so process 0
# scores two blocks and process 1 one (it joins the second round with an empty block). Block 5, the padded one,
# has fewer prompts and responses and shorter length buckets than block 0, which it is scored alongside.
ONLY = (0, 2, 5)


# ----------------------------------------------------------------------------------------------------------------
# Data and models.


def _record(rng) -> formats.PreferenceRecord:
  """A sort prompt of 1 to 20 digits with K responses of 1 to 12 digits: ragged lengths over several buckets."""
  digits = lambda n: " ".join(rng.choice(synthetic.DIGITS, n))  # noqa: E731
  responses = tuple(digits(rng.integers(1, 13)) for _ in range(K))
  return formats.PreferenceRecord(prompt=({"role": "user", "content": f"sort {digits(rng.integers(1, 21))}"},),
                                  responses=responses, rewards=None, chosen=0, ranking=tuple(range(K)), source="t")


def make_pipeline(shard_index: int = 0, shard_count: int = 1) -> data_pipeline.PreferencePipeline:
  """22 prompts in 6 blocks of G=4 (the last one padded with 2 dummy prompts), this process's share."""
  rng = np.random.default_rng(0)
  tok = tokenize.Tokenizer(synthetic.build_tokenizer(), max_prompt_len=32, max_response_len=16)
  config = data_pipeline.PipelineConfig(block_size=G, group_size=2, groups_per_batch=2, k_max=K, remainder="pad",
                                        bucket=BUCKET, shuffle=False)
  pipe, _ = data_pipeline.build_pipeline([_record(rng) for _ in range(22)], tok, config, shard_index=shard_index,
                                         shard_count=shard_count)
  return pipe


def make_models():
  """() -> (reference Decoder, RewardModel with a random score head): deterministic, so a sharded init equals the
  single-device one."""
  cfg = model_lib.get_config("tiny", vocab_size=len(synthetic.VOCAB))

  def reward_model():
    rm = model_lib.RewardModel(cfg, rngs=nnx.Rngs(1))
    rm.score[...] = np.random.default_rng(2).normal(size=rm.score[...].shape).astype(np.float32)
    return rm

  return (lambda: model_lib.Decoder(cfg, rngs=nnx.Rngs(0))), reward_model


def score_all(pipe, ref, rm, only=None) -> dict:
  """{f"{variant}/{key}": matrix} of score_blocks for every variant, reference and reward model together."""
  out = {}
  for name, (prefix_shared, own_only) in VARIANTS.items():
    scores = scoring.score_blocks(pipe, ref, rm, prefix_shared=prefix_shared, own_only=own_only, only=only,
                                  chunk=16)
    out.update({f"{name}/{key}": value for key, value in scores.items()})
  return out


# ----------------------------------------------------------------------------------------------------------------
# Modes.


def _recording_specs(specs: dict) -> None:
  """Wraps the sharded scoring programs to record the PartitionSpecs of the arrays they are called with."""
  for name in ("batch_scores_jit", "sharded_prefix_shared_jit"):
    jitted = getattr(scoring, name)

    def record(graphdef, state, *args, _jitted=jitted, _name=name, **kwargs):
      arrays = [x for x in jax.tree.leaves(args) if isinstance(x, jax.Array)]
      specs.setdefault(_name, set()).update(str(x.sharding.spec) for x in arrays)
      return _jitted(graphdef, state, *args, **kwargs)

    setattr(scoring, name, record)


def _planned_specs(mesh, name: str) -> dict:
  """{f"plan/{mesh name}/{program}": PartitionSpecs of its inputs} of the score programs var_jax.plan compiles for
  the tiny config on `mesh`, prefix-shared and concatenated."""
  from tests import helpers  # pylint: disable=g-import-not-at-top
  from var_jax import plan as plan_lib  # pylint: disable=g-import-not-at-top
  out = {}
  for prefix_shared in (True, False):
    cfg = helpers.tiny_config(**{"score.prefix_shared": prefix_shared, "score.chunk": 16})
    program = plan_lib.score_program(cfg, plan_lib.plan_model_config(cfg), mesh, sharding.DEFAULT_RULES, reward=False)
    inputs = program.lower().compile().input_shardings[0][2:]  # After the model's graphdef and parameters.
    out[f"plan/{name}/{'prefix' if prefix_shared else 'concat'}"] = {str(s.spec) for s in jax.tree.leaves(inputs)}
  return out


def masked_block(ref) -> np.ndarray:
  """Prefix-shared log-probs [3, 5] of a block whose responses have loss masks (multi-message completions; one
  without), on `ref`'s mesh when it has batch shards (3 prompts: some batch shards score copies)."""
  rng, vocab = np.random.default_rng(3), ref.cfg.vocab_size
  prompts = [rng.integers(1, vocab, size=n).astype(np.int32) for n in (3, 9, 17)]
  responses = [rng.integers(1, vocab, size=n).astype(np.int32) for n in (2, 5, 11, 7, 4)]
  masks = [(rng.random(len(r)) < 0.5).astype(np.float32) for r in responses[:4]] + [None]
  options = dict(pad_id=0, bucket=BUCKET, reward=False, response_masks=masks)
  mesh = scoring.batch_mesh(nnx.state(ref))
  if mesh is None:
    return scoring.prefix_shared_scores(ref, prompts, responses, **options)
  return scoring._sharded_prefix_shared_scores(nnx.split(ref), prompts, responses, mesh=mesh, **options)  # pylint: disable=protected-access


def meshes(out_path: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  make_ref, make_rm = make_models()
  pipe = make_pipeline()
  results = {f"single/{k}": v for k, v in score_all(pipe, make_ref(), make_rm()).items()}
  results["single/masked"] = masked_block(make_ref())
  specs = _planned_specs(sharding.make_mesh(*MESHES["2x2x2"]), "2x2x2")  # Before the programs are wrapped.
  _recording_specs(specs)
  for name, shape in MESHES.items():
    mesh = sharding.make_mesh(*shape)
    ref, _ = sharding.create_sharded_model(make_ref, mesh)
    rm, _ = sharding.create_sharded_model(make_rm, mesh)
    results.update({f"{name}/{k}": v for k, v in score_all(pipe, ref, rm).items()})
    results[f"{name}/masked"] = masked_block(ref)
  np.savez(out_path, specs=json.dumps({k: sorted(v) for k, v in specs.items()}), **results)


def multiprocess(out_prefix: str, port: int, process_id: int) -> None:
  jax.config.update("jax_num_cpu_devices", 2)
  assert sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  assert jax.process_count() == 2 and jax.device_count() == 4
  mesh = sharding.make_mesh(1, 4, 1)  # fsdp over both processes: their calls share the parameters' collectives.
  make_ref, make_rm = make_models()
  ref, _ = sharding.create_sharded_model(make_ref, mesh)
  rm, _ = sharding.create_sharded_model(make_rm, mesh)
  pipe = make_pipeline(process_id, 2)
  results = score_all(pipe, ref, rm, only=ONLY)
  np.savez(f"{out_prefix}{process_id}.npz", local_blocks=pipe.local_blocks, **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  if sys.argv[1] == "meshes":
    meshes(sys.argv[2])
  elif sys.argv[1] == "multiprocess":
    multiprocess(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
  else:
    raise SystemExit(f"unknown mode {sys.argv[1]!r}")
