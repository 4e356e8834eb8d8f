"""Look into a shard folder: one example, folder statistics, integrity.

    python -m tools.shards inspect DIR [--row N] [--tokenizer PATH] [--positions A:B] [--top N]
    python -m tools.shards stats DIR [--json]
    python -m tools.shards verify DIR
    python -m tools.shards export DIR --format parquet --out OUT   (tools/shards_exchange.py)
    python -m tools.shards import PARQUET --tokenizer DIR --out DIR [--k K] [--skip-invalid]

`inspect` prints one row: its fields, the conversation turn by turn (each message's role and
text when the row records turns, else the prompt and the response) with the trained span
tokens between ⟦ ⟧ (decoded with --tokenizer, else with the teacher's tokenizer when the
folder's committed precompute config or the manifest's `teacher` names a local model folder,
else as ids), and, span by span, per trained token its position in the response, the token,
the teacher's logprob of it, the teacher's top-N with probabilities, most probable first, and
the tail mass. Context tokens (outside the spans) have no teacher signal.

`stats` streams the folder block by block (never loading it whole) and prints rows, turns
(messages recorded), token counts, sizes, the metadata, the generated responses cut at the
length limit (meta.finish_reason "length": a silent quality loss otherwise), and what the
teacher signal covers: top-k probability mass (1 - tail), entropy of the top-k + tail
buckets, and the share of trained tokens inside their top-k. Token counts: trained = tokens
in the trained spans (those with a teacher signal, what the manifest counts); context = the
conversation's other tokens (prompt_ids + response_ids outside the spans, the prompt
included); response = response_ids (the spans and the context between them).

`verify` checks the manifests (commit sequence numbers and running totals of each writer, no
file listed twice), every data file against them (length, sha256, the checksum of every
record batch, Arrow schema and metadata, record batch row counts), decodes every record
batch, compares token counts, checks the other committed files (rejects, configs) and that no
(id, sample_index) occurs twice. A file no manifest lists is an error when a later file of its
writer is committed (its entry was dropped), else a warning (debris of an interrupted write).
Exit status 1 if anything is bad; a healthy folder prints one "ok" line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import yaml

from shards.codec import TAIL_STEPS_PER_NAT
from shards.errors import ShardError
from shards.fingerprint import tokenizer_fingerprint
from shards.manifest import check_listing, load_manifest, read_extra
from shards.reader import ShardFolder
from shards.spans import gather_index
from shards.storage import as_folder, open_storage
from tools.shards_exchange import add_commands


def _describe(e: ShardError) -> str:
    """A ShardError's message with its row and field, without the (already named) path."""
    where = []
    if e.row is not None:
        where.append(f"row {e.row}")
    if e.field is not None:
        where.append(f"field {e.field!r}")
    return (", ".join(where) + ": " if where else "") + e.message


def _folder(path: str | Path, verify: str = "size"):
    return ShardFolder(path, verify=verify)


def _blocks(folder):
    """(file index, block index) of every record batch, in manifest order."""
    for fi, entry in enumerate(folder.manifest.files):
        for bi in range(len(entry.batch_rows)):
            yield fi, bi


# ---- tokenizer ---------------------------------------------------------------------------------


def committed_teacher(folder) -> str | None:
    """The teacher path of the folder's newest committed precompute config, if any.

    The metadata keeps only the teacher's folder name (paths differ between machines); the
    precompute_config-w<I>-<n>.yaml extras record the path the run resolved."""
    configs = [e for e in folder.manifest.extras if e.kind == "precompute_config"]
    for entry in reversed(configs):
        try:
            teacher = yaml.safe_load(folder.store.read(entry.name)).get("teacher")
        except (OSError, yaml.YAMLError, AttributeError):
            continue  # unreadable: the tokenizer falls back to the next candidate
        if teacher:
            return str(teacher)
    return None


