"""XLA:CPU options against the interleaved var / sft / transformers+PyTorch step (benchmarks.bench's sidebyside).

    python -m benchmarks.xla_cpu_flags [--passes 2] [--rounds 3] [--out xla_cpu_flags.jsonl]

XLA reads its flags once, when the backend starts, so each setting runs in its own process: per pass, every setting
in turn (default first), a result check (the var step's loss and gradient norm on bench's fixed synthetic batch,
to set beside the default's: an option may change results only by float32 rounding) and then
`python -m benchmarks.bench --what sidebyside` under that setting's XLA_FLAGS. The table gives, per setting, the
median over passes of the var step, the PyTorch step and their tokens/s ratio, with the range over passes.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

SETTINGS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
}

_PASSES = flags.DEFINE_integer("passes", 2, "Passes over the settings (interleaved).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of each sidebyside run.")
_OUT = flags.DEFINE_string("out", "xla_cpu_flags.jsonl", "JSONL file the per-run records are appended to.")
_CHECK = flags.DEFINE_bool("check", False, "Child mode: print the var step's loss and gradient norm as JSON.")


def check() -> dict:
  """The var step's loss and gradient norm on bench's synthetic batch (bench-30m, 512 tokens, 2 pairs)."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import bench  # pylint: disable=g-import-not-at-top
  from var_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  mcfg = model_lib.get_config("bench-30m")
  batch = bench.synthetic_batch(mcfg.vocab_size, 512, groups=1, group_size=2)
  compiled, state, dev_batch, _ = bench.compile_train_step("var", mcfg, batch)
  _, metrics = compiled(state, dev_batch)
  return {k: float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm")}


def _run(setting: str, args: list[str]) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": SETTINGS[setting]}
  return subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, check=True)


def main(argv) -> None:
  del argv
  if _CHECK.value:
    print(json.dumps(check()))
    return
  results = {s: {"check": None, "var": [], "torch": [], "ratio": []} for s in SETTINGS}
  for p in range(_PASSES.value):
    for setting in SETTINGS:
      if results[setting]["check"] is None:
        out = _run(setting, ["benchmarks.xla_cpu_flags", "--check"]).stdout.strip().splitlines()[-1]
        results[setting]["check"] = json.loads(out)
      with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sbs.jsonl")
        _run(setting, ["benchmarks.bench", "--what", "sidebyside", "--rounds", str(_ROUNDS.value), "--out", path])
        record = [r for r in map(json.loads, open(path, encoding="utf-8")) if r["what"] == "sidebyside"][-1]
      m = record["metrics"]
      results[setting]["var"].append(m["var_step_s"]["median"])
      results[setting]["torch"].append(m["torch_step_s"]["median"])
      results[setting]["ratio"].append(m["ratio_var_over_torch_tokens_per_s"]["median"])
      with open(_OUT.value, "a", encoding="utf-8") as f:
        f.write(json.dumps({"setting": setting, "xla_flags": SETTINGS[setting], "pass": p, "sidebyside": m,
                            "check": results[setting]["check"]}) + "\n")
      print(f"pass {p} {setting}: var {m['var_step_s']['median']:.3f} s, torch {m['torch_step_s']['median']:.3f} s, "
            f"var/torch tokens/s {m['ratio_var_over_torch_tokens_per_s']['median']:.3f}", flush=True)
  base = results["default"]["check"]
  print("| setting | XLA_FLAGS | var step s | torch step s | var/torch tokens/s | loss rel. diff | grad norm rel. diff |")
  print("|---|---|---|---|---|---|---|")
  for setting, r in results.items():
    rng = lambda xs: f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"  # noqa: E731
    rel = {k: abs(r["check"][k] - base[k]) / abs(base[k]) for k in ("loss", "grad_norm")}
    print(f"| {setting} | `{SETTINGS[setting] or '(none)'}` | {rng(r['var'])} | {rng(r['torch'])} | {rng(r['ratio'])} "
          f"| {rel['loss']:.1e} | {rel['grad_norm']:.1e} |")


if __name__ == "__main__":
  app.run(main)
