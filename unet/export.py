"""ONNX: export a model artifact as an ONNX graph, and run that graph with ONNX Runtime.

:func:`export_onnx` turns a :class:`unet.artifact.LoadedModel` into ONNX bytes: BatchNorm folded
into the convolutions, input ``input`` = normalised images ``(batch, in_channels, H, W)`` with
dynamic batch and dynamic H, W (any multiple of the network's stride, ``2 ** depth``: 16 for the
classic 4-pooling nets, 32 with the EfficientNet-Lite0 encoder; an ensemble, which resizes to each
member's own size, takes exactly its ``input_size`` and has ``stride`` null), outputs ``logits`` ``(batch,
out_channels, H, W)`` and, for a model with an image-level head, ``class_logits`` ``(batch, K)``.
Everything needed to use the graph outside this project is in its metadata (``metadata_props``,
:data:`METADATA_KEYS`, JSON values): normalisation, input size, stride and padding rule,
threshold and post-processing, class names of the head, model_id.

:class:`OnnxModel` runs such a graph (CPU, or CUDA when ``onnxruntime-gpu`` is installed) with
the same ``predict_proba`` as :class:`unet.models.SegmentationModel`: it pads to the stride as
``SegmentationModel.forward`` does, crops back, applies sigmoid/softmax and the optional flip TTA.
It needs numpy, SciPy and onnxruntime only, not torch.

The exporter is torch's dynamo-based one (``torch.onnx.export(dynamo=True)``, with ``onnxscript``):
it traces with symbolic shapes, so the "SAME" padding of the EfficientNet encoder and the
crop in ``forward`` stay correct for every size, and the graph holds only the network's own ops.
The older TorchScript exporter freezes traced sizes (with the EfficientNet encoder its graph
gave outputs of the traced size at other sizes) and adds shape arithmetic.

Example:
    >>> import tempfile, numpy as np, torch
    >>> from unet.models import build_model
    >>> from unet.artifact import load_artifact, save_artifact
    >>> dest = save_artifact(build_model("unet", channels=(4, 8)).eval(), tempfile.mkdtemp() + "/m",
    ...                      input_size=(32, 32), normalization={"mean": 0.5, "std": 0.25})
    >>> onnx_model = OnnxModel(export_onnx(load_artifact(dest)))
    >>> onnx_model.metadata["stride"], onnx_model.metadata["input_size"]
    (2, [32, 32])
    >>> prob, class_prob = onnx_model.predict_proba(np.zeros((1, 1, 31, 33), np.float32))
    >>> prob.shape, class_prob
    ((1, 1, 31, 33), None)
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the runner side must not import torch
    from .artifact import LoadedModel

__all__ = ["INPUT_NAME", "METADATA_KEYS", "OPSET", "OUTPUT_NAMES", "TOLERANCE", "OnnxModel", "export_artifact",
           "export_onnx", "max_logit_difference", "max_probability_difference", "read_metadata"]

OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "class_logits")
METADATA_PREFIX = "unet."
# The metadata each exported graph carries (keys are prefixed "unet."; values are JSON).
METADATA_KEYS = ("model_id", "architecture", "input_size", "normalization", "threshold", "postprocess", "stride",
                 "pad_mode", "classes", "in_channels", "out_channels")
# SegmentationModel.pad_mode -> numpy.pad mode (base.PAD_MODES maps the same names for F.pad).
_NUMPY_PAD = {"replicate": "edge", "zeros": "constant"}
# Largest side the exported graph promises to accept, in pixels (torch.export needs a bound).
_MAX_SIDE = 16384
# export_artifact's check: ONNX Runtime's logits within this fraction of the logits' scale (at
# least 1) of PyTorch's, fp32. Measured: about 1e-6 for every architecture.
TOLERANCE = 1e-4


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's chatter (a torchvision note on every call, deprecation warnings from
    torch.export internals) is not the user's business: keep it out of the job's output."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _fixed_same_padding(model):
    """``model`` (changed in place) with the EfficientNet encoder's TF-"SAME" convolutions, which
    work out their padding from the input size at every call, replaced by a fixed zero padding and
    a plain convolution.

    Both are the same for every input whose sides are multiples of the network's stride (all the
    graph accepts): then every stride-``s`` convolution sees a multiple of ``s`` and its padding is
    ``(k - 1) * dilation + 1 - s``, whatever the size. Exported as they are, their size arithmetic
    kept torch.export's symbolic shape solver busy for over ten minutes (then stopped) on 2 CPUs.
    """
    try:
        from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
    except ImportError:  # no such encoder installed: nothing to replace
        return model
    from torch import nn

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, Conv2dDynamicSamePadding):
                continue
            (ph, pw) = (max((k - 1) * d + 1 - s, 0) for k, d, s in zip(child.kernel_size, child.dilation,
                                                                            child.stride))
            conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0,
                             child.dilation, child.groups, child.bias is not None)
            conv.load_state_dict(child.state_dict())
            pad = nn.ZeroPad2d((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            setattr(parent, name, nn.Sequential(pad, conv) if ph or pw else conv)
    return model


def export_onnx(loaded: LoadedModel) -> bytes:
    """The artifact's model as a serialised ONNX graph (see the module docstring).

    BatchNorm is folded in two steps: :func:`unet.models.fuse_conv_bn` folds the ``Conv2d`` +
    ``BatchNorm2d`` pairs of the project's blocks, and the exporter's optimiser (onnxscript's
    rewrite rules) folds the rest, e.g. inside the EfficientNet blocks; the graph has no
    ``BatchNormalization`` node. The export is checked by :func:`max_logit_difference`.
    """
    import onnx
    import torch

    from .models import fuse_conv_bn
    from .shards import CLASSES

    model, settings = loaded.model, loaded.settings
    fused = _fixed_same_padding(fuse_conv_bn(model).eval())
    batch = torch.export.Dim("batch", min=1, max=65536)
    depth = getattr(model, "depth", None)
    if depth is not None:  # a SegmentationModel: any multiple of its stride
        stride = 2 ** depth
        # An example at the model's input size rounded up to the stride; the sizes are symbolic.
        h, w = (-(-s // stride) * stride for s in settings.input_size)
        rows = torch.export.Dim("rows", min=1, max=_MAX_SIDE // stride)
        cols = torch.export.Dim("cols", min=1, max=_MAX_SIDE // stride)
        dynamic = {0: batch, 2: stride * rows, 3: stride * cols}
    else:  # an ensemble resizes to each member's own size: the graph takes its input size only
        stride, (h, w) = None, settings.input_size
        dynamic = {0: batch}
    example = torch.zeros(2, model.in_channels, h, w)
    outputs = list(OUTPUT_NAMES if model.image_classes else OUTPUT_NAMES[:1])
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            fused, (example,), dynamo=True, opset_version=OPSET, verbose=False, optimize=True,
            input_names=[INPUT_NAME], output_names=outputs, dynamic_shapes={"x": dynamic})
    proto = program.model_proto
    metadata = {
        "model_id": loaded.model_id, "architecture": settings.architecture,
        "input_size": list(settings.input_size), "normalization": settings.normalization,
        "threshold": settings.threshold, "postprocess": settings.postprocess, "stride": stride,
        "pad_mode": getattr(model, "pad_mode", None), "classes": list(CLASSES) if model.image_classes else None,
        "in_channels": model.in_channels, "out_channels": model.out_channels,
    }
    onnx.helper.set_model_props(proto, {METADATA_PREFIX + k: json.dumps(v) for k, v in metadata.items()})
    proto.doc_string = (f"{loaded.model_id}: input = (uint8 / 255 - mean) / std at a multiple of the stride "
                        f"(pad as pad_mode says, crop the logits back), or exactly input_size when the stride "
                        f"is null (an ensemble); see the unet.* metadata")
    return proto.SerializeToString()


def read_metadata(proto) -> dict:
    """The ``unet.*`` metadata of an ONNX ``ModelProto`` (or of an ORT session's model meta) as a dict."""
    props = ({p.key: p.value for p in proto.metadata_props} if hasattr(proto, "metadata_props")
             else dict(proto.custom_metadata_map))
    missing = [k for k in METADATA_KEYS if METADATA_PREFIX + k not in props]
    if missing:
        raise ValueError(f"not an ONNX graph exported by unet.export (no metadata {', '.join(missing)}); "
                         f"export it with python -m jobs.export")
    return {k: json.loads(props[METADATA_PREFIX + k]) for k in METADATA_KEYS}


class OnnxModel:
    """An exported graph under ONNX Runtime, used like :class:`unet.models.SegmentationModel`.

    Args:
        model: the ONNX bytes (:func:`export_onnx`) or a path to a ``.onnx`` file.
        use_gpu: run on the CUDA execution provider (needs ``onnxruntime-gpu``); else CPU.
        num_threads: ORT's intra-op threads (inter-op: 1), as ``torch.set_num_threads`` for torch.
    """

    def __init__(self, model: bytes | str, *, use_gpu: bool = False, num_threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(num_threads))
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: ORT's warnings would go to the job's stderr
        if use_gpu:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("GPU requested for the onnxruntime backend, but this onnxruntime has no "
                                   "CUDAExecutionProvider; pip install onnxruntime-gpu (in place of onnxruntime)")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(model, sess_options=options, providers=providers)
        self.metadata = read_metadata(self.session.get_modelmeta())
        self.outputs = [o.name for o in self.session.get_outputs()]

    def predict_all(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(mask logits (B, out_channels, H, W), class logits (B, K) or None)`` for normalised
        float32 ``x`` ``(B, in_channels, H, W)`` of any H, W: padded to the stride (split evenly,
        as ``SegmentationModel.forward``), run, cropped back."""
        x = np.asarray(x, dtype=np.float32)
        height, width = x.shape[-2:]
        stride = self.metadata["stride"]
        if stride is None:  # a fixed-size graph (an ensemble)
            if [height, width] != self.metadata["input_size"]:
                raise ValueError(f"this graph ({self.metadata['model_id']}) takes images of exactly its input_size "
                                 f"{self.metadata['input_size']}; got {height} x {width}: resize them first")
            stride = 1
        pad_h, pad_w = -height % stride, -width % stride
        top, left = pad_h // 2, pad_w // 2
        if pad_h or pad_w:
            x = np.pad(x, ((0, 0), (0, 0), (top, pad_h - top), (left, pad_w - left)),
                       mode=_NUMPY_PAD[self.metadata["pad_mode"]])
        out = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(x)})
        logits = out[0][..., top: top + height, left: left + width]
        return logits, (out[1] if len(out) > 1 else None)

    def predict_proba(self, x: np.ndarray, tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """``(foreground probabilities, image class probabilities or None)`` in float32, as
        :meth:`unet.models.SegmentationModel.predict_proba` (with ``tta``: the mean over ``x``
        and its horizontal flip)."""
        from scipy.special import expit, softmax

        logits, classes = self.predict_all(x)
        prob = expit(logits)
        class_prob = None if classes is None else softmax(classes, axis=1)
        if tta:
            flipped_logits, flipped_classes = self.predict_all(np.ascontiguousarray(x[..., ::-1]))
            prob = (prob + expit(flipped_logits)[..., ::-1]) / 2
            if class_prob is not None:
                class_prob = (class_prob + softmax(flipped_classes, axis=1)) / 2
        return (prob.astype(np.float32, copy=False),
                None if class_prob is None else class_prob.astype(np.float32, copy=False))


def export_artifact(model: str, out: str, *, seed: int = 0) -> dict:
    """Export the artifact ``model`` (name, directory or URI) to ``out`` (path or URI), checked.

    Before writing, ONNX Runtime's logits and probabilities are compared with PyTorch's on random
    batches (values in the range of normalised images) at the model's input size and (but for an
    ensemble) at an odd size one pixel short of it (padded as the model pads); logits further
    apart than :data:`TOLERANCE` of their scale (for an ensemble: probabilities further apart
    than it) are a bug of the exporter and raise ``RuntimeError``. Returns a JSON-ready summary.
    """
    import os

    import torch

    from . import storage
    from .artifact import load_artifact
    from .runtime import UsageError

    if "://" not in out and os.path.isdir(out):
        raise UsageError(f"--out {out}: is a folder; give the file to write, e.g. {os.path.join(out, 'model.onnx')}")
    loaded = load_artifact(model)
    graph = export_onnx(loaded)
    onnx_model = OnnxModel(graph)
    generator = torch.Generator().manual_seed(seed)
    h, w = loaded.settings.input_size
    differences = {}
    shapes = {"input_size": (2, h, w)}
    if onnx_model.metadata["stride"] is not None:  # not an ensemble: any size, padded to the stride
        shapes["odd"] = (1, max(1, h - 1), max(1, w - 1))
    ensemble = onnx_model.metadata["stride"] is None
    for label, shape in shapes.items():
        x = torch.randn(shape[0], loaded.model.in_channels, *shape[1:], generator=generator) * 2
        with torch.inference_mode():
            scale = float(loaded.model.predict(x).abs().max())
        logits, probabilities = (max_logit_difference(loaded, onnx_model, x),
                                 max_probability_difference(loaded, onnx_model, x))
        differences[label] = {"logits": float(f"{logits:.3g}"), "probabilities": float(f"{probabilities:.3g}")}
        # An ensemble's logits are logit(mean probability): the float32 rounding of a probability
        # near 0 or 1 is magnified up to 1 / (p (1 - p)) there, so its check is on probabilities.
        if (probabilities > TOLERANCE) if ensemble else (logits > TOLERANCE * max(1.0, scale)):
            raise RuntimeError(f"{model}: ONNX Runtime's output differs from PyTorch's by {logits:.3g} in logits "
                               f"(up to {scale:.3g}), {probabilities:.3g} in probabilities at {label} "
                               f"{tuple(x.shape)}; the export is wrong")
    storage.write_bytes(out, graph)
    session = onnx_model.session
    return {"out": out, "format": "onnx", "model_id": loaded.model_id, "bytes": len(graph), "opset": OPSET,
            "inputs": {i.name: i.shape for i in session.get_inputs()},
            "outputs": {o.name: o.shape for o in session.get_outputs()},
            "metadata": onnx_model.metadata,
            "max_abs_difference": differences}


def max_probability_difference(loaded: LoadedModel, onnx_model: OnnxModel, x) -> float:
    """Largest absolute difference between PyTorch's and ONNX Runtime's probabilities (mask and
    class, ``predict_proba``) for the normalised batch ``x``, the torch model in eval mode."""
    import torch

    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    with torch.inference_mode():
        want = loaded.model.predict_proba(x)
    got = onnx_model.predict_proba(x.numpy())
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want) if w is not None)


def max_logit_difference(loaded: LoadedModel, onnx_model: OnnxModel, x) -> float:
    """Largest absolute difference between PyTorch's and ONNX Runtime's logits (mask and class)
    for the normalised batch ``x`` (a tensor or array), the torch model in eval mode."""
    import torch

    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    with torch.inference_mode():
        want = loaded.model.predict_all(x)
    got = onnx_model.predict_all(x.numpy())
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want) if w is not None)
