"""SmolLM2-135M-Instruct on the AlpacaEval GPT-4 preference pairs under the evaluation protocol, sized for 2 CPU cores.

    python -m launch.tune --config=configs/smollm2_alpaca.py --dir=workdir/results/smollm2_alpaca_cpu \
        --metric=judge_reward --space=var:var.lam=0.5,2 --space=dpo:dpo.lr=1e-5,3e-5 \
        --space=chosen:chosen.lr=1e-5,3e-5 --beside=var:var.paper=True,var.lam=1.0 --seeds=0,1,2

configs/smollm2_alpaca_gpu.py's protocol (held-out judge on other prompts, validation and test prompts split by
first user turn, samples at temperature 1, 3 seeds) cut down for 2 CPU cores: a dozen steps of 4
prompts per policy stage. AlpacaEval answers are long (128 tokens cut 43% of them), so only pairs whose two
responses both fit in 128 tokens are kept (data.truncation = "drop": 408 training and 188 held-out pairs of the
1,600 read; cutting them instead would leave most answers without an end). The command took 96 minutes on 2 CPU
cores, most of it eval (generating samples and scoring them with the policy, the reference and both reward models); the
table and what it does and does not show are in the README ("AlpacaEval GPT-4 preferences under the evaluation
protocol, 2 CPU cores"). At 12 steps of 4 prompts the policies barely leave the reference (KL 0.1-1.5 nats), and no
method separates from it.
"""
from configs import cpu_protocol
from configs import smollm2_alpaca_gpu


def get_config():
  c = cpu_protocol.cut_down(smollm2_alpaca_gpu.get_config())
  c.data.max_prompt_len = 64            # Cuts ~13% of the instructions (their first tokens).
  c.data.max_response_len = 128
  c.data.truncation = "drop"            # A pair with a longer response is left out (counted in the log).
  return c
