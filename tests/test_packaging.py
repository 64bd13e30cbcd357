"""The library installs and imports without the benchmark application's tools (MLflow, DVC, Prefect)."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APPLICATION_TOOLS = ("mlflow", "dvc", "prefect", "fastapi", "ray")
# Packages of the benchmark extra that only the tools use (the basic-auth tracking server's CSRF forms, Prefect's
# Ray task runner).
APPLICATION_SUPPORT = ("Flask-WTF", "prefect-ray")
PACKAGE = ROOT / "moeclip"
APPLICATION = "moeclip.bench"
# Every module of the package outside the application: the library.
LIBRARY = tuple(sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py") if APPLICATION.replace(".", "/") not in path.relative_to(ROOT).as_posix()))

# Run in a fresh interpreter where importing any of the tools fails, as on a machine without them.
PROBE = f"""
import importlib, sys
BLOCKED = {APPLICATION_TOOLS!r}

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
        return None

sys.meta_path.insert(0, Absent())
for module in {LIBRARY!r}:
    importlib.import_module(module)
loaded = sorted(m for m in sys.modules if m.startswith({APPLICATION!r}))
assert not loaded, f"the library imported the application: {{loaded}}"
try:
    importlib.import_module({APPLICATION!r} + ".tracking")
except Exception as error:
    print(type(error).__name__, error)
"""


def test_the_library_imports_without_mlflow_dvc_and_prefect_and_none_of_the_application():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # The application names what is missing and how to get it, in one line.
    assert done.stdout.strip().startswith("MoeclipError logging to MLflow needs the benchmark extra: "
                                          "pip install 'moeclip[benchmark]'")


def test_the_tools_are_an_extra_and_make_installs_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {requirement.split("=")[0].split(">")[0] for requirement in project["dependencies"]}
    assert not names & set(APPLICATION_TOOLS)
    assert {r.split("=")[0] for r in project["optional-dependencies"]["benchmark"]} == {*APPLICATION_TOOLS,
                                                                                      *APPLICATION_SUPPORT}
    assert "'.[benchmark,export,dev]'" in (ROOT / "Makefile").read_text()


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The moeclip modules a file imports (at its top level only, or anywhere), under `if TYPE_CHECKING:` excluded."""
    import ast

    tree = ast.parse(path.read_text())
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from package import module` imports the module
                found.add(f"{base}.{alias.name}" if (ROOT / f"{base}.{alias.name}".replace(".", "/")).exists()
                          or (ROOT / (f"{base}.{alias.name}".replace(".", "/") + ".py")).exists() else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name == "moeclip" or name.startswith("moeclip.")}


def _modules() -> dict[str, Path]:
    return {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
            for path in PACKAGE.rglob("*.py")}


def test_the_packages_imports_have_no_cycle():
    """Module-level imports, drawn from the source: a cycle would make import order matter."""
    from graphlib import TopologicalSorter

    graph = {name: _imports(path, top_level_only=True) for name, path in _modules().items()}
    TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_no_library_module_imports_the_application_even_lazily():
    offenders = {name: sorted(imported) for name, path in _modules().items() if not name.startswith(APPLICATION)
                 for imported in [{i for i in _imports(path, top_level_only=False) if i.startswith(APPLICATION)}]
                 if imported}
    assert offenders == {}


def _folder(module: str) -> str:
    """The part of the library a module belongs to: a first-level sub-package of moeclip (`moeclip.methods`,
    MoECLIP's own package included), or the module itself where it lies at moeclip's root."""
    parts = module.split(".")
    return ".".join(parts[:2]) if (ROOT / "moeclip" / parts[1]).is_dir() or len(parts) > 2 else module


def folder_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Library folders and the folders their modules import, lazy imports included (TYPE_CHECKING excluded)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        if name == "moeclip" or name.startswith(APPLICATION):
            continue
        imported = {_folder(i) for i in _imports(path, top_level_only=False) if i != "moeclip"}
        graph.setdefault(_folder(name), set()).update(imported - {_folder(name)})
    return graph


def test_the_librarys_folders_import_each_other_without_a_cycle():
    """A folder-level cycle (MoECLIP's old moeclip/model/ importing methods/base.py while methods/registry.py
    imported moeclip/model/) means neither part can be read, tested or moved without the other."""
    from graphlib import CycleError, TopologicalSorter

    try:
        TopologicalSorter(folder_graph(_modules())).prepare()
    except CycleError as cycle:
        raise AssertionError(f"folders import each other in a cycle: {' -> '.join(cycle.args[1])}") from None

