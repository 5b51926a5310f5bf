"""`python -m harness.trial STUDY --cell CELL`: one trial of a study, without Ray or MLflow, printing its curve.

    python -m harness.trial batch_size_effect --cell batch_size=250,schedule=one_cycle --scale smoke --seed 1
    torchrun --nproc-per-node 2 -m harness.trial batch_size_effect --cell batch_size=250,schedule=one_cycle
    python -m harness.trial super_convergence --scale paper --cell schedule=triangular,stepsize=1000 --steps 3

The trial is the one `harness.study` would run for that cell (the same `spec.trials` expansion, the same
`run_trial`); under torchrun every process is one DDP rank (gloo on CPU, NCCL on GPUs, from torchrun's
RANK/WORLD_SIZE/MASTER_ADDR variables) and rank 0 prints. With --steps K only the trial's first K optimizer steps
run (harness.trial.short_run: the real data, model, optimizer, schedule and train_step, no evaluation), each
printed with its time, then s/step, images/s and peak memory. Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from harness import spec as specs
from harness.config import ConfigError, TrialConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.trial", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="study name (a file in studies/) or a path to a study YAML")
    p.add_argument("--cell", help="the cell to run, as the study names it (e.g. batch_size=250,schedule=one_cycle); "
                                  "optional when the study has one cell")
    p.add_argument("--scale", choices=specs.SCALES, help="default: paper when a GPU is visible, else smoke")
    p.add_argument("--seed", type=int, help="the trial's seed (default: the cell's first)")
    p.add_argument("--steps", type=int, help="only the trial's first STEPS optimizer steps, timed (no evaluation): "
                                             "s/step, images/s and peak memory of the real config")
    return p.parse_args(argv)


def pick_trial(spec: dict, scale: str, cell: str | None, seed: int | None, world: int) -> TrialConfig:
    """The config of the study's trial for `cell` (and `seed`), validated for `world` ranks; SpecError if none."""
    trials = specs.trials(spec, scale, where=spec["name"], workers=world)
    cells = list(dict.fromkeys(t.cell for t in trials))
    if cell is None and len(cells) == 1:
        cell = cells[0]
    if cell not in cells:
        what = f"no cell '{cell}'" if cell is not None else "no --cell given"
        raise specs.SpecError(f"{what} in {spec['name']} at scale {scale}; cells: {' | '.join(cells)}")
    in_cell = [t for t in trials if t.cell == cell]
    chosen = next((t for t in in_cell if seed is not None and t.config.seed == seed), in_cell[0])
    # trials of one cell differ only by seed
    return chosen.config if seed is None else chosen.config.replace(seed=seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        spec = specs.load_spec(args.study)
        scale = args.scale or ("paper" if _cuda() else "smoke")
        config = pick_trial(spec, scale, args.cell, args.seed, world)
    except (specs.SpecError, ConfigError) as e:
        return _fail(str(e))

    import torch
    import torch.distributed as dist

    from harness.trial.data import DataNotFoundError
    from harness.trial.loop import run_trial

    device = None
    if world > 1:
        use_cuda = torch.cuda.is_available() and config.device != "cpu"
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        dist.init_process_group("nccl" if use_cuda else "gloo")  # env://: torchrun's variables
    say = print if rank == 0 else (lambda *a, **k: None)
    if args.steps is not None:
        return _short(config, args.steps, device, say, world)
    say(f"{spec['name']} ({scale}), cell {args.cell or 'all'}, seed {config.seed}, {world} rank(s): "
        f"{config.model} on {config.dataset}, batch {config.batch_size}, {config.steps} steps, "
        f"{config.schedule} max_lr {config.max_lr:g}", flush=True)
    say(f"{'step':>7s} {'epoch':>7s} {'lr':>8s} {'train_loss':>10s} {'test_loss':>9s} {'test_acc':>8s} "
        f"{'images/s':>9s}", flush=True)

    def reporter(m: dict, state) -> None:
        say(f"{m['step']:7d} {m['epoch']:7.2f} {m['lr']:8.4f} {m['train_loss']:10.4f} {m['test_loss']:9.4f} "
            f"{m['test_acc']:8.4f} {m['images_per_s']:9.0f}", flush=True)

    try:
        summary = run_trial(config, reporter, device=device)
        if world > 1:
            dist.barrier()  # no rank tears gloo down while another still talks to it
    except (ConfigError, DataNotFoundError) as e:
        return _fail(" ".join(str(e).split()))
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    target = summary["steps_to_target"]
    say(f"{summary['status']}: final acc {summary['final_acc']:.4f}, best {summary['best_acc']:.4f}, "
        f"steps to {summary['target_acc']:g}: {target if target is not None else 'not reached'}, "
        f"train {summary['train_seconds']:.1f} s" + (f", diverged at step {summary['diverged_at_step']}"
                                                     if summary["status"] == "diverged" else ""), flush=True)
    return 0  # a diverged trial is a result, not an error


def _short(config: TrialConfig, steps: int, device, say, world: int) -> int:
    """The trial's first `steps` steps (harness.trial.short_run), one line each, then their rate and peak memory."""
    import torch.distributed as dist

    from harness.trial.data import DataNotFoundError
    from harness.trial.short_run import run_steps
    say(f"{config.model} on {config.dataset}, batch {config.batch_size} (bn {config.bn_batch or 'per worker'}), "
        f"{config.optimizer}, {config.precision}: the first {steps} of {config.steps} steps, {world} rank(s)")
    say(f"{'step':>7s} {'lr':>8s} {'train_loss':>10s} {'seconds':>8s}", flush=True)
    try:
        m = run_steps(config, steps, device, on_step=lambda k, lr, loss, sec: say(
            f"{k:7d} {lr:8.4f} {loss:10.4f} {sec:8.3f}", flush=True))
        if world > 1:
            dist.barrier()
    except (ConfigError, DataNotFoundError) as e:
        return _fail(" ".join(str(e).split()))
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    say(f"{m.describe()} on {m.device}, {world} rank(s) (rank 0's peak memory)", flush=True)
    return 0


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
