"""IDDPM's CIFAR-10 run (Nichol & Dhariwal 2021): T = 4000 cosine, learned_range, L_hybrid, 3 res blocks, dropout 0.3."""
from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.random_flip = True
    config.model.num_res_blocks = 3
    config.model.dropout = 0.3
    config.diffusion.num_timesteps = 4000
    config.diffusion.schedule = "cosine"
    config.diffusion.mean_type = "eps"
    config.diffusion.var_type = "learned_range"
    config.diffusion.loss_type = "hybrid"
    config.diffusion.timestep_sampler = "uniform"  # IDDPM samples uniformly for L_hybrid
    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 0
    config.optim.ema_rates = (0.9999,)
    config.train.batch_size = 128
    config.train.num_steps = 500_000
    config.sample.method = "ddpm"
    config.sample.steps = 100  # IDDPM: 100 respaced steps come close to the full chain's FID
    return config
