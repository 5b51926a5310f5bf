"""One Caffe log's solver and training net -> the run as the harness would run it (a reference run).

`reference_run(...)` turns what harness.analysis.caffe_logs read from a log (its solver parameters, the facts of
its training net, its GPUs) into the JSON committed as harness/analysis/reference/runs/<log>.json and read back
by harness.references:

    {"name": ..., "log": "<folder>/<file>", "claims": [...], "gpus": 4, "config": {...}, "unmapped": {...}}

`config` holds only TrialConfig fields the log determines; everything else of the solver, and what of the net no
harness field can say, goes to `unmapped`, so a reader sees what the harness does not reproduce. How each field is
read (and why):

    dataset, train_size   the data layer's source (cifar100 in the name; train10k -> 10000, else the full set)
    model                 the net (caffe_logs.net_facts); a net no harness model builds is told in unmapped["model"]
    preprocess            mean_file + mirror -> "paper", mean_file alone -> "mean" (harness/trial/data.py)
    optimizer, nesterov   solver type: SGD -> caffe_sgd, Nesterov -> caffe_sgd + nesterov, Adam/AdaGrad/AdaDelta
    schedule and fields   lr_policy: triangular -> triangular (range_test when base 0 and stepsize = max_iter),
                          multistep -> multistep (max_lr = Caffe's base_lr; milestones: `effective_milestones`),
                          fixed -> constant, 1cycle -> caffe_1cycle (final_div 1000, his Caffe's constant)
    momentum              momentum; with `cyclical_momentum: MIN` + `cyclical_momentum: STEPS` and MIN != momentum,
                          cycle_momentum true, max_momentum = momentum, min_momentum = MIN
    batch_size, bn_batch  GPUs x the per-GPU batch_size (the total batch), and the per-GPU batch: Caffe's BN
                          statistics are per GPU
    bn_momentum           1 - BatchNorm's moving_average_fraction (Caffe's default 0.999 where a layer sets none)
    eval_every, steps     test_interval, max_iter
"""

from __future__ import annotations

from harness.config import MODELS

# Solver fields the config says (the rest of the solver goes to `unmapped` as it is).
MAPPED_SOLVER = ("base_lr", "max_lr", "max_iter", "stepsize", "lr_policy", "momentum", "weight_decay", "type",
                 "gamma", "test_interval")
OPTIMIZERS = {"SGD": ("caffe_sgd", False), "Nesterov": ("caffe_sgd", True), "Adam": ("adam", False),
              "AdaGrad": ("adagrad", False), "AdaDelta": ("adadelta", False)}
CAFFE_BN_FRACTION = 0.999   # BatchNormParameter's default moving_average_fraction
CAFFE_1CYCLE_FINAL_DIV = 1000.0  # the DA author's 1cycle ends at base_lr / 1000 (every da-logs tail prints it)


def effective_milestones(stepvalues: list[int]) -> list[int]:
    """The iterations where Caffe's multistep policy really drops the LR.

    Caffe's solver advances at most one stepvalue per iteration
    (`if (current_step_ < size && iter_ >= stepvalue(current_step_)) current_step_++`), so stepvalue i takes
    effect at max(stepvalue i, the previous drop + 1): listed out of order (19531, 29296, 34178, 36619, 35398)
    the last two drop at 36619 and 36620."""
    out: list[int] = []
    for value in stepvalues:
        out.append(max(value, out[-1] + 1) if out else value)
    return out


def typed(value: str):
    """A solver value as JSON: int, float, bool or the string without its quotes."""
    text = value.strip().strip('"')
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text, text)


