r"""The paper's ablations (Tables 3–6) as config variants of any base config.

    python -m rma_jax.experiments --config=configs/demo.py --table=4 --seeds=3 --workdir=DIR

Each *variant* is one row of one table: a training *run* (the config overrides that change
what is trained) plus an evaluation *protocol* (single view or ten views, one scale or two).
Rows that share a run share its training: the A+S+P model with K = 5 is the "attentional
regions" row of Table 3, the "A+S+P" row of Tables 4–5, every row of Table 6 (evaluation
settings only, no retraining) and the K = 5 row of the K table. ``variant_config`` returns the
ConfigDict of a row; ``rma_jax.experiments`` trains each run once per seed and evaluates it
once with every protocol (ten views at both scales computes all of them), then reads each row's
protocol from that report.

The second evaluation scale is ``base.eval.scales[1]`` when the base config has two scales
(the paper's 512 and 640), else ``second_scale(N)``: about 1.25 N rounded to a multiple of 16
(512 -> 640, the demo's 112 -> 144).

Tables (keys of ``TABLES``):
  3: fixed regions (K boxes at the centre and the anchors, the stand-in for the paper's
     object proposals) vs attentional regions; single view at N; with the pointing game of
     both (and its chance control) and attention recall.
  4: localisation constraints null / S+P / A+S / A+P / A+S+P; ten views at N.
  5: constraints null vs A+S+P with C-F1, O-F1 and mAP (the paper's MS-COCO table).
  6: single crop vs ten crops at N and at the second scale, and both scales fused.
  'loss': the global-pooling baseline (docs/design.md §1) with the paper's softmax-Euclidean loss and
     with per-class sigmoid cross-entropy, beside the attention model; ten views at N.
  'budget': the same total number of epochs for every row: the stage-1 baseline alone,
     the pooled baseline trained in one go for stage-1 + stage-2 epochs (both losses), and
     the attention model (stage 1 + stage 2); ten views at N.
  'K': the number of regions K = 1, 3, 5, 9; ten views at N.
  'regions': attempts to make the learned regions find the labelled objects, each one
     option of the paper's A+S+P, K = 5 model (default off), judged by the pointing game;
     single view at N.
  'peers': the paper's A+S+P, K = 5 model, and with what ASL, ML-Decoder and Query2Label
     train with: the moving average of the parameters (decay 0.9997), the asymmetric loss
     (gamma+ 0, gamma- 4, m 0.05), both; ten views at N.

Every row reports mAP, C-F1, O-F1, the pointing hit rate of the run's regions and of its
chance control (``rma_jax.metrics.pointing_chance``), and the run's wall time.

Runs come in three kinds (``run_kind``): the seed's stage-1 baseline itself (``STAGE1``);
stage-2 runs, initialised from the seed's stage 1 (``RUNS``, all but the two below); and the
equal-budget baselines (``BUDGET_RUNS``), which do not use stage 1: they start from the same
initialisation as stage 1 (same seed, same ``init``) and train with the stage-1 recipe
(``rma_jax.run.stage1_config``: the base's Adam recipe with ``stage1.learning_rate``) for
``stage1.num_epochs + optim.num_epochs`` epochs in one go. The schedule stretches over the
longer run: a constant rate stays constant (the demo), a step decay comes at the same
fraction of the run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from rma_jax import run as run_lib
from rma_jax.configs import demo

# --------------------------------------------------------------------------- training runs

_CONSTRAINTS = {  # name -> (use_anchor, use_scale, use_positive)
    "null": (False, False, False),
    "S+P": (False, True, True),
    "A+S": (True, True, False),
    "A+P": (True, False, True),
    "A+S+P": (True, True, True),
}


# ASL's settings (Ridnik et al., ICCV 2021; docs/training.md): its decay, and its loss with
# gamma+ = 0, gamma- = 4, m = 0.05, focusing weights detached.
_EMA = {"optim.ema_decay": 0.9997}
_ASL = {"loss.classification": "asl", "loss.gamma_pos": 0.0, "loss.gamma_neg": 4.0,
        "loss.clip": 0.05, "loss.asl_detach_focus": True}


def _constraints(name: str) -> dict[str, Any]:
  a, s, p = _CONSTRAINTS[name]
  return {"loss.use_anchor": a, "loss.use_scale": s, "loss.use_positive": p}


# Run name -> dotted config overrides. Every run (the baselines 'baseline_*' too) starts from
# the seed's stage-1 baseline and is trained with the base config's stage-2 recipe.
RUNS: dict[str, dict[str, Any]] = {
    "rma_ASP_K5": {**_constraints("A+S+P"), "model.num_regions": 5},
    "rma_null_K5": {**_constraints("null"), "model.num_regions": 5},
    "rma_SP_K5": {**_constraints("S+P"), "model.num_regions": 5},
    "rma_AS_K5": {**_constraints("A+S"), "model.num_regions": 5},
    "rma_AP_K5": {**_constraints("A+P"), "model.num_regions": 5},
    "fixed_anchors_K5": {**_constraints("A+S+P"), "model.num_regions": 5,
                         "model.fixed_regions": "anchors"},
    "rma_ASP_K1": {**_constraints("A+S+P"), "model.num_regions": 1},
    "rma_ASP_K3": {**_constraints("A+S+P"), "model.num_regions": 3},
    "rma_ASP_K9": {**_constraints("A+S+P"), "model.num_regions": 9},
    # Scores are transformed as the loss reads them (eval.score_transform='auto'): a sigmoid
    # model's are ranked per class with the sigmoid (a per-image softmax would mix the classes
    # and change each class's ranking).
    "baseline_softmax": {"model.name": "baseline", "loss.classification": "softmax_euclidean"},
    "baseline_sigmoid": {"model.name": "baseline", "loss.classification": "sigmoid_bce"},
    # The equal-budget baselines (BUDGET_RUNS): see run_config.
    "baseline_sigmoid_budget": {"model.name": "baseline", "loss.classification": "sigmoid_bce"},
    "baseline_softmax_budget": {"model.name": "baseline",
                                "loss.classification": "softmax_euclidean"},
    # Attempts to make the regions point at the objects (table 'regions'), each one option
    # on top of the paper's A+S+P, K = 5 model:
    # (a) lambda_anchor 1.0 in epoch 0, decaying geometrically to the paper's 0.01 at epoch 4;
    "rma_ASP_K5_anchor_schedule": {**_constraints("A+S+P"), "model.num_regions": 5,
                                   "loss.anchor_schedule_epochs": 4,
                                   "loss.lambda_anchor_start": 1.0},
    # (b) half-sizes |s| >= 0.25 (a quarter of the map per side; the demo's digits span
    # 20-40 px of 96, half-sizes 0.21-0.42);
    "rma_ASP_K5_min_scale": {**_constraints("A+S+P"), "model.num_regions": 5,
                             "loss.min_scale": 0.25},
    # (c) a learned per-step theta bias starting region 1 at the centre, region k at anchor k;
    "rma_ASP_K5_region_init": {**_constraints("A+S+P"), "model.num_regions": 5,
                               "model.region_init": "anchors"},
    # (d) a larger sampled grid S: twice the base config's.
    "rma_ASP_K5_S2x": {**_constraints("A+S+P"), "model.num_regions": 5},
    # What the strongest peers' training loops add (table 'peers'; ASL's settings): the
    # moving average of the parameters, the asymmetric loss, both.
    "rma_ASP_K5_ema": {**_constraints("A+S+P"), "model.num_regions": 5, **_EMA},
    "rma_ASP_K5_asl": {**_constraints("A+S+P"), "model.num_regions": 5, **_ASL},
    "rma_ASP_K5_ema_asl": {**_constraints("A+S+P"), "model.num_regions": 5, **_EMA, **_ASL},
}

STAGE1 = "stage1"
"""The seed's stage-1 baseline as a row (evaluated like every run)."""

