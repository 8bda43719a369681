"""Collect the results.json files of several runs into one markdown table (mean ± std, %).

    python experiments/results_table.py /tmp/digits /tmp/digits_dm /tmp/digits_rnd
    python experiments/results_table.py /tmp/runs --output=RESULTS_TABLE.md

Each argument is a results.json file, a run's workdir, or a directory searched recursively for
results.json files. One row per (run, architecture): the run's own final evaluation (the reported
number, SPEC A9), plus the architectures it was re-evaluated on (experiments/evaluate.py; the latest
re-evaluation of an architecture wins). Accuracies are mean ± population std over all networks of
all experiments, in percent; "runs" is how many networks that is.
"""

import glob
import json
import os

from absl import app
from absl import flags

_OUTPUT = flags.DEFINE_string("output", None, "Also write the table to this file.")

METHOD_ORDER = ("random", "dm", "idm", "bacon")
METHOD_NAMES = {"random": "Random", "dm": "DM", "idm": "IDM", "bacon": "BACON"}
HEADER = ("Dataset", "IPC", "Method", "Architecture", "Accuracy (%)", "Runs")


def find_results(paths):
    """The results.json files named by `paths` (files, workdirs or directories to search)."""
    found = set()
    for path in paths:
        if os.path.isfile(path):
            found.add(os.path.abspath(path))
        elif os.path.isfile(os.path.join(path, "results.json")):
            found.add(os.path.abspath(os.path.join(path, "results.json")))
        elif os.path.isdir(path):
            found.update(os.path.abspath(p)
                         for p in glob.glob(os.path.join(path, "**", "results.json"),
                                            recursive=True))
        else:
            raise FileNotFoundError(f"{path}: not a results.json file or a directory.")
    return sorted(found)


def rows_of(results):
    """Table rows (dicts) of one results.json: its own results, then re-evaluated architectures."""
    per_model = dict(results.get("results", {}))
    latest = {}
    for entry in results.get("reevaluations", []):
        if entry["model"] not in per_model:
            # ISO timestamps sort in time order; on a tie the later entry in the file wins.
            if entry["model"] not in latest or entry["timestamp"] >= latest[entry["model"]][
                    "timestamp"]:
                latest[entry["model"]] = entry
    per_model.update(latest)
    return [
        {
            "dataset": results["dataset"],
            "ipc": int(results["ipc"]),
            "method": results["method"],
            "architecture": name,
            "mean": float(summary["mean"]),
            "std": float(summary["std"]),
            "runs": int(summary["num_runs"]),
        }
        for name, summary in per_model.items()
    ]


def _sort_key(row):
    method = row["method"]
    order = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return row["dataset"], row["ipc"], order, method, row["architecture"], -row["runs"]


def markdown_table(rows):
    """A markdown table of `rows`, sorted by dataset, IPC, method, architecture."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in sorted(rows, key=_sort_key):
        cells = (
            row["dataset"], str(row["ipc"]), METHOD_NAMES.get(row["method"], row["method"]),
            row["architecture"], f"{row['mean']:.2f} ± {row['std']:.2f}", str(row["runs"]),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_from_paths(paths):
    """The markdown table of every results.json under `paths`."""
    rows = []
    for path in find_results(paths):
        with open(path) as f:
            rows.extend(rows_of(json.load(f)))
    return markdown_table(rows)


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("Give at least one workdir, results.json or directory.")
    table = table_from_paths(argv[1:])
    print(table, end="")
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            f.write(table)


if __name__ == "__main__":
    app.run(main)
