"""Write constraints.txt: the exact version of every library the package depends on (directly or not), as installed
in the current environment (the one the suite just passed in). Run after changing emovlm_kd/dependencies.py or
upgrading the environment:  python .ci/write_constraints.py > constraints.txt"""

import runpy
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

RANGES = runpy.run_path(str(Path(__file__).resolve().parent.parent / "emovlm_kd" / "dependencies.py"))["RANGES"]


def installed_closure(names) -> dict[str, str]:
    """{canonical name: version} of the installed distributions `names` need, requirements of requirements included
    (extras not asked for and markers that do not hold here are skipped)."""
    versions, seen, todo = {}, set(), [Requirement(name) for name in names]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        extras = {(name, extra) for extra in requirement.extras} | {(name, "")}
        if extras <= seen:
            continue
        seen |= extras
        try:
            dist = distribution(requirement.name)
        except PackageNotFoundError:
            print(f"# {requirement.name}: not installed here, left free", file=sys.stderr)
            continue
        versions[name] = dist.version
        for text in dist.requires or []:
            child = Requirement(text)
            environment = [{"extra": extra} for extra in requirement.extras] or [{"extra": ""}]
            if child.marker is None or any(child.marker.evaluate(env) for env in environment):
                todo.append(child)
    return versions


if __name__ == "__main__":
    pins = installed_closure(RANGES)
    print("# The exact versions CI and the README install: pip install -e \".[tests]\" -c constraints.txt")
    print("# Written by .ci/write_constraints.py from the environment the suite passed in (Python 3.11, Linux x86-64)")
    print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
