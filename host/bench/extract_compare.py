#!/usr/bin/env python3
"""Main-text extraction, ftx beside Trafilatura, on the saved pages of host/bench/extract_pages
(written by make_pages.py there: news, blog, docs, forum, Q&A, shop, wiki, legacy table
layouts, each wrapped in navigation, cookie banners, sidebars, comments and footers; the
pages named holdout_* were written after ftx's boilerplate rules were chosen, and are scored
apart as its out-of-sample check).

Each page is read by `ftx prep` (a real run with no middle stages, so the record holds the
extracted text as training would get it) and by `trafilatura.extract` (plain text, tables
kept, comments left out, as the gold leaves them out), and each output is scored against the
page's hand-chosen gold main text (NAME.gold.txt) by word-level precision, recall and F1: the
words are the lower-cased runs of letters and digits, counted as a bag (a word the gold has
twice must be found twice). "agreement" is the same F1 between ftx's and Trafilatura's
outputs.

Trafilatura is not a test dependency: install it in a venv of its own,
    python3 -m venv /tmp/extractvenv && /tmp/extractvenv/bin/pip install trafilatura lxml_html_clean
then
    /tmp/extractvenv/bin/python host/bench/extract_compare.py --ftx target/release/ftx [--json OUT.json]
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PAGES = os.path.join(HERE, "extract_pages")


def words(text):
    return collections.Counter(re.findall(r"[^\W_]+", text.lower()))


def prf(pred, gold):
    p, g = words(pred), words(gold)
    overlap = sum((p & g).values())
    precision = overlap / max(1, sum(p.values()))
    recall = overlap / max(1, sum(g.values()))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def ftx_extract(ftx, page):
    """The text `ftx prep` writes for one page (empty when it rejects the page)."""
    with tempfile.TemporaryDirectory() as d:
        cfg = os.path.join(d, "prep.toml")
        with open(cfg, "w") as f:
            f.write(f'[prep]\ninputs = ["{page}"]\nout = "out"\nstages = []\n[prep.split]\ntrain = 1.0\nvalidation = 0.0\ntest = 0.0\n')
        subprocess.run([ftx, "prep", "--config", cfg, "--quiet"], check=True, capture_output=True)
        with open(os.path.join(d, "out", "train.jsonl")) as f:
            rows = [json.loads(l) for l in f if l.strip()]
        return rows[0]["text"] if rows else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ftx", default="target/release/ftx")
    ap.add_argument("--pages", default=PAGES)
    ap.add_argument("--json", help="write the per-page scores here")
    a = ap.parse_args()
    import trafilatura

    names = sorted(n[:-5] for n in os.listdir(a.pages) if n.endswith(".html"))
    rows = []
    for n in names:
        path = os.path.join(a.pages, n + ".html")
        html = open(path, encoding="utf-8").read()
        gold = open(os.path.join(a.pages, n + ".gold.txt"), encoding="utf-8").read()
        ours = ftx_extract(a.ftx, path)
        theirs = trafilatura.extract(html, include_comments=False, include_tables=True, output_format="txt") or ""
        rows.append({"page": n, "ftx": prf(ours, gold), "trafilatura": prf(theirs, gold), "agreement": prf(ours, theirs)[2],
                     "gold_words": sum(words(gold).values())})
    print(f"| page | gold words | ftx P | ftx R | ftx F1 | Trafilatura P | Trafilatura R | Trafilatura F1 | agreement F1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f, t = r["ftx"], r["trafilatura"]
        print(f"| {r['page']} | {r['gold_words']} | {f[0]:.3f} | {f[1]:.3f} | {f[2]:.3f} | {t[0]:.3f} | {t[1]:.3f} | {t[2]:.3f} | {r['agreement']:.3f} |")
    # Pages named holdout_* were written after ftx's boilerplate rules were chosen: their mean
    # is ftx's out-of-sample figure; the others were looked at while choosing them.
    groups = [("pages the rules were chosen on", [r for r in rows if not r["page"].startswith("holdout_")]),
              ("the holdout pages", [r for r in rows if r["page"].startswith("holdout_")]),
              ("all pages", rows)]
    for label, rs in groups:
        if not rs:
            continue
        mean = lambda key, i: sum(r[key][i] for r in rs) / len(rs)
        print(f"| **mean, {label} ({len(rs)})** | | {mean('ftx', 0):.3f} | {mean('ftx', 1):.3f} | **{mean('ftx', 2):.3f}** | "
              f"{mean('trafilatura', 0):.3f} | {mean('trafilatura', 1):.3f} | **{mean('trafilatura', 2):.3f}** | "
              f"{sum(r['agreement'] for r in rs) / len(rs):.3f} |")
    print(f"\ntrafilatura {trafilatura.__version__}; ftx: {a.ftx}", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
