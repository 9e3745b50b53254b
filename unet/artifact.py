"""Model artifacts: a directory holding ``config.json`` and ``model.safetensors`` — nothing pickled.

An artifact is everything inference needs to reproduce a trained model's predictions::

    <dest>/model.safetensors   the state dict (tensors + a JSON header; loading runs no code);
                               above 16 MiB (an ensemble) split into model-0000i-of-0000n.safetensors
    <dest>/config.json         {"format_version": 1,
                                "name": "unet",                      # prefix of model_id
                                "architecture": "unet",              # key of unet.models.MODELS
                                "model_kwargs": {...},               # build_model(architecture, **these)
                                "input_size": [h, w],                # the size the model was trained at
                                "normalization": {"mean": .., "std": ..},
                                "threshold": 0.5,                    # on sigmoid(logits)
                                "postprocess": {...},                # optional: gate, min area, ... (unet.settings)
                                "provenance": {...},                 # command, data, metrics, ... (free form)
                                "weights_sha256": "...", "num_parameters": N, "unet_version": "..."}

``dest`` may be a local directory or a URI such as ``s3://bucket/prefix`` (via ``unet.storage``).
Named artifacts shipped with the package live in ``unet/weights/<name>/``; see :func:`list_pretrained`.
``model_id`` = ``f"{name}-{sha256(model.safetensors)[:12]}"`` identifies the exact weights wherever
the artifact is copied.

Example:
    >>> import tempfile, torch
    >>> from unet.models import build_model
    >>> from unet.artifact import load_artifact, save_artifact
    >>> model = build_model("unet", channels=(4, 8, 16)).eval()
    >>> dest = save_artifact(model, tempfile.mkdtemp() + "/model", architecture="unet",
    ...                      model_kwargs={"channels": [4, 8, 16]}, input_size=(128, 128),
    ...                      normalization={"mean": 0.5, "std": 0.25}, provenance={"command": "doctest"})
    >>> loaded = load_artifact(dest)
    >>> loaded.settings
    ModelSettings(architecture='unet', input_size=(128, 128), mean=0.5, std=0.25, threshold=0.5)
    >>> x = torch.rand(1, 1, 40, 40)
    >>> torch.equal(loaded.predict(x), model(x))
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from . import __version__
from .models import build_model, count_parameters
from .runtime import UsageError
from .settings import (ModelSettings, check_architecture, check_input_size, check_normalization, check_postprocess,
                       check_threshold)

__all__ = [
    "ALIASES",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_DIR",
    "WEIGHTS_NAME",
    "LoadedModel",
    "SHARD_MIB",
    "ModelSettings",
    "list_pretrained",
    "load_artifact",
    "save_artifact",
    "save_ensemble",
]

FORMAT_VERSION = 1
WEIGHTS_DTYPES = {"float32": torch.float32, "float16": torch.float16}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SHARD_MIB = 16  # largest weights file written; bigger models are split (keeps each file well under 20 MB)
_SHARD_NAME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
# Package data: named, ready-to-use artifacts (may be absent in a fresh checkout).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
REQUIRED_KEYS = (
    "format_version",
    "architecture",
    "model_kwargs",
    "input_size",
    "normalization",
    "threshold",
    "weights_sha256",
)


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded from an artifact: ``model`` (in eval mode), its ``config``, ``model_id`` and
    ``settings`` (the :class:`ModelSettings` parsed from ``config``)."""

    model: nn.Module
    config: dict
    model_id: str
    settings: ModelSettings

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Full-resolution logits ``(B, out_channels, H, W)`` for a normalised batch, without grad.

        :meth:`unet.models.SegmentationModel.predict`; the input is not resized or normalised
        (see ``settings``), and the model runs in whatever mode it is in (eval after loading).
        """
        return self.model.predict(x)


# ---------------------------------------------------------------------------------------------
# Where artifacts live: local paths through pathlib, URIs (s3://, file://, ...) through unet.storage.


def _is_uri(location: str) -> bool:
    return "://" in location


def _join(location: str, name: str) -> str:
    if _is_uri(location):
        from . import storage  # imported lazily: local artifacts need no object-store client

        return storage.join(location, name)
    return str(Path(location) / name)


def _read(location: str, name: str, what: str) -> bytes:
    path = _join(location, name)
    missing = FileNotFoundError(f"{path}: {what} not found; a model artifact holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if _is_uri(location):
        from . import storage

        if not storage.exists(path):
            raise missing
        return storage.read_bytes(path)
    if not Path(path).is_file():
        raise missing
    return Path(path).read_bytes()


def _write(location: str, name: str, data: bytes) -> None:
    path = _join(location, name)
    if _is_uri(location):
        from . import storage

        storage.write_bytes(path, data)
    else:
        Path(path).write_bytes(data)


# Names that always load the recommended shipped model of a dataset; old names stay loadable, so
# runs that named them reproduce.
ALIASES = {"busi": "busi-ensemble-v2"}


def list_pretrained() -> list[str]:
    """Names of the artifacts shipped in ``unet/weights/`` (each a directory with a config.json)."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / CONFIG_NAME).is_file())


