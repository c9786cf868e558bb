"""Configuration: one typed schema, config groups and dotted ``key=value`` overrides.

Composition order (later wins)::

    schema defaults  <-  recipes/<recipe>.yaml  <-  data=<name>  <-  targets/<target>.yaml
                     <-  the recipe's profiles.<profile>  <-  key=value overrides

The schema is an OmegaConf *structured* config built from dataclasses, so a mistyped key or a
value of the wrong type fails at once, with the valid keys that are closest to the typo.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from edgeus import resources
from edgeus.errors import ConfigError  # noqa: F401  (raised here; importable from edgeus.config as before)
from edgeus.decompose.config import DecomposeConfig
from edgeus.deploy.config import BenchConfig, BuildConfig, PackageConfig, TargetConfig
from edgeus.distill.config import DistillConfig
from edgeus.prune.config import PruneConfig
from edgeus.quantize.config import ExportConfig, QuantizeConfig


@dataclass
class DataConfig:
    name: str = "phantom"            # phantom | busi | tmed2 | folder | camus
    root: Optional[str] = None       # folder with the images (not needed for phantom)
    image_size: int = 64
    in_chans: int = 1                # 1 = grayscale, 3 = grayscale repeated to RGB
    mean: List[float] = field(default_factory=lambda: [0.5])
    std: List[float] = field(default_factory=lambda: [0.25])
    split: List[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    seed: int = 0
    batch_size: int = 32
    num_workers: int = 0
    # train split only: rsmas (the RSMAS-Net paper's rotation, flip, brightness, scale) | ultrasound (stronger
    # geometry + gain/contrast/gamma/speckle) | none; true / false mean rsmas / none
    augment: str = "rsmas"
    balance: str = "weights"         # weights (class-weighted loss) | sampler | none
    classes: Optional[List[str]] = None  # keep / order these classes only
    # phantom
    n_per_class: int = 100
    phantom_size: int = 128          # simulated at this size, then resized to image_size
    # tmed2
    csv: Optional[str] = None        # labelled-set CSV (default: the only *.csv under root)
    scheme: str = "as_binary"        # as_binary | as_severity
    views: Optional[List[str]] = None  # keep these views only (e.g. [PLAX, PSAX])


@dataclass
class ModelConfig:
    name: str = "simple_cnn"
    width: float = 1.0
    pretrained: Optional[str] = None          # path to a state dict (torchvision keys for resnet50/rsmas)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # architecture-specific arguments


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"          # cosine | constant
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    metric: str = "macro_f1"          # validation metric for the best checkpoint
    max_steps_per_epoch: Optional[int] = None
    resume: bool = True               # continue from <out>/last.pt when it exists
    out: Optional[str] = None         # checkpoint directory (default runs/train-<time>)
    checkpoint: Optional[str] = None  # start from this checkpoint instead of training from scratch
    grad_clip: Optional[float] = None
    # which epoch to keep: val (train.metric on the val split) | agreement (balanced agreement with the
    # teacher on train+val images, label-free; fine-tuning with a teacher only) | val+agreement (their mean).
    # val+agreement: on the phantom, 10 seeds, a pruned student fine-tuned with KD kept +2.6 test points
    # [+0.9, +4.4] over val alone with an 18-image val split, +0.3 [-1.7, +2.2] with 36
    # (bench/results/select_agreement*.md). Without a teacher (teacher training) val picks.
    # last: keep the final epoch, chosen by nothing (val stays a clean hold-out; train.fit_on=train+val needs it).
    select: str = "val+agreement"
    # exponential moving average of the weights (parameters and BN statistics, warm-up decay as timm's
    # ModelEmaV2): 0 = off; e.g. 0.99. The average is what is validated, selected and kept.
    ema: float = 0.0
    # train | train+val (a refit on every non-test image; needs select=last, val is then no hold-out).
    # Honoured where a model is trained from scratch (the teacher, edgeus train); fine-tuning trains on train.
    fit_on: str = "train"


@dataclass
class EvalConfig:
    checkpoint: Optional[str] = None
    run: Optional[str] = None          # a compress run directory: score its teacher and final student
    split: str = "test"
    split_from: str = "model"          # model: the model's own split (its data fingerprint) | data: data.* as given
    allow_overlap: bool = False        # score images the model was trained / validated / calibrated on
    out: Optional[str] = None
    ece_bins: int = 15
    # eval.split=all (external validation: every image of another dataset): the data's class -> the model's
    # class, e.g. {severe: AS}; a class absent here maps to the model's class of the same name; null drops it
    class_map: Dict[str, Optional[str]] = field(default_factory=dict)


@dataclass
class GatesConfig:
    max_accuracy_drop: float = 0.01
    max_recall_drop: float = 0.02
    max_ece_rise: float = 0.05
    max_dice_drop: float = 0.02            # segmenting models (two-stage) only: mean Dice of the mask may fall this much
    # e.g. malignant or Severe_AS: named first in messages; must be a class of the data (checked before a
    # run starts); "auto": the dataset's own (edgeus.data.critical.DATASET_CRITICAL), none where it has none
    critical_class: Optional[str] = None
    enforce: bool = True
    mode: str = "point"                    # point | noninferiority (paired bootstrap interval within the margin)
    n_boot: int = 2000                     # bootstrap resamples of the paired intervals


@dataclass
class RobustnessConfig:
    corruptions: List[str] = field(default_factory=lambda: ["speckle", "gain", "blur", "shadow"])
    strengths: List[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])


@dataclass
class TeacherConfig:
    checkpoint: Optional[str] = None   # load this teacher instead of training one
    train: Dict[str, Any] = field(default_factory=dict)  # overrides of train.* for the teacher
    ensemble: int = 1                  # >1: train N teachers (seeds seed, seed+1, ...) and average their logits
    members: List[str] = field(default_factory=list)  # or one teacher per architecture, e.g. [rsmas, resnet50]
    student_from: Optional[str] = None  # ensemble: the member the student starts from (index or name; default 0)


@dataclass
class CompressConfig:
    teacher_guided: bool = True        # fine-tune pruned / decomposed students with the teacher (distillation)
    baseline_int8: bool = True         # also quantise the uncompressed teacher: the obvious alternative
    latency_iters: int = 30            # ONNX Runtime CPU timing per stage (interleaved with the teacher)
    latency_warmup: int = 5
    latency_threads: Optional[int] = None  # ONNX Runtime intra-op threads (default: all cores)
    robustness: bool = True
    report: bool = True


@dataclass
class RecipeConfig:
    name: str = "custom"
    description: str = ""
    stages: List[str] = field(default_factory=list)
    profiles: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EdgeusConfig:
    seed: int = 0
    device: str = "cpu"                # cpu | cuda | auto
    out_dir: str = "runs"
    profile: Optional[str] = None
    resume: Optional[str] = None       # compress: continue this run directory
    stages: Optional[List[str]] = None # compress: run only these stages
    out: Optional[str] = None          # generic output path for single commands
    overwrite: bool = False            # single commands: replace an existing output file or folder
    run: Optional[str] = None          # eval: a compress run directory (same as eval.run)
    command_line: List[str] = field(default_factory=list)  # the key=value arguments composed (recorded)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    package: PackageConfig = field(default_factory=PackageConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)


GROUP_KEYS = ("recipe", "data", "target", "profile")
DATASETS = ("phantom", "busi", "tmed2", "folder", "camus")


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k in cfg.keys():
        full = f"{prefix}{k}"
        keys.append(full)
        try:
            v = cfg._get_node(k)
        except Exception:  # pragma: no cover
            continue
        if isinstance(v, DictConfig) and not v._is_missing() and not v._is_none():
            if OmegaConf.is_dict(v) and v._metadata.object_type not in (None, dict):
                keys.extend(_all_keys(v, full + "."))
    return keys


def _explain(err: Exception, schema: DictConfig, key: str, source: str) -> ConfigError:
    valid = _all_keys(schema)
    if isinstance(err, ValidationError):
        return ConfigError(f"{source}: bad value for '{key}': {str(err).splitlines()[0]}")
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k for k in valid if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
    close = difflib.get_close_matches(key, valid, n=5, cutoff=0.6)
    msg = f"{source}: unknown key '{key}'."
    if close:
        msg += f" Did you mean: {', '.join(close)}?"
    if siblings:
        msg += f"\n  Valid keys{' under ' + parent if parent else ''}: {', '.join(sorted(siblings))}"
    return ConfigError(msg)


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or str(e)
        raise _explain(e, base, str(key), source) from None


def _load_yaml(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Positional arguments (paths) and ``key=value`` overrides, in order."""
    pos, kv = [], []
    for a in argv:
        (kv if "=" in a and not a.startswith("=") else pos).append(a)
    return pos, kv


