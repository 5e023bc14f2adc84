"""Preference formats: the shared real files, every layout, every bad-input case."""
import gzip
import json
import math
import os
import pathlib

import pytest

from var_jax.data.formats import (detect_format, hh_transcript_to_messages, load_preferences, split_hh_pair)

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir() and os.environ.get("CI") != "true",
                                  reason="../shared/data not present (runs in CI)")


# ----------------------------------------------------------------------------------------------------------------
# Real files.

@needs_shared
def test_hh_real_file():
  path = str(SHARED / "hh_rlhf" / "harmless-base_test.jsonl.gz")
  # 4 pairs have an empty chosen response: strict loading names the first one.
  with pytest.raises(ValueError, match=r"harmless-base_test.jsonl.gz:87: field 'chosen' is empty"):
    load_preferences(path)
  recs, stats = load_preferences(path, skip_invalid=True)
  assert (stats.read, stats.kept, dict(stats.skipped)) == (2312, 2308, {"empty_response": 4})
  first = recs[0]
  assert first.source == "harmless-base_test.jsonl.gz:1" and first.chosen == 0 and first.rewards is None
  assert [m["role"] for m in first.prompt] == ["user", "assistant", "user", "assistant", "user"]
  assert first.prompt[0]["content"] == "what are some pranks with a pen i can do?"
  assert first.prompt[-1]["content"] == "okay some of these do not have anything to do with pens"
  assert first.responses[0].startswith("No, sorry!  All of these involve a pen")
  assert first.responses[1].startswith("There are lots of funny things you can do with pens")
  # Line 1255: the transcripts diverge before the final turn; the prompt is the shared prefix.
  (rec,) = [r for r in recs if r.source.endswith(":1255")]
  assert rec.prompt[-1]["content"] == "Isn't that drag kings?"
  assert rec.responses[1].startswith("A drag king is the opposite of a drag queen")
  assert all(r.prompt[-1]["role"] == "user" for r in recs)


@needs_shared
def test_alpaca_eval_pairs_real_files():
  test, stats = load_preferences(str(SHARED / "alpaca_eval_pairs" / "alpaca_eval_gpt4_prefs_short_test.jsonl.gz"))
  assert len(test) == stats.kept == 2804 and not stats.skipped
  assert test[0].prompt == ({"role": "user", "content": "What is Gremolata?"},)
  assert test[0].responses[0].startswith("Gremolata is a chopped herb condiment")
  assert test[0].responses[1].startswith("Gremolata is a traditional Italian condiment")
  train, _ = load_preferences(str(SHARED / "alpaca_eval_pairs" / "alpaca_eval_gpt4_prefs_short_train.jsonl.gz"),
                              fmt="pairs")
  assert len(train) == 30274
  assert not {r.prompt[0]["content"] for r in train} & {r.prompt[0]["content"] for r in test}


@needs_shared
def test_sharegpt_real_file():
  recs, stats = load_preferences(str(SHARED / "llamafactory_dpo_demo" / "dpo_en_demo.json"))
  assert stats.kept == 300 and detect_format({"conversations": [], "chosen": {}, "rejected": {}}) == "sharegpt"
  assert recs[0].source == "dpo_en_demo.json[0]" and len(recs[0].prompt) == 1
  assert recs[0].prompt[0]["content"].startswith("Hi! I'd like to create a new language game")
  assert recs[0].responses[0].startswith("That sounds like a fun and engaging idea!")
  assert recs[0].responses[1].startswith("Hello! I'd be happy to help you create a language game")
  roles = [m["role"] for r in recs for m in r.prompt]
  assert (roles.count("user"), roles.count("assistant"), roles.count("system")) == (563, 263, 80)


# ----------------------------------------------------------------------------------------------------------------
# Layouts, containers, HF path.

def _write_jsonl(path, rows, gz=False):
  text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
  if gz:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    pathlib.Path(path).write_text(text, encoding="utf-8")
  return str(path)


PAIR = {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}


def test_hh_split_and_messages():
  c = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good"
  r = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad"
  prompt, chosen, rejected = split_hh_pair(c, r)
  assert (chosen, rejected) == ("good", "bad")
  assert hh_transcript_to_messages(prompt) == [{"role": "user", "content": "a"}, {"role": "assistant",
                                                                                  "content": "b"},
                                               {"role": "user", "content": "c"}]


