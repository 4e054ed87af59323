"""experiments/profile_step.py: joining a profile with the compiled module's text."""

import gzip
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

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


def test_trace_durations_sums_complete_events_of_known_ops(tmp_path):
  trace = {"traceEvents": [
      {"ph": "X", "name": "fusion.1", "dur": 1500}, {"ph": "X", "name": "fusion.1", "dur": 500},
      {"ph": "X", "name": "dot.7", "dur": 250}, {"ph": "B", "name": "dot.7"},
      {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9999}]}
  os.makedirs(tmp_path / "plugins" / "profile" / "run")
  with gzip.open(tmp_path / "plugins" / "profile" / "run" / "vm.perfetto_trace.json.gz", "wt") as f:
    json.dump(trace, f)
  got = profile_step.trace_durations(str(tmp_path), {"fusion.1": 0, "dot.7": 0})
  assert got == {"fusion.1": 2000, "dot.7": 250}
