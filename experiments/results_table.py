"""Collect the results.json files of several runs into one markdown table (mean ± std, %).

    python experiments/results_table.py /tmp/digits /tmp/digits_dm /tmp/digits_rnd
    python experiments/results_table.py /tmp/runs /tmp/scores --output=RESULTS_TABLE.md

Each argument is a results.json file, a run's workdir (or an `evaluate.py --output` directory), or
a directory searched recursively for results.json files. Rows per run and architecture: the run's
own final evaluation (the reported number, SPEC A9), the architectures it was re-evaluated on
(experiments/evaluate.py; the latest re-evaluation of an architecture wins), its best-by-validation
snapshot when the run held out a validation split ("val-selected" in the Run column), and sets
scored with `evaluate.py --set` (Protocol "imported", Run the end of the file's path; the latest
entry per file and architecture).
Accuracies are mean ± population std over all networks of all experiments, in percent; "Runs" is
how many networks that is. Protocol: `eval.epochs` (the reference's epoch_eval_train; one more
epoch runs), networks per set, DSA during evaluation on or off, training on the x4 expansion or
the stored images.
"""

import glob
import json
import os

from absl import app
from absl import flags

_OUTPUT = flags.DEFINE_string("output", None, "Also write the table to this file.")

METHOD_ORDER = ("random", "herding", "kcenter", "dm", "idm", "bacon")
METHOD_NAMES = {"random": "Random", "herding": "Herding", "kcenter": "K-Center", "dm": "DM",
                "idm": "IDM", "bacon": "BACON"}
HEADER = ("Dataset", "IPC", "Method", "Architecture", "Protocol", "Accuracy (%)", "Runs", "Run")


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


def protocol(epochs, num_eval, dsa, expand, imported=False):
    """The Protocol cell, e.g. `300 ep, 5 nets, DSA, x4` (`?` for a setting a file lacks)."""
    parts = [f"{epochs if epochs is not None else '?'} ep",
             f"{num_eval if num_eval is not None else '?'} nets",
             {True: "DSA", False: "no DSA"}.get(dsa, "DSA ?"),
             {True: "x4", False: "x1"}.get(expand, "x?")]
    if imported:
        parts.append("imported")
    return ", ".join(parts)


def _latest(entries, key):
    """The latest entry per key(entry): ISO timestamps sort in time order; ties go to file order."""
    latest = {}
    for entry in entries:
        k = key(entry)
        if k not in latest or entry["timestamp"] >= latest[k]["timestamp"]:
            latest[k] = entry
    return latest


def _row(summary, **cells):
    return {**cells, "mean": float(summary["mean"]), "std": float(summary["std"]),
            "runs": int(summary["num_runs"])}


def _ipc_cell(entry):
    if entry.get("ipc") is not None:
        return int(entry["ipc"])
    counts = [n for one_set in entry.get("sets", []) for n in one_set["images_per_class"]]
    return f"{min(counts)}-{max(counts)}" if counts else "?"


def _short_path(path, parts=3):
    """The last `parts` components of a path: enough to tell `run/exp0/synthetic.pt` apart."""
    return "/".join(os.path.normpath(path).split(os.sep)[-parts:])


def rows_of(results, run="run"):
    """Table rows (dicts) of one results.json; `run` names it in the Run column."""
    config = results.get("config", {})
    evaluation = config.get("eval", {})
    own = protocol(evaluation.get("epochs"), evaluation.get("num_eval"), evaluation.get("dsa"),
                   config.get("expand"))
    rows = []
    if "results" in results:
        base = {"dataset": results["dataset"], "ipc": int(results["ipc"]),
                "method": results["method"]}
        for name, summary in results["results"].items():
            rows.append(_row(summary, **base, architecture=name, protocol=own, run=run))
        reevaluated = _latest([e for e in results.get("reevaluations", [])
                               if e["model"] not in results["results"]], lambda e: e["model"])
        for name, entry in reevaluated.items():
            cell = protocol(entry.get("eval_epochs"), entry.get("num_eval"),
                            entry.get("dsa", evaluation.get("dsa")), entry.get("expand"))
            rows.append(_row(entry, **base, architecture=name, protocol=cell, run=run))
        selected = results.get("validation_selected")
        if selected:
            iterations = ", ".join(map(str, selected["iterations"]))
            for name, summary in selected["results"].items():
                rows.append(_row(summary, **base, architecture=name, protocol=own,
                                 run=f"{run} (val-selected, it {iterations})"))
    imported = _latest(results.get("imports", []), lambda e: (e["source"], e["method"],
                                                             e["model"]))
    for (source, method, name), entry in imported.items():
        expand = entry.get("expand")
        cell = protocol(entry.get("eval_epochs"), entry.get("num_eval"), entry.get("dsa"),
                        expand if isinstance(expand, bool) else None, imported=True)
        rows.append(_row(entry, dataset=entry["dataset"], ipc=_ipc_cell(entry), method=method,
                         architecture=name, protocol=cell, run=_short_path(source)))
    return rows


def _sort_key(row):
    method = row["method"]
    order = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    ipc = row["ipc"] if isinstance(row["ipc"], int) else float("inf")
    return (row["dataset"], ipc, str(row["ipc"]), order, method, row["architecture"], row["run"],
            -row["runs"])


def markdown_table(rows):
    """A markdown table of `rows`, sorted by dataset, IPC, method, architecture, run."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in sorted(rows, key=_sort_key):
        cells = (
            row["dataset"], str(row["ipc"]), METHOD_NAMES.get(row["method"], row["method"]),
            row["architecture"], row["protocol"], f"{row['mean']:.2f} ± {row['std']:.2f}",
            str(row["runs"]), row["run"],
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_from_paths(paths):
    """The markdown table of every results.json under `paths`."""
    rows = []
    for path in find_results(paths):
        with open(path) as f:
            rows.extend(rows_of(json.load(f), run=os.path.basename(os.path.dirname(path))))
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
