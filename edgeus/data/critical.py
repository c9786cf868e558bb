"""The clinically critical class of each dataset, and the class names a ``data`` section will have,
told without decoding an image: what ``gates.critical_class=auto`` resolves to at compose time, and
what an explicit ``gates.critical_class`` is checked against before anything runs."""
from __future__ import annotations

from edgeus.errors import ConfigError

AUTO = "auto"


def _tmed2_critical(data) -> str | None:
    return {"as_binary": "AS", "as_severity": "Severe_AS"}.get(str(getattr(data, "scheme", None)))


# the clinically critical class of each dataset (None: no class is more critical than another)
DATASET_CRITICAL = {
    "phantom": lambda data: "malignant",
    "busi": lambda data: "malignant",
    "folder": lambda data: "malignant",      # used only when the folder tree has a 'malignant' class
    "tmed2": _tmed2_critical,
    "camus": lambda data: None,              # echo views: none is more critical than another
}


def known_classes(data) -> list[str] | None:
    """The class names ``data`` (a ``data`` section) will have, found without decoding an image; None
    when they cannot be told before the data is read (a folder tree that is not there yet)."""
    from pathlib import Path

    name = str(getattr(data, "name", "") or "")
    asked = list(data.classes) if getattr(data, "classes", None) else None
    try:
        if name == "phantom":
            from edgeus.data import phantom

            return asked or list(phantom.CLASSES)
        if name == "tmed2":
            from edgeus.data.readers import SCHEMES

            return list(SCHEMES[str(data.scheme)][0]) if str(data.scheme) in SCHEMES else None
        if name == "camus":
            from edgeus.data import camus

            return asked or list(camus.LABELS[camus.scheme_of(None)])
        if name in ("busi", "folder"):
            if asked:
                return asked
            root = Path(str(data.root)).expanduser() if getattr(data, "root", None) else None
            if root is None or not root.is_dir():
                return ["benign", "malignant", "normal"] if name == "busi" else None
            return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except Exception:   # the data reader will say what is wrong with the data itself
        return None
    return None


def resolve_critical_class(critical: str | None, data) -> str | None:
    """``gates.critical_class`` as a class name: ``auto`` becomes the dataset's own critical class
    (:data:`DATASET_CRITICAL`) when the data has it, else None; any other value is returned unchanged."""
    if critical is None or str(critical) != AUTO:
        return critical
    pick = DATASET_CRITICAL.get(str(getattr(data, "name", "")), lambda d: None)(data)
    classes = known_classes(data)
    if pick is None or (classes is not None and pick not in classes) or (classes is None and
                                                                         str(data.name) == "folder"):
        return None
    return pick


def check_critical_class(gates, data) -> None:
    """Refuse, before anything runs, a ``gates.critical_class`` that is not a class of ``data``, naming
    the valid ones (and the dataset's own critical class, when it has one)."""
    critical = getattr(gates, "critical_class", None)
    if critical is None:
        return
    if str(critical) == AUTO:
        critical = resolve_critical_class(critical, data)
        if critical is None:
            return
    classes = known_classes(data)
    if classes is None or critical in classes:
        return
    own = resolve_critical_class(AUTO, data)
    what = f"data={data.name}" + (f" scheme={data.scheme}" if str(data.name) == "tmed2" else "")
    hint = (f"gates.critical_class={own} (this dataset's critical class), " if own else "") + \
        "gates.critical_class=auto (the dataset's own) or gates.critical_class=null (no class named first)"
    raise ConfigError(f"gates.critical_class={critical!r} is not a class of {what}; its classes are "
                      f"{', '.join(classes)}. Use one of them, {hint}")
