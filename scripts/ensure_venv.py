"""Make sure a virtual environment holds this checkout's package and its pinned dependencies.

``make demo`` and ``make test`` call this with the system Python, each asking only for the
extras it needs (``--extras train``: the demo, with TensorBoard; ``--extras dev``: the test
suite, everything). The environment is (re)installed when any of these does not hold:

* it exists and its Python runs;
* its stamp names the same inputs: the text of ``pyproject.toml`` and ``constraints.txt``,
  the torch requirement, and this checkout's path;
* ``import msf`` inside it loads this checkout's ``src/msf`` (a moved or copied environment
  would otherwise test another tree's code);
* every package pinned in ``constraints.txt`` that is installed has the pinned version.

When only the extras are missing (``make test`` after ``make demo``), they are added on top.
Nothing else is trusted, in particular not file times.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"

# Runs inside the environment: where msf comes from, and installed versions that differ from the pins.
CHECK = r"""
import importlib.metadata as md, os, sys
import msf
print(os.path.realpath(msf.__file__))
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if "==" not in line:
        continue
    name, version = (s.strip() for s in line.split("==", 1))
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        continue
    if have != version:
        print(f"{name} {have} (pinned {version})")
"""


def stamp_key(torch_spec: str) -> str:
    h = hashlib.sha256()
    for part in ((ROOT / "pyproject.toml").read_bytes(), CONSTRAINTS.read_bytes(), torch_spec.encode(),
                 str(ROOT).encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def read_stamp(env: Path) -> tuple[str, set[str]]:
    """The inputs' key the environment was made for, and the extras installed into it."""
    stamp = env / ".installed"
    lines = stamp.read_text().splitlines() if stamp.is_file() else []
    if not lines:
        return "", set()
    if len(lines) == 1 or not lines[1].startswith("extras:"):
        return lines[0].strip(), {"dev"}  # a stamp from before extras were chosen: dev was installed
    return lines[0].strip(), {e.strip() for e in lines[1].removeprefix("extras:").split(",") if e.strip()}


def has_extras(installed: set[str], wanted: set[str]) -> bool:
    return "dev" in installed or wanted <= installed  # dev holds every other extra


def problems(env: Path, key: str) -> list[str]:
    py = env / "bin" / "python"
    if not py.exists():
        return [f"{env}: no environment yet"]
    if read_stamp(env)[0] != key:
        return [f"{env / '.installed'}: made for other inputs (pyproject.toml, constraints.txt, torch spec "
                "or checkout)"]
    r = subprocess.run([str(py), "-c", CHECK, str(CONSTRAINTS)], capture_output=True, text=True)
    if r.returncode != 0:
        return [f"{py}: cannot import msf ({(r.stderr.strip().splitlines() or ['?'])[-1]})"]
    where, *mismatched = r.stdout.strip().splitlines()
    found = []
    if Path(where) != (ROOT / "src" / "msf" / "__init__.py").resolve():
        found.append(f"msf is imported from {where}, not from this checkout ({ROOT / 'src'})")
    return found + [f"installed {m}" for m in mismatched]


def install(env: Path, torch_spec: str, key: str, extras: set[str], fresh: bool = True) -> None:
    """Install torch from ``torch_spec`` and this checkout with ``extras`` (only the extras when
    ``fresh`` is false), then record what the environment holds."""
    py = env / "bin" / "python"
    if not py.exists():
        venv.create(env, with_pip=True)
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    if fresh:
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        # torch (and torchvision) from the spec, which may name an index (a CPU-only build: README);
        # constraints.txt pins everything else as tested.
        subprocess.run([*pip, "-c", str(CONSTRAINTS), *torch_spec.split()], check=True)
        installed = set()
    else:
        installed = read_stamp(env)[1]
    target = f"{ROOT}[{','.join(sorted(extras))}]" if extras else str(ROOT)
    subprocess.run([*pip, "-c", str(CONSTRAINTS), "-e", target], check=True)
    (env / ".installed").write_text(f"{key}\nextras:{','.join(sorted(installed | extras))}\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", default=str(ROOT / ".venv"))
    ap.add_argument("--torch", default="torch==2.14.1 torchvision==0.29.1",
                    help="the torch requirement(s) to install, space-separated (pip arguments such as "
                    "--index-url may come with them)")
    ap.add_argument("--extras", default="dev", help="comma-separated extras of pyproject.toml to install "
                    "(default dev: all of them); empty for the core alone")
    args = ap.parse_args()
    env = Path(args.venv).absolute()
    key = stamp_key(args.torch)
    extras = {e.strip() for e in args.extras.split(",") if e.strip()}
    found = problems(env, key)
    if not found:
        if has_extras(read_stamp(env)[1], extras):
            return 0
        print(f"[venv] {env}: adding the extras {sorted(extras)}", flush=True)
        install(env, args.torch, key, extras, fresh=False)
        return 0
    for p in found:
        print(f"[venv] {p}: installing", flush=True)
    install(env, args.torch, key, extras)
    left = problems(env, key)
    for p in left:
        print(f"[venv] still wrong after installing: {p}", file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
