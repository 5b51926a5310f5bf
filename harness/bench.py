"""Benchmarks that print ratios (not timed tests): `python -m harness.bench logging|step`.

logging  training throughput of one trial with MLflow logging (a TrialLogger on a fresh sqlite store, one
         batched call per evaluation, a checkpoint snapshot per evaluation) vs with no reporter at all
step     CPU images/s of a training step at batch 125 for the models named (default resnet20 resnet56)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from harness import tracking
from harness.config import TrialConfig
from harness.trial import build_optimizer, run_trial


def bench_logging(steps: int, eval_every: int, repeats: int) -> None:
    config = {"dataset": "digits", "model": "resnet20", "preprocess": "paper", "batch_size": 125, "bn_batch": 125,
              "steps": steps, "eval_every": eval_every, "schedule": "one_cycle", "max_lr": 0.5, "base_lr": 0.05,
              "device": "cpu"}
    run_trial({**config, "steps": 2, "eval_every": 2})  # warm-up: imports, allocator
    walls: dict[str, list[float]] = {"off": [], "on": []}
    trains: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(repeats):
        for mode in ("off", "on"):
            reporter = None
            if mode == "on":
                d = tempfile.mkdtemp()
                uri = f"sqlite:///{d}/mlflow.db"
                exp = tracking.experiment_id(uri, "bench")
                parent = tracking._client(uri).create_run(exp).info.run_id
                run_id = tracking.find_or_create_trial_run(uri, exp, parent, {"key": "k", "name": "bench",
                                                                                "study": "bench", "scale": "smoke",
                                                                                "cell": "all"})
                logger = tracking.TrialLogger(uri, run_id)
                logger.start(config, 1, tracking.system_tags(["localhost"]))
                def reporter(metrics, state, logger=logger):
                    logger.log_eval(metrics)
            t0 = time.perf_counter()
            summary = run_trial(config, reporter)
            walls[mode].append(time.perf_counter() - t0)
            trains[mode].append(summary["train_seconds"])
    images = steps * config["batch_size"]
    off, on = statistics.median(walls["off"]), statistics.median(walls["on"])
    t_off, t_on = statistics.median(trains["off"]), statistics.median(trains["on"])
    print(f"resnet20 on digits, {steps} steps of 125, evaluation every {eval_every} steps, median of {repeats}")
    print(f"training images/s (evaluation and logging excluded): off {images / t_off:.1f}, on {images / t_on:.1f}, "
          f"ratio on/off {t_off / t_on:.3f}")
    print(f"whole-trial images/s (wall clock): off {images / off:.1f}, on {images / on:.1f}, "
          f"ratio on/off {off / on:.3f} ({(on - off) / (steps // eval_every) * 1000:.1f} ms per evaluation)")


def bench_step(models: list[str], steps: int) -> None:
    for name in models:
        cfg = TrialConfig.from_dict({"model": name, "batch_size": 125, "max_lr": 0.1, "schedule": "constant"})
        from harness.models import build_model
        torch.manual_seed(0)
        model = build_model(cfg, 3, 10, 32)
        opt = build_optimizer(model, cfg)
        x, y = torch.randn(125, 3, 32, 32), torch.randint(0, 10, (125,))
        times = []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(f"{name}: {125 / med:7.1f} images/s (median step {med * 1000:.0f} ms over {steps} steps, "
              f"batch 125, 32x32x3, {torch.get_num_threads()} threads)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    lg = sub.add_parser("logging")
    lg.add_argument("--steps", type=int, default=60)
    lg.add_argument("--eval-every", type=int, default=5)
    lg.add_argument("--repeats", type=int, default=3)
    st = sub.add_parser("step")
    st.add_argument("models", nargs="*", default=["resnet20", "resnet56"])
    st.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    if args.what == "logging":
        bench_logging(args.steps, args.eval_every, args.repeats)
    else:
        bench_step(args.models, args.steps)


if __name__ == "__main__":
    main()
