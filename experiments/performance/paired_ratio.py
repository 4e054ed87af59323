"""JAX / PyTorch speed ratios measured call by call, paired (the speed targets).

  python experiments/performance/paired_ratio.py [--pairs 24] [--blocks 6] [--only forward_224 ...]
      [--quick] [--gap-s 0.25] [--out experiments/results/paired_ratio_run]
  python experiments/performance/paired_ratio.py --pool RUN.json RUN.json ...
      [--out experiments/results/paired_ratio]

A run writes `--out`.{json,md} (default `paired_ratio_run`, a scratch name: the
repository keeps only the verdict); `--pool` writes the verdict over runs
(default `experiments/results/paired_ratio`, the file docs/performance.md
cites, which keeps every run's median and interval in its columns).

Why: `experiments/performance/bench.py` runs each framework's worker for minutes and
takes medians per fresh process; on this shared 2-core VM the speed of the
machine drifts on that time scale (PyTorch's forward at 224 measured 183 and
97 img/s in two runs of the same code), so its same-run ratios met a target
in one run and missed it in the next. Here both frameworks stay loaded in
two fresh worker processes at once and take turns call by call: both
prepare every comparison (compile, two warm-up calls), then the run goes
through the comparisons `--blocks` times in turn; in each block of a
comparison both make one untimed call, then JAX and PyTorch each time one
call per pair, the order alternating (`--pairs` pairs per comparison in
all, spread over the blocks). A slow minute slows both halves of a pair, so
the per-pair ratio JAX img/s / PyTorch img/s (= PyTorch seconds / JAX
seconds) cancels it. Reported per comparison: the median of the pair
ratios with a 95 % bootstrap interval, each side's median img/s, and a
verdict on the target: "met" when the whole interval is at or above it,
"missed" when it is all below, else "undecided".

Why blocks: pairs taken a few seconds apart share the machine's state, and
a bootstrap over single pairs treats them as independent. Until 2026-12-03
each comparison took all its pairs in one stretch; two rows of one run that
timed the very same two calls ten minutes apart read 1.28 [1.23, 1.34] and
1.47 [1.22, 1.65] - intervals far narrower than the truth. Now the interval
resamples whole blocks (a cluster bootstrap; `ratio_summary(clusters=)`),
so it widens by as much as the state of the machine moved the ratio
between the blocks of a run. `--pool` does the same over several saved runs
(every block of every run one cluster; a run from before blocks is one
cluster): the verdict over runs taken at different hours of the day.

Between two timed calls both workers sit idle for `--gap-s` seconds (0.25;
0 with --quick). Without the gap, JAX's call right after PyTorch's ran 3-15 %
slower than its call right after its own (2026-12-03 00:31 run, all 11
comparisons; PyTorch's showed no such effect): PyTorch's OpenMP threads keep
spinning on the two cores for a while after its call returns. The order
alternates, so that cost JAX half its pairs. Each comparison reports this
order effect (a framework's median call time after the other's call over
its median after its own; 1.00 = none).

Comparisons (each framework's call as `bench.py` times it: JAX =
`bench.forward_call` / `bench.train_step_call` on the pipeline's default
model; PyTorch = `torch_reference.forward_call` / `train_step`):
  forward_224, forward_480x640    16 uint8 images to descriptors; JAX as the
                                  pipeline extracts (eval.micro_batch auto:
                                  the whole batch at 224; at 480x640 the
                                  half-resolution layers in chunks of 2 and the
                                  rest whole, since 2026-12-03 17:00; before,
                                  the whole network in chunks of 2), PyTorch
                                  the obvious whole-batch call. Targets 1.5, 2.
                                  (At 224 both calls are whole-batch calls, so
                                  there are no "_both_chunked" / "_both_whole"
                                  rows for it: they timed the same two calls
                                  as forward_224, until 2026-12-03.)
  train_step_224_frozen           4 triplets at 224, frozen BN (the pipeline's
                                  mode), Adam. Target 1.5.
  train_step_224                  the same with BatchNorm batch statistics.
  forward_480x640_both_chunked    PyTorch also in our chunks (the same cache
                                  effect on its side; its whole network in
                                  chunks of 2).
  forward_480x640_both_whole      JAX also on the whole batch at once
                                  (eval.micro_batch=16).

Both workers get the allocator setting bench.py calls "huge pages" (the
glibc tunables of the main program, structvpr_jax/hugepages.py; the JAX
worker also dispatches synchronously as the program does) and the XLA:CPU
defaults of structvpr_jax/xla_flags.py; PyTorch runs with its default threads (one per
core). The CPU time the hypervisor took from this VM during the run (steal,
/proc/stat) is recorded. Writes <out>.json (every pair's seconds) and
<out>.md; --quick: tiny sizes, figures meaningless (tests).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))   # the repository root
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

# name -> (JAX call, PyTorch call, images per call, target ratio or None,
# PyTorch worker: "torch" with the same allocator settings as JAX, or
# "torch_default" in the environment without them, as PyTorch runs for a
# user who sets nothing)
COMPARISONS = {
    "forward_224": ("forward_224", "forward_224", 16, 1.5, "torch"),
    "forward_480x640": ("forward_480x640", "forward_480x640", 16, 2.0, "torch"),
    "train_step_224_frozen": ("train_step_224_frozen", "train_step_224_frozen", 12, 1.5, "torch"),
    "train_step_224": ("train_step_224", "train_step_224", 12, None, "torch"),
    "forward_480x640_both_chunked": ("forward_480x640", "forward_480x640_chunked", 16, None,
                                     "torch"),
    "forward_480x640_both_whole": ("forward_480x640_whole", "forward_480x640", 16, None, "torch"),
    "forward_224_torch_default_env": ("forward_224", "forward_224", 16, None, "torch_default"),
    "forward_480x640_torch_default_env": ("forward_480x640", "forward_480x640", 16, None,
                                          "torch_default"),
    "train_step_224_frozen_torch_default_env": ("train_step_224_frozen", "train_step_224_frozen",
                                                12, None, "torch_default"),
}
REPLY = "@@ "          # prefix of a worker's reply lines on stdout
WARMUP_CALLS = 2


# --------------------------------------------------------------------------
# Workers: build a named call once, then time single calls on request
# --------------------------------------------------------------------------
def _parse_call(name: str) -> tuple[str, str, str]:
  """("forward" | "train_step", size key, rest) of a call name."""
  kind = "forward" if name.startswith("forward_") else "train_step"
  size, _, rest = name[len(kind) + 1:].partition("_")
  return kind, size, rest


def jax_builder(quick: bool):
  """name -> a no-argument function running that JAX call."""
  import bench
  from structvpr_jax import parallel
  from structvpr_jax.models import spec as model_spec
  import jax
  mesh = parallel.make_mesh(jax.devices()[:1])

  def build(name: str):
    kind, size, rest = _parse_call(name)
    hw = bench.image_sizes(quick)[size]
    spec = bench.make_spec("rgb", hw, quick, dim=0, num_clusters=8 if quick else 64)
    variables = model_spec.init_variables(spec, seed=0)
    if kind == "forward":
      if rest not in ("", "whole"):
        raise ValueError(f"unknown JAX call {name!r}")
      return bench.forward_call(spec, parallel.replicate(variables, mesh), mesh,
                                micro_batch=16 if rest == "whole" else 0)
    batchnorm = {"frozen": "frozen", "": "batch"}[rest]
    return bench.train_step_call(spec, variables, mesh, batchnorm, bench.TRAIN_TRIPLETS[size])

  return build


def torch_builder(quick: bool):
  """name -> a no-argument function running that PyTorch call (one model
  and Adam state shared by all, as in torch_reference.bench)."""
  import torch
  import torch_reference as ref
  torch.manual_seed(0)
  sizes = {"224": (64, 64) if quick else (224, 224),
           "480x640": (96, 128) if quick else (480, 640)}
  model = ref.RGBBranch(8 if quick else 64).to(memory_format=torch.channels_last)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

  def build(name: str):
    kind, size, rest = _parse_call(name)
    hw = sizes[size]
    if kind == "forward":
      if rest not in ("", "chunked"):
        raise ValueError(f"unknown PyTorch call {name!r}")
      x = torch.randint(0, 256, (16, *hw, 3), dtype=torch.uint8)
      chunk = ref.micro_batch_size(16, hw) if rest == "chunked" else 0
      forward = ref.forward_call(model, x, chunk)

      def run():
        model.eval()
        return forward()
      return run
    batchnorm = {"frozen": "frozen", "": "batch"}[rest]
    images = torch.randint(0, 256, (4 if size == "224" else 2, 3, *hw, 3), dtype=torch.uint8)

    def step():
      ref.set_batchnorm(model, batchnorm)
      return ref.train_step(model, optimizer, images)
    return step

  return build


def worker(framework: str, quick: bool) -> int:
  """Answers JSON commands on stdin, one per line: {"op": "prepare", "call"}
  (build, warm up: {"first_s"}), {"op": "time", "call"} (one call: {"s"}),
  {"op": "quit"}. Replies are lines prefixed by REPLY on stdout."""
  if framework == "jax":
    from structvpr_jax import hugepages, xla_flags
    xla_flags.apply()
    hugepages.configure_jax()      # as the main program (structvpr_jax/hugepages.py)
  build = (jax_builder if framework == "jax" else torch_builder)(quick)
  calls = {}

  def reply(obj):
    sys.stdout.write(REPLY + json.dumps(obj) + "\n")
    sys.stdout.flush()

  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "quit":
      break
    name = cmd["call"]
    if cmd["op"] == "prepare":
      t0 = time.perf_counter()
      calls[name] = calls.get(name) or build(name)
      for _ in range(WARMUP_CALLS):
        calls[name]()
      reply({"first_s": time.perf_counter() - t0})
    elif cmd["op"] == "time":
      t0 = time.perf_counter()
      calls[name]()
      reply({"s": time.perf_counter() - t0})
    else:
      raise ValueError(f"unknown op {cmd['op']!r}")
  return 0


# --------------------------------------------------------------------------
# Coordinator
# --------------------------------------------------------------------------
class Worker:
  """A worker process of this script, asked one command at a time."""

  def __init__(self, framework: str, quick: bool, env: dict):
    self.framework = framework
    command = [sys.executable, os.path.abspath(__file__), "--worker", framework]
    self.proc = subprocess.Popen(command + (["--quick"] if quick else []), cwd=REPO, env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def ask(self, **cmd) -> dict:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    for line in self.proc.stdout:
      if line.startswith(REPLY):
        return json.loads(line[len(REPLY):])
    raise SystemExit(f"paired_ratio: the {self.framework} worker exited "
                     f"(code {self.proc.wait()}) during {cmd}")

  def close(self):
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.close()
      except BrokenPipeError:
        pass
    self.proc.wait(timeout=60)


def cpu_ticks() -> dict:
  """{"steal", "total"} jiffies of /proc/stat's cpu line ({} off Linux)."""
  try:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return {}
  return {"steal": fields[7] if len(fields) > 7 else 0, "total": sum(fields[:8])}