def load_tokenizer(
    path: str | Path | None, metadata, *, quiet: bool = False, teacher: str | None = None
):
    """The tokenizer at `path`, else at the first of `teacher` (committed_teacher) and
    metadata.teacher that is a local folder, else None (ids are printed, with a note saying
    how to pass --tokenizer).

    Warns (on stderr) when its fingerprint differs from the folder's.
    """
    candidates = [path] if path is not None else []
    if path is None:
        local = [t for t in (teacher, metadata.teacher) if t and Path(t).is_dir()]
        candidates += local[:1]
        if not local and not quiet:
            print(
                f"note: the teacher {teacher or metadata.teacher!r} is not a local folder here; "
                "printing token ids (pass --tokenizer DIR to decode them)",
                file=sys.stderr,
            )
    for cand in candidates:
        try:
            # transformers takes seconds to import: only decoding text needs it, not --help,
            # stats or verify
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(cand))
        except Exception as e:  # any loading failure: fall back to ids
            if path is not None:
                raise SystemExit(f"cannot load tokenizer {cand}: {e}") from e
            if not quiet:
                print(f"note: cannot load tokenizer {cand}: {e}; printing ids", file=sys.stderr)
            return None
        if tokenizer_fingerprint(tok) != metadata.tokenizer_fingerprint and not quiet:
            print(
                f"warning: tokenizer {cand} has another fingerprint than the shards "
                f"({metadata.tokenizer_fingerprint}): the text may be wrong",
                file=sys.stderr,
            )
        return tok
    return None


def _token_str(tok, token_id: int, width: int = 14) -> str:
    """One token, printable on one line: decoded text with escapes and spaces shown as "␣",
    else the id."""
    if tok is None:
        return str(int(token_id))
    text = tok.decode([int(token_id)])
    s = json.dumps(text, ensure_ascii=False)[1:-1]  # escapes newlines, tabs, quotes
    s = s.replace(" ", "␣") or "''"
    if len(s) > width:
        s = s[: width - 1] + "…"
    return s


def _prob(p: float) -> str:
    if p >= 0.9995:
        return "1.000"
    if p >= 0.001:
        return f"{p:.3f}"
    return f"{p:.0e}"


def _parse_positions(spec: str | None, n: int) -> range:
    if spec is None:
        return range(n)
    m = re.fullmatch(r"\s*(-?\d*)\s*:\s*(-?\d*)\s*", spec)
    if not m:
        raise SystemExit(f"--positions {spec!r}: expected A:B (either may be empty)")
    a = int(m.group(1)) if m.group(1) else None
    b = int(m.group(2)) if m.group(2) else None
    return range(n)[slice(a, b)]


# ---- inspect -----------------------------------------------------------------------------------


def find_row(folder, row: int) -> dict:
    """Global row `row` (manifest order) decoded; reads only the block that holds it."""
    total = folder.manifest.rows
    if not -total <= row < total:
        raise SystemExit(f"--row {row}: the folder has {total} rows")
    row %= total
    for fi, entry in enumerate(folder.manifest.files):
        for bi, n in enumerate(entry.batch_rows):
            if row < n:
                return folder.read_block(fi, bi).row(row)
            row -= n
    raise AssertionError("unreachable")


TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"  # around trained span tokens in the conversation text


def _segments(r: dict) -> list[tuple[str, int, int]]:
    """(title, start, end) of each piece of the conversation to print, in conversation
    coordinates: one per message when turns are recorded, else the prompt and the response."""
    p, total = len(r["prompt_ids"]), len(r["prompt_ids"]) + len(r["response_ids"])
    starts = np.asarray(r["turn_starts"]).tolist()
    if not starts:
        return [("prompt (student)", 0, p), ("response", p, total)]
    out = [("before the first turn", 0, starts[0])] if starts[0] > 0 else []
    ends = starts[1:] + [total]
    for i, (role, a, b) in enumerate(zip(r["turn_roles"], starts, ends, strict=True)):
        out.append((f"turn {i}: {role}", a, b))
    return out