@pytest.mark.parametrize("container", ["jsonl", "jsonl.gz", "json", "json.gz", "parquet"])
def test_containers(tmp_path, container):
  rows = [PAIR, {"prompt": "Say bye", "chosen": "Bye!", "rejected": "Hi."}]
  path = tmp_path / f"d.{container}"
  if container.startswith("jsonl"):
    _write_jsonl(path, rows, gz=container.endswith(".gz"))
  elif container.startswith("json"):
    data = json.dumps(rows)
    if container.endswith(".gz"):
      with gzip.open(path, "wt") as f:
        f.write(data)
    else:
      path.write_text(data)
  else:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
  recs, stats = load_preferences(str(path))
  assert stats.kept == 2 and recs[1].responses == ("Bye!", "Hi.") and recs[1].prompt[0]["content"] == "Say bye"


def test_hf_datasets_path_with_local_files(tmp_path):
  """The hub code path (`datasets.load_dataset`), exercised offline with a local builder + data_files."""
  path = _write_jsonl(tmp_path / "train.jsonl", [PAIR] * 3)
  recs, stats = load_preferences("json", data_files={"train": path}, split="train")
  assert stats.kept == 3 and recs[0].responses == ("Hi!", "No.") and recs[0].source == "json:train[0]"


def test_pairs_with_message_lists_and_rewards(tmp_path):
  row = {"prompt": [{"role": "system", "content": "Be nice"}, {"role": "user", "content": "Say hi"}],
         "chosen": [{"role": "assistant", "content": "Hi!"}], "rejected": [{"role": "assistant", "content": "No."}],
         "score_chosen": 8.0, "score_rejected": 2}
  (rec,), _ = load_preferences(_write_jsonl(tmp_path / "m.jsonl", [row]))
  assert [m["role"] for m in rec.prompt] == ["system", "user"]
  assert rec.responses == ("Hi!", "No.") and rec.rewards == (8.0, 2.0)


def test_ranked_lists(tmp_path):
  rows = [{"prompt": "q", "responses": ["a", "b", "c"], "rewards": [0.1, 0.9, 0.5]},
          {"prompt": "r", "responses": ["x", "y", "z", "w"], "ranks": [2, 0, 3, 1]}]
  (a, b), _ = load_preferences(_write_jsonl(tmp_path / "k.jsonl", rows))
  assert a.responses == ("a", "b", "c") and a.chosen == 1 and a.ranking == (1, 2, 0)
  assert b.rewards is None and b.chosen == 1 and b.ranking == (1, 3, 0, 2)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: a clear error, or skipped and counted.

BAD = [
    ('{"prompt": "x", "chosen": "a", "rejected": ', "malformed_json", r"bad.jsonl:2: malformed JSON"),
    ({"prompt": "x", "chosen": "a"}, "missing_field", r"bad.jsonl:2: missing field 'rejected'"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, "non_string_field",
     r"bad.jsonl:2: field 'chosen' is a int, not a string"),
    ({"prompt": "x", "chosen": "  ", "rejected": "b"}, "empty_response", r"bad.jsonl:2: field 'chosen' is empty"),
    ({"prompt": "x", "chosen": "a", "rejected": "a"}, "identical_responses",
     r"bad.jsonl:2: chosen and rejected are identical"),
    ({"prompt": "x", "chosen": "a", "rejected": "b", "chosen_reward": float("nan"), "rejected_reward": 1.0},
     "nan_reward", r"bad.jsonl:2: field 'chosen_reward' is nan"),
    ({"prompt": "x", "responses": ["a", "b"], "rewards": [1.0, float("nan")]}, "nan_reward",
     r"bad.jsonl:2: field 'rewards\[1\]' is nan"),
    ({"prompt": "x", "responses": ["a"], "rewards": [1.0]}, "too_few_responses",
     r"bad.jsonl:2: 1 response\(s\), the normalizer needs at least 2"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty_prompt", r"bad.jsonl:2: empty prompt"),
]


@pytest.mark.parametrize("bad,reason,message", BAD, ids=[b[1] for b in BAD])
def test_bad_input_raises_or_is_counted(tmp_path, bad, reason, message):
  fmt = "ranked" if isinstance(bad, dict) and "responses" in bad else "auto"
  rows = [PAIR if fmt == "auto" else {"prompt": "q", "responses": ["a", "b"], "rewards": [1, 0]}, bad, PAIR
          if fmt == "auto" else {"prompt": "q", "responses": ["c", "d"], "rewards": [1, 0]}]
  # json.dumps writes float("nan") as NaN, which Python's json reads back as nan: the NaN reaches the parser.
  path = _write_jsonl(tmp_path / "bad.jsonl", rows)
  with pytest.raises(ValueError, match=message):
    load_preferences(path, fmt=fmt)
  recs, stats = load_preferences(path, fmt=fmt, skip_invalid=True)
  assert len(recs) == 2 and stats.read == 3 and dict(stats.skipped) == {reason: 1}
  assert str(stats).startswith("read 3, kept 2, skipped 1")


def test_single_response_allowed_when_normalizer_needs_one(tmp_path):
  path = _write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "x", "responses": ["a"], "rewards": [1.0]}])
  (rec,), _ = load_preferences(path, min_responses=1)
  assert rec.responses == ("a",) and math.isclose(rec.rewards[0], 1.0)


