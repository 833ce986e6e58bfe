r"""The README's demo table, from the committed reports of the demo command.

    python docs/demo_results/table.py          # prints the Markdown table

Each ``seed_S.json`` is ``WORKDIR/report/report.json`` of
``python -m rma_jax.main --config=configs/demo.py --workdir=WORKDIR --config.seed=S``;
``timings.json`` holds each run's wall-clock and CPU seconds (``/usr/bin/time``) and the
machine's load average while it ran.
"""

import glob
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def _minutes(seconds: float) -> str:
  return f"{int(seconds // 60)} m {int(round(seconds % 60)):02d} s"


def rows() -> list[dict]:
  """One dict per committed seed, sorted by seed."""
  with open(os.path.join(HERE, "timings.json"), encoding="utf-8") as f:
    timings = json.load(f)
  out = []
  for path in glob.glob(os.path.join(HERE, "seed_*.json")):
    seed = int(re.fullmatch(r"seed_(\d+)\.json", os.path.basename(path)).group(1))
    with open(path, encoding="utf-8") as f:
      res = json.load(f)["results"]
    single = next(v for k, v in res["protocols"].items() if k.startswith("single_view"))
    ten = next(v for k, v in res["protocols"].items() if k.startswith("ten_view"))
    out.append(dict(seed=seed, single=single, ten=ten, pointing=res["pointing"],
                    recall=res["attention_recall"], time=timings[str(seed)]))
  return sorted(out, key=lambda r: r["seed"])


def table() -> str:
  lines = ["| seed | single view (96 px) mAP | ten-view (112 px) mAP | CF1 / OF1 (ten-view) "
           "| pointing game: regions / chance | attention recall | wall clock (CPU time), load |",
           "|---|---|---|---|---|---|---|"]
  for r in rows():
    p, t = r["pointing"], r["time"]
    lines.append(
        f"| {r['seed']} | {_pct(r['single']['mAP'])} | {_pct(r['ten']['mAP'])} | "
        f"{_pct(r['ten']['CF1'])} / {_pct(r['ten']['OF1'])} | "
        f"{_pct(p['model_regions']['hit_rate'])} % / {_pct(p['chance']['hit_rate'])} % | "
        f"{_pct(r['recall']['model_regions'])} % | "
        f"{_minutes(t['wall_s'])} ({_minutes(t['cpu_s'])}), {t['load']} |")
  return "\n".join(lines)


if __name__ == "__main__":
  print(table())
