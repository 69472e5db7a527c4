"""`saekit serve` as an OpenAI-compatible model, driven by the real `openai` Python client and by curl.

Run by scripts/e2e.sh (which builds the fixture; `openai` comes from PyPI through pip, see .ci/run):
plain, streamed and steered replies, the steered reply against `saekit generate --steer` with the same
seed, bad requests in OpenAI's error shape, and 16 concurrent clients through the bounded queue.
"""

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

import openai

BIN = os.environ["SAEKIT_BIN"]
FIX = os.environ["SAEKIT_E2E_FIXTURE"]


def start_server():
    args = [BIN, "serve", "--sae", f"{FIX}/sae", "--db", f"{FIX}/features.json", "--port", "0", "--queue", "4"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        m = re.search(r"listening on (http://\S+?)/?\s*$", line)
        if m:
            return proc, m.group(1)
    raise SystemExit("saekit serve did not start: " + proc.stderr.read())


def post(url, body, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


def curl(*args):
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, check=True).stdout


def main():
    proc, base = start_server()
    try:
        run(base)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print("openai client e2e: all checks passed")


def run(base):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert len(ids) == 1, ids
    model = ids[0]
    msgs = [{"role": "user", "content": "Name three fruits."}]

    # plain, greedy
    plain = client.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=16)
    text = plain.choices[0].message.content
    assert text and plain.choices[0].message.role == "assistant", plain
    u = plain.usage
    assert u.prompt_tokens > 5 and 1 <= u.completion_tokens <= 16 and u.total_tokens == u.prompt_tokens + u.completion_tokens, u
    assert plain.choices[0].finish_reason in ("stop", "length")

    # log-probabilities, read by the client's own types: greedy takes the likeliest token each time
    lp = client.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=16, logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert lp.choices[0].message.content == text and "".join(t.token for t in content) == text, content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token and t.logprob <= 0, t
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob, t

    # streamed: the same text in pieces, usage at the end
    pieces, usage, finish = [], None, None
    stream = client.chat.completions.create(
        model=model, messages=msgs, temperature=0, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            finish = c.finish_reason or finish
    assert "".join(pieces) == text, (pieces, text)
    assert len(pieces) > 1, pieces
    assert usage.completion_tokens == u.completion_tokens and finish == plain.choices[0].finish_reason

    # plain-text completions (no chat template): whole and streamed agree
    done = client.completions.create(model=model, prompt="The capital of France is", temperature=0, max_tokens=12)
    assert done.object == "text_completion" and done.choices[0].text, done
    streamed = client.completions.create(
        model=model, prompt="The capital of France is", temperature=0, max_tokens=12, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == done.choices[0].text

    # steered: differs from the unsteered reply and equals `saekit generate --steer` with the same seed
    top = json.loads(urllib.request.urlopen(f"{base}/api/features?sort=max_act&limit=1").read())["features"][0]
    value = float(round(40 * top["max_act"]))
    prompt = "Write one sentence about the sea."
    sampling = dict(temperature=0.8, top_p=0.95, seed=7, max_tokens=16)
    unsteered = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **sampling)
    steered = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        extra_body={"saekit": {"steer": [{"feature": top["id"], "mode": "clamp", "value": value}]}},
        **sampling,
    )
    s_text = steered.choices[0].message.content
    assert s_text != unsteered.choices[0].message.content, s_text
    cli = subprocess.run(
        [BIN, "generate", "--chat", "--sae", f"{FIX}/sae", "--steer", f"{top['id']}={value:g}", "-p", prompt,
         "--temperature", "0.8", "--top-p", "0.95", "--seed", "7", "-n", "16"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert cli[:-1] == s_text, (cli, s_text)  # `generate` ends its output with one newline

    # bad requests: the client raises its usual exceptions, the body is OpenAI's error object
    for kwargs, exc, status in [
        (dict(model=model, messages=msgs, temperature=5), openai.BadRequestError, 400),
        (dict(model="no-such-model", messages=msgs), openai.NotFoundError, 404),
        (dict(model=model, messages=[]), openai.BadRequestError, 400),
        (dict(model=model, messages=msgs, extra_body={"saekit": {"steer": [{"feature": 10**6, "mode": "clamp", "value": 1}]}}),
         openai.BadRequestError, 400),
    ]:
        try:
            client.chat.completions.create(**kwargs)
            raise AssertionError(f"{kwargs} was accepted")
        except exc as e:
            assert e.status_code == status, e
            assert isinstance(e.body, dict) and e.body.get("message") and e.body.get("type"), e.body

    # curl: plain JSON, server-sent events, and a 4xx in OpenAI's shape
    body = json.dumps({"model": model, "messages": msgs, "temperature": 0, "max_tokens": 16})
    out = json.loads(curl(f"{base}/v1/chat/completions", "-H", "Content-Type: application/json", "-d", body))
    assert out["choices"][0]["message"]["content"] == text, out
    sse = curl("-N", f"{base}/v1/chat/completions", "-H", "Content-Type: application/json",
               "-d", json.dumps({**json.loads(body), "stream": True}))
    data = [l[len("data: "):] for l in sse.splitlines() if l.startswith("data: ")]
    assert data[-1] == "[DONE]", sse
    assert "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1]) == text
    bad = curl("-w", "\n%{http_code}", f"{base}/v1/chat/completions", "-H", "Content-Type: application/json",
               "-d", '{"model": "x"')
    bad_body, code = bad.rsplit("\n", 1)
    assert code == "400" and json.loads(bad_body)["error"]["type"] == "invalid_request_error", bad

    # 16 concurrent raw requests against a queue of 4: some wait, the rest get 503 + Retry-After at once
    req = {"model": model, "messages": msgs, "temperature": 0, "max_tokens": 8}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: post(f"{base}/v1/chat/completions", req), range(16)))
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 503} and codes.count(200) >= 1, codes
    for status, headers, b in results:
        if status == 503:
            assert json.loads(b)["error"]["code"] == "server_busy" and headers.get("retry-after"), (headers, b)
    print(f"16 raw concurrent requests: {codes.count(200)} answered, {codes.count(503)} told to retry")

    # 16 concurrent openai clients, which retry 503s with backoff: every one gets the greedy reply
    # a loaded box serves 16 queued replies slower than 30 one-second retries: let the clients keep trying
    retrying = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=200, timeout=300)
    def ask(_):
        r = retrying.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=8)
        return r.choices[0].message.content
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, range(16)))
    assert len(set(replies)) == 1 and text.startswith(replies[0]), replies


if __name__ == "__main__":
    sys.exit(main())
