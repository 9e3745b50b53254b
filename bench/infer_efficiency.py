"""Inference pipeline efficiency: the infer job end to end ÷ the model alone on in-memory tensors.

Numerator: ``python -m jobs.infer`` over an archive of phantom images (a folder of PNGs by
default; ``--input-kind parquet|tar``; ``--s3`` puts input and output on a local SeaweedFS S3
server, i.e. object store -> Parquet), run as its own process with a fresh local Ray. Its
throughput is taken in steady state from the output itself: every row carries ``processed_at``
(one timestamp per post-processed batch), so rows after the first batch / (last - first
timestamp) is the rate of the whole pipeline — read, decode, resize, the model actor,
post-processing, PNG encoding — once it runs. Also reported: images / the ``wall_s`` of the job's
printed summary (everything ``run_inference`` does, start-up included) and the fixed start-up
cost that separates the two (model actor process start, first batch), with the archive size from
which the whole-run ratio reaches the goal too.

Denominator: exactly what the job's ``Predictor`` actor does per batch (normalise, channels-last,
forward under ``inference_mode``, sigmoid, copy back) with the same model, batch size and torch
threads (the actor uses ``int(cpus_per_worker)`` threads), on the same images already decoded
and resized in memory, in this process. It runs before *and* after the job and the mean is used,
so a change in machine load during the run affects both sides alike.

Goal: ratio >= 0.90 — the pipeline keeps the model busy (decoding, post-processing and writing
run on the other CPU, overlapped with the forward passes).

Run (2-4 minutes on 2 shared CPUs)::

    .venv/bin/python -m bench.infer_efficiency                  # 240 phantoms 256x256, default unet @128
    .venv/bin/python -m bench.infer_efficiency --s3             # input and output on SeaweedFS
    .venv/bin/python -m bench.infer_efficiency --gpu --n 4000 --batch-size 64 --input-size 256

Writes bench/results/infer_efficiency.json; the last line printed is the ratio.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    decoded_inputs,
    input_job_args,
    machine_info,
    make_artifact,
    model_only_throughput,
    output_timing,
    ratio_line,
    run_job,
    say,
    seaweedfs,
    set_threads,
    upload_tree,
    write_input,
    write_result,
)

GOAL = 0.90


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=240, help="images in the archive (default 240)")
    p.add_argument("--size", type=int, default=256, help="side of the stored images (default 256)")
    p.add_argument("--input-size", type=int, default=128, help="model input side (default 128)")
    p.add_argument("--input-kind", choices=("folder", "parquet", "tar"), default="folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="model actors (default 1)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the job's local Ray (default: all)")
    p.add_argument("--model", default=None,
                   help="model artifact (name, dir or URI); default: a random-weight default unet")
    p.add_argument("--s3", action="store_true", help="input and output on a local SeaweedFS S3 server")
    p.add_argument("--gpu", action="store_true", help="model on the GPU (1 per worker, fp16 autocast)")
    p.add_argument("--workdir", default=None, help="keep inputs/outputs here (default: a temp dir, removed)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from unet.artifact import load_artifact

    work = Path(args.workdir or tempfile.mkdtemp(prefix="unet-bench-infer-eff-"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    say(f"machine: {info['cpus']} CPUs, load average {info['loadavg_start']}, torch {info['torch']}")
    try:
        size, isz = (args.size, args.size), (args.input_size, args.input_size)
        input_path = write_input(args.input_kind, work / "input", args.n, size)
        model_ref = args.model or str(make_artifact(work / "model", input_size=isz))
        loaded = load_artifact(model_ref)
        cfg = loaded.config
        isz = tuple(cfg["input_size"])
        mean, std = cfg["normalization"]["mean"], cfg["normalization"]["std"]
        x = decoded_inputs(args.input_kind, input_path, isz)
        device = "cuda" if args.gpu else "cpu"
        threads = max(1, int(args.cpus_per_worker))  # what Predictor sets on CPU
        set_threads(threads)
        say(f"archive: {args.n} {args.input_kind} images {args.size}x{args.size}; model {loaded.model_id} "
            f"input {isz[0]}x{isz[1]}; batch {args.batch_size}; {threads} torch thread(s) on {device}")

        before = model_only_throughput(loaded.model, x, batch_size=args.batch_size, mean=mean, std=std,
                                       device=device)
        say(f"model only (before): {before['images_per_s']:.1f} images/s")

        job = ["-m", "jobs.infer", "--model", model_ref, "--batch-size", str(args.batch_size),
               "--workers", str(args.workers), "--cpus-per-worker", str(args.cpus_per_worker),
               *input_job_args(args.input_kind)]
        if args.num_cpus:
            job += ["--num-cpus", str(args.num_cpus)]
        if args.gpu:
            job += ["--gpus-per-worker", "1"]
        if args.s3:
            with seaweedfs() as server:
                in_uri = upload_tree(server, input_path, "bench", "input")
                out_uri = "s3://bench/masks"
                run = run_job(job + ["--input", in_uri, "--output", out_uri], log_dir=work / "log")
                timing = output_timing(out_uri)
        else:
            in_uri, out_uri = str(input_path), str(work / "masks")
            run = run_job(job + ["--input", in_uri, "--output", out_uri], log_dir=work / "log")
            timing = output_timing(out_uri)
        summary = run.last_json()
        if summary["rows_ok"] != args.n or timing["ok"] != args.n:
            raise RuntimeError(f"the job wrote {timing['ok']} ok rows for {args.n} images: {summary}")
        steady_ips = timing["steady_images_per_s"]
        wall_ips = args.n / summary["wall_s"]
        say(f"infer job: {steady_ips:.1f} images/s steady state ({timing['rows_after_first_batch']} images "
            f"after the first batch in {timing['first_to_last_s']:.1f}s)")
        say(f"           {wall_ips:.1f} images/s over run_inference's whole wall time ({summary['wall_s']:.1f}s, "
            f"start-up included); process wall incl. Python + ray.init {run.wall_s:.1f}s")

        after = model_only_throughput(loaded.model, x, batch_size=args.batch_size, mean=mean, std=std,
                                      device=device)
        say(f"model only (after):  {after['images_per_s']:.1f} images/s")
        baseline = (before["images_per_s"] + after["images_per_s"]) / 2
        ratio = steady_ips / baseline
        # Fixed cost of a run: wall time beyond what the steady rate needs for n images.
        startup_s = summary["wall_s"] - args.n / steady_ips
        result = {
            "benchmark": "infer_efficiency", "goal": f">= {GOAL}", "ratio": round(ratio, 3),
            "met": ratio >= GOAL, "config": vars(args), "threads": threads, "model_id": loaded.model_id,
            "input_uri": in_uri, "output_uri": out_uri,
            "job": {"steady_images_per_s": steady_ips, "timing": timing,
                    "wall_images_per_s": wall_ips, "summary": summary,
                    "process_wall_s": round(run.wall_s, 2), "startup_s": round(startup_s, 2)},
            "model_only": {"before": before, "after": after, "mean_images_per_s": baseline},
            "ratio_wall": round(wall_ips / baseline, 3),
            "images_for_wall_ratio_0.9": (int(0.9 * startup_s * steady_ips / (ratio - 0.9)) + 1
                                          if ratio > 0.9 else None),
            "machine": info,
            "command": " ".join(["python -m bench.infer_efficiency", *(argv if argv is not None else sys.argv[1:])]),
        }
        path = write_result("infer_efficiency", result)
        say(f"model only (mean): {baseline:.1f} images/s")
        say(f"over run_inference's whole wall time the ratio is {result['ratio_wall']:.2f}: a fixed "
            f"{startup_s:.1f}s start-up (model actor start, first batch)"
            + (f"; it reaches 0.90 from about {result['images_for_wall_ratio_0.9']} images"
               if result["images_for_wall_ratio_0.9"] else ""))
        say(f"results: {path}")
        say(ratio_line("infer_job_steady/model_only", ratio, GOAL))
        return result
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