def _resolve(name_or_path_or_uri: str | os.PathLike) -> str:
    """Artifact location for a URI, an existing local directory, or a pretrained name (in that order)."""
    source = os.fspath(name_or_path_or_uri)
    if _is_uri(source):
        return source
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(
                f"{path}: is a file; a model artifact is a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
        return str(path)
    if source and "/" not in source and os.sep not in source and source not in (".", ".."):
        source = ALIASES.get(source, source)
        if (WEIGHTS_DIR / source / CONFIG_NAME).is_file():
            return str(WEIGHTS_DIR / source)
        raise FileNotFoundError(
            f"{source!r}: no such artifact directory and no pretrained model of that name "
            f"(pretrained: {', '.join(list_pretrained()) or 'none'}; aliases: "
            f"{', '.join(f'{a} = {t}' for a, t in ALIASES.items())})"
        )
    raise FileNotFoundError(f"{path}: model artifact directory does not exist")


# ---------------------------------------------------------------------------------------------
# Checks shared by save and load (the value checks live in unet.settings).


def _build(architecture: str, model_kwargs, where: str) -> nn.Module:
    if not isinstance(model_kwargs, dict):
        raise ValueError(f"{where}model_kwargs must be a dict of build_model arguments; got {model_kwargs!r}")
    try:
        return build_model(architecture, **model_kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}model_kwargs {model_kwargs} do not build {architecture!r}: {e}") from e


def _compare_state(expected: dict, actual: dict) -> str:
    """'' if ``actual`` has exactly ``expected``'s keys and shapes, else a one-line description."""
    problems = []
    missing = [k for k in expected if k not in actual]
    unexpected = [k for k in actual if k not in expected]
    shapes = [
        f"{k} {list(actual[k].shape)} vs {list(expected[k].shape)}"
        for k in expected
        if k in actual and actual[k].shape != expected[k].shape
    ]
    labelled = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch (got vs expected)", shapes))
    for label, items in labelled:
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(items[:5])}{more}")
    return "; ".join(problems)


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel/DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _weights_sha256(shas: list[str]) -> str:
    """What ``model_id`` hashes: the weights file's sha256, or for shards the sha256 of their sha256s in order."""
    return shas[0] if len(shas) == 1 else _sha("".join(shas).encode())


def _shard_files(tensors: dict[str, torch.Tensor], shard_mib: float) -> dict[str, bytes]:
    """``{file name: safetensors bytes}``: one :data:`WEIGHTS_NAME`, or consecutive shards of whole
    tensors of at most ``shard_mib`` each (a larger tensor gets a shard of its own)."""
    limit = shard_mib * 1024 * 1024
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append({})
            size = 0
        groups[-1][key] = tensor
        size += nbytes
    # One metadata key only: safetensors orders several keys differently from run to run, and the
    # bytes must be deterministic so that the same weights always get the same sha256 / model_id.
    blobs = [safetensors.torch.save(g, metadata={"format": "pt"}) for g in groups]
    if len(blobs) == 1:
        return {WEIGHTS_NAME: blobs[0]}
    return {f"model-{i + 1:05d}-of-{len(blobs):05d}.safetensors": b for i, b in enumerate(blobs)}


