"""Subprocess body of tests/test_train.py's two-process checkpoint test: one of two processes (one CPU device each,
gloo collectives) that save steps 1 and 2 of a state sharded over both, then restore after process 1's shard of step 2
was cut short, so that only process 1's read fails.

    python tests/checkpoint_worker.py DIRECTORY OUT.json PORT PROCESS_ID

Writes what this process restored (step, values, the directory listing) to OUT.json.<PROCESS_ID>.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from var_jax import checkpoints  # noqa: E402
from var_jax import train as train_lib  # noqa: E402

directory, out, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
sharding = NamedSharding(mesh, P("x"))
cfg = ml_collections.ConfigDict({"checkpoint": {"keep": 3, "async_save": False}})


def state(step):
  rows = np.random.default_rng(step).normal(size=(2, 4096)).astype(np.float32)  # Incompressible: real data files.
  rows[:, 0] = [10 * step, 10 * step + 1]  # Row r of step s starts with 10 s + r.
  return {"w": jax.make_array_from_callback(rows.shape, sharding, lambda idx: rows[idx])}


mngr = train_lib.checkpoint_manager(directory, cfg)
for step in (1, 2):
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state(step)),
                                          data=ocp.args.JsonSave({"s": step})))
mngr.wait_until_finished()
mngr.close()
if pid == 0:  # Cut process 1's array data of step 2: only process 1 reads it back.
  d = os.path.join(directory, "2", "state", "ocdbt.process_1", "d")
  victim = max((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
multihost_utils.sync_global_devices("worker:truncated")

abstract = {"w": jax.ShapeDtypeStruct((2, 4096), jnp.float32, sharding=sharding)}
mngr = train_lib.checkpoint_manager(directory, cfg)
restored = checkpoints.restore_newest(mngr, abstract, "test")
local = [np.asarray(s.data).ravel()[:2].tolist() for s in restored["state"]["w"].addressable_shards]
multihost_utils.sync_global_devices("worker:restored")
with open(f"{out}.{pid}", "w") as f:
  json.dump({"data": restored["data"], "local": local, "steps": list(mngr.all_steps()),
             "listing": sorted(os.listdir(directory))}, f)
mngr.close()
