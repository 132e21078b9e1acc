"""Strip Jupyter notebooks for git: no outputs, no execution counts, no editor/Colab metadata noise.

    python tools/strip_notebooks.py                 # strip colab/*.ipynb in place
    python tools/strip_notebooks.py a.ipynb dir/    # given notebooks (folders: their *.ipynb, recursively)
    python tools/strip_notebooks.py --check         # exit 1 (and list them) if any notebook is not stripped

What is kept: the cells' sources, ids and `tags`; the notebook's `kernelspec`, `language_info.name` and the
Colab keys that change how it opens (`colab.name`, `accelerator`). The file is written the way nbformat
writes it (sorted keys, one-space indent, trailing newline), so a stripped notebook round-trips byte for byte.
Only the standard library is used, so this runs in a bare pre-commit hook or CI step.
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys
from typing import Any, Iterable, Sequence

DEFAULT_DIR = pathlib.Path(__file__).resolve().parent.parent / "colab"
KEEP_CELL_METADATA = ("tags",)


def strip_notebook(nb: dict[str, Any]) -> dict[str, Any]:
    """A copy of the notebook dict `nb` with outputs, execution counts and metadata noise removed."""
    out = copy.deepcopy(nb)
    for cell in out.get("cells", []):
        cell["metadata"] = {k: v for k, v in cell.get("metadata", {}).items() if k in KEEP_CELL_METADATA}
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        else:
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
            if not cell.get("attachments"):
                cell.pop("attachments", None)
    meta = out.get("metadata", {})
    kept: dict[str, Any] = {}
    if "kernelspec" in meta:
        kept["kernelspec"] = {k: meta["kernelspec"][k] for k in ("name", "display_name", "language")
                              if k in meta["kernelspec"]}
    if "name" in meta.get("language_info", {}):
        kept["language_info"] = {"name": meta["language_info"]["name"]}
    if "colab" in meta:
        kept["colab"] = {k: v for k, v in meta["colab"].items() if k == "name"} | {"provenance": []}
    if "accelerator" in meta:
        kept["accelerator"] = meta["accelerator"]
    out["metadata"] = kept
    return out


def dumps(nb: dict[str, Any]) -> str:
    """Serialize like `nbformat.write`: sorted keys, indent 1, non-ASCII kept, trailing newline."""
    return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def is_stripped(nb: dict[str, Any]) -> bool:
    return strip_notebook(nb) == nb


def find_notebooks(paths: Iterable[str | pathlib.Path]) -> list[pathlib.Path]:
    found: list[pathlib.Path] = []
    for p in map(pathlib.Path, paths):
        if p.is_dir():
            found.extend(q for q in sorted(p.rglob("*.ipynb")) if ".ipynb_checkpoints" not in q.parts)
        elif p.suffix == ".ipynb" and p.is_file():
            found.append(p)
        else:
            raise SystemExit(f"{p}: not a .ipynb file or a folder; pass notebooks or folders holding them")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("paths", nargs="*", help=f"notebooks or folders (default {DEFAULT_DIR})")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if any notebook has outputs, counts or metadata noise")
    args = parser.parse_args(argv)
    dirty = []
    for path in find_notebooks(args.paths or [DEFAULT_DIR]):
        text = path.read_text(encoding="utf-8")
        nb = json.loads(text)
        stripped = strip_notebook(nb)
        if args.check:
            if stripped != nb:
                dirty.append(path)
        elif dumps(stripped) != text:
            path.write_text(dumps(stripped), encoding="utf-8")
            print(f"stripped {path}")
    if dirty:
        print("notebooks with outputs or metadata noise (run `python tools/strip_notebooks.py`):\n  "
              + "\n  ".join(map(str, dirty)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
