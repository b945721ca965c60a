"""The OpenAI request schemas, validated field by field, and OpenAI's error shape.

Every problem with a request becomes an :class:`APIError`: a 4xx status and
``{"error": {"message", "type", "param", "code"}}`` where ``param`` names the field (``messages[2].role``,
``max_tokens``, ...) and the message says what is wrong with it. Nothing in a request is ever used
as a path: ``model`` is looked up among the names the server was started with.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..chat import encode_prompt
from ..settings import strength_values

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1
STRENGTH_MAX, ALPHA_MAX, ALPHA_TILDE_MIN = 1000.0, 1e4, 1e-3

COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n", "user",
          "strength", "strengths", "alpha_0", "alpha_tilde", "top_k"}
#: fields a client may send with their "off" value; anything else is not supported
IGNORED_IF_OFF = {"presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None),
                  "logit_bias": (None, {}), "logprobs": (None, False), "top_logprobs": (None, 0),
                  "tools": (None, []), "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}),
                  "parallel_tool_calls": (None, False, True), "metadata": (None, {}), "store": (None, False),
                  "service_tier": (None, "auto", "default"), "echo": (None, False), "best_of": (None, 1),
                  "suffix": (None,)}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo"}
#: OpenAI's largest top_logprobs (chat) and logprobs (completions) are 20 and 5; this server takes 20 for both
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object (400 naming the problem otherwise)."""
    if not raw.strip():
        raise bad(None, "the request body is empty: send a JSON object", "invalid_json")
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad(None, "the request body is not UTF-8", "invalid_json") from None
    except json.JSONDecodeError as exc:
        raise bad(None, f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                  "invalid_json") from None
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {_kind(body)}", "invalid_json")
    return body


def _integer(body, name, lo, hi, default=None, hint=""):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"{name} must be an integer, got {_kind(value)}")
    if value < lo:
        raise bad(name, f"{name} must be >= {lo}, got {value}")
    if value > hi:
        raise bad(name, f"{name} must be <= {hi}{hint}, got {value}")
    return value


def _number(body, name, lo, hi, default=None, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(name, f"{name} must be a number, got {_kind(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise bad(name, f"{name} must be a finite number, got {value}")
    if value < lo or (lo_open and value == lo):
        raise bad(name, f"{name} must be {'>' if lo_open else '>='} {lo:g}, got {value:g}")
    if value > hi:
        raise bad(name, f"{name} must be <= {hi:g}, got {value:g}")
    return value


def _boolean(body, name, default=False):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"{name} must be true or false, got {_kind(value)}")
    return value


@dataclass
class DecodeRequest:
    """A validated request: what to decode and how."""

    kind: str  # "chat" or "completion"
    model: str
    adapter: str | None  # None: the base model
    prompts: list[list[int]]
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    alphas: tuple[float, float] | None
    strength: float | None
    strengths: tuple[float, ...] | None = None  # a stack's per-adapter strengths (then alphas is None)
    n: int = 1  # choices per prompt
    logprobs: int | None = None  # None: none; else how many top alternatives per token (0: the chosen token's only)
    echo: bool = False  # completions: the prompt's tokens (and their log-probs) come before the answer's


@dataclass
class Limits:
    max_tokens_cap: int = 512
    max_prompts: int = 16


def _check_fields(body, allowed):
    for key, value in body.items():
        if key in allowed:
            continue
        if key in IGNORED_IF_OFF:
            if any(value == off and type(value) is type(off) for off in IGNORED_IF_OFF[key]) or value is None:
                continue
            raise bad(key, f"{key} is not supported by this server (send it unset)", "unsupported_parameter")
        raise bad(key, f"unknown field {key!r}", "unknown_parameter")


def _messages(body) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise bad("messages", "messages is required: a non-empty array of {role, content} objects")
    if not isinstance(messages, list):
        raise bad("messages", f"messages must be an array, got {_kind(messages)}")
    if not messages:
        raise bad("messages", "messages must not be empty")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"{where} must be an object with role and content, got {_kind(m)}")
        role = m.get("role")
        if not isinstance(role, str):
            raise bad(f"{where}.role", f"{where}.role must be a string, got {_kind(role)}")
        if role not in ROLES:
            raise bad(f"{where}.role", f"{where}.role {role!r} is not supported: use "
                      + ", ".join(sorted(ROLES)))
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise bad(f"{where}.content[{j}]", f"{where}.content[{j}] must be a text part "
                              "{\"type\": \"text\", \"text\": ...}: this server reads text only")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"{where}.content", f"{where}.content must be a string, got {_kind(content)}")
        for key in m:
            if key not in ("role", "content", "name"):
                raise bad(f"{where}.{key}", f"{where}.{key} is not supported (messages take role and content)")
        out.append({"role": ROLES[role], "content": content})
    return out


