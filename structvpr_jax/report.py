"""Run reports: Recall@N curves, retrieval examples, training curves, tables, report.md.

All figures are drawn with matplotlib's headless Agg backend and written
atomically (`save_figure` -> `files.atomic_write`). `write_report(wd)`
gathers what a finished run left in its workdir (a `workdir.Workdir`); every
setting it prints comes from the stages' own records, never from the
command that asks for the report:

  <workdir>/report.md                 tables + pictures, links relative
  <workdir>/eval/recall_at_n.png      R@N of every evaluated branch (overall + per condition)
  <workdir>/eval/examples.png         queries with their top-5 (green = correct)
  <workdir>/training_curves.png       loss and val R@5 per stage (metrics.jsonl)
  <workdir>/partition/groups.png      (made by the partition stage)
  <workdir>/data/montage.png          synthetic data only: one place, every condition
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from structvpr_jax import files, partition, retrieval  # noqa: E402
from structvpr_jax.data import input_pipeline, layout  # noqa: E402
from structvpr_jax.workdir import Workdir  # noqa: E402

COLORS = {"rgb": "#1f77b4", "seg": "#2ca02c", "distill": "#d62728"}
# The branches of a StructVPR run, in pipeline order, with their table labels.
BRANCH_LABELS = {"rgb": "stage-1 RGB", "seg": "seg teacher",
                 "distill": "StructVPR-distilled RGB"}


def save_figure(fig, path: str, dpi: int = 110, tight: bool = True) -> str:
  """Writes a matplotlib figure atomically (PNG by the extension) and closes it;
  `tight` crops the margins."""
  kwargs = {"bbox_inches": "tight"} if tight else {}
  try:
    return files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, **kwargs))
  finally:
    plt.close(fig)


def _recall_curve(record: dict):
  ns = sorted(int(k[2:]) for k in record if k.startswith("R@"))
  return ns, [record[f"R@{n}"] for n in ns]


def plot_recall_curves(branches: dict, path: str, title: str = "") -> str:
  """recall_at_n.png: R@N vs N for each branch; one panel overall + one per condition.

  Args:
    branches: {stage: recall record} as in eval/summary.json ("R@n" keys in
      percent, optional "per_condition" and "label").
  """
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
  return save_figure(fig, path)


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
  return save_figure(fig, path)


def examples_for_split(root: str, split: str, predictions: np.ndarray, image_size,
                       radius: float, path: str, title: str = "", per_condition: int = 2,
                       k: int = 5) -> str:
  """examples.png for the predictions of one evaluated split (reads the images)."""
  vs = layout.read_split(root, split)
  picks = pick_example_queries(vs.query_notes(), per_condition)
  images = input_pipeline.SplitImages(vs, image_size, views=("rgb",), cache=False)
  preds = np.asarray(predictions)[picks, :k]
  dists = np.linalg.norm(vs.query_utm[picks][:, None, :] - vs.database_utm[preds], axis=-1)
  q_img = images.sources["queries"].get("rgb", picks)
  used = np.unique(preds)
  db_img = np.zeros((vs.num_database,) + q_img.shape[1:], np.uint8)
  db_img[used] = images.sources["database"].get("rgb", used)
  notes = np.asarray(vs.query_notes())[picks]
  return plot_examples(q_img, db_img, preds, dists <= radius, [str(n) for n in notes], path,
                       k=k, title=title)


def save_predictions(out_dir: str, vs: layout.VprSplit, predictions: np.ndarray, k: int,
                     image_size, radius: float, labelled: bool = True,
                     only_wrong: bool = False, global_rank: Optional[np.ndarray] = None) -> int:
  """preds/NNN.jpg (the query, then its top-k, framed green when within
  `radius` of the query, red when not, grey without labels) and preds/NNN.txt
  (query path, prediction paths, positive paths) per query, NNN = the query's
  index in name order; `only_wrong`: only queries whose top-1 is wrong (as
  VPR-methods-evaluation's save_only_wrong_preds). `global_rank` (int [Q, >= k],
  re-ranked predictions): each tile is marked "R<rank> g<global rank>" and the
  txt gives the global rank of each prediction. Returns the count written."""
  preds = np.asarray(predictions)[:, :k]
  q_count = len(vs.query_paths)
  correct = (retrieval.correct_at_k(preds, vs.query_utm, vs.database_utm, radius)
             if labelled else np.zeros(preds.shape, bool))
  positives = (retrieval.positives_within(vs.query_utm, vs.database_utm, radius)
               if labelled else [np.zeros(0, np.int64)] * q_count)
  width = max(3, len(str(q_count - 1)))
  h, w = int(image_size[0]), int(image_size[1])
  border = 4
  written = 0
  for i in range(q_count):
    if only_wrong and labelled and correct[i, 0]:
      continue
    tiles = [np.pad(input_pipeline.read_rgb(vs.query_paths[i], (h, w)),
                    ((border, border), (border, border), (0, 0)), constant_values=255)]
    for j, d in enumerate(preds[i]):
      if d < 0:
        continue
      color = ((0, 170, 0) if correct[i, j] else (200, 0, 0)) if labelled else (128, 128, 128)
      tile = np.empty((h + 2 * border, w + 2 * border, 3), np.uint8)
      tile[:] = color
      tile[border:-border, border:-border] = input_pipeline.read_rgb(vs.database_paths[d], (h, w))
      if global_rank is not None:
        tile = _mark(tile, f"R{j + 1} g{int(global_rank[i, j])}")
      tiles.append(tile)
    name = f"{i:0{width}d}"
    files.save_image(os.path.join(out_dir, name + ".jpg"), np.concatenate(tiles, axis=1),
                     quality=90)
    lines = ["query:", vs.query_paths[i], ""]
    if global_rank is None:
      lines += ["predictions (nearest first):"]
      lines += [vs.database_paths[d] for d in preds[i] if d >= 0]
    else:
      lines += ["predictions (re-ranked top-K, best first; [global rank]):"]
      lines += [f"{vs.database_paths[d]} [{int(global_rank[i, j])}]"
                for j, d in enumerate(preds[i]) if d >= 0]
    lines += ["", "positives (within %g m):" % radius if labelled else "positives: unknown"]
    lines += [vs.database_paths[d] for d in positives[i]]
    files.write_text(os.path.join(out_dir, name + ".txt"), "\n".join(lines) + "\n")
    written += 1
  return written


def _mark(tile: np.ndarray, text: str) -> np.ndarray:
  """The tile with `text` on a white box in its top-left corner (PIL's default font)."""
  image = Image.fromarray(tile)
  draw = ImageDraw.Draw(image)
  box = draw.textbbox((6, 6), text)
  draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(255, 255, 255))
  draw.text((6, 6), text, fill=(0, 0, 0))
  return np.asarray(image)


