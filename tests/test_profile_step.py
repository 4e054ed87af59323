"""experiments/performance/profile_step.py: joining a profile with the compiled module's text."""

import gzip
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments", "performance"))

import profile_step  # noqa: E402

MODULE = """
HloModule jit_per_shard
  %fusion.1 = f32[12,56,56,144]{3,2,1,0} fusion(%p0), kind=kLoop, calls=%c1, metadata={op_name="jit(per_shard)/transpose(jvp(Branch))/Branch.local_features/encoder/block2/depthwise/add" stack_frame_id=3}
  ROOT %dot.7 = f32[16,96]{1,0} dot(%a, %b), lhs_contracting_dims={0}, metadata={op_name="jit(per_shard)/jvp(Branch)/Branch.local_features/encoder/block1/expand/dot_general"}
  %copy.2 = f32[4]{0} copy(%c)
"""


def test_op_metadata_reads_names_shapes_and_jax_ops():
  meta = profile_step.op_metadata(MODULE)
  assert set(meta) == {"fusion.1", "dot.7"}            # copy.2 has no op_name
  assert meta["fusion.1"][0] == "f32[12,56,56,144]{3,2,1,0}"
  assert meta["dot.7"][1].endswith("block1/expand/dot_general")


def test_classify_pass_and_layer():
  meta = profile_step.op_metadata(MODULE)
  assert profile_step.classify(meta["fusion.1"][1]) == ("bwd", "depthwise")
  assert profile_step.classify(meta["dot.7"][1]) == ("fwd", "expand")
  assert profile_step.classify("jit(f)/jvp(Branch)/netvlad/reduce_sum") == ("fwd", "netvlad")
  assert profile_step.classify("jit(f)/adam/mul") == ("fwd", "other")
  # The fused blocks' VJP runs the layers under named scopes, inside jax.vjp.
  fused = "jit(per_shard)/{}Branch.local_features/encoder/block1/jvp({})/dot_general"
  assert profile_step.classify(fused.format("", "expand")) == ("fwd", "expand")
  assert profile_step.classify(fused.format("transpose(jvp(Branch))/", "project")) == (
      "bwd", "project")
  assert profile_step.classify("jit(f)/encoder/block3/expanded/mul") == ("fwd", "other")
  assert profile_step.classify(fused.format("transpose(jvp(Branch))/", "expand_depthwise")) == (
      "bwd", "expand+depthwise")


def test_trace_events_reads_complete_events_of_known_ops(tmp_path):
  trace = {"traceEvents": [
      {"ph": "X", "name": "fusion.1", "pid": 1, "tid": 7, "ts": 10, "dur": 1500},
      {"ph": "X", "name": "fusion.1", "pid": 1, "tid": 8, "ts": 20, "dur": 500},
      {"ph": "X", "name": "dot.7", "pid": 1, "tid": 7, "ts": 2000, "dur": 250},
      {"ph": "B", "name": "dot.7"},
      {"ph": "X", "name": "ThunkExecutor::Execute", "pid": 1, "tid": 7, "ts": 0, "dur": 9999}]}
  os.makedirs(tmp_path / "plugins" / "profile" / "run")
  with gzip.open(tmp_path / "plugins" / "profile" / "run" / "vm.perfetto_trace.json.gz", "wt") as f:
    json.dump(trace, f)
  got = profile_step.trace_events(str(tmp_path), {"fusion.1": 0, "dot.7": 0})
  assert got == [("fusion.1", (1, 7), 10, 1510), ("fusion.1", (1, 8), 20, 520),
                 ("dot.7", (1, 7), 2000, 2250)]


def test_attribute_concurrent_hand_cases():
  # A alone 0-5, A and B at once 5-10 (halves), B alone 10-15; gap 15-20;
  # on a third thread a loop W 20-30 with a body op C 22-26 inside it.
  events = [("A", 1, 0, 10), ("B", 2, 5, 15), ("W", 3, 20, 30), ("C", 3, 22, 26)]
  charged, busy = profile_step.attribute_concurrent(events)
  assert charged == {"A": 7.5, "B": 7.5, "W": 6.0, "C": 4.0}
  assert busy == 25.0
  # The same operation name on two threads at once is charged both halves.
  charged, busy = profile_step.attribute_concurrent([("D", 1, 0, 4), ("D", 2, 0, 4), ("E", 1, 4, 4)])
  assert charged == {"D": 4.0} and busy == 4.0


def _attribute_by_sampling(events, horizon):
  """Reference: every unit instant t + 0.5 charged 1/k to the innermost open
  event of each of the k threads with one open (latest start, then
  earliest end, as nesting implies)."""
  import collections
  charged, busy = collections.Counter(), 0
  for t in range(horizon):
    mid = t + 0.5
    per_thread = {}
    for i, (name, thread, start, end) in enumerate(events):
      if start <= mid < end:
        best = per_thread.get(thread)
        if best is None or (start, -end) > (events[best][2], -events[best][3]):
          per_thread[thread] = i
    for i in per_thread.values():
      charged[events[i][0]] += 1.0 / len(per_thread)
    busy += bool(per_thread)
  return charged, busy


def test_attribute_concurrent_matches_sampling_reference():
  import numpy as np
  rng = np.random.default_rng(0)
  for trial in range(20):
    events = []
    for thread in range(int(rng.integers(1, 4))):
      t = int(rng.integers(0, 5))
      for _ in range(int(rng.integers(1, 6))):
        start = t + int(rng.integers(0, 4))
        end = start + int(rng.integers(1, 12))
        events.append((f"op{rng.integers(0, 4)}", thread, start, end))
        if rng.random() < 0.3 and end - start >= 3:      # a nested body operation
          inner = start + int(rng.integers(1, end - start - 1))
          events.append((f"op{rng.integers(0, 4)}", thread, inner,
                         inner + int(rng.integers(1, end - inner))))
        t = end
    horizon = max(e[3] for e in events)
    charged, busy = profile_step.attribute_concurrent(events)
    want, want_busy = _attribute_by_sampling(events, horizon)
    assert busy == want_busy, trial
    assert set(charged) == {k for k, v in want.items() if v}, trial
    for name, v in want.items():
      assert abs(charged[name] - v) < 1e-9, (trial, name)
    assert abs(sum(charged.values()) - busy) < 1e-9