def test_unknown_layout_is_an_error(tmp_path):
  path = _write_jsonl(tmp_path / "u.jsonl", [{"question": "x", "answer": "y"}])
  with pytest.raises(ValueError, match="cannot detect format"):
    load_preferences(path)
  with pytest.raises(ValueError, match="unknown format"):
    load_preferences(path, fmt="alpaca")


# ----------------------------------------------------------------------------------------------------------------
# TRL's conversational implicit-prompt layout.

def _chat(*turns):
  return [{"role": r, "content": c} for r, c in zip(("user", "assistant") * len(turns), turns)]


def test_implicit_chat_prompt_is_the_shared_prefix(tmp_path):
  rows = [{"chosen": _chat("Hi", "Hello!", "Capital of France?", "Paris."),
           "rejected": _chat("Hi", "Hello!", "Capital of France?", "Lyon.")},
          {"chosen": [{"role": "system", "content": "Be brief"}, *_chat("2+2?", " 4 ")],
           "rejected": [{"role": "system", "content": "Be brief"}, *_chat("2+2?", "5")], "score_chosen": 1.0,
           "score_rejected": 0.0}]
  path = _write_jsonl(tmp_path / "trl.jsonl", rows)
  assert detect_format(rows[0]) == "implicit_chat"
  for fmt in ("auto", "implicit_chat"):
    (a, b), stats = load_preferences(path, fmt=fmt)
    assert a.prompt == tuple(_chat("Hi", "Hello!", "Capital of France?")) and a.responses == ("Paris.", "Lyon.")
    assert [m["role"] for m in b.prompt] == ["system", "user"] and b.responses == ("4", "5")
    assert b.rewards == (1.0, 0.0) and stats.kept == 2


@pytest.mark.parametrize("chosen,rejected,reason,message", [
    (_chat("a", "b", "c", "d"), _chat("a", "x", "c", "d"), "multi_turn_response",
     r"t.jsonl:1: field 'chosen' must end in exactly one assistant message after the 1 shared message\(s\); it has "
     r"\['assistant', 'user', 'assistant'\]"),
    (_chat("a", "b"), _chat("z", "b"), "no_shared_prompt", "t.jsonl:1: chosen and rejected share no leading"),
    (_chat("a", "b"), _chat("a", "b"), "identical_responses", "t.jsonl:1: chosen and rejected are identical"),
    (_chat("a", "b"), [{"role": "user", "content": "a"}], "multi_turn_response", r"field 'rejected' must end in"),
])
def test_implicit_chat_bad_records(tmp_path, chosen, rejected, reason, message):
  path = _write_jsonl(tmp_path / "t.jsonl", [{"chosen": chosen, "rejected": rejected}])
  with pytest.raises(ValueError, match=message):
    load_preferences(path, fmt="implicit_chat")
  # Nothing survives: the error names the file and the counts (not "0 blocks cannot feed 1 shards" later on).
  with pytest.raises(ValueError, match=rf"no usable records in .*t.jsonl: read 1, kept 0, skipped 1 \({reason}=1\)"):
    load_preferences(path, fmt="implicit_chat", skip_invalid=True)


def test_data_paths_resolve_against_the_repository_and_a_missing_one_names_the_field(tmp_path, monkeypatch):
  from var_jax import paths  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)  # Not the repository.
  assert paths.data_file("Anthropic/hh-rlhf", "data.source") == "Anthropic/hh-rlhf"  # A hub id is left alone,
  assert paths.data_file("gs://bucket/x.jsonl", "data.source") == "gs://bucket/x.jsonl"  # and so is a URL.
  (tmp_path / "local.jsonl").write_text("{}\n")
  assert paths.data_file("./local.jsonl", "data.source") == "./local.jsonl"  # The working directory first,
  assert paths.data_file("./tests/helpers.py", "data.source") == os.path.join(paths.REPO, "./tests/helpers.py")  # then
  with pytest.raises(FileNotFoundError, match=r"config.data.eval_source='../nowhere/x.jsonl.gz': no such file .*"
                     r"set --config.data.eval_source"):  # the repository, else the field to set.
    paths.data_file("../nowhere/x.jsonl.gz", "data.eval_source")


