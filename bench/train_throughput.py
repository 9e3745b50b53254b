"""Training throughput: ``jobs.train`` images/s (all workers) ÷ a plain single-process PyTorch loop.

Both train the same model (default ``unet``, 1.9 M parameters) with the same loss (Dice + BCE),
optimiser (AdamW), augmentation and training size on the same prepared phantom shards, on the
same CPUs:

* ``python -m jobs.train --workers 2 ...`` as its own process with a fresh local Ray of
  ``--num-cpus`` CPUs (default: all). Its images/s per epoch are the ones it reports and logs
  (``images_per_s`` in the per-epoch metrics: all ranks' training images over the mean rank's time
  in the training loop, validation excluded); read back from the exported artifact's training
  history.
* the plain loop: one process, ``torch.set_num_threads(<the same CPUs>)``, batches from
  ``unet.data.iter_batches`` (decode + augment + normalise inline, no Ray), forward, loss,
  backward, step; images/s = training images / time in the loop. Its batch is the job's global
  batch (workers x per-worker batch), so both take the same optimisation steps. It runs before
  and after the job and the mean is used.

The first epoch of each side is a warm-up (Ray Data pipeline start, allocator growth); the ratio
uses the median images/s of the later epochs.

``--augment-on gpu`` (the default with ``--gpu``: ``auto``) has both sides augment on the
training device with kornia (``unet.data.gpu_augment``): the job decodes the train split once in
Ray Data, the plain loop decodes with ``iter_batches(normalize=False)``; ``--augment-on cpu``
keeps albumentations on the CPUs. Running the script once with each on a GPU node compares them
(images/s and the job's data wait).

Goal: ratio >= 0.85 — data-parallel training with Ray Train/Ray Data keeps at least 85% of what
the cores do in a plain loop.

Run (3-5 minutes on 2 shared CPUs)::

    .venv/bin/python -m bench.train_throughput                  # 256 phantoms, 3 epochs, 2 workers
    .venv/bin/python -m bench.train_throughput --gpu --image-size 256 --num 400 --batch-size 32
    .venv/bin/python -m bench.train_throughput --gpu --image-size 256 --num 400 --batch-size 32 --augment-on cpu

Writes bench/results/train_throughput.json; the last line printed is the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import announce_machine, finish, median, run_job, say, set_threads, work_dir

GOAL = 0.85


def plain_loop(data: str, *, epochs: int, batch_size: int, image_size: int, seed: int,
               device: str = "cpu", amp: str = "none", on_device: bool = False) -> list[dict]:
    """The single-process baseline; returns one record per epoch (images, seconds, images/s).
    ``on_device``: decode-only batches, augmented and normalised on ``device`` (kornia)."""
    import torch

    from unet.data import AugmentConfig, iter_batches
    from unet.data.gpu_augment import DeviceTransform
    from unet.models import build_model
    from unet.training import TrainConfig, autocast, build_loss_fn, build_optimizer

    cfg = TrainConfig(data=data, batch_size=batch_size, image_size=(image_size, image_size), seed=seed,
                      amp=amp, use_gpu=device == "cuda").validated()
    torch.manual_seed(seed)
    model = build_model(cfg.model, **cfg.model_kwargs).to(device)
    optimizer = build_optimizer(cfg, model.parameters())
    loss_fn = build_loss_fn(cfg)
    dev = torch.device(device)
    to_model = (DeviceTransform(AugmentConfig(), cfg.image_size, **model.input_normalization, seed=seed)
                if on_device else None)
    records = []
    for epoch in range(1, epochs + 1):
        model.train()
        images = 0
        t0 = time.perf_counter()
        for step, batch in enumerate(iter_batches(data, "train", size=cfg.image_size, batch_size=batch_size,
                                                  augment=not on_device, normalize=not on_device, seed=seed,
                                                  epoch=epoch, shuffle=True, **model.input_normalization)):
            x = torch.from_numpy(batch["image"]).to(dev)
            y = torch.from_numpy(batch["mask"]).to(dev)
            if to_model is not None:
                x, y = to_model(x, y, epoch=epoch, step=step)
            optimizer.zero_grad(set_to_none=True)
            with autocast(cfg.amp, dev):
                loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            images += x.shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        records.append({"epoch": epoch, "images": images, "seconds": round(seconds, 3),
                        "images_per_s": images / seconds, "loadavg_1m": round(os.getloadavg()[0], 1)})
    return records


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=256, help="phantoms to prepare (70%% train: ~180 per epoch; default 256)")
    p.add_argument("--size", type=int, default=256, help="side of the prepared phantoms (default 256)")
    p.add_argument("--image-size", type=int, default=128, help="training size (default 128)")
    p.add_argument("--epochs", type=int, default=3, help="epochs on each side; the first is a warm-up")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default 2; 1 with --gpu)")
    p.add_argument("--batch-size", type=int, default=8, help="per worker (default 8)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs for the job's local Ray and the plain loop's threads (default: all)")
    p.add_argument("--gpu", action="store_true", help="--use-gpu for the job; the plain loop on cuda")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--augment-on", choices=("auto", "cpu", "gpu"), default="auto",
                   help="cpu: albumentations on the CPUs; gpu: kornia on the training device (both sides); "
                        "auto: gpu with --gpu (default)")
    p.add_argument("--data", default=None, help="prepared shards to use instead of generated phantoms")
    p.add_argument("--workdir", default=None, help="keep data/runs here (default: a temp dir, removed)")
    return p


def _job_history(run_dir: Path, stdout: str) -> list[dict]:
    """Per-epoch records of the job: from its exported artifact, else from its log lines."""
    config = run_dir / "model" / "config.json"
    if config.exists():
        history = json.loads(config.read_text()).get("provenance", {}).get("history")
        if history:
            return history
    pattern = re.compile(r"epoch (\d+)/\d+ .* ([\d.]+) img/s")
    return [{"epoch": int(m.group(1)), "images_per_s": float(m.group(2))} for m in pattern.finditer(stdout)]


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.workers is None:
        args.workers = 1 if args.gpu else 2
    cpus = args.num_cpus or os.cpu_count() or 1
    with work_dir(args.workdir, "unet-bench-train-") as work:
        info = announce_machine()
        data = args.data
        if data is None:
            from unet.prepare import PrepareConfig, prepare

            data = str(work / "prepared")
            t0 = time.perf_counter()
            prepare(PrepareConfig(source="phantoms", out=data, num=args.num, size=(args.size, args.size),
                                  shard_size=16), command="bench.train_throughput")
            say(f"prepared {args.num} phantoms in {time.perf_counter() - t0:.1f}s")
        device = "cuda" if args.gpu else "cpu"
        on_device = args.augment_on == "gpu" or (args.augment_on == "auto" and args.gpu)
        global_batch = args.workers * args.batch_size
        set_threads(cpus)
        say(f"plain loop: 1 process x {cpus} torch threads, batch {global_batch}; job: {args.workers} workers x "
            f"batch {args.batch_size}, Ray with {cpus} CPUs; {args.epochs} epochs at {args.image_size}px on {device}; "
            f"augmentation on {'the training device (kornia)' if on_device else 'CPU (albumentations)'}")

        def plain(tag):
            recs = plain_loop(data, epochs=args.epochs, batch_size=global_batch, image_size=args.image_size,
                              seed=0, device=device, amp=args.amp, on_device=on_device)
            say(f"plain loop ({tag}): " + ", ".join(f"{r['images_per_s']:.2f}" for r in recs)
                + f" images/s per epoch (load {recs[-1]['loadavg_1m']})")
            return recs

        before = plain("before")
        job = ["-m", "jobs.train", "--data", data, "--storage", str(work / "runs"), "--name", "bench",
               "--workers", str(args.workers), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
               "--image-size", str(args.image_size), "--num-cpus", str(cpus), "--keep", "1", "--amp", args.amp,
               "--augment-on", args.augment_on]
        if args.gpu:
            job += ["--use-gpu"]
        run = run_job(job, log_dir=work / "log")
        history = _job_history(work / "runs" / "bench", run.stdout + run.stderr)
        if len(history) < args.epochs:
            raise RuntimeError(f"found {len(history)} epoch records of the job, expected {args.epochs}; "
                               f"stdout tail:\n{run.stdout[-2000:]}")
        job_rates = [float(h["images_per_s"]) for h in history]
        waits = [float(h.get("data_wait", 0.0)) for h in history]
        say("jobs.train:        " + ", ".join(f"{r:.2f}" for r in job_rates) + " images/s per epoch, data wait "
            + ", ".join(f"{w:.0%}" for w in waits) + f" (process wall {run.wall_s:.0f}s, load {run.loadavg_1m})")
        after = plain("after")

        later = slice(1, None) if args.epochs > 1 else slice(None)
        job_ips = median(job_rates[later])
        plain_ips = (median([r["images_per_s"] for r in before[later]])
                     + median([r["images_per_s"] for r in after[later]])) / 2
        ratio = job_ips / plain_ips
        result = {
            "benchmark": "train_throughput", "goal": f">= {GOAL}", "ratio": round(ratio, 3), "met": ratio >= GOAL,
            "config": vars(args), "cpus": cpus, "data": data, "augment_on_device": on_device,
            "job": {"images_per_s_median_later_epochs": job_ips, "history": history,
                    "process_wall_s": round(run.wall_s, 1)},
            "plain": {"before": before, "after": after, "images_per_s_median_later_epochs": plain_ips},
            "machine": info,
        }
        return finish("train_throughput", result, argv, "jobs.train/plain_loop", ratio, GOAL,
                      notes=[f"median of epochs 2..{args.epochs}: job {job_ips:.2f} images/s, "
                             f"plain loop {plain_ips:.2f} images/s"])


if __name__ == "__main__":
    main()
