"""Model speed: forward images/s of our ``unet`` ÷ MONAI's ``BasicUNet`` with matched features.

Both are the classic U-Net (two 3x3 conv + norm + activation per level, 2x2 max-pool down, 2x2
transposed conv up, skip concatenation), built with the same features and options:

* ours: ``build_model("unet", channels=(16, 32, 64, 128, 256), dropout=0.07, norm="batch")``;
* MONAI: ``BasicUNet(spatial_dims=2, features=(16, 32, 64, 128, 256, 16), upsample="deconv",
  norm="batch", dropout=0.07, act="relu")`` — ReLU instead of MONAI's default LeakyReLU so the
  activation matches too. Remaining differences (reported as parameters and FLOPs): MONAI keeps a
  bias in convs followed by BatchNorm, and its last up-step keeps 32 channels before the final
  conv block where ours halves to 16.

Same input size, batch and threads, eval mode under ``inference_mode``; the two models are timed
in alternating rounds (order reversed every round); the ratio is the median over rounds of
ours/MONAI within a round, so load changes on a shared machine hit both alike. Also measured on
our model (same pairing): channels-last memory format (what the inference actors use), bf16
autocast on CPU, and ``torch.compile`` (in a child process, time-boxed
with ``--compile-timeout``; skipped with a message if it fails or runs out of time). And the two
backends of ``jobs.infer`` side by side, same threads, same rounds: ``ours_inference`` is what the
torch model actor runs (BatchNorm folded, channels-last), ``ours_onnxruntime`` the graph
``jobs.export`` writes under ONNX Runtime (:class:`unet.export.OnnxModel`, ``--threads`` intra-op
threads; CUDA execution provider with ``--gpu`` when ``onnxruntime-gpu`` is installed, else
skipped); their ratio is ``onnxruntime_vs_torch``.
Parameters and FLOPs (``torch.utils.flop_counter.FlopCounterMode``, one image) of both are
reported so the comparison is like for like.

MONAI is a benchmark-only dependency: ``.venv/bin/pip install --no-deps monai`` (pure Python;
``--no-deps`` keeps pip away from the installed torch).

Goal: ratio ours/MONAI >= 1.0 (fp32, default memory format; channels-last for both is reported too).

Run (1-3 minutes on 2 shared CPUs, plus up to --compile-timeout)::

    .venv/bin/python -m bench.model_speed
    .venv/bin/python -m bench.model_speed --no-compile --rounds 3
    .venv/bin/python -m bench.model_speed --gpu --batch-size 64 --input-size 256

Writes bench/results/model_speed.json; the last line printed is the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import REPO, announce_machine, finish, job_env, median, say, set_threads

GOAL = 1.0
CHANNELS = (16, 32, 64, 128, 256)
DROPOUT = 0.07


def build_ours():
    from unet.models import build_model

    return build_model("unet", channels=CHANNELS, dropout=DROPOUT, norm="batch").eval()


def build_monai():
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=(*CHANNELS, CHANNELS[0]),
                     act=("relu", {"inplace": True}), norm=("batch", {"affine": True}), dropout=DROPOUT,
                     upsample="deconv").eval()


def flops_per_image(model, input_size: int) -> int:
    """Floating-point operations of one forward pass of one image (a multiply-add counts 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.rand(1, 1, input_size, input_size))
    return int(counter.get_total_flops())


def build_onnxruntime(model, args):
    """``(OnnxModel of model exported as jobs.export does, None)``, or ``(None, why not)``."""
    import tempfile

    from unet.artifact import load_artifact, save_artifact
    from unet.export import OnnxModel, export_onnx

    with tempfile.TemporaryDirectory(prefix="unet-bench-onnx-") as tmp:
        dest = save_artifact(model, f"{tmp}/model", input_size=(args.input_size, args.input_size),
                             normalization=model.input_normalization)
        graph = export_onnx(load_artifact(dest))
    try:
        return OnnxModel(graph, use_gpu=args.gpu, num_threads=args.threads), None
    except RuntimeError as e:  # --gpu without onnxruntime-gpu
        return None, str(e)


