"""`hiflow_fast.kernels` and `hiflow_fast.bench` when the package is imported from a source tree.

setup.py installs the top-level folders kernels/ and bench/ as these two subpackages
(`package_dir`). Python started in the repository root (`python -m pytest`,
`python -m hiflow_fast.conformance`) finds the source folder hiflow_fast/ first on sys.path,
and it has no such subfolders. Then, and only then, this finder maps exactly those two names
to ../kernels and ../bench. Nothing else is mapped, and a top-level `import kernels` is left
alone: kernels/ has deliberately no __init__.py (kernels/README.md).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

# Subpackage name -> folder beside the package folder (setup.py's package_dir).
_MAPPED_FOLDERS = {"kernels": "kernels", "bench": "bench"}


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    def __init__(self, package: str, folders: dict[str, str]):
        self._folders = {f"{package}.{name}": folder for name, folder in folders.items()}

    def find_spec(self, fullname, path=None, target=None):
        folder = self._folders.get(fullname)
        if folder is None:
            return None
        init = os.path.join(folder, "__init__.py")
        if os.path.isfile(init):
            return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[folder])
        # No __init__.py (kernels/): a namespace package over that one folder.
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [folder]
        return spec


def install(package: str, package_file: str) -> None:
    """Register the finder when `package` was imported from a source tree (no kernels/ beside
    its __init__.py, but ../kernels there); a no-op for installed and editable packages."""
    package_dir = os.path.dirname(os.path.abspath(package_file))
    root = os.path.dirname(package_dir)
    folders = {
        name: os.path.join(root, folder)
        for name, folder in _MAPPED_FOLDERS.items()
        if not os.path.exists(os.path.join(package_dir, name)) and os.path.isdir(os.path.join(root, folder))
    }
    # Only a real source tree: its kernels/ folder holds our kernel files.
    if "kernels" not in folders or not os.path.isfile(os.path.join(folders["kernels"], "flash_attention.py")):
        return
    if any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
        return
    sys.meta_path.append(_SourceTreeFinder(package, folders))
