"""What a run shows while it trains: means over a window and an epoch, chance levels, console lines and the
warnings a user should see (unmixed batches, collapsing projections). Pure Python plus torch tensors in."""

from __future__ import annotations

import math
import time

import torch

from crossmoco_ray.evaluate.paired import gain_text

LOSS_KEYS = ("loss", "loss_point", "loss_image", "loss_cross")
# the monitor's numbers; Ray Train's reports carry the last measured ones through epochs without a monitor
# (so Tune always sees its metric), MLflow and the history hold only the epochs that measured them
MONITOR_KEYS = tuple(
    f"{prefix}{key}" for prefix in ("", "gain_") for key in ("val_svm_clean", "val_knn", "val_svm_crosspoint")
)
BATCH_MIX_WARNING = 0.6  # warn when batches hold fewer than this share of an i.i.d. batch's classes


def chance_levels(
    queue_length: int, cross_batch: int, weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> dict[str, float]:
    """Each loss at chance: InfoNCE over ``1 + K`` candidates, NT-Xent over ``2N − 1`` (N: the objects
    whose embeddings are the cross-modal candidates); the total with the objective's weights."""
    info_nce = math.log(1 + queue_length)
    nt_xent = math.log(2 * cross_batch - 1)
    w_point, w_image, w_cross = weights
    return {
        "chance_loss_point": info_nce,
        "chance_loss_image": info_nce,
        "chance_loss_cross": nt_xent,
        "chance_loss": (w_point + w_image) * info_nce + w_cross * nt_xent,
    }


def distinct_count(labels: torch.Tensor) -> torch.Tensor:
    """How many distinct values ``labels`` holds, as a tensor on its device (no host read, any range)."""
    ordered = labels.reshape(-1).sort().values
    return (ordered[1:] != ordered[:-1]).sum() + 1


class EpochMeter:
    """Means of every scalar the step returns (losses, top-1s, diagnostics) plus ``batch_classes``,
    throughput and time spent waiting for data, for a window and for the epoch.

    The step's scalars stay on its device: :meth:`add` sums them there, and they are read back once per
    window (:meth:`take_window`), per epoch (:meth:`epoch_summary`) or when asked whether the loss stayed
    finite (:meth:`loss_finite`): the only places where a GPU step waits for its device.
    """

    def __init__(self, global_batch: int) -> None:
        self.global_batch = global_batch
        self.keys: tuple[str, ...] = ()
        self._window: torch.Tensor | None = None  # sums of the steps since the last window, on the device
        self._epoch: torch.Tensor | None = None  # sums of the windows taken
        self.epoch_steps = self.window_steps = 0
        self.epoch_wait = self.window_wait = 0.0
        self.epoch_start = self.window_start = time.perf_counter()

    def add(self, out: dict[str, torch.Tensor], wait: float, labels: torch.Tensor | None = None) -> None:
        """One step's outputs (its scalars), the seconds it waited for data and its batch's labels."""
        values = {k: v for k, v in out.items() if v.numel() == 1}
        if labels is not None:
            values["batch_classes"] = distinct_count(labels)
        keys = tuple(values)
        if self.keys and keys != self.keys:
            raise ValueError(f"the step's outputs changed within an epoch: {self.keys} then {keys}")
        self.keys = keys
        # one stack (promoting to the widest dtype) and one cast: two launches on a GPU, not one per scalar
        row = torch.stack([v.detach().reshape(()) for v in values.values()]).to(torch.float64)
        self._window = row if self._window is None else self._window.add_(row)
        self.epoch_steps += 1
        self.window_steps += 1
        self.epoch_wait += wait
        self.window_wait += wait

    def loss_finite(self) -> bool:
        """Whether every loss since the last window was finite (reads one value back)."""
        if self._window is None:
            return True
        return math.isfinite(float(self._window[self.keys.index("loss")]))

    def _means(self, sums: torch.Tensor | None, steps: int) -> dict[str, float]:
        out = {k: math.nan for k in self.keys}
        if sums is not None:
            out.update(zip(self.keys, (v / max(steps, 1) for v in sums.tolist()), strict=True))
        out.setdefault("batch_classes", math.nan)
        return out

    def _rates(self, steps: int, wait: float, seconds: float) -> dict[str, float]:
        return {
            "samples_per_s": steps * self.global_batch / max(seconds, 1e-9),
            "data_wait": wait / max(seconds, 1e-9),
        }

    def take_window(self) -> dict[str, float]:
        now = time.perf_counter()
        out = self._means(self._window, self.window_steps)
        out |= self._rates(self.window_steps, self.window_wait, now - self.window_start)
        if self._window is not None:
            self._epoch = self._window if self._epoch is None else self._epoch.add_(self._window)
        self._window, self.window_steps, self.window_wait, self.window_start = None, 0, 0.0, now
        return out

    def epoch_summary(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.epoch_start
        parts = [t for t in (self._epoch, self._window) if t is not None]
        total = parts[0] + parts[1] if len(parts) == 2 else (parts[0] if parts else None)
        out = self._means(total, self.epoch_steps)
        out |= self._rates(self.epoch_steps, self.epoch_wait, seconds)
        out["epoch_seconds"] = seconds
        return out


def health_warnings(summary: dict[str, float], iid_classes: float) -> list[str]:
    """Warnings a user should see at the end of an epoch: unmixed batches, collapsing projections."""
    out = []
    classes = summary.get("batch_classes", math.nan)
    if iid_classes >= 2 and classes == classes and classes < BATCH_MIX_WARNING * iid_classes:
        out.append(
            f"warning: a worker batch held {classes:.1f} classes on average where an i.i.d. batch holds "
            f"{iid_classes:.1f}: the training data is not class-mixed (BatchNorm then normalises the class "
            "away and in-batch negatives share it). Re-run `crossmoco prepare` (it writes rows in random "
            "order) or raise data.shuffle_window_mb."
        )
    spread = summary.get("point_proj_spread", math.nan)
    if spread == spread and spread < 0.1:
        out.append(
            f"warning: the point projections are collapsing (unit-vector spread {spread:.3f}, ~1 when "
            "healthy): lower optim.lr or raise objective.temperature"
        )
    return out


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}%"


def progress_line(
    epoch: int,
    epochs: int,
    in_epoch: int,
    steps_per_epoch: int,
    w: dict[str, float],
    lr: float,
    m: float,
    chance: dict[str, float],
) -> str:
    """The log window's line: ``in_epoch`` of ``steps_per_epoch`` steps of the epoch done."""
    return (
        f"epoch {epoch + 1}/{epochs} step {in_epoch}/{steps_per_epoch} | loss {w['loss']:.3f} "
        f"(point {w['loss_point']:.3f}/{chance['chance_loss_point']:.2f} "
        f"image {w['loss_image']:.3f}/{chance['chance_loss_image']:.2f} "
        f"cross {w['loss_cross']:.3f}/{chance['chance_loss_cross']:.2f} of chance) | "
        f"top-1 point {100 * w['point_top1']:.0f}% image {100 * w['image_top1']:.0f}% "
        f"cross {100 * w.get('cross_top1', math.nan):.0f}% | "
        f"classes/batch {w.get('batch_classes', math.nan):.1f} | "
        f"lr {lr:.2e} m {m:.4f} | {w['samples_per_s']:.1f} samples/s | data wait {100 * w['data_wait']:.0f}%"
    )


def epoch_line(epoch: int, epochs: int, s: dict[str, float], iid_classes: float) -> str:
    iid = f" (i.i.d. {iid_classes:.1f})" if iid_classes else ""
    return (
        f"== epoch {epoch + 1}/{epochs} done in {s['epoch_seconds']:.0f}s | loss {s['loss']:.3f} | "
        f"top-1 point {100 * s['point_top1']:.0f}% image {100 * s['image_top1']:.0f}% "
        f"cross {100 * s.get('cross_top1', math.nan):.0f}% | align/uniform point "
        f"{s.get('point_align', math.nan):.2f}/{s.get('point_uniform', math.nan):.2f} | "
        f"classes/batch {s.get('batch_classes', math.nan):.1f}{iid} | "
        f"{s['samples_per_s']:.1f} samples/s | data wait {100 * s['data_wait']:.0f}%"
    )


def monitor_line(s: dict[str, float], base: dict[str, float]) -> str:
    """The monitor's epoch line: each accuracy beside random init's, the gain ± its paired standard error
    in points and the verdict (above / below only when ``|gain| ≥ 2·SE``, else within noise; SE unknown
    when random init's per-object results were not kept), e.g. ``clean SVM 88.1% (random init 85.0%,
    +3.1 ± 1.2, above)``."""
    parts = []
    for key, name in (
        ("val_svm_clean", "clean SVM"),
        ("val_knn", "kNN"),
        ("val_svm_crosspoint", "CrossPoint SVM"),
    ):
        if key not in s:
            continue
        random = base.get(f"random_{key}", math.nan)
        gain, se = s.get(f"gain_{key}", s[key] - random), s.get(f"gain_{key}_se", math.nan)
        parts.append(
            f"{name} {_pct(s[key])} (random init {_pct(random)}, {gain_text(gain, se, 1, short=True)})"
        )
    rank, base_rank = s.get("val_feature_rank", math.nan), base.get("random_val_feature_rank", math.nan)
    return "   val: " + " | ".join(parts) + f" | feature rank {rank:.0f} (random init {base_rank:.0f})"


def baseline_line(base: dict[str, float]) -> str:
    return (
        f"monitor, random init: clean SVM {_pct(base.get('random_val_svm_clean', math.nan))} | "
        f"kNN {_pct(base.get('random_val_knn', math.nan))} | "
        f"CrossPoint SVM {_pct(base.get('random_val_svm_crosspoint', math.nan))} "
        f"({base.get('random_monitor_seconds', math.nan):.0f}s)"
    )
