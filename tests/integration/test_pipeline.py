"""End to end: the real API, a real Celery worker with the real ms-swift engine on the tiny
model, a real Valkey/Redis. Content is checked against plain `transformers` greedy decoding
of the same weights, token counts against the tokenizer."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import httpx
import pytest
import redis
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import keys
from tests.support.stack import Stack, worker_lanes
from tests.support.wait import eventually

SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # qwen2_5 default


def _body(content: str, **kw: object) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **kw}


def _prompt(content: str) -> str:
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.fixture(scope="module")
def reference(demo_model: Path):
    tok = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()

    def greedy(content: str, max_new_tokens: int) -> tuple[str, int, int]:
        ids = tok(_prompt(content), return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        new = out[0, ids.shape[1] :].tolist()
        return str(tok.decode(new, skip_special_tokens=True)), ids.shape[1], len(new)

    return greedy


def _submit(c: httpx.Client, body: dict) -> dict:
    resp = c.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["object"] == "job" and job["status"] == "queued" and job["id"].startswith("job_")
    return job


def test_jobs_match_reference_decoding(any_stack: Stack, reference) -> None:
    stack = any_stack
    prompts = ["hello world", "Tell me a joke", "What is two plus two?", "Write a poem about GPUs " * 3]
    with stack.client() as c:
        jobs = [
            _submit(c, _body(p, temperature=0, max_tokens=24, metadata={"i": str(i)}))
            for i, p in enumerate(prompts)
        ]
    for i, (job, prompt) in enumerate(zip(jobs, prompts, strict=True)):
        done = stack.wait_job(job["id"])
        assert done["status"] == "succeeded", done
        assert done["metadata"] == {"i": str(i)}
        assert done["created_at"] <= done["started_at"] <= done["finished_at"]
        result = done["result"]
        assert result["object"] == "chat.completion" and result["model"] == "tiny"
        text, prompt_tokens, completion_tokens = reference(prompt, 24)
        choice = result["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": text, "refusal": None}
        assert choice["finish_reason"] == ("length" if completion_tokens == 24 else "stop")
        assert result["usage"] == {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }


def test_n_choices_and_seed(any_stack: Stack) -> None:
    stack = any_stack
    with stack.client() as c:
        a = _submit(c, _body("seeded", temperature=1.0, seed=7, n=3, max_tokens=12))
        b = _submit(c, _body("seeded", temperature=1.0, seed=7, n=3, max_tokens=12))
        other = _submit(c, _body("seeded", temperature=1.0, seed=8, n=3, max_tokens=12))
    ra, rb, ro = (stack.wait_job(j["id"])["result"] for j in (a, b, other))
    texts = [ch["message"]["content"] for ch in ra["choices"]]
    assert [ch["index"] for ch in ra["choices"]] == [0, 1, 2]
    assert texts == [ch["message"]["content"] for ch in rb["choices"]]  # same seed, same text
    assert texts != [ch["message"]["content"] for ch in ro["choices"]]
    assert len(set(texts)) > 1  # the n samples differ from each other
    full = sum(1 for ch in ra["choices"] if ch["finish_reason"] == "length")
    assert full * 12 <= ra["usage"]["completion_tokens"] <= 3 * 12  # summed over the n choices


def test_stop_sequence_is_honoured(any_stack: Stack, reference) -> None:
    stack = any_stack
    text, _, _ = reference("stop here", 24)
    stop = text[5:8]
    assert stop and stop in text
    with stack.client() as c:
        job = _submit(c, _body("stop here", temperature=0, max_tokens=24, stop=[stop]))
    result = stack.wait_job(job["id"])["result"]
    assert result["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert result["choices"][0]["finish_reason"] == "stop"


def test_penalties_change_greedy_output(any_stack: Stack) -> None:
    stack = any_stack
    with stack.client() as c:
        plain = _submit(c, _body("repeat repeat", temperature=0, max_tokens=32))
        pen = _submit(
            c,
            _body("repeat repeat", temperature=0, max_tokens=32, frequency_penalty=2.0, presence_penalty=2.0),
        )
    a = stack.wait_job(plain["id"])["result"]["choices"][0]["message"]["content"]
    b = stack.wait_job(pen["id"])["result"]["choices"][0]["message"]["content"]
    assert a != b


def _queue_depth(r: redis.Redis) -> int:
    return sum(int(r.llen(q)) for q in worker_lanes({}))


def _job_keys(r: redis.Redis) -> int:
    return sum(1 for _ in r.scan_iter(match=keys.job("*"), count=1000))


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (_body("x", model="nope"), 404, "model"),
        ({"model": "tiny", "messages": []}, 400, "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        (_body("x", max_tokens=0), 400, "max_tokens"),
        (_body("x", max_tokens=10**6), 400, "max_tokens"),
        (_body("x", n=0), 400, "n"),
        (_body("x", n=1000), 400, "n"),
        (_body("x", temperature=-1), 400, "temperature"),
        (_body("hello " * 3000), 400, "messages"),
        (_body("hello " * 1000, max_tokens=1500), 400, "max_tokens"),
        (_body("x", tools=[{"type": "function"}]), 400, "tools[0].function"),
        (_body("x", stream=True), 400, "stream"),
        (_body("x", metadata={f"k{i}": "v" for i in range(17)}), 400, "metadata"),
        (_body("x", presence_penalty="high"), 400, "presence_penalty"),
    ],
)
def test_invalid_bodies_are_refused_and_never_enqueued(
    stack: Stack, r: redis.Redis, body: dict, status: int, param: str
) -> None:
    before, depth = _job_keys(r), _queue_depth(r)
    with stack.client() as c:
        resp = c.post("/v1/jobs", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and param.split("[")[0] in err["message"] and err["type"]
    # No record and no message: the worker only ever shrinks the queues, and a message that
    # was sent and consumed meanwhile would have left a job record behind.
    assert _job_keys(r) == before
    assert _queue_depth(r) <= depth


def test_malformed_json_and_unknown_job(stack: Stack) -> None:
    with stack.client() as c:
        bad = c.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
        missing = c.get("/v1/jobs/job_doesnotexist")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"


def test_health_ready_models(stack: Stack) -> None:
    with stack.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        ready = c.get("/ready").json()
        assert ready["status"] == "ready" and ready["redis"] and ready["workers"][0]["model"] == "tiny"
        models = c.get("/v1/models").json()
    card = models["data"][0]
    assert card["id"] == "tiny" and card["demo"] is True and "gibberish" in card["owned_by"]
    assert card["context_length"] == 2048


def test_flower_shows_job_tasks(stack: Stack) -> None:
    with stack.client() as c:
        job = _submit(c, _body("flower", max_tokens=4))
    stack.wait_job(job["id"])

    def succeeded_in_flower() -> dict | None:
        """The task's end comes from the child at once, its receipt from the parent's event
        buffer up to tasks.events.AFTER_S later: Flower has the whole task once both came."""
        task: dict | None = httpx.get(f"{stack.flower_url}/api/tasks", timeout=5).json().get(job["id"])
        return task if task and task["state"] == "SUCCESS" and task["received"] else None

    task = eventually(
        succeeded_in_flower, timeout=20, interval=0.25, message="the job's task SUCCESS in Flower"
    )
    assert task["name"] == "inferq.run_job" and job["id"] in task["args"]
    workers = httpx.get(f"{stack.flower_url}/api/workers?refresh=1", timeout=10).json()
    assert any(name.startswith("inferq@") for name in workers)


def test_worker_child_killed_is_replaced_and_jobs_still_run(any_stack: Stack, r: redis.Redis) -> None:
    stack = any_stack
    with stack.client() as c:
        old = c.get("/ready").json()["workers"]
        pid = old[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        r.delete(keys.worker(old[0]["worker_id"]))

        def replaced() -> bool:
            ready = c.get("/ready")
            return ready.status_code == 200 and ready.json()["workers"][0]["pid"] != pid

        eventually(replaced, timeout=90, interval=0.25, message="a replacement pool child ready")
        job = _submit(c, _body("after restart", max_tokens=4))
    assert stack.wait_job(job["id"])["status"] == "succeeded"


def test_worker_parent_never_loads_torch(stack: Stack) -> None:
    with stack.client() as c:
        child = c.get("/ready").json()["workers"][0]["pid"]
    parent = int(Path(f"/proc/{child}/stat").read_text().split(")")[1].split()[1])
    assert "libtorch" in Path(f"/proc/{child}/maps").read_text()  # the probe can see torch
    assert "libtorch" not in Path(f"/proc/{parent}/maps").read_text()


def test_transport_level_bad_input(stack: Stack, r: redis.Redis) -> None:
    before = _job_keys(r)
    url = f"{stack.base_url}/v1/jobs"
    ok_body = json.dumps(_body("x")).encode()
    wrong_type = httpx.post(url, content=ok_body, headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 415 and "application/json" in wrong_type.json()["error"]["message"]
    huge = httpx.post(
        url, content=b"{" + b" " * (5 * 1024 * 1024) + b"}", headers={"content-type": "application/json"}
    )
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: the guard counts the bytes as they arrive
        for _ in range(80):
            yield b" " * 65536

    chunked = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    err = chunked.json()["error"]
    assert err["code"] == "body_too_large" and str(4 * 1024 * 1024) in err["message"]
    assert httpx.post(url, json=[1, 2]).status_code == 400
    bad_utf8 = httpx.post(url, content=b'{"model": "\xff"}', headers={"content-type": "application/json"})
    assert bad_utf8.status_code == 400
    # valid JSON, not valid Unicode: a lone surrogate was a 500 from the tokenizer
    for path in ("/v1/jobs", "/v1/chat/completions"):
        for text in ('"\\ud800"', '[{"type": "text", "text": "a\\udc00"}]'):
            raw = f'{{"model": "tiny", "messages": [{{"role": "user", "content": {text}}}]}}'
            lone = httpx.post(
                f"{stack.base_url}{path}", content=raw, headers={"content-type": "application/json"}
            )
            assert lone.status_code == 400, lone.text
            assert lone.json()["error"]["param"] == "messages[0].content" and "surrogate" in lone.text
    assert httpx.get(f"{stack.base_url}/health").status_code == 200  # still serving
    assert _job_keys(r) == before


def test_a_prompt_over_the_context_gets_context_length_exceeded_with_the_counts(stack: Stack) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "tell me about gpus " * 2000}]}
    with stack.client() as c:
        resp = c.post("/v1/jobs", json=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert re.search(
        r"maximum context length is 2048 tokens; the messages use \d{4,} ?\.?", err["message"]
    ), err


def test_docs_page_needs_no_other_host(stack: Stack) -> None:
    """/docs is the first page the READY line points to: it must work with no internet."""
    with stack.client() as c:
        page = c.get("/docs")
        assert page.status_code == 200 and "swagger-ui" in page.text
        refs = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
        assert refs and not [r for r in refs if "//" in r], refs  # nothing from a CDN
        for ref in refs:
            assert c.get(ref).status_code == 200, ref
        assert c.get("/openapi.json").json()["info"]["title"] == "inferq"
