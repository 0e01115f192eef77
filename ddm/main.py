"""The command line: ``python -m ddm.main --config=configs/digits.py --workdir=runs/digits --mode=train``.

Override any config field with ``--config.field=value`` (e.g. ``--config.train.num_steps=500``).
"""
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/digits.py", "Config file (an ml_collections get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", "runs/digits", "Where checkpoints, logs and samples go; a run resumes from it.")
flags.DEFINE_enum("mode", "train", ["train", "sample"], "train: train (or resume) then write a sample grid; "
                  "sample: write samples.npz and samples.png from the latest checkpoint.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ddm import experiment  # after flag parsing: importing it loads JAX and TensorFlow
    if FLAGS.mode == "train":
        experiment.train(FLAGS.config, FLAGS.workdir)
    else:
        experiment.sample(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
