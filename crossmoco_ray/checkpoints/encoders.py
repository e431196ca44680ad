"""Point encoders in and out: pretraining checkpoints, exported backbones, CrossPoint / CrossMoCo files.

Formats read by :func:`load_point_encoder`:

- a crossmoco-ray **checkpoint** (a directory with ``state.pt``, or the file): the online point encoder
  ``point_q.*`` of the CrossMoCo state, architecture from the checkpoint's resolved config;
- an **exported backbone** (``crossmoco export``: a directory with ``backbone.pt`` + ``meta.json``);
- **CrossPoint / CrossMoCo** files: a DGCNN state dict (optionally under ``state_dict`` / ``model_state_dict``
  / ``model``), CrossMoCo's ``[q_state_dict, k_state_dict]`` list (q is used), any ``module.``-style
  prefixes; the architecture is read off the weight shapes (``emb_dims``, projection size) and ``k`` comes
  from the caller (CrossPoint used 15 for the SVM and 5 for few-shot).

Loading is strict: every key must match in name and shape; the only keys allowed to be missing are the
projection head's, and only when the file has no head at all (exported backbones).

Every file read here may be damaged or hostile: a checkpoint's stored config is bounded and validated
like ``--config`` (:func:`~crossmoco_ray.config.validation.validate_stored`), ``meta.json`` is read up to a
size, every tensor must hold the data its shape claims, and the encoder is first built on the ``meta`` device
and matched against the file's shapes, so that no size written in a file is allocated before the file's
own tensors confirm it. Each problem is a ``ValueError`` (or ``ConfigError``) naming the file.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crossmoco_ray.architecture import point_encoder_spec
from crossmoco_ray.bounded import clip, first_line, short_repr
from crossmoco_ray.checkpoints.state import FORMAT as CHECKPOINT_FORMAT
from crossmoco_ray.checkpoints.state import (
    STATE_FILE,
    checked_state,
    load_torch_file,
    model_and_config,
    read_checkpoint,
)
from crossmoco_ray.config.serialized import config_hash
from crossmoco_ray.config.validation import validate_stored
from crossmoco_ray.nn import POINT_ENCODERS, build_point_encoder, load_checked, strip_prefixes
from crossmoco_ray.nn.normalize import normalize_clouds

BACKBONE_FORMAT = "crossmoco-ray/backbone"
BACKBONE_FILE = "backbone.pt"
META_FILE = "meta.json"
MAX_META_BYTES = 1 << 20  # meta.json is a few hundred bytes
MAX_KEY_CHARS = 300  # a parameter name of a state dict


@dataclass
class LoadedEncoder:
    """A point encoder ready for feature extraction, and where it came from."""

    encoder: nn.Module
    name: str  # architecture, e.g. "dgcnn"
    kwargs: dict[str, Any]
    source: str  # "checkpoint", "backbone", "crosspoint", "random-init"
    info: dict[str, Any] = field(default_factory=dict)  # epoch, config hash, run id … when known
    # centre + unit sphere before the encoder, as its training did (data.point_augment.normalize)
    normalize: bool = True


class PointFeatures(nn.Module):
    """A point encoder as one function for users of an exported model (the MLflow model's class).

    ``forward(points)``: clouds ``[B, N, 3]`` float32 in any units → pooled backbone features ``[B, F]``
    float32 (``encoder.forward_features``: 2·emb_dims for DGCNN, emb_dims for PointNet). When
    ``normalize`` (the training recipe's ``data.point_augment.normalize``), each cloud is first centred
    and scaled to the unit sphere in float64, exactly as evaluation does (:func:`extract_features`), so the
    features are the ones the linear SVM saw. Always in eval mode (BatchNorm uses its running statistics).
    """

    def __init__(self, encoder: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder.eval()
        self.normalize = normalize
        self.feature_dim = int(getattr(encoder, "feature_dim", 0))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            points = normalize_clouds(points.double()).float()
        out: torch.Tensor = self.encoder.forward_features(points)  # type: ignore[operator]
        return out

    def train(self, mode: bool = True) -> PointFeatures:
        return super().train(False)  # a feature extractor: never BatchNorm's batch statistics


def feature_model(loaded: LoadedEncoder, edgeconv: str = "reference") -> PointFeatures:
    """:class:`PointFeatures` of a loaded encoder; a DGCNN is rebuilt with ``edgeconv`` (the same
    parameters and function). The reference EdgeConv is the one ``torch.export`` traces for any batch size
    and point count; the fast one builds CPU-only sparse products and chunks that depend on the batch."""
    encoder = loaded.encoder
    if "edgeconv" in loaded.kwargs and loaded.kwargs["edgeconv"] != edgeconv:
        encoder = build_point_encoder(loaded.name, **{**loaded.kwargs, "edgeconv": edgeconv})
        encoder.load_state_dict(loaded.encoder.state_dict())
    return PointFeatures(encoder, loaded.normalize)


def _torch_load(path: Path) -> Any:
    return load_torch_file(path)


def _state_dict(obj: Any, path: Path | str, what: str = "state dict") -> dict[str, torch.Tensor]:
    """``obj`` when it is a state dict whose tensors hold the data their shapes claim; else a
    ``ValueError`` naming ``path``. (A crafted tensor of stride 0 claims any size from one stored value:
    an architecture read off its shape would be allocated at that size.)"""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: the {what} is a {type(obj).__name__}, not a mapping of tensors")
    for key, value in obj.items():
        if not isinstance(key, str) or len(key) > MAX_KEY_CHARS:
            raise ValueError(f"{path}: the {what} has a key that is no parameter name: {short_repr(key, 80)}")
        if not isinstance(value, torch.Tensor):
            got = type(value).__name__
            raise ValueError(f"{path}: the {what}'s {clip(key, 80)} is a {got}, not a tensor")
        if value.numel() and value.untyped_storage().nbytes() < value.numel() * value.element_size():
            raise ValueError(
                f"{path}: the {what}'s {clip(key, 80)} claims shape {tuple(value.shape)} but stores less "
                "data than that (a damaged or crafted file)"
            )
    return obj


def _read_meta(file: Path) -> dict[str, Any]:
    """``meta.json`` beside an export (``{}`` when absent), bounded; a damaged one is a named error."""
    if not file.is_file():
        return {}
    with file.open("rb") as f:
        blob = f.read(MAX_META_BYTES + 1)
    if len(blob) > MAX_META_BYTES:
        raise ValueError(f"{file} is larger than {MAX_META_BYTES >> 20} MiB: not an export's meta.json")
    try:
        meta = json.loads(blob)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{file}: not valid JSON ({first_line(str(err))})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: holds a {type(meta).__name__}, not the mapping an export writes")
    return meta


def _plain(value: Any) -> Any:
    """A field of a file kept for reports (epoch, run id, ...): plain scalars only, text cut short."""
    if isinstance(value, str):
        return clip(value, 200)
    return value if value is None or isinstance(value, (bool, int, float)) else None


def random_encoder(name: str = "dgcnn", seed: int = 0, **kwargs: Any) -> LoadedEncoder:
    """A randomly initialised encoder of the given architecture (the evaluation baseline)."""
    torch.manual_seed(seed)
    return LoadedEncoder(build_point_encoder(name, **kwargs), name, kwargs, "random-init", {"seed": seed})


def _rows(state: dict[str, torch.Tensor], key: str) -> int:
    """The first dimension of ``state[key]`` (a layer's width), or a ``ValueError`` when it has none."""
    value = state[key]
    if value.dim() == 0:
        raise ValueError(f"{key} is a scalar, not a layer's weight")
    return int(value.shape[0])


def _infer_dgcnn_kwargs(state: dict[str, torch.Tensor], k: int) -> dict[str, Any]:
    if "conv5.0.weight" not in state:
        keys = ", ".join(clip(key, 60) for key in list(state)[:8])
        raise ValueError(f"not a DGCNN state dict: no 'conv5.0.weight' (keys: {keys} …)")
    kwargs: dict[str, Any] = {"k": k, "emb_dims": _rows(state, "conv5.0.weight")}
    if "inv_head.0.weight" in state and "inv_head.3.weight" in state:
        kwargs["head_hidden"] = _rows(state, "inv_head.0.weight")
        kwargs["proj_dim"] = _rows(state, "inv_head.3.weight")
    return kwargs


def _head_keys(encoder: nn.Module) -> set[str]:
    return {key for key in encoder.state_dict() if key.startswith("inv_head.")}


def _load_into(
    name: str,
    kwargs: dict[str, Any],
    state: dict[str, torch.Tensor],
    what: str,
    ignored_unexpected: tuple[str, ...] = (),
) -> nn.Module:
    """Encoder ``name(**kwargs)`` with ``state`` loaded, strictly. The encoder is built on the ``meta``
    device first (no memory) and matched against ``state``, so sizes read from a file are allocated only
    once the file's tensors have those shapes."""
    if name not in POINT_ENCODERS:
        raise ValueError(
            f"{what}: unknown point encoder {short_repr(name, 60)}; known: {sorted(POINT_ENCODERS)}"
        )
    has_head = any(key.startswith("inv_head.") for key in state)
    try:
        with torch.device("meta"):
            probe = build_point_encoder(name, **kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{what}: cannot build a {name} encoder from {short_repr(kwargs)}: {first_line(str(err))}"
        ) from None
    allowed = () if has_head else _head_keys(probe)
    check = dict(allowed_missing=allowed, ignored_unexpected=ignored_unexpected, what=what)
    with warnings.catch_warnings():  # loading into meta tensors copies nothing, and torch says so per key
        warnings.simplefilter("ignore", UserWarning)
        load_checked(probe, state, **check)  # type: ignore[arg-type]
    encoder = build_point_encoder(name, **kwargs)
    load_checked(encoder, state, **check)  # type: ignore[arg-type]
    return encoder


def load_point_encoder(path: str | Path, k: int = 15, edgeconv: str = "fast") -> LoadedEncoder:
    """The point encoder stored at ``path`` (any format above), on CPU, in eval mode."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        if (path / BACKBONE_FILE).is_file():
            path = path / BACKBONE_FILE
        elif (path / STATE_FILE).is_file():
            path = path / STATE_FILE
        else:
            raise ValueError(
                f"{path} holds neither {STATE_FILE} (a checkpoint) nor {BACKBONE_FILE} (an export)"
            )
    obj = _torch_load(path)

    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        model, config = model_and_config(checked_state(obj, path), path)
        cfg, _ = validate_stored(config, str(path))  # an older version's removed options are dropped
        spec = point_encoder_spec(cfg.model)
        model = _state_dict(model, path, "checkpoint's model")
        state = {key[len("point_q.") :]: v for key, v in model.items() if key.startswith("point_q.")}
        encoder = _load_into(spec["name"], spec["kwargs"], state, str(path))
        info = {
            "epoch": _plain(obj.get("epoch")),
            "step": _plain(obj.get("step")),
            "config_hash": config_hash(cfg),
            "mlflow_run_id": _plain(obj.get("mlflow_run_id")),
        }
        normalize = cfg.data.point_augment.normalize
        return LoadedEncoder(encoder.eval(), spec["name"], spec["kwargs"], "checkpoint", info, normalize)

    if isinstance(obj, dict) and obj.get("format") == BACKBONE_FORMAT:
        meta = _read_meta(path.parent / META_FILE)
        name, kwargs = _backbone_architecture(obj, path)
        if "edgeconv" in kwargs:
            kwargs["edgeconv"] = edgeconv
        state = _state_dict(obj.get("point_encoder"), path, "exported point encoder")
        encoder = _load_into(name, kwargs, state, str(path))
        normalize = bool(obj.get("normalize", True))
        return LoadedEncoder(encoder.eval(), name, kwargs, "backbone", meta, normalize)

    # Foreign (CrossPoint / CrossMoCo) formats
    if isinstance(obj, (list, tuple)):
        if not obj or not isinstance(obj[0], dict):
            raise ValueError(f"{path}: a list checkpoint should be CrossMoCo's [q_state_dict, k_state_dict]")
        obj = obj[0]  # the online (query) encoder
    if isinstance(obj, dict):
        for inner in ("state_dict", "model_state_dict", "model"):
            if inner in obj and isinstance(obj[inner], dict):
                obj = obj[inner]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict, a [q, k] list, a checkpoint or an exported backbone")
    state = strip_prefixes(_state_dict(obj, path))
    try:
        if (
            "conv6.0.weight" in state
        ):  # DGCNN_partseg (CrossPoint's --model dgcnn_seg), pretrained or fine-tuned
            return _load_partseg_encoder(state, k, path)
        kwargs = {**_infer_dgcnn_kwargs(state, k), "edgeconv": edgeconv}
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    encoder = _load_into("dgcnn", kwargs, state, str(path))
    return LoadedEncoder(encoder.eval(), "dgcnn", kwargs, "crosspoint", {"file": str(path)})


def _backbone_architecture(obj: dict[str, Any], path: Path) -> tuple[str, dict[str, Any]]:
    """The architecture and constructor arguments an export names, checked to be plain: a known encoder,
    positive ints (and the EdgeConv variant)."""
    name, kwargs = obj.get("architecture"), obj.get("kwargs")
    if not isinstance(name, str) or name not in POINT_ENCODERS:
        raise ValueError(
            f"{path}: the export's architecture {short_repr(name, 60)} is none of {sorted(POINT_ENCODERS)}"
        )
    if not isinstance(kwargs, dict):
        raise ValueError(f"{path}: the export's kwargs are a {type(kwargs).__name__}, not a mapping")
    for key, value in kwargs.items():
        plain_int = type(value) is int and value > 0
        if not (plain_int or (key == "edgeconv" and value in ("fast", "reference"))):
            raise ValueError(
                f"{path}: the export's kwargs hold {short_repr(key, 60)}={short_repr(value, 60)}, not an "
                "encoder setting (a positive int)"
            )
    return name, dict(kwargs)


SEG_HEAD = ("conv7.", "conv8.", "conv9.", "conv10.", "conv11.", "bn7.", "bn8.", "bn9.", "bn10.")


def _load_partseg_encoder(state: dict[str, torch.Tensor], k: int, path: Path) -> LoadedEncoder:
    """The encoder of a ``DGCNN_partseg`` state dict (a fine-tuned file's segmentation head is left out)."""
    kwargs: dict[str, Any] = {"k": k, "emb_dims": _rows(state, "conv6.0.weight")}
    if "inv_head.0.weight" in state and "inv_head.3.weight" in state:
        kwargs["head_hidden"] = _rows(state, "inv_head.0.weight")
        kwargs["proj_dim"] = _rows(state, "inv_head.3.weight")
    encoder = _load_into("dgcnn_seg", kwargs, state, str(path), ignored_unexpected=SEG_HEAD)
    return LoadedEncoder(encoder.eval(), "dgcnn_seg", kwargs, "crosspoint", {"file": str(path)})


def export_backbone(checkpoint: str | Path, out: str | Path, with_image: bool = False) -> Path:
    """Write the point encoder's backbone (no projection head) + ``meta.json`` to ``out``; returns ``out``."""
    ckpt = read_checkpoint(checkpoint)
    model, config = model_and_config(ckpt, checkpoint)
    cfg, _ = validate_stored(config, str(checkpoint))
    spec = point_encoder_spec(cfg.model)
    model_state = _state_dict(model, checkpoint, "checkpoint's model")
    backbone = {
        key[len("point_q.") :]: v
        for key, v in model_state.items()
        if key.startswith("point_q.") and not key.startswith("point_q.inv_head.")
    }
    # What is written must load: the backbone is matched against its architecture first (a checkpoint
    # without the encoder's weights would otherwise export "successfully" and fail only when used).
    _load_into(spec["name"], spec["kwargs"], backbone, f"{checkpoint} (its point encoder)")
    payload: dict[str, Any] = {
        "format": BACKBONE_FORMAT,
        "architecture": spec["name"],
        "kwargs": spec["kwargs"],
        "point_encoder": backbone,
        "normalize": cfg.data.point_augment.normalize,  # how its inputs were prepared in training
    }
    if with_image:
        payload["image_encoder"] = {
            key[len("image_q.resnet.") :]: v
            for key, v in model_state.items()
            if key.startswith("image_q.resnet.")
        }
        payload["image_architecture"] = cfg.model.image_encoder
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{BACKBONE_FILE}.tmp"
    torch.save(payload, tmp)
    tmp.replace(out / BACKBONE_FILE)
    feature_dim = 2 * cfg.model.emb_dims if spec["name"] == "dgcnn" else cfg.model.emb_dims
    meta = {
        "format": BACKBONE_FORMAT,
        "architecture": spec["name"],
        "kwargs": spec["kwargs"],
        "feature_dim": feature_dim,
        "normalize": cfg.data.point_augment.normalize,
        "image_encoder": cfg.model.image_encoder if with_image else None,
        "config_hash": config_hash(cfg),
        "source_checkpoint": str(Path(checkpoint).resolve()),
        "source_run": _plain(ckpt.get("mlflow_run_id")),
        "run_name": _plain(ckpt.get("run_name")),
        "epoch": _plain(ckpt.get("epoch")),
        "step": _plain(ckpt.get("step")),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return out


EXAMPLE_BATCH = 2  # > 1, and the example's sizes differ from each other and from 3: see example_points


def example_points(k: int, batch: int = EXAMPLE_BATCH) -> Any:
    """The input example a model is traced with: ``[batch, N, 3]`` float32, N ≥ k.

    ``torch.export`` treats an example size of 1 as a constant, and gives dimensions of equal example
    size one shared symbol, so batch, N and 3 are all different here (else the model would only accept
    clouds with N == batch).
    """
    import numpy as np

    n = max(2 * k, 16)
    while n in (batch, 3):
        n += 1
    return np.random.default_rng(0).standard_normal((batch, n, 3)).astype(np.float32)


def exported_feature_model(export_dir: str | Path) -> tuple[PointFeatures, Any, dict[str, Any]]:
    """An exported backbone (``crossmoco export`` / ``<run>/export``) as what an MLflow model is logged
    from (:meth:`crossmoco_ray.tracking.Tracker.log_point_model`): the feature model, the example it is
    traced on, and the export's ``meta.json`` with how it normalises its input."""
    loaded = load_point_encoder(export_dir)
    meta = _read_meta(Path(export_dir) / META_FILE)
    example = example_points(int(loaded.kwargs.get("k", 1)))
    return feature_model(loaded), example, {**meta, "normalize": loaded.normalize}
