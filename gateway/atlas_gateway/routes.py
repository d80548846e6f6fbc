"""The route table: every path the gateway answers, and for each inference route what the
rest of the gateway needs to know about it. Adding a route is adding a row here.

A row says:

* ``path``, ``methods`` and the ``handler`` (an endpoint class, built once per route by app.py);
* ``required``: the body members the route cannot do without (metering/validation.py: a 400 naming the
  member), checked in order after ``model``;
* ``prompt``: how the prompt bound is read (a :class:`~atlas_gateway.metering.bounds.Meter` method
  returning the tokens and the number of prompts); None for a requests-only route;
* ``cap_fields``: where the completion cap is read (the smallest positive wins) and where the
  cap reserved for is forwarded (all of them); ``also_capped``: fields lowered to the cap when
  the client sent them, never added; ``choices``: ``n``/``best_of`` multiply the reservation;
* ``streams``: ``stream: true`` answers server-sent events; ``asks_usage``: the upstream must be
  asked for the usage chunk (``stream_options.include_usage``, stripped again when Atlas asked);
* ``usage``: how the upstream's ``usage`` object is read (metering/usage.py);
* ``stores_responses``: the upstream stores what it answers (owner records, ``previous_response_id``);
* ``operation``: ``gen_ai.operation.name`` of its spans (telemetry/; OpenTelemetry's GenAI
  conventions), the route's ``name`` when the conventions have no value for it.

Everything else is refused with an OpenAI-shaped 404 (nothing reaches the upstream unmetered).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .handlers.inference import InferenceEndpoint
from .handlers.models import ModelsEndpoint
from .handlers.probes import HealthEndpoint, MetricsEndpoint, ReadyEndpoint
from .handlers.stored_responses import StoredResponseEndpoint
from .handlers.usage_report import UsageEndpoint
from .metering.bounds import Meter
from .metering.usage import split_usage
from .metering.validation import Field

PromptReader = Callable[[Meter, dict[str, Any]], tuple[int, int]]
UsageReader = Callable[[dict[str, Any]], tuple[int, int, int]]

_TEXT = (str, list)  # a string, or an array (of strings, token ids, items: the prompt reader decides)


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    path: str
    name: str
    handler: type
    methods: tuple[str, ...] = ("POST",)
    prefix: bool = False  # ``path`` is a prefix (``/v1/responses/{id}...``)
    required: tuple[Field, ...] = ()
    prompt: PromptReader | None = None
    cap_fields: tuple[str, ...] = ()
    also_capped: tuple[str, ...] = ()
    choices: bool = False
    streams: bool = False
    asks_usage: bool = False
    usage: UsageReader = split_usage
    stores_responses: bool = False
    operation: str = ""  # gen_ai.operation.name of its spans; default: ``name``

    def __post_init__(self) -> None:
        if not self.operation:
            object.__setattr__(self, "operation", self.name)


ROUTES: tuple[Route, ...] = (
    # ---- metered: admitted, forwarded, settled
    Route(
        "/v1/chat/completions",
        "chat",
        InferenceEndpoint,
        required=(Field("messages", (list,), "'messages' must be a non-empty array."),),
        prompt=Meter.chat_prompt,
        cap_fields=("max_completion_tokens", "max_tokens"),
        choices=True,
        streams=True,
        asks_usage=True,
    ),
    Route(
        "/v1/completions",
        "completions",
        InferenceEndpoint,
        required=(Field("prompt", _TEXT, "'prompt' is required (string or array)."),),
        prompt=Meter.completions_prompt,
        cap_fields=("max_tokens",),
        also_capped=("max_completion_tokens",),
        choices=True,
        streams=True,
        asks_usage=True,
        operation="text_completion",
    ),
    Route(
        "/v1/embeddings",
        "embeddings",
        InferenceEndpoint,
        required=(Field("input", _TEXT, "'input' is required (string or array)."),),
        prompt=Meter.embeddings_prompt,
    ),
    Route(
        "/v1/responses",
        "responses",
        InferenceEndpoint,
        required=(Field("input", _TEXT, "'input' is required (string or array of input items).", may_be_empty=True),),
        prompt=Meter.responses_prompt,
        cap_fields=("max_output_tokens",),
        streams=True,
        stores_responses=True,
        operation="chat",
    ),
    Route(
        "/v1/messages",
        "messages",
        InferenceEndpoint,
        required=(Field("messages", (list,), "'messages' must be a non-empty array."),),
        prompt=Meter.messages_prompt,
        cap_fields=("max_tokens",),
        streams=True,
        operation="chat",
    ),
    Route(
        "/v1/rerank",
        "rerank",
        InferenceEndpoint,
        required=(
            Field("documents", (list,), "'documents' must be a non-empty array."),
            Field("query", (str,), "'query' is required and must be a string."),
        ),
        prompt=Meter.rerank_prompt,
    ),
    Route(
        "/v1/score",
        "score",
        InferenceEndpoint,
        required=tuple(
            Field(name, _TEXT, f"'{name}' is required (string or array of strings).", may_be_empty=True)
            for name in ("text_1", "text_2")
        ),
        prompt=Meter.score_prompt,
    ),
    # ---- requests only: admitted against request rate and concurrency, no tokens
    Route("/tokenize", "tokenize", InferenceEndpoint),
    Route("/detokenize", "detokenize", InferenceEndpoint),
    # ---- stored responses: only the key that created them (auth/response_owners.py)
    Route("/v1/responses/", "stored_response", StoredResponseEndpoint, methods=("GET", "DELETE", "POST"), prefix=True),
    # ---- the caller's own view, and the process's
    Route("/v1/models", "models", ModelsEndpoint, methods=("GET",)),
    Route("/v1/usage", "usage", UsageEndpoint, methods=("GET",)),
    Route("/healthz", "healthz", HealthEndpoint, methods=("GET",)),
    Route("/readyz", "readyz", ReadyEndpoint, methods=("GET",)),
    Route("/metrics", "metrics", MetricsEndpoint, methods=("GET",)),
)

_BY_NAME = {route.name: route for route in ROUTES}


def route(name: str) -> Route:
    """The row of the route called ``name`` (``"chat"``, ``"embeddings"``...)."""
    return _BY_NAME[name]
