"""Bench section `score`: scoring a table of short texts with GPT-2 small (random weights), same run.

256 documents (runs of lines of Hamlet, ~40 tokens each) are scored three ways, against one long sequence
(llm_perplexity_tokens of 1,024 tokens, the single-sequence forward): llm_perplexity_texts over the whole array
(the set-based form: every window packed into a few forwards), and one `llm_perplexity(model, text)` per row
(`SELECT ... FROM docs, LATERAL llm_perplexity(...)`). Throughput = scored tokens per second.
"""
from __future__ import annotations

from pg_llm.assets import ROOT
from pg_llm.bench import Context, Table, Timed

DOCS = 256
LINES = 2  # lines of the play per document


def _docs() -> list[str]:
    lines = [ln.strip() for ln in (ROOT / ".pg_llm" / "assets" / "shakespeare" / "hamlet.txt").read_text()
             .splitlines() if len(ln.strip()) > 20]
    return [" ".join(lines[i * LINES:(i + 1) * LINES]) for i in range(DOCS)]


def run(ctx: Context) -> list[Table]:
    from pg_llm.bench.gpt2 import checkpoint
    from pg_llm.loader.model import import_model
    from pg_llm.loader.tokenizer import ensure_gpt2

    conn = ctx.conn
    ensure_gpt2(conn)
    model = f"{ctx.model}_score"
    import_model(conn, checkpoint("gpt2-small"), model, replace=True)
    docs = _docs()
    long = conn.execute("SELECT llm_encode(%s)", (" ".join(docs),)).fetchone()[0][:1024]
    conn.execute("CREATE TEMP TABLE bench_docs (id INT PRIMARY KEY, body TEXT)")
    conn.cursor().executemany("INSERT INTO bench_docs VALUES (%s, %s)", list(enumerate(docs)))
    try:
        scored = int(conn.execute("SELECT sum(tokens_scored) FROM llm_perplexity_texts(%s, ARRAY(SELECT body FROM "
                              "bench_docs ORDER BY id))", (model,)).fetchone()[0])  # also warms the weight cache
        ctx.warmup, warmup = 0, ctx.warmup
        st = ctx.compare({
            "long": Timed(lambda: conn.execute("SELECT * FROM llm_perplexity_tokens(%s, %s)", (model, long))),
            "texts": Timed(lambda: conn.execute("SELECT * FROM llm_perplexity_texts(%s, ARRAY(SELECT body FROM "
                                                "bench_docs ORDER BY id))", (model,)).fetchall()),
            "rows": Timed(lambda: conn.execute("SELECT d.id, p.* FROM bench_docs AS d, LATERAL llm_perplexity(%s, "
                                               "d.body) AS p", (model,)).fetchall()),
        }, runs=2)
        ctx.warmup = warmup
    finally:
        conn.execute("DROP TABLE bench_docs")
        conn.execute("SELECT llm_model_drop(%s, TRUE)", (model,))
    base = (len(long) - 1) / st["long"].median
    t = Table(f"Scoring {DOCS} short texts (GPT-2 small, random weights)",
              ["form", "s", "scored tokens", "tokens/s", "vs one long sequence"])
    t.add("llm_perplexity_tokens, one sequence of 1,024 tokens", st["long"].median, len(long) - 1, base, "1.00")
    for key, label in (("texts", "llm_perplexity_texts(model, ARRAY(SELECT body ...))"),
                       ("rows", "SELECT ... FROM docs, LATERAL llm_perplexity(model, body)")):
        rate = scored / st[key].median
        t.add(label, st[key].median, scored, rate, f"{rate / base:.2f}")
    t.notes.append(f"{DOCS} documents of {LINES} lines of Hamlet ({scored / DOCS:.0f} scored tokens each on average); "
                   "medians of 2 interleaved runs, the weights in the session's weight cache.")
    return [t]
