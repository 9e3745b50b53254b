"""Train a UNet-family model on prepared shards with Ray Train (DDP), checkpoint, export the best.

    python -m jobs.train --smoke-test                  # ~1-3 min on 2 CPUs: phantoms, 32 px, 2 workers
    python -m jobs.train --config configs/phantoms.yaml
    python -m jobs.train --config configs/busi.yaml --data runs/busi_prepared --workers 2
    python -m jobs.train --config configs/busi.yaml --set model_kwargs.dropout=0.1 --epochs 80
    python -m jobs.train --data s3://bucket/busi-prepared --storage s3://bucket/runs --name busi-unet \\
        --use-gpu --workers 4 --image-size 256 --amp bf16
    python -m jobs.train --config configs/busi_cv.yaml                  # 5 folds over train+val + their ensemble
    python -m jobs.train --config configs/busi_cv.yaml --fold 2         # one fold only
    python -m jobs.train --smoke-test --augment-on gpu   # augment on the worker's device (kornia; slow on CPU)
    python -m jobs.train --smoke-test --mlflow        # + MLflow tracking in ./mlruns (or --mlflow http://host:5000)
    ray job submit --runtime-env deploy/runtime_env.yaml -- python -m jobs.train --config configs/busi.yaml \
        --workers 2-8 \
        --data s3://bucket/busi-prepared --storage s3://bucket/runs

Settings come from, later ones winning: the defaults (``unet.training.TrainConfig``), ``--config``
(YAML or TOML, keys = the long flag names with ``_`` or ``-``), the flags, then ``--set key=value``
(value parsed as YAML; ``model_kwargs.channels=[16,32,64]`` sets one key of a mapping).
``--print-config`` shows the result and exits.

The run lives in ``<storage>/<name>`` (checkpoints: the best ``--keep`` by ``--monitor``, default
the validation Dice, and the latest). Re-running the same command resumes an interrupted run from
its latest checkpoint and only re-exports a finished one. The best checkpoint is exported as a
model artifact (config.json + model.safetensors) to ``--export`` (default
``<storage>/<name>/model``); its location is the last line printed.

``--folds K``: K-fold cross-validation over train+val (the test split never takes part; duplicate
groups stay in one fold, classes stratified): fold k trains on the other folds, is validated and
picks its best epoch on fold k, and lives in ``<storage>/<name>-fold<k>``; the folds run one after
another (re-running resumes the unfinished ones), then the ensemble of the K models, averaging their
probabilities, is written to ``<storage>/<name>/model``. Choose its post-processing on the folds'
held-out images with ``python -m jobs.calibrate --split oof``. ``--fold k`` trains one fold only.

Ray: joins ``--address`` (``auto``: the ``ray start`` cluster of this machine) or ``$RAY_ADDRESS``
(as under ``ray job submit``), else starts a private local Ray with ``--num-cpus`` (default: all
CPUs). Workers get a planned share of CPUs so Ray Data keeps ``--data-cpus`` for decoding; a
request the cluster cannot hold fails at once with one line (exit code 2); on an autoscaling
cluster the plan is sized from the node types it can add (``--node-types``, ``unet.autoscaling``).
Output: one line per epoch and the result; Ray's own output stays in its log files (path printed once) unless
``--verbose`` or ``UNET_VERBOSE=1``. Under ``ray job submit`` or on more than one node,
``--data``/``--storage``/``--export`` must be shared by all of them (``s3://``, or ``file:///path`` for
a mount every node has); a local path stops the job at once with one line. S3 endpoint and credentials come from
the AWS_* environment variables (the file system object carries them to the workers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from collections.abc import Sequence

from unet.cli import run_main, usage_errors
from unet.losses import LOSSES
from unet.runtime import configure_output, require_shared_paths
from unet.models import MODELS
from unet.training import (AMP_DTYPES, MONITORS, OPTIMIZERS, PLACEMENT_STRATEGIES, SCHEDULES, TrainConfig,
                           fit, fit_folds, load_config_file)
from unet.training.config import AUGMENT_ON

# The settings that get a flag of their own; every TrainConfig field also works with --set.
_FLAGS: list[tuple[str, dict]] = [
    ("data", dict(metavar="URI", help="prepared shards (output of jobs.prepare): local dir or s3://")),
    ("model", dict(choices=tuple(MODELS), help="architecture")),
    ("model-kwargs", dict(metavar="YAML", help="build_model arguments as a YAML/JSON mapping, "
                          "e.g. '{channels: [16,32,64,128,256], dropout: 0.07}'")),
    ("loss", dict(choices=tuple(LOSSES), help="loss")),
    ("loss-kwargs", dict(metavar="YAML", help="loss arguments, e.g. '{dice_weight: 1, bce_weight: 0.5}'")),
    ("optimizer", dict(choices=tuple(OPTIMIZERS), help="optimiser")),
    ("lr", dict(type=float, help="peak learning rate")),
    ("weight-decay", dict(type=float, help="weight decay")),
    ("momentum", dict(type=float, help="SGD momentum (Nesterov)")),
    ("schedule", dict(choices=tuple(SCHEDULES), help="LR decay after warm-up, per epoch")),
    ("warmup-epochs", dict(type=int, help="epochs of linear LR warm-up")),
    ("epochs", dict(type=int, help="total epochs (raising it on a finished run continues training)")),
    ("batch-size", dict(type=int, help="training images per step per worker")),
    ("val-batch-size", dict(type=int, help="validation images per step (default: --batch-size)")),
    ("image-size", dict(metavar="N|HxW", help="training size")),
    ("augment", dict(action=argparse.BooleanOptionalAction, help="augment the train split")),
    ("augment-on", dict(choices=AUGMENT_ON, help="where to augment: cpu (albumentations in Ray Data), gpu (decode "
                        "once in Ray Data, augment batches on the worker's device with kornia), auto (gpu with "
                        "--use-gpu)")),
    ("oversample", dict(metavar="YAML", help="train rows of a class n times per epoch, each copy augmented "
                        "differently, e.g. '{normal: 3}'")),
    ("folds", dict(type=int, metavar="K", help="K-fold cross-validation over train+val: train every fold (each "
                   "validated on its held-out fold; runs <name>-fold<k>), then their ensemble (<name>/model)")),
    ("fold", dict(type=int, metavar="k", help="with --folds: train fold k only (0-based), e.g. one job per fold")),
    ("workers", dict(metavar="N|N-M", help="training workers; N-M = elastic group (Ray Train V2)")),
    ("use-gpu", dict(action=argparse.BooleanOptionalAction, help="one GPU per worker, NCCL")),
    ("cpus-per-worker", dict(type=float, help="CPUs per worker (default: planned from the cluster)")),
    ("gpus-per-worker", dict(type=float, help="GPUs per worker with --use-gpu")),
    ("data-cpus", dict(type=float, help="CPUs kept free for Ray Data (decode/augment)")),
    ("max-block-mib", dict(type=float, help="bound Ray Data's read units to this many MiB (for shards "
                                            "much larger than the object store; default: one shard)")),
    ("placement-strategy", dict(choices=PLACEMENT_STRATEGIES,
                                help="how workers are placed on nodes")),
    ("amp", dict(choices=tuple(AMP_DTYPES), help="mixed precision (fp16: GPU only)")),
    ("ema-decay", dict(type=float, help="validate and export an exponential moving average of the weights, "
                       "updated every step with this decay (e.g. 0.99); default: none")),
    ("seed", dict(type=int, help="seed for weights, augmentation and shuffling")),
    ("storage", dict(metavar="URI", help="where runs live: local dir or s3://bucket/prefix")),
    ("name", dict(help="run name; the run is <storage>/<name> (default: the model name)")),
    ("export", dict(metavar="URI", help="model artifact destination (default <storage>/<name>/model)")),
    ("keep", dict(type=int, help="best checkpoints kept by --monitor (plus the latest)")),
    ("monitor", dict(choices=MONITORS,
                     help="validation score that picks the best checkpoint (val_dice: summed counts)")),
    ("max-failures", dict(type=int, help="worker-group restarts from the latest checkpoint (-1: no limit)")),
    ("address", dict(help="Ray cluster to join, or 'auto' for this machine's `ray start` cluster "
                        "(default: $RAY_ADDRESS, else a private local Ray)")),
    ("num-cpus", dict(type=int, help="CPUs of the local Ray this job starts (default: all)")),
    ("check-resources", dict(action=argparse.BooleanOptionalAction,
                             help="refuse requests the cluster cannot hold (off for autoscaling clusters)")),
    ("node-types", dict(metavar="FILE", help="cluster YAML (e.g. cluster.yaml) with the node types an autoscaling "
                        "cluster can add; the plan is sized from them (default: found from the cluster)")),
    ("mlflow", dict(nargs="?", const=True, metavar="URI",
                    help="track the run in MLflow (params, per-epoch metrics, model): a tracking URI, or alone "
                         "for $MLFLOW_TRACKING_URI, else the file store ./mlruns; needs unet-ray[tracking]")),
    ("smoke-test", dict(action="store_true", help="tiny run: 32 px, 2 epochs, small model, phantoms if no --data")),
]
_MAPPINGS = ("model_kwargs", "loss_kwargs", "oversample")


def build_parser() -> argparse.ArgumentParser:
    """The job's arguments (also used by tests and docs to check example command lines)."""
    defaults = dataclasses.asdict(TrainConfig())
    p = argparse.ArgumentParser(
        prog="python -m jobs.train", allow_abbrev=False,
        description="Distributed training of unet / attention_unet / unet_plus_plus on Ray Train.",
        epilog="Precedence: defaults < --config < flags < --set. See the module docstring for examples.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML or TOML file of settings (keys = flag names)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override any setting, value parsed as YAML (repeatable), e.g. --set keep=3")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own output (worker logs, progress, warnings); or set UNET_VERBOSE=1")
    for flag, kw in _FLAGS:
        key = flag.replace("-", "_")
        default = defaults[key]
        shown = "x".join(map(str, default)) if key == "image_size" else default
        kw = dict(kw)
        kw["help"] = f"{kw['help']} (default: {shown})" if kw.get("action") != "store_true" else kw["help"]
        p.add_argument(f"--{flag}", dest=key, default=argparse.SUPPRESS, **kw)
    return p