def compose(overrides: list[str] | None = None, defaults: dict | None = None) -> DictConfig:
    """Build the run configuration from ``key=value`` strings (the CLI's arguments).

    ``defaults`` is a command's own partial config, applied before the recipe.
    """
    overrides = list(overrides or [])
    groups: dict[str, str] = {}
    dotted: list[str] = []
    for o in overrides:
        key, _, value = o.partition("=")
        key = key.strip().lstrip("+")
        if key in GROUP_KEYS:
            groups[key] = value.strip()
        else:
            dotted.append(f"{key}={value}")

    schema = OmegaConf.structured(EdgeusConfig)
    cfg = schema
    if defaults:
        cfg = _merge(cfg, OmegaConf.create(defaults), "command defaults")

    profiles: dict = {}
    if "recipe" in groups:
        try:
            path = resources.find("recipes", groups["recipe"])
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from None
        recipe = _load_yaml(path)
        if not isinstance(recipe, DictConfig):
            raise ConfigError(f"recipe {path}: a recipe file is a mapping (recipe:, model:, prune:, ...), "
                              f"not a {type(recipe).__name__}")
        section = recipe.get("recipe") or {}
        if not isinstance(section, (DictConfig, dict)):
            raise ConfigError(f"recipe {path}: 'recipe:' must be a mapping (name, description, stages, profiles)")
        if "profiles" in section and section.get("profiles") is None:
            section.pop("profiles")      # `profiles:` with nothing under it: no profiles
        profiles = section.get("profiles") or {}
        profiles = OmegaConf.to_container(profiles) if OmegaConf.is_config(profiles) else dict(profiles)
        if not isinstance(profiles, dict):
            raise ConfigError(f"recipe {path}: 'recipe.profiles' must be a mapping of profile names to settings")
        cfg = _merge(cfg, recipe, f"recipe {path.name}")
        if not cfg.recipe.name or cfg.recipe.name == "custom":
            cfg.recipe.name = path.stem

    if "data" in groups:
        name = groups["data"]
        if name not in DATASETS:
            close = difflib.get_close_matches(name, DATASETS, n=2)
            raise ConfigError(
                f"unknown dataset data={name}."
                + (f" Did you mean {', '.join(close)}?" if close else "")
                + f" Available: {', '.join(DATASETS)}"
            )
        cfg.data.name = name

    target = groups.get("target") or cfg.target.name or "cpu"
    if target in resources.list_options("targets") or "target" in groups:
        try:
            path = resources.find("targets", target)
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from None
        tgt = _load_yaml(path)  # a target file replaces the whole target section (its Q/DQ layout too)
        cfg.target = OmegaConf.structured(TargetConfig)
        cfg = _merge(cfg, OmegaConf.create({"target": tgt}), f"target {path.name}")
        if not cfg.target.name:
            cfg.target.name = path.stem

    if "profile" in groups:
        name = groups["profile"]
        if name not in profiles:
            raise ConfigError(
                f"recipe {cfg.recipe.name!r} has no profile {name!r}; "
                f"available: {', '.join(profiles) or '(none)'}"
            )
        cfg.profile = name
        cfg = _apply_dotted(cfg, [f"{k}={_yaml_value(v)}" for k, v in profiles[name].items()],
                            f"profile {name}")

    cfg = _apply_dotted(cfg, dotted, "command line")
    cfg.command_line = [o for o in overrides]
    if cfg.gates.critical_class == "auto":   # the dataset's own critical class (edgeus.pipeline.gates)
        from edgeus.data.critical import resolve_critical_class

        cfg.gates.critical_class = resolve_critical_class("auto", cfg.data)
    return cfg


