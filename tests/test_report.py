"""--mode=report: the markdown page from a workdir's artifacts, with and without evaluation results."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from configs.default import get_config
from ddm.report import NOT_COMPUTED, write_report

FIGURES = ("progressive", "interpolation_ddim", "interpolation_ddpm", "reconstruction")


def write_config(workdir, dataset: str):
    config = get_config()
    config.data.name = dataset
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json())
    return config


def write_png(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)


def write_eval_artifacts(workdir):
    """Every file of the contract with ddm.evaluate, with made-up values."""
    ev = os.path.join(workdir, "eval")
    os.makedirs(ev)
    nll = {"total_bpd": 3.81, "prior_bpd": 0.001, "strided_bpd": 3.9, "strided_steps": 100, "num_examples": 64,
           "checkpoint_step": 200, "seconds": 12.5}
    with open(os.path.join(ev, "nll.json"), "w") as f:
        json.dump(nll, f)
    with open(os.path.join(ev, "table.csv"), "w") as f:
        f.write("row,steps,fd,score_mean,score_std,num_samples\neta=0,10,20.5,7.1,0.1,100\n"
                "sigma-hat,1000,5.25,8.0,0.2,100\n")
    with open(os.path.join(ev, "table.md"), "w") as f:
        f.write("| row | S=10 | S=1000 |\n|---|---|---|\n| eta=0 | 20.50 | 9.00 |\n")
    metrics = {"feature_space": "inception", "sample": {"method": "ddim", "steps": 50, "eta": 0.0, "fd": 11.5,
                                                        "score_mean": 8.25, "score_std": 0.1, "num_samples": 100}}
    with open(os.path.join(ev, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    with open(os.path.join(ev, "timings.json"), "w") as f:
        json.dump({"nll": 12.5, "samples": 30.0, "figures": 4.0}, f)
    with open(os.path.join(ev, "reconstruction.csv"), "w") as f:
        f.write("steps,mse\n10,0.02\n100,0.001\n")
    for name in ("nll_terms", "table") + FIGURES:
        write_png(os.path.join(ev, f"{name}.png"))


def write_events(workdir):
    from clu import metric_writers  # TensorFlow: only this test pays for it
    writer = metric_writers.SummaryWriter(workdir)
    for step in (100, 200):
        writer.write_scalars(step, {"loss": 1.0 / step, "mse": 1.0 / step, "steps_per_sec": 5.0, "uptime": step / 5.0})
    writer.flush()
    writer.close()


def links(text):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def test_report_with_every_artifact_links_them_beside_the_papers(tmp_path):
    workdir = str(tmp_path / "run")
    config = write_config(workdir, "cifar10")
    write_eval_artifacts(workdir)
    write_events(workdir)
    write_png(os.path.join(workdir, "samples", "step_00000100.png"))
    write_png(os.path.join(workdir, "samples", "step_00000200.png"))
    write_png(os.path.join(workdir, "samples.png"))
    path = write_report(config, workdir)
    assert path == os.path.join(workdir, "report.md")
    text = open(path).read()
    for heading in ("## Config", "## Training", "## Samples", "## Likelihood", "## Sample quality", "## Figures",
                    "## Wall times", "## References"):
        assert heading in text, heading
    assert NOT_COMPUTED not in text
    linked = links(text)
    assert all(not os.path.isabs(p) and os.path.exists(os.path.join(workdir, p)) for p in linked), linked
    assert {"report/loss.png", "samples/step_00000200.png", "samples.png", "eval/nll_terms.png",
            "eval/table.png"} | {f"eval/{name}.png" for name in FIGURES} <= set(linked)
    assert "samples/step_00000100.png" not in linked  # only the latest training grid
    assert "[eval/table.csv](eval/table.csv)" in text
    assert '"name": "cifar10"' in text  # the config, as a fenced block
    assert "| total_bpd | 3.81 |" in text and "| strided_steps | 100 |" in text
    assert "3.75" in text and "2.94" in text  # DDPM Table 1 and IDDPM Table 2 NLL
    assert "| eta=0 | 10 | 20.5 | 13.36 |" in text  # ours beside DDIM Table 1
    assert "| sigma-hat | 1000 | 5.25 | 3.17 |" in text
    assert "| 10 | 0.02 | 0.014 |" in text  # reconstruction beside DDIM Table 2
    assert "| total | 46.5 |" in text and "5 steps/s" in text


def test_report_without_eval_artifacts_says_not_computed(tmp_path):
    workdir = str(tmp_path / "run")
    config = write_config(workdir, "digits")
    text = open(write_report(config, workdir)).read()
    for section in ("## Likelihood", "## Sample quality", "## Figures", "## Wall times"):
        body = text.split(section)[1].split("\n## ")[0]
        assert NOT_COMPUTED in body, section
    assert "No training loss" in text and "No sample grid" in text
    assert links(text) == []


def test_digits_metrics_are_not_compared_with_the_papers(tmp_path):
    workdir = str(tmp_path / "run")
    config = write_config(workdir, "digits")
    write_eval_artifacts(workdir)
    text = open(write_report(config, workdir)).read()
    assert "No paper reports numbers on the digits" in text and "not comparable" in text
    assert "13.36" not in text and "DDIM Table 2" not in text


def test_report_without_config_asks_to_train_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="train first"):
        write_report(get_config(), str(tmp_path))
