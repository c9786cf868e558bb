"""The distiller: student + frozen teacher + weighted loss terms, one small class per method.

Every loss term has the same constructor shape, ``Term(cfg, info)``: ``cfg`` is the distill
config (each term reads only its own keys), ``info`` a :class:`TermInfo` with what the data and the
probe pass know (class weights, feature shapes of each pair). Its ``forward(out: Outputs)`` returns
an unweighted scalar; the :class:`Distiller` multiplies it by the term's weight.

The distiller follows mdistiller's shape, so the trainer (``edgeus.train.fit``) treats it like
``Supervised``: ``.student``, ``forward_train(batch) -> (student_logits, {name: weighted_loss})``,
``parameters()`` (the teacher's are frozen, adapters' are trainable), ``train(mode)`` (the teacher
stays in eval). ``close()`` (or leaving a ``with`` block) removes its forward hooks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeus.errors import EdgeusError

LOSSES: dict[str, type["LossTerm"]] = {}

# weight of each term when distill.weights does not name it
DEFAULT_WEIGHTS = {"ce": 1.0, "kd": 1.0, "dkd": 1.0, "fitnet": 1.0, "at": 1000.0}


def register_loss(cls: type["LossTerm"]) -> type["LossTerm"]:
    LOSSES[cls.name] = cls
    return cls


@dataclass
class PairInfo:
    teacher: str                      # module path in the teacher
    student: str                      # module path in the student
    teacher_shape: tuple              # (C, H, W) at the probe input size
    student_shape: tuple


@dataclass
class TermInfo:
    num_classes: int
    class_weights: torch.Tensor | None = None
    pairs: list[PairInfo] = field(default_factory=list)


@dataclass
class Outputs:
    """What one training step gives every term."""
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    labels: torch.Tensor
    student_feats: list = field(default_factory=list)   # one tensor per pair
    teacher_feats: list = field(default_factory=list)
    epoch: float | None = None                          # fractional epoch (for warm-ups)


class LossTerm(nn.Module):
    """One loss method. Subclasses set ``name`` and implement ``forward(out) -> scalar``."""

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True     # needs teacher logits
    needs_features: ClassVar[bool] = False   # needs the tapped feature pairs
    class_weighted: ClassVar[bool] = False   # weights each image by its class (info.class_weights), as CE does

    def __init__(self, cfg, info: TermInfo):
        super().__init__()
        if self.class_weighted:
            w = info.class_weights
            self.register_buffer("class_weights", None if w is None else torch.as_tensor(w, dtype=torch.float32))

    def sample_weight(self, out: Outputs) -> torch.Tensor | None:
        """Each image's class weight (None without class weights): for a class-weighted batch mean."""
        return None if self.class_weights is None else self.class_weights[out.labels.long()]

    def forward(self, out: Outputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return self.name


@register_loss
class CE(LossTerm):
    """Cross-entropy with the labels, class-weighted when the data gives weights."""

    name = "ce"
    needs_teacher = False
    class_weighted = True

    def forward(self, out: Outputs) -> torch.Tensor:
        return F.cross_entropy(out.student_logits, out.labels, weight=self.class_weights)


def _cfg_get(cfg, key, default=None):
    return getattr(cfg, key, default) if cfg is not None else default


def resolve_weights(cfg) -> dict[str, float]:
    """The weight of each requested term: weights.<name>, else alpha (ce/kd), else the default."""
    losses = [str(x) for x in (_cfg_get(cfg, "losses") or [])]
    if not losses:
        raise EdgeusError("distill.losses is empty; name at least one of " + ", ".join(LOSSES))
    unknown = [x for x in losses if x not in LOSSES]
    if unknown:
        import difflib
        hints = {u: difflib.get_close_matches(u, LOSSES, n=1) for u in unknown}
        raise EdgeusError(
            "unknown distill loss(es) " + ", ".join(
                f"{u!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for u, h in hints.items())
            + f"; available: {', '.join(LOSSES)}"
        )
    if len(set(losses)) != len(losses):
        raise EdgeusError(f"distill.losses names a term twice: {losses}")
    given = dict(_cfg_get(cfg, "weights") or {})
    stray = [k for k in given if k not in losses]
    if stray:
        raise EdgeusError(f"distill.weights names {stray} which distill.losses {losses} does not use")
    alpha = _cfg_get(cfg, "alpha")
    weights = {}
    for name in losses:
        if alpha is not None and name in ("ce", "kd"):
            if name in given:
                raise EdgeusError(f"set either distill.alpha or distill.weights.{name}, not both")
            weights[name] = (1.0 - float(alpha)) if name == "ce" else float(alpha)
        else:
            weights[name] = float(given.get(name, DEFAULT_WEIGHTS.get(name, 1.0)))
    return weights


class Distiller(nn.Module):
    """Student, frozen teacher, and the weighted loss terms (``nn.ModuleDict``)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, terms: dict[str, LossTerm],
                 weights: dict[str, float], taps=None, pairs: list[PairInfo] | None = None,
                 cache_teacher: bool = False, steps_per_epoch: int | None = None, cache: dict | None = None):
        super().__init__()
        if student is teacher:
            raise EdgeusError("the student and the teacher are the same model object; copy the student first")
        self.student = student
        self.teacher = teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.terms = nn.ModuleDict(terms)
        self.weights = dict(weights)
        self.taps = taps
        self.pairs = list(pairs or [])
        self.needs_features = any(t.needs_features for t in terms.values())
        self.needs_teacher = self.needs_features or any(t.needs_teacher for t in terms.values())
        self.cache_teacher = bool(cache_teacher)
        # index -> (logits, [features]); a caller may pass one dict to share across runs with the
        # same teacher, data and pairs
        self._cache: dict[int, tuple] = cache if cache is not None else {}
        self.cache_hits = 0
        self.steps_per_epoch = steps_per_epoch
        self._steps = 0
        self._epoch: float | None = None
        # without steps_per_epoch or set_epoch: epochs are counted by train(True) calls (the
        # trainer calls it once per epoch) and their length learned from the previous epoch
        self._epochs_done = 0
        self._steps_in_epoch = 0
        self._learned_spe = 0
        self.teacher.eval()

    # -- mode ---------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        if mode and self._steps_in_epoch:
            self._epochs_done += 1
            self._learned_spe = self._steps_in_epoch
            self._steps_in_epoch = 0
        self.training = mode
        for module in self.children():
            module.train(mode)
        self.teacher.eval()
        return self

    def set_epoch(self, epoch: float) -> None:
        """Called by a trainer that knows the epoch; otherwise steps / steps_per_epoch is used."""
        self._epoch = float(epoch)
        if self.steps_per_epoch:
            self._steps = int(round(epoch * self.steps_per_epoch))

    @property
    def epoch(self) -> float:
        """Fractional epoch of the training step about to run (for warm-ups)."""
        if self.steps_per_epoch:
            return self._steps / self.steps_per_epoch
        if self._epoch is not None:
            return self._epoch
        frac = self._steps_in_epoch / self._learned_spe if self._learned_spe else 0.0
        return self._epochs_done + min(frac, 1.0)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    @torch.no_grad()
    def _teacher(self, image: torch.Tensor, index: torch.Tensor | None) -> tuple[torch.Tensor, list]:
        """Teacher logits and tapped features; from the cache when every sample of the batch is in it.

        The cache (``cache_teacher``) is keyed by ``batch["index"]`` and valid only when the train
        split is not augmented (the same index always gives the same image).
        """
        keys = [int(i) for i in index.tolist()] if (self.cache_teacher and index is not None) else None
        if keys is not None and all(k in self._cache for k in keys):
            self.cache_hits += 1
            rows = [self._cache[k] for k in keys]
            logits = torch.stack([r[0] for r in rows]).to(image.device)
            feats = [torch.stack([r[1][j] for r in rows]).to(image.device) for j in range(len(self.pairs))]
            return logits, feats
        if self.needs_features:
            with self.taps.capture("teacher") as store:
                logits = self.teacher(image)
                feats = [store[i] for i in range(len(self.pairs))]
        else:
            logits, feats = self.teacher(image), []
        if keys is not None:
            cpu_feats = [f.detach().cpu() for f in feats]
            for n, (k, row) in enumerate(zip(keys, logits.detach().cpu())):
                self._cache[k] = (row, [f[n] for f in cpu_feats])
        return logits, feats

    def _teacher_logits(self, image: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        return self._teacher(image, index)[0]

    def forward_train(self, batch: dict):
        device = next(self.student.parameters()).device
        image = batch["image"].to(device)
        labels = batch["label"].to(device)
        index = batch.get("index")
        t_feats: list = []
        t_logits = None
        if self.needs_features and self.taps is None:
            raise EdgeusError("this distiller was closed (its feature hooks are removed); build a new one")
        if self.needs_teacher:
            t_logits, t_feats = self._teacher(image, index)
        if self.needs_features:
            with self.taps.capture("student") as store:
                s_logits = self.student(image)
                s_feats = [store[i] for i in range(len(self.pairs))]
        else:
            s_logits, s_feats = self.student(image), []
        out = Outputs(s_logits, t_logits, labels, s_feats, t_feats, epoch=self.epoch)
        losses = {name: self.weights[name] * term(out) for name, term in self.terms.items()}
        aux = getattr(self.student, "auxiliary_loss", None)
        if callable(aux):
            losses.update(aux(batch) or {})
        if self.training:
            self._steps += 1
            self._steps_in_epoch += 1
        return s_logits, losses

    # -- hooks --------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the forward hooks (idempotent)."""
        if self.taps is not None:
            self.taps.close()
            self.taps = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def describe(self) -> dict:
        return {
            "losses": list(self.terms),
            "weights": dict(self.weights),
            "pairs": [{"teacher": p.teacher, "student": p.student, "teacher_shape": list(p.teacher_shape),
                       "student_shape": list(p.student_shape)} for p in self.pairs],
            "feature_taps": self.taps.notes() if self.taps is not None else [],
            "cache_teacher": self.cache_teacher,
            "adapter_params": sum(p.numel() for p in self.terms.parameters()),
        }
