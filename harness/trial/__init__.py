"""One trial, with no Ray and no MLflow: what a single process (or one DDP rank) runs.

    data.py       datasets as tensors on the device, batch-wise augmentation, per-rank shards
    models.py     the authors' Caffe ResNets, a pre-activation variant, MLPs, a small CNN
    schedules.py  LR and momentum per optimizer step
    optim.py      Caffe's SGD
    step.py       the seam: device, rank, optimizer, precision/memory format and one training step
    loop.py       run_trial: the training loop, evaluation, divergence, metrics to a reporter
    finder.py     the LR finder (trial kind lr_finder), on the same step
    cli.py        python -m harness.trial: one trial alone or under torchrun
"""
