"""The `>>>` examples in the library's docstrings run and print what they say (doctest).

Examples that need a trained model or data files are written as plain code blocks, without `>>>`, each
naming the test that runs the same steps; this test fails if a `>>>` example appears in any other module.
"""

import doctest
import importlib
import pathlib

import pytest

LIBRARY = pathlib.Path(__file__).resolve().parents[1] / "keras_ddpm"
MODULES_WITH_EXAMPLES = ["keras_ddpm.config", "keras_ddpm.data.pipeline", "keras_ddpm.layers",
                         "keras_ddpm.metrics.swd", "keras_ddpm.model", "keras_ddpm.schedule"]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_module_with_examples_is_run():
    with_examples = sorted(module_name(path) for path in LIBRARY.rglob("*.py") if ">>>" in path.read_text())
    assert with_examples == sorted(MODULES_WITH_EXAMPLES)


# keras_ddpm.model's example trains and samples (two traces, ~30 s): the full run.
@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.slow) if name == "keras_ddpm.model" else name
             for name in MODULES_WITH_EXAMPLES]
)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(module):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0, f"{name}: no example found"
    assert results.failed == 0, f"{name}: {results.failed} of {results.attempted} example lines failed (see above)"
