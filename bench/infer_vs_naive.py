"""Inference job vs the loop a competent user would write, over the same archive of real-size images.

**The baseline** (``--baseline competent``, default) is one process doing what the job does with the
same library steps and model tricks: read each file, decode (:func:`unet.inference.decode_image`),
resize and normalise, the model with BatchNorm folded, ``channels_last`` and ``inference_mode``
(TTA, threshold and post-processing as the artifact says) on all the job's CPUs as intra-op
threads, batches of ``--batch-size``; per image the probability resized back, the final mask, its
statistics and a cv2 PNG; one ``pyarrow.parquet.write_table`` at the end. ``--baseline naive`` is
the first baseline (PIL PNG encode, NCHW, BatchNorm not folded, threshold only), kept to compare
with earlier results.

**The archive** has BUSI's size distribution by default (``--sizes busi``: phantoms at BUSI's size
quantiles, 400x470 to 719x1048, RGB PNGs); ``--sizes square`` uses ``--size`` x ``--size``. The
model is the shipped ``busi-unet`` unless ``--model`` names another (``--model random``: a
random-weight default unet).

**Both run as their own processes**, timed from start to exit (interpreter, imports, model load,
and for the job ``ray.init``, planning, Ray Data's start-up and shut-down): that is the **whole
run** a user waits for, and its ratio (loop seconds / job seconds; the job's speed relative to the
loop) is the headline. Also reported: the **steady** ratio (the job's pipeline rate once its model
actor runs, from Ray Data's log, over the loop's own rate without its start-up), the fixed start-up
cost of each, and from them the archive size from which the job's start-up is amortised (whole-run
ratio 0.9, and 1.0). Runs are interleaved (loop, job, loop, ..., loop; ``--rounds`` jobs); each job
is compared with the mean of the loops either side of it, and the median over rounds is reported.

The job also runs with ``--backend onnxruntime`` in every round (``--no-onnxruntime`` skips it).

``--ray running`` starts one Ray (``ray start --head``) for all rounds and the jobs join it with
``--address``, as on a cluster or a machine that keeps Ray up: ``ray.init`` and the shut-down of a
private Ray (about 5 s on 2 CPUs) then leave the whole run.

Goal: whole-run ratio >= 0.9 on 2 CPUs over ~1,000 real-size images (the job's defaults: one
model actor of 1 CPU; the loop on 2 threads).

Run (5-8 minutes on 2 CPUs)::

    .venv/bin/python -m bench.infer_vs_naive                       # 1000 BUSI-size images, job defaults
    .venv/bin/python -m bench.infer_vs_naive --baseline naive --sizes square --size 256 --model random
    .venv/bin/python -m bench.infer_vs_naive --gpu --n 4000 --batch-size 64 --sizes square --size 256

Writes bench/results/infer_vs_naive.json; the last line printed is the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
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
    run_job,
    running_ray,
    say,
    set_threads,
    work_dir,
)

GOAL = 0.9


def competent_loop(kind: str, input_path: Path, out_file: Path, loaded, *, batch_size: int,
                   device: str = "cpu") -> dict:
    """The competent loop (see the module docstring); returns images, seconds, images/s and the
    milliseconds per image of each step."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from unet.codec import encode_mask_png
    from unet.inference import decode_image
    from unet.inference.model import mask_statistics, postprocess_probability
    from unet.models import fuse_conv_bn
    from unet.postprocess import image_probabilities
    from unet.transforms import normalize, quantize_probability, resize_image

    s = loaded.settings
    rule = dict(threshold=s.threshold, gate_threshold=s.gate_threshold, min_area=s.min_area,
                largest_component=s.largest_component)
    model = fuse_conv_bn(loaded.model).to(device).eval().to(memory_format=torch.channels_last)
    amp = torch.autocast("cuda", dtype=torch.float16) if device == "cuda" else contextlib.nullcontext()
    rows: dict[str, list] = {k: [] for k in ("image_id", "status", "height", "width", "mask_png", "tumour_pixels",
                                             "tumour_fraction", "bbox", "confidence", "lesion_probability",
                                             "model_id", "processed_at")}
    parts = dict.fromkeys(("read_decode_s", "forward_s", "postprocess_encode_s"), 0.0)

    def flush(ids, images):
        t0 = time.perf_counter()
        x = normalize(np.stack([resize_image(img, s.input_size) for img in images]), s.mean, s.std)[:, None]
        x = torch.from_numpy(x).to(device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), amp:
            prob, class_prob = model.predict_proba(x, tta=s.tta)
        prob = quantize_probability(prob[:, 0].float().cpu().numpy())  # the library's steps, as the job
        lesion, _ = image_probabilities(None if class_prob is None else class_prob.float().cpu().numpy())
        t1 = time.perf_counter()
        now = dt.datetime.now(dt.UTC)
        for i, (image_id, img) in enumerate(zip(ids, images)):
            p_lesion = None if lesion is None else float(lesion[i])
            mask, full = postprocess_probability(prob[i], img.shape, lesion_probability=p_lesion, **rule)
            row = {"image_id": image_id, "status": "ok", "height": img.shape[0], "width": img.shape[1],
                   "mask_png": encode_mask_png(mask), **mask_statistics(mask, full),
                   "lesion_probability": p_lesion, "model_id": loaded.model_id, "processed_at": now}
            for k, v in row.items():
                rows[k].append(v)
        parts["forward_s"] += t1 - t0
        parts["postprocess_encode_s"] += time.perf_counter() - t1

    t_start = time.perf_counter()
    ids, images = [], []
    t = time.perf_counter()
    for image_id, data in iter_input_images(kind, input_path):
        ids.append(image_id)
        images.append(decode_image(data))
        parts["read_decode_s"] += time.perf_counter() - t
        if len(ids) == batch_size:
            flush(ids, images)
            ids, images = [], []
        t = time.perf_counter()
    if ids:
        flush(ids, images)
    t = time.perf_counter()
    pq.write_table(pa.table(rows), out_file)
    parts["write_s"] = time.perf_counter() - t
    seconds = time.perf_counter() - t_start
    n = len(rows["image_id"])
    return {"images": n, "seconds": round(seconds, 3), "images_per_s": n / seconds,
            "ms_per_image": {k.removesuffix("_s"): round(1000 * v / n, 2) for k, v in parts.items()}}


