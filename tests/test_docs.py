"""README.md, docs/ and experiments/README.md: short README, links and paths
that resolve, the install and test commands CI runs, no tracker numbers."""

import glob
import os
import re
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
DOCS = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
EXPERIMENTS_README = os.path.join(REPO, "experiments", "README.md")
USER_DOCS = [README, *DOCS, EXPERIMENTS_README]
README_MAX_LINES = 300


def read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def rel(path):
  return os.path.relpath(path, REPO)


def slug(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation (but - and _)
  dropped, spaces to hyphens."""
  text = re.sub(r"`|\*\*|\[|\]\([^)]*\)", "", heading.strip()).lower()
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set:
  """The anchors of a markdown file's headings (outside fenced code), with
  GitHub's -1, -2 suffixes for repeats."""
  seen, out, fenced = {}, set(), False
  for line in text.splitlines():
    if line.startswith("```"):
      fenced = not fenced
      continue
    m = re.match(r"(#{1,6}) (.*)", line)
    if m and not fenced:
      base = slug(m.group(2))
      n = seen.get(base, 0)
      seen[base] = n + 1
      out.add(base if n == 0 else f"{base}-{n}")
  return out


def links(text: str):
  """Targets of the inline links [text](target) outside fenced code."""
  fenced, out = False, []
  for line in text.splitlines():
    if line.startswith("```"):
      fenced = not fenced
    elif not fenced:
      out += re.findall(r"\]\(([^)\s]+)\)", line)
  return out


def test_readme_is_short():
  n = len(read(README).splitlines())
  assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES})"


def test_readme_table_of_contents_covers_a_newcomers_questions():
  text = read(README)
  toc = [t[1:] for t in links(text.split("\n## ")[0]) if t.startswith("#")]
  for section in ("what-it-is", "set-up", "what-the-default-run-does", "reproducibility",
                  "configs", "results", "using-your-own-data", "pitts30k--msls--tokyo-247",
                  "gpus-tpus-and-pods", "layout", "citation"):
    assert section in toc, section
  assert set(toc) <= anchors(text)


@pytest.mark.parametrize("path", USER_DOCS, ids=rel)
def test_links_resolve(path):
  text = read(path)
  for target in links(text):
    if re.match(r"[a-z]+://|mailto:", target):
      continue
    file, _, anchor = target.partition("#")
    dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
    assert os.path.exists(dest), f"{rel(path)}: link to {target}: no {rel(dest)}"
    if anchor and dest.endswith(".md"):
      assert anchor in anchors(read(dest)), f"{rel(path)}: link to {target}: no such heading"


@pytest.mark.parametrize("path", USER_DOCS, ids=rel)
def test_named_repository_files_exist(path):
  """Every result file, experiment script, module or config named in the text
  exists, except paths given as `git show <commit>:<path>` (removed files,
  quoted from history)."""
  text = read(path)
  pattern = (r"(?<![\w:/.-])((?:experiments|structvpr_jax|configs|docs|tests)/"
             r"[\w./-]*\w\.(?:md|json|txt|py|sh|cc|png))")
  missing = []
  for m in re.finditer(pattern, text):
    name = m.group(1)
    if not os.path.exists(os.path.join(REPO, name)):
      missing.append(name)
  assert not missing, f"{rel(path)} names files that do not exist: {sorted(set(missing))}"


def test_experiments_readme_names_existing_results():
  text = read(EXPERIMENTS_README)
  named = re.findall(r"`(results/[\w.-]+\.(?:md|json|txt))`", text)
  assert len(named) > 10
  for name in named:
    # a result an experiment writes but that is not committed yet says so
    line = next(l for l in text.splitlines() if f"`{name}`" in l)
    assert os.path.exists(os.path.join(REPO, "experiments", name)) or (
        "none committed yet" in line), name


def git(*args):
  return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True)


@pytest.mark.parametrize("path", USER_DOCS, ids=rel)
def test_removed_results_are_quoted_from_a_commit_that_has_them(path):
  """`git show <commit>:<path>` pointers name a file that commit has (checked
  where the commit is in this clone's history)."""
  for commit, name in set(re.findall(r"git show ([0-9a-f]{7,40}):([\w./-]+\w)", read(path))):
    if shutil.which("git") is None or git("rev-parse", "--verify", "-q",
                                          f"{commit}^{{commit}}").returncode != 0:
      pytest.skip(f"commit {commit} not in this clone")
    assert git("cat-file", "-e", f"{commit}:{name}").returncode == 0, (
        f"{rel(path)}: {commit} has no {name}")


@pytest.mark.parametrize("path", USER_DOCS, ids=rel)
def test_no_tracker_numbers_in_user_facing_text(path):
  found = re.findall(r"\bissues?\s+#?\d+|(?<![\w&])#\d+\b", read(path), flags=re.IGNORECASE)
  assert not found, f"{rel(path)}: {found}"


def test_readme_install_and_test_commands_are_the_ones_ci_runs():
  text = read(README)
  assert "pip install -e . && python -m structvpr_jax.main --config=configs/distill.py" in text
  assert 'pip install -e ".[test]" && python -m pytest -q -n 2' in text
  # CI may call them through its own environment's pip and python
  ci = read(os.path.join(REPO, ".ci", "run"))
  assert re.search(r'pip["\']?\s+install -e "\.\[test\]"', ci), "CI installs otherwise"
  assert re.search(r"-m pytest -q -n 2\b", ci), "CI tests otherwise"


def test_experiments_readme_lists_every_script():
  text = read(EXPERIMENTS_README)
  scripts = [p for ext in ("py", "sh") for p in
             glob.glob(os.path.join(REPO, "experiments", "**", f"*.{ext}"), recursive=True)]
  assert len(scripts) > 10
  for script in scripts:
    name = os.path.relpath(script, os.path.join(REPO, "experiments"))
    assert f"`{os.path.basename(name)}`" in text, name
    assert f"experiments/{name}" in text, f"no command for experiments/{name}"


def test_each_experiment_keeps_one_result_pair():
  """experiments/results/ holds the current result of each experiment, not
  every run: no leftover run or pool files of the paired measurement."""
  names = os.listdir(os.path.join(REPO, "experiments", "results"))
  assert not [n for n in names if re.match(r"paired_ratio_.*\.(md|json)$", n)]
  assert {"paired_ratio.md", "paired_ratio.json", "profile_step.md",
          "profile_step.json"} <= set(names)