def plot_training_curves(metrics_path: str, path: str) -> Optional[str]:
  """training_curves.png: loss per step and val R@5 per stage, from metrics.jsonl."""
  records = files.read_jsonl(metrics_path)
  stages = [s for s in ("rgb", "seg", "distill") if any(r.get("stage") == s for r in records)]
  if not stages:
    return None
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
  return save_figure(fig, path)




def plot_groups(result: dict, path: str) -> str:
  """groups.png: training queries per partition group and the Eq. 3 weight
  histogram of each group (`result`: the partition's "groups", "weights")."""
  groups, weights = result["groups"], result["weights"]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  names = list(partition.GROUP_NAMES)
  counts = [int(np.sum(groups == g)) for g in range(len(names))]
  colors = ["#999999", "#4c72b0", "#55a868", "#c44e52", "#8172b2"]
  axes[0].bar(names, counts, color=colors)
  axes[0].set_title("training queries per group")
  for g in range(1, 5):
    sel = groups == g
    if sel.any():
      axes[1].hist(weights[sel], bins=20, range=(0, 1), alpha=0.6, label=names[g],
                   color=colors[g])
  axes[1].set_title("distillation weight (Eq. 3, ours)")
  axes[1].set_xlabel("weight")
  axes[1].legend()
  fig.tight_layout()
  return save_figure(fig, path, dpi=100, tight=False)


def ordered(branches: dict) -> dict:
  """rgb, seg, distill first (pipeline order), each followed by its re-ranked
  "<branch>+R" row, then anything else."""
  order = [k for b in BRANCH_LABELS for k in (b, f"{b}+R")]
  keys = [k for k in order if k in branches] + [k for k in branches if k not in order]
  return {k: branches[k] for k in keys}


