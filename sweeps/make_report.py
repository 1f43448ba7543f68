"""Write a self-contained HTML report of an experiment directory (finished or interrupted) and print its path.

    python sweeps/make_report.py EXPERIMENT_DIR

Exit codes: 0 written, 1 the report could not be written there, 2 not a lorasweep experiment directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# `python sweeps/make_report.py` puts sweeps/ on sys.path, not the project root that holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.report import write_report  # noqa: E402
from eval.report_data import NotAnExperimentDir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, write <EXPERIMENT_DIR>/report.html and print its absolute path."""
    parser = argparse.ArgumentParser(prog="make_report", description=__doc__.splitlines()[0])
    parser.add_argument("experiment_dir", type=Path, help="<output.dir>/<output.name> of a sweep, e.g. ~/lorasweep_runs/default")
    args = parser.parse_args(argv)
    experiment_dir = args.experiment_dir.expanduser().resolve()
    try:
        report = write_report(experiment_dir)
    except NotAnExperimentDir as err:
        print(f"make_report: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"make_report: error: cannot write the report into {experiment_dir}: {err}", file=sys.stderr)
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
