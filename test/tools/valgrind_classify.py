#!/usr/bin/env python3
"""Classify the memcheck reports of the valgrind layer (test/tools/valgrind.sh).

Reads every vg.<pid>.log of a log directory: one text log per server
process (valgrind reopens --log-file=...%p in each forked child; its XML
output does not, so XML would mix the processes), written with
--fullpath-after= (frames name their source file with its full path) and
--show-error-list=yes (the suppressions used are listed at exit).

A report is *ours* when any of its stacks -- the error's own, or an
auxiliary one such as where the block was allocated or freed -- has a
frame in qes_billing: a frame in .../src/<file>.c for one of our src/*.c
(PostgreSQL's own files sit deeper, src/backend/...), or a frame with no
source in qes_billing.so.  Reports suppressed by the suppression file
(test/tools/valgrind-postgres.supp) are only counted.

  valgrind_classify.py LOGDIR             exit 1 if any report is ours
  valgrind_classify.py LOGDIR --planted   the self-test: exit 0 only if
                                          every error qes_billing.debug_fault
                                          planted is among the reports ours

Every report of ours is printed in full; the others are summed by kind and
innermost function.
"""
import argparse
import collections
import glob
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.normpath(os.path.join(HERE, "..", "..", "src"))
OUR_FILES = sorted(os.path.basename(p)[:-2] for p in glob.glob(os.path.join(SRC, "*.c")))
OUR_FRAME = re.compile(r"\((?:\S*/)?src/(?:" + "|".join(map(re.escape, OUR_FILES)) + r")\.c:\d+\)"
                       r"|\(in \S*/qes_billing\.so\)")

# what qes_billing.debug_fault plants (src/guc.c, qes_debug_fault_point)
PLANTED = {"invalid_read": "Invalid read of size 1",
           "uninitialised": "Conditional jump or move depends on uninitialised value(s)"}
PLANT_FUNCTION = "qes_debug_fault_point"

LINE = re.compile(r"^==(\d+)== ?(.*)$")
FRAME = re.compile(r"^\s+(?:at|by) 0x[0-9A-Fa-f]+: (.*)$")
USED_SUPP = re.compile(r"used_suppression:\s+(\d+)\s+(\S+)")
TOTALS = re.compile(r"ERROR SUMMARY: ([\d,]+) errors from [\d,]+ contexts \(suppressed: ([\d,]+) from")


class Report:
    def __init__(self, pid, lines):
        self.pid = pid
        self.lines = lines
        self.header = lines[0]
        self.frames = [m.group(1) for m in map(FRAME.match, lines) if m]
        self.ours = any(OUR_FRAME.search(f) for f in self.frames)

    def text(self):
        return "\n".join([f"--- process {self.pid}: {self.header}"] + [
            "    " + line + ("   <== qes_billing" if FRAME.match(line) and OUR_FRAME.search(line) else "")
            for line in self.lines[1:]])


def parse_log(path):
    """(reports, suppressions used by name, errors counted by valgrind or
    None when the process did not reach its exit summary)."""
    reports, supp, counted = [], collections.Counter(), None
    block, pid = [], None

    def flush():
        # a report is a header line and a stack; other blocks are
        # valgrind's banner, notes and summaries
        if block and not block[0].startswith(" ") and any(FRAME.match(x) for x in block):
            reports.append(Report(pid, list(block)))
        block.clear()

    in_exit_list = False
    with open(path, errors="replace") as f:
        for raw in f:
            raw = raw.rstrip("\n")
            m = USED_SUPP.search(raw)
            if m:
                supp[m.group(2)] += int(m.group(1))
                continue
            m = LINE.match(raw)
            if not m:
                continue
            pid, text = m.group(1), m.group(2)
            t = TOTALS.search(text)
            if t:
                flush()
                # -s repeats every report after the first summary: read once
                if counted is None:
                    counted = int(t.group(1).replace(",", ""))
                in_exit_list = True
                continue
            if in_exit_list:
                continue
            if text.strip() == "":
                flush()
            else:
                block.append(text)
    flush()
    return reports, supp, counted


def classify(logdir):
    r = {"processes": 0, "unfinished": 0, "ours": [], "others": [], "suppressed": collections.Counter(),
         "counted": 0}
    for path in sorted(glob.glob(os.path.join(logdir, "vg.*.log"))):
        reports, supp, counted = parse_log(path)
        r["processes"] += 1
        if counted is None:
            r["unfinished"] += 1
        else:
            r["counted"] += counted
        r["suppressed"].update(supp)
        for rep in reports:
            r["ours" if rep.ours else "others"].append(rep)
    return r


def summary(r, label):
    print(f"{label}: {r['processes']} server processes under memcheck; {len(r['ours'])} reports in "
          f"qes_billing code, {len(r['others'])} elsewhere; {sum(r['suppressed'].values())} suppressed "
          f"({len(r['suppressed'])} rules of test/tools/valgrind-postgres.supp used)")
    if r["unfinished"]:
        print(f"{label}: {r['unfinished']} processes ended without valgrind's exit summary "
              f"(killed); the reports they wrote count")
    for name, count in r["suppressed"].most_common():
        print(f"{label}:   suppressed {count:7d}  {name}")
    if r["others"]:
        kinds = collections.Counter((rep.header, rep.frames[0]) for rep in r["others"])
        print(f"{label}: reports with no qes_billing frame (PostgreSQL or a library; they do not fail the run):")
        for (header, top), count in kinds.most_common(15):
            print(f"{label}:   {count:7d}  {header}  at {top}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("logdir")
    ap.add_argument("--label", default="valgrind")
    ap.add_argument("--planted", nargs="*", metavar="FAULT", choices=sorted(PLANTED),
                    help="self-test: the faults qes_billing.debug_fault planted (none given: all)")
    ap.add_argument("--show", type=int, default=20, help="reports of ours printed in full")
    args = ap.parse_args()

    r = classify(args.logdir)
    if r["processes"] == 0:
        print(f"{args.label}: no valgrind log in {args.logdir}: the server did not run under valgrind")
        return 1
    summary(r, args.label)
    for rep in r["ours"][:args.show]:
        print(rep.text())
    if len(r["ours"]) > args.show:
        print(f"{args.label}: ... and {len(r['ours']) - args.show} more reports in qes_billing code")

    if args.planted is None:
        return 1 if r["ours"] else 0

    # self-test: each planted fault must be among the reports classified
    # ours, and nothing else may be
    ok = True
    planted = set()
    for fault in args.planted or sorted(PLANTED):
        hits = [rep for rep in r["ours"] if rep.header == PLANTED[fault]
                and rep.frames and rep.frames[0].startswith(PLANT_FUNCTION + " ")]
        print(f"{args.label}: planted {fault}: {len(hits)} report(s) \"{PLANTED[fault]}\" at "
              f"{PLANT_FUNCTION} classified as qes_billing's" + ("" if hits else "   <== MISSED"))
        ok &= bool(hits)
        planted.update(map(id, hits))
    unplanted = [rep for rep in r["ours"] if id(rep) not in planted]
    if unplanted:
        print(f"{args.label}: {len(unplanted)} report(s) in qes_billing code that were not planted (see above)")
    return 0 if ok and not unplanted else 1


if __name__ == "__main__":
    sys.exit(main())
