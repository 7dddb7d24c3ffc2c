"""Baseline (3): a Hugging Face `transformers` model behind a minimal OpenAI-compatible streaming server.

The model is `LlamaForCausalLM` with random weights, sized like sleepserve's product model (hidden size,
blocks, heads, MLP width and vocabulary of the shipped checkpoint's config, or of the default
`ModelConfig`), on CPU; nothing is downloaded. Tokenisation is
sleepserve's: the prompt's UTF-8 bytes are the ids, generated ids 0–255 are bytes of the text, others
give no text, and EOS (257) ends a reply unless `ignore_eos`.

Scheduling, the simple way a user would wrap `transformers`: each request has its own `DynamicCache`
and there is one lock around the model. A request holds it for its prefill (one forward over the whole
prompt) and for each decode step, so concurrent requests take turns token by token (FIFO), unbatched.
Nothing is kept between requests: a conversation re-sends its whole history every turn.

Routes: `GET /health`, `GET /v1/models`, `POST /v1/completions` (prompt as text or token ids;
`max_tokens`, `temperature` (0: greedy, else sampling), `seed`, `ignore_eos`, `stream`,
`stream_options.include_usage`; the stream ends with `data: [DONE]`).

    python -m bench.hf_server --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from bench.models import product_config
from model.checkpoint import DEFAULT_CHECKPOINT
from model.config import ModelConfig
from model.tokenizer import EOS, StreamDecoder

MODEL_NAME = "llama-hf"


def llama_config(config: ModelConfig, max_context: int = 65536) -> LlamaConfig:
    """The Llama twin of `config`: same hidden size, blocks, attention heads, MLP width and vocabulary."""
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=len(config.layers),
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads,
        head_dim=config.head_dim,
        intermediate_size=config.mlp_ratio * config.d_model,
        max_position_embeddings=max_context,
        tie_word_embeddings=False,
    )


def build_model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A random-weight Llama of `config`, in eval mode on CPU."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def kv_cache_bytes(config: LlamaConfig, context: int) -> int:
    """Bytes of this model's fp32 KV cache holding `context` tokens."""
    return 2 * config.num_hidden_layers * context * config.num_key_value_heads * config.head_dim * 4


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields this wrapper ignores

    model: str
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False


@dataclass
class Piece:
    """Text produced by one step; the last piece of a request has `finish_reason`."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None


class Generator:
    """Decodes requests one model call at a time under a FIFO lock."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model
        self.lock = asyncio.Lock()
        # transformers 5 renamed the forward's `past_key_values` argument to `cache`.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def _forward(self, ids: list[int], cache: DynamicCache) -> Tensor:
        """Logits [vocab] after `ids`, appended to `cache` (updated in place)."""
        out = self.model(input_ids=torch.tensor([ids]), use_cache=True, **{self._cache_arg: cache})
        return out.logits[0, -1]

    async def tokens(
        self, prompt: list[int], max_tokens: int, temperature: float, seed: int | None
    ) -> AsyncIterator[int]:
        """Up to `max_tokens` generated ids: argmax at temperature 0, else sampled."""
        cache = DynamicCache()
        rng = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
        feed = prompt
        for _ in range(max_tokens):
            async with self.lock:
                logits = await asyncio.to_thread(self._forward, feed, cache)
            if temperature == 0:
                token = int(logits.argmax())
            else:
                token = int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=rng))
            yield token
            feed = [token]

    async def pieces(self, body: CompletionRequest, prompt: list[int]) -> AsyncIterator[Piece]:
        """The request's text piece by piece, then a final piece with the finish reason."""
        decoder = StreamDecoder()
        n = 0
        async for token in self.tokens(prompt, body.max_tokens, body.temperature, body.seed):
            n += 1
            if token == EOS and not body.ignore_eos:
                yield Piece(decoder.flush(), n, "stop")
                return
            yield Piece(decoder.push(token), n)
        yield Piece(decoder.flush(), n, "length")


def _encode(prompt: str | list[int]) -> list[int]:
    return list(prompt.encode("utf-8")) if isinstance(prompt, str) else list(prompt)


def _error(status: int, message: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=status)


def create_app(model: LlamaForCausalLM, model_name: str = MODEL_NAME) -> FastAPI:
    """The FastAPI app serving `model` as `model_name`."""
    app = FastAPI(title="transformers baseline")
    generator = Generator(model)
    vocab = model.config.vocab_size
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "transformers"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> JSONResponse | StreamingResponse:
        if body.model != model_name:
            return _error(404, f"The model `{body.model}` does not exist. This server serves `{model_name}`.")
        if body.stream_options is not None and not body.stream:
            return _error(400, "stream_options is only allowed when stream is true")
        prompt = _encode(body.prompt)
        if not prompt or any(not 0 <= t < vocab for t in prompt):
            return _error(400, f"prompt must be non-empty text or token ids in [0, {vocab})")
        rid = f"cmpl-{secrets.token_hex(12)}"

        def response(choices: list[dict], piece: Piece | None = None) -> dict:
            """A completion object; with `piece`, its usage."""
            out = {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": choices,
            }
            if piece is not None:
                n = piece.completion_tokens
                out["usage"] = {
                    "prompt_tokens": len(prompt),
                    "completion_tokens": n,
                    "total_tokens": len(prompt) + n,
                }
            return out

        def choice(text: str, finish_reason: str | None) -> list[dict]:
            return [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]

        if not body.stream:
            pieces = [p async for p in generator.pieces(body, prompt)]
            last = pieces[-1]
            return JSONResponse(response(choice("".join(p.text for p in pieces), last.finish_reason), last))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            async for piece in generator.pieces(body, prompt):
                if piece.text or piece.finish_reason:
                    yield f"data: {json.dumps(response(choice(piece.text, piece.finish_reason)))}\n\n"
                if piece.finish_reason and include_usage:
                    yield f"data: {json.dumps(response([], piece))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hf_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model-name", default=MODEL_NAME)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=DEFAULT_CHECKPOINT,
        help="size the Llama like this checkpoint's model",
    )
    parser.add_argument("--max-context", type=int, default=65536, help="max_position_embeddings")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    model = build_model(llama_config(product_config(args.checkpoint), args.max_context), args.seed)
    app = create_app(model, args.model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