# ----------------------------------------------------------------------------------------------------------------
# Column mapping.

def test_column_mapping_renames_before_detection(tmp_path):
  rows = [{"question": "Say hi", "good": "Hi!", "bad": "No.", "id": 7}]
  path = _write_jsonl(tmp_path / "c.jsonl", rows)
  with pytest.raises(ValueError, match="cannot detect format"):
    load_preferences(path)
  (rec,), _ = load_preferences(path, columns="prompt=question, chosen=good,rejected=bad")
  assert rec.prompt == ({"role": "user", "content": "Say hi"},) and rec.responses == ("Hi!", "No.")
  # Swapping two fields is a mapping too.
  (rec,), _ = load_preferences(path, columns={"prompt": "question", "chosen": "bad", "rejected": "good"})
  assert rec.responses == ("No.", "Hi!")
  with pytest.raises(ValueError, match=r"c.jsonl:1: missing field 'answer' \(mapped to 'chosen'\)"):
    load_preferences(path, columns="prompt=question,chosen=answer,rejected=bad")


@pytest.mark.parametrize("spec,message", [
    ("prompt=question,chosen", "entry 'chosen' is not field=column"),
    ("question=prompt", "unknown field 'question'"),
    ("prompt=a,prompt=b", "field 'prompt' is mapped twice"),
    ("chosen=a,rejected=a", "one column is mapped to two fields"),
])
def test_bad_column_mapping_is_a_config_error(spec, message):
  from var_jax import config as config_lib
  cfg = config_lib.base_config()
  cfg.data.source = "org/data"
  cfg.data.columns = spec
  with pytest.raises(ValueError, match=f"config.data.columns = {spec!r}: .*{message}"):
    config_lib.validate(cfg)


