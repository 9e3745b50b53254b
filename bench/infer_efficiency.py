"""Inference pipeline efficiency: the infer job end to end ÷ the model alone on in-memory tensors.

Numerator: ``python -m jobs.infer`` over an archive of phantom images (a folder of PNGs by
default; ``--input-kind parquet|tar``; ``--s3`` puts input and output on a local SeaweedFS S3
server, i.e. object store -> Parquet), run as its own process with a fresh local Ray. A run
costs a fixed start-up — Ray starting the model actor's process, which imports torch and
unpickles the model: tens of seconds on a loaded 2-CPU machine, the same for any archive size —
plus the per-image work. The job's rate is therefore taken from the moment the model actor gets
its first batch to the end of the pipeline (all rows post-processed and delivered to the driver,
which writes the Parquet parts): the rate of the whole pipeline once it runs. The timeline comes
from Ray Data's own log of the job (``bench.harness.ray_data_timeline``). Also reported: the rate
over the whole run (n / ``wall_s`` of the job's summary, start-up included) and the archive size
from which that one reaches the goal too.

Denominator: the model alone on tensors already in memory, same model, batch size and torch
threads (the actor uses ``int(cpus_per_worker)`` threads): what ``Predictor`` does per batch
(normalise, channels-last, forward under ``inference_mode``, sigmoid) on the same images decoded
in advance, in this process, before and after the job (``model_only_throughput`` below);
the mean of the two is used. This is the ratio printed last.

Diagnostic, robust to the machine's load: the model actor's own time inside ``Predictor``, from
the same log, gives the model's rate *inside* the job at the same moment, and
pipeline rate / that rate = the fraction of the pipeline's time the model was computing
("model busy"). On a quiet machine the two ratios differ by how much the pipeline's other work
(decoding, post-processing, Ray's scheduling in the driver) slows the model down by sharing its
CPUs; on a loaded machine only "model busy" is meaningful.

Also reported, per image: the bytes each pipeline step hands to the next (from Ray Data's metrics)
and the model actor's time outside the model itself (its time in ``Predictor`` minus the model-only
time): on a GPU node these are what the GPU waits for, and here a regression shows before it
costs anything.

Goal: ratio >= 0.90 — the pipeline keeps the model busy (decoding, post-processing and writing
run on the other CPU, overlapped with the forward passes).

Run (3-5 minutes on 2 shared CPUs)::

    .venv/bin/python -m bench.infer_efficiency                  # 480 phantoms 256x256, default unet @128
    .venv/bin/python -m bench.infer_efficiency --s3             # input and output on SeaweedFS
    .venv/bin/python -m bench.infer_efficiency --gpu --n 4000 --batch-size 64 --input-size 256

Writes bench/results/infer_efficiency.json (infer_efficiency_s3.json with --s3); the last line printed is the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.archives import decoded_inputs, make_artifact, seaweedfs, upload_tree, write_input
from bench.harness import (
    add_infer_args,
    announce_machine,
    finish,
    infer_job_args,
    measure_infer_job,
    say,
    set_threads,
    work_dir,
)

GOAL = 0.90


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_infer_args(p, n=480, size=256, input_size=128)
    p.add_argument("--model", default=None,
                   help="model artifact (name, dir or URI); default: a random-weight default unet")
    p.add_argument("--s3", action="store_true", help="input and output on a local SeaweedFS S3 server")
    p.add_argument("--gpu", action="store_true", help="model on the GPU (1 per worker, fp16 autocast)")
    return p


def model_only_throughput(model, x: np.ndarray, *, batch_size: int, mean: float, std: float,
                          device: str = "cpu", warmup_batches: int = 1) -> dict:
    """Images/s of exactly what ``unet.inference.Predictor`` does per batch on the model device —
    BatchNorm folded into the convs, normalised channels-last input, forward under inference mode
    (fp16 autocast on CUDA), sigmoid, copy back — with the uint8 batch already in memory: no
    decoding, no Ray, no I/O."""
    import torch

    from unet.models import fuse_conv_bn
    from unet.transforms import normalize

    model = fuse_conv_bn(model).to(device).to(memory_format=torch.channels_last)
    amp = torch.autocast("cuda", dtype=torch.float16) if device == "cuda" else contextlib.nullcontext()
    batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]

    def run(batch):
        inputs = torch.from_numpy(normalize(batch, mean, std)[:, None]).to(device)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), amp:
            p, _ = model.predict_proba(inputs)  # what the job's model actors call
        return p[:, 0].cpu().numpy()

    for b in batches[:warmup_batches]:
        run(b)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches:
        run(b)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"images": len(x), "seconds": round(seconds, 3), "images_per_s": len(x) / seconds,
            "loadavg_1m": round(os.getloadavg()[0], 1)}


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from unet.artifact import load_artifact

    with work_dir(args.workdir, "unet-bench-infer-eff-") as work:
        info = announce_machine()
        size, isz = (args.size, args.size), (args.input_size, args.input_size)
        input_path = write_input(args.input_kind, work / "input", args.n, size)
        model_ref = args.model or str(make_artifact(work / "model", input_size=isz))
        loaded = load_artifact(model_ref)
        isz, mean, std = loaded.settings.input_size, loaded.settings.mean, loaded.settings.std
        x = decoded_inputs(args.input_kind, input_path, isz)
        device = "cuda" if args.gpu else "cpu"
        threads = max(1, int(args.cpus_per_worker))  # what Predictor sets on CPU
        set_threads(threads)
        say(f"archive: {args.n} {args.input_kind} images {args.size}x{args.size}; model {loaded.model_id} "
            f"input {isz[0]}x{isz[1]}; batch {args.batch_size}; {threads} torch thread(s) on {device}")

        before = model_only_throughput(loaded.model, x, batch_size=args.batch_size, mean=mean, std=std,
                                       device=device)
        say(f"model only (before): {before['images_per_s']:.1f} images/s")

        job = infer_job_args(args, model_ref)
        with seaweedfs() if args.s3 else contextlib.nullcontext() as server:
            if server is not None:
                in_uri, out_uri = upload_tree(server, input_path, "bench", "input"), "s3://bench/masks"
            else:
                in_uri, out_uri = str(input_path), str(work / "masks")
            jobm = measure_infer_job(job, input_uri=in_uri, n=args.n, output=out_uri, workers=args.workers,
                                     log_dir=work / "log")
        after = model_only_throughput(loaded.model, x, batch_size=args.batch_size, mean=mean, std=std,
                                      device=device)
        say(f"model only (after):  {after['images_per_s']:.1f} images/s")
        baseline = (before["images_per_s"] + after["images_per_s"]) / 2
        say(f"model only (mean):   {baseline:.1f} images/s")
        wall_ips = jobm["wall_images_per_s"]
        if "model_busy" not in jobm:
            raise RuntimeError(f"no Ray Data timeline of the job found ({jobm.get('ray_data')}); cannot "
                               f"separate start-up from steady state")
        pipe_ips, actor_ips, startup_s = (jobm["pipeline_images_per_s"], jobm["actor_model_images_per_s"],
                                          jobm["startup_s"])
        say(f"infer job: {args.n} images; start-up {startup_s:.1f}s, then {jobm['pipeline_s']:.1f}s "
            f"= {pipe_ips:.1f} images/s; whole run {jobm['wall_s']:.1f}s = {wall_ips:.1f} images/s")
        say(f"model inside the job's actor: {actor_ips:.1f} images/s ({jobm['actor_model_s']:.1f}s in Predictor)")
        ops = jobm["ray_data"]["operators"]
        for op in ops:  # read_and_decode_plan, Predictor, postprocess fused with write_fragments
            if ops.get(op, {}).get("function_body_time_s") and op.startswith("MapBatches("):
                say(f"  {op}: {1000 * ops[op]['function_body_time_s'] / args.n:.1f} ms per image inside the "
                    f"function" + (f", first task at +{ops[op]['first_task_t']}s" if ops[op]["first_task_t"] is not None else ""))
        # Per image, CPU-measurable signs of what a GPU would wait for: the bytes each step hands to
        # the next, and the actor's time beyond the model's own (moving batches in and out).
        outside_ms = 1000 / actor_ips - 1000 / baseline
        say("bytes per image handed on: " + ", ".join(f"{k} {v:,}" for k, v in jobm["bytes_per_image"].items())
            + f"; the actor's time outside the model: {outside_ms:.2f} ms per image")
        busy = jobm["model_busy"]
        ratio = pipe_ips / baseline
        ratio_wall = wall_ips / baseline
        result = {
            "benchmark": "infer_efficiency", "goal": f">= {GOAL}", "ratio": round(ratio, 3),
            "met": ratio >= GOAL, "config": vars(args), "threads": threads, "model_id": loaded.model_id,
            "input_uri": in_uri, "output_uri": out_uri, "job": jobm,
            "model_only_in_process": {"before": before, "after": after, "mean_images_per_s": baseline},
            "model_busy": round(busy, 3), "bytes_per_image": jobm["bytes_per_image"],
            "actor_outside_model_ms_per_image": round(outside_ms, 3),
            "ratio_wall": round(ratio_wall, 3),
            "images_for_wall_ratio_goal": (int(GOAL * startup_s * pipe_ips / (ratio - GOAL)) + 1
                                           if ratio > GOAL else None),
            "machine": info,
        }
        notes = [f"model busy in the job (pipeline / model rate inside the actor): {busy:.2f}",
                 f"whole run incl. {startup_s:.0f}s start-up / model only: {ratio_wall:.2f}"
                 + (f"; it reaches {GOAL:.2f} from about {result['images_for_wall_ratio_goal']} images"
                    if result["images_for_wall_ratio_goal"] else "")]
        return finish("infer_efficiency_s3" if args.s3 else "infer_efficiency", result, argv,
                      "infer_job/model_only", ratio, GOAL, notes=notes)


if __name__ == "__main__":
    main()
