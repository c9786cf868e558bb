"""Does equalisation before PTQ pay? (issue 17, deliverable 5: "measure, keep only what helps")

Cross-layer equalisation (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019) rescales the channels between two convolutions joined by a ReLU: output channel c
of the first is divided by s_c and input channel c of the second multiplied by s_c. ReLU(x / s) = ReLU(x) / s
for s > 0, so the FP32 model computes exactly the same function, but the INT8 grids change. edgeus
quantises weights per output channel, so the first convolution's weight error does not depend on s; what
s moves is the per-tensor activation grid between the two convolutions and the second one's weights.
s_c = a_c^alpha / w_c^(1 - alpha) (a_c: the channel's largest activation on the calibration images, w_c:
the largest weight reading that channel; alpha = 0.5 balances both, as SmoothQuant does for MatMuls;
alpha = 1 makes every activation channel span the same range). Pairs through ReLU6 (MobileNetV2's Clip)
or SiLU (EfficientNet) are not scale-equivariant and are left alone: Nagel et al. replace ReLU6 by ReLU,
which changes the trained model.

Each model is quantised for the ``cpu`` and ``jetson_orin_nano`` layouts as it is, equalised, with bias
correction (edgeus.quantize.recovery) and with both; the same calibration images, the same goals and the
same fidelity set (every non-test image) as ``bench/quantize_ptq.py``.

    OMP_NUM_THREADS=2 python bench/equalise_ptq.py --run phantom=<main command's run> busi=<profile=full run> \\
        --alternatives <alternatives_busi.py's run>      # -> bench/results/equalise_ptq.{json,md}
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quantize_ptq as Q  # noqa: E402  (the same cells, goals and settings)

from edgeus.config import compose  # noqa: E402
from edgeus.data import build_datasets  # noqa: E402
from edgeus.quantize import QDQLayout, inputs_from_bundle  # noqa: E402
from edgeus.quantize import isa as isa_mod  # noqa: E402
from edgeus.quantize.evalset import EvalSet  # noqa: E402

VARIANTS = {"as trained": (False, False), "equalised": (True, False), "bias corr.": (False, True),
            "equalised + bias corr.": (True, True)}


def relu_pairs(m: onnx.ModelProto) -> list[tuple]:
    """(conv1, relu, conv2, conv2's group) where conv1's only consumer is a ReLU whose only consumer is conv2's
    data input, both with constant weights and conv1 with a constant bias (BatchNorm folded)."""
    cons = collections.defaultdict(list)
    for n in m.graph.node:
        for i in n.input:
            cons[i].append(n)
    inits = {t.name for t in m.graph.initializer}
    out = []
    for n in m.graph.node:
        if n.op_type != "Conv" or len(n.input) < 3 or n.input[1] not in inits or n.input[2] not in inits:
            continue
        (r, *more) = cons[n.output[0]] or [None]
        if more or r is None or r.op_type != "Relu":
            continue
        (c2, *more) = cons[r.output[0]] or [None]
        if more or c2 is None or c2.op_type != "Conv" or c2.input[0] != r.output[0] or c2.input[1] not in inits:
            continue
        group = next((a.i for a in c2.attribute if a.name == "group"), 1)
        out.append((n, r, c2, group))
    return out


def channel_max(m: onnx.ModelProto, names: list[str], x: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    from edgeus.onnx.session import session

    mm = onnx.ModelProto()
    mm.CopyFrom(m)
    have = {o.name for o in mm.graph.output}
    mm.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    sess = session(mm.SerializeToString())
    inp = sess.get_inputs()[0].name
    mx: dict[str, np.ndarray] = {}
    for i in range(0, len(x), batch):
        for n, o in zip(names, sess.run(names, {inp: x[i:i + batch]})):
            mx[n] = np.maximum(mx.get(n, 0.0), np.abs(o).max(axis=(0,) + tuple(range(2, o.ndim))))
    return mx


def equalise(src: Path, dst: Path, x: np.ndarray, alpha: float = 0.5) -> dict:
    """``src`` with every ReLU-joined convolution pair equalised on the calibration images ``x``, saved to ``dst``."""
    m = onnx.load(str(src))
    inits = {t.name: t for t in m.graph.initializer}
    pairs = relu_pairs(m)
    amax = channel_max(m, [r.output[0] for _, r, _, _ in pairs], x) if pairs else {}
    done, spread = 0, []
    for c1, r, c2, group in pairs:
        w1 = numpy_helper.to_array(inits[c1.input[1]]).astype(np.float64)
        b1 = numpy_helper.to_array(inits[c1.input[2]]).astype(np.float64)
        w2 = numpy_helper.to_array(inits[c2.input[1]]).astype(np.float64)
        ch = w1.shape[0]
        if group == 1:
            wmax = np.abs(w2).max(axis=(0,) + tuple(range(2, w2.ndim)))
        elif group == ch and w2.shape[1] == 1:          # depth-wise: output channel c reads input channel c
            wmax = np.abs(w2).reshape(ch, -1).max(1)
        else:
            continue
        a = amax[r.output[0]]
        ok = (a > 1e-8) & (wmax > 1e-8)
        if not ok.any():
            continue
        s = np.ones(ch)
        s[ok] = a[ok] ** alpha / wmax[ok] ** (1.0 - alpha)
        s[ok] /= np.exp(np.log(s[ok]).mean())          # geometric mean 1: the overall scale stays
        spread.append(float(a[ok].max() / a[ok].min()))
        w1 /= s.reshape(-1, *[1] * (w1.ndim - 1))
        b1 /= s
        w2 *= s.reshape(1, -1, *[1] * (w2.ndim - 2)) if group == 1 else s.reshape(-1, *[1] * (w2.ndim - 1))
        for t, v in ((c1.input[1], w1), (c1.input[2], b1), (c2.input[1], w2)):
            inits[t].CopyFrom(numpy_helper.from_array(v.astype(np.float32), t))
        done += 1
    onnx.save(m, str(dst))
    return {"pairs": done, "median_channel_range_spread": float(np.median(spread)) if spread else None}


def max_logit_change(a: Path, b: Path, x: np.ndarray) -> float:
    from edgeus.onnx.session import session

    sa, sb = session(a.read_bytes()), session(b.read_bytes())
    n = sa.get_inputs()[0].name
    return float(np.abs(sa.run(None, {n: x})[0] - sb.run(None, {n: x})[0]).max())


def alternative_models(alternatives: str | None) -> dict[str, Path]:
    """The depth-wise alternatives that ``bench/alternatives_busi.py`` trained (``<arch>-s0.fp32.onnx``)."""
    return {p.name.split("-s0")[0]: p for p in sorted(Path(alternatives).glob("*-s0.fp32.onnx"))} if alternatives else {}


def measure(name: str, run: str, a, host: dict, work: Path) -> dict:
    extra = list(Q.DATASETS[name])
    if name == "busi":
        extra.append(f"data.root={a.busi}")
    cfg, teacher, student = Q.train(name, extra, work, run)
    bundle = build_datasets(cfg.data)
    data = inputs_from_bundle(bundle, cfg.quantize)
    test = EvalSet(bundle.test, list(bundle.classes), name="test")
    x = data["calibration"].images
    res = {"data": bundle.summary(), "run": run, "models": {}}
    models = {"teacher": teacher, "student": student, **(alternative_models(a.alternatives) if name == "busi" else {})}
    for mname, fp32 in models.items():
        fv, ft = Q.split_metrics(fp32, data["evaluation"]), Q.split_metrics(fp32, test)
        eq = work / f"{name}.{mname}.eq.onnx"
        info = equalise(fp32, eq, x, a.alpha)
        info["fp32_max_logit_change"] = max_logit_change(fp32, eq, x[:16])
        rows = {"fp32": {"val": fv, "test": ft}, "equalisation": info}
        for key, target in Q.TARGETS.items():
            for label, (use_eq, bc) in VARIANTS.items():
                if use_eq and not info["pairs"]:
                    continue
                tcfg = compose(Q.SETTINGS + extra + [f"target={target}", f"quantize.bias_correction={str(bc).lower()}"])
                lay = QDQLayout.from_target(tcfg.target)
                out = work / f"{name}.{mname}.{key}.{'eq' if use_eq else 'base'}{'.bc' if bc else ''}.int8.onnx"
                r = Q.one(eq if use_eq else fp32, out, tcfg, lay, data, test, target, fv, ft, host)
                rows[f"{key} {label}"] = {k: r[k] for k in ("val", "test", "agreement", "meets_goals")}
                print(f"{name} {mname} {key} {label}: agreement {100 * r['agreement']:.2f} %  val drop "
                      f"{Q.fmt_pct(r['val']['accuracy_drop'])}  test drop {Q.fmt_pct(r['test']['accuracy_drop'])}",
                      flush=True)
        res["models"][mname] = rows
    return res


def markdown(res: dict) -> str:
    lines = ["# Equalisation before PTQ: does it pay?", "",
             f"Host: {res['host'].get('isa')}. alpha = {res['alpha']}. Models: the runs named per dataset "
             "(their data settings), calibration/default.yaml; goals as in quantize_ptq.md (accuracy drop <= 1 point "
             "and every class's recall drop <= 2 points on val and test, agreement >= 99 % on every non-test image). "
             "Drops are FP32 minus INT8 in points. 'pairs' is the number of ReLU-joined convolution pairs equalised "
             "(0: no such pair; ReLU6 and SiLU are not scale-equivariant); the FP32 logits of the equalised model "
             "differ from the original's by at most the stated amount (float rounding).", ""]
    for ds, d in res["datasets"].items():
        lines += [f"## {ds}", "", f"Run: {d['run']}.", "",
                  "| model | pairs | FP32 change | layout | variant | val drop | worst val recall drop | test drop "
                  "| worst test recall drop | agreement | goals |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for mname, rows in d["models"].items():
            info = rows["equalisation"]
            for key, r in rows.items():
                if key in ("fp32", "equalisation"):
                    continue
                layout, variant = key.split(" ", 1)
                lines.append(f"| {mname} | {info['pairs']} | {info['fp32_max_logit_change']:.1e} | {layout} | {variant} "
                             f"| {Q.fmt_pct(r['val']['accuracy_drop'])} | {Q.fmt_pct(r['val']['worst_recall_drop'])} "
                             f"| {Q.fmt_pct(r['test']['accuracy_drop'])} | {Q.fmt_pct(r['test']['worst_recall_drop'])} "
                             f"| {100 * r['agreement']:.2f} % | {'met' if r['meets_goals'] else 'MISSED'} |")
        lines.append("")
    summary = []
    for ds, d in res["datasets"].items():
        for mname, rows in d["models"].items():
            for key in Q.TARGETS:
                base, eq = rows.get(f"{key} as trained"), rows.get(f"{key} equalised")
                if base and eq:
                    summary.append(100 * (eq["agreement"] - base["agreement"]))
    if summary:
        lines.append(f"Agreement change from equalisation over {len(summary)} model/layout cells: median "
                     f"{np.median(summary):+.2f} points, range {min(summary):+.2f} to {max(summary):+.2f}.")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", nargs="+", required=True, metavar="DATASET=DIR",
                   help="the teacher/student of a compress run per dataset (phantom=..., busi=...)")
    p.add_argument("--alternatives", default=None,
                   help="bench/alternatives_busi.py's run directory: its depth-wise models (BUSI) are measured too")
    p.add_argument("--busi", default="/work/shared/data/busi")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--out", default=str(Q.RESULTS / "equalise_ptq"))
    a = p.parse_args()
    host = isa_mod.detect_host()
    res = {"host": host, "alpha": a.alpha, "datasets": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeus-eq-") as tmp:
        for ds, run in (r.split("=", 1) for r in a.run):
            res["datasets"][ds] = measure(ds, run, a, host, Path(tmp))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    Q.write_results(Path(a.out), res, markdown(res) + f"\nWritten by bench/equalise_ptq.py in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
