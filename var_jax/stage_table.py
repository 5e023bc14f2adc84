"""The pipeline's stages, in one table: what each runs, reads, writes and depends on.

Everything that lists stages is derived from `STAGES`: the config's stage names and default pipeline
(var_jax/config.py), the dependency fingerprints of finished stages (var_jax/artifacts.py), the runners
(var_jax/stages.py maps each `runner` kind to a function), the policies the eval stage compares
(var_jax/evaluate.py) and the upstream stages a sweep shares (launch/sweep.py).

A new training stage is one row here whose `objective` names an entry of var_jax/objectives.OBJECTIVES, plus the
config section of the same name. This module imports nothing heavy, so config validation can use it.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of the pipeline.

  name: the stage's name (in config.stages, and its directory workdir/<name>/).
  runner: how it runs, a key of var_jax/stages.RUNNERS: "reference" (trains pi_ref), "reward" (trains or names the
    reward model), "score" (caches log pi_ref and rewards), "policy" (trains a policy from the reference), "online" (trains a policy on its own samples), "judge"
    (trains the held-out judge on its own data), "eval".
  sections: config sections its artifacts depend on (beyond those of the stages it reads).
  reads: stages whose artifacts it needs, complete, before it runs.
  writes: artifacts it leaves in workdir/<name>/ (see var_jax/artifacts.py).
  objective: the training objective (var_jax/objectives.OBJECTIVES key) of a training stage.
  compared: a policy the eval stage compares with the reference.
  default: part of the default pipeline (config.stages of base_config()).
  pairs: trains on each prompt's best vs worst response (needs >= 2 responses per prompt).
  """
  name: str
  runner: str
  sections: tuple[str, ...]
  reads: tuple[str, ...] = ()
  writes: tuple[str, ...] = ()
  objective: str = ""
  compared: bool = False
  default: bool = True
  pairs: bool = False


STAGES = (
    Stage("sft", "reference", ("seed", "data", "model", "sft", "optim", "lora"), writes=("params",), objective="sft"),
    Stage("reward", "reward", ("reward",), reads=("sft",), writes=("params",), objective="reward", pairs=True),
    Stage("score", "score", ("score",), reads=("sft", "reward"), writes=("scores",)),
    Stage("var", "policy", ("var",), reads=("score",), writes=("params",), objective="var", compared=True),
    Stage("dpo", "policy", ("dpo",), reads=("score",), writes=("params",), objective="dpo", compared=True,
          pairs=True),
    Stage("chosen", "policy", ("chosen",), reads=("sft",), writes=("params",), objective="chosen", compared=True),
    Stage("ipo", "policy", ("ipo",), reads=("score",), writes=("params",), objective="ipo", compared=True,
          default=False, pairs=True),
    # Online: sample from the policy during training (var_jax/online.py); rewards from the reward stage's model or
    # the gold reward.
    Stage("grpo", "online", ("online", "grpo"), reads=("sft", "reward"), writes=("params",), objective="grpo",
          compared=True, default=False),
    Stage("online_var", "online", ("online", "online_var"), reads=("sft", "reward"), writes=("params",),
          objective="online_var", compared=True, default=False),
    Stage("judge", "judge", ("judge",), reads=("sft",), writes=("params",), objective="reward", default=False),
    # Eval compares every policy stage that finished (judged by the judge too when it finished); its results depend
    # on all of their settings.
    Stage("eval", "eval", ("eval",), reads=("sft", "reward"), writes=("results",)),
)

BY_NAME = {s.name: s for s in STAGES}
NAMES = tuple(BY_NAME)
DEFAULT_PIPELINE = tuple(s.name for s in STAGES if s.default)
# The policies eval compares with the reference (sft), in table order.
COMPARED = tuple(s.name for s in STAGES if s.compared)
REFERENCE = next(s.name for s in STAGES if s.runner == "reference")  # The stage that trains pi_ref.
CHOSEN_BASELINE = "chosen"  # SFT on the chosen responses: the baseline that needs no reward model.
ONLINE = tuple(s.name for s in STAGES if s.runner == "online")  # Stages that train on their own samples.
PAIRS = tuple(s.name for s in STAGES if s.pairs)  # Stages that train on best vs worst responses.


def get(name: str) -> Stage:
  if name not in BY_NAME:
    raise ValueError(f"unknown stage {name!r}; stages are {NAMES}")
  return BY_NAME[name]


def depends_on(name: str) -> tuple[str, ...]:
  """The stages whose settings a stage's artifacts depend on: itself and, transitively, what it reads (for eval,
  also every compared policy, whose artifacts it reads when they exist). Sorted, `name` included."""
  seen, todo = set(), [name]
  while todo:
    s = todo.pop()
    if s in seen:
      continue
    seen.add(s)
    todo.extend(get(s).reads + (COMPARED + ("judge",) if get(s).runner == "eval" else ()))
  return tuple(sorted(seen))


def upstream(stages) -> tuple[str, ...]:
  """Stages that `stages` need (transitively) but do not run themselves, in table order: what a sweep over the
  settings of `stages` computes once and shares. Eval's optional reads (the compared policies) are not needed."""
  needed, todo = set(), list(stages)
  while todo:
    for r in get(todo.pop()).reads:
      if r not in needed:
        needed.add(r)
        todo.append(r)
  return tuple(s.name for s in STAGES if s.name in needed and s.name not in stages)
