#!/usr/bin/env python3
"""Presidio and scrubadub on the labelled PII benchmark of `ftx prep --pii-bench DIR`, scored by
the rules ftx uses (host/src/data/prep/pii_bench.rs), printed beside ftx's scores as one
Markdown table per entity type:

* a planted span is found when the tool reports a span of the same entity type overlapping it;
  recall = found / planted;
* a reported span is right when it overlaps a planted span of its type; precision = right /
  reported (identical (start, end, type) reports counted once).

Presidio runs its pattern recognizers only (a blank spaCy English pipeline: no NER model can be
installed here), at its default threshold; its DATE_TIME is scored as DATE_OF_BIRTH, its
LOCATION as ADDRESS, and its country ids (UK NINO, ES NIF/NIE, …) as NATIONAL_ID. scrubadub
runs its default detectors; its postcode findings are scored as ADDRESS (they overlap the
addresses that hold them). A type a tool does not report shows as "—".

    python pii_compare.py --dir DIR [--records N]
"""
import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PRESIDIO = {"EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "IP_ADDRESS": "IP_ADDRESS", "CREDIT_CARD": "CREDIT_CARD",
            "IBAN_CODE": "IBAN", "US_SSN": "US_SSN", "PERSON": "PERSON", "LOCATION": "ADDRESS", "DATE_TIME": "DATE_OF_BIRTH",
            "US_PASSPORT": "PASSPORT", "UK_NINO": "NATIONAL_ID", "ES_NIF": "NATIONAL_ID", "ES_NIE": "NATIONAL_ID",
            "MAC_ADDRESS": "MAC_ADDRESS"}
SCRUBADUB = {"email": "EMAIL", "phone": "PHONE", "credit_card": "CREDIT_CARD", "social_security_number": "US_SSN",
             "national_insurance_number": "NATIONAL_ID", "name": "PERSON", "address": "ADDRESS", "postalcode": "ADDRESS",
             "date_of_birth": "DATE_OF_BIRTH"}


def score(records, detect, mapping):
    per = {}
    for r in records:
        text = r["text"]
        found = {(s, e, mapping.get(t, "other:" + t)) for s, e, t in detect(text)}
        for sp in r["spans"]:
            q = per.setdefault(sp["entity"], {"planted": 0, "found": 0, "flagged": 0, "flagged_right": 0})
            q["planted"] += 1
            q["found"] += any(t == sp["entity"] and s < sp["end"] and sp["start"] < e for s, e, t in found)
        for s, e, t in found:
            q = per.setdefault(t, {"planted": 0, "found": 0, "flagged": 0, "flagged_right": 0})
            q["flagged"] += 1
            q["flagged_right"] += any(t == sp["entity"] and s < sp["end"] and sp["start"] < e for sp in r["spans"])
    for q in per.values():
        q["recall"] = q["found"] / q["planted"] if q["planted"] else None
        q["precision"] = q["flagged_right"] / q["flagged"] if q["flagged"] else None
    return per


def presidio(records, work):
    from prep_compare import presidio_pattern_only
    analyzer = presidio_pattern_only(os.path.join(work, "spacy-blank-en"))
    return score(records, lambda t: [(x.start, x.end, x.entity_type) for x in analyzer.analyze(text=t, language="en")], PRESIDIO)


def scrubadub_tool(records):
    import scrubadub
    scrubber = scrubadub.Scrubber()
    return score(records, lambda t: [(f.beg, f.end, f.type) for f in scrubber.iter_filth(t)], SCRUBADUB)


def cell(q, key):
    return "—" if q is None or q.get(key) is None else f"{q[key]:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", required=True, help="the folder `ftx prep --pii-bench` wrote")
    ap.add_argument("--records", type=int, default=None, help="score only the first N records")
    a = ap.parse_args()
    logging.disable(logging.WARNING)
    with open(os.path.join(a.dir, "pii_bench.jsonl")) as f:
        records = [json.loads(l) for l in f][: a.records]
    with open(os.path.join(a.dir, "ftx_scores.json")) as f:
        tools = {"ftx": json.load(f)}
    for name, run in [("Presidio (patterns)", lambda: presidio(records, a.dir)), ("scrubadub", lambda: scrubadub_tool(records))]:
        try:
            tools[name] = run()
        except ImportError as e:
            print(f"{name}: skipped, not installed ({e})", file=sys.stderr)
    with open(os.path.join(a.dir, "compare_scores.json"), "w") as f:
        json.dump(tools, f, indent=1)
    planted = sorted({sp["entity"] for r in records for sp in r["spans"]})
    print(f"{len(records)} records; recall / precision per entity type")
    print("| entity | planted | " + " | ".join(tools) + " |")
    print("|---|---|" + "---|" * len(tools))
    for e in planted:
        n = tools["ftx"].get(e, {}).get("planted", "")
        print(f"| {e} | {n} | " + " | ".join(f"{cell(t.get(e), 'recall')} / {cell(t.get(e), 'precision')}" for t in tools.values()) + " |")
    for name, t in tools.items():
        extra = {k: v["flagged"] for k, v in t.items() if k not in planted and v["flagged"]}
        if extra:
            print(f"{name}: findings of types not planted (all false): {extra}")


if __name__ == "__main__":
    sys.exit(main())
