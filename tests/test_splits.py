"""var_jax.data.splits: held-out prompts never share a first user turn with training prompts; distinct prompts."""
import pytest

from var_jax.data import splits
from var_jax.data.formats import PreferenceRecord


def rec(*turns):
  prompt = tuple({"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns))
  return PreferenceRecord(prompt=prompt, responses=("a", "b"), rewards=None, chosen=0, ranking=(0, 1), source="t")


def test_split_by_first_turn_keeps_families_together_and_reaches_the_fraction():
  records = [rec(f"q{i % 7}", "x", f"follow {i}") for i in range(40)] + [rec("unique", "y", "z")]
  train, held = splits.split_by_first_turn(records, 0.2)
  assert len(train) + len(held) == len(records) and len(held) >= 0.2 * len(records)
  assert not {splits.first_user_turn(r) for r in train} & {splits.first_user_turn(r) for r in held}
  assert splits.split_by_first_turn(records, 0.2) == (train, held)  # Deterministic.
  # Even a fraction asking for everything leaves one family to train on.
  train, held = splits.split_by_first_turn([rec("a"), rec("a", "b", "c"), rec("b")], 0.99)
  assert train and held


def test_drop_train_overlap_and_distinct_prompts():
  train = [rec("shared", "1", "2"), rec("t")]
  held = [rec("shared  ", "other", "turns"), rec("new"), rec("new"), rec("new", "x", "y")]
  kept, dropped = splits.drop_train_overlap(held, train)
  assert dropped == 1 and [splits.first_user_turn(r) for r in kept] == ["new", "new", "new"]
  distinct, repeats = splits.distinct_prompts(kept)
  assert repeats == 1 and len(distinct) == 2


def test_validation_and_test_prompts_split_the_held_out_records_by_first_turn():
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from var_jax import stages  # pylint: disable=g-import-not-at-top
  task = stages.load_task(tiny_config(**{"data.validation_fraction": 0.5}))
  assert len(task.validation_records) >= 0.5 * len(task.eval_records)
  assert sorted(map(id, task.validation_records + task.test_records)) == sorted(map(id, task.eval_records))
  turns = lambda records: set(map(splits.first_user_turn, records))
  assert not turns(task.validation_records) & turns(task.test_records)
  assert stages.load_task(tiny_config()).test_records == stages.load_task(tiny_config()).eval_records


def test_cap_per_first_turn_keeps_the_first_records_of_each_family_grouped():
  records = [rec("a", "x", str(i)) if i % 3 else rec("b", str(i)) for i in range(12)] + [rec("c")]
  capped = splits.cap_per_first_turn(records, 2)
  # Families in order of first appearance (b at 0, a at 1, c last), each its first two records in file order.
  assert [r.prompt[-1]["content"] for r in capped] == ["0", "3", "1", "2", "c"]
  assert splits.cap_per_first_turn(records, 0) == records


def test_max_per_prompt_caps_before_max_records_counts(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from var_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from var_jax import stages  # pylint: disable=g-import-not-at-top
  path = tmp_path / "pairs.jsonl"
  with open(path, "w", encoding="utf-8") as f:  # 10 prompts, 5 pairs each, interleaved as AlpacaEval's are.
    for i in range(50):
      f.write(json.dumps({"prompt": f"question {i % 10}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n")
  cfg = tiny_config(**{"data.source": str(path), "data.format": "pairs", "data.max_per_prompt": 2,
                       "data.max_records": 12})
  records, _ = stages.read_preferences(cfg.data, "source", "train")
  turns = [splits.first_user_turn(r) for r in records]
  assert len(records) == 12 and len(set(turns)) == 6 and all(turns.count(t) == 2 for t in turns)
  assert [r.responses[0] for r in records[:4]] == ["good 0", "good 10", "good 1", "good 11"]
  cfg.data.max_per_prompt = 0  # Without the cap: the file's first 12 records, 10 prompts.
  assert len({splits.first_user_turn(r) for r in stages.read_preferences(cfg.data, "source", "train")[0]}) == 10
  for bad in ({"data.max_per_prompt": -1}, {"data.max_records": -3}):
    with pytest.raises(ValueError, match=next(iter(bad))):
      config_lib.validate(tiny_config(**bad))