def reference_run(name: str, log: str, claims: list[str], gpus: int, solver: dict, net: dict) -> dict:
    """The reference run of one log. `solver`: field -> raw value, a list for a repeated field; `net`: the keys
    caffe_logs.net_facts gives (dataset, train_size, model, dropout, mean_file, mirror, batch, bn_fractions)."""
    first = {k: typed(v[0] if isinstance(v, list) else v) for k, v in solver.items()}
    config: dict = {"dataset": net["dataset"]}
    unmapped: dict = {k: [typed(x) for x in v] if isinstance(v, list) else typed(v)
                      for k, v in solver.items() if k not in MAPPED_SOLVER}
    if net["train_size"]:
        config["train_size"] = net["train_size"]
    if net["model"] in MODELS and not (net["dropout"] and net["model"] != "densenet40"):
        config["model"] = net["model"]
    else:
        unmapped["model"] = f"{net['model']}{' with Dropout' if net['dropout'] else ''}: no harness model builds it"
    if net["mean_file"]:
        config["preprocess"] = "paper" if net["mirror"] else "mean"
    else:
        unmapped["data"] = f"mirror: {net['mirror']}, no mean_file: no harness preprocess says it"
    kind = first.get("type", "SGD")
    if kind in OPTIMIZERS:
        config["optimizer"], nesterov = OPTIMIZERS[kind]
        if nesterov:
            config["nesterov"] = True
    else:
        unmapped["type"] = kind
    if "momentum" in first and config.get("optimizer") in ("caffe_sgd", "adam"):
        config["momentum"] = first["momentum"]
    config["weight_decay"] = float(first.get("weight_decay", 0.0))
    config.update(_schedule(first, solver, unmapped))
    config["steps"] = first["max_iter"]
    config["batch_size"] = gpus * net["batch"]
    config["bn_batch"] = net["batch"]
    if len(net["bn_fractions"]) == 1:
        config["bn_momentum"] = round(1 - net["bn_fractions"][0], 12)
    elif net["bn_fractions"]:
        unmapped["moving_average_fraction"] = net["bn_fractions"]
    if "test_interval" in first:
        config["eval_every"] = first["test_interval"]
    low = typed(_as_list(solver.get("cyclical_momentum", [""]))[0])
    if low != "" and not config.get("cycle_momentum") and float(low) != float(first.get("momentum", low)):
        unmapped["cyclical_momentum_note"] = f"cyclical momentum under lr_policy {first.get('lr_policy')}: not run"
    return {"name": name, "log": log, "claims": claims, "gpus": gpus, "config": config, "unmapped": unmapped}


def _schedule(first: dict, solver: dict, unmapped: dict) -> dict:
    """The schedule fields of the config from the solver's lr_policy (unknown policies go to unmapped)."""
    policy, base = first.get("lr_policy", "fixed"), float(first.get("base_lr", 0.0))
    if policy == "fixed":
        return {"schedule": "constant", "max_lr": base, "cycle_momentum": False}
    if policy == "multistep":
        raw = [typed(v) for v in _as_list(solver.get("stepvalue", []))]
        milestones = effective_milestones(raw)
        if milestones != raw:
            unmapped["stepvalue_note"] = (f"stepvalues listed out of order {raw}: Caffe's solver advances at most one "
                                          f"per iteration, so the drops are at {milestones} (config.milestones)")
        return {"schedule": "multistep", "max_lr": base, "milestones": milestones,
                "gamma": float(first.get("gamma", 1.0)), "cycle_momentum": False}
    if policy not in ("triangular", "1cycle"):
        unmapped["lr_policy"] = policy
        return {}
    stepsize, steps = first["stepsize"], first["max_iter"]
    out = {"base_lr": base, "max_lr": float(first["max_lr"]), "stepsize": stepsize}
    if policy == "1cycle":
        out.update(schedule="caffe_1cycle", final_div=CAFFE_1CYCLE_FINAL_DIV)
    else:
        out["schedule"] = "range_test" if base == 0 and stepsize == steps else "triangular"
    low, momentum_steps = (typed(v) for v in (_as_list(solver.get("cyclical_momentum", [])) + ["", ""])[:2])
    high = first.get("momentum")
    if policy == "1cycle" and low != "" and high is not None and float(low) != float(high):
        out.update(cycle_momentum=True, max_momentum=float(high), min_momentum=float(low))
        if momentum_steps != stepsize:
            unmapped["cyclical_momentum_note"] = (f"momentum stepsize {momentum_steps} differs from stepsize "
                                                  f"{stepsize}: the harness cycles momentum over stepsize")
    else:
        out["cycle_momentum"] = False
    return out


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]
