"""``danet-parity``'s report: one dict (the ``--json`` file), the table people read, JUnit XML for CI.

Framework-free: the report is built from the rows and results that the
per-backend runs (:mod:`parity_tests.session`) produce as plain dicts.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import OrderedDict

__all__ = ["SCHEMA", "totals", "exit_code", "table", "divergence_lines", "summary_lines", "junit_xml", "plain_json"]

SCHEMA = "danet-parity-report/2"
CHECKS = ("outputs", "gradients", "BatchNorm statistics")
SHOWN_FAILURES = 3  # failing rows printed under a group line (all of them with --verbose)
SHOWN_DIVERGENCES = 3  # modules printed per traced run


def plain_json(value):
    """``value`` with every non-finite float as the string ``"inf"``, ``"-inf"`` or ``"nan"`` (strict JSON)."""
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    return value


def _groups(rows) -> "OrderedDict":
    """``{(component, check, dtype, backend): [rows]}``, component-major, in the order they ran."""
    order = {"component": [], "backend": []}
    for r in rows:
        for key in order:
            if r[key] not in order[key]:
                order[key].append(r[key])
    keyed = OrderedDict()
    for r in sorted(rows, key=lambda r: (order["component"].index(r["component"]), CHECKS.index(r["check"]),
                                         r["dtype"] != rows[0]["dtype"], order["backend"].index(r["backend"]))):
        keyed.setdefault((r["component"], r["check"], r["dtype"], r["backend"]), []).append(r)
    return keyed


def totals(report: dict) -> dict:
    rows = report["rows"]
    failed = [r for r in rows if not r["passed"]]
    weights = report.get("weights") or {}
    return {"rows": len(rows), "passed": len(rows) - len(failed), "failed": len(failed),
            "results": len(report["results"]),
            "results_failed": sum(r["status"] == "fail" for r in report["results"]),
            "errors": len(report["errors"]),
            "divergences": sum(len(r["divergences"]) for r in report["results"]),
            "weights_differing": len(weights.get("differing", ())),
            "seconds": report.get("seconds", 0.0)}


def exit_code(report: dict) -> int:
    """2 if anything crashed, else 1 if any row failed or the weight files differ (not allowed), else 0."""
    if report["errors"]:
        return 2
    weights = report.get("weights") or {}
    if any(not r["passed"] for r in report["rows"]) or weights.get("passed") is False:
        return 1
    return 0


def _tol(r) -> str:
    """``atol + rtol |b|`` (element-wise) or ``atol + rtol max|b|`` (relative to the tensor's scale)."""
    scale = "max|b|" if r.get("relative_to") == "tensor" else "|b|"
    return f"{r['atol']:.0e} + {r['rtol']:.0e} {scale}"


def _normwise(group) -> float:
    """The group's normwise error: ``sqrt(sum ||a - b||^2) / sqrt(sum ||b||^2)`` over its tensors."""
    err = sum((r["normwise"] * r.get("norm", 0.0)) ** 2 for r in group if r["normwise"] != float("inf"))
    ref = sum(r.get("norm", 0.0) ** 2 for r in group)
    if any(r["normwise"] == float("inf") for r in group):
        return float("inf")
    return (err / ref) ** 0.5 if ref > 0 else max(r["normwise"] for r in group)


def _fmt(v: float, digits: int = 2) -> str:
    return "inf" if v == float("inf") else f"{v:.{digits}e}"


def table(report: dict, verbose: bool = False) -> list:
    """One line per component, check, dtype and backend (the worst row), then its failing rows."""
    head = (f"{'component':<15} {'check':<21} {'backend':<10} {'dtype':<8} {'n':>4} {'normwise':>9} "
            f"{'headroom':>9}  {'tolerance':<24} {'result':<6} worst")
    lines, previous = [head], None
    for (component, check, dtype, backend), group in _groups(report["rows"]).items():
        if previous is not None and component != previous:
            lines.append("")
        previous = component
        worst = max(group, key=lambda r: r["headroom"])
        failed = sorted((r for r in group if not r["passed"]), key=lambda r: -r["headroom"])
        normwise = _normwise(group)
        lines.append(f"{component:<15} {check:<21} {backend:<10} {dtype:<8} {len(group):>4} {_fmt(normwise):>9} "
                     f"{_fmt(worst['headroom']):>9}  {_tol(worst):<24} {'FAIL' if failed else 'PASS':<6} "
                     f"{worst['output']}" + (f" vs {worst['against']}" if worst["against"] != "torch" else ""))
        others = [r for r in failed if r is not worst]  # the worst is on the group's line
        shown = [r for r in group if r is not worst] if verbose else others[:SHOWN_FAILURES]
        for r in shown:
            lines.append(f"    {'PASS' if r['passed'] else 'FAIL'} {r['output']}: normwise {_fmt(r['normwise'])}, "
                         f"headroom {_fmt(r['headroom'])}, max |diff| {_fmt(r['max_abs'])}")
        if not verbose and len(others) > SHOWN_FAILURES:
            lines.append(f"    ... and {len(others) - SHOWN_FAILURES} more failing (--verbose or --json lists every row)")
    return lines


def _describe(d: dict) -> str:
    module = d["module"] or "(the whole model)"
    call = f" (call {d['call'] + 1})" if d["call"] else ""
    keras_path = d["keras_path"] or "(the whole model)"
    text = (f"{module}{call} [{d['class']}] -> Keras {keras_path}: {d['what']} differs, error {_fmt(d['error'])}, "
            f"headroom {_fmt(d['headroom'])} (atol {d['tolerance']['atol']:g} rtol {d['tolerance']['rtol']:g})")
    if d.get("input_headroom") is not None:
        agree = "agrees" if d["input_headroom"] <= 1 else "already differs"
        text += f"; its input in the whole Keras run {agree} (error {_fmt(d['input_error'])})"
    return text


def divergence_lines(report: dict) -> list:
    """Where the two frameworks part, per component and traced run; identical findings on several backends once."""
    merged = OrderedDict()
    for res in report["results"]:
        runs = OrderedDict()
        for d in res["divergences"]:
            runs.setdefault((d["mode"], d["dtype"]), []).append(d)
        for (mode, dtype), found in runs.items():
            key = (res["component"], mode, dtype, tuple(d["module"] for d in found))
            merged.setdefault(key, (found, []))[1].append(res["backend"])
        for note in res["notes"]:
            merged.setdefault((res["component"], "note", note, ()), ([], []))[1].append(res["backend"])
    if not merged:
        return []
    lines = ["", "Where they part (each module run on torch's input, in Keras; the first is where to look):"]
    for (component, mode, what, _), (found, backends) in merged.items():
        on = ", ".join(backends)
        if mode == "note":
            lines.append(f"  {component} on {on}: {what}")
            continue
        run = f"{what} forward" if mode == "forward" else f"one {what} training step"
        lines.append(f"  {component}, {run}, on {on}:")
        for i, d in enumerate(found[:SHOWN_DIVERGENCES]):
            lines.append(f"    {'first' if i == 0 else 'also '} {_describe(d)}")
        if len(found) > SHOWN_DIVERGENCES:
            lines.append(f"    ... and {len(found) - SHOWN_DIVERGENCES} more in the --json report")
    return lines


def summary_lines(report: dict) -> list:
    t = report["totals"]
    lines = []
    weights = report.get("weights")
    if weights:
        lines.append("")
        lines += weights["lines"]
    for e in report["errors"]:
        where = e["backend"] + (f" / {e['component']}" if e.get("component") else "")
        lines.append(f"ERROR {where}: {e['type']}: {e['message']}".rstrip())
    nonfinite = [r for r in report["rows"] if r.get("nonfinite")]
    if nonfinite:
        first = nonfinite[0]
        lines.append(f"WARNING: {len(nonfinite)} compared tensor(s) hold NaN or inf (first: {first['component']}/"
                     f"{first['output']}, {first['nonfinite']} of {first['size']} elements). Equal NaN masks pass: "
                     f"the frameworks agree, but on numbers that are not sound (weights or input: a negative "
                     f"running_var, an overflow).")
    verdict = {0: "PASS", 1: "FAIL", 2: "ERROR"}[report["exit_code"]]
    lines.append("")
    lines.append(f"{verdict}: {t['passed']} passed, {t['failed']} failed of {t['rows']} compared tensors; "
                 f"{t['errors']} error(s); {t['seconds']:.0f} s (exit {report['exit_code']})")
    return lines


def _case(parent, classname, name, seconds=0.0):
    return ET.SubElement(parent, "testcase", classname=classname, name=name, time=f"{seconds:.3f}")


def junit_xml(report: dict) -> str:
    """JUnit XML: a testsuite per backend, a testcase per component, check and dtype; crashes as errors."""
    root = ET.Element("testsuites", name="danet-parity")
    weights = report.get("weights")
    if weights:
        suite = ET.SubElement(root, "testsuite", name="danet-parity.weights")
        case = _case(suite, "danet_parity.weights", "the two weight files hold the same tensors")
        if weights["passed"] is False:
            ET.SubElement(case, "failure", message=weights["lines"][0]).text = "\n".join(weights["lines"])
    groups = _groups(report["rows"])
    results = {(r["component"], r["backend"]): r for r in report["results"]}
    for backend in report["backends"]:
        suite = ET.SubElement(root, "testsuite", name=f"danet-parity.{backend['name']}",
                              time=f"{backend.get('seconds', 0.0):.3f}")
        for (component, check, dtype, b), group in groups.items():
            if b != backend["name"]:
                continue
            res = results.get((component, b), {"divergences": [], "seconds": 0.0})
            in_component = sum(k[0] == component and k[3] == b for k in groups)
            case = _case(suite, f"danet_parity.{b}.{component}", f"{check} {dtype}", res["seconds"] / in_component)
            failed = sorted((r for r in group if not r["passed"]), key=lambda r: -r["headroom"])
            if failed:
                related = [d for d in res["divergences"] if check != "outputs" or
                           (d["mode"] == "forward" and d["dtype"] == dtype)]
                text = [f"FAIL {r['output']}: normwise {_fmt(r['normwise'])}, headroom {_fmt(r['headroom'])}, "
                        f"{_tol(r)}" for r in failed]
                text += [f"divergence ({d['mode']} {d['dtype']}): {_describe(d)}" for d in related]
                ET.SubElement(case, "failure", message=f"{len(failed)} of {len(group)} {check} differ; worst "
                              f"{failed[0]['output']} headroom {_fmt(failed[0]['headroom'])}").text = "\n".join(text)
        for e in report["errors"]:
            if e["backend"] == backend["name"]:
                case = _case(suite, f"danet_parity.{e['backend']}.{e.get('component') or 'run'}", "run")
                ET.SubElement(case, "error", message=f"{e['type']}: {e['message']}"[:500],
                              type=e["type"]).text = e.get("traceback", "")
        cases = suite.findall("testcase")
        suite.set("tests", str(len(cases)))
        suite.set("failures", str(sum(c.find("failure") is not None for c in cases)))
        suite.set("errors", str(sum(c.find("error") is not None for c in cases)))
    for suite in root.findall("testsuite"):
        suite.set("tests", str(len(suite.findall("testcase"))))
        suite.set("failures", suite.get("failures") or str(sum(c.find("failure") is not None
                                                                for c in suite.findall("testcase"))))
        suite.set("errors", suite.get("errors") or "0")
    for key in ("tests", "failures", "errors"):
        root.set(key, str(sum(int(s.get(key)) for s in root.findall("testsuite"))))
    root.set("time", f"{report.get('seconds', 0.0):.3f}")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
