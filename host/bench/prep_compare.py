#!/usr/bin/env python3
"""The Python tools beside `ftx bench prep`: Presidio and scrubadub (PII) and datatrove's
MinHash deduplication, run on the corpus the bench generated and scored against the truth it
planted, with the bench's rules:

* PII: a planted value is found when the tool reports a span of the planted entity type that
  overlaps it (among all it reports); recall = found / planted, precision = found / spans
  reported (overlapping spans merged into one first); decoys (Luhn-failing numbers, bad IBANs, dates, versions, order
  numbers) reported as anything count against precision through the span count.
* dedup: a record the tool removes is flagged; recall = flagged planted duplicates / planted,
  precision = flagged planted duplicates / flagged.

Throughput is detection only for the PII tools (no replacement: generous to them), and the
whole four-step pipeline for datatrove, all on one process, so that it compares with ftx's
one-thread figures; both wall time and CPU time are reported, and the ratios use CPU time (on
a shared machine, wall time measures the neighbours too). Prints one JSON line per tool.

Setup used (documented in README, "prep benchmark"): presidio-analyzer with a blank spaCy
English pipeline (no NER model: the planted entities are all pattern-based, and Presidio's
pattern recognizers — email, phone via `phonenumbers`, IP, credit card, IBAN, US SSN — do not
need one); scrubadub's default detectors; datatrove MinhashConfig(n_grams=5, num_buckets=16,
hashes_per_bucket=8), the same 5-word shingles and 128 hashes in 16 bands as ftx.
"""
import argparse
import json
import logging
import os
import sys
import tempfile
import time

PRESIDIO_TYPES = {"EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "IP_ADDRESS": "IP_ADDRESS",
                  "CREDIT_CARD": "CREDIT_CARD", "IBAN_CODE": "IBAN", "US_SSN": "US_SSN"}
SCRUBADUB_TYPES = {"email": "EMAIL", "phone": "PHONE", "credit_card": "CREDIT_CARD",
                   "social_security_number": "US_SSN", "credential": "SECRET"}


def records(corpus, truth, n):
    """(text as ftx joins it, planted [(type, value)], decoys, duplicate) of the first n records."""
    out = []
    with open(corpus) as c, open(truth) as t:
        for line, tline in zip(c, t):
            r, tr = json.loads(line), json.loads(tline)
            text = "\n".join([r.get("instruction", ""), r.get("input", ""), r.get("output", "")])
            out.append((text, [tuple(p) for p in tr["pii"]], tr["decoys"], tr["duplicate"]))
            if len(out) == n:
                break
    return out


def merge(spans):
    """Overlapping spans merged (the type of the first kept), sorted."""
    spans = sorted(spans)
    merged = []
    for s, e, ty in spans:
        if merged and s < merged[-1][1]:
            ps, pe, pty = merged[-1]
            merged[-1] = (ps, max(pe, e), pty)
        else:
            merged.append((s, e, ty))
    return merged


def score_pii(name, recs, detect, mapping, threshold=None):
    per = {}
    planted = found = flagged = decoys = decoys_hit = 0
    seconds = cpu = 0.0
    for text, pii, dec, _ in recs:
        t, c = time.perf_counter(), time.thread_time()
        spans = detect(text)
        seconds += time.perf_counter() - t
        cpu += time.thread_time() - c
        typed = [(s, e, mapping.get(ty, "other:" + ty)) for s, e, ty, score in spans if threshold is None or score >= threshold]
        spans = merge(typed)
        flagged += len(spans)
        for ty, value in pii:
            q = per.setdefault(ty, {"planted": 0, "found": 0})
            q["planted"] += 1
            planted += 1
            pos = text.find(value)
            if pos >= 0 and any(s < pos + len(value) and pos < e and sty == ty for s, e, sty in typed):
                q["found"] += 1
                found += 1
        for d in dec:
            decoys += 1
            pos = text.find(d)
            decoys_hit += any(s < pos + len(d) and pos < e for s, e, _ in spans)
    for q in per.values():
        q["recall"] = round(q["found"] / max(q["planted"], 1), 4)
    return {"tool": name, "records": len(recs), "records_per_second_one_process": round(len(recs) / max(seconds, 1e-9), 1),
            "records_per_cpu_second": round(len(recs) / max(cpu, 1e-9), 1),
            "recall": round(found / max(planted, 1), 4), "precision": round(found / max(flagged, 1), 4),
            "planted": planted, "found": found, "flagged": flagged, "decoys": decoys, "decoys_flagged": decoys_hit,
            "per_entity": per}


