"""What a non-editable install ships: every package of the source tree.

``pyproject.toml`` lists its packages by name, so a folder that becomes a
package (``dataprep/store/``, ``dataprep/batches/``) is missing from a wheel
until it is listed, while an editable install (the one tests use) still
imports it from the checkout. This test reads the list and the tree.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(REPO).parts)
        for top in ("dataprep", "softrepa", "flows")
        for init in (REPO / top).rglob("__init__.py")
    }
    assert on_disk <= listed, f"packages missing from [tool.setuptools] packages: {sorted(on_disk - listed)}"
