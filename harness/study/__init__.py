"""A study: a grid of trials scheduled by Ray Tune, each a Ray Train TorchTrainer, each an MLflow run.

    cli.py             python -m harness.study: the trials, Tune, resume, the dry-run cost, the summary
    console.py         what reaches the terminal and what goes to the study's log file
    cluster.py         where trials run: the Ray connection, admission, storage every node sees
    driver.py          the Tune trial: builds one TorchTrainer and hands its final result to Tune
    worker.py          the Train worker: one rank's run_trial, reports, checkpoints and MLflow logging
    tracking.py        MLflow, the writer's side: study and trial runs, buffered logging through outages
    lr_from_finder.py  a cell's max LR from a finder study's runs
    backfill.py        python -m harness.study.backfill: MLflow filled in from Ray's storage after an outage
"""