def _yaml(text: str, what: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{what}: not valid YAML: {e}") from e


def config_from_args(args: argparse.Namespace):
    """Defaults < --config file < flags < --set, validated into a ``TrainConfig``."""
    cfg = TrainConfig()
    if args.config:
        cfg = cfg.updated(load_config_file(args.config), source=f"config file {args.config}")
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "set", "print_config", "verbose")}
    for key in _MAPPINGS:
        if key in flags:
            flags[key] = _yaml(flags[key], f"--{key.replace('_', '-')}")
    cfg = cfg.updated(flags, source="command line")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=3e-4")
        overrides[key.strip()] = _yaml(value, f"--set {key.strip()}")
    return cfg.updated(overrides, source="--set")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with usage_errors():  # a bad setting, config file or --set is bad use
        cfg = config_from_args(args)
    if args.print_config:
        print(json.dumps(cfg.resolved().to_dict(), indent=2))
        return 0
    configure_output("train", args.verbose)
    resolved = cfg.resolved()
    require_shared_paths({"--data": resolved.data, "--storage": resolved.storage, "--export": resolved.export},
                         resolved.address)
    command = shlex.join(["python", "-m", "jobs.train", *(sys.argv[1:] if argv is None else argv)])
    if resolved.folds is not None and resolved.fold is None:
        folds = fit_folds(cfg, command=command)
        for k, o in enumerate(folds.folds):
            print(f"fold {k}: run {o.run_uri}, best epoch {o.best_epoch}: {resolved.monitor} "
                  f"{o.best_metrics.get(resolved.monitor, float('nan')):.4f} ({o.seconds:.0f}s)")
        print(f"ensemble of {len(folds.folds)} folds ({folds.seconds:.0f}s); calibrate it on the folds' held-out "
              f"images: python -m jobs.calibrate --model {folds.artifact} --data {folds.data} --split oof")
        print(f"model artifact: {folds.artifact}")
        return 0
    outcome = fit(cfg, command=command)
    m = outcome.best_metrics
    status = "trained" if outcome.trained else "already finished, re-exported"
    print(f"run {outcome.run_uri}: {status}; best epoch {outcome.best_epoch}: "
          f"val_dice {m.get('val_dice', float('nan')):.4f} val_iou {m.get('val_iou', float('nan')):.4f} "
          f"({outcome.seconds:.0f}s)")
    print(f"model artifact: {outcome.artifact}")
    return 0


def cli() -> int:
    """Entry of the ``unet-train`` console script: ``main`` under ``run_main``, exactly as ``python -m``."""
    return run_main(main)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
