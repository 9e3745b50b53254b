"""Inference job vs a naive loop: ``jobs.infer`` ÷ a plain single-process script over the same archive.

The naive script is what one would write first (and what the job has to beat to be worth its
machinery): for each batch of ``--batch-size`` files, read the bytes, decode with PIL (EXIF
orientation, to 8-bit grey), resize and normalise (:mod:`unet.transforms`), one torch forward
under ``inference_mode`` using all CPUs as intra-op threads, sigmoid, and per image resize the
probability back, threshold, PNG-encode with PIL, compute the same statistics; rows collected
and written with ``pyarrow.parquet.write_table`` at the end. Same model, batch size and total
torch threads as the job (the job: ``--workers`` actors x ``int(cpus_per_worker)`` threads; the
naive loop: that many threads in one process).

The job runs as its own process with a fresh local Ray (``python -m jobs.infer``). Its rate is
taken from the model actor's first batch to the end of the pipeline, from Ray Data's log of the
job (``bench.harness.measure_infer_job``): the fixed start-up of a run (Ray starting the actor's
process, importing torch; tens of seconds on a loaded 2-CPU machine) is left out because it does
not grow with the archive. The rate over the whole run (start-up included) is reported too. Runs
are interleaved (naive, job, naive, job, ..., naive; ``--rounds`` jobs): each job is divided by the
mean of the naive runs either side of it, and the median of these per-round ratios is the ratio.

The job also runs with ``--backend onnxruntime`` in every round, right after the torch job
(same archive, workers and threads; ``--no-onnxruntime`` skips it): its rate over the naive
loop, over the torch job of the same round, and the ratio of the two model actors' own rates
(``actor_model_images_per_s``: the network alone, torch vs ONNX Runtime, inside the job).

Goal: ratio >= 1.3 on 2 CPUs — pipelining decode/encode with the model and running model
replicas side by side has to pay for Ray.

Run (3-5 minutes on 2 shared CPUs)::

    .venv/bin/python -m bench.infer_vs_naive                              # 2 actors x 1 thread vs 2 threads
    .venv/bin/python -m bench.infer_vs_naive --workers 1 --cpus-per-worker 1   # the job's defaults
    .venv/bin/python -m bench.infer_vs_naive --gpu --n 4000 --batch-size 64 --input-size 256

Writes bench/results/infer_vs_naive.json; the last line printed is the ratio.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.archives import iter_input_images, make_artifact, write_input
from bench.harness import (
    add_infer_args,
    announce_machine,
    finish,
    infer_job_args,
    measure_infer_job,
    median,
    say,
    set_threads,
    work_dir,
)

GOAL = 1.3


def naive_loop(kind: str, input_path: Path, out_file: Path, model, *, input_size, mean: float, std: float,
               threshold: float, batch_size: int, model_id: str, device: str = "cpu") -> dict:
    """The plain script (see the module docstring); returns images, seconds, images/s."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image, ImageOps

    from unet.transforms import preprocess, resize_probability

    model = model.to(device).eval()
    rows: dict[str, list] = {k: [] for k in ("image_id", "status", "height", "width", "mask_png", "tumour_pixels",
                                             "tumour_fraction", "bbox", "confidence", "model_id",
                                             "processed_at")}

    parts = {"read_decode_s": 0.0, "preprocess_s": 0.0, "forward_s": 0.0, "postprocess_encode_s": 0.0}

    def flush(ids, images):
        t = time.perf_counter()
        x = torch.from_numpy(np.stack([preprocess(img, input_size, mean, std) for img in images])).to(device)
        t1 = time.perf_counter()
        with torch.inference_mode():
            prob = torch.sigmoid(model(x).float())[:, 0].cpu().numpy()
        t2 = time.perf_counter()
        parts["preprocess_s"] += t1 - t
        parts["forward_s"] += t2 - t1
        now = dt.datetime.now(dt.UTC)
        for image_id, img, p in zip(ids, images, prob):
            h, w = img.shape
            full = resize_probability(p, (h, w))
            mask = full >= threshold
            buf = io.BytesIO()
            Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
            pixels = int(mask.sum())
            if pixels:
                ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
                bbox, conf = [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1], float(full[mask].mean())
            else:
                bbox, conf = None, float(full.max())
            for k, v in (("image_id", image_id), ("status", "ok"), ("height", h), ("width", w),
                         ("mask_png", buf.getvalue()), ("tumour_pixels", pixels),
                         ("tumour_fraction", pixels / mask.size), ("bbox", bbox), ("confidence", conf),
                         ("model_id", model_id), ("processed_at", now)):
                rows[k].append(v)
        parts["postprocess_encode_s"] += time.perf_counter() - t2

    t0 = time.perf_counter()
    ids, images = [], []
    t_read = time.perf_counter()
    for image_id, data in iter_input_images(kind, input_path):
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("L")
        ids.append(image_id)
        images.append(np.asarray(img))
        parts["read_decode_s"] += time.perf_counter() - t_read
        if len(ids) == batch_size:
            flush(ids, images)
            ids, images = [], []
        t_read = time.perf_counter()
    if ids:
        flush(ids, images)
    t_write = time.perf_counter()
    pq.write_table(pa.table(rows), out_file, compression="zstd")
    parts["write_s"] = time.perf_counter() - t_write
    seconds = time.perf_counter() - t0
    n = len(rows["image_id"])
    return {"images": n, "seconds": round(seconds, 3), "images_per_s": n / seconds,
            "loadavg_1m": round(os.getloadavg()[0], 1), "ms_per_image": {k.removesuffix("_s"): round(1000 * v / n, 2) for k, v in parts.items()}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_infer_args(p, n=960, size=256, input_size=128,
                   workers=None, workers_help="model actors of the job (default 2; 1 with --gpu: one GPU)",
                   cpus_per_worker=None,
                   cpus_help="CPUs per actor (default 0.5: 2 actors + reading fit on 2 CPUs, 1 torch thread each; "
                             "1 with --gpu)")
    p.add_argument("--rounds", type=int, default=3,
                   help="job runs, each between two naive runs; the ratio is the median (default 3)")
    p.add_argument("--naive-threads", type=int, default=None,
                   help="torch threads of the naive loop (default: workers x int(cpus_per_worker), "
                        "i.e. the job's total model threads)")
    p.add_argument("--model", default=None, help="model artifact; default: a random-weight default unet")
    p.add_argument("--gpu", action="store_true", help="GPU for both (job: 1 GPU per worker)")
    p.add_argument("--onnxruntime", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the job with --backend onnxruntime in every round (default: yes)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.workers is None:
        args.workers = 1 if args.gpu else 2
    if args.cpus_per_worker is None:
        args.cpus_per_worker = 1.0 if args.gpu else 0.5
    from unet.artifact import load_artifact

    with work_dir(args.workdir, "unet-bench-naive-") as work:
        info = announce_machine()
        input_path = write_input(args.input_kind, work / "input", args.n, (args.size, args.size))
        model_ref = args.model or str(make_artifact(work / "model", input_size=(args.input_size,) * 2))
        loaded = load_artifact(model_ref)
        settings = loaded.settings
        isz, mean, std, threshold = settings.input_size, settings.mean, settings.std, settings.threshold
        device = "cuda" if args.gpu else "cpu"
        job_threads = args.workers * max(1, int(args.cpus_per_worker))
        threads = args.naive_threads or job_threads
        set_threads(threads)
        say(f"archive: {args.n} {args.input_kind} images {args.size}x{args.size}; model {loaded.model_id} "
            f"input {isz[0]}x{isz[1]}; batch {args.batch_size}; job: {args.workers} actor(s) x "
            f"{max(1, int(args.cpus_per_worker))} thread(s); naive: 1 process x {threads} thread(s); {device}")

        def naive(tag):
            r = naive_loop(args.input_kind, input_path, work / f"naive-{tag}.parquet", loaded.model,
                           input_size=isz, mean=mean, std=std, threshold=threshold,
                           batch_size=args.batch_size, model_id=loaded.model_id, device=device)
            if r["images"] != args.n:
                raise RuntimeError(f"naive loop saw {r['images']} images, expected {args.n}")
            say(f"naive loop ({tag}): {r['images_per_s']:.1f} images/s ({r['seconds']:.1f}s, load {r['loadavg_1m']}); "
                "ms per image: "
                + ", ".join(f"{k} {v}" for k, v in r["ms_per_image"].items()))
            return r

        # Interleaved: naive, job, naive, job, ..., naive. Each job run is compared with the
        # naive runs just before and after it; the median over rounds is the ratio (on a shared
        # machine one pair alone drifts by +-30%).
        job = infer_job_args(args, model_ref)

        def run_job(i: int, backend: str) -> dict:
            jobm = measure_infer_job([*job, "--backend", backend], input_uri=str(input_path), n=args.n,
                                     output=str(work / f"masks-{backend}-{i}"), workers=args.workers,
                                     log_dir=work / f"log-{backend}-{i}")
            if "pipeline_images_per_s" not in jobm:
                raise RuntimeError(f"no Ray Data timeline of the job found ({jobm.get('ray_data')})")
            steady, wall = jobm["pipeline_images_per_s"], jobm["wall_images_per_s"]
            say(f"infer job, {backend} (round {i}): start-up {jobm['startup_s']:.1f}s, then {steady:.1f} images/s; "
                f"whole run {jobm['wall_s']:.1f}s = {wall:.1f} images/s (model inside the actors: "
                f"{jobm['actor_model_images_per_s']:.1f} images/s)")
            return jobm

        naives, jobs, ratios = [naive("round 0")], [], []
        ort_jobs, ort_ratios, ort_vs_torch, ort_actor_vs_torch = [], [], [], []
        for i in range(1, args.rounds + 1):
            jobm = run_job(i, "torch")
            ortm = run_job(i, "onnxruntime") if args.onnxruntime else None
            naives.append(naive(f"round {i}"))
            around = (naives[-2]["images_per_s"] + naives[-1]["images_per_s"]) / 2
            jobs.append(jobm)
            ratios.append(jobm["pipeline_images_per_s"] / around)
            if ortm is not None:
                ort_jobs.append(ortm)
                ort_ratios.append(ortm["pipeline_images_per_s"] / around)
                ort_vs_torch.append(ortm["pipeline_images_per_s"] / jobm["pipeline_images_per_s"])
                ort_actor_vs_torch.append(ortm["actor_model_images_per_s"] / jobm["actor_model_images_per_s"])
        ratio = median(ratios)
        baseline = median([r["images_per_s"] for r in naives])
        ratio_wall = median([j["wall_images_per_s"] for j in jobs]) / baseline
        result = {
            "benchmark": "infer_vs_naive", "goal": f">= {GOAL}", "ratio": round(ratio, 3), "met": ratio >= GOAL,
            "round_ratios": [round(r, 3) for r in ratios], "ratio_wall": round(ratio_wall, 3),
            "config": vars(args), "naive_threads": threads, "job_threads": job_threads, "model_id": loaded.model_id,
            "jobs": jobs, "naive": {"runs": naives, "median_images_per_s": baseline},
            "onnxruntime": {"jobs": ort_jobs, "ratio_vs_naive": round(median(ort_ratios), 3),
                            "ratio_vs_torch_job": round(median(ort_vs_torch), 3),
                            "actor_model_ratio_vs_torch": round(median(ort_actor_vs_torch), 3)} if ort_jobs else None,
            "machine": info,
        }
        notes = [f"per round (job / mean of the naive runs around it): {', '.join(f'{r:.2f}' for r in ratios)}",
                 f"naive loop (median): {baseline:.1f} images/s",
                 f"over run_inference's whole wall time (start-up included) the ratio is {result['ratio_wall']:.2f}"]
        if ort_jobs:
            ort = result["onnxruntime"]
            notes.append(f"--backend onnxruntime: job/naive {ort['ratio_vs_naive']:.2f}, onnxruntime job/torch job "
                         f"{ort['ratio_vs_torch_job']:.2f} (per round: {', '.join(f'{r:.2f}' for r in ort_vs_torch)}); "
                         f"model actors alone onnxruntime/torch {ort['actor_model_ratio_vs_torch']:.2f}")
        return finish("infer_vs_naive", result, argv, "infer_job_steady/naive_loop", ratio, GOAL, notes=notes)


if __name__ == "__main__":
    main()
