"""What the runs say: MLflow runs -> typed frames -> one verdict per planned comparison.

    results.py     the study's runs from MLflow (public client API) as pandas frames, configs kept typed
    claims.py      the plan's comparisons evaluated: statistics and verdicts
    caffe_logs.py  the authors' Caffe training logs and the reference CSVs kept from them
    caffe_runs.py  a log's solver and net as the harness's TrialConfig fields (reference/runs/, harness.references)
"""
