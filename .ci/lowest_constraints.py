"""Print pip constraints pinning every dependency in pyproject.toml to its declared lower bound (`make test-lowest`).

Usage: python .ci/lowest_constraints.py [--extras test,face] [--skip torch,torchvision]
A requirement without a ``>=`` lower bound is an error: every dependency must declare the oldest version it needs.
"""

import argparse
import re
import sys
import tomllib
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--extras", default="", help="comma-separated optional-dependency groups to include")
parser.add_argument("--skip", default="", help="comma-separated packages left to another pin (e.g. torch)")
args = parser.parse_args()

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in filter(None, args.extras.split(",")):
    requirements += project["optional-dependencies"][extra]
skip = {name.strip().lower() for name in args.skip.split(",") if name.strip()}
pins = {}
for requirement in requirements:
    match = re.match(r"^([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(.*)$", requirement)
    name, spec = match.group(1).lower().replace("_", "-"), match.group(2)
    if name in skip:
        continue
    lower = re.search(r">=\s*([^,;\s]+)", spec)
    if not lower:
        sys.exit(f"{requirement!r} has no lower bound (>=): declare the oldest version it works with")
    pins[name] = lower.group(1)
print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
