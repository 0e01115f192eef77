"""Checkpoints with orbax: keep the last N plus periodic ones, save asynchronously, resume the newest
good one.

What a cluster does to a run and what happens here:
- a kill mid-save leaves orbax's temporary directory, which is never taken for a checkpoint;
- a committed checkpoint that cannot be read (a truncated or corrupt file) is moved to
  ``<workdir>/corrupt_checkpoints/`` with a warning and the previous one is restored;
- a full disk or an unwritable directory fails at start (free space against the state's size) or at
  the save, naming the directory; the checkpoints already written stay as they were;
- a state with a NaN or Inf is never written.
"""
import errno
import os
import shutil
import time

import jax
import jax.experimental.multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what to do."""


class Checkpointer:
    """An orbax ``CheckpointManager`` over ``<workdir>/checkpoints`` for one (unreplicated) train state.

    Saves are asynchronous: ``save`` returns once the arrays are copied off the devices and the
    write goes on in the background; ``close`` (or the next save) waits for it.
    """

    def __init__(self, workdir: str, keep: int = 3, keep_period: int = 0):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        check_writable(self.workdir)
        self.options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period or None, create=True,
                                                    enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state) -> None:
        """Start writing ``state`` (host arrays) as checkpoint ``step``; refuses a non-finite state."""
        bad = nonfinite_leaves(state)
        if bad:
            raise CheckpointError(f"refusing to save step {step}: non-finite values in {', '.join(bad[:5])}; "
                                  f"the last checkpoint written is step {self.latest_step()} in {self.directory}")
        try:
            self.manager.save(int(step), args=ocp.args.StandardSave(state))
        except OSError as e:
            raise self._write_error(step, e) from e

    def reached_preemption(self, step: int) -> bool:
        """Multi-process: whether all processes agreed to stop at ``step`` (JAX's preemption sync)."""
        return self.manager.reached_preemption(int(step))

    def restore_latest(self, template=None):
        """The newest readable checkpoint, laid out like ``template`` (``None``: as saved, nested dicts);
        ``template`` itself if there is none.

        An unreadable checkpoint is moved aside with a warning and the one before it is tried; one that
        reads but does not fit ``template`` (another architecture) raises ``ValueError``.
        """
        abstract = None if template is None else jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        for step in reversed(self.all_steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
            except (OSError, ValueError, RuntimeError) as e:
                if "Structure mismatch" in str(e):
                    raise ValueError(f"checkpoint {step} in {self.directory} holds another train state than this "
                                     f"config builds: {e}") from e
                self._quarantine(step, e)
                continue
            if abstract is not None:
                _check_shapes(restored, abstract, f"checkpoint {step} in {self.directory}")
            return restored
        return template

    def wait(self) -> None:
        """Block until the pending save is on disk; a failed write raises ``CheckpointError``."""
        try:
            self.manager.wait_until_finished()
        except OSError as e:
            raise self._write_error(self.latest_step(), e) from e

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def _quarantine(self, step: int, error: Exception) -> None:
        target = os.path.join(self.workdir, "corrupt_checkpoints", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        logging.warning("checkpoint %d in %s cannot be read (%s: %s); moved it to %s and trying the previous one",
                        step, self.directory, type(error).__name__, str(error)[:300], target)
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        jax.experimental.multihost_utils.sync_global_devices("checkpoint quarantine")
        self.manager.close()  # a fresh manager: the old one keeps what it inferred from the bad checkpoint
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)

    def _write_error(self, step, error: OSError) -> CheckpointError:
        full = " (the disk is full)" if error.errno == errno.ENOSPC else ""
        return CheckpointError(f"could not write checkpoint {step} to {self.directory}{full}: {error}. Checkpoints "
                               f"already there are intact ({self.all_steps()}); free space or fix permissions, "
                               f"then rerun the same command to resume")


def check_writable(workdir: str) -> None:
    """Fail now, naming ``--workdir``, if ``workdir`` cannot be created or written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"--workdir={workdir} is not writable ({e}); choose a directory you can write") from e


def check_free_space(workdir: str, state, copies: int = 2) -> None:
    """Fail now if ``workdir``'s disk has less room than ``copies`` checkpoints of ``state`` (bytes of its arrays)."""
    need = copies * sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(state))
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise CheckpointError(f"--workdir={workdir} has {free / 2**20:.1f} MiB free; {copies} checkpoints of this "
                              f"train state need {need / 2**20:.1f} MiB: free space or choose another --workdir")


def nonfinite_leaves(tree) -> list[str]:
    """Paths of the floating-point leaves of ``tree`` that hold a NaN or an Inf."""
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating) and not np.isfinite(leaf).all():
            bad.append(jax.tree_util.keystr(path))
    return bad


def _check_shapes(restored, abstract, where: str) -> None:
    """orbax restores an array with its saved shape even when the template's differs: refuse that."""
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree_util.tree_leaves(abstract)):
        if tuple(np.shape(got)) != tuple(want.shape):
            raise ValueError(f"{where} has {jax.tree_util.keystr(path)} of shape {tuple(np.shape(got))}, but this "
                             f"config builds {tuple(want.shape)}: the architecture changed; use a new --workdir or "
                             f"the config the run was started with")