def _spans(r: dict) -> list[tuple[int, int]]:
    """(start, end) of each trained span, conversation coordinates."""
    starts = np.asarray(r["span_starts"]).tolist()
    return [(s, s + n) for s, n in zip(starts, np.asarray(r["span_lengths"]).tolist(), strict=True)]


def render_row(r: dict, metadata, tok, *, positions: str | None, top: int) -> str:
    lines = []
    meta = r["meta"]
    lines.append(f"id            {r['id']}")
    lines.append(f"sample_index  {r['sample_index']}")
    lines.append(f"source        {r['source']}")
    lines.append(f"thinking      {r['thinking']}")
    if meta is not None:
        try:
            meta = json.dumps(json.loads(meta), ensure_ascii=False)
        except ValueError:
            pass
    lines.append(f"meta          {meta}")
    prompt = np.asarray(r["prompt_ids"]).tolist()
    tprompt = np.asarray(r["teacher_prompt_ids"]).tolist()
    resp = np.asarray(r["response_ids"]).tolist()
    conv = prompt + resp
    spans = _spans(r)
    trained = sum(b - a for a, b in spans)
    lines.append(
        f"tokens        prompt {len(prompt)}, teacher prompt {len(tprompt)}, response {len(resp)}"
        f"; trained {trained} in {len(spans)} span(s), context {len(conv) - trained}"
        f"; turns {len(r['turn_roles'])}; k={metadata.k}"
    )

    def text(ids: list[int]) -> str:
        return tok.decode(ids) if tok is not None else " ".join(map(str, ids))

    def marked(a: int, b: int) -> str:
        """conv[a:b] as text, trained span tokens between the markers."""
        cuts = sorted({a, b} | {x for s in spans for x in s if a < x < b})
        pieces = []
        for x, y in zip(cuts, cuts[1:], strict=False):
            piece = text(conv[x:y])
            inside = any(s <= x and y <= e for s, e in spans)
            pieces.append(f"{TRAINED_OPEN}{piece}{TRAINED_CLOSE}" if inside else piece)
        return ("" if tok is not None else " ").join(pieces)

    lines.append("")
    lines.append(
        f"conversation, student view: trained span tokens {TRAINED_OPEN}...{TRAINED_CLOSE}"
    )
    for title, a, b in _segments(r):
        inside = [f"{max(s, a)}-{min(e, b)}" for s, e in spans if s < b and a < e]
        where = f"tokens {a}-{b}" + (f", trained {', '.join(inside)}" if inside else "")
        lines.append("")
        lines.append(f"--- {title} ({where}) ---")
        lines.append(marked(a, b))
    if tprompt != prompt:
        lines.append("")
        lines.append("--- teacher prompt (before its first trained span) ---")
        lines.append(text(tprompt))
    lines.append("")

    ids = np.asarray(r["topk_ids"])
    lps = np.asarray(r["topk_logprobs"], dtype=np.float64)
    tail = np.exp(np.asarray(r["tail_logprob"], dtype=np.float64))
    tok_lp = np.asarray(r["token_logprob"], dtype=np.float64)
    top = max(1, min(top, metadata.k))
    pos = set(_parse_positions(positions, len(resp)))
    # Fixed columns first (the tail too), then the top-N as "token p" cells of equal width.
    # pos is the position in response_ids; only trained tokens have a teacher signal.
    tokw = 10 if tok is not None else len(str(metadata.vocab_size - 1))
    cells = "  ".join(f"{'#' + str(i + 1):<{tokw}} {'p':>5}" for i in range(top))
    header = f"{'pos':>5}  {'token':<14}  {'logprob':>8}  {'rank':>4}  {'tail':>5}  {cells}"
    lines.append(header)
    lines.append("-" * len(header))
    n, shown = 0, 0  # n: index of the trained token (row of the top-k)
    for j, (a, b) in enumerate(spans):
        lines.append(f"span {j}: response positions {a - len(prompt)}-{b - len(prompt)}")
        for c in range(a, b):
            t = c - len(prompt)
            if t in pos:
                shown += 1
                order = np.argsort(-lps[n], kind="stable")
                in_topk = bool((ids[n] == resp[t]).any())
                hit = np.flatnonzero(ids[n, order] == resp[t])
                rank = str(int(hit[0]) + 1) if in_topk else "-"
                entries = "  ".join(
                    f"{_token_str(tok, ids[n, i], tokw):<{tokw}} "
                    f"{_prob(float(np.exp(lps[n, i]))):>5}"
                    for i in order[:top]
                )
                lines.append(
                    f"{t:>5}  {_token_str(tok, resp[t]):<14}  {tok_lp[n]:>8.3f}  {rank:>4}  "
                    f"{_prob(float(tail[n])):>5}  {entries}"
                )
            n += 1
    if shown == 0:
        lines.append("(no trained positions selected)")
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    folder = _folder(args.dir)
    tok = load_tokenizer(args.tokenizer, folder.metadata, teacher=committed_teacher(folder))
    r = find_row(folder, args.row)
    print(render_row(r, folder.metadata, tok, positions=args.positions, top=args.top))
    return 0


