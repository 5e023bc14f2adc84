"""var_jax.data.splits: held-out prompts never share a first user turn with training prompts; distinct prompts."""
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
