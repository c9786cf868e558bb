"""Desktop viewer: teacher and student predictions, probabilities and saliency side by side.

    edgeus view runs/<run>                       # a compress run directory
    edgeus view runs/<run>/07-package/bundle     # a bundle (inside its run: with the teacher)
    edgeus view runs/<run> scans/                # open a folder of images straight away

Needs the optional ``[app]`` extra (PySide6-Essentials, LGPL): ``pip install 'edgeus[app]'``;
saliency overlays use captum (a dependency of edgeus). The list flags images on which teacher and
student disagree; lesion masks beside images (``<name>_mask.png``) are outlined and scored.
"""
from __future__ import annotations

from edgeus.errors import UsageError

USAGE = "<run dir | bundle> [images or folders ...]"


def run(cfg, args):
    opts = [a for a in args if a.startswith("--")]
    pos = [a for a in args if not a.startswith("--")]
    if opts:
        raise UsageError(f"unknown option {opts[0]}; usage: edgeus view {USAGE}")
    if not pos:
        raise UsageError(f"expected a run directory or bundle; usage: edgeus view {USAGE}")
    from edgeus.app import viewer

    return viewer().main(pos[0], pos[1:] or None)