def time_onnxruntime(onnx_model, x, *, iters: int) -> float:
    """Images/s of ``iters`` ONNX Runtime runs of batch ``x`` (numpy; after one warm-up run)."""
    onnx_model.predict_all(x)
    t0 = time.perf_counter()
    for _ in range(iters):
        onnx_model.predict_all(x)
    return iters * x.shape[0] / (time.perf_counter() - t0)


def time_forward(model, x, *, iters: int, device: str, autocast_dtype=None) -> float:
    """Images/s of ``iters`` forward passes of batch ``x`` (after one warm-up pass)."""
    import torch

    amp = (torch.autocast(device, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with torch.inference_mode(), amp:
        model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return iters * x.shape[0] / seconds


def compile_child(args) -> None:
    """Runs in a child process: compile our model, time it, print one JSON line."""
    import torch

    set_threads(args.threads)
    device = "cuda" if args.gpu else "cpu"
    model = build_ours().to(device)
    x = torch.rand(args.batch_size, 1, args.input_size, args.input_size, device=device)
    t0 = time.perf_counter()
    compiled = torch.compile(model)
    with torch.inference_mode():
        compiled(x)  # compiles
    compile_s = time.perf_counter() - t0
    eager = median([time_forward(model, x, iters=args.iters, device=device) for _ in range(args.rounds)])
    fast = median([time_forward(compiled, x, iters=args.iters, device=device) for _ in range(args.rounds)])
    print(json.dumps({"compile_s": round(compile_s, 1), "eager_images_per_s": eager,
                      "compiled_images_per_s": fast}), flush=True)


def run_compile(args) -> dict:
    cmd = [sys.executable, "-m", "bench.model_speed", "--_compile-child", "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--input-size", str(args.input_size), "--iters", str(args.iters),
           "--rounds", str(args.rounds)] + (["--gpu"] if args.gpu else [])
    try:
        proc = subprocess.run(cmd, check=False, cwd=REPO, env=job_env(), capture_output=True, text=True,
                              timeout=args.compile_timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"torch.compile did not finish within --compile-timeout {args.compile_timeout}s "
                           f"(compiling on a loaded CPU is slow)"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"skipped": f"torch.compile failed (exit {proc.returncode}): {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input-size", type=int, default=128, help="input side (default 128)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all CPUs)")
    p.add_argument("--iters", type=int, default=4, help="forward passes per round (default 4)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per model (default 5)")
    p.add_argument("--gpu", action="store_true", help="on CUDA (bf16 -> fp16 autocast as in inference)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    p.add_argument("--compile-timeout", type=int, default=240, help="seconds for torch.compile (default 240)")
    p.add_argument("--_compile-child", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args._compile_child:
        compile_child(args)
        return {}
    import torch

    from unet.models import count_parameters, fuse_conv_bn

    try:
        ours, monai = build_ours(), build_monai()
    except ImportError as e:
        raise SystemExit(f"MONAI is needed for this benchmark only: .venv/bin/pip install --no-deps monai ({e})") from e
    import monai as monai_pkg

    info = announce_machine(f", MONAI {monai_pkg.__version__}")
    set_threads(args.threads)
    device = "cuda" if args.gpu else "cpu"
    say(f"input {args.batch_size}x1x{args.input_size}x{args.input_size}, {args.threads} threads, {device}, "
        f"{args.rounds} rounds x {args.iters} passes")
    models = {"ours": ours, "monai": monai}
    stats = {name: {"parameters": count_parameters(m), "gflops_per_image": flops_per_image(m, args.input_size) / 1e9}
             for name, m in models.items()}
    for name, s in stats.items():
        say(f"{name:5s}: {s['parameters'] / 1e6:.3f} M parameters, {s['gflops_per_image']:.2f} GFLOP per image")
    for m in models.values():
        m.to(device)
    x = torch.rand(args.batch_size, 1, args.input_size, args.input_size, device=device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    ours_cl = build_ours().to(device).to(memory_format=torch.channels_last)
    ours_cl.load_state_dict(ours.state_dict())
    monai_cl = build_monai().to(device).to(memory_format=torch.channels_last)
    monai_cl.load_state_dict(monai.state_dict())
    low = torch.float16 if args.gpu else torch.bfloat16
    variants = {
        "ours": (ours, x, None), "monai": (monai, x, None),
        "ours_channels_last": (ours_cl, x_cl, None), "monai_channels_last": (monai_cl, x_cl, None),
        f"ours_{'fp16' if args.gpu else 'bf16'}_autocast": (ours, x, low),
        f"ours_channels_last_{'fp16' if args.gpu else 'bf16'}_autocast": (ours_cl, x_cl, low),
        # The torch model actor of jobs.infer, and the onnxruntime backend's graph beside it.
        "ours_inference": (fuse_conv_bn(ours).to(memory_format=torch.channels_last), x_cl, None),
    }
    onnx_model, onnx_skipped = build_onnxruntime(copy.deepcopy(ours).cpu(), args)
    if onnx_model is None:
        say(f"onnxruntime: skipped — {onnx_skipped}")
    else:
        variants["ours_onnxruntime"] = (onnx_model, x.cpu().numpy(), None)
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        # Alternate the order every round so no variant always runs first (or right after another).
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            model, inp, dtype = variants[name]
            rates[name].append(time_onnxruntime(model, inp, iters=args.iters) if name == "ours_onnxruntime" else
                               time_forward(model, inp, iters=args.iters, device=device, autocast_dtype=dtype))
        say(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()))
    med = {k: median(v) for k, v in rates.items()}
    say("median images/s: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
    compiled = None
    if not args.no_compile:
        say(f"torch.compile (child process, up to {args.compile_timeout}s) ...")
        compiled = run_compile(args)
        if "skipped" in compiled:
            say(f"torch.compile: skipped — {compiled['skipped']}")
        else:
            say(f"torch.compile: compiled in {compiled['compile_s']}s; {compiled['compiled_images_per_s']:.1f} "
                f"images/s vs eager {compiled['eager_images_per_s']:.1f} in the same child "
                f"(x{compiled['compiled_images_per_s'] / compiled['eager_images_per_s']:.2f})")
    # Paired per round (the two ran seconds apart, under the same load), then the median.
    def paired(a: str, b: str) -> float:
        return median([x / y for x, y in zip(rates[a], rates[b], strict=True)])

    ratio = paired("ours", "monai")
    effects = {k: round(paired(k, "ours"), 3) for k in rates if k.startswith("ours_")}
    say("effect on ours (x vs fp32 default format): " + ", ".join(f"{k[5:]} x{v:.2f}" for k, v in effects.items()))
    say(f"channels-last both: ours/monai = {paired('ours_channels_last', 'monai_channels_last'):.2f}")
    onnx_ratio = paired("ours_onnxruntime", "ours_inference") if "ours_onnxruntime" in rates else None
    if onnx_ratio is not None:
        say(f"jobs.infer backends: onnxruntime/torch = {onnx_ratio:.2f} (median images/s "
            f"{med['ours_onnxruntime']:.1f} vs {med['ours_inference']:.1f}, {args.threads} threads each)")
    say("ours/monai per round: " + ", ".join(f"{x / y:.2f}" for x, y in zip(rates["ours"], rates["monai"], strict=True)))
    result = {
        "benchmark": "model_speed", "goal": f">= {GOAL}", "ratio": round(ratio, 3), "met": ratio >= GOAL,
        "config": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "device": device,
        "models": stats, "images_per_s": rates, "median_images_per_s": med, "effects_vs_ours_fp32": effects,
        "ratio_channels_last": round(paired("ours_channels_last", "monai_channels_last"), 3),
        "onnxruntime_vs_torch": None if onnx_ratio is None else round(onnx_ratio, 3),
        "onnxruntime_skipped": onnx_skipped,
        "torch_compile": compiled, "monai_version": monai_pkg.__version__, "machine": info,
    }
    return finish("model_speed", result, argv, "ours/monai_basicunet", ratio, GOAL)


if __name__ == "__main__":
    main()
