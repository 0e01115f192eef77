"""Every config field of ddm, with its meaning. Experiment files import this and override a few.

Units: steps are optimizer steps (one global batch each); sizes are pixels; rates are per step.
"""
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0  # seeds parameters, data order, flips, timesteps, noise and dropout

    config.data = data = ml_collections.ConfigDict()
    data.name = "digits"  # "digits" (embedded, ships with scikit-learn) or a TFDS image dataset, e.g. "cifar10"
    data.image_size = 8  # digits: 8 (native), 16 or 32; a TFDS dataset must match its native size
    data.random_flip = False  # random horizontal flips (DDPM uses them on CIFAR-10; digits are not symmetric)
    data.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data dir; None = TFDS default
    data.num_classes = 10  # used only with model.class_conditional

    config.model = model = ml_collections.ConfigDict()
    model.ch = 128  # base channels (DDPM CIFAR-10: 128)
    model.ch_mult = (1, 2, 2, 2)  # channel multiplier per resolution; len - 1 downsamplings
    model.num_res_blocks = 2  # residual blocks per resolution (IDDPM CIFAR-10: 3)
    model.attn_resolutions = (16,)  # feature-map sizes with self-attention
    model.dropout = 0.1  # DDPM CIFAR-10: 0.1; IDDPM CIFAR-10: 0.3
    model.resblock_updown = False  # IDDPM/BigGAN residual up/down sampling
    model.num_heads = 1  # attention heads (DDPM: 1)
    model.num_head_channels = -1  # > 0 overrides num_heads with channels // num_head_channels
    model.scale_shift_norm = False  # IDDPM adaptive group norm from the timestep embedding
    model.class_conditional = False  # add a label embedding (uses data.num_classes)
    model.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (params stay float32)
    model.attention = "xla"  # "xla" (any device) or "cudnn" (fused attention: NVIDIA GPUs, bfloat16)

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.num_timesteps = 1000  # T
    diffusion.schedule = "linear"  # "linear" (DDPM) or "cosine" (IDDPM)
    diffusion.mean_type = "eps"  # "eps", "x0", "mu" or "v"
    diffusion.var_type = "fixed_large"  # "fixed_small", "fixed_large", "learned" or "learned_range"
    diffusion.loss_type = "mse"  # "mse" (L_simple), "hybrid", "kl" or "rescaled_kl"
    diffusion.timestep_sampler = "uniform"  # "uniform" or "loss_second_moment" (IDDPM importance sampling)

    config.optim = optim = ml_collections.ConfigDict()
    optim.learning_rate = 2e-4  # Adam step size after warmup (DDPM 2e-4, IDDPM 1e-4)
    optim.warmup_steps = 5000  # linear warmup from 0
    optim.grad_clip = 1.0  # global-norm clip; <= 0 disables
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8
    optim.ema_rates = (0.9999,)  # EMA decay of the parameters; the first one is used for sampling

    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 128  # global batch over all devices and hosts
    train.num_steps = 800_000  # total optimizer steps
    train.steps_per_call = 4  # optimizer steps per host call (lax.scan on device); all periods below are multiples
    train.log_every = 100  # steps between metric writes
    train.sample_every = 20_000  # steps between sample grids from the EMA params (0: only at the end)
    train.checkpoint_every = 5_000  # steps between checkpoints (also saved at the end)
    train.keep_checkpoints = 3  # last N checkpoints kept
    train.keep_period = 100_000  # also keep every checkpoint whose step is a multiple of this (0: none)

    config.sample = sample = ml_collections.ConfigDict()
    sample.method = "ddim"  # "ddpm" (ancestral) or "ddim"
    sample.steps = 50  # sampling steps (respaced; T = all steps)
    sample.respacing = "uniform"  # how steps are kept: "uniform" (IDDPM sections), "ddim" stride, "quad" (DDIM quadratic)
    sample.eta = 0.0  # DDIM eta (0: deterministic)
    sample.clip_denoised = True  # clip predicted x0 to [-1, 1]
    sample.num_samples = 64  # samples written by --mode=sample
    sample.batch_size = 64  # global samples per sampling call (divided over devices)
    sample.grid_size = 64  # images in each sample grid PNG

    config.eval = ev = ml_collections.ConfigDict()
    ev.split = "test"  # data split for the NLL and the reference feature statistics
    ev.batch_size = 64  # global batch (all devices) for the NLL and for metric sampling
    ev.nll_strided_steps = 100  # also the IDDPM strided bound over this many respaced steps (0: full bound only)
    ev.feature_space = "auto"  # "inception" (FID/IS), "classifier" (trained on the embedded digits); auto: digits -> classifier
    ev.inception_path = ""  # local path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (no download at run time)
    ev.num_samples = 10_000  # samples for FD / score of the sample.* setting
    ev.table_steps = (10, 20, 50, 100, 1000)  # DDIM steps-vs-quality table (DDIM Table 1)
    ev.table_etas = (0.0, 0.2, 0.5, 1.0)  # DDIM eta per column; DDPM with sigma-hat (larger variance) is added
    ev.table_num_samples = 10_000  # samples per table cell (FID needs more than 2048, the Inception feature size)
    ev.progressive_snapshots = 10  # predicted x0 images along one trajectory (DDPM Fig. 6)
    ev.interpolation_points = 9  # images between two endpoints (DDIM Fig. 6, DDPM Fig. 8)
    ev.interpolation_t = 500  # DDPM Fig. 8: the timestep at which two images are mixed
    ev.reconstruction_steps = (10, 20, 50, 100)  # DDIM encode/decode steps (DDIM Table 2)
    ev.reconstruction_examples = 8  # test images shown in the reconstruction figure
    return config
