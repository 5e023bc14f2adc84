"""Throughput of parse + tokenize + batch on a real preference file (one process, CPU).

  python -m benchmarks.data_bench [FILE] [--tokenizer DIR]
"""
from var_jax.data.formats import load_preferences
from var_jax.data.pipeline import PipelineConfig, measure_throughput
from var_jax.data.tokenize import Tokenizer, byte_level_bpe_tokenizer, plain_prompt


def _main(argv=None):
  """python -m benchmarks.data_bench [FILE] [--tokenizer DIR] : parse + tokenize + batch throughput.

  Without --tokenizer, a GPT-2-style byte-level BPE (8k vocab) is trained in memory on the first 1000 records
  (not timed), so the measurement needs no network.
  """
  import argparse  # pylint: disable=g-import-not-at-top
  ap = argparse.ArgumentParser()
  ap.add_argument("source", nargs="?", default="../shared/data/hh_rlhf/harmless-base_test.jsonl.gz")
  ap.add_argument("--tokenizer", default=None, help="local transformers tokenizer folder")
  ap.add_argument("--max_prompt_len", type=int, default=256)
  ap.add_argument("--max_response_len", type=int, default=256)
  ap.add_argument("--block_size", type=int, default=16)
  ap.add_argument("--group_size", type=int, default=8)
  ap.add_argument("--groups_per_batch", type=int, default=4)
  args = ap.parse_args(argv)
  if args.tokenizer:
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    hf = AutoTokenizer.from_pretrained(args.tokenizer)
  else:
    recs, _ = load_preferences(args.source, skip_invalid=True, limit=1000)
    hf = byte_level_bpe_tokenizer([plain_prompt(r.prompt) + " " + r.responses[0] for r in recs], vocab_size=8000)
  tok = Tokenizer(hf, args.max_prompt_len, args.max_response_len)
  cfg = PipelineConfig(block_size=args.block_size, group_size=args.group_size,
                       groups_per_batch=args.groups_per_batch)
  result = measure_throughput(args.source, tok, cfg)
  print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
  _main()