def presidio_pattern_only(blank_model_dir):
    """Presidio's AnalyzerEngine with its pattern recognizers only: a blank spaCy English
    pipeline (no NER model) and the spaCy NER recognizer removed. Also used by pii_compare.py."""
    import spacy
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider
    if not os.path.exists(blank_model_dir):
        spacy.blank("en").to_disk(blank_model_dir)
    nlp = NlpEngineProvider(nlp_configuration={"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": blank_model_dir}]}).create_engine()
    analyzer = AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])
    analyzer.registry.remove_recognizer("SpacyRecognizer")
    return analyzer


def presidio(recs, blank_model_dir):
    analyzer = presidio_pattern_only(blank_model_dir)

    def detect(text):
        return [(r.start, r.end, r.entity_type, r.score) for r in analyzer.analyze(text=text, language="en")]
    cached = []

    def remember(text):
        out = detect(text)
        cached.append(out)
        return out
    default = score_pii("presidio", recs, remember, PRESIDIO_TYPES)
    it = iter(cached)
    strict = score_pii("presidio(score>=0.5)", recs, lambda _t: next(it), PRESIDIO_TYPES, threshold=0.5)
    for k in ("records_per_second_one_process", "records_per_cpu_second"):
        strict[k] = default[k]
    return [default, strict]


def scrubadub_tool(recs):
    import scrubadub
    scrubber = scrubadub.Scrubber()

    def detect(text):
        return [(f.beg, f.end, f.type, 1.0) for f in scrubber.iter_filth(text)]
    return [score_pii("scrubadub", recs, detect, SCRUBADUB_TYPES)]


def cpu_seconds():
    """CPU time of this process and its finished children (datatrove may fork workers)."""
    import resource
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def datatrove_dedup(recs, work):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers.jsonl import JsonlWriter
    src = os.path.join(work, "input")
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "corpus.jsonl"), "w") as f:
        for i, (text, _, _, _) in enumerate(recs):
            f.write(json.dumps({"text": text, "id": str(i)}) + "\n")
    cfg = MinhashConfig(n_grams=5, num_buckets=16, hashes_per_bucket=8, seed=1)
    sigs, buckets, clusters, removed = (os.path.join(work, d) for d in ("sigs", "buckets", "clusters", "removed"))
    logs = os.path.join(work, "logs")
    t, c = time.perf_counter(), cpu_seconds()
    LocalPipelineExecutor([JsonlReader(src), MinhashDedupSignature(output_folder=sigs, config=cfg)], tasks=1, workers=1, logging_dir=logs + "/1").run()
    LocalPipelineExecutor([MinhashDedupBuckets(input_folder=sigs, output_folder=buckets, config=cfg)], tasks=cfg.num_buckets, workers=1, logging_dir=logs + "/2").run()
    LocalPipelineExecutor([MinhashDedupCluster(input_folder=buckets, output_folder=clusters, config=cfg)], tasks=1, workers=1, logging_dir=logs + "/3").run()
    LocalPipelineExecutor([JsonlReader(src), MinhashDedupFilter(input_folder=clusters, exclusion_writer=JsonlWriter(removed, compression=None))], tasks=1, workers=1, logging_dir=logs + "/4").run()
    seconds, cpu = time.perf_counter() - t, cpu_seconds() - c
    gone = set()
    for name in os.listdir(removed):
        with open(os.path.join(removed, name)) as f:
            gone.update(int(json.loads(l)["id"]) for l in f)
    planted = sum(1 for r in recs if r[3])
    hit = sum(1 for i in gone if recs[i][3])
    return [{"tool": "datatrove-minhash", "records": len(recs), "records_per_second_one_process": round(len(recs) / seconds, 1),
             "records_per_cpu_second": round(len(recs) / max(cpu, 1e-9), 1), "recall": round(hit / max(planted, 1), 4), "precision": round(hit / max(len(gone), 1), 4),
             "planted": planted, "flagged": len(gone), "found": hit}]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--truth", required=True)
    ap.add_argument("--pii-records", type=int, default=20000)
    ap.add_argument("--dedup-records", type=int, default=100000)
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    logging.disable(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    work = a.work or tempfile.mkdtemp(prefix="ftx-prep-compare-")
    os.makedirs(work, exist_ok=True)
    recs = records(a.corpus, a.truth, max(a.pii_records, a.dedup_records))
    runs = [("presidio", lambda: presidio(recs[: a.pii_records], os.path.join(work, "spacy-blank-en"))),
            ("scrubadub", lambda: scrubadub_tool(recs[: a.pii_records])),
            ("datatrove", lambda: datatrove_dedup(recs[: a.dedup_records], os.path.join(work, "datatrove")))]
    for name, run in runs:
        try:
            for line in run():
                print(json.dumps(line), flush=True)
        except ImportError as e:
            print(json.dumps({"tool": name, "skipped": f"not installed: {e}"}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