def _run_loop(spec: dict) -> dict:
    """One loop in this process (``--loop``): load the model, run, report."""
    from unet.artifact import load_artifact

    set_threads(spec["threads"])
    loaded = load_artifact(spec["model"])
    return LOOPS[spec["baseline"]](spec["kind"], Path(spec["input"]), Path(spec["out"]), loaded,
                                   batch_size=spec["batch_size"], device=spec["device"])


def loop_process(spec: dict, log_dir: Path) -> dict:
    """The loop as its own process, timed from start to exit like the job."""
    run = run_job(["-m", "bench.infer_vs_naive", "--loop", json.dumps(spec)], log_dir=log_dir)
    return {**run.last_json(), "process_wall_s": round(run.wall_s, 2), "loadavg_1m_at_end": run.loadavg_1m}


def naive_loop(kind: str, input_path: Path, out_file: Path, loaded, *, batch_size: int, device: str = "cpu") -> dict:
    """The first baseline (see the module docstring); returns images, seconds, images/s."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image, ImageOps

    from unet.transforms import preprocess, resize_probability

    s = loaded.settings
    input_size, mean, std, threshold, model_id = s.input_size, s.mean, s.std, s.threshold, loaded.model_id
    model = loaded.model.to(device).eval()
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


LOOPS = {"competent": competent_loop, "naive": naive_loop}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_infer_args(p, n=1000, size=256, input_size=128,
                   workers=None, workers_help="model actors of the job (default 1, the job's default)",
                   cpus_per_worker=None, cpus_help="CPUs per actor (default 1, the job's default)")
    p.add_argument("--sizes", choices=("busi", "square"), default="busi",
                   help="image sizes: BUSI's distribution (default) or --size x --size")
    p.add_argument("--baseline", choices=sorted(LOOPS), default="competent",
                   help="the loop the job is compared with (default competent; naive: the first baseline)")
    p.add_argument("--rounds", type=int, default=3,
                   help="job runs, each between two loop runs; the ratio is the median (default 3)")
    p.add_argument("--loop-threads", type=int, default=None,
                   help="torch threads of the loop (default: the job's CPUs, --num-cpus or all)")
    p.add_argument("--model", default="busi-unet",
                   help="model artifact (default busi-unet; 'random': a random-weight default unet)")
    p.add_argument("--gpu", action="store_true", help="GPU for both (job: 1 GPU per worker)")
    p.add_argument("--ray", choices=("fresh", "running"), default="fresh",
                   help="fresh: every job starts and stops its own local Ray (a one-off run; default); "
                        "running: one `ray start --head` for all rounds, each job joins it with --address "
                        "(a machine that runs jobs keeps Ray up, as a cluster does)")
    p.add_argument("--onnxruntime", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the job with --backend onnxruntime in every round (default: yes)")
    p.add_argument("--loop", default=None, help=argparse.SUPPRESS)  # internal: run one loop (JSON spec)
    return p


def amortised_from(job_fixed_s: float, job_rate: float, loop_fixed_s: float, loop_rate: float,
                   ratio: float) -> float | None:
    """Images from which the job's whole run reaches ``ratio`` x the loop's speed, with each run
    taking fixed + n / rate seconds; None if it never does (its steady rate is too low)."""
    per_image = 1 / loop_rate - ratio / job_rate
    if per_image <= 0:
        return None
    return max(0.0, (ratio * job_fixed_s - loop_fixed_s) / per_image)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.loop is not None:
        print(json.dumps(_run_loop(json.loads(args.loop))))
        return {}
    args.workers = args.workers or 1
    args.cpus_per_worker = args.cpus_per_worker or 1.0
    from unet.artifact import load_artifact

    with work_dir(args.workdir, "unet-bench-naive-") as work, contextlib.ExitStack() as stack:
        info = announce_machine()
        address, ray_pid = stack.enter_context(running_ray(args.num_cpus)) if args.ray == "running" else (None, None)
        size = "busi" if args.sizes == "busi" else (args.size, args.size)
        input_path = write_input(args.input_kind, work / "input", args.n, size)
        model_ref = str(make_artifact(work / "model", input_size=(args.input_size,) * 2)) \
            if args.model == "random" else args.model
        loaded = load_artifact(model_ref)
        device = "cuda" if args.gpu else "cpu"
        threads = args.loop_threads or args.num_cpus or os.cpu_count()
        say(f"archive: {args.n} {args.input_kind} images, "
            f"{'BUSI sizes' if args.sizes == 'busi' else f'{args.size}x{args.size}'}; model {loaded.model_id} "
            f"input {loaded.settings.input_size}; batch {args.batch_size}; job: {args.workers} actor(s) x "
            f"{args.cpus_per_worker:g} CPU, {'joining a running' if address else 'its own'} Ray; {args.baseline} loop: "
            f"1 process x {threads} thread(s); {device}")

        def loop(tag):
            spec = {"baseline": args.baseline, "kind": args.input_kind, "input": str(input_path),
                    "out": str(work / f"loop-{tag}.parquet"), "model": model_ref, "threads": threads,
                    "batch_size": args.batch_size, "device": device}
            r = loop_process(spec, work / f"log-loop-{tag}")
            if r["images"] != args.n:
                raise RuntimeError(f"the loop saw {r['images']} images, expected {args.n}")
            say(f"{args.baseline} loop (round {tag}): whole run {r['process_wall_s']:.1f}s, "
                f"{r['images_per_s']:.1f} images/s without start-up (load {r['loadavg_1m_at_end']}); ms per image: "
                + ", ".join(f"{k} {v}" for k, v in r["ms_per_image"].items()))
            return r

        job = infer_job_args(args, model_ref) + (["--address", address] if address else [])

        def job_run(i: int, backend: str) -> dict:
            jobm = measure_infer_job([*job, "--backend", backend], input_uri=str(input_path), n=args.n,
                                     output=str(work / f"masks-{backend}-{i}"), workers=args.workers,
                                     log_dir=work / f"log-{backend}-{i}", ray_pid=ray_pid)
            if "pipeline_images_per_s" not in jobm:
                raise RuntimeError(f"no Ray Data timeline of the job found ({jobm.get('ray_data')})")
            say(f"infer job, {backend} (round {i}): whole run {jobm['process_wall_s']:.1f}s (pipeline start to "
                f"the model's first batch {jobm['startup_s']:.1f}s), then {jobm['pipeline_images_per_s']:.1f} "
                f"images/s (model inside the actors: {jobm['actor_model_images_per_s']:.1f} images/s)")
            return jobm

        loops, jobs, ratios, steady = [loop(0)], [], [], []
        ort_jobs, ort_ratios, ort_vs_torch = [], [], []
        for i in range(1, args.rounds + 1):
            jobm = job_run(i, "torch")
            ortm = job_run(i, "onnxruntime") if args.onnxruntime else None
            loops.append(loop(i))
            around_wall = (loops[-2]["process_wall_s"] + loops[-1]["process_wall_s"]) / 2
            around_rate = (loops[-2]["images_per_s"] + loops[-1]["images_per_s"]) / 2
            jobs.append(jobm)
            ratios.append(around_wall / jobm["process_wall_s"])
            steady.append(jobm["pipeline_images_per_s"] / around_rate)
            if ortm is not None:
                ort_jobs.append(ortm)
                ort_ratios.append(around_wall / ortm["process_wall_s"])
                ort_vs_torch.append(jobm["process_wall_s"] / ortm["process_wall_s"])
        ratio = median(ratios)
        loop_rate = median([r["images_per_s"] for r in loops])
        loop_fixed = median([r["process_wall_s"] - r["seconds"] for r in loops])
        job_rate = median([j["pipeline_images_per_s"] for j in jobs])
        job_fixed = median([j["process_wall_s"] - args.n / j["pipeline_images_per_s"] for j in jobs])
        amortised = {f"{r:g}": amortised_from(job_fixed, job_rate, loop_fixed, loop_rate, r) for r in (0.9, 1.0)}
        result = {
            "benchmark": "infer_vs_naive", "baseline": args.baseline, "ray": args.ray, "goal": f">= {GOAL} (whole run)",
            "ratio": round(ratio, 3), "met": ratio >= GOAL, "round_ratios": [round(r, 3) for r in ratios],
            "steady_ratio": round(median(steady), 3), "round_steady_ratios": [round(r, 3) for r in steady],
            "fixed_s": {"job": round(job_fixed, 1), "loop": round(loop_fixed, 1)},
            "amortised_from_images": {k: None if v is None else round(v) for k, v in amortised.items()},
            "config": vars(args), "loop_threads": threads, "model_id": loaded.model_id,
            "jobs": jobs, "loops": {"runs": loops, "median_images_per_s": loop_rate},
            "onnxruntime": {"jobs": ort_jobs, "ratio_vs_loop": round(median(ort_ratios), 3),
                            "ratio_vs_torch_job": round(median(ort_vs_torch), 3)} if ort_jobs else None,
            "machine": info,
        }
        notes = [f"per round (mean whole run of the loops around it / the job's): {', '.join(f'{r:.2f}' for r in ratios)}",
                 f"steady (job pipeline rate / loop rate): {result['steady_ratio']:.2f}; loop {loop_rate:.1f} "
                 f"images/s, job {job_rate:.1f} images/s",
                 f"fixed start-up: job {job_fixed:.1f}s, loop {loop_fixed:.1f}s; the job's whole run reaches 0.9x "
                 f"the loop from {_images(amortised['0.9'])} and 1.0x from {_images(amortised['1'])}"]
        if ort_jobs:
            notes.append(f"--backend onnxruntime: loop/job whole run {result['onnxruntime']['ratio_vs_loop']:.2f}, "
                         f"torch job/onnxruntime job {result['onnxruntime']['ratio_vs_torch_job']:.2f}")
        name = "infer_vs_naive" if args.ray == "fresh" else "infer_vs_naive_running_ray"
        return finish(name, result, argv, f"{args.baseline}_loop_whole_run/infer_job_whole_run", ratio, GOAL,
                      notes=notes)


def _images(n: float | None) -> str:
    return "never (its steady rate is too low)" if n is None else f"{n:.0f} images"


if __name__ == "__main__":
    main()
