"""Run reports: Recall@N curves, retrieval examples, training curves, report.md.

All figures are written with matplotlib's headless Agg backend (or PIL) to a
temporary name and renamed when complete. `write_report(workdir)` gathers
what a finished run left in its workdir:

  <workdir>/report.md                 tables + pictures, links relative
  <workdir>/eval/recall_at_n.png      R@N of every evaluated branch (overall + per condition)
  <workdir>/eval/examples.png         queries with their top-5 (green = correct)
  <workdir>/training_curves.png       loss and val R@5 per stage (metrics.jsonl)
  <workdir>/partition/groups.png      (made by the partition stage)
  <workdir>/data/montage.png          synthetic data only: one place, every condition
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

COLORS = {"rgb": "#1f77b4", "seg": "#2ca02c", "distill": "#d62728"}


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.png"
  fig.savefig(tmp, dpi=110, bbox_inches="tight")
  _plt().close(fig)
  os.replace(tmp, path)
  return path


def _recall_curve(record: dict):
  ns = sorted(int(k[2:]) for k in record if k.startswith("R@"))
  return ns, [record[f"R@{n}"] for n in ns]


def plot_recall_curves(branches: dict, path: str, title: str = "") -> str:
  """recall_at_n.png: R@N vs N for each branch; one panel overall + one per condition.

  Args:
    branches: {stage: recall record} as in eval/summary.json ("R@n" keys in
      percent, optional "per_condition" and "label").
  """
  plt = _plt()
  conditions = sorted({c for r in branches.values() for c in r.get("per_condition", {})})
  panels = ["all"] + conditions
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
  for ax, panel in zip(axes[0], panels):
    for stage, rec in branches.items():
      r = rec if panel == "all" else rec.get("per_condition", {}).get(panel)
      if r is None:
        continue
      ns, vals = _recall_curve(r)
      ax.plot(ns, vals, "o-", color=COLORS.get(stage), label=rec.get("label", stage), ms=4)
    ax.set_title(panel if panel != "all" else "all queries", fontsize=10)
    ax.set_xscale("log")
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_ylim(0, 100)
    ax.set_xlabel("N")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("Recall@N (%)")
  axes[0][0].legend(fontsize=8, loc="lower right")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def pick_example_queries(notes: Sequence[str], per_condition: int = 2, seed: int = 0) -> np.ndarray:
  """Deterministic query indices: `per_condition` of each condition (note)."""
  notes = np.asarray(list(notes))
  rng = np.random.default_rng([seed, 5])
  picks = []
  for note in sorted(set(notes.tolist())):
    idx = np.flatnonzero(notes == note)
    picks.extend(sorted(rng.choice(idx, min(per_condition, len(idx)), replace=False)))
  return np.asarray(picks, np.int64)


def plot_examples(query_images: np.ndarray, db_images: np.ndarray, predictions: np.ndarray,
                  correct: np.ndarray, labels: Sequence[str], path: str, k: int = 5,
                  title: str = "") -> str:
  """examples.png: one row per query, then its top-k database images; a
  green frame marks a correct match (within the radius), red a wrong one.

  Args:
    query_images: uint8 [Q, H, W, 3].
    db_images: uint8 [N, H, W, 3] (indexed by `predictions`).
    predictions: int [Q, >=k] database indices, best first.
    correct: bool [Q, >=k].
    labels: Q row titles (e.g. condition).
  """
  plt = _plt()
  q = len(query_images)
  fig, axes = plt.subplots(q, k + 1, figsize=(1.9 * (k + 1), 1.55 * q + 0.3), squeeze=False)
  for i in range(q):
    ax = axes[i][0]
    ax.imshow(query_images[i])
    ax.set_title(f"query: {labels[i]}", fontsize=8)
    for j in range(k):
      ax = axes[i][j + 1]
      ax.imshow(db_images[predictions[i, j]])
      color = "#1a9641" if correct[i, j] else "#d7191c"
      for side in ax.spines.values():
        side.set_edgecolor(color)
        side.set_linewidth(4)
      ax.set_title(f"top {j + 1}" + (" \u2713" if correct[i, j] else ""), fontsize=8,
                   color=color)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def examples_for_split(root: str, split: str, predictions: np.ndarray, image_size,
                       radius: float, path: str, title: str = "", per_condition: int = 2,
                       k: int = 5) -> str:
  """examples.png for the predictions of one evaluated split (reads the images)."""
  from structvpr_jax.data import layout, pipeline
  vs = layout.read_split(root, split)
  picks = pick_example_queries(vs.query_notes(), per_condition)
  images = pipeline.SplitImages(vs, image_size, views=("rgb",), cache=False)
  preds = np.asarray(predictions)[picks, :k]
  dists = np.linalg.norm(vs.query_utm[picks][:, None, :] - vs.database_utm[preds], axis=-1)
  q_img = images.sources["queries"].get("rgb", picks)
  used = np.unique(preds)
  db_img = np.zeros((vs.num_database,) + q_img.shape[1:], np.uint8)
  db_img[used] = images.sources["database"].get("rgb", used)
  notes = np.asarray(vs.query_notes())[picks]
  return plot_examples(q_img, db_img, preds, dists <= radius, [str(n) for n in notes], path,
                       k=k, title=title)


def plot_training_curves(metrics_path: str, path: str) -> Optional[str]:
  """training_curves.png: loss per step and val R@5 per stage, from metrics.jsonl."""
  if not os.path.exists(metrics_path):
    return None
  with open(metrics_path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  stages = [s for s in ("rgb", "seg", "distill") if any(r.get("stage") == s for r in records)]
  if not stages:
    return None
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
  for s in stages:
    tr = [r for r in records if r.get("stage") == s and "loss" in r]
    va = [r for r in records if r.get("stage") == s and r.get("event") == "val"]
    if tr:
      axes[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], color=COLORS.get(s),
                   label=s)
    if va:
      axes[1].plot([r["step"] for r in va], [r["val_R@5"] for r in va], "o-",
                   color=COLORS.get(s), label=s, ms=4)
  axes[0].set_title("training loss", fontsize=10)
  axes[1].set_title("val Recall@5 (%)", fontsize=10)
  axes[1].set_ylim(0, 101)
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def _ordered(branches: dict) -> dict:
  """rgb, seg, distill first (pipeline order), then anything else."""
  order = ["rgb", "seg", "distill"]
  keys = [k for k in order if k in branches] + [k for k in branches if k not in order]
  return {k: branches[k] for k in keys}


def _table(branches: dict) -> str:
  from structvpr_jax.train import format_table
  return format_table(_ordered(branches))


def write_report(workdir: str) -> str:
  """<workdir>/report.md from whatever the run produced; returns its path."""
  def rel(p):
    return os.path.relpath(p, workdir)

  lines = [f"# StructVPR run report: `{os.path.abspath(workdir)}`", ""]
  cfg_path = os.path.join(workdir, "config.json")
  if os.path.exists(cfg_path):
    with open(cfg_path) as f:
      cfg = json.load(f)
    data = cfg.get("data", {})
    lines += [f"Data: `{data.get('name')}` {data.get('root') or ''}, input "
              f"{tuple(data.get('image_size', ()))}; seed {cfg.get('seed')}; distillation "
              f"weighting `{cfg.get('distill', {}).get('weighting')}` (beta "
              f"{cfg.get('distill', {}).get('beta')}, lambda "
              f"{cfg.get('distill', {}).get('lambda_kd')}). Full config: `config.json`.", ""]
  summary_path = os.path.join(workdir, "eval", "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    branches = summary["branches"]
    lines += [f"## Recall@N on the {summary.get('split', 'test')} split (percent; R@1/5/10)",
              "", _table(branches), ""]
    curves = os.path.join(workdir, "eval", "recall_at_n.png")
    plot_recall_curves(_ordered(branches), curves, f"{summary.get('split', 'test')} split")
    lines += [f"![Recall@N]({rel(curves)})", ""]
    examples = os.path.join(workdir, "eval", "examples.png")
    if os.path.exists(examples):
      lines += ["## Retrieval examples (distilled RGB branch; green = within the radius)", "",
                f"![examples]({rel(examples)})", ""]
  part = os.path.join(workdir, "partition", "summary.json")
  if os.path.exists(part):
    with open(part) as f:
      ps = json.load(f)
    lines += ["## Partition of the training queries", "",
              "| group | count | mean weight |", "|---|---|---|"]
    for k, v in ps.items():
      if isinstance(v, dict) and "count" in v:
        mw = v.get("mean_weight")
        lines.append(f"| {k} | {v['count']} | {'-' if mw is None else f'{mw:.3f}'} |")
    groups = os.path.join(workdir, "partition", "groups.png")
    if os.path.exists(groups):
      lines += ["", f"![groups]({rel(groups)})"]
    lines.append("")
  curves = plot_training_curves(os.path.join(workdir, "metrics.jsonl"),
                                os.path.join(workdir, "training_curves.png"))
  if curves:
    lines += ["## Training", "", f"![training curves]({rel(curves)})", ""]
  montage = os.path.join(workdir, "data", "montage.png")
  if os.path.exists(montage):
    lines += ["## Data (synthetic city: one place under every condition)", "",
              f"![montage]({rel(montage)})", ""]
  path = os.path.join(workdir, "report.md")
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write("\n".join(lines))
  os.replace(tmp, path)
  return path
