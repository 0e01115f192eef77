"""The command line: ``python -m ddm.main --config=configs/digits.py --workdir=runs/digits --mode=train``.

Override any config field with ``--config.field=value`` (e.g. ``--config.train.num_steps=500``).
Several hosts: start the same command on each with ``--num_processes``, ``--coordinator_address`` and
``--process_id``, or inside a SLURM/Open MPI/TPU-pod launch without them (see ``ddm.distributed`` and launch/).
"""
import signal
import sys

from absl import app, flags
from ml_collections import config_flags


def unknown_field_message(error: Exception, argv) -> str:
    """Name the ``--config.*`` flag whose field does not exist, with ml_collections' suggestion."""
    while error.args and isinstance(error.args[0], BaseException):  # a KeyError wrapped in an AttributeError
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    missing = text.split("\n")[0].strip("'")
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and missing in a.split("=")[0].split(".")),
                "a --config.* flag")
    return (f"{flag}: the config has no field {missing!r}. {' '.join(text.split(chr(10))[1:])}\n"
            f"Every field, with its meaning, is in configs/default.py.")


try:
    config_flags.DEFINE_config_file("config", "configs/digits.py", "Config file (an ml_collections get_config()).",
                                    lock_config=True)
except (AttributeError, KeyError) as e:  # ml_collections applies the --config.* overrides here, at definition
    sys.exit(f"FATAL Flags parsing error: {unknown_field_message(e, sys.argv)}")

flags.DEFINE_string("workdir", "runs/digits", "Where checkpoints, logs and samples go; a run resumes from it. "
                    "Several hosts: a directory they all see (shared file system).")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "report"],
                  "train: train (or resume) then write a sample grid; "
                  "sample: write samples.npz and samples.png from the latest checkpoint; "
                  "eval: the config's evaluation (NLL, sample quality, tables) of the latest checkpoint; "
                  "report: write the report of a trained and evaluated workdir.")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs: HOST:PORT of process 0, the same on every "
                    "process (needs --num_processes and --process_id).")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes (1: single process). "
                     "Unset: JAX detects a SLURM, Open MPI or Cloud TPU launch, else a single process.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index, 0..num_processes-1.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ddm import distributed  # before anything touches a device
    try:
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except ValueError as e:  # inconsistent multi-process flags: the message names them and the fix
        raise app.UsageError(str(e)) from e
    # Lazy imports, after flag parsing: these modules load TensorFlow (clu) and more.
    if FLAGS.mode == "train":
        from ddm import experiment
        state = experiment.train(FLAGS.config, FLAGS.workdir)
        if int(state.step) < FLAGS.config.train.num_steps:  # stopped by a preemption, after saving
            sys.exit(128 + signal.SIGTERM)  # what a SIGTERM-killed process reports, so schedulers requeue
    elif FLAGS.mode == "sample":
        from ddm import experiment
        experiment.sample(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "eval":
        from ddm import evaluate
        evaluate.run_eval(FLAGS.config, FLAGS.workdir)
    else:
        from ddm import report
        report.write_report(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