def save_artifact(
    model: nn.Module,
    dest: str | os.PathLike,
    *,
    architecture: str | None = None,
    model_kwargs: dict | None = None,
    input_size: tuple[int, int],
    normalization: dict,
    threshold: float = 0.5,
    postprocess: dict | None = None,
    provenance: dict | None = None,
    name: str | None = None,
    weights_dtype: str = "float32",
    shard_mib: float = SHARD_MIB,
) -> str:
    """Write ``model`` as an artifact directory ``dest`` (local path or URI); returns ``dest``.

    Args:
        model: the trained model (DDP / torch.compile wrappers are unwrapped).
        dest: directory or URI to write ``config.json`` and ``model.safetensors`` into.
        architecture: registry name; default the model's own ``architecture``.
        model_kwargs: ``build_model`` arguments that rebuild it; default ``model.model_kwargs()``.
            Checked: the rebuilt model must have exactly the same parameter names and shapes.
        input_size: (height, width) the model was trained at; inference resizes to it.
        normalization: ``{"mean": .., "std": ..}`` used by ``unet.transforms.normalize``.
        threshold: probability threshold for the binary mask. Default 0.5.
        postprocess: post-processing chosen on validation (``unet.settings.POSTPROCESS_DEFAULTS``
            keys); omitted = plain thresholding.
        provenance: JSON-serialisable facts about training (command, data URI, metrics, ...).
        name: prefix of ``model_id``; default ``architecture``.
        weights_dtype: ``"float32"`` or ``"float16"``: how floating-point tensors are stored
            (float16 halves the file; loading casts them back to the model's float32).
        shard_mib: weights larger than this are written as several files
            ``model-0000i-of-0000n.safetensors`` of at most this size each (whole tensors, in key
            order; listed with their sha256 in ``config["weights_shards"]``), so that no file of a
            large model (an ensemble) is one big blob. Default :data:`SHARD_MIB`; one file below it.

    Raises:
        ValueError: a bad argument, or architecture/model_kwargs that do not describe ``model``.
    """
    model = _unwrap(model)
    dest = os.fspath(dest)
    where = f"save_artifact({dest}): "
    if architecture is None:
        architecture = getattr(model, "architecture", None)
    architecture = check_architecture(architecture, where)
    if model_kwargs is None:
        if not hasattr(model, "model_kwargs"):
            raise ValueError(f"{where}model_kwargs is required for a {type(model).__name__}")
        model_kwargs = model.model_kwargs()
    try:
        # A JSON round trip turns tuples into lists now, so the config says exactly what load sees.
        model_kwargs = json.loads(json.dumps(model_kwargs))
        provenance = json.loads(json.dumps(provenance or {}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}model_kwargs and provenance must be JSON-serialisable: {e}") from e
    if not isinstance(provenance, dict):
        raise ValueError(f"{where}provenance must be a dict; got {provenance!r}")
    name = architecture if name is None else name
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"{where}name must be a non-empty string without '/'; got {name!r}")

    reference = _build(architecture, model_kwargs, where)
    state = model.state_dict()
    mismatch = _compare_state(reference.state_dict(), state)
    if mismatch:
        raise ValueError(
            f"{where}architecture {architecture!r} with model_kwargs {model_kwargs} "
            f"does not describe this model: {mismatch}"
        )

    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"{where}weights_dtype must be one of {', '.join(WEIGHTS_DTYPES)}; got {weights_dtype!r}")
    dtype = WEIGHTS_DTYPES[weights_dtype]
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous().clone()
               for k, v in state.items()}
    files = _shard_files(tensors, shard_mib)
    shas = {f: _sha(b) for f, b in files.items()}
    config = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "architecture": architecture,
        "model_kwargs": model_kwargs,
        "input_size": check_input_size(input_size, where),
        "normalization": check_normalization(normalization, where),
        "threshold": check_threshold(threshold, where),
        **({"weights_dtype": weights_dtype} if weights_dtype != "float32" else {}),
        **({"postprocess": check_postprocess(postprocess, where)} if postprocess else {}),
        "provenance": provenance,
        **({"weights_shards": [{"file": f, "sha256": sha} for f, sha in shas.items()]} if len(shas) > 1 else {}),
        "weights_sha256": _weights_sha256(list(shas.values())),
        "num_parameters": count_parameters(model),
        "unet_version": __version__,
    }
    if not _is_uri(dest):
        Path(dest).mkdir(parents=True, exist_ok=True)
    # Weights first, config last: an interrupted save leaves no config (or a stale sha256),
    # which load_artifact reports instead of silently loading mismatched weights.
    for file, data in files.items():
        _write(dest, file, data)
    _write(dest, CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    _remove_stale_weights(dest, set(files))
    return dest


def _remove_stale_weights(dest: str, keep: set[str]) -> None:
    """Delete weights files of an earlier save into ``dest`` (another sharding) that the new config
    no longer lists; nothing else in ``dest`` is touched."""
    if _is_uri(dest):
        from . import storage

        names = [uri.rsplit("/", 1)[-1] for uri in storage.iter_files(dest, suffixes=(".safetensors",))
                 if uri.rsplit("/", 1)[0].rstrip("/") == dest.rstrip("/")]
        remove = lambda name: storage.delete(storage.join(dest, name), missing_ok=True)  # noqa: E731
    else:
        names = [p.name for p in Path(dest).glob("*.safetensors")]
        remove = lambda name: Path(dest, name).unlink(missing_ok=True)  # noqa: E731
    for name in names:
        if name not in keep and _SHARD_NAME.fullmatch(name):
            remove(name)


def save_ensemble(models: Sequence[str], dest: str, *, name: str = "ensemble",
                  input_size: Sequence[int] | None = None, weights_dtype: str = "float32",
                  provenance: dict | None = None) -> tuple[str, list[LoadedModel], nn.Module]:
    """Load the artifacts ``models`` (names, directories or URIs) and save the ensemble that averages
    them (:func:`unet.models.ensemble.ensemble_of`) at ``dest``; returns (``dest``, the loaded
    artifacts, the :class:`~unet.models.ensemble.Ensemble` saved).

    The ensemble's provenance is ``provenance`` plus ``members``: per member the reference it was
    loaded from, its model id, input size and its own provenance (training config, data, ...). An
    ensemble among ``models`` joins member by member, with its members' entries.

    Raises:
        ValueError: fewer than 2 models, an artifact that is not one, or members that cannot be combined.
    """
    from unet.models.ensemble import ensemble_of

    loaded = [load_artifact(m) for m in models]
    model = ensemble_of(loaded, input_size)
    members = []
    for ref, m in zip(models, loaded, strict=True):
        if m.settings.architecture != "ensemble":
            members.append({"model": str(ref), "model_id": m.model_id, "input_size": list(m.settings.input_size),
                            "provenance": m.config.get("provenance", {})})
            continue
        recorded = m.config.get("provenance", {}).get("members") or []
        if len(recorded) != len(m.model.members):  # an ensemble saved without save_ensemble's record
            recorded = [{"model": f"{ref} member {i}", "model_id": None, "input_size": spec["input_size"],
                         "provenance": {}} for i, spec in enumerate(m.model.member_specs)]
        members += recorded
    written = save_artifact(model, dest, input_size=model.input_size, normalization=model.input_normalization,
                            name=name, weights_dtype=weights_dtype,
                            provenance={**(provenance or {}), "members": members})
    return written, loaded, model


def _parse_config(data: bytes, config_path: str) -> tuple[dict, ModelSettings]:
    where = f"{config_path}: "
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}malformed JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{where}must hold a JSON object; got {type(config).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(
            f"{where}missing key(s) {', '.join(missing)}; re-save the model with unet.artifact.save_artifact"
        )
    version = config["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{where}format_version must be a positive int; got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where}format_version {version} is newer than this unet supports ({FORMAT_VERSION}); upgrade unet"
        )
    settings = ModelSettings.from_config(config, where)
    sha = config["weights_sha256"]
    if not isinstance(sha, str) or len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
        raise ValueError(f"{where}weights_sha256 must be 64 lowercase hex digits; got {sha!r}")
    if not isinstance(config.get("provenance", {}), dict):
        raise ValueError(f"{where}provenance must be a JSON object; got {config['provenance']!r}")
    return config, settings


def load_artifact(name_or_path_or_uri: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    """Load an artifact by pretrained name, local directory or URI; the model comes back in eval mode.

    The config's input size, normalisation and threshold are checked and typed once, here, as
    ``.settings`` (:class:`ModelSettings`); ``.predict(x)`` gives the final logits.

    Raises:
        FileNotFoundError: no such directory/name, or config.json / model.safetensors missing.
        UsageError (a ``ValueError``): malformed config, unknown architecture, weights whose sha256
            differs from the config's, or weights that do not fit the architecture (missing/
            unexpected keys, shapes): the artifact named is not one the jobs can use.
        Each message names the file and the problem.
    """
    try:
        return _load_artifact(name_or_path_or_uri, device)
    except UsageError:
        raise
    except (ValueError, KeyError) as e:
        raise UsageError(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)) from e


def _load_artifact(name_or_path_or_uri: str | os.PathLike, device: str) -> LoadedModel:
    location = _resolve(name_or_path_or_uri)
    config_path = _join(location, CONFIG_NAME)
    config, settings = _parse_config(_read(location, CONFIG_NAME, CONFIG_NAME), config_path)
    architecture = settings.architecture
    model = _build(architecture, config["model_kwargs"], f"{config_path}: ")

    shards = config.get("weights_shards") or [{"file": WEIGHTS_NAME, "sha256": config["weights_sha256"]}]
    tensors, shas = {}, []
    for shard in shards:
        if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and isinstance(shard.get("sha256"), str)
                and _SHARD_NAME.fullmatch(shard["file"])):
            raise ValueError(f"{config_path}: weights_shards entry {shard!r} is not "
                             "{'file': 'model-0000i-of-0000n.safetensors', 'sha256': ...}")
        weights_path = _join(location, shard["file"])
        weights = _read(location, shard["file"], shard["file"])
        shas.append(_sha(weights))
        if shas[-1] != shard["sha256"]:
            raise ValueError(
                f"{weights_path}: sha256 {shas[-1]} does not match {shard['sha256']} in "
                f"{CONFIG_NAME}; the weights were changed or only partly written"
            )
        try:
            tensors.update(safetensors.torch.load(weights))
        except SafetensorError as e:
            raise ValueError(f"{weights_path}: not a readable safetensors file ({e})") from e
    sha = _weights_sha256(shas)
    if sha != config["weights_sha256"]:
        raise ValueError(f"{config_path}: weights_sha256 {config['weights_sha256']} does not match its weights "
                         f"files ({sha}); the artifact was changed or only partly written")
    weights_path = _join(location, shards[0]["file"] if len(shards) == 1 else "model-*.safetensors")
    mismatch = _compare_state(model.state_dict(), tensors)
    if mismatch:
        raise ValueError(
            f"{weights_path}: weights do not fit architecture {architecture!r} with model_kwargs "
            f"{config['model_kwargs']}: {mismatch}"
        )
    model.load_state_dict(tensors, strict=True)
    model.to(device).eval()
    name = config.get("name") or architecture
    return LoadedModel(model=model, config=config, model_id=f"{name}-{sha[:12]}", settings=settings)