# ---- stats -------------------------------------------------------------------------------------


def compute_stats(path: str | Path) -> dict:
    """Folder statistics, streaming one record batch at a time.

    Token counts: trained = span tokens (the teacher signal's); context = conversation tokens
    (prompt_ids + response_ids) outside the spans, the prompt included; response = all of
    response_ids. Per trained token, with B = the top-k and a tail bucket, renormalized as the
    losses do:
    covered mass = 1 - exp(tail_logprob); entropy = -sum_B p log p (nats). The 5th percentile
    of the covered mass is exact: the tail is stored in 1/1024-nat steps, so a histogram of
    those steps holds the whole distribution (inverted-CDF percentile, numpy's
    method="inverted_cdf").
    """
    folder = _folder(path)
    meta = folder.metadata
    rows = resp_tok = prompt_tok = tprompt_tok = in_topk = finished = cut = 0
    trained_tok = turns = spans = 0
    cover_sum = entropy_sum = 0.0
    hist = np.zeros(1 << 16, dtype=np.int64)
    for fi, bi in _blocks(folder):
        block = folder.read_block(fi, bi)
        t = block.tensors
        rows += len(block)
        for reason in map(_finish_reason, block.rows["meta"]):
            finished += reason is not None
            cut += reason == "length"
        prompt_tok += int(block.offsets["prompt_ids"][-1])
        tprompt_tok += int(block.offsets["teacher_prompt_ids"][-1])
        resp_tok += len(t["response_ids"])
        turns += len(t["turn_starts"])
        spans += len(t["span_starts"])
        n = len(t["topk_ids"])
        if n == 0:
            continue
        trained_tok += n
        tail = t["tail_logprob"].numpy().astype(np.float64)
        lps = t["topk_logprobs"].numpy().astype(np.float64)
        ids = t["topk_ids"].numpy()
        off = block.offsets
        row_of_span = np.repeat(np.arange(len(block)), np.diff(off["spans"]))
        base = off["response"][:-1] - np.diff(off["prompt_ids"])
        idx = gather_index(row_of_span, base, t["span_starts"].numpy(), t["span_lengths"].numpy())
        own = t["response_ids"].numpy()[idx]  # the trained tokens, as trained_ids gathers them
        in_topk += int((ids == own[:, None]).any(axis=1).sum())
        cover_sum += float(-np.expm1(tail).sum())
        steps = np.rint(-tail * TAIL_STEPS_PER_NAT).astype(np.int64)
        hist += np.bincount(np.clip(steps, 0, len(hist) - 1), minlength=len(hist))
        buckets = np.concatenate([lps, tail[:, None]], axis=1)
        buckets -= np.logaddexp.reduce(buckets, axis=1, keepdims=True)
        entropy_sum += float(-(np.exp(buckets) * buckets).sum())
    files = folder.manifest.files
    disk = sum(folder.store.size(e.name) for e in files)
    p5 = None
    if trained_tok:
        # Covered mass rises with the step (a larger step is a smaller tail): the 5th
        # percentile of the coverage is the smallest step whose cumulative count reaches 5%.
        step = int(np.searchsorted(np.cumsum(hist), 0.05 * trained_tok, side="left"))
        # The tail as the decoder computes it (float32), then the coverage in float64.
        tail = float(np.float32(step) * np.float32(-1.0 / TAIL_STEPS_PER_NAT))
        p5 = float(-np.expm1(tail))
    return {
        "folder": str(folder.path),
        "rows": rows,
        "turns": turns,
        "spans": spans,
        "trained_tokens": trained_tok,
        "context_tokens": prompt_tok + resp_tok - trained_tok,
        "response_tokens": resp_tok,
        "prompt_tokens": prompt_tok,
        "teacher_prompt_tokens": tprompt_tok,
        "files": len(files),
        "bytes_on_disk": disk,
        "manifest_bytes": sum(folder.store.size(n) for n in folder.manifest.sources),
        "bytes_per_response_token": disk / resp_tok if resp_tok else None,
        "bytes_per_trained_token": disk / trained_tok if trained_tok else None,
        "k": meta.k,
        "vocab_size": meta.vocab_size,
        "teacher": meta.teacher,
        "teacher_fingerprint": meta.teacher_fingerprint,
        "tokenizer_fingerprint": meta.tokenizer_fingerprint,
        "logprobs_mode": meta.logprobs_mode,
        "schema_version": meta.schema_version,
        "created_at": meta.created_at,
        # Per trained token (v1 folders: per response token, the same thing).
        "topk_mass_mean": cover_sum / trained_tok if trained_tok else None,
        "topk_mass_p5": p5,
        "entropy_mean_nats": entropy_sum / trained_tok if trained_tok else None,
        "response_in_topk": in_topk / trained_tok if trained_tok else None,
        # Rows with a finish reason (generated responses) and those cut at the limit.
        "generated_rows": finished,
        "cut_rows": cut,
        "max_tokens": meta.sampling.get("max_tokens"),
    }


