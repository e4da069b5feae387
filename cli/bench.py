"""``dynscope bench``: run the benchmarks in ``benchmarks/`` and print their ratio tables.

Each ``benchmarks/bench_<name>.py`` exposes ``main(quick: bool = False) -> int`` that measures
side by side and prints its own table. The directory is ``./benchmarks`` when it exists, else
the one next to the installed source tree (editable installs).

Example:
    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "bench_demo.py").write_text("def main(quick=False):\\n    print('ratio 1.0')\\n    return 0\\n")
    >>> sorted(discover(folder))
    ['demo']
    >>> run_benchmarks(["demo"], quick=True, directory=folder)  # doctest: +ELLIPSIS
    == bench_demo (quick) ==
    ratio 1.0
    -- bench_demo: ok in ...s
    0
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence

PREFIX = "bench_"


def benchmarks_dir() -> Optional[Path]:
    """``./benchmarks`` if present, else ``benchmarks/`` beside the source tree, else ``None``."""
    for candidate in (Path.cwd() / "benchmarks", Path(__file__).resolve().parent.parent / "benchmarks"):
        if candidate.is_dir():
            return candidate
    return None


def discover(directory) -> Dict[str, Path]:
    """``{name: path}`` for every ``bench_<name>.py`` in ``directory``."""
    return {p.stem[len(PREFIX):]: p for p in sorted(Path(directory).glob(f"{PREFIX}*.py"))}


def describe(path: Path) -> str:
    """The first line of a benchmark's module docstring (read as text: nothing is imported)."""
    try:
        text = path.read_text(encoding="utf-8").lstrip()
    except OSError:
        return ""
    if text[:3] not in ('"""', "'''"):
        return ""
    lines = text[3:].strip().splitlines()
    return lines[0].rstrip('"\'').strip() if lines else ""


def available(directory=None) -> str:
    """The benchmarks ``dynscope bench`` can run, one per line with its description (for --help)."""
    folder = Path(directory) if directory is not None else benchmarks_dir()
    found = discover(folder) if folder is not None and folder.is_dir() else {}
    if not found:
        return "no benchmarks/ directory found (run from the dynscope source tree)"
    width = max(len(name) for name in found)
    lines = [f"  {name.ljust(width)}  {describe(path)}" for name, path in found.items()]
    return "benchmarks (in " + str(folder) + "):\n" + "\n".join(lines)


def run_benchmarks(names: Sequence[str] = (), quick: bool = False, directory=None) -> int:
    """Run the named benchmarks (all when ``names`` is empty); returns the exit code (0: all ok).

    Unknown names or a missing ``benchmarks/`` directory raise the CLI's ``UserError``. A benchmark
    that raises is reported with its traceback and counts as failed; the others still run.
    """
    from .main import UserError

    folder = Path(directory) if directory is not None else benchmarks_dir()
    if folder is None or not folder.is_dir():
        raise UserError("no benchmarks/ directory (run from the dynscope source tree)")
    found = discover(folder)
    if not found:
        raise UserError(f"no {PREFIX}*.py files in {folder}")
    unknown = [n for n in names if n not in found and f"{PREFIX}{n}" not in found and n.removeprefix(PREFIX) not in found]
    if unknown:
        raise UserError(f"unknown benchmark(s): {', '.join(unknown)} (available: {', '.join(found)})")
    selected = [n.removeprefix(PREFIX) for n in names] or list(found)
    failed: List[str] = []
    for name in selected:
        if not _run_one(name, found[name], quick):
            failed.append(name)
    if len(selected) > 1:
        print(f"== {len(selected) - len(failed)}/{len(selected)} benchmarks ok" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _run_one(name: str, path: Path, quick: bool) -> bool:
    print(f"== {PREFIX}{name}{' (quick)' if quick else ''} ==", flush=True)
    start = time.perf_counter()
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"dynscope_bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, "main", None)):
            print(f"-- {PREFIX}{name}: no main(quick=False) function", flush=True)
            return False
        code = int(module.main(quick=quick) or 0)
    except KeyboardInterrupt:
        raise
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 - one broken benchmark must not hide the others
        traceback.print_exc()
        code = 1
    finally:
        sys.path.remove(str(path.parent))
    status = "ok" if code == 0 else f"failed (exit code {code})"
    print(f"-- {PREFIX}{name}: {status} in {time.perf_counter() - start:.1f}s", flush=True)
    return code == 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_benchmarks(sys.argv[1:], quick=os.environ.get("DYNSCOPE_BENCH_QUICK") == "1"))
