"""The package's import graph: no cycle among rma_jax modules, no function-local import of an
rma_jax module (unless on the allow-list of ones that must keep TensorFlow lazy), and the
model, ops, losses, metrics, steps, evaluation and the benchmark import without TensorFlow."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "rma_jax")

# Function-local imports of rma_jax modules that keep TensorFlow out of an import: (module,
# imported module) pairs, each with its reason. None today: TensorFlow and TFDS are imported
# lazily where they are used (TFDS in rma_jax.data.tfds_source), which are imports of other
# packages.
ALLOWED_LOCAL: dict[tuple[str, str], str] = {
    ("rma_jax", "rma_jax.trained"): "rma_jax.load_run without importing the models and Orbax "
                                    "with every submodule",
}

# Importing these must not import TensorFlow (or TFDS).
TF_FREE = ("rma_jax.models", "rma_jax.kernels", "rma_jax.build", "rma_jax.ops",
           "rma_jax.losses", "rma_jax.metrics",
           "rma_jax.regions", "rma_jax.steps", "rma_jax.optimizer", "rma_jax.views",
           "rma_jax.evaluate", "rma_jax.train", "rma_jax.run", "rma_jax.predict",
           "rma_jax.trained", "rma_jax.export", "benchmarks.export_latency",
           "rma_jax.data", "rma_jax.metric_writer", "rma_jax.paths", "rma_jax.main",
           "rma_jax.experiments.runner", "benchmarks.bench", "benchmarks.timing",
           "benchmarks.bench_torch", "benchmarks.bench_records")


def _modules() -> dict[str, str]:
  """Module name -> file, for every .py file of the package."""
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        out[".".join(parts)] = path
  return out


def _imports(path: str, module: str, modules: dict[str, str]
             ) -> list[tuple[str, bool, int]]:
  """(imported rma_jax module, whether the import is inside a function, line) of a file."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  found = []

  def visit(node: ast.AST, in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
      local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                ast.Lambda))
      if isinstance(child, ast.Import):
        names = [a.name for a in child.names]
      elif isinstance(child, ast.ImportFrom):
        if child.level:  # relative: from the package (and up)
          base = package.split(".")[:len(package.split(".")) - child.level + 1]
          base = ".".join(base + ([child.module] if child.module else []))
        else:
          base = child.module or ""
        # `from a import b` imports the module a.b when there is one, else a itself.
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in child.names]
      else:
        visit(child, local)
        continue
      for name in names:
        if name == "rma_jax" or name.startswith("rma_jax."):
          while name not in modules:  # `import rma_jax.data.voc` without that file
            name = name.rpartition(".")[0]
          found.append((name, in_function, child.lineno))
  visit(tree, False)
  return found


def _graph():
  modules = _modules()
  edges, local = {}, []
  for module, path in modules.items():
    edges[module] = set()
    for target, in_function, line in _imports(path, module, modules):
      if target != module:
        edges[module].add(target)
      if in_function:
        local.append((module, target, line))
  return edges, local


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """One import cycle (a list of modules, the first repeated at the end), or None."""
  state: dict[str, int] = {}  # 1 on the current path, 2 done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(edges):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_graph_walk_sees_imports_and_cycles():
  # The checks below are only as good as the walk: it must find real edges and cycles.
  edges, _ = _graph()
  assert {"rma_jax.steps", "rma_jax.init", "rma_jax.data"} <= edges["rma_jax.train"]
  assert "rma_jax.data.classes" in edges["rma_jax.data.voc"]  # `from rma_jax.data import ...`
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
  edges, _ = _graph()
  assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_function_local_imports_of_rma_jax_only_where_tensorflow_must_stay_lazy():
  _, local = _graph()
  unexpected = [f"{module}:{line} imports {target}" for module, target, line in local
                if (module, target) not in ALLOWED_LOCAL]
  assert not unexpected, unexpected


def test_model_ops_losses_metrics_steps_evaluation_and_benchmark_import_without_tensorflow():
  code = ("import sys\n" + "".join(f"import {m}\n" for m in TF_FREE) +
          "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules))")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def _reachable(edges: dict[str, set[str]], start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    node = todo.pop()
    for nxt in edges.get(node, ()):
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def test_the_model_steps_and_loop_name_no_platform_kernel():
  """The models, the jitted steps and the training loop are plain: they import nothing of
  ``rma_jax.kernels`` (directly or through another module of theirs) and name neither the
  kernels' evaluation forms nor their variable collection; the kernels reach a model only as
  building blocks ``rma_jax.build`` hands in, and evaluation prepares the forms."""
  edges, _ = _graph()
  plain = [m for m in edges if m == "rma_jax.models" or m.startswith("rma_jax.models.")]
  for module in plain + ["rma_jax.steps"]:
    kernel_imports = [m for m in _reachable(edges, module) | edges[module]
                      if m.startswith("rma_jax.kernels")]
    assert not kernel_imports, (module, kernel_imports)
  assert not [m for m in edges["rma_jax.train"] if m.startswith("rma_jax.kernels")]
  assert "rma_jax.kernels" in edges["rma_jax.build"] and "rma_jax.kernels" in edges[
      "rma_jax.evaluate"]
  modules = _modules()
  for module in plain + ["rma_jax.steps", "rma_jax.train"]:
    text = open(modules[module], encoding="utf-8").read()
    for word in ("winograd", "im2col", "cpu_forms", "prepare_fn", "default_backend",
                 "INFERENCE_COLLECTION", "kernel_t"):
      assert word not in text, (module, word)
