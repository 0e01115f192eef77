"""Checkpoints with orbax: keep the last N plus periodic ones, save asynchronously, resume the latest."""
import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """An orbax ``CheckpointManager`` over ``<workdir>/checkpoints`` for one (unreplicated) train state.

    Saves are asynchronous: ``save`` returns once the arrays are copied off the devices and the
    write goes on in the background; ``close`` (or the next save) waits for it.
    """

    def __init__(self, workdir: str, keep: int = 3, keep_period: int = 0):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period or None, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        self.manager.save(int(step), args=ocp.args.StandardSave(state))

    def restore_latest(self, template):
        """The latest saved state, laid out like ``template``; ``template`` itself if there is none."""
        step = self.manager.latest_step()
        if step is None:
            return template
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
