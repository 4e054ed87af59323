"""The package's layout holds: imports run one way, no cycles, one file writer.

Layers, bottom to top (docs/design.md, "Layout"): pure numerics -> models/ ->
data/ -> libraries -> stages/ -> pipeline -> main. A module may import its own
layer or lower ones; stages never import each other; package imports inside
functions are not allowed (a stage would hide a cycle that way).
"""

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "structvpr_jax")

PURE = {"slme", "losses", "partition", "retrieval", "mining", "parallel", "whitening", "stats",
        "hugepages", "xla_flags", "files", "events", "augment", "early_stopping", "rerank"}
LIBRARIES = {"checkpoint", "config_lib", "workdir", "train_lib", "evaluation", "report",
             "localize", "weights"}


def layer(module: str) -> int:
  """0 pure, 1 models, 2 data, 3 libraries, 4 stages, 5 pipeline, 6 main."""
  parts = module.split(".")[1:]
  head = parts[0] if parts else ""
  if head in PURE:
    return 0
  if head == "models":
    return 1
  if head == "data":
    return 2
  if head in LIBRARIES:
    return 3
  if head == "stages":
    return 4
  if head == "pipeline":
    return 5
  if head == "main":
    return 6
  if head in ("", "__init__"):
    return -1
  raise AssertionError(f"module {module} has no layer: add it to tests/test_architecture.py")


def modules():
  out = {}
  for root, _, names in os.walk(PKG):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
        rel = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
        out[rel] = path
  return out


def package_imports(path: str, module: str):
  """[(imported structvpr_jax module, lineno, at top level?)]."""
  tree = ast.parse(open(path).read())
  top = set(id(n) for n in tree.body)
  # `if __name__ == "__main__":` blocks at top level count as top level.
  for n in tree.body:
    if isinstance(n, ast.If):
      top.update(id(m) for m in ast.walk(n))
  found = []
  all_modules = modules()
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      assert not node.level, f"{path}:{node.lineno}: use absolute imports"
      base = node.module
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in all_modules else base
               for a in node.names]
    for name in names:
      if name.startswith("structvpr_jax"):
        found.append((name, node.lineno, id(node) in top))
  return found


def test_every_module_has_a_layer():
  for m in modules():
    layer(m)


def test_imports_run_one_way_and_stages_stay_apart():
  bad = []
  for m, path in modules().items():
    for target, line, _ in package_imports(path, m):
      if target == "structvpr_jax":
        continue
      if layer(target) > layer(m) and layer(m) >= 0:
        bad.append(f"{m}:{line} imports {target} (layer {layer(target)} > {layer(m)})")
      if (m.startswith("structvpr_jax.stages.") and target.startswith("structvpr_jax.stages.")
          and target != m):
        bad.append(f"{m}:{line} imports another stage {target}")
  assert not bad, "\n".join(bad)


def test_no_package_imports_inside_functions():
  bad = [f"{m}:{line} imports {t} inside a function"
         for m, path in modules().items()
         for t, line, at_top in package_imports(path, m) if not at_top]
  assert not bad, "\n".join(bad)


def test_no_import_cycles():
  graph = {m: {t for t, _, _ in package_imports(p, m) if t in modules() and t != m}
           for m, p in modules().items()}
  state = {}

  def visit(m, stack):
    state[m] = 1
    for t in graph[m]:
      if state.get(t) == 1:
        raise AssertionError("import cycle: " + " -> ".join(stack + [m, t]))
      if t not in state:
        visit(t, stack + [m])
    state[m] = 2

  for m in graph:
    if m not in state:
      visit(m, [])


def test_only_files_renames_into_place():
  writers = [m for m, p in modules().items() if "os.replace(" in open(p).read()]
  assert writers == ["structvpr_jax.files"], writers


@pytest.mark.parametrize("name", ["def build_model(", "def model_input(",
                                  "def abstract_variables(", "class TrainState("])
def test_one_definition(name):
  where = [m for m, p in modules().items() if name in open(p).read()]
  assert len(where) == 1, (name, where)


def test_no_citation_of_a_file_outside_the_repo():
  cites = [m for m, p in modules().items() if "DESIGN.md" in open(p).read()]
  assert not cites, cites
