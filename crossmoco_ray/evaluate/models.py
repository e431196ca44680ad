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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import config_hash, validate_stored
from ..nn import build_point_encoder, load_checked, strip_prefixes
from ..train.builders import point_encoder_spec
from ..train.checkpoint import FORMAT as CHECKPOINT_FORMAT
from ..train.checkpoint import STATE_FILE, read_checkpoint
from .features import normalize_clouds

BACKBONE_FORMAT = "crossmoco-ray/backbone"
BACKBONE_FILE = "backbone.pt"
META_FILE = "meta.json"


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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable PyTorch file ({type(err).__name__}: {err})") from err


def random_encoder(name: str = "dgcnn", seed: int = 0, **kwargs: Any) -> LoadedEncoder:
    """A randomly initialised encoder of the given architecture (the evaluation baseline)."""
    torch.manual_seed(seed)
    return LoadedEncoder(build_point_encoder(name, **kwargs), name, kwargs, "random-init", {"seed": seed})


def _infer_dgcnn_kwargs(state: dict[str, torch.Tensor], k: int) -> dict[str, Any]:
    if "conv5.0.weight" not in state:
        raise ValueError(
            "not a DGCNN state dict: no 'conv5.0.weight' (keys: " + ", ".join(list(state)[:8]) + " …)"
        )
    kwargs: dict[str, Any] = {"k": k, "emb_dims": int(state["conv5.0.weight"].shape[0])}
    if "inv_head.0.weight" in state:
        kwargs["head_hidden"] = int(state["inv_head.0.weight"].shape[0])
        kwargs["proj_dim"] = int(state["inv_head.3.weight"].shape[0])
    return kwargs


def _head_keys(encoder: nn.Module) -> set[str]:
    return {key for key in encoder.state_dict() if key.startswith("inv_head.")}


def _load_into(name: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor], what: str) -> nn.Module:
    encoder = build_point_encoder(name, **kwargs)
    has_head = any(key.startswith("inv_head.") for key in state)
    load_checked(encoder, state, allowed_missing=() if has_head else _head_keys(encoder), what=what)
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
        cfg, _ = validate_stored(obj["config"])  # an older version's removed options are dropped
        spec = point_encoder_spec(cfg.model)
        state = {key[len("point_q.") :]: v for key, v in obj["model"].items() if key.startswith("point_q.")}
        encoder = _load_into(spec["name"], spec["kwargs"], state, str(path))
        info = {
            "epoch": obj.get("epoch"),
            "step": obj.get("step"),
            "config_hash": config_hash(cfg),
            "mlflow_run_id": obj.get("mlflow_run_id"),
        }
        normalize = cfg.data.point_augment.normalize
        return LoadedEncoder(encoder.eval(), spec["name"], spec["kwargs"], "checkpoint", info, normalize)

    if isinstance(obj, dict) and obj.get("format") == BACKBONE_FORMAT:
        meta = (
            json.loads((path.parent / META_FILE).read_text()) if (path.parent / META_FILE).is_file() else {}
        )
        name, kwargs = obj["architecture"], dict(obj["kwargs"])
        if "edgeconv" in kwargs:
            kwargs["edgeconv"] = edgeconv
        encoder = _load_into(name, kwargs, obj["point_encoder"], str(path))
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
    state = strip_prefixes(obj)
    if "conv6.0.weight" in state:  # DGCNN_partseg (CrossPoint's --model dgcnn_seg), pretrained or fine-tuned
        return _load_partseg_encoder(state, k, path)
    kwargs = {**_infer_dgcnn_kwargs(state, k), "edgeconv": edgeconv}
    encoder = _load_into("dgcnn", kwargs, state, str(path))
    return LoadedEncoder(encoder.eval(), "dgcnn", kwargs, "crosspoint", {"file": str(path)})


SEG_HEAD = ("conv7.", "conv8.", "conv9.", "conv10.", "conv11.", "bn7.", "bn8.", "bn9.", "bn10.")


def _load_partseg_encoder(state: dict[str, torch.Tensor], k: int, path: Path) -> LoadedEncoder:
    """The encoder of a ``DGCNN_partseg`` state dict (a fine-tuned file's segmentation head is left out)."""
    kwargs: dict[str, Any] = {"k": k, "emb_dims": int(state["conv6.0.weight"].shape[0])}
    if "inv_head.0.weight" in state:
        kwargs["head_hidden"] = int(state["inv_head.0.weight"].shape[0])
        kwargs["proj_dim"] = int(state["inv_head.3.weight"].shape[0])
    encoder = build_point_encoder("dgcnn_seg", **kwargs)
    has_head = any(key.startswith("inv_head.") for key in state)
    load_checked(
        encoder,
        state,
        allowed_missing=() if has_head else _head_keys(encoder),
        ignored_unexpected=SEG_HEAD,
        what=str(path),
    )
    return LoadedEncoder(encoder.eval(), "dgcnn_seg", kwargs, "crosspoint", {"file": str(path)})


def export_backbone(checkpoint: str | Path, out: str | Path, with_image: bool = False) -> Path:
    """Write the point encoder's backbone (no projection head) + ``meta.json`` to ``out``; returns ``out``."""
    ckpt = read_checkpoint(checkpoint)
    cfg, _ = validate_stored(ckpt["config"])
    spec = point_encoder_spec(cfg.model)
    model_state = ckpt["model"]
    backbone = {
        key[len("point_q.") :]: v
        for key, v in model_state.items()
        if key.startswith("point_q.") and not key.startswith("point_q.inv_head.")
    }
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
        "source_run": ckpt.get("mlflow_run_id"),
        "run_name": ckpt.get("run_name"),
        "epoch": ckpt.get("epoch"),
        "step": ckpt.get("step"),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return out