BUDGET_RUNS = ("baseline_sigmoid_budget", "baseline_softmax_budget")
"""Runs trained from the stage-1 initialisation with the stage-1 recipe for
``stage1.num_epochs + optim.num_epochs`` epochs (no stage 2)."""


def run_kind(run: str) -> str:
  """'stage1' (the seed's stage 1), 'budget' (``BUDGET_RUNS``) or 'stage2' (from stage 1)."""
  if run == STAGE1:
    return "stage1"
  if run in BUDGET_RUNS:
    return "budget"
  if run not in RUNS:
    raise KeyError(f"unknown run {run!r}; one of {sorted(RUNS) + [STAGE1]}")
  return "stage2"

# --------------------------------------------------------------------------- protocols

# Evaluation protocols by role; ``protocol_name`` turns them into report keys.
SINGLE_N = "single@N"  # the whole image at N - 64 (the paper's "single-crop at 512")
SINGLE_N2 = "single@N2"
TEN_N = "ten@N"  # ten views of the N x N image
TEN_N2 = "ten@N2"
TEN_BOTH = "ten@N+N2"  # ten views at both scales, raw scores averaged
PROTOCOLS = (SINGLE_N, SINGLE_N2, TEN_N, TEN_N2, TEN_BOTH)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of one ablation table.

  Attributes:
    name: the row label (the paper's wording where it has one).
    run: the key of ``RUNS`` whose trained model the row evaluates.
    protocol: one of ``PROTOCOLS``.
    paper: the paper's published numbers for the row: data set -> {metric: value in %}.
  """
  name: str
  run: str
  protocol: str
  paper: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)


def _voc(m: float) -> dict[str, dict[str, float]]:
  return {"voc2007": {"mAP": m}}


TABLES: dict[Any, list[Variant]] = {
    3: [Variant("fixed regions (anchor boxes)", "fixed_anchors_K5", SINGLE_N,
                # The paper's row uses the top five EdgeBox proposals, not fixed boxes.
                {"voc2007": {"mAP": 88.6}}),
        Variant("attentional regions", "rma_ASP_K5", SINGLE_N, _voc(90.4))],
    4: [Variant("null", "rma_null_K5", TEN_N, _voc(89.9)),
        Variant("S+P", "rma_SP_K5", TEN_N, _voc(90.2)),
        Variant("A+S", "rma_AS_K5", TEN_N, _voc(90.4)),
        Variant("A+P", "rma_AP_K5", TEN_N, _voc(90.3)),
        Variant("A+S+P", "rma_ASP_K5", TEN_N, _voc(91.3))],
    5: [Variant("null", "rma_null_K5", TEN_N,
                {"coco2014": {"CF1": 65.8, "OF1": 70.9, "mAP": 71.5}}),
        Variant("A+S+P", "rma_ASP_K5", TEN_N,
                {"coco2014": {"CF1": 66.5, "OF1": 71.3, "mAP": 72.2}})],
    6: [Variant("s=N + single-crop", "rma_ASP_K5", SINGLE_N,
                {"voc2007": {"mAP": 90.4}, "coco2014": {"mAP": 70.4}}),
        Variant("s=N2 + single-crop", "rma_ASP_K5", SINGLE_N2,
                {"voc2007": {"mAP": 90.4}, "coco2014": {"mAP": 70.5}}),
        Variant("s=N + ten-crop", "rma_ASP_K5", TEN_N,
                {"voc2007": {"mAP": 91.3}, "coco2014": {"mAP": 72.2}}),
        Variant("s=N2 + ten-crop", "rma_ASP_K5", TEN_N2,
                {"voc2007": {"mAP": 91.3}, "coco2014": {"mAP": 72.3}}),
        Variant("two scales + ten-crop", "rma_ASP_K5", TEN_BOTH,
                {"voc2007": {"mAP": 91.9}, "coco2014": {"mAP": 73.4}})],
    "loss": [Variant("baseline, softmax-Euclidean (paper)", "baseline_softmax", TEN_N),
             Variant("baseline, sigmoid cross-entropy", "baseline_sigmoid", TEN_N),
             Variant("attention A+S+P, softmax-Euclidean", "rma_ASP_K5", TEN_N)],
    "budget": [Variant("baseline, stage 1 only ({e1} epochs)", STAGE1, TEN_N),
               Variant("baseline, sigmoid cross-entropy, {e12} epochs in one go",
                       "baseline_sigmoid_budget", TEN_N),
               Variant("baseline, softmax-Euclidean, {e12} epochs in one go",
                       "baseline_softmax_budget", TEN_N),
               Variant("attention A+S+P, stage 1 ({e1}) + stage 2 ({e2}) epochs",
                       "rma_ASP_K5", TEN_N)],
    "K": [Variant("K=1", "rma_ASP_K1", TEN_N),
          Variant("K=3", "rma_ASP_K3", TEN_N),
          Variant("K=5", "rma_ASP_K5", TEN_N),
          Variant("K=9", "rma_ASP_K9", TEN_N)],
    "regions": [Variant("the paper's A+S+P (lambda_anchor 0.01)", "rma_ASP_K5", SINGLE_N),
                Variant("(a) lambda_anchor 1.0 -> 0.01 over 4 epochs",
                        "rma_ASP_K5_anchor_schedule", SINGLE_N),
                Variant("(b) region half-sizes at least 0.25", "rma_ASP_K5_min_scale", SINGLE_N),
                Variant("(c) per-step theta bias from the anchors", "rma_ASP_K5_region_init",
                        SINGLE_N),
                Variant("(d) S = {s2x} (twice the base S)", "rma_ASP_K5_S2x", SINGLE_N),
                Variant("fixed regions (anchor boxes)", "fixed_anchors_K5", SINGLE_N)],
    "peers": [Variant("the paper's recipe (softmax-Euclidean, no EMA)", "rma_ASP_K5", TEN_N),
              Variant("+ EMA of the parameters (decay 0.9997)", "rma_ASP_K5_ema", TEN_N),
              Variant("+ asymmetric loss (ASL)", "rma_ASP_K5_asl", TEN_N),
              Variant("+ EMA + asymmetric loss", "rma_ASP_K5_ema_asl", TEN_N)],
}

# Which metrics each table shows: a protocol's metrics (mAP, CF1, OF1) or a run-level one:
# 'pointing' / 'pointing_chance' / 'pointing_iou' (the single-view pointing game of the run's
# regions: hit rate, its chance control's hit rate, the mean IoU of the pointed region),
# 'attention_recall' (single view) and 'wall_min' (training + evaluation wall time of the run
# itself, minutes). Rows without regions (the baselines) show '—' for the region metrics.
COMMON_METRICS = ("mAP", "CF1", "OF1", "pointing", "pointing_chance", "wall_min")
REGION_METRICS = COMMON_METRICS[:5] + ("pointing_iou", "attention_recall", "wall_min")
TABLE_METRICS: dict[Any, tuple[str, ...]] = {
    3: REGION_METRICS, 4: COMMON_METRICS, 5: COMMON_METRICS, 6: COMMON_METRICS,
    "loss": COMMON_METRICS, "budget": COMMON_METRICS + ("wall_min_total",),
    "K": REGION_METRICS, "regions": REGION_METRICS, "peers": COMMON_METRICS,
}
# Metrics whose per-seed values get their own column (the JSON has every metric per seed).
PER_SEED_METRICS = ("mAP", "pointing")

TABLE_TITLES: dict[Any, str] = {
    3: "Table 3: attentional regions vs fixed regions (single crop at N)",
    4: "Table 4: localisation constraints (ten crops at N)",
    5: "Table 5: constraints, C-F1 / O-F1 / mAP (ten crops at N)",
    6: "Table 6: test-time scales and crops",
    "loss": "Loss: the baseline with the paper's softmax-Euclidean loss vs sigmoid "
            "cross-entropy (ten crops at N)",
    "budget": "Equal training budget: baselines trained as long as stage 1 + stage 2 "
              "(ten crops at N)",
    "K": "Number of regions K (ten crops at N)",
    "regions": "Making the regions find the objects: the pointing game of each attempt "
               "(single crop at N)",
    "peers": "What the strongest peers' training adds: the moving average of the parameters "
             "and the asymmetric loss (ten crops at N)",
}

# The data set whose published numbers each table carries.
TABLE_PAPER_DATASETS: dict[Any, tuple[str, ...]] = {
    3: ("voc2007",), 4: ("voc2007",), 5: ("coco2014",), 6: ("voc2007", "coco2014"),
    "loss": (), "budget": (), "K": (), "regions": (), "peers": (),
}


def table_keys() -> list[Any]:
  """Every table key, in a fixed order (the cheap, shared runs first)."""
  return [3, 4, 5, 6, "loss", "budget", "K", "regions", "peers"]


def parse_table(value: str) -> list[Any]:
  """'4' -> [4]; 'loss' -> ['loss']; 'all' -> every table; '3,4' -> [3, 4]."""
  if value == "all":
    return table_keys()
  out = []
  for part in value.split(","):
    part = part.strip()
    key = int(part) if part.isdigit() else part
    if key not in TABLES:
      raise ValueError(f"unknown table {part!r}; one of {table_keys()} or 'all'")
    out.append(key)
  return out


def variants() -> dict[str, Variant]:
  """Every variant by a unique name '<table>/<row>'."""
  return {f"{t}/{v.name}": v for t, rows in TABLES.items() for v in rows}


# --------------------------------------------------------------------------- configs


def second_scale(n: int) -> int:
  """The second evaluation scale for a base scale N: ~1.25 N, a multiple of 16."""
  return int(round(1.25 * n / 16)) * 16


def scales(base: ml_collections.ConfigDict) -> tuple[int, int]:
  """(N, N2): the base config's first evaluation scale and the second one."""
  given = tuple(int(s) for s in (base.eval.scales or (base.data.image_size,)))
  if len(given) >= 2:
    return given[0], given[1]
  return given[0], second_scale(given[0])


def protocol_name(base: ml_collections.ConfigDict, protocol: str) -> str:
  """The key of ``evaluate_and_report(...)['protocols']`` that holds a protocol's numbers."""
  n, n2 = scales(base)
  offset = base.data.image_size - base.data.crop_size
  return {SINGLE_N: f"single_view@{n - offset}", SINGLE_N2: f"single_view@{n2 - offset}",
          TEN_N: f"ten_view@{n}", TEN_N2: f"ten_view@{n2}",
          TEN_BOTH: f"ten_view@{n}+{n2}"}[protocol]


def eval_overrides(base: ml_collections.ConfigDict, protocol: str) -> dict[str, Any]:
  """The ``eval.*`` settings under which ``protocol`` is the report's headline."""
  n, n2 = scales(base)
  return {SINGLE_N: {"eval.ten_view": False, "eval.scales": (n,)},
          SINGLE_N2: {"eval.ten_view": False, "eval.scales": (n2,)},
          TEN_N: {"eval.ten_view": True, "eval.scales": (n,)},
          TEN_N2: {"eval.ten_view": True, "eval.scales": (n2,)},
          TEN_BOTH: {"eval.ten_view": True, "eval.scales": (n, n2)}}[protocol]


def all_protocols_overrides(base: ml_collections.ConfigDict) -> dict[str, Any]:
  """One evaluation that computes every protocol (ten views at both scales)."""
  return eval_overrides(base, TEN_BOTH)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
                    ) -> ml_collections.ConfigDict:
  """A copy of ``config`` with dotted-key overrides applied (unknown keys raise KeyError)."""
  c = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"config has no field {key!r}")
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return c


