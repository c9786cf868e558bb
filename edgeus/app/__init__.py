"""The desktop viewer (``edgeus view``): needs the optional ``[app]`` extra (PySide6-Essentials, LGPL).

Importing this package does not import Qt; :func:`viewer` does, and says how to install it when it
is missing."""
from __future__ import annotations


def viewer():
    """The :mod:`edgeus.app.viewer` module (imports PySide6)."""
    try:
        import PySide6  # noqa: F401
    except ImportError:
        from edgeus.errors import MissingDependencyError

        raise MissingDependencyError("the viewer needs Qt for Python: pip install 'edgeus[app]' "
                                     "(PySide6-Essentials)") from None
    from edgeus.app import viewer as v

    return v
