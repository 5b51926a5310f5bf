"""Benchmarking harness for the claims of large-batch super-convergence (Smith & Topin).

    config, spec, plan, names   the core: one trial's typed config, study files, analysis plans, MLflow names
    trial/                      one trial, no Ray or MLflow: data, models, schedules, optimizers, the step, the loop
    study/                      many trials: the CLI, Ray Tune + Train, the cluster, MLflow tracking, back-fill
    analysis/                   MLflow runs -> frames -> verdicts, and the authors' Caffe logs
    report/                     verdicts and frames -> figures, tables, the PDF
    bench.py                    the performance figures
"""

from pathlib import Path

__version__ = "0.1.0"
REPO_ROOT = Path(__file__).resolve().parent.parent  # studies/, reports/ and the git checkout