def run_config(base: ml_collections.ConfigDict, run: str, *, stage1_dir: str = "",
               seed: int | None = None) -> ml_collections.ConfigDict:
  """The training config of one run of ``RUNS``, evaluated under every protocol.

  Args:
    base: the base config (e.g. configs/demo.py).
    run: a key of ``RUNS`` or ``STAGE1``.
    stage1_dir: the stage-1 workdir a stage-2 run initialises its trunk from ("" keeps the
      base's ``init.from_checkpoint``); stage 1 is then not retrained inside the run.
      Ignored by the stage-1 and equal-budget runs.
    seed: overrides ``base.seed``.

  Returns:
    A new ConfigDict. A stage-2 run, attention model or baseline, is stage 2 of the
    two-step recipe: the trunk from the stage-1 baseline, new layers freshly initialised
    (the baselines get a new head), trained with the base's ``optim`` settings; the
    baselines of the loss table are thus trained exactly like the attention model, only
    without it. ``STAGE1`` is the stage-1 config itself; the ``BUDGET_RUNS`` are the
    stage-1 config with ``stage1.num_epochs + optim.num_epochs`` epochs and their loss.
  """
  kind = run_kind(run)
  if seed is not None:
    base = apply_overrides(base, {"seed": int(seed)})
  if kind != "stage2":
    if kind == "budget":  # the stage-1 recipe and initialisation, for both stages' epochs
      c = run_lib.stage1_config(base, base.stage1.num_epochs + base.optim.num_epochs)
      c = apply_overrides(c, RUNS[run])
    else:
      c = run_lib.stage1_config(base)
    return apply_overrides(c, all_protocols_overrides(base))
  c = apply_overrides(base, all_protocols_overrides(base))
  c = apply_overrides(c, RUNS[run])
  if run == "rma_ASP_K5_S2x":
    c.model.sample_size = 2 * base.model.sample_size
  if stage1_dir:
    c.init.from_checkpoint = stage1_dir
    c.stage1.num_epochs = 0
  return c


def variant_config(base: ml_collections.ConfigDict, name: str, *, stage1_dir: str = "",
                   seed: int | None = None) -> ml_collections.ConfigDict:
  """The config of one variant: its run's training settings and its own evaluation settings.

  Args:
    base: the base config.
    name: '<table>/<row>' as in ``variants()`` (e.g. '4/A+P', '6/two scales + ten-crop').
    stage1_dir, seed: as in ``run_config``.

  Returns:
    A ConfigDict whose ``evaluate_and_report`` headline is the row's protocol.
  """
  table = variants()
  if name not in table:
    raise KeyError(f"unknown variant {name!r}; one of {sorted(table)}")
  v = table[name]
  c = run_config(base, v.run, stage1_dir=stage1_dir, seed=seed)
  return apply_overrides(c, eval_overrides(base, v.protocol))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo config (so that ``--config=configs/ablations.py[:tiny]`` also works)."""
  return demo.get_config(arg)
