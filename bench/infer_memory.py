"""Inference memory scaling: peak memory of the infer job over N and over 10·N images.

Runs ``python -m jobs.infer`` twice, each as its own process with a fresh local Ray, over
archives of N and 10·N tiny phantom images (64x64 PNGs by default, a small ``unet`` at 64x64 —
memory, not compute, is the subject), and samples the memory of the job's whole process tree
every 0.25 s: the driver, Ray's GCS, raylet, dashboard/agents and every worker (all are
descendants of the job process). Two sums are recorded per sample:

* RSS summed over the processes — what the issue asks for; it counts pages shared between
  processes (libraries, the plasma object store mapped into each worker) once per process;
* PSS summed over the processes — shared pages split between their users, i.e. the real
  footprint.

Bounded memory means the job's peak does not grow with the archive: the driver streams the
listing into a plan on disk, Ray Data streams the plan through bounded operators, and the
driver holds only the output parts in flight. Ratio = peak RSS(10·N) / peak RSS(N).

Goal: ratio <= 1.2.

Run (2-4 minutes on 2 shared CPUs)::

    .venv/bin/python -m bench.infer_memory                     # N = 200 and 2000
    .venv/bin/python -m bench.infer_memory --n 500 --input-kind parquet
    .venv/bin/python -m bench.infer_memory --gpu --n 2000

Writes bench/results/infer_memory.json (with the sampled series); the last line is the ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.archives import make_artifact, write_input
from bench.harness import (
    add_infer_args,
    announce_machine,
    count_ok_rows,
    finish,
    infer_job_args,
    run_job,
    say,
    work_dir,
)

GOAL = 1.2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_infer_args(p, n=200, size=64, input_size=64, n_help="the small archive; the large one has 10x")
    p.add_argument("--factor", type=int, default=10, help="size of the large archive in N (default 10)")
    p.add_argument("--channels", default="8,16,32", help="unet channels (default 8,16,32)")
    p.add_argument("--chunk-size", type=int, default=None, help="images per output part (default: the job's)")
    p.add_argument("--model", default=None, help="model artifact; default: a random-weight small unet")
    p.add_argument("--gpu", action="store_true", help="1 GPU per model actor")
    return p


def _half_peaks(series: list[dict], key: str) -> tuple[float, float]:
    """Peak of ``key`` in the first and in the second half of a run (flat memory: about equal)."""
    if not series:
        return float("nan"), float("nan")
    end = series[-1]["t"]
    first = [s[key] for s in series if s["t"] <= end / 2] or [float("nan")]
    second = [s[key] for s in series if s["t"] > end / 2] or [float("nan")]
    return max(first), max(second)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with work_dir(args.workdir, "unet-bench-infer-mem-") as work:
        info = announce_machine()
        channels = tuple(int(c) for c in args.channels.split(","))
        model_ref = args.model or str(make_artifact(work / "model", channels=channels,
                                                    input_size=(args.input_size, args.input_size)))
        runs = {}
        for n in (args.n, args.n * args.factor):
            input_path = write_input(args.input_kind, work / f"input-{n}", n, (args.size, args.size))
            out = work / f"masks-{n}"
            job = [*infer_job_args(args, model_ref), "--input", str(input_path), "--output", str(out)]
            if args.chunk_size:
                job += ["--chunk-size", str(args.chunk_size)]
            run = run_job(job, sample_memory=True, log_dir=work / f"log-{n}")
            ok = count_ok_rows(str(out))
            if ok != n:
                raise RuntimeError(f"the job wrote {ok} ok rows for {n} images ({out})")
            mem = run.memory
            rss_halves, pss_halves = _half_peaks(mem["series"], "rss_mib"), _half_peaks(mem["series"], "pss_mib")
            runs[n] = {"memory": mem, "wall_s": round(run.wall_s, 1), "summary": run.last_json(),
                       "rss_peak_first_half_mib": rss_halves[0], "rss_peak_second_half_mib": rss_halves[1],
                       "pss_peak_first_half_mib": pss_halves[0], "pss_peak_second_half_mib": pss_halves[1]}
            say(f"N={n:6d}: peak RSS sum {mem['peak_rss_mib']:.0f} MiB, peak PSS sum {mem['peak_pss_mib']:.0f} MiB, "
                f"up to {mem['peak_processes']} processes, {run.wall_s:.0f}s "
                f"(PSS peak first/second half of the run {pss_halves[0]:.0f}/{pss_halves[1]:.0f} MiB)")
        small, large = runs[args.n]["memory"], runs[args.n * args.factor]["memory"]
        ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
        ratio_pss = large["peak_pss_mib"] / small["peak_pss_mib"]
        result = {
            "benchmark": "infer_memory", "goal": f"<= {GOAL}", "ratio": round(ratio, 3), "met": ratio <= GOAL,
            "ratio_pss": round(ratio_pss, 3), "config": vars(args), "model": model_ref,
            "runs": {str(k): v for k, v in runs.items()}, "machine": info,
        }
        return finish("infer_memory", result, argv, f"peak_rss({args.factor}N)/peak_rss(N)", ratio, GOAL,
                      notes=[f"PSS ratio {args.factor}N/N = {ratio_pss:.2f}"], higher_is_better=False)


if __name__ == "__main__":
    main()
