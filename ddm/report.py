"""``--mode=report``: one self-contained markdown page, ``<workdir>/report.md``, of what a run produced.

It reads what training and ``--mode=eval`` left in the workdir and computes nothing but a loss plot:
``config.json``; the TensorBoard event files clu wrote (loss, steps_per_sec, uptime); ``samples/*.png``
and ``samples.png``; and under ``eval/``: ``nll.json``, ``nll_terms.csv/png``, ``table.csv/md/png``,
``metrics.json``, ``timings.json``, the figures of ``ddm.figures`` and ``reconstruction.csv``. A missing
artifact leaves its section saying "not computed"; images are linked by paths relative to the workdir.

The papers' numbers (CIFAR-10 only) are constants below, each with its paper and table:
DDPM = Ho et al. 2020, IDDPM = Nichol & Dhariwal 2021, DDIM = Song et al. 2021. They were transcribed
without the PDFs at hand: DDPM's L_simple row, IDDPM's L_vlb NLL 2.94 and DDIM Table 1's 4.67 / 8.01
(S = 50) were checked against secondary sources; check the others against the papers before quoting.
"""
import csv
import glob
import json
import os

import numpy as np
from matplotlib.figure import Figure

NOT_COMPUTED = "not computed — run --mode=eval"
CIFAR10 = "cifar10"

# DDPM Table 1 (CIFAR-10, linear schedule, T = 1000): (objective, its name here, FID, IS, NLL test (train)).
DDPM_TABLE1 = (("L_simple (eps prediction)", "L_simple", 3.17, "9.46 ± 0.11", "≤ 3.75 (3.72)"),
               ("L, fixed isotropic Σ", "L_vlb", 13.51, "7.67 ± 0.13", "≤ 3.70 (3.69)"))
OBJECTIVES = {"mse": "L_simple", "hybrid": "L_hybrid", "kl": "L_vlb", "rescaled_kl": "L_vlb"}  # by loss_type
# IDDPM Table 2 (CIFAR-10, T = 4000, 500K iterations): (schedule, objective, NLL bits/dim, FID).
IDDPM_TABLE2 = (("cosine", "L_hybrid", 3.17, 3.19), ("cosine", "L_vlb", 2.94, 11.47))
# DDIM Table 1 (CIFAR-10 FID, S sampling steps, uniform stride); rows as ddm.evaluate names them.
DDIM_TABLE1_STEPS = (10, 20, 50, 100, 1000)
DDIM_TABLE1 = {"eta=0": (13.36, 6.84, 4.67, 4.16, 4.04), "eta=0.2": (14.04, 7.11, 4.77, 4.25, 4.09),
               "eta=0.5": (16.66, 8.35, 5.25, 4.46, 4.29), "eta=1": (41.07, 18.36, 8.01, 5.78, 4.73),
               "sigma-hat": (367.43, 133.37, 32.72, 9.99, 3.17)}
# DDIM Table 2 (CIFAR-10 test set): DDIM encode + decode, per-dimension MSE with pixels in [0, 1].
DDIM_TABLE2 = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009, 200: 0.0004, 500: 0.0001, 1000: 0.0001}


