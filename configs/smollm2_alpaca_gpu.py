"""SmolLM2-135M-Instruct on the AlpacaEval GPT-4 preference pairs under the evaluation protocol, sized for one GPU.

    python -m launch.tune --config=configs/smollm2_alpaca_gpu.py --dir=workdir/results/smollm2_alpaca \
        --metric=judge_reward --space=var:var.lam=0.5,2 --space=dpo:dpo.lr=3e-6,1e-5 \
        --space=chosen:chosen.lr=3e-6,1e-5 --beside=var:var.paper=True,var.lam=1.0 --seeds=0,1,2

configs/smollm2_gpu.py's protocol on the AlpacaEval training file, which holds 30,274 pairs of 672 prompts (1 to
122 pairs each, ~45 on average, interleaved through the file): the policies read the first 4 pairs of each of its
first 400 prompts, split by first user turn into 240 training, 80 validation and 80 test prompts; the judge trains
on the 3,648 pairs of the file's other 272 prompts. (The file's test companion holds only 68 distinct prompts, too
few for intervals, so it is not used.)
"""
from configs import smollm2_gpu

ALPACA = "../shared/data/alpaca_eval_pairs/alpaca_eval_gpt4_prefs_short_train.jsonl.gz"


def get_config():
  c = smollm2_gpu.get_config()
  c.data.source = ALPACA
  c.data.max_per_prompt = 4             # Many prompts rather than many pairs of a few prompts: ...
  c.data.max_records = 1600             # ... 400 prompts, 240 for training, 80 validation, 80 test.
  c.data.eval_fraction = 0.4
  c.data.max_prompt_len = 128           # Single-turn instructions; few are longer.
  c.data.max_response_len = 256         # Model answers are long: 256 tokens cut about 9% of them.
  c.judge.source = ALPACA               # The 3,648 pairs of the other 272 prompts.
  c.judge.steps = 256
  c.eval.max_new_tokens = 256
  return c