def test_hub_fields_on_a_local_file_are_a_config_error(tmp_path):
  from var_jax import config as config_lib
  cfg = config_lib.base_config()
  cfg.data.source = _write_jsonl(tmp_path / "d.jsonl", [PAIR])
  cfg.data.revision = "main"
  with pytest.raises(ValueError, match="config.data.revision = 'main': applies to a hub id"):
    config_lib.validate(cfg)
  cfg.data.revision, cfg.data.data_files = "", "train=a.parquet,b.parquet"
  with pytest.raises(ValueError, match="config.data.data_files = .*either every entry is split=path or none is"):
    config_lib.validate(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Unreadable files: errors that name the file (and line).

def test_non_utf8_byte_names_file_and_line(tmp_path):
  path = tmp_path / "latin1.jsonl"
  good = json.dumps(PAIR).encode()
  path.write_bytes(good + b"\n" + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'.encode("latin-1") + b"\n"
                   + good + b"\n")
  with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8 \(byte 0xe9 at column 16\)"):
    load_preferences(str(path))
  recs, stats = load_preferences(str(path), skip_invalid=True)
  assert len(recs) == 2 and dict(stats.skipped) == {"not_utf8": 1} and stats.read == 3
  # A whole-file .json too, and inside a .gz.
  js = tmp_path / "latin1.json.gz"
  with gzip.open(js, "wb") as f:
    f.write(b'[\n{"prompt": "x", "chosen": "a", "rejected": "b"},\n{"prompt": "caf\xe9", "chosen": "a", '
            b'"rejected": "b"}]\n')
  with pytest.raises(ValueError, match=r"latin1.json.gz:3: not UTF-8 \(byte 0xe9\)"):
    load_preferences(str(js))


def test_utf8_bom_is_accepted(tmp_path):
  path = tmp_path / "bom.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + json.dumps(PAIR).encode() + b"\n")
  (rec,), _ = load_preferences(str(path))
  assert rec.responses == ("Hi!", "No.")


@pytest.mark.parametrize("name", ["t.jsonl.gz", "t.json.gz"])
def test_truncated_gz_names_the_file(tmp_path, name):
  path = tmp_path / name
  rows = [{"prompt": f"q{i} " + "x" * (i % 97), "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(3000)]
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write(json.dumps(rows) if name.startswith("t.json.") else "".join(json.dumps(r) + "\n" for r in rows))
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=f"{name}: truncated or corrupt gzip file"):
    load_preferences(str(path))
  path.write_bytes(b"not gzip at all")
  with pytest.raises(ValueError, match=f"{name}: truncated or corrupt gzip file .*before the first line"):
    load_preferences(str(path))


@pytest.mark.parametrize("name,content", [("e.jsonl", b""), ("e.jsonl", b"\n  \n"), ("e.json", b"[]"),
                                          ("e.json", b""), ("e.jsonl.gz", None), ("e.parquet", None)])
def test_empty_file_names_the_file(tmp_path, name, content):
  path = tmp_path / name
  if name.endswith(".gz"):
    with gzip.open(path, "wb") as f:
      f.write(b"")
  elif name.endswith(".parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
  else:
    path.write_bytes(content)
  with pytest.raises(ValueError, match=f"{name}: empty file"):
    load_preferences(str(path))


# ----------------------------------------------------------------------------------------------------------------
# HF datasets arguments: config name, data_files, revision, columns.

def _parquet_dir(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  folder = tmp_path / "ds"
  folder.mkdir()
  for split, n in (("train", 5), ("test", 2)):
    rows = [{"question": f"{split} q{i}", "good": f"g{i}", "bad": f"b{i}"} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}-00000.parquet")
  return folder


def test_local_dataset_folder_with_data_files_and_columns(tmp_path):
  folder = _parquet_dir(tmp_path)
  recs, stats = load_preferences(str(folder), data_files="train=train-00000.parquet,test=test-00000.parquet",
                                 split="test", columns="prompt=question,chosen=good,rejected=bad")
  assert stats.kept == 2 and recs[1].prompt[0]["content"] == "test q1" and recs[1].responses == ("g1", "b1")
  assert recs[0].source == f"{folder}:test[0]"
  # One unnamed list of files is a single "train" split.
  recs, _ = load_preferences("parquet", data_files=str(folder / "test-00000.parquet"),
                             columns="prompt=question,chosen=good,rejected=bad")
  assert [r.prompt[0]["content"] for r in recs] == ["test q0", "test q1"]


def test_hub_id_arguments_reach_load_dataset(monkeypatch):
  """A hub id takes the same path as a local builder; here load_dataset is replaced to see its arguments."""
  import datasets
  calls = []

  def fake_load_dataset(path, name=None, **kwargs):
    calls.append((path, name, kwargs))
    return datasets.Dataset.from_list([{"q": "Say hi", "c": "Hi!", "r": "No."}])

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  (rec,), _ = load_preferences("org/prefs", config_name="english", data_files="train=data/a.parquet,train=b.parquet",
                               revision="0123abc", split="train", columns="prompt=q,chosen=c,rejected=r")
  assert rec.responses == ("Hi!", "No.") and rec.source == "org/prefs/english:train[0]"
  (path, name, kwargs), = calls
  assert (path, name) == ("org/prefs", "english")
  assert kwargs == {"data_dir": None, "data_files": {"train": ["data/a.parquet", "b.parquet"]}, "split": "train",
                    "revision": "0123abc"}


def test_load_task_passes_the_data_config(tmp_path, monkeypatch):
  from var_jax import config as config_lib
  from var_jax import stages
  from var_jax.data import synthetic
  folder = _parquet_dir(tmp_path)
  monkeypatch.setattr(stages, "hf_tokenizer", lambda cfg: synthetic.build_tokenizer())
  cfg = config_lib.base_config()
  cfg.data.update(source=str(folder), eval_source=str(folder), split="train", eval_split="test",
                  data_files="train=train-00000.parquet,test=test-00000.parquet",
                  columns="prompt=question,chosen=good,rejected=bad")
  config_lib.validate(cfg)
  task = stages.load_task(cfg)
  assert [r.prompt[0]["content"] for r in task.pref_records] == [f"train q{i}" for i in range(5)]
  assert [r.responses for r in task.eval_records] == [("g0", "b0"), ("g1", "b1")]


# ----------------------------------------------------------------------------------------------------------------
# Multi-message completions (TRL's conversational format): config.data.completion_turns.

def _msg(role, content):
  return {"role": role, "content": content}


# A prompt, then chosen and rejected completions of assistant, tool, assistant / assistant, user, assistant.
_PROMPT = [_msg("system", "Be brief"), _msg("user", "Weather?")]
_CHOSEN = [_msg("assistant", "Let me look."), _msg("tool", "sunny"), _msg("assistant", "Sunny.")]
_REJECTED = [_msg("assistant", "Where?"), _msg("user", "Paris"), _msg("assistant", "Rain.")]
_EXPLICIT = {"prompt": _PROMPT, "chosen": _CHOSEN, "rejected": _REJECTED}
_IMPLICIT = {"chosen": _PROMPT + _CHOSEN, "rejected": _PROMPT + _REJECTED}


_SINGLE = {"prompt": [_msg("user", "Say hi")], "chosen": [_msg("assistant", "Hi!")],
           "rejected": [_msg("assistant", "No.")]}


@pytest.mark.parametrize("row,single", [(_EXPLICIT, _SINGLE),
                                        (_IMPLICIT, {k: _SINGLE["prompt"] + _SINGLE[k] for k in ("chosen", "rejected")})],
                         ids=["explicit", "implicit"])
def test_multi_message_completions_by_mode(tmp_path, row, single):
  path = _write_jsonl(tmp_path / "c.jsonl", [row, single])
  # "single" (the default) keeps the old behaviour: the record is skipped, counted and named.
  recs, stats = load_preferences(path, skip_invalid=True)
  assert dict(stats.skipped) == {"multi_turn_response": 1} and stats.kept == 1 and recs[0].completions is None
  with pytest.raises(ValueError, match=r"c.jsonl:1: field 'chosen' must end in exactly one assistant message after "
                                       r"the 2 shared message\(s\); it has \['assistant', 'tool', 'assistant'\]"):
    load_preferences(path)
  trained = {"last": [(False, False, True)] * 2, "all": [(True, False, True)] * 2}
  for turns, flags in trained.items():
    (rec, plain), stats = load_preferences(path, completion_turns=turns)
    assert stats.kept == 2 and plain.completions is None and plain.responses == ("Hi!", "No.")
    assert rec.prompt == tuple(_PROMPT) and rec.responses == ("Sunny.", "Rain.")
    assert [[(m["role"], m["content"]) for m in c] for c in rec.completions] == [
        [(m["role"], m["content"]) for m in side] for side in (_CHOSEN, _REJECTED)]
    assert [tuple(m["train"] for m in c) for c in rec.completions] == flags


def test_completion_messages_shared_by_both_sides_belong_to_the_prompt(tmp_path):
  """Explicit completions that start alike give the record their implicit form gives: one message each, "single"."""
  row = {"prompt": _PROMPT, "chosen": _REJECTED[:2] + [_msg("assistant", "Sunny.")], "rejected": _REJECTED}
  (rec,), _ = load_preferences(_write_jsonl(tmp_path / "s.jsonl", [row]))
  assert rec.prompt == tuple(_PROMPT + _REJECTED[:2]) and rec.responses == ("Sunny.", "Rain.")
  assert rec.completions is None


def test_completions_differing_only_in_context_are_not_duplicates(tmp_path):
  row = {"prompt": _PROMPT, "chosen": _CHOSEN[:2] + _REJECTED[2:], "rejected": _REJECTED}
  path = _write_jsonl(tmp_path / "d.jsonl", [row])
  (rec,), _ = load_preferences(path, completion_turns="last")
  assert rec.responses == ("Rain.", "Rain.") and rec.completions[0][0]["content"] == "Let me look."


@pytest.mark.parametrize("turns", ["last", "all"])
def test_completion_must_end_in_an_assistant_message(tmp_path, turns):
  row = {"prompt": _PROMPT, "chosen": _CHOSEN[:2], "rejected": _REJECTED}
  path = _write_jsonl(tmp_path / "e.jsonl", [row])
  with pytest.raises(ValueError, match=r"e.jsonl:1: field 'chosen' must end in an assistant message after the 2 "
                                       r"shared message\(s\); it has \['assistant', 'tool'\]"):
    load_preferences(path, completion_turns=turns)
  with pytest.raises(ValueError, match=r"no usable records in .*e.jsonl: .*\(completion_not_assistant=1\)"):
    load_preferences(path, completion_turns=turns, skip_invalid=True)


def test_completion_turns_config_is_checked(tmp_path):
  from var_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.base_config()
  cfg.data.completion_turns = "every"
  with pytest.raises(ValueError, match=r"data.completion_turns"):
    config_lib.validate(cfg)
  with pytest.raises(ValueError, match=r"completion_turns='every' is not one of \('single', 'last', 'all'\)"):
    load_preferences(_write_jsonl(tmp_path / "p.jsonl", [PAIR]), completion_turns="every")
