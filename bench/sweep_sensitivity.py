"""Known-answer ablations: can `refinery sweep` see data effects whose right direction is known?

For each effect the bench writes a corpus (a WET file, read by the ingest stage like any crawl)
where one filter is known to help, then runs a real ``refinery sweep`` (the CLI, Prefect, the
cache: the path a user takes) with two arms, the filter on and off, × ``--seeds`` pretraining seeds,
on the default proxy protocol of ``configs/sweep.yaml``. The metric is bits per byte of the proxy
model on held-out English web text (``web_perplexity``: Dolma CCNet documents no arm trains on).

- ``dedup``: English web documents, 40% of them repeated 5-20x (each copy under its own URL);
  arms: every dedup level on vs off. Dedup should lower held-out bits per byte.
- ``langid``: the same English documents plus 1.5x as many characters of non-English sentences
  (20 languages, Lingua test data); arms: langid keeps ``en`` vs keeps every language. The other
  filters that would also drop non-English text (Gopher's English stop-word rule, the quality
  classifier) are relaxed in both arms so the sweep isolates the langid stage.
- ``quality``: English that the default heuristics keep (so both arms hold the same English): those
  Dolma documents plus the English trafilatura evaluation pages (a pool larger than the token budget,
  so the on arm does not repeat epochs), plus 3x as many characters of generated spam and
  boilerplate pages (keyword stuffing, link lists, navigation menus, hashtags); arms: the heuristic
  filters and the quality classifier on vs every rule off and threshold 0.

An effect counts as **detected** when the off arm is worse than the on arm by more than twice the
pooled seed standard deviation (``2 * sqrt((sd_on^2 + sd_off^2) / 2)``); with 4 or more seeds it counts
only when each half of the seeds detects it on its own too (a replication), and never with a failed arm
run (failed arms are listed, not a crash). Printed: a table of arm
means and spreads, each sweep's wall time, the default protocol's minimum detectable effect, a
plot (``--out``/sweep_sensitivity.png), and last ``known_effects_detected <n>``.

    .venv/bin/python bench/sweep_sensitivity.py                 # all three, 3 seeds
    .venv/bin/python bench/sweep_sensitivity.py --effects dedup --seeds 3
    .venv/bin/python bench/sweep_sensitivity.py --report-only     # the table of the sweeps already run

Reads the English and non-English text from ../shared/data (web_text_samples_dolma,
langid_lingua_testdata, trafilatura_eval); exits with a clear message where it is absent. Sweeps are resumable:
rerunning the same command reuses every finished arm.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import io
import json
import random
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"
METRIC = "eval_pretrain:web_perplexity/bits_per_byte"
SECOND_METRIC = "eval_pretrain:perplexity/bits_per_byte"
EFFECTS = ("dedup", "langid", "quality")
NON_ENGLISH = ("de", "fr", "es", "it", "pt", "nl", "pl", "cs", "ru", "uk", "sv", "da", "fi", "hu", "tr", "ro",
               "id", "bg", "hr", "sk")


# ---- corpora ------------------------------------------------------------------------------------
def english_documents() -> list[str]:
    """English web text for training: the Dolma CCNet samples that are not the held-out eval file."""
    docs = []
    for name in ("cc_en_head-0174.jsonl.gz", "provided_documents_000.json.gz"):
        with gzip.open(SHARED / "web_text_samples_dolma" / name, "rt", encoding="utf-8") as fh:
            docs += [json.loads(line)["text"] for line in fh if line.strip()]
    return docs


@functools.cache
def english_web_pages() -> tuple[str, ...]:
    """A larger English pool: the text of the trafilatura evaluation pages (real web pages, extracted with
    the extract stage's own core) that lid.176 calls English and the default heuristics keep. Cached in
    memory; ~1 minute the first time."""
    from curation.extract import ExtractConfig, extract_html
    from curation.langid import identify, load_model

    model, cfg, pages = load_model(), ExtractConfig(), []
    folder = SHARED / "trafilatura_eval"
    with open(folder / "manifest.jsonl", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            html_bytes = gzip.decompress((folder / row["html_gz"]).read_bytes())
            text = extract_html(html_bytes, row["url"], None, cfg).text
            if text and identify(model, text)[0] == "en" and passes_default_heuristics(text):
                pages.append(text)
    return tuple(pages)


def non_english_documents(n_chars: int, rng: random.Random) -> list[str]:
    """Documents of 40 Lingua test sentences each (paragraphs of 4), round-robin over NON_ENGLISH."""
    by_lang: dict[str, list[str]] = {lang: [] for lang in NON_ENGLISH}
    with gzip.open(SHARED / "langid_lingua_testdata" / "lingua_testdata.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row["kind"] == "sentences" and row["lang"] in by_lang:
                by_lang[row["lang"]].append(row["text"].strip())
    for sentences in by_lang.values():
        rng.shuffle(sentences)
    docs, total, i = [], 0, 0
    while total < n_chars:
        lang = NON_ENGLISH[i % len(NON_ENGLISH)]
        start = (i // len(NON_ENGLISH)) * 40
        chunk = by_lang[lang][start:start + 40]
        if len(chunk) < 40:
            break
        doc = "\n".join(" ".join(chunk[j:j + 4]) for j in range(0, 40, 4))
        docs.append(doc)
        total += len(doc)
        i += 1
    return docs


SPAM_WORDS = ("cheap", "best", "online", "buy", "discount", "free", "shipping", "casino", "bonus", "loans",
              "replica", "watches", "pills", "deal", "sale", "outlet", "promo", "code", "crypto", "win",
              "jackpot", "forex", "viral", "followers", "download", "crack", "keygen", "torrent", "hd", "4k")
MENU = ("Home", "About", "Contact", "Login", "Register", "Cart", "FAQ", "Privacy", "Terms", "Sitemap", "Blog")


def spam_documents(n_chars: int, rng: random.Random) -> list[str]:
    """Generated spam/boilerplate pages: keyword stuffing, link farms, menus, hashtags, prices."""
    docs, total = [], 0
    while total < n_chars:
        lines = [" | ".join(rng.sample(MENU, 7))]
        for _ in range(rng.randint(25, 45)):
            kind = rng.random()
            words = rng.choices(SPAM_WORDS, k=rng.randint(4, 10))
            if kind < 0.35:
                lines.append(" ".join(words) + f" {rng.randint(10, 9999)}")
            elif kind < 0.6:
                lines.append(f"http://{rng.choice(SPAM_WORDS)}-{rng.choice(SPAM_WORDS)}{rng.randint(1, 999)}.biz/"
                             + "-".join(words[:4]))
            elif kind < 0.8:
                lines.append(" ".join("#" + w for w in words))
            else:
                lines.append(f"{' '.join(words[:3]).title()} ${rng.randint(1, 999)}.{rng.randint(0, 99):02d} "
                             f"SALE -{rng.randint(10, 90)}% click here")
        lines.append(" | ".join(rng.sample(MENU, 6)) + f" © {rng.randint(2001, 2024)}")
        doc = "\n".join(lines)
        docs.append(doc)
        total += len(doc)
    return docs


@functools.cache
def _default_rules():
    from curation.filters import build_rules
    from curation.heuristics import HeuristicsConfig

    return build_rules({k: v for k, v in HeuristicsConfig().model_dump().items() if isinstance(v, dict)})


def passes_default_heuristics(text: str) -> bool:
    from curation.filters import all_signals, first_failure

    return first_failure(all_signals(text), _default_rules()) is None


# characters of spam per character of English in the quality corpus: at 1.5 the gap (+0.023 bits/byte) was
# detected with seeds 1-3 but not replicated by seeds 4-6 alone (one off-arm seed fell below the on arm)
SPAM_SHARE = 3.0


def build_corpus(effect: str, seed: int = 0) -> list[tuple[str, str]]:
    """(url, text) documents of an effect's corpus, in a seeded order."""
    rng = random.Random(f"{effect}-{seed}")
    english = english_documents()
    docs = [(f"http://en-{i}.example.org/page", text) for i, text in enumerate(english)]
    n_chars = sum(len(t) for t in english)
    if effect == "dedup":
        for i in rng.sample(range(len(english)), round(0.4 * len(english))):
            docs += [(f"http://mirror{k}.example.net/en-{i}", english[i]) for k in range(rng.randint(5, 20))]
    elif effect == "langid":
        docs += [(f"http://xx-{i}.example.com/page", t) for i, t in enumerate(non_english_documents(int(1.5 * n_chars), rng))]
    elif effect == "quality":
        # only English that the default heuristics keep: otherwise the off arm would also gain the English
        # documents they drop (8 of 20 here), and more real text outweighs the spam (measured: off arm better)
        docs = [(url, text) for url, text in docs if passes_default_heuristics(text)]
        docs += [(f"http://web-{i}.example.org/page", text) for i, text in enumerate(english_web_pages())]
        n_chars = sum(len(t) for _, t in docs)
        docs += [(f"http://spam-{i}.example.biz/", t) for i, t in enumerate(spam_documents(int(SPAM_SHARE * n_chars), rng))]
    else:
        raise ValueError(f"unknown effect {effect!r} (choose from {', '.join(EFFECTS)})")
    rng.shuffle(docs)
    return docs


def write_wet(path: Path, docs: list[tuple[str, str]]) -> None:
    """A WET file (conversion records); record ids and dates derive from the content, so equal corpora
    give equal files and the sweep's cache holds across reruns."""
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True)
    for i, (url, text) in enumerate(docs):
        record_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{i}:{url}:{text}")
        record = writer.create_warc_record(
            url, "conversion", payload=io.BytesIO(text.encode("utf-8")), warc_content_type="text/plain",
            warc_headers_dict={"WARC-Record-ID": f"<urn:uuid:{record_id}>", "WARC-Date": "2024-01-01T00:00:00Z"})
        writer.write_record(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_bytes() != buf.getvalue():
        path.write_bytes(buf.getvalue())


# ---- sweeps -------------------------------------------------------------------------------------
def sweep_setup(effect: str) -> tuple[dict, dict]:
    """(base overrides, zipped axes: value 0 = the filter on, value 1 = off) of an effect's sweep."""
    if effect == "dedup":
        return {}, {f"dedup.{level}": [True, False] for level in ("url", "exact", "lines", "fuzzy")}
    if effect == "langid":
        isolate = {"heuristics.gopher_quality.min_stop_words": None, "quality.threshold": 0.0}
        return isolate, {"langid.languages": [["en"], []], "langid.min_score": [0.65, 0.0]}
    from curation.filters import RULE_SPECS
    from flows.registry import load_config

    base = load_config(str(ROOT / "configs" / "sweep.yaml"), {})
    axes = {}
    for spec in RULE_SPECS:  # every heuristic rule that is on, switched off (a bool rule: False, a threshold: null)
        on = getattr(getattr(base.heuristics, spec.filter), spec.name)
        if on not in (None, False):
            axes[f"heuristics.{spec.filter}.{spec.name}"] = [on, False if spec.kind is bool else None]
    axes["quality.threshold"] = [base.quality.threshold, 0.0]
    return {}, axes


def write_sweep_config(out: Path, effect: str) -> Path:
    """The effect's config: configs/sweep.yaml with the corpus as the only input and the base overrides."""
    import yaml

    from infra.config import apply_overrides

    corpus = out / "corpora" / effect / "corpus.warc.gz"
    write_wet(corpus, build_corpus(effect))
    base, _ = sweep_setup(effect)
    config = apply_overrides({"extends": str(ROOT / "configs" / "sweep.yaml"), "run_root": str(out / "runs"),
                              "ingest": {"input_paths": [str(corpus.parent)]}}, base)
    path = out / f"{effect}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_effect_sweep(out: Path, effect: str, seeds: int) -> tuple[dict, float]:
    """Run ``refinery sweep`` on the effect's config; (its sweep.json, wall seconds). A sweep with failed
    arms still has a summary: those arms are reported, not a crash of the bench."""
    config = write_sweep_config(out, effect)
    name = f"sens-{effect}"
    cmd = [str(Path(sys.executable).parent / "refinery"), "sweep", "-c", str(config), "--name", name, "--mode", "zip",
           "--seeds", str(seeds)]
    for key, values in sweep_setup(effect)[1].items():
        cmd += ["-a", f"{key}={json.dumps(values)}"]
    print("$", " ".join(cmd), flush=True)
    summary = out / "runs" / "sweeps" / name / "sweep.json"
    before = summary.stat().st_mtime_ns if summary.is_file() else None
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode:
        if not summary.is_file() or summary.stat().st_mtime_ns == before:
            raise SystemExit(f"{effect}: refinery sweep exited {done.returncode} before writing its summary "
                             "(see its output above); an older summary is not reported as this run's")
        print(f"{effect}: refinery sweep exited {done.returncode} (failed arms are listed below)", flush=True)
    (out / f"{effect}.wall_s").write_text(f"{wall:.0f}\n")
    return finished_sweep(out, effect)


def finished_sweep(out: Path, effect: str) -> tuple[dict, float]:
    """(sweep.json, wall seconds of the run that finished it) of an effect's sweep already run into ``out``."""
    summary = out / "runs" / "sweeps" / f"sens-{effect}" / "sweep.json"
    if not summary.is_file():
        raise SystemExit(f"no finished {effect} sweep in {out} (run without --report-only first)")
    wall = out / f"{effect}.wall_s"
    return json.loads(summary.read_text()), float(wall.read_text()) if wall.is_file() else float("nan")


def arm_values(summary: dict, metric: str) -> tuple[dict[int, float], dict[int, float], list[str]]:
    """Seed → the metric of the on arm (first axis value) and of the off arm (second), and one line per
    arm that did not complete."""
    from flows.sweep import arm_metrics
    from infra.lineage import LineageCatalog

    catalog = LineageCatalog(Path(summary["report"]).parents[2])
    first = summary["arms"][0]["values"]
    on, off, failed = {}, {}, []
    for arm in summary["arms"]:
        side = "on" if arm["values"] == first else "off"
        if arm["status"] != "completed":
            failed.append(f"{side} arm seed {arm['seed']} ({arm['run_id']}) {arm['status']}: {arm['error']}")
            continue
        (on if side == "on" else off)[arm["seed"]] = arm_metrics(catalog, arm["run_id"])[metric]
    return on, off, failed


def detection(on: list[float], off: list[float]) -> dict:
    """The off arm worse (higher bits per byte) than the on arm by more than twice the pooled seed sd."""
    from flows.sweep import pooled_sd

    if len(on) < 2 or len(off) < 2:
        return {"gap": float("nan"), "pooled_sd": float("nan"), "detected": False}
    sd = pooled_sd([on, off])
    gap = statistics.fmean(off) - statistics.fmean(on)
    return {"gap": gap, "pooled_sd": sd, "detected": gap > 2 * sd}


def halves(values: dict[int, float]) -> tuple[list[float], list[float]]:
    """The values of the first and the second half of the seeds."""
    seeds = sorted(values)
    k = len(seeds) // 2
    return [values[s] for s in seeds[:k]], [values[s] for s in seeds[k:]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--effects", default=",".join(EFFECTS), help="comma-separated, from: " + ", ".join(EFFECTS))
    ap.add_argument("--seeds", type=int, default=3, help="pretraining seeds per arm (at least 2)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "sweep_sensitivity",
                    help="corpora, configs, the sweeps' run root and the plot")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: the table, plot and verdicts of the sweeps already finished in --out")
    args = ap.parse_args(argv)
    effects = [e for e in args.effects.split(",") if e]
    if unknown := [e for e in effects if e not in EFFECTS]:
        ap.error(f"unknown effect(s) {unknown}; choose from {', '.join(EFFECTS)}")
    if args.seeds < 2:
        ap.error("--seeds must be at least 2 (the detection rule needs a seed spread)")
    needed = ("web_text_samples_dolma", "langid_lingua_testdata", "trafilatura_eval")
    if missing := [name for name in needed if not (SHARED / name).is_dir()]:
        print(f"needs {', '.join(missing)} in {SHARED} (the text the corpora are built from)")
        return 2
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    from flows.sweep import pooled_sd

    rows, detected, groups = [], 0, []
    for effect in effects:
        summary, wall = finished_sweep(args.out, effect) if args.report_only else \
            run_effect_sweep(args.out, effect, args.seeds)
        row = {"effect": effect, "wall_s": round(wall)}
        for metric in (METRIC, SECOND_METRIC):
            on, off, failed = arm_values(summary, metric)
            r = {"on": list(on.values()), "off": list(off.values()), "failed": failed,
                 **detection(list(on.values()), list(off.values()))}
            if len(on) >= 4 and len(off) >= 4:  # replication: each half of the seeds must detect it on its own
                r["halves"] = [detection(a, b)["detected"] for a, b in zip(halves(on), halves(off))]
            r["counted"] = not failed and r["detected"] and all(r.get("halves", [True]))
            row[metric] = r
            if metric == METRIC:
                groups += [r["on"], r["off"]]
        detected += row[METRIC]["counted"]
        rows.append(row)
        print(f"{effect}: {summary['stage_executions']} in {wall:.0f} s", flush=True)
        for line in row[METRIC]["failed"]:
            print(f"  {line}", flush=True)
    print()
    print("| effect | metric | filter on (mean ± sd) | filter off (mean ± sd) | off − on | 2 × pooled sd | detected "
          "| each half of the seeds | wall (last run) |")
    print("|---|---|---|---|---|---|---|---|---|")
    ms = lambda v: f"{statistics.fmean(v):.4f} ± {statistics.stdev(v):.4f}" if len(v) > 1 else "-"  # noqa: E731
    for row in rows:
        for metric in (METRIC, SECOND_METRIC):
            r = row[metric]
            half = " / ".join("yes" if h else "no" for h in r["halves"]) if "halves" in r else "-"
            failed = f" ({len(r['failed'])} arm runs failed)" if r["failed"] else ""
            print(f"| {row['effect']} | {metric.split(':')[1]} | {ms(r['on'])} | {ms(r['off'])} | {r['gap']:+.4f} | "
                  f"{2 * r['pooled_sd']:.4f} | {'yes' if r['detected'] else 'no'}{failed} | {half} | {row['wall_s']} s |")
    sigma = pooled_sd(groups)
    counts = sorted({len(g) for g in groups})
    print(f"\nseed sd of {METRIC} pooled over every arm: {sigma:.4f} bits/byte "
          f"({'-'.join(map(str, counts[::max(1, len(counts) - 1)]))} seeds per arm)")
    print(f"minimum detectable effect (2 x pooled seed sd): {2 * sigma:.4f} bits/byte")
    (args.out / "results.json").write_text(json.dumps({"seeds": args.seeds, "rows": rows, "pooled_sd": sigma}, indent=1))
    plot(rows, args.out / "sweep_sensitivity.png")
    print(f"plot: {args.out / 'sweep_sensitivity.png'}")
    print(f"mde_bits_per_byte {2 * sigma:.4f}")
    print(f"known_effects_detected {detected}")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3), squeeze=False)
    for ax, row in zip(axes[0], rows):
        r = row[METRIC]
        for x, key in enumerate(("on", "off")):
            ax.scatter([x] * len(r[key]), r[key], color="#889", s=14)
            ax.errorbar([x], [statistics.fmean(r[key])], yerr=[statistics.stdev(r[key])], fmt="o", capsize=5, color="k")
        ax.set_xticks([0, 1], ["filter on", "filter off"])
        ax.set_xlim(-0.5, 1.5)
        ax.set_title(f"{row['effect']}: {'detected' if r['detected'] else 'not detected'}", fontsize=9)
        ax.set_ylabel("held-out web bits/byte")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
