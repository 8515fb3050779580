"""Orbax checkpoints of a training run: the TrainState plus the data iterator's state, async, keep K."""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


class RunCheckpointer:
    """Saves every `every` steps (asynchronously), keeps the newest `keep`, restores the latest."""

    def __init__(self, directory, *, every: int, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).resolve()
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(every, 1),
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether `maybe_save(step, ...)` would save (without `force`): lets a caller check the state first."""
        return self.manager.should_save(step)

    def maybe_save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
        """Saves when `step` is on the interval (or `force`); returns whether a save started."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        return self.manager.save(step, args=args, force=force)

    def restore(self, template_state, step: int | None = None):
        """(state, data_state) of `step` (default: the latest); `template_state` gives structure and shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored.state, restored.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def start_or_resume(config, out_dir, state, loader):
    """(checkpointer, data iterator, state) of a run in OUT_DIR: when OUT_DIR/checkpoints holds a step, the state
    and the iterator's position come from it and metrics.jsonl is trimmed to that step (the trainers' shared
    resume)."""
    from opensora_jax.training import run_dir

    out_dir = pathlib.Path(out_dir)
    checkpointer = RunCheckpointer(out_dir / "checkpoints", every=config.ckpt_every, keep=config.keep_checkpoints,
                                   async_save=config.async_checkpoint)
    iterator = iter(loader)
    if checkpointer.latest_step() is not None:
        state, data_state = checkpointer.restore(state)
        iterator.set_state(data_state["iterator"])
        run_dir.trim_metrics(out_dir, int(state.step))
        print(f"resumed from step {int(state.step)} ({checkpointer.directory})", flush=True)
    return checkpointer, iterator, state
