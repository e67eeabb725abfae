"""The optional LLM-as-judge against a fake OpenAI-compatible server on loopback."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from pipeline import evaluate
from pipeline.judge import Judge, JudgeError


@pytest.fixture
def fake_llm():
    """A chat-completions endpoint that answers with `reply` and keeps every request it got."""
    state = {"reply": "0.75", "status": 200, "requests": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": state["reply"]}}]}).encode()
            self.send_response(state["status"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["base_url"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()


def test_the_judge_asks_an_openai_compatible_endpoint_and_reads_its_grade(fake_llm):
    judge = Judge(fake_llm["base_url"], "judge-model", api_key="sk-test")
    assert judge.score("When does the pool open?", "At 7 am.", "It opens at seven.") == 0.75
    sent = fake_llm["requests"][0]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer sk-test"
    assert sent["body"]["model"] == "judge-model" and sent["body"]["temperature"] == 0
    assert "At 7 am." in sent["body"]["messages"][1]["content"] and "It opens at seven." in sent["body"]["messages"][1]["content"]
    fake_llm["reply"] = "Score: 1.5"
    assert judge.score("q", "a", "b") == 1.0  # clipped to [0, 1]


def test_a_judge_that_fails_says_where_and_why(fake_llm):
    judge = Judge(fake_llm["base_url"], "judge-model")
    fake_llm["reply"] = "I cannot grade this."
    with pytest.raises(JudgeError, match="not a number between 0 and 1"):
        judge.score("q", "a", "b")
    fake_llm["status"] = 500
    with pytest.raises(JudgeError, match=f"the LLM judge at {fake_llm['base_url']}/chat/completions did not answer"):
        judge.score("q", "a", "b")
    with pytest.raises(JudgeError, match="did not answer"):
        Judge("http://127.0.0.1:9/v1", "m", timeout_s=2).score("q", "a", "b")


def test_only_free_text_answers_go_to_the_judge(fake_llm):
    def call(trace_id: str, answer: str) -> dict:
        return {"trace_id": trace_id, "messages": json.dumps([{"role": "user", "content": "When does the pool open?"}]),
                "tools": None, "response_message": json.dumps({"role": "assistant", "content": answer}), "feedback": None}

    holdout = pd.DataFrame([call("free", "The pool opens at 7 am every day."), call("label", "spa, request_info")])
    generated = [("It opens at seven in the morning.", 0.9), ("spa, request_info", 0.8)]
    scored = evaluate.score_holdout(holdout, generated, Judge(fake_llm["base_url"], "judge-model"))
    assert list(scored["scorer"]) == ["llm_judge", "label_set"] and list(scored["score"]) == [0.75, 1.0]
    assert len(fake_llm["requests"]) == 1
    assert list(evaluate.score_holdout(holdout, generated)["scorer"]) == ["free_text", "label_set"]  # off by default