def ratio_summary(jax_s, torch_s, images: int, target=None, resamples: int = 4000,
                  seed: int = 0, clusters=None) -> dict:
  """Median of the pair ratios torch_s / jax_s (= JAX img/s / PyTorch img/s),
  its 95 % percentile-bootstrap interval, each side's median img/s and, with
  a target, the share of pairs at or above it and the verdict ("met":
  interval >= target; "missed": interval < target; "undecided").

  The bootstrap (`resamples` draws, `seed`) resamples pairs with
  replacement; with `clusters` (one label per pair: the block, or the run
  and block, it was timed in) and more than one distinct label, it
  resamples whole clusters instead, keeping every pair of a drawn cluster
  (a cluster bootstrap: pairs that shared the machine's state stay
  together, so the interval covers how much that state moved the ratio).
  """
  import numpy as np
  jax_s, torch_s = np.asarray(jax_s, float), np.asarray(torch_s, float)
  if jax_s.shape != torch_s.shape or jax_s.size == 0:
    raise ValueError("ratio_summary needs the same number (> 0) of JAX and PyTorch times")
  ratios = torch_s / jax_s
  rng = np.random.default_rng(seed)
  groups = []
  if clusters is not None:
    labels = [str(c) for c in clusters]
    if len(labels) != ratios.size:
      raise ValueError(f"ratio_summary: {len(labels)} cluster labels for {ratios.size} pairs")
    groups = [ratios[[i for i, l in enumerate(labels) if l == u]] for u in dict.fromkeys(labels)]
  if len(groups) > 1:
    draws = rng.integers(0, len(groups), (resamples, len(groups)))
    medians = np.array([np.median(np.concatenate([groups[g] for g in d])) for d in draws])
  else:
    idx = rng.integers(0, ratios.size, (resamples, ratios.size))
    medians = np.median(ratios[idx], axis=1)
  low, high = np.percentile(medians, [2.5, 97.5])
  out = {"pairs": int(ratios.size), "ratio": float(np.median(ratios)),
         "ci95": [float(low), float(high)],
         "bootstrap": "clusters" if len(groups) > 1 else "pairs",
         "clusters": max(len(groups), 1),
         "jax_img_s": float(images / np.median(jax_s)),
         "torch_img_s": float(images / np.median(torch_s)),
         "ratio_min_max": [float(ratios.min()), float(ratios.max())]}
  if target is not None:
    out["target"] = float(target)
    out["pairs_at_target"] = float(np.mean(ratios >= target))
    out["verdict"] = "met" if low >= target else ("missed" if high < target else "undecided")
  return out