def format_table(table: dict) -> str:
  """Markdown table: R@1/5/10 per query condition for each branch."""
  conditions = sorted({c for r in table.values() for c in r.get("per_condition", {})})
  header = "| branch | " + " | ".join(f"{c} R@1/5/10" for c in conditions + ["all"]) + " |"
  lines = [header, "|" + "---|" * (len(conditions) + 2)]
  for stage, r in table.items():
    cells = []
    for c in conditions + ["all"]:
      rec = r if c == "all" else r.get("per_condition", {}).get(c)
      cells.append("-" if rec is None else
                   f"{rec['R@1']:.1f}/{rec['R@5']:.1f}/{rec['R@10']:.1f}")
    lines.append(f"| {r.get('label', stage)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def settings_line(wd: Workdir) -> Optional[str]:
  """One sentence of the settings the run's results were made with, read from
  the stages' records (distill, else partition, else any trained stage)."""
  recorded = {}
  for stage in ("rgb", "seg", "partition", "distill"):
    rec = wd.record(stage)
    if rec is not None:
      recorded.update(rec.get("config", {}))
  if not recorded:
    return None
  data_where = recorded.get("data.root") or recorded.get("data.source") or ""
  text = (f"Data: `{recorded.get('data.name')}`{' ' + data_where if data_where else ''}, input "
          f"{tuple(recorded.get('data.image_size', ()))}; seed {recorded.get('seed')}")
  if "distill.weighting" in recorded:
    lam = recorded.get("distill.lambda_kd")
    text += (f"; distillation weighting `{recorded['distill.weighting']}` (beta "
             f"{recorded.get('distill.beta')}" + ("" if lam is None else f", lambda {lam}")
             + ")")
  return text + ". Settings of each stage: its `done.json` / `summary.json` (`config`)."


def write_report(wd: Workdir) -> str:
  """<workdir>/report.md from whatever the run produced; returns its path."""
  def rel(p):
    return os.path.relpath(p, wd.root)

  lines = [f"# StructVPR run report: `{os.path.abspath(wd.root)}`", ""]
  settings = settings_line(wd)
  if settings:
    lines += [settings, ""]
  if os.path.exists(wd.eval_summary):
    summary = files.read_json(wd.eval_summary)
    branches = summary["branches"]
    lines += [f"## Recall@N on the {summary.get('split', 'test')} split (percent; R@1/5/10)",
              "", format_table(ordered(branches)), ""]
    plot_recall_curves(ordered(branches), wd.recall_png, f"{summary.get('split', 'test')} split")
    lines += [f"![Recall@N]({rel(wd.recall_png)})", ""]
    if os.path.exists(wd.examples_png):
      lines += ["## Retrieval examples (distilled RGB branch; green = within the radius)", "",
                f"![examples]({rel(wd.examples_png)})", ""]
  if os.path.exists(wd.partition_summary):
    ps = files.read_json(wd.partition_summary)
    lines += ["## Partition of the training queries", ""]
    cmp = ps.get("val_teacher_vs_student")
    if cmp:
      lines += ["Stage-1 branches on val (R@1, percent): " + ", ".join(
          f"{c} teacher {cmp['teacher'][c]:.1f} / student {cmp['student'][c]:.1f}"
          for c in cmp["teacher"]) + ".", ""]
    if ps.get("teacher_warning"):
      lines += [f"**{ps['teacher_warning']}**", ""]
    lines += ["| group | count | mean weight |", "|---|---|---|"]
    for k, v in ps.items():
      if isinstance(v, dict) and "count" in v:
        mw = v.get("mean_weight")
        lines.append(f"| {k} | {v['count']} | {'-' if mw is None else f'{mw:.3f}'} |")
    if os.path.exists(wd.groups_png):
      lines += ["", f"![groups]({rel(wd.groups_png)})"]
    lines.append("")
  curves = plot_training_curves(wd.metrics, wd.training_curves_png)
  if curves:
    lines += ["## Training", "", f"![training curves]({rel(curves)})", ""]
  montage = os.path.join(wd.data, "montage.png")
  if os.path.exists(montage):
    lines += ["## Data (synthetic city: one place under every condition)", "",
              f"![montage]({rel(montage)})", ""]
  return files.write_text(wd.report_md, "\n".join(lines))
