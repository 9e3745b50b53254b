"""The typed settings a trained model is used with: input size, normalisation, post-processing.

:class:`ModelSettings` is parsed once from an artifact's ``config.json`` (``LoadedModel.settings``);
evaluation, inference, calibration and the benchmarks take every value from it. Post-processing
(``config["postprocess"]``, written by ``jobs.calibrate`` from the validation split) is optional:
without it a model thresholds its probabilities at ``threshold`` and nothing else.

A value that fails a check raises :class:`unet.runtime.UsageError` (a ``ValueError``): the values
come from the user's flags or from the artifact they named, so a job reports it in one line.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from .runtime import UsageError

__all__ = ["POSTPROCESS_DEFAULTS", "ModelSettings", "check_architecture", "check_input_size",
           "check_normalization", "check_postprocess", "check_threshold"]

# The post-processing of a model without calibration: threshold the probabilities, nothing else.
POSTPROCESS_DEFAULTS = {"gate_threshold": None, "min_area": 0.0, "largest_component": False, "tta": False}



def check_input_size(value, where: str) -> list[int]:
    if (
        isinstance(value, (str, bytes))
        or not hasattr(value, "__len__")
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in value)
    ):
        raise UsageError(
            f"{where}input_size must be (height, width) as two positive ints, e.g. (128, 128); got {value!r}"
        )
    return [int(v) for v in value]


def check_normalization(value, where: str) -> dict:
    if not isinstance(value, dict) or set(value) != {"mean", "std"}:
        raise UsageError(f"{where}normalization must be a dict with exactly 'mean' and 'std'; got {value!r}")
    for key in ("mean", "std"):
        v = value[key]
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise UsageError(f"{where}normalization[{key!r}] must be a finite number; got {v!r}")
    if value["std"] <= 0:
        raise UsageError(f"{where}normalization['std'] must be > 0; got {value['std']!r}")
    return {"mean": float(value["mean"]), "std": float(value["std"])}


def check_threshold(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
        raise UsageError(f"{where}threshold must be a probability in (0, 1), e.g. 0.5; got {value!r}")
    return float(value)


def check_architecture(value, where: str) -> str:
    from .models import ARCHITECTURES  # here, not at the top: inference's torch-free steps import this module

    if value not in ARCHITECTURES:
        raise UsageError(f"{where}unknown architecture {value!r}; valid: {', '.join(sorted(ARCHITECTURES))}")
    return value


@dataclass(frozen=True)
class ModelSettings:
    """What a model needs around it to be used: the typed, checked part of an artifact's config.json.

    Read once by :func:`load_artifact` (``LoadedModel.settings``); evaluation, inference and the
    benchmarks take these values from here instead of reading ``config.json`` themselves.
    Construction checks every value (``ValueError`` naming the key), so an instance is always valid.

    Args:
        architecture: registry name of the network (``config["architecture"]``).
        input_size: (height, width) the model was trained at; images are resized to it.
        mean, std: the normalisation, ``(x / 255 - mean) / std`` (``config["normalization"]``).
        threshold: probability threshold for the binary mask, in (0, 1). Default 0.5.
        gate_threshold: with an image-level head, masks of images whose ``p(lesion)`` (1 -
            p(normal)) is below it are emptied; None = no gate. Default None.
        min_area: connected components smaller than this fraction of the image are removed
            (0 = keep all). Default 0.
        largest_component: keep only the largest connected component. Default False.
        tta: average the probabilities of the image and its horizontal flip. Default False.
    """

    architecture: str
    input_size: tuple[int, int]
    mean: float
    std: float
    threshold: float = 0.5
    gate_threshold: float | None = None
    min_area: float = 0.0
    largest_component: bool = False
    tta: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.architecture, str) or not self.architecture:
            raise UsageError(f"architecture must be a non-empty string; got {self.architecture!r}")
        normalization = check_normalization({"mean": self.mean, "std": self.std}, "")
        object.__setattr__(self, "input_size", tuple(check_input_size(self.input_size, "")))
        object.__setattr__(self, "mean", normalization["mean"])
        object.__setattr__(self, "std", normalization["std"])
        object.__setattr__(self, "threshold", check_threshold(self.threshold, ""))
        for key, value in self.postprocess.items():
            object.__setattr__(self, key, _check_postprocess(key, value, ""))

    @classmethod
    def from_config(cls, config: dict, where: str = "") -> ModelSettings:
        """The settings in an artifact config dict; ``where`` prefixes error messages (the file)."""
        architecture = check_architecture(config["architecture"], where)
        input_size = tuple(check_input_size(config["input_size"], where))
        normalization = check_normalization(config["normalization"], where)
        return cls(
            architecture=architecture,
            input_size=input_size,
            mean=normalization["mean"],
            std=normalization["std"],
            threshold=check_threshold(config["threshold"], where),
            **check_postprocess(config.get("postprocess", {}), where),
        )

    def with_threshold(self, threshold: float | None) -> ModelSettings:
        """These settings with ``threshold`` instead of the artifact's (None keeps the artifact's)."""
        if threshold is None:
            return self
        return dataclasses.replace(self, threshold=check_threshold(threshold, ""))

    def with_postprocess(self, **overrides) -> ModelSettings:
        """These settings with some post-processing values replaced; a value of None keeps the
        artifact's (so command-line flags that were not given change nothing). To switch the
        gate off, pass ``gate_threshold=0``."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if "threshold" in given:
            given["threshold"] = check_threshold(given["threshold"], "")
        return dataclasses.replace(self, **check_postprocess(given, "", partial=True))

    @property
    def postprocess(self) -> dict:
        """The post-processing values as stored in ``config["postprocess"]``."""
        return {key: getattr(self, key) for key in POSTPROCESS_DEFAULTS}

    @property
    def normalization(self) -> dict:
        """``{"mean": .., "std": ..}`` as stored in config.json."""
        return {"mean": self.mean, "std": self.std}


def _check_postprocess(key: str, value, where: str):
    if key == "gate_threshold":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
            raise UsageError(f"{where}postprocess.gate_threshold must be a probability in [0, 1) or null; "
                             f"got {value!r}")
        return float(value)
    if key == "min_area":
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
            raise UsageError(f"{where}postprocess.min_area must be a fraction of the image in [0, 1), "
                             f"e.g. 0.002; got {value!r}")
        return float(value)
    if not isinstance(value, bool):
        raise UsageError(f"{where}postprocess.{key} must be true or false; got {value!r}")
    return value


def check_postprocess(values, where: str, partial: bool = False) -> dict:
    """``config["postprocess"]`` checked and completed with :data:`POSTPROCESS_DEFAULTS` (or, with
    ``partial``, only the keys given)."""
    if not isinstance(values, dict):
        raise UsageError(f"{where}postprocess must be a JSON object; got {values!r}")
    unknown = sorted(set(values) - set(POSTPROCESS_DEFAULTS) - ({"threshold"} if partial else set()))
    if unknown:
        raise UsageError(f"{where}postprocess has unknown key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(POSTPROCESS_DEFAULTS)}")
    base = {} if partial else dict(POSTPROCESS_DEFAULTS)
    return base | {k: (v if k == "threshold" else _check_postprocess(k, v, where)) for k, v in values.items()}
