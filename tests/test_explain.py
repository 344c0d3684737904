"""`workbench explain`: the explain/detection protocol against a real HTTP server on 127.0.0.1 that
answers from fixed rules, the explanations file, the held-out split, and one-line errors."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from app.cli import main
from workbench.explanations import (
    ExplanationsError,
    explanations_path,
    read_explanations,
    read_runs,
    write_explanations,
)


class RuleServer:
    """An OpenAI-compatible /v1/chat/completions that answers by rule: asked to explain, "the
    words «a» «b» «c»", the 3 most common words inside the marked runs <<...>> of the examples;
    asked to score, 1 for each example whose text contains one of them. `fail_first` requests are
    answered 500; `garbage` answers non-JSON; requests after the first `refuse_after` are
    answered 400. Every request's headers and body are recorded."""

    def __init__(self):
        self.requests: list[dict] = []
        self.fail_first = 0
        self.refuse_after = None
        self.garbage = False
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    failing = server.fail_first > 0
                    server.fail_first -= failing
                    refused = server.refuse_after is not None and len(server.requests) > server.refuse_after
                if failing or refused or self.path != "/v1/chat/completions":
                    code = 500 if failing else 400 if refused else 404
                    return self._send(code, b'{"error": "no such model"}')
                if server.garbage:
                    return self._send(200, b"<html>not json</html>")
                content = answer(body["messages"])
                reply = {
                    "choices": [{"message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 2},
                }
                self._send(200, json.dumps(reply).encode())

            def _send(self, code: int, data: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def chats(self, kind: str) -> list[dict]:
        return [
            r
            for r in self.requests
            if ("[EXPLANATION]" in r["body"]["messages"][0]["content"]) == (kind == "explain")
        ]


def answer(messages: list[dict]) -> str:
    system, user = messages[0]["content"], messages[1]["content"]
    if "[EXPLANATION]" in system:
        return f"Thinking about it.\n[EXPLANATION]: the words {' '.join(f'«{w}»' for w in top_words(user))}"
    targets = re.findall(r"«(.*?)»", user)
    lines = re.findall(r"^Example \d+: (.*)$", user, re.MULTILINE)
    return "Sure: " + json.dumps([int(any(w in line for w in targets)) for line in lines])


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


def top_words(prompt: str) -> list[str]:
    """The rule's explanation: the 3 most common words inside marked runs (first seen wins ties)."""
    return [
        w
        for w, _ in Counter(w for run in re.findall(r"<<(.*?)>>", prompt) for w in words(run)).most_common(3)
    ]


@pytest.fixture
def server():
    s = RuleServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def store_dir(tiny_run, tmp_path):
    """The tiny run's store, copied so each test writes its own explanations file."""
    import shutil

    target = tmp_path / "run"
    target.mkdir()
    shutil.copy(tiny_run / "features.duckdb", target / "features.duckdb")
    return target


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    import sae.explain_client

    monkeypatch.setattr(sae.explain_client, "BACKOFF_S", 0.01)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def densest(store_dir, n: int) -> list[int]:
    from workbench.store import FeatureStore

    store = FeatureStore(store_dir / "features.duckdb")
    try:
        return [int(f) for f in store.features(limit=n)["feature"]]
    finally:
        store.close()


def rendered(store, example) -> str:
    return "".join(store.token_texts(example.tokens)).replace("\r", "\\r").replace("\n", "\\n")


def test_protocol_end_to_end_scores_what_the_rules_imply(capsys, server, store_dir, tiny_cache):
    from sae.io import load
    from workbench.cache_reader import ActivationCache
    from workbench.store import FeatureStore

    features = densest(store_dir, 8)
    code, out, err = run_cli(
        capsys, "explain", str(store_dir), "--endpoint", server.url, "--model", "rules", "--top", "8",
        "--holdout", "3", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert "saved:" in out and all(str(f) in out for f in features)
    assert len(server.chats("explain")) == 8 and len(server.chats("score")) == 8  # 6 contexts: one request
    entries = read_explanations(store_dir / "features.duckdb")
    log = [json.loads(line) for line in (store_dir / "features.explain.jsonl").read_text().splitlines()]
    assert sorted(r["feature"] for r in log) == sorted(features) == sorted(entries)
    store = FeatureStore(store_dir / "features.duckdb")
    dictionary = load(store.meta["dictionary_path"])
    cache = ActivationCache(tiny_cache)
    hook = cache.hooks[0]
    rows = torch.cat([cache.shard(hook, i) for i in range(cache.n_shards(hook))]).float()
    outcomes = Counter()
    for record in log:
        f, entry, page = record["feature"], entries[record["feature"]], store.feature(record["feature"])
        listing = "\n".join(f"Example {i + 1}: {text}" for i, text in enumerate(record["shown"]))
        prompts = [r["body"]["messages"][1]["content"] for r in server.chats("explain")]
        prompt = next(p for p in prompts if p.startswith(listing + "\n\n"))
        targets = top_words(prompt)
        assert entry["source"] == "llm" and entry["explainer"] == "rules"
        assert entry["explanation"] == "the words " + " ".join(f"«{w}»" for w in targets)
        # ground truth, independently: a context is activating iff it is one of the feature's
        # quantile examples, never one the explainer saw
        quantile_texts = {rendered(store, q) for q in page.quantiles}
        shown_texts = {re.sub(r"<<|>>", "", text) for text in record["shown"]}
        texts = [c["text"] for c in record["contexts"]]
        labels = [int(t in quantile_texts) for t in texts]
        assert sum(labels) == 3 and len(labels) == 6 and not set(texts) & shown_texts
        assert labels == [c["label"] for c in record["contexts"]]
        for c in record["contexts"]:  # the non-activating spans are silent: encode them again
            if c["label"] == 0:
                first = c["window"] * cache.context_length + c["start"]
                assert (
                    cache.tokens[c["window"], c["start"] : c["start"] + len(c["tokens"])].tolist()
                    == c["tokens"]
                )
                span = rows[first : first + len(c["tokens"])]
                with torch.no_grad():
                    assert float(dictionary.encode(span).to_dense()[:, f].max()) <= 0
        predictions = [int(any(w in t for w in targets)) for t in texts]
        outcomes.update(zip(predictions, labels))
        tp = sum(p and y for p, y in zip(predictions, labels))
        fp = sum(p and not y for p, y in zip(predictions, labels))
        fn = sum(y and not p for p, y in zip(predictions, labels))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        detection = entry["detection"]
        assert detection["n"] == 6 and detection["scorer"] == "llm" and detection["scorer_model"] == "rules"
        assert detection["f1"] == pytest.approx(f1) and detection["recall"] == pytest.approx(recall)
        assert detection["accuracy"] == pytest.approx(sum(p == y for p, y in zip(predictions, labels)) / 6)
    store.close()
    assert len(outcomes) >= 3, outcomes  # (prediction, label): the rules are right and wrong both ways
    runs = read_runs(store_dir)
    assert len(runs) == 1 and runs[0]["endpoint"] == server.url and runs[0]["model"] == "rules"
    assert runs[0]["prompt_version"] and runs[0]["seed"] == 0


def explain_cli(capsys, store_dir, *extra: str, url: str | None = None) -> tuple[int, str, str]:
    endpoint = ("--endpoint", url, "--model", "rules") if url else ()
    return run_cli(capsys, "explain", str(store_dir), *endpoint, "--holdout", "3", "--quiet", *extra)


def log_records(store_dir) -> list[dict]:
    return [json.loads(line) for line in (store_dir / "features.explain.jsonl").read_text().splitlines()]


def test_the_key_is_sent_as_a_bearer_header_and_written_nowhere(capsys, server, store_dir, monkeypatch):
    (feature,) = densest(store_dir, 1)
    monkeypatch.setenv("EXPLAIN_TEST_KEY", "sk-test-5e3c")
    code, _, err = explain_cli(
        capsys, store_dir, "--features", str(feature), "--api-key-env", "EXPLAIN_TEST_KEY", url=server.url
    )
    assert code == 0, err
    assert len(server.requests) == 2
    assert all(r["headers"]["Authorization"] == "Bearer sk-test-5e3c" for r in server.requests)
    for written in store_dir.iterdir():
        assert "sk-test-5e3c" not in written.read_text(errors="replace")
    assert read_runs(store_dir)[0]["api_key_env"] == "EXPLAIN_TEST_KEY"
    server.requests.clear()  # without --api-key-env no header is sent
    assert explain_cli(capsys, store_dir, "--features", str(feature), "--redo", url=server.url)[0] == 0
    assert server.requests and not any("Authorization" in r["headers"] for r in server.requests)


def test_a_missing_key_variable_is_one_line_before_any_request(capsys, server, store_dir, monkeypatch):
    monkeypatch.delenv("EXPLAIN_TEST_UNSET", raising=False)
    code, out, err = explain_cli(capsys, store_dir, "--api-key-env", "EXPLAIN_TEST_UNSET", url=server.url)
    assert code == 2 and err.count("\n") == 1 and "EXPLAIN_TEST_UNSET" in err and "not set" in err
    assert not server.requests and not explanations_path(store_dir).exists()


def test_a_500_is_retried(capsys, server, store_dir):
    (feature,) = densest(store_dir, 1)
    server.fail_first = 1
    code, _, err = explain_cli(capsys, store_dir, "--features", str(feature), url=server.url)
    assert code == 0, err
    assert len(server.requests) == 3 and server.requests[0]["body"] == server.requests[1]["body"]
    assert read_explanations(store_dir)[feature]["source"] == "llm"
    server.fail_first = 10  # past --retries: one line naming the status, nothing written
    other = densest(store_dir, 2)[1]
    code, _, err = explain_cli(capsys, store_dir, "--features", str(other), "--retries", "1", url=server.url)
    assert code == 2 and err.count("\n") == 1 and "HTTP 500 after 2 tries" in err
    assert list(read_explanations(store_dir)) == [feature]


def test_unreachable_and_unreadable_endpoints_are_one_line(capsys, server, store_dir):
    feature = str(densest(store_dir, 1)[0])
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, out, err = explain_cli(capsys, store_dir, "--features", feature, url=f"http://127.0.0.1:{port}/v1")
    assert code == 2 and err.startswith("error: cannot reach") and err.count("\n") == 1
    assert f"127.0.0.1:{port}/v1/chat/completions" in err and "Traceback" not in err
    server.garbage = True
    code, out, err = explain_cli(capsys, store_dir, "--features", feature, url=server.url)
    assert code == 2 and "not JSON" in err and "<html>" in err and err.count("\n") == 1
    assert not explanations_path(store_dir).exists()
    server.garbage = False  # a base URL without /v1: the server's 404, with a hint
    code, out, err = explain_cli(capsys, store_dir, "--features", feature, url=server.url[: -len("/v1")])
    assert code == 2 and "HTTP 404" in err and "/v1" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "explain", str(store_dir), "--endpoint", "ftp://x", "--model", "m")
    assert code == 2 and "http(s) URL" in err
    code, _, err = run_cli(capsys, "explain", str(store_dir), "--endpoint", server.url)
    assert code == 2 and "--model" in err
    code, _, err = run_cli(capsys, "explain", str(store_dir), "--features", "100000")
    assert code == 2 and "outside this store" in err


def test_an_error_midway_keeps_the_features_finished(capsys, server, store_dir):
    first, second = densest(store_dir, 2)
    server.refuse_after = 2  # the first feature's two requests succeed
    code, _, err = explain_cli(
        capsys, store_dir, "--features", f"{first},{second}", "--concurrency", "1", url=server.url
    )
    assert code == 2 and "HTTP 400" in err and "no such model" in err
    assert list(read_explanations(store_dir)) == [first]
    server.refuse_after = None  # a rerun resumes: only the missing feature is asked for
    server.requests.clear()
    code, out, _ = explain_cli(capsys, store_dir, "--features", f"{first},{second}", url=server.url)
    assert code == 0 and "skipped 1" in out and len(server.requests) == 2
    assert sorted(read_explanations(store_dir)) == sorted([first, second])


def test_offline_summaries_score_by_token_match_and_keep_llm_explanations(capsys, server, store_dir):
    from workbench.store import FeatureStore

    features = densest(store_dir, 4)
    assert explain_cli(capsys, store_dir, "--features", str(features[0]), url=server.url)[0] == 0
    code, out, err = explain_cli(capsys, store_dir, "--top", "4")
    assert code == 0 and "skipped 1" in out, err
    entries = read_explanations(store_dir)
    assert entries[features[0]]["source"] == "llm" and len(server.requests) == 2  # kept, not re-asked
    store = FeatureStore(store_dir / "features.duckdb")
    summaries = store.summaries(features) if hasattr(store, "summaries") else {}
    for record in log_records(store_dir)[1:]:
        f, entry = record["feature"], entries[record["feature"]]
        assert entry["source"] == "summary" and entry["explainer"] == ""
        if summaries.get(f):
            assert entry["explanation"] == summaries[f]
        page = store.feature(f)
        assert set(record["peaks"]) <= {e.tokens[e.position - e.start] for e in page.top + page.quantiles}
        labels = [c["label"] for c in record["contexts"]]
        predictions = [int(bool(set(c["tokens"]) & set(record["peaks"]))) for c in record["contexts"]]
        assert predictions == [c["prediction"] for c in record["contexts"]]
        correct = sum(p == y for p, y in zip(predictions, labels))
        assert entry["detection"]["scorer"] == "token-match" and entry["detection"]["n"] == len(labels) == 6
        assert entry["detection"]["accuracy"] == pytest.approx(correct / 6)
    store.close()
    assert explain_cli(capsys, store_dir, "--top", "4", "--redo")[0] == 0  # --redo replaces it
    assert read_explanations(store_dir)[features[0]]["source"] == "summary"


def test_without_the_cache_there_is_no_detection_score_rather_than_a_guess(capsys, store_dir):
    import duckdb

    con = duckdb.connect(str(store_dir / "features.duckdb"))  # the store moved without its cache
    con.execute("UPDATE meta SET value = ? WHERE key = 'cache'", [json.dumps(str(store_dir / "gone"))])
    con.close()
    code, out, err = explain_cli(capsys, store_dir, "--top", "2")
    assert code == 0, err
    assert "no detection scores" in out and "gone" in out
    entries = read_explanations(store_dir)
    assert len(entries) == 2 and all(e["detection"] is None and e["explanation"] for e in entries.values())


def test_the_held_out_split_is_seeded_disjoint_and_reproducible(capsys, store_dir):
    from sae.explain_contexts import split_examples
    from workbench.store import FeatureStore

    store = FeatureStore(store_dir / "features.duckdb")
    pages = [store.feature(f) for f in densest(store_dir, 6)]
    store.close()

    def key(examples):
        return [(e.window, e.position) for e in examples]

    differs = False
    for page in pages:
        a, b = split_examples(page, 10, 3, seed=1), split_examples(page, 10, 3, seed=1)
        assert key(a.held_out) == key(b.held_out) and key(a.shown) == key(b.shown)
        assert len(a.held_out) == 3 and len(a.shown) == 10
        assert set(key(a.held_out)) <= set(key(page.quantiles))
        for h in a.held_out:  # nothing held out overlaps a shown example's tokens
            for s in a.shown:
                assert (
                    h.window != s.window
                    or h.start + len(h.tokens) <= s.start
                    or s.start + len(s.tokens) <= h.start
                )
        differs |= key(a.held_out) != key(split_examples(page, 10, 3, seed=2).held_out)
    assert differs
    runs = []
    for seed in ("4", "4", "5"):  # the whole scoring set, negatives and order included
        assert explain_cli(capsys, store_dir, "--top", "3", "--seed", seed, "--redo")[0] == 0
        runs.append(
            [
                [(c["window"], c["start"], c["label"]) for c in r["contexts"]]
                for r in log_records(store_dir)[-3:]
            ]
        )
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_the_explanations_file_round_trips_and_merges(tmp_path):
    store = tmp_path / "run" / "features.duckdb"
    store.parent.mkdir()
    assert explanations_path(store) == tmp_path / "run" / "features.explanations.json"
    assert explanations_path(store.parent) == explanations_path(store) and read_explanations(store) == {}
    score = {"accuracy": 0.75, "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "n": 8}
    kings = {"explanation": "kings", "source": "llm", "explainer": "m", "detection": score}
    queens = {"explanation": "queens", "source": "llm", "explainer": "m2", "detection": None}
    write_explanations(store, {3: kings}, {"model": "m", "id": "a"})
    write_explanations(store, {1: {"explanation": "x", "source": "summary", "detection": None}}, {"id": "b"})
    write_explanations(store, {3: queens, 7: {"explanation": "y", "source": "summary"}}, {"id": "a"})
    entries = read_explanations(store)
    assert sorted(entries) == [1, 3, 7]
    assert (
        entries[3]["explanation"] == "queens" and entries[3]["explainer"] == "m2" and entries[3]["run"] == 0
    )
    assert entries[1] == {
        "explanation": "x",
        "source": "summary",
        "explainer": "",
        "detection": None,
        "run": 1,
    }
    assert [r["id"] for r in read_runs(store)] == ["a", "b"]  # the same run id adds to its record
    write_explanations(store, {2: {"explanation": "z", "source": "summary", "detection": score}}, {})
    assert (
        read_explanations(store)[2]["detection"] == score
        and read_explanations(store)[3]["explanation"] == "queens"
    )
    before = explanations_path(store).read_bytes()
    bad_entries = (
        {"explanation": 1, "source": "llm"},
        {"explanation": "a", "source": "guess"},
        {"explanation": "a", "source": "llm", "detection": {"f1": 1}},
    )
    for bad in bad_entries:
        with pytest.raises(ExplanationsError):
            write_explanations(store, {5: bad}, {})
    assert explanations_path(store).read_bytes() == before  # a refused write changes nothing
    for damaged in ("{", '{"format_version": 9}', '{"format_version": 1, "features": {"a": {}}}'):
        explanations_path(store).write_text(damaged)
        with pytest.raises(ExplanationsError, match="explanations"):
            read_explanations(store)


def test_replies_are_parsed_robustly():
    from sae.explain_prompts import detection_scores, parse_explanation, parse_predictions, render_context

    reply = '<think>[EXPLANATION]: no</think>Hmm.\n[EXPLANATION]: **"king" speaker tags**\nDone.'
    assert parse_explanation(reply) == '"king" speaker tags'
    assert parse_explanation('[explanation]: "the word after KING"') == "the word after KING"
    assert parse_explanation("The word 'the'.\n") == "The word 'the'."
    assert parse_explanation("") == ""
    assert parse_predictions("Looking at [1]... Answer: [1, 0, true, 0]", 4) == [1, 0, 1, 0]
    assert parse_predictions('["1", "0"]', 2) == [1, 0]
    assert parse_predictions("1, 0, 0", 3) == [1, 0, 0] and parse_predictions("[1, 0]", 3) is None
    assert parse_predictions("example 1 is 1", 3) is None
    scores = detection_scores([1, 1, 0, 0, 0], [1, 0, 1, 0, 0])
    assert (scores["precision"], scores["recall"], scores["accuracy"], scores["n"]) == (0.5, 0.5, 0.6, 5)
    assert detection_scores([1, 0], [0, 0])["f1"] == 0.0
    assert render_context(["A", "\n", "b", "c"], [0, 1, 2, 0]) == "A<<\\nb>>c"
    assert render_context(["x", "y"], [3, 0]) == "<<x>>y" and render_context(["x"]) == "x"


def test_explain_has_help(capsys):
    code, out, _ = run_cli(capsys, "explain", "--help")
    assert code == 0 and "--endpoint" in out and "--api-key-env" in out and "--holdout" in out


def test_token_match_looks_for_repeated_peak_tokens_only():
    """The offline rule looked for every shown example's peak token, so common tokens made it
    call nearly every context activating (F1 0.67, the always-yes score)."""
    from types import SimpleNamespace

    from sae.explain import _repeated_peaks

    def example(peak_token):
        return SimpleNamespace(tokens=[7, peak_token, 9], position=11, start=10)

    assert _repeated_peaks([example(5), example(5), example(6), example(8), example(8)]) == {5, 8}
    assert _repeated_peaks([example(3), example(6), example(3)]) == {3}
    assert len(_repeated_peaks([example(4), example(6)])) == 1
