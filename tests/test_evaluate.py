"""--mode=eval end to end on a tiny run: the bound over a padded split, resumable sampling, cached
reference statistics, DDIM's table, and the errors that must come before any compute."""
import csv
import importlib
import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import digits
from ddm import classifier, data, evaluate, experiment, figures
from ddm.checkpoint import Checkpointer
from ddm.diffusion import make_diffusion
from ddm.likelihood import bits_per_dim
from ddm.schedules import get_betas
from ddm.timestep_sampling import get_timestep_sampler
from ddm.train import create_train_state, replicate

T = 20
STEP = 1
# The untrained classifier's ReLU features include dead (constant) units: singular covariances, finite FD.
pytestmark = pytest.mark.filterwarnings("ignore:Matrix is singular")


def tiny_config():
    config = digits.get_config()
    config.model.ch_mult = (1,)
    config.model.attn_resolutions = ()
    config.diffusion.num_timesteps = T
    config.sample.steps = 5
    ev = config.eval
    ev.batch_size = 80  # the 297 test digits are not a multiple of it
    ev.nll_strided_steps = 5
    ev.num_samples = 160  # more than the classifier's 128 features, in 2 shards
    ev.table_steps = (5, 20, 40)  # 5 respaced, 20 = T the full process, 40 > T skipped
    ev.table_etas = (0.0, 1.0)
    ev.table_num_samples = 160
    ev.progressive_snapshots = 2
    ev.interpolation_points = 2
    ev.interpolation_t = 5
    ev.reconstruction_steps = (5,)
    ev.reconstruction_examples = 4
    return config