def _finish_reason(meta: str | None) -> str | None:
    """A row's meta.finish_reason ("stop", "length"), None when it has none (scored rows)."""
    if not meta or '"finish_reason"' not in meta:  # skips the JSON parse of most rows
        return None
    value = json.loads(meta)
    return value.get("finish_reason") if isinstance(value, dict) else None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def render_stats(s: dict) -> str:
    def num(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    rows = [
        ("folder", s["folder"]),
        ("rows", f"{s['rows']:,}"),
        ("turns", f"{s['turns']:,} (messages recorded; 0 for rows that record none)"),
        ("trained tokens", f"{s['trained_tokens']:,} in {s['spans']:,} spans (with top-k)"),
        ("context tokens", f"{s['context_tokens']:,} (outside the spans, prompts included)"),
        ("response tokens", f"{s['response_tokens']:,}"),
        ("prompt tokens", f"{s['prompt_tokens']:,} (teacher view {s['teacher_prompt_tokens']:,})"),
        ("files", f"{s['files']}"),
        ("bytes on disk", f"{s['bytes_on_disk']:,} ({_human_bytes(s['bytes_on_disk'])})"),
        ("bytes / response token", num(s["bytes_per_response_token"], ".1f")),
        ("bytes / trained token", num(s["bytes_per_trained_token"], ".1f")),
        ("k", f"{s['k']} (vocab {s['vocab_size']:,})"),
        ("teacher", s["teacher"]),
        ("teacher fingerprint", s["teacher_fingerprint"]),
        ("tokenizer fingerprint", s["tokenizer_fingerprint"]),
        ("schema version", f"{s['schema_version']} ({s['logprobs_mode']})"),
        ("created at", s["created_at"]),
        (
            "top-k mass (1 - tail)",
            f"mean {num(s['topk_mass_mean'], '.4f')}, p5 {num(s['topk_mass_p5'], '.4f')}",
        ),
        ("entropy, top-k + tail", f"{num(s['entropy_mean_nats'], '.3f')} nats (mean)"),
        ("trained token in top-k", num(s["response_in_topk"], ".2%")),
        ("cut at max_tokens", _cut_text(s)),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _cut_text(s: dict) -> str:
    if not s["generated_rows"]:
        return "n/a (no generated rows)"
    limit = f" (max_tokens={s['max_tokens']})" if s["max_tokens"] else ""
    share = s["cut_rows"] / s["generated_rows"]
    return f"{s['cut_rows']:,} of {s['generated_rows']:,} generated rows, {share:.1%}{limit}"


def cmd_stats(args) -> int:
    s = compute_stats(args.dir)
    print(json.dumps(s, indent=1) if args.json else render_stats(s))
    return 0


# ---- verify ------------------------------------------------------------------------------------


def verify_folder(path: str | Path) -> tuple[list[tuple[str, str]], list[str], int]:
    """([(file, problem)] of bad files, [debris file names], files checked)."""
    path = open_storage(path)  # a folder or an fsspec URL
    try:
        manifest = load_manifest(path)  # the manifest's own errors name the manifest
        folder = ShardFolder(path, verify="none", check_unlisted=False)
    except ShardError as e:
        return [(Path(e.path).name if e.path else "manifest", _describe(e))], [], 0
    bad: list[tuple[str, str]] = []
    seen: dict[tuple[str, int], str] = {}
    for fi, entry in enumerate(folder.manifest.files):
        try:
            folder.verify_file(fi)
            tokens = 0
            for bi in range(len(entry.batch_rows)):
                block = folder.read_block(fi, bi)
                tokens += int(block.offsets["trained"][-1])
                for key in zip(block.rows["id"], block.rows["sample_index"], strict=True):
                    if key in seen:
                        raise ShardError(
                            folder.store.where(entry.name),
                            f"row id={key[0]!r} sample_index={key[1]} is also in {seen[key]}",
                            field="id",
                        )
                    seen[key] = entry.name
            if tokens != entry.tokens:
                raise ShardError(
                    folder.store.where(entry.name),
                    f"{tokens} trained tokens, the manifest says {entry.tokens}",
                )
        except ShardError as e:
            bad.append((entry.name, _describe(e)))
        except Exception as e:  # anything a corrupt file makes pyarrow or numpy raise
            bad.append((entry.name, f"unreadable: {type(e).__name__}: {e}"))
    for extra in manifest.extras:
        try:
            read_extra(path, extra)
        except ShardError as e:
            bad.append((extra.name, _describe(e)))
    errors, debris = check_listing(path, manifest)
    bad += [(Path(e.path).name, _describe(e)) for e in errors]
    return bad, debris, len(manifest.files) + len(manifest.extras)


def cmd_verify(args) -> int:
    bad, debris, checked = verify_folder(args.dir)
    for name, problem in bad:
        print(f"BAD  {name}: {problem}")
    for name in debris:
        print(f"WARN {name}: in the folder but in no manifest (debris of an interrupted write?)")
    status = "FAILED" if bad else "ok"
    print(f"{status}: {checked} file(s) checked, {len(bad)} bad, {len(debris)} not in the manifest")
    return 1 if bad else 0


# ---- main --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.shards", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print one example with its teacher top-k")
    p.add_argument("dir", type=as_folder)
    p.add_argument("--row", type=int, default=0, help="row number in manifest order")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the teacher)")
    p.add_argument("--positions", default=None, help="response positions A:B (python slice)")
    p.add_argument("--top", type=int, default=5, help="top-N teacher tokens per position")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("stats", help="sizes, metadata and coverage of a folder")
    p.add_argument("dir", type=as_folder)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=cmd_stats)

    p = sub.add_parser("verify", help="check every file against the manifest")
    p.add_argument("dir", type=as_folder)
    p.set_defaults(fn=cmd_verify)

    add_commands(sub)  # export, import
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
