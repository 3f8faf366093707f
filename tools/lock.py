"""Write constraints.txt: the exact versions of everything `pip install -e ".[test]"` installs, for each
supported Python (3.11 and 3.12 on Linux x86_64), taken from an environment where the suite passed.

    python tools/lock.py                          # pins from this interpreter's environment
    python tools/lock.py --from /tmp/drift/venv/bin/python --python 3.12=/usr/bin/python3.12

The environment given with --from (default: the interpreter running this) is the one the whole suite
passed in; its versions are the pins. For each Python, pip resolves the project's requirements as a
fresh install would (`pip install --dry-run --ignore-installed --report`) under those pins, so the
lock holds what a new machine installs and nothing installed there by hand. A package whose version
differs between the Pythons (a release that dropped one of them) gets a `python_version` marker.
Interpreters are found as pythonX.Y on PATH or under pyenv's versions; --python names one.

Install through it: `pip install -c constraints.txt -e ".[test]"` (README; .ci/run does).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
PYTHONS = ("3.11", "3.12")
PROJECT = "da2s-nas"


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def python_version(interpreter: str) -> str | None:
    try:
        out = subprocess.run(
            [interpreter, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def find_interpreter(version: str) -> str | None:
    """pythonX.Y on PATH (a pyenv shim that does not serve it is skipped), else pyenv's own copy."""
    candidates = [shutil.which(f"python{version}")]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += sorted(str(p) for p in pyenv.glob(f"{version}.*/bin/python{version}"))
    for candidate in candidates:
        if candidate and python_version(candidate) == version:
            return candidate
    return None


def installed(interpreter: str) -> dict[str, str]:
    """{normalised name: version} of what the interpreter's environment has."""
    out = subprocess.run(
        [interpreter, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {normalise(p["name"]): p["version"] for p in json.loads(out.stdout)}


def resolve(interpreter: str, pins: dict[str, str]) -> dict[str, str]:
    """What a fresh `pip install -e ".[test]"` installs with `interpreter`, under `pins`."""
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "pins.txt"
        wanted = {name: version for name, version in pins.items() if name not in (PROJECT, "pip")}
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(wanted.items())))
        report = Path(tmp) / "report.json"
        command = [
            interpreter, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
            "--disable-pip-version-check", "--report", str(report), "-c", str(constraints), "-e", f"{ROOT}[test]",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"error: pip could not resolve the pins with {interpreter}:\n{done.stderr.strip()}")
        items = json.loads(report.read_text())["install"]
    found = {normalise(i["metadata"]["name"]): i["metadata"]["version"] for i in items}
    found.pop(PROJECT, None)
    return found


def locked(path: Path = LOCK, python: str | None = None) -> dict[str, str]:
    """{name: version} that constraints.txt pins for `python` (X.Y; default: this interpreter's)."""
    python = python or f"{sys.version_info[0]}.{sys.version_info[1]}"
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, _, marker = line.partition(";")
        name, _, version = spec.strip().partition("==")
        wanted = re.search(r'python_version\s*==\s*"([\d.]+)"', marker)
        if wanted is None or wanted.group(1) == python:
            pins[normalise(name)] = version.strip()
    return pins


def lock_text(resolved: dict[str, dict[str, str]], source: str) -> str:
    names = sorted({name for versions in resolved.values() for name in versions})
    lines = [
        "# Exact versions the test suite passed with (tools/lock.py writes this file; do not edit by hand).",
        f"# Pythons: {', '.join(resolved)} on Linux x86_64; pinned from {source}.",
        '# Install: pip install -c constraints.txt -e ".[test]"   (or -e . without the test tools)',
        "# Refresh: python tools/drift.py, then the steps it prints.",
    ]
    for name in names:
        versions = {py: found[name] for py, found in resolved.items() if name in found}
        if len(versions) == len(resolved) and len(set(versions.values())) == 1:
            lines.append(f"{name}=={next(iter(versions.values()))}")
        else:
            lines += [f'{name}=={version} ; python_version == "{py}"' for py, version in versions.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", default=sys.executable, help="the environment the suite passed in")
    parser.add_argument("--python", action="append", default=[], metavar="X.Y=PATH", help="an interpreter to use")
    parser.add_argument("--out", type=Path, default=LOCK)
    args = parser.parse_args(argv)

    given = dict(item.split("=", 1) for item in args.python)
    source_version = python_version(args.source)
    if source_version is None:
        sys.exit(f"error: --from {args.source}: not a Python interpreter that runs here")
    pins = installed(args.source)
    resolved = {}
    for version in PYTHONS:
        interpreter = given.get(version) or (args.source if version == source_version else find_interpreter(version))
        if interpreter is None:
            sys.exit(f"error: no Python {version} found; name one with --python {version}=PATH")
        print(f"resolving for Python {version} with {interpreter} ...", file=sys.stderr)
        resolved[version] = resolve(interpreter, pins)
    args.out.write_text(lock_text(resolved, f"an environment of Python {source_version}"))
    moved = {n: v for n, v in resolved[source_version].items() if pins.get(n) != v}
    if moved:  # cannot happen under the pins, unless the environment lacks something
        print(f"note: not installed in {args.source}, resolved anew: {moved}", file=sys.stderr)
    print(f"wrote {args.out} ({sum(len(v) for v in resolved.values())} pins over {len(resolved)} Pythons)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