SELECT_CHOICES = ("val", "agreement", "val+agreement", "last")
AUGMENT_CHOICES = ("rsmas", "ultrasound", "none")      # edgeus.data.transforms.AUGMENT

# ------------------------------------------------------------------------------------ range checks
# (key, lowest, highest, lowest allowed itself, highest allowed itself, may be null)
_RANGES = [
    ("seed", 0, None, True, True, False),
    ("data.image_size", 1, None, True, True, False), ("data.batch_size", 1, None, True, True, False),
    ("data.n_per_class", 3, None, True, True, False), ("data.phantom_size", 1, None, True, True, False),
    ("data.num_workers", 0, None, True, True, False),
    ("model.width", 0, None, False, True, False),
    ("train.epochs", 1, None, True, True, False), ("train.lr", 0, None, False, True, False),
    ("train.weight_decay", 0, None, True, True, False), ("train.warmup_epochs", 0, None, True, True, False),
    ("train.label_smoothing", 0, 1, True, False, False), ("train.max_steps_per_epoch", 1, None, True, True, True),
    ("train.grad_clip", 0, None, False, True, True),
    ("eval.ece_bins", 1, None, True, True, False),
    ("prune.ratio", 0, 1, True, False, False), ("prune.target_macs", 0, 1, False, True, True),
    ("prune.macs_tolerance", 0, None, True, True, False), ("prune.max_layer_ratio", 0, 1, True, False, False),
    ("prune.steps", 1, None, True, True, False), ("prune.finetune_epochs", 0, None, True, True, False),
    ("prune.step_epochs", 0, None, True, True, False), ("prune.lr", 0, None, False, True, True),
    ("prune.sparsity", 0, 1, True, False, False), ("prune.sparsity_steps", 1, None, True, True, False),
    ("prune.round_to", 1, None, True, True, True),
    ("distill.epochs", 1, None, True, True, True), ("distill.lr", 0, None, False, True, True),
    ("distill.temperature", 0, None, False, True, False),
    ("decompose.ratio", 0, 1, False, True, False), ("decompose.energy", 0, 1, False, True, False),
    ("decompose.target_macs", 0, 1, False, True, False), ("decompose.finetune_epochs", 0, None, True, True, False),
    ("decompose.lr", 0, None, False, True, True), ("decompose.rank_multiple", 1, None, True, True, False),
    ("export.atol", 0, None, True, True, False), ("export.rtol", 0, None, True, True, False),
    ("export.min_top1_agreement", 0, 1, True, True, False), ("export.parity_samples", 1, None, True, True, False),
    ("quantize.max_accuracy_drop", 0, None, True, True, False), ("quantize.max_recall_drop", 0, None, True, True, False),
    ("quantize.max_fallback_nodes", 0, None, True, True, False), ("quantize.qat_epochs", 0, None, True, True, False),
    ("quantize.qat_lr", 0, None, False, True, False), ("quantize.num_images", 0, None, True, True, True),
    ("gates.max_accuracy_drop", 0, None, True, True, False), ("gates.max_recall_drop", 0, None, True, True, False),
    ("gates.max_ece_rise", 0, None, True, True, False), ("gates.n_boot", 1, None, True, True, False),
    ("gates.max_dice_drop", 0, None, True, True, False),
    ("compress.latency_iters", 1, None, True, True, False), ("compress.latency_warmup", 0, None, True, True, False),
    ("compress.latency_threads", 1, None, True, True, True),
    ("bench.iters", 1, None, True, True, False), ("bench.warmup", 0, None, True, True, False),
    ("bench.block", 1, None, True, True, False), ("bench.threads", 1, None, True, True, True),
    ("package.golden", 1, None, True, True, False), ("package.atol", 0, None, True, True, False),
    ("package.int8_atol", 0, None, True, True, False), ("teacher.ensemble", 1, None, True, True, False),
]