def order_effect(seconds, framework: str) -> float:
  """Median call time after the other framework's call / after its own.

  `seconds`: one framework's call times in pair order; pair i runs (jax,
  torch) for even i and (torch, jax) for odd i, so JAX's odd-pair calls and
  PyTorch's even-pair calls follow the other's call, the rest their own
  (pair 0's JAX call follows PyTorch's preparation; counted as its own).
  """
  import numpy as np
  s = np.asarray(seconds, float)
  after_other = s[1::2] if framework == "jax" else s[0::2]
  after_own = s[0::2] if framework == "jax" else s[1::2]
  if not after_other.size or not after_own.size:
    return float("nan")
  return float(np.median(after_other) / np.median(after_own))


def block_sizes(pairs: int, blocks: int) -> list[int]:
  """`pairs` spread over min(blocks, pairs) blocks, the first ones one larger."""
  blocks = max(1, min(blocks, pairs))
  return [pairs // blocks + (b < pairs % blocks) for b in range(blocks)]


def run(names, pairs: int, quick: bool, gap_s: float = 0.0, blocks: int = 1) -> dict:
  import bench
  envs = bench.allocator_environments()
  env = envs["hugepages"]
  worker_envs = {"jax": env, "torch": env, "torch_default": envs["nohuge"]}
  workers = {"jax": Worker("jax", quick, env), "torch": Worker("torch", quick, env)}
  if any(COMPARISONS[n][4] == "torch_default" for n in names):
    workers["torch_default"] = Worker("torch", quick, worker_envs["torch_default"])
  results, ticks0, t0 = {}, cpu_ticks(), time.time()
  sizes = block_sizes(pairs, blocks)
  try:
    state = {}
    for name in names:
      jax_call, torch_call, images, target, torch_worker = COMPARISONS[name]
      pair = {"jax": workers["jax"], "torch": workers[torch_worker]}
      calls = {"jax": jax_call, "torch": torch_call}
      first = {fw: w.ask(op="prepare", call=calls[fw])["first_s"] for fw, w in pair.items()}
      state[name] = {"pair": pair, "calls": calls, "first": first, "block": [],
                     "times": {"jax": [], "torch": []}}
    for block, size in enumerate(sizes):
      for name in names:
        st = state[name]
        pair, calls, times = st["pair"], st["calls"], st["times"]
        start = len(times["jax"])
        orders = [("jax", "torch") if (start + i) % 2 == 0 else ("torch", "jax")
                  for i in range(size)]
        # one untimed call each, the block's first timed caller last (so its
        # first call follows its own, as `order_effect` counts it)
        for fw in orders[0][::-1]:
          time.sleep(gap_s)
          pair[fw].ask(op="time", call=calls[fw])
        for order in orders:
          for fw in order:
            time.sleep(gap_s)            # the other's threads settle (module docstring)
            times[fw].append(pair[fw].ask(op="time", call=calls[fw])["s"])
        st["block"] += [block] * size
    for name in names:
      st = state[name]
      jax_call, torch_call, images, target, torch_worker = COMPARISONS[name]
      times = st["times"]
      summary = ratio_summary(times["jax"], times["torch"], images, target,
                              clusters=st["block"])
      summary["order_effect"] = {fw: order_effect(times[fw], fw) for fw in times}
      summary.update({"jax_call": jax_call, "torch_call": torch_call, "images": images,
                      "torch_glibc_tunables": worker_envs[torch_worker].get("GLIBC_TUNABLES", ""),
                      "jax_first_s": st["first"]["jax"], "torch_first_s": st["first"]["torch"],
                      "block": st["block"], "jax_s": times["jax"], "torch_s": times["torch"]})
      results[name] = summary
      print(f"paired_ratio: {name}: {summary['ratio']:.2f} "
            f"[{summary['ci95'][0]:.2f}, {summary['ci95'][1]:.2f}] "
            f"({summary['jax_img_s']:.1f} vs {summary['torch_img_s']:.1f} img/s)",
            file=sys.stderr, flush=True)
  finally:
    for w in workers.values():
      w.close()
  ticks1 = cpu_ticks()
  info = {"pairs": pairs, "blocks": len(sizes), "quick": quick, "gap_s": gap_s,
          "cpu_count": os.cpu_count(), "cpu_model": bench.cpu_model(),
          "glibc_tunables": env.get("GLIBC_TUNABLES", ""), "xla_flags": env.get("XLA_FLAGS", ""),
          "torch_default_glibc_tunables": envs["nohuge"].get("GLIBC_TUNABLES", ""),
          "wall_s": time.time() - t0, "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(t0))}
  if ticks0 and ticks1 and ticks1["total"] > ticks0["total"]:
    info["steal_share"] = (ticks1["steal"] - ticks0["steal"]) / (ticks1["total"] - ticks0["total"])
  return {"comparisons": results, "info": info}


UNRECORDED_HOST = "host not recorded (runs before 2026-12-03 13:00)"


def _images(name: str, r: dict) -> int:
  """Images per call of a saved comparison (saved since 2026-12-03; before,
  from COMPARISONS or its img/s and median seconds)."""
  import numpy as np
  if "images" in r:
    return int(r["images"])
  if name in COMPARISONS:
    return COMPARISONS[name][2]
  return int(round(r["jax_img_s"] * float(np.median(r["jax_s"]))))


def pool(runs: list) -> dict:
  """One summary per comparison over several saved runs (`run` results):
  all their pairs, clusters = (run, block) (a run saved before blocks is one
  cluster), the target of COMPARISONS (else the run's). Per run: its own
  ratio. Comparisons are matched by name; one whose calls differ between
  runs is an error."""
  if len({bool(res["info"].get("quick")) for res in runs}) > 1:
    raise ValueError("paired_ratio --pool: some runs are --quick (tiny sizes) and some not")
  # Runs saved before 2026-12-03 13:00 did not record their host.
  hosts = {res["info"].get("cpu_model", UNRECORDED_HOST) for res in runs}
  if len(hosts) > 1:
    raise ValueError("paired_ratio --pool: the runs come from different hosts "
                     f"({'; '.join(sorted(hosts))}): ratios of different CPUs are not "
                     "one quantity; pool each host's runs on their own")
  names = list(dict.fromkeys(n for res in runs for n in res["comparisons"]))
  out = {}
  for name in names:
    jax_s, torch_s, clusters, per_run, calls, images = [], [], [], [], set(), set()
    for k, res in enumerate(runs):
      r = res["comparisons"].get(name)
      if r is None:
        per_run.append(None)
        continue
      calls.add((r.get("jax_call"), r.get("torch_call"), r.get("torch_glibc_tunables")))
      images.add(_images(name, r))
      blocks = r.get("block") or [0] * len(r["jax_s"])
      jax_s += list(r["jax_s"])
      torch_s += list(r["torch_s"])
      clusters += [f"{k}/{b}" for b in blocks]
      per_run.append({"started": res["info"].get("started"), "ratio": r["ratio"],
                      "ci95": r["ci95"], "pairs": r["pairs"]})
    if len(calls) > 1 or len(images) > 1:
      raise ValueError(f"paired_ratio --pool: {name!r} timed different calls in different "
                       f"runs: {sorted(map(str, calls))}")
    target = COMPARISONS[name][3] if name in COMPARISONS else None
    if target is None:
      target = next((res["comparisons"][name].get("target") for res in runs
                     if name in res["comparisons"]), None)
    summary = ratio_summary(jax_s, torch_s, images.pop(), target, clusters=clusters)
    summary["runs"] = per_run
    out[name] = summary
  info = {"cpu_model": hosts.pop(),
          "runs": [{"started": res["info"].get("started"), "pairs": res["info"].get("pairs"),
                    "blocks": res["info"].get("blocks", 1), "gap_s": res["info"].get("gap_s"),
                    "quick": res["info"].get("quick")} for res in runs]}
  return {"comparisons": out, "info": info}


def pool_markdown(res: dict, command: str) -> str:
  runs = res["info"]["runs"]
  lines = ["# JAX / PyTorch, paired call by call, pooled over runs", "", f"`{command}`", "",
           "Every pair of every run; the interval resamples clusters (a block of a run, "
           "or a whole run saved before blocks), so it covers how the machine's state "
           "moved the ratio between blocks and runs. With few clusters (under ~6) it "
           "is no wider than the clusters' own spread: read it as a lower bound on the "
           "uncertainty.", "", f"Host: {res['info'].get('cpu_model', UNRECORDED_HOST)}.", "",
           "| comparison | pooled ratio | 95 % CI | clusters | pairs | target | "
           + " | ".join(f"run {r['started']}" for r in runs) + " |",
           "|---|---|---|---|---|---|" + "---|" * len(runs)]
  for name, r in res["comparisons"].items():
    target = f">= {r['target']:g} ({r['verdict']})" if "target" in r else ""
    cells = [f"{p['ratio']:.2f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]" if p else "-"
             for p in r["runs"]]
    lines.append(f"| {name} | {r['ratio']:.2f} | [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | "
                 f"{r['clusters']} | {r['pairs']} | {target} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def markdown(res: dict, command: str) -> str:
  info = res["info"]
  lines = ["# JAX / PyTorch, paired call by call", "", f"`{command}`", "",
           f"{info['pairs']} pairs per comparison in {info.get('blocks', 1)} block(s) "
           f"(order alternating, {info.get('gap_s', 0):g} s idle before each call; "
           f"interval: bootstrap over blocks), the workers loaded at "
           f"once; allocator settings of the main program for JAX and PyTorch "
           f"(`GLIBC_TUNABLES={info['glibc_tunables']}`; `*_torch_default_env`: PyTorch "
           f"without them, `{info['torch_default_glibc_tunables'] or 'unset'}`); "
           f"started {info['started']}, "
           f"{info['wall_s'] / 60:.1f} min"
           + (f"; CPU steal {100 * info['steal_share']:.1f} %" if "steal_share" in info else "")
           + f"; host {info.get('cpu_model', UNRECORDED_HOST)}.", "",
           "| comparison | JAX img/s | PyTorch img/s | ratio (median of pairs) | 95 % CI | "
           "pairs at target | target | order effect JAX / PyTorch |",
           "|---|---|---|---|---|---|---|---|"]
  for name, r in res["comparisons"].items():
    target = (f">= {r['target']:g} ({r['verdict']})" if "target" in r else "")
    share = f"{100 * r['pairs_at_target']:.0f} %" if "target" in r else ""
    order = r.get("order_effect", {})
    order = (f"{order['jax']:.2f} / {order['torch']:.2f}" if order else "")
    lines.append(f"| {name} | {r['jax_img_s']:.1f} | {r['torch_img_s']:.1f} | "
                 f"{r['ratio']:.2f} | [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {share} | "
                 f"{target} | {order} |")
  lines += ["", "Order effect: a framework's median call time right after the other "
            "framework's call over its median right after its own (1.00: the other's "
            "leftover threads cost it nothing)."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pairs", type=int, default=24, help="pairs per comparison (24)")
  parser.add_argument("--blocks", type=int, default=6,
                      help="blocks the pairs are spread over, comparisons in turn (6)")
  parser.add_argument("--only", nargs="+", choices=tuple(COMPARISONS), default=None,
                      help="comparisons to run (default all)")
  parser.add_argument("--quick", action="store_true", help="tiny sizes (figures meaningless)")
  parser.add_argument("--gap-s", type=float, default=None,
                      help="idle seconds before each timed call (default 0.25, 0 with --quick)")
  parser.add_argument("--pool", nargs="+", metavar="RUN.json", default=None,
                      help="pool saved runs instead of measuring (default --out: "
                           "experiments/results/paired_ratio)")
  parser.add_argument("--out", default=None,
                      help="output path without extension (default "
                           "experiments/results/paired_ratio_run; with --pool "
                           "experiments/results/paired_ratio)")
  parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return worker(args.worker, args.quick)
  from structvpr_jax import files
  if args.pool:
    runs = []
    for path in args.pool:
      try:
        with open(path) as f:
          res = json.load(f)
        res["comparisons"], res["info"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"paired_ratio --pool: {path} is not a saved paired_ratio run ({e})")
      runs.append(res)
    try:
      res = pool(runs)
    except ValueError as e:
      raise SystemExit(str(e))
    out = args.out or os.path.join(REPO, "experiments", "results", "paired_ratio")
    text = pool_markdown(res, "python experiments/performance/paired_ratio.py --pool " + " ".join(
        os.path.relpath(p, REPO) if os.path.isabs(p) else p for p in args.pool))
    files.write_json(out + ".json", res)
    files.write_text(out + ".md", text)
    print(text)
    return 0
  if args.pairs < 2:
    parser.error("--pairs must be at least 2")
  if args.blocks < 1:
    parser.error("--blocks must be at least 1")
  import importlib.util
  if importlib.util.find_spec("torch") is None:
    raise SystemExit("paired_ratio: needs PyTorch (pip install -e '.[bench]')")
  names = args.only or list(COMPARISONS)
  gap_s = (0.0 if args.quick else 0.25) if args.gap_s is None else args.gap_s
  if gap_s < 0:
    parser.error("--gap-s must be >= 0")
  res = run(names, args.pairs, args.quick, gap_s, args.blocks)
  command = "python experiments/performance/paired_ratio.py" + (
      f" --pairs {args.pairs}" if args.pairs != 24 else "") + (
      f" --blocks {args.blocks}" if args.blocks != 6 else "") + (
      f" --gap-s {args.gap_s:g}" if args.gap_s is not None else "") + (
      " --only " + " ".join(args.only) if args.only else "") + (" --quick" if args.quick else "")
  text = markdown(res, command)
  out = args.out or os.path.join(REPO, "experiments", "results", "paired_ratio_run")
  files.write_json(out + ".json", res)
  files.write_text(out + ".md", text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