def write_checkpoint(config, workdir: str) -> None:
    """What training leaves in a workdir (config.json, a checkpoint of the train state), without the training:
    the state is ``create_train_state``'s, as a run's first checkpoint would hold it."""
    shape = (config.data.image_size, config.data.image_size, 1)
    state = create_train_state(experiment.build_model(config, 1), experiment.build_optimizer(config),
                               get_timestep_sampler(config.diffusion.timestep_sampler, T),
                               jax.random.PRNGKey(config.seed), shape, tuple(config.optim.ema_rates))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    checkpointer = Checkpointer(workdir)
    checkpointer.save(STEP, jax.device_get(state.replace(step=STEP)))
    checkpointer.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run with one checkpoint, and the digits classifier cached where run_eval looks for it, untrained (its
    features are a fixed random map: the pipeline, not the classifier, is under test)."""
    path = str(tmp_path_factory.mktemp("run"))
    config = tiny_config()
    write_checkpoint(config, path)
    size = config.data.image_size
    info = {"accuracy": 0.0, "steps": 0, "seconds": 0.0, "image_size": size, "seed": 0,
            "format": classifier.CACHE_FORMAT}
    classifier.save(os.path.join(evaluate.eval_dir(path), "classifier"), size, classifier.init_params(size), info)
    return path


@pytest.fixture(scope="module")
def figure_calls():
    return []


@pytest.fixture(scope="module")
def evaluated(workdir, figure_calls):
    """run_eval once. ddm.figures (tested in test_figures.py) is replaced by a recorder of its arguments, which
    saves a minute of compiling its samplers."""

    def write_figures(config, workdir, diffusion, model_fn, test_images_uint8, key):
        figure_calls.append((diffusion, model_fn, test_images_uint8, key))
        path = os.path.join(evaluate.eval_dir(workdir), "progressive.png")
        open(path, "wb").close()
        return {"progressive": path}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures, "write_figures", write_figures)
        return evaluate.run_eval(tiny_config(), workdir)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


class Scaled(nn.Module):
    """eps prediction a * x_t, one parameter: a model that compiles in no time."""

    @nn.compact
    def __call__(self, x, t, y=None, train=False):
        return x * self.param("a", nn.initializers.constant(0.5), ())


def test_bound_over_a_padded_split_is_the_mean_over_its_examples():
    diffusion = make_diffusion(get_betas("cosine", 10), var_type="fixed_large")
    model, params = Scaled(), {"a": np.float32(0.5)}
    source = data.load_source("digits", "test", image_size=8)
    source = data.ArraySource(source.images[:10], source.labels[:10])  # batches of 4: the last one is half padding
    key = jax.random.PRNGKey(0)
    step = evaluate.make_nll_step(model, diffusion, clip_denoised=True, conditional=False)
    means = evaluate.bound_means(step, replicate(params), source, batch_size=4, key=key)

    model_fn = lambda x, t: model.apply({"params": params}, x, t)
    one = jax.jit(lambda x, k: bits_per_dim(diffusion, model_fn, x[None], k))
    direct = [one(x, jax.random.fold_in(key, i)) for i, x in enumerate(data.to_float(source.images))]
    assert means["num_examples"] == 10
    for name in ("total_bpd", "prior_bpd", "vb", "x0_mse", "eps_mse"):
        np.testing.assert_allclose(means[name], np.mean([d[name][0] for d in direct], axis=0), rtol=1e-5)
    assert means["vb"].shape == (10,)


def test_sampling_resumes_from_its_shards(tmp_path):
    calls = []

    def sample_step(params, keys):  # (devices, per device, H, W, C) in [-1, 1], like a pmapped sampler
        calls.append(1)
        return jax.random.uniform(keys[0], (2, 3, 4, 4, 1), minval=-1.0, maxval=1.0)

    class Preempted(Exception):
        pass

    def preempted_after_two(params, keys):
        if len(calls) == 2:
            raise Preempted
        return sample_step(params, keys)

    key = jax.random.PRNGKey(1)
    straight = evaluate.sample_shards(sample_step, None, key, num=20, batch_size=6, directory=str(tmp_path / "a"))
    assert straight.dtype == np.uint8 and straight.shape == (20, 4, 4, 1)
    calls.clear()
    with pytest.raises(Preempted):
        evaluate.sample_shards(preempted_after_two, None, key, num=20, batch_size=6, directory=str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path / "b")) == ["shard_00000.npz", "shard_00001.npz"]
    calls.clear()
    resumed = evaluate.sample_shards(sample_step, None, key, num=20, batch_size=6, directory=str(tmp_path / "b"))
    assert len(calls) == 2  # shards 2 and 3 only
    np.testing.assert_array_equal(resumed, straight)
    with pytest.raises(ValueError, match="holds 6 samples but eval.batch_size=4"):
        evaluate.sample_shards(sample_step, None, key, num=20, batch_size=4, directory=str(tmp_path / "b"))


def test_nll_files(evaluated, workdir):
    out = evaluate.eval_dir(workdir)
    with open(os.path.join(out, "nll.json")) as f:
        nll = json.load(f)
    assert nll == evaluated["nll"]
    assert set(nll) == {"total_bpd", "prior_bpd", "strided_bpd", "strided_steps", "num_examples",
                        "checkpoint_step", "seconds"}
    assert nll["num_examples"] == 297 and nll["checkpoint_step"] == STEP and nll["strided_steps"] == 5
    assert 0 < nll["prior_bpd"] < nll["total_bpd"] and nll["strided_bpd"] > 0
    terms = read_csv(os.path.join(out, "nll_terms.csv"))
    assert [int(r["t"]) for r in terms] == list(range(T))
    np.testing.assert_allclose(sum(float(r["vb_bpd"]) for r in terms) + nll["prior_bpd"], nll["total_bpd"], rtol=1e-5)
    with open(os.path.join(out, "nll_terms.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_table_files(evaluated, workdir):
    out = evaluate.eval_dir(workdir)
    rows = read_csv(os.path.join(out, "table.csv"))
    assert [(r["row"], int(r["steps"])) for r in rows] == [
        (row, s) for row in ("eta=0", "eta=1", "sigma-hat") for s in (5, 20)]
    assert all(int(r["num_samples"]) == 160 and float(r["fd"]) >= 0 for r in rows)
    assert evaluated["table_skipped_steps"] == [40]
    with open(os.path.join(out, "table.md")) as f:
        lines = f.read().splitlines()
    assert lines[0] == "| row | S=5 | S=20 |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["eta=0", "eta=1", "sigma-hat"]
    assert os.path.getsize(os.path.join(out, "table.png")) > 0
    # every setting sampled once, in 2 shards of eval.batch_size = 80; sample.* (DDIM, eta 0, 5 steps) is the
    # sampler of the cell (eta=0, 5) and shares its shards
    settings = sorted(os.listdir(os.path.join(out, "samples")))
    assert settings == [f"{kind}_step{STEP}_seed0" for kind in (
        "ddim_eta0_all20", "ddim_eta0_uniform5", "ddim_eta1_all20", "ddim_eta1_uniform5", "ddpm_fixed_large_all20",
        "ddpm_fixed_large_uniform5")]
    assert all(sorted(os.listdir(os.path.join(out, "samples", s))) == ["shard_00000.npz", "shard_00001.npz"]
               for s in settings)
    assert evaluated["sample"]["fd"] == evaluated["table"][0]["fd"]


def test_metrics_timings_and_figures(evaluated, workdir, figure_calls):
    out = evaluate.eval_dir(workdir)
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f) == json.loads(json.dumps(evaluated))
    with open(os.path.join(out, "timings.json")) as f:
        assert set(json.load(f)) == {"load", "reference", "nll", "samples", "table", "figures"}
    assert evaluated["feature_space"] == "classifier" and evaluated["sample"]["num_samples"] == 160
    assert evaluated["sample"]["fd"] >= 0 and evaluated["sample"]["score_mean"] >= 1.0
    assert all(os.path.exists(path) for path in evaluated["files"].values())
    assert "progressive" in evaluated["files"] and len(figure_calls) == 1
    diffusion, model_fn, images, key = figure_calls[0]
    assert diffusion.num_timesteps == T and images.dtype == np.uint8 and images.shape == (16, 8, 8, 1)
    x = jax.ShapeDtypeStruct((4, 8, 8, 1), np.float32)
    assert jax.eval_shape(model_fn, x, jax.ShapeDtypeStruct((4,), np.int32)).shape == (4, 8, 8, 1)


def test_reference_statistics_are_cached(evaluated, workdir):
    path = os.path.join(evaluate.eval_dir(workdir), "ref_stats_classifier_test.npz")

    def extract(images):
        raise AssertionError("the cached statistics should have been used")

    cached = evaluate.reference_statistics(extract, None, path)
    assert cached["num"] == 297 and cached["mu"].shape == (classifier.FEATURE_DIM,)
    assert cached["sigma"].shape == (classifier.FEATURE_DIM,) * 2
    assert cached["score_mean"] == evaluated["reference"]["score_mean"]


def test_an_interrupted_eval_resumes_from_its_shards(evaluated, workdir, tmp_path, monkeypatch):
    """A second run_eval on the same workdir (a copy) samples nothing and gets the same numbers."""
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)

    def sampler(*args, **kwargs):
        raise AssertionError("a shard was sampled again")

    monkeypatch.setattr(evaluate, "make_sample_fn", lambda *args, **kwargs: sampler)
    monkeypatch.setattr(evaluate, "evaluate_nll", lambda *args: evaluated["nll"])  # not under test here
    monkeypatch.setattr(figures, "write_figures", lambda *args: {})
    again = evaluate.run_eval(tiny_config(), copy)
    assert again["sample"] == evaluated["sample"] and again["table"] == evaluated["table"]


@pytest.fixture
def no_compute(monkeypatch):
    """Errors that must come first: reaching the bound or the sampler fails the test."""
    def reached(*args, **kwargs):
        raise AssertionError("the bound or the sampler ran before the error")
    monkeypatch.setattr(evaluate, "evaluate_nll", reached)
    monkeypatch.setattr(evaluate, "sample_shards", reached)


def test_checkpointless_workdir(tmp_path, no_compute):
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*train first with --mode=train and the same"):
        evaluate.run_eval(tiny_config(), str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_mismatched_image_size(workdir, no_compute):
    config = tiny_config()
    config.data.image_size = 16
    with pytest.raises(ValueError, match=r"data.image_size=16 \(checkpoint: 8\)"):
        evaluate.run_eval(config, workdir)


def test_mismatched_model_without_config_json(workdir, tmp_path, no_compute):
    shutil.copytree(os.path.join(workdir, "checkpoints"), tmp_path / "checkpoints")  # and no config.json
    config = tiny_config()
    config.model.ch = 64
    with pytest.raises(ValueError, match=r"do not fit .*conv_in.*kernel.*\(3, 3, 1, 64\) here, \(3, 3, 1, 32\)"):
        evaluate.run_eval(config, str(tmp_path))


def test_too_few_samples(workdir, no_compute):
    config = tiny_config()
    config.eval.num_samples = 2
    with pytest.raises(ValueError, match="eval.num_samples=2"):
        evaluate.run_eval(config, workdir)


def test_missing_inception_weights(workdir, tmp_path, no_compute):
    config = tiny_config()
    config.eval.feature_space = "inception"
    config.eval.inception_path = str(tmp_path / "pt_inception.pth")
    with pytest.raises(FileNotFoundError, match="eval.inception_path="):
        evaluate.run_eval(config, workdir)


@pytest.mark.parametrize("field, value, match", [
    ("batch_size", 3, r"eval.batch_size=3 is not a positive multiple of the 2 devices"),
    ("nll_strided_steps", 1, r"eval.nll_strided_steps=1 must be 0 \(full bound only\) or in 2..20"),
    ("table_steps", (1, 10), r"eval.table_steps=\(1, 10\) has step counts below 2"),
    ("feature_space", "fid", r"unknown eval.feature_space='fid'"),
    ("table_steps", (3, 6), r"eval.table_steps has 6, which sample.respacing='ddim' cannot keep of 20 steps"),
])
def test_bad_eval_config_names_the_field(field, value, match):
    config = tiny_config()
    config.sample.respacing = "ddim"  # DDIM's integer stride: not every step count has one
    config.eval[field] = value
    with pytest.raises(ValueError, match=match):
        evaluate.validate_eval(config, jax.local_device_count())
        evaluate.resolve_feature_space(config)


@pytest.mark.parametrize("name", ["digits", "cifar10_linear", "cifar10_cosine"])
def test_shipped_configs_pass_the_eval_checks(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    evaluate.validate_eval(config, jax.local_device_count())
    cells, skipped = evaluate.table_cells(config.eval.table_steps, config.eval.table_etas, config.sample.respacing,
                                          config.diffusion.num_timesteps)
    assert skipped == [] and len(cells) == len(config.eval.table_steps) * (len(config.eval.table_etas) + 1)