def _prompts(body, served, limits) -> list[list[int]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "prompt is required: a string, an array of strings, or an array of token ids")
    vocab = served.vocab_size
    rows: list = []
    if isinstance(prompt, str):
        rows = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        rows = [prompt]
    elif isinstance(prompt, list) and prompt:
        rows = prompt
    else:
        raise bad("prompt", f"prompt must be a non-empty string or array, got {_kind(prompt)}"
                  + (" (empty)" if prompt == [] else ""))
    if len(rows) > limits.max_prompts:
        raise bad("prompt", f"prompt holds {len(rows)} prompts; this server takes at most {limits.max_prompts} "
                  "per request")
    single = rows[0] is prompt or isinstance(prompt, str)
    out = []
    for i, p in enumerate(rows):
        where = "prompt" if single else f"prompt[{i}]"
        if isinstance(p, str):
            if not p:
                raise bad(where, f"{where} is empty")
            with served.tokenizer_lock:
                ids = encode_prompt(served.tokenizer, p, raw_text=True)
            if not ids:
                raise bad(where, f"{where} encodes to no tokens")
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            wrong = [t for t in p if not 0 <= t < vocab]
            if wrong:
                raise bad(where, f"{where}: token id {wrong[0]} is outside the vocabulary [0, {vocab})")
            ids = list(p)
        else:
            raise bad(where, f"{where} must be a non-empty string or an array of token ids, got {_kind(p)}")
        out.append(ids)
    return out


