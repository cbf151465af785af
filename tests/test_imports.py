"""The dependency rule (:mod:`tests.import_rules`), tested on small synthetic
packages to show that each kind of wrong edge is reported, then on the real
tree. Each finding reads ``FILE:LINE: IMPORTER -> IMPORTED: why``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.import_rules import (
    PACKAGES,
    ROOT,
    Import,
    check,
    import_cycles,
    imports_in_functions,
    read_imports,
    wrong_direction,
)


# ------------------------------------------------------------ the checker itself


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in PACKAGES:
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


def test_a_clean_tree_reports_nothing(tmp_path):
    root = _tree(tmp_path, {
        "dataprep/store/__init__.py": "from dataprep.store.shards import ShardWriter\n",
        "dataprep/store/shards.py": "import json\nclass ShardWriter: ...\n",
        "dataprep/errors.py": "class ConfigError(ValueError): ...\n",
        "dataprep/caption.py": "from . import errors\nfrom .store import ShardWriter\n\ndef run():\n    import torch\n",
        "softrepa/train.py": "from dataprep.errors import ConfigError\nfrom dataprep.store.shards import ShardWriter\n"
                             "from dataprep import runtime\n\ndef train():\n    from PIL import Image\n",
        "dataprep/runtime.py": "",
        "flows/flows.py": "from dataprep.caption import run\nfrom softrepa.train import train\n",
    })
    assert check(root, allowed={}) == []


def test_a_dataprep_to_softrepa_edge_is_reported_with_file_line_and_edge(tmp_path):
    root = _tree(tmp_path, {
        "dataprep/tiny.py": "import json\n\n\ndef write_all():\n    from softrepa.tiny import write_tiny_pipelines\n",
        "dataprep/cli.py": "import typer\nimport flows.deployments\n",
        "softrepa/tiny.py": "def write_tiny_pipelines(): ...\n",
        "flows/deployments.py": "",
    })
    imports, _ = read_imports(root)
    assert wrong_direction(imports) == [
        "dataprep/cli.py:2: dataprep.cli -> flows.deployments: dataprep must import neither softrepa nor flows",
        "dataprep/tiny.py:5: dataprep.tiny -> softrepa.tiny: dataprep must import neither softrepa nor flows",
    ]
    assert imports_in_functions(imports, allowed={}) == [
        "dataprep/tiny.py:5: dataprep.tiny -> softrepa.tiny: imported inside write_all(): a project module that loads nothing heavy goes at the top of the module",
    ]


def test_softrepa_may_use_only_the_dataprep_foundation(tmp_path):
    root = _tree(tmp_path, {
        "dataprep/caption.py": "",
        "dataprep/store.py": "",
        "softrepa/evaluate.py": "from dataprep.store import read_rows\nfrom dataprep import caption\n"
                                "import importlib\n\ndef f():\n    return importlib.import_module('flows.flows')\n",
        "flows/flows.py": "",
    })
    assert [line.split(": ", 1)[0] for line in check(root, allowed={})] == [
        "softrepa/evaluate.py:2", "softrepa/evaluate.py:6",  # wrong directions
        "softrepa/evaluate.py:6",  # a project module inside f()
    ]
    assert "softrepa.evaluate -> dataprep.caption: softrepa may import from dataprep only" in check(root, allowed={})[0]


def test_a_cycle_is_reported_with_each_edge_even_through_a_function_level_relative_import(tmp_path):
    root = _tree(tmp_path, {
        "softrepa/tokens.py": "from . import token_files\n",
        "softrepa/token_files.py": "import json\n\n\ndef load():\n    from .tokens import SoftTokens\n",
    })
    imports, modules = read_imports(root)
    assert import_cycles(imports, modules, allowed={}) == [
        "import cycle softrepa.token_files -> softrepa.tokens -> softrepa.token_files "
        "(softrepa/token_files.py:5 in load(); softrepa/tokens.py:1)"
    ]
    # the same import, allowed with a reason, is neither a function-level finding nor a cycle edge
    allowed = {("softrepa.token_files", "softrepa.tokens"): "tokens imports token_files at load time"}
    assert check(root, allowed=allowed) == []


def test_type_checking_imports_count_for_directions_but_make_no_cycle(tmp_path):
    root = _tree(tmp_path, {
        "dataprep/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from softrepa.b import B\n    from dataprep.c import C\n",
        "dataprep/c.py": "from dataprep import a\n",
        "softrepa/b.py": "",
    })
    assert check(root, allowed={}) == ["dataprep/a.py:3: dataprep.a -> softrepa.b: dataprep must import neither softrepa nor flows"]


def test_stdlib_and_light_packages_inside_functions_are_reported_heavy_ones_are_not(tmp_path):
    root = _tree(tmp_path, {
        "dataprep/x.py": "class K:\n    def m(self):\n        import json, torch\n        import typer\n        from prefect import flow\n",
    })
    assert check(root, allowed={}) == [
        "dataprep/x.py:3: dataprep.x -> json: imported inside m(): the standard library goes at the top of the module",
        "dataprep/x.py:4: dataprep.x -> typer: imported inside m(): a package not in LAZY_OK (add it there if it is heavy or optional) goes at the top of the module",
    ]


def test_a_project_module_that_loads_a_heavy_package_may_be_imported_inside_a_function(tmp_path):
    root = _tree(tmp_path, {
        "dataprep/store/__init__.py": "from dataprep.store.shards import write\n",
        "dataprep/store/shards.py": "import pyarrow\n\ndef write(): ...\n",
        "dataprep/errors.py": "import json\n",
        # store loads pyarrow (through its package): lazy on purpose; errors loads nothing heavy
        "dataprep/cli.py": "import typer\n\ndef stats():\n    from dataprep.store.shards import write\n    from dataprep import errors\n",
        # pyarrow is loaded here anyway: the lazy import of store saves nothing
        "dataprep/stats.py": "import pyarrow\n\ndef f():\n    from dataprep import store\n",
    })
    assert check(root, allowed={}) == [
        "dataprep/cli.py:5: dataprep.cli -> dataprep.errors: imported inside stats(): a project module that loads nothing heavy goes at the top of the module",
        "dataprep/stats.py:4: dataprep.stats -> dataprep.store: imported inside f(): a project module that loads nothing heavy goes at the top of the module",
    ]


def test_allow_list_entries_need_a_reason_and_an_import(tmp_path):
    root = _tree(tmp_path, {"dataprep/x.py": "def f():\n    import json\n"})
    assert check(root, allowed={("dataprep.x", "json"): " "}) == [
        "ALLOWED_IN_FUNCTION('dataprep.x', 'json'): give the reason the import stays inside a function"]
    assert check(root, allowed={("dataprep.x", "json"): "why", ("dataprep.x", "os"): "why"}) == [
        "ALLOWED_IN_FUNCTION('dataprep.x', 'os'): no such import inside a function any more; remove the entry"]


# ------------------------------------------------------------ the real tree


@pytest.fixture(scope="module")
def tree() -> tuple[list[Import], dict[str, Path]]:
    return read_imports(ROOT)


def _report(findings: list[str]) -> str:
    return f"{len(findings)} finding(s):\n" + "\n".join(findings)


def test_dependency_directions(tree):
    imports, _ = tree
    assert not (found := wrong_direction(imports)), _report(found)


def test_no_import_cycles(tree):
    imports, modules = tree
    assert not (found := import_cycles(imports, modules)), _report(found)


def test_imports_inside_functions_only_for_heavy_packages(tree):
    imports, _ = tree
    assert not (found := imports_in_functions(imports)), _report(found)


def test_the_checker_sees_the_real_tree(tree):
    """Guards against a checker that passes because it reads nothing."""
    imports, modules = tree
    assert {"dataprep.cli", "softrepa.train", "flows.flows", "dataprep.errors"} <= set(modules)
    assert any(i.importer == "softrepa.cli" and i.imported == "dataprep.errors" for i in imports)
