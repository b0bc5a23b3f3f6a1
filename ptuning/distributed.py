"""JAX's multi-process runtime: start it (explicitly or auto-detected) and agree across processes.

`initialize` must run before anything touches a JAX device (it is what `ptuning train | eval |
infer` do first). Where the values come from, first match wins:

  1. arguments (the CLI's `--coordinator_address --num_processes --process_id`);
  2. environment `PTUNING_COORDINATOR` (host:port), `PTUNING_NUM_PROCESSES`, `PTUNING_PROCESS_ID`
     (what launch/local_multiprocess.sh sets);
  3. a managed cluster that JAX detects itself: Cloud TPU VMs (pod slices, multislice) and SLURM
     job steps (`srun`) with more than one task;
  4. none of these: a single-process run, nothing is started.

On CPU, cross-process collectives need an implementation: `gloo` is selected before starting.
`any_process(flag)` is the per-step stop agreement (a no-op in single-process runs). JAX is
imported inside the functions, so the CLI can add the flags without loading it.
"""

from __future__ import annotations

import os
from typing import Sequence

ENV_COORDINATOR = "PTUNING_COORDINATOR"
ENV_NUM_PROCESSES = "PTUNING_NUM_PROCESSES"
ENV_PROCESS_ID = "PTUNING_PROCESS_ID"
# Set by some TPU VM images / GKE TPU pods; on plain Cloud TPU VMs JAX asks the metadata server.
_TPU_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID",
            "MEGASCALE_COORDINATOR_ADDRESS")
_SLURM_ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID")


def detect_cluster(environ: dict | None = None) -> str | None:
  """'tpu' on a Cloud TPU VM, 'slurm' inside a multi-task `srun` step, else None."""
  env = os.environ if environ is None else environ
  if any(name in env for name in _TPU_ENV) or os.path.exists("/dev/accel0") or (
      os.path.isdir("/dev/vfio") and env.get("TPU_ACCELERATOR_TYPE")):
    return "tpu"
  if all(name in env for name in _SLURM_ENV) and int(env["SLURM_NTASKS"]) > 1:
    return "slurm"
  return None


def _slurm_local_device_ids(environ: dict) -> list[int] | None:
  """All of a node's GPUs when SLURM runs one task per node (JAX would otherwise give each
  process only GPU `SLURM_LOCALID`, its one-process-per-GPU default)."""
  tasks, nodes = int(environ.get("SLURM_NTASKS", 1)), int(environ.get("SLURM_NNODES", 1))
  if tasks != nodes:
    return None  # one process per GPU: JAX's default ([SLURM_LOCALID]) is right
  visible = environ.get("CUDA_VISIBLE_DEVICES", "")
  count = len([d for d in visible.split(",") if d]) or int(environ.get("SLURM_GPUS_ON_NODE", 0) or 0)
  return list(range(count)) if count else None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, environ: dict | None = None) -> dict | None:
  """Keyword arguments for `jax.distributed.initialize`, or None for a single-process run.

  Explicit values (arguments, then PTUNING_* variables) must be complete; a cluster gives `{}`
  (JAX detects everything). Inside a SLURM step with one task per node, `local_device_ids`
  lists all the node's GPUs (JAX would otherwise give each process GPU `SLURM_LOCALID` only).
  """
  env = os.environ if environ is None else environ
  coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
  if num_processes is None and env.get(ENV_NUM_PROCESSES):
    num_processes = int(env[ENV_NUM_PROCESSES])
  if process_id is None and env.get(ENV_PROCESS_ID):
    process_id = int(env[ENV_PROCESS_ID])
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError(
          "multi-process runs need all of --coordinator_address (or $PTUNING_COORDINATOR), "
          "--num_processes ($PTUNING_NUM_PROCESSES) and --process_id ($PTUNING_PROCESS_ID); "
          f"got coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
          f"process_id={process_id!r}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id} is not in [0, num_processes={num_processes})")
    if num_processes == 1:
      return None
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  elif detect_cluster(env) is not None:
    kwargs = {}
  else:
    return None
  if all(name in env for name in _SLURM_ENV) and (ids := _slurm_local_device_ids(dict(env))):
    kwargs["local_device_ids"] = ids
  return kwargs


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None
               ) -> bool:
  """Starts JAX's distributed runtime when this is a multi-process run; True if it did (or
  already had). Call before any JAX device use; safe to call twice."""
  import jax
  if jax.distributed.is_initialized():
    return True
  kwargs = resolve(coordinator_address, num_processes, process_id)
  if kwargs is None:
    return False
  if local_device_ids is not None:
    kwargs["local_device_ids"] = list(local_device_ids)
  # CPU processes (tests, launch/local_multiprocess.sh) exchange collectives through gloo;
  # accelerators ignore this option.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:
    if kwargs.get("coordinator_address") or detect_cluster() != "tpu":
      raise
    # A single-host TPU VM whose metadata names no workers: nothing to coordinate.
    print(f"ptuning: TPU VM without a worker list ({e}); running single-process", flush=True)
    return False
  return True


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any; collective (call on all processes, at the
  same point). Single-process runs just return `flag`."""
  import jax
  import numpy as np
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
  return bool(np.asarray(flags).any())


def add_arguments(parser) -> None:
  """`--coordinator_address --num_processes --process_id` on an argparse (sub)parser."""
  group = parser.add_argument_group("multi-process (default: auto-detected on TPU VMs / SLURM)")
  group.add_argument("--coordinator_address", default=None,
                     help="host:port of process 0's coordinator (or $PTUNING_COORDINATOR)")
  group.add_argument("--num_processes", type=int, default=None,
                     help="number of processes (or $PTUNING_NUM_PROCESSES)")
  group.add_argument("--process_id", type=int, default=None,
                     help="this process, 0..num_processes-1 (or $PTUNING_PROCESS_ID)")
