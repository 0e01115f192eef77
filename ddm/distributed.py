"""Multi-process start-up: ``jax.distributed.initialize`` before anything touches a device.

Three ways a run starts (``--num_processes``, ``--coordinator_address``, ``--process_id`` in ``ddm.main``):

* ``--num_processes=1``: one process, nothing to initialise, whatever the environment says.
* ``--num_processes=N`` (N > 1) with ``--coordinator_address=HOST:PORT`` and ``--process_id=0..N-1``: GPU
  clusters and any launcher of your own (``launch/slurm.sh`` does this, one process per node). JAX's cluster
  detection is switched off, so each process keeps every device of its host (on SLURM, JAX's detection
  would otherwise restrict each process to the one GPU numbered ``SLURM_LOCALID``).
* none of the three flags: JAX's own detection (``jax.distributed.initialize()`` with no arguments) when the
  environment is a multi-process launch it knows: a SLURM job step with ``SLURM_NTASKS`` > 1 (``srun``; JAX
  takes the first node of ``SLURM_STEP_NODELIST`` as coordinator, ``SLURM_PROCID``/``SLURM_NTASKS`` as id and
  count, and one GPU per process, so launch one task per GPU), Open MPI with ``OMPI_COMM_WORLD_SIZE`` > 1, or a
  Cloud TPU VM (``libtpu`` installed, i.e. ``jax[tpu]``; JAX reads the pod's workers from the TPU metadata
  server, a single-host TPU VM becomes a 1-process run). Anything else is a single process.

On CPU, cross-process collectives use gloo over TCP, JAX's default ``jax_cpu_collectives_implementation``
(checked for jax 0.10.2); nothing needs configuring.

Under ``jax.pmap`` the mapped axis spans the devices of every process, in process order (process p's local
devices are axis indices p * L .. p * L + L - 1), so ``lax.pmean`` averages gradients over all hosts and
``lax.axis_index`` is the global device index, which is the order ``data.train_batches`` lays out a global
batch in.
"""
import importlib.util
import os
from collections.abc import Mapping

import jax
from absl import logging

AUTO = {}  # jax.distributed.initialize() with no arguments: JAX detects the cluster


def _int_env(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, "0"))
    except ValueError:
        return 0


def detected_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """The multi-process environment JAX's ``initialize()`` would detect ("slurm", "ompi", "tpu"), or None."""
    environ = os.environ if environ is None else environ
    if "SLURM_STEP_NODELIST" in environ and _int_env(environ, "SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ and _int_env(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    if "TPU_SKIP_MDS_QUERY" not in environ and importlib.util.find_spec("libtpu") is not None:
        return "tpu"
    return None


def _check_coordinator_address(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator_address={address!r} is not HOST:PORT; use process 0's host name or IP "
                         f"and a free port, e.g. --coordinator_address=node001:12345")


def initialize_kwargs(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
                      environ: Mapping[str, str] | None = None) -> dict | None:
    """The arguments for ``jax.distributed.initialize`` these flags and this environment call for:
    None for a single process, ``AUTO`` for JAX's cluster detection, or explicit ones.

    Raises ValueError, naming the flag and the fix, on inconsistent flags.
    """
    if num_processes is None:
        for flag, value in (("--coordinator_address", coordinator_address), ("--process_id", process_id)):
            if value is not None:
                raise ValueError(f"{flag}={value} was given without --num_processes; pass --num_processes=N "
                                 f"(the total number of processes) too, or drop {flag} to let JAX detect "
                                 f"the cluster")
        return AUTO if detected_cluster(environ) else None
    if num_processes < 1:
        raise ValueError(f"--num_processes={num_processes} must be >= 1 (1: a single process; leave it unset "
                         f"to let JAX detect a SLURM, Open MPI or TPU-pod launch)")
    if num_processes == 1:
        if process_id not in (None, 0):
            raise ValueError(f"--process_id={process_id} with --num_processes=1: the only process is 0; "
                             f"drop --process_id or raise --num_processes")
        return None
    if coordinator_address is None:
        raise ValueError(f"--num_processes={num_processes} needs --coordinator_address=HOST:PORT: process 0's "
                         f"host and a free port, the same on every process")
    _check_coordinator_address(coordinator_address)
    if process_id is None:
        raise ValueError(f"--num_processes={num_processes} needs --process_id: this process's index, "
                         f"0..{num_processes - 1}, a different one on each process")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must be in 0..{num_processes - 1} "
                         f"(--num_processes={num_processes}); number the processes from 0")
    return {"coordinator_address": coordinator_address, "num_processes": num_processes,
            "process_id": process_id, "cluster_detection_method": "deactivate"}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the other processes of a multi-process run (see the module docstring), then log the topology.
    Call it before anything touches a device."""
    kwargs = initialize_kwargs(coordinator_address, num_processes, process_id)
    if kwargs is not None:
        how = "explicit flags" if kwargs else f"JAX's {detected_cluster()} detection"
        logging.info("jax.distributed.initialize (%s)", how)
        try:
            jax.distributed.initialize(**kwargs)
        except ValueError as e:
            if kwargs:
                raise
            raise ValueError(f"JAX could not detect the {detected_cluster()} cluster ({e}); pass "
                             f"--num_processes=1 for a single process, or --num_processes, "
                             f"--coordinator_address and --process_id") from e
    log_topology()


def log_topology() -> None:
    logging.info("process %d of %d; %d local and %d global %s devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(), jax.default_backend())
