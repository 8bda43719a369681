"""Appends accelerator_check.sh's figures to RESULTS.md as one dated section of table rows.

    python benchmarks/accelerator_rows.py --distill=distill_speed.json --eval=eval_speed.json \
        --tests_rc=0 --results=RESULTS.md

Reads the `--json` files of distill_speed.py and eval_speed.py; a missing or unreadable file (its
benchmark failed or timed out) becomes a row saying so. The commit is `--commit`, else
$BACON_JAX_COMMIT, else `git rev-parse`, else "unknown" (the device machine's copy of the tree may
have no .git: pass it on the command line).
"""

import argparse
import datetime
import json
import os
import subprocess
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--distill", required=True, help="distill_speed.py --json output")
    parser.add_argument("--eval", required=True, help="eval_speed.py --json output")
    parser.add_argument("--tests_rc", default="?", help="exit status of the GPU test subset")
    parser.add_argument("--results", default="RESULTS.md", help="file the section is appended to")
    parser.add_argument("--commit", default="", help="commit measured (default: see above)")
    return parser.parse_args(argv)


def commit(explicit):
    if explicit or os.environ.get("BACON_JAX_COMMIT"):
        return explicit or os.environ["BACON_JAX_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        return {"error": f"{type(error).__name__}: {error}"}


def fmt(value, scale=1.0, digits=3, unit=""):
    if value is None:
        return "n/a"
    return f"{value / scale:.{digits}g}{unit}"


def percent(ratio):
    return "n/a" if ratio is None else f"{100 * ratio:.1f}%"


def _row(label, row, seconds, flops):
    """One table row: a benchmark's figures for one call (an iteration or an epoch)."""
    return (f"| {label} | {row['compile_s']:.1f} | {fmt(seconds)} | {fmt(flops, 1e9, 4, ' G')} | "
            f"{fmt(row['flops_per_s'], 1e12, 3, ' T')} | {percent(row['of_peak'])} | "
            f"{fmt(row['peak_mem_bytes'], 2**30, 3, ' GiB')} |")


def section(distill, evaluation, tests_rc, sha):
    device = distill.get("device") or evaluation.get("device") or "unknown device"
    today = datetime.date.today().isoformat()
    lines = [
        "",
        f"### Accelerator check, {device}, {today}, commit `{sha}`",
        "",
        f"`bash benchmarks/accelerator_check.sh`: iteration `{distill.get('config', '?')}` "
        f"(data: {distill.get('data', '?')}), epoch `{evaluation.get('config', '?')}`; peak: "
        f"{distill.get('peak') or evaluation.get('peak') or 'n/a'}. GPU test subset exit status: "
        f"{tests_rc}.",
        "",
        "| phase | compile s | s per call | FLOP per call | FLOP/s | of peak | peak mem/device |",
        "|---|---|---|---|---|---|---|",
    ]
    if "error" in distill:
        lines.append(f"| BACON iteration | failed: {distill['error']} | | | | | |")
    for row in distill.get("rows", []):
        lines.append(_row(f"{row['method'].upper()} iteration ({row['model']})", row,
                          row["iteration_s"], row["flops_per_iteration"]))
    if "error" in evaluation:
        lines.append(f"| evaluation epoch | failed: {evaluation['error']} | | | | | |")
    for row in evaluation.get("rows", []):
        label = (f"evaluation epoch, {row['num_eval']} x {evaluation['model']} "
                 f"({evaluation['set_size']} images, {evaluation['steps_per_epoch']} steps)")
        lines.append(_row(label, row, row["epoch_s"], row["flops_per_epoch"]))
    return "\n".join(lines) + "\n"


def main(argv):
    args = parse_args(argv)
    text = section(load(args.distill), load(args.eval), args.tests_rc, commit(args.commit))
    print(text)
    with open(args.results, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
