"""SmolLM2-135M-Instruct on HH-RLHF harmless-base under the evaluation protocol, sized for 2 CPU cores.

    python -m launch.tune --config=configs/smollm2_hh.py --dir=workdir/results/smollm2_hh_cpu \
        --metric=judge_reward --space=var:var.lam=0.5,2 --space=dpo:dpo.lr=1e-5,3e-5 \
        --space=chosen:chosen.lr=1e-5,3e-5 --beside=var:var.paper=True,var.lam=1.0 --seeds=0,1,2

configs/smollm2_gpu.py's protocol (held-out judge on the rest of the file, validation and test prompts split by
first user turn, samples at temperature 1, 3 seeds) cut down for 2 CPU cores the way configs/smollm2_alpaca.py cuts
down the AlpacaEval one: the file's first 512 pairs are the policies' data (a quarter of the prompts held out and
halved into validation and test prompts), a dozen steps of 4 prompts per policy stage, the judge on the pairs of the
rest of the file that share no first user turn with them. Unlike the AlpacaEval one it does not fit in 2 hours on 2
CPU cores (HH prompts keep 128 tokens): seed 0 took 15.5 min for the shared stages, 7.2-7.7 min per validation trial
and 27.7 min for the test run, by these times about 3.5 hours for three seeds; and its 24-step judge reached a held-
out accuracy of only 0.563 on 174 pairs, too weak to rank policies. So no table comes from it (README, HH section);
the HH table is configs/smollm2_gpu.py's, on one GPU.
"""
from configs import cpu_protocol
from configs import smollm2_gpu


def get_config():
  c = cpu_protocol.cut_down(smollm2_gpu.get_config())
  c.data.max_records = 512              # ~380 training, ~64 validation, ~64 test prompts.
  return c