def load_json(path: str):
    """The parsed JSON at ``path``, or None if there is no such file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_csv(path: str) -> list:
    """The rows of a CSV file with a header as dicts of strings; [] if there is no such file."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_scalars(workdir: str) -> dict:
    """{tag: (steps (K,) int, values (K,) float, wall_times (K,) float seconds)} from the TensorBoard event
    files directly in ``workdir``; {} if there are none. clu writes scalars as rank-0 tensors."""
    if not glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing import event_accumulator  # imports TensorFlow when installed
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(workdir, size_guidance={event_accumulator.SCALARS: 0,
                                                                    event_accumulator.TENSORS: 0})
    acc.Reload()
    series = {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    for tag in acc.Tags()["tensors"]:
        events = acc.Tensors(tag)
        values = [tensor_util.make_ndarray(e.tensor_proto) for e in events]
        if values and all(v.ndim == 0 and v.dtype.kind in "fiu" for v in values):
            series[tag] = [(e.step, float(v), e.wall_time) for e, v in zip(events, values)]
    return {tag: tuple(np.asarray(column) for column in zip(*sorted(points))) for tag, points in series.items()}


def plot_loss(scalars: dict, path: str) -> str:
    """Training loss (and the eps MSE when it differs, as with a hybrid loss) vs step, log y, written
    atomically as PNG."""
    fig = Figure(figsize=(6, 3.5), dpi=120)
    ax = fig.subplots()
    steps, loss, _ = scalars["loss"]
    ax.plot(steps, loss, label="loss")
    if "mse" in scalars and not np.array_equal(scalars["mse"][1], loss):
        ax.plot(scalars["mse"][0], scalars["mse"][1], label="mse (L_simple part)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path + ".tmp", format="png")
    os.replace(path + ".tmp", path)
    return path


def markdown_table(header, rows) -> str:
    """A markdown table; cells are formatted with str."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def fmt(value, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; anything else as is ("—" for None)."""
    if value is None:
        return "—"
    return f"{value:.{digits}g}" if isinstance(value, (float, np.floating)) else str(value)


def image(workdir: str, relpath: str, caption: str) -> str:
    """A markdown image linking ``relpath`` if it exists under ``workdir``, else a "not computed" line."""
    if os.path.exists(os.path.join(workdir, relpath)):
        return f"![{caption}]({relpath})"
    return f"*{caption} (`{relpath}`): {NOT_COMPUTED}.*"


def file_link(workdir: str, relpath: str) -> str:
    """" (data: [relpath](relpath))" if the file exists under ``workdir``, else ""."""
    return f" (data: [{relpath}]({relpath}))" if os.path.exists(os.path.join(workdir, relpath)) else ""


def paper_note(dataset: str) -> str:
    """Why no paper numbers stand beside this dataset's results."""
    if dataset == "digits":
        return ("No paper reports numbers on the digits. Their Frechet distance and score are computed in "
                "the features of a classifier trained on the digits, a space not comparable to Inception's "
                "FID and IS.")
    return f"No paper numbers are given here for data.name={dataset!r} (only CIFAR-10's)."


def section_config(saved: dict) -> str:
    return "## Config\n\nThe run's `config.json`:\n\n```json\n" + json.dumps(saved, indent=2) + "\n```"


def section_training(workdir: str, scalars: dict) -> str:
    if "loss" not in scalars:
        return ("## Training\n\nNo training loss in TensorBoard event files in this workdir "
                "(trained elsewhere, or the events were removed).")
    path = plot_loss(scalars, os.path.join(workdir, "report", "loss.png"))
    steps, values, _ = scalars["loss"]
    rows = [("last logged step", int(steps[-1])), ("loss at that step", fmt(float(values[-1])))]
    if "steps_per_sec" in scalars:
        rows.append(("training steps/s (median)", fmt(float(np.median(scalars["steps_per_sec"][1])))))
    if "uptime" in scalars:
        rows.append(("training wall time, last run (s)", fmt(float(scalars["uptime"][1][-1]))))
    return ("## Training\n\n" + image(workdir, os.path.relpath(path, workdir), "training loss") + "\n\n"
            + markdown_table(("quantity", "value"), rows))


def section_samples(workdir: str) -> str:
    grids = sorted(glob.glob(os.path.join(workdir, "samples", "*.png")))  # step_%08d.png: the last is the latest
    parts = []
    if grids:
        latest = os.path.relpath(grids[-1], workdir)
        parts.append(image(workdir, latest, f"samples during training ({os.path.basename(latest)})"))
    if os.path.exists(os.path.join(workdir, "samples.png")):
        parts.append(image(workdir, "samples.png", "samples of --mode=sample"))
    if not parts:
        parts = ["No sample grid: run --mode=train (grids under `samples/`) or --mode=sample (`samples.png`)."]
    return "## Samples\n\n" + "\n\n".join(parts)


def section_nll(workdir: str, dataset: str, saved: dict) -> str:
    nll = load_json(os.path.join(workdir, "eval", "nll.json"))
    if nll is None:
        return f"## Likelihood\n\nNLL: {NOT_COMPUTED}."
    keys = ("total_bpd", "prior_bpd", "strided_bpd", "strided_steps", "num_examples", "checkpoint_step", "seconds")
    parts = ["## Likelihood\n\nVariational bound on the negative log-likelihood of the test split, bits/dim "
             "(`eval/nll.json`):", markdown_table(("quantity", "value"), [(k, fmt(nll.get(k))) for k in keys]),
             image(workdir, "eval/nll_terms.png", "bound terms per timestep") + file_link(workdir, "eval/nll_terms.csv")]
    if dataset != CIFAR10:
        return "\n\n".join(parts + [paper_note(dataset)])
    d = saved.get("diffusion", {})
    setting = (d.get("schedule"), OBJECTIVES.get(d.get("loss_type")))
    mark = lambda schedule, objective: "← this run's setting" if (schedule, objective) == setting else ""
    rows = [(f"DDPM Table 1, linear, {label}", nll_text, mark("linear", objective))
            for label, objective, _, _, nll_text in DDPM_TABLE1]
    rows += [(f"IDDPM Table 2, {sch}, {obj} (T = 4000)", bpd, mark(sch, obj)) for sch, obj, bpd, _ in IDDPM_TABLE2]
    return "\n\n".join(parts + ["The papers, CIFAR-10 test NLL in bits/dim:",
                                markdown_table(("paper", "NLL", ""), rows)])


def compare_with_ddim(table: list) -> str:
    """Our FD per (row, steps) of table.csv beside DDIM Table 1's CIFAR-10 FID."""
    rows = []
    for r in table:
        paper = dict(zip(DDIM_TABLE1_STEPS, DDIM_TABLE1.get(r["row"], ())))
        rows.append((r["row"], r["steps"], fmt(float(r["fd"])), fmt(paper.get(int(r["steps"])))))
    return ("Beside DDIM Table 1 (CIFAR-10 FID; DDIM strides its steps uniformly):\n\n"
            + markdown_table(("row", "steps", "our FID", "DDIM Table 1 FID"), rows))


def section_metrics(workdir: str, dataset: str) -> str:
    metrics = load_json(os.path.join(workdir, "eval", "metrics.json"))
    table = load_csv(os.path.join(workdir, "eval", "table.csv"))
    table_md = os.path.join(workdir, "eval", "table.md")
    if metrics is None and not table:
        return f"## Sample quality\n\nFrechet distance and score: {NOT_COMPUTED}."
    parts = ["## Sample quality"]
    space = (metrics or {}).get("feature_space")
    sample = (metrics or {}).get("sample")
    if sample:
        parts.append(f"The `sample.*` setting ({sample.get('method')}, {sample.get('steps')} steps, "
                     f"eta {sample.get('eta')}) in {space} features, `eval/metrics.json`:\n\n" + markdown_table(
                         ("Frechet distance", "score", "samples"),
                         [(fmt(sample.get("fd")), f"{fmt(sample.get('score_mean'))} ± {fmt(sample.get('score_std'))}",
                           sample.get("num_samples", "—"))]))
    if os.path.exists(table_md):
        with open(table_md) as f:
            parts.append("Frechet distance per eta (rows) and sampling steps (columns), as DDIM Table 1 "
                         "(`eval/table.md`):\n\n" + f.read().strip())
    parts.append(image(workdir, "eval/table.png", "Frechet distance vs sampling steps")
                 + file_link(workdir, "eval/table.csv"))
    if dataset != CIFAR10:
        return "\n\n".join(parts + [paper_note(dataset)])
    if space not in (None, "inception"):
        return "\n\n".join(parts + [f"These are {space} features, not Inception's: no paper comparison."])
    parts.append("The papers' FIDs use 50,000 samples; FID from fewer samples is biased upward, so compare "
                 "with the sample count in mind. DDPM Table 1 (CIFAR-10, 1000 ancestral steps):\n\n" + markdown_table(
        ("objective", "FID", "IS"), [(label, fid, is_) for label, _, fid, is_, _ in DDPM_TABLE1]))
    if table:
        parts.append(compare_with_ddim(table))
    return "\n\n".join(parts)


def section_figures(workdir: str, dataset: str) -> str:
    parts = ["## Figures",
             image(workdir, "eval/progressive.png", "predicted x0 along one DDPM trajectory (DDPM Fig. 6)"),
             image(workdir, "eval/interpolation_ddim.png", "slerp between two x_T, DDIM eta = 0 (DDIM Fig. 6)"),
             image(workdir, "eval/interpolation_ddpm.png",
                   "two test images mixed at a chosen t, then denoised (DDPM Fig. 8)"),
             image(workdir, "eval/reconstruction.png", "DDIM encode then decode: originals, then per steps")]
    recon = load_csv(os.path.join(workdir, "eval", "reconstruction.csv"))
    if recon:
        cifar = dataset == CIFAR10
        rows = [(r["steps"], fmt(float(r["mse"]))) + ((fmt(DDIM_TABLE2.get(int(r["steps"]))),) if cifar else ())
                for r in recon]
        header = ("steps", "MSE ([0, 1] pixels)") + (("DDIM Table 2, CIFAR-10",) if cifar else ())
        parts.append("Reconstruction error (`eval/reconstruction.csv`):\n\n" + markdown_table(header, rows))
    return "\n\n".join(parts)


def section_timings(workdir: str, scalars: dict) -> str:
    timings = load_json(os.path.join(workdir, "eval", "timings.json"))
    parts = ["## Wall times"]
    if timings is None:
        parts.append(f"Evaluation: {NOT_COMPUTED}.")
    else:
        rows = [(phase, fmt(float(seconds))) for phase, seconds in timings.items()]
        parts.append("Evaluation, seconds per phase (`eval/timings.json`):\n\n"
                     + markdown_table(("phase", "seconds"), rows + [("total", fmt(float(sum(timings.values()))))]))
    if "steps_per_sec" in scalars:
        steps, rates, _ = scalars["steps_per_sec"]
        parts.append(f"Training: {fmt(float(np.median(rates)))} steps/s (median of {len(rates)} reports, "
                     f"up to step {int(steps[-1])}).")
    else:
        parts.append("Training: no steps/s in the event files.")
    return "\n\n".join(parts)


def section_references() -> str:
    return ("## References\n\n"
            "- DDPM: Ho, Jain & Abbeel, *Denoising Diffusion Probabilistic Models*, NeurIPS 2020 "
            "(Table 1: CIFAR-10 FID, IS, NLL; Fig. 6: progressive generation; Fig. 8: interpolation).\n"
            "- IDDPM: Nichol & Dhariwal, *Improved Denoising Diffusion Probabilistic Models*, ICML 2021 "
            "(Table 2: CIFAR-10 NLL and FID per schedule and objective).\n"
            "- DDIM: Song, Meng & Ermon, *Denoising Diffusion Implicit Models*, ICLR 2021 "
            "(Table 1: CIFAR-10 FID per eta and steps, from DDPM's L_simple model; Table 2: reconstruction "
            "error; Fig. 6: interpolation).")


def write_report(config, workdir: str) -> str:
    """Write ``<workdir>/report.md`` (and ``report/loss.png``) atomically; returns the markdown's path.

    The run's own ``config.json`` decides the dataset and setting the papers are compared with; ``config``
    (the command line's) only adds a warning when its ``data.name`` differs. Raises FileNotFoundError
    when the workdir has no config.json (nothing was trained there).
    """
    saved = load_json(os.path.join(workdir, "config.json"))
    if saved is None:
        raise FileNotFoundError(f"no config.json in {workdir}: train first with --mode=train and the same --workdir")
    dataset = saved.get("data", {}).get("name")
    scalars = read_scalars(workdir)
    header = f"# Report: `{os.path.basename(os.path.abspath(workdir))}`\n\nDataset `{dataset}`"
    d = saved.get("diffusion", {})
    header += (f", {d.get('schedule')} schedule, T = {d.get('num_timesteps')}, loss {d.get('loss_type')}, "
               f"mean {d.get('mean_type')}, variance {d.get('var_type')}.")
    if config.data.name != dataset:
        header += (f"\n\n**Warning**: the command line's config has data.name={config.data.name!r}; "
                   f"this report follows the run's config.json ({dataset!r}).")
    sections = [header, section_config(saved), section_training(workdir, scalars), section_samples(workdir),
                section_nll(workdir, dataset, saved), section_metrics(workdir, dataset),
                section_figures(workdir, dataset), section_timings(workdir, scalars), section_references()]
    path = os.path.join(workdir, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n\n".join(sections) + "\n")
    os.replace(path + ".tmp", path)
    return path
