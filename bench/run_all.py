"""Run every benchmark in turn (``make bench``), or the ones named on the command line.

Each benchmark measures its own baseline in the same run and prints its ratios;
they run one after another because each wants the machine's two cores to itself.

Usage: ``.venv/bin/python bench/run_all.py [eval_import build_overhead ...]``
(``soak`` runs 20 minutes and is only run when named.)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: cheapest first, so a broken setup shows early
ORDER = ["cache_serve", "dashboard_pages", "eval_import", "build_overhead", "build_overhead_e2e",
         "ssh_overhead", "agent_overhead", "dispatch_scale", "api_scale",
         "scale_out"]
#: benchmarks that are a mode of another script: name -> (script, arguments)
MODES = {"build_overhead_e2e": ("build_overhead", ["--e2e"])}


def main(argv: list[str]) -> int:
    unknown = [name for name in argv if name not in [*ORDER, "soak"]]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(ORDER)}",
              file=sys.stderr)
        return 2
    failed = []
    for name in argv or ORDER:
        print(f"\n=== {name}", flush=True)
        start = time.monotonic()
        script, arguments = MODES.get(name, (name, []))
        code = subprocess.call([sys.executable, str(HERE / f"{script}.py"), *arguments])
        print(f"=== {name}: exit {code} after {time.monotonic() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
