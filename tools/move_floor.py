"""Move edgec's floor modules into edgec/core/ and rewrite every reference to them.

The mechanical step of issue #12 (docs/architecture.md, layer 0): ``git mv``
of each module below, then, in every tracked (or untracked, not ignored)
.py, .md, .toml, .txt and .cfg file of the repository, ``edgec.NAME`` ->
``edgec.core.NAME``, ``edgec/NAME.py`` -> ``edgec/core/NAME.py`` and
``from edgec import NAME`` -> ``from edgec.core import NAME``. Safe to run
again (after merging a branch that still imports the old names): modules
already moved are skipped, rewritten text no longer matches.

    python tools/move_floor.py            # from the repository root, then run the tests
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

# the floor: docs/architecture.md, layer 0 (tests/test_architecture.py reads this list)
FLOOR = ("artifact", "elf", "errors", "fallbacks", "fold", "inputs", "model", "numerics", "progress", "shapes", "stats")
PACKAGE_INIT = '"""The floor of edgec (docs/architecture.md, layer 0): modules that import nothing else of edgec."""\n'
SUFFIXES = (".py", ".md", ".toml", ".txt", ".cfg")


def repository_files(root: Path) -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root, check=True, capture_output=True, text=True
    ).stdout.splitlines()
    return [root / name for name in listed if name.endswith(SUFFIXES) and (root / name).is_file()]


def rewrite(text: str) -> str:
    names = "|".join(FLOOR)
    text = re.sub(rf"\bedgec\.({names})\b", r"edgec.core.\1", text)
    text = re.sub(rf"\bedgec/({names})\.py\b", r"edgec/core/\1.py", text)
    return re.sub(rf"\bfrom edgec import ({names})\b", r"from edgec.core import \1", text)


def main(root: Path) -> int:
    core = root / "edgec" / "core"
    core.mkdir(exist_ok=True)
    if not (core / "__init__.py").exists():
        (core / "__init__.py").write_text(PACKAGE_INIT)
        subprocess.run(["git", "add", "edgec/core/__init__.py"], cwd=root, check=True)
    for name in FLOOR:
        if (root / "edgec" / f"{name}.py").exists():
            subprocess.run(["git", "mv", f"edgec/{name}.py", f"edgec/core/{name}.py"], cwd=root, check=True)
    changed = 0
    for path in repository_files(root):
        text = path.read_text()
        new = rewrite(text)
        if new != text:
            path.write_text(new)
            changed += 1
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    if '"edgec.core"' not in text:
        pyproject.write_text(text.replace('packages = ["edgec", ', 'packages = ["edgec", "edgec.core", ', 1))
    print(f"moved {len(FLOOR)} modules to edgec/core/, rewrote {changed} files")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path.cwd()))
