"""Find drift before users do: install the newest releases of everything the project depends on in a
scratch environment, run a fast part of the suite there, and say which packages moved and what broke.

    python tools/drift.py                   # a new scratch venv under /tmp, removed at the end
    python tools/drift.py --venv /tmp/drift --keep

The scratch environment gets `pip install -e ".[test]"` without constraints.txt: what a user who
ignores the lock, or a new release of the lock's packages, would get. The tests it runs (TESTS) are
the sweep, resume, searcher, UI, report, storage and lint tests: those that broke on past releases.
Exit status: 0 nothing broke (moved or not), 1 a test failed, 2 the scratch install failed.

To take the new versions after it passes: run the whole suite in the scratch environment
(`VENV/bin/python -m pytest`), then `python tools/lock.py --from VENV/bin/python`, and commit
constraints.txt with a note of what moved.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lock import LOCK, PROJECT, ROOT, installed, locked

TESTS = (
    "tests/test_lint.py",
    "tests/test_searcher.py",
    "tests/test_sweep_config.py",
    "tests/test_storage.py",
    "tests/test_report.py",
    "tests/test_presentation.py",
    "tests/test_sweeps.py",
    "tests/test_sweep_resume.py",
    "tests/test_ui.py",
)


def moved(old: dict[str, str], new: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(set(old) | set(new)):
        if name in (PROJECT, "pip"):
            continue
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        if before is None:
            lines.append(f"  new    {name} {after}")
        elif after is None:
            lines.append(f"  gone   {name} (locked {before})")
        else:
            lines.append(f"  moved  {name} {before} -> {after}")
    return lines


def failures(junit: Path) -> list[str]:
    """'test id: the error's last line' for each failed or erroring test of a JUnit XML report."""
    found = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for problem in (*case.findall("failure"), *case.findall("error")):
            text = (problem.get("message") or problem.text or "").strip().splitlines()
            test = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            found.append(f"  {test}: {text[-1][:300] if text else problem.tag}")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--venv", type=Path, help="the scratch environment, made if missing, kept (default: under /tmp)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (its venv and junit.xml)")
    parser.add_argument("tests", nargs="*", default=list(TESTS), help="tests to run (default: %(default)s)")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="drift-"))
    venv = args.venv or scratch / "venv"
    python = venv / "bin" / "python"
    started = time.monotonic()
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
        subprocess.run([*pip, "install", "--quiet", "--upgrade", "pip"], check=True)
        print(f"installing the newest releases into {venv} ...", flush=True)
        install = subprocess.run(
            [*pip, "install", "--quiet", "--upgrade", "--upgrade-strategy", "eager", "-e", f"{ROOT}[test]"],
            capture_output=True, text=True,
        )  # fmt: skip
        if install.returncode != 0:
            print(f"the scratch install failed (this is drift too):\n{install.stderr.strip()}")
            return 2
        newest = installed(str(python))
        changes = moved(locked(), newest)
        print(
            f"against {LOCK.name}: "
            + (f"{len(changes)} packages differ\n" + "\n".join(changes) if changes else "no package moved")
        )

        junit = scratch / "junit.xml"
        print(f"running {len(args.tests)} test files there ...", flush=True)
        tests = subprocess.run(
            [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args.tests],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        tail = tests.stdout.strip().splitlines()[-1:] or ["(no output)"]
        broke = failures(junit) if junit.exists() else [f"  pytest exited {tests.returncode}: {tail[0]}"]
        minutes = (time.monotonic() - started) / 60
        if tests.returncode == 0:
            print(f"nothing broke ({tail[0]}; {minutes:.1f} min in all)")
            if changes:
                print(
                    "to take these versions: "
                    f"{python} -m pytest (the whole suite), then python tools/lock.py --from {python}, "
                    "and commit constraints.txt (rerun with --keep to keep the environment)"
                )
            return 0
        print(f"broke ({tail[0]}; {minutes:.1f} min in all):\n" + "\n".join(broke))
        return 1
    finally:
        if not args.keep:  # the scratch folder (and the venv in it); a --venv given is kept
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
