"""Feature taps: named modules of the teacher and the student, read through forward hooks.

* :func:`resolve_module` turns a module path (as in ``model.named_modules()``) into the module, or
  raises :class:`~edgeus.errors.EdgeusError` naming the missing path and the nearest existing ones.
* :func:`default_feature_module` picks the last feature stage of a model: the outermost module whose
  output is the tensor fed to the last global pooling layer (``AdaptiveAvgPool2d`` & co.), found by
  one probe forward pass; without a pooling module, the last module (in execution order) that
  returns an ``N x C x H x W`` map with ``H * W > 1``.
* :class:`FeatureTaps` holds the hook handles. Hooks record only while :meth:`FeatureTaps.capture`
  is active, and :meth:`FeatureTaps.close` removes every handle it registered.

Pre-ReLU tapping (Heo et al., ICCV 2019): for a named module that *ends* with a ReLU (a ``ReLU`` /
``ReLU6`` module called last inside it, as in ResNet blocks: ``relu(bn3(...) + identity)``), the
tap records the input of that last ReLU call instead of the module's output. Whether the module
really ends with that ReLU is checked in the probe pass (``relu(captured) == output``); when it
does not (functional ``F.relu``, a pooling or linear last op), the output is tapped and the report
says so.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from edgeus.errors import EdgeusError

_RELUS = (nn.ReLU, nn.ReLU6)
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)


def model_label(model: nn.Module) -> str:
    arch = getattr(model, "edgeus_arch", None)
    return arch["name"] if arch else type(model).__name__


def nearby_names(path: str, names: list[str], n: int = 6) -> list[str]:
    """Existing module paths closest to ``path`` (difflib), else the siblings / top-level ones."""
    names = [x for x in names if x]
    close = difflib.get_close_matches(path, names, n=n, cutoff=0.5)
    if close:
        return close
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    if parent and parent in names:
        kids = [x for x in names if x.rsplit(".", 1)[0] == parent and x.count(".") == parent.count(".") + 1]
        if kids:
            return kids[:n]
    return [x for x in names if "." not in x][:n]


def resolve_module(model: nn.Module, path: str, role: str = "model") -> nn.Module:
    modules = dict(model.named_modules())
    if path in modules and path != "":
        return modules[path]
    near = nearby_names(path, list(modules))
    raise EdgeusError(
        f"{role} ({model_label(model)}) has no module {path!r}; nearby names: {', '.join(near) or '(none)'} "
        "(module paths as in model.named_modules())"
    )


def validate_pairs(teacher: nn.Module, student: nn.Module, pairs: list) -> list[tuple[str, str]]:
    """Check every ``[teacher_module, student_module]`` pair; the error names what is missing."""
    t_names, s_names = dict(teacher.named_modules()), dict(student.named_modules())
    out = []
    for i, pair in enumerate(pairs):
        pair = list(pair)
        if len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
            raise EdgeusError(f"distill.pairs[{i}] must be [teacher_module, student_module], got {pair}")
        t, s = pair
        t_ok, s_ok = t in t_names, s in s_names
        if t_ok and s_ok:
            out.append((t, s))
            continue
        if not t_ok and not s_ok and t in s_names and s in t_names:
            raise EdgeusError(
                f"distill.pairs[{i}] = [{t}, {s}] looks swapped: pairs are [teacher_module, student_module]"
            )
        if not t_ok:
            resolve_module(teacher, t, f"distill.pairs[{i}]: teacher")
        resolve_module(student, s, f"distill.pairs[{i}]: student")
    return out


def _is_map(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[2] * x.shape[3] > 1


@torch.no_grad()
def default_feature_module(model: nn.Module, example: torch.Tensor) -> str:
    """Path of the last feature stage (see the module docstring for the rule)."""
    order: list[tuple[str, torch.Tensor]] = []
    pool_inputs: list[torch.Tensor] = []
    handles = []

    def post(name):
        def hook(mod, inp, out):
            if isinstance(mod, _POOLS) and inp and isinstance(inp[0], torch.Tensor):
                pool_inputs.append(inp[0])
            if isinstance(out, torch.Tensor):
                order.append((name, out))
        return hook

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(post(name)))
    was = model.training
    try:
        model.eval()
        model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if pool_inputs:
        target = pool_inputs[-1]
        producers = [n for n, o in order if o is target or (
            o.shape == target.shape and o.data_ptr() == target.data_ptr())]
        if producers:
            depth = min(p.count(".") for p in producers)
            return [p for p in producers if p.count(".") == depth][-1]
    maps = [n for n, o in order if _is_map(o)]
    if not maps:
        raise EdgeusError(
            f"cannot find a feature map in {model_label(model)} for feature distillation; "
            "name the layers with distill.pairs=[[teacher_module,student_module]]"
        )
    return maps[-1]


class _Tap:
    """One tapped module: its output, or the input of its final ReLU (pre-ReLU)."""

    def __init__(self, model: nn.Module, path: str, pre_relu: bool, store: dict, key):
        self.path, self.key, self.store = path, key, store
        self.module = dict(model.named_modules())[path]
        self.relu_path: str | None = None
        self.note = ""
        self.handles: list = []
        self.active = False
        self._pre = None
        if pre_relu:
            self.relu_path = self._find_final_relu(model)

    # -- resolution -------------------------------------------------------------------------
    def _find_final_relu(self, model: nn.Module) -> str | None:
        if isinstance(self.module, _RELUS):
            return self.path
        relus = [(n, m) for n, m in self.module.named_modules() if isinstance(m, _RELUS)]
        if not relus:
            self.note = f"pre_relu: {self.path!r} has no ReLU module; its output is tapped"
            return None
        return "probe"  # decided in verify() from the probe pass

    def verify_pre_relu(self, model: nn.Module, example: torch.Tensor) -> None:
        """Probe pass: find the ReLU called last inside the module and check it makes the output."""
        if self.relu_path is None:
            return
        prefix = self.path
        relus = {(f"{prefix}.{n}" if n else prefix): m for n, m in self.module.named_modules()
                 if isinstance(m, _RELUS)}
        calls: list[tuple[str, torch.Tensor]] = []
        result: dict = {}
        inside = [False]
        handles = [self.module.register_forward_pre_hook(lambda m, i: inside.__setitem__(0, True))]

        def end(m, i, o):
            inside[0] = False
            result["out"] = o
        handles.append(self.module.register_forward_hook(end))
        for name, m in relus.items():
            def pre(mod, inp, name=name):
                if inside[0] or mod is self.module:
                    calls.append((name, inp[0].detach().clone()))
            handles.append(m.register_forward_pre_hook(pre))
        was = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(example)
        finally:
            for h in handles:
                h.remove()
            model.train(was)
        out = result.get("out")
        if not calls or not isinstance(out, torch.Tensor):
            self.note = f"pre_relu: no ReLU ran inside {self.path!r}; its output is tapped"
            self.relu_path = None
            return
        name, pre_act = calls[-1]
        relu = relus[name]
        if pre_act.shape == out.shape and torch.allclose(relu(pre_act.clone()), out, atol=1e-5):
            self.relu_path = name
            self.note = f"pre_relu: tapped the input of {name!r}"
        else:
            self.note = f"pre_relu: {self.path!r} does not end with a ReLU module; its output is tapped"
            self.relu_path = None

    # -- hooks ------------------------------------------------------------------------------
    def register(self, model: nn.Module) -> None:
        if self.relu_path is not None:
            relu = dict(model.named_modules())[self.relu_path]

            def pre(mod, inp):
                if self.active:
                    self._pre = inp[0].clone()  # ReLU(inplace=True) would overwrite it
            self.handles.append(relu.register_forward_pre_hook(pre))

            def post(mod, inp, out):
                if self.active and self._pre is not None:
                    self.store[self.key] = self._pre
            self.handles.append(self.module.register_forward_hook(post))
        else:
            def post(mod, inp, out):
                if self.active:
                    self.store[self.key] = out
            self.handles.append(self.module.register_forward_hook(post))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._pre = None


class FeatureTaps:
    """Forward hooks on ``[teacher_module, student_module]`` pairs.

    ``taps.capture("student")`` records the student's tapped features into ``taps.student``
    (a dict pair index -> tensor) for the duration of the ``with`` block; same for the teacher.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, pairs: list[tuple[str, str]],
                 pre_relu: bool = False, example: torch.Tensor | None = None):
        self.pairs = list(pairs)
        self.teacher: dict[int, torch.Tensor] = {}
        self.student: dict[int, torch.Tensor] = {}
        self._taps = {"teacher": [], "student": []}
        for i, (t, s) in enumerate(self.pairs):
            self._taps["teacher"].append(_Tap(teacher, t, pre_relu, self.teacher, i))
            self._taps["student"].append(_Tap(student, s, pre_relu, self.student, i))
        if pre_relu and example is not None:
            for tap in self._taps["teacher"]:
                tap.verify_pre_relu(teacher, example)
            for tap in self._taps["student"]:
                tap.verify_pre_relu(student, example)
        elif pre_relu:
            for tap in self._taps["teacher"] + self._taps["student"]:
                if tap.relu_path == "probe":
                    tap.relu_path, tap.note = None, "pre_relu: no probe input; output tapped"
        for tap in self._taps["teacher"]:
            tap.register(teacher)
        for tap in self._taps["student"]:
            tap.register(student)

    @contextmanager
    def capture(self, which: str) -> Iterator[dict]:
        store = self.teacher if which == "teacher" else self.student
        store.clear()
        for tap in self._taps[which]:
            tap.active = True
        try:
            yield store
        finally:
            for tap in self._taps[which]:
                tap.active = False
                tap._pre = None

    def notes(self) -> list[str]:
        return [f"{w} {t.note}" for w in ("teacher", "student") for t in self._taps[w] if t.note]

    def close(self) -> None:
        for taps in self._taps.values():
            for tap in taps:
                tap.remove()
        self.teacher.clear()
        self.student.clear()


def count_hooks(model: nn.Module) -> int:
    """Forward (pre-)hooks registered on a model's modules: for leak checks."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
