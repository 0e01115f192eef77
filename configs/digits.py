"""The embedded config: sklearn's digits at their native 8x8, a small U-Net; 7.5 minutes on 2 CPU cores.

Digits also load at 16x16 or 32x32 (``--config.data.image_size=16``): each doubling costs about 4x
per step on a CPU, so the default stays at the native size.
"""
from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.diffusion.num_timesteps = 1000
    config.diffusion.schedule = "cosine"
    config.diffusion.var_type = "fixed_large"
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 100
    config.optim.ema_rates = (0.995,)
    config.train.batch_size = 64
    config.train.num_steps = 1500
    config.train.steps_per_call = 5
    config.train.log_every = 100
    config.train.sample_every = 500
    config.train.checkpoint_every = 500
    config.train.keep_period = 0
    config.sample.steps = 50
    # --mode=eval makes about 0.9M model calls: 25 minutes at the ~600 calls/s measured on 2 busy CPU cores.
    # The classifier's features are 128-dim, so every Frechet distance needs more than 128 samples.
    config.eval.batch_size = 100  # the 297 test digits fill 3 batches, 3 examples of padding
    config.eval.num_samples = 2000
    config.eval.table_steps = (10, 20, 50, 100)  # adding 1000 (= T) adds 2.5M model calls
    config.eval.table_num_samples = 500
    return config
