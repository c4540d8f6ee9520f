"""Make sure a virtual environment holds this checkout's package and its pinned dependencies.

``make demo`` and ``make test`` call this with the system Python. The environment is
(re)installed when any of these does not hold:

* it exists and its Python runs;
* its stamp names the same inputs: the text of ``pyproject.toml`` and ``constraints.txt``,
  the torch requirement, and this checkout's path;
* ``import msf`` inside it loads this checkout's ``src/msf`` (a moved or copied environment
  would otherwise test another tree's code);
* every package pinned in ``constraints.txt`` that is installed has the pinned version.

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


def problems(env: Path, key: str) -> list[str]:
    py = env / "bin" / "python"
    stamp = env / ".installed"
    if not py.exists():
        return [f"{env}: no environment yet"]
    if not stamp.is_file() or stamp.read_text().strip() != key:
        return [f"{stamp}: made for other inputs (pyproject.toml, constraints.txt, torch spec or checkout)"]
    r = subprocess.run([str(py), "-c", CHECK, str(CONSTRAINTS)], capture_output=True, text=True)
    if r.returncode != 0:
        return [f"{py}: cannot import msf ({(r.stderr.strip().splitlines() or ['?'])[-1]})"]
    where, *mismatched = r.stdout.strip().splitlines()
    found = []
    if Path(where) != (ROOT / "src" / "msf" / "__init__.py").resolve():
        found.append(f"msf is imported from {where}, not from this checkout ({ROOT / 'src'})")
    return found + [f"installed {m}" for m in mismatched]


def install(env: Path, torch_spec: str, key: str) -> None:
    py = env / "bin" / "python"
    if not py.exists():
        venv.create(env, with_pip=True)
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    # torch (and torchvision) from the spec; constraints.txt pins everything else as tested.
    subprocess.run([*pip, "-c", str(CONSTRAINTS), *torch_spec.split()], check=True)
    subprocess.run([*pip, "-c", str(CONSTRAINTS), "-e", f"{ROOT}[dev]"], check=True)
    (env / ".installed").write_text(key + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", default=str(ROOT / ".venv"))
    ap.add_argument("--torch", default="torch==2.14.1 torchvision==0.29.1",
                    help="the torch requirement(s) to install, space-separated")
    args = ap.parse_args()
    env = Path(args.venv).absolute()
    key = stamp_key(args.torch)
    found = problems(env, key)
    if not found:
        return 0
    for p in found:
        print(f"[venv] {p}: installing", flush=True)
    install(env, args.torch, key)
    left = problems(env, key)
    for p in left:
        print(f"[venv] still wrong after installing: {p}", file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
