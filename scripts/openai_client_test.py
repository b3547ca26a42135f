#!/usr/bin/env python3
"""Drives a running `peregrine serve` with the official `openai` Python client.

    python3 scripts/openai_client_test.py BASE_URL MODEL_NAME [chat|nochat]

The API key comes from OPENAI_API_KEY. If `openai` is not importable, it is installed into a
virtual environment (OPENAI_TEST_VENV, default .build/openai-venv) and the script runs again from
there; if that cannot be done, one line says why and the exit code is 77 (skipped).
"""
import os
import subprocess
import sys

SKIPPED = 77


def skip(why):
    print(f"SKIP: {why}")
    sys.exit(SKIPPED)


def ensure_openai():
    try:
        import openai  # noqa: F401
        return
    except ImportError:
        pass
    if os.environ.get("OPENAI_TEST_IN_VENV"):
        skip("openai is still not importable inside the virtual environment")
    venv = os.environ.get("OPENAI_TEST_VENV", ".build/openai-venv")
    python = os.path.join(venv, "bin", "python")
    try:
        if not os.path.exists(python):
            subprocess.run([sys.executable, "-m", "venv", venv], check=True, capture_output=True, timeout=120)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "openai"],
                       check=True, capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as e:
        detail = getattr(e, "stderr", b"") or b""
        last = detail.decode(errors="replace").strip().splitlines()[-1:] or [str(e)]
        skip(f"cannot pip-install openai into {venv}: {last[0]}")
    os.execve(python, [python, os.path.abspath(__file__)] + sys.argv[1:], dict(os.environ, OPENAI_TEST_IN_VENV="1"))


def main():
    if len(sys.argv) < 3:
        print(__doc__)
        sys.exit(2)
    ensure_openai()
    import openai
    from openai import OpenAI

    base, model = sys.argv[1], sys.argv[2]
    chat = len(sys.argv) > 3 and sys.argv[3] == "chat"
    client = OpenAI(base_url=base.rstrip("/") + "/v1", max_retries=0, timeout=120)
    checks = 0

    def check(condition, what):
        nonlocal checks
        if not condition:
            print(f"FAILED: {what}")
            sys.exit(1)
        checks += 1

    models = client.models.list()
    check([m.id for m in models.data] == [model], f"models.list gives [{model}]: {models}")

    c = client.completions.create(model=model, prompt="And God said", max_tokens=8, temperature=0)
    check(c.object == "text_completion" and c.id.startswith("cmpl-"), f"completion object: {c}")
    check(c.choices[0].finish_reason == "length", f"finish_reason length: {c.choices[0]}")
    check(c.usage.completion_tokens == 8 and c.usage.total_tokens == c.usage.prompt_tokens + 8, f"usage: {c.usage}")
    text = c.choices[0].text
    check(len(text) > 0, "some text")

    parts, usage = [], None
    for chunk in client.completions.create(model=model, prompt="And God said", max_tokens=8, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            parts.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    check("".join(parts) == text, f"streamed text {''.join(parts)!r} == {text!r}")
    check(usage is not None and usage.completion_tokens == 8, f"streamed usage: {usage}")

    lp = client.completions.create(model=model, prompt=["And God said", "In the beginning"], max_tokens=3, temperature=0,
                                   logprobs=2)
    check(len(lp.choices) == 2 and [ch.index for ch in lp.choices] == [0, 1], f"two prompts, two choices: {lp.choices}")
    check(len(lp.choices[0].logprobs.tokens) == 3 and len(lp.choices[0].logprobs.top_logprobs[0]) >= 2,
          f"logprobs: {lp.choices[0].logprobs}")

    # Echo with logprobs: the prompt's tokens are scored too (the first has none); with
    # max_tokens 0 the prompt alone, as lm-eval-harness scores a text.
    e = client.completions.create(model=model, prompt="And God said", max_tokens=3, temperature=0, echo=True, logprobs=1)
    elp = e.choices[0].logprobs
    n_prompt = e.usage.prompt_tokens
    check(e.choices[0].text.startswith("And God said") and len(elp.tokens) == n_prompt + 3,
          f"echo text and logprobs over prompt and completion: {e.choices[0]}")
    check(elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
          and all(x is not None and x <= 0 for x in elp.token_logprobs[1:]), f"prompt token_logprobs: {elp.token_logprobs}")
    check(elp.text_offset == sorted(elp.text_offset) and elp.text_offset[-1] < len(e.choices[0].text),
          f"text_offset within the text: {elp.text_offset}")
    z = client.completions.create(model=model, prompt="And God said", max_tokens=0, echo=True, logprobs=1)
    zlp = z.choices[0].logprobs
    check(z.choices[0].text == "And God said" and z.choices[0].finish_reason == "length" and z.usage.completion_tokens == 0,
          f"max_tokens 0 with echo: {z}")
    check(zlp.tokens == elp.tokens[:n_prompt]
          and all(abs(a - b) < 1e-4 for a, b in zip(zlp.token_logprobs[1:], elp.token_logprobs[1:n_prompt])),
          f"the prompt scored alone as in the echo: {zlp}")
    streamed = list(client.completions.create(model=model, prompt="And God said", max_tokens=3, temperature=0, echo=True,
                                              logprobs=1, stream=True))
    first = streamed[0].choices[0]
    check(first.text == "And God said" and first.logprobs is not None and len(first.logprobs.tokens) == n_prompt,
          f"the streamed echo carries the prompt's logprobs: {first}")
    check("".join(ch.choices[0].text for ch in streamed if ch.choices) == e.choices[0].text, "streamed echo text")

    try:
        client.completions.create(model=model, prompt="x", temperature=-1)
        check(False, "temperature -1 is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.body.get("param") == "temperature", f"400 naming temperature: {e.body}")
    try:
        client.completions.create(model="no-such-model", prompt="x")
        check(False, "an unknown model is refused")
    except openai.NotFoundError as e:
        check(e.status_code == 404 and e.body.get("code") == "model_not_found", f"404 model_not_found: {e.body}")
    try:
        OpenAI(base_url=base.rstrip("/") + "/v1", api_key="wrong", max_retries=0).models.list()
        check(False, "a wrong API key is refused")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, f"401: {e}")

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "And God said"}]
    if chat:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                           top_logprobs=2)
        check(r.object == "chat.completion" and r.id.startswith("chatcmpl-"), f"chat object: {r}")
        message = r.choices[0].message
        check(message.role == "assistant" and message.content, f"assistant message: {message}")
        check(len(r.choices[0].logprobs.content) == r.usage.completion_tokens, f"chat logprobs: {r.choices[0].logprobs}")
        deltas, roles, finish = [], [], None
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True):
            for ch in chunk.choices:
                if ch.delta.role:
                    roles.append(ch.delta.role)
                if ch.delta.content:
                    deltas.append(ch.delta.content)
                finish = ch.finish_reason or finish
        check(roles == ["assistant"] and "".join(deltas) == message.content and finish is not None,
              f"streamed chat {''.join(deltas)!r} == {message.content!r}, roles {roles}, finish {finish}")
    else:
        try:
            client.chat.completions.create(model=model, messages=messages)
            check(False, "chat without a template is refused")
        except openai.BadRequestError as e:
            check(e.body.get("code") == "no_chat_template", f"400 no_chat_template: {e.body}")

    print(f"openai {openai.__version__}: {checks} checks passed")


if __name__ == "__main__":
    main()
