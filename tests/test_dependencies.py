"""setup.cfg declares exactly the third-party packages that the code imports.

A module that the code imports but setup.cfg does not declare passes on a machine that happens to have it and
fails on a fresh one; a declared package that nothing imports costs every user a download.
"""

import ast
import configparser
import importlib.metadata
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCE_FILES = [*REPO.glob("*.py"), *REPO.glob("keras_ddpm/**/*.py"), *REPO.glob("bench/*.py"),
                *REPO.glob("tests/*.py")]

# Declared for what they provide besides importable modules.
NOT_IMPORTED_ON_PURPOSE = {
    "tensorboard": "the `tensorboard` command that shows a run's tensorboard/ logs (TensorFlow no longer installs it)",
    "pytest-xdist": "the pytest plugin behind --numprocesses in setup.cfg's addopts (loaded by entry point)",
}


def normalise(distribution: str) -> str:
    """PEP 503 name: case and runs of '-', '_', '.' do not matter."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def declared_distributions() -> set[str]:
    """install_requires and every extra of setup.cfg, as normalised names without version specifiers."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    lines = setup["options"]["install_requires"].splitlines()
    for extra in setup["options.extras_require"].values():
        lines += extra.splitlines()
    return {normalise(re.match(r"[A-Za-z0-9._-]+", line.strip()).group()) for line in lines if line.strip()}


def local_modules() -> set[str]:
    """Names that resolve inside the repository: the package, the scripts, bench/common, test modules."""
    return {"keras_ddpm"} | {path.stem for path in SOURCE_FILES}


def imported_top_level_modules() -> dict[str, str]:
    """Third-party top-level module -> one file that imports it (absolute imports anywhere in a file)."""
    modules = {}
    for path in SOURCE_FILES:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local_modules():
                    modules.setdefault(top, str(path.relative_to(REPO)))
    return modules


def distributions_of(module: str) -> set[str]:
    """The installed distributions that provide `module` (empty when none is installed)."""
    return {normalise(name) for name in importlib.metadata.packages_distributions().get(module, [])}


def test_every_imported_module_is_declared():
    declared = declared_distributions()
    undeclared = {
        module: where for module, where in imported_top_level_modules().items()
        if not distributions_of(module) & declared
    }
    assert not undeclared, (
        f"imported but not declared in setup.cfg (module: a file importing it): {undeclared}. "
        "Add the package to install_requires, or to the `dev` extra if only tests and benchmarks use it."
    )


def test_every_declared_package_is_imported():
    provided = set().union(*(distributions_of(module) for module in imported_top_level_modules()))
    unused = declared_distributions() - provided - set(NOT_IMPORTED_ON_PURPOSE)
    assert not unused, f"declared in setup.cfg but imported nowhere: {sorted(unused)}"


def test_the_scan_sees_the_imports_it_must_see():
    # Guards the two tests above against passing because the scan found nothing.
    modules = imported_top_level_modules()
    assert {"tensorflow", "keras", "numpy", "pytest"} <= set(modules)
    assert not {"keras_ddpm", "os", "train"} & set(modules)
