#!/usr/bin/env python3
"""Check META.json, the PGXN distribution metadata (meta-spec 1.0.0).

Valid JSON; the spec's required keys and their forms (terms, SemVer
versions, version ranges, a known license, release status, tags, no_index,
prereq phases and relationships, no unknown keys but x_ ones); every file it
names exists; and its versions are qes_billing.control's default_version
(the one version source) written as SemVer: "0.2" is "0.2.0".  Then PGXN's
own validator, pgxn_meta, when test/tools/deps.sh could build it.  Exits 1
with one line per problem.  Run by make deb (.ci/deb.sh) and so by the deb
layer.
"""
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

SEMVER = (r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
          r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?")
RANGE_ONE = r"(?:(?:[=!]=|[<>]=?)\s*)?(?:" + SEMVER + r"|0)"
RANGE = re.compile(r"^" + RANGE_ONE + r"(?:,\s*" + RANGE_ONE + r")*$")
TERM = re.compile(r"^[^/\\\s\x00-\x1f\x7f]{2,}$")
TAG = re.compile(r"^[^/\\\x00-\x1f\x7f]{2,255}$")
LICENSES = {
    "agpl_3", "apache_1_1", "apache_2_0", "artistic_1", "artistic_2", "bsd", "freebsd",
    "gfdl_1_2", "gfdl_1_3", "gpl_1", "gpl_2", "gpl_3", "lgpl_2_1", "lgpl_3_0", "mit",
    "mozilla_1_0", "mozilla_1_1", "openssl", "perl_5", "postgresql", "qpl_1_0", "ssleay",
    "sun", "zlib", "open_source", "restricted", "unrestricted", "unknown"}
TOP_KEYS = {"name", "version", "abstract", "maintainer", "license", "provides", "meta-spec",
            "description", "generated_by", "tags", "no_index", "prereqs", "release_status",
            "resources"}
REQUIRED = ["name", "version", "abstract", "maintainer", "license", "provides", "meta-spec"]
PHASES = {"configure", "build", "test", "runtime", "develop"}
RELATIONS = {"requires", "recommends", "suggests", "conflicts"}

problems = []


def bad(msg):
    problems.append(msg)


def custom(key):
    return re.match(r"^[xX]_.", key) is not None


def semver(v):
    return isinstance(v, str) and re.fullmatch(SEMVER, v) is not None


def nonempty_string(v):
    return isinstance(v, str) and len(v) > 0


def control_version():
    with open(os.path.join(ROOT, "qes_billing.control")) as f:
        for line in f:
            m = re.match(r"^default_version\s*=\s*'([^']*)'", line)
            if m:
                return m.group(1)
    return None


def as_semver(v):
    """the control file's version as SemVer: 0.2 -> 0.2.0"""
    parts = v.split(".")
    while len(parts) < 3:
        parts.append("0")
    return ".".join(parts)


def check_path(where, p):
    if not nonempty_string(p) or p.startswith("/") or "\\" in p:
        bad(f"{where}: not a relative unix path: {p!r}")
    elif not os.path.exists(os.path.join(ROOT, p)):
        bad(f"{where}: {p} does not exist")


def main():
    path = os.path.join(ROOT, "META.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        print(f"META.json: {e}")
        return 1
    if not isinstance(meta, dict):
        print("META.json: not a JSON object")
        return 1

    for k in REQUIRED:
        if k not in meta:
            bad(f"required key {k} missing")
    for k in meta:
        if k not in TOP_KEYS and not custom(k):
            bad(f"unknown key {k} (custom keys start with x_)")

    if "name" in meta and not (isinstance(meta["name"], str) and TERM.match(meta["name"])):
        bad(f"name is not a term: {meta['name']!r}")
    for k in ("abstract", "description", "generated_by"):
        if k in meta and not nonempty_string(meta[k]):
            bad(f"{k} is not a non-empty string")
    if "version" in meta and not semver(meta["version"]):
        bad(f"version is not SemVer: {meta['version']!r}")

    m = meta.get("maintainer")
    if m is not None and not (nonempty_string(m) or (isinstance(m, list) and m and all(map(nonempty_string, m)))):
        bad("maintainer is neither a string nor a list of strings")

    lic = meta.get("license")
    if lic is not None:
        if isinstance(lic, str):
            ok = lic in LICENSES
        elif isinstance(lic, list):
            ok = bool(lic) and all(x in LICENSES for x in lic)
        elif isinstance(lic, dict):
            ok = bool(lic) and all(isinstance(v, str) and re.match(r"^[a-z][a-z0-9+.-]*:", v) for v in lic.values())
        else:
            ok = False
        if not ok:
            bad(f"license is not a known license (or a name -> URI object): {lic!r}")

    ms = meta.get("meta-spec")
    if ms is not None:
        if not isinstance(ms, dict) or ms.get("version") != "1.0.0":
            bad("meta-spec.version is not 1.0.0")
        elif any(k not in ("version", "url") and not custom(k) for k in ms):
            bad("meta-spec has unknown keys")

    provides = meta.get("provides")
    if provides is not None:
        if not isinstance(provides, dict) or not provides:
            bad("provides is not a non-empty object")
        else:
            for ext, e in provides.items():
                where = f"provides.{ext}"
                if not TERM.match(ext):
                    bad(f"{where}: not a term")
                if not isinstance(e, dict):
                    bad(f"{where}: not an object")
                    continue
                for k in e:
                    if k not in ("file", "version", "abstract", "docfile") and not custom(k):
                        bad(f"{where}: unknown key {k}")
                if "file" not in e or "version" not in e:
                    bad(f"{where}: file and version are required")
                if "file" in e:
                    check_path(where + ".file", e["file"])
                if "docfile" in e:
                    check_path(where + ".docfile", e["docfile"])
                if "version" in e and not semver(e["version"]):
                    bad(f"{where}.version is not SemVer: {e['version']!r}")
                if "abstract" in e and not nonempty_string(e["abstract"]):
                    bad(f"{where}.abstract is not a non-empty string")

    prereqs = meta.get("prereqs")
    if prereqs is not None:
        if not isinstance(prereqs, dict) or not prereqs:
            bad("prereqs is not a non-empty object")
        else:
            for phase, rels in prereqs.items():
                if custom(phase):
                    continue
                if phase not in PHASES:
                    bad(f"prereqs: unknown phase {phase}")
                    continue
                if not isinstance(rels, dict) or not rels:
                    bad(f"prereqs.{phase} is not a non-empty object")
                    continue
                for rel, reqs in rels.items():
                    if custom(rel):
                        continue
                    if rel not in RELATIONS:
                        bad(f"prereqs.{phase}: unknown relationship {rel}")
                        continue
                    if not isinstance(reqs, dict):
                        bad(f"prereqs.{phase}.{rel} is not an object")
                        continue
                    for name, rng in reqs.items():
                        if not TERM.match(name):
                            bad(f"prereqs.{phase}.{rel}: {name!r} is not a term")
                        if not (rng == 0 or (isinstance(rng, str) and RANGE.match(rng))):
                            bad(f"prereqs.{phase}.{rel}.{name}: not a version range: {rng!r}")

    if "release_status" in meta and meta["release_status"] not in ("stable", "testing", "unstable"):
        bad(f"release_status is not stable, testing or unstable: {meta['release_status']!r}")

    tags = meta.get("tags")
    if tags is not None and not (isinstance(tags, list) and tags
                                 and all(isinstance(t, str) and TAG.match(t) for t in tags)):
        bad("tags is not a non-empty list of tags (2-255 characters, no slashes)")

    ni = meta.get("no_index")
    if ni is not None:
        if not isinstance(ni, dict):
            bad("no_index is not an object")
        else:
            for k, v in ni.items():
                if custom(k):
                    continue
                if k not in ("file", "directory"):
                    bad(f"no_index: unknown key {k}")
                elif isinstance(v, str):
                    check_path(f"no_index.{k}", v)
                elif isinstance(v, list) and v:
                    for p in v:
                        check_path(f"no_index.{k}", p)
                else:
                    bad(f"no_index.{k} is neither a path nor a list of paths")

    res = meta.get("resources")
    if res is not None:
        if not isinstance(res, dict) or not res:
            bad("resources is not a non-empty object")
        else:
            for k in res:
                if k not in ("homepage", "bugtracker", "repository") and not custom(k):
                    bad(f"resources: unknown key {k}")

    # the one version source
    cv = control_version()
    if cv is None:
        bad("qes_billing.control has no default_version")
    else:
        want = as_semver(cv)
        if meta.get("version") != want:
            bad(f"version {meta.get('version')!r} differs from qes_billing.control's "
                f"default_version {cv!r} (as SemVer: {want!r})")
        ext = (provides or {}).get("qes_billing") if isinstance(provides, dict) else None
        if not isinstance(ext, dict):
            bad("provides.qes_billing missing")
        elif ext.get("version") != want:
            bad(f"provides.qes_billing.version {ext.get('version')!r} differs from "
                f"qes_billing.control's default_version {cv!r} (as SemVer: {want!r})")

    # PGXN's own validator (the pgxn_meta crate's JSON schemas), when
    # test/tools/deps.sh could build it
    validator = pgxn_meta()
    if validator:
        r = subprocess.run([validator, path], capture_output=True, text=True)
        if r.returncode != 0:
            bad("pgxn_meta: " + (r.stdout + r.stderr).strip().replace("\\n", "\n  "))
        by = "checked here and by pgxn_meta"
    else:
        by = "checked here; pgxn_meta, PGXN's validator, not installed"

    for p in problems:
        print(f"META.json: {p}")
    if problems:
        return 1
    print(f"META.json: valid meta-spec 1.0.0 ({by}), version {meta['version']} = qes_billing.control {cv}")
    return 0


def pgxn_meta():
    tools = os.environ.get("QES_TOOLS_DIR") or os.path.expanduser("~/.cache/qes_billing/bin")
    p = os.path.join(tools, "pgxn_meta")
    if os.access(p, os.X_OK):
        return p
    return shutil.which("pgxn_meta")


if __name__ == "__main__":
    sys.exit(main())