# the smallest input a model of the zoo takes (measured: a forward pass at width 0.25 fails below it)
MIN_IMAGE_SIZE = {"simple_cnn": 16, "two_stage": 16, "densenet201": 29, "two_stage_published": 29}


def _range_text(lo, hi, lo_in, hi_in, nullable) -> str:
    if hi is None:
        text = f"{'>=' if lo_in else '>'} {lo}"
    else:
        text = f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
    return text + (" (or null)" if nullable else "")


def validate(cfg) -> DictConfig:
    """Check every numeric setting against its valid range; raise :class:`ConfigError` naming the key,
    the value and the range. Returns ``cfg``. (The CLI calls this on every command; ``compress``
    on its config.)"""
    problems = []
    for key, lo, hi, lo_in, hi_in, nullable in _RANGES:
        try:
            v = OmegaConf.select(cfg, key, default="<absent>")
        except OmegaConfBaseException:  # pragma: no cover
            continue
        if isinstance(v, str) and v == "<absent>":
            continue
        if v is None:
            if not nullable:
                problems.append(f"{key}=null: must be {_range_text(lo, hi, lo_in, hi_in, False)}")
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        ok = (v >= lo if lo_in else v > lo) and (hi is None or (v <= hi if hi_in else v < hi))
        if not ok:
            problems.append(f"{key}={v}: must be {_range_text(lo, hi, lo_in, hi_in, nullable)}")
    bs = OmegaConf.select(cfg, "bench.batch_sizes", default=None)
    if bs is not None and any(int(b) < 1 for b in bs):
        problems.append(f"bench.batch_sizes={list(bs)}: every batch size must be >= 1")
    strengths = OmegaConf.select(cfg, "robustness.strengths", default=None)
    if strengths is not None and any(float(x) < 0 for x in strengths):
        problems.append(f"robustness.strengths={list(strengths)}: must be >= 0")
    for prefix in ("train", "teacher.train"):
        select = OmegaConf.select(cfg, f"{prefix}.select", default=None)
        if select is not None and select not in SELECT_CHOICES:
            problems.append(f"{prefix}.select={select}: use {', '.join(SELECT_CHOICES)}")
        fit_on = OmegaConf.select(cfg, f"{prefix}.fit_on", default=None)
        if fit_on is not None and fit_on not in ("train", "train+val"):
            problems.append(f"{prefix}.fit_on={fit_on}: use train or train+val")
        ema = OmegaConf.select(cfg, f"{prefix}.ema", default=None)
        if ema is not None and not 0 <= float(ema) < 1:
            problems.append(f"{prefix}.ema={ema}: must be in [0, 1) (0 = off)")
    for scope, over in (("train", {}), ("teacher.train", OmegaConf.select(cfg, "teacher.train", default=None) or {})):
        fit_on = over.get("fit_on", OmegaConf.select(cfg, "train.fit_on", default=None))
        select = over.get("select", OmegaConf.select(cfg, "train.select", default=None))
        if fit_on == "train+val" and select != "last":
            problems.append(f"{scope}.fit_on=train+val trains on the val split, so val cannot choose the epoch: "
                            f"add {scope}.select=last")
            break
    augment = OmegaConf.select(cfg, "data.augment", default=None)
    if augment is not None:
        if str(augment).strip().lower() not in (*AUGMENT_CHOICES, "true", "false"):
            problems.append(f"data.augment={augment}: use {', '.join(AUGMENT_CHOICES)}")
    name = OmegaConf.select(cfg, "model.name", default=None)
    size = OmegaConf.select(cfg, "data.image_size", default=None)
    need = MIN_IMAGE_SIZE.get(str(name))
    if need and isinstance(size, int) and 1 <= size < need:
        problems.append(f"data.image_size={size}: model {name} needs images of at least {need} px "
                        f"(data.image_size={need} or more)")
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) == 1 else
                          "settings out of range:\n  " + "\n  ".join(problems))
    return cfg


def _yaml_value(v: Any) -> str:
    import json

    return json.dumps(v) if not isinstance(v, str) else v


def _apply_dotted(cfg: DictConfig, dotted: list[str], source: str) -> DictConfig:
    for item in dotted:
        key, _, value = item.partition("=")
        node = OmegaConf.select(cfg, key, default=None) if key else None
        if isinstance(node, DictConfig) and not value.lstrip().startswith("{"):
            # `model=rsmas`: a section given a plain value (only recipe/data/target/profile are choices)
            keys = ", ".join(f"{key}.{k}" for k in node.keys())
            hint = f", e.g. {key}.name={value}" if "name" in node else ""
            raise ConfigError(f"{source}: '{key}' is a section, not a choice; set one of its keys{hint}"
                              f"\n  Keys under {key}: {keys}")
        try:
            patch = OmegaConf.from_dotlist([item])
        except Exception as e:
            raise ConfigError(f"{source}: cannot parse '{item}': {e}") from None
        cfg = _merge(cfg, patch, source)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save(cfg: DictConfig, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))
