"""Examples in the README and in docstrings run as written."""

from __future__ import annotations

import doctest
import importlib
import os
import re
from pathlib import Path

import pytest
import tomllib
from conftest import REPO

MODULES = ["edge_runtime", "edge_runtime.preprocess", "edge_runtime.sync"]


@pytest.mark.parametrize("name", MODULES)
def test_module_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_readme_python_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        test = doctest.DocTestParser().get_doctest(block, {}, "README", "README.md", 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        runner.run(test)
        assert runner.failures == 0 and runner.tries > 0


def test_config_docstring_and_example_config_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_runtime.config as config_module
    from edge_runtime.config import Config, parse_config

    doc = config_module.__doc__ or ""
    example = doc.split("Example ``edgert.toml``::", 1)[1]
    toml_text = "\n".join(line[4:] for line in example.splitlines())
    cfg = parse_config(tomllib.loads(toml_text), REPO)
    assert cfg.model.bundle == REPO / "models/demo/shapes"
    assert cfg.model.bundle.is_dir()
    assert Path(cfg.source.uri).is_file()
    # The shipped service example is valid apart from the keys it names on a device.
    data = tomllib.loads((REPO / "systemd" / "edgert.toml.example").read_text())
    data["trust"]["keys"] = []
    data["trust"]["require_signature"] = False
    assert isinstance(Config.model_validate(data), Config)
    assert os.path.isabs(data["model"]["bundle"])
