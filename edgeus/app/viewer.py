"""A desktop viewer (Qt for Python, PySide6 — LGPL): teacher and student side by side.

    edgeus view runs/<run>                 # a compress run: teacher, deployed student, their torch models
    edgeus view runs/<run>/07-package/bundle   # a bundle (inside its run: the teacher too)

Open images or a folder; the list flags every image on which teacher and student disagree; the
selected image shows each model's class and probabilities and its Grad-CAM overlay (captum, when
installed), the lesion outlined where a mask lies beside the image (``<name>_mask.png``), with the
fraction of the map inside the lesion.

The student's prediction is the deployed model's (the bundle's / run's INT8 ONNX on ONNX Runtime);
its saliency map is its torch model's (the last torch stage the INT8 file was made from), because
Grad-CAM needs gradients. The window's state is readable (:meth:`ViewerWindow.shown`) so that a
headless test (``QT_QPA_PLATFORM=offscreen``) can drive it and check what it shows.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QColor, QImage, QPixmap
from PySide6.QtWidgets import (QApplication, QFileDialog, QGridLayout, QGroupBox, QHBoxLayout, QLabel, QListWidget,
                               QListWidgetItem, QMainWindow, QProgressBar, QSplitter, QStatusBar, QVBoxLayout, QWidget)

from edgeus import explain as E

PANEL_PX = 256
DISAGREE_BG = QColor("#f8d7da")


@dataclass
class Entry:
    path: Path
    probs: dict = field(default_factory=dict)        # model name -> probabilities [K]
    cams: dict | None = None                         # model name -> CAM [H, W] (computed when shown)
    img01: np.ndarray | None = None
    mask: np.ndarray | None = None

    def classes_of(self) -> dict:
        return {k: int(np.argmax(p)) for k, p in self.probs.items()}

    @property
    def disagree(self) -> bool:
        return len(set(self.classes_of().values())) > 1


def to_pixmap(rgb: np.ndarray, size: int = PANEL_PX) -> QPixmap:
    rgb = np.ascontiguousarray(rgb, np.uint8)
    h, w, _ = rgb.shape
    img = QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
    return QPixmap.fromImage(img).scaled(size, size, Qt.AspectRatioMode.KeepAspectRatio,
                                         Qt.TransformationMode.SmoothTransformation)


class ModelPanel(QGroupBox):
    """One model: its overlay, its class and a bar per class."""

    def __init__(self, title: str, classes: list[str]):
        super().__init__(title)
        self.classes = classes
        lay = QVBoxLayout(self)
        self.image = QLabel()
        self.image.setFixedSize(PANEL_PX, PANEL_PX)
        self.image.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.image.setStyleSheet("background:#111")
        lay.addWidget(self.image)
        self.verdict = QLabel("–")
        self.verdict.setStyleSheet("font-weight:bold;font-size:14px")
        lay.addWidget(self.verdict)
        grid = QGridLayout()
        self.bars = {}
        for i, c in enumerate(classes):
            grid.addWidget(QLabel(c), i, 0)
            bar = QProgressBar()
            bar.setRange(0, 1000)
            bar.setFormat("%p%")
            bar.setTextVisible(True)
            grid.addWidget(bar, i, 1)
            self.bars[c] = bar
        lay.addLayout(grid)
        self.note = QLabel("")
        self.note.setWordWrap(True)
        lay.addWidget(self.note)

    def show_result(self, rgb: np.ndarray, probs: np.ndarray | None, note: str = "") -> None:
        self.image.setPixmap(to_pixmap(rgb))
        if probs is None:
            self.verdict.setText("–")
            for bar in self.bars.values():
                bar.setValue(0)
        else:
            k = int(np.argmax(probs))
            self.verdict.setText(f"{self.classes[k]}  {probs[k]:.2f}")
            for c, p in zip(self.classes, probs):
                self.bars[c].setValue(int(round(float(p) * 1000)))
                self.bars[c].setFormat(f"{float(p):.3f}")
        self.note.setText(note)


class ViewerWindow(QMainWindow):
    def __init__(self, source: str | Path, images=None, cam: bool = True):
        super().__init__()
        self.source = Path(source)
        self.setWindowTitle(f"edgeus view — {self.source.name}")
        self._load_models()
        self.cam = cam and importlib.util.find_spec("captum") is not None
        self.entries: list[Entry] = []
        self._layers = {}

        toolbar = self.addToolBar("files")
        for text, slot in (("Open images…", self.open_images_dialog), ("Open folder…", self.open_folder_dialog)):
            act = QAction(text, self)
            act.triggered.connect(slot)
            toolbar.addAction(act)

        self.list = QListWidget()
        self.list.setMinimumWidth(300)
        self.list.currentRowChanged.connect(self.show_entry)
        right = QWidget()
        rlay = QVBoxLayout(right)
        self.banner = QLabel("Open images or a folder (toolbar) to compare teacher and student.")
        self.banner.setWordWrap(True)
        self.banner.setStyleSheet("font-size:14px;padding:6px")
        rlay.addWidget(self.banner)
        row = QHBoxLayout()
        self.image_panel = QGroupBox("image")
        il = QVBoxLayout(self.image_panel)
        self.image_label = QLabel()
        self.image_label.setFixedSize(PANEL_PX, PANEL_PX)
        self.image_label.setStyleSheet("background:#111")
        il.addWidget(self.image_label)
        self.image_info = QLabel("")
        self.image_info.setWordWrap(True)
        il.addWidget(self.image_info)
        il.addStretch(1)
        row.addWidget(self.image_panel)
        self.panels = {}
        for name in self.models:
            p = ModelPanel(self.titles[name], self.classes)
            self.panels[name] = p
            row.addWidget(p)
        rlay.addLayout(row)
        rlay.addStretch(1)
        split = QSplitter()
        split.addWidget(self.list)
        split.addWidget(right)
        split.setStretchFactor(1, 1)
        self.setCentralWidget(split)
        self.setStatusBar(QStatusBar())
        self.statusBar().showMessage(self.describe)
        if images:
            self.open_paths(images)

    # ------------------------------------------------------------------ models
    def _load_models(self) -> None:
        """Predictors: the teacher (torch) and the deployed student (ONNX), with the student's torch
        model for its saliency; a lone bundle has only its student."""
        deployed = E.open_model(self.source)
        run = deployed.run_dir or E.find_run(self.source)
        pair = E.torch_pair(run) if run else {}
        self.models: dict[str, E.Model] = {}
        self.titles: dict[str, str] = {}
        self.explainers: dict[str, E.Model] = {}
        if "teacher" in pair:
            self.models["teacher"] = pair["teacher"]
            self.titles["teacher"] = f"teacher ({pair['teacher'].path.parent.name})"
            self.explainers["teacher"] = pair["teacher"]
        self.models["student"] = deployed
        self.titles["student"] = f"student ({deployed.path.name})"
        if "student" in pair:
            self.explainers["student"] = pair["student"]
        elif deployed.kind == "torch":
            self.explainers["student"] = deployed
        self.classes = deployed.classes
        self.run_dir = run
        self.describe = (f"{'run ' + run.name if run else 'bundle ' + self.source.name}: "
                         + ", ".join(f"{k}: {m.describe}" for k, m in self.models.items())
                         + ("" if "teacher" in self.models else " (no teacher: open the run directory to compare)"))

    # ------------------------------------------------------------------ images
    def open_images_dialog(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(self, "Open ultrasound images", "",
                                                "Images (*.png *.jpg *.jpeg *.bmp *.tif *.tiff)")
        if files:
            self.open_paths(files)

    def open_folder_dialog(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Open a folder of images")
        if d:
            self.open_paths([d])

    def open_paths(self, paths) -> None:
        """Add images (files or folders): predict them with every model, flag disagreements."""
        files = E.list_images([str(p) for p in paths])
        new = []
        for f in files:
            e = Entry(path=Path(f))
            for name, m in self.models.items():
                _, x = E.load_image(f, m.preprocessing)
                e.probs[name] = m.predict(x[None])[0]
            new.append(e)
        start = len(self.entries)
        self.entries += new
        for e in new:
            item = QListWidgetItem(self._item_text(e))
            if e.disagree:
                item.setBackground(DISAGREE_BG)
                item.setToolTip("teacher and student disagree")
            self.list.addItem(item)
        n_dis = sum(e.disagree for e in self.entries)
        self.statusBar().showMessage(f"{len(self.entries)} image(s); teacher and student disagree on {n_dis}. "
                                     + self.describe)
        if new:
            self.list.setCurrentRow(start)

    def _item_text(self, e: Entry) -> str:
        cls = e.classes_of()
        verdicts = " · ".join(f"{n[0].upper()}: {self.classes[k]}" for n, k in cls.items())   # T: teacher, S: student
        return f"{'⚠ ' if e.disagree else ''}{e.path.name} — {verdicts}"

    # ------------------------------------------------------------------ showing one
    def _cams(self, e: Entry) -> dict:
        import torch

        out = {}
        for name, m in self.explainers.items():
            if name not in self._layers:
                self._layers[name] = E.cam_layer(m.module, m.preprocessing)[1]
            _, x = E.load_image(e.path, m.preprocessing)
            target = int(np.argmax(e.probs[name]))
            out[name] = E.gradcam(m.module, torch.from_numpy(x[None]), target=[target], layer=self._layers[name])[0]
        return out

    def show_entry(self, row: int) -> None:
        if row < 0 or row >= len(self.entries):
            return
        e = self.entries[row]
        pre = self.models["student"].preprocessing
        if e.img01 is None:
            e.img01, _ = E.load_image(e.path, pre)
            e.mask = E.find_mask(e.path, int(pre["image_size"]))
        if self.cam and e.cams is None:
            e.cams = self._cams(e)
        mask = e.mask if e.mask is not None and e.mask.any() else None
        base = E.overlay(e.img01, None)
        if mask is not None:
            base = base.copy()
            base[E.mask_outline(mask)] = (255, 255, 255)
        self.image_label.setPixmap(to_pixmap(base))
        self.image_info.setText(f"{e.path.name}\n{'lesion mask outlined' if mask is not None else 'no lesion mask'}")
        for name, panel in self.panels.items():
            cam = (e.cams or {}).get(name)
            rgb = E.overlay(e.img01, cam if cam is not None and cam.shape == e.img01.shape else None)
            note = ""
            if mask is not None:
                rgb = rgb.copy()
                rgb[E.mask_outline(mask)] = (255, 255, 255)
                if cam is not None and cam.shape == mask.shape:
                    fr, pg = E.lesion_fraction(cam, mask), E.pointing_game(cam, mask)
                    note = (f"Grad-CAM inside the lesion: {fr:.2f} of its mass; peak "
                            f"{'inside' if pg else 'outside'}") if fr is not None else ""
            if cam is None and self.cam is False:
                note = (note + "\n" if note else "") + "saliency: captum is missing (pip install captum)"
            elif cam is None:
                note = (note + "\n" if note else "") + "saliency: no torch model behind this model"
            panel.show_result(rgb, e.probs[name], note)
        cls = {k: self.classes[v] for k, v in e.classes_of().items()}
        if e.disagree:
            self.banner.setText(f"⚠ DISAGREEMENT on {e.path.name}: "
                                + ", ".join(f"{k} says {v}" for k, v in cls.items()))
            self.banner.setStyleSheet("font-size:14px;padding:6px;background:#f8d7da;color:#842029;font-weight:bold")
        else:
            self.banner.setText(f"{e.path.name}: " + ("both say " if len(cls) > 1 else "") +
                                next(iter(cls.values())))
            self.banner.setStyleSheet("font-size:14px;padding:6px;background:#d1e7dd;color:#0f5132")

    def shown(self) -> dict:
        """What the window shows now (for tests and scripting)."""
        return {"banner": self.banner.text(),
                "items": [self.list.item(i).text() for i in range(self.list.count())],
                "flagged": [i for i in range(self.list.count())
                            if self.list.item(i).background().color() == DISAGREE_BG],
                "row": self.list.currentRow(),
                "panels": {k: {"title": p.title(), "verdict": p.verdict.text(),
                               "bars": {c: b.value() / 1000 for c, b in p.bars.items()},
                               "note": p.note.text(), "has_image": not p.image.pixmap().isNull()}
                           for k, p in self.panels.items()}}


def main(source, images=None) -> int:
    app = QApplication.instance() or QApplication([])
    w = ViewerWindow(source, images)
    w.resize(1250, 640)
    w.show()
    return app.exec()
