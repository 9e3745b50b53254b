"""An ensemble of trained models that averages their probabilities (nnU-Net's fold ensemble).

Each member is any architecture of the registry, rebuilt from its artifact's ``architecture``,
``model_kwargs``, ``input_size`` and ``normalization``; the ensemble is saved and loaded as one artifact
(architecture ``"ensemble"``, every member's weights under ``members.<i>.``), so inference,
evaluation, calibration and export treat it like any other model. ``forward`` returns
``(logit(mean foreground probability), log(mean class probability))``, so ``predict_proba`` gives
exactly the members' mean probabilities. Members trained at another input size than the
ensemble's see the input resized to their own (bilinear) and their probabilities resized back;
members trained with another normalisation see the input re-normalised to theirs. The class
probabilities are the mean over the members that have an image head (they must agree on its
classes); members without one contribute to the masks only.

Example:
    >>> import torch
    >>> from unet.models import build_model
    >>> member = {"architecture": "unet", "model_kwargs": {"channels": [4, 8]}, "input_size": [32, 32],
    ...           "normalization": {"mean": 0.5, "std": 0.25}}
    >>> model = build_model("ensemble", members=[member, member], input_size=[32, 32],
    ...                     normalization={"mean": 0.5, "std": 0.25}).eval()
    >>> prob, classes = model.predict_proba(torch.rand(2, 1, 32, 32))
    >>> prob.shape, classes
    (torch.Size([2, 1, 32, 32]), None)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Predicts

__all__ = ["Ensemble", "ensemble_of"]

EPS = 1e-6  # probabilities are clamped to [EPS, 1 - EPS] before the logit


class Ensemble(Predicts, nn.Module):
    """Members' probabilities averaged.

    Args:
        members: one mapping per member: ``architecture`` and ``model_kwargs`` (as in its
            artifact's config.json), the ``input_size`` [h, w] it was trained at and its
            ``normalization`` {"mean", "std"}.
        input_size: the ensemble's input size [h, w] (the artifact's; inference resizes to it).
        normalization: the ensemble's input normalisation {"mean", "std"} (the artifact's).

    Raises:
        ValueError: fewer than 2 members, or members that disagree on input/output channels or
            on the image head's classes.
    """

    architecture = "ensemble"

    def __init__(self, members: Sequence[dict], input_size: Sequence[int], normalization: dict) -> None:
        super().__init__()
        from . import build_model

        if isinstance(members, (str, bytes)) or not isinstance(members, Sequence) or len(members) < 2:
            raise ValueError(f"an ensemble needs a list of at least 2 members; got {members!r}")
        built = []
        for i, m in enumerate(members):
            if not isinstance(m, dict) or set(m) != {"architecture", "model_kwargs", "input_size", "normalization"}:
                raise ValueError(f"ensemble member {i} must be a mapping of architecture, model_kwargs, "
                                 f"input_size and normalization; got {m!r}")
            if m["architecture"] == self.architecture:
                raise ValueError(f"ensemble member {i}: ensembles do not nest")
            built.append(build_model(m["architecture"], **m["model_kwargs"]))
        for name in ("in_channels", "out_channels", "image_classes"):
            values = {getattr(b, name) for b in built} - ({0} if name == "image_classes" else set())
            if len(values) > 1:
                raise ValueError(f"ensemble members disagree on {name}: {sorted(values)}")
        self.members = nn.ModuleList(built)
        self.member_specs = [{"architecture": m["architecture"], "model_kwargs": dict(m["model_kwargs"]),
                              "input_size": [int(v) for v in m["input_size"]],
                              "normalization": {k: float(m["normalization"][k]) for k in ("mean", "std")}}
                             for m in members]
        self.input_size = tuple(int(v) for v in input_size)
        self.normalization = {k: float(normalization[k]) for k in ("mean", "std")}
        self.in_channels = built[0].in_channels
        self.out_channels = built[0].out_channels
        self.image_classes = max(b.image_classes for b in built)

    @property
    def input_normalization(self) -> dict[str, float]:
        """The normalisation of the ensemble's input (each member re-normalises it to its own)."""
        return dict(self.normalization)

    def model_kwargs(self) -> dict:
        return {"members": [dict(m) for m in self.member_specs], "input_size": list(self.input_size),
                "normalization": self.input_normalization}

    def forward(self, x: torch.Tensor):
        """``logit(mean p)`` (B, out_channels, H, W), and ``log(mean class p)`` (B, K) with a head."""
        height, width = x.shape[-2:]
        probs, class_probs = [], []
        for member, spec in zip(self.members, self.member_specs, strict=True):
            size = [max(1, round(d * m / e)) for d, m, e in zip((height, width), spec["input_size"], self.input_size)]
            # Antialiased when shrinking, as the pipeline's own resize (cv2's INTER_AREA) is.
            xi = x if size == [height, width] else F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                                                                 antialias=size[0] < height)
            mean, std = spec["normalization"]["mean"], spec["normalization"]["std"]
            if (mean, std) != (self.normalization["mean"], self.normalization["std"]):
                xi = (xi * self.normalization["std"] + self.normalization["mean"] - mean) / std
            logits, classes = _split(member(xi))
            p = torch.sigmoid(logits.float())
            if size != [height, width]:
                p = F.interpolate(p, size=(height, width), mode="bilinear", align_corners=False)
            probs.append(p)
            if classes is not None:
                class_probs.append(torch.softmax(classes.float(), dim=1))
        mean = torch.stack(probs).mean(0).clamp(EPS, 1 - EPS)
        logits = torch.log(mean) - torch.log1p(-mean)
        if not class_probs:
            return logits
        return logits, torch.log(torch.stack(class_probs).mean(0))


def _split(out):
    """(final mask logits, class logits or None) of a member's forward output."""
    masks, classes = out if isinstance(out, tuple) else (out, None)
    return (masks[-1] if isinstance(masks, list) else masks), classes


def ensemble_of(loaded: Sequence, input_size: Sequence[int] | None = None) -> Ensemble:
    """An :class:`Ensemble` of loaded artifacts (:class:`unet.artifact.LoadedModel`), with their
    weights, in eval mode. An artifact that is itself an ensemble joins member by member (so an
    ensemble grows by one model: every member weighs the same). ``input_size`` defaults to the
    largest member's, the input normalisation is the first member's.

    Raises:
        ValueError: fewer than 2 models, or models that cannot be combined (see :class:`Ensemble`).
    """
    if len(loaded) < 2:
        raise ValueError(f"an ensemble needs at least 2 models; got {len(loaded)}")
    parts = []  # (spec, module with the weights)
    for m in loaded:
        if isinstance(m.model, Ensemble):
            parts += zip(m.model.member_specs, m.model.members, strict=True)
        else:
            parts.append(({"architecture": m.settings.architecture, "model_kwargs": m.config["model_kwargs"],
                           "input_size": list(m.settings.input_size),
                           "normalization": {"mean": m.settings.mean, "std": m.settings.std}}, m.model))
    specs = [spec for spec, _ in parts]
    if input_size is None:
        input_size = max((spec["input_size"] for spec in specs), key=lambda s: s[0] * s[1])
    model = Ensemble(specs, input_size, specs[0]["normalization"])
    for member, (_, module) in zip(model.members, parts, strict=True):
        member.load_state_dict(module.state_dict())
    return model.eval()