def _stop(body) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list):
        raise bad("stop", f"stop must be a string or an array of strings, got {_kind(stop)}")
    if len(items) > MAX_STOP:
        raise bad("stop", f"stop takes at most {MAX_STOP} strings, got {len(items)}")
    for i, s in enumerate(items):
        where = "stop" if isinstance(stop, str) else f"stop[{i}]"
        if not isinstance(s, str):
            raise bad(where, f"{where} must be a string, got {_kind(s)}")
        if not s:
            raise bad(where, f"{where} must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise bad(where, f"{where} is {len(s)} characters long (at most {MAX_STOP_CHARS})")
    return tuple(items)


def _stack_strengths(body, served, adapter_name, model) -> tuple[float, ...]:
    """A stack's per-adapter strengths by THE strength rule (:func:`qadapter.settings.strength_values`):
    ``strength`` (or its older name ``strengths``) is one number for every adapter or an array of one
    per adapter (default: the saved ones); α's do not apply to a stack."""
    stack = served.adapters[adapter_name].stack
    for name in ("alpha_0", "alpha_tilde"):
        if body.get(name) is not None:
            raise bad(name, f"{name} does not apply to {model!r}, a stack of {len(stack)} adapters: give strength "
                      f"(one number for every adapter, or an array of one per adapter)")
    if body.get("strengths") is not None and body.get("strength") is not None:
        raise bad("strengths", "give strengths or strength, not both")
    field = "strengths" if body.get("strengths") is not None else "strength"
    value = body.get(field)
    if value is None:
        return tuple(stack.strengths)
    if isinstance(value, list):
        value = [_number({f"{field}[{i}]": v}, f"{field}[{i}]", 0.0, STRENGTH_MAX) for i, v in enumerate(value)]
    elif field == "strengths":
        raise bad("strengths", f"strengths must be an array of numbers, got {_kind(value)}")
    else:
        value = _number(body, "strength", 0.0, STRENGTH_MAX)
    try:
        return tuple(strength_values(value, len(stack), field))
    except ValueError as exc:
        raise bad(field, f"{exc} of {model!r}") from None


def _strength(body, served, adapter_name, model):
    if body.get("strengths") is not None and (adapter_name is None or served.adapters[adapter_name].stack is None):
        raise bad("strengths", f"strengths sets a stack's per-adapter strengths; {model!r} is not a stack "
                  "(use strength)")
    if isinstance(body.get("strength"), list) and adapter_name is not None:  # [s]: a Q-Adapter is a stack of one
        try:
            body = {**body, "strength": strength_values(body["strength"], 1, "strength")[0]}
        except ValueError as exc:
            raise bad("strength", f"{exc} ({model!r} is one adapter)") from None
    strength = _number(body, "strength", 0.0, STRENGTH_MAX, lo_open=True)
    alpha_0 = _number(body, "alpha_0", 0.0, ALPHA_MAX)
    alpha_tilde = _number(body, "alpha_tilde", ALPHA_TILDE_MIN, ALPHA_MAX)
    given = [n for n, v in (("strength", strength), ("alpha_0", alpha_0), ("alpha_tilde", alpha_tilde)) if v is not None]
    if adapter_name is None:
        if given:
            raise bad(given[0], f"{given[0]} sets an adapter's customization; {model!r} is the base model "
                      f"(pick an adapter: {', '.join(served.adapters)})")
        return None, None
    settings = served.adapters[adapter_name].settings
    try:
        alphas = settings.decoding_alphas(alpha_0, alpha_tilde, strength)
    except ValueError as exc:
        raise bad(given[0] if given else "strength", f"{given[0] if given else 'strength'}: {exc}") from None
    if not (math.isfinite(alphas[0]) and math.isfinite(alphas[1]) and alphas[1] > 0):
        raise bad(given[0] if given else "strength", f"these settings give alpha_0={alphas[0]}, "
                  f"alpha_tilde={alphas[1]}: not a usable policy")
    return (float(alphas[0]), float(alphas[1])), strength


def validate(body: dict, kind: str, served, limits: Limits) -> DecodeRequest:
    """A :class:`DecodeRequest` from a parsed chat (``kind="chat"``) or completion request body."""
    _check_fields(body, CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS)
    model = body.get("model")
    if model is None:
        raise bad("model", f"model is required: one of {', '.join(served.names())}")
    if not isinstance(model, str):
        raise bad("model", f"model must be a string, got {_kind(model)}")
    if model != served.base_name and model not in served.adapters:
        shown = model if len(model) <= 80 else model[:77] + "..."
        raise APIError(404, f"the model {shown!r} does not exist here: use one of {', '.join(served.names())} "
                       "(GET /v1/models)", param="model", code="model_not_found")
    adapter = None if model == served.base_name else model
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", f"stream_options must be an object, got {_kind(options)}")
        if not stream:
            raise bad("stream_options", "stream_options is only allowed when stream is true")
        for key in options:
            if key != "include_usage":
                raise bad(f"stream_options.{key}", f"unknown field stream_options.{key}")
        include_usage = _boolean(options, "include_usage")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user", f"user must be a string, got {_kind(body['user'])}")
    temperature = _number(body, "temperature", 0.0, 2.0, default=1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    vocab = served.vocab_size
    top_k = _integer(body, "top_k", -1, vocab, hint=" (the vocabulary size)")
    top_k = None if top_k in (None, -1, 0) else top_k
    seed = _integer(body, "seed", 0, MAX_SEED)
    stop = _stop(body)
    strengths = None
    if adapter is not None and served.adapters[adapter].stack is not None:
        alphas, strength, strengths = None, None, _stack_strengths(body, served, adapter, model)
    else:
        alphas, strength = _strength(body, served, adapter, model)

    if kind == "chat":
        messages = _messages(body)
        try:
            with served.tokenizer_lock:
                prompts = [encode_prompt(served.tokenizer, messages)]
        except Exception as exc:  # a chat template may refuse an order of roles
            raise bad("messages", f"the model's chat template cannot render these messages: {exc}") from None
        prompt_field = "messages"
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
            raise bad("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        default = None
    else:
        prompts = _prompts(body, served, limits)
        prompt_field, name, default = "prompt", "max_tokens", 16  # OpenAI's default for completions
    context = served.context_length
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise bad(prompt_field, f"the prompt is {longest} tokens; the model's context is {context} tokens, "
                  "which must also hold at least one new token", "context_length_exceeded")
    n = _integer(body, "n", 1, limits.max_prompts, default=1, hint=" (this server's --max-batch)")
    if n * len(prompts) > limits.max_prompts:
        raise bad("n", f"n={n} choices for each of {len(prompts)} prompts is {n * len(prompts)} rows; this server "
                  f"decodes at most {limits.max_prompts} per request")
    logprobs, echo = _logprobs(body, kind, stream)
    if logprobs is not None and strengths is not None:
        raise bad("logprobs", f"logprobs are not available for {model!r}, a stack (the scorer scores one adapter)")
    cap = limits.max_tokens_cap
    max_tokens = _integer(body, name, 0 if echo else 1, cap, hint=" (this server's cap, --max-tokens-cap)")
    if max_tokens is None:
        max_tokens = min(cap, context - longest) if default is None else min(default, cap, context - longest)
    elif longest + max_tokens > context:
        raise bad(name, f"{name}={max_tokens} plus the prompt's {longest} tokens is more than the model's context "
                  f"of {context} tokens (at most {context - longest} here)", "context_length_exceeded")
    return DecodeRequest(kind=kind, model=model, adapter=adapter, prompts=prompts, max_tokens=max_tokens,
                         temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop, stream=stream,
                         include_usage=include_usage, alphas=alphas, strength=strength, strengths=strengths, n=n,
                         logprobs=logprobs, echo=echo)


def _logprobs(body, kind: str, stream: bool) -> tuple[int | None, bool]:
    """(how many top alternatives per token, or None for no log-probs; echo). Chat: ``logprobs``
    (true/false) and ``top_logprobs`` (0-20, needs logprobs); completions: ``logprobs`` (an integer
    0-20) and ``echo``. Neither streams: the log-probs are scored after the answer is complete."""
    if kind == "chat":
        on = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top and not on:
            raise bad("top_logprobs", "top_logprobs needs logprobs: true")
        count, echo = (top or 0) if on else None, False
    else:
        count = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
        echo = _boolean(body, "echo")
    if stream and count is not None:
        raise bad("logprobs", "logprobs cannot be streamed by this server: send stream: false")
    if stream and echo:
        raise bad("echo", "echo cannot be streamed by this server: send stream: false")
    return count, echo
