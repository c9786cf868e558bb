"""The run report: ``report.md`` (figures beside it) and a self-contained ``report.html``
(figures embedded), written from the run directory's ledger, gates and robustness results."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from edgeus.pipeline.ledger import markdown  # noqa: E402


def _model_rows(rows):
    return [r for r in rows if r.get("metrics")]


def fig_waterfall(rows, path: Path) -> Path:
    rows = [r for r in _model_rows(rows) if not r["stage"].startswith("baseline")]
    names = [r["stage"] for r in rows]
    series = [("size on disk (MB)", [(r.get("bytes") or 0) / 2**20 for r in rows]),
              ("MACs (M)", [(r.get("macs") or 0) / 1e6 for r in rows]),
              ("ONNX Runtime CPU latency (ms)", [r.get("latency_ms") or 0 for r in rows]),
              ("test accuracy", [r["metrics"]["accuracy"] for r in rows])]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (title, vals) in zip(axes, series):
        bars = ax.bar(range(len(vals)), vals, color=["#4c72b0"] + ["#55a868"] * (len(vals) - 1))
        ax.set_xticks(range(len(vals)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
        if title == "test accuracy":
            ax.set_ylim(0, 1.05)
    fig.suptitle("Stage waterfall (teacher first)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig_scatter(rows, path: Path) -> Path:
    rows = [r for r in _model_rows(rows) if r.get("latency_ms") and r["stage"] != "export"]  # export = the last model, as ONNX
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (key, label) in zip(axes, (("latency_ms", "ONNX Runtime CPU latency, batch 1 (ms)"),
                                       ("bytes", "size on disk (MB)"))):
        for r in rows:
            x = r[key] if key == "latency_ms" else (r.get("bytes") or 0) / 2**20
            base = r["stage"].startswith("baseline")
            teacher = r["stage"] == "teacher"
            ax.scatter(x, r["metrics"]["accuracy"], s=60, marker="s" if base else "o",
                       color="#c44e52" if base else "#4c72b0" if teacher else "#55a868", zorder=3)
            ax.annotate(r["stage"], (x, r["metrics"]["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].set_title("accuracy vs latency (up and left is better)", fontsize=10)
    axes[1].set_title("accuracy vs size (up and left is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig_confusion(teacher, student, classes, path: Path) -> Path:
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, (title, row) in zip(axes, (("teacher", teacher), (f"final student ({student['stage']})", student))):
        cm = np.asarray(row["metrics"]["confusion"])
        ax.imshow(cm, cmap="Blues")
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=30)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig_robustness(rob: dict, path: Path) -> Path:
    kinds = [k for k in rob["teacher"] if k != "clean"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for name, style in (("teacher", "-o"), ("student", "--s")):
            pts = [(0.0, rob[name]["clean"]["accuracy"])] + [(p["strength"], p["accuracy"]) for p in rob[name][kind]]
            ax.plot(*zip(*pts), style, label=name)
        ax.set_title(kind, fontsize=10)
        ax.set_xlabel("strength")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Robustness to ultrasound corruptions", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    ledger = json.loads((run_dir / "ledger.json").read_text())
    state = json.loads((run_dir / "state.json").read_text())
    rob = json.loads((run_dir / "robustness.json").read_text()) if (run_dir / "robustness.json").is_file() else None
    rows, classes, gates = ledger["rows"], ledger["classes"], ledger.get("gates", [])
    figs = run_dir / "figures"
    figs.mkdir(exist_ok=True)
    images = {}
    models = _model_rows(rows)
    if models:
        images["Stage waterfall"] = fig_waterfall(rows, figs / "waterfall.png")
        images["Accuracy vs latency and size"] = fig_scatter(rows, figs / "scatter.png")
        teacher = next((r for r in models if r["stage"] == "teacher"), None)
        final = [r for r in models if not r["stage"].startswith("baseline")][-1]
        if teacher and final is not teacher:
            images["Confusion matrices"] = fig_confusion(teacher, final, classes, figs / "confusion.png")
    if rob:
        images["Robustness"] = fig_robustness(rob, figs / "robustness.png")

    bundle = state.get("artifacts", {}).get("bundle")
    failed = [g for g in gates if not g["passed"]]
    md = [f"# edgeus report — {ledger['recipe']} on {ledger['data']}", "",
          f"Run directory: `{run_dir}`", ""]
    md.append(f"**Gates:** {'all passed' if gates and not failed else 'not evaluated' if not gates else f'{len(failed)} FAILED'}"
              + (f" · **Bundle:** `{bundle}` (verify with `edgeus verify {bundle}`)" if bundle else ""))
    md += ["", "## Ledger", "", "Latency: ONNX Runtime on this machine's CPU, batch 1, median, measured interleaved "
           "with the teacher in the same run; speed-up = teacher ms / stage ms.", "",
           markdown(rows, classes, None), ""]
    if gates:
        md += ["## Clinical gates", "", "| stage | metric | teacher | student | change | limit | result |",
               "|---|---|---|---|---|---|---|"]
        for g in gates:
            md.append(f"| {g['stage']} | {g['metric']} | {g['teacher']:.3f} | {g['student']:.3f} | "
                      f"{g['change'] * 100:+.1f} pt | {g['limit'] * 100:.1f} pt | {'pass' if g['passed'] else '**FAIL**'} |")
        md.append("")
    if rob:
        s = rob.get("summary", {})
        md += ["## Robustness", "",
               f"Mean accuracy lost under corruption: teacher {s.get('teacher_mean_drop', 0) * 100:.1f} points, "
               f"student {s.get('student_mean_drop', 0) * 100:.1f} points — compression "
               + ("**made the model more fragile**." if s.get("more_fragile") else "did not make it more fragile "
                  "(within 2 points)."), ""]
    for title, p in images.items():
        md += [f"## {title}", "", f"![{title}](figures/{p.name})", ""]
    (run_dir / "report.md").write_text("\n".join(md))

    body = []
    for line in md:
        if line.startswith("!["):
            name = line[line.index("(") + 1:-1]
            data = base64.b64encode((run_dir / name).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
        else:
            body.append(line)
    page = _md_to_html("\n".join(body))
    (run_dir / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>edgeus report</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}code{background:#f3f3f3;padding:1px 3px}"
        "</style></head><body>" + page + "</body></html>")
    return {"md": run_dir / "report.md", "html": run_dir / "report.html", "figures": list(images.values())}


def _md_to_html(text: str) -> str:
    """Just enough markdown for our own report: headings, tables, bold, code, paragraphs."""
    import re

    out, table = [], []

    def inline(s):
        s = html.escape(s, quote=False)
        s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

    def flush():
        if table:
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table if not set(r) <= set("|-: ")]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in cells[0]) + "</tr>" +
                       "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:]) +
                       "</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("<img"):
            out.append(line)
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return "\n".join(out)
