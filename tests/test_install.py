"""A non-editable install (a wheel built from this tree, offline) carries everything a user needs:
the `neuron_files` package data included, so the default `--method partinfer` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_install_runs_partinfer_with_the_shipped_neuron_file(default_model_dir, tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("partinfer-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # The dependencies (torch, transformers, ...) come from this test's environment, read-only.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    where = subprocess.run([str(python), "-c", "import partinfer.cli, partinfer.neuron_files; print(partinfer.cli.__file__)"],
                           cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout
    assert where.startswith(str(site)), where  # the installed copy, not this source tree
    # everything under one namespace: no generic top-level name that another project could also install
    installed = {p.name for p in site.iterdir() if (p / "__init__.py").is_file() or p.suffix == ".py"}
    assert not installed & {"common", "cli", "server", "runtime", "profiler", "evaluation", "neuron_files"}, installed
    assert sorted(p.name for p in (site / "partinfer").iterdir() if p.is_dir() and p.name != "__pycache__") == [
        "cli", "common", "evaluation", "neuron_files", "profiler", "runtime", "server"]
    console = subprocess.run([str(python), str(site / "bin" / "partinfer"), "--help"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert console.returncode == 0 and "generate" in console.stdout, console.stderr
    done = subprocess.run([str(python), "-m", "partinfer.cli", "generate", "--method", "partinfer", "-p", "Name a colour.",
                           "-n", "4", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["text"] and abs(report["sparse_layer_computed_fraction"] - 0.4) < 0.01
