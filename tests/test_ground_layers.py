"""The package's modules import one way: each only from its own layer or
those below it, lazy (function-level) imports included.

1. ground: codebooks, impl selection, validation, formats, search tables,
   rounding noise, jnp twins of the kernel helpers, the algorithm table;
2. ``triton_kernels/``: ``@triton.jit`` kernels and their launchers;
3. functional ops: quantize/dequantize, matmul, bitsandbytes format, the
   8-bit optimizer step;
4. front-ends: ``optax_transforms/`` (and ``nn/``), ``checkpoints``, the
   package root.

Run ``python -m pytest tests/test_ground_layers.py -q`` to check it; the
failure message lists each import that goes up.
"""

import ast
import pathlib

import jlowbit

PACKAGE = pathlib.Path(jlowbit.__file__).parent

GROUND = {"_impl", "_validation", "_formats", "codebooks", "_search", "_noise",
          "_layout", "_sharding", "_tiling",
          "_twins", "algorithms"}
OPS = {"blockwise8", "quant4", "matmul4", "bnb_format", "update8"}
FRONT_ENDS = {"optax_transforms", "nn", "models", "checkpoints", "__init__"}


def layer(module: str) -> int:
  """The layer of ``jlowbit.<module>`` (a dotted path below the package)."""
  top = module.split(".")[0]
  if top in GROUND:
    return 1
  if top == "triton_kernels":
    return 2
  if top in OPS:
    return 3
  if top in FRONT_ENDS:
    return 4
  raise AssertionError(f"jlowbit.{module} belongs to no layer: add it to "
                       "tests/test_ground_layers.py")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE).with_suffix("").parts
  return ".".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
  """Every ``jlowbit.*`` module ``path`` imports, at any nesting level."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      assert not node.level, f"{path}: use absolute imports"
      if node.module == "jlowbit":
        names = [f"jlowbit.{alias.name}" for alias in node.names]
      else:
        names = [node.module]
    else:
      continue
    found.update(name[len("jlowbit."):] for name in names
                 if name.startswith("jlowbit."))
  return found


def test_every_module_has_a_layer():
  for path in PACKAGE.rglob("*.py"):
    layer(_module_name(path))


def test_no_module_imports_from_a_layer_above_it():
  upward = []
  for path in sorted(PACKAGE.rglob("*.py")):
    name = _module_name(path)
    for imported in sorted(_imports(path)):
      if layer(imported) > layer(name):
        upward.append(f"jlowbit.{name} (layer {layer(name)}) imports "
                      f"jlowbit.{imported} (layer {layer(imported)})")
  assert not upward, "\n".join(upward)


def test_the_checker_sees_lazy_imports(tmp_path):
  source = tmp_path / "probe.py"
  source.write_text("def f():\n  from jlowbit.optax_transforms import state\n"
                    "  import jlowbit.update8\n")
  assert _imports(source) == {"optax_transforms", "update8"}
