"""DDPM's CIFAR-10 run (Ho et al. 2020): T = 1000 linear, eps, fixed_large, L_simple, 35.7M-param U-Net."""
from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.random_flip = True
    config.diffusion.num_timesteps = 1000
    config.diffusion.schedule = "linear"
    config.diffusion.mean_type = "eps"
    config.diffusion.var_type = "fixed_large"
    config.diffusion.loss_type = "mse"
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.grad_clip = 1.0
    config.optim.ema_rates = (0.9999,)
    config.train.batch_size = 128
    config.train.num_steps = 800_000
    config.sample.method = "ddpm"
    config.sample.steps = 1000
    return config
