r"""The README's demo table, from the committed reports of the demo command.

    python docs/demo_results/table.py          # prints the Markdown table
    python docs/demo_results/table.py resnet50_   # the same for the demo on a ResNet-50

Each ``seed_S.json`` is ``WORKDIR/report/report.json`` of
``python -m rma_jax.main --config=configs/demo.py --workdir=WORKDIR --config.seed=S``, each
``resnet50_seed_S.json`` the same with ``--config=configs/demo.py:resnet50``;
``timings.json`` holds each run's wall-clock and CPU seconds (``/usr/bin/time``, or ``ps``'s
CPU time of the process) and the machine's load average while it ran, under ``S`` and
``resnet50_S``.
"""

import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def _minutes(seconds: float) -> str:
  return f"{int(seconds // 60)} m {int(round(seconds % 60)):02d} s"


def rows(prefix: str = "") -> list[dict]:
  """One dict per committed seed of the runs whose files start with ``prefix``, by seed."""
  with open(os.path.join(HERE, "timings.json"), encoding="utf-8") as f:
    timings = json.load(f)
  out = []
  for path in glob.glob(os.path.join(HERE, f"{prefix}seed_*.json")):
    seed = int(re.fullmatch(re.escape(prefix) + r"seed_(\d+)\.json",
                            os.path.basename(path)).group(1))
    with open(path, encoding="utf-8") as f:
      res = json.load(f)["results"]
    single = next(v for k, v in res["protocols"].items() if k.startswith("single_view"))
    ten = next(v for k, v in res["protocols"].items() if k.startswith("ten_view"))
    out.append(dict(seed=seed, single=single, ten=ten, pointing=res["pointing"],
                    recall=res["attention_recall"], time=timings[f"{prefix}{seed}"]))
  return sorted(out, key=lambda r: r["seed"])


def table(prefix: str = "") -> str:
  lines = ["| seed | single view (96 px) mAP | ten-view (112 px) mAP | CF1 / OF1 (ten-view) "
           "| pointing game: regions / chance | attention recall | wall clock (CPU time), load |",
           "|---|---|---|---|---|---|---|"]
  for r in rows(prefix):
    p, t = r["pointing"], r["time"]
    lines.append(
        f"| {r['seed']} | {_pct(r['single']['mAP'])} | {_pct(r['ten']['mAP'])} | "
        f"{_pct(r['ten']['CF1'])} / {_pct(r['ten']['OF1'])} | "
        f"{_pct(p['model_regions']['hit_rate'])} % / {_pct(p['chance']['hit_rate'])} % | "
        f"{_pct(r['recall']['model_regions'])} % | "
        f"{_minutes(t['wall_s'])} ({_minutes(t['cpu_s'])}), {t['load']} |")
  return "\n".join(lines)


if __name__ == "__main__":
  print(table(*sys.argv[1:2]))
