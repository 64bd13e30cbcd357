"""The library installs and imports without the benchmark application's tools (MLflow, DVC, Prefect)."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APPLICATION_TOOLS = ("mlflow", "dvc", "prefect", "fastapi")
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
    assert {r.split("=")[0] for r in project["optional-dependencies"]["benchmark"]} == set(APPLICATION_TOOLS)
    assert "'.[benchmark,dev]'" in (ROOT / "Makefile").read_text()
